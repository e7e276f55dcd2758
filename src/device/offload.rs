//! Activation offload (ALST, Bekman et al. 2025, "activation checkpoint offload to CPU"; on disk
//! as ZeRO-Infinity, Rajbhandari et al. 2021, moves tensors to NVMe): under full
//! checkpointing, what each block keeps for its backward is its input `[b, s_r, h]`; with
//! offload it leaves the compute device as soon as the block's forward is done and comes back,
//! one block ahead, for the backward.
//!
//! - **Host** (a GPU model): the input is copied into pinned host memory on a side stream
//!   after the block's forward has been queued (the host does not wait), and back on a side
//!   stream when the block before it starts its backward; the current stream waits on the
//!   copy's event before using it.
//! - **Disk** (a CPU model, or a GPU one short of host memory): the input is written to a file
//!   in a folder of the store's own, made under the folder given and removed with the store;
//!   the file of the block before is read by a thread while this block's backward runs.
//!
//! A tensor used more than once (chunked Ulysses' older key/value chunks, which every later
//! query chunk attends to) is [`read`](Offload::read) back, the store keeping it, and
//! [`take`](Offload::take)n at its last use.
//!
//! The model drops its own references to an offloaded input (the tape keeps recorded outputs
//! only to meet their gradients: [`Tape::release_values`](crate::autograd::Tape)), so the
//! device memory of the block inputs really goes: resident memory falls by `L b s_r h` elements
//! less the two blocks in flight.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};

use super::SideCopy;
use crate::error::TorchResultExt;
use crate::{Error, Result};

const OP: &str = "offload";

/// Where offloaded activations go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadTarget {
    /// Pinned host memory, copied on side streams (a GPU model only).
    Host,
    /// Files under this folder.
    Disk(PathBuf),
}

/// What the store has moved, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadStats {
    /// Tensors moved out (`put`) and brought back (`take`).
    pub put: u64,
    pub taken: u64,
    /// Tensors brought back and kept in the store too (`read`).
    pub read: u64,
    /// Bytes held off the device now, and the most at once.
    pub held_bytes: u64,
    pub peak_held_bytes: u64,
}

/// An offloaded tensor.
enum Stored {
    Host { pinned: Tensor, copy: SideCopy },
    File { path: PathBuf, size: Vec<i64>, kind: Kind, bytes: u64 },
}

/// A tensor on its way back.
enum Coming {
    /// Being copied to the device on a side stream (from `pinned`, kept until it has arrived).
    Device { tensor: Tensor, copy: SideCopy, bytes: u64, pinned: Tensor },
    /// A thread reading its file.
    Reading {
        path: PathBuf,
        size: Vec<i64>,
        kind: Kind,
        bytes: u64,
        thread: JoinHandle<std::io::Result<Vec<u8>>>,
    },
}

/// The store of one model: block inputs by block index.
pub struct Offload {
    target: OffloadTarget,
    device: Device,
    /// The store's own folder (disk), removed on drop.
    folder: Option<PathBuf>,
    stored: RefCell<BTreeMap<usize, Stored>>,
    /// The tensor on its way back: its key, whether the store keeps it (a read), the transfer.
    coming: RefCell<Option<(usize, bool, Coming)>>,
    stats: Cell<OffloadStats>,
}

/// Distinguishes the folders of the stores of one process (one per rank thread).
static NEXT_FOLDER: AtomicU64 = AtomicU64::new(0);

impl Offload {
    /// A store for tensors of a model on `device`. Disk: makes a folder of its own under the
    /// given one (which must exist and be writable), named after the process; Host: the model
    /// must be on a GPU (on a CPU the activations are in host memory already).
    pub fn new(target: OffloadTarget, device: Device) -> Result<Offload> {
        let folder = match &target {
            OffloadTarget::Host => {
                if !device.is_cuda() {
                    return Err(invalid(format!(
                        "offload to host memory for a model on {device:?}: its activations are in host \
                         memory already (offload to disk instead)"
                    )));
                }
                None
            }
            OffloadTarget::Disk(parent) => {
                remove_stale(parent);
                let n = NEXT_FOLDER.fetch_add(1, Ordering::Relaxed);
                let folder = parent.join(format!("ulysses-offload-{}-{n}", std::process::id()));
                std::fs::create_dir(&folder).map_err(|e| {
                    invalid(format!(
                        "offload folder {}: cannot make {} in it: {e}",
                        parent.display(),
                        folder.display()
                    ))
                })?;
                Some(folder)
            }
        };
        Ok(Offload {
            target,
            device,
            folder,
            stored: RefCell::default(),
            coming: RefCell::default(),
            stats: Cell::default(),
        })
    }

    pub fn target(&self) -> &OffloadTarget {
        &self.target
    }

    /// The store's own folder (disk).
    pub fn folder(&self) -> Option<&Path> {
        self.folder.as_deref()
    }

    pub fn stats(&self) -> OffloadStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut OffloadStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        s.peak_held_bytes = s.peak_held_bytes.max(s.held_bytes);
        self.stats.set(s);
    }

    /// Moves a copy of `x` off the device under `key` (replacing what was there). The caller
    /// drops its own references to `x` afterwards.
    ///
    /// # Shapes
    /// `x`: any; it comes back as it went.
    pub fn put(&self, key: usize, x: &Tensor) -> Result<()> {
        self.forget(key);
        let bytes = (x.numel() * x.kind().elt_size_in_bytes()) as u64;
        let stored = match &self.folder {
            None => {
                let mut pinned = Tensor::f_empty(x.size(), (x.kind(), Device::Cpu))
                    .and_then(|t| t.f_pin_memory(self.device))
                    .op(OP)?;
                let copy = super::copy_on_side_stream(&mut pinned, &x.detach())?;
                Stored::Host { pinned, copy }
            }
            Some(folder) => {
                let path = folder.join(format!("{key}.bin"));
                let host = x.detach().f_to_device(Device::Cpu).and_then(|t| t.f_contiguous()).op(OP)?;
                let mut data = vec![0u8; bytes as usize];
                host.f_copy_data_u8(&mut data, host.numel()).op(OP)?;
                if let Err(e) = std::fs::write(&path, &data) {
                    let _ = std::fs::remove_file(&path); // nothing half-written left behind
                    return Err(invalid(format!(
                        "offload folder {}: writing {} bytes (block {key}): {e}",
                        folder.display(),
                        bytes
                    )));
                }
                Stored::File { path, size: x.size(), kind: x.kind(), bytes }
            }
        };
        self.stored.borrow_mut().insert(key, stored);
        self.count(|s| {
            s.put += 1;
            s.held_bytes += bytes;
        });
        Ok(())
    }

    /// Starts bringing `key` back (a side-stream copy, or a thread reading its file) if it is
    /// stored and not already on its way; the store forgets it ([`take`](Offload::take) it).
    pub fn prefetch(&self, key: usize) -> Result<()> {
        self.start(key, false)
    }

    /// [`prefetch`](Offload::prefetch) for a [`read`](Offload::read): the store keeps `key`.
    pub fn prefetch_read(&self, key: usize) -> Result<()> {
        self.start(key, true)
    }

    fn start(&self, key: usize, keep: bool) -> Result<()> {
        if self.coming.borrow().as_ref().is_some_and(|(k, kp, _)| *k == key && *kp == keep) {
            return Ok(());
        }
        let coming = if keep {
            let stored = self.stored.borrow();
            let Some(s) = stored.get(&key) else { return Ok(()) };
            self.bring(s)?
        } else {
            let Some(s) = self.stored.borrow_mut().remove(&key) else { return Ok(()) };
            self.bring(&s)?
        };
        // A different transfer still coming is finished first: a take goes back into the store,
        // so nothing is lost; a read is dropped (the store has it).
        let previous = self.coming.borrow_mut().replace((key, keep, coming));
        if let Some((k, kp, c)) = previous {
            let t = self.arrive(k, kp, c)?;
            if !kp {
                self.put(k, &t)?;
            }
        }
        Ok(())
    }

    /// Starts the transfer of a stored tensor back to the device.
    fn bring(&self, stored: &Stored) -> Result<Coming> {
        Ok(match stored {
            Stored::Host { pinned, copy } => {
                // The copy out must be done before the copy back reads the pinned buffer.
                copy.wait()?;
                let mut tensor = Tensor::f_empty(pinned.size(), (pinned.kind(), self.device)).op(OP)?;
                let copy = super::copy_on_side_stream(&mut tensor, pinned)?;
                let bytes = (pinned.numel() * pinned.kind().elt_size_in_bytes()) as u64;
                Coming::Device { tensor, copy, bytes, pinned: pinned.shallow_clone() }
            }
            Stored::File { path, size, kind, bytes } => {
                let reading = path.clone();
                let thread = std::thread::spawn(move || std::fs::read(reading));
                Coming::Reading { path: path.clone(), size: size.clone(), kind: *kind, bytes: *bytes, thread }
            }
        })
    }

    /// Brings `key` back to the device (waiting for a prefetch of it, or loading it now); the
    /// store forgets it.
    pub fn take(&self, key: usize) -> Result<Tensor> {
        self.fetch(key, false)
    }

    /// A copy of `key` on the device (waiting for a [`prefetch_read`](Offload::prefetch_read) of
    /// it, or loading it now); the store keeps it.
    pub fn read(&self, key: usize) -> Result<Tensor> {
        self.fetch(key, true)
    }

    /// [`take`](Offload::take) (`keep` false) or [`read`](Offload::read) (`keep` true).
    fn fetch(&self, key: usize, keep: bool) -> Result<Tensor> {
        self.start(key, keep)?;
        let coming = self.coming.borrow_mut().take();
        match coming {
            // A read may meet a take of the same key already on its way: that one goes back.
            Some((k, kp, c)) if k == key && (kp == keep || keep) => {
                let t = self.arrive(k, kp, c)?;
                if keep && !kp {
                    self.put(k, &t)?;
                }
                Ok(t)
            }
            other => {
                *self.coming.borrow_mut() = other;
                Err(invalid(format!("block {key} was never offloaded (or was taken already)")))
            }
        }
    }

    fn arrive(&self, key: usize, keep: bool, coming: Coming) -> Result<Tensor> {
        let (tensor, bytes) = match coming {
            Coming::Device { tensor, copy, bytes, pinned } => {
                copy.block()?;
                // The side stream may still read `pinned`; libtorch's pinned-memory cache holds
                // the block until the copy's event, but the buffer is kept to here all the same.
                drop(pinned);
                (tensor, bytes)
            }
            Coming::Reading { path, size, kind, bytes, thread } => {
                let data = thread
                    .join()
                    .map_err(|_| invalid(format!("the thread reading {} panicked", path.display())))?
                    .map_err(|e| {
                        invalid(format!("offload: reading {} (block {key}): {e}", path.display()))
                    })?;
                if !keep {
                    let _ = std::fs::remove_file(&path);
                }
                if data.len() as u64 != bytes {
                    return Err(invalid(format!(
                        "offload: {} holds {} bytes, {bytes} were written (block {key})",
                        path.display(),
                        data.len()
                    )));
                }
                let t = Tensor::f_from_data_size(&data, &size, kind).and_then(|t| t.f_to_device(self.device));
                (t.op(OP)?, bytes)
            }
        };
        self.count(|s| {
            if keep {
                s.read += 1;
            } else {
                s.taken += 1;
                s.held_bytes = s.held_bytes.saturating_sub(bytes);
            }
        });
        Ok(tensor)
    }

    /// Drops whatever is stored under `key`.
    fn forget(&self, key: usize) {
        let removed = self.stored.borrow_mut().remove(&key);
        let bytes = match removed {
            Some(Stored::File { path, bytes, .. }) => {
                let _ = std::fs::remove_file(path);
                bytes
            }
            Some(Stored::Host { pinned, copy }) => {
                let _ = copy.wait(); // the side stream may still be writing into it
                (pinned.numel() * pinned.kind().elt_size_in_bytes()) as u64
            }
            None => 0,
        };
        self.count(|s| s.held_bytes = s.held_bytes.saturating_sub(bytes));
    }

    /// Forgets everything (a step that failed half way).
    pub fn clear(&self) {
        let keys: Vec<usize> = self.stored.borrow().keys().copied().collect();
        for k in keys {
            self.forget(k);
        }
        if let Some((_, _, coming)) = self.coming.borrow_mut().take() {
            match coming {
                Coming::Device { copy, .. } => {
                    let _ = copy.wait();
                }
                Coming::Reading { path, thread, .. } => {
                    let _ = thread.join();
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let mut s = self.stats.get();
        s.held_bytes = 0;
        self.stats.set(s);
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        self.clear();
        if let Some(folder) = &self.folder {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
}

/// Removes the folders under `parent` of stores whose process is gone (killed before its
/// stores were dropped), so that a killed run leaves nothing behind once another one starts.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ulysses-offload-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && Path::new("/proc/self").exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument { op: OP, group: "-".into(), msg }
}
