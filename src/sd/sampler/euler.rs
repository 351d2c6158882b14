//! Euler, as diffusers' `EulerDiscreteScheduler`: one derivative step in sigma space per call,
//! with Karras sigmas as an option. Its calls and its clean-sample prediction serve Euler
//! ancestral too.

use candle_core::Tensor;

use super::common::{combine, interp, karras, linspace, sigma_to_t, trailing};
use super::{Calls, Entry, Made, Sampler, Step};
use crate::error::Result;
use crate::sd::config::{PredictionType, TimestepSpacing};
use crate::sd::scheduler::NoiseSchedule;

pub(super) const ENTRY: Entry = Entry {
    name: "euler",
    a1111: "Euler",
    karras: true,
    noise: false,
    about: "Euler, deterministic",
    make,
};

#[derive(Debug)]
struct Euler<'a> {
    schedule: &'a NoiseSchedule,
}

fn make(schedule: &NoiseSchedule, steps: usize, karras: bool) -> Result<Made<'_>> {
    Ok(Made::new(
        calls(schedule, steps, karras),
        Euler { schedule },
    ))
}

/// Euler's calls (Euler ancestral's too): the timesteps `timestep_spacing` gives, their sigmas
/// interpolated in the training schedule (or Karras sigmas between the same ends, mapped back
/// to fractional timesteps), the input divided by `sqrt(sigma^2 + 1)`.
pub(super) fn calls(schedule: &NoiseSchedule, steps: usize, use_karras: bool) -> Calls {
    let t_total = schedule.num_train_timesteps();
    let tf = t_total as f64;
    let cfg = schedule.config();
    let full_sigmas = schedule.sigmas();
    let ts: Vec<f64> = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => linspace(0.0, tf - 1.0, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32 as f64)
            .collect(),
        TimestepSpacing::Trailing => trailing(tf, steps),
        TimestepSpacing::Leading => {
            let ratio = (t_total / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| i as f64 * ratio + cfg.steps_offset as f64)
                .collect()
        }
    };
    let sig: Vec<f64> = ts.iter().map(|&t| interp(t, full_sigmas)).collect();
    let (timesteps, sig) = if use_karras {
        let log_sigmas: Vec<f32> = full_sigmas.iter().map(|s| s.ln()).collect();
        let k = karras(sig[sig.len() - 1], sig[0], steps);
        let ts = k
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
            .collect();
        (ts, k)
    } else {
        (ts, sig)
    };
    let sigmas: Vec<f32> = sig.iter().map(|&s| s as f32).chain([0.0]).collect();
    let max = sigmas.iter().copied().fold(0f32, f32::max);
    let init_noise_sigma = match cfg.timestep_spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    };
    let input_divisors = sigmas[..sigmas.len() - 1]
        .iter()
        .map(|&s| (s * s + 1.0).sqrt() as f64)
        .collect();
    Calls {
        timesteps,
        sigmas,
        init_noise_sigma,
        input_divisors,
    }
}

/// The clean sample predicted at `sigma` from the model output `out` for the sample `x`.
pub(super) fn x0(schedule: &NoiseSchedule, sigma: f32, out: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(match schedule.config().prediction_type {
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            combine(-sigma / s2.sqrt(), out, 1.0 / s2, x)?
        }
        PredictionType::Sample => out.clone(),
        PredictionType::Epsilon => (x - (out * sigma as f64)?)?,
    })
}

impl Sampler for Euler<'_> {
    type State = ();

    fn step(&self, _: &mut (), step: &Step<'_>) -> Result<Tensor> {
        let (s, s_next) = step.sigmas();
        let x = step.sample;
        let derivative = ((x - x0(self.schedule, s, step.output, x)?)? / s as f64)?;
        Ok((x + (derivative * (s_next - s) as f64)?)?)
    }
}
