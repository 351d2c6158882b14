//! Fused attention: `softmax(scale * q k^T) v` without materialising the `(n, m)` score matrix.
//!
//! SD1.5's first and last transformer blocks attend over 4096 pixels: unfused, each
//! self-attention writes and reads a `(batch, 8, 4096, 4096)` score matrix (512 MiB in f16 at
//! batch 2), which costs more time than the matmuls and sets the peak memory. The fused op
//! streams key tiles through an online softmax instead (FlashAttention's forward pass).
//!
//! - On CUDA, `src/fused/attention.cu` (f16 and bf16, tensor cores), compiled by `build.rs`.
//! - On the CPU, the same tiled algorithm in plain Rust: the reference that the tests compare
//!   with the unfused path, and what `--kernels fused` runs on a CPU.
//!
//! The fused op has no backward pass and cannot hand out probabilities, so [`AttentionCall`]
//! takes it only when no hook asked for probabilities and nothing tracks gradients, and only
//! in a layer built with [`Kernels::Fused`](super::Kernels::Fused) (the model's load option).
//!
//! [`AttentionCall`]: crate::sd::attention::AttentionCall

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};

use super::op3::{self, Op3};

/// Query rows per block (4 warps x 16 rows on the GPU).
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 32;

/// The largest head size the CUDA kernel takes (its shared memory grows with it: 143 KiB at
/// 256, of the 227 KiB an H100 block may have). SD1.5's are 40, 80 and 160.
const CUDA_MAX_HEAD_DIM: usize = 256;

/// Whether the fused op can run on these tensors: no gradients, and a dtype (and on CUDA, a head
/// size) the device's implementation has (CUDA: f16, bf16; CPU: f32, f16, bf16).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    if q.track_op() || k.track_op() || v.track_op() {
        return false;
    }
    let dtype_ok = match q.device() {
        Device::Cpu => matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16),
        Device::Cuda(_) => {
            matches!(q.dtype(), DType::F16 | DType::BF16)
                && q.dims().last().is_some_and(|&d| d <= CUDA_MAX_HEAD_DIM)
        }
        _ => false,
    };
    dtype_ok && k.dtype() == q.dtype() && v.dtype() == q.dtype()
}

/// `softmax(scale * q k^T) v`: q `(b, h, n, d)`, k and v `(b, h, m, d)` -> `(b, h, n, d)`.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let out = crate::sd::attention::per_head_op(
        "fused attention",
        q,
        k,
        v,
        FusedAttention {
            scale: scale as f32,
        },
    )?;
    super::count_call(|n| n.attention += 1);
    Ok(out)
}

struct FusedAttention {
    scale: f32,
}

/// The tiled forward pass on the CPU, one `(batch x head)` slice per task, in the same order of
/// operations as the CUDA kernel: f32 scores and running max / sum / output, P rounded to the
/// storage type before it meets V.
fn cpu_attention<T: WithDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> Vec<T> {
    use rayon::prelude::*;
    let (bh, n, m, d) = dims;
    let f = |x: T| x.to_f64() as f32;
    let round = |x: f32| T::from_f64(x as f64).to_f64() as f32;
    let mut out = vec![T::zero(); bh * n * d];
    out.par_chunks_mut(n * d).enumerate().for_each(|(s, o)| {
        let qs = &q[s * n * d..(s + 1) * n * d];
        let ks = &k[s * m * d..(s + 1) * m * d];
        let vs = &v[s * m * d..(s + 1) * m * d];
        let mut acc = vec![0f32; BQ * d];
        let mut scores = [0f32; BK];
        for q0 in (0..n).step_by(BQ) {
            let rows = BQ.min(n - q0);
            acc.iter_mut().for_each(|x| *x = 0.0);
            let mut mx = [f32::NEG_INFINITY; BQ];
            let mut sum = [0f32; BQ];
            for k0 in (0..m).step_by(BK) {
                let cols = BK.min(m - k0);
                for r in 0..rows {
                    let qr = &qs[(q0 + r) * d..(q0 + r + 1) * d];
                    let mut tile_max = f32::NEG_INFINITY;
                    for (c, sc) in scores.iter_mut().enumerate().take(cols) {
                        let kr = &ks[(k0 + c) * d..(k0 + c + 1) * d];
                        let dot: f32 = qr.iter().zip(kr).map(|(&a, &b)| f(a) * f(b)).sum();
                        *sc = dot * scale;
                        tile_max = tile_max.max(*sc);
                    }
                    let m_new = mx[r].max(tile_max);
                    let alpha = (mx[r] - m_new).exp();
                    let ar = &mut acc[r * d..(r + 1) * d];
                    ar.iter_mut().for_each(|x| *x *= alpha);
                    let mut tile_sum = 0f32;
                    for (c, &sc) in scores.iter().enumerate().take(cols) {
                        let p = (sc - m_new).exp();
                        tile_sum += p;
                        let p = round(p);
                        let vr = &vs[(k0 + c) * d..(k0 + c + 1) * d];
                        for (a, &x) in ar.iter_mut().zip(vr) {
                            *a += p * f(x);
                        }
                    }
                    mx[r] = m_new;
                    sum[r] = sum[r] * alpha + tile_sum;
                }
            }
            for r in 0..rows {
                for c in 0..d {
                    o[(q0 + r) * d + c] = T::from_f64((acc[r * d + c] / sum[r]) as f64);
                }
            }
        }
    });
    out
}

impl Op3 for FusedAttention {
    const WHAT: &'static str = "fused attention";
    const INPUTS: [&'static str; 3] = ["q", "k", "v"];

    fn cpu<T: WithDType>(&self, [q, k, v]: [&[T]; 3], [lq, lk, _]: [&Layout; 3]) -> Result<Vec<T>> {
        let (bh, n, d) = lq.shape().dims3()?;
        let m = lk.shape().dims3()?.1;
        Ok(cpu_attention(q, k, v, (bh, n, m, d), self.scale))
    }

    #[cfg(feature = "cuda")]
    const KERNEL: &'static str = "fused_attention";
    #[cfg(feature = "cuda")]
    const CUDA_F32: bool = false;

    #[cfg(feature = "cuda")]
    fn launch<T: super::op3::cuda::DeviceRepr>(
        &self,
        name: &str,
        dev: &candle_core::CudaDevice,
        [q, k, v]: [super::op3::cuda::CudaView<'_, T>; 3],
        [lq, lk, _]: [&Layout; 3],
    ) -> Result<super::op3::cuda::CudaSlice<T>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
        let (bh, n, d) = lq.shape().dims3()?;
        let m = lk.shape().dims3()?.1;
        let dp = d.div_ceil(16) * 16;
        // Dynamic shared memory for the padded head size `dp` (the layout in attention.cu).
        let elem = std::mem::size_of::<T>();
        let smem = elem * (BQ * dp + 2 * BK * dp + BQ * BK) + 4 * (BQ * BK + BQ * dp + 2 * BQ);
        let func = dev.get_or_load_custom_func(name, "infusion_attention", PTX)?;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(bh * n * d)? };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(BQ) as u32, bh as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (n, m, d, dp) = (n as i32, m as i32, d as i32, dp as i32);
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        builder.arg(&n);
        builder.arg(&m);
        builder.arg(&d);
        builder.arg(&dp);
        builder.arg(&self.scale);
        // SAFETY: the arguments match the kernel's signature in attention.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        op3::cpu_fwd(self, [(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        op3::cuda::cuda_fwd(self, [(s1, l1), (s2, l2), (s3, l3)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unfused reference, in f32.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        p.matmul(&v)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    }

    /// Shapes that cross every tile edge: n and m below, at and above BQ / BK, odd head sizes
    /// (SD1.5's 40, 80 and 160 among them), and large scores that need the running max.
    #[test]
    fn matches_unfused_attention_for_each_dtype() -> Result<()> {
        for (i, &(b, h, n, m, d)) in [
            (1, 1, 1, 1, 8),
            (2, 3, 65, 77, 40),
            (1, 2, 64, 32, 80),
            (1, 1, 130, 33, 160),
            (2, 1, 17, 100, 5),
        ]
        .iter()
        .enumerate()
        {
            let noise = |seed: u64, dims: &[usize]| {
                crate::util::noise::seeded_noise(seed, dims).map_err(candle_core::Error::wrap)
            };
            let i = i as u64;
            let q = ((noise(i, &[b, h, n, d])? * 3.0)? + i as f64)?;
            let k = (noise(10 + i, &[b, h, m, d])? * 3.0)?;
            let v = noise(20 + i, &[b, h, m, d])?;
            let scale = 1.0 / (d as f64).sqrt();
            let want = naive(&q, &k, &v, scale)?;
            // Tolerances: f32 differs by summation order only, but scores here reach ~50, where
            // one rounding (4e-6) moves exp() by as much relative: 1e-4 on outputs of size ~3.
            // f16 / bf16 round P and the output (10 and 7 mantissa bits) against an f32
            // reference of the same rounded inputs.
            for (dtype, tol) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 8e-2)] {
                let (qd, kd, vd) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
                let want = if dtype == DType::F32 {
                    want.clone()
                } else {
                    naive(&qd, &kd, &vd, scale)?
                };
                let got = fused_attention(&qd, &kd, &vd, scale)?;
                assert_eq!(got.dims(), &[b, h, n, d]);
                assert_eq!(got.dtype(), dtype);
                let diff = max_abs_diff(&got, &want)?;
                assert!(
                    diff <= tol,
                    "{dtype:?} {:?}: {diff} > {tol}",
                    (b, h, n, m, d)
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev)?;
        let v = Tensor::zeros((1, 2, 6, 8), DType::F32, &dev)?;
        let err = fused_attention(&q, &k, &v, 1.0).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let var = candle_core::Var::zeros((1, 2, 4, 8), DType::F32, &dev)?;
        assert!(supports(&q, &k, &k));
        assert!(!supports(var.as_tensor(), &k, &k));
        assert!(!supports(&q.to_dtype(DType::F64)?, &k, &k));
        Ok(())
    }
}
