//! The MPI backend's own collectives ([`Backend::runs_natively`](super::Backend::runs_natively)),
//! when the launch asks for them ([`MpiLaunch::native_collectives`](super::MpiLaunch)):
//! `MPI_Iallreduce`, `MPI_Ireduce_scatter_block` and `MPI_Iallgather` on the group's
//! communicator, in place of the transfers the group composes them of.
//!
//! They are off by default on MPI: the group's own reductions sum in rank order, so a CPU run
//! on MPI processes matches the same run on threads bit for bit, which the tests rely on; MPI's
//! algorithms sum in their own order. Turned on, they run the path a GPU run takes through
//! NCCL's collectives (the same dispatch in the group, the same envelope checks, the same byte
//! counts), which is how CI exercises that path without a GPU.
//!
//! Envelopes are checked first, as for the transfers a call stands for (through the blocking
//! exchange: a rank whose call differs is an error on both sides before the collective starts,
//! never a collective with mismatched counts). The call completes before `collective_start`
//! returns, polled against the launch's timeout like every MPI wait (past it: the job aborts).
//! f32, f64, i64 and i32 only (MPI has no bfloat16): other dtypes take the group's transfers.

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::request::scope;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::backend::{check_envelopes, collective_lists, Collective, Done, Pending};
use super::group::GroupInfo;
use super::mpi::MpiEndpoint;
use super::{OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Whether `ep` runs `call` itself: asked for at launch, CPU tensors, contiguous, a dtype MPI
/// has.
pub(super) fn runs_natively(ep: &MpiEndpoint, call: &Collective<'_>) -> bool {
    ep.native
        && call.tensors().iter().all(|t| {
            t.device() == Device::Cpu
                && t.is_contiguous()
                && matches!(t.kind(), Kind::Float | Kind::Double | Kind::Int64 | Kind::Int)
        })
}

/// Runs `call` to completion (see the module doc).
pub(super) fn start(
    ep: &MpiEndpoint,
    group: &GroupInfo,
    op: OpKind,
    call: Collective<'_>,
) -> Result<Box<dyn Pending>> {
    ep.check_thread(op, group)?;
    if !runs_natively(ep, &call) {
        return Err(Error::Backend {
            backend: "mpi",
            msg: format!("{op} on group {group}: not a collective this backend runs itself"),
        });
    }
    let (rank, p) = (ep.comm.rank() as usize, ep.comm.size() as usize);
    let (out, inc) = collective_lists(op, &call, p, rank)?;
    check_envelopes(ep, group, op, &out, &inc, group.ranks[rank])?;
    match call.tensors()[0].kind() {
        Kind::Float => run::<f32>(ep, group, op, &call),
        Kind::Double => run::<f64>(ep, group, op, &call),
        Kind::Int64 => run::<i64>(ep, group, op, &call),
        _ => run::<i32>(ep, group, op, &call),
    }?;
    if call.reduce() == Some(ReduceOp::Avg) {
        // Summed above: divided by the group size, as the group's own Avg.
        let result = match &call {
            Collective::AllReduce { buf, .. } => buf,
            Collective::ReduceScatter { output, .. } | Collective::AllGather { output, .. } => output,
        };
        let _ = result.shallow_clone().f_div_scalar_(p as f64).op(op.name())?;
    }
    Ok(Box::new(Done))
}

/// A contiguous CPU tensor of dtype `T` as a slice.
///
/// # Safety
/// `t` must be contiguous, on the CPU, of dtype `T`, and outlive the slice unwritten.
unsafe fn elements<T>(t: &Tensor) -> &[T] {
    if t.numel() == 0 {
        return &[];
    }
    // SAFETY: per the contract, numel elements of T start at data_ptr.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// The same, writable.
///
/// # Safety
/// As [`elements`], and nothing else reads or writes `t` while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn elements_mut<T>(t: &Tensor) -> &mut [T] {
    if t.numel() == 0 {
        return &mut [];
    }
    // SAFETY: per the contract, the only reference to these numel elements of T.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

/// The MPI operation of a reduction (Avg: a sum, divided afterwards).
fn operation(reduce: ReduceOp) -> SystemOperation {
    match reduce {
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
    }
}

/// Posts the collective on `T` elements and waits for it against the timeout. The send side
/// is a copy where the result overwrites it (an all-reduce in place, an all-gather from a view
/// of its own output): MPI forbids aliased buffers.
fn run<T: Equivalence>(ep: &MpiEndpoint, group: &GroupInfo, op: OpKind, call: &Collective<'_>) -> Result<()> {
    let copy = |t: &Tensor| -> Result<Tensor> {
        let c = Tensor::f_empty(t.size(), (t.kind(), Device::Cpu)).op(op.name())?;
        c.shallow_clone().f_copy_(t).op(op.name())?;
        Ok(c)
    };
    let deadline = std::time::Instant::now() + ep.timeout;
    let timeout = |_: &[usize]| Error::Timeout {
        op: op.name(),
        group: group.to_string(),
        rank: group.ranks[ep.comm.rank() as usize],
        waited: ep.timeout,
        timeout: ep.timeout,
        what: "waiting for the other ranks in an MPI collective".into(),
    };
    match call {
        Collective::AllReduce { buf, reduce } => {
            let send = copy(buf)?;
            // SAFETY: `send` (a fresh copy) and `buf` are contiguous CPU tensors of dtype T (checked
            // by runs_natively and the dispatch on the dtype), alive until the request completes
            // inside this scope; only MPI writes `buf` meanwhile.
            let (s, r) = unsafe { (elements::<T>(&send), elements_mut::<T>(buf)) };
            scope(|sc| {
                let req = ep.comm.immediate_all_reduce_into(sc, s, r, operation(*reduce));
                ep.wait_all(vec![(0, req)], deadline, &timeout);
            });
        }
        Collective::ReduceScatter { input, output, reduce } => {
            // SAFETY: as above; `input` and `output` are distinct tensors (a fresh output).
            let (s, r) = unsafe { (elements::<T>(input), elements_mut::<T>(output)) };
            scope(|sc| {
                let req = ep.comm.immediate_reduce_scatter_block_into(sc, s, r, operation(*reduce));
                ep.wait_all(vec![(0, req)], deadline, &timeout);
            });
        }
        Collective::AllGather { input, output } => {
            let send = copy(input)?;
            // SAFETY: as above; `send` is a copy, so the output may hold the input's view.
            let (s, r) = unsafe { (elements::<T>(&send), elements_mut::<T>(output)) };
            scope(|sc| {
                let req = ep.comm.immediate_all_gather_into(sc, s, r);
                ep.wait_all(vec![(0, req)], deadline, &timeout);
            });
        }
    }
    Ok(())
}
