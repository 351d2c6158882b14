//! PNDM, as diffusers' `PNDMScheduler`: Runge-Kutta warm-up calls (unless the config sets
//! `skip_prk_steps`, as SD1.5's does), then linear multistep (PLMS).

use candle_core::Tensor;

use super::common::{combine, linspace, trailing};
use super::{Calls, Entry, Made, Sampler, Step};
use crate::error::{Error, Result};
use crate::sd::config::{PredictionType, TimestepSpacing};
use crate::sd::scheduler::NoiseSchedule;

pub(super) const ENTRY: Entry = Entry {
    name: "pndm",
    a1111: "PLMS",
    karras: false,
    noise: false,
    about: "PNDM / PLMS, deterministic (SD1.5's own scheduler)",
    make,
};

#[derive(Debug)]
struct Pndm<'a> {
    schedule: &'a NoiseSchedule,
    steps: usize,
    /// The Runge-Kutta warm-up's timesteps (diffusers' `prk_timesteps`), when the config does
    /// not skip it.
    prk: Vec<i64>,
}

/// What PNDM remembers of one trajectory.
#[derive(Default)]
struct History {
    /// Calls made.
    counter: usize,
    /// The last noise predictions (diffusers' `ets`).
    ets: Vec<Tensor>,
    /// The sample the current multi-call step started from, and its summed prediction.
    cur_sample: Option<Tensor>,
    cur_output: Option<Tensor>,
}

fn make(schedule: &NoiseSchedule, steps: usize, _karras: bool) -> Result<Made<'_>> {
    let t_total = schedule.num_train_timesteps();
    let tf = t_total as f64;
    let cfg = schedule.config();
    // Ascending, as diffusers' `_timesteps`.
    let base: Vec<i64> = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => linspace(0.0, tf - 1.0, steps)
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Trailing => trailing(tf, steps)
            .into_iter()
            .rev()
            .map(|t| t as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (t_total / steps) as i64;
            (0..steps as i64)
                .map(|i| i * ratio + cfg.steps_offset as i64)
                .collect()
        }
    };
    let n = base.len();
    let (timesteps, prk) = if cfg.skip_prk_steps {
        let mut v: Vec<i64> = base[..n.saturating_sub(1)].to_vec();
        v.extend(&base[n.saturating_sub(2)..n.saturating_sub(1)]);
        v.extend(&base[n.saturating_sub(1)..]);
        (v.into_iter().rev().collect::<Vec<_>>(), vec![])
    } else {
        if n < 4 {
            return Err(Error::arg(
                "steps",
                format!(
                    "{steps}: PNDM with its Runge-Kutta warm-up (the scheduler config does not \
                     set skip_prk_steps) needs at least 4 steps"
                ),
            ));
        }
        let half = (t_total / steps / 2) as i64;
        let last4: Vec<i64> = base[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
        let doubled: Vec<i64> = last4[..last4.len() - 1]
            .iter()
            .flat_map(|&t| [t, t])
            .collect();
        let prk: Vec<i64> = doubled[1..doubled.len() - 1]
            .iter()
            .rev()
            .copied()
            .collect();
        let plms = base[..n - 3].iter().rev().copied();
        (prk.iter().copied().chain(plms).collect(), prk)
    };
    let calls = Calls::at(timesteps.iter().map(|&t| t as f64).collect());
    Ok(Made::new(
        calls,
        Pndm {
            schedule,
            steps,
            prk,
        },
    ))
}

/// `acc + part`, or `part` when nothing is summed yet.
fn accumulate(acc: Option<Tensor>, part: Tensor) -> Result<Tensor> {
    Ok(match acc {
        Some(acc) => (acc + part)?,
        None => part,
    })
}

impl Pndm<'_> {
    /// A Runge-Kutta warm-up call.
    fn prk_step(&self, state: &mut History, step: &Step<'_>) -> Result<Tensor> {
        let (out, x) = (step.output, step.sample);
        let ratio = (self.schedule.num_train_timesteps() / self.steps) as i64;
        let counter = state.counter;
        let timestep = step.calls.timesteps[step.index] as i64;
        let diff = if counter % 2 == 1 { 0 } else { ratio / 2 };
        let prev_t = timestep - diff;
        let t = self.prk[counter / 4 * 4];
        let output = match counter % 4 {
            0 => {
                state.cur_output = Some(accumulate(state.cur_output.take(), (out * (1.0 / 6.0))?)?);
                state.ets.push(out.clone());
                state.cur_sample = Some(x.clone());
                out.clone()
            }
            1 | 2 => {
                state.cur_output = Some(accumulate(state.cur_output.take(), (out * (1.0 / 3.0))?)?);
                out.clone()
            }
            _ => accumulate(state.cur_output.take(), (out * (1.0 / 6.0))?)?,
        };
        let base = state.cur_sample.clone().unwrap_or_else(|| x.clone());
        self.prev_sample(&base, t, prev_t, &output)
    }

    /// A linear multistep call.
    fn plms_step(&self, state: &mut History, step: &Step<'_>) -> Result<Tensor> {
        let (out, x) = (step.output, step.sample);
        let ratio = (self.schedule.num_train_timesteps() / self.steps) as i64;
        let counter = state.counter;
        let timestep = step.calls.timesteps[step.index] as i64;
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if counter != 1 {
            let keep = state.ets.len().saturating_sub(3);
            state.ets.drain(..keep);
            state.ets.push(out.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let ets = &state.ets;
        let n = ets.len();
        let mut sample = x.clone();
        let output = if n == 1 && counter == 0 {
            state.cur_sample = Some(x.clone());
            out.clone()
        } else if n == 1 && counter == 1 {
            if let Some(s) = state.cur_sample.take() {
                sample = s;
            }
            ((out + &ets[0])? / 2.0)?
        } else if n == 2 {
            combine(1.5, &ets[1], -0.5, &ets[0])?
        } else if n == 3 {
            let a = combine(23.0 / 12.0, &ets[2], -16.0 / 12.0, &ets[1])?;
            (a + (&ets[0] * (5.0 / 12.0))?)?
        } else {
            let a = combine(55.0 / 24.0, &ets[n - 1], -59.0 / 24.0, &ets[n - 2])?;
            let b = combine(37.0 / 24.0, &ets[n - 3], -9.0 / 24.0, &ets[n - 4])?;
            (a + b)?
        };
        self.prev_sample(&sample, t, prev_t, &output)
    }

    /// diffusers' `_get_prev_sample`: from `sample` at timestep `t` to `prev_t`.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, output: &Tensor) -> Result<Tensor> {
        let acp = self.schedule.alphas_cumprod();
        let a_t = acp[t.clamp(0, acp.len() as i64 - 1) as usize];
        let a_prev = if prev_t >= 0 {
            acp[prev_t as usize]
        } else {
            self.schedule.final_alpha_cumprod()
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let output = match self.schedule.config().prediction_type {
            PredictionType::VPrediction => combine(a_t.sqrt(), output, b_t.sqrt(), sample)?,
            PredictionType::Epsilon | PredictionType::Sample => output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        combine(sample_coeff, sample, -(a_prev - a_t) / denom, &output)
    }
}

impl Sampler for Pndm<'_> {
    type State = History;

    fn step(&self, state: &mut History, step: &Step<'_>) -> Result<Tensor> {
        let next = if state.counter < self.prk.len() {
            self.prk_step(state, step)?
        } else {
            self.plms_step(state, step)?
        };
        state.counter += 1;
        Ok(next)
    }
}
