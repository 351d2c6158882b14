//! f32 CPU kernels built on one GEMM (the `gemm` crate candle's CPU matmul uses, with its
//! AVX-512 kernels compiled in): what the UNet and the VAE spend their time in on a CPU.
//!
//! - [`conv`]: 2-D convolution as tiled im2col + one GEMM per tile, the kernel in its stored
//!   layout, written straight into NCHW (candle's CPU conv transposes the input to NHWC and
//!   the output back, and multiplies 512-pixel tiles).
//! - [`attention`]: `softmax(scale q k^T) v` by blocks of query rows: each block's scores are
//!   one GEMM, a softmax in cache, one GEMM with V; the `(n, m)` score matrix never exists.
//! - [`winograd`]: 3x3 stride-1 convolutions with 4 times fewer multiply-adds (F(4x4, 3x3)).
//! - [`linear`]: `x w^T + b` as one GEMM that starts from the bias.
//! - [`geglu`]: the feed-forward's `a * gelu(g)` in one pass.
//! - [`group_norm`]: group norm + SiLU in three vectorised passes instead of about ten.
//! - [`layer_norm`]: layer norm in three passes.
//! - [`norm_conv`]: a frozen group norm + SiLU, convolution and add as one op, for training
//!   (the graph keeps the norm's input only).
//! - [`norm_linear`]: the same for a frozen layer norm and linear layer.
//! - [`quick_gelu`]: CLIP's `x * sigmoid(1.702 x)` in one pass.
//!
//! Both keep candle's results to f32 rounding (tests compare them with candle's ops) and both
//! are used only for f32 tensors on the CPU; everything else goes through candle.

pub mod attention;
pub mod conv;
mod exp;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod norm_conv;
pub mod norm_linear;
pub mod quick_gelu;
pub mod winograd;

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// A matrix operand of [`sgemm`]: its first element and the strides (in elements) between
/// rows and between columns.
#[derive(Clone, Copy)]
struct Mat<P> {
    ptr: P,
    rs: isize,
    cs: isize,
}

impl<P> Mat<P> {
    /// Row-major, `stride` elements from one row to the next.
    fn rows(ptr: P, stride: usize) -> Self {
        Self {
            ptr,
            rs: stride as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `stride` apart (column-major).
    fn cols(ptr: P, stride: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: stride as isize,
        }
    }
}

/// `dst (m x n) = lhs (m x k) * rhs (k x n)`; `accumulate` adds to what `dst` holds.
/// `threads` > 1 splits the work over rayon's pool.
///
/// # Safety
/// The operands must address matrices of those shapes and strides; `dst` must not overlap the
/// others.
unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: Mat<*mut f32>,
    lhs: Mat<*const f32>,
    rhs: Mat<*const f32>,
    accumulate: bool,
    threads: usize,
) {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.cs,
        dst.rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// `dst[c * dst_stride + r] = src[r * src_stride + c]` for the `(rows, cols)` block of `src`;
/// `parallel`: by blocks of 32 columns of `src` over rayon's pool (a whole activation), else
/// on this thread (a block inside a kernel's own parallel loop).
fn transpose(
    src: &[f32],
    (rows, cols): (usize, usize),
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    parallel: bool,
) {
    const COLS: usize = 32;
    if !parallel {
        return transpose_tiles(src, (rows, cols), src_stride, dst, dst_stride);
    }
    dst.par_chunks_mut(COLS * dst_stride)
        .enumerate()
        .for_each(|(block, dst)| {
            let c0 = block * COLS;
            let width = (dst.len() / dst_stride).min(cols.saturating_sub(c0));
            if width > 0 {
                transpose_tiles(&src[c0..], (rows, width), src_stride, dst, dst_stride);
            }
        });
}

/// [`transpose`] on this thread, by 16x16 tiles read and written a row (one cache line) at a
/// time: rows of 4096 floats are 16 KiB apart, and a tile's 16 lines there share one set of
/// the L1 cache.
fn transpose_tiles(
    src: &[f32],
    (rows, cols): (usize, usize),
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    const T: usize = 16;
    for i0 in (0..rows).step_by(T) {
        for j0 in (0..cols).step_by(T) {
            if i0 + T <= rows && j0 + T <= cols {
                let tile: [[f32; T]; T] = std::array::from_fn(|i| {
                    std::array::from_fn(|j| src[(i0 + i) * src_stride + j0 + j])
                });
                for j in 0..T {
                    let row = &mut dst[(j0 + j) * dst_stride + i0..][..T];
                    for (i, x) in row.iter_mut().enumerate() {
                        *x = tile[i][j];
                    }
                }
            } else {
                for j in j0..(j0 + T).min(cols) {
                    for i in i0..(i0 + T).min(rows) {
                        dst[j * dst_stride + i] = src[i * src_stride + j];
                    }
                }
            }
        }
    }
}

/// An op of an input, a weight and an optional bias, with its backward (a linear layer, a
/// convolution): [`apply_biased`] runs it as candle's two- or three-argument custom op.
trait BiasedOp: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// The result for contiguous f32 input and weight, plus the bias's values.
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The input's gradient for the result's gradient.
    fn input_grad(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor>;

    /// The weight's gradient for the result's gradient.
    fn weight_grad(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor>;

    /// The bias's gradient: the result's gradient summed over all but the bias's dimension.
    fn bias_grad(&self, grad: &Tensor) -> candle_core::Result<Tensor>;

    /// The gradients of the input and the weight, each only where it tracks gradients: a
    /// frozen weight's would cost a GEMM as large as the forward one, and candle would keep it
    /// to the end of the backward pass (all of SD1.5's UNet weights, 3.4 GB, in Infusion's).
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            x.track_op()
                .then(|| self.input_grad(x, w, grad))
                .transpose()?,
            w.track_op()
                .then(|| self.weight_grad(x, w, grad))
                .transpose()?,
        ))
    }
}

/// `op(x, w) + bias`, differentiable in all three (`x` and `w` contiguous).
fn apply_biased(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    op: impl BiasedOp,
) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => x.apply_op3(w, &b.contiguous()?, Biased(op)),
        None => x.apply_op2(w, Biased(op)),
    }
}

/// `f` on `x (..., k)` as a contiguous `(rows, k)` matrix, its `(rows, o)` result shaped
/// `(..., o)` again: the frame of the row-wise ops (linear, GEGLU).
fn on_rows(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some((&last, outer)) = dims.split_last() else {
        candle_core::bail!("a row-wise op on a scalar");
    };
    let y = f(&x
        .reshape((outer.iter().product::<usize>(), last))?
        .contiguous()?)?;
    let mut out = outer.to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

/// A [`BiasedOp`] as candle's custom op.
struct Biased<O>(O);

impl<O: BiasedOp> CustomOp2 for Biased<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.0.grads(x, w, grad)
    }
}

impl<O: BiasedOp> CustomOp3 for Biased<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.fwd((s1, l1), (s2, l2), Some(f32_slice(s3, l3)?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = self.0.grads(x, w, grad)?;
        let gb = bias
            .track_op()
            .then(|| self.0.bias_grad(grad))
            .transpose()?;
        Ok((gx, gw, gb))
    }
}

thread_local! {
    /// Scratch space kept between calls (im2col tiles, score blocks): sizes repeat every step,
    /// and fresh allocations this large cost page faults each time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of at least `len` elements (contents undefined),
/// or a fresh one where the thread's is in use (a kernel called from inside another's rayon
/// task on the same worker).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            if s.len() < len {
                s.resize(len, 0.0);
            }
            f(&mut s[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// A tensor's f32 elements, in order (what the backward passes here work on).
fn f32_data(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// The gradient `g` of an op's argument `arg`, shaped like it, where `arg` tracks gradients:
/// candle would keep any other (a frozen weight's) to the end of the backward pass.
fn grad_for(arg: &Tensor, g: Vec<f32>) -> candle_core::Result<Option<Tensor>> {
    arg.track_op()
        .then(|| Tensor::from_vec(g, arg.shape(), arg.device()))
        .transpose()
}

/// The f32 elements of a contiguous storage (what the custom ops here take).
fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(x), Some((a, b))) => Ok(&x[a..b]),
        _ => candle_core::bail!("the CPU kernels take contiguous f32 tensors"),
    }
}

/// Whether the kernels here take `t`: f32 on the CPU.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `f` of the f32 elements of a tensor on the CPU (a frozen weight an op holds, not one of its
/// arguments), borrowed in place when contiguous.
fn with_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("the CPU kernels take tensors on the CPU");
    };
    f(f32_slice(s, layout)?)
}

/// A vector of `len` f32 whose every element the caller writes before reading.
/// A buffer of `len` floats left uninitialised, for a kernel's output.
///
/// # Safety
///
/// The caller writes every element before anything reads it (reading an unwritten element is
/// undefined behaviour): each call site says which loop or GEMM (`accumulate = false` writes its
/// whole destination) covers the buffer.
unsafe fn uninit(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; the elements are the caller's to write (see above).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// What the kernels' tests share: seeded inputs and the largest difference from a reference.
#[cfg(test)]
mod test_util {
    use candle_core::Tensor;

    pub fn randn(seed: u64, dims: &[usize]) -> Tensor {
        crate::util::noise::seeded_noise(seed, dims).unwrap()
    }

    /// The largest `|x|` over a tensor of any shape.
    pub fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The largest `|a - b|`.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// The largest difference of `v`'s gradients in two backward passes, relative to the
    /// largest of the second's (or absolute below 1).
    pub fn grad_err(
        ours: &candle_core::backprop::GradStore,
        theirs: &candle_core::backprop::GradStore,
        v: &Tensor,
    ) -> f32 {
        let (a, t) = (ours.get(v).unwrap(), theirs.get(v).unwrap());
        max_diff(a, t) / max_abs(t).max(1.0)
    }
}
