//! Infusion training: learn a concept's Δs from a few images.
//!
//! Each step takes a batch of cached image latents ([`data`]), draws a timestep uniformly over
//! the training timesteps and Gaussian noise, runs F without gradient to get its cross-attention
//! maps, runs C with those maps and V' = V + Δ at the word's positions (both through the one
//! Infusion hook), and takes an AdamW step ([`optim`]) on the Δs only with loss = MSE(noise, C's
//! prediction). No regularizer. The [`trainer`] adds progress, Ctrl-C, the NaN guard and
//! checkpoints.
//!
//! All randomness of step `k` comes from (`seed`, `k`), so a run is deterministic on the CPU and
//! resuming from a checkpoint continues the very same curve.

pub mod trainer;

pub use crate::train::{data, optim};
pub use crate::train::{image_count_warning, TrainingSet, DEFAULT_TEMPLATES};
pub use trainer::{infusion_loss, TrainOptions, TrainReport, Trainer};
