// MoeFfn.hpp: what a transformer block needs from its MoE feed-forward layer.
// The model calls only this interface, so it does not know whether the experts
// run locally (LocalMoeFfn) or spread over an MPI group in data-centric or
// model-centric mode (parallel/).
#pragma once

#include "core/MoeLayer.hpp"
#include "core/Parameter.hpp"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace hexamoe {

template <class ExecutionSpace>
class MoeFfn {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  virtual ~MoeFfn() = default;
  // y [N, d] = MoE(x [N, d]); x must stay unchanged until backward.
  virtual void forward(ExecutionSpace const &space, Matrix<float const, memory_space> x,
                       Matrix<float, memory_space> y) = 0;
  // dx [N, d] from dy [N, d]; overwrites the layer's gradients.
  virtual void backward(ExecutionSpace const &space, Matrix<float const, memory_space> dy,
                        Matrix<float, memory_space> dx) = 0;
  // Trainable tensors; expert tensors carry expert = true.
  virtual std::vector<Parameter<memory_space>> parameters(std::string const &prefix) = 0;
  // Auxiliary balance loss and router z-loss of the last forward.
  virtual std::pair<double, double> losses() const = 0;
  // Assignments per expert in the last forward (this rank's tokens).
  virtual std::vector<int> expert_counts() const = 0;
  virtual void init(std::uint64_t seed) = 0;
};

// All experts on this process.
template <class ExecutionSpace>
class LocalMoeFfn final : public MoeFfn<ExecutionSpace> {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  explicit LocalMoeFfn(MoeLayerConfig const &cfg) : layer_(cfg) {}
  void forward(ExecutionSpace const &space, Matrix<float const, memory_space> x, Matrix<float, memory_space> y) override {
    layer_.forward(space, x, y);
  }
  void backward(ExecutionSpace const &space, Matrix<float const, memory_space> dy, Matrix<float, memory_space> dx) override {
    layer_.backward(space, dy, dx);
  }
  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) override { return layer_.parameters(prefix); }
  std::pair<double, double> losses() const override { return layer_.router_losses(); }
  std::vector<int> expert_counts() const override { return layer_.routing_index().counts_host(); }
  void init(std::uint64_t seed) override { layer_.init(seed); }
  MoeLayer<float, ExecutionSpace> &layer() { return layer_; }

 private:
  MoeLayer<float, ExecutionSpace> layer_;
};

}  // namespace hexamoe

namespace hexamoe {

// All experts on this process with bfloat16 storage: expert weights and
// activations are kept and computed in bf16 (float32 accumulation); the
// optimiser updates float32 master weights, cast to bf16 before each forward.
// The router stays float32 (its softmax and top-k in float32, DESIGN.md).
template <class ExecutionSpace>
class LocalMoeFfnBf16 final : public MoeFfn<ExecutionSpace> {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using Layer = MoeLayer<bfloat16, ExecutionSpace>;

  explicit LocalMoeFfnBf16(MoeLayerConfig const &cfg) : layer_(cfg) {
    int const E = cfg.experts, d = cfg.dim, H = cfg.local_hidden();
    w1_ = Tensor3<float, memory_space>("hexamoe::moe.w1_master", E, d, H);
    b1_ = Matrix<float, memory_space>("hexamoe::moe.b1_master", E, H);
    w2_ = Tensor3<float, memory_space>("hexamoe::moe.w2_master", E, H, d);
    b2_ = Matrix<float, memory_space>("hexamoe::moe.b2_master", E, d);
  }

  void init(std::uint64_t seed) override {
    layer_.init(seed);
    ExecutionSpace space;
    to_float(space, layer_.w1.data(), w1_.data(), w1_.span());
    to_float(space, layer_.b1.data(), b1_.data(), b1_.span());
    to_float(space, layer_.w2.data(), w2_.data(), w2_.span());
    to_float(space, layer_.b2.data(), b2_.data(), b2_.span());
  }

  void forward(ExecutionSpace const &space, Matrix<float const, memory_space> x, Matrix<float, memory_space> y) override {
    to_bf16(space, w1_.data(), layer_.w1.data(), w1_.span());
    to_bf16(space, b1_.data(), layer_.b1.data(), b1_.span());
    to_bf16(space, w2_.data(), layer_.w2.data(), w2_.span());
    to_bf16(space, b2_.data(), layer_.b2.data(), b2_.span());
    resize(space, x.extent(0), x.extent(1));
    to_bf16(space, x.data(), xb_.data(), x.span());
    layer_.forward(space, xb_, yb_);
    to_float(space, yb_.data(), y.data(), y.span());
  }

  void backward(ExecutionSpace const &space, Matrix<float const, memory_space> dy, Matrix<float, memory_space> dx) override {
    to_bf16(space, dy.data(), dyb_.data(), dy.span());
    layer_.backward(space, dyb_, dxb_);
    to_float(space, dxb_.data(), dx.data(), dx.span());
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) override {
    int const E = layer_.config().experts, d = layer_.config().dim, H = layer_.config().hidden;
    using S = std::vector<std::size_t>;
    auto &r = layer_.router;
    return {
        {prefix + ".router.weight", S{std::size_t(d), std::size_t(E)}, flat(r.weight), flat(r.weight_grad), true, false, {}, {}},
        {prefix + ".router.bias", S{std::size_t(E)}, flat(r.bias), flat(r.bias_grad), false, false, {}, {}},
        {prefix + ".w1", S{std::size_t(E), std::size_t(d), std::size_t(H)}, flat(w1_), flat(layer_.w1_grad), true, true, {}, {}},
        {prefix + ".b1", S{std::size_t(E), std::size_t(H)}, flat(b1_), flat(layer_.b1_grad), false, true, {}, {}},
        {prefix + ".w2", S{std::size_t(E), std::size_t(H), std::size_t(d)}, flat(w2_), flat(layer_.w2_grad), true, true, {}, {}},
        {prefix + ".b2", S{std::size_t(E), std::size_t(d)}, flat(b2_), flat(layer_.b2_grad), false, false, {}, {}},
    };
  }
  std::pair<double, double> losses() const override { return layer_.router_losses(); }
  std::vector<int> expert_counts() const override { return layer_.routing_index().counts_host(); }

  static void to_bf16(ExecutionSpace const &space, float const *src, bfloat16 *dst, std::size_t n) {
    for_each_index(space, "hexamoe::to_bf16", n, KOKKOS_LAMBDA(std::size_t i) { dst[i] = bfloat16(src[i]); });
  }
  static void to_float(ExecutionSpace const &space, bfloat16 const *src, float *dst, std::size_t n) {
    for_each_index(space, "hexamoe::to_float", n,
                   KOKKOS_LAMBDA(std::size_t i) { dst[i] = static_cast<float>(src[i]); });
  }

 private:
  void resize(ExecutionSpace const &space, std::size_t n, std::size_t d) {
    if (xb_.extent(0) == n) return;
    auto alloc = [&](char const *label) {
      return Matrix<bfloat16, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, std::string(label)), n, d);
    };
    xb_ = alloc("hexamoe::moe.x_bf16");
    yb_ = alloc("hexamoe::moe.y_bf16");
    dyb_ = alloc("hexamoe::moe.dy_bf16");
    dxb_ = alloc("hexamoe::moe.dx_bf16");
  }

  Layer layer_;
  Tensor3<float, memory_space> w1_, w2_;
  Matrix<float, memory_space> b1_, b2_;
  Matrix<bfloat16, memory_space> xb_, yb_, dyb_, dxb_;
};

}  // namespace hexamoe
