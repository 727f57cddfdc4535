// CrossEntropy.hpp: softmax cross-entropy of logits [B, classes] against
// integer labels [B], averaged over the batch, with the number of correct
// top-1 predictions, and dlogits = (softmax - onehot) * scale / B.
//
// forward saves the probabilities [B, classes] and a view of the labels. The
// loss is accumulated in float64: per row on the device, then summed in row
// order on the host (deterministic). A label outside [0, classes) throws.
#pragma once

#include "core/nn/Module.hpp"

namespace hexamoe {
namespace nn {

struct CrossEntropyResult {
  double loss = 0.0;  // mean over the batch
  int correct = 0;    // rows whose argmax (first maximum) is the label
  int count = 0;      // rows
};

template <class ExecutionSpace, class Scalar = float>
class CrossEntropy {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;
  using labels_view = Kokkos::View<int const *, memory_space>;

  CrossEntropy() = default;
  explicit CrossEntropy(ExecutionSpace const &) {}

  void init(std::uint64_t) {}
  std::vector<Parameter<memory_space>> parameters(std::string const &) const { return {}; }

  CrossEntropyResult forward(ExecutionSpace const &space, const_matrix logits, labels_view labels) {
    compat::ScopedRegion region("hexamoe::nn::CrossEntropy::forward");
    std::size_t const B = logits.extent(0), C = logits.extent(1);
    detail::require(C > 0, "CrossEntropy::forward", "logits have no classes");
    detail::require_extents(labels, {B}, "CrossEntropy::forward", "labels");
    detail::ensure(space, probs_, "hexamoe::nn::CrossEntropy::probabilities", B, C);
    detail::ensure(space, row_loss_, "hexamoe::nn::CrossEntropy::row_loss", B);
    detail::ensure(space, row_hit_, "hexamoe::nn::CrossEntropy::row_hit", B);
    labels_ = labels;
    int const nc = static_cast<int>(C);
    auto probs = probs_;
    auto row_loss = row_loss_;
    auto row_hit = row_hit_;
    Kokkos::parallel_for(
        "hexamoe::nn::CrossEntropy::forward", Kokkos::RangePolicy<ExecutionSpace>(space, 0, int(B)),
        KOKKOS_LAMBDA(int r) {
          int const y = labels(r);
          Scalar m = logits(r, 0);
          int arg = 0;
          for (int c = 1; c < nc; ++c)
            if (logits(r, c) > m) {
              m = logits(r, c);
              arg = c;
            }
          double s = 0.0;
          for (int c = 0; c < nc; ++c) s += compat::exp(static_cast<double>(logits(r, c) - m));
          for (int c = 0; c < nc; ++c)
            probs(r, c) = static_cast<Scalar>(compat::exp(static_cast<double>(logits(r, c) - m)) / s);
          bool const valid = y >= 0 && y < nc;
          // log-sum-exp minus the label's logit; row_hit -1 flags an invalid label.
          row_loss(r) = valid ? compat::log(s) + static_cast<double>(m) - static_cast<double>(logits(r, y)) : 0.0;
          row_hit(r) = valid ? (arg == y ? 1 : 0) : -1;
        });
    auto loss_h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), row_loss_);
    auto hit_h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), row_hit_);
    CrossEntropyResult res;
    res.count = static_cast<int>(B);
    double sum = 0.0;
    for (std::size_t r = 0; r < B; ++r) {
      if (hit_h(r) < 0) {
        auto lab = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), labels);
        throw std::invalid_argument("CrossEntropy::forward: label " + std::to_string(lab(r)) + " of row " +
                                    std::to_string(r) + " is outside [0, " + std::to_string(C) + ")");
      }
      sum += loss_h(r);
      res.correct += hit_h(r);
    }
    res.loss = B > 0 ? sum / static_cast<double>(B) : 0.0;
    forwarded_ = true;
    return res;
  }

  // dlogits [B, classes] = (softmax - onehot) * scale / B.
  void backward(ExecutionSpace const &space, matrix dlogits, double scale = 1.0) const {
    compat::ScopedRegion region("hexamoe::nn::CrossEntropy::backward");
    detail::require(forwarded_, "CrossEntropy::backward", "called before forward");
    std::size_t const B = probs_.extent(0), C = probs_.extent(1);
    detail::require_extents(dlogits, {B, C}, "CrossEntropy::backward", "dlogits");
    Scalar const f = static_cast<Scalar>(scale / static_cast<double>(B > 0 ? B : 1));
    auto probs = probs_;
    auto labels = labels_;
    for_each_element(space, "hexamoe::nn::CrossEntropy::backward", int(B), int(C),
                     KOKKOS_LAMBDA(int r, int c) {
                       dlogits(r, c) = (probs(r, c) - (labels(r) == c ? Scalar(1) : Scalar(0))) * f;
                     });
  }

  Matrix<Scalar const, memory_space> probabilities() const { return probs_; }

 private:
  matrix probs_;
  Kokkos::View<double *, memory_space> row_loss_;
  Kokkos::View<int *, memory_space> row_hit_;
  labels_view labels_;
  bool forwarded_ = false;
};

}  // namespace nn
}  // namespace hexamoe
