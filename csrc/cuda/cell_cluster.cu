// The frozen-context cell's whole Picard solve in one launch on Hopper thread-block clusters.
//
//   z      = h @ W^T + frozen                 (tensor cores, float32 accumulation)
//   rstd   = rsqrt(mean(z^2) + eps)           (per row)
//   h_next = (1 - damping) h + damping * gain * z * rstd   on the rows still active
//   residual per row (stop modes abs / rel / max); rows freeze once below tol or non-finite
//
// A cluster of C CTAs owns BM rows; CTA c computes the BN = d / C columns [c BN, (c + 1) BN)
// of z. Each CTA keeps its BN rows of W and a copy of the block's whole iterate rows in
// shared memory for the whole solve. One cluster barrier per iteration:
//   1. the CTA's z tile = iterate rows x W slice^T, plus its frozen tile (float32)
//   2. the tile is stored into every CTA's z buffer (distributed shared memory)
//                                                         -> cluster barrier (hardware)
//   3. every CTA then holds the whole rows of z: each computes rstd, the next iterate, the
//      residual and the stop decision of every row itself, with the same code on the same
//      values, so all CTAs keep the same iterate copy and leave the loop together.
// The z buffer is double-buffered: a CTA stores into buffer k % 2 only after the barrier
// that every CTA passed once done reading it two iterations before. Nothing in the loop
// touches global memory.
//
// The residual is row_residual_tl's: the plain norms where the sums of squares are finite
// and far from under- and overflow, else its overflow-safe scaled form (max magnitude,
// scaled sum, non-finite flag). bfloat16 and float16 storage; the row state, rstd and the
// host check go to the Triton kernels' float32 buffer layout (deqkern/ops/persistent_split.py,
// _buffers).

#include "cell_cluster.h"
#include "cell_cluster_device.h"

namespace {

using namespace cell_cluster;

// The next iterate of one element: (1 - damping) h + damping * z * rstd * gain
__device__ __forceinline__ float next_of(float h, float z, float rstd, float g, float damping) {
  return (1.0f - damping) * h + damping * (z * rstd * g);
}

// f(step, next) for each of this thread's elements of its row: next from the next iterate the
// row phase formed in registers, the iterate (not yet overwritten) from shared memory.
template <typename T, int TPR, int MAXQ, typename F>
__device__ __forceinline__ void for_each_step(const float (&hn)[MAXQ][4], const T* hr, int d, int sub, F&& f) {
#pragma unroll
  for (int q = 0; q < MAXQ; ++q) {
    const int c = quad_col<TPR>(sub, q);
    if (c < d) {
      const uint2 hv = *reinterpret_cast<const uint2*>(hr + c);
      const T* hp = reinterpret_cast<const T*>(&hv);
#pragma unroll
      for (int j = 0; j < 4; ++j) f(hn[q][j] - to_f(hp[j]), hn[q][j]);
    }
  }
}

// Float4 groups of a row each thread of the row phase holds: d <= 4 * (kThreads / BM) * max_quads
// (832 at 16 rows, 512 at 32: above the widths whose shared memory fits, 768 and 512)
__host__ __device__ constexpr int max_quads(int block_m) { return block_m == 16 ? 13 : 16; }
__host__ __device__ constexpr int max_d(int block_m) { return 4 * (kThreads / block_m) * max_quads(block_m); }

template <typename T, int BM, int CPL>
__global__ void __launch_bounds__(kThreads, 1) cell_cluster_kernel(const CellClusterParams p) {
  constexpr int PAD = 8;                // 16 bytes between shared rows (bank spread)
  constexpr int BN = 32 * CPL;          // the CTA's columns of z
  constexpr int VEC = 8;                // elements per 16-byte copy
  constexpr int TN = BN / 16;           // 16x16 tiles across the CTA's columns
  constexpr int NT = TN < 4 ? TN : 4;   // tiles per warp (sharing their A fragments)
  constexpr int WGROUPS = (BM / 16) * (TN / NT);  // warps by their tiles; each group splits K
  constexpr int TPR = kThreads / BM;    // threads per row in the row phase (16 or 8)
  constexpr int GROUPS = BM * BN / 4;   // float4 groups of the CTA's z tile
  constexpr int PER_THREAD = (GROUPS + kThreads - 1) / kThreads;
  constexpr int MAXQ = max_quads(BM);   // a row's float4 groups per thread, at the widest d

  PhaseTimer timer(p.timer);
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
  T* ws = reinterpret_cast<T*>(smem);                  // (BN, ld): W's rows c0.., resident for the solve
  T* hs = ws + BN * ld;                                // (BM, ld): the block's iterate rows (every CTA the same)
  float* zx = reinterpret_cast<float*>(hs + BM * ld);  // (2, BM, d): z + frozen, exchanged, double-buffered
  float* gs = zx + 2 * BM * d;                         // (d,): gain
  __shared__ CheckTally tally;

  const int dv = d / VEC;
  for (int i = threadIdx.x; i < BN * dv; i += kThreads) {
    const int n = i / dv, k = (i % dv) * VEC;
    copy16_async(ws + n * ld + k, w + static_cast<int64_t>(c0 + n) * p.stride_w + k);
  }
  for (int i = threadIdx.x; i < BM * dv; i += kThreads) {
    const int r = i / dv, k = (i % dv) * VEC;
    if (first + r < p.n_rows) copy16_async(hs + r * ld + k, h0 + static_cast<int64_t>(first + r) * p.stride_h0 + k);
    else *reinterpret_cast<uint4*>(hs + r * ld + k) = make_uint4(0u, 0u, 0u, 0u);
  }
  for (int c = threadIdx.x; c < d; c += kThreads) gs[c] = to_f(gain[c]);
  start_tally(tally);
  // this thread's float4 groups of the CTA's frozen tile (added to z before the exchange)
  float4 fz[PER_THREAD];
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int g = threadIdx.x + i * kThreads, r = g / (BN / 4), c = c0 + (g % (BN / 4)) * 4;
    const int64_t at = static_cast<int64_t>(first + r) * p.stride_f + c;
    const bool in = g < GROUPS && first + r < p.n_rows;
    fz[i] = in ? make_float4(to_f(f[at]), to_f(f[at + 1]), to_f(f[at + 2]), to_f(f[at + 3]))
               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  // the row phase: thread (r, sub) takes row r's float4 groups at quad_col<TPR>(sub, 0, 1, ...)
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;
  const unsigned mask = row_mask<TPR>(lane);
  const bool ok = first + r < p.n_rows;
  RowTrack track;
  float rstd_last = 0.0f;
  float zq[MAXQ][4];  // this thread's part of its row's z, then of the next iterate
  copies_done();
  cluster.sync();  // every CTA of the cluster has started (its shared memory may be written) and loaded
  timer.mark(kPrologue);

  // K split over at most C warps: the ksplit partial (BM, BN) tiles then fill at most the z
  // buffer not in use this iteration (BM * d floats), where they are kept
  const int ksplit = min(kWarps / WGROUPS, C);
  const int nk = d / 16, chunk = (nk + ksplit - 1) / ksplit;
  int k = 0, parity = 0;
  bool pending = true;
  while (pending) {
    // 1. the product: warp w takes tile group w % WGROUPS and K slice w / WGROUPS. Its partials go
    // to the other z buffer: other CTAs store into it only after the coming barrier, and this
    // CTA last read it in the previous iteration's row phase.
    float* zp = zx + (parity ^ 1) * BM * d;
    if (warp < WGROUPS * ksplit) {
      const int group = warp % WGROUPS, ks = warp / WGROUPS;
      const int tm = group / (TN / NT), tn = (group % (TN / NT)) * NT;
      const int lo = min(nk, ks * chunk) * 16, hi = min(nk, (ks + 1) * chunk) * 16;
      warp_product<T, NT, false>(hs + tm * 16 * ld, ld, ws + tn * 16 * ld, ld, lo, hi,
                                 zp + ks * BM * BN + tm * 16 * BN + tn * 16, BN);
    }
    __syncthreads();
    timer.mark(kProduct);

    // 2. z + frozen of the CTA's columns into every CTA's exchange buffer
    float* zb = zx + parity * BM * d;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int g = threadIdx.x + i * kThreads;
      if (g < GROUPS) {
        const int row = g / (BN / 4), col = (g % (BN / 4)) * 4;
        float4 v = fz[i];
#pragma unroll
        for (int s = 0; s < ksplit; ++s) {
          const float4 part = *reinterpret_cast<const float4*>(zp + s * BM * BN + row * BN + col);
          v.x += part.x; v.y += part.y; v.z += part.z; v.w += part.w;
        }
        for (int c = 0; c < C; ++c) {
          const int to = (rank + c) % C;  // spread the stores over the cluster
          *reinterpret_cast<float4*>(cluster.map_shared_rank(zb, to) + row * d + c0 + col) = v;
        }
      }
    }
    // the cluster barrier, split: this thread's iterate (its own shared memory, which no
    // other CTA writes) is read while the other CTAs' stores complete
    T* hr = hs + r * ld;
    uint2 hq[MAXQ];
    timer.mark(kExchange);
    cluster.barrier_arrive();
#pragma unroll
    for (int q = 0; q < MAXQ; ++q) {
      const int c = quad_col<TPR>(sub, q);
      if (c < d) hq[q] = *reinterpret_cast<const uint2*>(hr + c);
    }
    cluster.barrier_wait();
    timer.mark(kBarrier);

    // 3. whole rows, the same in every CTA: rstd, the residual of the step, then the step.
    // Each thread reads its part of the row's z once; it becomes the next iterate in place.
    const float* zr = zb + r * d;
    float ss = 0.0f;
#pragma unroll
    for (int q = 0; q < MAXQ; ++q) {
      const int c = quad_col<TPR>(sub, q);
      if (c < d) {
        const float4 zv = *reinterpret_cast<const float4*>(zr + c);
        zq[q][0] = zv.x; zq[q][1] = zv.y; zq[q][2] = zv.z; zq[q][3] = zv.w;
        ss += zv.x * zv.x + zv.y * zv.y + zv.z * zv.z + zv.w * zv.w;
      }
    }
    const float rstd = rsqrtf(group_sum<TPR>(ss, mask) / static_cast<float>(d) + p.eps);
    rstd_last = rstd;
    const bool active = track.active(ok, k, p.tol, p.max_iter);
    float sd = 0.0f, sh = 0.0f, md = 0.0f;
#pragma unroll
    for (int q = 0; q < MAXQ; ++q) {
      const int c = quad_col<TPR>(sub, q);
      if (c < d) {
        const float4 gv = *reinterpret_cast<const float4*>(gs + c);
        const T* hp = reinterpret_cast<const T*>(&hq[q]);
        const float g4[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float h = to_f(hp[j]), hn = next_of(h, zq[q][j], rstd, g4[j], p.damping), step = hn - h;
          sd += step * step;
          sh += hn * hn;
          md = fmaxf(md, fabsf(step));
          zq[q][j] = hn;
        }
      }
    }
    sd = group_sum<TPR>(sd, mask);
    sh = group_sum<TPR>(sh, mask);
    md = group_max<TPR>(md, mask);
    const float res = row_residual<TPR>(
        sd, sh, md, [&](auto&& f) { for_each_step<T, TPR, MAXQ>(zq, hr, d, sub, f); }, p.rel_eps, p.stop_mode, mask);
    if (active) {
#pragma unroll
      for (int q = 0; q < MAXQ; ++q) {
        const int c = quad_col<TPR>(sub, q);
        if (c < d) {
          T out[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) out[j] = from_f<T>(zq[q][j]);
          *reinterpret_cast<uint2*>(hr + c) = *reinterpret_cast<const uint2*>(out);
        }
      }
      track.commit(res);
    }
    ++k;
    parity ^= 1;
    // every CTA holds the same rows here, so all leave together
    const bool mine = p.with_rstd ? active : (k < p.max_iter && active && res >= p.tol && res <= kFltMax);
    timer.mark(kRows);
    pending = __syncthreads_or(mine) != 0;
    timer.mark(kStop);
    timer.mark(kIterations);
  }

  // h* (this CTA's columns) and, by the cluster's first CTA, the row state and host check
  for (int i = threadIdx.x; i < BM * (BN / VEC); i += kThreads) {
    const int row = i / (BN / VEC), col = (i % (BN / VEC)) * VEC;
    if (first + row < p.n_rows)
      *reinterpret_cast<uint4*>(h_out + static_cast<int64_t>(first + row) * d + c0 + col) =
          *reinterpret_cast<const uint4*>(hs + row * ld + c0 + col);
  }
  if (rank == 0)
    write_state(p.buf, p.n_rows, block, first + r, ok, sub == 0, track, p.with_rstd, rstd_last, p.tol, tally);
  cluster.sync();  // no CTA leaves while another may still use its shared memory
  timer.mark(kEpilogue);
}

template <typename T, int BM, int CPL>
size_t smem_bytes(int d) {
  constexpr int BN = 32 * CPL;
  return sizeof(T) * static_cast<size_t>(BN + BM) * (d + 8) + sizeof(float) * (2 * static_cast<size_t>(BM) * d + d);
}

template <typename T, int BM, int CPL>
cudaError_t run(const CellClusterParams& p, int cluster, int blocks, cudaStream_t stream, int* max_clusters) {
  static uint64_t configured = 0;
  return launch(cell_cluster_kernel<T, BM, CPL>, p, smem_bytes<T, BM, CPL>(p.d), configured, cluster, blocks, stream,
                max_clusters);
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
  if (cluster < 1 || cluster > 16 || p.d % cluster != 0 || (block_m != 16 && block_m != 32) || p.d > max_d(block_m))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case kCellBFloat16: return by_rows<__nv_bfloat16>(p, cluster, block_m, blocks, stream, max_clusters);
    case kCellFloat16: return by_rows<__half>(p, cluster, block_m, blocks, stream, max_clusters);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t cell_cluster_launch(const CellClusterParams& p, int dtype, int cluster, int block_m, cudaStream_t stream) {
  const int blocks = (p.n_rows + block_m - 1) / block_m;
  return dispatch(p, dtype, cluster, block_m, blocks, stream, nullptr);
}

cudaError_t cell_cluster_max_active(const CellClusterParams& p, int dtype, int cluster, int block_m, int* clusters) {
  const int blocks = (p.n_rows + block_m - 1) / block_m;
  return dispatch(p, dtype, cluster, block_m, blocks, nullptr, clusters);
}
