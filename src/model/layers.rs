//! The model's building blocks: parameters with names, linear layers, LayerNorm, RoPE.

use tch::{Device, Kind, Tensor};

use super::init;
use crate::error::TorchResultExt;
use crate::Result;

/// Named trainable parameters, in creation order (the same order on every rank, which the
/// coalesced gradient reduction relies on).
pub struct Params {
    entries: Vec<(String, Tensor)>,
    seed: u64,
    kind: Kind,
    device: Device,
}

impl Params {
    /// Parameters initialised from `seed`, in `kind` on `device`.
    pub fn new(seed: u64, kind: Kind, device: Device) -> Params {
        Params { entries: Vec::new(), seed, kind, device }
    }

    fn add(&mut self, name: &str, t: Tensor) -> Tensor {
        let t = t.set_requires_grad(true);
        self.entries.push((name.to_string(), t.shallow_clone()));
        t
    }

    /// A Normal(0, std) parameter.
    pub fn normal(&mut self, name: &str, shape: &[i64], std: f64) -> Result<Tensor> {
        let (kind, device) = (self.kind, self.device);
        let t = init::normal(self.seed, name, shape, std, kind, device)?;
        Ok(self.add(name, t))
    }

    /// A constant parameter.
    pub fn constant(&mut self, name: &str, shape: &[i64], value: f64) -> Result<Tensor> {
        let (kind, device) = (self.kind, self.device);
        let t = init::constant(value, shape, kind, device)?;
        Ok(self.add(name, t))
    }

    /// (name, tensor) of every parameter, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of elements.
    pub fn numel(&self) -> i64 {
        self.entries.iter().map(|(_, t)| t.numel() as i64).sum()
    }
}

/// `y = x W^T + b`.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` Normal(0, std) `[out, in]`; `bias` zeros `[out]` when asked for.
    pub fn new(p: &mut Params, name: &str, input: i64, output: i64, bias: bool, std: f64) -> Result<Linear> {
        let weight = p.normal(&format!("{name}.weight"), &[output, input], std)?;
        let bias = if bias { Some(p.constant(&format!("{name}.bias"), &[output], 0.0)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// # Shapes
    /// `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.f_linear(&self.weight, self.bias.as_ref()).op("linear")
    }
}

/// LayerNorm over the last dim.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &mut Params, name: &str, size: i64, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: p.constant(&format!("{name}.weight"), &[size], 1.0)?,
            bias: p.constant(&format!("{name}.bias"), &[size], 0.0)?,
            eps,
        })
    }

    /// # Shapes
    /// `[.., h]` -> `[.., h]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.weight.size()[0];
        x.f_layer_norm([h], Some(&self.weight), Some(&self.bias), self.eps, true).op("layer_norm")
    }
}

/// Rotary position embedding (Su et al. 2021), rotate-half form, applied with *global*
/// positions so that a rank's slice of the sequence is rotated as the whole sequence would be.
pub struct Rope {
    /// cos and sin of position x frequency, `[1, s, 1, d/2]`, in the activations' dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The rotation for `positions` (`[s]` i64), head size `head_dim`, base `theta`.
    pub fn new(positions: &Tensor, head_dim: i64, theta: f64, kind: Kind) -> Result<Rope> {
        let half = head_dim / 2;
        let device = positions.device();
        let f = || -> Result<(Tensor, Tensor), tch::TchError> {
            // inv_freq[i] = theta^(-2i/d), in f64 so long contexts keep their precision.
            let i = Tensor::f_arange(half, (Kind::Double, device))?;
            let inv_freq = i.f_mul_scalar(-2.0 * theta.ln() / head_dim as f64)?.f_exp()?;
            // [s, 1] x [1, d/2] -> [s, d/2] -> [1, s, 1, d/2]
            let angles =
                positions.f_to_kind(Kind::Double)?.f_unsqueeze(1)?.f_mul(&inv_freq.f_unsqueeze(0)?)?;
            let shape = [1, angles.size()[0], 1, half];
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
