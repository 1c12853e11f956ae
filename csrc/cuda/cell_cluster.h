// The cluster solves' launch interface (cell_cluster.cu: the forward, cell_cluster_adjoint.cu:
// the adjoint), free of torch headers so the kernel files compile with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

enum CellDtype { kCellBFloat16 = 1, kCellFloat16 = 2 };

#ifdef __CUDACC__
#define CELL_HOST_DEVICE __host__ __device__
#else
#define CELL_HOST_DEVICE
#endif

// Rows per cluster of the adjoint kernel (the binding exports it as `adjoint_rows`).
constexpr int kCellAdjointRows = 16;
// The adjoint's counters: one per column slice (at most 16 CTAs a cluster), each on its own
// 128-byte line (the binding exports the size as `adjoint_counter_words`).
constexpr int kCellCounterStride = 32;
constexpr int kCellAdjointCounterWords = kCellCounterStride * 16;

// The float32 buffer's layout (deqkern/ops/persistent_split.py, row_views): residual, prev,
// lowest, nstep (int32), rstd (n_rows each), then the host check (blocks, 5); a kernel's
// own outputs follow it. Where block's row of the check starts (block = blocks: its end).
CELL_HOST_DEVICE constexpr int64_t cell_check_offset(int64_t n_rows, int64_t block) { return 5 * n_rows + 5 * block; }

struct CellClusterParams {
  const void* h0;    // (R, d) rows, row stride stride_h0, 16-byte aligned rows
  const void* w;     // (d, d), row stride stride_w, 16-byte aligned rows
  const void* f;     // frozen rows (stride_f; 0: one row for all)
  const void* gain;  // (d,)
  void* h;           // (R, d) contiguous: h*
  float* buf;        // float32: residual, prev, lowest, nstep (int32), rstd (R each), check (blocks, 5)
  int n_rows, d;
  int64_t stride_h0, stride_w, stride_f;
  float eps, damping, tol, rel_eps;
  int max_iter, stop_mode, with_rstd;
  long long* timer;  // phase cycles (builds with DEQKERN_PHASE_TIMER only; else unused), or null
};

// The solve on `stream`: cdiv(n_rows, block_m) clusters of `cluster` CTAs (bfloat16 or
// float16; d / cluster must be 32, 64 or 128 and block_m 16 or 32, else cudaErrorInvalidValue).
cudaError_t cell_cluster_launch(const CellClusterParams& p, int dtype, int cluster, int block_m, cudaStream_t stream);
// How many such clusters the current device holds at once (cudaOccupancyMaxActiveClusters).
cudaError_t cell_cluster_max_active(const CellClusterParams& p, int dtype, int cluster, int block_m, int* clusters);

struct CellAdjointParams {
  const void* h;     // (R, d) h*, row stride stride_h, 16-byte aligned rows
  const void* w;     // (d, d), row stride stride_w, 16-byte aligned rows
  const void* f;     // frozen rows (stride_f; 0: one row for all)
  const void* gain;  // (d,)
  const void* v;     // (R, d) incoming gradient, row stride stride_v, 16-byte aligned rows;
                     // h*'s dtype, or float32 where v_f32
  float* g;          // (R, d) contiguous float32: the adjoint solution
  void* dz;          // (R, d) contiguous, h*'s dtype: VJP_z(g)
  float* buf;        // float32: residual, prev, lowest, nstep (int32), rstd (R each), check (blocks, 5),
                     // d_gain parts (blocks, d), d_gain (d,)
  void* d_gain;      // (d,) h*'s dtype: d_gain rounded
  int* counters;     // zeroed, kCellAdjointCounterWords ints: the clusters done, per column slice (left at zero)
  int n_rows, d;
  int64_t stride_h, stride_w, stride_f, stride_v;
  float eps, damping, tol, rel_eps;
  int max_iter, v_f32;
  long long* timer;  // as CellClusterParams::timer
};

// The adjoint solve g <- v + J^T g at h* on `stream` (cell_cluster_adjoint.cu), with d_gain
// summed over the clusters by the last one to finish each column slice: cdiv(n_rows,
// kCellAdjointRows) clusters of `cluster` CTAs (d / cluster 32, 64 or 128, d <= 512, else
// cudaErrorInvalidValue).
cudaError_t cell_adjoint_launch(const CellAdjointParams& p, int dtype, int cluster, cudaStream_t stream);
// How many such clusters the current device holds at once.
cudaError_t cell_adjoint_max_active(const CellAdjointParams& p, int dtype, int cluster, int* clusters);
