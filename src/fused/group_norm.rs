//! Group norm with an optional SiLU, as one op.
//!
//! [`GroupNorm`] holds the weights (`weight`, `bias`) and runs either candle's composite group
//! norm (the exact op sequence of `candle_nn::GroupNorm`, differentiable) or, with the fused
//! kernels chosen and nothing tracking gradients, one pass per statistic and one for the output:
//! `src/fused/group_norm.cu` on CUDA, the same three passes in Rust on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;

/// A group norm layer (`weight`, `bias` of `channels` each).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `weight` and `bias`: `(channels)`.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
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
        })
    }

    pub fn load(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
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
        })
    }

    /// Normalises `xs` `(b, c, ...)`; with `silu`, applies SiLU to the result.
    pub fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if super::fused() && self.fused_applies(xs) {
            return self.fused(xs, silu);
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
    fn composite(&self, x: &Tensor) -> Result<Tensor> {
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

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused group norm: {what} is not contiguous"),
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
        let (_, c, hw) = l1.shape().dims3()?;
        fn run<T: WithDType>(
            x: &[T],
            w: &[T],
            b: &[T],
            ls: [&Layout; 3],
            dims: (usize, usize),
            op: &FusedGroupNorm,
        ) -> Result<Vec<T>> {
            Ok(cpu_group_norm(
                contiguous(x, ls[0], "x")?,
                contiguous(w, ls[1], "weight")?,
                contiguous(b, ls[2], "bias")?,
                dims,
                op,
            ))
        }
        let ls = [l1, l2, l3];
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(run(x, w, b, ls, (c, hw), self)?)
            }
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(b)) => {
                CpuStorage::F16(run(x, w, b, ls, (c, hw), self)?)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(run(x, w, b, ls, (c, hw), self)?)
            }
            _ => candle_core::bail!(
                "fused group norm takes f32, f16 or bf16 input and weights of one dtype, got {:?}",
                s1.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
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
        cuda::forward(self, [(s1, l1), (s2, l2), (s3, l3)])
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

    use super::FusedGroupNorm;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
    /// Threads per block (THREADS in group_norm.cu).
    const THREADS: u32 = 512;

    fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.slice(a..b)),
            None => candle_core::bail!("fused group norm: {what} is not contiguous"),
        }
    }

    fn launch<T: DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        op: &FusedGroupNorm,
        [(x, lx), (w, lw), (b, lb)]: [(&CudaSlice<T>, &Layout); 3],
    ) -> Result<CudaSlice<T>> {
        let (x, w, b) = (
            view(x, lx, "x")?,
            view(w, lw, "weight")?,
            view(b, lb, "bias")?,
        );
        let (n, c, hw) = lx.shape().dims3()?;
        let func = dev.get_or_load_custom_func(name, "infusion_group_norm", PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n * c * hw)? };
        let cfg = LaunchConfig {
            grid_dim: ((n * op.groups) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c, hw, groups, silu) = (c as i32, hw as i32, op.groups as i32, op.silu as i32);
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&w);
        builder.arg(&b);
        builder.arg(&out);
        builder.arg(&c);
        builder.arg(&hw);
        builder.arg(&groups);
        builder.arg(&op.eps);
        builder.arg(&silu);
        // SAFETY: the arguments match the kernel's signature in group_norm.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }

    pub(super) fn forward(
        op: &FusedGroupNorm,
        [(s1, l1), (s2, l2), (s3, l3)]: [(&CudaStorage, &Layout); 3],
    ) -> Result<(CudaStorage, Shape)> {
        use CudaStorageSlice as S;
        let dev = s1.device();
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (S::F32(x), S::F32(w), S::F32(b)) => S::F32(launch(
                "group_norm_f32",
                dev,
                op,
                [(x, l1), (w, l2), (b, l3)],
            )?),
            (S::F16(x), S::F16(w), S::F16(b)) => S::F16(launch(
                "group_norm_f16",
                dev,
                op,
                [(x, l1), (w, l2), (b, l3)],
            )?),
            (S::BF16(x), S::BF16(w), S::BF16(b)) => S::BF16(launch(
                "group_norm_bf16",
                dev,
                op,
                [(x, l1), (w, l2), (b, l3)],
            )?),
            _ => candle_core::bail!(
                "fused group norm on CUDA takes f32, f16 or bf16 input and weights of one dtype, got {:?}",
                s1.dtype()
            ),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            l1.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(groups: usize, channels: usize, dtype: DType) -> Result<GroupNorm> {
        let dev = Device::Cpu;
        let w = ((noise(100, &[channels])? * 0.3)? + 1.0)?.to_dtype(dtype)?;
        let b = (noise(101, &[channels])? * 0.3)?.to_dtype(dtype)?;
        let map =
            std::collections::HashMap::from([("weight".to_string(), w), ("bias".to_string(), b)]);
        let vb = VarBuilder::from_tensors(map, dtype, &dev);
        GroupNorm::load(groups, channels, 1e-5, vb)
    }

    fn noise(seed: u64, dims: &[usize]) -> Result<Tensor> {
        crate::pipeline::seeded_noise(seed, dims).map_err(candle_core::Error::wrap)
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
        let y = super::super::with_kernels(super::super::Kernels::Fused, || {
            gn.forward(var.as_tensor(), true)
        })?;
        let grads = y.sum_all()?.backward()?;
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "differentiable under --kernels fused"
        );
        Ok(())
    }
}
