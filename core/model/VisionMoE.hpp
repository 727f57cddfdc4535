// VisionMoE.hpp: a small vision transformer with MoE feed-forward layers,
// after Swin-MoE / ViT: patch embedding (+ position embedding), blocks of
// pre-norm multi-head self-attention and FFN with residuals (the FFN is an
// MoE layer in the chosen blocks), a final LayerNorm, mean pooling and a
// linear head; cross-entropy plus the MoE auxiliary losses.
#pragma once

#include "core/model/MoeFfn.hpp"
#include "core/nn/Attention.hpp"
#include "core/nn/CrossEntropy.hpp"
#include "core/nn/LayerNorm.hpp"
#include "core/nn/Linear.hpp"
#include "core/nn/MeanPool.hpp"
#include "core/nn/Mlp.hpp"
#include "core/nn/PatchEmbed.hpp"

#include <algorithm>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace hexamoe {

struct VisionMoeSpec {
  int channels = 1, image_size = 28, patch = 4;
  int dim = 64, depth = 4, heads = 4, hidden = 128, classes = 10;
  std::vector<int> moe_blocks;  // indices of blocks whose FFN is an MoE layer
  MoeLayerConfig moe;           // dim and hidden are taken from above

  // A string that identifies the architecture (checkpoints refuse others).
  std::string signature() const {
    std::string s = "VisionMoE c" + std::to_string(channels) + " img" + std::to_string(image_size) + " p" +
                    std::to_string(patch) + " d" + std::to_string(dim) + " L" + std::to_string(depth) + " h" +
                    std::to_string(heads) + " H" + std::to_string(hidden) + " cls" + std::to_string(classes) + " E" +
                    std::to_string(moe.experts) + " k" + std::to_string(moe.top_k) + " act" + to_string(moe.activation) +
                    " moe[";
    for (std::size_t i = 0; i < moe_blocks.size(); ++i) s += (i ? "," : "") + std::to_string(moe_blocks[i]);
    return s + "]";
  }
};

// Parameter elements of the model a spec describes, without building it:
// `expert` counts the MoE layers' W1, b1 and W2 (what the MoE parallel modes
// slice over ranks), `replicated` everything else. Follows VisionMoE's
// constructor and the modules' parameters(); a test compares it with them.
struct VisionMoeParameterCounts {
  double replicated = 0, expert = 0;
};
inline VisionMoeParameterCounts parameter_counts(VisionMoeSpec const &s) {
  double const d = s.dim, H = s.hidden, E = s.moe.experts;
  double const side = s.patch > 0 ? double(s.image_size / s.patch) : 0.0;
  double const patch_dim = double(s.channels) * s.patch * s.patch;
  VisionMoeParameterCounts c;
  c.replicated = patch_dim * d + d + side * side * d;  // patch projection, bias, position embedding
  for (int i = 0; i < s.depth; ++i) {
    c.replicated += 2 * (2 * d);                        // two LayerNorms
    c.replicated += (d * 3 * d + 3 * d) + (d * d + d);  // attention qkv and proj
    if (std::find(s.moe_blocks.begin(), s.moe_blocks.end(), i) != s.moe_blocks.end()) {
      c.replicated += d * E + E + E * d;  // router weight and bias, b2
      c.expert += E * (2 * d + 1) * H;    // W1, b1, W2
    } else {
      c.replicated += (d * H + H) + (H * d + d);  // MLP fc1, fc2
    }
  }
  c.replicated += 2 * d + (d * s.classes + s.classes);  // final LayerNorm, head
  return c;
}

struct StepStats {
  double loss = 0;      // cross-entropy, mean over the batch
  double aux_loss = 0;  // sum over MoE layers
  double z_loss = 0;
  int correct = 0, count = 0;
  double total() const { return loss + aux_loss + z_loss; }
};

template <class ExecutionSpace>
class VisionMoE {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<float, memory_space>;
  using const_matrix = Matrix<float const, memory_space>;
  using images_view = Kokkos::View<float const ****, Kokkos::LayoutRight, memory_space>;
  using labels_view = Kokkos::View<int const *, memory_space>;
  using FfnFactory = std::function<std::unique_ptr<MoeFfn<ExecutionSpace>>(MoeLayerConfig const &, int block)>;

  VisionMoE(ExecutionSpace const &space, VisionMoeSpec spec, FfnFactory factory = {}) : spec_(std::move(spec)) {
    if (!factory)
      factory = [](MoeLayerConfig const &c, int) { return std::make_unique<LocalMoeFfn<ExecutionSpace>>(c); };
    auto const &s = spec_;
    if (s.image_size % s.patch != 0)
      throw std::invalid_argument("VisionMoE: image size " + std::to_string(s.image_size) + " is not a multiple of patch " +
                                  std::to_string(s.patch));
    patch_ = nn::PatchEmbed<ExecutionSpace>(space, s.channels, s.image_size, s.image_size, s.patch, s.dim);
    MoeLayerConfig mc = s.moe;
    mc.dim = s.dim;
    mc.hidden = s.hidden;
    for (int i = 0; i < s.depth; ++i) {
      auto b = std::make_unique<Block>();
      b->ln1 = nn::LayerNorm<ExecutionSpace>(space, s.dim);
      b->ln2 = nn::LayerNorm<ExecutionSpace>(space, s.dim);
      b->attn = nn::Attention<ExecutionSpace>(space, s.dim, s.heads);
      if (std::find(s.moe_blocks.begin(), s.moe_blocks.end(), i) != s.moe_blocks.end()) {
        b->moe = factory(mc, i);
      } else {
        b->mlp = nn::Mlp<ExecutionSpace>(space, s.dim, s.hidden);
      }
      blocks_.push_back(std::move(b));
    }
    norm_ = nn::LayerNorm<ExecutionSpace>(space, s.dim);
    head_ = nn::Linear<ExecutionSpace>(space, s.dim, s.classes);
  }

  VisionMoeSpec const &spec() const { return spec_; }
  int tokens_per_image() const { return patch_.tokens(); }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  MoeFfn<ExecutionSpace> *moe(int block) { return blocks_.at(block)->moe.get(); }

  void init(std::uint64_t seed) {
    patch_.init(nn::detail::derive_seed(seed, 0));
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      auto &b = *blocks_[i];
      std::uint64_t const bs = nn::detail::derive_seed(seed, 100 + i);
      b.ln1.init(0);
      b.ln2.init(0);
      b.attn.init(nn::detail::derive_seed(bs, 1));
      if (b.moe) b.moe->init(nn::detail::derive_seed(bs, 2));
      else b.mlp.init(nn::detail::derive_seed(bs, 2));
    }
    norm_.init(0);
    head_.init(nn::detail::derive_seed(seed, 1));
  }

  std::vector<Parameter<memory_space>> parameters() {
    std::vector<Parameter<memory_space>> all;
    auto add = [&](std::vector<Parameter<memory_space>> v) { all.insert(all.end(), v.begin(), v.end()); };
    add(patch_.parameters("patch_embed"));
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      auto &b = *blocks_[i];
      std::string const p = "blocks." + std::to_string(i);
      add(b.ln1.parameters(p + ".norm1"));
      add(b.attn.parameters(p + ".attn"));
      add(b.ln2.parameters(p + ".norm2"));
      if (b.moe) add(b.moe->parameters(p + ".moe"));
      else add(b.mlp.parameters(p + ".mlp"));
    }
    add(norm_.parameters("norm"));
    add(head_.parameters("head"));
    return all;
  }

  // Forward over a batch; keeps what backward needs. loss_scale multiplies
  // the cross-entropy gradient later (for averaging over ranks).
  StepStats forward(ExecutionSpace const &space, images_view images, labels_view labels) {
    compat::ScopedRegion region("hexamoe::VisionMoE::forward");
    int const B = static_cast<int>(images.extent(0)), L = patch_.tokens(), D = spec_.dim;
    std::size_t const N = std::size_t(B) * L;
    if (static_cast<int>(labels.extent(0)) != B)
      throw std::invalid_argument("VisionMoE: " + std::to_string(labels.extent(0)) + " labels for " + std::to_string(B) +
                                  " images");
    nn::detail::ensure(space, tokens_, "hexamoe::model::tokens", N, std::size_t(D));
    patch_.forward(space, images, tokens_);
    const_matrix cur = tokens_;
    StepStats st;
    for (auto &bp : blocks_) {
      auto &b = *bp;
      for (matrix *m : {&b.n1, &b.a, &b.h, &b.n2, &b.f, &b.out})
        nn::detail::ensure(space, *m, "hexamoe::model::block_buffer", N, std::size_t(D));
      b.ln1.forward(space, cur, b.n1);
      b.attn.forward(space, b.n1, b.a, L);
      add(space, cur, b.a, b.h);
      b.ln2.forward(space, b.h, b.n2);
      if (b.moe) {
        b.moe->forward(space, b.n2, b.f);
        auto [aux, z] = b.moe->losses();
        st.aux_loss += aux;
        st.z_loss += z;
      } else {
        b.mlp.forward(space, b.n2, b.f);
      }
      add(space, b.h, b.f, b.out);
      cur = b.out;
    }
    nn::detail::ensure(space, normed_, "hexamoe::model::normed", N, std::size_t(D));
    nn::detail::ensure(space, pooled_, "hexamoe::model::pooled", std::size_t(B), std::size_t(D));
    nn::detail::ensure(space, logits_, "hexamoe::model::logits", std::size_t(B), std::size_t(spec_.classes));
    norm_.forward(space, cur, normed_);
    pool_.forward(space, normed_, pooled_);
    head_.forward(space, pooled_, logits_);
    auto ce = loss_.forward(space, logits_, labels);
    st.loss = ce.loss;
    st.correct = ce.correct;
    st.count = ce.count;
    return st;
  }

  // Backward of the last forward: overwrites every parameter gradient.
  // ce_scale scales the cross-entropy gradient (e.g. local batch / global batch).
  void backward(ExecutionSpace const &space, double ce_scale = 1.0) {
    compat::ScopedRegion region("hexamoe::VisionMoE::backward");
    std::size_t const N = tokens_.extent(0), B = logits_.extent(0);
    int const D = spec_.dim;
    nn::detail::ensure(space, dlogits_, "hexamoe::model::dlogits", B, std::size_t(spec_.classes));
    nn::detail::ensure(space, dpooled_, "hexamoe::model::dpooled", B, std::size_t(D));
    for (matrix *m : {&dcur_, &dn_, &dtmp_, &dh_}) nn::detail::ensure(space, *m, "hexamoe::model::grad_buffer", N, std::size_t(D));
    loss_.backward(space, dlogits_, ce_scale);
    head_.backward(space, dlogits_, dpooled_);
    pool_.backward(space, dpooled_, dn_);
    norm_.backward(space, dn_, dcur_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      auto &b = **it;
      // out = h + f(ln2(h)):   dh = dout + ln2'(f'(dout))
      if (b.moe) b.moe->backward(space, dcur_, dn_);
      else b.mlp.backward(space, dcur_, dn_);
      b.ln2.backward(space, dn_, dtmp_);
      add(space, dcur_, dtmp_, dh_);
      // h = x + attn(ln1(x)):  dx = dh + ln1'(attn'(dh))
      b.attn.backward(space, dh_, dn_);
      b.ln1.backward(space, dn_, dtmp_);
      add(space, dh_, dtmp_, dcur_);
    }
    patch_.backward(space, dcur_, typename nn::PatchEmbed<ExecutionSpace>::images_grad_view());
  }

  // Input and output of the FFN of a block in the last forward (for activation dumps).
  std::pair<const_matrix, const_matrix> ffn_io(int block) const {
    auto const &b = *blocks_.at(block);
    return {b.n2, b.f};
  }
  const_matrix logits() const { return logits_; }

  // Residual sum c = a + b (public: CUDA forbids extended lambdas in private member functions).
  static void add(ExecutionSpace const &space, const_matrix a, const_matrix b, matrix c) {
    std::size_t const n = c.span();
    auto pa = a.data();
    auto pb = b.data();
    auto pc = c.data();
    for_each_index(space, "hexamoe::model::residual", n, KOKKOS_LAMBDA(std::size_t i) { pc[i] = pa[i] + pb[i]; });
  }

 private:
  struct Block {
    nn::LayerNorm<ExecutionSpace> ln1, ln2;
    nn::Attention<ExecutionSpace> attn;
    nn::Mlp<ExecutionSpace> mlp;
    std::unique_ptr<MoeFfn<ExecutionSpace>> moe;
    matrix n1, a, h, n2, f, out;
  };

  VisionMoeSpec spec_;
  nn::PatchEmbed<ExecutionSpace> patch_;
  std::vector<std::unique_ptr<Block>> blocks_;
  nn::LayerNorm<ExecutionSpace> norm_;
  nn::MeanPool<ExecutionSpace> pool_;
  nn::Linear<ExecutionSpace> head_;
  nn::CrossEntropy<ExecutionSpace> loss_;
  matrix tokens_, normed_, pooled_, logits_;
  matrix dlogits_, dpooled_, dcur_, dn_, dtmp_, dh_;
};

}  // namespace hexamoe
