//! What training shares across methods: the data (images cropped and encoded once, prompt
//! templates, seeded batches of image, template, timestep and noise), AdamW with its state in
//! the open, the [`Learner`] seam through which a method says what it trains, its loss and its
//! files, and the [`Trainer`] loop around a learner (progress, Ctrl-C, the NaN guard, loss
//! scaling, prior preservation, checkpoints).

pub(crate) mod data;
pub(crate) mod optim;
pub(crate) mod prior;
pub(crate) mod trainer;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use data::{mse, LossMask};
pub use optim::{clip_grad_norm, gradients, AdamW};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
pub use data::{image_count_warning, Augment, Batch, TrainingSet, DEFAULT_TEMPLATES};
pub use prior::{class_images, Prior};
pub use trainer::{Checkpoint, LossScale, TrainOptions, TrainReport, Trainer};

/// A run as the files a learner writes describe it.
pub struct Run<'a> {
    pub name: &'a str,
    pub word: &'a str,
    /// Steps done.
    pub steps: usize,
    pub options: &'a TrainOptions,
    /// Training images (with mirror images).
    pub images: usize,
}

/// What a training run learns: the method seam of training.
pub trait Learner {
    /// `infusion`, `textual_inversion`, `lora`, `dreambooth`.
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

    /// Updates what the learner keeps besides its parameters (Perfusion's running encoding of
    /// its word) from a training batch, before that batch's loss; evaluation losses do not call
    /// it.
    fn observe(
        &mut self,
        _sd: &StableDiffusion,
        _data: &TrainingSet,
        _batch: &Batch,
    ) -> Result<()> {
        Ok(())
    }

    /// What it keeps besides its parameters (see [`Learner::observe`]), as plain values; its
    /// saved files hold them.
    fn buffers(&self) -> BTreeMap<String, Tensor> {
        BTreeMap::new()
    }

    /// Batches whose gradients are summed into one update (gradient accumulation: each
    /// batch's loss divided by their number).
    fn accumulate(&self) -> usize {
        1
    }

    /// Parameter `name`'s learning rate as a multiple of the run's (Perfusion's word
    /// embedding trains at a fifth of its outputs' rate).
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }

    /// The norm the gradients are clipped to before each update (PyTorch's `clip_grad_norm_`
    /// over every parameter), if the method's script clips them.
    fn max_grad_norm(&self) -> Option<f64> {
        None
    }

    /// The activations a training pass keeps for this learner's backward, as a multiple of a
    /// frozen UNet's (`StableDiffusion::unet_train_bytes`, which the pass planner reads). 1
    /// where the UNet's weights stay frozen or few train.
    fn activation_factor(&self) -> f64 {
        1.0
    }

    /// How its training images are drawn (Custom Diffusion's scale augmentation).
    fn augment(&self) -> data::Augment {
        data::Augment::None
    }

    /// What, besides the method, rebuilds this learner to resume its run (a LoRA's rank and
    /// trigger); checkpoints keep it.
    fn settings(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Writes the parameters reached as the method's own file (or folder) `DIR/STEM.*`, usable
    /// as it is; returns its path.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf>;

    /// The parameters, by name, in what [`Learner::save`] wrote (to resume from it); what the
    /// learner keeps besides them (see [`Learner::observe`]) is taken back from it too.
    fn read(
        &mut self,
        sd: &StableDiffusion,
        path: &Path,
        job: &Job,
    ) -> Result<BTreeMap<String, Tensor>>;
}
