//! One library call per user action, shared by the command line and the scripts, so that both
//! behave the same: loading a model (or the bundled one), training a concept from a folder (with
//! one rule for where checkpoints go), taking in a concept file of any method ([`load_concept`]).
//! Generating is [`generate_pair`] itself.
//!
//! [`generate_pair`]: crate::customize::generate::generate_pair

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::infusion::concept::Concept;
use crate::job::Job;
use crate::sd::device::{parse_device, parse_dtype};
use crate::sd::pipeline::{LoadOptions, StableDiffusion};
use crate::train::{image_count_warning, Checkpoint, TrainOptions, TrainReport, Trainer};
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
            if !dir.is_dir() {
                return Err(Error::ModelNotFound(format!(
                    "the bundled tiny model is not at {}: {}",
                    dir.display(),
                    crate::assets::where_home()
                )));
            }
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

/// Saves a concept with `save` at `out`; when that fails after all (the disk filled up, the
/// folder went away), under a new name in the first of `rescue_dirs` that takes it, and says
/// where. Returns where it is.
fn save_or_rescue(
    name: &str,
    out: &Path,
    save: &dyn Fn(&Path) -> Result<()>,
    rescue_dirs: &[PathBuf],
    job: &Job,
) -> Result<PathBuf> {
    let Err(e) = save(out) else {
        return Ok(out.to_path_buf());
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ext = out
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    let mut failures = vec![format!("{}: {e}", out.display())];
    for dir in rescue_dirs {
        if let Err(e) = std::fs::create_dir_all(dir) {
            failures.push(format!("{}: {e}", dir.display()));
            continue;
        }
        let Some(rescue) = (0..100)
            .map(|i| dir.join(format!("{name}-rescued-{secs}-{i}{ext}")))
            .find(|p| !p.exists())
        else {
            continue;
        };
        match save(&rescue) {
            Ok(()) => {
                job.warn(format!(
                    "could not write the concept: {e}; it is saved as {} instead",
                    rescue.display()
                ));
                return Ok(rescue);
            }
            Err(e2) => failures.push(format!("{}: {e2}", rescue.display())),
        }
    }
    Err(Error::io(
        out,
        std::io::Error::other(format!(
            "the concept could not be saved anywhere ({})",
            failures.join("; ")
        )),
    ))
}

/// Where a concept goes when its output cannot be written: the state directory
/// (`$XDG_STATE_HOME/infusion-repl/rescued`, `~/.local/state/...`), then the temporary one.
pub fn rescue_dirs() -> Vec<PathBuf> {
    let state = dirs::state_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join(".local/state")))
        .map(|d| d.join("infusion-repl").join("rescued"));
    state.into_iter().chain([std::env::temp_dir()]).collect()
}

/// Saves the concept of a run that a signal stopped and that nothing was asked to save (a
/// recipe's `train_concept`): as `NAME-stopped-stepNNNNNN` in the first of [`rescue_dirs`]
/// that takes it. Returns where it is.
pub fn save_stopped(concept: &LoadedConcept, steps: usize) -> Result<PathBuf> {
    let (name, ext, save): (&str, &str, Box<dyn Fn(&Path) -> Result<()>>) = match concept {
        LoadedConcept::Infusion(c) => (
            &c.name,
            ".safetensors",
            Box::new(|p: &Path| c.save(p, DType::F32)),
        ),
        LoadedConcept::Adapted(a) => (
            &a.name,
            if a.method() == "dreambooth" {
                ""
            } else {
                ".safetensors"
            },
            Box::new(|p: &Path| a.save(p)),
        ),
    };
    let mut failures = vec![];
    for dir in rescue_dirs() {
        let file = dir.join(format!("{name}-stopped-step{steps:06}{ext}"));
        let file = if file.exists() {
            beside(&file, "again")
        } else {
            file
        };
        match std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(&dir, e))
            .and_then(|()| save(&file))
        {
            Ok(()) => return Ok(file),
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(Error::io(
        Path::new(name),
        std::io::Error::other(format!(
            "the stopped run's concept could not be saved ({})",
            failures.join("; ")
        )),
    ))
}

/// `out` with `-TAG` before its extension, numbered until no such file exists.
fn beside(out: &Path, tag: &str) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let ext = out
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    (0..)
        .map(|i| {
            let n = if i == 0 {
                String::new()
            } else {
                format!("-{i}")
            };
            out.with_file_name(format!("{stem}-{tag}{n}{ext}"))
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| out.to_path_buf())
}

/// Which method trains a concept.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Method {
    /// The paper's: one residual per cross-attention layer.
    #[default]
    Infusion,
    /// A new word's vectors (diffusers' textual_inversion.py).
    TextualInversion,
    /// Rank-`rank` LoRA on the UNet's attention projections, prompts saying `trigger word`
    /// (diffusers' train_dreambooth_lora.py).
    Lora { rank: usize, trigger: String },
    /// The whole UNet, prompts saying `trigger word` (diffusers' train_dreambooth.py).
    DreamBooth { trigger: String },
}

impl Method {
    /// The names `method` options take.
    pub const NAMES: [&'static str; 4] = ["infusion", "textual_inversion", "lora", "dreambooth"];

    /// The method called `name`, with LoRA's `rank` and `trigger`.
    pub fn parse(name: &str, rank: usize, trigger: &str) -> Result<Self> {
        match name {
            "infusion" => Ok(Method::Infusion),
            "textual_inversion" => Ok(Method::TextualInversion),
            "lora" => Ok(Method::Lora {
                rank,
                trigger: trigger.to_string(),
            }),
            "dreambooth" => Ok(Method::DreamBooth {
                trigger: trigger.to_string(),
            }),
            other => Err(Error::arg(
                "method",
                format!(
                    "unknown method `{other}` (methods: {})",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    /// Its default learning rate for `batch` images a step: Infusion's 0.01 (the paper's),
    /// Textual Inversion's 5e-4 scaled by the batch (the script's `--scale_lr`), LoRA's 1e-4,
    /// DreamBooth's 5e-6.
    pub fn default_lr(&self, batch: usize) -> f64 {
        match self {
            Method::Infusion => 0.01,
            Method::TextualInversion => 5e-4 * batch as f64,
            Method::Lora { .. } => 1e-4,
            Method::DreamBooth { .. } => 5e-6,
        }
    }

    /// Its name, as `method` options take it.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Infusion => "infusion",
            Method::TextualInversion => "textual_inversion",
            Method::Lora { .. } => "lora",
            Method::DreamBooth { .. } => "dreambooth",
        }
    }

    /// Whether it offers prior preservation (LoRA, DreamBooth).
    pub fn has_prior(&self) -> bool {
        matches!(self, Method::Lora { .. } | Method::DreamBooth { .. })
    }

    /// The method of a checkpoint's run, with its settings.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let rank = ckpt.settings["rank"].as_u64().unwrap_or(4) as usize;
        let trigger = ckpt.settings["trigger"].as_str().unwrap_or("sks");
        Self::parse(&ckpt.method, rank, trigger).map_err(|_| {
            Error::arg(
                "checkpoint",
                format!(
                    "{}: a checkpoint of method `{}`, which this version does not know",
                    ckpt.optim.display(),
                    ckpt.method
                ),
            )
        })
    }

    /// What trains it, from scratch (the class word initialises Textual Inversion's vectors; the
    /// seed LoRA's).
    pub fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        word: &str,
        seed: u64,
    ) -> Result<Box<dyn crate::train::Learner + 'a>> {
        use crate::methods::learners::{FullUnet, LearnedWord, LoraLearner};
        Ok(match self {
            Method::Infusion => Box::new(crate::infusion::train::Deltas::new(sd)?),
            Method::TextualInversion => Box::new(LearnedWord::new(sd, word.trim())?),
            Method::Lora { rank, trigger } => Box::new(LoraLearner::new(sd, *rank, trigger, seed)?),
            Method::DreamBooth { trigger } => Box::new(FullUnet::new(sd, trigger)?),
        })
    }

    /// Its default number of steps: 500 (Infusion, LoRA), 3000 (diffusers' TI example).
    pub fn default_steps(&self) -> usize {
        match self {
            Method::TextualInversion => 3000,
            _ => 500,
        }
    }
}

/// DreamBooth's prior preservation: `images` class images generated by the plain model from
/// "a photo of a WORD" (seeds SEED, SEED+1, ..., 50 DDIM steps, as the script's pipeline call),
/// fitted at each step beside the concept's, with weight `weight`.
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    pub images: usize,
    pub weight: f64,
    /// A folder the class images are kept in (`WORD-seedN.png`) and taken from next time, as
    /// the script's `--class_data_dir`; `None`: made each run.
    pub dir: Option<PathBuf>,
}

impl Default for Prior {
    /// The script's defaults: 100 class images, weight 1.0; not kept.
    fn default() -> Self {
        Self {
            images: 100,
            weight: 1.0,
            dir: None,
        }
    }
}

/// What to train: a concept from a folder of images.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub folder: PathBuf,
    pub name: String,
    /// The class word.
    pub word: String,
    /// With `resume`, the checkpoint's method (another is an error naming both;
    /// [`resumed_method`] finds it).
    pub method: Method,
    /// Prior preservation (LoRA, DreamBooth): class images the model makes, and their weight.
    pub prior: Option<Prior>,
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
    pub concept: LoadedConcept,
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
    // The checkpoint, read once, says the method of a resumed run.
    let resumed = match &req.resume {
        Some(path) => Some(resumed_method(path, Some(&req.method))?),
        None => None,
    };
    let method = resumed
        .as_ref()
        .map_or_else(|| req.method.clone(), |(m, _)| m.clone());
    // Where the concept goes is checked before the first step, not found wrong after the last.
    if let Some(out) = &req.out {
        let inputs: Vec<&Path> = std::iter::once(req.folder.as_path())
            .chain(req.resume.as_deref())
            .collect();
        crate::util::fs::check_not_an_input(&[out], &inputs)?;
        match method {
            Method::DreamBooth { .. } => check_unet_folder(out)?,
            _ => check_writable(out)?,
        }
    }
    let images = load_folder_images(&req.folder, job)?;
    if let Some(w) = image_count_warning(images.len(), &req.folder) {
        job.warn(w);
    }
    let mut trainer = match resumed {
        Some(ckpt) => resume(sd, req, ckpt, &images, job)?,
        None => {
            if req.prior.is_some() && !req.method.has_prior() {
                return Err(Error::arg(
                    "prior",
                    "prior preservation is DreamBooth's and DreamBooth-LoRA's (method lora or \
                     dreambooth)",
                ));
            }
            let mut options = req.options.clone();
            if options.checkpoint_every.is_some() {
                options.checkpoint_dir = Some(req.checkpoint_dir());
            }
            let learner = req.method.learner(sd, &req.word, options.seed)?;
            let mut t = Trainer::new(sd, &req.name, &req.word, &images, options, learner)?;
            if let Some(prior) = &req.prior {
                let class = class_images(
                    sd,
                    req.word.trim(),
                    prior.images,
                    t.options().seed,
                    prior.dir.as_deref(),
                    job,
                )?;
                t.set_prior(&class, prior.weight)?;
            }
            t
        }
    };
    let (end, report) = match trainer.run(job) {
        Ok(r) if r.cancelled => (TrainEnd::Cancelled, Some(r)),
        Ok(r) => (TrainEnd::Finished, Some(r)),
        Err(e) => (TrainEnd::Failed(e), None),
    };
    let (concept, saved) = keep(sd, &method, &trainer, req, &end, job)?;
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

/// DreamBooth's output is a folder made at the end; where it goes is checked first.
fn check_unet_folder(out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(Error::arg(
            "out",
            format!(
                "{} is a file; DreamBooth writes a unet/ folder",
                out.display()
            ),
        ));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::arg(
                "out",
                format!("{}: no folder {}", out.display(), parent.display()),
            ));
        }
    }
    Ok(())
}

/// The method of the run a checkpoint continues, with the checkpoint: the front ends take its
/// default output and steps from it. `asked`, the method the request names (`None`: not named,
/// so the checkpoint's), must be the checkpoint's.
pub fn resumed_method(path: &Path, asked: Option<&Method>) -> Result<(Method, Checkpoint)> {
    let ckpt = Checkpoint::read(path)?;
    let method = Method::from_checkpoint(&ckpt)?;
    if let Some(asked) = asked.filter(|a| a.name() != method.name()) {
        return Err(Error::arg(
            "method",
            format!(
                "{} is {} run's checkpoint, not {}'s: leave the method out to continue it, or \
                 start a new run without --resume",
                path.display(),
                crate::util::names::with_article(method.name()),
                asked.name()
            ),
        ));
    }
    Ok((method, ckpt))
}

/// Continues the run of a checkpoint: its method, settings, name, word and prior preservation;
/// `req.options.steps` is the new total.
fn resume<'a>(
    sd: &'a StableDiffusion,
    req: &TrainRequest,
    (method, ckpt): (Method, Checkpoint),
    images: &[image::RgbImage],
    job: &Job,
) -> Result<Trainer<'a>> {
    let steps = Some(req.options.steps);
    let prior = ckpt.prior;
    let (word, seed) = (ckpt.word.clone(), ckpt.options.seed);
    let mut trainer = match method {
        Method::Infusion => crate::infusion::train::resume_from(sd, ckpt, images, steps, job)?,
        _ => {
            let learner = method.learner(sd, &word, seed)?;
            Trainer::resume(sd, &ckpt, images, steps, learner, job)?
        }
    };
    // The run continues under its own name and word: a request's others are said, not lost.
    {
        let run = trainer.run_info();
        for (what, asked, kept) in [
            ("name", req.name.trim(), run.name),
            ("word", req.word.trim(), run.word),
        ] {
            if !asked.is_empty() && asked != kept {
                job.warn(format!(
                    "the {what} {asked:?} is not used: the run resumed is <{}> ({}), and \
                     keeps its {what} {kept:?}",
                    run.name, run.word
                ));
            }
        }
    }
    if let Some((n, weight)) = prior {
        // The class images again (from a cache folder, when the request names one).
        let dir = req.prior.as_ref().and_then(|p| p.dir.as_deref());
        let class = class_images(sd, &word, n, seed, dir, job)?;
        trainer.set_prior(&class, weight)?;
    }
    Ok(trainer)
}

/// The concept a run reached, as the session holds it, saved where asked (DreamBooth: a unet/
/// folder; the others: one file in the layout diffusers reads, or ours for Infusion). A run
/// that failed never replaces an existing file: its concept goes beside it under a new name.
/// A save that fails is rescued ([`save_or_rescue`]).
fn keep(
    sd: &StableDiffusion,
    method: &Method,
    trainer: &Trainer<'_>,
    req: &TrainRequest,
    end: &TrainEnd,
    job: &Job,
) -> Result<(LoadedConcept, Option<PathBuf>)> {
    use crate::methods::adapted::{Adapted, Change};
    use crate::methods::learners::{LearnedWord, LoraLearner};
    let run = trainer.run_info();
    let (name, word) = (run.name, run.word);
    let out = req.out.as_ref().map(|out| match end {
        TrainEnd::Failed(_) if out.exists() => {
            let other = beside(out, &format!("failed-step{:06}", run.steps));
            job.warn(format!(
                "the run failed: its concept (step {}) goes to {}, not over {}",
                run.steps,
                other.display(),
                out.display()
            ));
            other
        }
        _ => out.clone(),
    });
    let rescue = rescue_dirs();
    if let Method::Infusion = method {
        let concept = crate::infusion::train::concept(trainer)?;
        let dtype = if req.save_f32 { DType::F32 } else { DType::F16 };
        let saved = match &out {
            Some(out) => Some(save_or_rescue(
                name,
                out,
                &|p: &Path| concept.save(p, dtype),
                &rescue,
                job,
            )?),
            None => None,
        };
        return Ok((LoadedConcept::Infusion(std::sync::Arc::new(concept)), saved));
    }
    let mut adapted = match method {
        Method::DreamBooth { trigger } => Adapted {
            name: name.to_string(),
            word: word.to_string(),
            change: Change::DreamBooth {
                unet: tuned_unet(sd, trainer.vars(), None)?,
                trigger: trigger.clone(),
            },
            origin: crate::methods::learners::origin(sd, &run),
        },
        Method::Lora { trigger, .. } => LoraLearner::export(sd, trainer.vars(), &run, trigger)?,
        Method::TextualInversion => LearnedWord::export(sd, trainer.vars(), &run)?,
        Method::Infusion => return Err(Error::Internal("Infusion past its branch".into())),
    };
    let saved = match &out {
        Some(out) => Some(save_or_rescue(
            name,
            out,
            &|p: &Path| adapted.save(p),
            &rescue,
            job,
        )?),
        None => None,
    };
    if let (Change::DreamBooth { unet, .. }, Some(dir)) = (&mut adapted.change, &saved) {
        unet.dir = Some(dir.clone());
    }
    Ok((LoadedConcept::Adapted(std::sync::Arc::new(adapted)), saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(out: Option<&str>, dir: Option<&str>) -> TrainRequest {
        TrainRequest {
            folder: PathBuf::from("photos"),
            name: "pot".into(),
            word: "teapot".into(),
            method: Method::Infusion,
            prior: None,
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
        let save = |p: &Path| concept.save(p, DType::F16);
        // The first rescue folder cannot be made (a file is in its way): the second takes it.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").unwrap();
        let dirs = [blocked.join("sub"), dir.path().to_path_buf()];
        let saved = save_or_rescue("pot", &gone, &save, &dirs, &job).unwrap();
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

/// How to take a concept file in: what the file cannot say itself.
#[derive(Debug, Clone, Default)]
pub struct ConceptRequest {
    pub path: PathBuf,
    /// What prompts call it; by default the name the file records, else TI's token without
    /// `<>`, a LoRA's file stem, a DreamBooth folder's name, an Infusion concept's own.
    pub name: Option<String>,
    /// The class word F sees (needed for TI and LoRA files that do not record theirs;
    /// Infusion files carry theirs).
    pub word: Option<String>,
    /// A LoRA's strength (1.0).
    pub scale: Option<f64>,
    /// A LoRA's identifier word in C's prompt (DreamBooth's "sks").
    pub trigger: Option<String>,
    /// Use an Infusion concept trained on another model.
    pub force: bool,
}

/// A concept file taken into a session's set: ours, or a Textual Inversion embedding or a LoRA
/// in the layouts users have (told apart by [`crate::methods::files::read`]), checked against
/// `sd` when one is loaded.
pub fn load_concept(
    req: &ConceptRequest,
    sd: Option<&StableDiffusion>,
    set: &mut crate::customize::set::ConceptSet,
    job: &Job,
) -> Result<LoadedConcept> {
    use crate::methods::adapted::{Adapted, Change};
    use crate::methods::files::{read_with_provenance, ConceptFile};
    let path = &req.path;
    if path.is_dir() {
        return load_tuned_unet(req, sd, set, job);
    }
    let (file, recorded) = read_with_provenance(path)?;
    if matches!(file, ConceptFile::Infusion) {
        if let Some(k) = [
            ("word", req.word.is_some()),
            ("scale", req.scale.is_some()),
            ("trigger", req.trigger.is_some()),
        ]
        .iter()
        .find(|(_, given)| *given)
        {
            return Err(Error::arg(
                k.0,
                format!(
                    "{} is an Infusion concept, which carries its own word and has no scale or \
                     trigger (a name given calls it by that name instead of its own)",
                    path.display()
                ),
            ));
        }
        return Ok(LoadedConcept::Infusion(set.load_file_named(
            path,
            req.name.as_deref(),
            sd,
            req.force,
            job,
        )?));
    }
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    // What the file records of its training comes before what its names suggest.
    let (default_name, change) = match file {
        ConceptFile::TextualInversion(e) => (
            e.token
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string(),
            Change::TextualInversion(e),
        ),
        ConceptFile::Lora(lora) => (
            stem,
            Change::Lora {
                lora,
                scale: req.scale.unwrap_or(1.0),
                trigger: req.trigger.clone().or_else(|| recorded.trigger.clone()),
            },
        ),
        ConceptFile::Infusion => {
            return Err(Error::Internal(format!(
                "{}: an Infusion file past its own branch",
                path.display()
            )))
        }
    };
    let default_name = recorded.name.clone().unwrap_or(default_name);
    let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
    if let (Change::TextualInversion(_), Some(_)) = (&change, &req.trigger) {
        return Err(Error::arg(
            "trigger",
            "a Textual Inversion embedding has no trigger word",
        ));
    }
    if let (Change::TextualInversion(_), Some(_)) = (&change, &req.scale) {
        return Err(Error::arg(
            "scale",
            "a Textual Inversion embedding has no strength",
        ));
    }
    let adapted = Adapted {
        name,
        word,
        change,
        origin: crate::methods::adapted::Origin {
            base_model: recorded.base_model.clone(),
            train_steps: recorded.train_steps,
        },
    };
    if let Some(sd) = sd {
        warn_other_model(&adapted, path, sd, job);
        // The same checks a generation makes, now: widths, modules, shapes.
        crate::customize::side::custom_side(
            sd,
            &adapted.word,
            "",
            &[(0..adapted.word.len(), &adapted)],
            crate::sd::hook::Branch(1),
        )
        .map_err(|e| match e {
            Error::InvalidArgument { msg, .. } | Error::Unsupported(msg) => Error::Config {
                path: path.clone(),
                msg,
            },
            e => e,
        })?;
    }
    let adapted = std::sync::Arc::new(adapted);
    set.add_adapted(adapted.clone(), job);
    Ok(LoadedConcept::Adapted(adapted))
}

/// The name (the request's, else `default_name`) and the class word (the request's, else the
/// one the file records, else none: an error) of a concept file, both checked.
fn name_and_word(
    req: &ConceptRequest,
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

/// Warns when a concept records a base model other than `sd`'s (a LoRA or an embedding often
/// works on a relative of its model, so this is no error).
fn warn_other_model(
    adapted: &crate::methods::adapted::Adapted,
    path: &Path,
    sd: &StableDiffusion,
    job: &Job,
) {
    if let Some(base) = adapted
        .origin
        .base_model
        .as_deref()
        .filter(|b| *b != sd.unet_fingerprint())
    {
        job.warn(format!(
            "<{}> ({}) was trained on another model ({base}, this one is {}): its results \
             may differ",
            adapted.name,
            path.display(),
            sd.unet_fingerprint()
        ));
    }
}

/// A concept taken in by [`load_concept`].
#[derive(Debug, Clone)]
pub enum LoadedConcept {
    Infusion(std::sync::Arc<Concept>),
    Adapted(std::sync::Arc<crate::methods::adapted::Adapted>),
}

/// A fine-tuned UNet from trained variables (their tensors, shared, not copied).
fn tuned_unet(
    sd: &StableDiffusion,
    vars: &std::collections::BTreeMap<String, candle_core::Var>,
    dir: Option<PathBuf>,
) -> Result<crate::methods::adapted::TunedUnet> {
    // Detached, not copied: the trainer ends with this call, and a whole UNet is large.
    let weights: std::collections::BTreeMap<String, candle_core::Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let n_params = weights.values().map(|t| t.elem_count()).sum();
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, sd.dtype(), sd.device());
    let unet = crate::sd::unet::UNet::new(vb, sd.unet.config())?;
    Ok(crate::methods::adapted::TunedUnet {
        unet: std::sync::Arc::new(unet),
        n_params,
        dir,
        weights: Some(std::sync::Arc::new(weights)),
    })
}

/// [`load_concept`] of a DreamBooth result: a diffusers `unet/` folder of the model's config,
/// C's UNet where the concept is named (its prompt saying `trigger word`).
fn load_tuned_unet(
    req: &ConceptRequest,
    sd: Option<&StableDiffusion>,
    set: &mut crate::customize::set::ConceptSet,
    job: &Job,
) -> Result<LoadedConcept> {
    use crate::methods::adapted::{Adapted, Change, TunedUnet};
    let path = &req.path;
    let sd = sd.ok_or_else(|| {
        Error::arg(
            "model",
            format!(
                "{}: a UNet folder loads onto a model: load the model first",
                path.display()
            ),
        )
    })?;
    let weights =
        crate::sd::hub::find_weights(path, "diffusion_pytorch_model", sd.dtype() == DType::F16)?;
    if req.scale.is_some() {
        return Err(Error::arg(
            "scale",
            format!(
                "{}: a DreamBooth UNet has no strength (it replaces C's UNet whole)",
                path.display()
            ),
        ));
    }
    let recorded = crate::methods::files::Provenance::of_folder(path)?;
    let unet = crate::metrics::fisher::load_unet_weights(sd, &weights)?;
    let folder = path
        .file_name()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let default_name = recorded.name.clone().unwrap_or(folder);
    let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
    let n_params = crate::sd::weights::tensors_asked(|vb| {
        crate::sd::unet::UNet::new(vb, sd.unet.config()).map(|_| ())
    })?
    .iter()
    .map(|(_, s)| s.iter().product::<usize>())
    .sum();
    let adapted = std::sync::Arc::new(Adapted {
        name,
        word,
        change: Change::DreamBooth {
            unet: TunedUnet {
                unet: std::sync::Arc::new(unet),
                n_params,
                dir: Some(path.clone()),
                weights: None,
            },
            trigger: req
                .trigger
                .clone()
                .or(recorded.trigger)
                .unwrap_or_else(|| "sks".into()),
        },
        origin: crate::methods::adapted::Origin {
            base_model: recorded.base_model,
            train_steps: recorded.train_steps,
        },
    });
    warn_other_model(&adapted, path, sd, job);
    set.add_adapted(adapted.clone(), job);
    Ok(LoadedConcept::Adapted(adapted))
}

/// `n` images of "a photo of a WORD" by the plain model (seeds `seed`, `seed + 1`, ...).
fn class_images(
    sd: &StableDiffusion,
    word: &str,
    n: usize,
    seed: u64,
    dir: Option<&Path>,
    job: &Job,
) -> Result<Vec<image::RgbImage>> {
    if n == 0 {
        return Err(Error::arg("prior_images", "must be at least 1"));
    }
    let prompt = format!("a photo of a {word}");
    let file = |i: usize| {
        dir.map(|d| {
            d.join(format!(
                "{}-seed{}.png",
                word.replace(' ', "_"),
                seed.wrapping_add(i as u64)
            ))
        })
    };
    let cached = (0..n)
        .filter(|&i| file(i).is_some_and(|f| f.is_file()))
        .count();
    job.note(format!(
        "prior preservation: {n} class images of {prompt:?}{}",
        match dir {
            Some(d) => format!(" ({cached} already in {})", d.display()),
            None => String::new(),
        }
    ));
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    (0..n)
        .map(|i| {
            job.check()?;
            if let Some(f) = file(i).filter(|f| f.is_file()) {
                return Ok(image::open(&f)
                    .map_err(|e| Error::Image {
                        path: f.clone(),
                        msg: e.to_string(),
                    })?
                    .to_rgb8());
            }
            let seed = seed.wrapping_add(i as u64);
            let g = sd.generate(
                &prompt,
                &crate::sd::pipeline::GenerateOptions {
                    seed,
                    ..Default::default()
                },
                job,
            )?;
            let img = crate::util::image_io::tensor_to_rgb(&g.image)?;
            if let Some(f) = file(i) {
                crate::util::image_io::save_png(&img, &f, &[("prompt", prompt.clone())])?;
            }
            Ok(img)
        })
        .collect()
}
