//! DPM-Solver++ 2M SDE, as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="sde-dpmsolver++"` (solver order 2, midpoint, a zero final sigma): DPM++ 2M's
//! calls, each step a stochastic one that adds fresh noise (A1111's and ComfyUI's
//! "DPM++ 2M SDE", Karras sigmas as an option).

use candle_core::Tensor;

use super::common::combine;
use super::dpmpp_2m::{self, Quantities};
use super::{Entry, Made, Sampler, Step};
use crate::error::Result;
use crate::sd::scheduler::NoiseSchedule;

pub(super) const ENTRY: Entry = Entry {
    name: "dpmpp_2m_sde",
    a1111: "DPM++ 2M SDE",
    karras: true,
    noise: true,
    about: "DPM-Solver++ 2M SDE, fresh noise at each step",
    make,
};

#[derive(Debug)]
struct DpmPP2MSde<'a> {
    schedule: &'a NoiseSchedule,
}

fn make(schedule: &NoiseSchedule, steps: usize, karras: bool) -> Result<Made<'_>> {
    Ok(Made::new(
        dpmpp_2m::calls(schedule, steps, karras),
        DpmPP2MSde { schedule },
    ))
}

impl Sampler for DpmPP2MSde<'_> {
    /// The previous call's data prediction.
    type State = Option<Tensor>;

    fn step(&self, previous: &mut Option<Tensor>, step: &Step<'_>) -> Result<Tensor> {
        let noise = step.noise(ENTRY.name)?;
        let q = Quantities::of(self.schedule, step)?;
        let decay = (-q.h).exp();
        let data = q.alpha_t * (1.0 - (-2.0 * q.h).exp());
        let spread = q.sigma_t * (1.0 - (-2.0 * q.h).exp()).sqrt();
        let first = combine(q.sigma_t / q.sigma_s0 * decay, step.sample, data, &q.x0)?;
        let deterministic = match q.d1(previous.as_ref(), step)? {
            Some(d1) => (first + (d1 * (0.5 * data) as f64)?)?,
            None => first,
        };
        *previous = Some(q.x0);
        Ok((deterministic + (noise * spread as f64)?)?)
    }
}
