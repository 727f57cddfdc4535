// LayerNorm.hpp: per-row layer normalisation of a [N, D] matrix,
//   y = (x - mean) / sqrt(var + eps) * gamma + beta   (biased variance),
// with gamma ("weight") and beta ("bias") of extent D, as torch.nn.LayerNorm.
//
// forward saves a view of x and the per-row mean and 1/sqrt(var + eps).
// backward overwrites dgamma, dbeta (column sums in row order) and writes dx;
// dx may alias dy.
#pragma once

#include "core/nn/Module.hpp"

namespace hexamoe {
namespace nn {

template <class ExecutionSpace, class Scalar = float>
class LayerNorm {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;
  using vector = Vector<Scalar, memory_space>;

  vector weight, weight_grad;  // gamma [D]
  vector bias, bias_grad;      // beta [D]

  LayerNorm() = default;
  // eps: 1e-5 is PyTorch's default, 1e-6 timm's ViT.
  LayerNorm(ExecutionSpace const &space, int dim, double eps = 1e-5) : dim_(dim), eps_(eps) {
    detail::require(dim > 0, "LayerNorm", "dim must be positive (got " + std::to_string(dim) + ")");
    detail::require(eps > 0, "LayerNorm", "eps must be positive");
    weight = vector(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::LayerNorm::weight"), dim);
    bias = vector(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::LayerNorm::bias"), dim);
    weight_grad = vector(Kokkos::view_alloc(space, "hexamoe::nn::LayerNorm::weight_grad"), dim);
    bias_grad = vector(Kokkos::view_alloc(space, "hexamoe::nn::LayerNorm::bias_grad"), dim);
    init(0);
  }

  int dim() const { return dim_; }
  double eps() const { return eps_; }

  // gamma = 1, beta = 0 (the seed is not used).
  void init(std::uint64_t) {
    detail::fill_constant(weight, 1.0);
    detail::fill_constant(bias, 0.0);
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) const {
    detail::require_float_parameters<Scalar>();
    return {detail::parameter(prefix + ".weight", weight, weight_grad, false),
            detail::parameter(prefix + ".bias", bias, bias_grad, false)};
  }

  // y [N, D] = LayerNorm(x [N, D]). Saves x, mean, rstd.
  void forward(ExecutionSpace const &space, const_matrix x, matrix y) {
    compat::ScopedRegion region("hexamoe::nn::LayerNorm::forward");
    std::size_t const n = x.extent(0);
    detail::require_extents(x, {n, std::size_t(dim_)}, "LayerNorm::forward", "x");
    detail::require_extents(y, {n, std::size_t(dim_)}, "LayerNorm::forward", "y");
    detail::ensure(space, mean_, "hexamoe::nn::LayerNorm::mean", n);
    detail::ensure(space, rstd_, "hexamoe::nn::LayerNorm::rstd", n);
    x_ = x;
    forwarded_ = true;
    int const D = dim_;
    Scalar const eps = static_cast<Scalar>(eps_);
    auto gamma = weight, beta = bias, mean = mean_, rstd = rstd_;
    // One thread per row, two passes (mean, then centred variance).
    Kokkos::parallel_for(
        "hexamoe::nn::LayerNorm::forward", Kokkos::RangePolicy<ExecutionSpace>(space, 0, int(n)),
        KOKKOS_LAMBDA(int r) {
          Scalar s = 0;
          for (int c = 0; c < D; ++c) s += x(r, c);
          Scalar const mu = s / Scalar(D);
          Scalar v = 0;
          for (int c = 0; c < D; ++c) {
            Scalar const d = x(r, c) - mu;
            v += d * d;
          }
          Scalar const rs = Scalar(1) / compat::sqrt(v / Scalar(D) + eps);
          mean(r) = mu;
          rstd(r) = rs;
          for (int c = 0; c < D; ++c) y(r, c) = (x(r, c) - mu) * rs * gamma(c) + beta(c);
        });
  }

  // dy [N, D] -> dgamma, dbeta (overwritten), dx [N, D].
  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) {
    compat::ScopedRegion region("hexamoe::nn::LayerNorm::backward");
    detail::require(forwarded_, "LayerNorm::backward", "called before forward");
    std::size_t const n = x_.extent(0);
    detail::require_extents(dy, {n, std::size_t(dim_)}, "LayerNorm::backward", "dy");
    detail::require_extents(dx, {n, std::size_t(dim_)}, "LayerNorm::backward", "dx");
    int const D = dim_, N = static_cast<int>(n);
    auto x = x_;
    auto gamma = weight, dgamma = weight_grad, dbeta = bias_grad;
    auto mean = mean_, rstd = rstd_;
    // dgamma[c] = sum_r dy xhat, dbeta[c] = sum_r dy, in row order per column
    // (before dx is written: dx may alias dy).
    constexpr int chunk = detail::on_host<ExecutionSpace> ? 64 : 1;
    int const chunks = (D + chunk - 1) / chunk;
    Kokkos::parallel_for(
        "hexamoe::nn::LayerNorm::backward_params", Kokkos::RangePolicy<ExecutionSpace>(space, 0, chunks),
        KOKKOS_LAMBDA(int ch) {
          int const c0 = ch * chunk;
          int const nc = D - c0 < chunk ? D - c0 : chunk;
          Scalar g[chunk], b[chunk];
          for (int c = 0; c < nc; ++c) g[c] = b[c] = Scalar(0);
          for (int r = 0; r < N; ++r) {
            Scalar const mu = mean(r), rs = rstd(r);
            for (int c = 0; c < nc; ++c) {
              Scalar const d = dy(r, c0 + c);
              g[c] += d * ((x(r, c0 + c) - mu) * rs);
              b[c] += d;
            }
          }
          for (int c = 0; c < nc; ++c) {
            dgamma(c0 + c) = g[c];
            dbeta(c0 + c) = b[c];
          }
        });
    // dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma.
    Kokkos::parallel_for(
        "hexamoe::nn::LayerNorm::backward_input", Kokkos::RangePolicy<ExecutionSpace>(space, 0, N),
        KOKKOS_LAMBDA(int r) {
          Scalar const mu = mean(r), rs = rstd(r);
          Scalar sg = 0, sgx = 0;
          for (int c = 0; c < D; ++c) {
            Scalar const g = dy(r, c) * gamma(c);
            sg += g;
            sgx += g * ((x(r, c) - mu) * rs);
          }
          Scalar const a = sg / Scalar(D), b = sgx / Scalar(D);
          for (int c = 0; c < D; ++c) dx(r, c) = rs * (dy(r, c) * gamma(c) - a - (x(r, c) - mu) * rs * b);
        });
  }

 private:
  int dim_ = 0;
  double eps_ = 1e-5;
  const_matrix x_;
  vector mean_, rstd_;
  bool forwarded_ = false;
};

}  // namespace nn
}  // namespace hexamoe
