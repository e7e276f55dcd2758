//! Gradient reduction outside a trainer: the sums over the sequence-parallel group and the
//! averages over data-parallel replicas that one forward and backward needs, in fixed-size f32
//! buckets ([`Group::all_reduce_buckets`]) so that the reduction never holds more than a few
//! buckets beside the gradients. The trainer (`crate::train`) does the same in one reduction
//! over all SP x DP ranks, with ZeRO.

use tch::Tensor;

use super::layers::{Param, Placement};
use super::Gpt;
use crate::comm::{Group, ReduceOp, DEFAULT_BUCKET_ELEMS};
use crate::{Error, Result};

impl Gpt {
    /// Sums every replicated parameter's gradient over the sequence-parallel group, in f32
    /// buckets (each rank's gradient of a replicated parameter is only its tokens' share).
    /// Sharded parameters already hold their whole gradient (computed on the whole sequence
    /// after the all-gather) and are left alone.
    pub fn sync_gradients(&self) -> Result<()> {
        match self.strategy().group() {
            Some(group) if group.size() > 1 => {
                self.reduce_gradients(group, ReduceOp::Sum, |p| p.placement == Placement::Replicated)
            }
            _ => Ok(()),
        }
    }

    /// Averages every gradient over a data-parallel group (replicas that saw different data),
    /// in f32 buckets.
    pub fn average_gradients(&self, dp: &Group) -> Result<()> {
        if dp.size() == 1 {
            return Ok(());
        }
        self.reduce_gradients(dp, ReduceOp::Avg, |_| true)
    }

    /// All-reduces the gradients of the parameters `which` selects, in place, in buckets.
    fn reduce_gradients(&self, group: &Group, op: ReduceOp, which: impl Fn(&Param) -> bool) -> Result<()> {
        let grads = self.params.all().iter().filter(|p| which(p)).map(|p| {
            let g = p.tensor.grad();
            if g.defined() {
                Ok(g)
            } else {
                Err(Error::Tape {
                    op: "sync_gradients",
                    msg: format!("parameter {} has no gradient", p.name),
                })
            }
        });
        let grads: Vec<Tensor> = grads.collect::<Result<_>>()?;
        group.all_reduce_buckets(&grads, op, DEFAULT_BUCKET_ELEMS)
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&self) {
        for (_, p) in self.params.iter() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
}
