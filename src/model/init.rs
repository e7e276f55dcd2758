//! Deterministic parameter initialisation: each value is a pure function of (seed, parameter
//! name, index), so every rank, thread, backend and SP degree builds identical parameters
//! without communicating, and without touching libtorch's global random generator (which the
//! ranks of a local launch share).

use tch::{Device, Kind, Tensor};

use crate::error::TorchResultExt;
use crate::Result;

/// SplitMix64: a fast 64-bit mixer with good statistical quality (Steele et al. 2014).
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of a name, to give every parameter its own stream.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// A uniform in (0, 1) from 53 random bits.
fn unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Normal(0, std) values of `shape` for parameter `name` (Box-Muller on a counter-based stream).
pub fn normal(seed: u64, name: &str, shape: &[i64], std: f64, kind: Kind, device: Device) -> Result<Tensor> {
    let n: i64 = shape.iter().product();
    let key = splitmix64(seed ^ name_key(name));
    let mut values = Vec::with_capacity(n as usize);
    let mut i = 0u64;
    while (values.len() as i64) < n {
        let (u1, u2) = (unit(splitmix64(key ^ (2 * i))), unit(splitmix64(key ^ (2 * i + 1))));
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        if (values.len() as i64) < n {
            values.push((radius * angle.sin()) as f32);
        }
        i += 1;
    }
    Tensor::from_slice(&values)
        .f_reshape(shape)
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_to(device))
        .op("init")
}

/// A constant tensor (biases 0, LayerNorm weights 1).
pub fn constant(value: f64, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
    Tensor::f_full(shape, value, (kind, device)).op("init")
}
