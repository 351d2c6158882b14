//! Benchmarks: seconds per UNet call, per text-to-image, per Infusion pair and per training step,
//! each the median of a few repeats after a warm-up, with ratios against a baseline measured in
//! the same run. Not a test: numbers are printed, never asserted.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::sd::attention::naive_attention;
use crate::infusion::concept::Concept;
use crate::error::Result;
use crate::sd::fused::{self, group_norm::GroupNorm, Kernels};
use crate::infusion::concept::ConceptSet;
use crate::infusion::generate::{generate_infusion, InfusionOptions};
use crate::job::Job;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::util::noise::seeded_noise;
use crate::infusion::train::{TrainOptions, Trainer};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Denoising steps of the generations.
    pub steps: usize,
    /// Timed repeats of each measurement (after one warm-up run).
    pub repeats: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            repeats: 3,
        }
    }
}

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
    /// The kernels (`naive` or `fused`, see [`crate::sd::fused`]).
    pub kernels: String,
    /// `cudnn` when the binary was built with the `cudnn` feature, else `im2col` (candle's).
    pub convolutions: String,
    pub image_size: usize,
    pub steps: usize,
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} on {} ({}, {} kernels, {} convolutions), {}x{} images, {} steps\n{:<40} {:>12} {:>8} {:>10}  {}\n",
            self.model,
            self.device,
            self.dtype,
            self.kernels,
            self.convolutions,
            self.image_size,
            self.image_size,
            self.steps,
            "measurement",
            "seconds",
            "repeats",
            "peak MiB",
            "ratio"
        );
        for r in &self.rows {
            let ratio = r
                .ratio
                .as_ref()
                .map(|(b, x)| format!("{x:.2}x {b}"))
                .unwrap_or_default();
            let peak = r
                .peak_memory_bytes
                .map(|b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
                .unwrap_or_else(|| "-".into());
            s.push_str(&format!(
                "{:<40} {:>12.4} {:>8} {:>10}  {}\n",
                r.name, r.seconds, r.repeats, peak, ratio
            ));
        }
        s
    }
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Median seconds of `repeats` calls of `f` after one warm-up call, and the peak device
/// memory over the timed calls (where the device reports it).
fn time<T>(
    dev: &Device,
    repeats: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<(f64, Option<u64>)> {
    f()?;
    sync(dev)?;
    crate::sd::device::reset_peak(dev);
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        f()?;
        sync(dev)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], crate::sd::device::peak_bytes(dev)))
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

/// Runs every measurement on `sd`.
pub fn run(
    sd: &StableDiffusion,
    model: &str,
    opts: &BenchOptions,
    job: &Job,
) -> Result<BenchReport> {
    let dev = sd.device().clone();
    let size = sd.default_size();
    let (h, w) = sd.latent_size(size, size)?;
    let c = sd.unet.config().in_channels;
    let prompt = "a photo of a cat sitting by a teapot";
    let tokens = sd.tokenize(prompt)?;
    let neg = sd.tokenize("")?;
    let states = sd.text_states(&[&neg, &tokens])?;
    let mut rows = vec![];
    // Seeded inputs on the model's device, in its dtype.
    let noise = |seed: u64, dims: &[usize]| -> Result<Tensor> {
        Ok(seeded_noise(seed, dims)?
            .to_device(&dev)?
            .to_dtype(sd.dtype())?)
    };

    let unet = |b: usize| -> Result<(f64, Option<u64>)> {
        let x = noise(1, &[b, c, h, w])?;
        let ctx = Tensor::cat(&vec![&states; b / 2], 0)?;
        let t = Tensor::new(500f32, &dev)?;
        time(&dev, opts.repeats, || {
            Ok(sd.unet.forward(&x, &t, &ctx, None)?)
        })
    };
    let unet2 = unet(2)?;
    let unet4 = unet(4)?;
    rows.push(row("unet forward, batch 2", unet2, opts.repeats, None));
    rows.push(row(
        "unet forward, batch 4",
        unet4,
        opts.repeats,
        Some(("unet batch 2", unet2.0)),
    ));

    let gen_opts = GenerateOptions {
        steps: opts.steps,
        ..Default::default()
    };
    let txt2img = time(&dev, opts.repeats, || sd.generate(prompt, &gen_opts, job))?;
    rows.push(row("text-to-image, per image", txt2img, opts.repeats, None));

    let mut concept = Concept::zeros("thing", "cat", sd.unet.attention_layers(), None)?;
    for (i, d) in concept.deltas.values_mut().enumerate() {
        *d = (seeded_noise(i as u64, d.dims())? * 0.1)?;
    }
    let mut concepts = ConceptSet::new();
    concepts.insert(concept, false);
    let iopts = InfusionOptions {
        generate: gen_opts.clone(),
        replace_steps: 1.0,
    };
    let pair = time(&dev, opts.repeats, || {
        generate_infusion(
            sd,
            &concepts,
            "a photo of a <thing> sitting by a teapot",
            &iopts,
            None,
            job,
        )
    })?;
    rows.push(row(
        "infusion pair (base+custom)",
        pair,
        opts.repeats,
        Some(("text-to-image", txt2img.0)),
    ));

    let images: Vec<image::RgbImage> = (0..3u8)
        .map(|i| {
            image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
                image::Rgb([x as u8, y as u8, i * 60])
            })
        })
        .collect();
    let mut trainer = Trainer::new(
        sd,
        "thing",
        "cat",
        &images,
        TrainOptions {
            steps: usize::MAX,
            ..Default::default()
        },
    )?;
    let step = time(&dev, opts.repeats, || trainer.step())?;
    rows.push(row(
        "training step, batch 4",
        step,
        opts.repeats,
        Some(("unet batch 4", unet4.0)),
    ));

    // The first self-attention (the full latent resolution: 4096 tokens for SD1.5) alone, both
    // implementations, batch 2: what the fused kernel changes, without the rest of the UNet.
    if let Some(layer) = sd.unet.attention_layers().first() {
        let (heads, d) = (layer.heads, layer.head_dim);
        let n = h * w;
        let qkv = (0..3)
            .map(|i| noise(10 + i, &[2, heads, n, d]))
            .collect::<Result<Vec<_>>>()?;
        let scale = 1.0 / (d as f64).sqrt();
        let name = format!("self-attention {n}x{d}, batch 2");
        let naive = time(&dev, opts.repeats, || {
            Ok(naive_attention(&qkv[0], &qkv[1], &qkv[2], scale)?)
        })?;
        rows.push(row(&format!("{name}, naive"), naive, opts.repeats, None));
        if fused::attention::supports(&qkv[0], &qkv[1], &qkv[2]) {
            let fused = time(&dev, opts.repeats, || {
                Ok(fused::attention::fused_attention(
                    &qkv[0], &qkv[1], &qkv[2], scale,
                )?)
            })?;
            rows.push(row(
                &format!("{name}, fused"),
                fused,
                opts.repeats,
                Some(("naive", naive.0)),
            ));
        }
    }

    // The first ResNet's group norm + SiLU (full resolution, first block's width), both ways.
    let cfg = sd.unet.config();
    if let Some(&ch) = cfg.block_out_channels.first() {
        let x = noise(20, &[2, ch, h, w])?;
        let gn = GroupNorm::new(
            noise(21, &[ch])?,
            noise(22, &[ch])?,
            cfg.norm_num_groups,
            cfg.norm_eps,
        )?;
        let name = format!("group norm + SiLU 2x{ch}x{h}x{w}");
        let naive = time(&dev, opts.repeats, || {
            Ok(fused::with_kernels(Kernels::Naive, || {
                gn.forward(&x, true)
            })?)
        })?;
        rows.push(row(&format!("{name}, naive"), naive, opts.repeats, None));
        let fused = time(&dev, opts.repeats, || Ok(gn.fused(&x, true)?))?;
        rows.push(row(
            &format!("{name}, fused"),
            fused,
            opts.repeats,
            Some(("naive", naive.0)),
        ));
    }

    Ok(BenchReport {
        model: model.to_string(),
        device: format!("{dev:?}"),
        dtype: format!("{:?}", sd.dtype()).to_lowercase(),
        kernels: fused::kernels().to_string(),
        convolutions: if cfg!(feature = "cudnn") {
            "cudnn"
        } else {
            "im2col"
        }
        .into(),
        image_size: size,
        steps: opts.steps,
        rows,
    })
}
