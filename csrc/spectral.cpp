// Spectral-norm schedule kernels: the sigma estimate and the clamp over many weights in
// one call (module deqkern._C).
//
// ATen ops only, so the same code runs on CPU and CUDA tensors and no nvcc is needed.
// The gain over a Python loop is dispatch overhead: one call issues every weight's
// products from C++, and weights of one shape share every other op (batched).
//
// The math is written out in deqkern/spectral_reference.py, the pure-torch twin of this
// file: the same checks, messages and ATen ops in the same order, and the reference the
// tests compare with. In short, per weight W (viewed as the float32 matrix (rows, cols)):
// Golub-Kahan-Lanczos from the unit vector v, P = 2 n_iter + 1 products alternating W and
// W^T (fewer where the bases would not fit), each orthogonalized against the earlier
// vectors of its side; K = U^T W V from the first P - 1 coefficients; its top singular
// triplet (theta, s, t) gives the new vectors v = V s, u = U t, the lower bound
// ritz = theta <= sigma_1 and the upper estimate bound = theta + residual / sqrt(2).
// The clamp is W <- W * min(1, tau / sigma). Nothing is read back to the host except the
// values of CPU tensors, which are checked; on CUDA both calls only enqueue kernels.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
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
// Squarings of K^T K (trace-normalized every 4th); see GRAM_SQUARINGS in the twin.
constexpr int kGramSquarings = 24;
// float64 guard against 0/0 only.
constexpr double kTiny = 1e-300;

// ----------------------------------------------------------------------------- messages
// Spelled as Python prints them, so both backends raise the same text.
std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(type);
  }
}

std::string shape_name(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t d = 0; d < sizes.size(); ++d) {
    out += (d ? ", " : "") + std::to_string(sizes[d]);
  }
  return out + (sizes.size() == 1 ? ",)" : ")");
}

std::string number_name(double value) {  // Python's f"{value:.6g}"
  return std::isnan(value) ? "nan" : c10::str(value);
}

// ----------------------------------------------------------------------------- checks
at::Device check_weights(const std::vector<at::Tensor>& weights) {
  const at::Device device = weights[0].device();
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& weight = weights[i];
    DEQ_CHECK_TYPE(weight.is_floating_point(), "weights[", i, "] must be a floating-point tensor, got ",
                   dtype_name(weight.scalar_type()));
    DEQ_CHECK_VALUE(weight.dim() >= 2, "weights[", i, "] must have at least 2 dimensions, got shape ",
                    shape_name(weight.sizes()));
    DEQ_CHECK_VALUE(weight.numel() > 0, "weights[", i, "] must not be empty, got shape ", shape_name(weight.sizes()));
    DEQ_CHECK_VALUE(weight.device() == device, "weights[", i, "] is on ", weight.device().str(),
                    " but weights[0] is on ", device.str(), "; all weights of one call must share a device");
  }
  return device;
}

void check_length(size_t n_weights, size_t n_values, const char* what) {
  DEQ_CHECK_VALUE(n_values == n_weights, what, " has ", n_values, " entries, expected one per weight (",
                  n_weights, ")");
}

void check_vector(const at::Tensor& vec, const char* what, size_t i, int64_t length, const at::Device& device) {
  DEQ_CHECK_TYPE(vec.scalar_type() == at::kFloat, what, "[", i, "] must be float32, got ",
                 dtype_name(vec.scalar_type()));
  DEQ_CHECK_VALUE(vec.dim() == 1 && vec.size(0) == length, what, "[", i, "] must have shape (", length,
                  ",) to match weights[", i, "], got ", shape_name(vec.sizes()));
  DEQ_CHECK_VALUE(vec.device() == device, what, "[", i, "] is on ", vec.device().str(), " but weights[", i,
                  "] is on ", device.str());
  DEQ_CHECK_VALUE(vec.is_contiguous(), what, "[", i, "] must be contiguous (it is written in place)");
}

struct Span {
  uintptr_t start;
  size_t order;  // position in the argument list: ties in start are broken as in the twin
  uintptr_t end;
  std::string name;
  bool written;
};

Span span_of(const at::Tensor& tensor, std::string name, bool written, size_t order) {
  int64_t extent = 1;
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    extent += (tensor.size(d) - 1) * tensor.stride(d);
  }
  const auto start = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  return {start, order, start + static_cast<uintptr_t>(extent * tensor.element_size()), std::move(name), written};
}

// Raise if a written tensor shares memory (first to last element) with any other: a sweep
// in (start, order) order compares each span with the one reaching furthest so far.
void check_disjoint(std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) {
    return x.start != y.start ? x.start < y.start : x.order < y.order;
  });
  const Span* reach = nullptr;
  for (const Span& span : spans) {
    if (reach != nullptr && span.start < reach->end && (span.written || reach->written)) {
      const bool reach_first = reach->order < span.order;
      DEQ_CHECK_VALUE(false, (reach_first ? reach->name : span.name), " and ", (reach_first ? span.name : reach->name),
                      " overlap in memory; a tensor written in place must not share memory with any other argument");
    }
    if (reach == nullptr || span.end > reach->end) {
      reach = &span;
    }
  }
}

void check_values(const at::Tensor& tensor, const char* what, bool allow_zero) {
  const at::Tensor values = tensor.to(at::kDouble).contiguous();
  const double* data = values.data_ptr<double>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    const double value = data[i];
    DEQ_CHECK_VALUE(std::isfinite(value) && (allow_zero ? value >= 0 : value > 0), what, "[", i,
                    "] must be a finite number ", (allow_zero ? ">= 0" : "> 0"), ", got ", number_name(value));
  }
}

// ----------------------------------------------------------------------------- estimate
int64_t n_products(int64_t n_iter, int64_t rows, int64_t cols) {
  return std::min({2 * n_iter + 1, 2 * rows + 1, 2 * cols});
}

// Rows of x normalized; a row with zero or non-finite norm keeps fallback's.
at::Tensor unit_or(const at::Tensor& x, const at::Tensor& fallback) {
  const at::Tensor norm = at::linalg_vector_norm(x, 2, {1});
  const at::Tensor keep = at::isfinite(norm) & norm.gt(0);
  return at::where(keep.unsqueeze(1), x / norm.clamp_min(kNormalizeEps).unsqueeze(1), fallback);
}

// The weights of one matrix shape, estimated together (every op but the products batched).
struct Run {
  std::pair<int64_t, int64_t> shape;  // (rows, cols)
  std::vector<size_t> members;        // their indices in weights, g of them
  at::Tensor start;                   // (g, cols) start vectors
  int64_t products = 0;
  at::Tensor v_basis, u_basis;        // (g, b, cols), (g, a, rows): one basis vector per row
  at::Tensor k_matrix;                // (g, a, b) float64
  at::Tensor last_norm;               // (g,) the last product's norm
};

// Golub-Kahan for the weights run.members (one shape), from their vs.
void bidiagonalize(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& vs, int64_t n_iter,
                   Run& run) {
  const int64_t rows = run.shape.first, cols = run.shape.second;
  std::vector<at::Tensor> matrices, transposed, starts;
  for (size_t i : run.members) {
    matrices.push_back(weights[i].reshape({rows, cols}).to(at::kFloat));
    transposed.push_back(matrices.back().t());
    starts.push_back(vs[i]);
  }
  run.start = at::stack(starts);
  run.products = n_products(n_iter, rows, cols);
  const auto g = static_cast<int64_t>(run.members.size());
  const int64_t a = run.products / 2, b = (run.products + 1) / 2;
  const at::TensorOptions options = run.start.options();
  run.v_basis = at::zeros({g, b, cols}, options);
  run.u_basis = at::zeros({g, a, rows}, options);
  const at::Tensor coef = at::empty({g, run.products}, options);  // alpha_0, beta_0, alpha_1, ... in product order
  run.v_basis.select(1, 0).copy_(run.start);
  for (int64_t p = 0; p < run.products; ++p) {
    const int64_t j = p / 2;
    const bool forward = p % 2 == 0;
    const at::Tensor& basis = forward ? run.u_basis : run.v_basis;
    const int64_t slot = forward ? j : j + 1;
    at::Tensor out = at::empty({g, forward ? rows : cols}, options);
    const at::Tensor source = forward ? run.v_basis.select(1, j) : run.u_basis.select(1, j);
    for (int64_t i = 0; i < g; ++i) {
      at::Tensor row = out.select(0, i);
      at::mv_out(row, forward ? matrices[i] : transposed[i], source.select(0, i));
    }
    if (p > 0) {  // columns not filled yet are zero and remove nothing
      for (int pass = 0; pass < 2; ++pass) {
        const at::Tensor row = out.unsqueeze(1);  // (g, 1, n): row-vector products are the fast bmm layout
        out = at::baddbmm(row, at::bmm(row, basis.transpose(1, 2)), basis, 1, -1).squeeze(1);
      }
    }
    const at::Tensor norm = at::linalg_vector_norm(out, 2, {1});
    coef.select(1, p).copy_(norm);
    if (slot < basis.size(1)) {
      basis.select(1, slot).copy_(out / norm.clamp_min(kNormalizeEps).unsqueeze(1));
    }
  }
  run.k_matrix = at::zeros({g, a, b}, options.dtype(at::kDouble));
  run.k_matrix.diagonal(0, 1, 2).copy_(coef.slice(1, 0, 2 * a, 2));
  run.k_matrix.diagonal(1, 1, 2).copy_(coef.slice(1, 1, 2 * std::min(a, b - 1), 2));
  run.last_norm = coef.select(1, run.products - 1);
}

// Unit top eigenvectors of K^T K (k, b) for K (k, a, b) float64; e_1 where K is zero.
at::Tensor top_right_vectors(const at::Tensor& k_matrix) {
  at::Tensor gram = at::bmm(k_matrix.transpose(1, 2), k_matrix);
  for (int i = 0; i < kGramSquarings; ++i) {
    if (i % 4 == 0) {  // eigenvalues in [1/b, 1] after, >= b^-16 four squarings later
      gram = gram / gram.diagonal(0, 1, 2).sum(1).clamp_min(kTiny).unsqueeze(1).unsqueeze(2);
    }
    gram = at::bmm(gram, gram);
  }
  const at::Tensor column = gram.diagonal(0, 1, 2).argmax(1);
  const at::Tensor vec = at::gather(gram, 2, column.view({-1, 1, 1}).expand({-1, gram.size(1), 1})).squeeze(2);
  at::Tensor first = at::zeros_like(vec);
  first.select(1, 0).fill_(1.0);
  return unit_or(vec, first);
}

// Ritz value and bound (g,) each (float64) from K's top right vectors s (g, b); writes the
// Ritz vectors into the run's us and vs.
std::pair<at::Tensor, at::Tensor> finish(const Run& run, const at::Tensor& s, const std::vector<at::Tensor>& us,
                                         const std::vector<at::Tensor>& vs) {
  const int64_t a = run.k_matrix.size(1), b = run.k_matrix.size(2);
  const at::Tensor ks = at::bmm(run.k_matrix, s.unsqueeze(2)).squeeze(2);
  const at::Tensor theta = at::linalg_vector_norm(ks, 2, {1});
  const at::Tensor t = ks / theta.clamp_min(kTiny).unsqueeze(1);
  const at::Tensor inner = at::linalg_vector_norm(
      at::bmm(run.k_matrix.transpose(1, 2), t.unsqueeze(2)).squeeze(2) - theta.unsqueeze(1) * s, 2, {1});
  const at::Tensor last = run.products % 2 ? s.select(1, b - 1) : t.select(1, a - 1);
  const at::Tensor margin = at::sqrt((inner.square() + (run.last_norm.to(at::kDouble) * last).square()) / 2);
  const at::Tensor new_v = unit_or(at::bmm(s.to(at::kFloat).unsqueeze(1), run.v_basis).squeeze(1), run.start);
  std::vector<at::Tensor> group_us, group_vs;
  for (size_t i : run.members) {
    group_us.push_back(us[i]);
    group_vs.push_back(vs[i]);
  }
  const at::Tensor new_u = unit_or(at::bmm(t.to(at::kFloat).unsqueeze(1), run.u_basis).squeeze(1), at::stack(group_us));
  at::_foreach_copy_(group_vs, new_v.unbind(0));
  at::_foreach_copy_(group_us, new_u.unbind(0));
  return {theta, theta + margin};
}

// weights: k float tensors (out_i, ...) on one device; us: k float32 (out_i,);
// vs: k float32 (numel_i / out_i,) unit start vectors. Overwrites us and vs with the Ritz
// vectors; returns (ritz, bound), float32 (k,) each.
std::tuple<at::Tensor, at::Tensor> lanczos_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                                            const std::vector<at::Tensor>& vs, int64_t n_iter) {
  check_length(weights.size(), us.size(), "us");
  check_length(weights.size(), vs.size(), "vs");
  DEQ_CHECK_VALUE(n_iter >= 1, "n_iter must be >= 1, got ", n_iter);
  if (weights.empty()) {
    return {at::empty({0}, at::kFloat), at::empty({0}, at::kFloat)};
  }
  const at::Device device = check_weights(weights);
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t rows = weights[i].size(0);
    check_vector(us[i], "us", i, rows, device);
    check_vector(vs[i], "vs", i, weights[i].numel() / rows, device);
  }
  std::vector<Span> spans;
  const size_t k = weights.size();
  for (size_t i = 0; i < k; ++i) spans.push_back(span_of(weights[i], "weights[" + std::to_string(i) + "]", false, i));
  for (size_t i = 0; i < k; ++i) spans.push_back(span_of(us[i], "us[" + std::to_string(i) + "]", true, k + i));
  for (size_t i = 0; i < k; ++i) spans.push_back(span_of(vs[i], "vs[" + std::to_string(i) + "]", true, 2 * k + i));
  check_disjoint(std::move(spans));

  at::NoGradGuard no_grad;
  std::vector<Run> runs;  // one per matrix shape, in order of first appearance
  for (size_t i = 0; i < k; ++i) {
    const std::pair<int64_t, int64_t> shape{weights[i].size(0), weights[i].numel() / weights[i].size(0)};
    auto found = std::find_if(runs.begin(), runs.end(), [&](const Run& run) { return run.shape == shape; });
    if (found == runs.end()) {
      runs.push_back(Run{shape});
      found = std::prev(runs.end());
    }
    found->members.push_back(i);
  }
  int64_t a_max = 0, b_max = 0;
  for (Run& run : runs) {
    bidiagonalize(weights, vs, n_iter, run);
    a_max = std::max(a_max, run.k_matrix.size(1));
    b_max = std::max(b_max, run.k_matrix.size(2));
  }
  std::vector<at::Tensor> padded;
  for (const Run& run : runs) {
    padded.push_back(
        at::constant_pad_nd(run.k_matrix, {0, b_max - run.k_matrix.size(2), 0, a_max - run.k_matrix.size(1)}, 0));
  }
  const at::Tensor right = top_right_vectors(at::cat(padded));
  std::vector<at::Tensor> ritz(k), bound(k);
  int64_t offset = 0;
  for (const Run& run : runs) {
    const int64_t g = run.k_matrix.size(0);
    const auto [theta, upper] = finish(run, right.narrow(0, offset, g).narrow(1, 0, run.k_matrix.size(2)), us, vs);
    offset += g;
    for (int64_t row = 0; row < g; ++row) {
      ritz[run.members[row]] = theta.select(0, row);
      bound[run.members[row]] = upper.select(0, row);
    }
  }
  return {at::stack(ritz).to(at::kFloat), at::stack(bound).to(at::kFloat)};
}

// ----------------------------------------------------------------------------- clamp
// weights: k tensors on one device, pairwise disjoint; sigmas, targets: (k,) floating.
// W_i <- W_i * min(1, targets_i / sigmas_i) in place; returns the float32 scales (k,),
// NaN where a bad value on the device left the weight untouched.
at::Tensor clamp_(const std::vector<at::Tensor>& weights, const at::Tensor& sigmas, const at::Tensor& targets) {
  const auto k = static_cast<int64_t>(weights.size());
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor&>{"sigmas", sigmas},
                                     std::pair<const char*, const at::Tensor&>{"targets", targets}}) {
    DEQ_CHECK_VALUE(tensor.dim() == 1 && tensor.size(0) == k, name, " must have shape (", k,
                    ",), one per weight, got ", shape_name(tensor.sizes()));
    DEQ_CHECK_TYPE(tensor.is_floating_point(), name, " must be a floating-point tensor, got ",
                   dtype_name(tensor.scalar_type()));
  }
  if (weights.empty()) {
    return at::empty({0}, at::kFloat);
  }
  const at::Device device = check_weights(weights);
  std::vector<Span> spans;
  for (size_t i = 0; i < weights.size(); ++i) {
    spans.push_back(span_of(weights[i], "weights[" + std::to_string(i) + "]", true, i));
  }
  check_disjoint(std::move(spans));
  if (sigmas.device().is_cpu()) check_values(sigmas, "sigmas", true);
  if (targets.device().is_cpu()) check_values(targets, "targets", false);

  at::NoGradGuard no_grad;
  const at::Tensor sig = sigmas.to(device, at::kFloat, /*non_blocking=*/true);
  const at::Tensor tau = targets.to(device, at::kFloat, /*non_blocking=*/true);
  const at::Tensor valid = at::isfinite(sig) & sig.ge(0) & at::isfinite(tau) & tau.gt(0);
  const at::Tensor scales = at::where(valid, (tau / sig).clamp_max(1.0), NAN);
  const at::Tensor applied = scales.nan_to_num(1.0);
  for (int64_t i = 0; i < k; ++i) {
    at::Tensor weight = weights[i];
    const at::Tensor scale = applied.select(0, i);
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
  // Host floats -> a small CPU float32 tensor (checked, then copied with non_blocking=true).
  const at::Tensor target_tensor =
      at::tensor(targets, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
  return clamp_(weights, sigmas, target_tensor);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deqkern C++ extension: spectral-norm estimate and clamp over many weights "
            "(math: deqkern/spectral_reference.py).";
  m.def("lanczos_", &lanczos_, py::arg("weights"), py::arg("us"), py::arg("vs"), py::arg("n_iter"),
        "Spectral-norm estimate per weight: Golub-Kahan-Lanczos from vs, 2 n_iter + 1 products.\n\n"
        "weights: k float tensors (out_i, ...) on one device, viewed as (out_i, -1), read only.\n"
        "us: k float32 (out_i,); vs: k float32 (numel_i / out_i,) unit start vectors; both are\n"
        "overwritten with the Ritz vectors and must not share memory with anything else.\n"
        "n_iter >= 1. Returns (ritz, bound): float32 (k,) each; ritz <= sigma_1 and bound the\n"
        "upper estimate (ritz + residual / sqrt(2)). No host sync.");
  // The Tensor overload first: pybind11 would also accept a 1-D tensor as a sequence of floats.
  m.def("clamp_", &clamp_, py::arg("weights"), py::arg("sigmas"), py::arg("targets"),
        "W_i <- W_i * min(1, targets_i / sigmas_i) in place; returns the float32 scales (k,).\n\n"
        "sigmas (finite, >= 0), targets (finite, > 0): (k,) floating tensors. Values of CPU\n"
        "tensors are checked (ValueError). Values on a GPU are not read back: a weight whose\n"
        "sigma or target is bad there is left untouched and its scale is NaN. Weights must not\n"
        "share memory. No host sync.");
  m.def("clamp_", &clamp_list_, py::arg("weights"), py::arg("sigmas"), py::arg("targets"),
        "Same, with targets a list of k floats (checked).");
}
