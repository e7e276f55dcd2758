//! Choosing a strategy by value: what experiment configs name.

use serde::{Deserialize, Serialize};

use super::{
    AllGatherKv, AttentionConfig, ChunkedUlysses, HeadPlan, MegatronSp, RingAttention, SeqLayout,
    SequenceParallel, SingleDevice, UlyssesAttention, UspAttention,
};
use crate::comm::Group;
use crate::{Error, Result};

/// A sequence-parallel strategy and its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategyConfig {
    /// The whole sequence on one rank; the reference.
    Single,
    /// DeepSpeed-Ulysses: all-to-all of heads and sequence around the local kernel.
    Ulysses,
    /// Megatron-LM tensor parallelism with sequence-parallel LayerNorm regions.
    MegatronSp,
    /// Ring attention; `zigzag` balances causal work.
    Ring { zigzag: bool },
    /// All-gather of K and V (Llama 3 context parallelism).
    AllGatherKv { zigzag: bool },
    /// Ulysses inside groups of `ulysses` ranks, ring across them.
    Usp { ulysses: usize, zigzag: bool },
    /// Ulysses on `chunks` chunks of each rank's sequence, one after the other (FPDT).
    UlyssesChunked { chunks: usize },
}

impl StrategyConfig {
    /// A short name for tables and files: "ulysses", "ring_zigzag", "usp_u2", ...
    pub fn label(&self) -> String {
        let zz = |z: bool| if z { "_zigzag" } else { "" };
        match self {
            StrategyConfig::Single => "single".into(),
            StrategyConfig::Ulysses => "ulysses".into(),
            StrategyConfig::MegatronSp => "megatron_sp".into(),
            StrategyConfig::Ring { zigzag } => format!("ring{}", zz(*zigzag)),
            StrategyConfig::AllGatherKv { zigzag } => format!("allgather_kv{}", zz(*zigzag)),
            StrategyConfig::Usp { ulysses, zigzag } => format!("usp_u{ulysses}{}", zz(*zigzag)),
            StrategyConfig::UlyssesChunked { chunks } => format!("ulysses_chunked_u{chunks}"),
        }
    }

    /// The strategy over the sequence-parallel group `sp` for sequences of `n` tokens with
    /// `heads` query and `kv_heads` key/value heads. Ulysses, Megatron-SP and the single device
    /// run `attention`'s kernel; ring, all-gather KV and USP compute attention blockwise with
    /// its mask. Every rank of `sp` must call it.
    pub fn build(
        &self,
        sp: &Group,
        attention: AttentionConfig,
        n: i64,
        heads: i64,
        kv_heads: i64,
    ) -> Result<Box<dyn SequenceParallel>> {
        self.build_with_kv_store(sp, attention, n, heads, kv_heads, None)
    }

    /// [`build`](StrategyConfig::build), with chunked Ulysses' K/V kept in `kv_store` between
    /// each layer's forward and backward (FPDT's offload; [`ChunkedUlysses::with_offload`]).
    /// A store for any other strategy is refused: none keeps chunks' K/V.
    pub fn build_with_kv_store(
        &self,
        sp: &Group,
        attention: AttentionConfig,
        n: i64,
        heads: i64,
        kv_heads: i64,
        kv_store: Option<crate::device::Offload>,
    ) -> Result<Box<dyn SequenceParallel>> {
        if kv_store.is_some() && !matches!(self, StrategyConfig::UlyssesChunked { .. }) {
            return Err(Error::InvalidArgument {
                op: "strategy",
                group: sp.info().to_string(),
                msg: format!(
                    "K/V offload is chunked Ulysses' (FPDT: ulysses_chunked:U); {} keeps no chunks' K/V",
                    self.label()
                ),
            });
        }
        let mask = attention.mask;
        Ok(match *self {
            StrategyConfig::Single => {
                if sp.size() != 1 {
                    return Err(Error::InvalidArgument {
                        op: "strategy",
                        group: sp.info().to_string(),
                        msg: format!("the single-device strategy runs on 1 rank, not {}", sp.size()),
                    });
                }
                Box::new(SingleDevice::new(attention.build()?, n, heads, kv_heads)?)
            }
            StrategyConfig::Ulysses => {
                Box::new(UlyssesAttention::new(sp.clone(), attention.build()?, n, heads, kv_heads)?)
            }
            StrategyConfig::MegatronSp => {
                Box::new(MegatronSp::new(sp.clone(), attention.build()?, n, heads, kv_heads)?)
            }
            StrategyConfig::Ring { zigzag } => {
                Box::new(RingAttention::new(sp.clone(), mask, n, heads, kv_heads, zigzag)?)
            }
            StrategyConfig::AllGatherKv { zigzag } => {
                Box::new(AllGatherKv::new(sp.clone(), mask, n, heads, kv_heads, zigzag)?)
            }
            StrategyConfig::Usp { ulysses, zigzag } => {
                Box::new(UspAttention::new(sp, mask, n, heads, kv_heads, ulysses, zigzag)?)
            }
            StrategyConfig::UlyssesChunked { chunks } => {
                let chunked = ChunkedUlysses::new(sp.clone(), mask, n, heads, kv_heads, chunks)?;
                Box::new(match kv_store {
                    Some(store) => chunked.with_offload(store),
                    None => chunked,
                })
            }
        })
    }
}

impl StrategyConfig {
    /// Whether the strategy can run on `p` ranks for sequences of `n` tokens with these heads,
    /// without building it (for validating experiment configs): the error it would give if not.
    pub fn check(&self, n: i64, p: usize, heads: i64, kv_heads: i64) -> Result<()> {
        match *self {
            StrategyConfig::Single if p != 1 => Err(Error::InvalidArgument {
                op: "strategy",
                group: format!("{p} ranks"),
                msg: format!("the single-device strategy runs on 1 rank, not {p}"),
            }),
            StrategyConfig::Single => {
                HeadPlan::new(heads, kv_heads, 1).and(SeqLayout::contiguous(n, 1)).map(drop)
            }
            StrategyConfig::Ulysses => {
                HeadPlan::new(heads, kv_heads, p).and(SeqLayout::contiguous(n, p)).map(drop)
            }
            StrategyConfig::MegatronSp => MegatronSp::check(n, p, heads, kv_heads).map(drop),
            StrategyConfig::Ring { zigzag } => RingAttention::check(n, p, heads, kv_heads, zigzag).map(drop),
            StrategyConfig::AllGatherKv { zigzag } => {
                RingAttention::check(1, 1, heads, kv_heads, false)?;
                if zigzag { SeqLayout::zigzag(n, p) } else { SeqLayout::contiguous(n, p) }.map(drop)
            }
            StrategyConfig::Usp { ulysses, zigzag } => {
                if ulysses == 0 || !p.is_multiple_of(ulysses) {
                    return Err(Error::InvalidArgument {
                        op: "usp",
                        group: format!("{p} ranks"),
                        msg: format!("the Ulysses degree {ulysses} must divide P={p}"),
                    });
                }
                HeadPlan::new(heads, kv_heads, ulysses)?;
                let ring = p / ulysses;
                if !zigzag && n % ring as i64 != 0 {
                    return Err(Error::InvalidArgument {
                        op: "usp",
                        group: format!("{p} ranks"),
                        msg: format!(
                            "its ring of {ring} ranks needs N divisible by {ring} (N={n}, P={p}, Ulysses \
                             degree {ulysses}): every ring rank must hold as many tokens"
                        ),
                    });
                }
                SeqLayout::nested(n, ring, ulysses, zigzag).map(drop)
            }
            StrategyConfig::UlyssesChunked { chunks } => {
                HeadPlan::new(heads, kv_heads, p)?;
                ChunkedUlysses::check(n, p, chunks)
            }
        }
    }
}

impl std::str::FromStr for StrategyConfig {
    type Err = String;

    /// `single`, `ulysses`, `megatron_sp`, `ring`, `ring_zigzag`, `allgather_kv`,
    /// `allgather_kv_zigzag`, `usp:U` or `usp_zigzag:U` (U = Ulysses degree), `ulysses_chunked:U`
    /// (U = chunks per rank).
    fn from_str(s: &str) -> Result<StrategyConfig, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let degree =
            || arg.parse::<usize>().map_err(|_| format!("{s:?}: usp needs a Ulysses degree, as usp:2"));
        Ok(match name {
            "single" => StrategyConfig::Single,
            "ulysses" => StrategyConfig::Ulysses,
            "megatron_sp" => StrategyConfig::MegatronSp,
            "ring" => StrategyConfig::Ring { zigzag: false },
            "ring_zigzag" => StrategyConfig::Ring { zigzag: true },
            "allgather_kv" => StrategyConfig::AllGatherKv { zigzag: false },
            "allgather_kv_zigzag" => StrategyConfig::AllGatherKv { zigzag: true },
            "usp" => StrategyConfig::Usp { ulysses: degree()?, zigzag: false },
            "usp_zigzag" => StrategyConfig::Usp { ulysses: degree()?, zigzag: true },
            "ulysses_chunked" => StrategyConfig::UlyssesChunked {
                chunks: arg.parse::<usize>().map_err(|_| {
                    format!("{s:?}: ulysses_chunked needs a chunk count per rank, as ulysses_chunked:4")
                })?,
            },
            other => {
                return Err(format!(
                    "unknown strategy {other:?}: use single, ulysses, megatron_sp, ring, ring_zigzag, \
                     allgather_kv, allgather_kv_zigzag, usp:U, usp_zigzag:U or ulysses_chunked:U"
                ))
            }
        })
    }
}
