//! DPM-Solver++ 2M, as diffusers' `DPMSolverMultistepScheduler` (solver order 2, midpoint,
//! `lower_order_final`, a zero final sigma), with Karras sigmas as an option. Its calls and its
//! per-call quantities serve the SDE variant too.

use candle_core::Tensor;

use super::common::{alpha_sigma, combine, interp, karras, linspace, sigma_to_t, trailing};
use super::{Calls, Entry, Made, Sampler, Step};
use crate::error::Result;
use crate::sd::config::{BetaSchedule, PredictionType, TimestepSpacing};
use crate::sd::scheduler::NoiseSchedule;

pub(super) const ENTRY: Entry = Entry {
    name: "dpmpp_2m",
    a1111: "DPM++ 2M",
    karras: true,
    noise: false,
    about: "DPM-Solver++ 2M, deterministic, as good in 20-25 steps",
    make,
};

#[derive(Debug)]
struct DpmPP2M<'a> {
    schedule: &'a NoiseSchedule,
}

fn make(schedule: &NoiseSchedule, steps: usize, karras: bool) -> Result<Made<'_>> {
    Ok(Made::new(
        calls(schedule, steps, karras),
        DpmPP2M { schedule },
    ))
}

/// DPM-Solver's calls: `steps` of `steps + 1` spaced timesteps (the last dropped), their
/// sigmas interpolated in the training schedule (or Karras sigmas over the whole schedule,
/// mapped back to whole timesteps), then a zero final sigma.
pub(super) fn calls(schedule: &NoiseSchedule, steps: usize, use_karras: bool) -> Calls {
    let t_total = schedule.num_train_timesteps();
    let tf = t_total as f64;
    let cfg = schedule.config();
    let full_sigmas = schedule.sigmas();
    let ts: Vec<f64> = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = linspace(0.0, tf - 1.0, steps + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .rev()
                .collect();
            v.pop();
            v
        }
        TimestepSpacing::Trailing => trailing(tf, steps),
        TimestepSpacing::Leading => {
            let ratio = (t_total / (steps + 1)) as f64;
            (1..=steps)
                .rev()
                .map(|i| i as f64 * ratio + cfg.steps_offset as f64)
                .collect()
        }
    };
    let (timesteps, sig) = if use_karras {
        let log_sigmas: Vec<f32> = full_sigmas.iter().map(|s| s.ln()).collect();
        let k = karras(
            full_sigmas[0] as f64,
            full_sigmas[t_total - 1] as f64,
            steps,
        );
        let ts = k
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                if cfg.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                    t.trunc()
                } else {
                    t.round_ties_even()
                }
            })
            .collect();
        (ts, k)
    } else {
        let sig = ts.iter().map(|&t| interp(t, full_sigmas)).collect();
        (ts, sig)
    };
    Calls {
        sigmas: sig.iter().map(|&s| s as f32).chain([0.0]).collect(),
        ..Calls::at(timesteps)
    }
}

/// What a DPM-Solver++ step computes from one call: the data prediction, alpha and sigma at the
/// next call (t) and at this one (s0), and the step in log-SNR.
pub(super) struct Quantities {
    pub x0: Tensor,
    pub alpha_t: f32,
    pub sigma_t: f32,
    pub sigma_s0: f32,
    /// `lambda_t - lambda_s0`, with `lambda = ln(alpha) - ln(sigma)`.
    pub h: f32,
    /// `(lambda_s0 - lambda_s1) / h` with s1 the previous call, once there is one.
    pub r0: Option<f32>,
}

fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Quantities {
    pub(super) fn of(schedule: &NoiseSchedule, step: &Step<'_>) -> Result<Self> {
        let (s0, t) = step.sigmas();
        let (alpha_s0, sigma_s0) = alpha_sigma(s0);
        let (out, x) = (step.output, step.sample);
        let x0 = match schedule.config().prediction_type {
            PredictionType::VPrediction => combine(alpha_s0, x, -sigma_s0, out)?,
            PredictionType::Sample => out.clone(),
            PredictionType::Epsilon => ((x - (out * sigma_s0 as f64)?)? / alpha_s0 as f64)?,
        };
        let (alpha_t, sigma_t) = alpha_sigma(t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let r0 = step.index.checked_sub(1).map(|previous| {
            let (alpha_s1, sigma_s1) = alpha_sigma(step.calls.sigmas[previous]);
            (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h
        });
        Ok(Self {
            x0,
            alpha_t,
            sigma_t,
            sigma_s0,
            h,
            r0,
        })
    }

    /// The second-order correction `(x0 - m1) / r0` from the previous call's data prediction
    /// `m1`, except at the first and the last call (first order there, as diffusers with
    /// `lower_order_final` and a zero final sigma).
    pub(super) fn d1(&self, previous: Option<&Tensor>, step: &Step<'_>) -> Result<Option<Tensor>> {
        match (previous, self.r0) {
            (Some(m1), Some(r0)) if !step.is_last() => {
                Ok(Some(((&self.x0 - m1)? * (1.0 / r0) as f64)?))
            }
            _ => Ok(None),
        }
    }
}

impl Sampler for DpmPP2M<'_> {
    /// The previous call's data prediction.
    type State = Option<Tensor>;

    fn step(&self, previous: &mut Option<Tensor>, step: &Step<'_>) -> Result<Tensor> {
        let q = Quantities::of(self.schedule, step)?;
        let e = q.alpha_t * ((-q.h).exp() - 1.0);
        let first = combine(q.sigma_t / q.sigma_s0, step.sample, -e, &q.x0)?;
        let next = match q.d1(previous.as_ref(), step)? {
            Some(d1) => (first - (d1 * (0.5 * e) as f64)?)?,
            None => first,
        };
        *previous = Some(q.x0);
        Ok(next)
    }
}
