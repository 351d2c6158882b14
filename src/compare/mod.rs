//! The paper's comparison (its figures 10-12 and Table 1) as one resumable run: every method
//! trains once per subject to the checkpoints, and each checkpoint is measured (the latent
//! Fisher divergence on prompts without the concept, W2 between F's and C's latents, CLIP-T /
//! CLIP-I / DINO-I with DreamBooth's prompts, the size of the method's file).
//!
//! The work is a list of cells, each written atomically under `out/cells/`; a run skips the
//! cells that are there, so it resumes after a failure and is idempotent. Units of work (one
//! method on one subject: its training and every cell of its checkpoints) are split over
//! shards ([`shard::Shard`]: `K/N`, or a scheduler's environment); every shard writes into the
//! same folder, and a merge ([`report`]) builds `curves.csv`, the charts and `table.md` from
//! the cells there, listing the missing ones. `out/run.json` holds the run's settings: a run
//! with other settings into the same folder is refused, naming the setting.

pub(crate) mod data;
pub(crate) mod report;
pub(crate) mod shard;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::customize::generate::{generate_pair, PairOptions};
use crate::customize::set::ConceptSet;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::methods::{ConceptRequest, Method, Settings};
use crate::metrics::clip::Clip;
use crate::metrics::dino::Dino;
use crate::metrics::fisher::{fisher_divergence, FisherOptions, Variant};
pub use crate::metrics::mean_se;
use crate::metrics::scores::{clip_i, clip_t, dino_i};
use crate::metrics::w2::wasserstein;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::train::{Checkpoint, TrainOptions, Trainer};
use crate::util::fs::write_atomic;
use crate::util::image_io::{load_folder_images, tensor_to_rgb};
pub use data::Subject;
pub use shard::Shard;

/// What a comparison runs: everything that changes its numbers (the output folder and the
/// shard do not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareOptions {
    /// The methods, by `--method` name.
    pub methods: Vec<String>,
    /// Each method's own options, over its defaults.
    pub settings: BTreeMap<String, Settings>,
    /// Training steps measured at (the paper's figure 12: 100, 200, 400, 1000, 2000).
    pub checkpoints: Vec<usize>,
    /// W2: images per side for each prompt (the paper: 1000).
    pub samples: usize,
    /// W2: prompts (the subject's DreamBooth prompts, the first N; the paper: 20).
    pub w2_prompts: usize,
    /// Fisher divergence: samples, over the captions' first `fisher_prompts`.
    pub fisher_samples: usize,
    pub fisher_prompts: usize,
    /// The Fisher captions, one a line (`None`: the shipped list, assets/perfusion/captions.txt).
    pub captions: Option<PathBuf>,
    /// Prompts per W2 or CLIP/DINO cell (a killed run loses at most one such chunk).
    pub prompt_chunk: usize,
    /// CLIP/DINO: prompts (DreamBooth's 25) and images per prompt (5).
    pub prompts: usize,
    pub images_per_prompt: usize,
    /// Generation: denoising steps and guidance.
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

impl Default for CompareOptions {
    /// The paper's protocol.
    fn default() -> Self {
        Self {
            methods: crate::methods::names()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            settings: BTreeMap::new(),
            checkpoints: vec![100, 200, 400, 1000, 2000],
            samples: 1000,
            w2_prompts: 20,
            fisher_samples: 1000,
            fisher_prompts: 1000,
            captions: None,
            prompt_chunk: 5,
            prompts: 25,
            images_per_prompt: 5,
            steps: 50,
            guidance: 7.5,
            seed: 0,
        }
    }
}

/// One comparison: the subjects, the options, the scorers and where it writes.
pub struct Comparison<'a> {
    pub sd: &'a StableDiffusion,
    pub subjects: Vec<Subject>,
    pub opts: CompareOptions,
    pub clip: &'a Clip,
    pub dino: &'a Dino,
    pub out: PathBuf,
    methods: Vec<&'static dyn Method>,
}

/// What a checkpoint is measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    Size,
    Fisher,
    W2,
    Scores,
    /// Figure 12's picture: C's image of the subject's first prompt (and F's beside it), the
    /// same seed for every method and checkpoint.
    Image,
}

impl Measure {
    pub const ALL: [Measure; 5] = [
        Measure::Size,
        Measure::Fisher,
        Measure::W2,
        Measure::Scores,
        Measure::Image,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measure::Size => "size",
            Measure::Fisher => "fisher",
            Measure::W2 => "w2",
            Measure::Scores => "scores",
            Measure::Image => "image",
        }
    }
}

/// One value of a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub metric: String,
    pub value: f64,
    /// Its standard error (over samples or prompts; 0 for a size).
    pub std_err: f64,
    /// What it averages over.
    pub n: usize,
    /// How it was measured, when that matters to read it (W2's samples and dimension).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// One cell's result, as written in `out/cells/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// The run's settings' hash ([`Comparison::settings_hash`]).
    pub run: String,
    pub method: String,
    pub subject: String,
    pub step: usize,
    pub measure: Measure,
    /// Which chunk of the prompts (W2 and the scores: a value per prompt of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<usize>,
    pub values: Vec<Value>,
}

/// One cell of work: a unit's measure at a checkpoint, of one chunk of the prompts for the
/// measures over prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellId {
    pub unit: Unit,
    pub step: usize,
    pub measure: Measure,
    pub chunk: Option<usize>,
}

/// A unit of work: one method on one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    pub subject: usize,
    pub method: usize,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub cells_done: usize,
    pub cells_skipped: usize,
}

impl<'a> Comparison<'a> {
    /// Checks everything before any work: the methods and their options, the checkpoints, the
    /// counts, the caption list, and `out`'s settings (a folder of another run's is refused,
    /// naming the setting that differs).
    pub fn new(
        sd: &'a StableDiffusion,
        subjects: Vec<Subject>,
        opts: CompareOptions,
        clip: &'a Clip,
        dino: &'a Dino,
        out: &Path,
    ) -> Result<Self> {
        if subjects.is_empty() {
            return Err(Error::arg("data", "no subjects to compare on"));
        }
        let methods = opts
            .methods
            .iter()
            .map(|m| crate::methods::method(m))
            .collect::<Result<Vec<_>>>()?;
        if methods.is_empty() {
            return Err(Error::arg("methods", "no method to compare"));
        }
        for (m, given) in &opts.settings {
            let method = crate::methods::method(m)?;
            training_overrides(method, given)?;
        }
        if opts.checkpoints.is_empty() || opts.checkpoints.contains(&0) {
            return Err(Error::arg(
                "checkpoints",
                "training steps to measure at, each at least 1",
            ));
        }
        for (name, v) in [
            ("samples", opts.samples),
            ("w2_prompts", opts.w2_prompts),
            ("fisher_samples", opts.fisher_samples),
            ("fisher_prompts", opts.fisher_prompts),
            ("prompts", opts.prompts),
            ("prompt_chunk", opts.prompt_chunk),
            ("images_per_prompt", opts.images_per_prompt),
            ("steps", opts.steps),
        ] {
            if v == 0 {
                return Err(Error::arg(name, "must be at least 1"));
            }
        }
        if opts.samples < 2 {
            return Err(Error::arg("samples", "W2 needs at least 2 images per side"));
        }
        if opts.prompts > data::OBJECT_PROMPTS.len() || opts.w2_prompts > data::OBJECT_PROMPTS.len()
        {
            return Err(Error::arg(
                "prompts",
                format!(
                    "DreamBooth's lists hold {} prompts",
                    data::OBJECT_PROMPTS.len()
                ),
            ));
        }
        let mut opts = opts;
        opts.checkpoints.sort_unstable();
        opts.checkpoints.dedup();
        let c = Self {
            sd,
            subjects,
            opts,
            clip,
            dino,
            out: out.to_path_buf(),
            methods,
        };
        c.fisher_captions()?;
        c.check_settings()?;
        Ok(c)
    }

    /// The run's settings as `run.json` holds them: the options, the subjects and the model.
    pub fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({
            "options": self.opts,
            "subjects": self.subjects,
            "model": self.sd.unet_fingerprint(),
            "clip": crate::metrics::scorer_label("CLIP", self.clip.path()),
            "dino": crate::metrics::scorer_label("DINO", self.dino.path()),
        })
    }

    /// A short hash of [`Comparison::settings_json`], recorded in every cell.
    pub fn settings_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.settings_json().to_string().as_bytes());
        h[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes `out/run.json`, or checks it: another run's settings are an error naming the
    /// first setting that differs.
    fn check_settings(&self) -> Result<()> {
        let path = self.out.join("run.json");
        let ours = self.settings_json();
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let theirs: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Format {
                    path: path.clone(),
                    msg: format!("not a comparison's run.json: {e}"),
                })?;
            if let Some(k) = first_difference(&theirs, &ours, "") {
                return Err(Error::arg(
                    "out",
                    format!(
                        "{} holds a comparison run with other settings (`{k}` differs): use \
                         another --out, or the same settings to resume it",
                        self.out.display()
                    ),
                ));
            }
            return Ok(());
        }
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        let text = serde_json::to_vec_pretty(&ours).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(&path, |w| {
            w.write_all(&text).map_err(|e| Error::io(&path, e))
        })
    }

    /// Every unit, in the order shards split them: subject-major.
    pub fn units(&self) -> Vec<Unit> {
        (0..self.subjects.len())
            .flat_map(|subject| (0..self.methods.len()).map(move |method| Unit { subject, method }))
            .collect()
    }

    /// A cell's file.
    pub fn cell_path(&self, id: CellId) -> PathBuf {
        let chunk = id.chunk.map_or(String::new(), |k| format!(".{k}"));
        self.out
            .join("cells")
            .join(&self.subjects[id.unit.subject].name)
            .join(self.methods[id.unit.method].name())
            .join(format!(
                "step{:06}.{}{chunk}.json",
                id.step,
                id.measure.name()
            ))
    }

    /// The prompts a measure over prompts uses for a subject of class `word`.
    fn measure_prompts(&self, measure: Measure, word: &str) -> &'static [&'static str] {
        let n = match measure {
            Measure::W2 => self.opts.w2_prompts,
            _ => self.opts.prompts,
        };
        &data::prompts_for(word)[..n]
    }

    /// A unit's cells, checkpoint by checkpoint.
    pub fn cell_ids(&self, unit: Unit) -> Vec<CellId> {
        let word = &self.subjects[unit.subject].word;
        let mut out = vec![];
        for &step in &self.opts.checkpoints {
            for measure in Measure::ALL {
                let chunks = match measure {
                    Measure::W2 | Measure::Scores => {
                        let n = self.measure_prompts(measure, word).len();
                        (0..n.div_ceil(self.opts.prompt_chunk)).map(Some).collect()
                    }
                    _ => vec![None],
                };
                for chunk in chunks {
                    out.push(CellId {
                        unit,
                        step,
                        measure,
                        chunk,
                    });
                }
            }
        }
        out
    }

    /// Where a unit's training writes its checkpoints.
    fn train_dir(&self, unit: Unit) -> PathBuf {
        self.out
            .join("concepts")
            .join(&self.subjects[unit.subject].name)
            .join(self.methods[unit.method].name())
    }

    /// The optimizer file of a unit's checkpoint at `step` (written last: the checkpoint is
    /// whole when it is there).
    fn optim_path(&self, unit: Unit, step: usize) -> PathBuf {
        self.train_dir(unit).join(format!(
            "{}-step{step:06}.optim.safetensors",
            self.subjects[unit.subject].name
        ))
    }

    /// Runs the units of `shard` (every unit without one): trains what is not trained and
    /// measures the cells that are not there.
    pub fn run(&self, shard: Option<Shard>, job: &Job) -> Result<RunReport> {
        let units: Vec<Unit> = self
            .units()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| shard.is_none_or(|s| s.has(*i)))
            .map(|(_, u)| u)
            .collect();
        let total: usize = units.iter().map(|&u| self.cell_ids(u).len()).sum();
        let mut report = RunReport::default();
        let started = std::time::Instant::now();
        for unit in units {
            let all = self.cell_ids(unit);
            let todo: Vec<CellId> = all
                .iter()
                .copied()
                .filter(|&id| !self.cell_path(id).is_file())
                .collect();
            report.cells_skipped += all.len() - todo.len();
            if todo.is_empty() {
                continue;
            }
            self.train(unit, job)?;
            for id in todo {
                job.check()?;
                let cell = self.measure(id, job)?;
                let path = self.cell_path(id);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                let text =
                    serde_json::to_vec_pretty(&cell).map_err(|e| Error::Internal(e.to_string()))?;
                write_atomic(&path, |w| {
                    w.write_all(&text).map_err(|e| Error::io(&path, e))
                })?;
                report.cells_done += 1;
                let done = report.cells_done + report.cells_skipped;
                let per = started.elapsed().as_secs_f64() / report.cells_done as f64;
                let left = per * total.saturating_sub(done) as f64;
                job.note(format!(
                    "compare: {done}/{total} cells ({} {} step {} {}{}), ~{} left",
                    self.subjects[unit.subject].name,
                    self.methods[unit.method].name(),
                    id.step,
                    id.measure.name(),
                    id.chunk.map_or(String::new(), |k| format!(" chunk {k}")),
                    human_seconds(left)
                ));
            }
        }
        Ok(report)
    }

    /// Trains a unit to its last checkpoint, saving each checkpoint; resumes from the last one
    /// saved (the same run: its random draws are the step's).
    fn train(&self, unit: Unit, job: &Job) -> Result<()> {
        let cps = &self.opts.checkpoints;
        if cps.iter().all(|&s| self.optim_path(unit, s).is_file()) {
            return Ok(());
        }
        let method = self.methods[unit.method];
        let subject = &self.subjects[unit.subject];
        let images = load_folder_images(&subject.folder, job)?;
        let given = self
            .opts
            .settings
            .get(method.name())
            .cloned()
            .unwrap_or_default();
        let Training {
            settings,
            lr,
            batch,
            prior,
        } = training_overrides(method, &given)?;
        let learner = method.learner(self.sd, &settings, &subject.word, self.opts.seed)?;
        let last = *cps.last().unwrap_or(&1);
        // The last checkpoint saved before the first missing one.
        let resume_from = cps
            .iter()
            .take_while(|&&s| self.optim_path(unit, s).is_file())
            .last()
            .copied();
        let mut trainer = match resume_from {
            Some(step) => {
                let ckpt = Checkpoint::read(&self.optim_path(unit, step))?;
                Trainer::resume(self.sd, &ckpt, &images, Some(last), learner, job)?
            }
            None => {
                let opts = TrainOptions {
                    steps: last,
                    lr,
                    batch,
                    seed: self.opts.seed,
                    ..Default::default()
                };
                Trainer::new(
                    self.sd,
                    &subject.name,
                    &subject.word,
                    &images,
                    opts,
                    learner,
                )?
            }
        };
        if let Some(p) = &prior {
            // Kept per subject, for every method that takes them and for resumed runs.
            let keep = self.out.join("class_images").join(&subject.name);
            let class = crate::train::class_images(
                self.sd,
                &subject.word,
                p.images,
                self.opts.seed,
                Some(&keep),
                job,
            )?;
            trainer.set_prior(&class, p.weight)?;
        }
        let dir = self.train_dir(unit);
        let start = trainer.steps_done();
        for &step in cps.iter().filter(|&&s| s > start) {
            trainer.set_total_steps(step);
            if trainer.run(job)?.cancelled {
                return Err(Error::Cancelled);
            }
            trainer.save_checkpoint(&dir)?;
        }
        Ok(())
    }

    /// The concept of a unit's checkpoint at `step`, as its file loads.
    fn concept(&self, unit: Unit, step: usize, job: &Job) -> Result<(ConceptSet, PathBuf)> {
        let ckpt = Checkpoint::read(&self.optim_path(unit, step))?;
        let concept = crate::methods::load(
            &ConceptRequest {
                path: ckpt.path.clone(),
                ..Default::default()
            },
            Some(self.sd),
            job,
        )?;
        let mut set = ConceptSet::new();
        set.add(concept, false, job);
        Ok((set, ckpt.path))
    }

    /// The Fisher divergence's prompts: the caption list's first `fisher_prompts`.
    pub fn fisher_captions(&self) -> Result<Vec<String>> {
        let source = self
            .opts
            .captions
            .as_ref()
            .map_or("builtin".to_string(), |p| p.display().to_string());
        let (mut list, _) = crate::methods::perfusion::captions(&source)?;
        list.truncate(self.opts.fisher_prompts);
        Ok(list)
    }

    /// One cell: the measure of a unit's checkpoint at `step`, each value from the library's
    /// own function.
    pub fn measure(&self, id: CellId, job: &Job) -> Result<Cell> {
        let CellId {
            unit,
            step,
            measure,
            chunk,
        } = id;
        let (set, path) = self.concept(unit, step, job)?;
        let subject = &self.subjects[unit.subject];
        // This cell's prompts, for the measures over prompts.
        let prompts: Vec<String> = {
            let all = self.measure_prompts(measure, &subject.word);
            let k = chunk.unwrap_or(0) * self.opts.prompt_chunk;
            all.iter()
                .skip(k)
                .take(self.opts.prompt_chunk)
                .map(|p| p.replace("{}", &format!("<{}>", subject.name)))
                .collect()
        };
        let values = match measure {
            Measure::Size => {
                let bytes = size_on_disk(&path)?;
                vec![Value {
                    metric: "bytes".into(),
                    value: bytes as f64,
                    std_err: 0.0,
                    n: 1,
                    note: String::new(),
                }]
            }
            Measure::Fisher => {
                let f = fisher_divergence(
                    self.sd,
                    &Variant::Base,
                    &Variant::Everywhere(&set),
                    &self.fisher_captions()?,
                    &FisherOptions {
                        samples: self.opts.fisher_samples,
                        seed: self.opts.seed,
                        gen_steps: self.opts.steps.min(25),
                        ..Default::default()
                    },
                    job,
                )?;
                vec![Value {
                    metric: "fisher".into(),
                    value: f.mean,
                    std_err: f.std_err,
                    n: f.samples,
                    note: String::new(),
                }]
            }
            Measure::W2 => {
                let mut values = vec![];
                for prompt in &prompts {
                    let (mut base, mut custom) = (vec![], vec![]);
                    for s in 0..self.opts.samples {
                        let g = self.generate(&set, prompt, self.opts.seed + s as u64, job)?;
                        base.push(g.base_latents);
                        custom.push(g.custom_latents);
                    }
                    let w = wasserstein(&Tensor::cat(&base, 0)?, &Tensor::cat(&custom, 0)?, None)?;
                    if self.opts.samples * 10 < w.dims {
                        warn_few_samples(self.opts.samples, w.dims, job);
                    }
                    values.push(Value {
                        metric: "w2".into(),
                        value: w.w2,
                        std_err: 0.0,
                        n: self.opts.samples,
                        note: format!(
                            "{} samples per side, dimension {}",
                            self.opts.samples, w.dims
                        ),
                    });
                }
                values
            }
            Measure::Image => {
                let prompt = data::prompts_for(&subject.word)[0]
                    .replace("{}", &format!("<{}>", subject.name));
                let g = self.generate(&set, &prompt, self.opts.seed, job)?;
                let cell = self.cell_path(id);
                for (image, which) in [(&g.custom_image, "custom"), (&g.base_image, "base")] {
                    crate::util::image_io::save_png(
                        &tensor_to_rgb(image)?,
                        &image_path(&cell, which),
                        &[("prompt", prompt.clone())],
                    )?;
                }
                vec![]
            }
            Measure::Scores => {
                let references = load_folder_images(&subject.folder, job)?;
                let mut values = vec![];
                for prompt in &prompts {
                    let mut images = vec![];
                    let mut texts = vec![];
                    for s in 0..self.opts.images_per_prompt {
                        let g =
                            self.generate(&set, prompt, 1000 + self.opts.seed + s as u64, job)?;
                        images.push(tensor_to_rgb(&g.custom_image)?);
                        texts.push(g.parsed.base.clone());
                    }
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    for (metric, value) in [
                        ("clip_t", clip_t(self.clip, &images, &refs)?),
                        ("clip_i", clip_i(self.clip, &images, &references)?),
                        ("dino_i", dino_i(self.dino, &images, &references)?),
                    ] {
                        values.push(Value {
                            metric: metric.into(),
                            value,
                            std_err: 0.0,
                            n: images.len(),
                            note: String::new(),
                        });
                    }
                }
                values
            }
        };
        Ok(Cell {
            run: self.settings_hash(),
            method: self.methods[unit.method].name().to_string(),
            subject: subject.name.clone(),
            step,
            measure,
            chunk,
            values,
        })
    }

    fn generate(
        &self,
        set: &ConceptSet,
        prompt: &str,
        seed: u64,
        job: &Job,
    ) -> Result<crate::customize::generate::PairGeneration> {
        let opts = PairOptions::from(GenerateOptions {
            seed,
            steps: self.opts.steps,
            guidance: self.opts.guidance,
            ..Default::default()
        });
        generate_pair(self.sd, set, prompt, &opts, None, job)
    }
}

/// How a method trains in a comparison.
struct Training {
    settings: Settings,
    lr: f64,
    batch: usize,
    prior: Option<crate::train::Prior>,
}

/// A method's settings in a comparison: its own options, and `lr`, `batch` and prior
/// preservation (`prior`: true, `prior_images`, `prior_weight`, for the methods that take it)
/// over its defaults (the lr for the batch and prior by default); each checked.
fn training_overrides(method: &dyn Method, given: &Settings) -> Result<Training> {
    let mut own = given.clone();
    let bad = |k: &str, v: &serde_json::Value| {
        Error::arg(k, format!("{}.{k}={v}: not a {k}", method.name()))
    };
    let prior_on = match own.remove("prior") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| bad("prior", &v))?,
    };
    let d = crate::train::Prior::default();
    let images = match own.remove("prior_images") {
        None => d.images,
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or_else(|| bad("prior_images", &v))?,
    };
    let weight = match own.remove("prior_weight") {
        None => d.weight,
        Some(v) => v
            .as_f64()
            .filter(|w| *w >= 0.0 && w.is_finite())
            .ok_or_else(|| bad("prior_weight", &v))?,
    };
    if prior_on && !method.takes_prior() {
        return Err(Error::arg(
            "prior",
            format!("{} takes no prior preservation", method.name()),
        ));
    }
    let prior = prior_on.then_some(crate::train::Prior {
        images,
        weight,
        dir: None,
    });
    let batch = match own.remove("batch") {
        None => method.default_batch(),
        Some(v) => v
            .as_u64()
            .filter(|&b| b >= 1)
            .map(|b| b as usize)
            .ok_or_else(|| bad("batch", &v))?,
    };
    let lr = match own.remove("lr") {
        None => method.default_lr(batch, prior.is_some()),
        Some(v) => v
            .as_f64()
            .filter(|l| *l > 0.0 && l.is_finite())
            .ok_or_else(|| bad("lr", &v))?,
    };
    Ok(Training {
        settings: crate::methods::resolve_settings(method, &own)?,
        lr,
        batch,
        prior,
    })
}

/// The PNG beside an image cell's file: `which` is `custom` (C's) or `base` (F's).
pub fn image_path(cell: &Path, which: &str) -> PathBuf {
    cell.with_extension(format!("{which}.png"))
}

/// Says once a process that W2 comes from far fewer samples than dimensions.
fn warn_few_samples(samples: usize, dims: usize, job: &Job) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        job.warn(format!(
            "W2 from {samples} samples per side in {dims} dimensions: the Gaussians' covariances \
             are far from full rank, so W2 is mostly their means' and traces' (the paper uses \
             1000 samples)"
        ))
    });
}

/// Bytes of a file, or of the files in a folder (its optimizer state excluded: that is the
/// checkpoint's, not the method's file).
fn size_on_disk(path: &Path) -> Result<u64> {
    if path.is_file() {
        return Ok(std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let e = e.map_err(|e| Error::io(path, e))?;
        let p = e.path();
        total += if p.is_dir() {
            size_on_disk(&p)?
        } else {
            e.metadata().map_err(|e| Error::io(&p, e))?.len()
        };
    }
    Ok(total)
}

/// The first key (dotted) where two settings differ.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value as V;
    match (a, b) {
        (V::Object(x), V::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, &path),
                    _ => Some(path),
                }
            })
        }
        _ if a == b => None,
        _ => Some(at.to_string()),
    }
}

fn human_seconds(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    match s as u64 {
        s if s < 90 => format!("{s}s"),
        s if s < 90 * 60 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cell's values read back bit-exact: a resumed run and a report see the value the run
    /// measured. 0.0010063240770250559 is a Fisher cell's value that serde_json's default
    /// parser read back one ulp off (0.001006324077025056).
    #[test]
    fn a_cells_values_read_back_bit_exact() {
        let value = 0.0010063240770250559f64;
        let cell = Cell {
            run: "0123abcd".into(),
            method: "lora".into(),
            subject: "pot".into(),
            step: 2,
            measure: Measure::Fisher,
            chunk: None,
            values: vec![Value {
                metric: "fisher".into(),
                value,
                std_err: value / 3.0,
                n: 2,
                note: String::new(),
            }],
        };
        let back: Cell = serde_json::from_str(&serde_json::to_string(&cell).unwrap()).unwrap();
        assert_eq!(back.values[0].value.to_bits(), value.to_bits());
        assert_eq!(back.values[0].std_err.to_bits(), (value / 3.0).to_bits());
    }
}
