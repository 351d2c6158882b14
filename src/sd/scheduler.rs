//! The noise schedule (betas, cumulative alphas, sigmas) that training and every sampler
//! ([`crate::sd::sampler`]) share, and the forward process that noises a clean sample.
//!
//! The noise schedule is computed in f32 like diffusers (betas from a float32 linspace, cumulative
//! product in float32), so `alphas_cumprod` agrees with the reference to f32 rounding.

use candle_core::{Result, Tensor};

use crate::sd::config::{BetaSchedule, SchedulerConfig};

/// The noise schedule of a model's training.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
    /// `sqrt((1 - abar) / abar)` per timestep, in f32 as diffusers computes it.
    sigmas: Vec<f32>,
    final_alpha_cumprod: f32,
    config: SchedulerConfig,
}

/// torch.linspace(start, end, n, dtype=float32): the first half counts up from `start`, the
/// second half down from `end`, each with the float32 step.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Self {
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = match (&config.trained_betas, config.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => {
                let abar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - abar(t2) / abar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            (None, BetaSchedule::Linear) => linspace_f32(config.beta_start, config.beta_end, n),
        };
        let mut acc = 1f32;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        Self {
            alphas_cumprod,
            sigmas,
            final_alpha_cumprod,
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `sqrt((1 - abar_t) / abar_t)` for every training timestep t.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, with one timestep per batch row.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timesteps.len());
        }
        let mut shape = vec![1; x0.rank()];
        shape[0] = b;
        let abar: Vec<f32> = timesteps
            .iter()
            .map(|&t| self.alphas_cumprod[t.min(self.num_train_timesteps() - 1)])
            .collect();
        let sa: Vec<f32> = abar.iter().map(|a| a.sqrt()).collect();
        let sb: Vec<f32> = abar.iter().map(|a| (1.0 - a).sqrt()).collect();
        let sa = Tensor::from_vec(sa, shape.as_slice(), x0.device())?.to_dtype(x0.dtype())?;
        let sb = Tensor::from_vec(sb, shape.as_slice(), x0.device())?.to_dtype(x0.dtype())?;
        x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?
    }
}
