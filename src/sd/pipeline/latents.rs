//! Prepare latents: the initial noise of a generation (seeded, or given and checked), and each
//! sampler call's noise for the samplers that add it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{GenerateOptions, StableDiffusion};
use crate::error::{Error, Result};
use crate::sd::weights::load_safetensors;

impl StableDiffusion {
    /// Initial latents for `opts`: the given noise (checked) or seeded noise.
    pub fn initial_latents(&self, opts: &GenerateOptions) -> Result<Tensor> {
        let (h, w) = self.check_generate(opts, 2)?;
        let c = self.unet.config().in_channels;
        let noise = match &opts.noise {
            Some(n) => {
                let n = if n.rank() == 3 {
                    n.unsqueeze(0)?
                } else {
                    n.clone()
                };
                if n.dims() != [1, c, h, w] {
                    return Err(Error::arg(
                        "noise",
                        format!(
                            "shape {:?} does not fit the image size: expected [1, {c}, {h}, {w}]",
                            n.dims()
                        ),
                    ));
                }
                n
            }
            None => crate::util::noise::seeded_noise(opts.seed, &[1, c, h, w])?,
        };
        Ok(noise.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
}

/// Each sampler call's noise for the samplers that add noise (ancestral, SDE): the given `step_noise`, or standard-normal
/// draws from the generation's seed, one per sample index and call. Sample `s` draws from its
/// own stream (`1 + s`; the initial noise is stream 0), so trajectories of the same sample (F
/// and C) get the same noise, whatever else is in the batch.
pub(super) struct StepNoise<'a> {
    given: Option<&'a Tensor>,
    seed: u64,
    rngs: Vec<(usize, rand_chacha::ChaCha8Rng)>,
    drawn: Vec<(usize, usize, Tensor)>,
    wanted: bool,
}

impl<'a> StepNoise<'a> {
    pub(super) fn new(opts: &'a GenerateOptions, wanted: bool) -> Self {
        Self {
            given: opts.step_noise.as_ref(),
            seed: opts.seed,
            rngs: vec![],
            drawn: vec![],
            wanted,
        }
    }

    /// The noise of call `index` for `sample`, shaped and placed like `like`.
    pub(super) fn get(
        &mut self,
        index: usize,
        sample: usize,
        like: &Tensor,
    ) -> Result<Option<Tensor>> {
        if !self.wanted {
            return Ok(None);
        }
        if let Some(given) = self.given {
            return Ok(Some(
                given
                    .get(index)?
                    .unsqueeze(0)?
                    .to_device(like.device())?
                    .to_dtype(like.dtype())?,
            ));
        }
        if let Some((_, _, n)) = self
            .drawn
            .iter()
            .find(|(i, s, _)| *i == index && *s == sample)
        {
            return Ok(Some(n.clone()));
        }
        self.drawn.retain(|(i, _, _)| *i == index);
        let rng = match self.rngs.iter().position(|(s, _)| *s == sample) {
            Some(i) => &mut self.rngs[i].1,
            None => {
                use rand::SeedableRng;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(1 + sample as u64);
                self.rngs.push((sample, rng));
                &mut self.rngs.last_mut().expect("just pushed").1
            }
        };
        let n = crate::util::noise::normal(rng, like.dims(), &Device::Cpu)?
            .to_device(like.device())?
            .to_dtype(like.dtype())?;
        self.drawn.push((index, sample, n.clone()));
        Ok(Some(n))
    }
}

/// Reads initial noise from a safetensors file: the tensor named `noise`.
pub fn load_noise(path: &Path) -> Result<Tensor> {
    let mut tensors = load_safetensors(path, &Device::Cpu)?;
    let n = tensors.remove("noise").ok_or_else(|| Error::Safetensors {
        path: path.to_path_buf(),
        msg: format!(
            "no tensor named `noise` (found: {})",
            tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    })?;
    Ok(n.to_dtype(DType::F32)?)
}
