//! Check inputs: a generation's settings against the model and the machine before any work
//! (diffusers' `check_inputs`), and the sampler's plan for its steps.

use super::{GenerateOptions, StableDiffusion};
use crate::error::{Error, Result};
use crate::sd::sampler::Plan;

impl StableDiffusion {
    /// Latent grid `(h, w)` for an image of `width` x `height` pixels.
    pub fn latent_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::arg(
                    name,
                    format!("{v} is not a positive multiple of the VAE scale factor {f}"),
                ));
            }
        }
        Ok((height / f, width / f))
    }

    /// Bytes of one latent at the native size, in f32 (what kept latents cost each).
    pub fn latent_bytes(&self) -> u128 {
        let s = self.unet.config().sample_size.unwrap_or(64) as u128;
        self.unet.config().in_channels as u128 * s * s * 4
    }

    /// About the peak bytes one UNet call over `rows` rows of an `(h, w)` latent grid allocates:
    /// the largest self-attention's scores and probabilities (`rows x heads x n²` in f32, n the
    /// level's pixels), and the activations the skip connections keep. A lower estimate: it
    /// refuses sizes that cannot fit, never one that might.
    pub fn unet_call_bytes(&self, rows: usize, (h, w): (usize, usize)) -> u128 {
        let cfg = self.unet.config();
        let rows = rows as u128;
        let mut n = (h * w) as u128;
        let mut attention = 0u128;
        for i in 0..cfg.n_blocks() {
            let has_attention =
                cfg.down_block_types[i] == "CrossAttnDownBlock2D" || i + 1 == cfg.n_blocks();
            if has_attention {
                let heads = cfg.heads().get(i) as u128;
                attention = attention.max(rows * heads * n * n * 4 * 2);
            }
            n /= 4;
        }
        let c0 = cfg.block_out_channels[0] as u128;
        let activations = rows * c0 * (h * w) as u128 * 4 * 16;
        attention + activations
    }

    /// About the bytes one training pass over `rows` rows of an `(h, w)` latent grid needs
    /// for the activations its backward pass keeps. On the CPU (attention by blocks, no `n²`
    /// scores kept, no norm outputs kept for frozen layers) they were measured at about 1.6
    /// GiB a row for SD1.5 at 64x64 latents (Infusion: 6334 MiB peak in passes of 1 image,
    /// 11298 MiB for the whole batch of 4, 2026-12-06), some 320 times a row's first feature
    /// map (`c0 * h * w` f32): 400 times it here, for the methods that keep more (LoRA's
    /// low-rank branches read the projections' inputs). Elsewhere, the larger of that and
    /// three plain UNet calls ([`Self::unet_call_bytes`]: F's pass, C's, and what C's keeps).
    pub fn unet_train_bytes(&self, rows: usize, (h, w): (usize, usize)) -> u128 {
        let c0 = self.unet.config().block_out_channels[0] as u128;
        let kept = rows as u128 * c0 * (h * w) as u128 * 4 * 400;
        if self.device().is_cpu() {
            kept
        } else {
            kept.max(self.unet_call_bytes(rows, (h, w)) * 3)
        }
    }

    /// About the peak bytes decoding `rows` latents of `(h, w)` allocates: the VAE decoder's
    /// mid-block attention over the latent pixels and its widest activations on the way up.
    pub fn decode_bytes(&self, rows: usize, (h, w): (usize, usize)) -> u128 {
        let cfg = self.vae.config();
        let rows = rows as u128;
        let n = (h * w) as u128;
        let mut peak = rows * n * n * 4 * 2;
        let mut pixels = n;
        for &ch in cfg.block_out_channels.iter().rev() {
            peak = peak.max(rows * ch as u128 * pixels * 4 * 4);
            pixels *= 4;
        }
        peak
    }

    /// The sampler's plan for a generation's steps.
    pub fn plan(&self, opts: &GenerateOptions) -> Result<Plan<'_>> {
        Plan::new(&self.scheduler, opts.sampler, opts.steps)
    }

    /// Checks a generation's settings before any work: a finite guidance, a sampler plan for
    /// the steps, a size the VAE can take and the machine can hold for `rows` UNet rows, noise
    /// that fits and is finite. Returns the latent grid `(h, w)`.
    pub fn check_generate(&self, opts: &GenerateOptions, rows: usize) -> Result<(usize, usize)> {
        if !opts.guidance.is_finite() {
            return Err(Error::arg(
                "guidance",
                format!("{} is not a finite number", opts.guidance),
            ));
        }
        let calls = self.plan(opts)?.len();
        let size = self.default_size();
        let (width, height) = (opts.width.unwrap_or(size), opts.height.unwrap_or(size));
        let hw = self.latent_size(width, height)?;
        let need = self.unet_call_bytes(rows, hw).max(self.decode_bytes(1, hw));
        crate::sd::device::ensure_fits(
            if width >= height { "width" } else { "height" },
            &format!("a {width}x{height} image"),
            need,
            &self.device,
        )?;
        if let Some(noise) = &opts.noise {
            if !crate::util::tensors::all_finite(noise)? {
                return Err(Error::arg(
                    "noise",
                    "the initial noise holds NaN or infinite values",
                ));
            }
        }
        if let Some(noise) = &opts.step_noise {
            let c = self.unet.config().in_channels;
            let fits =
                noise.rank() == 4 && noise.dim(0)? >= calls && noise.dims()[1..] == [c, hw.0, hw.1];
            if !fits {
                return Err(Error::arg(
                    "step_noise",
                    format!(
                        "shape {:?} does not fit: expected [{calls} or more, {c}, {}, {}] (one \
                         noise per sampler call)",
                        noise.dims(),
                        hw.0,
                        hw.1
                    ),
                ));
            }
            if !crate::util::tensors::all_finite(noise)? {
                return Err(Error::arg(
                    "step_noise",
                    "the step noise holds NaN or infinite values",
                ));
            }
        }
        Ok(hw)
    }
}
