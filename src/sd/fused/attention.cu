// Fused attention forward, softmax(scale * Q K^T) V, without materialising the score matrix
// (flash-attention style: key tiles streamed through shared memory, online softmax).
//
// q: (bh, n, d), k and v: (bh, m, d), o: (bh, n, d), all contiguous, f16 or bf16.
// One block of 4 warps handles BQ = 64 query rows of one (batch, head); each warp owns 16 rows.
// Tensor cores (WMMA 16x16x16) compute S = Q K^T and O += P V with f32 accumulators; the
// head dimension is zero-padded to dp (a multiple of 16: SD1.5's 40 -> 48). The running max,
// the running sum and O stay in f32; P is rounded to the storage type before P V, as in
// FlashAttention. src/fused/attention.rs has the same algorithm on the CPU (the reference the
// tests hold the kernel's algorithm to) and the launch.
//
// Shared memory (dynamic), in this order:
//   Qs  BQ x dp   (T)      Ks  BK x dp  (T)      Vs  BK x dp  (T)      Ps  BQ x BK  (T)
//   Ss  BQ x BK   (f32)    Os  BQ x dp  (f32)    Ms  BQ       (f32)    Ls  BQ       (f32)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

#define BQ 64
#define BK 32
#define WARPS 4

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T>
__device__ void fused_attention(const T *__restrict__ q, const T *__restrict__ k,
                                const T *__restrict__ v, T *__restrict__ o, int n, int m, int d,
                                int dp, float scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  T *Qs = reinterpret_cast<T *>(smem);
  T *Ks = Qs + BQ * dp;
  T *Vs = Ks + BK * dp;
  T *Ps = Vs + BK * dp;
  float *Ss = reinterpret_cast<float *>(Ps + BQ * BK);
  float *Os = Ss + BQ * BK;
  float *Ms = Os + BQ * dp;
  float *Ls = Ms + BQ;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int q0 = blockIdx.x * BQ;
  const size_t bh = blockIdx.y;
  const T *qb = q + bh * (size_t)n * d;
  const T *kb = k + bh * (size_t)m * d;
  const T *vb = v + bh * (size_t)m * d;
  T *ob = o + bh * (size_t)n * d;
  const T zero = from_f32<T>(0.0f);

  for (int i = tid; i < BQ * dp; i += WARPS * 32) {
    const int r = i / dp, c = i % dp, qr = q0 + r;
    Qs[i] = (qr < n && c < d) ? qb[(size_t)qr * d + c] : zero;
    Os[i] = 0.0f;
  }
  for (int i = tid; i < BQ; i += WARPS * 32) {
    Ms[i] = -INFINITY;
    Ls[i] = 0.0f;
  }
  __syncthreads();

  for (int k0 = 0; k0 < m; k0 += BK) {
    for (int i = tid; i < BK * dp; i += WARPS * 32) {
      const int r = i / dp, c = i % dp, kr = k0 + r;
      const bool in = kr < m && c < d;
      Ks[i] = in ? kb[(size_t)kr * d + c] : zero;
      Vs[i] = in ? vb[(size_t)kr * d + c] : zero;
    }
    __syncthreads();

    // S (16 x BK) = Q_w (16 x dp) K^T (dp x BK) for this warp's rows.
    for (int j = 0; j < BK / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < dp; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, Qs + warp * 16 * dp + kk, dp);
        wmma::load_matrix_sync(b, Ks + j * 16 * dp + kk, dp);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(Ss + warp * 16 * BK + j * 16, acc, BK, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: two lanes per row, BK / 2 columns each.
    {
      const int row = warp * 16 + lane / 2;
      const int c0 = (lane % 2) * (BK / 2);
      float *srow = Ss + row * BK;
      float mx = -INFINITY;
      for (int c = c0; c < c0 + BK / 2; ++c) {
        const float s = (k0 + c < m) ? srow[c] * scale : -INFINITY;
        srow[c] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = Ms[row];
      const float m_new = fmaxf(m_old, mx);  // finite: column k0 is always a real key
      float sum = 0.0f;
      for (int c = c0; c < c0 + BK / 2; ++c) {
        const float p = __expf(srow[c] - m_new);
        sum += p;
        Ps[row * BK + c] = from_f32<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float alpha = __expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
      for (int c = lane % 2; c < dp; c += 2) Os[row * dp + c] *= alpha;
      __syncwarp();
      if (lane % 2 == 0) {
        Ms[row] = m_new;
        Ls[row] = Ls[row] * alpha + sum;
      }
    }
    __syncwarp();

    // O_w (16 x dp) += P_w (16 x BK) V (BK x dp).
    for (int j = 0; j < dp / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + warp * 16 * dp + j * 16, dp, wmma::mem_row_major);
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, Ps + warp * 16 * BK + kk, BK);
        wmma::load_matrix_sync(b, Vs + kk * dp + j * 16, dp);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(Os + warp * 16 * dp + j * 16, acc, dp, wmma::mem_row_major);
    }
    __syncthreads();  // Ks / Vs are overwritten by the next tile
  }

  for (int i = tid; i < BQ * d; i += WARPS * 32) {
    const int r = i / d, c = i % d, qr = q0 + r;
    if (qr < n) ob[(size_t)qr * d + c] = from_f32<T>(Os[r * dp + c] / Ls[r]);
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
    fused_attention_f16(const __half *q, const __half *k, const __half *v, __half *o, int n,
                        int m, int d, int dp, float scale) {
  fused_attention<__half>(q, k, v, o, n, m, d, dp, scale);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
    fused_attention_bf16(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v,
                         __nv_bfloat16 *o, int n, int m, int d, int dp, float scale) {
  fused_attention<__nv_bfloat16>(q, k, v, o, n, m, d, dp, scale);
}
