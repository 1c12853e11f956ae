// The adjoint solve of the frozen-context cell's implicit backward in one launch on Hopper
// thread-block clusters (the Triton kernels' version: deqkern/ops/persistent_adjoint.py).
//
// At h*: z* = h* W^T + frozen, rstd = rsqrt(mean(z*^2) + eps), n = z* rstd (float32). From g = v:
//   dz     = VJP_z(g) = rstd (dyg - n mean(dyg n)),  dyg = damping g gain   (h*'s dtype)
//   u      = dz @ W                                    (tensor cores, float32 accumulation)
//   g_next = v + (1 - damping) g + u                   on the rows still active
// with the relative residual per row (independent of the gradient's scale); rows freeze once
// below tol or non-finite. Then d_gain = damping sum_rows g n: each cluster writes its rows'
// part, and the last cluster to finish (a counter per column slice, which it resets) sums
// the parts in block order, so d_gain needs no second launch and is deterministic.
//
// The forward's layout (cell_cluster.cu): a cluster of C CTAs owns 16 rows; CTA c forms the
// BN = d / C columns [c BN, (c + 1) BN) of u, for which it keeps W's columns
// W[:, c BN:(c + 1) BN] in shared memory, and stores its tile of u into every CTA's buffer
// (distributed shared memory, one cluster barrier an iteration). Every CTA keeps the rows'
// dz and forms the whole rows' g, residual, stop decision and next dz itself, with the same
// code on the same values (g, n and v in registers).
//
// z* comes from the same slice of W: it is the rows c BN.. of W^T, so CTA c forms the
// partial product h*[:, c BN:(c + 1) BN] W[:, c BN:(c + 1) BN]^T over all d columns. The
// partials go to the CTAs that own their columns (a cluster barrier), each sums its C
// partials in rank order, adds frozen and stores the z* tile into every CTA (a second one).

#include "cell_cluster.h"
#include "cell_cluster_device.h"

namespace {

using namespace cell_cluster;

constexpr int kClusterRows = kCellAdjointRows;  // rows per cluster
constexpr int kTpr = kThreads / kClusterRows;  // row-phase threads per row
constexpr int kQuads = 8;                      // float4 groups of a row per row-phase thread
constexpr int kMaxD = 4 * kTpr * kQuads;       // 512

// f(q, c, g4) for each of this thread's float4 groups q of its row: c its first column, g4 the
// gain there.
template <int TPR, int MAXQ, typename F>
__device__ __forceinline__ void each_quad(const float* gs, int d, int sub, F&& f) {
#pragma unroll
  for (int q = 0; q < MAXQ; ++q) {
    const int c = quad_col<TPR>(sub, q);
    if (c < d) {
      const float4 gv = *reinterpret_cast<const float4*>(gs + c);
      const float g4[4] = {gv.x, gv.y, gv.z, gv.w};
      f(q, c, g4);
    }
  }
}

// This thread's part of sum(dyg n) over its row, dyg = damping g gain.
template <int TPR, int MAXQ>
__device__ __forceinline__ float vjp_part(const float (&g)[MAXQ][4], const float (&n)[MAXQ][4], const float* gs,
                                          int d, int sub, float damping) {
  float s = 0.0f;
  each_quad<TPR, MAXQ>(gs, d, sub, [&](int q, int, const float (&g4)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) s += damping * g[q][j] * g4[j] * n[q][j];
  });
  return s;
}

// dz = rstd (dyg - n proj) of this thread's part of its row into dr (the row in shared
// memory), proj = mean(dyg n).
template <typename T, int TPR, int MAXQ>
__device__ __forceinline__ void store_vjp(const float (&g)[MAXQ][4], const float (&n)[MAXQ][4], const float* gs,
                                          float rstd, float proj, float damping, T* dr, int d, int sub) {
  each_quad<TPR, MAXQ>(gs, d, sub, [&](int q, int c, const float (&g4)[4]) {
    T out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = from_f<T>(rstd * (damping * g[q][j] * g4[j] - n[q][j] * proj));
    *reinterpret_cast<uint2*>(dr + c) = *reinterpret_cast<const uint2*>(out);
  });
}

template <typename T, int CPL>
__global__ void __launch_bounds__(kThreads, 1) cell_adjoint_kernel(const CellAdjointParams p) {
  constexpr int BM = kClusterRows, TPR = kTpr, MAXQ = kQuads;
  constexpr int PAD = 8;               // 16 bytes between shared rows (bank spread)
  constexpr int BN = 32 * CPL;         // the CTA's columns of u
  constexpr int LDW = BN + PAD;        // W's column slice, (d, LDW)
  constexpr int VEC = 8;               // elements per 16-byte copy
  constexpr int TN = BN / 16;          // 16x16 tiles across the CTA's columns
  constexpr int NT = TN < 4 ? TN : 4;  // tiles per warp (sharing their A fragments)
  constexpr int WGROUPS = TN / NT;     // warps by their tiles; each group splits K
  constexpr int GROUPS = BM * BN / 4;  // float4 groups of the CTA's tile
  constexpr int PER_THREAD = (GROUPS + kThreads - 1) / kThreads;

  PhaseTimer timer(p.timer);
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int d = p.d, ld = d + PAD, c0 = rank * BN;
  const int block = blockIdx.x / C, first = block * BM, blocks = gridDim.x / C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* hg = static_cast<const T*>(p.h);
  const T* w = static_cast<const T*>(p.w);
  const T* f = static_cast<const T*>(p.f);
  const T* gain = static_cast<const T*>(p.gain);

  extern __shared__ __align__(128) unsigned char smem[];
  T* ws = reinterpret_cast<T*>(smem);                  // (d, LDW): W[:, c0:c0 + BN], resident for the solve
  T* ds = ws + d * LDW;                                // (BM, ld): h*'s K slice for z*, then the rows' dz
  float* z0 = reinterpret_cast<float*>(ds + BM * ld);  // (BM, d) and z1 (BM, d): the exchange buffers
  float* z1 = z0 + BM * d;
  float* gs = z1 + BM * d;                             // (d,): gain
  __shared__ CheckTally tally;

  constexpr int bv = BN / VEC;
  for (int i = threadIdx.x; i < d * bv; i += kThreads) {
    const int k = i / bv, n = (i % bv) * VEC;
    copy16_async(ws + k * LDW + n, w + static_cast<int64_t>(k) * p.stride_w + c0 + n);
  }
  for (int i = threadIdx.x; i < BM * bv; i += kThreads) {
    const int r = i / bv, n = (i % bv) * VEC;
    if (first + r < p.n_rows) copy16_async(ds + r * ld + c0 + n, hg + static_cast<int64_t>(first + r) * p.stride_h + c0 + n);
    else *reinterpret_cast<uint4*>(ds + r * ld + c0 + n) = make_uint4(0u, 0u, 0u, 0u);
  }
  // while the copies fly: this thread's v (its row-phase part) and frozen (its groups of the
  // CTA's z* tile) into registers
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;
  const bool ok = first + r < p.n_rows;
  float vq[MAXQ][4];
#pragma unroll
  for (int q = 0; q < MAXQ; ++q) {
    const int c = quad_col<TPR>(sub, q);
    float4 vv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (ok && c < d) {
      const int64_t at = static_cast<int64_t>(first + r) * p.stride_v + c;
      if (p.v_f32) {
        vv = *reinterpret_cast<const float4*>(static_cast<const float*>(p.v) + at);
      } else {
        const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const T*>(p.v) + at);
        const T* e = reinterpret_cast<const T*>(&raw);
        vv = make_float4(to_f(e[0]), to_f(e[1]), to_f(e[2]), to_f(e[3]));
      }
    }
    vq[q][0] = vv.x; vq[q][1] = vv.y; vq[q][2] = vv.z; vq[q][3] = vv.w;
  }
  float4 fz[PER_THREAD];
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int g = threadIdx.x + i * kThreads, row = g / (BN / 4), col = c0 + (g % (BN / 4)) * 4;
    const int64_t at = static_cast<int64_t>(first + row) * p.stride_f + col;
    fz[i] = g < GROUPS && first + row < p.n_rows
                ? make_float4(to_f(f[at]), to_f(f[at + 1]), to_f(f[at + 2]), to_f(f[at + 3]))
                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int c = threadIdx.x; c < d; c += kThreads) gs[c] = to_f(gain[c]);
  start_tally(tally);
  copies_done();
  __syncthreads();
  timer.mark(kPrologue);

  // z*: this CTA's K slice of the product, all d columns, into z1
  for (int group = warp; group < d / 32; group += kWarps)
    warp_product<T, 2, false>(ds + c0, ld, ws + group * 32 * LDW, LDW, 0, BN, z1 + group * 32, d);
  cluster.sync();  // every CTA has started (its shared memory may be written) and holds its partial
  timer.mark(kZProduct);
  for (int i = threadIdx.x; i < C * GROUPS; i += kThreads) {
    const int to = (rank + i / GROUPS) % C, g = i % GROUPS, row = g / (BN / 4), col = (g % (BN / 4)) * 4;
    *reinterpret_cast<float4*>(cluster.map_shared_rank(z0, to) + rank * BM * BN + row * BN + col) =
        *reinterpret_cast<const float4*>(z1 + row * d + to * BN + col);
  }
  cluster.sync();
  timer.mark(kZPartials);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int g = threadIdx.x + i * kThreads, row = g / (BN / 4), col = (g % (BN / 4)) * 4;
    if (g < GROUPS) {
      float4 z = fz[i];
      for (int s = 0; s < C; ++s) {
        const float4 part = *reinterpret_cast<const float4*>(z0 + s * BM * BN + row * BN + col);
        z.x += part.x; z.y += part.y; z.z += part.z; z.w += part.w;
      }
      for (int c = 0; c < C; ++c)
        *reinterpret_cast<float4*>(cluster.map_shared_rank(z1, (rank + c) % C) + row * d + c0 + col) = z;
    }
  }
  cluster.sync();
  timer.mark(kZTile);

  // the row phase: thread (r, sub) takes row r's float4 groups at quad_col<TPR>(sub, 0, 1, ...);
  // n = z* rstd, g = v, and the first dz
  const unsigned mask = row_mask<TPR>(lane);
  float nq[MAXQ][4], gq[MAXQ][4], aq[MAXQ][4];
  float ss = 0.0f;
#pragma unroll
  for (int q = 0; q < MAXQ; ++q) {
    const int c = quad_col<TPR>(sub, q);
#pragma unroll
    for (int j = 0; j < 4; ++j) gq[q][j] = vq[q][j];
    if (c < d) {
      const float4 zv = *reinterpret_cast<const float4*>(z1 + r * d + c);
      nq[q][0] = zv.x; nq[q][1] = zv.y; nq[q][2] = zv.z; nq[q][3] = zv.w;
      ss += zv.x * zv.x + zv.y * zv.y + zv.z * zv.z + zv.w * zv.w;
    }
  }
  const float rstd = rsqrtf(group_sum<TPR>(ss, mask) / static_cast<float>(d) + p.eps);
#pragma unroll
  for (int q = 0; q < MAXQ; ++q)
#pragma unroll
    for (int j = 0; j < 4; ++j) nq[q][j] *= rstd;
  T* dr = ds + r * ld;
  const float proj0 = group_sum<TPR>(vjp_part<TPR, MAXQ>(gq, nq, gs, d, sub, p.damping), mask) / static_cast<float>(d);
  store_vjp<T, TPR, MAXQ>(gq, nq, gs, rstd, proj0, p.damping, dr, d, sub);
  RowTrack track;
  __syncthreads();  // the rows' dz, and every thread done reading z1
  timer.mark(kRowStart);

  // K split over at most C warps: the ksplit partial (BM, BN) tiles then fill at most the
  // buffer not in use this iteration (BM * d floats)
  const int ksplit = min(kWarps / WGROUPS, C);
  const int nk = d / 16, chunk = (nk + ksplit - 1) / ksplit;
  int k = 0, parity = 0;
  bool pending = true;
  while (pending) {
    // 1. u's tile = dz @ W slice. The partials go to the buffer other CTAs store into only
    // after the coming barrier, which this CTA last read in the previous row phase.
    float* zp = parity ? z0 : z1;
    if (warp < WGROUPS * ksplit) {
      const int tn = (warp % WGROUPS) * NT, ks = warp / WGROUPS;
      const int lo = min(nk, ks * chunk) * 16, hi = min(nk, (ks + 1) * chunk) * 16;
      warp_product<T, NT, true>(ds, ld, ws + tn * 16, LDW, lo, hi, zp + ks * BM * BN + tn * 16, BN);
    }
    __syncthreads();
    timer.mark(kProduct);

    // 2. the tile into every CTA's buffer
    float* zb = parity ? z1 : z0;
    for (int i = threadIdx.x; i < GROUPS; i += kThreads) {
      const int row = i / (BN / 4), col = (i % (BN / 4)) * 4;
      float4 u = *reinterpret_cast<const float4*>(zp + row * BN + col);
      for (int s = 1; s < ksplit; ++s) {
        const float4 part = *reinterpret_cast<const float4*>(zp + s * BM * BN + row * BN + col);
        u.x += part.x; u.y += part.y; u.z += part.z; u.w += part.w;
      }
      for (int c = 0; c < C; ++c)
        *reinterpret_cast<float4*>(cluster.map_shared_rank(zb, (rank + c) % C) + row * d + c0 + col) = u;
    }
    // the cluster barrier, split: v + (1 - damping) g (registers) while the stores complete
    timer.mark(kExchange);
    cluster.barrier_arrive();
#pragma unroll
    for (int q = 0; q < MAXQ; ++q)
#pragma unroll
      for (int j = 0; j < 4; ++j) aq[q][j] = vq[q][j] + (1.0f - p.damping) * gq[q][j];
    cluster.barrier_wait();
    timer.mark(kBarrier);

    // 3. whole rows, the same in every CTA: g_next, its relative residual, sum(dyg n) at g_next
    const float* ur = zb + r * d;
    float sd = 0.0f, sh = 0.0f, pj = 0.0f;
    each_quad<TPR, MAXQ>(gs, d, sub, [&](int q, int c, const float (&g4)[4]) {
      const float4 uv = *reinterpret_cast<const float4*>(ur + c);
      const float u4[4] = {uv.x, uv.y, uv.z, uv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float gn = aq[q][j] + u4[j], step = gn - gq[q][j];
        sd += step * step;
        sh += gn * gn;
        pj += p.damping * gn * g4[j] * nq[q][j];
        aq[q][j] = gn;
      }
    });
    sd = group_sum<TPR>(sd, mask);
    sh = group_sum<TPR>(sh, mask);
    pj = group_sum<TPR>(pj, mask);
    const bool active = track.active(ok, k, p.tol, p.max_iter);
    const float res = row_residual<TPR>(
        sd, sh, 0.0f,
        [&](auto&& fn) {
#pragma unroll
          for (int q = 0; q < MAXQ; ++q)
            if (quad_col<TPR>(sub, q) < d)
#pragma unroll
              for (int j = 0; j < 4; ++j) fn(aq[q][j] - gq[q][j], aq[q][j]);
        },
        p.rel_eps, 1, mask);
    if (active) {
#pragma unroll
      for (int q = 0; q < MAXQ; ++q)
#pragma unroll
        for (int j = 0; j < 4; ++j) gq[q][j] = aq[q][j];
      store_vjp<T, TPR, MAXQ>(gq, nq, gs, rstd, pj / static_cast<float>(d), p.damping, dr, d, sub);
      track.commit(res);
    }
    ++k;
    parity ^= 1;
    // every CTA holds the same rows here, so all leave together
    const bool mine = k < p.max_iter && active && res >= p.tol && res <= kFltMax;
    timer.mark(kRows);
    pending = __syncthreads_or(mine) != 0;
    timer.mark(kStop);
    timer.mark(kIterations);
  }

  // g and dz (this CTA's columns), d_gain's part of them (g n of each row into z0, free now,
  // then summed in row order), and by the cluster's first CTA the row state and host check
  const int64_t n = p.n_rows;
#pragma unroll
  for (int q = 0; q < MAXQ; ++q) {
    const int c = quad_col<TPR>(sub, q);
    if (c >= c0 && c < c0 + BN) {
      if (ok)
        *reinterpret_cast<float4*>(p.g + static_cast<int64_t>(first + r) * d + c) =
            make_float4(gq[q][0], gq[q][1], gq[q][2], gq[q][3]);
      *reinterpret_cast<float4*>(z0 + r * BN + c - c0) =
          ok ? make_float4(gq[q][0] * nq[q][0], gq[q][1] * nq[q][1], gq[q][2] * nq[q][2], gq[q][3] * nq[q][3])
             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  T* dz_out = static_cast<T*>(p.dz);
  for (int i = threadIdx.x; i < BM * bv; i += kThreads) {
    const int row = i / bv, col = (i % bv) * VEC;
    if (first + row < p.n_rows)
      *reinterpret_cast<uint4*>(dz_out + static_cast<int64_t>(first + row) * d + c0 + col) =
          *reinterpret_cast<const uint4*>(ds + row * ld + c0 + col);
  }
  __syncthreads();
  float* parts = p.buf + cell_check_offset(n, blocks);
  for (int c = threadIdx.x; c < BN; c += kThreads) {
    float s = 0.0f;
    for (int row = 0; row < BM; ++row) s += z0[row * BN + c];
    parts[static_cast<int64_t>(block) * d + c0 + c] = p.damping * s;
  }
  __threadfence();  // the parts, visible device-wide before the count says they are there
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(p.counters + kCellCounterStride * rank, 1) == blocks - 1;
  __syncthreads();
  if (last) {  // every cluster's part of these columns is written: sum them in block order
    __threadfence();
    float* d_gain = parts + static_cast<int64_t>(blocks) * d;
    for (int c = threadIdx.x; c < BN; c += kThreads) {
      float s = 0.0f;
      for (int b = 0; b < blocks; ++b) s += __ldcg(parts + static_cast<int64_t>(b) * d + c0 + c);
      d_gain[c0 + c] = s;
      static_cast<T*>(p.d_gain)[c0 + c] = from_f<T>(s);
    }
    if (threadIdx.x == 0) p.counters[kCellCounterStride * rank] = 0;  // for the next launch on the stream
  }
  if (rank == 0)
    write_state(p.buf, n, block, first + r, ok, sub == 0, track, true, rstd, p.tol, tally);
  cluster.sync();  // no CTA leaves while another may still use its shared memory
  timer.mark(kEpilogue);
}

template <typename T, int CPL>
size_t smem_bytes(int d) {
  constexpr int BN = 32 * CPL;
  return sizeof(T) * (static_cast<size_t>(d) * (BN + 8) + static_cast<size_t>(kClusterRows) * (d + 8)) +
         sizeof(float) * (2 * static_cast<size_t>(kClusterRows) * d + d);
}

template <typename T, int CPL>
cudaError_t run(const CellAdjointParams& p, int cluster, int blocks, cudaStream_t stream, int* max_clusters) {
  static uint64_t configured = 0;
  return launch(cell_adjoint_kernel<T, CPL>, p, smem_bytes<T, CPL>(p.d), configured, cluster, blocks, stream,
                max_clusters);
}

template <typename T>
cudaError_t by_columns(const CellAdjointParams& p, int cluster, int blocks, cudaStream_t stream, int* max_clusters) {
  switch (p.d / cluster) {
    case 32: return run<T, 1>(p, cluster, blocks, stream, max_clusters);
    case 64: return run<T, 2>(p, cluster, blocks, stream, max_clusters);
    case 128: return run<T, 4>(p, cluster, blocks, stream, max_clusters);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t dispatch(const CellAdjointParams& p, int dtype, int cluster, cudaStream_t stream, int* max_clusters) {
  if (cluster < 1 || cluster > 16 || p.d % cluster != 0 || p.d > kMaxD) return cudaErrorInvalidValue;
  const int blocks = (p.n_rows + kClusterRows - 1) / kClusterRows;
  switch (dtype) {
    case kCellBFloat16: return by_columns<__nv_bfloat16>(p, cluster, blocks, stream, max_clusters);
    case kCellFloat16: return by_columns<__half>(p, cluster, blocks, stream, max_clusters);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t cell_adjoint_launch(const CellAdjointParams& p, int dtype, int cluster, cudaStream_t stream) {
  return dispatch(p, dtype, cluster, stream, nullptr);
}

cudaError_t cell_adjoint_max_active(const CellAdjointParams& p, int dtype, int cluster, int* clusters) {
  return dispatch(p, dtype, cluster, nullptr, clusters);
}
