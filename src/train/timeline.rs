//! A memory timeline of training steps: the host allocator's live bytes sampled over time, each
//! sample labelled with the phase the model was in when it was taken (the forward or backward of
//! a unit: a block, or the outer unit of embedding, head and loss; the gradient reduction and
//! update after the backward), as PyTorch's memory timeline labels a GPU's. A peak alone says how
//! high; the timeline says where in the step, which is what a memory model has to place.
//!
//! Attach it with [`Trainer::observe`](super::Trainer::observe); it sees the unit boundaries
//! through the model's [`BlockHooks`], after any hooks of ZeRO's.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::{BlockHooks, Unit};
use crate::Result;

/// Samples kept at most: when full, neighbouring pairs merge (their later time, the larger live
/// bytes: no peak is lost) and the interval doubles, so a long run stays in bounded memory that
/// is allocated once, before the first sample.
const CAPACITY: usize = 1 << 16;

/// One sample: milliseconds since the timeline started, live bytes, the phase's index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t_ms: f64,
    pub live_bytes: f64,
    pub phase: u32,
}

/// The phases a step goes through, by index; 0 is "before the first step".
#[derive(Debug, Default)]
struct Phases {
    names: Vec<String>,
}

impl Phases {
    fn index(&mut self, name: String) -> u32 {
        match self.names.iter().position(|n| *n == name) {
            Some(i) => i as u32,
            None => {
                self.names.push(name);
                (self.names.len() - 1) as u32
            }
        }
    }
}

/// The sampled live bytes of this process and the phase of the observed rank, from
/// [`MemoryTimeline::start`] until it is dropped or [`finish`](MemoryTimeline::finish)ed.
pub struct MemoryTimeline {
    phase: Arc<AtomicU32>,
    phases: Arc<Mutex<Phases>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

/// What a finished timeline holds.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub samples: Vec<Sample>,
    /// Phase names, by [`Sample::phase`].
    pub phases: Vec<String>,
}

impl MemoryTimeline {
    /// Starts sampling [`crate::cost::calibrate::live_bytes`] every `interval` on a thread of
    /// its own (glibc's counters cover every thread's arena: with ranks as threads, all ranks).
    pub fn start(interval: Duration) -> MemoryTimeline {
        let phases = Arc::new(Mutex::new(Phases { names: vec!["before the first step".into()] }));
        let phase = Arc::new(AtomicU32::new(0));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(CAPACITY)));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (phase, samples, stop) = (Arc::clone(&phase), Arc::clone(&samples), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (started, mut every) = (Instant::now(), interval);
                while !stop.load(Ordering::Relaxed) {
                    let s = Sample {
                        t_ms: started.elapsed().as_secs_f64() * 1e3,
                        live_bytes: crate::cost::calibrate::live_bytes(),
                        phase: phase.load(Ordering::Relaxed),
                    };
                    if let Ok(mut v) = samples.lock() {
                        if v.len() == CAPACITY {
                            merge_pairs(&mut v);
                            every *= 2;
                        }
                        v.push(s);
                    }
                    std::thread::sleep(every);
                }
            })
        };
        MemoryTimeline { phase, phases, samples, stop, sampler: Some(sampler) }
    }

    /// The hooks that label the samples with the phase of the rank that calls them (attach to
    /// one rank: ranks as threads share the counters, and their phases interleave).
    pub fn marker(&self) -> PhaseMarker {
        PhaseMarker { phase: Arc::clone(&self.phase), phases: Arc::clone(&self.phases) }
    }

    /// Stops sampling and returns the samples.
    pub fn finish(mut self) -> Timeline {
        self.stop_sampler();
        let samples = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        let phases = self.phases.lock().map(|p| p.names.clone()).unwrap_or_default();
        Timeline { samples, phases }
    }

    fn stop_sampler(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MemoryTimeline {
    fn drop(&mut self) {
        self.stop_sampler();
    }
}

/// Halves a full buffer in place: each neighbouring pair becomes one sample with the pair's
/// later time and larger live bytes (and that sample's phase).
fn merge_pairs(v: &mut Vec<Sample>) {
    let n = v.len() / 2;
    for i in 0..n {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        v[i] = if a.live_bytes > b.live_bytes { Sample { t_ms: b.t_ms, ..a } } else { b };
    }
    if v.len() % 2 == 1 {
        v[n] = v[v.len() - 1];
        v.truncate(n + 1);
    } else {
        v.truncate(n);
    }
}

impl Timeline {
    /// The sample with the most live bytes, and its phase's name.
    pub fn peak(&self) -> Option<(Sample, &str)> {
        let s = self.samples.iter().copied().max_by(|a, b| a.live_bytes.total_cmp(&b.live_bytes))?;
        Some((s, self.phases.get(s.phase as usize).map_or("?", String::as_str)))
    }

    /// Per phase: its name, the most live bytes sampled in it, and the samples it has, in the
    /// order the phases first appeared.
    pub fn by_phase(&self) -> Vec<(String, f64, usize)> {
        let mut out: Vec<(String, f64, usize)> =
            self.phases.iter().map(|n| (n.clone(), f64::NEG_INFINITY, 0)).collect();
        for s in &self.samples {
            if let Some(e) = out.get_mut(s.phase as usize) {
                e.1 = e.1.max(s.live_bytes);
                e.2 += 1;
            }
        }
        out.retain(|e| e.2 > 0);
        out
    }

    /// The samples as CSV (`t_ms,live_mib,phase`), live bytes in MiB above `base_bytes`.
    pub fn to_csv(&self, base_bytes: f64) -> String {
        let mut out = String::from("t_ms,live_mib,phase\n");
        for s in &self.samples {
            let name = self.phases.get(s.phase as usize).map_or("?", String::as_str);
            out.push_str(&format!(
                "{:.3},{:.4},\"{}\"\n",
                s.t_ms,
                (s.live_bytes - base_bytes) / (1u64 << 20) as f64,
                name
            ));
        }
        out
    }
}

/// Block hooks that set the timeline's current phase: "forward: block 3", "backward: block 2"
/// (under full checkpointing that includes the block's recomputation), "forward: head and loss",
/// "backward: head and loss", "after the backward: reductions and update".
pub struct PhaseMarker {
    phase: Arc<AtomicU32>,
    phases: Arc<Mutex<Phases>>,
}

impl PhaseMarker {
    fn set(&self, name: String) {
        if let Ok(mut p) = self.phases.lock() {
            self.phase.store(p.index(name), Ordering::Relaxed);
        }
    }
}

impl BlockHooks for PhaseMarker {
    fn before_forward(&self, unit: Unit) -> Result<()> {
        self.set(match unit {
            Unit::Outer => "forward: embedding".into(),
            Unit::Block(i) => format!("forward: block {i}"),
        });
        Ok(())
    }

    fn after_forward(&self, unit: Unit) -> Result<()> {
        self.set(match unit {
            Unit::Outer => "forward: loss reduction".into(),
            Unit::Block(i) => format!("forward: after block {i} (the next block, or the head and loss)"),
        });
        Ok(())
    }

    fn before_backward(&self, unit: Unit) -> Result<()> {
        self.set(match unit {
            Unit::Outer => "backward: head and loss".into(),
            Unit::Block(i) => format!("backward: block {i}"),
        });
        Ok(())
    }

    fn after_backward(&self, unit: Unit) -> Result<()> {
        self.set(match unit {
            Unit::Outer => "after the backward: reductions and update".into(),
            Unit::Block(i) => format!("backward: after block {i} (the previous block, or the embedding)"),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_every_peak_and_halves_the_buffer() {
        let s = |t: f64, b: f64| Sample { t_ms: t, live_bytes: b, phase: t as u32 };
        let mut v = vec![s(0.0, 1.0), s(1.0, 5.0), s(2.0, 3.0), s(3.0, 2.0), s(4.0, 9.0)];
        merge_pairs(&mut v);
        assert_eq!(v, vec![s(1.0, 5.0), Sample { t_ms: 3.0, live_bytes: 3.0, phase: 2 }, s(4.0, 9.0)]);
    }
}
