//! 3x3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(4x4, 3x3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 4x4 block
//! of output comes from a 6x6 block of input through 36 products instead of 144, so the GEMMs
//! do 4 times fewer multiply-adds than direct convolution (F(2x2, 3x3), used here before,
//! 2.25 times). The kernel is transformed per call (`U = G g G^T`, 36 matrices of
//! `(c_out, c_in)`), the input by batches of tiles (`V = B^T d B`, 36 matrices of
//! `(c_in, tiles)`), then 36 GEMMs `M = U V` and the output transform `Y = A^T M A`.
//!
//! The kernel's transform is 4 times the kernel's size and is not kept between calls: keeping
//! it per layer would cost SD1.5's UNet ~1.2 GB (4x its Winograd layers' 3x3 kernels) for ~5%
//! of a UNet call. (Transforming it by blocks of output channels, each block in the cache of
//! the thread that multiplies it, was slower: every block's GEMMs read all of V again.)
//!
//! In f32 the error stays within ~1e-5 of the output's scale, about twenty times a direct
//! sum's (the points 0, +-1, +-2: entries up to 8 in `A`, 1/24 in `G`; tests below and in
//! `conv.rs`).

use rayon::prelude::*;

use super::{sgemm, uninit, with_scratch, Mat};

/// Output tile: 4x4.
const M: usize = 4;
/// Input tile: 6x6.
const N: usize = M + 2;
/// Products per tile.
const NN: usize = N * N;

/// Transformed input per batch of tiles: at most this many f32 (16 MiB).
const BATCH_ELEMS: usize = 4 << 20;

/// Whether Winograd pays here: enough output pixels (a 16x16 image has 16 tiles) that the
/// kernel's transform, made again per call, is small against the products.
pub fn applies(oh: usize, ow: usize) -> bool {
    oh * ow >= 16 * 16
}

/// `G g` of one kernel column `g` (3 taps): 6 values.
#[inline(always)]
fn kernel_col([a, b, c]: [f32; 3]) -> [f32; N] {
    let (s, t) = (a + c, a + 4.0 * c);
    [
        0.25 * a,
        -(s + b) / 6.0,
        -(s - b) / 6.0,
        (t + 2.0 * b) / 24.0,
        (t - 2.0 * b) / 24.0,
        c,
    ]
}

/// `B^T d` of one input column `d` (6 values).
#[inline(always)]
fn input_col(d: [f32; N]) -> [f32; N] {
    let (p, q) = (d[4] - 4.0 * d[2], d[3] - 4.0 * d[1]);
    let (r, s) = (d[4] - d[2], 2.0 * (d[3] - d[1]));
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        p + q,
        p - q,
        r + s,
        r - s,
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// `A^T m` of one column `m` of products (6 values): 4 values.
#[inline(always)]
fn output_col(m: [f32; N]) -> [f32; M] {
    let (a, b) = (m[1] + m[2], m[1] - m[2]);
    let (c, d) = (m[3] + m[4], m[3] - m[4]);
    [m[0] + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + m[5]]
}

/// `G g G^T` of one 3x3 kernel `g`: 6x6, row-major.
#[inline(always)]
fn kernel_tile(g: &[f32]) -> [f32; NN] {
    // G g: 6x3, by columns.
    let cols: [[f32; N]; 3] = std::array::from_fn(|j| kernel_col([g[j], g[3 + j], g[6 + j]]));
    // (G g) G^T: each row of G g through G.
    let mut out = [0f32; NN];
    for i in 0..N {
        out[i * N..(i + 1) * N].copy_from_slice(&kernel_col([cols[0][i], cols[1][i], cols[2][i]]));
    }
    out
}

/// `U = G g G^T` for every (o, c) of `k (c_out, c_in, 3, 3)`: 36 matrices `(c_out, c_in)`,
/// ξ-major. By blocks of (o, c) pairs in parallel, each block's 36 values per pair written out
/// as 36 contiguous runs.
fn transform_kernel(k: &[f32], pairs: usize) -> Vec<f32> {
    const BLOCK: usize = 128;
    // SAFETY: the blocks cover 0..pairs, and each writes its run of every one of the 36
    // streams.
    let mut u = unsafe { uninit(NN * pairs) };
    let u_ptr = SendPtr(u.as_mut_ptr());
    (0..pairs.div_ceil(BLOCK))
        .into_par_iter()
        .for_each(|block| {
            let u_ptr = &u_ptr;
            let p0 = block * BLOCK;
            let len = BLOCK.min(pairs - p0);
            let mut tiles = [[0f32; NN]; BLOCK];
            for (i, tile) in tiles[..len].iter_mut().enumerate() {
                *tile = kernel_tile(&k[(p0 + i) * 9..][..9]);
            }
            for xi in 0..NN {
                // SAFETY: (ξ, p0..p0 + len) is inside u; only this block writes it.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(u_ptr.0.add(xi * pairs + p0), len) };
                dst.iter_mut()
                    .zip(&tiles[..len])
                    .for_each(|(d, t)| *d = t[xi]);
            }
        });
    u
}

/// `x (b, c_in, h, w)` convolved with `k (c_out, c_in, 3, 3)` (padding 1) plus `bias (c_out)`
/// into `out (b, c_out, h, w)`. The images' tile rows are numbered in one sequence
/// (image-major), so a GEMM takes the tiles of several images where they fit one batch.
pub fn conv3x3(
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    (b, c_in, h, w, c_out): (usize, usize, usize, usize, usize),
) {
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let all = b * th;
    // Batches of whole tile rows.
    let rows = (BATCH_ELEMS / (NN * c_in.max(c_out) * tw)).clamp(1, all);
    let batch = rows * tw;
    let u = transform_kernel(k, c_out * c_in);
    with_scratch(NN * (c_in + c_out) * batch, |scratch| {
        let (v, m) = scratch.split_at_mut(NN * c_in * batch);
        for ty0 in (0..all).step_by(rows) {
            let r = rows.min(all - ty0);
            let nt = r * tw;
            input_transform(x, v, (c_in, h, w, th, tw), ty0, r, batch);
            let m_ptr = SendPtr(m.as_mut_ptr());
            (0..NN).into_par_iter().for_each(|xi| {
                let m_ptr = &m_ptr;
                // SAFETY: U[ξ] (c_out, c_in), V[ξ] (c_in, nt) with row stride `batch`, M[ξ]
                // (c_out, nt) likewise; each ξ writes its own M[ξ].
                unsafe {
                    sgemm(
                        (c_out, nt, c_in),
                        Mat::rows(m_ptr.0.add(xi * c_out * batch), batch),
                        Mat::rows(u.as_ptr().add(xi * c_out * c_in), c_in),
                        Mat::rows(v.as_ptr().add(xi * c_in * batch), batch),
                        false,
                        1,
                    )
                }
            });
            output_transform(m, bias, out, (c_out, h, w, th, tw), ty0, r, batch);
        }
    });
}

struct SendPtr(*mut f32);
// SAFETY: the tasks sharing it write disjoint elements.
unsafe impl Sync for SendPtr {}

/// `V = B^T d B` for tile rows `ty0..ty0 + rows` (of all images; image `ty / th`'s row
/// `ty % th`): `v[ξ][c][t]`, row stride `batch`, tile `t = (ty - ty0) * tw + tx`. Per channel
/// and tile row, B^T runs over 6 whole zero-padded input rows at once, then B over each tile's
/// 6 columns.
fn input_transform(
    x: &[f32],
    v: &mut [f32],
    (c_in, h, w, th, tw): (usize, usize, usize, usize, usize),
    ty0: usize,
    rows: usize,
    batch: usize,
) {
    let v_ptr = SendPtr(v.as_mut_ptr());
    let width = M * tw + 2;
    (0..c_in).into_par_iter().for_each_init(
        || vec![0f32; 2 * N * width],
        |buf, c| {
            let v_ptr = &v_ptr;
            let (d, s) = buf.split_at_mut(N * width);
            for ty in ty0..ty0 + rows {
                let (image, row_in_image) = (ty / th, ty % th);
                let plane = &x[(image * c_in + c) * h * w..][..h * w];
                // Input rows 4 ty - 1 .. 4 ty + 4, columns -1 .. 4 tw (zero outside).
                for (i, row) in d.chunks_exact_mut(width).enumerate() {
                    row.fill(0.0);
                    if let Some(y) = (M * row_in_image + i).checked_sub(1).filter(|&y| y < h) {
                        row[1..1 + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                    }
                }
                // B^T d over whole rows.
                for j in 0..width {
                    let col = input_col(std::array::from_fn(|i| d[i * width + j]));
                    for (i, &e) in col.iter().enumerate() {
                        s[i * width + j] = e;
                    }
                }
                // (B^T d) B per tile, into the 36 streams.
                let t0 = (ty - ty0) * tw;
                for (i, si) in s.chunks_exact(width).enumerate() {
                    // Stream ξ = 6 i + j, channel c, from tile t0.
                    let dst: [*mut f32; N] = std::array::from_fn(|j| {
                        v_ptr.0.wrapping_add(((i * N + j) * c_in + c) * batch + t0)
                    });
                    for tx in 0..tw {
                        let t = input_col(std::array::from_fn(|k| si[M * tx + k]));
                        for (dj, tj) in dst.iter().zip(t) {
                            // SAFETY: (ξ, c, t0 + tx) is inside v (tx < tw); only this task
                            // writes channel c.
                            unsafe { *dj.add(tx) = tj };
                        }
                    }
                }
            }
        },
    );
}

/// `Y = A^T M A + bias` for tile rows `ty0..ty0 + rows` (numbered as in [`input_transform`])
/// into `out (b, c_out, h, w)`: A^T over the streams' rows of tiles at once, then A per tile.
fn output_transform(
    mm: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    (c_out, h, w, th, tw): (usize, usize, usize, usize, usize),
    ty0: usize,
    rows: usize,
    batch: usize,
) {
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..c_out).into_par_iter().for_each_init(
        || vec![0f32; M * N * tw],
        |buf, o| {
            let out_ptr = &out_ptr;
            let b = bias.map_or(0.0, |b| b[o]);
            for ty in ty0..ty0 + rows {
                let (image, row_in_image) = (ty / th, ty % th);
                // SAFETY: plane o of image `image` is inside out (ty < b th); only this task
                // writes plane o of any image.
                let plane = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.0.add((image * c_out + o) * h * w),
                        h * w,
                    )
                };
                let t0 = (ty - ty0) * tw;
                let e = |xi: usize| &mm[(xi * c_out + o) * batch + t0..][..tw];
                // A^T M: 4 rows of 6 streams, each over the tile row; buf[i][j][t].
                for j in 0..N {
                    let col: [&[f32]; N] = std::array::from_fn(|i| e(i * N + j));
                    for t in 0..tw {
                        let r = output_col(std::array::from_fn(|i| col[i][t]));
                        for (i, &ri) in r.iter().enumerate() {
                            buf[(i * N + j) * tw + t] = ri;
                        }
                    }
                }
                // (A^T M) A per tile: output rows 4 ty .. 4 ty + 4.
                for i in 0..M {
                    let y = M * row_in_image + i;
                    if y >= h {
                        break;
                    }
                    let q = &buf[i * N * tw..(i + 1) * N * tw];
                    let row = &mut plane[y * w..(y + 1) * w];
                    for tx in 0..tw {
                        let r = output_col(std::array::from_fn(|j| q[j * tw + tx]));
                        let x0 = M * tx;
                        for (o, &rk) in row[x0..].iter_mut().zip(&r) {
                            *o = rk + b;
                        }
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3x3 convolution, padding 1, in f64: the reference.
    fn direct(
        x: &[f32],
        k: &[f32],
        (b, c_in, h, w, c_out): (usize, usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; b * c_out * h * w];
        for (i, o, c) in
            (0..b).flat_map(|i| (0..c_out).flat_map(move |o| (0..c_in).map(move |c| (i, o, c))))
        {
            let (plane, kern) = (&x[(i * c_in + c) * h * w..], &k[(o * c_in + c) * 9..]);
            for y in 0..h {
                for xx in 0..w {
                    let mut s = 0f64;
                    for (ky, kx) in (0..3).flat_map(|ky| (0..3).map(move |kx| (ky, kx))) {
                        let (iy, ix) = (y + ky, xx + kx);
                        if (1..=h).contains(&iy) && (1..=w).contains(&ix) {
                            s += plane[(iy - 1) * w + ix - 1] as f64 * kern[ky * 3 + kx] as f64;
                        }
                    }
                    out[((i * c_out + o) * h + y) * w + xx] += s;
                }
            }
        }
        out
    }

    /// Against a direct convolution in f64, on two images whose sizes end in partial tiles (13
    /// and 11 are not multiples of 4), with more (o, c) pairs than one block of the kernel's
    /// transform (150 x 70 > 128) and inputs and kernels of unit scale. Tolerance: 1e-5 of the
    /// output's largest value (F(4x4, 3x3) in f32 measured ~5e-6 here; a direct f32 sum ~6e-7).
    #[test]
    fn matches_direct_convolution() {
        let dims = (2, 70, 13, 11, 150);
        let (b, c_in, h, w, c_out) = dims;
        let noise = |seed, n| -> Vec<f32> {
            crate::util::noise::seeded_noise(seed, &[n])
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (x, k, bias) = (
            noise(1, b * c_in * h * w),
            noise(2, c_out * c_in * 9),
            noise(3, c_out),
        );
        let reference = direct(&x, &k, dims);
        let scale = reference.iter().fold(0f64, |a, v| a.max(v.abs()));
        let mut out = vec![f32::NAN; b * c_out * h * w];
        conv3x3(&x, &k, Some(&bias), &mut out, dims);
        let err = out
            .iter()
            .zip(&reference)
            .enumerate()
            .map(|(i, (&o, &r))| (o as f64 - bias[(i / (h * w)) % c_out] as f64 - r).abs())
            .fold(0f64, f64::max)
            / scale;
        assert!(err < 1e-5, "error {err:e} relative to {scale}");
    }
}
