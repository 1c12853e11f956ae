// The frozen-context cell's whole Picard solve in one launch on Hopper thread-block clusters.
//
//   z      = h @ W^T + frozen                 (tensor cores, float32 accumulation)
//   rstd   = rsqrt(mean(z^2) + eps)           (per row)
//   h_next = (1 - damping) h + damping * gain * z * rstd   on the rows still active
//   residual per row (stop modes abs / rel / max), rows frozen once below tol or non-finite
//
// A cluster of C CTAs owns BM rows; CTA c owns the BN = d / C columns [c BN, (c + 1) BN).
// Each CTA keeps its BN rows of W and the block's whole iterate rows in shared memory for
// the whole solve, so an iteration reads nothing from global memory. Per iteration:
//   1. z tile = iterate rows x W slice^T (warps split the 16x16 tiles and, on small tiles, K)
//   2. per-row partial sum(z^2) in shared memory             -> cluster barrier
//   3. every CTA sums the C partials (distributed shared memory, same order everywhere),
//      forms its columns of h_next and stores them into every CTA's iterate copy, and its
//      per-row residual parts (max magnitude, scaled sum of squares, non-finite flag)
//                                                            -> cluster barrier
//   4. every CTA combines the C parts of each row the same way, so all take the same
//      decisions (active rows, when to stop) and leave the loop together.
// The cluster barrier is the hardware's (barrier.cluster); nothing waits on global memory.
//
// Float32 storage multiplies with three TF32 products (hi*hi + hi*lo + lo*hi: about
// float32's accuracy). The row state, rstd and the host check are written to the same
// float32 buffer layout as the Triton kernels' (deqkern/ops/persistent_split.py, _buffers).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cell_cluster.h"

namespace {

namespace cg = cooperative_groups;
using namespace nvcuda;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr float kFltMax = 3.4028234663852886e38f;
constexpr int kParts = 8;  // per row and CTA: diff (m, s, bad), h_next (m, s, bad), 2 unused

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return x;
}

template <typename T>
__device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return x;
}

// N elements of T as one store (2 to 16 bytes).
template <int BYTES> struct Word;
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
  __device__ __forceinline__ void store(T* at) const {
    using W = typename Word<sizeof(T) * N>::type;
    *reinterpret_cast<W*>(at) = *reinterpret_cast<const W*>(v);
  }
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// One warp: out (16x16, row-major, ldo) = a[16 rows, k_lo:k_hi] @ b[16 rows, k_lo:k_hi]^T,
// a and b row-major with leading dimension ld (b's rows are W's rows: a column-major B).
template <typename T>
__device__ __forceinline__ void warp_product(const T* a, const T* b, int ld, int k_lo, int k_hi, float* out,
                                             int ldo) {
  if constexpr (std::is_same_v<T, float>) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a_hi, a_lo;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b_hi, b_lo;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = k_lo; k < k_hi; k += 8) {
      wmma::load_matrix_sync(a_hi, a + k, ld);
      wmma::load_matrix_sync(b_hi, b + k, ld);
#pragma unroll
      for (int i = 0; i < a_hi.num_elements; ++i) {
        const float x = a_hi.x[i], hi = wmma::__float_to_tf32(x);
        a_lo.x[i] = wmma::__float_to_tf32(x - hi);
        a_hi.x[i] = hi;
      }
#pragma unroll
      for (int i = 0; i < b_hi.num_elements; ++i) {
        const float x = b_hi.x[i], hi = wmma::__float_to_tf32(x);
        b_lo.x[i] = wmma::__float_to_tf32(x - hi);
        b_hi.x[i] = hi;
      }
      wmma::mma_sync(acc, a_lo, b_hi, acc);
      wmma::mma_sync(acc, a_hi, b_lo, acc);
      wmma::mma_sync(acc, a_hi, b_hi, acc);
    }
    wmma::store_matrix_sync(out, acc, ldo, wmma::mem_row_major);
  } else {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = k_lo; k < k_hi; k += 16) {
      wmma::load_matrix_sync(af, a + k, ld);
      wmma::load_matrix_sync(bf, b + k, ld);
      wmma::mma_sync(acc, af, bf, acc);
    }
    wmma::store_matrix_sync(out, acc, ldo, wmma::mem_row_major);
  }
}

template <typename T>
constexpr int kStep = std::is_same_v<T, float> ? 8 : 16;  // K of one MMA

// A row's part of a float32 slice held CPL per lane: max magnitude m, sum((x/m)^2), 1 if
// any entry is not finite (row_residual_tl's parts; masked entries are 0).
template <int CPL>
__device__ __forceinline__ void part_norm(const float (&x)[CPL], float& m, float& s, float& bad) {
  float mx = 0.0f, b = 0.0f;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    mx = fmaxf(mx, fabsf(x[j]));
    b = fabsf(x[j]) <= kFltMax ? b : 1.0f;
  }
  mx = warp_max(mx);
  b = warp_max(b);
  const float safe = mx > 0.0f ? mx : 1.0f;
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const float q = x[j] / safe;
    acc += q * q;
  }
  m = mx;
  s = warp_sum(acc);
  bad = b;
}

// A row's (m, s) from the CTAs' parts, one per lane (lanes past the cluster hold 0).
__device__ __forceinline__ void combine_parts(float m, float s, float& big, float& sum) {
  big = warp_max(m);
  const float safe = big > 0.0f ? big : 1.0f;
  const float q = m / safe;
  sum = warp_sum(s * q * q);
}

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

template <typename T, int BM, int CPL>
__global__ void __launch_bounds__(kThreads, 1) cell_cluster_kernel(const CellClusterParams p) {
  constexpr int RPW = BM / kWarps;      // rows per warp in the elementwise phase
  constexpr int PAD = 16 / sizeof(T);   // 16 bytes between shared rows (bank spread)
  constexpr int BN = 32 * CPL;          // the CTA's columns: CPL per lane
  constexpr int VEC = 16 / sizeof(T);   // elements per 16-byte copy
  constexpr int TILES = (BM / 16) * (BN / 16);
  constexpr int KSPLIT = TILES < kWarps ? kWarps / TILES : 1;

  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int d = p.d, ld = d + PAD, c0 = rank * BN;
  const int block = blockIdx.x / C, first = block * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* h0 = static_cast<const T*>(p.h0);
  const T* w = static_cast<const T*>(p.w);
  const T* f = static_cast<const T*>(p.f);
  const T* gain = static_cast<const T*>(p.gain);
  T* h_out = static_cast<T*>(p.h);

  extern __shared__ __align__(128) unsigned char smem[];
  T* ws = reinterpret_cast<T*>(smem);            // (BN, ld): W's rows c0.., resident for the solve
  T* hs = ws + BN * ld;                          // (BM, ld): the block's whole iterate rows
  float* zp = reinterpret_cast<float*>(hs + BM * ld);  // (KSPLIT, BM, BN): product partials
  float* ss_part = zp + KSPLIT * BM * BN;        // (BM,): this CTA's sum(z^2) per row
  float* parts = ss_part + BM;                   // (BM, kParts): this CTA's residual parts
  __shared__ int check_i[4];                     // unconverged, non-finite, first non-finite step, max nstep
  __shared__ float check_max;                    // largest finite residual (>= 0: int order)

  const int dv = d / VEC;
  for (int i = threadIdx.x; i < BN * dv; i += kThreads) {
    const int n = i / dv, k = (i % dv) * VEC;
    *reinterpret_cast<uint4*>(ws + n * ld + k) =
        __ldg(reinterpret_cast<const uint4*>(w + static_cast<int64_t>(c0 + n) * p.stride_w + k));
  }
  for (int i = threadIdx.x; i < BM * dv; i += kThreads) {
    const int r = i / dv, k = (i % dv) * VEC;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (first + r < p.n_rows) v = *reinterpret_cast<const uint4*>(h0 + static_cast<int64_t>(first + r) * p.stride_h0 + k);
    *reinterpret_cast<uint4*>(hs + r * ld + k) = v;
  }
  if (threadIdx.x == 0) {
    check_i[0] = check_i[1] = check_i[3] = 0;
    check_i[2] = 0x7fffffff;
    check_max = 0.0f;
  }

  // this thread's columns (CPL per lane) of its warp's RPW rows, in float32 registers
  float h[RPW][CPL], fz[RPW][CPL], g[CPL];
  float res_old[RPW], prev[RPW], lowest[RPW], rstd_last[RPW];
  int nstep[RPW];
  bool ok[RPW], active[RPW];
  const int col = c0 + lane * CPL;
#pragma unroll
  for (int j = 0; j < CPL; ++j) g[j] = to_f(gain[col + j]);
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int row = first + warp * RPW + i;
    ok[i] = row < p.n_rows;
    res_old[i] = prev[i] = kFltMax;
    lowest[i] = __int_as_float(0x7f800000);
    nstep[i] = 0;
    rstd_last[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      h[i][j] = ok[i] ? to_f(h0[static_cast<int64_t>(row) * p.stride_h0 + col + j]) : 0.0f;
      fz[i][j] = ok[i] ? to_f(f[static_cast<int64_t>(row) * p.stride_f + col + j]) : 0.0f;
    }
  }
  cluster.sync();  // every CTA of the cluster has started (its shared memory may be written) and loaded

  constexpr int STEP = kStep<T>;
  const int nk = d / STEP, chunk = (nk + KSPLIT - 1) / KSPLIT;
  int k = 0;
  bool pending = true;
  while (pending) {
    // 1. the product: warp w takes tile w % TILES and K slice w / TILES (or tiles w, w + 8, ...)
    if constexpr (TILES >= kWarps) {
      for (int t = warp; t < TILES; t += kWarps) {
        const int tm = t / (BN / 16), tn = t % (BN / 16);
        warp_product<T>(hs + tm * 16 * ld, ws + tn * 16 * ld, ld, 0, d, zp + tm * 16 * BN + tn * 16, BN);
      }
    } else {
      const int t = warp % TILES, ks = warp / TILES;
      const int tm = t / (BN / 16), tn = t % (BN / 16);
      const int lo = min(nk, ks * chunk) * STEP, hi = min(nk, (ks + 1) * chunk) * STEP;
      warp_product<T>(hs + tm * 16 * ld, ws + tn * 16 * ld, ld, lo, hi, zp + ks * BM * BN + tm * 16 * BN + tn * 16,
                      BN);
    }
    __syncthreads();

    // 2. z and this CTA's sum(z^2) per row
    float z[RPW][CPL];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp * RPW + i;
      float ss = 0.0f;
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        float v = 0.0f;
#pragma unroll
        for (int s = 0; s < KSPLIT; ++s) v += zp[s * BM * BN + r * BN + lane * CPL + j];
        v += fz[i][j];
        z[i][j] = v;
        ss += v * v;
      }
      ss = warp_sum(ss);
      if (lane == 0) ss_part[r] = ss;
    }
    cluster.sync();

    // 3. rstd from the cluster's partials; the next iterate into every CTA's copy; residual parts
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp * RPW + i;
      const float ss = warp_sum(lane < C ? cluster.map_shared_rank(ss_part, lane)[r] : 0.0f);
      const float rstd = rsqrtf(ss / static_cast<float>(d) + p.eps);
      rstd_last[i] = rstd;
      active[i] = ok[i] && res_old[i] >= p.tol && res_old[i] <= kFltMax && k < p.max_iter;
      float step[CPL], next[CPL];
      Pack<T, CPL> q;
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const float hn = (1.0f - p.damping) * h[i][j] + p.damping * (z[i][j] * rstd * g[j]);
        q.v[j] = from_f<T>(hn);
        step[j] = active[i] ? hn - h[i][j] : 0.0f;
        next[j] = active[i] ? hn : 0.0f;
      }
      if (active[i]) {  // warp-uniform: the row's decision
        for (int c = 0; c < C; ++c) q.store(cluster.map_shared_rank(hs, c) + r * ld + col);
#pragma unroll
        for (int j = 0; j < CPL; ++j) h[i][j] = to_f(q.v[j]);
      }
      float md, sd, bd, mh, sh, bh;
      part_norm<CPL>(step, md, sd, bd);
      part_norm<CPL>(next, mh, sh, bh);
      if (lane == 0) {
        float* at = parts + r * kParts;
        at[0] = md; at[1] = sd; at[2] = bd; at[3] = mh; at[4] = sh; at[5] = bh;
      }
    }
    cluster.sync();

    // 4. each row's residual from the C CTAs' parts (lane c reads CTA c), then the bookkeeping
    bool committed = false, above = false;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp * RPW + i;
      float v[6] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      if (lane < C) {
        const float* at = cluster.map_shared_rank(parts, lane) + r * kParts;
#pragma unroll
        for (int q = 0; q < 6; ++q) v[q] = at[q];
      }
      const float bd = warp_max(v[2]);
      float md, sd = 0.0f, mh = 0.0f, sh = 0.0f, bh = 0.0f;
      if (p.stop_mode == 2) {
        md = warp_max(v[0]);
      } else {
        combine_parts(v[0], v[1], md, sd);
        if (p.stop_mode == 1) {
          combine_parts(v[3], v[4], mh, sh);
          bh = warp_max(v[5]);
        }
      }
      const float res = residual_of(md, sd, bd, mh, sh, bh, p.rel_eps, p.stop_mode);
      if (active[i]) {
        prev[i] = res_old[i];
        lowest[i] = res < lowest[i] ? res : lowest[i];
        nstep[i] += 1;
        res_old[i] = res;
        committed = true;
        above = above || (res >= p.tol && res <= kFltMax);
      }
    }
    ++k;
    // every CTA holds the same values here, so all leave together
    pending = __syncthreads_or(p.with_rstd ? committed : (k < p.max_iter && above)) != 0;
  }

  // h* (this CTA's columns) and, by the cluster's first CTA, the row state and host check
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    if (!ok[i]) continue;
    const int64_t row = first + warp * RPW + i;
    Pack<T, CPL> q;
#pragma unroll
    for (int j = 0; j < CPL; ++j) q.v[j] = from_f<T>(h[i][j]);
    q.store(h_out + row * d + col);
  }
  if (rank == 0) {
    const int n = p.n_rows;
    float* res_buf = p.buf;
    int* nstep_buf = reinterpret_cast<int*>(p.buf + 3 * static_cast<int64_t>(n));
    int unconverged = 0, bad = 0, first_bad = 0x7fffffff, max_step = 0;
    float max_res = 0.0f;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      if (!ok[i] || lane != 0) continue;
      const int64_t row = first + warp * RPW + i;
      res_buf[row] = res_old[i];
      p.buf[n + row] = prev[i];
      p.buf[2 * static_cast<int64_t>(n) + row] = lowest[i];
      nstep_buf[row] = nstep[i];
      if (p.with_rstd) p.buf[4 * static_cast<int64_t>(n) + row] = rstd_last[i];
      unconverged += !(res_old[i] < p.tol);
      if (fabsf(res_old[i]) <= kFltMax) {
        max_res = fmaxf(max_res, res_old[i]);
      } else {
        bad += 1;
        first_bad = min(first_bad, nstep[i]);
      }
      max_step = max(max_step, nstep[i]);
    }
    if (lane == 0) {
      atomicAdd(&check_i[0], unconverged);
      atomicAdd(&check_i[1], bad);
      atomicMin(&check_i[2], first_bad);
      atomicMax(&check_i[3], max_step);
      atomicMax(reinterpret_cast<int*>(&check_max), __float_as_int(max_res));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float* check = p.buf + 5 * static_cast<int64_t>(n) + 5 * static_cast<int64_t>(block);
      check[0] = static_cast<float>(check_i[0]);
      check[1] = check_i[1] > 0 ? static_cast<float>(check_i[2]) : 0.0f;
      check[2] = static_cast<float>(check_i[1]);
      check[3] = check_max;
      check[4] = static_cast<float>(check_i[3]);
    }
  }
  cluster.sync();  // no CTA leaves while another may still read its shared memory
}

template <typename T, int BM, int CPL>
size_t smem_bytes(int d) {
  constexpr int PAD = 16 / sizeof(T), BN = 32 * CPL, TILES = (BM / 16) * (BN / 16);
  constexpr int KSPLIT = TILES < kWarps ? kWarps / TILES : 1;
  return sizeof(T) * static_cast<size_t>(BN + BM) * (d + PAD) + sizeof(float) * (KSPLIT * BM * BN + BM + BM * kParts);
}

template <typename T, int BM, int CPL>
cudaError_t run(const CellClusterParams& p, int cluster, int blocks, cudaStream_t stream, int* max_clusters) {
  auto kernel = cell_cluster_kernel<T, BM, CPL>;
  const size_t smem = smem_bytes<T, BM, CPL>(p.d);
  static uint64_t configured = 0;  // the function's attributes, set once per device (bit)
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

template <typename T, int BM>
cudaError_t by_columns(const CellClusterParams& p, int cluster, int blocks, cudaStream_t stream, int* max_clusters) {
  switch (p.d / cluster) {
    case 32: return run<T, BM, 1>(p, cluster, blocks, stream, max_clusters);
    case 64: return run<T, BM, 2>(p, cluster, blocks, stream, max_clusters);
    case 128: return run<T, BM, 4>(p, cluster, blocks, stream, max_clusters);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t by_rows(const CellClusterParams& p, int cluster, int block_m, int blocks, cudaStream_t stream,
                    int* max_clusters) {
  switch (block_m) {
    case 16: return by_columns<T, 16>(p, cluster, blocks, stream, max_clusters);
    case 32: return by_columns<T, 32>(p, cluster, blocks, stream, max_clusters);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t dispatch(const CellClusterParams& p, int dtype, int cluster, int block_m, int blocks, cudaStream_t stream,
                     int* max_clusters) {
  if (cluster < 1 || cluster > 16 || p.d % cluster != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kCellFloat32: return by_rows<float>(p, cluster, block_m, blocks, stream, max_clusters);
    case kCellBFloat16: return by_rows<__nv_bfloat16>(p, cluster, block_m, blocks, stream, max_clusters);
    case kCellFloat16: return by_rows<__half>(p, cluster, block_m, blocks, stream, max_clusters);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t cell_cluster_smem(int dtype, int d, int cluster, int block_m) {
  if (cluster < 1 || d % cluster != 0) return 0;
  const int bn = d / cluster;
  if (bn != 32 && bn != 64 && bn != 128) return 0;
  const int cpl = bn / 32;
  auto pick = [&](auto tag) -> size_t {
    using T = decltype(tag);
    if (block_m == 16) return cpl == 1 ? smem_bytes<T, 16, 1>(d) : cpl == 2 ? smem_bytes<T, 16, 2>(d) : smem_bytes<T, 16, 4>(d);
    if (block_m == 32) return cpl == 1 ? smem_bytes<T, 32, 1>(d) : cpl == 2 ? smem_bytes<T, 32, 2>(d) : smem_bytes<T, 32, 4>(d);
    return 0;
  };
  switch (dtype) {
    case kCellFloat32: return pick(float{});
    case kCellBFloat16: return pick(__nv_bfloat16{});
    case kCellFloat16: return pick(__half{});
    default: return 0;
  }
}

cudaError_t cell_cluster_launch(const CellClusterParams& p, int dtype, int cluster, int block_m, cudaStream_t stream) {
  const int blocks = (p.n_rows + block_m - 1) / block_m;
  return dispatch(p, dtype, cluster, block_m, blocks, stream, nullptr);
}

cudaError_t cell_cluster_max_active(const CellClusterParams& p, int dtype, int cluster, int block_m, int* clusters) {
  const int blocks = (p.n_rows + block_m - 1) / block_m;
  return dispatch(p, dtype, cluster, block_m, blocks, nullptr, clusters);
}
