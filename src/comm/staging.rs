//! Contiguous buffers a process backend packs strided chunks into before they travel, and
//! receives strided destinations' payloads into, kept from one exchange to the next.
//!
//! An all-to-all's chunks are strided on one side at least (Ulysses scatters the heads of
//! `[b, s/P, H, d]`: each peer's chunk is `H/P` heads of every token). MPI sends and receives
//! contiguous bytes, so each such chunk is copied. A fresh tensor per copy costs more than the
//! copy: glibc hands a freed buffer of this size back to the kernel (an `munmap`, or a trim of
//! the heap's top) and the next call faults every page in again, and OpenMPI's single-copy
//! transfer (CMA) then reads pages just faulted in. Measured with `ulysses bench-a2a --layout`
//! on 2 MPI processes (2-core AMD EPYC VM): with a fresh buffer per call the Ulysses layout took
//! 2.0-4.0x the time of contiguous rows of the same bytes; with glibc told to keep its memory
//! (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`) 1.1-1.7x. Keeping one buffer per peer
//! and direction here does the same for these copies only.
//!
//! A buffer grows to the largest chunk its slot has carried and is reused as a view of the
//! shape and dtype asked for. Blocking exchanges only: a slot's view is dead once the exchange
//! that asked for it has returned (the next exchange overwrites it).

use std::collections::HashMap;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::envelopes::Direction;
use crate::error::TorchResultExt;
use crate::Result;

/// One endpoint's staging buffers, by (direction, peer).
#[derive(Default)]
pub(crate) struct Staging {
    slots: Mutex<HashMap<(Direction, usize), Tensor>>,
}

impl Staging {
    /// A contiguous tensor of `like`'s shape and dtype on the CPU, backed by the buffer of
    /// (`dir`, `peer`), grown first if `like` is larger than anything that slot carried.
    /// Its contents are whatever the slot held last.
    ///
    /// # Shapes
    /// `like`: any shape (any strides) -> a contiguous tensor of the same shape.
    pub fn buffer(&self, op: &'static str, dir: Direction, peer: usize, like: &Tensor) -> Result<Tensor> {
        let (kind, shape) = (like.kind(), like.size());
        let bytes = (like.numel() * kind.elt_size_in_bytes()) as i64;
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = match slots.get(&(dir, peer)) {
            Some(t) if t.numel() as i64 >= bytes => t.shallow_clone(),
            _ => {
                let t = Tensor::f_empty([bytes.max(1)], (Kind::Uint8, Device::Cpu)).op(op)?;
                slots.insert((dir, peer), t.shallow_clone());
                t
            }
        };
        // [capacity] u8 -> [bytes] u8 -> [bytes / size] kind -> shape
        slot.f_narrow(0, 0, bytes)
            .and_then(|b| b.f_view_dtype(kind))
            .and_then(|b| b.f_view(shape.as_slice()))
            .op(op)
    }

    /// Bytes the buffers hold in all.
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.values().map(Tensor::numel).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_reused_grows_and_keeps_shape_and_dtype() {
        let s = Staging::default();
        let x = Tensor::arange(2 * 6 * 4 * 3, (Kind::Float, Device::Cpu)).view([2, 6, 4, 3]);
        // Heads 0-1 of every token: strided, as Ulysses' chunk for peer 0.
        let chunk = x.narrow(2, 0, 2);
        assert!(!chunk.is_contiguous());
        let a = s.buffer("test", Direction::Out, 1, &chunk).unwrap();
        assert!(a.is_contiguous());
        assert_eq!((a.size(), a.kind()), (chunk.size(), Kind::Float));
        let mut a2 = a.shallow_clone();
        a2.copy_(&chunk);
        assert!(a.equal(&chunk));
        let ptr = a.data_ptr();
        drop(a);
        // The same slot again, smaller and of another dtype: the same memory.
        let small = Tensor::zeros([5], (Kind::Int64, Device::Cpu));
        let b = s.buffer("test", Direction::Out, 1, &small).unwrap();
        assert_eq!((b.data_ptr(), b.size(), b.kind()), (ptr, vec![5], Kind::Int64));
        assert_eq!(s.held_bytes(), 2 * 6 * 2 * 3 * 4);
        // Another peer or direction: another buffer.
        let c = s.buffer("test", Direction::In, 1, &chunk).unwrap();
        assert_ne!(c.data_ptr(), ptr);
        // Larger than the slot: it grows.
        let big = Tensor::zeros([1000], (Kind::Float, Device::Cpu));
        let d = s.buffer("test", Direction::Out, 1, &big).unwrap();
        assert_eq!(d.size(), vec![1000]);
        assert_eq!(s.held_bytes(), 4000 + 2 * 6 * 2 * 3 * 4);
        // An empty chunk is an empty view.
        let e =
            s.buffer("test", Direction::Out, 2, &Tensor::zeros([0, 3], (Kind::Float, Device::Cpu))).unwrap();
        assert_eq!(e.size(), vec![0, 3]);
    }
}
