//! The samplers users expect, one file each, each as the diffusers scheduler of that name
//! computes it (0.42): DDIM with eta 0 (`DDIMScheduler`, the paper's and the default),
//! DPM-Solver++ 2M and its SDE variant (`DPMSolverMultistepScheduler`), Euler
//! (`EulerDiscreteScheduler`), Euler ancestral (`EulerAncestralDiscreteScheduler`) and PNDM
//! (`PNDMScheduler`), with Karras sigmas where diffusers offers them. Each reads the model's
//! scheduler config as `Scheduler.from_config(pipe.scheduler.config)` would: the noise schedule,
//! `timestep_spacing`, `steps_offset`, `prediction_type`, and PNDM's `skip_prk_steps`.
//!
//! A sampler is a [`Sampler`]: made for one run's number of steps by its registry [`Entry`], it
//! says where the UNet is called ([`Calls`]: the timestep of each call, the sigmas, how the input
//! and the initial noise are scaled) and moves one trajectory per call, keeping what a multistep
//! method remembers in its own per-trajectory state. A [`Plan`] is one run's sampler behind one
//! type; a [`SamplerState`] is one trajectory's memory, so trajectories denoised side by side (F
//! and C) keep their own histories under one plan.
//!
//! Adding a sampler is a file here and a line in [`ENTRIES`]; the contract test
//! (tests/integration/samplers.rs) then holds it to what every sampler must do, and to diffusers'
//! trajectory of the same name in the committed fixtures.

mod common;
mod ddim;
mod dpmpp_2m;
mod dpmpp_2m_sde;
mod euler;
mod euler_ancestral;
mod pndm;

use std::any::Any;
use std::fmt;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::sd::scheduler::NoiseSchedule;

/// Where one run calls the UNet: what every sampler's plan gives the denoising loop.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    /// The UNet's timestep at each call, from the noisiest (fractional for Euler with Karras
    /// sigmas).
    pub timesteps: Vec<f64>,
    /// Samplers that work in sigma space: the sigma of each call, then the final one (0).
    /// Empty for the others.
    pub sigmas: Vec<f32>,
    /// What the initial standard-normal noise is multiplied by.
    pub init_noise_sigma: f64,
    /// What the UNet's input is divided by at each call (Euler: `sqrt(sigma^2 + 1)`); empty when
    /// the input goes in as it is.
    pub input_divisors: Vec<f64>,
}

impl Calls {
    /// Calls at `timesteps` with the sample as the UNet's input and unscaled initial noise.
    fn at(timesteps: Vec<f64>) -> Self {
        Self {
            timesteps,
            init_noise_sigma: 1.0,
            ..Default::default()
        }
    }
}

/// One sampler call: the (guided) model output for the trajectory's sample, in f32.
pub struct Step<'t> {
    /// The call's index in [`Calls::timesteps`].
    pub index: usize,
    pub calls: &'t Calls,
    pub output: &'t Tensor,
    pub sample: &'t Tensor,
    noise: Option<&'t Tensor>,
}

impl Step<'_> {
    /// The sigma of this call and of the next one.
    fn sigmas(&self) -> (f32, f32) {
        (
            self.calls.sigmas[self.index],
            self.calls.sigmas[self.index + 1],
        )
    }

    /// Whether this is the run's last call.
    fn is_last(&self) -> bool {
        self.index + 1 == self.calls.timesteps.len()
    }

    /// This call's fresh standard-normal noise (samplers whose [`Entry::noise`] is set).
    fn noise(&self, sampler: &str) -> Result<Tensor> {
        let noise = self.noise.ok_or_else(|| {
            Error::Internal(format!(
                "the {sampler} sampler was called without its step's noise"
            ))
        })?;
        Ok(noise.to_dtype(DType::F32)?)
    }
}

/// One sampler, made for one run: how a call's model output moves a trajectory.
pub trait Sampler: fmt::Debug + Send + Sync {
    /// What the sampler remembers of one trajectory between calls (`()` for single-step ones).
    type State: Default + Send + 'static;

    /// The sample after `step`, from its sample and model output (both f32).
    fn step(&self, state: &mut Self::State, step: &Step<'_>) -> Result<Tensor>;
}

/// A sampler behind one type: its state kept as [`SamplerState`].
trait AnySampler: fmt::Debug + Send + Sync {
    fn step_any(&self, state: &mut SamplerState, step: &Step<'_>) -> Result<Tensor>;
}

impl<S: Sampler> AnySampler for S {
    fn step_any(&self, state: &mut SamplerState, step: &Step<'_>) -> Result<Tensor> {
        let state = state
            .0
            .get_or_insert_with(|| Box::new(S::State::default()))
            .downcast_mut::<S::State>()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "a trajectory's sampler state was made by another sampler than {self:?}"
                ))
            })?;
        self.step(state, step)
    }
}

/// A sampler made for a run: where it calls the UNet and how it steps.
pub struct Made<'a> {
    calls: Calls,
    sampler: Box<dyn AnySampler + 'a>,
}

impl<'a> Made<'a> {
    fn new(calls: Calls, sampler: impl Sampler + 'a) -> Self {
        Self {
            calls,
            sampler: Box::new(sampler),
        }
    }
}

/// One registered sampler.
#[derive(Clone, Copy)]
pub struct Entry {
    /// The name `--scheduler` and the `scheduler` option take.
    pub name: &'static str,
    /// The name AUTOMATIC1111's web UI gives it in its PNG `parameters`.
    pub a1111: &'static str,
    /// Whether it takes Karras et al.'s sigma spacing (as diffusers' `use_karras_sigmas`).
    pub karras: bool,
    /// Whether each call adds fresh standard-normal noise (ancestral and SDE samplers).
    pub noise: bool,
    /// One line for the help.
    pub about: &'static str,
    /// Makes it for `steps` inference steps over `schedule`, with Karras sigmas or not (checked
    /// against [`Entry::karras`] before).
    make: for<'a> fn(&'a NoiseSchedule, usize, bool) -> Result<Made<'a>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Every sampler, the default first, in the order the help lists them.
const ENTRIES: [Entry; 6] = [
    ddim::ENTRY,
    dpmpp_2m::ENTRY,
    dpmpp_2m_sde::ENTRY,
    euler::ENTRY,
    euler_ancestral::ENTRY,
    pndm::ENTRY,
];

/// [`ENTRIES`] at one address, for [`SamplerKind`] to point into.
static REGISTRY: [Entry; ENTRIES.len()] = ENTRIES;

const fn names<const N: usize>(entries: &[Entry; N]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = entries[i].name;
        i += 1;
    }
    out
}

/// Which sampler: one of the registry's.
#[derive(Clone, Copy)]
pub struct SamplerKind(&'static Entry);

impl SamplerKind {
    /// The names `scheduler` options take.
    pub const NAMES: [&'static str; ENTRIES.len()] = names(&ENTRIES);

    /// Every sampler.
    pub fn all() -> impl Iterator<Item = SamplerKind> {
        REGISTRY.iter().map(SamplerKind)
    }

    /// The kind called `name` (one of [`SamplerKind::NAMES`]).
    pub fn parse(name: &str) -> Result<Self> {
        Self::all().find(|k| k.name() == name).ok_or_else(|| {
            Error::arg(
                "scheduler",
                format!(
                    "unknown scheduler `{name}` (known: {})",
                    Self::NAMES.join(", ")
                ),
            )
        })
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Its registry entry: what diffusers calls it, what it takes.
    pub fn entry(self) -> &'static Entry {
        self.0
    }

    /// One line per sampler for the help: `name: what it is`.
    pub fn help() -> String {
        Self::all()
            .map(|k| format!("{}: {}", k.name(), k.0.about))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The names of the samplers that take Karras sigmas.
    pub fn karras_names() -> String {
        Self::all()
            .filter(|k| k.offers_karras())
            .map(SamplerKind::name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether diffusers' scheduler of this kind takes `use_karras_sigmas`.
    pub fn offers_karras(self) -> bool {
        self.0.karras
    }

    /// Whether each step adds fresh noise (ancestral and SDE sampling).
    pub fn needs_noise(self) -> bool {
        self.0.noise
    }
}

impl Default for SamplerKind {
    fn default() -> Self {
        SamplerKind(&REGISTRY[0])
    }
}

impl PartialEq for SamplerKind {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for SamplerKind {}

impl fmt::Debug for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
                    "the {} scheduler has no Karras sigmas (diffusers offers them for {})",
                    self.kind.name(),
                    SamplerKind::karras_names()
                ),
            ));
        }
        Ok(())
    }

    /// The name AUTOMATIC1111's web UI gives this sampler in its PNG `parameters`.
    pub fn a1111_name(&self) -> String {
        let base = self.kind.entry().a1111;
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

/// One run's sampler: where it calls the UNet and how it steps.
pub struct Plan<'a> {
    options: SamplerOptions,
    calls: Calls,
    sampler: Box<dyn AnySampler + 'a>,
}

impl fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("options", &self.options)
            .field("calls", &self.calls)
            .finish()
    }
}

/// What a sampler remembers of one trajectory between steps (made at its first step).
#[derive(Default)]
pub struct SamplerState(Option<Box<dyn Any + Send>>);

impl<'a> Plan<'a> {
    /// The plan for `steps` inference steps of `options` over `schedule`.
    pub fn new(schedule: &'a NoiseSchedule, options: SamplerOptions, steps: usize) -> Result<Self> {
        let t_total = schedule.num_train_timesteps();
        if steps == 0 || steps > t_total {
            return Err(Error::arg(
                "steps",
                format!("{steps}: the scheduler has {t_total} timesteps, so 1 to {t_total} denoising steps"),
            ));
        }
        options.check()?;
        let Made { calls, sampler } = (options.kind.entry().make)(schedule, steps, options.karras)?;
        if let Some(bad) = calls
            .timesteps
            .iter()
            .find(|&&t| !(0.0..t_total as f64).contains(&t))
        {
            return Err(Error::arg(
                "steps",
                format!(
                    "{steps} steps of the {} scheduler with timestep_spacing `{}` reach \
                     timestep {bad}, outside 0..{t_total}",
                    options.kind.name(),
                    schedule.config().timestep_spacing
                ),
            ));
        }
        Ok(Self {
            options,
            calls,
            sampler,
        })
    }

    pub fn options(&self) -> SamplerOptions {
        self.options
    }

    /// The UNet's timestep at each call, from the noisiest.
    pub fn timesteps(&self) -> &[f64] {
        &self.calls.timesteps
    }

    /// The number of UNet calls (PNDM makes more than the steps asked).
    pub fn len(&self) -> usize {
        self.calls.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.timesteps.is_empty()
    }

    /// Samplers in sigma space: the sigma of each call, then the final one (0).
    pub fn sigmas(&self) -> &[f32] {
        &self.calls.sigmas
    }

    /// What the initial standard-normal noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        self.calls.init_noise_sigma
    }

    /// The UNet's input at call `index`.
    pub fn scale_input(&self, index: usize, sample: &Tensor) -> Result<Tensor> {
        Ok(match self.calls.input_divisors.get(index) {
            Some(&d) => (sample / d)?,
            None => sample.clone(),
        })
    }

    /// A fresh state for one trajectory.
    pub fn state(&self) -> SamplerState {
        SamplerState::default()
    }

    /// One step at call `index` from `sample` with the (guided) model output. `noise`: the
    /// call's standard-normal noise, which the samplers that need it ([`SamplerKind::needs_noise`])
    /// take. Computes in f32 and returns f32.
    pub fn step(
        &self,
        state: &mut SamplerState,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if index >= self.len() {
            return Err(Error::Internal(format!(
                "sampler call {index} of a {}-call plan",
                self.len()
            )));
        }
        let output = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let step = Step {
            index,
            calls: &self.calls,
            output: &output,
            sample: &sample,
            noise,
        };
        self.sampler.step_any(state, &step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known() {
        for k in SamplerKind::all() {
            assert_eq!(SamplerKind::parse(k.name()).unwrap(), k);
        }
        assert_eq!(SamplerKind::NAMES.len(), SamplerKind::all().count());
        assert_eq!(SamplerKind::default().name(), "ddim");
        let e = SamplerKind::parse("lms").unwrap_err().to_string();
        assert!(
            e.contains("unknown scheduler `lms`") && e.contains("dpmpp_2m_sde"),
            "{e}"
        );
        let e = SamplerOptions::parse("pndm", true).unwrap_err().to_string();
        assert!(
            e.contains("no Karras sigmas") && e.contains("dpmpp_2m, dpmpp_2m_sde, euler"),
            "{e}"
        );
    }
}
