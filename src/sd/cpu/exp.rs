//! Vectorised f32 loops: the softmax down the columns of a block (and its gradient), the
//! affine map + SiLU of a normalised channel, GEGLU's `a * gelu(g)` and CLIP's QuickGELU.
//! `exp` is Cephes' `expf` polynomial (within 2 ulp of `f32::exp` on the softmax's range;
//! libm's scalar `expf` was 7% of a UNet step), `erf` Eigen's rational approximation (within
//! 1e-6). The loops are written in 16 independent lanes so that the compiler vectorises them;
//! `simd_fn!` compiles them for AVX-512 or AVX2 + FMA, chosen at run time where the CPU has
//! it.

const LANES: usize = 16;

/// `$vis fn $name(args) -> ret { body }`, compiled three times: with AVX-512, with AVX2 + FMA,
/// and plain, the first the CPU runs chosen at run time (the body is inlined into each, so its
/// loops vectorise for those features; a closure handed to such a function is not inlined).
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

simd_fn! {
    /// The softmax of each column of `p` (rows of `width` values) in place:
    /// `exp(scale (x - max)) / sum` down every column, `scale` > 0 (a key-major block of
    /// attention scores: one column per query). Three passes over the rows, each vectorised
    /// along them: the maxima, the exponentials and their sums, the division.
    pub fn softmax_columns(p: &mut [f32], width: usize, scale: f32) -> () {
        let mut shift = vec![f32::NEG_INFINITY; width];
        for row in p.chunks_exact(width) {
            for (m, &x) in shift.iter_mut().zip(row) {
                // Not f32::max: its NaN handling keeps the loop from vectorising.
                *m = if x > *m { x } else { *m };
            }
        }
        shift.iter_mut().for_each(|m| *m *= -scale);
        let mut sums = vec![0f32; width];
        for row in p.chunks_exact_mut(width) {
            for ((x, s), &c) in row.iter_mut().zip(sums.iter_mut()).zip(&shift) {
                *x = exp(x.mul_add(scale, c));
                *s += *x;
            }
        }
        // Each sum is at least 1 (the maximum's own term).
        sums.iter_mut().for_each(|s| *s = 1.0 / *s);
        for row in p.chunks_exact_mut(width) {
            for (x, &inv) in row.iter_mut().zip(&sums) {
                *x *= inv;
            }
        }
    }
}

simd_fn! {
    /// `ys = xs * scale + shift`, then SiLU (`y / (1 + exp(-y))`) where `silu`.
    pub fn affine_silu(xs: &[f32], ys: &mut [f32], scale: f32, shift: f32, silu: bool) -> () {
        for (y, &x) in ys.iter_mut().zip(xs) {
            let t = x.mul_add(scale, shift);
            *y = if silu { t / (1.0 + exp(-t)) } else { t };
        }
    }
}

simd_fn! {
    /// `out = a * gelu(g)` elementwise, with the exact (erf) GELU: GEGLU's product.
    pub fn gelu_mul(a: &[f32], g: &[f32], out: &mut [f32]) -> () {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            *o = a * (0.5 * g) * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

simd_fn! {
    /// GEGLU's backward pass over a row: `da = dy gelu(g)`, `dg = dy a gelu'(g)` with
    /// `gelu'(g) = Phi(g) + g phi(g)`.
    pub fn gelu_mul_grad(a: &[f32], g: &[f32], dy: &[f32], da: &mut [f32], dg: &mut [f32]) -> () {
        let grads = da.iter_mut().zip(dg.iter_mut());
        for (((da, dg), &a), (&g, &dy)) in grads.zip(a).zip(g.iter().zip(dy)) {
            let cdf = 0.5 * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = exp(-0.5 * g * g) * 0.398_942_3;
            *da = dy * g * cdf;
            *dg = dy * a * (cdf + g * pdf);
        }
    }
}

/// QuickGELU's constant: `x * sigmoid(1.702 x)` (CLIP's activation).
pub const QUICK_GELU: f32 = 1.702;

simd_fn! {
    /// `ys = xs * sigmoid(1.702 xs)`: CLIP's QuickGELU.
    pub fn quick_gelu(xs: &[f32], ys: &mut [f32]) -> () {
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = x / (1.0 + exp(-QUICK_GELU * x));
        }
    }
}

simd_fn! {
    /// QuickGELU's backward pass: `dx = dy (s + 1.702 x s (1 - s))`, `s = sigmoid(1.702 x)`.
    pub fn quick_gelu_grad(xs: &[f32], dy: &[f32], dx: &mut [f32]) -> () {
        for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(dy) {
            let s = 1.0 / (1.0 + exp(-QUICK_GELU * x));
            *d = g * (s + QUICK_GELU * x * s * (1.0 - s));
        }
    }
}

simd_fn! {
    /// One channel of the group norm's backward pass (`group_norm::GroupNorm::grads`): with
    /// `x^ = (x - mean) rstd`, `z = w x^ + b` and `dz = gy`, through SiLU where `silu`
    /// (`gy s (1 + z (1 - s))`, `s` the sigmoid of `z`), writes `dx = w dz` and returns the
    /// sums (`stats`: `[mean, rstd, w, b]`) `[dz x^, dz, w dz, w dz x^]`, in 16 lanes.
    pub fn norm_silu_grad(x: &[f32], gy: &[f32], dx: &mut [f32], stats: [f32; 4], silu: bool) -> [f32; 4] {
        let [mean, rstd, w, b] = stats;
        let one = |x: f32, gy: f32, dx: &mut f32| {
            let xh = (x - mean) * rstd;
            let dz = if silu {
                let z = w * xh + b;
                let s = 1.0 / (1.0 + exp(-z));
                gy * s * (1.0 + z * (1.0 - s))
            } else {
                gy
            };
            *dx = dz * w;
            [dz * xh, dz, *dx, *dx * xh]
        };
        let mut lanes = [[0f32; LANES]; 4];
        let (mut xs, mut gs) = (x.chunks_exact(LANES), gy.chunks_exact(LANES));
        let mut ds = dx.chunks_exact_mut(LANES);
        for ((xc, gc), dc) in (&mut xs).zip(&mut gs).zip(&mut ds) {
            for l in 0..LANES {
                let s = one(xc[l], gc[l], &mut dc[l]);
                for k in 0..4 {
                    lanes[k][l] += s[k];
                }
            }
        }
        let mut sums = lanes.map(|l| l.iter().sum::<f32>());
        let rest = xs.remainder().iter().zip(gs.remainder());
        for ((&x, &gy), dx) in rest.zip(ds.into_remainder()) {
            let s = one(x, gy, dx);
            for k in 0..4 {
                sums[k] += s[k];
            }
        }
        sums
    }
}

simd_fn! {
    /// The softmax's gradient down each column of a key-major block, in place:
    /// `dp = scale p (dp - sum(p dp))` per column (on entry the gradient of the probabilities
    /// `p`, on return of the scaled scores), rows of `width` values.
    pub fn softmax_grad_columns(dp: &mut [f32], p: &[f32], width: usize, scale: f32) -> () {
        let mut dots = vec![0f32; width];
        for (g, q) in dp.chunks_exact(width).zip(p.chunks_exact(width)) {
            for ((s, &g), &q) in dots.iter_mut().zip(g).zip(q) {
                *s = g.mul_add(q, *s);
            }
        }
        for (g, q) in dp.chunks_exact_mut(width).zip(p.chunks_exact(width)) {
            for ((g, &q), &dot) in g.iter_mut().zip(q).zip(&dots) {
                *g = scale * q * (*g - dot);
            }
        }
    }
}

simd_fn! {
    /// The sum of `(x - shift)^2` over `xs` (`shift` 0: of squares), in 16 lanes.
    pub fn sum_sq(xs: &[f32], shift: f32) -> f32 {
        lanes_sum(xs, |x| (x - shift) * (x - shift))
    }
}

simd_fn! {
    /// The sum of `xs`, in 16 lanes.
    pub fn sum(xs: &[f32]) -> f32 {
        lanes_sum(xs, |x| x)
    }
}

/// The mean of `xs` and `1 / sqrt(variance + eps)`, the variance as the mean of squared
/// deviations (the composite norms' arithmetic): group and layer norm, forward and backward.
pub fn mean_rstd(xs: &[f32], eps: f32) -> (f32, f32) {
    let n = xs.len() as f32;
    let mean = sum(xs) / n;
    (mean, 1.0 / (sum_sq(xs, mean) / n + eps).sqrt())
}

/// The sum of `f(x)` over `xs` in [`LANES`] independent lanes (vectorisable).
#[inline(always)]
fn lanes_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f32>()
}

/// Cephes' `expf`: 2^n e^r with r in [-ln 2 / 2, ln 2 / 2]; 0 below -87.3 (subnormal range),
/// saturating at 88.7.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let lo = x < -87.336_55;
    // Selects, not f32::max / min (whose NaN handling keeps loops from vectorising).
    let x = if lo { -87.336_55 } else { x };
    let x = if x > 88.722_83 { 88.722_83 } else { x };
    let t = x.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = 1.987_569_1e-4_f32
        .mul_add(r, 1.398_2e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let y = p.mul_add(z, r) + 1.0;
    let pow2 = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if lo {
        0.0
    } else {
        y * pow2
    }
}

/// `erf(x)` as `x p(x^2) / q(x^2)` on [-4, 4] (beyond, `erf` is +-1 in f32): the rational
/// approximation of Eigen's `generic_fast_erf_float` (also XLA's), within 1e-6 of `erf`.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    // Selects, not clamp (whose NaN handling keeps loops from vectorising).
    let x = if x > 4.0 { 4.0 } else { x };
    let x = if x < -4.0 { -4.0 } else { x };
    let x2 = x * x;
    let p = (-2.726_142_3e-10_f32)
        .mul_add(x2, 2.770_681_4e-8)
        .mul_add(x2, -2.101_024e-6)
        .mul_add(x2, -5.692_506_4e-5)
        .mul_add(x2, -7.349_906_3e-4)
        .mul_add(x2, -2.954_600_1e-3)
        .mul_add(x2, -1.609_603_3e-2);
    let q = (-1.456_607_2e-5_f32)
        .mul_add(x2, -2.133_740_6e-4)
        .mul_add(x2, -1.682_827e-3)
        .mul_add(x2, -7.373_329_2e-3)
        .mul_add(x2, -1.426_474e-2);
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `erf` by its Taylor series in f64 (converges on [-5, 5]; the largest term there is
    /// ~1e9, so the sum keeps ~1e-7 absolute, enough for an f32 check).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_1e6_of_the_series() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -5.0 + 10.0 * i as f64 / 100_000.0;
            worst = worst.max((erf(x as f32) as f64 - erf_series(x)).abs());
        }
        assert!(worst < 1e-6, "worst error {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-30.0), -erf(30.0));
    }

    #[test]
    fn exp_is_within_two_ulp_of_std_on_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a - b).abs() / (b * f32::EPSILON));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// Down each column of a (37 keys, 21 queries) block, against the softmax written out
    /// with `f32::exp`: 8 ulp per probability (Cephes' `exp` is within 2; the exponent
    /// `x scale - max scale` in one fused step differs from `(x - max) scale` by up to ~4 ulp of
    /// the result at these scores; the sums' rounding). 21 columns: one vector of 16 and a
    /// remainder.
    #[test]
    fn column_softmax_matches_the_plain_softmax() {
        let (rows, width, scale) = (37, 21, 0.3);
        let block: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let mut ours = block.clone();
        softmax_columns(&mut ours, width, scale);
        for c in 0..width {
            let col: Vec<f32> = (0..rows).map(|r| block[r * width + c]).collect();
            let max = col.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = col.iter().map(|x| ((x - max) * scale).exp()).collect();
            let sum: f32 = e.iter().sum();
            for (r, e) in e.iter().enumerate() {
                let (a, b) = (ours[r * width + c], e / sum);
                assert!(
                    (a - b).abs() <= 8.0 * f32::EPSILON * b,
                    "({r}, {c}): {a} vs {b}"
                );
            }
        }
    }
}
