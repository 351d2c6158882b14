//! Decode: latents to images through the VAE (and images to latents, for training).

use candle_core::{DType, Tensor};

use super::{finite, StableDiffusion};
use crate::error::Result;

impl StableDiffusion {
    /// UNet-scale latents -> the VAE's raw output `(b, 3, H, W)` (about [-1, 1]), f32. One
    /// latent at a time: the decoder's activations at full resolution are the largest a
    /// generation holds (the Infusion pair's two images at once took it over diffusers' peak
    /// for one image), and the rows are independent, so the images are the same bit for bit.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.vae.unscale(&latents.to_dtype(self.vae_dtype)?)?;
        let rows = (0..z.dim(0)?)
            .map(|i| self.vae.decode(&z.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let image = Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?;
        finite(&image, || {
            "the VAE decoder gave NaN or infinite values (its weights, or f16 without force_upcast?)".into()
        })?;
        Ok(image)
    }

    /// UNet-scale latents -> image `(b, 3, H, W)` in [0, 1], f32.
    pub fn decode_to_unit(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(((self.decode(latents)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Image `(b, 3, H, W)` in [-1, 1] -> the mean of the latent distribution, scaled for the
    /// UNet.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let dist = self.vae.encode(&image.to_dtype(self.vae_dtype)?)?;
        Ok(self.vae.scale(&dist.mean)?.to_dtype(self.dtype)?)
    }
}
