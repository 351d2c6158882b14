//! The samplers users expect, each as the diffusers scheduler of that name computes it (0.42):
//! DDIM with eta 0 (`DDIMScheduler`, the paper's and the default), DPM-Solver++ 2M
//! (`DPMSolverMultistepScheduler`), Euler (`EulerDiscreteScheduler`), Euler ancestral
//! (`EulerAncestralDiscreteScheduler`) and PNDM (`PNDMScheduler`), with Karras sigmas where
//! diffusers offers them (DPM-Solver++ and Euler). Each reads the model's scheduler config as
//! `Scheduler.from_config(pipe.scheduler.config)` would: the noise schedule, `timestep_spacing`,
//! `steps_offset`, `prediction_type`, and PNDM's `skip_prk_steps`.
//!
//! A [`Plan`] is one run's schedule: the UNet's timestep at each call (fractional for Euler with
//! Karras sigmas), the sigmas, how to scale the UNet's input. A [`SamplerState`] holds what a
//! multistep sampler remembers of one trajectory, so trajectories denoised side by side (F and C)
//! keep their own histories under one plan.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::sd::scheduler::NoiseSchedule;

/// Which sampler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SamplerKind {
    #[default]
    Ddim,
    DpmPP2M,
    Euler,
    EulerAncestral,
    Pndm,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 5] = [
        SamplerKind::Ddim,
        SamplerKind::DpmPP2M,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Pndm,
    ];
    /// The names `scheduler` options take.
    pub const NAMES: [&'static str; 5] = ["ddim", "dpmpp_2m", "euler", "euler_a", "pndm"];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|&k| k == self).unwrap_or(0)]
    }

    /// The kind called `name` (one of [`SamplerKind::NAMES`]).
    pub fn parse(name: &str) -> Result<Self> {
        Self::NAMES
            .iter()
            .position(|&n| n == name)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| {
                Error::arg(
                    "scheduler",
                    format!(
                        "unknown scheduler `{name}` (known: {})",
                        Self::NAMES.join(", ")
                    ),
                )
            })
    }

    /// Whether diffusers' scheduler of this kind takes `use_karras_sigmas`.
    pub fn offers_karras(self) -> bool {
        matches!(self, SamplerKind::DpmPP2M | SamplerKind::Euler)
    }

    /// Whether each step adds fresh noise (ancestral sampling).
    pub fn is_ancestral(self) -> bool {
        self == SamplerKind::EulerAncestral
    }
}

/// A sampler and its options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplerOptions {
    pub kind: SamplerKind,
    /// Karras et al.'s sigma spacing (rho 7), for the kinds that offer it.
    pub karras: bool,
}

impl SamplerOptions {
    /// Options by name: `scheduler` is one of [`SamplerKind::NAMES`].
    pub fn parse(scheduler: &str, karras: bool) -> Result<Self> {
        let options = Self {
            kind: SamplerKind::parse(scheduler)?,
            karras,
        };
        options.check()?;
        Ok(options)
    }

    /// Karras sigmas only for the kinds that offer them.
    pub fn check(&self) -> Result<()> {
        if self.karras && !self.kind.offers_karras() {
            return Err(Error::arg(
                "karras",
                format!(
                    "the {} scheduler has no Karras sigmas (diffusers offers them for dpmpp_2m \
                     and euler)",
                    self.kind.name()
                ),
            ));
        }
        Ok(())
    }

    /// The name AUTOMATIC1111's web UI gives this sampler in its PNG `parameters`.
    pub fn a1111_name(&self) -> String {
        let base = match self.kind {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::DpmPP2M => "DPM++ 2M",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::Pndm => "PLMS",
        };
        if self.karras {
            format!("{base} Karras")
        } else {
            base.to_string()
        }
    }

    /// `dpmpp_2m`, or `dpmpp_2m karras`.
    pub fn describe(&self) -> String {
        if self.karras {
            format!("{} karras", self.kind.name())
        } else {
            self.kind.name().to_string()
        }
    }
}

/// PNDM's Runge-Kutta warm-up (diffusers' `prk_timesteps`), when the config does not skip it.
#[derive(Debug, Clone)]
struct Prk {
    timesteps: Vec<i64>,
}

/// One run's schedule: what the sampler does at each UNet call.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    schedule: &'a NoiseSchedule,
    options: SamplerOptions,
    /// The number of inference steps asked (PNDM makes more UNet calls than that).
    steps: usize,
    /// The UNet's timestep at each call.
    timesteps: Vec<f64>,
    /// Euler and DPM-Solver: the sigma of each call, then the final one.
    sigmas: Vec<f32>,
    prk: Option<Prk>,
}

/// What a sampler remembers of one trajectory between steps.
#[derive(Debug, Clone, Default)]
pub struct SamplerState {
    /// Steps taken.
    counter: usize,
    /// DPM-Solver: the previous step's data prediction. PNDM: its last noise predictions.
    history: Vec<Tensor>,
    /// PNDM: the sample its current multi-call step started from, and the summed prediction.
    cur_sample: Option<Tensor>,
    cur_output: Option<Tensor>,
}

/// `np.linspace(start, stop, n)` in float64 (the last value exactly `stop`).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        stop
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// `np.arange(start, 0, -step)` for a positive float step.
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start - i as f64 * step).collect()
}

/// "trailing" spacing, from the noisiest: `np.arange(T, 0, -T / n).round() - 1`.
fn trailing(t_total: f64, n: usize) -> Vec<f64> {
    arange_down(t_total, t_total / n as f64)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// `np.interp(x, 0..len, ys)`.
fn interp(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return ys[0] as f64;
    }
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let j = x.floor() as usize;
    let (a, b) = (ys[j] as f64, ys[j + 1] as f64);
    (b - a) * (x - j as f64) + a
}

/// Karras et al.'s sigmas: rho-7 spacing from `max` down to `min` in `n` values.
fn karras(min: f64, max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma interpolates to `sigma`'s.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0);
    let low_idx = below.min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[low_idx + 1] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// `(1 / sqrt(sigma^2 + 1), sigma / sqrt(sigma^2 + 1))`: DPM-Solver's alpha_t and sigma_t.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `a * x + b * y`.
fn combine(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    Ok(((x * a as f64)? + (y * b as f64)?)?)
}

impl<'a> Plan<'a> {
    /// The plan for `steps` inference steps of `options` over `schedule`.
    pub fn new(schedule: &'a NoiseSchedule, options: SamplerOptions, steps: usize) -> Result<Self> {
        let cfg = schedule.config();
        let t_total = schedule.num_train_timesteps();
        if steps == 0 || steps > t_total {
            return Err(Error::arg(
                "steps",
                format!("{steps}: the scheduler has {t_total} timesteps, so 1 to {t_total} denoising steps"),
            ));
        }
        options.check()?;
        let spacing = cfg.timestep_spacing.as_str();
        let offset = cfg.steps_offset as f64;
        let tf = t_total as f64;
        let full_sigmas = schedule.sigmas();
        let log_sigmas: Vec<f32> = full_sigmas.iter().map(|s| s.ln()).collect();
        let mut plan = Plan {
            schedule,
            options,
            steps,
            timesteps: vec![],
            sigmas: vec![],
            prk: None,
        };
        match options.kind {
            SamplerKind::Ddim => {
                plan.timesteps = schedule
                    .ddim_timesteps(steps)
                    .iter()
                    .map(|&t| t as f64)
                    .collect()
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let ts: Vec<f64> = match spacing {
                    "linspace" => linspace(0.0, tf - 1.0, steps)
                        .into_iter()
                        .rev()
                        .map(|t| t as f32 as f64)
                        .collect(),
                    "trailing" => trailing(tf, steps),
                    _ => {
                        let ratio = (t_total / steps) as f64;
                        (0..steps)
                            .rev()
                            .map(|i| i as f64 * ratio + offset)
                            .collect()
                    }
                };
                let sig: Vec<f64> = ts.iter().map(|&t| interp(t, full_sigmas)).collect();
                let (ts, sig) = if options.karras {
                    let k = karras(sig[sig.len() - 1], sig[0], steps);
                    let ts = k
                        .iter()
                        .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
                        .collect();
                    (ts, k)
                } else {
                    (ts, sig)
                };
                plan.timesteps = ts;
                plan.sigmas = sig.iter().map(|&s| s as f32).chain([0.0]).collect();
            }
            SamplerKind::DpmPP2M => {
                let ts: Vec<f64> = match spacing {
                    "linspace" => {
                        let mut v: Vec<f64> = linspace(0.0, tf - 1.0, steps + 1)
                            .into_iter()
                            .map(f64::round_ties_even)
                            .rev()
                            .collect();
                        v.pop();
                        v
                    }
                    "trailing" => trailing(tf, steps),
                    _ => {
                        let ratio = (t_total / (steps + 1)) as f64;
                        (1..=steps)
                            .rev()
                            .map(|i| i as f64 * ratio + offset)
                            .collect()
                    }
                };
                let (ts, sig) = if options.karras {
                    let k = karras(
                        full_sigmas[0] as f64,
                        full_sigmas[t_total - 1] as f64,
                        steps,
                    );
                    let ts = k
                        .iter()
                        .map(|&s| {
                            let t = sigma_to_t(s, &log_sigmas);
                            if cfg.beta_schedule == "squaredcos_cap_v2" {
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
                plan.timesteps = ts;
                plan.sigmas = sig.iter().map(|&s| s as f32).chain([0.0]).collect();
            }
            SamplerKind::Pndm => {
                // Ascending, as diffusers' `_timesteps`.
                let base: Vec<i64> = match spacing {
                    "linspace" => linspace(0.0, tf - 1.0, steps)
                        .into_iter()
                        .map(|t| t.round_ties_even() as i64)
                        .collect(),
                    "trailing" => trailing(tf, steps)
                        .into_iter()
                        .rev()
                        .map(|t| t as i64)
                        .collect(),
                    _ => {
                        let ratio = (t_total / steps) as i64;
                        (0..steps as i64)
                            .map(|i| i * ratio + offset as i64)
                            .collect()
                    }
                };
                let n = base.len();
                let ts: Vec<i64> = if cfg.skip_prk_steps {
                    let mut v: Vec<i64> = base[..n.saturating_sub(1)].to_vec();
                    v.extend(&base[n.saturating_sub(2)..n.saturating_sub(1)]);
                    v.extend(&base[n.saturating_sub(1)..]);
                    v.into_iter().rev().collect()
                } else {
                    if n < 4 {
                        return Err(Error::arg(
                            "steps",
                            format!(
                                "{steps}: PNDM with its Runge-Kutta warm-up (the scheduler config \
                                 does not set skip_prk_steps) needs at least 4 steps"
                            ),
                        ));
                    }
                    let half = (t_total / steps / 2) as i64;
                    let last4: Vec<i64> =
                        base[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
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
                    plan.prk = Some(Prk {
                        timesteps: prk.clone(),
                    });
                    prk.into_iter().chain(plms).collect()
                };
                plan.timesteps = ts.iter().map(|&t| t as f64).collect();
            }
        }
        if let Some(bad) = plan
            .timesteps
            .iter()
            .find(|&&t| !(0.0..t_total as f64).contains(&t))
        {
            return Err(Error::arg(
                "steps",
                format!(
                    "{steps} steps of the {} scheduler with timestep_spacing `{spacing}` reach \
                     timestep {bad}, outside 0..{t_total}",
                    options.kind.name()
                ),
            ));
        }
        Ok(plan)
    }

    pub fn options(&self) -> SamplerOptions {
        self.options
    }

    /// The UNet's timestep at each call, from the noisiest.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The number of UNet calls (PNDM makes more than the steps asked).
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// Euler and DPM-Solver: the sigma of each call, then the final one (0).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// What the initial standard-normal noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.options.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let max = self.sigmas.iter().copied().fold(0f32, f32::max);
                if matches!(
                    self.schedule.config().timestep_spacing.as_str(),
                    "linspace" | "trailing"
                ) {
                    max as f64
                } else {
                    (max * max + 1.0).sqrt() as f64
                }
            }
            _ => 1.0,
        }
    }

    /// The UNet's input at call `index` (Euler divides by `sqrt(sigma^2 + 1)`).
    pub fn scale_input(&self, index: usize, sample: &Tensor) -> Result<Tensor> {
        match self.options.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let s = self.sigmas[index];
                Ok((sample / (s * s + 1.0).sqrt() as f64)?)
            }
            _ => Ok(sample.clone()),
        }
    }

    /// A fresh state for one trajectory.
    pub fn state(&self) -> SamplerState {
        SamplerState::default()
    }

    /// One step at call `index` from `sample` with the (guided) model output. `noise`: the
    /// step's standard-normal noise, which ancestral samplers need. Computes in f32 and returns
    /// f32.
    pub fn step(
        &self,
        state: &mut SamplerState,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let next = match self.options.kind {
            SamplerKind::Ddim => {
                let t = self.timesteps[index] as usize;
                self.schedule.ddim_step(&out, t, &x, self.steps)?
            }
            SamplerKind::Euler => {
                let (s, s_next) = (self.sigmas[index], self.sigmas[index + 1]);
                let x0 = self.sigma_x0(s, &out, &x)?;
                let derivative = ((&x - x0)? / s as f64)?;
                (x + (derivative * (s_next - s) as f64)?)?
            }
            SamplerKind::EulerAncestral => {
                let noise = noise.ok_or_else(|| {
                    Error::arg("noise", "the euler_a scheduler needs each step's noise")
                })?;
                let (from, to) = (self.sigmas[index], self.sigmas[index + 1]);
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                let down = (to * to - up * up).sqrt();
                let x0 = self.sigma_x0(from, &out, &x)?;
                let derivative = ((&x - x0)? / from as f64)?;
                let stepped = (x + (derivative * (down - from) as f64)?)?;
                (stepped + (noise.to_dtype(DType::F32)? * up as f64)?)?
            }
            SamplerKind::DpmPP2M => self.dpm_step(state, index, &out, &x)?,
            SamplerKind::Pndm => self.pndm_step(state, index, &out, &x)?,
        };
        state.counter += 1;
        Ok(next)
    }

    /// Euler's prediction of the clean sample at `sigma`.
    fn sigma_x0(&self, sigma: f32, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        Ok(match self.schedule.config().prediction_type.as_str() {
            "v_prediction" => {
                let s2 = sigma * sigma + 1.0;
                combine(-sigma / s2.sqrt(), out, 1.0 / s2, x)?
            }
            "sample" => out.clone(),
            _ => (x - (out * sigma as f64)?)?,
        })
    }

    /// DPM-Solver++ (2M, midpoint): first order at the first and the last step, second order
    /// between, as diffusers with `lower_order_final` and a zero final sigma.
    fn dpm_step(
        &self,
        state: &mut SamplerState,
        index: usize,
        out: &Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let x0 = match self.schedule.config().prediction_type.as_str() {
            "v_prediction" => combine(alpha_s0, x, -sigma_s0, out)?,
            "sample" => out.clone(),
            _ => ((x - (out * sigma_s0 as f64)?)? / alpha_s0 as f64)?,
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let lambda = |a: f32, s: f32| a.ln() - s.ln();
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let e = alpha_t * ((-h).exp() - 1.0);
        let last = index + 1 == self.len();
        let next = match state.history.last() {
            Some(m1) if !last => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
                let r0 = (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h;
                let d1 = ((&x0 - m1)? * (1.0 / r0) as f64)?;
                (combine(sigma_t / sigma_s0, x, -e, &x0)? - (d1 * (0.5 * e) as f64)?)?
            }
            _ => combine(sigma_t / sigma_s0, x, -e, &x0)?,
        };
        state.history = vec![x0];
        Ok(next)
    }

    /// PNDM: Runge-Kutta warm-up calls (unless the config skips them), then linear multistep.
    fn pndm_step(
        &self,
        state: &mut SamplerState,
        index: usize,
        out: &Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let t_total = self.schedule.num_train_timesteps() as i64;
        let ratio = t_total / self.steps as i64;
        let timestep = self.timesteps[index] as i64;
        let counter = state.counter;
        if let Some(prk) = self.prk.as_ref().filter(|p| counter < p.timesteps.len()) {
            let diff = if counter % 2 == 1 { 0 } else { ratio / 2 };
            let prev_t = timestep - diff;
            let t = prk.timesteps[counter / 4 * 4];
            let add = |state: &mut SamplerState, w: f64| -> Result<()> {
                let part = (out * w)?;
                state.cur_output = Some(match state.cur_output.take() {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
                Ok(())
            };
            let output = match counter % 4 {
                0 => {
                    add(state, 1.0 / 6.0)?;
                    state.history.push(out.clone());
                    state.cur_sample = Some(x.clone());
                    out.clone()
                }
                1 | 2 => {
                    add(state, 1.0 / 3.0)?;
                    out.clone()
                }
                _ => {
                    let acc = state.cur_output.take();
                    let part = (out * (1.0 / 6.0))?;
                    match acc {
                        Some(acc) => (acc + part)?,
                        None => part,
                    }
                }
            };
            let base = state.cur_sample.clone().unwrap_or_else(|| x.clone());
            return self.pndm_prev(&base, t, prev_t, &output);
        }
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if counter != 1 {
            let keep = state.history.len().saturating_sub(3);
            state.history.drain(..keep);
            state.history.push(out.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let ets = &state.history;
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
        self.pndm_prev(&sample, t, prev_t, &output)
    }

    /// PNDM's `_get_prev_sample`: from `sample` at timestep `t` to `prev_t`.
    fn pndm_prev(&self, sample: &Tensor, t: i64, prev_t: i64, output: &Tensor) -> Result<Tensor> {
        let acp = self.schedule.alphas_cumprod();
        let a_t = acp[t.clamp(0, acp.len() as i64 - 1) as usize];
        let a_prev = if prev_t >= 0 {
            acp[prev_t as usize]
        } else {
            self.schedule.final_alpha_cumprod()
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let output = if self.schedule.config().prediction_type == "v_prediction" {
            combine(a_t.sqrt(), output, b_t.sqrt(), sample)?
        } else {
            output.clone()
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        combine(sample_coeff, sample, -(a_prev - a_t) / denom, &output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known() {
        for k in SamplerKind::ALL {
            assert_eq!(SamplerKind::parse(k.name()).unwrap(), k);
        }
        let e = SamplerKind::parse("lms").unwrap_err().to_string();
        assert!(
            e.contains("unknown scheduler `lms`") && e.contains("dpmpp_2m"),
            "{e}"
        );
        let e = SamplerOptions::parse("pndm", true).unwrap_err().to_string();
        assert!(e.contains("no Karras sigmas"), "{e}");
    }

    #[test]
    fn sigma_to_t_inverts_the_schedule_at_whole_timesteps() {
        let ls: Vec<f32> = (0..10).map(|i| (0.1 * (i + 1) as f32).ln()).collect();
        for (i, l) in ls.iter().enumerate() {
            let t = sigma_to_t((*l as f64).exp(), &ls);
            assert!((t - i as f64).abs() < 1e-5, "{i}: {t}");
        }
        // Between two entries: linear in log-sigma.
        let mid = ((ls[3] as f64 + ls[4] as f64) / 2.0).exp();
        assert!((sigma_to_t(mid, &ls) - 3.5).abs() < 1e-6);
    }
}
