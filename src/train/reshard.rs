//! Loading a checkpoint saved at another world layout, ZeRO stage or strategy (DeepSpeed's
//! "universal checkpoint", done at load time): every rank reads every shard, rebuilds each
//! parameter's full values (parameters, master weights, Adam moments) from the saved
//! partitions and tensor-parallel slices, and keeps what its own layout gives it. The memory
//! this takes is the full model state, once, while loading.

use std::collections::HashMap;
use std::path::Path;

use tch::Tensor;

use super::manifest::{error, shard_name, Manifest};
use super::Trainer;
use crate::error::TorchResultExt;
use crate::model::Placement;
use crate::Result;

/// What a checkpoint holds per parameter.
const KINDS: [&str; 4] = ["param", "master", "exp_avg", "exp_avg_sq"];

/// Full values by (parameter name, kind).
type Full = HashMap<(String, &'static str), Tensor>;

impl Trainer {
    /// Fills this rank's state from every rank's saved tensors (`saved[r]`: rank r's shard).
    pub(super) fn load_resharded(
        &mut self,
        m: &Manifest,
        saved: &[HashMap<String, Tensor>],
        dir: &Path,
    ) -> Result<()> {
        let full = full_values(m, saved, dir)?;
        self.fill_from(&full, dir)
    }

    /// Parameters and optimizer state from full values.
    fn fill_from(&mut self, full: &Full, dir: &Path) -> Result<()> {
        let params = self.model.params().shallow();
        let all = params.all();
        let value = |i: usize, kind: &'static str| -> Result<Option<Tensor>> {
            let p = &all[i];
            let Some(v) = full.get(&(p.name.clone(), kind)) else { return Ok(None) };
            let v = match &p.placement {
                Placement::Replicated => v.shallow_clone(),
                Placement::Sharded { dim, index } => {
                    v.f_index_select(*dim, &Tensor::from_slice(index)).op("checkpoint")?
                }
            };
            if v.size() != p.tensor.size() {
                return Err(error(
                    dir,
                    format!(
                        "{kind} of {}: saved {:?}, this model has {:?}",
                        p.name,
                        v.size(),
                        p.tensor.size()
                    ),
                ));
            }
            Ok(Some(v))
        };
        let stage3 = self.cfg.zero.partitions_parameters();
        let r = self.groups.zero.rank();
        let units: Vec<_> =
            self.zero.units.iter().map(Some).chain(self.zero.tp.as_ref().map(|_| None)).collect();
        for (k, unit) in units.iter().enumerate() {
            let u = unit.unwrap_or_else(|| self.zero.tp.as_ref().unwrap_or(&self.zero.units[0]));
            let partitioned = stage3 && unit.is_some();
            if partitioned {
                u.allocate()?;
            }
            for e in &u.entries {
                let v = value(e.param, "param")?
                    .ok_or_else(|| error(dir, format!("has no values for {}", e.name)))?;
                all[e.param].tensor.shallow_clone().f_copy_(&v).op("checkpoint")?;
            }
            let _ = u
                .flat
                .f_narrow(0, u.numel, u.padded - u.numel)
                .and_then(|mut p| p.f_zero_())
                .op("checkpoint")?;
            if partitioned {
                let (a, b) = u.part(r);
                if let Some(shard) = &self.zero.shards[k] {
                    shard
                        .shallow_clone()
                        .f_copy_(&u.flat.f_narrow(0, a, b - a).op("checkpoint")?)
                        .op("checkpoint")?;
                }
                u.release()?;
            }
            let Some(state) = self.states.get(k) else { continue };
            let targets = [
                ("master", state.master.as_ref()),
                ("exp_avg", Some(&state.m)),
                ("exp_avg_sq", Some(&state.v)),
            ];
            for (kind, target) in targets {
                let Some(target) = target else { continue };
                let flat = Tensor::f_zeros([u.padded], (target.kind(), target.device())).op("checkpoint")?;
                for e in &u.entries {
                    let v = value(e.param, kind)?
                        .ok_or_else(|| error(dir, format!("has no {kind} for {}", e.name)))?;
                    flat.f_narrow(0, e.offset, e.numel)
                        .and_then(|mut d| d.f_copy_(&v.f_reshape([-1])?))
                        .op("checkpoint")?;
                }
                let mine = flat.f_narrow(0, state.range.0, state.range.1 - state.range.0).op("checkpoint")?;
                target.shallow_clone().f_copy_(&mine).op("checkpoint")?;
            }
        }
        Ok(())
    }
}

/// Every parameter's full values from every rank's saved tensors.
fn full_values(m: &Manifest, saved: &[HashMap<String, Tensor>], dir: &Path) -> Result<Full> {
    let mut full = Full::new();
    for kind in KINDS {
        for u in &m.units {
            let key = format!("{}/{kind}", u.name);
            let parts: Vec<&Tensor> = saved.iter().filter_map(|s| s.get(&key)).collect();
            if parts.is_empty() {
                continue;
            }
            if parts.len() != saved.len() {
                let r = saved.iter().position(|s| !s.contains_key(&key)).unwrap_or(0);
                return Err(error(&dir.join(shard_name(r)), format!("has no tensor {key}")));
            }
            // [padded / parts] x parts -> [padded]
            let flat = Tensor::f_cat(&parts, 0).op("checkpoint")?;
            for e in &u.entries {
                let v = flat
                    .f_narrow(0, e.offset, e.numel)
                    .and_then(|v| v.f_reshape(e.shape.as_slice()))
                    .op("checkpoint")?;
                full.insert((e.name.clone(), kind), v);
            }
        }
        let Some(tp) = &m.tp else { continue };
        // Each rank's slices placed at their indices of the full tensor.
        let index = |r: usize, name: &str| -> Result<Vec<i64>> {
            let t = saved[r].get(&format!("tp.index/{name}"));
            let t = t.ok_or_else(|| error(&dir.join(shard_name(r)), format!("has no tp.index/{name}")))?;
            Vec::<i64>::try_from(t).op("checkpoint")
        };
        for e in &tp.entries {
            let Some((dim, _)) = e.shard else { continue };
            let mut extent = 0;
            for r in 0..saved.len() {
                extent = extent.max(index(r, &e.name)?.into_iter().max().map_or(0, |i| i + 1));
            }
            for (r, s) in saved.iter().enumerate() {
                let Some(flat) = s.get(&format!("tp/{kind}")) else { continue };
                let v = flat
                    .f_narrow(0, e.offset, e.numel)
                    .and_then(|v| v.f_reshape(e.shape.as_slice()))
                    .op("checkpoint")?;
                let key = (e.name.clone(), kind);
                if !full.contains_key(&key) {
                    let mut shape = e.shape.clone();
                    shape[dim as usize] = extent;
                    full.insert(
                        key.clone(),
                        Tensor::f_zeros(&shape, (v.kind(), v.device())).op("checkpoint")?,
                    );
                }
                let idx = Tensor::from_slice(&index(r, &e.name)?);
                let _ = full[&key].shallow_clone().f_index_copy_(dim, &idx, &v).op("checkpoint")?;
            }
        }
    }
    Ok(full)
}
