//! Benchmarks: seconds per model load, per UNet call, per text-to-image, per Infusion pair and
//! per training step, each the median of a few repeats after a warm-up, with ratios against a
//! baseline measured in the same run. Not a test: numbers are printed, never asserted.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::customize::generate::{generate_pair, PairOptions};
use crate::customize::set::ConceptSet;
use crate::error::Result;
use crate::infusion::concept::Concept;
use crate::job::Job;
use crate::sd::attention::unhooked_attention;
use crate::sd::fused::{self, group_norm::GroupNorm, Kernels};
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::train::{TrainOptions, Trainer};
use crate::util::noise::seeded_noise;

/// The groups of rows `--only` chooses from, in the order they run.
pub const GROUPS: [&str; 9] = [
    "load",
    "unet",
    "vae",
    "txt2img",
    "pair",
    "train",
    "attention",
    "groupnorm",
    "conv",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Denoising steps of the generations.
    pub steps: usize,
    /// Timed repeats of each measurement (after one warm-up run).
    pub repeats: usize,
    /// The groups of rows to run (of [`GROUPS`]); empty: all.
    pub only: Vec<String>,
    /// Images per forward and backward pass of the training rows (see
    /// [`TrainOptions::micro_batch`]); `None`: as training chooses.
    pub micro_batch: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            repeats: 3,
            only: vec![],
            micro_batch: None,
        }
    }
}

impl BenchOptions {
    fn runs(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }

    /// Checks `only` against [`GROUPS`].
    pub fn check(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(crate::error::Error::arg(
                "steps",
                "must be at least 1 (the text-to-image and pair rows run that many steps)",
            ));
        }
        if self.repeats == 0 {
            return Err(crate::error::Error::arg(
                "repeats",
                "must be at least 1 (each row is the median of that many timed runs)",
            ));
        }
        match self.only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
            Some(g) => Err(crate::error::Error::arg(
                "only",
                format!("unknown group `{g}` (groups: {})", GROUPS.join(", ")),
            )),
            None => Ok(()),
        }
    }
}

/// How to load the benchmarked model again (its `load` row).
pub type Reload<'a> = &'a dyn Fn() -> Result<StableDiffusion>;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub name: String,
    /// Median seconds per call.
    pub seconds: f64,
    pub repeats: usize,
    /// `(baseline name, seconds / baseline seconds)`.
    pub ratio: Option<(String, f64)>,
    /// Peak device memory in bytes, where the device reports it.
    pub peak_memory_bytes: Option<u64>,
}

/// A whole benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// The kernels the model runs (`naive` or `fused`, see [`crate::sd::fused`]).
    pub kernels: String,
    /// `cudnn` when the binary was built with the `cudnn` feature (on CUDA), `gemm + winograd
    /// 3x3` for f32 on the CPU ([`crate::sd::cpu::conv`]), else `im2col` (candle's).
    pub convolutions: String,
    /// `release`, or `debug` for a binary built without `--release` (this crate's own kernels at
    /// opt-level 1: about 2x slower on the CPU, so its timings compare only with each other).
    pub build: String,
    pub image_size: usize,
    pub steps: usize,
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// A plain-text table.
    /// What was measured on what, and the column titles.
    pub fn header(&self) -> String {
        let debug = if self.build == "debug" {
            "(a debug build runs this crate's kernels at opt-level 1: compare it with debug builds \
             only)\n"
        } else {
            ""
        };
        format!(
            "{debug}{} on {} ({}, {} kernels, {} convolutions, {} build), {}x{} images, {} steps\n{:<40} {:>12} {:>8} {:>10}  {}\n",
            self.model,
            self.device,
            self.dtype,
            self.kernels,
            self.convolutions,
            self.build,
            self.image_size,
            self.image_size,
            self.steps,
            "measurement",
            "seconds",
            "repeats",
            "peak MiB",
            "time ratio"
        )
    }

    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = self.header();
        for r in &self.rows {
            s.push_str(&r.line());
        }
        s
    }
}

impl BenchRow {
    /// One line of the table. The ratio is of times: "2.51x the time of naive" is slower.
    pub fn line(&self) -> String {
        let ratio = self
            .ratio
            .as_ref()
            .map(|(b, x)| format!("{x:.2}x the time of {b}"))
            .unwrap_or_default();
        let peak = self
            .peak_memory_bytes
            .map(|b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "-".into());
        format!(
            "{:<40} {:>12.4} {:>8} {:>10}  {}\n",
            self.name, self.seconds, self.repeats, peak, ratio
        )
    }
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Median seconds of `repeats` calls of `f` after one warm-up call, and the peak memory over
/// the timed calls (the GPU's; on the CPU the process's resident peak, weights included). A
/// cancelled `job` (Ctrl-C, SIGTERM) stops it between calls.
///
/// On the CPU the freed memory of the rows before goes back to the system before the
/// warm-up, and the warm-up's stays: the timed calls run as the second and later calls of a
/// job do (a training run's steps reuse the first step's pages; handing them back in between
/// made the timed step clear ~10 GiB of pages again), and the peak counts what this work holds.
fn time<T>(
    dev: &Device,
    repeats: usize,
    job: &Job,
    mut f: impl FnMut() -> Result<T>,
) -> Result<(f64, Option<u64>)> {
    crate::util::memory::release_freed();
    f()?;
    sync(dev)?;
    let reset = crate::sd::device::reset_peak(dev);
    let mut times = Vec::with_capacity(repeats.min(1 << 16));
    for _ in 0..repeats.max(1) {
        job.check()?;
        let t0 = Instant::now();
        f()?;
        sync(dev)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let peak = reset.then(|| crate::sd::device::peak_bytes(dev)).flatten();
    Ok((times[times.len() / 2], peak))
}

fn row(
    name: &str,
    (seconds, peak): (f64, Option<u64>),
    repeats: usize,
    baseline: Option<(&str, f64)>,
) -> BenchRow {
    BenchRow {
        name: name.to_string(),
        seconds,
        repeats,
        ratio: baseline.map(|(b, s)| (b.to_string(), seconds / s)),
        peak_memory_bytes: peak,
    }
}

const PROMPT: &str = "a photo of a cat sitting by a teapot";

/// The name of a method's training-step row: `training step, batch 4` for the default method,
/// else with the method and its count settings (`training step, batch 4, lora rank 4`), as
/// tools/diffusers_method_steps.py names its rows.
fn train_row(method: &dyn crate::methods::Method, settings: &crate::methods::Settings) -> String {
    if method.name() == crate::methods::default_method().name() {
        return "training step, batch 4".into();
    }
    let mut name = format!("training step, batch 4, {}", method.name());
    for s in method.settings() {
        if let crate::methods::SettingValue::Count(_) = s.default {
            if let Some(v) = settings.get(s.name) {
                name.push_str(&format!(" {} {v}", s.name));
            }
        }
    }
    name
}

/// One benchmark run on one model: the rows measured so far.
struct Bench<'a> {
    sd: &'a StableDiffusion,
    opts: &'a BenchOptions,
    job: &'a Job,
    dev: Device,
    /// The latent grid of the model's native size.
    hw: (usize, usize),
    report: BenchReport,
    on_row: &'a mut dyn FnMut(&BenchReport) -> Result<()>,
}

impl Bench<'_> {
    /// Seeded inputs on the model's device, in its dtype.
    fn noise(&self, seed: u64, dims: &[usize]) -> Result<Tensor> {
        Ok(seeded_noise(seed, dims)?
            .to_device(&self.dev)?
            .to_dtype(self.sd.dtype())?)
    }

    /// Times `f` and adds the row; returns its seconds (a baseline for later rows).
    /// Times `f`, adds the row and shows it at once (a run cut short keeps what it measured).
    fn measure<T>(
        &mut self,
        name: &str,
        baseline: Option<(&str, f64)>,
        f: impl FnMut() -> Result<T>,
    ) -> Result<f64> {
        // Progress on stderr (the table stays clean on stdout): SD1.5's rows take minutes.
        eprintln!(
            "measuring {name}: 1 warm-up + {} timed run(s)...",
            self.opts.repeats.max(1)
        );
        let t = time(&self.dev, self.opts.repeats, self.job, f)?;
        self.record(name, t, baseline)
    }

    /// Adds a row of `(seconds, peak)` and shows the report so far (rows print as measured);
    /// returns the seconds.
    fn record(
        &mut self,
        name: &str,
        t: (f64, Option<u64>),
        baseline: Option<(&str, f64)>,
    ) -> Result<f64> {
        self.report
            .rows
            .push(row(name, t, self.opts.repeats, baseline));
        (self.on_row)(&self.report)?;
        Ok(t.0)
    }

    /// Seconds per denoising step of whole runs `f(steps)`, measured as a user's runs show it:
    /// (t(3 steps) - t(1 step)) / 2, each the median of the timed runs after a warm-up (the
    /// text encoder, the decode and the first step's extra work cancel out). The same method
    /// as tools/cpu_side_by_side.py's diffusers rows of the same name.
    fn measure_per_step<T>(
        &mut self,
        name: &str,
        baseline: Option<(&str, f64)>,
        mut f: impl FnMut(usize) -> Result<T>,
    ) -> Result<f64> {
        let repeats = self.opts.repeats.max(1);
        eprintln!("measuring {name}: runs of 1 and 3 steps, 1 warm-up + {repeats} timed each...");
        let one = time(&self.dev, repeats, self.job, || f(1))?;
        let three = time(&self.dev, repeats, self.job, || f(3))?;
        let seconds = ((three.0 - one.0) / 2.0).max(0.0);
        self.record(name, (seconds, one.1.max(three.1)), baseline)
    }

    /// Loading the model against reading its weight files once into memory (what loading that
    /// copies the weights must at least do).
    fn load(&mut self, reload: Reload<'_>) -> Result<()> {
        let files = self.sd.weight_files().to_vec();
        if files.is_empty() {
            return Ok(());
        }
        let read = self.measure("read the weight files once", None, || {
            files
                .iter()
                .map(|f| std::fs::read(f).map_err(|e| crate::error::Error::io(f, e)))
                .collect::<Result<Vec<_>>>()
        })?;
        self.measure("load the model", Some(("reading its files", read)), reload)?;
        Ok(())
    }

    /// One UNet call at batch 2 (classifier-free guidance) and 4; returns batch 4's seconds.
    fn unet(&mut self) -> Result<f64> {
        let sd = self.sd;
        let (h, w) = self.hw;
        let c = sd.unet.config().in_channels;
        let (tokens, neg) = (sd.tokenize(PROMPT)?, sd.tokenize("")?);
        let states = sd.text_states(&[&neg, &tokens])?;
        let t = Tensor::new(500f32, &self.dev)?;
        let at = |bench: &mut Self, b: usize, name: &str, base: Option<(&str, f64)>| {
            let x = bench.noise(1, &[b, c, h, w])?;
            let ctx = Tensor::cat(&vec![&states; b / 2], 0)?;
            bench.measure(name, base, || Ok(sd.unet.forward(&x, &t, &ctx, None)?))
        };
        let b2 = at(self, 2, "unet forward, batch 2", None)?;
        at(self, 4, "unet forward, batch 4", Some(("unet batch 2", b2)))
    }

    /// What a generation does besides the UNet: the text encoder on a prompt and the empty one
    /// (classifier-free guidance), and the VAE decoding one image.
    fn text_and_vae(&mut self) -> Result<()> {
        let sd = self.sd;
        let (tokens, neg) = (sd.tokenize(PROMPT)?, sd.tokenize("")?);
        self.measure("text encoder, batch 2", None, || {
            sd.text_states(&[&neg, &tokens])
        })?;
        let (h, w) = self.hw;
        let z = seeded_noise(2, &[1, sd.unet.config().in_channels, h, w])?.to_device(&self.dev)?;
        self.measure("vae decode, per image", None, || sd.decode(&z))?;
        Ok(())
    }

    /// Text-to-image, and the Infusion pair (base + custom) against it.
    fn generation(&mut self) -> Result<()> {
        let (sd, job) = (self.sd, self.job);
        let gen_opts = GenerateOptions {
            steps: self.opts.steps,
            ..Default::default()
        };
        let with_steps = |steps| GenerateOptions {
            steps,
            ..gen_opts.clone()
        };
        let (txt2img, plain_step) = if self.opts.runs("txt2img") {
            let whole = self.measure("text-to-image, per image", None, || {
                sd.generate(PROMPT, &gen_opts, job)
            })?;
            let step = self.measure_per_step("text-to-image, per step", None, |steps| {
                sd.generate(PROMPT, &with_steps(steps), job)
            })?;
            (Some(whole), Some(step))
        } else {
            (None, None)
        };
        if !self.opts.runs("pair") {
            return Ok(());
        }
        let mut concept = Concept::zeros("thing", "cat", sd.unet.attention_layers(), None)?;
        for (i, d) in concept.deltas.values_mut().enumerate() {
            *d = (seeded_noise(i as u64, d.dims())? * 0.1)?;
        }
        let mut concepts = ConceptSet::new();
        concepts.insert(concept, false);
        let iopts = PairOptions::from(gen_opts.clone());
        let prompt = "a photo of a <thing> sitting by a teapot";
        self.measure(
            "infusion pair (base+custom)",
            txt2img.map(|t| ("text-to-image", t)),
            || generate_pair(sd, &concepts, prompt, &iopts, None, job),
        )?;
        self.measure_per_step(
            "infusion pair, per step",
            plain_step.map(|t| ("text-to-image per step", t)),
            |steps| {
                let opts = PairOptions::from(with_steps(steps));
                generate_pair(sd, &concepts, prompt, &opts, None, job)
            },
        )?;
        Ok(())
    }

    /// One training step at batch 4, against a UNet call at batch 4.
    fn training(&mut self, unet4: Option<f64>) -> Result<()> {
        let size = self.sd.default_size() as u32;
        let images: Vec<image::RgbImage> = (0..3u8)
            .map(|i| {
                image::RgbImage::from_fn(size, size, |x, y| image::Rgb([x as u8, y as u8, i * 60]))
            })
            .collect();
        let opts = TrainOptions {
            steps: usize::MAX,
            micro_batch: self.opts.micro_batch,
            ..Default::default()
        };
        // Every method of the registry, with its default settings: the paper's first (the row
        // the other methods' are read against), then the others. A method that cannot train
        // this model (DreamBooth on random weights: it trains a copy built from the files) is
        // left out.
        let sd = self.sd;
        for method in crate::methods::REGISTRY {
            let settings =
                crate::methods::resolve_settings(method, &crate::methods::Settings::new())?;
            let learner = match method.learner(sd, &settings, "cat", 0) {
                Ok(l) => l,
                Err(crate::error::Error::Unsupported(why)) => {
                    eprintln!("not measuring {}'s training step: {why}", method.name());
                    continue;
                }
                Err(e) => return Err(e),
            };
            let name = train_row(method, &settings);
            // The rows before keep their freed memory (main.rs): it goes back before this
            // row's check that a batch fits.
            crate::util::memory::release_freed();
            let mut t = match Trainer::new(sd, "thing", "cat", &images, opts.clone(), learner) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("not measuring {name}: {e}");
                    continue;
                }
            };
            // The rows keep their names (tools/compare_bench.py reads them) unless asked for
            // other passes than training's own.
            let (m, batch) = (t.micro_batch(), t.options().batch);
            let name = match self.opts.micro_batch {
                Some(_) if m < batch => format!("{name}, passes of {m}"),
                None if m < batch => {
                    eprintln!("note: {name} runs in passes of {m}, as `train` does here");
                    name
                }
                _ => name,
            };
            self.measure(&name, unet4.map(|t| ("unet batch 4", t)), || t.step())?;
        }
        Ok(())
    }

    /// The first self-attention (the full latent resolution: 4096 tokens for SD1.5) alone, batch
    /// 2: as a layer runs it with naive kernels (on the projections' layout; the blocked op on
    /// the CPU in f32), then the fused kernel where it applies.
    fn attention(&mut self) -> Result<()> {
        let Some(layer) = self
            .sd
            .unet
            .attention_layers()
            .first()
            .map(|l| (*l).clone())
        else {
            return Ok(());
        };
        let (heads, d) = (layer.heads, layer.head_dim);
        let n = self.hw.0 * self.hw.1;
        let qkv = (0..3)
            .map(|i| self.noise(10 + i, &[2, n, heads * d]))
            .collect::<Result<Vec<_>>>()?;
        let scale = 1.0 / (d as f64).sqrt();
        let name = format!("self-attention {n}x{d}, batch 2");
        let run = |kernels| unhooked_attention(&qkv[0], &qkv[1], &qkv[2], heads, scale, kernels);
        let naive = self.measure(&format!("{name}, naive"), None, || Ok(run(Kernels::Naive)?))?;
        // The per-head views the fused op would take (it asks their dtype and head size).
        let heads_of = |t: &Tensor| t.reshape((2, n, heads, d))?.transpose(1, 2);
        let (q, k, v) = (heads_of(&qkv[0])?, heads_of(&qkv[1])?, heads_of(&qkv[2])?);
        if fused::attention::supports(&q, &k, &v) {
            self.measure(&format!("{name}, fused"), Some(("naive", naive)), || {
                Ok(run(Kernels::Fused)?)
            })?;
        }
        Ok(())
    }

    /// Two 3x3 convolutions (stride 1, padding 1) per level of the UNet at batch 2, as its
    /// layers run them: channels in = out (most of them), and the up path's first (its input
    /// the deeper level's output beside the skip connection: 2560 -> 1280 channels at SD1.5's
    /// 16x16 level). Most of a UNet call's convolution time, level by level.
    fn convolutions(&mut self) -> Result<()> {
        let channels = self.sd.unet.config().block_out_channels.clone();
        let (mut h, mut w) = self.hw;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        for (i, &c) in channels.iter().enumerate() {
            // The deepest level's up path takes its own width twice.
            let deeper = channels.get(i + 1).copied().unwrap_or(c);
            for (j, c_in) in [c, c + deeper].into_iter().enumerate() {
                let seed = 30 + 10 * j as u64 + i as u64;
                let x = self.noise(seed, &[2, c_in, h, w])?;
                let k = (self.noise(seed + 100, &[c, c_in, 3, 3])? * 0.02)?;
                let b = self.noise(seed + 200, &[c])?;
                let conv = crate::sd::nn::Conv2d::new(k, Some(b), cfg);
                let name = match j {
                    0 => format!("conv 3x3 2x{c}x{h}x{w}"),
                    _ => format!("conv 3x3 2x{c_in}x{h}x{w} -> {c}"),
                };
                self.measure(&name, None, || Ok(candle_core::Module::forward(&conv, &x)?))?;
            }
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
        }
        Ok(())
    }

    /// The first ResNet's group norm + SiLU (full resolution, first block's width), both ways
    /// whatever the model's kernels: a layer built naive, and the fused op.
    fn group_norm(&mut self) -> Result<()> {
        let cfg = self.sd.unet.config().clone();
        let Some(&ch) = cfg.block_out_channels.first() else {
            return Ok(());
        };
        let (h, w) = self.hw;
        let x = self.noise(20, &[2, ch, h, w])?;
        let gn = GroupNorm::new(
            self.noise(21, &[ch])?,
            self.noise(22, &[ch])?,
            cfg.norm_num_groups,
            cfg.norm_eps,
            Kernels::Naive,
        )?;
        let name = format!("group norm + SiLU 2x{ch}x{h}x{w}");
        let naive = self.measure(
            &format!("{name}, naive"),
            None,
            || Ok(gn.forward(&x, true)?),
        )?;
        self.measure(&format!("{name}, fused"), Some(("naive", naive)), || {
            Ok(gn.fused(&x, true)?)
        })?;
        Ok(())
    }
}

/// Runs the measurements `opts` asks for on `sd` (`reload` loads it again, for the load row);
/// `on_row` sees the report after each row is measured.
pub fn run(
    sd: &StableDiffusion,
    model: &str,
    opts: &BenchOptions,
    reload: Option<Reload<'_>>,
    job: &Job,
    on_row: &mut dyn FnMut(&BenchReport) -> Result<()>,
) -> Result<BenchReport> {
    let size = sd.default_size();
    let report = BenchReport {
        model: model.to_string(),
        device: format!("{:?}", sd.device()),
        dtype: format!("{:?}", sd.dtype()).to_lowercase(),
        kernels: sd.kernels().to_string(),
        convolutions: if cfg!(feature = "cudnn") && !sd.device().is_cpu() {
            "cudnn"
        } else if sd.device().is_cpu() && sd.dtype() == candle_core::DType::F32 {
            // crate::sd::cpu::conv.
            "gemm + winograd 3x3"
        } else {
            "im2col"
        }
        .into(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        image_size: size,
        steps: opts.steps,
        rows: vec![],
    };
    let mut bench = Bench {
        sd,
        opts,
        job,
        dev: sd.device().clone(),
        hw: sd.latent_size(size, size)?,
        report,
        on_row,
    };
    opts.check()?;
    if let Some(reload) = reload.filter(|_| opts.runs("load")) {
        bench.load(reload)?;
    }
    let unet4 = if opts.runs("unet") {
        Some(bench.unet()?)
    } else {
        None
    };
    if opts.runs("vae") {
        bench.text_and_vae()?;
    }
    if opts.runs("txt2img") || opts.runs("pair") {
        bench.generation()?;
    }
    if opts.runs("train") {
        bench.training(unet4)?;
    }
    if opts.runs("attention") {
        bench.attention()?;
    }
    if opts.runs("groupnorm") {
        bench.group_norm()?;
    }
    if opts.runs("conv") {
        bench.convolutions()?;
    }
    Ok(bench.report)
}
