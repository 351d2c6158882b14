//! CLIP-T, CLIP-I and DINO-I as the paper (after DreamBooth) uses them: mean cosines between
//! embeddings. Every score here, and the evaluation runner's per-image scores, is one
//! [`mean_cosine`].

use candle_core::Tensor;
use image::RgbImage;

use super::clip::{cosine_matrix, Clip};
use super::dino::Dino;
use crate::error::{Error, Result};

/// The mean cosine between every row of `a` and every row of `b` (embeddings `(n, d)`).
pub fn mean_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(cosine_matrix(a, b)?.mean_all()?.to_scalar::<f32>()? as f64)
}

/// CLIP-T: the mean cosine between each image and its prompt (one prompt for all images, or one
/// per image).
pub fn clip_t(clip: &Clip, images: &[RgbImage], prompts: &[&str]) -> Result<f64> {
    if prompts.len() != 1 && prompts.len() != images.len() {
        return Err(Error::arg(
            "prompts",
            format!(
                "{} prompts for {} images: give one, or one per image",
                prompts.len(),
                images.len()
            ),
        ));
    }
    let images = clip.image_embeds(images)?;
    let texts = clip.text_embeds(prompts)?;
    if prompts.len() == 1 {
        return mean_cosine(&images, &texts);
    }
    // Image i against prompt i: the diagonal's mean.
    let cos = cosine_matrix(&images, &texts)?;
    let diag = (0..prompts.len())
        .map(|i| Ok(cos.get(i)?.get(i)?.to_scalar::<f32>()? as f64))
        .collect::<Result<Vec<_>>>()?;
    Ok(diag.iter().sum::<f64>() / diag.len() as f64)
}

/// Both sets of an image score must hold images; an empty one is named.
fn check_sets(images: &[RgbImage], references: &[RgbImage]) -> Result<()> {
    if images.is_empty() {
        return Err(Error::arg("images", "no generated images to score"));
    }
    if references.is_empty() {
        return Err(Error::arg(
            "references",
            "no reference images to score against",
        ));
    }
    Ok(())
}

/// CLIP-I: the mean cosine between the generated images and the reference (training) images.
pub fn clip_i(clip: &Clip, images: &[RgbImage], references: &[RgbImage]) -> Result<f64> {
    check_sets(images, references)?;
    mean_cosine(&clip.image_embeds(images)?, &clip.image_embeds(references)?)
}

/// DINO-I: the mean cosine between DINO embeddings of generated and reference images.
pub fn dino_i(dino: &Dino, images: &[RgbImage], references: &[RgbImage]) -> Result<f64> {
    check_sets(images, references)?;
    mean_cosine(&dino.embeds(images)?, &dino.embeds(references)?)
}

/// The three scores of one generated image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageScores {
    pub clip_t: f64,
    pub clip_i: f64,
    pub dino_i: f64,
}

/// Scores images of one concept: the reference images' embeddings are computed once.
pub struct Scorer<'a> {
    clip: &'a Clip,
    dino: &'a Dino,
    ref_clip: Tensor,
    ref_dino: Tensor,
}

impl<'a> Scorer<'a> {
    pub fn new(clip: &'a Clip, dino: &'a Dino, references: &[RgbImage]) -> Result<Self> {
        if references.is_empty() {
            return Err(Error::arg(
                "references",
                "no reference images to score against",
            ));
        }
        Ok(Self {
            clip,
            dino,
            ref_clip: clip.image_embeds(references)?,
            ref_dino: dino.embeds(references)?,
        })
    }

    /// CLIP-T against `prompt`, CLIP-I and DINO-I against the references.
    pub fn score(&self, image: &RgbImage, prompt: &str) -> Result<ImageScores> {
        let images = std::slice::from_ref(image);
        let embeds = self.clip.image_embeds(images)?;
        Ok(ImageScores {
            clip_t: mean_cosine(&embeds, &self.clip.text_embeds(&[prompt])?)?,
            clip_i: mean_cosine(&embeds, &self.ref_clip)?,
            dino_i: mean_cosine(&self.dino.embeds(images)?, &self.ref_dino)?,
        })
    }
}
