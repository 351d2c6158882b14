//! The 2-Wasserstein (Fréchet) distance between Gaussians fitted to two sets of samples, as FID
//! computes it (unbiased covariances), exactly and without d x d matrices.
//!
//! With centred samples X (n_A x d) and Y (n_B x d), S_A = XᵀX/(n_A-1), S_B = YᵀY/(n_B-1), and
//! the eigenvalues of S_A^½ S_B S_A^½ are those of M Mᵀ with M = X Yᵀ / sqrt((n_A-1)(n_B-1)):
//! Tr((S_A^½ S_B S_A^½)^½) is the nuclear norm of the n_A x n_B matrix M. Computed in f64.

use candle_core::{DType, Tensor};
use nalgebra::DMatrix;
use serde::Serialize;

use crate::error::{Error, Result};

/// The distance and its terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct W2 {
    /// sqrt(d²)
    pub w2: f64,
    /// d² = mean_term + Tr(S_A) + Tr(S_B) - 2 trace_sqrt_term
    pub w2_squared: f64,
    /// ||mu_A - mu_B||²
    pub mean_term: f64,
    /// Tr((S_A^½ S_B S_A^½)^½)
    pub trace_sqrt_term: f64,
    pub trace_a: f64,
    pub trace_b: f64,
    pub n_a: usize,
    pub n_b: usize,
    /// Dimensions per sample (after pooling).
    pub dims: usize,
}

/// Samples `[n, ...]` as an n x d f64 matrix, optionally average-pooling the last two dims by
/// `pool` first (a `[n, C, H, W]` latent to `[n, C, H/pool, W/pool]`).
fn samples(t: &Tensor, pool: Option<usize>, name: &str) -> Result<DMatrix<f64>> {
    let t = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?;
    let t = match pool {
        Some(k) if k > 1 => {
            if t.rank() != 4 {
                return Err(Error::arg(
                    name,
                    format!("pooling needs [n, C, H, W] samples, not {:?}", t.dims()),
                ));
            }
            t.avg_pool2d(k)?
        }
        _ => t,
    };
    let n = t.dim(0)?;
    let flat: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let d = flat.len().checked_div(n).unwrap_or(0);
    if n < 2 || d == 0 {
        return Err(Error::arg(
            name,
            format!(
                "needs at least 2 samples of at least 1 value, got shape {:?}",
                t.dims()
            ),
        ));
    }
    // A NaN or an infinity (a value past f32 comes in as one) never leaves nalgebra's SVD.
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        return Err(Error::arg(
            name,
            format!(
                "sample {} holds {} (W2 takes finite values within f32's range)",
                i / d,
                flat[i]
            ),
        ));
    }
    Ok(DMatrix::from_row_iterator(
        n,
        d,
        flat.into_iter().map(f64::from),
    ))
}

fn centre(m: &DMatrix<f64>) -> (DMatrix<f64>, nalgebra::RowDVector<f64>) {
    let mu = m.row_mean();
    let mut c = m.clone();
    for mut row in c.row_iter_mut() {
        row -= &mu;
    }
    (c, mu)
}

/// The Gaussian 2-Wasserstein distance between the sample sets `a` and `b` (`[n, ...]`, the
/// same shape per sample).
pub fn wasserstein(a: &Tensor, b: &Tensor, pool: Option<usize>) -> Result<W2> {
    let a = samples(a, pool, "latents_a")?;
    let b = samples(b, pool, "latents_b")?;
    if a.ncols() != b.ncols() {
        return Err(Error::arg(
            "latents_b",
            format!(
                "{} values per sample, the first set has {}",
                b.ncols(),
                a.ncols()
            ),
        ));
    }
    let (na, nb) = (a.nrows(), b.nrows());
    let (x, mu_a) = centre(&a);
    let (y, mu_b) = centre(&b);
    let mean_term = (&mu_a - &mu_b).norm_squared();
    let trace_a = x.norm_squared() / (na - 1) as f64;
    let trace_b = y.norm_squared() / (nb - 1) as f64;
    let m = (&x * y.transpose()) / (((na - 1) * (nb - 1)) as f64).sqrt();
    let trace_sqrt_term: f64 = m.singular_values().iter().sum();
    let w2_squared = (mean_term + trace_a + trace_b - 2.0 * trace_sqrt_term).max(0.0);
    Ok(W2 {
        w2: w2_squared.sqrt(),
        w2_squared,
        mean_term,
        trace_sqrt_term,
        trace_a,
        trace_b,
        n_a: na,
        n_b: nb,
        dims: a.ncols(),
    })
}
