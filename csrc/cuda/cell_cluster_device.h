// Device pieces the cluster kernels share (cell_cluster.cu: the forward solve,
// cell_cluster_adjoint.cu: the adjoint solve): storage conversions, the warp's tensor-core
// product, the row reductions, row_residual_tl's residual, the row state and host check
// they write, and the launch on a cluster grid. Included by .cu files only.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace cell_cluster {

namespace cg = cooperative_groups;
using namespace nvcuda;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr float kFltMax = 3.4028234663852886e38f;

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return __float2half_rn(x);
}

// One warp: NT adjacent 16x16 tiles, out[:, 16 i:16 i + 16] (row-major, ldo) = a[16 rows,
// k_lo:k_hi] (row-major, lda) @ B[k_lo:k_hi, 16 i:16 i + 16] for i < NT. B_ROWS: B is
// row-major in b (B[k][n] = b[k ldb + n]); else b holds B's columns as rows (B[k][n] =
// b[n ldb + k], as W's rows for h W^T). Each K step loads the A fragment once for the NT
// products, and the NT accumulators are independent chains.
template <typename T, int NT, bool B_ROWS>
__device__ __forceinline__ void warp_product(const T* a, int lda, const T* b, int ldb, int k_lo, int k_hi, float* out,
                                             int ldo) {
  using BLayout = std::conditional_t<B_ROWS, wmma::row_major, wmma::col_major>;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> bf[NT];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) wmma::fill_fragment(acc[i], 0.0f);
  for (int k = k_lo; k < k_hi; k += 16) {
    wmma::load_matrix_sync(af, a + k, lda);
#pragma unroll
    for (int i = 0; i < NT; ++i)
      wmma::load_matrix_sync(bf[i], B_ROWS ? b + static_cast<int64_t>(k) * ldb + 16 * i : b + i * 16 * ldb + k, ldb);
#pragma unroll
    for (int i = 0; i < NT; ++i) wmma::mma_sync(acc[i], af, bf[i], acc[i]);
  }
#pragma unroll
  for (int i = 0; i < NT; ++i) wmma::store_matrix_sync(out + i * 16, acc[i], ldo, wmma::mem_row_major);
}

// 16 bytes global -> shared without a round trip through registers (cp.async): a thread's
// copies are all in flight at once, instead of one load's latency after another. Both
// addresses 16-byte aligned; copies_done() waits for this thread's copies (a barrier must
// follow before other threads read them).
__device__ __forceinline__ void copy16_async(void* to_shared, const void* from_global) {
  __pipeline_memcpy_async(to_shared, from_global, 16);
}

__device__ __forceinline__ void copies_done() {
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

// Where a launch's time goes, for bench/probe_split.py --phases: in a build with
// -DDEQKERN_PHASE_TIMER (the probe's own JIT build), thread 0 of the grid's first CTA adds
// the clock64 cycles since its previous mark to out[phase] at each mark (out: 16 int64,
// null: off; the last one counts iterations). In other builds the marks are nothing.
enum Phase { kPrologue, kProduct, kExchange, kBarrier, kRows, kStop, kEpilogue, kZProduct, kZPartials, kZTile,
             kRowStart, kIterations = 15 };

struct PhaseTimer {
#ifdef DEQKERN_PHASE_TIMER
  long long* out;
  long long last;
  __device__ explicit PhaseTimer(long long* o) : out(blockIdx.x == 0 && threadIdx.x == 0 ? o : nullptr), last(now()) {}
  __device__ __forceinline__ static long long now() {
#ifdef __CUDA_ARCH__
    return clock64();
#else
    return 0;
#endif
  }
  __device__ __forceinline__ void mark(Phase phase) {
    if (out != nullptr) {
      const long long t = now();
      out[phase] += phase == kIterations ? 1 : t - last;
      last = t;
    }
  }
#else
  __device__ explicit PhaseTimer(long long*) {}
  __device__ __forceinline__ void mark(Phase) {}
#endif
};

// Reductions over a row's TPR adjacent lanes (mask: those lanes).
template <int TPR>
__device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(mask, x, o);
  return x;
}

template <int TPR>
__device__ __forceinline__ float group_max(float x, unsigned mask) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(mask, x, o));
  return x;
}

// The lanes of the TPR-lane group that holds this lane's row.
template <int TPR>
__device__ __forceinline__ unsigned row_mask(int lane) {
  return TPR == 32 ? 0xffffffffu : ((1u << TPR) - 1u) << (lane & ~(TPR - 1));
}

// The first column of a row-phase thread's q-th float4 group of its row: thread sub of the
// row's TPR takes columns 4 sub.. 4 sub + 3, then every 4 TPR further on.
template <int TPR>
__device__ __forceinline__ int quad_col(int sub, int q) { return 4 * (sub + TPR * q); }

// row_residual_tl's residual from a row's reduced parts: the step's max magnitude md and
// sum((step/md)^2) sd (md = 1 for the plain sums), the next iterate's mh and sh, and the
// non-finite flags bd, bh. stop_mode 0 abs, 1 rel, 2 max; NaN for a bad row.
__device__ __forceinline__ float residual_of(float md, float sd, float bd, float mh, float sh, float bh,
                                             float rel_eps, int stop_mode) {
  float bad = bd, res;
  if (stop_mode == 2) {
    res = md;
  } else {
    res = md * sqrtf(sd);
    if (stop_mode == 1) {
      const float norm = mh * sqrtf(sh);
      bad = fmaxf(bad, bh);
      res = res / (norm + rel_eps);
      bad = fmaxf(bad, norm <= kFltMax ? 0.0f : 1.0f);
    }
    bad = fmaxf(bad, res <= kFltMax ? 0.0f : 1.0f);
  }
  return bad > 0.0f ? __int_as_float(0x7fc00000) : res;
}

// row_residual_tl's overflow-safe residual of a row whose plain sums of squares overflow,
// underflow or are not finite: each(f) calls f(step, next) for each of this thread's
// elements of the row.
template <int TPR, typename Each>
__device__ float scaled_residual(Each each, float rel_eps, int stop_mode, unsigned mask) {
  float md = 0.0f, mh = 0.0f, bd = 0.0f, bh = 0.0f;
  each([&](float step, float next) {
    md = fmaxf(md, fabsf(step));
    mh = fmaxf(mh, fabsf(next));
    bd = fabsf(step) <= kFltMax ? bd : 1.0f;
    bh = fabsf(next) <= kFltMax ? bh : 1.0f;
  });
  md = group_max<TPR>(md, mask);
  mh = group_max<TPR>(mh, mask);
  bd = group_max<TPR>(bd, mask);
  bh = group_max<TPR>(bh, mask);
  const float safe_d = md > 0.0f ? md : 1.0f, safe_h = mh > 0.0f ? mh : 1.0f;
  float sd = 0.0f, sh = 0.0f;
  each([&](float step, float next) {
    const float qd = step / safe_d, qh = next / safe_h;
    sd += qd * qd;
    sh += qh * qh;
  });
  sd = group_sum<TPR>(sd, mask);
  sh = group_sum<TPR>(sh, mask);
  return residual_of(md, sd, bd, mh, sh, bh, rel_eps, stop_mode);
}

// The residual of a row from its reduced plain sums (sd = sum(step^2), sh = sum(next^2),
// md = max |step|) where they are finite and far from under- and overflow, else
// scaled_residual's (each: as there).
template <int TPR, typename Each>
__device__ __forceinline__ float row_residual(float sd, float sh, float md, Each each, float rel_eps, int stop_mode,
                                              unsigned mask) {
  const bool plain = sd <= kFltMax && !(sd > 0.0f && sd < 1e-30f) &&
                     (stop_mode != 1 || (sh <= kFltMax && !(sh > 0.0f && sh < 1e-30f)));
  if (!plain) return scaled_residual<TPR>(each, rel_eps, stop_mode, mask);
  float res = stop_mode == 2 ? md : sqrtf(sd);  // sd finite: every step is
  if (stop_mode == 1) res = res / (sqrtf(sh) + rel_eps);
  return res <= kFltMax ? res : __int_as_float(0x7fc00000);
}

// A row's solver state through the iterations: the row freezes once its residual is below
// tol or not finite, or at max_iter.
struct RowTrack {
  float res_old = kFltMax, prev = kFltMax, lowest = __builtin_huge_valf();
  int nstep = 0;

  __device__ __forceinline__ bool active(bool ok, int k, float tol, int max_iter) const {
    return ok && res_old >= tol && res_old <= kFltMax && k < max_iter;
  }
  __device__ __forceinline__ void commit(float res) {
    prev = res_old;
    lowest = res < lowest ? res : lowest;
    nstep += 1;
    res_old = res;
  }
};

// The CTA's tally of the host check (unconverged, non-finite, first non-finite step, max
// nstep; largest finite residual, >= 0 so that its int order is its order).
struct CheckTally {
  int i[4];
  float max;
};

__device__ __forceinline__ void start_tally(CheckTally& t) {
  if (threadIdx.x == 0) {
    t.i[0] = t.i[1] = t.i[3] = 0;
    t.i[2] = 0x7fffffff;
    t.max = 0.0f;
  }
}

// The row state (float32 buffer: residual, prev, lowest, nstep (int32), rstd, n each) and
// cluster `block`'s row of the host check (its 5 floats; cell_check_offset), by every thread
// of one CTA of the cluster (it has a __syncthreads); lead: the thread that writes its row.
__device__ __forceinline__ void write_state(float* buf, int64_t n, int64_t block, int64_t row, bool ok, bool lead,
                                            const RowTrack& s, bool with_rstd, float rstd, float tol, CheckTally& t) {
  if (ok && lead) {
    buf[row] = s.res_old;
    buf[n + row] = s.prev;
    buf[2 * n + row] = s.lowest;
    reinterpret_cast<int*>(buf + 3 * n)[row] = s.nstep;
    if (with_rstd) buf[4 * n + row] = rstd;
    atomicAdd(&t.i[0], !(s.res_old < tol) ? 1 : 0);
    if (fabsf(s.res_old) <= kFltMax) {
      atomicMax(reinterpret_cast<int*>(&t.max), __float_as_int(s.res_old));
    } else {
      atomicAdd(&t.i[1], 1);
      atomicMin(&t.i[2], s.nstep);
    }
    atomicMax(&t.i[3], s.nstep);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float* check = buf + cell_check_offset(n, block);
    check[0] = static_cast<float>(t.i[0]);
    check[1] = t.i[1] > 0 ? static_cast<float>(t.i[2]) : 0.0f;
    check[2] = static_cast<float>(t.i[1]);
    check[3] = t.max;
    check[4] = static_cast<float>(t.i[3]);
  }
}

// Launch `kernel` on blocks clusters of `cluster` CTAs with smem bytes of dynamic shared
// memory, or (max_clusters not null) ask how many such clusters the device holds at once.
// configured: the kernel's attributes, set once per device (bit).
template <typename Params>
cudaError_t launch(void (*kernel)(Params), const Params& p, size_t smem, uint64_t& configured, int cluster,
                   int blocks, cudaStream_t stream, int* max_clusters) {
  int device = 0;
  cudaGetDevice(&device);
  if (!(configured >> (device & 63) & 1u)) {
    int optin = 0;
    cudaFuncAttributes attributes;
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess) return err;
    // the opt-in limit covers static and dynamic shared memory together
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               optin - static_cast<int>(attributes.sharedSizeBytes));
    if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    configured |= uint64_t{1} << (device & 63);
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks * cluster));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  if (max_clusters != nullptr) return cudaOccupancyMaxActiveClusters(max_clusters, kernel, &config);
  return cudaLaunchKernelEx(&config, kernel, p);
}

}  // namespace cell_cluster
