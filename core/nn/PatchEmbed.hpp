// PatchEmbed.hpp: images [B, C, H, W] -> tokens [B*L, D] through
// non-overlapping p x p patches and a linear map, plus a learned position
// embedding [L, D] (ViT's patch embedding: a stride-p convolution).
//
// Token l = ph * (W/p) + pw of image b is row b*L + l; the patch vector is
// ordered (channel, row in patch, column in patch), as a flattened
// torch Conv2d weight [D, C, p, p]; here weight is [C*p*p, D].
// forward copies the patches into a [B*L, C*p*p] buffer (im2col, saved for
// the weight gradient), then tokens = patches W + b + pos[l] (one GEMM).
// backward overwrites dW, db, dpos and writes dimages when it is not empty.
#pragma once

#include "core/nn/DenseGemm.hpp"

namespace hexamoe {
namespace nn {

template <class ExecutionSpace, class Scalar = float>
class PatchEmbed {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;
  using vector = Vector<Scalar, memory_space>;
  using images_view = Kokkos::View<Scalar const ****, Kokkos::LayoutRight, memory_space>;
  using images_grad_view = Kokkos::View<Scalar ****, Kokkos::LayoutRight, memory_space>;

  matrix weight, weight_grad;        // [C*p*p, D]
  vector bias, bias_grad;            // [D]
  matrix pos_embed, pos_embed_grad;  // [L, D]

  PatchEmbed() = default;
  PatchEmbed(ExecutionSpace const &space, int channels, int height, int width, int patch, int dim)
      : channels_(channels), height_(height), width_(width), patch_(patch), dim_(dim) {
    std::string const op = "PatchEmbed";
    detail::require(channels > 0 && height > 0 && width > 0 && patch > 0 && dim > 0, op,
                    "channels, height, width, patch and dim must be positive");
    detail::require(height % patch == 0 && width % patch == 0, op,
                    "the image (" + std::to_string(height) + " x " + std::to_string(width) +
                        ") is not divisible into patches of " + std::to_string(patch) + " x " +
                        std::to_string(patch));
    tokens_ = (height / patch) * (width / patch);
    int const P = patch_dim();
    weight = matrix(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::PatchEmbed::weight"), P, dim);
    weight_grad = matrix(Kokkos::view_alloc(space, "hexamoe::nn::PatchEmbed::weight_grad"), P, dim);
    bias = vector(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::PatchEmbed::bias"), dim);
    bias_grad = vector(Kokkos::view_alloc(space, "hexamoe::nn::PatchEmbed::bias_grad"), dim);
    pos_embed = matrix(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::nn::PatchEmbed::pos_embed"),
                       tokens_, dim);
    pos_embed_grad = matrix(Kokkos::view_alloc(space, "hexamoe::nn::PatchEmbed::pos_embed_grad"), tokens_, dim);
    init(0);
  }

  int tokens() const { return tokens_; }  // L per image
  int patch_dim() const { return channels_ * patch_ * patch_; }
  int dim() const { return dim_; }

  // W and pos ~ truncated normal (std 0.02), b = 0.
  void init(std::uint64_t seed, double std_dev = 0.02) {
    detail::fill_from_host(weight, detail::truncated_normal(weight.span(), std_dev, detail::derive_seed(seed, 0)));
    detail::fill_constant(bias, 0.0);
    detail::fill_from_host(pos_embed,
                           detail::truncated_normal(pos_embed.span(), std_dev, detail::derive_seed(seed, 1)));
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) const {
    detail::require_float_parameters<Scalar>();
    return {detail::parameter(prefix + ".proj.weight", weight, weight_grad, true),
            detail::parameter(prefix + ".proj.bias", bias, bias_grad, false),
            detail::parameter(prefix + ".pos_embed", pos_embed, pos_embed_grad, false)};
  }

  // images [B, C, H, W] -> tokens [B*L, D]. Saves the patch matrix.
  void forward(ExecutionSpace const &space, images_view images, matrix tokens) {
    compat::ScopedRegion region("hexamoe::nn::PatchEmbed::forward");
    std::size_t const B = images.extent(0);
    detail::require_extents(images, {B, std::size_t(channels_), std::size_t(height_), std::size_t(width_)},
                            "PatchEmbed::forward", "images");
    detail::require_extents(tokens, {B * tokens_, std::size_t(dim_)}, "PatchEmbed::forward", "tokens");
    detail::ensure(space, patches_, "hexamoe::nn::PatchEmbed::patches", B * tokens_, std::size_t(patch_dim()));
    batch_ = static_cast<int>(B);
    int const L = tokens_, p = patch_, wp = width_ / patch_;
    auto patches = patches_;
    // im2col: patches(b*L + l, (c*p + i)*p + j) = images(b, c, ph*p + i, pw*p + j).
    for_each_element(space, "hexamoe::nn::PatchEmbed::im2col", batch_ * L, patch_dim(),
                     KOKKOS_LAMBDA(int r, int k) {
                       int const b = r / L, l = r % L, ph = l / wp, pw = l % wp;
                       int const c = k / (p * p), i = (k / p) % p, j = k % p;
                       patches(r, k) = images(b, c, ph * p + i, pw * p + j);
                     });
    auto bias_v = bias;
    auto pos = pos_embed;
    for_each_element(space, "hexamoe::nn::PatchEmbed::bias_pos", batch_ * L, dim_,
                     KOKKOS_LAMBDA(int r, int d) { tokens(r, d) = bias_v(d) + pos(r % L, d); });
    dense_gemm(space, const_matrix(patches_), const_matrix(weight), tokens, Scalar(1), Scalar(1));
    forwarded_ = true;
  }

  // dtokens [B*L, D] -> dW, db, dpos (overwritten); dimages [B, C, H, W]
  // (skipped when empty).
  void backward(ExecutionSpace const &space, const_matrix dtokens, images_grad_view dimages) {
    compat::ScopedRegion region("hexamoe::nn::PatchEmbed::backward");
    detail::require(forwarded_, "PatchEmbed::backward", "called before forward");
    std::size_t const B = static_cast<std::size_t>(batch_);
    detail::require_extents(dtokens, {B * tokens_, std::size_t(dim_)}, "PatchEmbed::backward", "dtokens");
    if (dimages.data() != nullptr)
      detail::require_extents(dimages, {B, std::size_t(channels_), std::size_t(height_), std::size_t(width_)},
                              "PatchEmbed::backward", "dimages");
    dense_gemm(space, const_matrix(patches_), dtokens, weight_grad, Scalar(1), Scalar(0), true, false);
    detail::column_sum(space, dtokens, bias_grad);
    int const L = tokens_, nb = batch_;
    auto dpos = pos_embed_grad;
    // dpos(l, d) = sum_b dtokens(b*L + l, d), in image order.
    for_each_element(space, "hexamoe::nn::PatchEmbed::pos_grad", L, dim_, KOKKOS_LAMBDA(int l, int d) {
      Scalar s = 0;
      for (int b = 0; b < nb; ++b) s += dtokens(b * L + l, d);
      dpos(l, d) = s;
    });
    if (dimages.data() == nullptr) return;
    detail::ensure(space, dpatches_, "hexamoe::nn::PatchEmbed::dpatches", B * tokens_, std::size_t(patch_dim()));
    dense_gemm(space, dtokens, const_matrix(weight), dpatches_, Scalar(1), Scalar(0), false, true);
    // col2im: every pixel belongs to exactly one patch (non-overlapping).
    auto dpatches = dpatches_;
    int const p = patch_, wp = width_ / patch_, H = height_, W = width_, C = channels_;
    for_each_element(space, "hexamoe::nn::PatchEmbed::col2im", nb * channels_ * H, W,
                     KOKKOS_LAMBDA(int bcy, int x) {
                       int const y = bcy % H, bc = bcy / H;
                       int const c = bc % C, b = bc / C;
                       int const l = (y / p) * wp + x / p;
                       dimages(b, c, y, x) = dpatches(b * L + l, (c * p + y % p) * p + x % p);
                     });
  }

  const_matrix saved_patches() const { return patches_; }

 private:
  int channels_ = 0, height_ = 0, width_ = 0, patch_ = 0, dim_ = 0, tokens_ = 0, batch_ = 0;
  matrix patches_, dpatches_;
  bool forwarded_ = false;
};

}  // namespace nn
}  // namespace hexamoe
