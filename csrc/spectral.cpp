// Spectral-norm schedule kernels: power iteration and clamping over many weights in
// one call (module deqkern._C).
//
// ATen ops only, so the same code runs on CPU and CUDA tensors and no nvcc is needed.
// The gain over a Python loop is dispatch overhead: one call issues every weight's
// matvecs and norms from C++.
//
// Math, per weight W (any float dtype, viewed as the float32 matrix (out, -1)):
//
//     repeat n_iter times:
//         u <- normalize(W v)          normalize(x) = x / max(||x||_2, 1e-12)
//         v <- normalize(W^T u)        (F.normalize(x, dim=0, eps=1e-12))
//     sigma = u . (W v)
//
// and the clamp W <- W * min(1, tau / sigma). Everything is float32 whatever the weight
// dtype; nothing reads a value back to the host, so on CUDA both calls only enqueue
// kernels. deqkern/spectral.py holds the same math in torch (power_iteration_reference,
// clamp_reference), op for op, and is the reference the tests compare with.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace {

// Argument errors become Python ValueError / TypeError directly (pybind11's builtin
// exceptions), not c10::Error: no C++ backtrace is captured, and the message is the
// same whatever toolchain built the extension.
#define DEQ_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) throw py::value_error(c10::str(__VA_ARGS__)); } while (0)
#define DEQ_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) throw py::type_error(c10::str(__VA_ARGS__)); } while (0)

// torch.nn.utils.spectral_norm and F.normalize use the same eps.
constexpr double kNormalizeEps = 1e-12;

// W as the float32 matrix (out, -1): a view for contiguous float32 weights, else a copy.
at::Tensor as_float_matrix(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).to(at::kFloat);
}

// x <- x / max(||x||_2, eps), in place.
void normalize_(at::Tensor& x) {
  x.div_(at::linalg_vector_norm(x).clamp_min(kNormalizeEps));
}

void check_weight(const at::Tensor& weight, size_t i, const at::Device& device) {
  DEQ_CHECK_VALUE(weight.defined(), "weights[", i, "] is undefined");
  DEQ_CHECK_TYPE(weight.is_floating_point(), "weights[", i, "] must be a floating-point tensor, got ",
              weight.scalar_type());
  DEQ_CHECK_VALUE(weight.dim() >= 2, "weights[", i, "] must have at least 2 dimensions, got shape ",
              weight.sizes());
  DEQ_CHECK_VALUE(weight.numel() > 0, "weights[", i, "] must not be empty, got shape ", weight.sizes());
  DEQ_CHECK_VALUE(weight.device() == device, "weights[", i, "] is on ", weight.device(),
              " but weights[0] is on ", device, "; all weights of one call must share a device");
}

void check_vector(const at::Tensor& vec, const char* what, size_t i, int64_t expected_len,
                  const at::Device& device) {
  DEQ_CHECK_VALUE(vec.defined(), what, "[", i, "] is undefined");
  DEQ_CHECK_TYPE(vec.scalar_type() == at::kFloat, what, "[", i, "] must be float32, got ", vec.scalar_type());
  DEQ_CHECK_VALUE(vec.dim() == 1 && vec.size(0) == expected_len, what, "[", i, "] must have shape (",
              expected_len, ",) to match weights[", i, "], got ", vec.sizes());
  DEQ_CHECK_VALUE(vec.device() == device, what, "[", i, "] is on ", vec.device(), " but weights[", i, "] is on ",
              device);
}

void check_lengths(size_t n_weights, size_t n_other, const char* what) {
  DEQ_CHECK_VALUE(n_other == n_weights, what, " has ", n_other, " entries, expected one per weight (",
              n_weights, ")");
}

// weights: k tensors (out_i, ...) on one device; us: k float32 (out_i,);
// vs: k float32 (numel_i / out_i,). Updates us and vs in place; returns sigmas: float32 (k,).
at::Tensor power_iteration_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                            const std::vector<at::Tensor>& vs, int64_t n_iter) {
  check_lengths(weights.size(), us.size(), "us");
  check_lengths(weights.size(), vs.size(), "vs");
  DEQ_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  if (weights.empty()) {
    return at::empty({0}, at::kFloat);
  }
  const at::Device device = weights[0].device();
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], i, device);
    const int64_t rows = weights[i].size(0);
    check_vector(us[i], "us", i, rows, device);
    check_vector(vs[i], "vs", i, weights[i].numel() / rows, device);
  }

  at::NoGradGuard no_grad;
  std::vector<at::Tensor> sigmas;
  sigmas.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor matrix = as_float_matrix(weights[i]);
    at::Tensor u = us[i];
    at::Tensor v = vs[i];
    for (int64_t it = 0; it < n_iter; ++it) {
      at::mv_out(u, matrix, v);
      normalize_(u);
      at::mv_out(v, matrix.t(), u);
      normalize_(v);
    }
    sigmas.push_back(at::dot(u, at::mv(matrix, v)));
  }
  return at::stack(sigmas);
}

// weights: k tensors on one device; sigmas, targets: (k,) (moved to float32 on the weights'
// device). W_i <- W_i * min(1, targets_i / sigmas_i) in place; returns the scales, float32 (k,).
at::Tensor clamp_(const std::vector<at::Tensor>& weights, const at::Tensor& sigmas, const at::Tensor& targets) {
  const auto k = static_cast<int64_t>(weights.size());
  DEQ_CHECK_VALUE(sigmas.dim() == 1 && sigmas.size(0) == k, "sigmas must have shape (", k,
              ",), one per weight, got ", sigmas.sizes());
  DEQ_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == k, "targets must have shape (", k,
              ",), one per weight, got ", targets.sizes());
  if (weights.empty()) {
    return at::empty({0}, at::kFloat);
  }
  const at::Device device = weights[0].device();
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], i, device);
  }

  at::NoGradGuard no_grad;
  const at::Tensor scales = (targets.to(device, at::kFloat, /*non_blocking=*/true) /
                             sigmas.to(device, at::kFloat, /*non_blocking=*/true))
                                .clamp_max(1.0);
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor weight = weights[i];
    const at::Tensor scale = scales.select(0, i);
    if (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble) {
      weight.mul_(scale);
    } else {
      // A half/bfloat16 multiply would round the scale to the weight dtype first;
      // scale in float32 and round once.
      weight.copy_(weight.to(at::kFloat).mul_(scale));
    }
  }
  return scales;
}

at::Tensor clamp_list_(const std::vector<at::Tensor>& weights, const at::Tensor& sigmas,
                       const std::vector<double>& targets) {
  // Host floats -> a small CPU float32 tensor; clamp_ copies it to the device with
  // non_blocking=true, which does not wait for the stream.
  const at::Tensor target_tensor =
      at::tensor(targets, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
  return clamp_(weights, sigmas, target_tensor);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deqkern C++ extension: power iteration and spectral-norm clamping over many weights.";
  m.def("power_iteration_", &power_iteration_, py::arg("weights"), py::arg("us"), py::arg("vs"),
        py::arg("n_iter"),
        "Run n_iter power iterations per weight, updating us/vs in place.\n\n"
        "weights: k float tensors (out_i, ...) on one device, viewed as (out_i, -1).\n"
        "us: k float32 (out_i,); vs: k float32 (numel_i / out_i,).\n"
        "Returns sigmas: float32 (k,) on the weights' device, sigma_i = u_i . (W_i v_i).\n"
        "float32 math whatever the weight dtype; no host sync.");
  // The Tensor overload first: pybind11 would also accept a 1-D tensor as a sequence of floats.
  m.def("clamp_", &clamp_, py::arg("weights"), py::arg("sigmas"), py::arg("targets"),
        "W_i <- W_i * min(1, targets_i / sigmas_i) in place; returns the float32 scales (k,).\n\n"
        "sigmas, targets: (k,) tensors. No host sync.");
  m.def("clamp_", &clamp_list_, py::arg("weights"), py::arg("sigmas"), py::arg("targets"),
        "Same, with targets a list of k floats.");
}
