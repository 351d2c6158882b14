//! Fused kernels: single-pass replacements for chains of candle ops on the UNet's hot paths.
//!
//! - [`attention`]: `softmax(scale * q k^T) v` without the score matrix (flash-style).
//! - [`group_norm`]: group norm, optionally followed by SiLU, in one kernel instead of candle's
//!   dozen (and without its f32 copy of the activations).
//!
//! Each op has a CUDA kernel (`src/fused/*.cu`, compiled to PTX by `build.rs` with the `cuda`
//! feature) and a CPU implementation of the same algorithm, which the tests compare with the
//! unfused path. None has a backward pass: they run only where nothing differentiates through
//! them, and the models fall back to the composite ops elsewhere.
//!
//! Whether they run is one choice, [`Kernels`], made when a model is loaded
//! ([`LoadOptions::kernels`](crate::sd::pipeline::LoadOptions::kernels): `--kernels` on the
//! command line, `load_model(..., #{kernels: "fused"})` in scripts) and held by each layer that
//! has a fused path (the UNet's attention layers, every group norm), as candle's UNet holds
//! `use_flash_attn`: a model runs the same ops whatever else the process does. The default
//! stays `naive` until a GPU run has measured the CUDA kernels (notes/cuda.md).

pub mod attention;
pub mod group_norm;
mod op3;

use std::cell::Cell;

/// Which implementations a model's layers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's composite ops (attention: matmul, softmax, matmul), except in f32 on the CPU
    /// where nothing trains through them: there attention, convolutions and group norms are
    /// [`crate::sd::cpu`]'s kernels (the same arithmetic, blocked and vectorised).
    #[default]
    Naive,
    /// The fused ops wherever they apply (no gradients; attention: no probabilities asked for).
    Fused,
}

impl Kernels {
    /// Every choice, in [`Kernels::NAMES`]' order.
    pub const ALL: [Kernels; 2] = [Kernels::Naive, Kernels::Fused];
    /// The names scripts and the command line give them.
    pub const NAMES: [&'static str; 2] = ["naive", "fused"];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|&k| k == self).unwrap_or(0)]
    }

    /// Whether the fused ops are chosen.
    pub fn fused(self) -> bool {
        self == Kernels::Fused
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::NAMES
            .iter()
            .position(|&n| n == s)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| format!("unknown kernels `{s}` ({})", Self::NAMES.join(" or ")))
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

thread_local! {
    static CALLS: Cell<FusedCalls> = const { Cell::new(FusedCalls { attention: 0, group_norm: 0 }) };
}

/// How many times this thread has run each fused op: a diagnostic count (tests check that the
/// fused path ran), not a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FusedCalls {
    pub attention: usize,
    pub group_norm: usize,
}

pub fn fused_calls_on_this_thread() -> FusedCalls {
    CALLS.with(|c| c.get())
}

fn count_call(f: impl FnOnce(&mut FusedCalls)) {
    CALLS.with(|c| {
        let mut n = c.get();
        f(&mut n);
        c.set(n);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_parses_and_prints() {
        for k in Kernels::ALL {
            assert_eq!(k.to_string().parse::<Kernels>(), Ok(k));
        }
        assert_eq!(Kernels::default(), Kernels::Naive);
        assert!("flash"
            .parse::<Kernels>()
            .unwrap_err()
            .contains("naive or fused"));
    }
}
