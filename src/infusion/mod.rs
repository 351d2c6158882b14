//! The Infusion method (the paper's): concepts (one residual Δ per cross-attention layer), the
//! hook through which C uses F's attention maps and adds the Δs, training of the Δs, and the
//! per-token attention maps of F and C. F beside C for prompts with any method's concepts is
//! one room up, in [`crate::customize`].

pub(crate) mod concept;
pub(crate) mod hook;
pub(crate) mod maps;
pub(crate) mod train;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use concept::Concept;
pub use maps::{overlay, token_map, AttentionMaps};
pub use train::{concept as trained_concept, infusion_loss, trainer, Deltas};

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
