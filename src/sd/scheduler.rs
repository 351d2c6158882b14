//! The noise schedule (betas, cumulative alphas, sigmas) that training and every sampler share,
//! and DDIM (eta = 0) as diffusers' `DDIMScheduler` does it; the other samplers are in
//! [`crate::sd::sampler`].
//!
//! The noise schedule is computed in f32 like diffusers (betas from a float32 linspace, cumulative
//! product in float32), so `alphas_cumprod` agrees with the reference to f32 rounding.

use candle_core::{Result, Tensor};

use crate::sd::config::SchedulerConfig;

/// The noise schedule and the DDIM update.
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
        let betas: Vec<f32> = match (&config.trained_betas, config.beta_schedule.as_str()) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, "scaled_linear") => {
                linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, "squaredcos_cap_v2") => {
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
            _ => linspace_f32(config.beta_start, config.beta_end, n),
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

    /// DDIM's timesteps of an `n`-step schedule, from the noisiest, as `timestep_spacing` says.
    pub fn ddim_timesteps(&self, n: usize) -> Vec<usize> {
        let t = self.num_train_timesteps();
        let n = n.clamp(1, t);
        let offset = self.config.steps_offset;
        match self.config.timestep_spacing.as_str() {
            "linspace" => (0..n)
                .rev()
                .map(|i| {
                    let x = if n == 1 {
                        0.0
                    } else {
                        i as f64 * (t - 1) as f64 / (n - 1) as f64
                    };
                    x.round_ties_even() as usize
                })
                .collect(),
            "trailing" => {
                let ratio = t as f64 / n as f64;
                (0..n)
                    .map(|i| {
                        ((t as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                    })
                    .collect()
            }
            _ => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + offset).min(t - 1))
                    .collect()
            }
        }
    }

    /// One DDIM step (eta 0) from `sample` at `timestep` with the model output `model_output`,
    /// for an `n_steps` schedule.
    pub fn ddim_step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        n_steps: usize,
    ) -> Result<Tensor> {
        let t_total = self.num_train_timesteps();
        let a_t = self.alphas_cumprod[timestep.min(t_total - 1)] as f64;
        let prev = timestep as i64 - (t_total / n_steps.max(1)) as i64;
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        };
        let (x0, eps) = match self.config.prediction_type.as_str() {
            "v_prediction" => {
                let x0 = ((sample * a_t.sqrt())? - (model_output * (1.0 - a_t).sqrt())?)?;
                let eps = ((model_output * a_t.sqrt())? + (sample * (1.0 - a_t).sqrt())?)?;
                (x0, eps)
            }
            "sample" => {
                let x0 = model_output.clone();
                let eps = ((sample - (&x0 * a_t.sqrt())?)? / (1.0 - a_t).sqrt())?;
                (x0, eps)
            }
            _ => {
                let x0 = ((sample - (model_output * (1.0 - a_t).sqrt())?)? / a_t.sqrt())?;
                (x0, model_output.clone())
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
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
