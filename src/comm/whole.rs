//! The collectives on whole tensors, each a batch of transfers plus local tensor work, as in
//! `collectives.rs`: broadcast from a root, reduce to a root, send and receive between two ranks,
//! the ring shift, and the barrier.

use tch::{Kind, Tensor};

use super::collectives::{none, reduce_stack};
use super::group::Group;
use super::{OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::Result;

impl Group {
    /// Broadcast: every rank gets the root's `x`. On the other ranks `x` only gives the shape
    /// and dtype to receive (as in `torch.distributed.broadcast`). On the root the result shares
    /// storage with `x`. Adjoint: [`reduce`](Group::reduce) to the root.
    pub fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let op = OpKind::Broadcast;
        self.check_rank(op, "root", root)?;
        let p = self.size();
        let (sends, recvs, out) = if self.rank() == root {
            let sends = (0..p).map(|j| (j != root).then(|| x.shallow_clone())).collect();
            (sends, none(p), x.shallow_clone())
        } else {
            let out = x.f_empty_like().op(op.name())?;
            let recvs = (0..p).map(|j| (j == root).then(|| out.shallow_clone())).collect();
            (none(p), recvs, out)
        };
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(out)
    }

    /// Reduce to a root: the root gets the reduction of every rank's `x` (`Some`), the others
    /// `None`. Half precision is reduced in f32. Adjoint of the sum: broadcast from the root.
    pub fn reduce(&self, x: &Tensor, root: usize, reduce: ReduceOp) -> Result<Option<Tensor>> {
        let op = OpKind::Reduce;
        self.check_rank(op, "root", root)?;
        self.check_reduce(op, x.kind(), reduce)?;
        let p = self.size();
        let out = if self.rank() == root {
            // [P, ..]: one slot per rank, reduced over dim 0.
            let mut shape = vec![p as i64];
            shape.extend(x.size());
            let stack = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
            let recvs = (0..p).map(|j| Some(stack.select(0, j as i64))).collect();
            let mut sends = none(p);
            sends[root] = Some(x.shallow_clone());
            self.transfer(op, sends, recvs)?;
            Some(reduce_stack(&stack, reduce, p).op(op.name())?)
        } else {
            let sends = (0..p).map(|j| (j == root).then(|| x.shallow_clone())).collect();
            self.transfer(op, sends, none(p))?;
            None
        };
        self.count_call(op);
        Ok(out)
    }

    /// Sends `x` to rank `dst`; returns once `dst` has received it. Pairs with [`Group::recv`].
    pub fn send(&self, x: &Tensor, dst: usize) -> Result<()> {
        let op = OpKind::Send;
        self.check_peer(op, "dst", dst)?;
        let mut sends = none(self.size());
        sends[dst] = Some(x.shallow_clone());
        self.transfer(op, sends, none(self.size()))?;
        self.count_call(op);
        Ok(())
    }

    /// Receives from rank `src` a tensor of the shape and dtype of `like`, on `like`'s device.
    pub fn recv(&self, like: &Tensor, src: usize) -> Result<Tensor> {
        let op = OpKind::Recv;
        self.check_peer(op, "src", src)?;
        let out = like.f_empty_like().op(op.name())?;
        let mut recvs = none(self.size());
        recvs[src] = Some(out.shallow_clone());
        self.transfer(op, none(self.size()), recvs)?;
        self.count_call(op);
        Ok(out)
    }

    /// Ring shift: sends `x` to rank `(r + offset) mod P` and returns what rank
    /// `(r - offset) mod P` sent. Every rank passes the same shape. Adjoint: shift by `-offset`.
    pub fn shift(&self, x: &Tensor, offset: i64) -> Result<Tensor> {
        let op = OpKind::Shift;
        let p = self.size() as i64;
        let me = self.rank() as i64;
        let dst = (me + offset).rem_euclid(p) as usize;
        let src = (me - offset).rem_euclid(p) as usize;
        let out = x.f_empty_like().op(op.name())?;
        let mut sends = none(self.size());
        let mut recvs = none(self.size());
        sends[dst] = Some(x.shallow_clone());
        recvs[src] = Some(out.shallow_clone());
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(out)
    }

    /// Returns once every rank of the group has entered it.
    pub fn barrier(&self) -> Result<()> {
        let op = OpKind::Barrier;
        let token = || Tensor::empty([0], (Kind::Uint8, tch::Device::Cpu));
        let others = |me: usize| (0..self.size()).map(move |j| j != me);
        let sends = others(self.rank()).map(|o| o.then(token)).collect();
        let recvs = others(self.rank()).map(|o| o.then(token)).collect();
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(())
    }
}
