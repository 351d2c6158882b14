//! CLIP-T, CLIP-I and DINO-I as the paper (after DreamBooth) uses them: mean cosines.

use candle_core::Tensor;
use image::RgbImage;

use super::clip::{cosine_matrix, Clip};
use super::dino::Dino;
use crate::error::{Error, Result};

fn mean_all(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?.to_scalar::<f32>()? as f64)
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
    let cos = cosine_matrix(&clip.image_embeds(images)?, &clip.text_embeds(prompts)?)?;
    if prompts.len() == 1 {
        mean_all(&cos)
    } else {
        let diag: Vec<f32> = (0..images.len())
            .map(|i| cos.get(i)?.get(i)?.to_scalar::<f32>())
            .collect::<candle_core::Result<_>>()?;
        Ok(diag.iter().map(|&v| v as f64).sum::<f64>() / diag.len() as f64)
    }
}

/// CLIP-I: the mean cosine between the generated images and the reference (training) images.
pub fn clip_i(clip: &Clip, images: &[RgbImage], references: &[RgbImage]) -> Result<f64> {
    mean_all(&cosine_matrix(
        &clip.image_embeds(images)?,
        &clip.image_embeds(references)?,
    )?)
}

/// DINO-I: the mean cosine between DINO embeddings of generated and reference images.
pub fn dino_i(dino: &Dino, images: &[RgbImage], references: &[RgbImage]) -> Result<f64> {
    mean_all(&cosine_matrix(
        &dino.embeds(images)?,
        &dino.embeds(references)?,
    )?)
}
