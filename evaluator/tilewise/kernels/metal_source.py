"""Metal source for the same kernel families and parameters, as bodies for `mx.fast.metal_kernel`.

NOT COMPILED BY APPLE'S METAL COMPILER: this project's machines are Linux (MLX CPU) and an NVIDIA H100
(MLX CUDA). The bodies do RUN here, through a CPU emulation of the MSL subset they use
(kernels/metal_emu, tests/test_kernels_metal_emu.py): their logic (indexing, remainders, barriers,
simd_sum, split-K, bias, rounding) is checked on a sample of the search space; MSL's own type rules,
the real pipeline's limits and the speed are not. They are safe to ship because a kernel plan is only
ever served after the evaluator's correctness gate ran it on the user's machine: a body that fails to
compile or computes a wrong result makes its candidate incorrect, and an incorrect candidate can never
be promoted (docs/kernels.md).

MLX wraps a body into `[[kernel]] void custom_kernel_<name>(const device T* x [[buffer(0)]],
const constant int* x_shape, const device T* w, const constant int* w_shape, device OutT* y, <the
thread-position attributes the body names>)`, except that an input with fewer than 8 elements is
`const constant T*` instead: a body must therefore index its inputs directly and never copy one into a
`const device T*` (Metal cannot convert constant to device; the emulation found the GEMV doing so).
launch.py puts the parameter set at the top of the body as `constexpr int BM = 64;` /
`using T = bfloat16_t;` lines (one kernel per parameter set, as on CUDA).
`grid` counts threads (dispatchThreads), so every launch rounds it to whole threadgroups.

A simdgroup (32 threads on Apple GPUs) plays the role of a CUDA warp. Both GEMM families use the SIMT
register tile here (the simdgroup_matrix path is future work); the plan parameters mean the same as on
CUDA, so one search space serves both backends.
"""

# Constants: T, MR, R, S, V (as the CUDA gemv).
GEMV = r"""
  const int N = w_shape[0];
  const int K = w_shape[1];
  const uint lane = thread_index_in_simdgroup;
  const uint warp = simdgroup_index_in_threadgroup;
  const int row_in_block = int(warp) / S;
  const int part = int(warp) % S;
  const int n = int(threadgroup_position_in_grid.x) * R + row_in_block;
  threadgroup float tw_partial[R * S * MR];
  float acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = 0.0f;
  if (n < N) {
    // w is indexed directly, not through a `const device T*` row pointer: an input with fewer than
    // 8 elements arrives as `const constant T*`, which Metal cannot convert to a device pointer.
    const size_t row = size_t(n) * K;
    for (int c = (part * 32 + int(lane)) * V; c < K; c += 32 * S * V) {
      for (int j = 0; j < V; ++j) {
        if (c + j < K) {
          const float wf = static_cast<float>(w[row + c + j]);
          for (int i = 0; i < MR; ++i) acc[i] += wf * static_cast<float>(x[size_t(i) * K + c + j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) acc[i] = simd_sum(acc[i]);
  if (S > 1) {
    if (lane == 0) {
      for (int i = 0; i < MR; ++i) tw_partial[(row_in_block * S + part) * MR + i] = acc[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (part == 0 && n < N && lane == 0) {
      for (int i = 0; i < MR; ++i) {
        float s = 0.0f;
        for (int p = 0; p < S; ++p) s += tw_partial[(row_in_block * S + p) * MR + i];
        y[size_t(i) * N + n] = static_cast<T>(s TW_BIAS(n));
      }
    }
  } else if (n < N && lane == 0) {
    for (int i = 0; i < MR; ++i) y[size_t(i) * N + n] = static_cast<T>(acc[i] TW_BIAS(n));
  }
"""

# Constants: T, OutT, XND, BM, BN, BK, WARPS, SPLIT, LDS, TROWS, TCOLS (as the CUDA gemm_simt).
GEMM_SIMT = r"""
  const int THREADS = WARPS * 32;
  int M = 1;  // x may carry leading dims (batch, sequence): M is their product
  for (int d = 0; d < XND - 1; ++d) M *= x_shape[d];
  const int K = x_shape[XND - 1];
  const int N = w_shape[0];
  const int tid = int(thread_index_in_threadgroup);
  const int n0 = int(threadgroup_position_in_grid.x) * BN;
  const int m0 = int(threadgroup_position_in_grid.y) * BM;
  const int z = int(threadgroup_position_in_grid.z);
  const int k_per = (((K + SPLIT - 1) / SPLIT) + BK - 1) / BK * BK;
  const int k_begin = z * k_per;
  const int k_end = min(K, k_begin + k_per);
  threadgroup T As[BM * LDS];
  threadgroup T Bs[BN * LDS];
  const int TM = BM / TROWS;
  const int TN = BN / TCOLS;
  const int tx = tid % TCOLS;
  const int ty = tid / TCOLS;
  float acc[BM / TROWS][BN / TCOLS];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int r = e / BK, c = e % BK;
      const int gr = m0 + r, gc = k0 + c;
      As[r * LDS + c] = (gr < M && gc < k_end) ? x[size_t(gr) * K + gc] : static_cast<T>(0.0f);
    }
    for (int e = tid; e < BN * BK; e += THREADS) {
      const int r = e / BK, c = e % BK;
      const int gr = n0 + r, gc = k0 + c;
      Bs[r * LDS + c] = (gr < N && gc < k_end) ? w[size_t(gr) * K + gc] : static_cast<T>(0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < BK; ++kk) {
      float a[BM / TROWS];
      float b[BN / TCOLS];
      for (int i = 0; i < TM; ++i) a[i] = static_cast<float>(As[(ty + i * TROWS) * LDS + kk]);
      for (int j = 0; j < TN; ++j) b[j] = static_cast<float>(Bs[(tx + j * TCOLS) * LDS + kk]);
      for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      const int gm = m0 + ty + i * TROWS;
      const int gn = n0 + tx + j * TCOLS;
      if (gm < M && gn < N) {
        y[size_t(z) * M * N + size_t(gm) * N + gn] = static_cast<OutT>(acc[i][j] TW_BIAS(gn));
      }
    }
  }
"""

SOURCES = {"gemv": GEMV, "gemm_simt": GEMM_SIMT}
