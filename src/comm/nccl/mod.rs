//! The NCCL backend (cargo feature `nccl`): collectives on CUDA tensors through NCCL loaded at
//! run time (cudarc's dynamic loading), so the crate builds on machines without CUDA and fails
//! at run time with a clear error when the driver or NCCL is missing or too old.
//!
//! NCCL sits on top of another backend, the *control* group: the same ranks on the CPU (MPI
//! processes, or threads that each own a GPU). The control group broadcasts NCCL's unique id,
//! makes subgroups, carries every CPU tensor, and checks every batch's envelopes (op, dtype,
//! shape) before a byte of payload moves, so a mismatch is an error naming both sides with no
//! device round trip. CUDA tensors then go through NCCL as grouped sends and receives of bytes:
//!
//! ```text
//! libtorch's stream:  ... kernels ... [E0] ....................... wait(E1) ... kernels using the data
//! side stream:                          wait(E0) -> NCCL send/recv -> [E1]
//! ```
//!
//! The side stream (non-blocking, so it runs beside libtorch's) waits for the work that
//! produced the inputs (event E0); waiting for a batch makes libtorch's stream wait for its end
//! (event E1) on the device, so the host never blocks and a step does not synchronise the GPU
//! for every collective. With overlap the wait comes later (ring attention's next K/V block
//! travels while the current one computes). One side stream per rank keeps every communicator's
//! operations in the order the ranks issued them. A watchdog thread (`watchdog.rs`) turns a
//! batch that never completes into `Error::Timeout` naming this rank, aborting the
//! communicators; communicators are non-blocking, so no NCCL call blocks the host (`comm.rs`).
//! The GPU is made current before any communicator, stream or event is made.

mod comm;
mod cuda;
mod watchdog;

use std::ffi::c_void;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nccl_sys;
use tch::{Device, Kind, Tensor};

use self::comm::{Comm, Who};
use self::cuda::{Event, Stream};
use self::watchdog::Watchdog;
use super::backend::{batch_lists, check_envelopes, receive_buffer, Backend, Pending};
use super::group::{Group, GroupInfo};
use super::OpKind;
use crate::error::TorchResultExt;
use crate::{Error, Result};

pub use self::cuda::{driver_version, pci_bus_id};

/// Whether the NVIDIA driver and NCCL can be loaded and have every function this backend calls;
/// the error says which is missing and how to provide it.
pub fn nccl_available() -> Result<()> {
    cuda::libraries()
}

/// What every endpoint of one rank shares: its GPU, the side stream, the watchdog.
struct Gpu {
    index: usize,
    side: Stream,
    watchdog: Watchdog,
}

/// One rank's NCCL connection for one group, with the group's control connection.
struct NcclEndpoint {
    control: Arc<dyn Backend>,
    comm: Arc<Comm>,
    /// This rank's index in the group.
    rank: usize,
    gpu: Arc<Gpu>,
    timeout: Duration,
    owner: ThreadId,
}

/// Makes an NCCL communicator for the `control` group's ranks on the current GPU: its rank 0
/// draws the unique id and the control group broadcasts it. Collective over `control`.
fn communicator(
    control: &Arc<dyn Backend>,
    info: &GroupInfo,
    rank: usize,
    gpu: &Gpu,
    timeout: Duration,
) -> Result<Arc<Comm>> {
    let size = info.ranks.len();
    let who = Who { op: "nccl_init", group: info.to_string(), rank: info.ranks[rank] };
    let mut id = Tensor::zeros([128], (Kind::Uint8, Device::Cpu));
    if rank == 0 {
        let unique = cudarc::nccl::result::get_uniqueid()
            .map_err(|e| cuda::failure(format!("ncclGetUniqueId: {}", comm::nccl_message(e.0, None))))?;
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
    crate::device::set_current(Device::Cuda(gpu.index))?;
    let comm = Arc::new(Comm::init(size, unique, rank, timeout, &who)?);
    gpu.watchdog.adopt(&comm);
    Ok(comm)
}

impl NcclEndpoint {
    fn who(&self, op: OpKind, group: &GroupInfo) -> Who {
        Who { op: op.name(), group: group.to_string(), rank: group.ranks[self.rank] }
    }

    fn check(&self, op: OpKind, group: &GroupInfo) -> Result<()> {
        if std::thread::current().id() != self.owner {
            return Err(Error::Backend {
                backend: "nccl",
                msg: format!("{op} on group {group}: use a group from the thread that made it"),
            });
        }
        self.gpu.watchdog.check()
    }

    /// libtorch's current stream on this rank's GPU.
    fn compute_stream(&self) -> Result<cu::CUstream> {
        Ok(crate::device::current_stream(self.gpu.index)? as cu::CUstream)
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
        self.exchange_start(group, op, sends, recvs)?.wait()
    }

    fn exchange_start(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<Box<dyn Pending>> {
        self.check(op, group)?;
        let gpu = Device::Cuda(self.gpu.index);
        let devices: Vec<Device> = sends.iter().chain(&recvs).flatten().map(Tensor::device).collect();
        if devices.iter().all(|&d| d == Device::Cpu) {
            return self.control.exchange_start(group, op, sends, recvs); // CPU tensors: the control group
        }
        if let Some(other) = devices.iter().find(|&&d| d != gpu) {
            return Err(Error::Backend {
                backend: "nccl",
                msg: format!(
                    "{op} on group {group}: a tensor on {other:?} in a batch on this rank's GPU {gpu:?}"
                ),
            });
        }
        let me = group.ranks[self.rank];
        // Contiguous payloads (copies only where strided), made on libtorch's stream.
        let (out, inc) = batch_lists(op, sends, recvs)?;
        check_envelopes(self.control.as_ref(), group, op, &out, &inc, me)?;
        let mut copies = Vec::new();
        let mut bufs = Vec::with_capacity(inc.len());
        for (j, dst) in inc {
            let buf = receive_buffer(op, &dst)?;
            if !dst.is_contiguous() {
                copies.push((dst, buf.shallow_clone()));
            }
            bufs.push((j, buf));
        }
        // The side stream starts after everything queued so far on libtorch's stream.
        let compute = self.compute_stream()?;
        Event::record(compute)?.wait_on(self.gpu.side.raw())?;
        let side = self.gpu.side.raw() as nccl_sys::cudaStream_t;
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let u8 = nccl_sys::ncclDataType_t::ncclUint8;
        let who = self.who(op, group);
        self.comm.grouped(&who, |comm| {
            let ok = |r| {
                if r == nccl_sys::ncclResult_t::ncclSuccess || r == nccl_sys::ncclResult_t::ncclInProgress {
                    Ok(())
                } else {
                    Err(r)
                }
            };
            for (peer, t) in out.iter().filter(|(_, t)| bytes(t) > 0) {
                // SAFETY: `t` is a contiguous CUDA tensor on this GPU that the pending batch keeps
                // alive, unwritten, until libtorch's stream has waited for the batch's end; NCCL
                // reads `bytes(t)` bytes from its data on the side stream.
                ok(unsafe {
                    nccl_sys::ncclSend(t.data_ptr() as *const c_void, bytes(t), u8, *peer as i32, comm, side)
                })?;
            }
            for (peer, t) in bufs.iter().filter(|(_, t)| bytes(t) > 0) {
                // SAFETY: `t` is a contiguous CUDA buffer of `bytes(t)` bytes that only NCCL writes
                // until libtorch's stream has waited for the batch's end (the batch keeps it).
                ok(unsafe { nccl_sys::ncclRecv(t.data_ptr(), bytes(t), u8, *peer as i32, comm, side) })?;
            }
            Ok(())
        })?;
        let done = Arc::new(Event::record(self.gpu.side.raw())?);
        self.gpu.watchdog.watch(Arc::clone(&done), who, self.timeout);
        let mut keep: Vec<Tensor> = out.into_iter().map(|(_, t)| t).collect();
        keep.extend(bufs.into_iter().map(|(_, t)| t));
        Ok(Box::new(NcclPending {
            gpu: Arc::clone(&self.gpu),
            comm: Arc::clone(&self.comm),
            compute,
            done,
            keep,
            copies,
            op,
            waited: false,
        }))
    }

    fn flush(&self, group: &GroupInfo) -> Result<()> {
        self.check(OpKind::Barrier, group)?;
        self.gpu.watchdog.flush()
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
        let comm = communicator(&control, info, rank, &self.gpu, self.timeout)?;
        let e = NcclEndpoint {
            control,
            comm,
            rank,
            gpu: Arc::clone(&self.gpu),
            timeout: self.timeout,
            owner: self.owner,
        };
        Ok(Some(Arc::new(e)))
    }
}

/// A batch on the side stream: the tensors it reads and writes, and its completion event.
struct NcclPending {
    gpu: Arc<Gpu>,
    comm: Arc<Comm>,
    compute: cu::CUstream,
    done: Arc<Event>,
    keep: Vec<Tensor>,
    copies: Vec<(Tensor, Tensor)>,
    op: OpKind,
    waited: bool,
}

impl NcclPending {
    /// libtorch's stream waits for the batch on the device; then the buffers may go (the
    /// caching allocator reuses them in that stream's order, after the transfers).
    fn join(&mut self) -> Result<()> {
        if self.waited {
            return Ok(());
        }
        self.waited = true;
        if self.comm.aborted() {
            return self
                .gpu
                .watchdog
                .check()
                .and(Err(cuda::failure(format!("{}: the NCCL communicator was aborted", self.op))));
        }
        self.done.wait_on(self.compute)?;
        for (mut dst, buf) in std::mem::take(&mut self.copies) {
            dst.f_copy_(&buf).op(self.op.name())?;
        }
        Ok(())
    }
}

impl Pending for NcclPending {
    fn wait(mut self: Box<Self>) -> Result<()> {
        self.gpu.watchdog.check()?;
        self.join()
    }
}

impl Drop for NcclPending {
    fn drop(&mut self) {
        // Not waited for (an error on the way): still order the buffers' release after the
        // transfers, unless the communicator is gone.
        let _ = self.join();
        self.keep.clear();
    }
}

/// The world group on NCCL for CUDA tensors on `device`, with `control` (the same ranks on a
/// CPU backend: MPI processes, or threads that each own a GPU) carrying CPU tensors, the
/// envelope checks and the set-up. Makes `device` this thread's current GPU first. Collective
/// over `control`. A batch that does not complete within `timeout` fails with `Error::Timeout`.
pub fn nccl_group(control: &Group, device: Device, timeout: Duration) -> Result<Group> {
    nccl_available()?;
    let Device::Cuda(index) = device else {
        return Err(Error::Backend {
            backend: "nccl",
            msg: format!("NCCL needs a CUDA device, not {device:?}"),
        });
    };
    crate::device::set_current(device)?;
    let ctx = cuda::current_context()?;
    let gpu = Arc::new(Gpu { index, side: Stream::non_blocking()?, watchdog: Watchdog::start(ctx)? });
    let info = control.info().clone();
    let control_backend = control.backend_handle();
    let comm = communicator(&control_backend, &info, control.rank(), &gpu, timeout)?;
    let owner = std::thread::current().id();
    let endpoint = NcclEndpoint { control: control_backend, comm, rank: control.rank(), gpu, timeout, owner };
    Ok(Group::new(info, control.rank(), Arc::new(endpoint))?.with_overlap(control.overlap()))
}
