//! Devices and dtypes: parsing their names, and the peak device memory where the device can
//! tell.
//!
//! On CUDA, candle allocates stream-ordered (`cuMemAllocAsync`) from the device's default
//! memory pool, whose `USED_MEM_HIGH` attribute is the high-water mark of memory in use; it can
//! be reset between measurements. The CPU reports nothing.

use candle_core::{DType, Device};

use crate::error::{root_cause, Error, Result};

/// Parses `cpu`, `cuda`, `cuda:N` (errors name the argument `device`).
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = || Error::arg("device", format!("`{s}`: expected cpu, cuda or cuda:N"));
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => cuda(n.parse().map_err(|_| bad())?),
            None => Err(bad()),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Unsupported(format!(
            "cuda:{ordinal}: this binary has no GPU support: build it with `--features cuda`"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::arg(
            "device",
            format!(
                "cannot open cuda:{ordinal}: {} (is an NVIDIA GPU there, with its driver \
                 (libcuda.so.1)?)",
                root_cause(&e)
            ),
        )
    })
}

/// Parses `f32`, `f16`, `bf16`, and the names other tools use for them (`fp16`, `float16`,
/// `half`, `fp32`, `float32`, `bfloat16`); errors name the argument `dtype`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::arg(
            "dtype",
            format!("`{s}`: expected f32, f16 or bf16 (or fp32, fp16, bfloat16)"),
        )),
    }
}

/// Bytes a new allocation may take on `device` now: the CPU's available memory
/// (`MemAvailable` of /proc/meminfo), a GPU's free memory. `None` where it cannot tell.
pub fn available_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return cuda::free(dev).ok();
    }
    if !device.is_cpu() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A byte count for people: `1.5 GiB`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Whether `need` bytes fit in what `device` has available (true where it does not say).
pub fn fits(need: u128, device: &Device) -> bool {
    available_bytes(device).is_none_or(|have| need <= have as u128)
}

/// Refuses work that would need more memory than `device` has available, before anything is
/// allocated (an allocation that fails aborts the process, and with it a REPL session). The
/// error names the argument `arg` to change; `what` says what needs `need` bytes.
pub fn ensure_fits(arg: &str, what: &str, need: u128, device: &Device) -> Result<()> {
    if fits(need, device) {
        return Ok(());
    }
    let have = available_bytes(device).unwrap_or(0);
    Err(Error::arg(
        arg,
        format!(
            "{what} needs about {}, more than the {} available on {}",
            human_bytes(need),
            human_bytes(have as u128),
            if device.is_cpu() {
                "the CPU"
            } else {
                "the GPU"
            }
        ),
    ))
}

/// Starts the peak memory counter of `device` over: the GPU's memory pool, or on the CPU the
/// process's resident peak. False where there is none to reset.
pub fn reset_peak(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return cuda::set_high(dev, 0).is_ok();
    }
    device.is_cpu() && crate::util::memory::reset_peak()
}

/// The peak memory in use since the last [`reset_peak`], in bytes, where the device reports
/// it: the GPU's memory pool, or on the CPU the process's resident peak (`VmHWM`: weights,
/// activations, everything the process holds, as users see it).
pub fn peak_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return cuda::high(dev).ok();
    }
    if device.is_cpu() {
        return crate::util::memory::process_memory().map(|m| m.peak);
    }
    None
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::result::{device, mem_pool};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    fn pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool, String> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: the device handle comes from a live context.
        unsafe { device::get_default_mem_pool(ctx.cu_device()) }.map_err(|e| e.to_string())
    }

    /// Free device memory in bytes.
    pub fn free(dev: &CudaDevice) -> Result<u64, String> {
        dev.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| e.to_string())?;
        let (free, _) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .map_err(|e| e.to_string())?;
        Ok(free as u64)
    }

    pub fn high(dev: &CudaDevice) -> Result<u64, String> {
        let pool = pool(dev)?;
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t.
        unsafe {
            mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut core::ffi::c_void,
            )
        }
        .map_err(|e| e.to_string())?;
        Ok(v)
    }

    pub fn set_high(dev: &CudaDevice, value: u64) -> Result<(), String> {
        let pool = pool(dev)?;
        let mut v = value;
        // SAFETY: USED_MEM_HIGH may be reset to 0; the value is a cuuint64_t.
        unsafe {
            mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut core::ffi::c_void,
            )
        }
        .map_err(|e| e.to_string())
    }
}
