//! DDIM with eta 0, as diffusers' `DDIMScheduler`: the paper's sampler and the default.

use candle_core::Tensor;

use super::{Calls, Entry, Made, Sampler, Step};
use crate::error::Result;
use crate::sd::config::{PredictionType, TimestepSpacing};
use crate::sd::scheduler::NoiseSchedule;

pub(super) const ENTRY: Entry = Entry {
    name: "ddim",
    a1111: "DDIM",
    karras: false,
    noise: false,
    about: "DDIM, deterministic (the paper's)",
    make,
};

#[derive(Debug)]
struct Ddim<'a> {
    schedule: &'a NoiseSchedule,
    steps: usize,
}

fn make(schedule: &NoiseSchedule, steps: usize, _karras: bool) -> Result<Made<'_>> {
    let timesteps = timesteps(schedule, steps)
        .into_iter()
        .map(|t| t as f64)
        .collect();
    Ok(Made::new(Calls::at(timesteps), Ddim { schedule, steps }))
}

/// DDIM's timesteps of an `n`-step schedule, from the noisiest, as `timestep_spacing` says.
fn timesteps(schedule: &NoiseSchedule, n: usize) -> Vec<usize> {
    let t = schedule.num_train_timesteps();
    let n = n.clamp(1, t);
    let offset = schedule.config().steps_offset;
    match schedule.config().timestep_spacing {
        TimestepSpacing::Linspace => (0..n)
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
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / n as f64;
            (0..n)
                .map(|i| {
                    ((t as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + offset).min(t - 1))
                .collect()
        }
    }
}

impl Sampler for Ddim<'_> {
    type State = ();

    fn step(&self, _: &mut (), step: &Step<'_>) -> Result<Tensor> {
        let (output, sample) = (step.output, step.sample);
        let schedule = self.schedule;
        let config = schedule.config();
        let acp = schedule.alphas_cumprod();
        let t_total = schedule.num_train_timesteps();
        let timestep = step.calls.timesteps[step.index] as usize;
        let a_t = acp[timestep.min(t_total - 1)] as f64;
        let prev = timestep as i64 - (t_total / self.steps.max(1)) as i64;
        let a_prev = if prev >= 0 {
            acp[prev as usize] as f64
        } else {
            schedule.final_alpha_cumprod() as f64
        };
        let (x0, eps) = match config.prediction_type {
            PredictionType::VPrediction => {
                let x0 = ((sample * a_t.sqrt())? - (output * (1.0 - a_t).sqrt())?)?;
                let eps = ((output * a_t.sqrt())? + (sample * (1.0 - a_t).sqrt())?)?;
                (x0, eps)
            }
            PredictionType::Sample => {
                let x0 = output.clone();
                let eps = ((sample - (&x0 * a_t.sqrt())?)? / (1.0 - a_t).sqrt())?;
                (x0, eps)
            }
            PredictionType::Epsilon => {
                let x0 = ((sample - (output * (1.0 - a_t).sqrt())?)? / a_t.sqrt())?;
                (x0, output.clone())
            }
        };
        let x0 = if config.clip_sample {
            let r = config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        Ok(((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?)
    }
}
