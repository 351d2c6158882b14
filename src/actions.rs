//! One library call per user action, shared by the command line and the scripts, so that both
//! behave the same: loading a model (or the bundled one), training a concept from a folder (with
//! one rule for where checkpoints go). Generating is [`generate_infusion`] itself, and loading a
//! concept file [`ConceptSet::load_file`].
//!
//! [`generate_infusion`]: crate::infusion::generate::generate_infusion
//! [`ConceptSet::load_file`]: crate::infusion::concept::ConceptSet::load_file

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::infusion::concept::Concept;
use crate::infusion::train::{image_count_warning, TrainOptions, TrainReport, Trainer};
use crate::job::Job;
use crate::sd::device::{parse_device, parse_dtype};
use crate::sd::pipeline::{LoadOptions, StableDiffusion};
use crate::util::fs::check_writable;
use crate::util::image_io::load_folder_images;

/// A loaded model and what it was loaded from.
pub struct LoadedModel {
    pub sd: StableDiffusion,
    /// The folder or repo id given, or `bundled tiny model`.
    pub source: String,
}

/// What to load, as the user wrote it.
#[derive(Debug, Clone, Default)]
pub struct ModelRequest {
    /// A diffusers folder, a repo id in the Hugging Face cache, or a single checkpoint file;
    /// `None`: the bundled tiny model.
    pub model: Option<String>,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// `f32`, `f16`, `bf16` (and their aliases).
    pub dtype: String,
    /// A diffusers folder whose configs describe a single-file checkpoint.
    pub config: Option<String>,
    /// Another VAE (a diffusers folder or a safetensors file).
    pub vae: Option<String>,
    /// Single-file checkpoints: the EMA copy of the UNet (`Some(true)`), the plain weights
    /// (`Some(false)`), or the EMA copy when there is one (`None`).
    pub ema: Option<bool>,
}

/// Loads the model `req` names; without a model, the bundled tiny one with random weights, and
/// a note that says so. Says what loading chose on the user's behalf (EMA weights, another VAE).
pub fn load_model(req: &ModelRequest, job: &Job) -> Result<LoadedModel> {
    let opts = LoadOptions {
        device: parse_device(&req.device)?,
        dtype: parse_dtype(&req.dtype)?,
        config: req.config.as_ref().map(PathBuf::from),
        vae: req.vae.as_ref().map(PathBuf::from),
        ema: req.ema,
    };
    let loaded = match &req.model {
        Some(spec) => LoadedModel {
            sd: StableDiffusion::load(spec, &opts)?,
            source: spec.to_string(),
        },
        None => {
            let dir = crate::assets::tiny_sd();
            job.note(format!(
                "no model given: using the bundled tiny model with random weights ({})",
                dir.display()
            ));
            LoadedModel {
                sd: StableDiffusion::load_dir(&dir, &opts)?,
                source: "bundled tiny model".to_string(),
            }
        }
    };
    for note in loaded.sd.notes() {
        job.note(note.clone());
    }
    Ok(loaded)
}

/// Saves `concept` at `out`; when that fails after all (the disk filled up, the folder went
/// away), saves it in `rescue_dir` (the working folder) under a new name instead and says so.
/// Returns where it is.
fn save_or_rescue(
    concept: &Concept,
    out: &Path,
    f32: bool,
    rescue_dir: &Path,
    job: &Job,
) -> Result<PathBuf> {
    let dtype = if f32 { DType::F32 } else { DType::F16 };
    let Err(e) = concept.save(out, dtype) else {
        return Ok(out.to_path_buf());
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rescue = (0..100)
        .map(|i| rescue_dir.join(format!("{}-rescued-{secs}-{i}.safetensors", concept.name)))
        .find(|p| !p.exists())
        .unwrap_or_else(|| rescue_dir.join(format!("{}-rescued.safetensors", concept.name)));
    match concept.save(&rescue, dtype) {
        Ok(()) => {
            job.warn(format!(
                "could not write the concept: {e}; it is saved as {} instead",
                rescue.display()
            ));
            Ok(rescue)
        }
        Err(e2) => Err(Error::io(
            out,
            std::io::Error::other(format!(
                "the concept could not be saved ({e}), nor as {} ({e2})",
                rescue.display()
            )),
        )),
    }
}

/// What to train: a concept from a folder of images.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub folder: PathBuf,
    pub name: String,
    /// The class word.
    pub word: String,
    /// `checkpoint_dir` `None` with `checkpoint_every` set: see [`TrainRequest::checkpoint_dir`].
    pub options: TrainOptions,
    /// Continue from this checkpoint (its settings; `options.steps` is the new total).
    pub resume: Option<PathBuf>,
    /// Where to save the concept (f16, or f32 with `save_f32`); `None`: not saved.
    pub out: Option<PathBuf>,
    pub save_f32: bool,
}

impl TrainRequest {
    /// Where checkpoints go: the folder asked for, else `NAME-checkpoints/` beside the output
    /// (in the working folder when nothing is saved).
    pub fn checkpoint_dir(&self) -> PathBuf {
        if let Some(dir) = &self.options.checkpoint_dir {
            return dir.clone();
        }
        let folder = format!("{}-checkpoints", self.name);
        match self.out.as_deref().and_then(Path::parent) {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join(folder),
            _ => PathBuf::from(folder),
        }
    }
}

/// How a training run ended.
#[derive(Debug)]
pub enum TrainEnd {
    Finished,
    /// Ctrl-C: stopped early, the Δs reached are kept.
    Cancelled,
    /// The run failed (a non-finite loss, a checkpoint that cannot be written): the Δs of the
    /// last good step are kept.
    Failed(Error),
}

/// What a training run gives: the concept reached whatever happened, and where it was saved.
#[derive(Debug)]
pub struct Trained {
    pub concept: Concept,
    pub end: TrainEnd,
    pub steps_done: usize,
    pub losses: Vec<f32>,
    pub checkpoints: Vec<PathBuf>,
    pub saved: Option<PathBuf>,
}

/// Trains a concept from a folder: loads its images (warning outside 3-20), trains (or resumes)
/// with a progress bar, and saves the concept reached, whether the run finished, was cancelled
/// or failed. An error here means nothing was trained (bad images, options, checkpoint).
pub fn train_concept(sd: &StableDiffusion, req: &TrainRequest, job: &Job) -> Result<Trained> {
    // Where the concept goes is checked before the first step, not found wrong after the last.
    if let Some(out) = &req.out {
        check_writable(out)?;
    }
    let images = load_folder_images(&req.folder, job)?;
    if let Some(w) = image_count_warning(images.len(), &req.folder) {
        job.warn(w);
    }
    let mut trainer = match &req.resume {
        Some(ckpt) => Trainer::resume(sd, ckpt, &images, Some(req.options.steps), job)?,
        None => {
            let mut options = req.options.clone();
            if options.checkpoint_every.is_some() {
                options.checkpoint_dir = Some(req.checkpoint_dir());
            }
            Trainer::new(sd, &req.name, &req.word, &images, options)?
        }
    };
    let (end, report) = match trainer.run(job) {
        Ok(r) if r.cancelled => (TrainEnd::Cancelled, Some(r)),
        Ok(r) => (TrainEnd::Finished, Some(r)),
        Err(e) => (TrainEnd::Failed(e), None),
    };
    let concept = trainer.concept()?;
    let saved = match &req.out {
        Some(out) => Some(save_or_rescue(
            &concept,
            out,
            req.save_f32,
            Path::new("."),
            job,
        )?),
        None => None,
    };
    let TrainReport {
        losses,
        checkpoints,
        ..
    } = report.unwrap_or(TrainReport {
        steps_done: trainer.steps_done(),
        losses: vec![],
        cancelled: false,
        checkpoints: vec![],
    });
    Ok(Trained {
        concept,
        end,
        steps_done: trainer.steps_done(),
        losses,
        checkpoints,
        saved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(out: Option<&str>, dir: Option<&str>) -> TrainRequest {
        TrainRequest {
            folder: PathBuf::from("photos"),
            name: "pot".into(),
            word: "teapot".into(),
            options: TrainOptions {
                checkpoint_every: Some(10),
                checkpoint_dir: dir.map(PathBuf::from),
                ..TrainOptions::default()
            },
            resume: None,
            out: out.map(PathBuf::from),
            save_f32: false,
        }
    }

    /// One rule for both front ends: beside the output, else in the working folder, unless a
    /// folder is given.
    #[test]
    fn checkpoints_go_beside_the_output_or_where_asked() {
        let at = |out, dir| request(out, dir).checkpoint_dir();
        assert_eq!(
            at(Some("out/pot.safetensors"), None),
            Path::new("out/pot-checkpoints")
        );
        assert_eq!(
            at(Some("pot.safetensors"), None),
            Path::new("pot-checkpoints")
        );
        assert_eq!(at(None, None), Path::new("pot-checkpoints"));
        assert_eq!(at(Some("out/pot.safetensors"), Some("ck")), Path::new("ck"));
    }

    /// When the output cannot be written after all, the concept is saved in the rescue folder
    /// under a new name, and the job says where; nothing trained is lost.
    #[test]
    fn a_failed_save_is_rescued_under_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let layer = crate::sd::attention::LayerInfo {
            path: "mid_block.attentions.0.transformer_blocks.0.attn2".into(),
            kind: crate::sd::attention::AttnKind::CrossAttention,
            heads: 2,
            head_dim: 4,
        };
        let concept = Concept::zeros("pot", "teapot", [&layer], None).unwrap();
        let gone = dir.path().join("gone/pot.safetensors");
        let job = Job::collecting();
        let saved = save_or_rescue(&concept, &gone, false, dir.path(), &job).unwrap();
        assert!(
            saved.starts_with(dir.path()) && saved.is_file(),
            "{}",
            saved.display()
        );
        assert!(saved
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("pot-rescued-"));
        let m = job.messages();
        assert!(
            m.len() == 1 && m[0].contains("gone") && m[0].contains("saved as"),
            "{m:?}"
        );
        assert_eq!(Concept::load(&saved).unwrap().name, "pot");
    }
}
