//! What training reads: the images, cropped and encoded by the VAE once (with their mirror
//! images) or, with Custom Diffusion's scale augmentation, resized and placed anew each draw;
//! the prompt templates encoded once; and the random batches drawn from them.

use std::path::Path;

use candle_core::{DType, Tensor};
use image::{GrayImage, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::sd::pipeline::StableDiffusion;
use crate::sd::tokenizer::{word_spans, Tokens};
use crate::util::image_io::{image_to_tensor, square_crop};
use crate::util::noise::normal;

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

/// A warning when a folder holds a number of training images Infusion is not meant for.
pub fn image_count_warning(n: usize, folder: &Path) -> Option<String> {
    (!(3..=20).contains(&n)).then(|| {
        format!(
            "{n} images in {}: Infusion is meant for 3-20",
            folder.display()
        )
    })
}

/// How training images are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Augment {
    /// Each image's centre square at the model's size (and its mirror image), encoded once.
    #[default]
    None,
    /// Custom Diffusion's (its script's `CustomDiffusionDataset`): each draw resizes the whole
    /// image to a random square (a third of the model's size up to it, two times in three;
    /// else 1.2x to 1.4x), puts it at a random spot of a gray canvas (or crops a random square
    /// of it), masks the loss outside the image at latent resolution (a latent pixel's border
    /// left out), and says "a far away " or "very small " (below 0.6x) or "zoomed in " or
    /// "close up " (above 1x) before the prompt.
    Scale,
}

/// The prefixes Custom Diffusion's augmentation puts before a prompt (none first).
const PREFIXES: [&str; 5] = ["", "a far away ", "very small ", "zoomed in ", "close up "];

/// Where a draw of [`Augment::Scale`] puts its image: resized to `size` x `size`, its corner
/// at (`top`, `left`) of the canvas (or, when larger, the canvas at (`top`, `left`) of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub size: u32,
    pub top: u32,
    pub left: u32,
}

/// One training example's randomness.
#[derive(Debug, Clone)]
pub struct Draw {
    pub image: usize,
    pub template: usize,
    pub timestep: usize,
    /// With [`Augment::Scale`]: where the image goes, and the prompt's prefix
    /// (an index of [`PREFIXES`]).
    pub placement: Option<(Placement, usize)>,
}

/// `n` examples and their noise: the VAE-sample noise and the diffusion noise.
#[derive(Debug, Clone)]
pub struct Batch {
    pub draws: Vec<Draw>,
    pub vae_noise: Tensor,
    pub noise: Tensor,
}

impl Batch {
    /// Examples `a..b` of the batch.
    pub fn slice(&self, a: usize, b: usize) -> Result<Batch> {
        Ok(Batch {
            draws: self.draws[a..b].to_vec(),
            vae_noise: self.vae_noise.narrow(0, a, b - a)?,
            noise: self.noise.narrow(0, a, b - a)?,
        })
    }

    pub fn len(&self) -> usize {
        self.draws.len()
    }

    pub fn is_empty(&self) -> bool {
        self.draws.is_empty()
    }
}

/// Where a batch's loss counts: a weight per latent pixel of each draw `(b, 1, h, w)`.
#[derive(Debug, Clone)]
pub struct LossMask {
    pub mask: Tensor,
    /// Whether the weights are divided by the latent channels too (the mean over the masked
    /// elements: the users' masks); Custom Diffusion's script divides by the mask's sum alone
    /// (4x the plain MSE for a mask of ones), and its scale augmentation keeps that.
    pub per_channel: bool,
}

/// The mean squared error of `pred` against `target` (f32), over the elements `mask` weighs
/// (per draw, then the mean over the batch), or over all of them.
pub fn mse(pred: &Tensor, target: &Tensor, mask: Option<&LossMask>) -> Result<Tensor> {
    let err = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?;
    Ok(match mask {
        None => err.mean_all()?,
        Some(m) => {
            let kept = err.broadcast_mul(&m.mask)?.sum((1, 2, 3))?;
            let mut weight = m.mask.sum((1, 2, 3))?;
            if m.per_channel {
                weight = (weight * err.dim(1)? as f64)?;
            }
            (kept / weight)?.mean_all()?
        }
    })
}

/// The encoded training images and prompts.
pub struct TrainingSet {
    /// `(n, C, h, w)` mean and std of the images' latent distributions (unscaled), f32
    /// ([`Augment::None`]).
    lat_mean: Tensor,
    lat_std: Tensor,
    /// The images themselves (with mirror images), for [`Augment::Scale`].
    images: Vec<RgbImage>,
    augment: Augment,
    /// `(prompts, tokens, width)` text states, the prompts' tokens, and the word's positions per
    /// prompt: one prompt per template, times each prefix with [`Augment::Scale`].
    states: Tensor,
    tokens: Vec<Tokens>,
    positions: Vec<Vec<usize>>,
    /// Templates (each prompt is `prefix + template`).
    templates: usize,
    /// Whether each image is followed by its mirror image.
    flip: bool,
    /// The users' loss masks `(n, 1, h, w)` at latent resolution, one per image (with mirror
    /// images), in [0, 1] ([`TrainingSet::set_masks`]).
    user_masks: Option<Tensor>,
}

impl TrainingSet {
    /// Crops each image's centre square at the model's size, adds its mirror image when `flip`,
    /// encodes them with the VAE and the templates (with `word`) with the text encoder.
    pub fn new(
        sd: &StableDiffusion,
        word: &str,
        images: &[RgbImage],
        templates: &[String],
        flip: bool,
        augment: Augment,
    ) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::arg("images", "no training images"));
        }
        let size = sd.default_size() as u32;
        let dev = sd.device();
        let mut kept = vec![];
        let mut means = vec![];
        let mut stds = vec![];
        for img in images {
            let both = if flip {
                vec![img.clone(), image::imageops::flip_horizontal(img)]
            } else {
                vec![img.clone()]
            };
            for img in both {
                if augment == Augment::Scale {
                    kept.push(img);
                    continue;
                }
                let sq = image_to_tensor(&square_crop(&img, size), dev)?;
                let d = sd.vae.encode(&sq.to_dtype(sd.vae_dtype())?)?;
                means.push(d.mean.to_dtype(DType::F32)?);
                stds.push(d.std.to_dtype(DType::F32)?);
            }
        }
        let (lat_mean, lat_std) = if means.is_empty() {
            let (h, w) = sd.latent_size(size as usize, size as usize)?;
            let empty = Tensor::zeros((0, sd.unet.config().in_channels, h, w), DType::F32, dev)?;
            (empty.clone(), empty)
        } else {
            (Tensor::cat(&means, 0)?, Tensor::cat(&stds, 0)?)
        };
        let prefixes: &[&str] = match augment {
            Augment::None => &[""],
            Augment::Scale => &PREFIXES,
        };
        let mut tokens = vec![];
        let mut positions = vec![];
        for t in templates {
            for prefix in prefixes {
                let template = format!("{prefix}{t}");
                let (tok, pos) = place_word(sd, &template, word)?;
                tokens.push(tok);
                positions.push(pos);
            }
        }
        let states = sd.text_states(&tokens.iter().collect::<Vec<_>>())?.detach();
        Ok(Self {
            lat_mean,
            lat_std,
            images: kept,
            augment,
            states,
            tokens,
            positions,
            templates: templates.len(),
            flip,
            user_masks: None,
        })
    }

    /// Weighs each image's loss by its mask (white counts, black does not; one per image, of
    /// its size, in the order of the images), cropped and mirrored as the image and averaged
    /// down to latent resolution. Custom Diffusion's scale augmentation makes its own masks and
    /// takes none.
    pub fn set_masks(&mut self, sd: &StableDiffusion, masks: &[GrayImage]) -> Result<()> {
        if self.augment == Augment::Scale {
            return Err(Error::arg(
                "masks",
                "Custom Diffusion's scale augmentation masks the loss itself: it takes no masks",
            ));
        }
        let per_image = if self.flip { 2 } else { 1 };
        if masks.len() * per_image != self.n_images() {
            return Err(Error::arg(
                "masks",
                format!(
                    "{} masks for {} images",
                    masks.len(),
                    self.n_images() / per_image
                ),
            ));
        }
        let size = sd.default_size() as u32;
        let (h, w) = sd.latent_size(size as usize, size as usize)?;
        let mut planes = vec![];
        for m in masks {
            // Mirrored, resized and cropped as the image (one channel of it kept).
            let rgb = image::DynamicImage::ImageLuma8(m.clone()).to_rgb8();
            let both = if self.flip {
                vec![rgb.clone(), image::imageops::flip_horizontal(&rgb)]
            } else {
                vec![rgb]
            };
            for img in both {
                let sq = square_crop(&img, size);
                // The mean of each latent pixel's block of image pixels.
                let (fy, fx) = (size as usize / h, size as usize / w);
                let mut plane = vec![0f32; h * w];
                for (x, y, p) in sq.enumerate_pixels() {
                    let (r, c) = ((y as usize / fy).min(h - 1), (x as usize / fx).min(w - 1));
                    plane[r * w + c] += p.0[0] as f32 / 255.0 / (fy * fx) as f32;
                }
                planes.push(Tensor::from_vec(plane, (1, 1, h, w), sd.device())?);
            }
        }
        self.user_masks = Some(Tensor::cat(&planes, 0)?);
        Ok(())
    }

    /// Number of training images (with mirror images).
    pub fn n_images(&self) -> usize {
        match self.augment {
            Augment::None => self.lat_mean.dims()[0],
            Augment::Scale => self.images.len(),
        }
    }

    /// The prompt (template and prefix) of a draw: an index of `tokens`.
    fn prompt_index(&self, d: &Draw) -> usize {
        let prefixes = self.tokens.len() / self.templates.max(1);
        d.template * prefixes + d.placement.map_or(0, |(_, p)| p)
    }

    /// `n` draws (image, template, timestep, and with [`Augment::Scale`] where the image goes)
    /// and their noise from `rng`.
    pub fn draw(&self, sd: &StableDiffusion, rng: &mut ChaCha8Rng, n: usize) -> Result<Batch> {
        let t_max = sd.scheduler.num_train_timesteps();
        let size = sd.default_size() as u32;
        let draws: Vec<Draw> = (0..n)
            .map(|_| {
                let mut d = Draw {
                    image: rng.random_range(0..self.n_images()),
                    template: rng.random_range(0..self.templates),
                    timestep: rng.random_range(0..t_max),
                    placement: None,
                };
                if self.augment == Augment::Scale {
                    d.placement = Some(scale_draw(rng, size));
                }
                d
            })
            .collect();
        let (h, w) = sd.latent_size(size as usize, size as usize)?;
        let shape = [n, sd.unet.config().in_channels, h, w];
        let vae_noise = normal(rng, &shape, sd.device())?;
        let noise = normal(rng, &shape, sd.device())?;
        Ok(Batch {
            draws,
            vae_noise,
            noise,
        })
    }

    /// The batch's clean latents, scaled for the UNet: a sample of each image's latent
    /// distribution (with [`Augment::Scale`], of each draw's image as placed, encoded now).
    pub fn latents(&self, sd: &StableDiffusion, batch: &Batch) -> Result<Tensor> {
        let (mean, std) = match self.augment {
            Augment::None => {
                let idx = index(batch.draws.iter().map(|d| d.image), sd)?;
                (
                    self.lat_mean.index_select(&idx, 0)?,
                    self.lat_std.index_select(&idx, 0)?,
                )
            }
            Augment::Scale => {
                let mut means = vec![];
                let mut stds = vec![];
                for d in &batch.draws {
                    let (p, _) = d.placement.ok_or_else(|| {
                        Error::Internal("a scale-augmented draw without its placement".into())
                    })?;
                    let img = placed(sd, &self.images[d.image], p)?;
                    let dist = sd.vae.encode(&img.to_dtype(sd.vae_dtype())?)?;
                    means.push(dist.mean.to_dtype(DType::F32)?);
                    stds.push(dist.std.to_dtype(DType::F32)?);
                }
                (Tensor::cat(&means, 0)?, Tensor::cat(&stds, 0)?)
            }
        };
        Ok(sd.vae.scale(&(mean + (std * &batch.vae_noise)?)?)?)
    }

    /// The loss mask of each draw: the users' masks ([`TrainingSet::set_masks`]), or with
    /// [`Augment::Scale`] 1 where the image is (a latent pixel's border left out); `None`
    /// otherwise (the plain loss).
    pub fn masks(&self, sd: &StableDiffusion, batch: &Batch) -> Result<Option<LossMask>> {
        if let Some(m) = &self.user_masks {
            let idx = index(batch.draws.iter().map(|d| d.image), sd)?;
            return Ok(Some(LossMask {
                mask: m.index_select(&idx, 0)?,
                per_channel: true,
            }));
        }
        if self.augment != Augment::Scale {
            return Ok(None);
        }
        let size = sd.default_size();
        let (h, w) = sd.latent_size(size, size)?;
        let factor = (size / w.max(1)) as u32;
        let mut out = vec![0f32; batch.len() * h * w];
        for (i, d) in batch.draws.iter().enumerate() {
            let Some((p, _)) = d.placement else { continue };
            let plane = &mut out[i * h * w..(i + 1) * h * w];
            if p.size > size as u32 {
                plane.fill(1.0);
                continue;
            }
            let (r0, r1) = (p.top / factor + 1, (p.top + p.size) / factor);
            let (c0, c1) = (p.left / factor + 1, (p.left + p.size) / factor);
            for r in r0..r1.saturating_sub(1).min(h as u32) {
                for c in c0..c1.saturating_sub(1).min(w as u32) {
                    plane[r as usize * w + c as usize] = 1.0;
                }
            }
        }
        Ok(Some(LossMask {
            mask: Tensor::from_vec(out, (batch.len(), 1, h, w), sd.device())?,
            per_channel: false,
        }))
    }

    /// The batch's prompts as tokens, with the word's token positions, per row (for methods
    /// whose text is learned).
    pub fn prompt_tokens(&self, batch: &Batch) -> Vec<(&Tokens, &[usize])> {
        batch
            .draws
            .iter()
            .map(|d| {
                let i = self.prompt_index(d);
                (&self.tokens[i], self.positions[i].as_slice())
            })
            .collect()
    }

    /// The batch's text states `(b, tokens, width)` and the word's positions per row.
    pub fn prompts(&self, sd: &StableDiffusion, batch: &Batch) -> Result<(Tensor, Vec<&[usize]>)> {
        let idx = index(batch.draws.iter().map(|d| self.prompt_index(d)), sd)?;
        let positions = batch
            .draws
            .iter()
            .map(|d| self.positions[self.prompt_index(d)].as_slice())
            .collect();
        Ok((self.states.index_select(&idx, 0)?, positions))
    }
}

fn index(values: impl Iterator<Item = usize>, sd: &StableDiffusion) -> Result<Tensor> {
    Ok(Tensor::new(
        values.map(|v| v as u32).collect::<Vec<_>>(),
        sd.device(),
    )?)
}

/// A template with `word` in its `{}`, tokenized, and the word's token positions.
fn place_word(sd: &StableDiffusion, template: &str, word: &str) -> Result<(Tokens, Vec<usize>)> {
    let prompt = template.replace("{}", word);
    let tok = sd.tokenize(&prompt)?;
    let start = template.find("{}").unwrap_or(0);
    let pos = tok.positions_of_span(start..start + word.len());
    if pos.is_empty() || word_spans(&prompt, word).is_empty() {
        return Err(Error::arg(
            "templates",
            format!("the class word {word:?} is lost in {prompt:?} (too long?)"),
        ));
    }
    Ok((tok, pos))
}

/// A draw of Custom Diffusion's scale augmentation for the model's `size`: the image's size
/// (from a third of `size` to it, two times in three; else 1.2x to 1.4x), where it goes, and
/// the prompt's prefix.
fn scale_draw(rng: &mut ChaCha8Rng, size: u32) -> (Placement, usize) {
    let scaled = if rng.random::<f64>() < 0.66 {
        rng.random_range(size / 3..=size)
    } else {
        rng.random_range((1.2 * size as f64) as u32..(1.4 * size as f64) as u32)
    };
    let (outer, inner) = (scaled.max(size), scaled.min(size));
    let top = rng.random_range(0..=outer - inner);
    let left = rng.random_range(0..=outer - inner);
    let prefix = if (scaled as f64) < 0.6 * size as f64 {
        1 + rng.random_range(0..2)
    } else if scaled > size {
        3 + rng.random_range(0..2)
    } else {
        0
    };
    (
        Placement {
            size: scaled,
            top,
            left,
        },
        prefix,
    )
}

/// `img` resized (Pillow's bilinear, as the script's `Image.resize`) to `p.size` square and
/// placed on a gray canvas at the model's size (or the canvas cropped from it), `(1, 3, s, s)`
/// in [-1, 1].
fn placed(sd: &StableDiffusion, img: &RgbImage, p: Placement) -> Result<Tensor> {
    let size = sd.default_size() as u32;
    let resized = crate::util::resize::pillow_resize(
        img,
        p.size,
        p.size,
        crate::util::resize::Filter::Bilinear,
    );
    if p.size > size {
        let crop = image::imageops::crop_imm(&resized, p.left, p.top, size, size).to_image();
        return image_to_tensor(&crop, sd.device());
    }
    let inner = image_to_tensor(&resized, sd.device())?;
    let canvas = Tensor::zeros(
        (1, 3, size as usize, size as usize),
        DType::F32,
        sd.device(),
    )?;
    Ok(canvas.slice_assign(
        &[
            0..1,
            0..3,
            p.top as usize..(p.top + p.size) as usize,
            p.left as usize..(p.left + p.size) as usize,
        ],
        &inner.to_dtype(DType::F32)?,
    )?)
}
