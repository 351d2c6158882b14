//! Group norm with an optional SiLU, as one op.
//!
//! [`GroupNorm`] holds the weights (`weight`, `bias`) and runs either candle's composite group
//! norm (the exact op sequence of `candle_nn::GroupNorm`, differentiable) or, when it was built
//! with [`Kernels::Fused`] and nothing tracks gradients, one pass per statistic and one for the
//! output: `src/fused/group_norm.cu` on CUDA, the same three passes in Rust on the CPU.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;

use super::op3::{self, Op3};
use super::Kernels;

/// A group norm layer (`weight`, `bias` of `channels` each) and the kernels it runs.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    kernels: Kernels,
}

impl GroupNorm {
    /// `weight` and `bias`: `(channels)`.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        groups: usize,
        eps: f64,
        kernels: Kernels,
    ) -> Result<Self> {
        let channels = weight.dim(0)?;
        if groups == 0 || !channels.is_multiple_of(groups) || bias.dims() != weight.dims() {
            candle_core::bail!(
                "group norm: {groups} groups, weight {:?}, bias {:?} do not fit",
                weight.dims(),
                bias.dims()
            );
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            kernels,
        })
    }

    pub fn load(
        groups: usize,
        channels: usize,
        eps: f64,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "{}: {groups} groups do not divide {channels} channels",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
            kernels,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Normalises `xs` `(b, c, ...)`; with `silu`, applies SiLU to the result.
    pub fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if self.kernels.fused() && self.fused_applies(xs) {
            return self.fused(xs, silu);
        }
        if crate::sd::cpu::group_norm::applies(xs, &self.weight, &self.bias) {
            let (w, b) = (&self.weight, &self.bias);
            return crate::sd::cpu::group_norm::group_norm(xs, w, b, self.groups, self.eps, silu);
        }
        let ys = self.composite(xs)?;
        if silu {
            candle_nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
    }

    fn fused_applies(&self, xs: &Tensor) -> bool {
        let dtype_ok = matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && self.weight.dtype() == xs.dtype()
            && self.bias.dtype() == xs.dtype();
        let device_ok = matches!(xs.device(), Device::Cpu | Device::Cuda(_));
        dtype_ok && device_ok && xs.rank() >= 3 && !xs.track_op()
    }

    /// The fused op (whatever the kernel choice): callers and tests that want it directly.
    pub fn fused(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.len() < 3 || dims[1] != self.weight.dim(0)? {
            candle_core::bail!(
                "group norm over {} channels got a tensor of shape {dims:?}",
                self.weight.dim(0)?
            );
        }
        super::count_call(|n| n.group_norm += 1);
        let (b, c) = (dims[0], dims[1]);
        let hw = dims[2..].iter().product::<usize>();
        let op = FusedGroupNorm {
            groups: self.groups,
            eps: self.eps as f32,
            silu,
        };
        xs.reshape((b, c, hw))?
            .contiguous()?
            .apply_op3_no_bwd(&self.weight, &self.bias, &op)?
            .reshape(dims)
    }

    /// `candle_nn::GroupNorm::forward`, op for op (f16/bf16 statistics in f32).
    pub(crate) fn composite(&self, x: &Tensor) -> Result<Tensor> {
        let x_shape = x.dims();
        if x_shape.len() <= 2 {
            candle_core::bail!("input rank for GroupNorm should be at least 3");
        }
        let (b_sz, n_channels) = (x_shape[0], x_shape[1]);
        let hidden_size = x_shape[2..].iter().product::<usize>() * n_channels / self.groups;
        let x_dtype = x.dtype();
        let internal_dtype = match x_dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let x = x.reshape((b_sz, self.groups, hidden_size))?;
        let x = x.to_dtype(internal_dtype)?;
        let mean_x = (x.sum_keepdim(2)? / hidden_size as f64)?;
        let x = x.broadcast_sub(&mean_x)?;
        let norm_x = (x.sqr()?.sum_keepdim(2)? / hidden_size as f64)?;
        let x_normed = x.broadcast_div(&(norm_x + self.eps)?.sqrt()?)?;
        let mut w_dims = vec![1; x_shape.len()];
        w_dims[1] = n_channels;
        let weight = self.weight.reshape(w_dims.clone())?;
        let bias = self.bias.reshape(w_dims)?;
        x_normed
            .to_dtype(x_dtype)?
            .reshape(x_shape)?
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)
    }
}

struct FusedGroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

/// The three passes on the CPU, one `(sample, group)` run per task, f32 throughout.
fn cpu_group_norm<T: WithDType>(
    x: &[T],
    w: &[T],
    bias: &[T],
    (c, hw): (usize, usize),
    op: &FusedGroupNorm,
) -> Vec<T> {
    use rayon::prelude::*;
    let cpg = c / op.groups;
    let len = cpg * hw;
    let f = |v: T| v.to_f64() as f32;
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .for_each(|(run, (yg, xg))| {
            let g = run % op.groups;
            let mean = xg.iter().map(|&v| f(v)).sum::<f32>() / len as f32;
            let var = xg.iter().map(|&v| (f(v) - mean).powi(2)).sum::<f32>() / len as f32;
            let rstd = 1.0 / (var + op.eps).sqrt();
            for (i, (o, &v)) in yg.iter_mut().zip(xg).enumerate() {
                let ch = g * cpg + i / hw;
                let mut t = (f(v) - mean) * rstd * f(w[ch]) + f(bias[ch]);
                if op.silu {
                    t /= 1.0 + (-t).exp();
                }
                *o = T::from_f64(t as f64);
            }
        });
    y
}

impl Op3 for FusedGroupNorm {
    const WHAT: &'static str = "fused group norm";
    const INPUTS: [&'static str; 3] = ["input", "weight", "bias"];

    fn cpu<T: WithDType>(&self, [x, w, b]: [&[T]; 3], [lx, _, _]: [&Layout; 3]) -> Result<Vec<T>> {
        let (_, c, hw) = lx.shape().dims3()?;
        Ok(cpu_group_norm(x, w, b, (c, hw), self))
    }

    #[cfg(feature = "cuda")]
    const KERNEL: &'static str = "group_norm";
    #[cfg(feature = "cuda")]
    const CUDA_F32: bool = true;

    #[cfg(feature = "cuda")]
    fn launch<T: super::op3::cuda::DeviceRepr>(
        &self,
        name: &str,
        dev: &candle_core::CudaDevice,
        [x, w, b]: [super::op3::cuda::CudaView<'_, T>; 3],
        [lx, _, _]: [&Layout; 3],
    ) -> Result<super::op3::cuda::CudaSlice<T>> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
        /// Threads per block (THREADS in group_norm.cu).
        const THREADS: u32 = 512;
        let (n, c, hw) = lx.shape().dims3()?;
        let func = dev.get_or_load_custom_func(name, "infusion_group_norm", PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n * c * hw)? };
        let cfg = LaunchConfig {
            grid_dim: ((n * self.groups) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c, hw) = (c as i32, hw as i32);
        let (groups, silu) = (self.groups as i32, self.silu as i32);
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&w);
        builder.arg(&b);
        builder.arg(&out);
        builder.arg(&c);
        builder.arg(&hw);
        builder.arg(&groups);
        builder.arg(&self.eps);
        builder.arg(&silu);
        // SAFETY: the arguments match the kernel's signature in group_norm.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
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

    fn layer(groups: usize, channels: usize, dtype: DType) -> Result<GroupNorm> {
        layer_with(groups, channels, dtype, Kernels::Naive)
    }

    fn layer_with(
        groups: usize,
        channels: usize,
        dtype: DType,
        kernels: Kernels,
    ) -> Result<GroupNorm> {
        let dev = Device::Cpu;
        let w = ((noise(100, &[channels])? * 0.3)? + 1.0)?.to_dtype(dtype)?;
        let b = (noise(101, &[channels])? * 0.3)?.to_dtype(dtype)?;
        let map =
            std::collections::HashMap::from([("weight".to_string(), w), ("bias".to_string(), b)]);
        let vb = VarBuilder::from_tensors(map, dtype, &dev);
        GroupNorm::load(groups, channels, 1e-5, kernels, vb)
    }

    fn noise(seed: u64, dims: &[usize]) -> Result<Tensor> {
        crate::util::noise::seeded_noise(seed, dims).map_err(candle_core::Error::wrap)
    }

    fn max_abs(t: &Tensor) -> Result<f32> {
        t.to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    }

    /// The fused op against the composite one, with and without SiLU, for SD1.5-like group
    /// layouts and a large mean (where a one-pass variance would cancel). Tolerances relative
    /// to the output's largest magnitude: f32 1e-5 (summation order); f16 3e-3, bf16 2e-2: the
    /// composite rounds the normalised value, the product and the sum (3 x 2^-11, 3 x 2^-8),
    /// the fused op once.
    #[test]
    fn matches_the_composite_group_norm() -> Result<()> {
        for (i, &(b, c, h, w, groups)) in [(2, 64, 8, 8, 32), (1, 12, 5, 3, 4), (3, 8, 1, 1, 8)]
            .iter()
            .enumerate()
        {
            let x = ((noise(i as u64, &[b, c, h, w])? * 2.0)? + 50.0)?;
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 3e-3), (DType::BF16, 2e-2)] {
                let gn = layer(groups, c, dtype)?;
                let xd = x.to_dtype(dtype)?;
                for silu in [false, true] {
                    let want = gn.composite(&xd)?;
                    let want = if silu {
                        candle_nn::ops::silu(&want.to_dtype(DType::F32)?)?
                    } else {
                        want
                    };
                    let got = gn.fused(&xd, silu)?;
                    assert_eq!(got.dims(), xd.dims());
                    assert_eq!(got.dtype(), dtype);
                    let diff = max_abs(&(got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?)?
                        / max_abs(&want)?.max(1.0);
                    assert!(
                        diff <= tol,
                        "{dtype:?} silu={silu} {:?}: {diff}",
                        (b, c, h, w)
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_layouts_are_errors_and_gradients_take_the_composite_path() -> Result<()> {
        let err = layer(5, 12, DType::F32).unwrap_err().to_string();
        assert!(err.contains("5 groups do not divide 12 channels"), "{err}");
        let gn = layer(4, 12, DType::F32)?;
        let err = gn
            .fused(
                &Tensor::zeros((1, 8, 2, 2), DType::F32, &Device::Cpu)?,
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("12 channels"), "{err}");
        let var = candle_core::Var::randn(0f32, 1.0, (1, 12, 2, 2), &Device::Cpu)?;
        let fused = layer_with(4, 12, DType::F32, Kernels::Fused)?;
        let y = fused.forward(var.as_tensor(), true)?;
        let grads = y.sum_all()?.backward()?;
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "differentiable under --kernels fused"
        );
        Ok(())
    }
}
