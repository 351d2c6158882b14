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
//! Whether they run is one choice, [`Kernels`]: per process (`--kernels`, or the
//! `INFUSION_KERNELS` environment variable), per thread ([`set_thread_kernels`], what a script
//! session's `set_kernels` does), or for one closure ([`with_kernels`]). The default stays
//! `naive` until a GPU run has measured the CUDA kernels (notes/cuda.md).

pub mod attention;
pub mod group_norm;
mod op3;

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementations the models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// candle's composite ops (attention: matmul, softmax, matmul), except in f32 on the CPU
    /// where nothing trains through them: there attention, convolutions and group norms are
    /// [`crate::sd::cpu`]'s kernels (the same arithmetic, blocked and vectorised).
    Naive,
    /// The fused ops wherever they apply (no gradients; attention: no probabilities asked for).
    Fused,
}

impl std::str::FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "naive" => Ok(Self::Naive),
            "fused" => Ok(Self::Fused),
            _ => Err(format!("unknown kernels `{s}` (naive or fused)")),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Naive => "naive",
            Self::Fused => "fused",
        })
    }
}

const UNSET: u8 = 0;
const NAIVE: u8 = 1;
const FUSED: u8 = 2;
static PROCESS: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    static THREAD: Cell<Option<Kernels>> = const { Cell::new(None) };
    static CALLS: Cell<FusedCalls> = const { Cell::new(FusedCalls { attention: 0, group_norm: 0 }) };
}

/// How many times this thread has run each fused op (tests check that the fused path ran).
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

/// Runs `f` with `kernels` on this thread only (tests compare both paths side by side while
/// other threads run with the process-wide choice).
pub fn with_kernels<R>(kernels: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|s| s.replace(Some(kernels))));
    f()
}

/// Sets the choice for this thread from now on (a script session's: the REPL and recipes run
/// their models on their own thread), over the process-wide one.
pub fn set_thread_kernels(kernels: Kernels) {
    THREAD.with(|s| s.set(Some(kernels)));
}

/// Sets the process-wide choice (the command line's `--kernels`).
pub fn set_kernels(kernels: Kernels) {
    let v = match kernels {
        Kernels::Naive => NAIVE,
        Kernels::Fused => FUSED,
    };
    PROCESS.store(v, Ordering::Relaxed);
}

/// The choice in use: [`with_kernels`] or [`set_thread_kernels`] on this thread, else the one
/// set by [`set_kernels`], else `INFUSION_KERNELS` (`naive` or `fused`; anything else is
/// ignored), else naive.
pub fn kernels() -> Kernels {
    if let Some(k) = THREAD.with(|s| s.get()) {
        return k;
    }
    match PROCESS.load(Ordering::Relaxed) {
        NAIVE => Kernels::Naive,
        FUSED => Kernels::Fused,
        _ => {
            let k = std::env::var("INFUSION_KERNELS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(Kernels::Naive);
            set_kernels(k);
            k
        }
    }
}

/// Whether the fused ops are chosen.
pub fn fused() -> bool {
    kernels() == Kernels::Fused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_parses_prints_and_scopes() {
        for k in [Kernels::Naive, Kernels::Fused] {
            assert_eq!(k.to_string().parse::<Kernels>(), Ok(k));
            assert_eq!(with_kernels(k, kernels), k);
        }
        assert!("flash"
            .parse::<Kernels>()
            .unwrap_err()
            .contains("naive or fused"));
        let outer = kernels();
        with_kernels(Kernels::Fused, || {
            with_kernels(Kernels::Naive, || assert_eq!(kernels(), Kernels::Naive));
            assert_eq!(kernels(), Kernels::Fused);
        });
        assert_eq!(kernels(), outer);
    }
}
