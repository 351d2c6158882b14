//! Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler`: Euler's calls, each step
//! going down past the next sigma and adding fresh noise back up to it.

use candle_core::Tensor;

use super::{euler, Entry, Made, Sampler, Step};
use crate::error::Result;
use crate::sd::scheduler::NoiseSchedule;

pub(super) const ENTRY: Entry = Entry {
    name: "euler_a",
    a1111: "Euler a",
    karras: false,
    noise: true,
    about: "Euler ancestral, fresh noise at each step",
    make,
};

#[derive(Debug)]
struct EulerAncestral<'a> {
    schedule: &'a NoiseSchedule,
}

fn make(schedule: &NoiseSchedule, steps: usize, _karras: bool) -> Result<Made<'_>> {
    Ok(Made::new(
        euler::calls(schedule, steps, false),
        EulerAncestral { schedule },
    ))
}

impl Sampler for EulerAncestral<'_> {
    type State = ();

    fn step(&self, _: &mut (), step: &Step<'_>) -> Result<Tensor> {
        let noise = step.noise(ENTRY.name)?;
        let (from, to) = step.sigmas();
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let x = step.sample;
        let x0 = euler::x0(self.schedule, from, step.output, x)?;
        let derivative = ((x - x0)? / from as f64)?;
        let stepped = (x + (derivative * (down - from) as f64)?)?;
        Ok((stepped + (noise * up as f64)?)?)
    }
}
