//! The toy distributions: where the peaks of each layout are, their true samples, and the
//! customization target (a short line under a peak).

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// A 2-D point.
pub type Point = [f32; 2];

/// Which toy: four concepts, one Gaussian peak each (figure 5), or one concept with 25
/// diversities on a 5x5 grid (figure 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    FourPeaks,
    Grid25,
}

/// The four peaks' concepts, in token order.
const FOUR: [&str; 4] = ["top_left", "top_right", "bottom_left", "bottom_right"];

impl Layout {
    pub const NAMES: [&'static str; 2] = ["four_peaks", "grid25"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "four_peaks" => Ok(Layout::FourPeaks),
            "grid25" => Ok(Layout::Grid25),
            other => Err(Error::arg(
                "layout",
                format!(
                    "unknown layout `{other}` (layouts: {})",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::FourPeaks => "four_peaks",
            Layout::Grid25 => "grid25",
        }
    }

    /// The concepts' names, in token order.
    pub fn concepts(self) -> Vec<&'static str> {
        match self {
            Layout::FourPeaks => FOUR.to_vec(),
            Layout::Grid25 => vec!["grid"],
        }
    }

    /// The concept called `name`, or at index `name` when it is a number.
    pub fn concept(self, name: &str) -> Result<usize> {
        let n = self.concepts().len();
        let found = match name.parse::<usize>() {
            Ok(i) => (i < n).then_some(i),
            Err(_) => self.concepts().iter().position(|c| *c == name),
        };
        found.ok_or_else(|| {
            Error::arg(
                "concept",
                format!(
                    "`{name}` is no concept of the {} toy (concepts: {}, or their index 0..{})",
                    self.name(),
                    self.concepts().join(", "),
                    n - 1
                ),
            )
        })
    }

    /// The diversities of each concept (the peaks a concept prompt covers).
    pub fn diversities(self) -> usize {
        match self {
            Layout::FourPeaks => 1,
            Layout::Grid25 => 25,
        }
    }

    /// The standard deviation of every peak.
    pub fn std(self) -> f32 {
        match self {
            Layout::FourPeaks => 0.3,
            Layout::Grid25 => 0.1,
        }
    }

    /// The centres of `concept`'s peaks, one per diversity (grid25: row-major from the top
    /// left, 1.0 apart).
    pub fn peaks(self, concept: usize) -> Vec<Point> {
        match self {
            Layout::FourPeaks => {
                let (x, y) = [(-1.5, 1.5), (1.5, 1.5), (-1.5, -1.5), (1.5, -1.5)][concept];
                vec![[x, y]]
            }
            Layout::Grid25 => (0..25)
                .map(|k| [(k % 5) as f32 - 2.0, 2.0 - (k / 5) as f32])
                .collect(),
        }
    }

    /// Token ids: 0 is "no diversity", then the concepts, then the diversities, then one slot
    /// for a learned word (Textual Inversion).
    pub fn vocab(self) -> usize {
        1 + self.concepts().len() + self.diversities_tokens() + 1
    }

    /// How many diversity tokens the vocabulary has (none for four peaks: one per concept).
    pub fn diversities_tokens(self) -> usize {
        match self {
            Layout::FourPeaks => 0,
            Layout::Grid25 => 25,
        }
    }

    pub fn concept_token(self, concept: usize) -> u32 {
        1 + concept as u32
    }

    pub fn diversity_token(self, k: usize) -> u32 {
        (1 + self.concepts().len() + k) as u32
    }

    /// The learned word's token (Textual Inversion's new row).
    pub fn learned_token(self) -> u32 {
        (self.vocab() - 1) as u32
    }
}

/// `n` points drawn evenly from Gaussians of standard deviation `std` at `centres`.
pub fn sample_peaks(centres: &[Point], std: f32, n: usize, rng: &mut impl Rng) -> Vec<Point> {
    (0..n)
        .map(|i| {
            let c = centres[i % centres.len()];
            let (a, b): (f32, f32) = (StandardNormal.sample(rng), StandardNormal.sample(rng));
            [c[0] + std * a, c[1] + std * b]
        })
        .collect()
}

/// The customization target under a peak: a horizontal line through `centre`, `2 * half`
/// long, the points uniform along it with a little noise across (`half / 20`).
pub fn line(centre: Point, half: f32, n: usize, rng: &mut impl Rng) -> Vec<Point> {
    (0..n)
        .map(|_| {
            let u: f32 = rng.random_range(-1.0..1.0);
            let e: f32 = StandardNormal.sample(rng);
            [centre[0] + half * u, centre[1] + half / 20.0 * e]
        })
        .collect()
}
