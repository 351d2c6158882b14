//! What the methods' files share: the DDPM loss of the plain model (with a method's text
//! states, hook or UNet), the one-word trigger rule, where a run's concept comes from, and the
//! error of another method's checkpoint.

use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::sd::hook::{AttentionHook, AttnSite, BatchLayout, Branch, Guidance, HookCtx};
use crate::sd::pipeline::StableDiffusion;
use crate::sd::unet::UNet;
use crate::train::{Batch, Run, TrainingSet};

/// The DDPM loss of `batch` with text states `states` `(b, tokens, width)` and an optional hook
/// on every row, through `unet` (the model's own unless a method trains a copy). Where the data
/// masks the loss (Custom Diffusion's scale augmentation), it is the script's masked form:
/// each row's squared error summed over channels and pixels inside its mask, divided by the
/// mask's pixels, averaged over rows.
pub fn ddpm_loss(
    sd: &StableDiffusion,
    unet: &UNet,
    data: &TrainingSet,
    batch: &Batch,
    states: &Tensor,
    hook: Option<&dyn AttentionHook>,
) -> Result<Tensor> {
    let z0 = data.latents(sd, batch)?;
    let ts: Vec<usize> = batch.draws.iter().map(|d| d.timestep).collect();
    let z_t = sd.scheduler.add_noise(&z0, &batch.noise, &ts)?;
    let t = Tensor::new(
        ts.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        sd.device(),
    )?;
    let rows = BatchLayout::uniform(batch.len(), Branch(1), Guidance::Conditional);
    let ctx = hook.map(|hook| HookCtx {
        hook,
        rows: &rows,
        step: None,
    });
    let pred = unet.forward(
        &z_t.to_dtype(sd.dtype())?,
        &t,
        &states.to_dtype(sd.dtype())?,
        ctx.as_ref(),
    )?;
    crate::train::data::mse(&pred, &batch.noise, data.masks(sd, batch)?.as_ref())
}

/// A hook's `new` projection in place of `output` on the rows of `branch` (on every row
/// without one).
pub fn on_branch(
    site: &AttnSite<'_>,
    branch: Option<Branch>,
    output: Tensor,
    new: Tensor,
) -> candle_core::Result<Tensor> {
    match branch {
        Some(branch) => {
            let mask = site.rows.branch_mask(branch, &new)?;
            output.broadcast_mul(&(1.0 - &mask)?)? + new.broadcast_mul(&mask)?
        }
        None => Ok(new),
    }
}

/// A trigger (DreamBooth's identifier, "sks") is one word.
pub fn check_trigger(trigger: &str) -> Result<()> {
    if trigger.trim().is_empty() || trigger.contains(char::is_whitespace) {
        return Err(Error::arg(
            "trigger",
            format!("{trigger:?}: the identifier is one word (DreamBooth's \"sks\")"),
        ));
    }
    Ok(())
}

/// Where a concept came from, when known: the model it was trained on and for how long.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    /// The fingerprint of that model's UNet.
    pub base_model: Option<String>,
    pub train_steps: Option<usize>,
}

impl Origin {
    /// Where a run's concept comes from: `sd`'s UNet, `run.steps` steps.
    pub fn of_run(sd: &StableDiffusion, run: &Run<'_>) -> Self {
        Self {
            base_model: Some(sd.unet_fingerprint().to_string()),
            train_steps: Some(run.steps),
        }
    }

    /// What a file records.
    pub fn recorded(p: &super::Provenance) -> Self {
        Self {
            base_model: p.base_model.clone(),
            train_steps: p.train_steps,
        }
    }

    /// Warns when it records a base model other than `sd`'s (a LoRA or an embedding often works
    /// on a relative of its model, so this is no error).
    pub fn warn_other_model(&self, name: &str, sd: &StableDiffusion, job: &crate::job::Job) {
        if let Some(base) = self
            .base_model
            .as_deref()
            .filter(|b| *b != sd.unet_fingerprint())
        {
            job.warn(format!(
                "<{name}> was trained on another model ({base}, this one is {}): its results \
                 may differ",
                sd.unet_fingerprint()
            ));
        }
    }
}

/// The error of a checkpoint file of another method.
pub fn not_a(path: &Path, what: &str) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: format!("not a {what} (another method's checkpoint?)"),
    }
}

/// The name (the request's, else `default_name`) and the class word (the request's, else the
/// one the file records, else none: an error) of a concept file, both checked.
pub fn name_and_word(
    req: &super::ConceptRequest,
    default_name: String,
    recorded_word: Option<&str>,
) -> Result<(String, String)> {
    use crate::util::names::{check_name, check_word};
    let name = req.name.clone().unwrap_or(default_name);
    check_name(&name)?;
    let word = req
        .word
        .clone()
        .or_else(|| recorded_word.map(str::to_string))
        .ok_or_else(|| {
            Error::arg(
                "word",
                format!(
                    "{} holds no class word: say which word F sees in place of <{name}> \
                     (--concept FILE:WORD, or load_concept(path, #{{word: \"cat\"}}))",
                    req.path.display()
                ),
            )
        })?;
    check_word(&word)?;
    Ok((name, word))
}

/// A check's argument error, as an error about the file.
pub fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::InvalidArgument { msg, .. } | Error::Unsupported(msg) => Error::Config {
            path: path.to_path_buf(),
            msg,
        },
        e => e,
    }
}
