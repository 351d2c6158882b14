//! Training the toy foundation, customizing it by each method, sampling and measuring.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::data::{line, sample_peaks, Layout, Point};
use super::net::{forward, init, Edit, WIDTH};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::config::SchedulerConfig;
use crate::sd::sampler::{Plan, SamplerOptions};
use crate::sd::scheduler::NoiseSchedule;
use crate::train::optim::AdamW;
use crate::util::noise::normal;
use crate::util::tensors::plain_values;

/// DDIM steps of every toy sample.
pub const SAMPLE_STEPS: usize = 50;
const FORMAT: &str = "infusion-toy/1";

/// The noise schedule of the toys: DDPM's linear betas 1e-4..0.02 over 1000 steps.
fn schedule() -> NoiseSchedule {
    let cfg: SchedulerConfig = serde_json::from_str(
        r#"{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "clip_sample": false, "set_alpha_to_one": true,
            "steps_offset": 0, "timestep_spacing": "leading"}"#,
    )
    .expect("the toy schedule parses");
    NoiseSchedule::new(&cfg)
}

/// How the foundation trains.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyTrainOptions {
    pub seed: u64,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
}

impl ToyTrainOptions {
    /// What fits each layout in well under a minute on a 2-core CPU: four peaks 2000 steps at
    /// lr 2e-3 (each concept's samples within W2 0.1 of its peak), the grid 4000 at 5e-3 (about
    /// 20 of the 25 diversities under the bare concept prompt); batch 256, cosine decay.
    pub fn for_layout(layout: Layout) -> Self {
        let (steps, lr) = match layout {
            Layout::FourPeaks => (2000, 2e-3),
            Layout::Grid25 => (4000, 5e-3),
        };
        Self {
            seed: 0,
            steps,
            batch: 256,
            lr,
        }
    }
}

/// A trained toy foundation model.
pub struct Toy {
    pub layout: Layout,
    pub params: BTreeMap<String, Tensor>,
    /// Training steps it had.
    pub steps: usize,
    schedule: NoiseSchedule,
}

/// Prompts as a `(b, 2)` token tensor.
fn token_tensor(prompts: &[[u32; 2]]) -> Result<Tensor> {
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (prompts.len(), 2), &Device::Cpu)?)
}

fn points_tensor(points: &[Point]) -> Result<Tensor> {
    let flat: Vec<f32> = points.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (points.len(), 2), &Device::Cpu)?)
}

fn to_points(t: &Tensor) -> Result<Vec<Point>> {
    Ok(t.to_vec2::<f32>()?
        .into_iter()
        .map(|r| [r[0], r[1]])
        .collect())
}

/// A training run's settings: AdamW's peak rate, its steps, the seed of its draws, what the
/// progress bar calls it.
#[derive(Clone, Copy)]
struct Fit<'a> {
    lr: f64,
    steps: usize,
    seed: u64,
    what: &'a str,
}

/// AdamW steps on `vars` with the DDPM loss of `batch(rng)` (x0, prompts) through `eps`.
/// Returns the losses.
fn fit(
    vars: &BTreeMap<String, Var>,
    run: &Fit<'_>,
    schedule: &NoiseSchedule,
    job: &Job,
    mut batch: impl FnMut(&mut ChaCha8Rng) -> Result<(Vec<Point>, Vec<[u32; 2]>)>,
    eps: impl Fn(&BTreeMap<String, Tensor>, &Tensor, &[usize], &[[u32; 2]]) -> Result<Tensor>,
    mut after_step: impl FnMut(usize, &BTreeMap<String, Var>) -> Result<()>,
) -> Result<Vec<f32>> {
    let Fit {
        lr,
        steps,
        seed,
        what,
    } = *run;
    let mut adam = AdamW::new(lr, 0.0, vars)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let progress = job.progress(steps, 0, what);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        job.check()?;
        // Cosine decay to a tenth of the rate: the last steps settle the score's fine detail.
        let progress_frac = step as f64 / steps as f64;
        adam.set_lr(lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress_frac).cos())));
        let (x0, prompts) = batch(&mut rng)?;
        let b = x0.len();
        let t: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..schedule.num_train_timesteps()))
            .collect();
        let noise = normal(&mut rng, &[b, 2], &Device::Cpu)?;
        let x_t = schedule.add_noise(&points_tensor(&x0)?, &noise, &t)?;
        let params = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let loss = (eps(&params, &x_t, &t, &prompts)? - &noise)?
            .sqr()?
            .mean_all()?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Diverged(format!(
                "the loss became {value} at step {}: try a lower learning rate",
                step + 1
            )));
        }
        let grads = loss.backward()?;
        adam.update(vars, &crate::train::optim::gradients(&grads, vars, 1.0)?)?;
        losses.push(value);
        progress.set(step + 1, &format!("loss {value:.4}"));
        after_step(step + 1, vars)?;
    }
    progress.finish();
    Ok(losses)
}

fn as_vars(params: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Var>> {
    params
        .iter()
        .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&t.copy()?)?)))
        .collect()
}

/// The most points one [`Toy::sample`] draws (a sample of 1e6 points takes ~0.5 GB through the
/// net's layers; the paper's figures use 1-10 thousand).
pub const MAX_SAMPLES: usize = 1_000_000;

impl Toy {
    /// Trains a foundation of `layout` on its true distribution: every concept's prompt (and,
    /// for the grid, each diversity's prompt half the time, the bare concept's the other half).
    pub fn train(layout: Layout, opts: &ToyTrainOptions, job: &Job) -> Result<Self> {
        if opts.steps == 0 || opts.batch == 0 {
            return Err(Error::arg(
                "train_steps",
                "steps and batch must be at least 1",
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let vars = as_vars(&init(layout.vocab(), &mut rng)?)?;
        let schedule = schedule();
        let n_concepts = layout.concepts().len();
        let batch = |rng: &mut ChaCha8Rng| {
            let mut x0 = Vec::with_capacity(opts.batch);
            let mut prompts = Vec::with_capacity(opts.batch);
            for _ in 0..opts.batch {
                let c = rng.random_range(0..n_concepts);
                let peaks = layout.peaks(c);
                let k = rng.random_range(0..peaks.len());
                let named = layout.diversities_tokens() > 0 && rng.random_bool(0.5);
                x0.extend(sample_peaks(&[peaks[k]], layout.std(), 1, rng));
                let second = if named { layout.diversity_token(k) } else { 0 };
                prompts.push([layout.concept_token(c), second]);
            }
            Ok((x0, prompts))
        };
        let eps = |p: &BTreeMap<String, Tensor>, x: &Tensor, t: &[usize], prompts: &[[u32; 2]]| {
            Ok(forward(p, x, t, &token_tensor(prompts)?, &Edit::default())?.0)
        };
        let what = format!("toy {} foundation", layout.name());
        fit(
            &vars,
            &Fit {
                lr: opts.lr,
                steps: opts.steps,
                seed: opts.seed.wrapping_add(1),
                what: &what,
            },
            &schedule,
            job,
            batch,
            eps,
            |_, _| Ok(()),
        )?;
        Ok(Self {
            layout,
            params: plain_values(&vars)?,
            steps: opts.steps,
            schedule,
        })
    }

    /// The prompt of `concept` (and a diversity of the grid).
    pub fn prompt(&self, concept: usize, diversity: Option<usize>) -> [u32; 2] {
        [
            self.layout.concept_token(concept),
            diversity.map_or(0, |k| self.layout.diversity_token(k)),
        ]
    }

    /// The noise estimate of the foundation, or of a customization of it.
    pub fn eps(
        &self,
        custom: Option<&Customization>,
        x: &Tensor,
        t: &[usize],
        prompts: &[[u32; 2]],
    ) -> Result<Tensor> {
        match custom {
            None => Ok(forward(
                &self.params,
                x,
                t,
                &token_tensor(prompts)?,
                &Edit::default(),
            )?
            .0),
            Some(c) => c.method.eps(self, c.concept, &c.params, x, t, prompts),
        }
    }

    /// `n` samples of `concept`'s prompt (a diversity's on the grid), 50 DDIM steps from seeded
    /// noise, by the foundation or a customization of it.
    pub fn sample(
        &self,
        custom: Option<&Customization>,
        concept: usize,
        diversity: Option<usize>,
        n: usize,
        seed: u64,
    ) -> Result<Vec<Point>> {
        self.check_concept(concept)?;
        if n == 0 || n > MAX_SAMPLES {
            return Err(Error::arg(
                "n",
                format!("{n} points: draw at least 1 and at most {MAX_SAMPLES} at a time"),
            ));
        }
        if let Some(k) = diversity.filter(|&k| k >= self.layout.diversities_tokens()) {
            return Err(Error::arg(
                "diversity",
                format!(
                    "{k}: the {} toy has {} diversity prompts",
                    self.layout.name(),
                    self.layout.diversities_tokens()
                ),
            ));
        }
        let prompts = vec![self.prompt(concept, diversity); n];
        let mut x = normal(&mut ChaCha8Rng::seed_from_u64(seed), &[n, 2], &Device::Cpu)?;
        let plan = Plan::new(&self.schedule, SamplerOptions::default(), SAMPLE_STEPS)?;
        let mut state = plan.state();
        for (index, &t) in plan.timesteps().iter().enumerate() {
            let eps = self.eps(custom, &x, &vec![t as usize; n], &prompts)?;
            x = plan.step(&mut state, index, &eps, &x, None)?;
        }
        to_points(&x)
    }

    pub fn check_concept(&self, concept: usize) -> Result<()> {
        let n = self.layout.concepts().len();
        if concept >= n {
            return Err(Error::arg(
                "concept",
                format!(
                    "{concept} is out of range: the {} toy has {n} concept(s) ({})",
                    self.layout.name(),
                    self.layout.concepts().join(", ")
                ),
            ));
        }
        Ok(())
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Writes the foundation as safetensors (`infusion-toy/1`, its layout in the metadata).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = std::collections::HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("layout".to_string(), self.layout.name().to_string()),
            ("steps".to_string(), self.steps.to_string()),
        ]);
        let bytes =
            safetensors::serialize(self.params.iter().map(|(k, v)| (k.clone(), v)), Some(meta))
                .map_err(|e| Error::Internal(format!("cannot serialize the toy: {e}")))?;
        crate::util::fs::write_atomic(path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(path, e))
        })
    }

    /// Reads a foundation [`Toy::save`] wrote; `layout`, when given, must be the file's.
    pub fn load(path: &Path, layout: Option<Layout>) -> Result<Self> {
        let data = crate::util::fs::read_regular(path)?;
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| bad(format!("not a toy file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a toy file (no `format: {FORMAT}`)")));
        }
        let found = Layout::parse(meta.get("layout").map_or("", String::as_str))
            .map_err(|e| bad(e.to_string()))?;
        if let Some(l) = layout.filter(|l| *l != found) {
            return Err(bad(format!(
                "a {} toy, not a {} one",
                found.name(),
                l.name()
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut params = BTreeMap::new();
        for (name, shape) in super::net::shapes(found.vocab()) {
            let t = tensors
                .get(name)
                .ok_or_else(|| bad(format!("no tensor `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(bad(format!(
                    "`{name}` is {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            params.insert(name.to_string(), t.to_dtype(DType::F32)?);
        }
        Ok(Self {
            layout: found,
            params,
            steps: meta.get("steps").and_then(|s| s.parse().ok()).unwrap_or(0),
            schedule: schedule(),
        })
    }
}

/// How a toy is customized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToyMethod {
    /// Every parameter trains (DreamBooth-like).
    Full,
    /// A residual on the concept token's value; C uses F's attention probabilities.
    Infusion,
    /// A new token's embedding, in the concept token's place in C's prompts.
    TextualInversion,
}

impl ToyMethod {
    pub const NAMES: [&'static str; 3] = ["full", "infusion", "textual_inversion"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "full" => Ok(ToyMethod::Full),
            "infusion" => Ok(ToyMethod::Infusion),
            "textual_inversion" => Ok(ToyMethod::TextualInversion),
            other => Err(Error::arg(
                "method",
                format!(
                    "unknown toy method `{other}` (methods: {})",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// Its default learning rate.
    pub fn default_lr(self) -> f64 {
        match self {
            ToyMethod::Full => 1e-3,
            _ => 1e-2,
        }
    }

    /// What it trains, from the foundation's parameters.
    fn initial(self, toy: &Toy, concept: usize) -> Result<BTreeMap<String, Tensor>> {
        Ok(match self {
            ToyMethod::Full => toy.params.clone(),
            ToyMethod::Infusion => BTreeMap::from([(
                "delta".to_string(),
                Tensor::zeros(WIDTH, DType::F32, &Device::Cpu)?,
            )]),
            ToyMethod::TextualInversion => {
                let row = toy.layout.concept_token(concept) as usize;
                BTreeMap::from([("word".to_string(), toy.params["embed"].get(row)?)])
            }
        })
    }

    /// The customized model's noise estimate with the method's parameters `p`: prompts of other
    /// concepts run the foundation unchanged under Infusion and Textual Inversion.
    fn eps(
        self,
        toy: &Toy,
        concept: usize,
        p: &BTreeMap<String, Tensor>,
        x: &Tensor,
        t: &[usize],
        prompts: &[[u32; 2]],
    ) -> Result<Tensor> {
        let token = toy.layout.concept_token(concept);
        let ours: Vec<bool> = prompts.iter().map(|p| p[0] == token).collect();
        match self {
            ToyMethod::Full => Ok(forward(p, x, t, &token_tensor(prompts)?, &Edit::default())?.0),
            ToyMethod::Infusion => {
                let tokens = token_tensor(prompts)?;
                let (_, probs) = forward(&toy.params, x, t, &tokens, &Edit::default())?;
                let edit = Edit {
                    delta: Some((&p["delta"], &ours)),
                    probs: Some(&probs),
                    word: None,
                };
                Ok(forward(&toy.params, x, t, &tokens, &edit)?.0)
            }
            ToyMethod::TextualInversion => {
                let learned = toy.layout.learned_token();
                let swapped: Vec<[u32; 2]> = prompts
                    .iter()
                    .zip(&ours)
                    .map(|(p, &o)| if o { [learned, p[1]] } else { *p })
                    .collect();
                let edit = Edit {
                    word: Some(&p["word"]),
                    ..Default::default()
                };
                Ok(forward(&toy.params, x, t, &token_tensor(&swapped)?, &edit)?.0)
            }
        }
    }
}

/// A customized toy: the method, its concept and its trained parameters at `step`.
#[derive(Clone)]
pub struct Customization {
    pub method: ToyMethod,
    pub concept: usize,
    pub params: BTreeMap<String, Tensor>,
    pub step: usize,
}

/// How to customize.
#[derive(Debug, Clone)]
pub struct CustomizeOptions {
    pub method: ToyMethod,
    /// The concept customized (its prompt is the bare concept's).
    pub concept: usize,
    /// Grid: how many of the 25 diversities the customization data shows (a line under each,
    /// spread along the diagonal). Four peaks: ignored.
    pub diversities: usize,
    pub steps: usize,
    /// `None`: the method's default.
    pub lr: Option<f64>,
    pub batch: usize,
    pub seed: u64,
    /// Steps at which to keep a snapshot (0: the foundation itself).
    pub snapshots: Vec<usize>,
}

impl Default for CustomizeOptions {
    fn default() -> Self {
        Self {
            method: ToyMethod::Full,
            concept: 0,
            diversities: 5,
            steps: 400,
            lr: None,
            batch: 128,
            seed: 0,
            snapshots: vec![],
        }
    }
}

/// The diversities the customization data shows: `n` spread along the grid's diagonal.
pub fn shown_diversities(layout: Layout, n: usize) -> Vec<usize> {
    match layout {
        Layout::FourPeaks => vec![0],
        Layout::Grid25 if n <= 1 => vec![12],
        // Evenly spaced over the 25 (5 of them: the diagonal).
        Layout::Grid25 => (0..n).map(|i| (i * 24 + (n - 1) / 2) / (n - 1)).collect(),
    }
}

/// A customization run: the final customization, the snapshots asked for, each step's loss.
pub struct CustomRun {
    pub last: Customization,
    pub snapshots: Vec<Customization>,
    pub losses: Vec<f32>,
}

impl CustomRun {
    /// The snapshot at `step` (the last one at its own step).
    pub fn at(&self, step: usize) -> Result<&Customization> {
        if self.last.step == step {
            return Ok(&self.last);
        }
        self.snapshots
            .iter()
            .find(|c| c.step == step)
            .ok_or_else(|| {
                Error::arg(
                    "step",
                    format!(
                        "no snapshot at step {step} (snapshots: {:?}, last: {})",
                        self.snapshots.iter().map(|c| c.step).collect::<Vec<_>>(),
                        self.last.step
                    ),
                )
            })
    }
}

/// Customizes `toy` towards a line under its concept's peak(s) by `opts.method`.
pub fn customize(toy: &Toy, opts: &CustomizeOptions, job: &Job) -> Result<CustomRun> {
    toy.check_concept(opts.concept)?;
    if opts.steps == 0 || opts.batch == 0 {
        return Err(Error::arg(
            "train_steps",
            "steps and batch must be at least 1",
        ));
    }
    if toy.layout == Layout::Grid25 && !(1..=25).contains(&opts.diversities) {
        return Err(Error::arg(
            "diversities",
            format!("{}: the grid has 25 diversities", opts.diversities),
        ));
    }
    if let Some(s) = opts.snapshots.iter().find(|&&s| s > opts.steps) {
        return Err(Error::arg(
            "snapshots",
            format!("step {s} is past the run's {} steps", opts.steps),
        ));
    }
    let peaks = toy.layout.peaks(opts.concept);
    let centres: Vec<Point> = shown_diversities(toy.layout, opts.diversities)
        .into_iter()
        .map(|k| peaks[k])
        .collect();
    let half = 2.0 * toy.layout.std();
    let prompt = toy.prompt(opts.concept, None);
    let vars = as_vars(&opts.method.initial(toy, opts.concept)?)?;
    let mut snapshots = vec![];
    let keep = |step: usize, vars: &BTreeMap<String, Var>| -> Result<Customization> {
        Ok(Customization {
            method: opts.method,
            concept: opts.concept,
            params: plain_values(vars)?,
            step,
        })
    };
    if opts.snapshots.contains(&0) {
        snapshots.push(keep(0, &vars)?);
    }
    // The progress names the layout too: a recipe customizes both layouts with each method.
    let what = format!("toy {} {}", toy.layout.name(), opts.method.name());
    let losses = fit(
        &vars,
        &Fit {
            lr: opts.lr.unwrap_or(opts.method.default_lr()),
            steps: opts.steps,
            seed: opts.seed,
            what: &what,
        },
        &toy.schedule,
        job,
        |rng| {
            let x0: Vec<Point> = (0..opts.batch)
                .map(|i| line(centres[i % centres.len()], half, 1, rng)[0])
                .collect();
            Ok((x0, vec![prompt; opts.batch]))
        },
        |p, x, t, prompts| opts.method.eps(toy, opts.concept, p, x, t, prompts),
        |step, vars| {
            if opts.snapshots.contains(&step) && step < opts.steps {
                snapshots.push(keep(step, vars)?);
            }
            Ok(())
        },
    )?;
    Ok(CustomRun {
        last: keep(opts.steps, &vars)?,
        snapshots,
        losses,
    })
}

/// The latent Fisher divergence between the foundation and a customization on `concepts`' bare
/// prompts (Definition 3.1): the mean over `samples` draws of ½ ||eps_base - eps_custom||², the
/// points drawn from the foundation's own samples of each concept (in turn), noised at uniform
/// timesteps; returns (mean, standard error of the mean).
pub fn fisher(
    toy: &Toy,
    custom: &Customization,
    concepts: &[usize],
    samples: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    if concepts.is_empty() {
        return Err(Error::arg("concepts", "no concept to measure on"));
    }
    if samples < 2 {
        return Err(Error::arg("samples", "at least 2 (for a standard error)"));
    }
    for &c in concepts {
        toy.check_concept(c)?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let per = samples.div_ceil(concepts.len());
    let mut x0 = vec![];
    let mut prompts = vec![];
    for (i, &c) in concepts.iter().enumerate() {
        x0.extend(toy.sample(None, c, None, per, seed.wrapping_add(1 + i as u64))?);
        prompts.extend(std::iter::repeat_n(toy.prompt(c, None), per));
    }
    let n = x0.len();
    let t: Vec<usize> = (0..n)
        .map(|_| rng.random_range(0..toy.schedule.num_train_timesteps()))
        .collect();
    let noise = normal(&mut rng, &[n, 2], &Device::Cpu)?;
    let x_t = toy.schedule.add_noise(&points_tensor(&x0)?, &noise, &t)?;
    let a = toy.eps(None, &x_t, &t, &prompts)?;
    let b = toy.eps(Some(custom), &x_t, &t, &prompts)?;
    let d: Vec<f64> = ((a - b)?.sqr()?.sum(1)? * 0.5)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Ok((mean, (var / n as f64).sqrt()))
}
