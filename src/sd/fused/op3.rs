//! What the fused ops share as candle custom ops: three inputs of one float dtype, checked
//! contiguous, handed to the op's generic CPU loop or CUDA launch for that element type.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, WithDType};

/// One fused op over three inputs; [`cpu_fwd`] and [`cuda_fwd`] do the rest.
pub(super) trait Op3 {
    /// The op in error messages ("fused attention").
    const WHAT: &'static str;
    /// The inputs in error messages.
    const INPUTS: [&'static str; 3];

    /// The op on contiguous slices (their layouts give the shapes).
    fn cpu<T: WithDType>(&self, xs: [&[T]; 3], ls: [&Layout; 3]) -> Result<Vec<T>>;

    /// The kernels are `{KERNEL}_f16`, `{KERNEL}_bf16` and, with `CUDA_F32`, `{KERNEL}_f32`.
    #[cfg(feature = "cuda")]
    const KERNEL: &'static str;
    #[cfg(feature = "cuda")]
    const CUDA_F32: bool;

    /// Launches kernel `name` on contiguous views (their layouts give the shapes).
    #[cfg(feature = "cuda")]
    fn launch<T: cuda::DeviceRepr>(
        &self,
        name: &str,
        dev: &candle_core::CudaDevice,
        xs: [cuda::CudaView<'_, T>; 3],
        ls: [&Layout; 3],
    ) -> Result<cuda::CudaSlice<T>>;
}

fn not_contiguous<O: Op3>(i: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {} is not contiguous", O::WHAT, O::INPUTS[i]))
}

fn wrong_dtypes<O: Op3>(device: &str, dtypes: &str, got: candle_core::DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{} on {device} takes {dtypes} {} of one dtype, got {got:?}",
        O::WHAT,
        O::INPUTS.join(", ")
    ))
}

/// The `CustomOp3::cpu_fwd` of `op`: f32, f16 or bf16; the output has the first input's shape.
pub(super) fn cpu_fwd<O: Op3>(
    op: &O,
    [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
) -> Result<(CpuStorage, Shape)> {
    fn run<O: Op3, T: WithDType>(op: &O, xs: [&[T]; 3], ls: [&Layout; 3]) -> Result<Vec<T>> {
        let mut slices = xs;
        for (i, (s, l)) in slices.iter_mut().zip(ls).enumerate() {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| not_contiguous::<O>(i))?;
            *s = &s[a..b];
        }
        op.cpu(slices, ls)
    }
    use CpuStorage as S;
    let ls = [l1, l2, l3];
    let out = match (s1, s2, s3) {
        (S::F32(a), S::F32(b), S::F32(c)) => S::F32(run(op, [a, b, c], ls)?),
        (S::F16(a), S::F16(b), S::F16(c)) => S::F16(run(op, [a, b, c], ls)?),
        (S::BF16(a), S::BF16(b), S::BF16(c)) => S::BF16(run(op, [a, b, c], ls)?),
        _ => return Err(wrong_dtypes::<O>("the CPU", "f32, f16 or bf16", s1.dtype())),
    };
    Ok((out, l1.shape().clone()))
}

#[cfg(feature = "cuda")]
pub(super) mod cuda {
    pub use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorageSlice;
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

    use super::{not_contiguous, wrong_dtypes, Op3};

    /// The `CustomOp3::cuda_fwd` of `op`: f16, bf16 and, where the op has it, f32.
    pub(in crate::sd::fused) fn cuda_fwd<O: Op3>(
        op: &O,
        [(s1, l1), (s2, l2), (s3, l3)]: [(&CudaStorage, &Layout); 3],
    ) -> Result<(CudaStorage, Shape)> {
        fn run<O: Op3, T: DeviceRepr>(
            op: &O,
            dtype: &str,
            dev: &CudaDevice,
            xs: [&CudaSlice<T>; 3],
            ls: [&Layout; 3],
        ) -> Result<CudaSlice<T>> {
            let view = |i: usize| match ls[i].contiguous_offsets() {
                Some((a, b)) => Ok(xs[i].slice(a..b)),
                None => Err(not_contiguous::<O>(i)),
            };
            let views = [view(0)?, view(1)?, view(2)?];
            op.launch(&format!("{}_{dtype}", O::KERNEL), dev, views, ls)
        }
        use CudaStorageSlice as S;
        let dev = s1.device();
        let ls = [l1, l2, l3];
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (S::F32(a), S::F32(b), S::F32(c)) if O::CUDA_F32 => {
                S::F32(run(op, "f32", dev, [a, b, c], ls)?)
            }
            (S::F16(a), S::F16(b), S::F16(c)) => S::F16(run(op, "f16", dev, [a, b, c], ls)?),
            (S::BF16(a), S::BF16(b), S::BF16(c)) => S::BF16(run(op, "bf16", dev, [a, b, c], ls)?),
            _ => {
                let dtypes = if O::CUDA_F32 {
                    "f32, f16 or bf16"
                } else {
                    "f16 or bf16"
                };
                return Err(wrong_dtypes::<O>("CUDA", dtypes, s1.dtype()));
            }
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
