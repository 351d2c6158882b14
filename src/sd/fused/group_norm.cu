// Group norm, optionally followed by SiLU, in one kernel: candle's GroupNorm is a dozen kernels
// (an f32 copy, two reductions, broadcasts, the affine) and the SiLU one more pass.
//
// x, y: (b, c, hw) contiguous; weight, bias: (c). One block per (sample, group): the group's
// channels are one contiguous run of c / groups * hw elements. Three passes over it: the mean,
// the variance around the mean (f32, as candle computes it), then the normalised, scaled,
// shifted (and SiLU'd) output. src/fused/group_norm.rs has the same algorithm on the CPU.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define THREADS 512

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Sum over the block; every thread gets the result. `red` holds THREADS / 32 floats.
__device__ float block_sum(float v, float *red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // `red` may still be read from the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < THREADS / 32; ++i) s += red[i];
  return s;
}

template <typename T>
__device__ void group_norm(const T *__restrict__ x, const T *__restrict__ weight,
                           const T *__restrict__ bias, T *__restrict__ y, int c, int hw,
                           int groups, float eps, int silu) {
  __shared__ float red[THREADS / 32];
  const int b = blockIdx.x / groups, g = blockIdx.x % groups;
  const int cpg = c / groups;
  const size_t base = ((size_t)b * c + (size_t)g * cpg) * hw;
  const int len = cpg * hw;
  const T *xg = x + base;
  T *yg = y + base;

  float s = 0.0f;
  for (int i = threadIdx.x; i < len; i += THREADS) s += to_f32(xg[i]);
  const float mean = block_sum(s, red) / len;
  float v = 0.0f;
  for (int i = threadIdx.x; i < len; i += THREADS) {
    const float d = to_f32(xg[i]) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(block_sum(v, red) / len + eps);
  for (int i = threadIdx.x; i < len; i += THREADS) {
    const int ch = g * cpg + i / hw;
    float t = (to_f32(xg[i]) - mean) * rstd * to_f32(weight[ch]) + to_f32(bias[ch]);
    if (silu) t = t / (1.0f + __expf(-t));
    yg[i] = from_f32<T>(t);
  }
}

#define GROUP_NORM(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS)                                     \
      NAME(const T *x, const T *weight, const T *bias, T *y, int c, int hw, int groups,     \
           float eps, int silu) {                                                           \
    group_norm<T>(x, weight, bias, y, c, hw, groups, eps, silu);                            \
  }

GROUP_NORM(group_norm_f32, float)
GROUP_NORM(group_norm_f16, __half)
GROUP_NORM(group_norm_bf16, __nv_bfloat16)
