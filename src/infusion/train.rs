//! Infusion training: learn a concept's Δs from a few images.
//!
//! Each step takes a batch of cached image latents, draws a timestep uniformly over the training
//! timesteps and Gaussian noise, runs F without gradient to get its cross-attention maps, runs C
//! with those maps and V' = V + Δ at the word's positions, and takes an AdamW step on the Δs only
//! with loss = MSE(noise, C's prediction). No regularizer.
//!
//! All randomness of step `k` comes from (`seed`, `k`), so a run is deterministic on the CPU and
//! resuming from a checkpoint continues the very same curve.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;

use crate::sd::attention::{
    AttentionCall, AttentionHook, AttnKind, AttnSite, BatchLayout, Guidance, HookCtx, LayerInfo,
    Stream,
};
use crate::infusion::concept::{check_name, Concept};
use crate::error::{Error, Result};
use crate::util::image_io::write_atomic;
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
use crate::sd::tokenizer::word_spans;

/// Prompt templates, `{}` standing for the class word (after textual inversion's list).
pub const DEFAULT_TEMPLATES: [&str; 10] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of my {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
];

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
        }
    }
}

impl TrainOptions {
    fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::arg("batch", "must be at least 1"));
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

/// Loads the training images of a folder (jpg, png, webp; grayscale, RGBA and 16-bit converted
/// to 8-bit RGB, transparency over white), sorted by file name.
pub fn load_images(folder: &Path) -> Result<Vec<(PathBuf, RgbImage)>> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .map(|e| {
                    matches!(
                        e.to_ascii_lowercase().as_str(),
                        "jpg" | "jpeg" | "png" | "webp"
                    )
                })
                .unwrap_or(false)
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::Image {
            path: folder.to_path_buf(),
            msg: "no jpg, png or webp images in this folder".into(),
        });
    }
    paths
        .into_iter()
        .map(|p| {
            let img = image::open(&p).map_err(|e| Error::Image {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            Ok((p, to_rgb_over_white(&img)))
        })
        .collect()
}

/// The images of a folder, as [`load_images`] reads them, without their paths.
pub fn load_image_set(folder: &Path) -> Result<Vec<RgbImage>> {
    Ok(load_images(folder)?.into_iter().map(|(_, i)| i).collect())
}

/// A warning when a folder holds a number of training images Infusion is not meant for.
pub fn image_count_warning(n: usize, folder: &Path) -> Option<String> {
    (!(3..=20).contains(&n)).then(|| {
        format!(
            "{n} images in {}: Infusion is meant for 3-20",
            folder.display()
        )
    })
}

fn to_rgb_over_white(img: &image::DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as f32 / 255.0;
        let c = |v: u8| (v as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        image::Rgb([c(p[0]), c(p[1]), c(p[2])])
    })
}

/// Resizes the shorter side to `size` and crops the centre square.
pub fn square_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size),
        ((h as f64 * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
    image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

/// An RGB image as a `(1, 3, H, W)` tensor in [-1, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?)
}

/// AdamW with its state out in the open (so checkpoints can hold it), PyTorch's update rule.
#[derive(Debug)]
struct AdamW {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: usize,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    fn new(lr: f64, weight_decay: f64, vars: &BTreeMap<String, Var>) -> Result<Self> {
        let zeros = |v: &Var| v.zeros_like();
        let m = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), zeros(v)?)))
            .collect::<Result<_>>()?;
        let v = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), zeros(v)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m,
            v,
        })
    }

    fn update(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (k, var) in vars {
            let g = &grads[k];
            let m = ((&self.m[k] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[k] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            var.set(&(decayed - (update * self.lr)?)?)?;
            self.m.insert(k.clone(), m);
            self.v.insert(k.clone(), v);
        }
        Ok(())
    }
}

/// Records F's cross-attention probabilities, every row (no gradient).
struct RecordMaps(Mutex<HashMap<String, Tensor>>);

impl AttentionHook for RecordMaps {
    fn wants(&self, layer: &LayerInfo) -> bool {
        layer.kind == AttnKind::CrossAttention
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let rows = (0..site.rows.len())
            .map(|r| call.probs(r)?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let maps = Tensor::cat(&rows, 0)?.detach();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(site.layer.path.clone(), maps);
        Ok(())
    }
}

/// C's pass: F's maps for every row, values plus the per-row Δ offsets.
struct ReplayMaps<'a> {
    maps: &'a HashMap<String, Tensor>,
    offsets: &'a HashMap<String, Tensor>,
}

impl AttentionHook for ReplayMaps<'_> {
    fn wants(&self, layer: &LayerInfo) -> bool {
        layer.kind == AttnKind::CrossAttention
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let path = &site.layer.path;
        let maps = self
            .maps
            .get(path)
            .ok_or_else(|| candle_core::Error::Msg(format!("no F maps for {path}")))?;
        for row in 0..site.rows.len() {
            call.set_probs(row, maps.get(row)?)?;
        }
        if let Some(off) = self.offsets.get(path) {
            let v = call.values().clone();
            call.set_values((&v + off.to_dtype(v.dtype())?)?)?;
        }
        Ok(())
    }
}

/// What C adds in one batch row: for each concept, the token positions of its word and its Δ
/// per layer (a `Var`'s tensor when training).
pub type RowEdit<'a> = Vec<(Vec<usize>, &'a BTreeMap<String, Tensor>)>;

/// The noise predictions of F and C on one batch: F's pass (no gradient) gives the
/// cross-attention maps; C's pass uses them and V' = V + Δ at each concept's positions of each
/// row. `z_t`: noisy latents; `timesteps`: one per row; `context`: `(b, tokens, width)` text
/// states. Gradients reach the Δs only through the values.
pub fn infusion_eps(
    sd: &StableDiffusion,
    z_t: &Tensor,
    timesteps: &[usize],
    context: &Tensor,
    edits: &[RowEdit<'_>],
) -> Result<(Tensor, Tensor)> {
    let dt = sd.dtype();
    let dev = sd.device();
    let n = z_t.dim(0)?;
    if timesteps.len() != n || edits.len() != n || context.dim(0)? != n {
        return Err(Error::arg(
            "batch",
            format!(
                "{n} latents, {} timesteps, {} row edits, {} text states",
                timesteps.len(),
                edits.len(),
                context.dim(0)?
            ),
        ));
    }
    let z_t = z_t.to_dtype(dt)?;
    let t = Tensor::new(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), dev)?;
    let ctx = context.to_dtype(dt)?;
    let keys = ctx.dim(1)?;
    let rows = BatchLayout::uniform(n, Stream::Foundational, Guidance::Conditional);
    let record = RecordMaps(Mutex::new(HashMap::new()));
    let eps_f = sd.unet.forward(
        &z_t,
        &t,
        &ctx,
        Some(&HookCtx {
            hook: &record,
            rows: &rows,
            step: None,
        }),
    )?;
    let maps = record.0.into_inner().unwrap_or_else(|e| e.into_inner());
    // Per distinct Δ map, a one-hot mask over (row, position): offsets = Σ mask x Δ.
    let mut groups: Vec<(&BTreeMap<String, Tensor>, Vec<f32>)> = vec![];
    for (r, edit) in edits.iter().enumerate() {
        for (positions, deltas) in edit {
            let i = match groups.iter().position(|(d, _)| std::ptr::eq(*d, *deltas)) {
                Some(i) => i,
                None => {
                    groups.push((deltas, vec![0f32; n * keys]));
                    groups.len() - 1
                }
            };
            for &k in positions {
                if k >= keys {
                    return Err(Error::arg(
                        "positions",
                        format!("position {k} is past {keys} tokens"),
                    ));
                }
                groups[i].1[r * keys + k] = 1.0;
            }
        }
    }
    let mut offsets: HashMap<String, Tensor> = HashMap::new();
    for (deltas, mask) in groups {
        let mask = Tensor::from_vec(mask, (n, keys, 1), dev)?;
        for (layer, d) in deltas {
            let d = d.to_device(dev)?.to_dtype(DType::F32)?;
            let inner = d.dim(0)?;
            let term = mask.broadcast_mul(&d.reshape((1, 1, inner))?)?;
            let sum = match offsets.remove(layer) {
                Some(prev) => (prev + term)?,
                None => term,
            };
            offsets.insert(layer.clone(), sum);
        }
    }
    let replay = ReplayMaps {
        maps: &maps,
        offsets: &offsets,
    };
    let rows_c = BatchLayout::uniform(n, Stream::Customized, Guidance::Conditional);
    let eps_c = sd.unet.forward(
        &z_t,
        &t,
        &ctx,
        Some(&HookCtx {
            hook: &replay,
            rows: &rows_c,
            step: None,
        }),
    )?;
    Ok((eps_f, eps_c))
}

/// The Infusion training loss of one batch: the mean squared error of C's prediction (see
/// [`infusion_eps`]) against `noise`, with the concept's Δs at `positions[row]`. `z0`: scaled
/// clean latents `(b, C, h, w)`.
pub fn infusion_loss(
    sd: &StableDiffusion,
    z0: &Tensor,
    timesteps: &[usize],
    noise: &Tensor,
    context: &Tensor,
    positions: &[Vec<usize>],
    deltas: &BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    if positions.len() != z0.dim(0)? {
        return Err(Error::arg(
            "positions",
            format!(
                "{} position lists for {} latents",
                positions.len(),
                z0.dim(0)?
            ),
        ));
    }
    let z_t = sd.scheduler.add_noise(z0, noise, timesteps)?;
    let edits: Vec<RowEdit<'_>> = positions
        .iter()
        .map(|p| vec![(p.clone(), deltas)])
        .collect();
    let (_, eps_c) = infusion_eps(sd, &z_t, timesteps, context, &edits)?;
    Ok((eps_c.to_dtype(DType::F32)? - noise.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()?)
}

/// One training example's randomness.
#[derive(Debug, Clone)]
struct Draw {
    image: usize,
    template: usize,
    timestep: usize,
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

/// A concept being trained on one model.
pub struct Trainer<'a> {
    sd: &'a StableDiffusion,
    name: String,
    word: String,
    opts: TrainOptions,
    /// `(n, C, h, w)` mean and std of the images' latent distributions (unscaled).
    lat_mean: Tensor,
    lat_std: Tensor,
    /// `(templates, tokens, width)` text states, and the word's positions per template.
    states: Tensor,
    positions: Vec<Vec<usize>>,
    layers: Vec<LayerInfo>,
    vars: BTreeMap<String, Var>,
    adam: AdamW,
    step: usize,
    /// The Δs before the last update (to roll back to when the loss turns non-finite).
    previous: Option<BTreeMap<String, Tensor>>,
}

/// The random stream of training step `step` (`eval`: the evaluation set's).
fn step_rng(seed: u64, step: usize, eval: bool) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2 * step as u64 + u64::from(eval));
    rng
}

impl<'a> Trainer<'a> {
    /// Prepares training: crops and encodes the images once (and their mirror images), encodes
    /// the templates, sets every Δ to zero.
    pub fn new(
        sd: &'a StableDiffusion,
        name: &str,
        word: &str,
        images: &[RgbImage],
        opts: TrainOptions,
    ) -> Result<Self> {
        check_name(name)?;
        opts.validate()?;
        if images.is_empty() {
            return Err(Error::arg("images", "no training images"));
        }
        let size = sd.default_size() as u32;
        let dev = sd.device();
        let mut batch = vec![];
        for img in images {
            let sq = square_crop(img, size);
            batch.push(image_to_tensor(&sq, dev)?);
            if opts.flip {
                batch.push(image_to_tensor(
                    &image::imageops::flip_horizontal(&sq),
                    dev,
                )?);
            }
        }
        let mut means = vec![];
        let mut stds = vec![];
        for img in &batch {
            let d = sd.vae.encode(&img.to_dtype(sd.vae_dtype())?)?;
            means.push(d.mean.to_dtype(DType::F32)?);
            stds.push(d.std.to_dtype(DType::F32)?);
        }
        let word = word.trim().to_string();
        let mut tokens = vec![];
        let mut positions = vec![];
        for t in &opts.templates {
            let prompt = t.replace("{}", &word);
            let tok = sd.tokenize(&prompt)?;
            let start = t.find("{}").unwrap_or(0);
            let span = start..start + word.len();
            let pos = tok.positions_of_span(span);
            if pos.is_empty() || word_spans(&prompt, &word).is_empty() {
                return Err(Error::arg(
                    "templates",
                    format!("the class word {word:?} is lost in {prompt:?} (too long?)"),
                ));
            }
            positions.push(pos);
            tokens.push(tok);
        }
        let states = sd.text_states(&tokens.iter().collect::<Vec<_>>())?.detach();
        let layers: Vec<LayerInfo> = sd
            .unet
            .attention_layers()
            .into_iter()
            .filter(|l| l.kind == AttnKind::CrossAttention)
            .cloned()
            .collect();
        let vars = layers
            .iter()
            .map(|l| Ok((l.path.clone(), Var::zeros(l.inner_dim(), DType::F32, dev)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let adam = AdamW::new(opts.lr, opts.weight_decay, &vars)?;
        Ok(Self {
            sd,
            name: name.to_string(),
            word,
            opts,
            lat_mean: Tensor::cat(&means, 0)?,
            lat_std: Tensor::cat(&stds, 0)?,
            states,
            positions,
            layers,
            vars,
            adam,
            step: 0,
            previous: None,
        })
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// Changes how many steps [`Trainer::run`] trains to (to train on in stages).
    pub fn set_total_steps(&mut self, steps: usize) {
        self.opts.steps = steps;
    }

    /// Number of training images (with mirror images).
    pub fn n_images(&self) -> usize {
        self.lat_mean.dims()[0]
    }

    /// The concept with the Δs reached so far.
    pub fn concept(&self) -> Result<Concept> {
        let mut c = Concept::zeros(
            &self.name,
            &self.word,
            &self.layers,
            Some(self.sd.unet_fingerprint().to_string()),
        )?;
        for (k, v) in &self.vars {
            c.deltas
                .insert(k.clone(), v.as_tensor().to_device(&Device::Cpu)?);
        }
        c.train = serde_json::json!({
            "steps": self.step,
            "lr": self.opts.lr,
            "batch": self.opts.batch,
            "seed": self.opts.seed,
            "templates": self.opts.templates,
            "flip": self.opts.flip,
            "weight_decay": self.opts.weight_decay,
            "images": self.n_images(),
        });
        Ok(c)
    }

    /// `n` draws (image, template, timestep) and the VAE-sample and diffusion noise tensors.
    fn draws(&self, rng: &mut ChaCha8Rng, n: usize) -> Result<(Vec<Draw>, Tensor, Tensor)> {
        let t_max = self.sd.scheduler.num_train_timesteps();
        let draws: Vec<Draw> = (0..n)
            .map(|_| Draw {
                image: rng.random_range(0..self.n_images()),
                template: rng.random_range(0..self.opts.templates.len()),
                timestep: rng.random_range(0..t_max),
            })
            .collect();
        let mut shape = self.lat_mean.dims().to_vec();
        shape[0] = n;
        let numel: usize = shape.iter().product();
        let dev = self.sd.device();
        let mut normal = || -> Result<Tensor> {
            let v: Vec<f32> = (0..numel)
                .map(|_| rand_distr::StandardNormal.sample(rng))
                .collect();
            Ok(Tensor::from_vec(v, shape.as_slice(), dev)?)
        };
        let vae_noise = normal()?;
        let noise = normal()?;
        Ok((draws, vae_noise, noise))
    }

    /// Loss of C with the given Δ tensors on `draws` (with gradient when the Δs are `Var`s).
    fn loss(
        &self,
        draws: &[Draw],
        vae_noise: &Tensor,
        noise: &Tensor,
        deltas: &BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let sd = self.sd;
        let dev = sd.device();
        let idx = Tensor::new(
            draws.iter().map(|d| d.image as u32).collect::<Vec<_>>(),
            dev,
        )?;
        let mean = self.lat_mean.index_select(&idx, 0)?;
        let std = self.lat_std.index_select(&idx, 0)?;
        let z0 = sd.vae.scale(&(mean + (std * vae_noise)?)?)?;
        let ts: Vec<usize> = draws.iter().map(|d| d.timestep).collect();
        let tidx = Tensor::new(
            draws.iter().map(|d| d.template as u32).collect::<Vec<_>>(),
            dev,
        )?;
        let ctx = self.states.index_select(&tidx, 0)?;
        let positions: Vec<Vec<usize>> = draws
            .iter()
            .map(|d| self.positions[d.template].clone())
            .collect();
        infusion_loss(sd, &z0, &ts, noise, &ctx, &positions, deltas)
    }

    fn var_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// One optimization step; returns its loss. A non-finite loss is an error that rolls the
    /// Δs back to those of the last finite loss (one update back, when there was one).
    pub fn step(&mut self) -> Result<f32> {
        let mut rng = step_rng(self.opts.seed, self.step, false);
        let (draws, vae_noise, noise) = self.draws(&mut rng, self.opts.batch)?;
        let loss = self.loss(&draws, &vae_noise, &noise, &self.var_tensors())?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            let failed = self.step + 1;
            if let Some(prev) = self.previous.take() {
                for (k, v) in &self.vars {
                    v.set(&prev[k])?;
                }
                self.step -= 1;
            }
            return Err(Error::arg(
                "training",
                format!(
                    "the loss became {value} at step {failed}: stopped, keeping the Δs of step {} \
                     (the last with a finite loss); try a lower learning rate",
                    self.step
                ),
            ));
        }
        let grads = loss.backward()?;
        let g = self
            .vars
            .iter()
            .map(|(k, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or(v.as_tensor().zeros_like()?);
                Ok((k.clone(), g))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.previous = Some(
            self.vars
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
        );
        self.adam.update(&self.vars, &g)?;
        self.step += 1;
        Ok(value)
    }

    /// Mean loss over a fixed evaluation set of `n` draws from `seed` (image, t, noise), with the
    /// current Δs, or with Δ = 0 when `zero`.
    pub fn eval_loss(&self, seed: u64, n: usize, zero: bool) -> Result<f32> {
        let probe = self.draws(&mut step_rng(seed, 0, true), n)?;
        let deltas = if zero {
            self.var_tensors()
                .into_iter()
                .map(|(k, v)| Ok((k, v.zeros_like()?)))
                .collect::<Result<_>>()?
        } else {
            self.vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect()
        };
        let mut total = 0.0;
        for chunk in 0..n.div_ceil(self.opts.batch) {
            let a = chunk * self.opts.batch;
            let b = (a + self.opts.batch).min(n);
            let l = self.loss(
                &probe.0[a..b],
                &probe.1.narrow(0, a, b - a)?,
                &probe.2.narrow(0, a, b - a)?,
                &deltas,
            )?;
            total += l.to_scalar::<f32>()? as f64 * (b - a) as f64;
        }
        Ok((total / n as f64) as f32)
    }

    /// Runs the remaining steps with a progress bar showing the loss. Ctrl-C (the job's cancel)
    /// stops after the current step, keeping the Δs reached; checkpoints are written as asked.
    pub fn run(&mut self, job: &Job) -> Result<TrainReport> {
        let total = self.opts.steps;
        let bar = job.bar(total.saturating_sub(self.step), "train");
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
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
            if let (Some(every), Some(dir)) =
                (self.opts.checkpoint_every, &self.opts.checkpoint_dir)
            {
                if self.step.is_multiple_of(every) {
                    report.checkpoints.push(self.save_checkpoint(dir)?);
                }
            }
        }
        bar.finish_and_clear();
        Ok(report)
    }

    /// Writes `DIR/NAME-stepNNNNNN.safetensors` (a concept file, usable as it is) and beside it
    /// `.optim.safetensors` with the optimizer state, for [`Trainer::resume`].
    pub fn save_checkpoint(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(format!("{}-step{:06}.safetensors", self.name, self.step));
        self.concept()?.save(&path, DType::F32)?;
        let mut tensors: Vec<(String, Tensor)> = vec![];
        for (k, m) in &self.adam.m {
            tensors.push((format!("m/{k}"), m.to_device(&Device::Cpu)?));
        }
        for (k, v) in &self.adam.v {
            tensors.push((format!("v/{k}"), v.to_device(&Device::Cpu)?));
        }
        let meta = HashMap::from([
            ("format".to_string(), "infusion-optimizer/1".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("adam_step".to_string(), self.adam.step.to_string()),
            (
                "options".to_string(),
                serde_json::to_string(&self.opts).map_err(|e| Error::arg("options", e))?,
            ),
        ]);
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| Error::arg("checkpoint", e.to_string()))?;
        let opt_path = optimizer_path(&path);
        write_atomic(&opt_path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(&opt_path, e))
        })?;
        Ok(path)
    }

    /// Continues training from a checkpoint written by [`Trainer::save_checkpoint`], with the
    /// same images; `steps` may be raised to train further.
    pub fn resume(
        sd: &'a StableDiffusion,
        checkpoint: &Path,
        images: &[RgbImage],
        steps: Option<usize>,
    ) -> Result<Self> {
        let concept = Concept::load(checkpoint)?;
        concept.check_model(sd.unet.attention_layers(), sd.unet_fingerprint(), false)?;
        let opt_path = optimizer_path(checkpoint);
        let data = std::fs::read(&opt_path).map_err(|e| Error::io(&opt_path, e))?;
        let bad = |msg: String| Error::Safetensors {
            path: opt_path.clone(),
            msg,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&data).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))
        };
        let mut opts: TrainOptions =
            serde_json::from_str(&get("options")?).map_err(|e| bad(format!("options: {e}")))?;
        if let Some(s) = steps {
            opts.steps = s;
        }
        let step: usize = get("step")?.parse().map_err(|_| bad("bad `step`".into()))?;
        let adam_step: usize = get("adam_step")?
            .parse()
            .map_err(|_| bad("bad `adam_step`".into()))?;
        let tensors = candle_core::safetensors::load_buffer(&data, sd.device())
            .map_err(|e| bad(crate::error::root_cause(&e)))?;
        let mut t = Trainer::new(sd, &concept.name, &concept.word, images, opts)?;
        for (k, var) in &t.vars {
            var.set(&concept.deltas[k].to_device(sd.device())?)?;
            let m = tensors
                .get(&format!("m/{k}"))
                .ok_or_else(|| bad(format!("no `m/{k}`")))?;
            let v = tensors
                .get(&format!("v/{k}"))
                .ok_or_else(|| bad(format!("no `v/{k}`")))?;
            t.adam.m.insert(k.clone(), m.clone());
            t.adam.v.insert(k.clone(), v.clone());
        }
        t.adam.step = adam_step;
        t.step = step;
        Ok(t)
    }
}

fn optimizer_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("optim.safetensors")
}
