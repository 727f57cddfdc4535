// tstNN.hpp: the dense modules of core/nn against independent float64 host
// references (plain loops), their gradients against central finite
// differences of a float64 instantiation, the float32 backward against the
// float64 one, and bit-identical repeated runs.
//
// Every module is wrapped in a Case<T> that owns random parameters and inputs
// (drawn in float64 and rounded to float, so the float32 and float64 cases see
// the same numbers), its output, and the gradient views. The finite-difference
// check uses L = sum(out * R) for random R: dL/dout = R is passed to backward.
#include "Reference.hpp"
#include "core/nn/Attention.hpp"
#include "core/nn/CrossEntropy.hpp"
#include "core/nn/DenseGemm.hpp"
#include "core/nn/Gelu.hpp"
#include "core/nn/HostMath.hpp"
#include "core/nn/LayerNorm.hpp"
#include "core/nn/Linear.hpp"
#include "core/nn/MeanPool.hpp"
#include "core/nn/Mlp.hpp"
#include "core/nn/PatchEmbed.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>

namespace {

using namespace hexamoe;
using test::Vec;
using Space = TEST_EXECSPACE;
using Mem = TEST_MEMSPACE;
template <class T>
using V2 = Kokkos::View<T **, Kokkos::LayoutRight, Mem>;
template <class T>
using V4 = Kokkos::View<T ****, Kokkos::LayoutRight, Mem>;
template <class T>
using Flat = Kokkos::View<T *, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

template <class View>
Flat<typename View::non_const_value_type> flat_of(View const &v) {
  return Flat<typename View::non_const_value_type>(const_cast<typename View::non_const_value_type *>(v.data()),
                                                   v.span());
}

// A tensor the loss depends on, and the gradient backward writes for it.
template <class T>
struct Slot {
  std::string name;
  Flat<T> value, grad;
};

// Random values drawn in float64, rounded to float, stored in the view.
template <class View>
void fill(View const &v, std::mt19937 &rng, double scale, double offset = 0.0) {
  Vec x = test::random_vec(v.span(), rng, scale);
  for (auto &e : x) e += offset;
  test::to_view<typename View::non_const_value_type>(test::rounded<float>(x), flat_of(v));
}

template <class T>
double get(Flat<T> const &v, std::size_t i) {
  T h;
  Kokkos::deep_copy(h, Kokkos::subview(v, i));
  return static_cast<double>(h);
}
template <class T>
void set(Flat<T> const &v, std::size_t i, double x) {
  Kokkos::deep_copy(Kokkos::subview(v, i), static_cast<T>(x));
}

double dot(Vec const &a, Vec const &b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Host double-precision helpers for the references.
Vec matmul(Vec const &a, Vec const &b, int M, int K, int N) {  // [M, K] x [K, N]
  Vec c(std::size_t(M) * N, 0.0);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += a[std::size_t(m) * K + k] * b[std::size_t(k) * N + n];
      c[std::size_t(m) * N + n] = s;
    }
  return c;
}
Vec linear_ref(Vec const &x, Vec const &w, Vec const &b, int N, int in, int out) {
  Vec y = matmul(x, w, N, in, out);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < out; ++o) y[std::size_t(n) * out + o] += b[o];
  return y;
}
Vec gelu_ref(Vec x) {
  for (auto &v : x) v = test::act_ref(Activation::gelu, v);
  return x;
}

// ---------------------------------------------------------------- cases

template <class T>
struct LinearCase {
  int N, in, out;
  nn::Linear<Space, T> m;
  V2<T> x, y, dx;
  LinearCase(std::vector<int> d, unsigned seed)
      : N(d[0]), in(d[1]), out(d[2]), m(Space(), in, out), x("x", N, in), y("y", N, out), dx("dx", N, in) {
    std::mt19937 rng(seed);
    fill(m.weight, rng, 0.5);
    fill(m.bias, rng, 0.5);
    fill(x, rng, 1.0);
  }
  std::vector<Slot<T>> params() {
    return {{"weight", flat_of(m.weight), flat_of(m.weight_grad)}, {"bias", flat_of(m.bias), flat_of(m.bias_grad)}};
  }
  Slot<T> input() { return {"x", flat_of(x), flat_of(dx)}; }
  void forward() { m.forward(Space(), x, y); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dx); }
  V2<T> output() { return y; }
  Vec reference() {
    return linear_ref(test::from_view(x), test::from_view(m.weight), test::from_view(m.bias), N, in, out);
  }
};

template <class T>
struct GeluCase {
  int N, D;
  nn::Gelu<Space, T> m;
  V2<T> x, y, dx;
  GeluCase(std::vector<int> d, unsigned seed) : N(d[0]), D(d[1]), m(Space()), x("x", N, D), y("y", N, D), dx("dx", N, D) {
    std::mt19937 rng(seed);
    fill(x, rng, 2.0);
  }
  std::vector<Slot<T>> params() { return {}; }
  Slot<T> input() { return {"x", flat_of(x), flat_of(dx)}; }
  void forward() { m.forward(Space(), x, y); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dx); }
  V2<T> output() { return y; }
  Vec reference() { return gelu_ref(test::from_view(x)); }
};

template <class T>
struct LayerNormCase {
  int N, D;
  double eps = 1e-5;
  nn::LayerNorm<Space, T> m;
  V2<T> x, y, dx;
  LayerNormCase(std::vector<int> d, unsigned seed)
      : N(d[0]), D(d[1]), m(Space(), D, eps), x("x", N, D), y("y", N, D), dx("dx", N, D) {
    std::mt19937 rng(seed);
    fill(m.weight, rng, 0.3, 1.0);
    fill(m.bias, rng, 0.3);
    fill(x, rng, 1.5, 0.7);
  }
  std::vector<Slot<T>> params() {
    return {{"weight", flat_of(m.weight), flat_of(m.weight_grad)}, {"bias", flat_of(m.bias), flat_of(m.bias_grad)}};
  }
  Slot<T> input() { return {"x", flat_of(x), flat_of(dx)}; }
  void forward() { m.forward(Space(), x, y); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dx); }
  V2<T> output() { return y; }
  Vec reference() {
    Vec xs = test::from_view(x), g = test::from_view(m.weight), b = test::from_view(m.bias), out(xs.size());
    for (int n = 0; n < N; ++n) {
      double mu = 0, var = 0;
      for (int c = 0; c < D; ++c) mu += xs[std::size_t(n) * D + c] / D;
      for (int c = 0; c < D; ++c) var += std::pow(xs[std::size_t(n) * D + c] - mu, 2) / D;
      for (int c = 0; c < D; ++c)
        out[std::size_t(n) * D + c] = (xs[std::size_t(n) * D + c] - mu) / std::sqrt(var + eps) * g[c] + b[c];
    }
    return out;
  }
};

template <class T>
struct MeanPoolCase {
  int B, L, D;
  nn::MeanPool<Space, T> m;
  V2<T> x, y, dx;
  MeanPoolCase(std::vector<int> d, unsigned seed)
      : B(d[0]), L(d[1]), D(d[2]), m(Space()), x("x", B * L, D), y("y", B, D), dx("dx", B * L, D) {
    std::mt19937 rng(seed);
    fill(x, rng, 1.0);
  }
  std::vector<Slot<T>> params() { return {}; }
  Slot<T> input() { return {"x", flat_of(x), flat_of(dx)}; }
  void forward() { m.forward(Space(), x, y); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dx); }
  V2<T> output() { return y; }
  Vec reference() {
    Vec xs = test::from_view(x), out(std::size_t(B) * D, 0.0);
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < L; ++l)
        for (int c = 0; c < D; ++c) out[std::size_t(b) * D + c] += xs[(std::size_t(b) * L + l) * D + c] / L;
    return out;
  }
};

template <class T>
struct PatchEmbedCase {
  int B, C, H, W, p, D, L;
  nn::PatchEmbed<Space, T> m;
  V4<T> img, dimg;
  V2<T> y;
  PatchEmbedCase(std::vector<int> d, unsigned seed)
      : B(d[0]), C(d[1]), H(d[2]), W(d[3]), p(d[4]), D(d[5]), L((H / p) * (W / p)), m(Space(), C, H, W, p, D),
        img("img", B, C, H, W), dimg("dimg", B, C, H, W), y("y", B * L, D) {
    std::mt19937 rng(seed);
    fill(m.weight, rng, 0.5);
    fill(m.bias, rng, 0.5);
    fill(m.pos_embed, rng, 0.5);
    fill(img, rng, 1.0);
  }
  std::vector<Slot<T>> params() {
    return {{"proj.weight", flat_of(m.weight), flat_of(m.weight_grad)},
            {"proj.bias", flat_of(m.bias), flat_of(m.bias_grad)},
            {"pos_embed", flat_of(m.pos_embed), flat_of(m.pos_embed_grad)}};
  }
  Slot<T> input() { return {"images", flat_of(img), flat_of(dimg)}; }
  void forward() { m.forward(Space(), img, y); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dimg); }
  V2<T> output() { return y; }
  Vec reference() {
    Vec im = test::from_view(img), w = test::from_view(m.weight), b = test::from_view(m.bias),
        pos = test::from_view(m.pos_embed), out(std::size_t(B) * L * D);
    int const wp = W / p;
    for (int bb = 0; bb < B; ++bb)
      for (int l = 0; l < L; ++l)
        for (int o = 0; o < D; ++o) {
          double s = b[o] + pos[std::size_t(l) * D + o];
          for (int c = 0; c < C; ++c)
            for (int i = 0; i < p; ++i)
              for (int j = 0; j < p; ++j) {
                int const yy = (l / wp) * p + i, xx = (l % wp) * p + j;
                s += im[((std::size_t(bb) * C + c) * H + yy) * W + xx] * w[(std::size_t(c * p + i) * p + j) * D + o];
              }
          out[(std::size_t(bb) * L + l) * D + o] = s;
        }
    return out;
  }
};

template <class T>
struct AttentionCase {
  int B, L, D, heads;
  nn::Attention<Space, T> m;
  V2<T> x, y, dx;
  AttentionCase(std::vector<int> d, unsigned seed)
      : B(d[0]), L(d[1]), D(d[2]), heads(d[3]), m(Space(), D, heads), x("x", B * L, D), y("y", B * L, D),
        dx("dx", B * L, D) {
    std::mt19937 rng(seed);
    // Large enough weights that the softmax is far from uniform.
    fill(m.qkv.weight, rng, 1.5 / std::sqrt(double(D)));
    fill(m.qkv.bias, rng, 0.3);
    fill(m.proj.weight, rng, 1.0 / std::sqrt(double(D)));
    fill(m.proj.bias, rng, 0.3);
    fill(x, rng, 1.0);
  }
  std::vector<Slot<T>> params() {
    return {{"qkv.weight", flat_of(m.qkv.weight), flat_of(m.qkv.weight_grad)},
            {"qkv.bias", flat_of(m.qkv.bias), flat_of(m.qkv.bias_grad)},
            {"proj.weight", flat_of(m.proj.weight), flat_of(m.proj.weight_grad)},
            {"proj.bias", flat_of(m.proj.bias), flat_of(m.proj.bias_grad)}};
  }
  Slot<T> input() { return {"x", flat_of(x), flat_of(dx)}; }
  void forward() { m.forward(Space(), x, y, L); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dx); }
  V2<T> output() { return y; }
  Vec reference() {
    int const N = B * L, dh = D / heads;
    Vec qkv = linear_ref(test::from_view(x), test::from_view(m.qkv.weight), test::from_view(m.qkv.bias), N, D, 3 * D);
    Vec ctx(std::size_t(N) * D);
    auto at = [&](int row, int col) { return qkv[std::size_t(row) * 3 * D + col]; };
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < L; ++i) {
          Vec s(L);
          double mx = -1e300, sum = 0;
          for (int j = 0; j < L; ++j) {
            double v = 0;
            for (int d = 0; d < dh; ++d) v += at(b * L + i, h * dh + d) * at(b * L + j, D + h * dh + d);
            s[j] = v / std::sqrt(double(dh));
            mx = std::max(mx, s[j]);
          }
          for (int j = 0; j < L; ++j) sum += (s[j] = std::exp(s[j] - mx));
          for (int d = 0; d < dh; ++d) {
            double o = 0;
            for (int j = 0; j < L; ++j) o += s[j] / sum * at(b * L + j, 2 * D + h * dh + d);
            ctx[std::size_t(b * L + i) * D + h * dh + d] = o;
          }
        }
    return linear_ref(ctx, test::from_view(m.proj.weight), test::from_view(m.proj.bias), N, D, D);
  }
};

template <class T>
struct MlpCase {
  int N, D, Hd;
  nn::Mlp<Space, T> m;
  V2<T> x, y, dx;
  MlpCase(std::vector<int> d, unsigned seed)
      : N(d[0]), D(d[1]), Hd(d[2]), m(Space(), D, Hd), x("x", N, D), y("y", N, D), dx("dx", N, D) {
    std::mt19937 rng(seed);
    fill(m.fc1.weight, rng, 1.0 / std::sqrt(double(D)));
    fill(m.fc1.bias, rng, 0.3);
    fill(m.fc2.weight, rng, 1.0 / std::sqrt(double(Hd)));
    fill(m.fc2.bias, rng, 0.3);
    fill(x, rng, 1.0);
  }
  std::vector<Slot<T>> params() {
    return {{"fc1.weight", flat_of(m.fc1.weight), flat_of(m.fc1.weight_grad)},
            {"fc1.bias", flat_of(m.fc1.bias), flat_of(m.fc1.bias_grad)},
            {"fc2.weight", flat_of(m.fc2.weight), flat_of(m.fc2.weight_grad)},
            {"fc2.bias", flat_of(m.fc2.bias), flat_of(m.fc2.bias_grad)}};
  }
  Slot<T> input() { return {"x", flat_of(x), flat_of(dx)}; }
  void forward() { m.forward(Space(), x, y); }
  void backward(V2<T> dy) { m.backward(Space(), dy, dx); }
  V2<T> output() { return y; }
  Vec reference() {
    Vec h = gelu_ref(
        linear_ref(test::from_view(x), test::from_view(m.fc1.weight), test::from_view(m.fc1.bias), N, D, Hd));
    return linear_ref(h, test::from_view(m.fc2.weight), test::from_view(m.fc2.bias), N, Hd, D);
  }
};

// ---------------------------------------------------------------- drivers

template <class T>
double forward_tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}

// Output (poisoned with NaN first) against the float64 reference, norm-relative.
template <template <class> class Case, class T>
void check_forward(std::vector<int> const &dims, unsigned seed) {
  Case<T> c(dims, seed);
  test::poison<T>(c.output());
  c.forward();
  double const err = test::rel_error(test::from_view(c.output()), c.reference());
  EXPECT_LT(err, forward_tolerance<T>()) << (std::is_same_v<T, double> ? "double" : "float");
}

// Analytic gradients (poisoned first: backward must overwrite them) of the
// float64 module against central differences of L = sum(out * R).
template <template <class> class Case>
void check_gradients(std::vector<int> const &dims, unsigned seed) {
  Case<double> c(dims, seed);
  c.forward();
  auto out = c.output();
  std::mt19937 rng(seed + 1000);
  Vec R = test::random_vec(out.span(), rng);
  V2<double> dy = test::to_view<double>(R, V2<double>("dy", out.extent(0), out.extent(1)));
  auto slots = c.params();
  slots.push_back(c.input());
  for (auto &s : slots) test::poison<double>(s.grad);
  c.backward(dy);
  std::vector<Vec> analytic;
  for (auto &s : slots) analytic.push_back(test::from_view(s.grad));
  auto loss = [&] {
    c.forward();
    return dot(test::from_view(c.output()), R);
  };
  double const h = 1e-5;
  for (std::size_t k = 0; k < slots.size(); ++k) {
    auto const &s = slots[k];
    Vec fd(s.value.extent(0));
    for (std::size_t i = 0; i < fd.size(); ++i) {
      double const v = get(s.value, i);
      set(s.value, i, v + h);
      double const lp = loss();
      set(s.value, i, v - h);
      double const lm = loss();
      set(s.value, i, v);
      fd[i] = (lp - lm) / (2 * h);
    }
    EXPECT_LT(test::rel_error(analytic[k], fd), 1e-6) << "gradient of " << s.name;
  }
}

// The float32 backward against the float64 one on the same (float) numbers.
template <template <class> class Case>
void check_float_backward(std::vector<int> const &dims, unsigned seed) {
  Case<float> f(dims, seed);
  Case<double> d(dims, seed);
  f.forward();
  d.forward();
  std::mt19937 rng(seed + 2000);
  Vec R = test::rounded<float>(test::random_vec(f.output().span(), rng));
  auto ext0 = f.output().extent(0), ext1 = f.output().extent(1);
  decltype(f.params()) fs = f.params();  // not auto: nvcc 13 mis-deduces it across instantiations
  decltype(d.params()) ds = d.params();
  fs.push_back(f.input());
  ds.push_back(d.input());
  for (auto &s : fs) test::poison<float>(s.grad);
  f.backward(test::to_view<float>(R, V2<float>("dyf", ext0, ext1)));
  d.backward(test::to_view<double>(R, V2<double>("dyd", ext0, ext1)));
  for (std::size_t k = 0; k < fs.size(); ++k)
    EXPECT_LT(test::rel_error(test::from_view(fs[k].grad), test::from_view(ds[k].grad)), 2e-5)
        << "float32 gradient of " << fs[k].name;
}

template <template <class> class Case>
void check_module(std::vector<std::vector<int>> const &forward_dims, std::vector<int> const &fd_dims) {
  unsigned seed = 11;
  for (auto const &dims : forward_dims) {
    check_forward<Case, float>(dims, seed++);
    check_forward<Case, double>(dims, seed++);
    check_float_backward<Case>(dims, seed++);
  }
  check_gradients<Case>(fd_dims, seed++);
}

// ---------------------------------------------------------------- tests

// C = alpha op(A) op(B) + beta C against loops, every transpose, beta 0 on a
// NaN C (must not be read) and beta != 0, tile-unaligned and degenerate extents.
// On vectorised hosts (core/TileGemm.hpp) the extents also cover every path of
// the host micro-kernel: full 6 x 32 blocks, fewer rows (70, 49, 37, 13 rows
// leave 4, 1, 1 and 1 rows), 16-column blocks (N = 48 and 80) and the scalar
// loop for other widths (N = 130, 3, 6).
template <class T>
void run_gemm(bool tiled) {
  struct Dims {
    int M, N, K;
  };
  for (Dims s : {Dims{70, 130, 50}, Dims{1, 1, 1}, Dims{49, 64, 257}, Dims{200, 3, 7}, Dims{5, 6, 0}, Dims{37, 48, 20},
                 Dims{13, 80, 33}}) {
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (double beta : {0.0, 0.3}) {
          SCOPED_TRACE("M=" + std::to_string(s.M) + " N=" + std::to_string(s.N) + " K=" + std::to_string(s.K) +
                       " transA=" + std::to_string(ta) + " transB=" + std::to_string(tb) +
                       " beta=" + std::to_string(beta) + (tiled ? " tiled" : ""));
          std::mt19937 rng(s.M * 1000 + s.N + s.K + ta * 7 + tb * 13);
          V2<T> A("A", ta ? s.K : s.M, ta ? s.M : s.K), B("B", tb ? s.N : s.K, tb ? s.K : s.N), C("C", s.M, s.N);
          fill(A, rng, 1.0);
          fill(B, rng, 1.0);
          if (beta == 0.0)
            test::poison<T>(C);
          else
            fill(C, rng, 1.0);
          Vec a = test::from_view(A), b = test::from_view(B), c0 = test::from_view(C), ref(c0.size());
          double const alpha = 0.75;
          for (int m = 0; m < s.M; ++m)
            for (int n = 0; n < s.N; ++n) {
              double acc = 0;
              for (int k = 0; k < s.K; ++k)
                acc += (ta ? a[std::size_t(k) * s.M + m] : a[std::size_t(m) * s.K + k]) *
                       (tb ? b[std::size_t(n) * s.K + k] : b[std::size_t(k) * s.N + n]);
              ref[std::size_t(m) * s.N + n] = alpha * acc + (beta != 0.0 ? beta * c0[std::size_t(m) * s.N + n] : 0.0);
            }
          if (tiled)
            nn::dense_gemm_tiled(Space(), A, B, C, T(alpha), T(beta), ta != 0, tb != 0);
          else
            nn::dense_gemm(Space(), A, B, C, T(alpha), T(beta), ta != 0, tb != 0);
          Vec got = test::from_view(C);
          double const tol = std::is_same_v<T, double> ? 1e-13 : 1e-5 * std::max(1.0, std::sqrt(double(s.K)));
          EXPECT_LT(test::rel_error(got, ref, 1e-3), tol);
        }
  }
}

TEST(NN, DenseGemmFloat) { run_gemm<float>(false); }
TEST(NN, DenseGemmDouble) { run_gemm<double>(false); }
TEST(NN, DenseGemmTiledFloat) { run_gemm<float>(true); }
TEST(NN, DenseGemmTiledDouble) { run_gemm<double>(true); }

TEST(NN, DenseGemmRejectsMismatchedExtents) {
  V2<float> A("A", 4, 5), B("B", 6, 7), C("C", 4, 7);
  try {
    nn::dense_gemm(Space(), A, B, C);
    ADD_FAILURE() << "no exception";
  } catch (std::invalid_argument const &e) {
    EXPECT_NE(std::string(e.what()).find("A has 5 columns but B has 6 rows"), std::string::npos) << e.what();
  }
  V2<float> B2("B2", 5, 7), Cbad("C", 4, 8);
  try {
    nn::dense_gemm(Space(), A, B2, Cbad);
    ADD_FAILURE() << "no exception";
  } catch (std::invalid_argument const &e) {
    EXPECT_NE(std::string(e.what()).find("C is [4, 8], expected [4, 7]"), std::string::npos) << e.what();
  }
}

// The vectorisable float32 exp and erf of the host kernels against float64 libm.
TEST(NN, HostMathAccuracy) {
  double worst_exp = 0, worst_erf = 0, worst_gelu = 0, worst_grad = 0;
  for (double x = -87.0; x <= 88.0; x += 1.0 / 1024) {
    float const f = static_cast<float>(x);
    double const ref = std::exp(double(f));
    worst_exp = std::max(worst_exp, std::fabs(nn::fastmath::exp(f) - ref) / ref);
  }
  EXPECT_LT(worst_exp, 2e-7);
  EXPECT_EQ(nn::fastmath::exp(-1000.0f), nn::fastmath::exp(-87.0f));  // clamped, not garbage
  EXPECT_GT(nn::fastmath::exp(-1000.0f), 0.0f);
  for (double x = -7.0; x <= 7.0; x += 1.0 / 4096) {
    float const f = static_cast<float>(x);
    double const ref = std::erf(double(f));
    if (f != 0.0f) worst_erf = std::max(worst_erf, std::fabs(nn::fastmath::erf(f) - ref) / std::fabs(ref));
    double const g = test::act_ref(Activation::gelu, double(f));
    worst_gelu = std::max(worst_gelu, std::fabs(nn::gelu<true>(f) - g) / std::max(1.0, std::fabs(g)));
    double const d = 0.5 * (1 + std::erf(double(f) / std::sqrt(2.0))) +
                     double(f) * std::exp(-0.5 * double(f) * f) / std::sqrt(2 * M_PI);
    worst_grad = std::max(worst_grad, std::fabs(nn::gelu_grad<true>(f) - d) / std::max(1.0, std::fabs(d)));
  }
  EXPECT_LT(worst_erf, 3e-7);
  EXPECT_EQ(nn::fastmath::erf(0.0f), 0.0f);
  EXPECT_EQ(nn::fastmath::erf(100.0f), 1.0f);
  EXPECT_EQ(nn::fastmath::erf(-100.0f), -1.0f);
  EXPECT_LT(worst_gelu, 5e-7);
  EXPECT_LT(worst_grad, 5e-7);
}

TEST(NN, Linear) { check_module<LinearCase>({{70, 37, 53}, {200, 64, 192}}, {6, 5, 4}); }
TEST(NN, Gelu) { check_module<GeluCase>({{33, 17}}, {4, 5}); }
TEST(NN, LayerNorm) { check_module<LayerNormCase>({{50, 64}, {7, 3}}, {4, 7}); }
TEST(NN, MeanPool) { check_module<MeanPoolCase>({{5, 16, 24}}, {2, 3, 4}); }
TEST(NN, PatchEmbed) { check_module<PatchEmbedCase>({{3, 2, 12, 8, 4, 10}, {2, 1, 28, 28, 7, 16}}, {2, 2, 4, 6, 2, 3}); }
TEST(NN, Attention) {
  check_module<AttentionCase>({{3, 16, 32, 4}, {2, 49, 64, 2}, {2, 7, 24, 3}}, {2, 5, 8, 2});
}
TEST(NN, Mlp) { check_module<MlpCase>({{40, 24, 96}}, {5, 4, 8}); }

// Loss, accuracy, probabilities and dlogits against float64 loops; dlogits of
// the float64 module against central differences of the loss.
TEST(NN, CrossEntropy) {
  int const B = 37, C = 10;
  std::mt19937 rng(5);
  V2<float> logits("logits", B, C), dlogits("dlogits", B, C);
  fill(logits, rng, 2.0);
  Kokkos::View<int *, Mem> labels("labels", B);
  std::vector<int> lab(B);
  {
    auto h = Kokkos::create_mirror_view(labels);
    for (int b = 0; b < B; ++b) h(b) = lab[b] = static_cast<int>(rng() % C);
    Kokkos::deep_copy(labels, h);
  }
  Vec z = test::from_view(logits);
  double ref_loss = 0;
  int ref_correct = 0;
  Vec ref_p(z.size()), ref_d(z.size());
  double const scale = 0.5;
  for (int b = 0; b < B; ++b) {
    double mx = -1e300, s = 0;
    int arg = 0;
    for (int c = 0; c < C; ++c)
      if (z[b * C + c] > mx) mx = z[b * C + c], arg = c;
    for (int c = 0; c < C; ++c) s += std::exp(z[b * C + c] - mx);
    ref_loss += (std::log(s) + mx - z[b * C + lab[b]]) / B;
    ref_correct += arg == lab[b];
    for (int c = 0; c < C; ++c) {
      ref_p[b * C + c] = std::exp(z[b * C + c] - mx) / s;
      ref_d[b * C + c] = (ref_p[b * C + c] - (c == lab[b])) * scale / B;
    }
  }
  nn::CrossEntropy<Space> ce(Space{});
  test::poison<float>(dlogits);
  auto r = ce.forward(Space(), logits, labels);
  ce.backward(Space(), dlogits, scale);
  EXPECT_NEAR(r.loss, ref_loss, 1e-6 * std::fabs(ref_loss));
  EXPECT_EQ(r.correct, ref_correct);
  EXPECT_EQ(r.count, B);
  EXPECT_LT(test::rel_error(test::from_view(ce.probabilities()), ref_p), 1e-6);
  EXPECT_LT(test::rel_error(test::from_view(dlogits), ref_d), 1e-6);

  // Finite differences in float64.
  V2<double> zl = test::to_view<double>(z, V2<double>("zl", B, C)), dz("dz", B, C);
  nn::CrossEntropy<Space, double> ced(Space{});
  ced.forward(Space(), zl, labels);
  ced.backward(Space(), dz);
  Vec an = test::from_view(dz), fd(an.size());
  auto fz = flat_of(zl);
  double const h = 1e-5;
  for (std::size_t i = 0; i < fd.size(); ++i) {
    double const v = get(fz, i);
    set(fz, i, v + h);
    double const lp = ced.forward(Space(), zl, labels).loss;
    set(fz, i, v - h);
    double const lm = ced.forward(Space(), zl, labels).loss;
    set(fz, i, v);
    fd[i] = (lp - lm) / (2 * h);
  }
  EXPECT_LT(test::rel_error(an, fd), 1e-6);

  // A label out of range is refused.
  Kokkos::deep_copy(Kokkos::subview(labels, 3), C);
  try {
    ce.forward(Space(), logits, labels);
    ADD_FAILURE() << "no exception";
  } catch (std::invalid_argument const &e) {
    EXPECT_NE(std::string(e.what()).find("label 10 of row 3"), std::string::npos) << e.what();
  }
}

TEST(NN, ParametersNamesShapesDecay) {
  nn::Attention<Space> attn(Space(), 16, 2);
  nn::PatchEmbed<Space> pe(Space(), 1, 28, 28, 7, 16);
  nn::LayerNorm<Space> ln(Space(), 16, 1e-6);
  nn::Mlp<Space> mlp(Space(), 16, 64);
  auto p = attn.parameters("blocks.0.attn");
  auto q = pe.parameters("patch_embed");
  auto l = ln.parameters("norm");
  auto m = mlp.parameters("blocks.0.mlp");
  p.insert(p.end(), q.begin(), q.end());
  p.insert(p.end(), l.begin(), l.end());
  p.insert(p.end(), m.begin(), m.end());
  struct Want {
    char const *name;
    std::vector<std::size_t> shape;
    bool decay;
  };
  std::vector<Want> want = {{"blocks.0.attn.qkv.weight", {16, 48}, true},  {"blocks.0.attn.qkv.bias", {48}, false},
                            {"blocks.0.attn.proj.weight", {16, 16}, true}, {"blocks.0.attn.proj.bias", {16}, false},
                            {"patch_embed.proj.weight", {49, 16}, true},   {"patch_embed.proj.bias", {16}, false},
                            {"patch_embed.pos_embed", {16, 16}, false},    {"norm.weight", {16}, false},
                            {"norm.bias", {16}, false},                    {"blocks.0.mlp.fc1.weight", {16, 64}, true},
                            {"blocks.0.mlp.fc1.bias", {64}, false},        {"blocks.0.mlp.fc2.weight", {64, 16}, true},
                            {"blocks.0.mlp.fc2.bias", {16}, false}};
  ASSERT_EQ(p.size(), want.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    EXPECT_EQ(p[i].name, want[i].name);
    EXPECT_EQ(p[i].shape, want[i].shape) << want[i].name;
    EXPECT_EQ(p[i].decay, want[i].decay) << want[i].name;
    EXPECT_FALSE(p[i].expert);
    std::size_t n = 1;
    for (auto e : want[i].shape) n *= e;
    EXPECT_EQ(p[i].value.extent(0), n) << want[i].name;
    EXPECT_EQ(p[i].grad.extent(0), n) << want[i].name;
  }
  // LayerNorm starts at gamma = 1, beta = 0; init is deterministic per seed.
  Vec g = test::from_view(ln.weight), b = test::from_view(ln.bias);
  for (double v : g) EXPECT_EQ(v, 1.0);
  for (double v : b) EXPECT_EQ(v, 0.0);
  attn.init(42);
  Vec w1 = test::from_view(attn.qkv.weight);
  attn.init(43);
  Vec w2 = test::from_view(attn.qkv.weight);
  attn.init(42);
  Vec w3 = test::from_view(attn.qkv.weight);
  EXPECT_EQ(0, std::memcmp(w1.data(), w3.data(), w1.size() * sizeof(double)));
  EXPECT_NE(0, std::memcmp(w1.data(), w2.data(), w1.size() * sizeof(double)));
  double mean = 0, var = 0, mx = 0;
  for (double v : w1) mean += v / w1.size();
  for (double v : w1) var += (v - mean) * (v - mean) / w1.size(), mx = std::max(mx, std::fabs(v));
  EXPECT_NEAR(std::sqrt(var), 0.02 * 0.88, 0.002);  // std of N(0, 1) truncated to [-2, 2] is 0.88
  EXPECT_LE(mx, 0.04);
  for (double v : test::from_view(attn.qkv.bias)) EXPECT_EQ(v, 0.0);
}

TEST(NN, RejectsMismatchedExtents) {
  nn::Linear<Space> lin(Space(), 8, 4);
  V2<float> x("x", 10, 7), y("y", 10, 4);
  try {
    lin.forward(Space(), x, y);
    ADD_FAILURE() << "no exception";
  } catch (std::invalid_argument const &e) {
    EXPECT_NE(std::string(e.what()).find("x is [10, 7], expected [10, 8]"), std::string::npos) << e.what();
  }
  nn::Attention<Space> attn(Space(), 8, 2);
  V2<float> xa("xa", 10, 8), ya("ya", 10, 8);
  EXPECT_THROW(attn.forward(Space(), xa, ya, 3), std::invalid_argument);
  EXPECT_THROW(nn::Attention<Space>(Space(), 8, 3), std::invalid_argument);
  EXPECT_THROW(nn::PatchEmbed<Space>(Space(), 1, 28, 28, 5, 8), std::invalid_argument);
  nn::LayerNorm<Space> ln(Space(), 8);
  V2<float> dy("dy", 10, 8), dx("dx", 10, 8);
  EXPECT_THROW(ln.backward(Space(), dy, dx), std::invalid_argument);  // before forward
}

// A small ViT step (patch embedding, LayerNorm, attention, MLP, pooling, head,
// loss) twice from scratch: every output and gradient bit-identical.
TEST(NN, BitIdenticalAcrossRuns) {
  int const B = 6, L = 16, D = 32, classes = 10;
  std::mt19937 rng(9);
  V4<float> img("img", B, 1, 28, 28);
  fill(img, rng, 1.0);
  Kokkos::View<int *, Mem> labels("labels", B);
  {
    auto h = Kokkos::create_mirror_view(labels);
    for (int b = 0; b < B; ++b) h(b) = b % classes;
    Kokkos::deep_copy(labels, h);
  }
  auto once = [&] {
    Space s;
    nn::PatchEmbed<Space> pe(s, 1, 28, 28, 7, D);
    nn::LayerNorm<Space> ln(s, D, 1e-6);
    nn::Attention<Space> attn(s, D, 4);
    nn::Mlp<Space> mlp(s, D, 4 * D);
    nn::MeanPool<Space> pool(s);
    nn::Linear<Space> head(s, D, classes);
    nn::CrossEntropy<Space> ce(s);
    pe.init(1);
    attn.init(2);
    mlp.init(3);
    head.init(4);
    V2<float> t("t", B * L, D), n("n", B * L, D), a("a", B * L, D), m("m", B * L, D), p("p", B, D),
        z("z", B, classes);
    pe.forward(s, img, t);
    ln.forward(s, t, n);
    attn.forward(s, n, a, L);
    mlp.forward(s, a, m);
    pool.forward(s, m, p);
    head.forward(s, p, z);
    auto r = ce.forward(s, z, labels);
    V2<float> dz("dz", B, classes), dp("dp", B, D), dm("dm", B * L, D), da("da", B * L, D), dn("dn", B * L, D),
        dt("dt", B * L, D);
    ce.backward(s, dz);
    head.backward(s, dz, dp);
    pool.backward(s, dp, dm);
    mlp.backward(s, dm, da);
    attn.backward(s, da, dn);
    ln.backward(s, dn, dt);
    pe.backward(s, dt, {});
    Vec all = {r.loss};
    for (auto const &v : {test::from_view(z), test::from_view(m), test::from_view(dt)}) all.insert(all.end(), v.begin(), v.end());
    std::vector<Parameter<Mem>> ps;
    for (auto const &q : {pe.parameters("pe"), ln.parameters("ln"), attn.parameters("attn"), mlp.parameters("mlp"),
                          head.parameters("head")})
      ps.insert(ps.end(), q.begin(), q.end());
    for (auto const &q : ps) {
      Vec g = test::from_view(q.grad);
      all.insert(all.end(), g.begin(), g.end());
    }
    return all;
  };
  Vec first = once(), second = once();
  ASSERT_EQ(first.size(), second.size());
  EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(double)));
  bool nonzero = false;
  for (std::size_t i = 1; i < first.size(); ++i) nonzero = nonzero || first[i] != 0.0;
  EXPECT_TRUE(nonzero);
}

}  // namespace
