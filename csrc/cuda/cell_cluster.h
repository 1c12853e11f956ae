// The cluster solve's launch interface (cell_cluster.cu), free of torch headers so the
// kernel file compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

enum CellDtype { kCellBFloat16 = 1, kCellFloat16 = 2 };

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
};

// The solve on `stream`: cdiv(n_rows, block_m) clusters of `cluster` CTAs (bfloat16 or
// float16; d / cluster must be 32, 64 or 128 and block_m 16 or 32, else cudaErrorInvalidValue).
cudaError_t cell_cluster_launch(const CellClusterParams& p, int dtype, int cluster, int block_m, cudaStream_t stream);
// How many such clusters the current device holds at once (cudaOccupancyMaxActiveClusters).
cudaError_t cell_cluster_max_active(const CellClusterParams& p, int dtype, int cluster, int block_m, int* clusters);
