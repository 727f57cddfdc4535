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
