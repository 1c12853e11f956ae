// deqkern._cluster: the Python face of the cluster solves (cell_cluster.cu: the forward,
// cell_cluster_adjoint.cu: the adjoint). The launcher in
// deqkern/ops/persistent_cluster.py validates everything (dtypes, shapes, alignment) and
// caches the configuration; these functions only fill the parameters and launch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cell_cluster.h"

namespace {

long long* phase_timer = nullptr;  // set_phase_timer's buffer (builds with DEQKERN_PHASE_TIMER)

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return kCellBFloat16;
    case at::kHalf: return kCellFloat16;
    default: TORCH_CHECK(false, "deqkern._cluster: bfloat16 or float16 expected, got ", t);
  }
  return -1;
}

void solve(const at::Tensor& h0, const at::Tensor& w, const at::Tensor& f, const at::Tensor& gain, at::Tensor& h,
           at::Tensor& buf, int64_t stride_f, int64_t cluster, int64_t block_m, double eps, double damping, double tol,
           int64_t max_iter, int64_t stop_mode, bool with_rstd, double rel_eps) {
  c10::cuda::CUDAGuard guard(h0.device());
  CellClusterParams p{h0.data_ptr(), w.data_ptr(), f.data_ptr(), gain.data_ptr(), h.data_ptr(),
                      buf.data_ptr<float>(), static_cast<int>(h0.size(0)), static_cast<int>(w.size(0)),
                      h0.stride(0), w.stride(0), stride_f, static_cast<float>(eps), static_cast<float>(damping),
                      static_cast<float>(tol), static_cast<float>(rel_eps), static_cast<int>(max_iter),
                      static_cast<int>(stop_mode), with_rstd ? 1 : 0, phase_timer};
  const cudaError_t err = cell_cluster_launch(p, dtype_code(h0.scalar_type()), static_cast<int>(cluster),
                                              static_cast<int>(block_m), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "deqkern._cluster.solve: ", cudaGetErrorString(err));
}

// How many clusters of a configuration the device holds at once: `query(params, &clusters)`
// with the params' size fields set. A launch error is cleared and raised here.
template <typename Params, typename Query>
int64_t clusters_held(const char* what, int64_t device, int64_t n_rows, int64_t d, Query&& query) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  Params p{};
  p.n_rows = static_cast<int>(n_rows);
  p.d = static_cast<int>(d);
  int clusters = 0;
  const cudaError_t err = query(p, &clusters);
  if (err != cudaSuccess) cudaGetLastError();  // clear it: the error is reported here
  TORCH_CHECK(err == cudaSuccess, "deqkern._cluster.", what, ": ", cudaGetErrorString(err));
  return clusters;
}

int64_t max_active(at::ScalarType dtype, int64_t device, int64_t n_rows, int64_t d, int64_t cluster,
                   int64_t block_m) {
  return clusters_held<CellClusterParams>("max_active", device, n_rows, d,
                                          [&](const CellClusterParams& p, int* clusters) {
    return cell_cluster_max_active(p, dtype_code(dtype), static_cast<int>(cluster), static_cast<int>(block_m),
                                   clusters);
  });
}

// The outputs are made here (an allocation costs a fraction of a Python torch.empty):
// g (R, d) float32, dz (R, d) in h's dtype, and the float32 buffer of row state, rstd, check
// (blocks, 5), d_gain parts (blocks, d), d_gain (d,), then d_gain in h's dtype (d / 2 floats);
// returned with d_gain's two views (the parts end where d_gain starts).
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
Tensors5 adjoint(const at::Tensor& h, const at::Tensor& w, const at::Tensor& f, const at::Tensor& gain,
                 const at::Tensor& v, at::Tensor& counters, int64_t stride_f, int64_t cluster, double eps,
                 double damping, double tol, int64_t max_iter, double rel_eps) {
  c10::cuda::CUDAGuard guard(h.device());
  const int64_t n = h.size(0), d = w.size(0), blocks = (n + kCellAdjointRows - 1) / kCellAdjointRows;
  const int64_t at = cell_check_offset(n, blocks) + blocks * d;  // d_gain's offset in buf (after its parts)
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.numel() >= kCellAdjointCounterWords,
              "deqkern._cluster.adjoint: counters must be int32 with at least ", kCellAdjointCounterWords, " words");
  at::Tensor g = at::empty({n, d}, h.options().dtype(at::kFloat));
  at::Tensor dz = at::empty({n, d}, h.options());
  at::Tensor buf = at::empty({at + d + d / 2}, h.options().dtype(at::kFloat));
  CellAdjointParams p{h.data_ptr(), w.data_ptr(), f.data_ptr(), gain.data_ptr(), v.data_ptr(), g.data_ptr<float>(),
                      dz.data_ptr(), buf.data_ptr<float>(), buf.data_ptr<float>() + at + d, counters.data_ptr<int>(),
                      static_cast<int>(n), static_cast<int>(d),
                      h.stride(0), w.stride(0), stride_f, v.stride(0), static_cast<float>(eps),
                      static_cast<float>(damping), static_cast<float>(tol), static_cast<float>(rel_eps),
                      static_cast<int>(max_iter), v.scalar_type() == at::kFloat ? 1 : 0, phase_timer};
  const cudaError_t err = cell_adjoint_launch(p, dtype_code(h.scalar_type()), static_cast<int>(cluster),
                                              c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "deqkern._cluster.adjoint: ", cudaGetErrorString(err));
  return {g, dz, buf, buf.narrow(0, at, d), buf.narrow(0, at + d, d / 2).view(h.scalar_type())};
}

int64_t adjoint_max_active(at::ScalarType dtype, int64_t device, int64_t n_rows, int64_t d, int64_t cluster) {
  return clusters_held<CellAdjointParams>("adjoint_max_active", device, n_rows, d,
                                          [&](const CellAdjointParams& p, int* clusters) {
    return cell_adjoint_max_active(p, dtype_code(dtype), static_cast<int>(cluster), clusters);
  });
}

void set_phase_timer(const c10::optional<at::Tensor>& timer) {
  TORCH_CHECK(!timer.has_value() || (timer->is_cuda() && timer->scalar_type() == at::kLong && timer->numel() >= 16),
              "deqkern._cluster.set_phase_timer: a CUDA int64 tensor of 16 elements or None expected");
  phase_timer = timer.has_value() ? static_cast<long long*>(timer->data_ptr()) : nullptr;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The frozen-context cell's one-launch solves (forward and adjoint) on Hopper thread-block clusters (sm_90)";
  m.def("solve", &solve, "One solve: h0, w, frozen, gain, h (out), buf (out), stride_f, cluster, block_m, eps, "
        "damping, tol, max_iter, stop_mode, with_rstd, rel_eps");
  m.def("max_active", &max_active, "Clusters of this configuration the device holds at once (0: none; RuntimeError: not launchable)");
  m.def("adjoint", &adjoint, "One adjoint solve: h*, w, frozen, gain, v (h*'s dtype or float32), counters (zeroed "
        "int32), stride_f, cluster, eps, damping, tol, max_iter, rel_eps -> (g, dz, buf, d_gain, d_gain in h*'s dtype)");
  m.attr("adjoint_rows") = kCellAdjointRows;
  m.attr("adjoint_counter_words") = kCellAdjointCounterWords;
  m.def("set_phase_timer", &set_phase_timer,
        "Where the kernels add their phase cycles (bench/probe_split.py --phases; builds with "
        "DEQKERN_PHASE_TIMER only), or None");
  m.def("adjoint_max_active", &adjoint_max_active,
        "Adjoint clusters of this configuration the device holds at once (0: none; RuntimeError: not launchable)");
}
