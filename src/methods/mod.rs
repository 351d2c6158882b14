//! The customization methods besides Infusion (the paper's baselines), and the files users
//! already have for them. They share the SD layer's seams: the text encoder's token embeddings
//! (a learned word), the attention hook, and the UNet's weights; nothing here reaches into
//! `infusion/`.
//!
//! Today: reading and sorting concept files ([`files`]) and a learned word's vectors placed in a
//! prompt ([`textual_inversion`]). PLAN.md keeps what remains (the method seam, training, LoRA
//! and DreamBooth generation).

pub mod adapted;
pub mod files;
pub mod learners;
pub mod lora;
pub mod textual_inversion;
