//! Latent Fisher divergence (the paper's concept-agnostic overfitting measure, its Definition
//! 3.1): half the mean over prompts, clean latents, uniform timesteps and noise of
//! ||eps_a(z_t, t, c) - eps_b(z_t, t, c)||² between two variants of a model,
//! `D = 1/2 E ||eps_a - eps_b||²`.
//!
//! A variant is the base model, the base model with concepts applied to its prompts (Infusion:
//! F's maps, Δ on the concept words' values; a learned word in C's text; a LoRA on C's
//! attention), or the base model with other UNet weights (to compare with methods that
//! fine-tune the UNet). Prompts without concept marks run the plain
//! base model in the concept variant, so base vs base+concepts is exactly 0 on them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::customize::eps::{custom_eps, Apply};
use crate::customize::set::ConceptSet;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::device::ensure_fits;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::sd::unet::UNet;
use crate::util::image_io::{image_to_tensor, square_crop};
use crate::util::noise::normal;

/// One side of the comparison.
pub enum Variant<'a> {
    Base,
    Concepts(&'a ConceptSet),
    /// The concepts, and their changes to the model on prompts that do not name them too (a
    /// LoRA's, Custom Diffusion's or Perfusion's edits, a DreamBooth UNet): the customized
    /// model the paper measures on prompts without the concept. Learned words and Infusion's
    /// residuals act only where named, so they change nothing there.
    Everywhere(&'a ConceptSet),
    /// The base model with these UNet weights instead.
    Weights(&'a UNet),
}

#[derive(Debug, Clone)]
pub struct FisherOptions {
    pub samples: usize,
    pub seed: u64,
    pub batch: usize,
    /// Clean images to noise (their VAE latents); none: latents the base model generates from
    /// each prompt (one per prompt, `gen_steps` DDIM steps).
    pub images: Vec<RgbImage>,
    pub gen_steps: usize,
}

impl Default for FisherOptions {
    fn default() -> Self {
        Self {
            samples: 64,
            seed: 0,
            batch: 4,
            images: vec![],
            gen_steps: 25,
        }
    }
}

/// One sample: a prompt (as written), a timestep and the noisy latent `(1, C, h, w)`.
#[derive(Debug, Clone)]
pub struct FisherSample {
    pub prompt: String,
    pub timestep: usize,
    pub z_t: Tensor,
}

/// The divergence: mean, its standard error, the per-sample values (each `1/2 ||eps_a -
/// eps_b||²`).
#[derive(Debug, Clone, Serialize)]
pub struct Fisher {
    pub mean: f64,
    pub std_err: f64,
    pub samples: usize,
    pub values: Vec<f64>,
}

/// The samples the divergence averages over (deterministic for a seed).
pub fn fisher_inputs(
    sd: &StableDiffusion,
    concepts: Option<&ConceptSet>,
    prompts: &[String],
    opts: &FisherOptions,
    job: &Job,
) -> Result<Vec<FisherSample>> {
    if prompts.is_empty() {
        return Err(Error::arg("prompts", "no prompts"));
    }
    if opts.samples == 0 {
        return Err(Error::arg("samples", "must be at least 1"));
    }
    if opts.batch == 0 {
        return Err(Error::arg("batch", "must be at least 1"));
    }
    let dev = sd.device();
    // Every sample's noisy latent is kept; each batch is two UNet calls.
    let latent = sd.latent_bytes();
    ensure_fits(
        "samples",
        &format!("{} Fisher samples", opts.samples),
        opts.samples as u128 * latent * 2,
        dev,
    )?;
    let size = sd.default_size();
    ensure_fits(
        "batch",
        &format!("a Fisher batch of {}", opts.batch),
        sd.unet_call_bytes(opts.batch, sd.latent_size(size, size)?) * 2,
        dev,
    )?;
    let empty = ConceptSet::new();
    let concepts = concepts.unwrap_or(&empty);
    let clean: Vec<Tensor> = if opts.images.is_empty() {
        let mut out = vec![];
        for (i, p) in prompts.iter().enumerate() {
            let base = concepts.parse(p)?.base;
            let g = sd.generate(
                &base,
                &GenerateOptions {
                    seed: opts.seed.wrapping_add(i as u64),
                    steps: opts.gen_steps,
                    ..Default::default()
                },
                job,
            )?;
            out.push(g.latents);
        }
        out
    } else {
        let size = sd.default_size() as u32;
        opts.images
            .iter()
            .map(|img| sd.encode_mean(&image_to_tensor(&square_crop(img, size), sd.device())?))
            .collect::<Result<_>>()?
    };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(7);
    let t_max = sd.scheduler.num_train_timesteps();
    (0..opts.samples)
        .map(|i| {
            let z0 = &clean[i % clean.len()];
            let timestep = rng.random_range(0..t_max);
            let noise = normal(&mut rng, z0.dims(), sd.device())?;
            let z_t = sd
                .scheduler
                .add_noise(&z0.to_dtype(DType::F32)?, &noise, &[timestep])?;
            Ok(FisherSample {
                prompt: prompts[i % prompts.len()].clone(),
                timestep,
                z_t,
            })
        })
        .collect()
}

/// The noise prediction of a variant on a batch of samples.
fn eps(
    sd: &StableDiffusion,
    variant: &Variant<'_>,
    batch: &[FisherSample],
    marks_from: &ConceptSet,
) -> Result<Tensor> {
    let rows: Vec<(&str, &Tensor, usize)> = batch
        .iter()
        .map(|s| (s.prompt.as_str(), &s.z_t, s.timestep))
        .collect();
    match variant {
        Variant::Base => custom_eps(sd, &sd.unet, marks_from, &rows, Apply::Plain),
        Variant::Weights(unet) => custom_eps(sd, unet, marks_from, &rows, Apply::Plain),
        Variant::Concepts(set) => custom_eps(sd, &sd.unet, set, &rows, Apply::Named),
        Variant::Everywhere(set) => custom_eps(sd, &sd.unet, set, &rows, Apply::Everywhere),
    }
}

/// The latent Fisher divergence between variants `a` and `b` of `sd` over `prompts`.
pub fn fisher_divergence(
    sd: &StableDiffusion,
    a: &Variant<'_>,
    b: &Variant<'_>,
    prompts: &[String],
    opts: &FisherOptions,
    job: &Job,
) -> Result<Fisher> {
    let empty = ConceptSet::new();
    let marks_from = match (a, b) {
        (Variant::Concepts(s), _)
        | (_, Variant::Concepts(s))
        | (Variant::Everywhere(s), _)
        | (_, Variant::Everywhere(s)) => *s,
        _ => &empty,
    };
    let inputs = fisher_inputs(sd, Some(marks_from), prompts, opts, job)?;
    let bar = job.bar(inputs.len(), "fisher");
    let mut values = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(opts.batch.max(1)) {
        job.check()?;
        let ea = eps(sd, a, chunk, marks_from)?.to_dtype(DType::F32)?;
        let eb = eps(sd, b, chunk, marks_from)?.to_dtype(DType::F32)?;
        let per_row: Vec<f32> = (ea - eb)?
            .sqr()?
            .flatten_from(1)?
            .sum(1)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        // Definition 3.1's factor 1/2.
        values.extend(per_row.into_iter().map(|v| 0.5 * f64::from(v)));
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let (mean, std_err) = super::mean_se(&values);
    Ok(Fisher {
        mean,
        std_err,
        samples: values.len(),
        values,
    })
}

/// Reads a UNet weight file for [`Variant::Weights`].
pub fn unet_from_file(sd: &StableDiffusion, path: &Path) -> Result<UNet> {
    sd.unet_from_files(&[path.to_path_buf()])
}
