//! The model's building blocks: parameters with names, linear layers, LayerNorm and RMSNorm, RoPE.

use tch::{Device, Kind, Tensor};

use super::config::NormKind;
use super::init;
use crate::autograd::Tape;
use crate::comm::Group;
use crate::error::TorchResultExt;
use crate::Result;

/// Where a parameter's values sit in the full (unsharded) model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The whole tensor, the same on every rank. Each rank's gradient covers its own tokens
    /// only, so gradients are summed over the group.
    Replicated,
    /// Slices `index` of dim `dim` of the full tensor (tensor parallelism). Each rank's
    /// gradient is already complete for its slices.
    Sharded { dim: i64, index: Vec<i64> },
}

/// One named parameter.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub placement: Placement,
}

/// Named trainable parameters, in creation order (the same order on every rank, which the
/// coalesced gradient reduction relies on).
pub struct Params {
    entries: Vec<Param>,
    seed: u64,
    kind: Kind,
    device: Device,
}

impl Params {
    /// Parameters initialised from `seed`, in `kind` on `device`.
    pub fn new(seed: u64, kind: Kind, device: Device) -> Params {
        Params { entries: Vec::new(), seed, kind, device }
    }

    /// Keeps `full` (the whole parameter) or its slices, as a trainable parameter.
    fn add(&mut self, name: &str, full: Tensor, placement: Placement) -> Result<Tensor> {
        let t = match &placement {
            Placement::Replicated => full,
            Placement::Sharded { dim, index } => {
                let index = Tensor::from_slice(index).f_to(self.device).op("params")?;
                full.f_index_select(*dim, &index).op("params")?
            }
        };
        let t = t.set_requires_grad(true);
        self.entries.push(Param { name: name.to_string(), tensor: t.shallow_clone(), placement });
        Ok(t)
    }

    /// A Normal(0, std) parameter of full shape `shape`, placed as `placement`. The values are
    /// those of the full model whatever the placement.
    pub fn normal(&mut self, name: &str, shape: &[i64], std: f64, placement: Placement) -> Result<Tensor> {
        let full = init::normal(self.seed, name, shape, std, self.kind, self.device)?;
        self.add(name, full, placement)
    }

    /// A constant parameter of full shape `shape`, placed as `placement`.
    pub fn constant(
        &mut self,
        name: &str,
        shape: &[i64],
        value: f64,
        placement: Placement,
    ) -> Result<Tensor> {
        let full = init::constant(value, shape, self.kind, self.device)?;
        self.add(name, full, placement)
    }

    /// The same parameters through other handles (shallow clones: one storage, one gradient).
    pub fn shallow(&self) -> Params {
        let entries = self
            .entries
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                tensor: p.tensor.shallow_clone(),
                placement: p.placement.clone(),
            })
            .collect();
        Params { entries, seed: self.seed, kind: self.kind, device: self.device }
    }

    /// (name, tensor) of every parameter, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|p| (p.name.as_str(), &p.tensor))
    }

    /// Every parameter with its placement, in creation order.
    pub fn all(&self) -> &[Param] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of elements on this rank.
    pub fn numel(&self) -> i64 {
        self.entries.iter().map(|p| p.tensor.numel() as i64).sum()
    }
}

/// How a linear layer is split over a tensor-parallel group (Megatron-LM, Shoeybi et al. 2019).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// The whole layer on every rank.
    None,
    /// Column-parallel: this rank's output features `index` (weight rows, bias entries).
    Columns(Vec<i64>),
    /// Row-parallel: this rank's input features `index` (weight columns); the output is a
    /// partial sum, and the bias, whole on every rank, is added once after the reduction.
    Rows(Vec<i64>),
}

/// `y = x W^T + b`, whole or split over a tensor-parallel group.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    row_parallel: bool,
}

impl Linear {
    /// `weight` Normal(0, std) `[out, in]`; `bias` zeros `[out]` when asked for; this rank's part
    /// given by `split`.
    pub fn new(
        p: &mut Params,
        name: &str,
        (input, output): (i64, i64),
        bias: bool,
        std: f64,
        split: Split,
    ) -> Result<Linear> {
        let (w_place, b_place) = match &split {
            Split::None => (Placement::Replicated, Placement::Replicated),
            Split::Columns(index) => {
                let sharded = Placement::Sharded { dim: 0, index: index.clone() };
                (sharded.clone(), sharded)
            }
            Split::Rows(index) => {
                (Placement::Sharded { dim: 1, index: index.clone() }, Placement::Replicated)
            }
        };
        let weight = p.normal(&format!("{name}.weight"), &[output, input], std, w_place)?;
        let bias =
            if bias { Some(p.constant(&format!("{name}.bias"), &[output], 0.0, b_place)?) } else { None };
        Ok(Linear { weight, bias, row_parallel: matches!(split, Split::Rows(_)) })
    }

    /// The same layer through other handles (one storage, one gradient).
    pub fn shallow(&self) -> Linear {
        Linear {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            row_parallel: self.row_parallel,
        }
    }

    /// The weight `[out, in]` (this rank's part of it).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The whole layer (or, column-parallel, this rank's output features).
    ///
    /// # Shapes
    /// `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.f_linear(&self.weight, self.bias.as_ref()).op("linear")
    }

    /// A column-parallel layer on the all-gather of `x` along the sequence (dim 1) over `group`
    /// (Megatron-SP), as one taped op that keeps `x`'s shard, not the gathered input, and
    /// gathers it again in the backward ([`Tape::all_gather_linear`]).
    ///
    /// # Shapes
    /// `[b, sizes[r], in]` -> `[b, sum(sizes), out]` (this rank's output features).
    pub fn forward_gathered(&self, tape: &Tape, group: &Group, x: &Tensor, sizes: &[i64]) -> Result<Tensor> {
        tape.all_gather_linear(group, x, 1, sizes, &self.weight, self.bias.as_ref())
    }

    /// A row-parallel layer around the reduction of its partial sums: `reduce` sums them over
    /// the group (and may reshard), then the bias is added once.
    ///
    /// # Shapes
    /// `[.., in/P]` -> `[.., out]` (as `reduce` leaves it).
    pub fn forward_reduced(
        &self,
        x: &Tensor,
        reduce: impl FnOnce(Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if !self.row_parallel {
            return reduce(self.forward(x)?);
        }
        let partial = x.f_linear::<Tensor>(&self.weight, None).op("linear")?;
        let y = reduce(partial)?;
        match &self.bias {
            Some(b) => y.f_add(b).op("linear"),
            None => Ok(y),
        }
    }
}

/// The norm over the last dim: LayerNorm (weight and bias) or RMSNorm (weight only).
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    /// Weight ones (and, for LayerNorm, bias zeros) of `size`.
    pub fn new(p: &mut Params, name: &str, size: i64, eps: f64, kind: NormKind) -> Result<Norm> {
        let weight = p.constant(&format!("{name}.weight"), &[size], 1.0, Placement::Replicated)?;
        let bias = match kind {
            NormKind::Layernorm => {
                Some(p.constant(&format!("{name}.bias"), &[size], 0.0, Placement::Replicated)?)
            }
            NormKind::Rmsnorm => None,
        };
        Ok(Norm { weight, bias, eps })
    }

    /// # Shapes
    /// `[.., h]` -> `[.., h]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.weight.size()[0];
        match &self.bias {
            Some(b) => x.f_layer_norm([h], Some(&self.weight), Some(b), self.eps, true).op("layer_norm"),
            // libtorch's rms_norm: x * rsqrt(mean(x^2) + eps) * w, reduced in f32 for 16-bit x.
            None => x.f_rms_norm([h], Some(&self.weight), self.eps).op("rms_norm"),
        }
    }
}

/// Rotary position embedding (Su et al. 2021), rotate-half form, applied with *global*
/// positions so that a rank's slice of the sequence is rotated as the whole sequence would be
/// (with packed documents, positions within each document: one row per sample).
pub struct Rope {
    /// cos and sin of position x frequency, `[1, s, 1, d/2]` (`[b, s, 1, d/2]` per sample), in
    /// the activations' dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The rotation for `positions` (`[s]` i64, or `[b, s]` when they differ per sample), head
    /// size `head_dim`, base `theta`.
    pub fn new(positions: &Tensor, head_dim: i64, theta: f64, kind: Kind) -> Result<Rope> {
        let half = head_dim / 2;
        let device = positions.device();
        let f = || -> Result<(Tensor, Tensor), tch::TchError> {
            // inv_freq[i] = theta^(-2i/d), in f64 so long contexts keep their precision.
            let i = Tensor::f_arange(half, (Kind::Double, device))?;
            let inv_freq = i.f_mul_scalar(-2.0 * theta.ln() / head_dim as f64)?.f_exp()?;
            // [.., s, 1] x [1, d/2] -> [.., s, d/2] -> [1 or b, s, 1, d/2]
            let angles =
                positions.f_to_kind(Kind::Double)?.f_unsqueeze(-1)?.f_mul(&inv_freq.f_unsqueeze(0)?)?;
            let size = positions.size();
            let shape = match size.as_slice() {
                [b, s] => [*b, *s, 1, half],
                _ => [1, angles.size()[0], 1, half],
            };
            Ok((
                angles.f_cos()?.f_reshape(shape)?.f_to_kind(kind)?,
                angles.f_sin()?.f_reshape(shape)?.f_to_kind(kind)?,
            ))
        };
        let (cos, sin) = f().op("rope")?;
        Ok(Rope { cos, sin })
    }

    /// # Shapes
    /// `[b, s, heads, d]` -> `[b, s, heads, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = || -> Result<Tensor, tch::TchError> {
            let half = x.size()[3] / 2;
            let (x1, x2) = (x.f_narrow(3, 0, half)?, x.f_narrow(3, half, half)?);
            // (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
            let r1 = x1.f_mul(&self.cos)?.f_sub(&x2.f_mul(&self.sin)?)?;
            let r2 = x2.f_mul(&self.cos)?.f_add(&x1.f_mul(&self.sin)?)?;
            Tensor::f_cat(&[r1, r2], 3)
        };
        f().op("rope")
    }
}
