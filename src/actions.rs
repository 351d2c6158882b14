//! One library call per user action, shared by the command line and the scripts, so that both
//! behave the same: loading a model (or the bundled one), training a concept from a folder (one
//! request resolved here: the method's defaults, a checkpoint's run, one rule for where
//! checkpoints go), taking in a concept file of any method ([`load_concept`]). Generating is
//! [`generate_pair`] itself.
//!
//! [`generate_pair`]: crate::customize::generate::generate_pair

use std::path::{Path, PathBuf};

use crate::customize::set::ConceptSet;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::methods::{ConceptRef, ConceptRequest, Method, Settings};
use crate::sd::device::{parse_device, parse_dtype};
use crate::sd::fused::Kernels;
use crate::sd::pipeline::{LoadOptions, StableDiffusion};
use crate::train::{
    class_images, image_count_warning, Checkpoint, Prior, TrainOptions, TrainReport, Trainer,
};
use crate::util::fs::check_writable;
use crate::util::image_io::{load_folder, load_masks};

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
    /// What the model's layers run: naive (the default) or fused.
    pub kernels: Kernels,
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
        vocabulary: Some(crate::assets::clip_tokenizer()),
        kernels: req.kernels,
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
pub fn save_stopped(concept: &ConceptRef, steps: usize) -> Result<PathBuf> {
    let ext = if concept.saves_folder() {
        ""
    } else {
        ".safetensors"
    };
    let name = concept.name();
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
            .and_then(|()| concept.save(&file, true))
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

/// What a front end was asked to train: the folder, the concept's name and class word, and every
/// option as given (`None`: the method's default, or the checkpoint's run when resuming).
#[derive(Debug, Clone, Default)]
pub struct TrainAsk {
    pub folder: PathBuf,
    pub name: String,
    pub word: String,
    /// A method's name (default: Infusion, or the checkpoint's).
    pub method: Option<String>,
    /// The method's own options given (a LoRA's `rank`, a `trigger`).
    pub settings: Settings,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub batch: Option<usize>,
    /// Images per forward and backward pass (see [`TrainOptions::micro_batch`]): a setting of
    /// this machine, taken on resuming too.
    pub micro_batch: Option<usize>,
    pub seed: Option<u64>,
    pub templates: Option<Vec<String>>,
    pub flip: Option<bool>,
    pub checkpoint_every: Option<usize>,
    pub checkpoint_dir: Option<PathBuf>,
    /// A folder of loss masks, one PNG per image named as it (see [`TrainOptions::masks`]).
    pub masks: Option<PathBuf>,
    /// Prior preservation (for the methods that take it).
    pub prior: Option<Prior>,
    /// Continue the run of this checkpoint.
    pub resume: Option<PathBuf>,
    /// Where to save the concept; `None`: not saved.
    pub out: Option<PathBuf>,
    /// Full precision where the method's format has a choice (Infusion's f16 by default).
    pub save_f32: bool,
}

/// A training run, every setting resolved ([`TrainAsk::resolve`]).
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub folder: PathBuf,
    pub name: String,
    pub word: String,
    pub method: &'static dyn Method,
    /// The method's own options, each given or its default.
    pub settings: Settings,
    pub options: TrainOptions,
    pub prior: Option<Prior>,
    /// The checkpoint whose run this continues.
    pub resume: Option<Checkpoint>,
    pub out: Option<PathBuf>,
    pub save_f32: bool,
    /// What the request asked that the resumed run does not use, to say.
    pub unused: Vec<String>,
}

impl TrainAsk {
    /// The run asked: a new one with the method's defaults for what is not given, or the
    /// checkpoint's run (its method, settings, name, word, options and prior preservation;
    /// `steps` the new total). A method named that is not the checkpoint's is an error naming
    /// both; other options given that the run does not use are kept in `unused`.
    pub fn resolve(&self) -> Result<TrainRequest> {
        let defaults = TrainOptions::default();
        let asked_method = self
            .method
            .as_deref()
            .map(crate::methods::method)
            .transpose()?;
        let Some(path) = &self.resume else {
            let method = asked_method.unwrap_or_else(crate::methods::default_method);
            if self.prior.is_some() && !method.takes_prior() {
                let takers: Vec<&str> = crate::methods::REGISTRY
                    .iter()
                    .filter(|m| m.takes_prior())
                    .map(|m| m.name())
                    .collect();
                return Err(Error::arg(
                    "prior",
                    format!(
                        "{} takes no prior preservation (the methods that do: {})",
                        method.name(),
                        takers.join(", ")
                    ),
                ));
            }
            let batch = self.batch.unwrap_or(method.default_batch());
            let mut options = TrainOptions {
                steps: self.steps.unwrap_or(method.default_steps()),
                lr: self
                    .lr
                    .unwrap_or(method.default_lr(batch, self.prior.is_some())),
                batch,
                seed: self.seed.unwrap_or(defaults.seed),
                templates: self.templates.clone().unwrap_or(defaults.templates),
                flip: self.flip.unwrap_or(defaults.flip),
                checkpoint_every: self.checkpoint_every,
                checkpoint_dir: self.checkpoint_dir.clone(),
                masks: self.masks.clone(),
                micro_batch: self.micro_batch,
                ..defaults
            };
            if options.checkpoint_every.is_some() {
                options.checkpoint_dir = Some(checkpoint_dir(
                    &self.name,
                    self.checkpoint_dir.as_deref(),
                    self.out.as_deref(),
                ));
            }
            return Ok(TrainRequest {
                folder: self.folder.clone(),
                name: self.name.clone(),
                word: self.word.trim().to_string(),
                method,
                settings: crate::methods::resolve_settings(method, &self.settings)?,
                options,
                prior: self.prior.clone(),
                resume: None,
                out: self.out.clone(),
                save_f32: self.save_f32,
                unused: vec![],
            });
        };
        let ckpt = Checkpoint::read(path)?;
        let method = crate::methods::method(&ckpt.method).map_err(|_| Error::Format {
            path: ckpt.optim.clone(),
            msg: format!(
                "a checkpoint of method `{}`, which this version does not know",
                ckpt.method
            ),
        })?;
        if let Some(asked) = asked_method.filter(|a| a.name() != method.name()) {
            return Err(Error::arg(
                "method",
                format!(
                    "{} is {} run's checkpoint, not {}'s: leave the method out to continue it, \
                     or start a new run without --resume",
                    path.display(),
                    crate::util::names::with_article(method.name()),
                    asked.name()
                ),
            ));
        }
        let recorded: Settings = match &ckpt.settings {
            serde_json::Value::Object(m) => m.clone().into_iter().collect(),
            _ => Settings::new(),
        };
        let mut unused = vec![];
        let mut differs = |what: &str, asked: Option<String>, kept: String| {
            if let Some(asked) = asked.filter(|a| !a.is_empty() && *a != kept) {
                unused.push(format!(
                    "the {what} {asked:?} is not used: the run resumed is <{}> ({}), and keeps \
                     its {what} {kept:?}",
                    ckpt.name, ckpt.word
                ));
            }
        };
        differs(
            "name",
            Some(self.name.trim().to_string()),
            ckpt.name.clone(),
        );
        differs(
            "word",
            Some(self.word.trim().to_string()),
            ckpt.word.clone(),
        );
        for (k, v) in &self.settings {
            let kept = recorded.get(k).map(|r| r.to_string()).unwrap_or_default();
            differs(k, Some(v.to_string()), kept);
        }
        let o = &ckpt.options;
        differs("lr", self.lr.map(|v| v.to_string()), o.lr.to_string());
        differs(
            "batch",
            self.batch.map(|v| v.to_string()),
            o.batch.to_string(),
        );
        differs("seed", self.seed.map(|v| v.to_string()), o.seed.to_string());
        let mut options = ckpt.options.clone();
        if let Some(steps) = self.steps {
            options.steps = steps;
        }
        options.micro_batch = self.micro_batch;
        // The run's masks, from where they are now when the request says.
        if let Some(m) = &self.masks {
            options.masks = Some(m.clone());
        }
        let prior = ckpt.prior.map(|(images, weight)| Prior {
            images,
            weight,
            // The class images again, from a cache folder when the request names one.
            dir: self.prior.as_ref().and_then(|p| p.dir.clone()),
        });
        Ok(TrainRequest {
            folder: self.folder.clone(),
            name: ckpt.name.clone(),
            word: ckpt.word.clone(),
            method,
            settings: crate::methods::resolve_settings(method, &recorded)?,
            options,
            prior,
            resume: Some(ckpt),
            out: self.out.clone(),
            save_f32: self.save_f32,
            unused,
        })
    }
}

/// Where checkpoints go: the folder asked for, else `NAME-checkpoints/` beside the output (in
/// the working folder when nothing is saved).
pub fn checkpoint_dir(name: &str, asked: Option<&Path>, out: Option<&Path>) -> PathBuf {
    if let Some(dir) = asked {
        return dir.to_path_buf();
    }
    let folder = format!("{name}-checkpoints");
    match out.and_then(Path::parent) {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(folder),
        _ => PathBuf::from(folder),
    }
}

/// How a training run ended.
#[derive(Debug)]
pub enum TrainEnd {
    Finished,
    /// Ctrl-C: stopped early, what was learned is kept.
    Cancelled,
    /// The run failed (a non-finite loss, a checkpoint that cannot be written): the
    /// parameters of the last good step are kept.
    Failed(Error),
}

/// What a training run gives: the concept reached whatever happened, and where it was saved.
#[derive(Debug)]
pub struct Trained {
    pub concept: ConceptRef,
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
    for note in &req.unused {
        job.warn(note.clone());
    }
    // Where the concept goes is checked before the first step, not found wrong after the last.
    if let Some(out) = &req.out {
        let inputs: Vec<&Path> = std::iter::once(req.folder.as_path())
            .chain(req.resume.as_ref().map(|c| c.path.as_path()))
            .collect();
        crate::util::fs::check_not_an_input(&[out], &inputs)?;
        if req.method.saves_folder() {
            crate::methods::files::check_out_folder(out)?;
        } else {
            check_writable(out)?;
        }
    }
    let folder = load_folder(&req.folder)?;
    for s in &folder.skipped {
        job.warn(format!("skipped {s}"));
    }
    let masks = match &req.options.masks {
        Some(dir) => Some(load_masks(&folder.images, dir)?),
        None => None,
    };
    let images: Vec<image::RgbImage> = folder.images.into_iter().map(|(_, i)| i).collect();
    if let Some(w) = image_count_warning(images.len(), &req.folder) {
        job.warn(w);
    }
    let learner = req
        .method
        .learner(sd, &req.settings, &req.word, req.options.seed)?;
    let mut trainer = match &req.resume {
        Some(ckpt) => Trainer::resume(sd, ckpt, &images, Some(req.options.steps), learner, job)?,
        None => Trainer::new(
            sd,
            &req.name,
            &req.word,
            &images,
            req.options.clone(),
            learner,
        )?,
    };
    if let Some(masks) = &masks {
        trainer.set_masks(masks)?;
    }
    if let Some(prior) = &req.prior {
        let seed = trainer.options().seed;
        let class = class_images(sd, &req.word, prior.images, seed, prior.dir.as_deref(), job)?;
        trainer.set_prior(&class, prior.weight)?;
    }
    let (end, report) = match trainer.run(job) {
        Ok(r) if r.cancelled => (TrainEnd::Cancelled, Some(r)),
        Ok(r) => (TrainEnd::Finished, Some(r)),
        Err(e) => (TrainEnd::Failed(e), None),
    };
    let (concept, saved) = keep(&trainer, req, &end, job)?;
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

/// The concept a run reached, as the session holds it, saved where asked in its method's
/// layout. A run that failed never replaces an existing file: its concept goes beside it under
/// a new name. A save that fails is rescued ([`save_or_rescue`]).
fn keep(
    trainer: &Trainer<'_>,
    req: &TrainRequest,
    end: &TrainEnd,
    job: &Job,
) -> Result<(ConceptRef, Option<PathBuf>)> {
    let steps = trainer.steps_done();
    let out = req.out.as_ref().map(|out| match end {
        TrainEnd::Failed(_) if out.exists() => {
            let other = beside(out, &format!("failed-step{steps:06}"));
            job.warn(format!(
                "the run failed: its concept (step {steps}) goes to {}, not over {}",
                other.display(),
                out.display()
            ));
            other
        }
        _ => out.clone(),
    });
    let concept = req.method.reached(trainer, &req.settings)?;
    let saved = match &out {
        Some(out) => Some(save_or_rescue(
            concept.name(),
            out,
            &|p: &Path| concept.save(p, req.save_f32),
            &rescue_dirs(),
            job,
        )?),
        None => None,
    };
    Ok((concept, saved))
}

/// Takes a concept file (or a DreamBooth folder) of any method into `set`, checked against `sd`
/// when one is loaded (see [`crate::methods::load`]).
pub fn load_concept(
    req: &ConceptRequest,
    sd: Option<&StableDiffusion>,
    set: &mut ConceptSet,
    job: &Job,
) -> Result<ConceptRef> {
    set.load(req, sd, job)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule for both front ends: beside the output, else in the working folder, unless a
    /// folder is given.
    #[test]
    fn checkpoints_go_beside_the_output_or_where_asked() {
        let at = |out: Option<&str>, dir: Option<&str>| {
            TrainAsk {
                name: "pot".into(),
                word: "teapot".into(),
                checkpoint_every: Some(10),
                checkpoint_dir: dir.map(PathBuf::from),
                out: out.map(PathBuf::from),
                ..Default::default()
            }
            .resolve()
            .unwrap()
            .options
            .checkpoint_dir
            .unwrap()
        };
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
        let concept =
            crate::infusion::concept::Concept::zeros("pot", "teapot", [&layer], None).unwrap();
        let gone = dir.path().join("gone/pot.safetensors");
        let job = Job::collecting();
        let save = |p: &Path| concept.save(p, candle_core::DType::F16);
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
        assert_eq!(
            crate::infusion::concept::Concept::load(&saved)
                .unwrap()
                .name,
            "pot"
        );
    }

    /// A new run takes its method's defaults; a resumed one its checkpoint's method, and a
    /// method named that is not the checkpoint's is refused naming both (issue 22: `infusion`
    /// was also "unspecified"); prior preservation only where the method takes it.
    #[test]
    fn a_request_resolves_defaults_and_refuses_what_does_not_fit() {
        let ask = |method: &str| TrainAsk {
            name: "pot".into(),
            word: " teapot ".into(),
            method: Some(method.into()),
            ..Default::default()
        };
        let r = ask("lora").resolve().unwrap();
        assert_eq!(r.method.name(), "lora");
        assert_eq!(r.word, "teapot");
        assert_eq!((r.options.steps, r.options.lr), (500, 1e-4));
        assert_eq!(r.settings["rank"], 4);
        assert_eq!(r.settings["trigger"], "sks");
        let r = ask("textual_inversion").resolve().unwrap();
        assert_eq!((r.options.steps, r.options.lr), (3000, 5e-4 * 4.0));
        let e = ask("nope").resolve().unwrap_err().to_string();
        assert!(
            e.contains("unknown method `nope`") && e.contains("dreambooth"),
            "{e}"
        );
        let mut bad = ask("textual_inversion");
        bad.prior = Some(Prior::default());
        let e = bad.resolve().unwrap_err().to_string();
        assert!(e.contains("takes no prior") && e.contains("lora"), "{e}");
        let mut bad = ask("infusion");
        bad.settings.insert("rank".into(), serde_json::json!(8));
        let e = bad.resolve().unwrap_err().to_string();
        assert!(e.contains("infusion has no option `rank`"), "{e}");
    }
}

/// A comparison asked for (`compare` on the command line, `compare_methods` in scripts).
#[derive(Debug, Clone, Default)]
pub struct CompareAsk {
    /// A concept's folder (with `name` and `word`) or a dataset folder.
    pub data: PathBuf,
    pub name: Option<String>,
    pub word: Option<String>,
    pub options: crate::compare::CompareOptions,
    /// The scorers' folders (default: the bundled tiny ones, with random weights: said loudly).
    pub clip: Option<PathBuf>,
    pub dino: Option<PathBuf>,
    pub out: PathBuf,
    /// `K/N`; none: the scheduler's environment's, else the whole run.
    pub shard: Option<String>,
    /// The number of shards of a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` gives the index).
    pub shard_count: Option<usize>,
    /// Only build the results from the cells there.
    pub merge: bool,
}

/// What a comparison did: the cells it measured and skipped, its shard, and (for a whole run
/// or a merge) the results.
#[derive(Debug, Clone)]
pub struct Compared {
    pub shard: Option<crate::compare::Shard>,
    pub run: crate::compare::RunReport,
    pub merged: Option<crate::compare::report::Merged>,
}

/// Runs (a shard of) the comparison, or merges its cells.
pub fn compare(sd: &StableDiffusion, ask: &CompareAsk, job: &Job) -> Result<Compared> {
    use crate::compare::{data, Comparison, Shard};
    let subjects = data::subjects(&ask.data, ask.name.as_deref(), ask.word.as_deref())?;
    let shard = match (&ask.shard, ask.merge) {
        (Some(_), true) => {
            return Err(Error::arg(
                "shard",
                "a merge reads every shard's cells: no --shard",
            ))
        }
        (Some(s), false) => Some(Shard::parse(s)?),
        (None, true) => None,
        (None, false) => Shard::from_env(&|k| std::env::var(k).ok(), ask.shard_count)?,
    };
    let clip_dir = ask.clip.clone().unwrap_or_else(crate::assets::tiny_clip);
    let dino_dir = ask.dino.clone().unwrap_or_else(crate::assets::tiny_dino);
    crate::metrics::warn_if_random("CLIP", &clip_dir, job);
    crate::metrics::warn_if_random("DINO", &dino_dir, job);
    let clip =
        crate::metrics::clip::Clip::load(&clip_dir, &crate::assets::clip_tokenizer(), sd.device())?;
    let dino = crate::metrics::dino::Dino::load(&dino_dir, sd.device())?;
    let c = Comparison::new(sd, subjects, ask.options.clone(), &clip, &dino, &ask.out)?;
    let run = if ask.merge {
        Default::default()
    } else {
        if let Some(s) = shard {
            job.note(format!("compare: shard {s}"));
        }
        c.run(shard, job)?
    };
    let merged = match shard {
        None => Some(c.merge()?),
        Some(_) => None,
    };
    Ok(Compared { shard, run, merged })
}
