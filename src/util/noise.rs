//! Seeded standard-normal noise, drawn on the CPU with ChaCha8 so that a seed gives the same
//! numbers on every device and in every dtype.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;

use crate::error::Result;

/// `shape` standard-normal values drawn from `rng`, as a tensor on `device`.
pub fn normal(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(rng))
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Standard-normal noise of `shape` from `seed`, on the CPU.
pub fn seeded_noise(seed: u64, shape: &[usize]) -> Result<Tensor> {
    normal(&mut ChaCha8Rng::seed_from_u64(seed), shape, &Device::Cpu)
}
