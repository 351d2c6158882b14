//! 2-D convolution on the CPU in f32: for each image, tiles of output rows whose im2col
//! matrix (`c_in * kh * kw` rows, one per kernel tap, each a contiguous copy of shifted input
//! rows) meets the kernel in one GEMM, `(c_out, c_in*kh*kw) x (c_in*kh*kw, tile)`, written
//! straight into the NCHW output. 1x1 convolutions with stride 1 multiply the image itself.
//! A bias is where each output plane starts (the GEMMs add to it), or added by Winograd's
//! output transform: no pass of its own. The input's gradient of a stride-1 convolution is
//! this convolution again (of the flipped kernel: Winograd's for 3x3, where candle's
//! transposed convolution, a dot product per output element, was a fifth of a training step);
//! the rest of the backward pass is candle's (its formulas for `Op::Conv2D`), and the bias's
//! gradient the sum of the output's.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

use super::{
    apply_biased, f32_slice, sgemm, uninit, winograd, with_f32, with_scratch, BiasedOp, Mat,
};

/// Elements of one im2col tile (16 MiB): whole output rows, at least one.
const TILE_ELEMS: usize = 4 << 20;

/// Whether [`conv2d`] takes these tensors: f32 on the CPU, one group.
pub fn applies(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && cfg.groups == 1
        && x.rank() == 4
        && w.rank() == 4
}

/// `x (b, c_in, h, w)` convolved with `w (c_out, c_in, kh, kw)`, plus `bias (c_out)`.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: &Conv2dConfig) -> Result<Tensor> {
    let (_, c_in, _, _) = x.dims4()?;
    let (c_out, wc_in, _, _) = w.dims4()?;
    if c_in != wc_in || bias.is_some_and(|b| b.dims() != [c_out]) {
        candle_core::bail!(
            "conv2d: input {:?}, kernel {:?}, bias {:?} do not fit",
            x.dims(),
            w.dims(),
            bias.map(|b| b.dims())
        );
    }
    let op = Conv::new(cfg);
    apply_biased(&x.contiguous()?, &w.contiguous()?, bias, op)
}

pub(super) struct Conv {
    padding: usize,
    stride: usize,
    dilation: usize,
}

/// The shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Conv {
    pub(super) fn new(cfg: &Conv2dConfig) -> Self {
        Self {
            padding: cfg.padding,
            stride: cfg.stride,
            dilation: cfg.dilation,
        }
    }

    /// The convolution of contiguous f32 `x` of shape `xs` with kernel `k` of shape `ks`,
    /// plus `bias`: the output's values and shape.
    pub(super) fn run(
        &self,
        (x, xs): (&[f32], &Shape),
        (k, ks): (&[f32], &Shape),
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let (b, c_in, h, w) = xs.dims4()?;
        let (c_out, _, kh, kw) = ks.dims4()?;
        let (Some(oh), Some(ow)) = (self.out_len(h, kh), self.out_len(w, kw)) else {
            candle_core::bail!("conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input");
        };
        let d = Dims {
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            oh,
            ow,
        };
        Ok((
            self.forward(x, b, k, bias, d),
            Shape::from((b, c_out, oh, ow)),
        ))
    }

    fn out_len(&self, len: usize, k: usize) -> Option<usize> {
        let span = self.dilation * (k - 1) + 1;
        (len + 2 * self.padding)
            .checked_sub(span)
            .map(|r| r / self.stride + 1)
    }

    /// Input or kernel tap coordinate -> input index, None in the padding.
    fn source(&self, o: usize, tap: usize, len: usize) -> Option<usize> {
        (o * self.stride + tap * self.dilation)
            .checked_sub(self.padding)
            .filter(|&i| i < len)
    }

    /// Fills `col` (`c_in*kh*kw` rows of `rows * ow`) for output rows `oy0..oy0 + rows`.
    fn im2col(&self, x: &[f32], d: Dims, oy0: usize, rows: usize, col: &mut [f32]) {
        let t = rows * d.ow;
        col.par_chunks_mut(t).enumerate().for_each(|(r, dst)| {
            let (c, tap) = (r / (d.kh * d.kw), r % (d.kh * d.kw));
            let (ky, kx) = (tap / d.kw, tap % d.kw);
            let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
            for (i, out_row) in dst.chunks_mut(d.ow).enumerate() {
                let Some(iy) = self.source(oy0 + i, ky, d.h) else {
                    out_row.fill(0.0);
                    continue;
                };
                let src = &plane[iy * d.w..(iy + 1) * d.w];
                if self.stride == 1 {
                    // Columns ox whose input column ox + kx*dilation - padding is inside.
                    let shift = kx * self.dilation;
                    let lo = self.padding.saturating_sub(shift).min(d.ow);
                    let hi = (d.w + self.padding).saturating_sub(shift).clamp(lo, d.ow);
                    out_row[..lo].fill(0.0);
                    out_row[lo..hi].copy_from_slice(
                        &src[lo + shift - self.padding..hi + shift - self.padding],
                    );
                    out_row[hi..].fill(0.0);
                } else {
                    for (ox, o) in out_row.iter_mut().enumerate() {
                        *o = self.source(ox, kx, d.w).map_or(0.0, |ix| src[ix]);
                    }
                }
            }
        });
    }

    fn forward(&self, x: &[f32], b: usize, k: &[f32], bias: Option<&[f32]>, d: Dims) -> Vec<f32> {
        let threads = rayon::current_num_threads();
        let (plane_in, plane_out) = (d.c_in * d.h * d.w, d.oh * d.ow);
        let kk = d.c_in * d.kh * d.kw;
        // SAFETY: every path below (Winograd, pointwise GEMM, im2col GEMM, with accumulate =
        // false) writes each output plane whole.
        let mut out = unsafe { uninit(b * d.c_out * plane_out) };
        let pointwise = d.kh == 1 && d.kw == 1 && self.stride == 1 && self.padding == 0;
        let same3x3 = (d.kh, d.kw, self.stride, self.padding, self.dilation) == (3, 3, 1, 1, 1);
        if same3x3 && winograd::applies(d.oh, d.ow) {
            winograd::conv3x3(x, k, bias, &mut out, (b, d.c_in, d.h, d.w, d.c_out));
            return out;
        }
        for i in 0..b {
            let (xi, oi) = (&x[i * plane_in..], &mut out[i * d.c_out * plane_out..]);
            // The GEMMs below add to the bias (or write over whatever is there).
            if let Some(bias) = bias {
                oi[..d.c_out * plane_out]
                    .par_chunks_mut(plane_out)
                    .zip(bias)
                    .for_each(|(plane, &v)| plane.fill(v));
            }
            if pointwise {
                // SAFETY: k is (c_out, c_in), the image (c_in, h*w), the output (c_out, h*w).
                unsafe {
                    sgemm(
                        (d.c_out, plane_out, d.c_in),
                        Mat::rows(oi.as_mut_ptr(), plane_out),
                        Mat::rows(k.as_ptr(), d.c_in),
                        Mat::rows(xi.as_ptr(), plane_out),
                        bias.is_some(),
                        threads,
                    )
                };
                continue;
            }
            let rows = (TILE_ELEMS / (kk * d.ow)).clamp(1, d.oh);
            with_scratch(kk * rows * d.ow, |scratch| {
                for oy0 in (0..d.oh).step_by(rows) {
                    let r = rows.min(d.oh - oy0);
                    let col = &mut scratch[..kk * r * d.ow];
                    self.im2col(xi, d, oy0, r, col);
                    // SAFETY: k is (c_out, kk); col (kk, r*ow); the destination is the
                    // columns oy0*ow.. of the (c_out, oh*ow) output, row stride oh*ow.
                    unsafe {
                        sgemm(
                            (d.c_out, r * d.ow, kk),
                            Mat::rows(oi.as_mut_ptr().add(oy0 * d.ow), plane_out),
                            Mat::rows(k.as_ptr(), kk),
                            Mat::rows(col.as_ptr(), r * d.ow),
                            bias.is_some(),
                            threads,
                        )
                    };
                }
            });
        }
        out
    }
}

/// `w (c_out, c_in, kh, kw)` -> `(c_in, c_out, kh, kw)` turned by 180 degrees: the kernel of
/// a stride-1 convolution's adjoint. In parallel, one input channel's kernels per task (an
/// element-by-element copy on one thread took ~1.5% of a training step).
fn flipped(w: &Tensor) -> Result<Tensor> {
    let (co, ci, kh, kw) = w.dims4()?;
    let taps = kh * kw;
    let out = with_f32(w, |src| {
        // SAFETY: each task writes its channel's `co` kernels of `taps` whole.
        let mut out = unsafe { uninit(src.len()) };
        if taps > 0 {
            out.par_chunks_mut(co * taps)
                .enumerate()
                .for_each(|(i, dst)| {
                    for (o, d) in dst.chunks_exact_mut(taps).enumerate() {
                        let s = &src[(o * ci + i) * taps..][..taps];
                        d.iter_mut().zip(s.iter().rev()).for_each(|(d, &s)| *d = s);
                    }
                });
        }
        Ok(out)
    })?;
    Tensor::from_vec(out, (ci, co, kh, kw), w.device())
}

/// `g (b, c, oh, ow)` spread to `(b, c, h, w)`: `g[y][x]` at `(stride y, stride x)`, zeros
/// elsewhere. A strided convolution's input gradient is the stride-1 convolution of this
/// (the transposed convolution written as a plain one), so it runs on [`conv2d`]'s kernels.
fn spread(g: &Tensor, stride: usize, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, oh, ow) = g.dims4()?;
    if h * w == 0 || oh.saturating_sub(1) * stride >= h || ow.saturating_sub(1) * stride >= w {
        candle_core::bail!("spread: {oh}x{ow} by {stride} does not fit {h}x{w}");
    }
    let out = with_f32(g, |src| {
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(src.par_chunks(oh * ow))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks_exact(ow).enumerate() {
                    let dst = &mut dst[y * stride * w..];
                    for (x, &v) in row.iter().enumerate() {
                        dst[x * stride] = v;
                    }
                }
            });
        Ok(out)
    })?;
    Tensor::from_vec(out, (b, c, h, w), g.device())
}

impl BiasedOp for Conv {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn fwd(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, k) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let (out, shape) = self.run((x, l1.shape()), (k, l2.shape()), bias)?;
        Ok((CpuStorage::F32(out), shape))
    }

    /// The input's gradient. With stride and dilation 1 it is the output's gradient convolved
    /// with the kernel flipped in both directions, its channels swapped, padded `k - 1 - p`:
    /// [`conv2d`] again (Winograd's for 3x3), where candle's transposed convolution is a plain
    /// loop. With a larger stride and "same" padding (`k = 2p + 1`, the downsamplers) it is
    /// the same convolution of the gradient spread out to the input's size, zeros between
    /// ([`spread`]). Otherwise candle's backward pass of `Op::Conv2D` (candle-core 0.11.1,
    /// backprop.rs).
    fn input_grad(&self, arg: &Tensor, kernel: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (_, _, kh, kw) = kernel.dims4()?;
        let square = kh == kw && self.padding < kh;
        let same = kh == 2 * self.padding + 1;
        if self.dilation == 1 && square && (self.stride == 1 || same) {
            let cfg = Conv2dConfig {
                padding: kh - 1 - self.padding,
                ..Default::default()
            };
            let kernel = flipped(&kernel.detach())?;
            if self.stride == 1 {
                return conv2d(grad, &kernel, None, &cfg);
            }
            let (_, _, h, w) = arg.dims4()?;
            return conv2d(&spread(grad, self.stride, h, w)?, &kernel, None, &cfg);
        }
        let (padding, stride, dilation) = (self.padding, self.stride, self.dilation);
        // The transposed convolution's output padding per side (candle takes one for both and
        // derives it from the height only, which fails on non-square inputs with stride > 1):
        // the larger, then the result cut to the input's size.
        let out_padding = [2, 3]
            .iter()
            .map(|&i| -> Result<usize> {
                let span = (grad.dim(i)? - 1) * stride + dilation * (kernel.dim(i)? - 1) + 1;
                Ok(arg.dim(i)? - (span - 2 * padding))
            })
            .collect::<Result<Vec<_>>>()?;
        let grad_arg = grad
            .conv_transpose2d(
                kernel,
                padding,
                out_padding[0].max(out_padding[1]),
                stride,
                dilation,
            )?
            .narrow(2, 0, arg.dim(2)?)?
            .narrow(3, 0, arg.dim(3)?)?;
        Ok(grad_arg)
    }

    /// candle's backward pass of `Op::Conv2D` for the kernel.
    fn weight_grad(&self, arg: &Tensor, kernel: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (padding, stride, dilation) = (self.padding, self.stride, self.dilation);
        // candle passes (dilation, stride) in this order here: the roles swap for the kernel.
        let grad_kernel = arg
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, padding, dilation, stride, 1)?
            .transpose(0, 1)?;
        let (_, _, k0, k1) = kernel.dims4()?;
        let (_, _, g0, g1) = grad_kernel.dims4()?;
        let grad_kernel = if (g0, g1) != (k0, k1) {
            grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
        } else {
            grad_kernel
        };
        Ok(grad_kernel)
    }

    fn bias_grad(&self, grad: &Tensor) -> Result<Tensor> {
        grad.sum((0, 2, 3))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::sd::cpu::test_util::{max_abs, max_diff, randn};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        max_diff(a, b) / max_abs(b).max(1e-6)
    }

    /// Against candle's own CPU convolution (its im2col path, then the bias added), to f32
    /// rounding (1e-5 of the output's largest value; 3e-5 where Winograd's F(4x4, 3x3) runs):
    /// 3x3 with and without padding, stride 2 (a downsampler), dilation 2, 1x1, odd sizes, an
    /// input that is not contiguous, and a tile boundary, each with and without a bias.
    #[test]
    fn matches_candles_convolution() {
        // (b, c_in, h, w, c_out, k, padding, stride)
        type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
        let cases: [Case; 8] = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 3, 8, 8, 4, 3, 0, 1),
            (2, 4, 9, 10, 3, 3, 1, 2),
            (1, 6, 5, 5, 7, 1, 0, 1),
            (1, 2, 7, 6, 2, 1, 0, 2),
            (1, 3, 4, 4, 2, 3, 2, 1),
            // Winograd (3x3, stride 1, padding 1, at least 16x16), sizes that end in partial
            // tiles, batch 2 (both images' tiles in one batch).
            (2, 5, 18, 17, 6, 3, 1, 1),
            // Winograd with 600 channels: 19 x 11 tiles, two batches (17 tile rows fit in
            // one); with dilation 2: im2col rows of 9 * 600 * 40 elements, several tiles of
            // output rows.
            (1, 600, 75, 42, 8, 3, 1, 1),
        ];
        for (i, &(b, c_in, h, w, c_out, k, padding, stride)) in cases.iter().enumerate() {
            let x = randn(i as u64, &[b, c_in, h, w]);
            let kern = randn(100 + i as u64, &[c_out, c_in, k, k]);
            for dilation in [1, 2] {
                if dilation * (k - 1) + 1 > h + 2 * padding {
                    continue;
                }
                let cfg = Conv2dConfig {
                    padding,
                    stride,
                    dilation,
                    groups: 1,
                    cudnn_fwd_algo: None,
                };
                let theirs = x.conv2d(&kern, padding, stride, dilation, 1).unwrap();
                let bias = randn(200 + i as u64, &[c_out]);
                let biased = theirs
                    .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                    .unwrap();
                // F(4x4, 3x3) in f32 keeps about a decimal digit less than a direct sum
                // (winograd.rs: ~1e-5 of the output's scale at 600 channels, candle's direct
                // convolution ~5e-7).
                let winograd =
                    (k, padding, stride, dilation) == (3, 1, 1, 1) && winograd::applies(h, w);
                let tol = if winograd { 3e-5 } else { 1e-5 };
                for (b, theirs) in [(None, &theirs), (Some(&bias), &biased)] {
                    let ours = conv2d(&x, &kern, b, &cfg).unwrap();
                    assert_eq!(ours.dims(), theirs.dims(), "case {i}");
                    let err = max_rel(&ours, theirs);
                    assert!(
                        err < tol,
                        "case {i}, dilation {dilation}, bias {b:?}: {err}"
                    );
                }
            }
        }
        // Not contiguous: a transposed view.
        let x = randn(7, &[1, 4, 6, 5]).transpose(2, 3).unwrap();
        let kern = randn(8, &[3, 4, 3, 3]);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let ours = conv2d(&x, &kern, None, &cfg).unwrap();
        let theirs = x.conv2d(&kern, 1, 1, 1, 1).unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-5);
    }

    /// Stride-1 input gradients (our own convolution of the flipped kernel) against candle's
    /// backward pass, to 1e-5 relative: 3x3 padded 1 on 34x33 (Winograd's size), unpadded 3x3,
    /// 1x1, each with a frozen kernel (no kernel gradient) and a variable one (its gradient
    /// candle's too).
    #[test]
    fn stride_one_input_gradients_are_candles() {
        let cases = [(3, 1, 34, 33), (3, 0, 9, 8), (1, 0, 7, 5)];
        for (i, &(k, padding, h, w)) in cases.iter().enumerate() {
            for variable in [false, true] {
                let x = Var::from_tensor(&randn(10 * i as u64, &[2, 5, h, w])).unwrap();
                let kern = randn(10 * i as u64 + 1, &[6, 5, k, k]);
                let kern = match variable {
                    true => Var::from_tensor(&kern).unwrap().as_tensor().clone(),
                    false => kern,
                };
                let cfg = Conv2dConfig {
                    padding,
                    ..Default::default()
                };
                let y = conv2d(x.as_tensor(), &kern, None, &cfg).unwrap();
                let up = randn(10 * i as u64 + 2, y.dims());
                let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
                let ours = loss(y).backward().unwrap();
                let theirs = x.as_tensor().conv2d(&kern, padding, 1, 1, 1).unwrap();
                let theirs = loss(theirs).backward().unwrap();
                let (a, b) = (ours.get(&x).unwrap(), theirs.get(&x).unwrap());
                assert!(max_rel(a, b) < 1e-5, "case {i}: {}", max_rel(a, b));
                match variable {
                    false => assert!(
                        ours.get(&kern).is_none(),
                        "case {i}: a frozen kernel's gradient"
                    ),
                    true => {
                        let (a, b) = (ours.get(&kern).unwrap(), theirs.get(&kern).unwrap());
                        assert!(max_rel(a, b) < 1e-5, "case {i}, kernel: {}", max_rel(a, b));
                    }
                }
            }
        }
    }

    /// Strided input gradients with "same" padding (the gradient spread out, then our own
    /// convolution of the flipped kernel) against candle's backward pass (its transposed
    /// convolution): a 3x3 stride-2 downsampler on an even and an odd size, one of them
    /// Winograd's (34x34: 3e-5 relative, F(4x4)'s rounding; 1e-5 otherwise), a 1x1 stride-2
    /// and a 3x3 stride-3 convolution.
    #[test]
    fn strided_input_gradients_are_candles() {
        // (k, padding, stride, side)
        let cases = [(3, 1, 2, 34), (3, 1, 2, 9), (1, 0, 2, 7), (3, 1, 3, 10)];
        for (i, &(k, padding, stride, side)) in cases.iter().enumerate() {
            let x = Var::from_tensor(&randn(30 + i as u64, &[2, 5, side, side])).unwrap();
            let kern = randn(40 + i as u64, &[6, 5, k, k]);
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let y = conv2d(x.as_tensor(), &kern, None, &cfg).unwrap();
            let up = randn(50 + i as u64, y.dims());
            let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
            let ours = loss(y).backward().unwrap();
            let theirs = x.as_tensor().conv2d(&kern, padding, stride, 1, 1).unwrap();
            let theirs = loss(theirs).backward().unwrap();
            let (a, b) = (ours.get(&x).unwrap(), theirs.get(&x).unwrap());
            let tol = if winograd::applies(side, side) {
                3e-5
            } else {
                1e-5
            };
            assert!(max_rel(a, b) < tol, "case {i}: {}", max_rel(a, b));
        }
    }

    /// The gradients of input, kernel and bias are candle's (the same formulas; candle's
    /// convolution plus a broadcast bias) to 1e-5, on a square input (candle's own backward
    /// refuses a non-square one with stride 2, where ours gives gradients of the input's
    /// shape).
    #[test]
    fn gradients_are_candles() {
        let odd = Var::from_tensor(&randn(1, &[2, 3, 6, 5])).unwrap();
        let kern = randn(2, &[4, 3, 3, 3]);
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let y = conv2d(odd.as_tensor(), &kern, None, &cfg).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&odd).unwrap().dims(), &[2, 3, 6, 5]);

        let x = Var::from_tensor(&randn(1, &[2, 3, 6, 6])).unwrap();
        let kern = Var::from_tensor(&randn(2, &[4, 3, 3, 3])).unwrap();
        let up = randn(3, &[2, 4, 3, 3]);
        let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
        let bias = Var::from_tensor(&randn(4, &[4])).unwrap();
        let ours = loss(
            conv2d(
                x.as_tensor(),
                kern.as_tensor(),
                Some(bias.as_tensor()),
                &cfg,
            )
            .unwrap(),
        )
        .backward()
        .unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(kern.as_tensor(), 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        let theirs = loss(theirs).backward().unwrap();
        for v in [&x, &kern, &bias] {
            let (a, b) = (ours.get(v).unwrap(), theirs.get(v).unwrap());
            assert!(max_rel(a, b) < 1e-5);
        }
    }
}
