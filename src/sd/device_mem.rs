//! Peak device memory, where the device can tell.
//!
//! On CUDA, candle allocates stream-ordered (`cuMemAllocAsync`) from the device's default
//! memory pool, whose `USED_MEM_HIGH` attribute is the high-water mark of memory in use; it can
//! be reset between measurements. The CPU reports nothing.

use candle_core::Device;

/// Resets the peak counter of `device` (no-op where there is none).
pub fn reset_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        let _ = cuda::set_high(dev, 0);
    }
    let _ = device;
}

/// The peak memory in use since the last reset, in bytes, where the device reports it.
pub fn peak_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return cuda::high(dev).ok();
    }
    let _ = device;
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
