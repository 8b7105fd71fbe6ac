"""CUDA source for the kernel families, as bodies for `mx.fast.cuda_kernel`.

MLX wraps a body into `__global__ void custom_kernel_<name>(const T* x, Shape x_shape, const T* w,
Shape w_shape, OutT* y)` inside `namespace mlx::core::cu` and JIT-compiles one module per name with
NVRTC, cached for the process. launch.py puts the parameter set at the top of the body as
`constexpr int BM = 64;` / `using T = __nv_bfloat16;` lines and names the kernel after it, so the tile
parameters are compile-time constants and each parameter set is compiled once. MLX's `grid` counts
threads, not blocks.

Inputs are x (..., K) row-major (M = product of the leading dims) and w (N, K) row-major (an
`nn.Linear` weight); the output is y (..., N) = x @ w.T, or float partial sums (split_k, ..., N) when a
GEMM splits K across blocks. With a bias (an optional third input, N elements) the store adds it:
`TW_BIAS(col)` expands to `+ bias[col]` (only in split 0 of a split-K GEMM) or to nothing.

Three bodies:
  gemv       one warp per output row, `split_k` warps per row meeting in shared memory, every lane
             loading `vector_width` consecutive elements per step; the M <= 16 rows of x are all
             served by the same pass over w (w is read once, the whole point for decode).
  gemm_tc    16-bit inputs: block tile staged through shared memory, WMMA m16n16k16 tensor-core
             fragments with float accumulators, warps tiling the block as WARPS_M x WARPS_N.
  gemm_simt  float32 inputs (exact fp32, no TF32 rounding): same staging, each thread owns a
             THREAD_ROWS-strided x THREAD_COLS-strided set of outputs in registers.
Remainders: rows/columns past M or N and K past the end are zero-filled when staged or masked when
stored; the vector path is used only when K is a multiple of the vector width and both base pointers
are aligned to it, else the scalar path runs (checked at run time, uniform per launch).
"""

# Shared helpers, placed before MLX's namespace (the `header` argument).
HEADER = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

template <typename T, int V>
struct alignas(sizeof(T) * V) tw_vec { T v[V]; };

__device__ __forceinline__ float tw_to_f(float v) { return v; }
__device__ __forceinline__ float tw_to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float tw_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void tw_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void tw_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void tw_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ T tw_zero();
template <> __device__ __forceinline__ float tw_zero<float>() { return 0.f; }
template <> __device__ __forceinline__ __half tw_zero<__half>() { return __float2half_rn(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 tw_zero<__nv_bfloat16>() { return __float2bfloat16_rn(0.f); }

template <typename T, int V>
__device__ __forceinline__ bool tw_aligned(const T* p) {
  return (reinterpret_cast<unsigned long long>(p) % (sizeof(T) * V)) == 0;
}

// Stages a ROWS x BK tile of a row-major (rows, K) matrix into shared memory (row stride LDS),
// zero-filling rows >= nrows and columns >= kend. THREADS threads cooperate, V elements each step.
template <typename T, int ROWS, int BK, int V, int LDS, int THREADS>
__device__ __forceinline__ void tw_stage(T* dst, const T* src, int row0, int nrows, int k0, int kend,
                                         int K, int tid, bool vec_ok) {
  constexpr int PER_ROW = BK / V;
  constexpr int TOTAL = ROWS * PER_ROW;
  constexpr bool VEC_SMEM = (LDS % V) == 0;
  for (int i = tid; i < TOTAL; i += THREADS) {
    const int r = i / PER_ROW;
    const int c = (i % PER_ROW) * V;
    const int gr = row0 + r;
    const int gc = k0 + c;
    tw_vec<T, V> v;
    if (vec_ok) {
      if (gr < nrows && gc < kend) {
        v = *reinterpret_cast<const tw_vec<T, V>*>(src + (size_t)gr * K + gc);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v.v[j] = tw_zero<T>();
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v.v[j] = (gr < nrows && gc + j < kend) ? src[(size_t)gr * K + gc + j] : tw_zero<T>();
      }
    }
    if constexpr (VEC_SMEM) {
      *reinterpret_cast<tw_vec<T, V>*>(dst + r * LDS + c) = v;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) dst[r * LDS + c + j] = v.v[j];
    }
  }
}
"""

# Constants: T, MR (= M, rows of x), R (rows per block), S (warps per row), V (vector width).
GEMV = r"""
  const int N = w_shape[0];
  const int K = w_shape[1];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row_in_block = warp / S;
  const int part = warp % S;
  const int n = blockIdx.x * R + row_in_block;
  __shared__ float tw_partial[R * S * MR];
  float acc[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) acc[i] = 0.f;
  if (n < N) {
    const T* wr = w + (size_t)n * K;
    const bool vec_ok = (K % V == 0) && tw_aligned<T, V>(w) && tw_aligned<T, V>(x);
    if (vec_ok) {
      const int KV = K / V;
      for (int c = part * 32 + lane; c < KV; c += 32 * S) {
        const tw_vec<T, V> wv = *reinterpret_cast<const tw_vec<T, V>*>(wr + (size_t)c * V);
#pragma unroll
        for (int i = 0; i < MR; ++i) {
          const tw_vec<T, V> xv = *reinterpret_cast<const tw_vec<T, V>*>(x + (size_t)i * K + (size_t)c * V);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[i] += tw_to_f(wv.v[j]) * tw_to_f(xv.v[j]);
        }
      }
    } else {
      for (int c = part * 32 + lane; c < K; c += 32 * S) {
        const float wf = tw_to_f(wr[c]);
#pragma unroll
        for (int i = 0; i < MR; ++i) acc[i] += wf * tw_to_f(x[(size_t)i * K + c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MR; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
  }
  if constexpr (S > 1) {
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < MR; ++i) tw_partial[(row_in_block * S + part) * MR + i] = acc[i];
    }
    __syncthreads();
    if (part == 0 && n < N) {
#pragma unroll
      for (int i = 0; i < MR; ++i) {
        if (lane == (i & 31)) {
          float s = 0.f;
#pragma unroll
          for (int p = 0; p < S; ++p) s += tw_partial[(row_in_block * S + p) * MR + i];
          tw_store(y + (size_t)i * N + n, s TW_BIAS(n));
        }
      }
    }
  } else {
    if (n < N) {
#pragma unroll
      for (int i = 0; i < MR; ++i) {
        if (lane == (i & 31)) tw_store(y + (size_t)i * N + n, acc[i] TW_BIAS(n));
      }
    }
  }
"""

# Common prologue of both GEMM bodies. Constants: T, XND (x's ndim), BM, BN, BK, WARPS, V,
# SPLIT, LDS.
_GEMM_PROLOGUE = r"""
  constexpr int THREADS = WARPS * 32;
  int M = 1;  // x may carry leading dims (batch, sequence): M is their product
#pragma unroll
  for (int d = 0; d < XND - 1; ++d) M *= x_shape[d];
  const int K = x_shape[XND - 1];
  const int N = w_shape[0];
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * BN;
  const int m0 = blockIdx.y * BM;
  // This block's K range: split_k slices, each a whole number of BK steps.
  const int k_per = (((K + SPLIT - 1) / SPLIT) + BK - 1) / BK * BK;
  const int k_begin = blockIdx.z * k_per;
  const int k_end = min(K, k_begin + k_per);
  const bool vec_ok = (K % V == 0) && tw_aligned<T, V>(x) && tw_aligned<T, V>(w);
  __shared__ __align__(128) T As[BM * LDS];
  __shared__ __align__(128) T Bs[BN * LDS];
  // Where output (gm, gn) goes: y (M, N) of T, or float partials (SPLIT, M, N).
  auto out_at = [&](int gm, int gn) { return y + (size_t)blockIdx.z * M * N + (size_t)gm * N + gn; };
"""

# Extra constants: WN (warps along N; warp w sits at row w / WN, column w % WN), FM, FN (16x16
# fragments per warp along M and N).
GEMM_TC = (
    _GEMM_PROLOGUE
    + r"""
  using namespace nvcuda;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wm = warp / WN;
  const int wn = warp % WN;
  __shared__ __align__(128) float stage[WARPS * 256];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    tw_stage<T, BM, BK, V, LDS, THREADS>(As, x, m0, M, k0, k_end, K, tid, vec_ok);
    tw_stage<T, BN, BK, V, LDS, THREADS>(Bs, w, n0, N, k0, k_end, K, tid, vec_ok);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], As + (wm * FM * 16 + i * 16) * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * FN * 16 + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* st = stage + warp * 256;
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int rb = m0 + wm * FM * 16 + i * 16;
      const int cb = n0 + wn * FN * 16 + j * 16;
      for (int e = lane; e < 256; e += 32) {
        const int gm = rb + (e >> 4);
        const int gn = cb + (e & 15);
        if (gm < M && gn < N) tw_store(out_at(gm, gn), st[e] TW_BIAS(gn));
      }
      __syncwarp();
    }
  }
"""
)

# Extra constants: TROWS, TCOLS (thread grid; each thread owns BM/TROWS x BN/TCOLS outputs).
GEMM_SIMT = (
    _GEMM_PROLOGUE
    + r"""
  constexpr int TM = BM / TROWS;
  constexpr int TN = BN / TCOLS;
  const int tx = tid % TCOLS;
  const int ty = tid / TCOLS;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    tw_stage<T, BM, BK, V, LDS, THREADS>(As, x, m0, M, k0, k_end, K, tid, vec_ok);
    tw_stage<T, BN, BK, V, LDS, THREADS>(Bs, w, n0, N, k0, k_end, K, tid, vec_ok);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = tw_to_f(As[(ty + i * TROWS) * LDS + kk]);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = tw_to_f(Bs[(tx + j * TCOLS) * LDS + kk]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int gm = m0 + ty + i * TROWS;
      const int gn = n0 + tx + j * TCOLS;
      if (gm < M && gn < N) tw_store(out_at(gm, gn), acc[i][j] TW_BIAS(gn));
    }
  }
"""
)

SOURCES = {"gemv": GEMV, "gemm_tc": GEMM_TC, "gemm_simt": GEMM_SIMT}
