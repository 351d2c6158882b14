//! F beside C for concepts of any method: the session's concepts ([`set`]), prompts that place
//! them with `<name>` ([`prompt`]), what C changes for the concepts of a prompt ([`side`]) and
//! generation of the foundational (F) and customized (C) images side by side ([`generate`]), and
//! C's noise prediction on noisy latents for the metrics ([`eps`]).
//!
//! This room sits above both [`crate::infusion`] (the paper's method) and [`crate::methods`]
//! (the others): each method says how its concepts change C; this room puts them together.

pub(crate) mod eps;
pub(crate) mod generate;
pub(crate) mod prompt;
pub(crate) mod set;
pub(crate) mod side;
