//! The toy lab: the paper's two-dimensional experiments (its section 3, figures 5-7), with
//! Infusion in them too.
//!
//! A miniature of the real architecture, so that the methods mean what they mean on SD: a small
//! time-conditioned denoiser of 2-D points whose conditioning comes through one cross-attention
//! layer over the embeddings of a short token prompt (a concept token and a diversity token),
//! trained with the DDPM loss and sampled with DDIM, both on the same noise schedule code as SD
//! ([`crate::sd::scheduler::NoiseSchedule`]). Customization: full fine-tuning (DreamBooth-like),
//! Infusion (C uses F's attention probabilities and adds a trained residual to the concept
//! token's value) and Textual Inversion (a trained token embedding). Measures: the latent
//! Fisher divergence (Definition 3.1), the Gaussian 2-Wasserstein distance
//! ([`crate::metrics::w2`]) and the diversities still covered.
//!
//! Where the toy meets the real training code: it uses SD's [`NoiseSchedule`] (DDPM loss
//! targets and DDIM steps), [`crate::train::optim::AdamW`] and
//! [`crate::train::optim::gradients`], but not the [`crate::train::Learner`] trait. A learner's
//! loss runs a `StableDiffusion` on VAE latents of training images with prompt templates, and
//! its files are what SD tools load (a concept file, a LoRA, a UNet folder); the toy has none
//! of these (2-D points, a parameter map, one token prompt). Making the trait generic over the
//! model, the data and the file would put type parameters on every SD method for the toy's
//! sake alone, so the toy keeps its methods in [`ToyMethod`] (the same three edits the SD
//! methods make, in [`net::Edit`]) and its loop in [`lab::customize`].
//!
//! [`NoiseSchedule`]: crate::sd::scheduler::NoiseSchedule
//!
//! - [`data`]: the layouts (four peaks; a 5x5 grid of diversities) and their true samples.
//! - [`net`]: the denoiser and how each method changes it.
//! - [`lab`]: training the foundation, customizing, sampling, measuring.
//! - [`plots`]: the score field and the plane the pictures show.

pub(crate) mod data;
pub(crate) mod lab;
pub(crate) mod net;
pub(crate) mod plots;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use data::sample_peaks;

pub use crate::metrics::points::{count_modes, exact_w2};
pub use data::{Layout, Point};
pub use lab::{
    customize, fisher, CustomRun, Customization, CustomizeOptions, Toy, ToyMethod, ToyTrainOptions,
};
