//! A checkpoint on disk: one safetensors shard per rank and a manifest (JSON) that describes
//! the run, the world layout, the flat units, the optimizer, scheduler and loss-scale state,
//! the data position, and each shard's size and CRC-32.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::{LossScaler, TrainConfig};
use super::flat::FlatUnit;
use crate::model::{GptConfig, Params, Placement};
use crate::{Error, Result};

/// The manifest's file name in a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";

/// The format this library writes and reads.
pub const FORMAT: u32 = 1;

/// Everything a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The ulysses version that wrote it.
    pub library: String,
    /// Steps taken (the next step's index) and updates applied.
    pub step: u64,
    pub updates: u64,
    /// Where the data stream continues, as the caller described it (the experiment runner:
    /// dataset, seed and the next step).
    pub data: serde_json::Value,
    pub model: GptConfig,
    pub train: TrainConfig,
    pub world: World,
    /// The flat units of replicated parameters, partitioned over the world.
    pub units: Vec<UnitLayout>,
    /// The tensor-parallel shards (Megatron-SP), saved whole by every rank.
    pub tp: Option<UnitLayout>,
    pub loss_scaler: Option<LossScaler>,
    /// Random state: the training step draws no random numbers (no dropout; data is a pure
    /// function of seed, step and replica), so the data position is all there is.
    pub rng: String,
    pub shards: Vec<ShardFile>,
    pub saved_unix_s: u64,
}

/// The ranks a checkpoint was saved from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    /// All SP x DP ranks (the ZeRO group).
    pub size: usize,
    pub sp: usize,
    pub dp: usize,
    /// The strategy's label ("ulysses", "megatron_sp", ...).
    pub strategy: String,
    /// Tensor-parallel degree (Megatron-SP), if any.
    pub tp: Option<usize>,
    pub zero_stage: u8,
}

/// A flat unit as saved: partitions of `padded` elements over `parts` ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitLayout {
    pub name: String,
    pub numel: i64,
    pub padded: i64,
    pub parts: i64,
    pub entries: Vec<EntryLayout>,
}

/// One parameter in a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryLayout {
    pub name: String,
    /// Shape of the saved values (this rank's slice for tensor-parallel shards).
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
    /// For a tensor-parallel shard: the dim and the indices of the full tensor it holds.
    pub shard: Option<(i64, Vec<i64>)>,
}

/// One rank's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFile {
    pub rank: usize,
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

impl UnitLayout {
    /// The layout with the tensor-parallel indices left out (they differ by rank).
    pub fn without_indices(&self) -> UnitLayout {
        let mut u = self.clone();
        for e in &mut u.entries {
            if let Some((_, index)) = &mut e.shard {
                index.clear();
            }
        }
        u
    }

    pub fn of(unit: &FlatUnit, params: &Params) -> UnitLayout {
        let entries = unit
            .entries
            .iter()
            .map(|e| EntryLayout {
                name: e.name.clone(),
                shape: e.shape.clone(),
                offset: e.offset,
                numel: e.numel,
                shard: match &params.all()[e.param].placement {
                    Placement::Replicated => None,
                    Placement::Sharded { dim, index } => Some((*dim, index.clone())),
                },
            })
            .collect();
        UnitLayout {
            name: unit.name.clone(),
            numel: unit.numel,
            padded: unit.padded,
            parts: unit.parts,
            entries,
        }
    }
}

/// Shard file name of rank `r`.
pub fn shard_name(r: usize) -> String {
    format!("rank-{r:05}.safetensors")
}

/// A checkpoint error naming the file.
pub fn error(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument { op: "checkpoint", group: path.display().to_string(), msg: msg.to_string() }
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            error(&path, format!("cannot read the manifest ({e}); is {} a checkpoint?", dir.display()))
        })?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| error(&path, format!("unreadable manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(error(&path, format!("format {} (this library reads {FORMAT})", m.format)));
        }
        Ok(m)
    }

    /// Rank `r`'s shard: its bytes checked against the manifest, then its tensors by name.
    pub fn read_shard(&self, dir: &Path, r: usize) -> Result<Vec<(String, Tensor)>> {
        let entry = self.shards.iter().find(|s| s.rank == r).ok_or_else(|| {
            error(&dir.join(MANIFEST), format!("lists no shard for rank {r} ({} shards)", self.shards.len()))
        })?;
        let path: PathBuf = dir.join(&entry.file);
        let bytes = std::fs::read(&path)
            .map_err(|e| error(&path, format!("shard of rank {r} is missing or unreadable: {e}")))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(error(
                &path,
                format!("truncated or resized: {} bytes, the manifest says {}", bytes.len(), entry.bytes),
            ));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != entry.crc32 {
            return Err(error(
                &path,
                format!("corrupted: CRC-32 {crc:08x}, the manifest says {:08x}", entry.crc32),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| error(&path, format!("not safetensors: {e}")))?;
        st.tensors()
            .into_iter()
            .map(|(name, view)| Ok((name, Tensor::try_from(view).map_err(|e| error(&path, e))?)))
            .collect()
    }
}

/// Serialises named tensors as safetensors bytes.
pub fn serialize(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    struct View {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &View {
        fn dtype(&self) -> safetensors::Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let bad =
        |name: &str, e: String| Error::InvalidArgument { op: "checkpoint", group: name.to_string(), msg: e };
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel).map_err(|e| bad(name, e.to_string()))?;
        let dtype = safetensors::Dtype::try_from(t.kind()).map_err(|e| bad(name, e.to_string()))?;
        views.push((
            name.clone(),
            View { dtype, shape: t.size().iter().map(|&s| s as usize).collect(), data },
        ));
    }
    let refs: Vec<(&str, &View)> = views.iter().map(|(n, v)| (n.as_str(), v)).collect();
    safetensors::serialize(refs, &None).map_err(|e| bad("shard", e.to_string()))
}
