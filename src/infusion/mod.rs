//! The Infusion method: concepts (one residual Δ per cross-attention layer), prompts that place
//! them (`<name>`), generation of the foundational (F) and customized (C) images side by side,
//! training of the Δs, and the per-token attention maps of both.

pub mod concept;
pub mod generate;
pub mod maps;
pub mod prompt;
pub mod train;
