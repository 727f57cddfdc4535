// Linear.hpp: the affine map y = x W + b over rows, W [in, out] (row-major,
// so that y = x W is one GEMM without a transposed copy), b [out] optional.
//
// forward saves a view of x (not a copy): x must stay unchanged until backward.
// backward overwrites dW = x^T dy and db = column sums of dy, and writes
// dx = dy W^T when dx is not empty.
#pragma once

#include "core/nn/DenseGemm.hpp"

namespace hexamoe {
namespace nn {

template <class ExecutionSpace, class Scalar = float>
class Linear {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;
  using vector = Vector<Scalar, memory_space>;

  matrix weight, weight_grad;  // [in, out]
  vector bias, bias_grad;      // [out]; empty without bias

  Linear() = default;
  Linear(ExecutionSpace const &space, int in_features, int out_features, bool with_bias = true)
      : in_(in_features), out_(out_features) {
    detail::require(in_features > 0 && out_features > 0, "Linear",
                    "features must be positive (in " + std::to_string(in_features) + ", out " +
                        std::to_string(out_features) + ")");
    weight = matrix(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::Linear::weight"), in_, out_);
    weight_grad = matrix(Kokkos::view_alloc(space, "hexamoe::nn::Linear::weight_grad"), in_, out_);
    if (with_bias) {
      bias = vector(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::Linear::bias"), out_);
      bias_grad = vector(Kokkos::view_alloc(space, "hexamoe::nn::Linear::bias_grad"), out_);
    }
    init(0);
  }

  int in_features() const { return in_; }
  int out_features() const { return out_; }
  bool has_bias() const { return bias.data() != nullptr; }

  // timm's ViT: W ~ truncated normal (std 0.02), b = 0.
  void init(std::uint64_t seed, double std_dev = 0.02) {
    detail::fill_from_host(weight, detail::truncated_normal(weight.span(), std_dev, seed));
    if (has_bias()) detail::fill_constant(bias, 0.0);
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) const {
    detail::require_float_parameters<Scalar>();
    std::vector<Parameter<memory_space>> p;
    p.push_back(detail::parameter(prefix + ".weight", weight, weight_grad, true));
    if (has_bias()) p.push_back(detail::parameter(prefix + ".bias", bias, bias_grad, false));
    return p;
  }

  // y [N, out] = x [N, in] W + b. Saves x.
  void forward(ExecutionSpace const &space, const_matrix x, matrix y) {
    compat::ScopedRegion region("hexamoe::nn::Linear::forward");
    std::size_t const n = x.extent(0);
    detail::require_extents(x, {n, std::size_t(in_)}, "Linear::forward", "x");
    detail::require_extents(y, {n, std::size_t(out_)}, "Linear::forward", "y");
    x_ = x;
    forwarded_ = true;
    apply(space, x, y);
  }

  // The same map without saving anything (evaluation).
  void apply(ExecutionSpace const &space, const_matrix x, matrix y) const {
    std::size_t const n = x.extent(0);
    detail::require_extents(x, {n, std::size_t(in_)}, "Linear::apply", "x");
    detail::require_extents(y, {n, std::size_t(out_)}, "Linear::apply", "y");
    Scalar beta = 0;
    if (has_bias()) {  // y = b, then y += x W
      detail::broadcast_rows(space, Vector<Scalar const, memory_space>(bias), y);
      beta = 1;
    }
    dense_gemm(space, x, const_matrix(weight), y, Scalar(1), beta);
  }

  // dy [N, out] -> dW, db (overwritten), dx [N, in] (skipped when empty).
  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) {
    compat::ScopedRegion region("hexamoe::nn::Linear::backward");
    detail::require(forwarded_, "Linear::backward", "called before forward");
    std::size_t const n = x_.extent(0);
    detail::require_extents(dy, {n, std::size_t(out_)}, "Linear::backward", "dy");
    if (dx.data() != nullptr) detail::require_extents(dx, {n, std::size_t(in_)}, "Linear::backward", "dx");
    dense_gemm(space, x_, dy, weight_grad, Scalar(1), Scalar(0), true, false);
    if (has_bias()) detail::column_sum(space, dy, bias_grad);
    if (dx.data() != nullptr) dense_gemm(space, dy, const_matrix(weight), dx, Scalar(1), Scalar(0), false, true);
  }

  const_matrix saved_input() const { return x_; }

 private:
  int in_ = 0, out_ = 0;
  const_matrix x_;
  bool forwarded_ = false;
};

}  // namespace nn
}  // namespace hexamoe
