// DataCentricMoe.hpp: an MoE layer in the data-centric mode (DESIGN.md
// section 3): tokens stay on their rank; the layer's full expert weights are
// gathered from the group's hidden slices into the pipeline-shared cache, the
// layer runs locally on the full weights (MoeLayer on the cache's views), and
// the full weight gradient is reduce-scattered back to the slices.
//
// Parameters: the W1/b1/W2 slices (sharded: offset/count into the global
// tensors, expert = true), and the router and b2, replicated (the trainer sums
// their gradients over the ranks). Outputs and input gradients are those of
// the single-process layer on the same tokens (bit-identical: each token's
// arithmetic is unchanged); weight gradients are sums over the ranks' tokens
// in another association order (float rounding).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/MoeLayer.hpp"
#include "core/model/MoeFfn.hpp"
#include "parallel/PipelineSharedCache.hpp"
#include "parallel/SimulatedSlowdown.hpp"

namespace hexamoe::parallel {

template <class ExecutionSpace>
class DataCentricMoe final : public MoeFfn<ExecutionSpace> {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using cache_type = PipelineSharedCache<memory_space>;

  // cfg is the whole layer (hidden_offset 0, all of H); slice says which
  // hidden units this rank keeps. Registers the layer with the cache, so
  // layers must be built in forward order.
  DataCentricMoe(MoeLayerConfig cfg, ExpertSlice slice, std::shared_ptr<cache_type> cache,
                 SimulatedSlowdown slowdown = {})
      : layer_(whole(cfg)), slice_(std::move(slice)), cache_(std::move(cache)), slowdown_(slowdown) {
    auto const &c = layer_.config();
    int const me = cache_->group().rank();
    h0_ = slice_.offset(me);
    hl_ = slice_.count(me);
    // The expert tensors of the whole layer come from the cache: release the
    // ones the layer allocated.
    layer_.w1 = {};
    layer_.b1 = {};
    layer_.w2 = {};
    layer_.w1_grad = {};
    layer_.b1_grad = {};
    layer_.w2_grad = {};
    std::size_t const n = cache_type::slice_size(c.experts, c.dim, hl_);
    values_ = Kokkos::View<float *, memory_space>("hexamoe::moe.slice", n);
    grads_ = Kokkos::View<float *, memory_space>("hexamoe::moe.slice_grad", n);
    std::size_t const E = c.experts, d = c.dim, h = hl_;
    float *v = values_.data(), *g = grads_.data();
    w1_ = Tensor3<float, memory_space>(v, E, d, h);
    b1_ = Matrix<float, memory_space>(v + E * d * h, E, h);
    w2_ = Tensor3<float, memory_space>(v + E * d * h + E * h, E, h, d);
    w1_grad_ = Tensor3<float, memory_space>(g, E, d, h);
    b1_grad_ = Matrix<float, memory_space>(g + E * d * h, E, h);
    w2_grad_ = Tensor3<float, memory_space>(g + E * d * h + E * h, E, h, d);
    id_ = cache_->add_layer(c.experts, c.dim, slice_, values_, grads_);
  }

  void forward(ExecutionSpace const &space, Matrix<float const, memory_space> x,
               Matrix<float, memory_space> y) override {
    compat::ScopedRegion region("hexamoe::DataCentricMoe::forward");
    point_at(cache_->acquire(id_, Pass::forward));
    tokens_ = static_cast<int>(x.extent(0));
    slowdown_.begin(space);
    if (tokens_ > 0) layer_.forward(space, x, y);
    slowdown_.end(space);
    cache_->drive();  // the next layer's gather travels while this layer's kernels run
  }

  void backward(ExecutionSpace const &space, Matrix<float const, memory_space> dy,
                Matrix<float, memory_space> dx) override {
    compat::ScopedRegion region("hexamoe::DataCentricMoe::backward");
    point_at(cache_->acquire(id_, Pass::backward));
    auto g = cache_->gradient_buffer(id_);
    layer_.w1_grad = g.w1;
    layer_.b1_grad = g.b1;
    layer_.w2_grad = g.w2;
    slowdown_.begin(space);
    if (tokens_ > 0) {
      layer_.backward(space, dy, dx);
    } else {  // no tokens here: this rank contributes zero gradients
      Kokkos::deep_copy(space, g.w1, 0.0f);
      Kokkos::deep_copy(space, g.b1, 0.0f);
      Kokkos::deep_copy(space, g.w2, 0.0f);
      Kokkos::deep_copy(space, layer_.b2_grad, 0.0f);
      Kokkos::deep_copy(space, layer_.router.weight_grad, 0.0f);
      Kokkos::deep_copy(space, layer_.router.bias_grad, 0.0f);
    }
    slowdown_.end(space);
    cache_->drive();  // the previous reduction and the next gather travel while the kernels run
    cache_->reduce_gradients(space, id_);
    if (id_ == 0) cache_->finish_reduction();  // last in backward: slice gradients final
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) override {
    auto const &c = layer_.config();
    std::size_t const E = c.experts, d = c.dim, H = c.hidden, h0 = h0_, hl = hl_;
    using S = std::vector<std::size_t>;
    std::vector<Parameter<memory_space>> p;
    p.push_back({prefix + ".router.weight",
                 S{d, E},
                 flat(layer_.router.weight),
                 flat(layer_.router.weight_grad),
                 true,
                 false,
                 {},
                 {}});
    p.push_back(
        {prefix + ".router.bias", S{E}, flat(layer_.router.bias), flat(layer_.router.bias_grad), false, false, {}, {}});
    p.push_back({prefix + ".w1", S{E, d, H}, flat(w1_), flat(w1_grad_), true, true, S{0, 0, h0}, S{E, d, hl}});
    p.push_back({prefix + ".b1", S{E, H}, flat(b1_), flat(b1_grad_), false, true, S{0, h0}, S{E, hl}});
    p.push_back({prefix + ".w2", S{E, H, d}, flat(w2_), flat(w2_grad_), true, true, S{0, h0, 0}, S{E, hl, d}});
    p.push_back({prefix + ".b2", S{E, d}, flat(layer_.b2), flat(layer_.b2_grad), false, false, {}, {}});
    return p;
  }

  std::pair<double, double> losses() const override {
    return tokens_ > 0 ? layer_.router_losses() : std::pair<double, double>{0, 0};
  }
  std::vector<int> expert_counts() const override {
    return tokens_ > 0 ? layer_.routing_index().counts_host()
                       : std::vector<int>(std::size_t(layer_.config().experts), 0);
  }

  // The same values as MoeLayer::init of the whole layer, this rank's slice kept.
  void init(std::uint64_t seed) override {
    MoeLayerConfig c = layer_.config();
    c.hidden_offset = h0_;
    c.hidden_local = hl_;
    MoeLayer<float, ExecutionSpace> part(c);
    part.init(seed);
    Kokkos::deep_copy(w1_, part.w1);
    Kokkos::deep_copy(b1_, part.b1);
    Kokkos::deep_copy(w2_, part.w2);
    Kokkos::deep_copy(layer_.b2, part.b2);
    Kokkos::deep_copy(layer_.router.weight, part.router.weight);
    Kokkos::deep_copy(layer_.router.bias, part.router.bias);
  }

  // This rank's hidden range and the layer's cache id (tests, plans).
  int hidden_offset() const { return h0_; }
  int hidden_local() const { return hl_; }
  MoeLayer<float, ExecutionSpace> &layer() { return layer_; }

 private:
  static MoeLayerConfig whole(MoeLayerConfig c) {
    c.hidden_offset = 0;
    c.hidden_local = -1;
    return c;
  }
  void point_at(typename cache_type::Experts const &w) {
    layer_.w1 = w.w1;
    layer_.b1 = w.b1;
    layer_.w2 = w.w2;
  }

  MoeLayer<float, ExecutionSpace> layer_;
  ExpertSlice slice_;
  std::shared_ptr<cache_type> cache_;
  SimulatedSlowdown slowdown_;
  int id_ = -1, h0_ = 0, hl_ = 0, tokens_ = 0;
  Kokkos::View<float *, memory_space> values_, grads_;
  Tensor3<float, memory_space> w1_, w2_, w1_grad_, w2_grad_;
  Matrix<float, memory_space> b1_, b1_grad_;
};

}  // namespace hexamoe::parallel
