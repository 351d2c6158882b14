//! What training reads: the images, cropped and encoded by the VAE once (with their mirror
//! images), the prompt templates encoded once, and the random batches drawn from them.

use std::path::Path;

use candle_core::{DType, Tensor};
use image::RgbImage;
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

/// One training example's randomness.
#[derive(Debug, Clone)]
pub struct Draw {
    pub image: usize,
    pub template: usize,
    pub timestep: usize,
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

/// The encoded training images and prompts.
pub struct TrainingSet {
    /// `(n, C, h, w)` mean and std of the images' latent distributions (unscaled), f32.
    lat_mean: Tensor,
    lat_std: Tensor,
    /// `(templates, tokens, width)` text states, the templates' tokens, and the word's positions
    /// per template.
    states: Tensor,
    tokens: Vec<Tokens>,
    positions: Vec<Vec<usize>>,
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
    ) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::arg("images", "no training images"));
        }
        let size = sd.default_size() as u32;
        let dev = sd.device();
        let mut pixels = vec![];
        for img in images {
            let sq = square_crop(img, size);
            pixels.push(image_to_tensor(&sq, dev)?);
            if flip {
                pixels.push(image_to_tensor(
                    &image::imageops::flip_horizontal(&sq),
                    dev,
                )?);
            }
        }
        let mut means = vec![];
        let mut stds = vec![];
        for img in &pixels {
            let d = sd.vae.encode(&img.to_dtype(sd.vae_dtype())?)?;
            means.push(d.mean.to_dtype(DType::F32)?);
            stds.push(d.std.to_dtype(DType::F32)?);
        }
        let mut tokens = vec![];
        let mut positions = vec![];
        for t in templates {
            let prompt = t.replace("{}", word);
            let tok = sd.tokenize(&prompt)?;
            let start = t.find("{}").unwrap_or(0);
            let pos = tok.positions_of_span(start..start + word.len());
            if pos.is_empty() || word_spans(&prompt, word).is_empty() {
                return Err(Error::arg(
                    "templates",
                    format!("the class word {word:?} is lost in {prompt:?} (too long?)"),
                ));
            }
            positions.push(pos);
            tokens.push(tok);
        }
        let states = sd.text_states(&tokens.iter().collect::<Vec<_>>())?.detach();
        Ok(Self {
            lat_mean: Tensor::cat(&means, 0)?,
            lat_std: Tensor::cat(&stds, 0)?,
            states,
            tokens,
            positions,
        })
    }

    /// Number of training images (with mirror images).
    pub fn n_images(&self) -> usize {
        self.lat_mean.dims()[0]
    }

    /// `n` draws (image, template, timestep) and their noise from `rng`.
    pub fn draw(&self, sd: &StableDiffusion, rng: &mut ChaCha8Rng, n: usize) -> Result<Batch> {
        let t_max = sd.scheduler.num_train_timesteps();
        let draws: Vec<Draw> = (0..n)
            .map(|_| Draw {
                image: rng.random_range(0..self.n_images()),
                template: rng.random_range(0..self.positions.len()),
                timestep: rng.random_range(0..t_max),
            })
            .collect();
        let mut shape = self.lat_mean.dims().to_vec();
        shape[0] = n;
        let vae_noise = normal(rng, &shape, sd.device())?;
        let noise = normal(rng, &shape, sd.device())?;
        Ok(Batch {
            draws,
            vae_noise,
            noise,
        })
    }

    /// The batch's clean latents, scaled for the UNet: a sample of each image's latent
    /// distribution.
    pub fn latents(&self, sd: &StableDiffusion, batch: &Batch) -> Result<Tensor> {
        let idx = index(batch.draws.iter().map(|d| d.image), sd)?;
        let mean = self.lat_mean.index_select(&idx, 0)?;
        let std = self.lat_std.index_select(&idx, 0)?;
        Ok(sd.vae.scale(&(mean + (std * &batch.vae_noise)?)?)?)
    }

    /// The batch's prompts as tokens, with the word's token positions, per row (for methods
    /// whose text is learned).
    pub fn prompt_tokens(&self, batch: &Batch) -> Vec<(&Tokens, &[usize])> {
        batch
            .draws
            .iter()
            .map(|d| {
                (
                    &self.tokens[d.template],
                    self.positions[d.template].as_slice(),
                )
            })
            .collect()
    }

    /// The batch's text states `(b, tokens, width)` and the word's positions per row.
    pub fn prompts(&self, sd: &StableDiffusion, batch: &Batch) -> Result<(Tensor, Vec<&[usize]>)> {
        let idx = index(batch.draws.iter().map(|d| d.template), sd)?;
        let positions = batch
            .draws
            .iter()
            .map(|d| self.positions[d.template].as_slice())
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
