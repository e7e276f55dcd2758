//! Saving and resuming a [`Trainer`], as DeepSpeed users expect: every rank writes its own
//! shard, rank 0 the manifest, into a temporary folder that is renamed only when every shard is
//! on disk (a crash mid-save leaves the previous checkpoint whole). Each rank saves partition r
//! of every flat unit (parameters, f32 master weights, Adam moments), whatever the ZeRO stage,
//! so that a checkpoint has one format.
//!
//! Loading at the layout it was saved at reads only the rank's own shard and gives a run that
//! continues bit for bit. At another layout (another SP x DP, ZeRO stage or strategy) every rank
//! reads every shard, rebuilds each parameter's full values and takes its own part of them. A
//! different model or precision is refused, saying what differs.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::manifest::{
    error, serialize, shard_name, Manifest, ShardFile, UnitLayout, World, FORMAT, MANIFEST,
};
use super::Trainer;
use crate::error::TorchResultExt;
use crate::model::Placement;
use crate::Result;

/// The complete checkpoints under `root` (`step-*` folders with a manifest; a save that
/// crashed leaves only a `.tmp-*` folder), oldest first.
pub fn checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(MANIFEST).is_file())
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((step, p))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest_checkpoint(root: &Path) -> Option<(u64, PathBuf)> {
    checkpoints(root).pop()
}

fn io(path: &Path, e: std::io::Error) -> crate::Error {
    error(path, e)
}

/// Writes `bytes` to `path` and flushes them to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io(path, e))
}

impl Trainer {
    /// The flat units' layouts, then the tensor-parallel unit's.
    pub(super) fn layouts(&self) -> (Vec<UnitLayout>, Option<UnitLayout>) {
        let params = self.model.params();
        let units = self.zero.units.iter().map(|u| UnitLayout::of(u, params)).collect();
        (units, self.zero.tp.as_ref().map(|u| UnitLayout::of(u, params)))
    }

    /// This rank's shard: partition r of each unit (parameters and optimizer state), and the
    /// tensor-parallel unit whole.
    fn shard_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let r = self.groups.zero.rank();
        let mut out = Vec::new();
        let n = self.zero.units.len();
        for k in 0..n + usize::from(self.zero.tp.is_some()) {
            let (unit, (a, b)) = match self.zero.units.get(k) {
                Some(u) => (u, u.part(r)),
                None => (
                    self.zero.tp.as_ref().unwrap_or(&self.zero.units[0]),
                    (0, self.zero.tp.as_ref().map_or(0, |u| u.padded)),
                ),
            };
            let param = match self.zero.shards.get(k).and_then(|s| s.as_ref()) {
                Some(shard) => shard.shallow_clone(),
                None => unit.flat.f_narrow(0, a, b - a).op("checkpoint")?,
            };
            out.push((format!("{}/param", unit.name), param));
            if let Some(s) = self.states.get(k) {
                let slice = |t: &Tensor| t.f_narrow(0, a - s.range.0, b - a).op("checkpoint");
                if let Some(m) = &s.master {
                    out.push((format!("{}/master", unit.name), slice(m)?));
                }
                out.push((format!("{}/exp_avg", unit.name), slice(&s.m)?));
                out.push((format!("{}/exp_avg_sq", unit.name), slice(&s.v)?));
            }
        }
        Ok(out)
    }

    /// Saves a checkpoint of the state after the steps taken so far into
    /// `root/step-<steps taken>`, with `data` (where the data stream continues) in its
    /// manifest. Every rank calls it; returns the folder.
    pub fn save(&self, root: &Path, data: serde_json::Value) -> Result<PathBuf> {
        let g = &self.groups.stats;
        let r = g.rank();
        let name = format!("step-{:08}", self.step);
        let (tmp, done) = (root.join(format!(".tmp-{name}")), root.join(&name));
        if r == 0 {
            std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
            }
            std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
        }
        g.barrier()?;
        let bytes = {
            let _no_grad = tch::no_grad_guard();
            let mut tensors = self.shard_tensors()?;
            // Which slices of the full tensors this rank's tensor-parallel shards are.
            for p in self.model.params().all() {
                if let Placement::Sharded { index, .. } = &p.placement {
                    tensors.push((format!("tp.index/{}", p.name), Tensor::from_slice(index)));
                }
            }
            serialize(&tensors)?
        };
        write_synced(&tmp.join(shard_name(r)), &bytes)?;
        let mine = Tensor::from_slice(&[i64::from(crc32fast::hash(&bytes)), bytes.len() as i64]);
        let all = Vec::<i64>::try_from(g.all_gather(&mine, 0)?).op("checkpoint")?;
        if r == 0 {
            let shards = (0..g.size())
                .map(|j| ShardFile {
                    rank: j,
                    file: shard_name(j),
                    bytes: all[2 * j + 1] as u64,
                    crc32: all[2 * j] as u32,
                })
                .collect();
            let (units, tp) = self.layouts();
            let strategy = self.model.strategy();
            let m = Manifest {
                format: FORMAT,
                library: env!("CARGO_PKG_VERSION").into(),
                step: self.step,
                updates: self.updates,
                data,
                model: self.model.config().clone(),
                train: self.cfg.clone(),
                world: World {
                    size: g.size(),
                    sp: strategy.group().map_or(1, |s| s.size()),
                    dp: self.groups.dp.size(),
                    strategy: strategy.name().into(),
                    tp: strategy.tensor_parallel().map(|t| t.size()),
                    zero_stage: self.cfg.zero.stage(),
                },
                units,
                tp,
                loss_scaler: self.scaler,
                rng: "none drawn: the step is deterministic and the data a function of (seed, step, replica)"
                    .into(),
                shards,
                saved_unix_s: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            let text = serde_json::to_string_pretty(&m).map_err(|e| error(&tmp, e))?;
            write_synced(&tmp.join(MANIFEST), text.as_bytes())?;
            if done.exists() {
                std::fs::remove_dir_all(&done).map_err(|e| io(&done, e))?;
            }
            std::fs::rename(&tmp, &done).map_err(|e| io(&done, e))?;
            File::open(root).and_then(|d| d.sync_all()).map_err(|e| io(root, e))?;
        }
        g.barrier()?;
        Ok(done)
    }

    /// Refuses a checkpoint of another model, another precision, or without the optimizer
    /// state this run needs, saying what differs.
    fn check_compatible(&self, m: &Manifest, dir: &Path) -> Result<()> {
        let (saved, now) = (serde_json::to_value(&m.model), serde_json::to_value(self.model.config()));
        if let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (saved, now) {
            let diff: Vec<String> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: saved {v}, now {}", b.get(k).cloned().unwrap_or_default()))
                .collect();
            if !diff.is_empty() {
                return Err(error(
                    dir,
                    format!("saved from another model ({}); cannot load", diff.join("; ")),
                ));
            }
        }
        if m.train.precision != self.cfg.precision {
            return Err(error(
                dir,
                format!(
                    "saved in {}, this run is {}: master weights and moments do not convert exactly; cannot load",
                    m.train.precision.name(),
                    self.cfg.precision.name()
                ),
            ));
        }
        if m.train.adamw.is_none() && self.cfg.adamw.is_some() {
            return Err(error(dir, "saved without an optimizer, so it has no optimizer state; cannot load"));
        }
        Ok(())
    }

    /// Restores the state saved in the checkpoint folder `dir` (reshards when the world layout,
    /// ZeRO stage or strategy differ). Every rank calls it. Returns the manifest.
    pub fn load(&mut self, dir: &Path) -> Result<Manifest> {
        let m = Manifest::read(dir)?;
        self.check_compatible(&m, dir)?;
        let (units, tp) = self.layouts();
        let _no_grad = tch::no_grad_guard();
        // The same decision on every rank: the layouts without the tensor-parallel indices,
        // which differ by rank and follow from the TP degree.
        let same = |a: &UnitLayout, b: &UnitLayout| a.without_indices() == b.without_indices();
        let same_tp = match (&m.tp, &tp) {
            (Some(a), Some(b)) => same(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        let strategy = self.model.strategy();
        let fast = m.world.size == self.groups.zero.size()
            && m.world.tp == strategy.tensor_parallel().map(|t| t.size())
            && m.units.len() == units.len()
            && m.units.iter().zip(&units).all(|(a, b)| same(a, b))
            && same_tp;
        // Each rank reads (and checks) what it needs; then all agree before anything else, so
        // that a bad shard is an error on every rank rather than a hang.
        let r = self.groups.zero.rank();
        let read = if fast {
            m.read_shard(dir, r).map(|t| vec![t.into_iter().collect()])
        } else {
            (0..m.world.size).map(|j| Ok(m.read_shard(dir, j)?.into_iter().collect())).collect()
        };
        let saved = self.agree(read, &m, dir, fast)?;
        if fast {
            self.load_own(&saved[0], dir)?;
        } else {
            self.load_resharded(&m, &saved, dir)?;
        }
        self.step = m.step;
        self.updates = m.updates;
        if self.scaler.is_some() {
            self.scaler = m.loss_scaler;
        }
        self.groups.stats.barrier()?;
        Ok(m)
    }

    /// Every rank's outcome of reading the shards: an error on every rank if any failed, each
    /// saying what is wrong (the failing rank's own error; the others read the failing rank's
    /// shard again to say the same, since whichever rank's error a launch reports first is the
    /// one a user sees).
    fn agree(
        &self,
        read: Result<Vec<HashMap<String, Tensor>>>,
        m: &Manifest,
        dir: &Path,
        fast: bool,
    ) -> Result<Vec<HashMap<String, Tensor>>> {
        let g = &self.groups.stats;
        let mut failed = vec![0.0; g.size()];
        failed[g.rank()] = f64::from(u8::from(read.is_err()));
        let all =
            Vec::<f64>::try_from(g.all_reduce(&Tensor::from_slice(&failed), crate::comm::ReduceOp::Sum)?)
                .op("checkpoint")?;
        let bad: Vec<usize> = (0..all.len()).filter(|&j| all[j] > 0.0).collect();
        match read {
            Err(e) => Err(e),
            Ok(_) if !bad.is_empty() => {
                if let Some(e) = bad.iter().find_map(|&j| m.read_shard(dir, j).err()) {
                    return Err(e);
                }
                let files: Vec<String> =
                    bad.iter().map(|&j| dir.join(shard_name(j)).display().to_string()).collect();
                let what = if fast { format!("the shards {files:?}") } else { "the shards".to_string() };
                Err(error(dir, format!("rank(s) {bad:?} could not read {what}: missing, truncated or corrupted (their errors say which)")))
            }
            Ok(saved) => Ok(saved),
        }
    }

    /// The same layout: this rank's shard into its partitions, then all-gathers where the
    /// rank holds more than its partition (parameters in stages 0-2, state in stage 0).
    fn load_own(&mut self, saved: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let r = self.groups.zero.rank();
        let file = dir.join(shard_name(r));
        let get = |key: String| saved.get(&key).ok_or_else(|| error(&file, format!("has no tensor {key}")));
        let targets = self.shard_tensors()?;
        let n = self.zero.units.len();
        for (key, mut target) in targets {
            target.f_copy_(get(key)?).op("checkpoint")?;
        }
        let zero = &self.zero;
        for (k, s) in self.states.iter().enumerate().take(n) {
            let u = &zero.units[k];
            if s.range.1 - s.range.0 == u.padded && u.parts > 1 {
                let (a, b) = u.part(r);
                let sizes = vec![u.part_len(); u.parts as usize];
                for t in [Some(&s.m), Some(&s.v), s.master.as_ref()].into_iter().flatten() {
                    let mine = t.f_narrow(0, a, b - a).and_then(|x| x.f_detach_copy()).op("checkpoint")?;
                    zero.group.all_gather_into(&mine, t, 0, &sizes)?;
                }
            }
        }
        if !self.cfg.zero.partitions_parameters() {
            zero.gather_updated()?;
        }
        Ok(())
    }
}
