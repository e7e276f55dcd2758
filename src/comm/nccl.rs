//! The NCCL backend (cargo feature `nccl`): collectives on CUDA tensors, in place, on the stream
//! libtorch computes on (the legacy default stream), through NCCL loaded at run time (cudarc's
//! dynamic loading), so the crate builds on machines without CUDA and fails at run time with a
//! clear error when the driver or NCCL is missing.
//!
//! NCCL sits on top of another backend, the *control* group: a group of the same ranks on CPU
//! (MPI processes, or threads that each own a GPU). The control group broadcasts NCCL's unique
//! id, makes subgroups, and carries every CPU tensor; CUDA tensors go through NCCL as grouped
//! sends and receives of bytes. As on every backend, the envelopes (op, dtype, shape) are
//! exchanged and compared first, here as a small grouped exchange of their own; the stream is
//! polled against the timeout after each phase, and a communicator that does not finish in time
//! is aborted (`ncclCommAbort`) and the collective returns `Error::Timeout`.

use std::ffi::c_void;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::{result as nccl, sys as nccl_sys};
use tch::{Device, Kind, Tensor};

use super::backend::{describe, header, Backend, Envelope, HEADER_LEN};
use super::group::{Group, GroupInfo};
use super::OpKind;
use crate::error::TorchResultExt;
use crate::{Error, Result};

fn nccl_error(what: &str, e: nccl::NcclError) -> Error {
    Error::Backend { backend: "nccl", msg: format!("{what}: NCCL error {:?}", e.0) }
}

/// Whether the NVIDIA driver and NCCL can be loaded; the error says which is missing and how
/// to provide it.
pub fn nccl_available() -> Result<()> {
    // SAFETY: is_culib_present only tries to load the shared library and reports whether it could.
    if !unsafe { cu::is_culib_present() } {
        return Err(Error::Backend {
            backend: "nccl",
            msg: "the NVIDIA driver (libcuda.so) cannot be loaded: NCCL needs a GPU machine".into(),
        });
    }
    // SAFETY: as above, for NCCL.
    if !unsafe { nccl_sys::is_culib_present() } {
        return Err(Error::Backend {
            backend: "nccl",
            msg: "libnccl.so cannot be loaded: put a directory holding libnccl.so (a link to pip's \
                  nvidia/nccl/lib/libnccl.so.2 will do) on LD_LIBRARY_PATH"
                .into(),
        });
    }
    Ok(())
}

/// An NCCL communicator, destroyed with its last owner.
struct Comm(nccl_sys::ncclComm_t);

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is destroyed exactly once, here.
        let _ = unsafe { nccl::comm_destroy(self.0) };
    }
}

/// One rank's NCCL connection for one group, with the group's control connection.
struct NcclEndpoint {
    control: Arc<dyn Backend>,
    comm: Comm,
    /// This rank's index in the group.
    rank: usize,
    device: Device,
    timeout: Duration,
    owner: ThreadId,
}

// SAFETY: the endpoint holds an NCCL communicator handle (a pointer NCCL allows to be used from
// any thread, one at a time) and the control backend (Send + Sync itself). Every method checks
// that it runs on `owner`, the thread that made the communicator, before calling NCCL, so calls
// are never concurrent.
unsafe impl Send for NcclEndpoint {}
// SAFETY: see Send.
unsafe impl Sync for NcclEndpoint {}

/// The legacy default stream, which libtorch computes on unless told otherwise.
fn stream() -> nccl_sys::cudaStream_t {
    std::ptr::null_mut()
}

/// Makes an NCCL communicator for the `control` group's ranks: its rank 0 draws the unique id
/// and the control group broadcasts it. Collective over `control`.
fn communicator(control: &Arc<dyn Backend>, info: &GroupInfo, rank: usize) -> Result<Comm> {
    let size = info.ranks.len();
    let mut id = Tensor::zeros([128], (Kind::Uint8, Device::Cpu));
    if rank == 0 {
        let unique = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        let bytes: Vec<u8> = unique.internal.iter().map(|&c| c as u8).collect();
        id = Tensor::from_slice(&bytes);
    }
    let (sends, recvs) = if rank == 0 {
        ((0..size).map(|j| (j != 0).then(|| id.shallow_clone())).collect(), (0..size).map(|_| None).collect())
    } else {
        ((0..size).map(|_| None).collect(), (0..size).map(|j| (j == 0).then(|| id.shallow_clone())).collect())
    };
    control.exchange(info, OpKind::Broadcast, sends, recvs)?;
    let bytes = Vec::<u8>::try_from(&id).op("nccl_init")?;
    let mut unique = nccl_sys::ncclUniqueId { internal: [0; 128] };
    for (slot, b) in unique.internal.iter_mut().zip(bytes) {
        *slot = b as std::ffi::c_char;
    }
    let mut comm = std::ptr::null_mut();
    // SAFETY: `comm` is a valid place for NCCL to write the new handle; size, id and rank are the
    // same on every rank of the control group (the id was just broadcast).
    unsafe { nccl::comm_init_rank(&mut comm, size as i32, unique, rank as i32) }
        .map_err(|e| nccl_error("ncclCommInitRank", e))?;
    Ok(Comm(comm))
}

impl NcclEndpoint {
    fn check(&self, op: OpKind, group: &GroupInfo) -> Result<()> {
        if std::thread::current().id() != self.owner {
            return Err(Error::Backend {
                backend: "nccl",
                msg: format!("{op} on group {group}: use a group from the thread that made it"),
            });
        }
        Ok(())
    }

    /// Waits for the stream to drain, or aborts the communicator at the deadline.
    fn wait(&self, op: OpKind, group: &GroupInfo, start: Instant, what: &str) -> Result<()> {
        loop {
            // SAFETY: cuStreamQuery only reads the state of the (legacy default) stream.
            match unsafe { cu::cuStreamQuery(stream() as cu::CUstream) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(Error::Backend {
                        backend: "nccl",
                        msg: format!("{op} on group {group}: CUDA {other:?}"),
                    })
                }
            }
            if start.elapsed() > self.timeout {
                // SAFETY: aborting a live communicator of ours; it is not used afterwards (the
                // run ends with this error).
                let _ = unsafe { nccl::comm_abort(self.comm.0) };
                return Err(Error::Timeout {
                    op: op.name(),
                    group: group.to_string(),
                    rank: group.ranks.first().copied().unwrap_or(0),
                    waited: start.elapsed(),
                    timeout: self.timeout,
                    what: format!("waiting for {what}; the NCCL communicator was aborted"),
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// One grouped batch of byte transfers between contiguous device buffers.
    fn transfer(&self, what: &str, sends: &[(usize, Tensor)], recvs: &[(usize, Tensor)]) -> Result<()> {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let u8 = nccl_sys::ncclDataType_t::ncclUint8;
        nccl::group_start().map_err(|e| nccl_error(what, e))?;
        for (peer, t) in sends {
            // SAFETY: `t` is a contiguous CUDA tensor that the caller keeps alive until the stream
            // drains (it waits before dropping it); NCCL reads `bytes(t)` bytes from its data.
            unsafe {
                nccl::send(t.data_ptr() as *const c_void, bytes(t), u8, *peer as i32, self.comm.0, stream())
            }
            .map_err(|e| nccl_error(what, e))?;
        }
        for (peer, t) in recvs {
            // SAFETY: `t` is a contiguous CUDA buffer of `bytes(t)` bytes that only NCCL writes
            // until the stream drains.
            unsafe { nccl::recv(t.data_ptr(), bytes(t), u8, *peer as i32, self.comm.0, stream()) }
                .map_err(|e| nccl_error(what, e))?;
        }
        nccl::group_end().map_err(|e| nccl_error(what, e))?;
        Ok(())
    }
}

impl Backend for NcclEndpoint {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn exchange(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<()> {
        self.check(op, group)?;
        let on_gpu = |t: &Option<Tensor>| t.as_ref().map(|t| t.device() != Device::Cpu);
        let devices: Vec<bool> = sends.iter().chain(&recvs).filter_map(on_gpu).collect();
        if devices.iter().all(|g| !g) {
            return self.control.exchange(group, op, sends, recvs); // CPU tensors: the control group
        }
        if devices.iter().any(|g| !g) {
            return Err(Error::Backend {
                backend: "nccl",
                msg: format!("{op} on group {group}: mixes CPU and CUDA tensors"),
            });
        }
        let start = Instant::now();
        // Envelopes first, as [8] i64 on the device, compared on the host.
        let out: Vec<(usize, Tensor)> = sends
            .into_iter()
            .enumerate()
            .filter_map(|(j, t)| t.map(|t| (j, t)))
            .map(|(j, t)| Ok((j, t.f_contiguous()?)))
            .collect::<Result<_, tch::TchError>>()
            .op(op.name())?;
        let inc: Vec<(usize, Tensor)> =
            recvs.into_iter().enumerate().filter_map(|(j, t)| t.map(|t| (j, t))).collect();
        let to_dev = |h: [i64; HEADER_LEN]| Tensor::from_slice(&h).f_to(self.device).op(op.name());
        let sent_headers: Vec<(usize, Tensor)> = out
            .iter()
            .map(|(j, t)| Ok((*j, to_dev(header(&Envelope::of(op, t)))?)))
            .collect::<Result<_>>()?;
        let got_headers: Vec<(usize, Tensor)> = inc
            .iter()
            .map(|(j, _)| {
                Ok((*j, Tensor::f_zeros([HEADER_LEN as i64], (Kind::Int64, self.device)).op(op.name())?))
            })
            .collect::<Result<_>>()?;
        self.transfer("headers", &sent_headers, &got_headers)?;
        self.wait(op, group, start, "headers")?;
        for ((j, dst), (_, got)) in inc.iter().zip(&got_headers) {
            let got: Vec<i64> = Vec::<i64>::try_from(got).op(op.name())?;
            let want = header(&Envelope::of(op.peer_kind(), dst));
            if got[..] != want[..] {
                let mut g = [0i64; HEADER_LEN];
                g.copy_from_slice(&got);
                return Err(Error::Mismatch {
                    op: op.name(),
                    group: group.to_string(),
                    detail: format!(
                        "rank {} sent {} but this rank expected {}",
                        group.ranks[*j],
                        describe(&g),
                        describe(&want)
                    ),
                });
            }
        }
        // Payloads, into contiguous buffers (the destination itself when contiguous).
        let bufs: Vec<(usize, Tensor)> = inc
            .iter()
            .map(|(j, dst)| {
                let buf = if dst.is_contiguous() {
                    dst.shallow_clone()
                } else {
                    Tensor::f_empty(dst.size(), (dst.kind(), dst.device())).op(op.name())?
                };
                Ok((*j, buf))
            })
            .collect::<Result<_>>()?;
        self.transfer(op.name(), &out, &bufs)?;
        self.wait(op, group, start, "data")?;
        for ((_, mut dst), (_, buf)) in inc.into_iter().zip(bufs) {
            if !dst.is_contiguous() {
                dst.f_copy_(&buf).op(op.name())?;
            }
        }
        Ok(())
    }

    fn split(
        &self,
        parent: &GroupInfo,
        color: Option<usize>,
        key: usize,
        sub: Option<&GroupInfo>,
    ) -> Result<Option<Arc<dyn Backend>>> {
        self.check(OpKind::Split, parent)?;
        let Some(control) = self.control.split(parent, color, key, sub)? else { return Ok(None) };
        let Some(info) = sub else { return Ok(None) };
        let my_global = parent.ranks[self.rank];
        let rank = info.ranks.iter().position(|&r| r == my_global).ok_or_else(|| Error::Backend {
            backend: "nccl",
            msg: format!("rank {my_global} is not in its own subgroup {info}"),
        })?;
        let comm = communicator(&control, info, rank)?;
        let e = NcclEndpoint {
            control,
            comm,
            rank,
            device: self.device,
            timeout: self.timeout,
            owner: self.owner,
        };
        Ok(Some(Arc::new(e)))
    }
}

/// The world group on NCCL for CUDA tensors on `device`, with `control` (the same ranks on a CPU
/// backend: MPI processes, or threads that each own a GPU) carrying CPU tensors and the set-up.
/// Collective over `control`.
pub fn nccl_group(control: &Group, device: Device, timeout: Duration) -> Result<Group> {
    nccl_available()?;
    if !matches!(device, Device::Cuda(_)) {
        return Err(Error::Backend {
            backend: "nccl",
            msg: format!("NCCL needs a CUDA device, not {device:?}"),
        });
    }
    let info = control.info().clone();
    let control_backend = control.backend_handle();
    let comm = communicator(&control_backend, &info, control.rank())?;
    let owner = std::thread::current().id();
    let endpoint =
        NcclEndpoint { control: control_backend, comm, rank: control.rank(), device, timeout, owner };
    Group::new(info, control.rank(), Arc::new(endpoint))
}
