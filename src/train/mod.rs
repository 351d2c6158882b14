//! What training shares across methods: the data (images cropped and encoded once, prompt
//! templates, seeded batches of image, template, timestep and noise), AdamW with its state in
//! the open, and the [`Learner`] seam through which a method says what it trains and its loss.
//! The loop around them (progress, Ctrl-C, the NaN guard, loss scaling) is
//! `infusion::train::Trainer`'s.

pub mod data;
pub mod optim;

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::sd::pipeline::StableDiffusion;
pub use data::{image_count_warning, Batch, TrainingSet, DEFAULT_TEMPLATES};

/// What a training run learns: the method seam of training.
pub trait Learner {
    /// `infusion`, `textual_inversion`, `lora`.
    fn method(&self) -> &'static str;

    /// What the templates' `{}` becomes (the class word; DreamBooth's "sks cat").
    fn words(&self, word: &str) -> String {
        word.to_string()
    }

    /// The parameters, by name (what AdamW updates).
    fn vars(&self) -> &BTreeMap<String, Var>;

    /// The parameters before training (the baseline of evaluation losses).
    fn initial(&self) -> &BTreeMap<String, Tensor>;

    /// The DDPM loss of `batch` with `params` (the vars' tensors, with gradient, or detached
    /// values for evaluation).
    fn loss(
        &self,
        sd: &StableDiffusion,
        data: &TrainingSet,
        batch: &Batch,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Tensor>;
}
