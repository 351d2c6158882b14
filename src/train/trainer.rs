//! The training loop every method shares: AdamW steps on a [`Learner`]'s parameters, with
//! progress, Ctrl-C, the NaN guard, f16 loss scaling, prior preservation and resumable
//! checkpoints.
//!
//! All randomness of step `k` comes from (`seed`, `k`), so a run is deterministic on the CPU and
//! resuming from a checkpoint continues the very same curve.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{root_cause, Error, Result};
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
use crate::train::data::{Batch, TrainingSet, DEFAULT_TEMPLATES};
use crate::train::optim::{AdamState, AdamW};
use crate::train::{Learner, Run};
use crate::util::fs::write_atomic;
use crate::util::names::{check_name, check_word};
use crate::util::tensors::plain_values;

/// Settings of a training run. Defaults follow the paper: AdamW, lr 0.01, batch 4.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub seed: u64,
    /// Prompt templates with `{}` for the class word.
    pub templates: Vec<String>,
    /// Also train on the horizontally flipped images.
    pub flip: bool,
    /// AdamW's decoupled weight decay (PyTorch's default 0.01).
    pub weight_decay: f64,
    /// Write a checkpoint every N steps into `checkpoint_dir`.
    pub checkpoint_every: Option<usize>,
    pub checkpoint_dir: Option<PathBuf>,
    /// A folder of loss masks, one PNG per training image named as it (white counts, black
    /// does not); none: the plain loss over the whole image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<PathBuf>,
    /// Images per forward and backward pass: each step's batch goes through the model in
    /// slices of this many and their gradients are summed, the same update (to float rounding)
    /// in less memory. `None`: the whole batch, fewer where the memory available holds fewer.
    /// A setting of the machine, not of the run: checkpoints leave it out.
    #[serde(skip)]
    pub micro_batch: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 500,
            lr: 0.01,
            batch: 4,
            seed: 0,
            templates: DEFAULT_TEMPLATES.iter().map(|s| s.to_string()).collect(),
            flip: true,
            weight_decay: 0.01,
            checkpoint_every: None,
            checkpoint_dir: None,
            masks: None,
            micro_batch: None,
        }
    }
}

impl TrainOptions {
    fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::arg(
                "train_steps",
                "must be at least 1 (0 steps would save an untrained, all-zero concept)",
            ));
        }
        if self.batch == 0 {
            return Err(Error::arg("batch", "must be at least 1"));
        }
        if self.micro_batch == Some(0) {
            return Err(Error::arg("micro_batch", "must be at least 1"));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(Error::arg(
                "weight_decay",
                format!(
                    "{} is not a weight decay (a finite number >= 0)",
                    self.weight_decay
                ),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::arg(
                "lr",
                format!("{} is not a positive learning rate", self.lr),
            ));
        }
        if self.templates.is_empty() {
            return Err(Error::arg("templates", "no prompt template given"));
        }
        if let Some(t) = self.templates.iter().find(|t| !t.contains("{}")) {
            return Err(Error::arg(
                "templates",
                format!("{t:?} has no `{{}}` for the class word"),
            ));
        }
        if self.checkpoint_every == Some(0) {
            return Err(Error::arg("checkpoint_every", "must be at least 1"));
        }
        if self.checkpoint_every.is_some() && self.checkpoint_dir.is_none() {
            return Err(Error::arg("checkpoint_every", "needs a checkpoint folder"));
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Steps done in total (over resumes).
    pub steps_done: usize,
    /// Loss of each step of this run.
    pub losses: Vec<f32>,
    /// True when the run was stopped (Ctrl-C) before its last step.
    pub cancelled: bool,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
}

/// Dynamic loss scaling for f16 models, as PyTorch's `GradScaler`: at SD's scale the gradients
/// of the loss through f16 activations underflow, so the loss is multiplied by `scale` before
/// the backward pass and the gradients divided after. A step whose gradients overflow is skipped
/// and the scale halved; after [`LossScale::GROWTH_INTERVAL`] good steps it doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good: usize,
}

impl LossScale {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            good: 0,
        }
    }

    /// Updates the scale after a step; returns whether the step's update is to be applied.
    pub fn after_step(&mut self, grads_finite: bool) -> Result<bool> {
        if !grads_finite {
            if self.scale <= 1.0 {
                return Err(Error::arg(
                    "dtype",
                    "the gradients overflow f16 even without loss scaling: train the model in \
                     f32 (or bf16 on CUDA)",
                ));
            }
            self.scale /= 2.0;
            self.good = 0;
            return Ok(false);
        }
        self.good += 1;
        if self.good == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good = 0;
        }
        Ok(true)
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

/// What a step can be undone to: the parameters and the optimizer state before it.
struct Snapshot {
    params: BTreeMap<String, Tensor>,
    adam: AdamState,
}

/// Parameters up to this size are copied before each update, so that a non-finite loss rolls
/// back to the last good step; larger ones (a whole UNet: 3.4 GB at SD1.5) are not, and an
/// update that would make a parameter non-finite is refused instead.
pub const ROLLBACK_LIMIT_BYTES: usize = 256 << 20;

/// A concept being trained on one model: the loop (progress, Ctrl-C, the NaN guard, loss
/// scaling, checkpoints) around a [`Learner`].
pub struct Trainer<'a> {
    sd: &'a StableDiffusion,
    name: String,
    word: String,
    opts: TrainOptions,
    data: TrainingSet,
    learner: Box<dyn Learner + 'a>,
    adam: AdamW,
    step: usize,
    /// The state before the last update (to roll back to when the loss turns non-finite).
    previous: Option<Snapshot>,
    /// Whether the parameters are small enough to snapshot (see [`ROLLBACK_LIMIT_BYTES`]).
    rollback: bool,
    /// Images per forward and backward pass (see [`TrainOptions::micro_batch`]).
    micro: usize,
    /// Loss scaling, for f16 models.
    scaler: Option<LossScale>,
    /// Prior preservation: the class images (with the class prompt) and the weight of their
    /// loss, added to each step's.
    prior: Option<(TrainingSet, f64)>,
}

/// The rows per pass: the whole batch where `fits` says it fits, else the most that do (1
/// where none does). Passes cost time (SD1.5's Infusion step at batch 4 on the 2-core CPU of
/// notes/cpu.md: 55.9 s whole, 56.5-64.0 s in passes of 2, 69.7 s in passes of 1), so they are
/// taken only where memory asks for them.
fn auto_micro_batch(batch: usize, fits: impl Fn(usize) -> bool) -> usize {
    (1..=batch).rev().find(|&m| fits(m)).unwrap_or(1)
}

/// The images per forward and backward pass of `opts`' run (see
/// [`TrainOptions::micro_batch`]) on `sd`'s device, `state` bytes of parameters' training
/// state held besides (see [`state_bytes`]), activations `factor` times a frozen UNet's (see
/// [`Learner::activation_factor`]).
fn micro_batch(
    sd: &StableDiffusion,
    opts: &TrainOptions,
    hw: (usize, usize),
    state: u128,
    factor: f64,
) -> Result<usize> {
    // Each step draws the whole batch's noise (and the VAE's sample noise) at once.
    let latent = (sd.unet.config().in_channels * hw.0 * hw.1 * 4) as u128;
    plan_passes(
        opts,
        opts.batch as u128 * latent * 2,
        |rows| (sd.unet_train_bytes(rows, hw) as f64 * factor) as u128,
        state,
        |arg, what, need| crate::sd::device::ensure_fits(arg, what, need, sd.device()),
    )
}

/// The bytes training `params` bytes of parameters holds whatever the rows: their gradients,
/// the sum of the passes' gradients, and AdamW's two moments. DreamBooth's SD1.5 UNet (3.4 GB)
/// holds ~14 GB, which an estimate of the activations alone left out (the OOM killer ended its
/// run on a 23 GiB machine, passes of 1 included).
fn state_bytes(params: u128) -> u128 {
    4 * params
}

/// The rows per pass: the one asked, else the whole batch, fewer where `ensure` (which refuses
/// a need of more bytes than are available, naming the argument to change) holds fewer.
/// `noise`: the bytes of a step's noise; `activations(rows)`: of a pass of `rows`; `state`:
/// see [`state_bytes`]. An error when not even a pass of 1 fits.
fn plan_passes(
    opts: &TrainOptions,
    noise: u128,
    activations: impl Fn(usize) -> u128,
    state: u128,
    ensure: impl Fn(&str, &str, u128) -> Result<()>,
) -> Result<usize> {
    let need = |rows: usize| activations(rows) + state;
    ensure(
        "batch",
        &format!("a training batch of {}", opts.batch),
        noise + need(1),
    )?;
    let Some(asked) = opts.micro_batch else {
        // Passes of 1 fit (checked above).
        return Ok(auto_micro_batch(opts.batch, |m| {
            ensure("micro_batch", "", need(m)).is_ok()
        }));
    };
    let micro = asked.min(opts.batch);
    ensure(
        "micro_batch",
        &format!("a training pass of {micro} images"),
        need(micro),
    )?;
    Ok(micro)
}

/// The random stream of training step `step` (`eval`: the evaluation set's).
fn step_rng(seed: u64, step: usize, eval: bool) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2 * step as u64 + u64::from(eval));
    rng
}

impl<'a> Trainer<'a> {
    /// Prepares training of `learner`'s parameters on the images: crops and encodes them once
    /// (and their mirror images) and the templates, whose `{}` becomes `learner.words(word)`.
    pub fn new(
        sd: &'a StableDiffusion,
        name: &str,
        word: &str,
        images: &[RgbImage],
        opts: TrainOptions,
        learner: Box<dyn Learner + 'a>,
    ) -> Result<Self> {
        check_name(name)?;
        opts.validate()?;
        let size = sd.default_size();
        let hw = sd.latent_size(size, size)?;
        let bytes: usize = learner
            .vars()
            .values()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum();
        let micro = micro_batch(
            sd,
            &opts,
            hw,
            state_bytes(bytes as u128),
            learner.activation_factor(),
        )?;
        let word = word.trim().to_string();
        check_word(&word)?;
        let data = TrainingSet::new(
            sd,
            &learner.words(&word),
            images,
            &opts.templates,
            opts.flip,
            learner.augment(),
        )?;
        let mut adam = AdamW::new(opts.lr, opts.weight_decay, learner.vars())?;
        for k in learner.vars().keys() {
            let scale = learner.lr_scale(k);
            if scale != 1.0 {
                adam.set_lr_scale(k, scale);
            }
        }
        Ok(Self {
            sd,
            name: name.to_string(),
            word,
            opts,
            data,
            learner,
            adam,
            step: 0,
            previous: None,
            rollback: bytes <= ROLLBACK_LIMIT_BYTES,
            micro,
            scaler: (sd.dtype() == DType::F16).then(LossScale::new),
            prior: None,
        })
    }

    /// Weighs each training image's loss by its mask (see [`TrainingSet::set_masks`]).
    pub fn set_masks(&mut self, masks: &[image::GrayImage]) -> Result<()> {
        self.data.set_masks(self.sd, masks)
    }

    /// Prior preservation (DreamBooth's): every step also fits `class_images` (made by the plain
    /// model) with the class prompt `a photo of a WORD`, their loss weighted by `weight`.
    pub fn set_prior(&mut self, class_images: &[RgbImage], weight: f64) -> Result<()> {
        if !weight.is_finite() || weight < 0.0 {
            return Err(Error::arg(
                "prior_weight",
                format!("{weight} is not a weight (a finite number >= 0)"),
            ));
        }
        let data = TrainingSet::new(
            self.sd,
            &self.word,
            class_images,
            &["a photo of a {}".to_string()],
            false,
            crate::train::Augment::None,
        )?;
        self.prior = Some((data, weight));
        Ok(())
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// Images per forward and backward pass (see [`TrainOptions::micro_batch`]).
    pub fn micro_batch(&self) -> usize {
        self.micro
    }

    /// Changes how many steps [`Trainer::run`] trains to (to train on in stages).
    pub fn set_total_steps(&mut self, steps: usize) {
        self.opts.steps = steps;
    }

    /// Number of training images (with mirror images).
    pub fn n_images(&self) -> usize {
        self.data.n_images()
    }

    /// The learner's parameters as reached so far.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        self.learner.vars()
    }

    /// What the learner keeps besides its parameters ([`Learner::buffers`]).
    pub fn buffers(&self) -> BTreeMap<String, Tensor> {
        self.learner.buffers()
    }

    /// The learner's method.
    pub fn method(&self) -> &'static str {
        self.learner.method()
    }

    pub fn model(&self) -> &'a StableDiffusion {
        self.sd
    }

    /// The run as the files a learner writes describe it.
    pub fn run_info(&self) -> Run<'_> {
        Run {
            name: &self.name,
            word: &self.word,
            steps: self.step,
            options: &self.opts,
            images: self.data.n_images(),
        }
    }

    /// Keeps (or not) a copy of the parameters before each update, to roll back to when the
    /// loss turns non-finite. By default only parameters up to [`ROLLBACK_LIMIT_BYTES`] are
    /// copied.
    pub fn set_rollback(&mut self, on: bool) {
        self.rollback = on;
        if !on {
            self.previous = None;
        }
    }

    /// The learner's loss on `batch` with `params` (with gradient when they are the vars).
    fn loss(&self, batch: &Batch, params: &BTreeMap<String, Tensor>) -> Result<Tensor> {
        self.learner.loss(self.sd, &self.data, batch, params)
    }

    fn var_tensors(&self) -> BTreeMap<String, Tensor> {
        self.learner
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The loss scale of f16 training (`None` in other dtypes).
    pub fn loss_scale(&self) -> Option<LossScale> {
        self.scaler
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            params: plain_values(self.learner.vars())?,
            adam: self.adam.state().clone(),
        })
    }

    /// The error of a step whose loss became `value` (not finite), after rolling the
    /// parameters and the optimizer state back to those of the last finite loss (one update
    /// back, when there was one).
    fn roll_back(&mut self, value: f32) -> Error {
        let failed = self.step + 1;
        let kept = match self.previous.take() {
            Some(prev) => {
                for (k, v) in self.learner.vars() {
                    if let Err(e) = v.set(&prev.params[k]) {
                        return e.into();
                    }
                }
                self.adam.set_state(prev.adam);
                self.step -= 1;
                "the last with a finite loss"
            }
            None if self.step > 0 => {
                "which gave this loss: the parameters are too large to keep a copy of the step \
                 before"
            }
            None => "the start",
        };
        Error::Diverged(format!(
            "the loss became {value} at step {failed}: stopped, keeping the parameters of step \
             {} ({kept}); try a lower learning rate",
            self.step
        ))
    }

    /// One optimization step (of [`Learner::accumulate`] batches, each in slices of
    /// [`TrainOptions::micro_batch`] images); returns its loss. A
    /// non-finite loss is an error that rolls the parameters and the optimizer state back to
    /// those of the last finite loss (one update back, when there was one). In f16 the loss is scaled (see [`LossScale`]); a step whose scaled
    /// gradients overflow changes nothing but the scale.
    pub fn step(&mut self) -> Result<f32> {
        let mut rng = step_rng(self.opts.seed, self.step, false);
        let parts = self.learner.accumulate().max(1);
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        let mut value = 0f32;
        let mut g: Option<BTreeMap<String, Tensor>> = None;
        let n = self.opts.batch;
        for _ in 0..parts {
            let batch = self.data.draw(self.sd, &mut rng, n)?;
            self.learner.observe(self.sd, &self.data, &batch)?;
            let class = match &self.prior {
                Some((data, _)) => Some(data.draw(self.sd, &mut rng, n)?),
                None => None,
            };
            let params = self.var_tensors();
            // The batch's loss is the mean of its images': each slice's, weighted by its share.
            for a in (0..n).step_by(self.micro) {
                let b = (a + self.micro).min(n);
                let mut loss = self.loss(&batch.slice(a, b)?, &params)?;
                if let (Some((data, weight)), Some(class)) = (&self.prior, &class) {
                    let prior = self
                        .learner
                        .loss(self.sd, data, &class.slice(a, b)?, &params)?;
                    loss = (loss + (prior * *weight)?)?;
                }
                if parts > 1 {
                    loss = (loss / parts as f64)?;
                }
                if b - a < n {
                    loss = (loss * ((b - a) as f64 / n as f64))?;
                }
                let part = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                value += part;
                if !part.is_finite() {
                    return Err(self.roll_back(value));
                }
                let grads = if scale == 1.0 {
                    loss.backward()?
                } else {
                    (&loss * scale)?.backward()?
                };
                // The graph goes before the next slice's is built.
                drop(loss);
                let part = crate::train::optim::gradients(&grads, self.learner.vars(), scale)?;
                drop(grads);
                g = Some(match g {
                    None => part,
                    Some(sum) => sum
                        .into_iter()
                        .map(|(k, a)| Ok((k.clone(), (a + &part[&k])?)))
                        .collect::<Result<_>>()?,
                });
            }
        }
        let mut g = g.ok_or_else(|| Error::Internal("no batch in a step".into()))?;
        // An overflow is seen before clipping (which would scale it to zeros).
        let apply = match &mut self.scaler {
            Some(s) => s.after_step(all_finite(&g)?)?,
            None => true,
        };
        if let (true, Some(max)) = (apply, self.learner.max_grad_norm()) {
            crate::train::optim::clip_grad_norm(&mut g, max)?;
        }
        if apply && !self.rollback && !self.adam.keeps_finite(self.learner.vars(), &g)? {
            return Err(Error::Diverged(format!(
                "the update of step {} would make parameters non-finite: stopped, keeping the \
                 parameters of step {}; try a lower learning rate",
                self.step + 1,
                self.step
            )));
        }
        if self.rollback {
            self.previous = Some(self.snapshot()?);
        }
        if apply {
            self.adam.update(self.learner.vars(), &g)?;
        }
        self.step += 1;
        Ok(value)
    }

    /// Mean loss over a fixed evaluation set of `n` draws from `seed` (image, t, noise), with the
    /// current parameters, or with those before training (Δ = 0 for Infusion) when `zero`.
    pub fn eval_loss(&self, seed: u64, n: usize, zero: bool) -> Result<f32> {
        let probe = self.data.draw(self.sd, &mut step_rng(seed, 0, true), n)?;
        let deltas = if zero {
            self.learner.initial().clone()
        } else {
            self.learner
                .vars()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect()
        };
        let mut total = 0.0;
        for chunk in 0..n.div_ceil(self.opts.batch) {
            let a = chunk * self.opts.batch;
            let b = (a + self.opts.batch).min(n);
            let l = self.loss(&probe.slice(a, b)?, &deltas)?;
            total += l.to_scalar::<f32>()? as f64 * (b - a) as f64;
        }
        Ok((total / n as f64) as f32)
    }

    /// Runs the remaining steps with a progress bar showing the loss. Ctrl-C (the job's cancel)
    /// stops after the current step, keeping the Δs reached; checkpoints are written as asked.
    pub fn run(&mut self, job: &Job) -> Result<TrainReport> {
        if let Some(s) = self.scaler {
            job.note(format!(
                "training an f16 model: the loss is scaled (dynamic loss scaling, now {}) so \
                 its gradients do not underflow f16",
                s.scale
            ));
        }
        let total = self.opts.steps;
        // Steps counted from the first, resumed or not, as the messages count them.
        let progress = job.progress(total, self.step, "train");
        let mut report = TrainReport {
            steps_done: self.step,
            losses: vec![],
            cancelled: false,
            checkpoints: vec![],
        };
        while self.step < total {
            if job.is_cancelled() {
                report.cancelled = true;
                break;
            }
            let loss = self.step()?;
            report.losses.push(loss);
            report.steps_done = self.step;
            progress.set(self.step, &format!("loss {loss:.4}"));
            if let (Some(every), Some(dir)) =
                (self.opts.checkpoint_every, &self.opts.checkpoint_dir)
            {
                if self.step.is_multiple_of(every) {
                    report.checkpoints.push(self.save_checkpoint(dir)?);
                }
            }
        }
        progress.finish();
        Ok(report)
    }

    /// Writes a checkpoint into `dir`: the learner's own file (or folder) `NAME-stepNNNNNN.*`,
    /// usable as it is, and beside it `NAME-stepNNNNNN.optim.safetensors` with the optimizer
    /// state and what [`Checkpoint::read`] needs to resume the run. Returns the learner's path.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let stem = format!("{}-step{:06}", self.name, self.step);
        let path = self.learner.save(self.sd, &self.run_info(), dir, &stem)?;
        let state = self.adam.state();
        let mut tensors: Vec<(String, Tensor)> = vec![];
        for (k, m) in &state.m {
            tensors.push((format!("m/{k}"), m.to_device(&Device::Cpu)?));
        }
        for (k, v) in &state.v {
            tensors.push((format!("v/{k}"), v.to_device(&Device::Cpu)?));
        }
        let settings = serde_json::to_string(&self.learner.settings())
            .map_err(|e| Error::Internal(format!("cannot serialize the settings: {e}")))?;
        let options = serde_json::to_string(&self.opts)
            .map_err(|e| Error::Internal(format!("cannot serialize the options: {e}")))?;
        let mut meta = HashMap::from([
            ("format".to_string(), OPTIMIZER_FORMAT.to_string()),
            ("method".to_string(), self.learner.method().to_string()),
            ("name".to_string(), self.name.clone()),
            ("word".to_string(), self.word.clone()),
            ("settings".to_string(), settings),
            ("step".to_string(), self.step.to_string()),
            ("adam_step".to_string(), state.step.to_string()),
            ("options".to_string(), options),
        ]);
        if let Some(s) = self.scaler {
            meta.insert("loss_scale".to_string(), format!("{} {}", s.scale, s.good));
        }
        if let Some((data, weight)) = &self.prior {
            meta.insert("prior".to_string(), format!("{} {weight}", data.n_images()));
        }
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| Error::Internal(format!("cannot serialize the optimizer state: {e}")))?;
        let opt_path = dir.join(format!("{stem}.optim.safetensors"));
        write_atomic(&opt_path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(&opt_path, e))
        })?;
        Ok(path)
    }

    /// Continues the run of `checkpoint` (see [`Checkpoint::read`]) with `learner` (made with
    /// the checkpoint's method and settings) on the same images; `steps` may be raised to train
    /// further. Prior preservation, if the run had it, is the caller's to set again
    /// ([`Checkpoint::prior`]).
    pub fn resume(
        sd: &'a StableDiffusion,
        checkpoint: &Checkpoint,
        images: &[RgbImage],
        steps: Option<usize>,
        mut learner: Box<dyn Learner + 'a>,
        job: &Job,
    ) -> Result<Self> {
        let bad = |msg: String| Error::Safetensors {
            path: checkpoint.optim.clone(),
            msg,
        };
        if learner.method() != checkpoint.method {
            return Err(bad(format!(
                "it is {} run's, not {}'s",
                crate::util::names::with_article(&checkpoint.method),
                learner.method()
            )));
        }
        let mut opts = checkpoint.options.clone();
        if let Some(s) = steps {
            opts.steps = s;
        }
        let step = checkpoint.step;
        if step >= opts.steps {
            return Err(Error::arg(
                "train_steps",
                format!(
                    "the checkpoint {} is at step {step}: nothing to train up to {} steps \
                     (ask for more than {step})",
                    checkpoint.path.display(),
                    opts.steps
                ),
            ));
        }
        let params = learner.read(sd, &checkpoint.path, job)?;
        let tensors = candle_core::safetensors::load(&checkpoint.optim, sd.device())
            .map_err(|e| bad(root_cause(&e)))?;
        let mut t = Trainer::new(
            sd,
            &checkpoint.name,
            &checkpoint.word,
            images,
            opts,
            learner,
        )?;
        let mut state = AdamState {
            step: checkpoint.adam_step,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        };
        for (k, var) in t.learner.vars() {
            let value = params.get(k).ok_or_else(|| Error::Format {
                path: checkpoint.path.clone(),
                msg: format!("no parameter `{k}`"),
            })?;
            var.set(&value.to_dtype(var.dtype())?.to_device(sd.device())?)?;
            for (prefix, moments) in [("m", &mut state.m), ("v", &mut state.v)] {
                let name = format!("{prefix}/{k}");
                let x = tensors
                    .get(&name)
                    .ok_or_else(|| bad(format!("no `{name}`")))?;
                moments.insert(k.clone(), x.clone());
            }
        }
        t.adam.set_state(state);
        t.step = step;
        if let (Some(scaler), Some(saved)) = (&mut t.scaler, checkpoint.loss_scale) {
            *scaler = saved;
        }
        Ok(t)
    }
}

const OPTIMIZER_FORMAT: &str = "infusion-optimizer/1";

/// A checkpoint's run, as its `.optim.safetensors` describes it.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The learner's file (or folder).
    pub path: PathBuf,
    /// The optimizer state beside it.
    pub optim: PathBuf,
    /// The method that wrote it (`infusion` in checkpoints written before the others had any).
    pub method: String,
    /// The concept's name and class word (from the learner's file for checkpoints written
    /// before 2026-12-02).
    pub name: String,
    pub word: String,
    /// The learner's settings ([`Learner::settings`]).
    pub settings: serde_json::Value,
    pub options: TrainOptions,
    pub step: usize,
    /// Prior preservation: the number of class images and their weight.
    pub prior: Option<(usize, f64)>,
    adam_step: usize,
    loss_scale: Option<LossScale>,
}

impl Checkpoint {
    /// Reads what a checkpoint says about its run, from the learner's file (or folder) or from
    /// the `.optim.safetensors` beside it.
    pub fn read(path: &Path) -> Result<Self> {
        let (path, optim) = match path
            .to_str()
            .and_then(|p| p.strip_suffix(".optim.safetensors"))
        {
            Some(stem) => {
                let file = PathBuf::from(format!("{stem}.safetensors"));
                let learner = if file.exists() {
                    file
                } else {
                    PathBuf::from(stem)
                };
                (learner, path.to_path_buf())
            }
            None => {
                let trimmed = path.components().as_path();
                let stem = trimmed.with_extension("");
                let optim = PathBuf::from(format!("{}.optim.safetensors", stem.display()));
                (trimmed.to_path_buf(), optim)
            }
        };
        if !path.exists() {
            return Err(Error::arg(
                "checkpoint",
                format!("{}: no such checkpoint", path.display()),
            ));
        }
        let bad = |msg: String| Error::Safetensors {
            path: optim.clone(),
            msg,
        };
        // SAFETY: checkpoints are written by rename, never in place (see `Mapping::open`).
        let map = unsafe { crate::util::mapped::Mapping::open(&optim) }
            .map_err(|e| Error::io(&optim, e))?;
        let header = safetensors::SafeTensors::read_metadata(map.bytes())
            .map_err(|e| bad(e.to_string()))?
            .1
            .metadata()
            .clone()
            .unwrap_or_default();
        let get = |k: &str| {
            header
                .get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))
        };
        if get("format")? != OPTIMIZER_FORMAT {
            return Err(bad(format!(
                "not a checkpoint's optimizer state ({OPTIMIZER_FORMAT})"
            )));
        }
        let number =
            |k: &str| -> Result<usize> { get(k)?.parse().map_err(|_| bad(format!("bad `{k}`"))) };
        // Two numbers, "A B", when the key is there.
        fn two<A: std::str::FromStr, B: std::str::FromStr>(
            header: &HashMap<String, String>,
            k: &str,
            bad: &dyn Fn(String) -> Error,
        ) -> Result<Option<(A, B)>> {
            let Some(text) = header.get(k) else {
                return Ok(None);
            };
            let pair = text
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            pair.map(Some)
                .ok_or_else(|| bad(format!("bad `{k}`: {text:?}")))
        }
        let loss_scale =
            two(&header, "loss_scale", &bad)?.map(|(scale, good)| LossScale { scale, good });
        let prior = two(&header, "prior", &bad)?;
        let settings = match header.get("settings") {
            Some(text) => serde_json::from_str(text).map_err(|e| bad(format!("settings: {e}")))?,
            None => serde_json::Value::Null,
        };
        // Checkpoints written before 2026-12-02 do not name their run: its file does (an
        // Infusion concept's metadata).
        let named = |k: &str| -> String {
            header
                .get(k)
                .cloned()
                .or_else(|| file_metadata(&path, k))
                .unwrap_or_default()
        };
        Ok(Self {
            method: header
                .get("method")
                .cloned()
                .unwrap_or_else(|| "infusion".into()),
            name: named("name"),
            word: named("word"),
            settings,
            options: serde_json::from_str(&get("options")?)
                .map_err(|e| bad(format!("options: {e}")))?,
            step: number("step")?,
            adam_step: number("adam_step")?,
            prior,
            loss_scale,
            path,
            optim,
        })
    }
}

/// A metadata value of the safetensors file at `path` (none for a folder or another file).
fn file_metadata(path: &Path, key: &str) -> Option<String> {
    if !path.is_file() {
        return None;
    }
    // SAFETY: as in `Checkpoint::read`: our files are replaced by rename, never in place.
    let map = unsafe { crate::util::mapped::Mapping::open(path) }.ok()?;
    let (_, header) = safetensors::SafeTensors::read_metadata(map.bytes()).ok()?;
    header.metadata().as_ref()?.get(key).cloned()
}

fn all_finite(grads: &BTreeMap<String, Tensor>) -> Result<bool> {
    for g in grads.values() {
        if !crate::util::tensors::all_finite(g)? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole batch where it fits, else the largest pass that does, 1 where none does.
    #[test]
    fn passes_are_the_whole_batch_unless_memory_asks_for_fewer() {
        assert_eq!(auto_micro_batch(4, |_| true), 4);
        assert_eq!(auto_micro_batch(16, |m| m <= 5), 5);
        assert_eq!(auto_micro_batch(4, |_| false), 1);
    }

    /// The passes count the parameters' training state besides the activations: on 14 GiB
    /// free, with SD1.5's shapes (2 GiB of activations a row, `unet_train_bytes`), a learner of
    /// a few KB (Infusion's) takes the whole batch, one of 7 GiB passes of 3, and DreamBooth's
    /// 3.4 GB UNet (12.8 GiB of state) is refused with the argument to change, even in passes
    /// of 1, where the activations alone say the whole batch fits.
    #[test]
    fn passes_count_the_parameters_training_state() {
        const GIB: u128 = 1 << 30;
        let have = 14 * GIB;
        let ensure = |arg: &str, what: &str, need: u128| {
            if need <= have {
                Ok(())
            } else {
                Err(Error::arg(arg, format!("{what} needs {need}")))
            }
        };
        let activations = |rows: usize| rows as u128 * 2_147_483_648;
        let opts = TrainOptions::default();
        assert_eq!(opts.batch, 4);
        let small = state_bytes(16 * 1280 * 4);
        assert_eq!(
            plan_passes(&opts, 0, activations, small, ensure).unwrap(),
            4
        );
        let three = 7 * GIB;
        assert_eq!(
            plan_passes(&opts, 0, activations, three, ensure).unwrap(),
            3
        );
        let dreambooth = state_bytes(859_520_964 * 4);
        assert_eq!(plan_passes(&opts, 0, activations, 0, ensure).unwrap(), 4);
        let e = plan_passes(&opts, 0, activations, dreambooth, ensure).unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        let asked = TrainOptions {
            micro_batch: Some(1),
            ..Default::default()
        };
        let e = plan_passes(&asked, 0, activations, dreambooth, ensure).unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        assert!(plan_passes(&asked, 0, activations, small, ensure).unwrap() == 1);
    }

    /// GradScaler's rule: an overflow skips the step and halves the scale, a run of good steps
    /// doubles it, and an overflow at scale 1 is an error.
    #[test]
    fn the_loss_scale_backs_off_grows_and_gives_up_at_one() {
        let mut s = LossScale::new();
        assert!(!s.after_step(false).unwrap());
        assert_eq!(
            s,
            LossScale {
                scale: 32768.0,
                good: 0
            }
        );
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            assert!(s.after_step(true).unwrap());
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.after_step(true).unwrap());
        assert_eq!(
            s,
            LossScale {
                scale: 65536.0,
                good: 0
            }
        );
        let mut s = LossScale {
            scale: 1.0,
            good: 7,
        };
        let e = s.after_step(false).unwrap_err().to_string();
        assert!(e.contains("f32"), "{e}");
    }
}
