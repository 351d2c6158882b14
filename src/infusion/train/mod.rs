//! Infusion training: learn a concept's Δs from a few images.
//!
//! Each step takes a batch of cached image latents, draws a timestep uniformly over the training
//! timesteps and Gaussian noise, runs F without gradient to get its cross-attention maps, runs C
//! with those maps and V' = V + Δ at the word's positions (both through the one Infusion hook),
//! and takes an AdamW step on the Δs only with loss = MSE(noise, C's prediction). No
//! regularizer. The loop (progress, Ctrl-C, the NaN guard, checkpoints) is the one every method
//! shares ([`crate::train::Trainer`]); [`Deltas`] is Infusion's [`crate::train::Learner`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::infusion::concept::{check, Concept};
use crate::infusion::hook::{eps_pair, SampleEdit};
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
use crate::train::data::mse;
use crate::train::{Batch, Learner, Run, TrainOptions, Trainer, TrainingSet};
use crate::util::tensors::plain_values;

/// The Infusion training loss of one batch: the mean squared error of C's prediction (see
/// [`infusion_eps`]) against `noise`, with the concept's Δs at `positions[row]`. `z0`: scaled
/// clean latents `(b, C, h, w)`.
pub fn infusion_loss(
    sd: &StableDiffusion,
    z0: &Tensor,
    timesteps: &[usize],
    noise: &Tensor,
    context: &Tensor,
    positions: &[&[usize]],
    deltas: &BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    let z_t = sd.scheduler.add_noise(z0, noise, timesteps)?;
    let eps = infusion_eps(sd, &z_t, timesteps, context, positions, deltas)?;
    mse(&eps, noise, None)
}

/// C's noise prediction for noisy latents `z_t` (see [`eps_pair`]), with the concept's Δs at
/// `positions[row]`.
pub fn infusion_eps(
    sd: &StableDiffusion,
    z_t: &Tensor,
    timesteps: &[usize],
    context: &Tensor,
    positions: &[&[usize]],
    deltas: &BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    if positions.len() != z_t.dim(0)? {
        return Err(Error::arg(
            "positions",
            format!(
                "{} position lists for {} latents",
                positions.len(),
                z_t.dim(0)?
            ),
        ));
    }
    let edits: Vec<SampleEdit<'_>> = positions.iter().map(|&p| vec![(p, deltas)]).collect();
    let (_, eps_c) = eps_pair(sd, z_t, timesteps, context, &edits)?;
    Ok(eps_c)
}

/// Infusion's learner: one Δ per cross-attention layer, from zero, with the Infusion loss.
pub struct Deltas {
    vars: BTreeMap<String, Var>,
    zeros: BTreeMap<String, Tensor>,
}

impl Deltas {
    pub fn new(sd: &StableDiffusion) -> Result<Self> {
        let vars = sd
            .unet
            .cross_attention_layers()
            .iter()
            .map(|l| {
                let v = Var::zeros(l.inner_dim(), DType::F32, sd.device())?;
                Ok((l.path.clone(), v))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let zeros = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self { vars, zeros })
    }
}

impl Learner for Deltas {
    fn method(&self) -> &'static str {
        "infusion"
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn initial(&self) -> &BTreeMap<String, Tensor> {
        &self.zeros
    }

    fn loss(
        &self,
        sd: &StableDiffusion,
        data: &TrainingSet,
        batch: &Batch,
        deltas: &BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let z0 = data.latents(sd, batch)?;
        let (ctx, positions) = data.prompts(sd, batch)?;
        let ts: Vec<usize> = batch.draws.iter().map(|d| d.timestep).collect();
        let z_t = sd.scheduler.add_noise(&z0, &batch.noise, &ts)?;
        let eps = infusion_eps(sd, &z_t, &ts, &ctx, &positions, deltas)?;
        mse(&eps, &batch.noise, data.masks(sd, batch)?.as_ref())
    }

    /// The concept file, in f32.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{stem}.safetensors"));
        concept_of(sd, &self.vars, run)?.save(&path, DType::F32)?;
        Ok(path)
    }

    fn read(
        &mut self,
        sd: &StableDiffusion,
        path: &Path,
        job: &Job,
    ) -> Result<BTreeMap<String, Tensor>> {
        let concept = Concept::load(path)?;
        check(&concept, sd, false, job)?;
        Ok(concept.deltas)
    }
}

/// A trainer of an Infusion concept: every Δ from zero.
pub fn trainer<'a>(
    sd: &'a StableDiffusion,
    name: &str,
    word: &str,
    images: &[RgbImage],
    opts: TrainOptions,
) -> Result<Trainer<'a>> {
    Trainer::new(sd, name, word, images, opts, Box::new(Deltas::new(sd)?))
}

/// The concept with the Δs a trainer of [`Deltas`] reached so far.
pub fn concept(trainer: &Trainer<'_>) -> Result<Concept> {
    let method = trainer.method();
    if method != "infusion" {
        return Err(Error::Unsupported(format!(
            "a {method} run makes no Infusion concept"
        )));
    }
    concept_of(trainer.model(), trainer.vars(), &trainer.run_info())
}

fn concept_of(
    sd: &StableDiffusion,
    vars: &BTreeMap<String, Var>,
    run: &Run<'_>,
) -> Result<Concept> {
    let mut c = Concept::zeros(
        run.name,
        run.word,
        &sd.unet.cross_attention_layers(),
        Some(sd.unet_fingerprint().to_string()),
    )?;
    for (k, v) in plain_values(vars)? {
        c.deltas.insert(k, v.to_device(&Device::Cpu)?);
    }
    let o = run.options;
    c.train = serde_json::json!({
        "steps": run.steps,
        "lr": o.lr,
        "batch": o.batch,
        "seed": o.seed,
        "templates": o.templates,
        "flip": o.flip,
        "weight_decay": o.weight_decay,
        "images": run.images,
    });
    Ok(c)
}
