//! The arithmetic several samplers share: numpy's spacings as diffusers uses them, Karras
//! sigmas, the sigma-to-timestep map, and linear combinations of tensors.

use candle_core::Tensor;

use crate::error::Result;

/// `np.linspace(start, stop, n)` in float64 (the last value exactly `stop`).
pub(super) fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        stop
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// `np.arange(start, 0, -step)` for a positive float step.
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start - i as f64 * step).collect()
}

/// "trailing" spacing, from the noisiest: `np.arange(T, 0, -T / n).round() - 1`.
pub(super) fn trailing(t_total: f64, n: usize) -> Vec<f64> {
    arange_down(t_total, t_total / n as f64)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// `np.interp(x, 0..len, ys)`.
pub(super) fn interp(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return ys[0] as f64;
    }
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let j = x.floor() as usize;
    let (a, b) = (ys[j] as f64, ys[j + 1] as f64);
    (b - a) * (x - j as f64) + a
}

/// Karras et al.'s sigmas: rho-7 spacing from `max` down to `min` in `n` values.
pub(super) fn karras(min: f64, max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma interpolates to `sigma`'s.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0);
    let low_idx = below.min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[low_idx + 1] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// `(1 / sqrt(sigma^2 + 1), sigma / sqrt(sigma^2 + 1))`: DPM-Solver's alpha_t and sigma_t.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `a * x + b * y`.
pub(super) fn combine(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    Ok(((x * a as f64)? + (y * b as f64)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_to_t_inverts_the_schedule_at_whole_timesteps() {
        let ls: Vec<f32> = (0..10).map(|i| (0.1 * (i + 1) as f32).ln()).collect();
        for (i, l) in ls.iter().enumerate() {
            let t = sigma_to_t((*l as f64).exp(), &ls);
            assert!((t - i as f64).abs() < 1e-5, "{i}: {t}");
        }
        // Between two entries: linear in log-sigma.
        let mid = ((ls[3] as f64 + ls[4] as f64) / 2.0).exp();
        assert!((sigma_to_t(mid, &ls) - 3.5).abs() < 1e-6);
    }
}
