//! 3x3 convolutions with stride 1 and padding 1 by Winograd's F(2x2, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 block of output comes
//! from a 4x4 block of input through 16 products instead of 36, so the GEMMs do 2.25 times
//! fewer multiply-adds. The kernel is transformed per call (`U = G g G^T`, 16 matrices of
//! `(c_out, c_in)`), the input by batches of tiles (`V = B^T d B`), then 16 GEMMs
//! `M = U V` and the output transform `Y = A^T M A`. In f32 its error stays at rounding level
//! (F(2x2, 3x3) has the smallest transforms: entries 0, +-1 and 1/2).

use rayon::prelude::*;

use super::{sgemm, uninit, with_scratch, Mat};

/// Transformed input per batch of tiles: at most this many f32 (16 MiB).
const BATCH_ELEMS: usize = 4 << 20;

/// Whether Winograd pays here: enough output pixels that the kernel's transform (16 c_out c_in
/// per call) is small against the GEMMs.
pub fn applies(oh: usize, ow: usize) -> bool {
    oh * ow >= 32 * 32
}

/// `U = G g G^T` for every (o, c) of `k (c_out, c_in, 3, 3)`: 16 matrices `(c_out, c_in)`,
/// ξ-major, what [`conv3x3`] takes. By blocks of (o, c) pairs in parallel, each block's 16
/// values per pair written out as 16 contiguous runs (a training step transforms every
/// flipped kernel of its backward pass again).
pub fn transform_kernel(k: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    const BLOCK: usize = 256;
    let n = c_out * c_in;
    // SAFETY: the blocks cover 0..n, and each writes its run of every one of the 16 streams.
    let mut u = unsafe { uninit(16 * n) };
    let u_ptr = SendPtr(u.as_mut_ptr());
    (0..n.div_ceil(BLOCK)).into_par_iter().for_each(|block| {
        let u_ptr = &u_ptr;
        let p0 = block * BLOCK;
        let len = BLOCK.min(n - p0);
        let mut tiles = [[0f32; 16]; BLOCK];
        for (i, tile) in tiles[..len].iter_mut().enumerate() {
            *tile = kernel_tile(&k[(p0 + i) * 9..][..9]);
        }
        for xi in 0..16 {
            // SAFETY: (ξ, p0..p0 + len) is inside u; only this block writes it.
            let dst = unsafe { std::slice::from_raw_parts_mut(u_ptr.0.add(xi * n + p0), len) };
            dst.iter_mut()
                .zip(&tiles[..len])
                .for_each(|(d, t)| *d = t[xi]);
        }
    });
    u
}

/// `G g G^T` of one 3x3 kernel `g`: 4x4, row-major.
fn kernel_tile(g: &[f32]) -> [f32; 16] {
    // G g: 4x3.
    let mut t = [[0f32; 3]; 4];
    for j in 0..3 {
        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
        t[0][j] = a;
        t[1][j] = 0.5 * (a + b + c);
        t[2][j] = 0.5 * (a - b + c);
        t[3][j] = c;
    }
    // (G g) G^T: 4x4.
    let mut out = [0f32; 16];
    for i in 0..4 {
        let (a, b, c) = (t[i][0], t[i][1], t[i][2]);
        out[i * 4] = a;
        out[i * 4 + 1] = 0.5 * (a + b + c);
        out[i * 4 + 2] = 0.5 * (a - b + c);
        out[i * 4 + 3] = c;
    }
    out
}

/// One image: `x (c_in, h, w)` -> `out (c_out, h, w)`, with the transformed kernel `u`, plus
/// `bias (c_out)`.
pub fn conv3x3(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    (c_in, h, w, c_out): (usize, usize, usize, usize),
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // Batches of whole tile rows.
    let rows = (BATCH_ELEMS / (16 * c_in.max(c_out) * tw)).clamp(1, th);
    let batch = rows * tw;
    with_scratch(16 * (c_in + c_out) * batch, |scratch| {
        let (v, m) = scratch.split_at_mut(16 * c_in * batch);
        for ty0 in (0..th).step_by(rows) {
            let r = rows.min(th - ty0);
            let nt = r * tw;
            input_transform(x, v, (c_in, h, w, tw), ty0, r, batch);
            let m_ptr = SendPtr(m.as_mut_ptr());
            (0..16).into_par_iter().for_each(|xi| {
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
            output_transform(m, bias, out, (c_out, h, w, tw), ty0, r, batch);
        }
    });
}

struct SendPtr(*mut f32);
// SAFETY: the tasks sharing it write disjoint elements.
unsafe impl Sync for SendPtr {}

/// `V = B^T d B` for tile rows `ty0..ty0 + rows`: `v[ξ][c][t]`, row stride `batch`, tile
/// `t = (ty - ty0) * tw + tx`. Per channel and tile row, B^T runs over four whole zero-padded
/// input rows at once, then B over each tile's four columns.
fn input_transform(
    x: &[f32],
    v: &mut [f32],
    (c_in, h, w, tw): (usize, usize, usize, usize),
    ty0: usize,
    rows: usize,
    batch: usize,
) {
    let v_ptr = SendPtr(v.as_mut_ptr());
    let width = 2 * tw + 2;
    (0..c_in).into_par_iter().for_each_init(
        || vec![0f32; 8 * width],
        |buf, c| {
            let v_ptr = &v_ptr;
            let plane = &x[c * h * w..(c + 1) * h * w];
            let (d, s) = buf.split_at_mut(4 * width);
            for ty in ty0..ty0 + rows {
                // Input rows 2ty-1 .. 2ty+2, columns -1 .. 2tw (zero outside the image).
                for (i, row) in d.chunks_exact_mut(width).enumerate() {
                    row.fill(0.0);
                    if let Some(y) = (2 * ty + i).checked_sub(1).filter(|&y| y < h) {
                        row[1..1 + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                    }
                }
                // B^T d over whole rows.
                let (d0, rest) = d.split_at(width);
                let (d1, rest) = rest.split_at(width);
                let (d2, d3) = rest.split_at(width);
                let (s0, rest) = s.split_at_mut(width);
                let (s1, rest) = rest.split_at_mut(width);
                let (s2, s3) = rest.split_at_mut(width);
                for j in 0..width {
                    s0[j] = d0[j] - d2[j];
                    s1[j] = d1[j] + d2[j];
                    s2[j] = d2[j] - d1[j];
                    s3[j] = d1[j] - d3[j];
                }
                // (B^T d) B per tile, into the 16 streams.
                let t0 = (ty - ty0) * tw;
                for (i, si) in [&*s0, &*s1, &*s2, &*s3].into_iter().enumerate() {
                    for j in 0..4 {
                        let base = ((i * 4 + j) * c_in + c) * batch + t0;
                        // SAFETY: (ξ, c, t0..t0 + tw) is inside v; only this task writes
                        // channel c.
                        let dst = unsafe { std::slice::from_raw_parts_mut(v_ptr.0.add(base), tw) };
                        for (tx, o) in dst.iter_mut().enumerate() {
                            let e = &si[2 * tx..2 * tx + 4];
                            *o = match j {
                                0 => e[0] - e[2],
                                1 => e[1] + e[2],
                                2 => e[2] - e[1],
                                _ => e[1] - e[3],
                            };
                        }
                    }
                }
            }
        },
    );
}

/// `Y = A^T M A + bias` for tile rows `ty0..ty0 + rows` into `out (c_out, h, w)`: A^T over
/// the 16 streams' rows of tiles at once, then A per tile.
fn output_transform(
    m: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    (c_out, h, w, tw): (usize, usize, usize, usize),
    ty0: usize,
    rows: usize,
    batch: usize,
) {
    out.par_chunks_mut(h * w)
        .take(c_out)
        .enumerate()
        .for_each_init(
            || vec![0f32; 8 * tw],
            |buf, (o, plane)| {
                let b = bias.map_or(0.0, |b| b[o]);
                for ty in ty0..ty0 + rows {
                    let t0 = (ty - ty0) * tw;
                    let e = |xi: usize| &m[(xi * c_out + o) * batch + t0..][..tw];
                    // A^T M: two rows of four streams, each over the tile row.
                    for j in 0..4 {
                        let (a, b, c, d) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                        let (r0, r1) = buf.split_at_mut(4 * tw);
                        let (r0, r1) = (&mut r0[j * tw..][..tw], &mut r1[j * tw..][..tw]);
                        for t in 0..tw {
                            r0[t] = a[t] + b[t] + c[t];
                            r1[t] = b[t] - c[t] - d[t];
                        }
                    }
                    // (A^T M) A per tile: output rows 2ty and 2ty + 1.
                    for i in 0..2 {
                        let y = 2 * ty + i;
                        if y >= h {
                            continue;
                        }
                        let r = &buf[i * 4 * tw..(i + 1) * 4 * tw];
                        let (q0, q1, q2, q3) =
                            (&r[..tw], &r[tw..2 * tw], &r[2 * tw..3 * tw], &r[3 * tw..]);
                        let row = &mut plane[y * w..(y + 1) * w];
                        for tx in 0..tw {
                            row[2 * tx] = q0[tx] + q1[tx] + q2[tx] + b;
                            if 2 * tx + 1 < w {
                                row[2 * tx + 1] = q1[tx] - q2[tx] - q3[tx] + b;
                            }
                        }
                    }
                }
            },
        );
}
