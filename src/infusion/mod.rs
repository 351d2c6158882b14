//! The Infusion method: concepts (one residual Δ per cross-attention layer), prompts that place
//! them (`<name>`), generation of the foundational (F) and customized (C) images side by side,
//! training of the Δs, and the per-token attention maps of both.

pub mod concept;
pub mod generate;
pub mod hook;
pub mod maps;
pub mod prompt;
pub mod train;

use crate::sd::hook::Branch;

/// The two pipelines of Infusion: F (foundational, the plain model) and C (customized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Foundational,
    Customized,
}

impl Stream {
    /// The batch-row tag of the pipeline's rows.
    pub const fn branch(self) -> Branch {
        match self {
            Stream::Foundational => Branch(0),
            Stream::Customized => Branch(1),
        }
    }

    /// `F` or `C`, as the paper and the attention-map files name them.
    pub const fn tag(self) -> &'static str {
        match self {
            Stream::Foundational => "F",
            Stream::Customized => "C",
        }
    }
}
