//! The NCCL backend (cargo feature `nccl`): collectives on CUDA tensors through NCCL loaded at
//! run time, so the crate builds on machines without CUDA and fails at run time with a clear
//! error when the driver or NCCL is missing or too old. NCCL is found by our own loader
//! (`crate::device::nccl_library`: torch's own `libnccl.so.2` first) and called through its
//! function table; the driver through cudarc.
//!
//! NCCL sits on top of another backend, the *control* group: the same ranks on the CPU (MPI
//! processes, or threads that each own a GPU). The control group broadcasts NCCL's unique id
//! for the world, carries every CPU tensor, and checks every batch's envelopes (op, dtype,
//! shape) before a byte of payload moves, so a mismatch is an error naming both sides with no
//! device round trip. Subgroups are `ncclCommSplit`s of their parent's communicator (the
//! control group splits alongside). CUDA tensors go through NCCL as grouped sends and receives
//! of bytes, and whole all-reduces, reduce-scatters and all-gathers over equal parts as NCCL's
//! own collectives (`Backend::runs_natively`: any dtype NCCL has, bfloat16 included, reduced in
//! that dtype in NCCL's order), on the same stream:
//!
//! ```text
//! libtorch's stream:  ... kernels ... [E0] ....................... wait(E1) ... kernels using the data
//! side stream:                          wait(E0) -> NCCL send/recv -> [E1]
//! ```
//!
//! Each communicator has its own side stream (non-blocking, so it runs beside libtorch's),
//! which waits for the work that produced the inputs (event E0); waiting for a batch makes
//! libtorch's stream wait for its end (event E1) on the device, so the host never blocks and a
//! step does not synchronise the GPU for every collective. With overlap the wait comes later
//! (ring attention's next K/V block travels while the current one computes). A stream per
//! communicator keeps each communicator's operations in the order the rank issued them, and
//! lets independent groups (sequence parallel and data parallel) run beside each other, as
//! PyTorch's NCCL process groups do; every rank issues the same groups' operations in the same
//! program order, so no cross-communicator order is needed. A watchdog thread (`watchdog.rs`)
//! turns a batch that never completes into `Error::Timeout` naming this rank, aborting the
//! communicators; communicators are non-blocking, so no NCCL call blocks the host (`comm.rs`).
//! The GPU's primary context is made current (`cuda::bind_primary_context`) before any
//! communicator, stream or event is made, on the rank's thread and on the watchdog's.

mod comm;
mod cuda;
mod watchdog;

use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nccl_sys;
use tch::{Device, Kind, Tensor};

use self::comm::{ok_or_pending, Comm, Who};
use self::cuda::{Event, Stream};
use self::watchdog::Watchdog;
use super::backend::{
    batch_lists, check_envelopes, collective_lists, receive_buffer, Backend, Collective, Pending,
};
use super::group::{Group, GroupInfo};
use super::{OpKind, ReduceOp};
use crate::device::{NcclApi, NcclCode};
use crate::error::TorchResultExt;
use crate::{Error, Result};

pub use self::cuda::{driver_version, pci_bus_id};

/// NCCL's color for a rank that takes no part in a split (`NCCL_SPLIT_NOCOLOR`).
const NCCL_SPLIT_NOCOLOR: i32 = -1;

/// Whether the NVIDIA driver and NCCL can be loaded and have every function this backend calls,
/// and NCCL is at least `crate::device::NCCL_FLOOR`; the error says which is missing and how to
/// provide it (for NCCL: every place tried). `crate::device::nccl_library` says where NCCL was
/// found and its version.
pub fn nccl_available() -> Result<()> {
    cuda::libraries().map(|_| ())
}

/// What every endpoint of one rank shares: its GPU and the watchdog.
struct Gpu {
    index: usize,
    watchdog: Watchdog,
}

/// One rank's NCCL connection for one group, with the group's control connection and the
/// communicator's own side stream.
struct NcclEndpoint {
    control: Arc<dyn Backend>,
    comm: Arc<Comm>,
    /// This communicator's side stream (dropped after the communicator: declared after it).
    side: Stream,
    /// This rank's index in the group.
    rank: usize,
    gpu: Arc<Gpu>,
    timeout: Duration,
    owner: ThreadId,
}

/// NCCL's arguments for one rank's part of a split of a group: `color` and `key` for
/// `ncclCommSplit`, and the size the new communicator must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SplitPlan {
    color: i32,
    key: i32,
    size: usize,
}

/// The [`SplitPlan`] of the rank with global rank `me`, given its color (`None`: no part) and
/// its subgroup as the control group computed it (`sub.ranks` in the subgroup's rank order, the
/// same list on every member). The color is the subgroup's lowest global rank: the same on
/// every member, different between subgroups (they are disjoint), and a small non-negative
/// int whatever the caller's colors were. The key is this rank's index in `sub.ranks`, so
/// NCCL, which orders a color's ranks by key, gives every rank the index the group gave it.
fn split_plan(me: usize, color: Option<usize>, sub: Option<&GroupInfo>) -> Result<SplitPlan> {
    let bad = |msg: String| Error::Backend { backend: "nccl", msg };
    match (color, sub) {
        (None, None) => Ok(SplitPlan { color: NCCL_SPLIT_NOCOLOR, key: 0, size: 0 }),
        (Some(_), Some(info)) => {
            let key = info
                .ranks
                .iter()
                .position(|&r| r == me)
                .ok_or_else(|| bad(format!("rank {me} is not in its own subgroup {info}")))?;
            let lowest = info.ranks.iter().copied().min().unwrap_or(me);
            let color = i32::try_from(lowest).map_err(|_| {
                bad(format!("subgroup {info}: global rank {lowest} does not fit NCCL's int color"))
            })?;
            let key = i32::try_from(key)
                .map_err(|_| bad(format!("subgroup {info}: rank index {key} does not fit NCCL's int key")))?;
            Ok(SplitPlan { color, key, size: info.ranks.len() })
        }
        (Some(c), None) => Err(bad(format!("rank {me} has color {c} but no subgroup"))),
        (None, Some(info)) => Err(bad(format!("rank {me} has no color but a subgroup {info}"))),
    }
}

/// Makes the world's NCCL communicator for the `control` group's ranks on the current GPU: its
/// rank 0 draws the unique id and the control group broadcasts it. Collective over `control`.
fn world_communicator(
    api: &'static NcclApi,
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
        let mut unique = nccl_sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: `unique` is a valid place for the id NCCL writes.
        let r = unsafe { (api.get_unique_id)(&mut unique) };
        if r != crate::device::NCCL_SUCCESS {
            return Err(cuda::failure(format!("ncclGetUniqueId: {}", comm::nccl_message(api, r, None))));
        }
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
    cuda::bind_primary_context(gpu.index)?;
    let comm = Arc::new(Comm::init(api, size, unique, rank, timeout, &who)?);
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

    /// Queues `body` (NCCL calls on the raw communicator and the side stream) after everything
    /// queued so far on libtorch's stream, and returns the handle that makes libtorch's stream
    /// wait for its end; the watchdog times it. `keep`: the tensors NCCL reads and writes,
    /// alive until then; `copies`: (destination, buffer) pairs copied when it is waited for.
    fn launch(
        &self,
        group: &GroupInfo,
        op: OpKind,
        keep: Vec<Tensor>,
        copies: Vec<(Tensor, Tensor)>,
        body: impl FnOnce(
            &NcclApi,
            nccl_sys::ncclComm_t,
            nccl_sys::cudaStream_t,
        ) -> std::result::Result<(), NcclCode>,
    ) -> Result<Box<dyn Pending>> {
        // The side stream starts after everything queued so far on libtorch's stream.
        let compute = self.compute_stream()?;
        Event::record(compute)?.wait_on(self.side.raw())?;
        let side = self.side.raw() as nccl_sys::cudaStream_t;
        let who = self.who(op, group);
        self.comm.grouped(&who, |api, comm| body(api, comm, side))?;
        // Recorded after the enqueue settled (Comm::grouped), so it follows NCCL's kernels.
        let done = Arc::new(Event::record(self.side.raw())?);
        self.gpu.watchdog.watch(Arc::clone(&done), who, self.timeout);
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
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let u8 = nccl_sys::ncclDataType_t::ncclUint8;
        let mut keep: Vec<Tensor> = out.iter().map(|(_, t)| t.shallow_clone()).collect();
        keep.extend(bufs.iter().map(|(_, t)| t.shallow_clone()));
        self.launch(group, op, keep, copies, |api, comm, side| {
            let ok = |r: NcclCode| if ok_or_pending(r) { Ok(()) } else { Err(r) };
            for (peer, t) in out.iter().filter(|(_, t)| bytes(t) > 0) {
                // SAFETY: `t` is a contiguous CUDA tensor on this GPU that the pending batch keeps
                // alive, unwritten, until libtorch's stream has waited for the batch's end; NCCL
                // reads `bytes(t)` bytes from its data on the side stream.
                ok(unsafe {
                    (api.send)(t.data_ptr() as *const c_void, bytes(t), u8, *peer as c_int, comm, side)
                })?;
            }
            for (peer, t) in bufs.iter().filter(|(_, t)| bytes(t) > 0) {
                // SAFETY: `t` is a contiguous CUDA buffer of `bytes(t)` bytes that only NCCL writes
                // until libtorch's stream has waited for the batch's end (the batch keeps it).
                ok(unsafe { (api.recv)(t.data_ptr(), bytes(t), u8, *peer as c_int, comm, side) })?;
            }
            Ok(())
        })
    }

    /// Whether NCCL runs `call` itself: every tensor contiguous, on this rank's GPU, of a
    /// dtype NCCL reduces (all of them, bfloat16 included).
    fn runs_natively(&self, call: &Collective<'_>) -> bool {
        call.tensors().iter().all(|t| {
            t.device() == Device::Cuda(self.gpu.index) && t.is_contiguous() && nccl_type(t.kind()).is_some()
        })
    }

    /// `ncclAllReduce`, `ncclReduceScatter` or `ncclAllGather` on the side stream, after the
    /// envelopes of the transfers it stands for are checked through the control group.
    fn collective_start(
        &self,
        group: &GroupInfo,
        op: OpKind,
        call: Collective<'_>,
    ) -> Result<Box<dyn Pending>> {
        self.check(op, group)?;
        let kind = call.tensors()[0].kind();
        let (Some(dtype), true) = (nccl_type(kind), self.runs_natively(&call)) else {
            return Err(Error::Backend {
                backend: "nccl",
                msg: format!(
                    "{op} on group {group}: not a collective NCCL runs here ({kind:?}, or not on GPU {})",
                    self.gpu.index
                ),
            });
        };
        let (out, inc) = collective_lists(op, &call, group.ranks.len(), self.rank)?;
        check_envelopes(self.control.as_ref(), group, op, &out, &inc, group.ranks[self.rank])?;
        let red = |r: ReduceOp| match r {
            ReduceOp::Sum => nccl_sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => nccl_sys::ncclRedOp_t::ncclAvg,
            ReduceOp::Max => nccl_sys::ncclRedOp_t::ncclMax,
        };
        let keep: Vec<Tensor> = call.tensors().into_iter().map(Tensor::shallow_clone).collect();
        self.launch(group, op, keep, Vec::new(), |api, comm, side| {
            // SAFETY (all three): contiguous CUDA tensors on this GPU of `dtype` (runs_natively),
            // kept alive by the pending call until libtorch's stream has waited for its end, and
            // neither read nor written by anyone else meanwhile; the counts are their element
            // counts (NCCL's reduce-scatter takes the output's, its all-gather the input's), and
            // an all-gather's input may be the view of its output at this rank's place, which
            // NCCL allows (in place).
            let r = match &call {
                Collective::AllReduce { buf, reduce } => unsafe {
                    (api.all_reduce)(
                        buf.data_ptr(),
                        buf.data_ptr(),
                        buf.numel(),
                        dtype,
                        red(*reduce),
                        comm,
                        side,
                    )
                },
                Collective::ReduceScatter { input, output, reduce } => unsafe {
                    (api.reduce_scatter)(
                        input.data_ptr(),
                        output.data_ptr(),
                        output.numel(),
                        dtype,
                        red(*reduce),
                        comm,
                        side,
                    )
                },
                Collective::AllGather { input, output } => unsafe {
                    (api.all_gather)(input.data_ptr(), output.data_ptr(), input.numel(), dtype, comm, side)
                },
            };
            if ok_or_pending(r) {
                Ok(())
            } else {
                Err(r)
            }
        })
    }

    fn flush(&self, group: &GroupInfo) -> Result<()> {
        self.check(OpKind::Barrier, group)?;
        self.gpu.watchdog.flush()
    }

    /// `ncclCommSplit` of this endpoint's communicator: every rank of `parent` takes part,
    /// those without a color with `NCCL_SPLIT_NOCOLOR` ([`split_plan`]); the control group
    /// splits first, alongside. The subgroup's endpoint gets its own side stream.
    fn split(
        &self,
        parent: &GroupInfo,
        color: Option<usize>,
        key: usize,
        sub: Option<&GroupInfo>,
    ) -> Result<Option<Arc<dyn Backend>>> {
        self.check(OpKind::Split, parent)?;
        let me = parent.ranks[self.rank];
        let plan = split_plan(me, color, sub)?;
        let control = self.control.split(parent, color, key, sub)?;
        cuda::bind_primary_context(self.gpu.index)?;
        let who = Who { op: "nccl_split", group: parent.to_string(), rank: me };
        let child = self.comm.split(plan.color, plan.key, plan.size, &who)?;
        match (control, sub, child) {
            (None, None, None) => Ok(None),
            (Some(control), Some(info), Some(comm)) => {
                let comm = Arc::new(comm);
                self.gpu.watchdog.adopt(&comm);
                let e = NcclEndpoint {
                    control,
                    comm,
                    side: Stream::non_blocking()?,
                    rank: plan.key as usize,
                    gpu: Arc::clone(&self.gpu),
                    timeout: self.timeout,
                    owner: self.owner,
                };
                debug_assert_eq!(info.ranks[e.rank], me);
                Ok(Some(Arc::new(e)))
            }
            (control, _, child) => Err(Error::Backend {
                backend: "nccl",
                msg: format!(
                    "split of group {parent} on rank {me}: the control group {} a subgroup but NCCL {} one",
                    if control.is_some() { "gave" } else { "gave no" },
                    if child.is_some() { "gave" } else { "gave no" }
                ),
            }),
        }
    }
}

/// NCCL's dtype for a libtorch dtype, where it has one.
fn nccl_type(kind: Kind) -> Option<nccl_sys::ncclDataType_t> {
    use nccl_sys::ncclDataType_t as T;
    Some(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::Half => T::ncclFloat16,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Int64 => T::ncclInt64,
        Kind::Int => T::ncclInt32,
        Kind::Int8 => T::ncclInt8,
        Kind::Uint8 => T::ncclUint8,
        _ => return None,
    })
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
/// envelope checks and the set-up. Makes `device` this thread's current GPU first, for libtorch
/// and, through the driver, its primary context for NCCL, streams and events (libtorch's
/// `set_current` alone may leave no context current). Collective over `control`. A batch that
/// does not complete within `timeout` fails with `Error::Timeout`.
pub fn nccl_group(control: &Group, device: Device, timeout: Duration) -> Result<Group> {
    let lib = cuda::libraries()?;
    let Device::Cuda(index) = device else {
        return Err(Error::Backend {
            backend: "nccl",
            msg: format!("NCCL needs a CUDA device, not {device:?}"),
        });
    };
    crate::device::set_current(device)?;
    let ctx = cuda::bind_primary_context(index)?;
    let gpu = Arc::new(Gpu { index, watchdog: Watchdog::start(ctx)? });
    let info = control.info().clone();
    let control_backend = control.backend_handle();
    let api = lib.api();
    let comm = world_communicator(api, &control_backend, &info, control.rank(), &gpu, timeout)?;
    let owner = std::thread::current().id();
    let endpoint = NcclEndpoint {
        control: control_backend,
        comm,
        side: Stream::non_blocking()?,
        rank: control.rank(),
        gpu,
        timeout,
        owner,
    };
    Ok(Group::new(info, control.rank(), Arc::new(endpoint))?.with_overlap(control.overlap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ranks: &[usize]) -> GroupInfo {
        GroupInfo { id: "world/0.0".into(), name: "sub".into(), ranks: ranks.to_vec() }
    }

    /// A 2 x 4 mesh of 8 ranks split into its rows (SP) and its columns (DP): every member of a
    /// subgroup gets the same color, the subgroups different ones, and each rank the key that
    /// is its index in the subgroup as the control group ordered it.
    #[test]
    fn split_plans_follow_the_group_layout() {
        let rows = [info(&[0, 1, 2, 3]), info(&[4, 5, 6, 7])];
        let cols = [info(&[0, 4]), info(&[1, 5]), info(&[2, 6]), info(&[3, 7])];
        for groups in [&rows[..], &cols[..]] {
            let mut colors = Vec::new();
            for g in groups {
                let plans: Vec<SplitPlan> =
                    g.ranks.iter().map(|&r| split_plan(r, Some(9), Some(g)).unwrap()).collect();
                assert!(plans.iter().all(|p| p.color == plans[0].color && p.size == g.ranks.len()));
                assert_eq!(
                    plans.iter().map(|p| p.key).collect::<Vec<_>>(),
                    (0..g.ranks.len() as i32).collect::<Vec<_>>()
                );
                colors.push(plans[0].color);
            }
            colors.dedup();
            assert_eq!(colors.len(), groups.len(), "subgroups share a color: {colors:?}");
        }
    }

    /// The subgroup's order is the group's (by the caller's keys), not the global ranks' order:
    /// the key follows it.
    #[test]
    fn split_keys_follow_the_subgroup_order() {
        let g = info(&[6, 2, 4]);
        let keys: Vec<i32> =
            [6, 2, 4].iter().map(|&r| split_plan(r, Some(1), Some(&g)).unwrap().key).collect();
        assert_eq!(keys, [0, 1, 2]);
        assert_eq!(split_plan(4, Some(1), Some(&g)).unwrap().color, 2);
    }

    /// Ranks without a color take part as NCCL_SPLIT_NOCOLOR; inconsistent input is an error
    /// naming the rank.
    #[test]
    fn split_plan_without_color_and_errors() {
        assert_eq!(
            split_plan(3, None, None).unwrap(),
            SplitPlan { color: NCCL_SPLIT_NOCOLOR, key: 0, size: 0 }
        );
        let g = info(&[0, 1]);
        let e = split_plan(5, Some(0), Some(&g)).unwrap_err().to_string();
        assert!(e.contains("rank 5 is not in its own subgroup sub[0, 1]"), "{e}");
        let e = split_plan(1, Some(0), None).unwrap_err().to_string();
        assert!(e.contains("rank 1 has color 0 but no subgroup"), "{e}");
        let e = split_plan(1, None, Some(&g)).unwrap_err().to_string();
        assert!(e.contains("rank 1 has no color but a subgroup"), "{e}");
        let huge = info(&[1 << 40]);
        let e = split_plan(1 << 40, Some(0), Some(&huge)).unwrap_err().to_string();
        assert!(e.contains("does not fit NCCL's int color"), "{e}");
    }
}
