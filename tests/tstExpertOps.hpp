// tstExpertOps.hpp: ESMM, ESS and ESTMM against an independent float64 dense
// reference, for float, bfloat16 and double storage.
//
// Error bound (asserted per element): the operands are drawn in float64 and
// stored in T (unit roundoff u_s: 2^-24 float, 2^-8 bfloat16, 2^-53 double),
// accumulated in Acc (u_a: 2^-24 float, 2^-53 double) over K terms, and the
// result is stored in T again. Hence
//   |y - y_ref| <= L * ((2 u_s + (K + 2) u_a) * sum_k |x_k w_k| + u_s |y_ref|) + 8 u_a |y_ref|
// with L = 1.2 bounding |act'| (gelu, silu, relu) when an activation is applied.
//
// float32 on CUDA runs each way the operators offer (HEXAMOE_F32_MATH), with
// the bound of that arithmetic:
// - fma: as above;
// - tf32x3: x = hi + lo + d with hi = tf32(x) rounded to nearest,
//   |x - hi| <= 2^-11 |x|, and lo = x - hi read by the tensor cores with its
//   low 13 bits dropped: |d| < 2^-10 |lo| <= 2^-21 |x| = 8 u_a |x|; the
//   products hi*hi' + hi*lo' + lo*hi' miss lo*lo' (<= 2^-22 = 4 u_a) and the
//   d terms: at most 21 u_a per |x_k w_k| with the second-order terms. Each
//   k step of 8 is summed on the tensor cores from zero (three products per
//   term, 24 additions that may truncate: 2 u_a each) and added to the
//   accumulator in float32 (K / 8 rounded additions), plus up to 4 more for
//   the ESTMM partial sums: (K / 8 + 2) u_a + 52 u_a per |x_k w_k|;
// - tf32: one tf32 product, 2 * 2^-11 per |x_k w_k|, accumulated on the tensor
//   cores over all of K (K additions at 2 u_a each).
#include "Reference.hpp"
#include "core/Estmm.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <iomanip>
#include <sstream>

namespace {

using namespace hexamoe;
using test::Vec;
using Space = TEST_EXECSPACE;
using Mem = TEST_MEMSPACE;
template <class T>
using V2 = Kokkos::View<T **, Kokkos::LayoutRight, Mem>;
template <class T>
using V3 = Kokkos::View<T ***, Kokkos::LayoutRight, Mem>;

template <class T>
double storage_roundoff() {
  if constexpr (std::is_same_v<T, double>) return std::ldexp(1.0, -53);
  if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -24);
  return std::ldexp(1.0, -8);  // 8 significant bits
}
template <class T>
double acc_roundoff() {
  return std::is_same_v<T, double> ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}

struct Shape {
  int T, k, E, K, N;
  bool skewed;
};

// The arithmetic of float32 expert GEMMs under test (see the file comment).
struct Float32Arith {
  double product = 0;        // error per |x_k w_k| from the operands' rounding
  double adds_per_term = 1;  // accumulator additions per reduction term
  double acc_scale = 1;      // accumulation roundoff in units of u_a
  double block = 0;          // further roundoff per |x_k w_k| (in u_a) inside blocks of terms
};
Float32Arith float32_arith;

// Compare value by value against the reference and its bound; count failures.
template <class T>
void expect_within(Vec const &got, Vec const &ref, Vec const &abssum, int K, double lip, char const *what) {
  double const us = storage_roundoff<T>(), ua = acc_roundoff<T>();
  Float32Arith const ar = std::is_same_v<T, float> ? float32_arith : Float32Arith{};
  double const per_term = 2 * us + ar.product + (ar.adds_per_term * K + 2) * ar.acc_scale * ua + ar.block * ua;
  int bad = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    double const bound = lip * (per_term * abssum[i] + us * std::fabs(ref[i])) + 8 * ua * std::fabs(ref[i]) + 1e-300;
    double const err = std::fabs(got[i] - ref[i]);
    if (!(err <= bound)) {
      if (bad < 5) ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", reference " << ref[i] << ", bound " << bound;
      ++bad;
    }
    worst = std::max(worst, err / (bound > 0 ? bound : 1));
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size() << " elements outside the bound";
}

template <class T>
struct Problem {
  using Acc = accumulator_t<T>;
  Shape s;
  std::vector<int> ids;
  Vec x, w, b, g, dy;  // float64 operands as drawn
  RoutingIndex<Mem> R;
  V2<T> x_d, dy_d;
  V3<T> w_d;
  V2<T> b_d;
  Kokkos::View<Acc *, Mem> g_d;
  std::vector<int> pos;  // sorted position of every flat id

  explicit Problem(Shape sh, unsigned seed) : s(sh) {
    std::mt19937 rng(seed);
    ids = test::random_routing(s.T, s.k, s.E, rng, s.skewed);
    x = test::random_vec(std::size_t(s.T) * s.K, rng);
    w = test::random_vec(std::size_t(s.E) * s.K * s.N, rng, 1.0 / std::sqrt(double(s.K)));
    b = test::random_vec(std::size_t(s.E) * s.N, rng, 0.1);
    dy = test::random_vec(std::size_t(s.T) * s.N, rng);
    std::uniform_real_distribution<double> u(0.05, 1.0);
    g.resize(std::size_t(s.T) * s.k);
    for (auto &v : g) v = static_cast<double>(static_cast<Acc>(u(rng)));
    Kokkos::View<int **, Kokkos::LayoutRight, Mem> ids_d("ids", s.T, s.k);
    auto h = Kokkos::create_mirror_view(ids_d);
    for (std::size_t i = 0; i < ids.size(); ++i) h.data()[i] = ids[i];
    Kokkos::deep_copy(ids_d, h);
    R = build_routing_index(Space(), Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_d), s.E);
    auto ph = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.position);
    pos.assign(ph.data(), ph.data() + ph.extent(0));
    x_d = test::to_view<T>(x, V2<T>("x", s.T, s.K));
    dy_d = test::to_view<T>(dy, V2<T>("dy", s.T, s.N));
    w_d = test::to_view<T>(w, V3<T>("w", s.E, s.K, s.N));
    b_d = test::to_view<T>(b, V2<T>("b", s.E, s.N));
    g_d = test::to_view<Acc>(g, Kokkos::View<Acc *, Mem>("g", g.size()));
  }
  int S() const { return s.T * s.k; }
  double W(int e, int kk, int n) const { return w[(std::size_t(e) * s.K + kk) * s.N + n]; }
};

// (sorted: A's rows are a copy of x in sorted order, read as sorted rows.)
template <class T>
void run_esmm_forward(Shape sh, Activation act, unsigned seed, bool sorted = false) {
  Problem<T> P(sh, seed);
  int const S = P.S(), K = sh.K, N = sh.N;
  V2<T> xs_d;
  if (sorted) {
    Vec xs(std::size_t(S) * K);
    for (int f = 0; f < S; ++f)
      std::copy_n(P.x.begin() + std::size_t(f / sh.k) * K, K, xs.begin() + std::size_t(P.pos[f]) * K);
    xs_d = test::to_view<T>(xs, V2<T>("xs", S, K));
  }
  auto const rows = sorted ? sorted_rows(V2<T const>(xs_d)) : token_rows(V2<T const>(P.x_d));
  V2<T> pre("pre", S, N), post("post", S, N);
  test::poison<T>(pre);
  test::poison<T>(post);
  EsmmEpilogue<T, Mem> ep;
  ep.act = act;
  ep.pre = pre;
  ep.post = post;
  esmm(Space(), P.R, rows, V3<T const>(P.w_d), false, V2<T const>(P.b_d), ep);
  Vec got_pre = test::from_view(pre), got_post = test::from_view(post);
  Vec ref_pre(std::size_t(S) * N), ref_post(ref_pre.size()), abssum(ref_pre.size());
  Vec rpre(ref_pre.size()), rpost(ref_pre.size());
  for (int f = 0; f < S; ++f) {
    int const t = f / sh.k, e = P.ids[f], p = P.pos[f];
    for (int n = 0; n < N; ++n) {
      double z = P.b[std::size_t(e) * N + n], a = std::fabs(z);
      for (int kk = 0; kk < K; ++kk) {
        z += P.x[std::size_t(t) * K + kk] * P.W(e, kk, n);
        a += std::fabs(P.x[std::size_t(t) * K + kk] * P.W(e, kk, n));
      }
      std::size_t const i = std::size_t(p) * N + n;
      rpre[i] = z;
      rpost[i] = test::act_ref(act, z);
      abssum[i] = a;
    }
  }
  expect_within<T>(got_pre, rpre, abssum, K, 1.0, "esmm pre-activation");
  expect_within<T>(got_post, rpost, abssum, K, 1.2, "esmm post-activation");
  // The inference epilogue: the post-activation alone (no pre stored).
  V2<T> post_only("post_only", S, N);
  test::poison<T>(post_only);
  EsmmEpilogue<T, Mem> ep2;
  ep2.act = act;
  ep2.post = post_only;
  esmm(Space(), P.R, rows, V3<T const>(P.w_d), false, V2<T const>(P.b_d), ep2);
  expect_within<T>(test::from_view(post_only), rpost, abssum, K, 1.2, "esmm post-activation without pre");
}

// Backward shape: rows times W^T (W is [E, K, N], so W^T maps N -> K), then
// times act'(z). The rows are sorted rows [S, N] (z-like), or with gated the
// layer's dz1 operand: token rows of dy scaled by the gates (g dy, read
// through the index), out[p] = (g_p dy[t_p] W^T) act'(z_p).
template <class T>
void run_esmm_transposed_actgrad(Shape sh, unsigned seed, bool gated = false) {
  using Acc = accumulator_t<T>;
  Problem<T> P(sh, seed);
  int const S = P.S(), K = sh.K, N = sh.N;
  std::mt19937 rng(seed + 100);
  Vec xs = test::random_vec(std::size_t(S) * N, rng);  // sorted rows with N columns
  Vec zs = test::random_vec(std::size_t(S) * K, rng);  // act' arguments
  V2<T> xs_d = test::to_view<T>(xs, V2<T>("xs", S, N));
  V2<T> zs_d = test::to_view<T>(zs, V2<T>("zs", S, K));
  V2<T> out("out", S, K);
  test::poison<T>(out);
  EsmmEpilogue<T, Mem> ep;
  ep.act = Activation::gelu;
  ep.act_grad_of = zs_d;
  ep.pre = out;
  auto const rows = gated ? gated_token_rows(V2<T const>(P.dy_d), Kokkos::View<Acc const *, Mem>(P.g_d))
                          : sorted_rows(V2<T const>(xs_d));
  esmm(Space(), P.R, rows, V3<T const>(P.w_d), true, V2<T const>(), ep);
  Vec got = test::from_view(out), ref(got.size()), abssum(got.size());
  Vec zr = test::rounded<T>(zs);
  for (int p = 0; p < S; ++p) {
    int const f = test::from_view(Kokkos::subview(P.R.sorted_flat, std::make_pair(p, p + 1)))[0];
    int const e = P.ids[f], t = f / sh.k;
    for (int kk = 0; kk < K; ++kk) {
      double v = 0, a = 0;
      for (int n = 0; n < N; ++n) {
        double const xv = gated ? P.g[f] * P.dy[std::size_t(t) * N + n] : xs[std::size_t(p) * N + n];
        v += xv * P.W(e, kk, n);
        a += std::fabs(xv * P.W(e, kk, n));
      }
      double const zz = zr[std::size_t(p) * K + kk];
      double const d = 0.5 * (1 + std::erf(zz / std::sqrt(2.0))) + zz * std::exp(-0.5 * zz * zz) / std::sqrt(2 * M_PI);
      ref[std::size_t(p) * K + kk] = v * d;
      // act' (terms of size <= 1) is evaluated in Acc: its absolute error counts against |v|.
      abssum[std::size_t(p) * K + kk] = a * std::fabs(d) + std::fabs(v);
    }
  }
  expect_within<T>(got, ref, abssum, N, 1.0, gated ? "esmm gated rows, transposed, x act'" : "esmm transposed x act'");
}

// Top-1 fused combine: y[t] = g[t] * act(x[t] W[e_t] + b[e_t]), each row written once.
template <class T>
void run_esmm_token_out(Shape sh, unsigned seed) {
  sh.k = 1;
  Problem<T> P(sh, seed);
  int const K = sh.K, N = sh.N;
  V2<T> y("y", sh.T, N);
  test::poison<T>(y);
  EsmmEpilogue<T, Mem> ep;
  ep.act = Activation::relu;
  ep.token_out = y;
  ep.token_gate = P.g_d;
  esmm(Space(), P.R, token_rows(V2<T const>(P.x_d)), V3<T const>(P.w_d), false, V2<T const>(P.b_d), ep);
  Vec got = test::from_view(y), ref(got.size()), abssum(got.size());
  for (int t = 0; t < sh.T; ++t) {
    int const e = P.ids[t];
    for (int n = 0; n < N; ++n) {
      double z = P.b[std::size_t(e) * N + n], a = std::fabs(z);
      for (int kk = 0; kk < K; ++kk) {
        z += P.x[std::size_t(t) * K + kk] * P.W(e, kk, n);
        a += std::fabs(P.x[std::size_t(t) * K + kk] * P.W(e, kk, n));
      }
      ref[std::size_t(t) * N + n] = P.g[t] * (z > 0 ? z : 0);
      abssum[std::size_t(t) * N + n] = P.g[t] * a;
    }
  }
  expect_within<T>(got, ref, abssum, K, 1.2, "esmm fused top-1 combine");
}

// ESTMM(x gathered, g*dy gathered) with fused ESS, and standalone ESS.
// gated: dy rows scaled by the gates (as in the layer's dW2), else plain (dW1).
template <class T>
void run_estmm(Shape sh, unsigned seed, bool gated = true) {
  using Acc = accumulator_t<T>;
  Problem<T> P(sh, seed);
  if (!gated)
    for (auto &v : P.g) v = 1.0;
  int const E = sh.E, M = sh.K, N = sh.N, S = P.S();
  V3<Acc> gw("gw", E, M, N);
  V2<Acc> gb("gb", E, N), gb2("gb2", E, N);
  test::poison<Acc>(gw);
  test::poison<Acc>(gb);
  test::poison<Acc>(gb2);
  auto gate = Kokkos::View<Acc const *, Mem>(P.g_d);
  auto const dy = gated ? gated_token_rows(V2<T const>(P.dy_d), gate) : token_rows(V2<T const>(P.dy_d));
  estmm(Space(), P.R, token_rows(V2<T const>(P.x_d)), dy, gw, gb);
  ess(Space(), P.R, dy, gb2);
  Vec rw(std::size_t(E) * M * N, 0.0), aw(rw.size(), 0.0), rb(std::size_t(E) * N, 0.0), ab(rb.size(), 0.0);
  std::vector<int> cnt(E, 0);
  for (int f = 0; f < S; ++f) {
    int const t = f / sh.k, e = P.ids[f];
    ++cnt[e];
    for (int n = 0; n < N; ++n) {
      double const d = P.g[f] * P.dy[std::size_t(t) * N + n];
      rb[std::size_t(e) * N + n] += d;
      ab[std::size_t(e) * N + n] += std::fabs(d);
      for (int m = 0; m < M; ++m) {
        rw[(std::size_t(e) * M + m) * N + n] += P.x[std::size_t(t) * M + m] * d;
        aw[(std::size_t(e) * M + m) * N + n] += std::fabs(P.x[std::size_t(t) * M + m] * d);
      }
    }
  }
  int const kmax = std::max(1, *std::max_element(cnt.begin(), cnt.end()));
  expect_within<T>(test::from_view(gw), rw, aw, kmax, 1.0, "estmm");
  expect_within<T>(test::from_view(gb), rb, ab, kmax, 1.0, "estmm fused ess");
  expect_within<T>(test::from_view(gb2), rb, ab, kmax, 1.0, "ess");
  // Experts without assignments must read exactly zero (not uninitialised).
  auto hw = test::from_view(gw);
  for (int e = 0; e < E; ++e) {
    if (cnt[e] != 0) continue;
    for (int i = 0; i < M * N; ++i) ASSERT_EQ(hw[std::size_t(e) * M * N + i], 0.0) << "empty expert " << e;
  }
}

// Shapes: tile-unaligned extents, E = 1, k = E, empty experts, heavy skew.
std::vector<Shape> const shapes = {
    {97, 2, 8, 37, 53, false},   // nothing a multiple of a tile
    {200, 1, 1, 64, 64, false},  // E = 1, aligned extents
    {60, 4, 4, 19, 130, false},  // k = E
    {7, 1, 16, 24, 17, true},    // most experts empty
    {301, 2, 8, 131, 70, true},  // skewed, K past one host chunk
    // Extents that are multiples of 8 (16-byte bf16 rows: the asynchronous
    // copies of the device kernels) but not of the tiles or k steps, the last
    // with reductions of over 256 (ESMM forward over K = 272, transposed over
    // N = 264). Device ESTMMs split the positions of {200, 1, 1, ...} and
    // {333, 2, 8, ...} into ranges.
    {333, 2, 8, 40, 72, true},
    {150, 1, 3, 272, 264, false},
    // Full 128 x 128 device tiles with K and N multiples of 16 (the staging
    // without per-element bounds), forward and transposed.
    {520, 1, 2, 144, 160, false},
    // Host teams of several row tiles sharing each staged chunk of W (ESMM on a
    // host with up to three threads, test HostRowGroupsAreCovered): groups
    // cut off inside an expert, a second chunk of K shorter than the first.
    {1600, 1, 2, 136, 130, true},
};

template <class T>
void run_all(char const *name) {
  unsigned seed = 1;
  for (auto const &sh : shapes) {
    SCOPED_TRACE(std::string(name) + " T=" + std::to_string(sh.T) + " k=" + std::to_string(sh.k) + " E=" +
                 std::to_string(sh.E) + " K=" + std::to_string(sh.K) + " N=" + std::to_string(sh.N));
    run_esmm_forward<T>(sh, Activation::gelu, seed++);
    run_esmm_forward<T>(sh, Activation::silu, seed++);
    run_esmm_forward<T>(sh, Activation::gelu, seed++, /*sorted=*/true);
    run_esmm_transposed_actgrad<T>(sh, seed++);
    run_esmm_transposed_actgrad<T>(sh, seed++, /*gated=*/true);
    run_esmm_token_out<T>(sh, seed++);
    run_estmm<T>(sh, seed++);
    run_estmm<T>(sh, seed++, /*gated=*/false);
  }
}

// The asynchronous-copy settings whose bf16 kernels differ on this backend:
// on CUDA the default (asynchronous copies of every aligned bf16 operand) and
// HEXAMOE_ASYNC_COPY=0 (every operand through registers, the path of
// unaligned rows), so that both are held to the float64 references on the
// same shapes; elsewhere (and for float32) the setting changes nothing.
std::vector<detail::dev::AsyncCopies> async_settings() {
  using detail::dev::AsyncCopies;
  if (detail::dev::has_cuda_tensor_cores<Space>) return {AsyncCopies::bf16, AsyncCopies::none};
  return {detail::dev::async_copy_setting()};
}
char const *async_name(detail::dev::AsyncCopies a) {
  return a == detail::dev::AsyncCopies::none ? "HEXAMOE_ASYNC_COPY=0" : "default copies";
}

// The tail split of the device ESMM on the tensor cores (one full wave of
// tiles and a second at most half full: the second wave's tiles run as two
// teams over the halves of K, see dev::tail_slots), bf16 and float32
// (3xtf32): small slot counts make these small problems split (forward
// tiles 12 and 9: 12 split with 8 and 10 slots, 9 with 8 and 7; the others
// do not). Other backends ignore it.
TEST(ExpertOps, TailSplitAgainstFloat64Reference) {
  using detail::dev::Float32Math;
  std::vector<Shape> const split_shapes = {{600, 1, 2, 64, 256, false}, {150, 1, 3, 272, 264, false}};
  bool const tensor_cores = detail::dev::has_cuda_tensor_cores<Space>;
  Float32Math const saved = detail::dev::float32_math();
  if (tensor_cores) {
    detail::dev::float32_math() = Float32Math::tf32x3;
    float32_arith = {21 * std::ldexp(1.0, -24), 1.0 / 8, 1, 52};
  }
  auto const saved_async = detail::dev::async_copy_setting();
  for (auto const async : async_settings()) {
    detail::dev::async_copy_setting() = async;
    unsigned seed = 900;
    for (int slots : {5, 8, 10, 4, 7}) {
      detail::dev::tail_slots_override() = slots;
      for (auto const &sh : split_shapes) {
        SCOPED_TRACE(std::string(async_name(async)) + " slots=" + std::to_string(slots) + " T=" + std::to_string(sh.T) +
                     " E=" + std::to_string(sh.E) + " K=" + std::to_string(sh.K) + " N=" + std::to_string(sh.N));
        run_esmm_forward<bfloat16>(sh, Activation::gelu, seed++);
        run_esmm_transposed_actgrad<bfloat16>(sh, seed++);
        run_esmm_token_out<bfloat16>(sh, seed++);
        run_esmm_forward<float>(sh, Activation::gelu, seed++);
        run_esmm_transposed_actgrad<float>(sh, seed++);
        run_esmm_token_out<float>(sh, seed++);
      }
    }
  }
  detail::dev::async_copy_setting() = saved_async;
  detail::dev::tail_slots_override() = 0;
  detail::dev::float32_math() = saved;
  float32_arith = {};
  if (tensor_cores) {
    EXPECT_GT(detail::dev::tail_workspace<Mem>(0, 0).first.extent(0), 0u) << "the split path was never launched";
  }
}

// Every float32 arithmetic this backend has (one on backends without tensor cores).
TEST(ExpertOps, Float32AgainstFloat64Reference) {
  using detail::dev::Float32Math;
  Float32Math const saved = detail::dev::float32_math();
  bool const tensor_cores = detail::dev::has_cuda_tensor_cores<Space>;
  double const u = std::ldexp(1.0, -24);
  std::vector<std::pair<Float32Math, Float32Arith>> modes = {{Float32Math::fma, {}}};
  if (tensor_cores) {
    modes.push_back({Float32Math::tf32x3, {21 * u, 1.0 / 8, 1, 52}});
    modes.push_back({Float32Math::tf32, {std::ldexp(1.0, -10), 1, 2, 0}});
  }
  for (auto const &[mode, arith] : modes) {
    detail::dev::float32_math() = mode;
    float32_arith = arith;
    run_all<float>(mode == Float32Math::fma ? "float (fma)" : mode == Float32Math::tf32x3 ? "float (tf32x3)" : "float (tf32)");
  }
  detail::dev::float32_math() = saved;
  float32_arith = {};
}

TEST(ExpertOps, Float32MathSettingIsChecked) {
  using detail::dev::Float32Math;
  using detail::dev::parse_float32_math;
  EXPECT_EQ(parse_float32_math(nullptr), Float32Math::tf32x3);
  EXPECT_EQ(parse_float32_math(""), Float32Math::tf32x3);
  EXPECT_EQ(parse_float32_math("fma"), Float32Math::fma);
  EXPECT_EQ(parse_float32_math("tf32"), Float32Math::tf32);
  EXPECT_EQ(parse_float32_math("tf32x3"), Float32Math::tf32x3);
  try {
    parse_float32_math("fp16");
    ADD_FAILURE() << "an unknown HEXAMOE_F32_MATH value was accepted";
  } catch (std::invalid_argument const &e) {
    EXPECT_NE(std::string(e.what()).find("HEXAMOE_F32_MATH='fp16'"), std::string::npos) << e.what();
  }
}
// A long reduction of positive terms: additions rounded to nearest err either
// way, so their sum stays near sqrt(K) u of the result, while an accumulator
// that truncates errs one way every time, about K u. At K = 4096 each float32
// arithmetic with float32 accumulation (fma, and tf32x3 with its rounded
// block sums) must stay within 256 u = 2^-16 of float64 on float-stored
// operands; summing the whole reduction on the tensor cores, as tf32x3 once
// did, measured 4.9e-5 here on an H200 (the file comment's bounds allow both).
TEST(ExpertOps, Float32LongReductionStaysNearFloat64) {
  using detail::dev::Float32Math;
  int const T = 64, E = 2, K = 4096, N = 32;
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> pos(0.5, 1.0);
  Vec x(std::size_t(T) * K), w(std::size_t(E) * K * N);
  for (auto &v : x) v = static_cast<double>(static_cast<float>(pos(rng)));
  for (auto &v : w) v = static_cast<double>(static_cast<float>(pos(rng) / K));
  Kokkos::View<int **, Kokkos::LayoutRight, Mem> ids_d("ids", T, 1);
  auto ids_h = Kokkos::create_mirror_view(ids_d);
  for (int t = 0; t < T; ++t) ids_h(t, 0) = t % E;
  Kokkos::deep_copy(ids_d, ids_h);
  auto R = build_routing_index(Space(), Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_d), E);
  auto pos_h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.position);
  V2<float> x_d = test::to_view<float>(x, V2<float>("x", T, K));
  V3<float> w_d = test::to_view<float>(w, V3<float>("w", E, K, N));
  Vec ref(std::size_t(T) * N);
  for (int t = 0; t < T; ++t)
    for (int n = 0; n < N; ++n) {
      double z = 0;
      for (int kk = 0; kk < K; ++kk) z += x[std::size_t(t) * K + kk] * w[(std::size_t(t % E) * K + kk) * N + n];
      ref[std::size_t(t) * N + n] = z;
    }
  Float32Math const saved = detail::dev::float32_math();
  std::vector<Float32Math> modes = {Float32Math::fma};
  if (detail::dev::has_cuda_tensor_cores<Space>) modes.push_back(Float32Math::tf32x3);
  for (Float32Math const mode : modes) {
    detail::dev::float32_math() = mode;
    V2<float> out("out", T, N);
    test::poison<float>(out);
    EsmmEpilogue<float, Mem> ep;
    ep.pre = out;
    esmm(Space(), R, token_rows(V2<float const>(x_d)), V3<float const>(w_d), false, V2<float const>(), ep);
    Vec const got = test::from_view(out);
    double worst = 0;
    for (int t = 0; t < T; ++t)
      for (int n = 0; n < N; ++n) {
        double const r = ref[std::size_t(t) * N + n];
        double const e = std::fabs(got[std::size_t(pos_h(t)) * N + n] - r) / r;
        if (!(e <= worst)) worst = e;  // (a NaN sticks)
      }
    EXPECT_LE(worst, std::ldexp(1.0, -16)) << (mode == Float32Math::fma ? "fma" : "tf32x3");
  }
  detail::dev::float32_math() = saved;
}

// The default copies the gate-scaled bf16 ESTMM operand (dW2's g dy)
// asynchronously and scales it as its fragments are read; with
// HEXAMOE_ASYNC_COPY=stored it is scaled as it is staged through registers.
// Both multiply the same products in the same order, so the two settings
// must give the same bits in every output (they differ in no other kernel;
// both also meet the float64 bounds of the reference tests). With and
// without the tail split. (Both settings run the same kernels on backends
// without tensor cores.)
template <class T>
void run_async_matches_staged(unsigned seed) {
  using Acc = accumulator_t<T>;
  std::vector<Shape> const cases = {{333, 2, 8, 40, 72, true}, {520, 1, 2, 144, 160, false}, {150, 1, 3, 272, 264, false}};
  for (auto const &sh : cases) {
    SCOPED_TRACE("K=" + std::to_string(sh.K) + " N=" + std::to_string(sh.N));
    Problem<T> P(sh, seed++);
    int const S = P.S();
    std::mt19937 rng(seed++);
    V2<T> zs = test::to_view<T>(test::random_vec(std::size_t(S) * sh.K, rng), V2<T>("zs", S, sh.K));
    auto gate = Kokkos::View<Acc const *, Mem>(P.g_d);
    auto run = [&](detail::dev::AsyncCopies async, int slots) {
      detail::dev::async_copy_setting() = async;
      detail::dev::tail_slots_override() = slots;
      V2<T> pre("pre", S, sh.N), post("post", S, sh.N), dz("dz", S, sh.K);
      V3<Acc> gw("gw", sh.E, sh.K, sh.N), gw2("gw2", sh.E, sh.K, sh.N);
      V2<Acc> gb("gb", sh.E, sh.N), gb2("gb2", sh.E, sh.N);
      EsmmEpilogue<T, Mem> ep;
      ep.act = Activation::gelu;
      ep.pre = pre;
      ep.post = post;
      esmm(Space(), P.R, token_rows(V2<T const>(P.x_d)), V3<T const>(P.w_d), false, V2<T const>(P.b_d), ep);
      EsmmEpilogue<T, Mem> et;
      et.act = Activation::gelu;
      et.act_grad_of = zs;
      et.pre = dz;
      esmm(Space(), P.R, gated_token_rows(V2<T const>(P.dy_d), gate), V3<T const>(P.w_d), true, V2<T const>(), et);
      estmm(Space(), P.R, token_rows(V2<T const>(P.x_d)), gated_token_rows(V2<T const>(P.dy_d), gate), gw, gb);
      estmm(Space(), P.R, token_rows(V2<T const>(P.x_d)), token_rows(V2<T const>(P.dy_d)), gw2, gb2);
      return std::vector<Vec>{test::from_view(pre), test::from_view(post), test::from_view(dz), test::from_view(gw),
                              test::from_view(gb),  test::from_view(gw2),  test::from_view(gb2)};
    };
    char const *const names[] = {"ESMM pre-activation", "ESMM output",  "ESMM^T with act'",   "gated ESTMM",
                                 "gated ESTMM's ESS",   "plain ESTMM", "plain ESTMM's ESS"};
    // Without the tail split, and with 8 and 11 slots, which split the
    // launches of 9 tiles (K = 272, forward) and 12 tiles (K = 144, 160).
    for (int slots : {0, 8, 11}) {
      std::vector<Vec> const staged = run(detail::dev::AsyncCopies::stored_bf16, slots);
      std::vector<Vec> const async = run(detail::dev::AsyncCopies::bf16, slots);
      for (std::size_t o = 0; o < staged.size(); ++o) {
        ASSERT_EQ(staged[o].size(), async[o].size());
        std::size_t diff = 0, first = staged[o].size();
        for (std::size_t i = 0; i < staged[o].size(); ++i)
          if (std::memcmp(&staged[o][i], &async[o][i], sizeof(double)) != 0 && diff++ == 0) first = i;
        std::ostringstream at;
        if (diff)
          at << "; first at " << first << ": " << std::setprecision(17) << staged[o][first] << " staged, "
             << async[o][first] << " asynchronous";
        EXPECT_EQ(diff, 0u) << names[o] << ": of " << staged[o].size() << " values differ (slots " << slots << ")"
                            << at.str();
      }
    }
  }
}

TEST(ExpertOps, GatedAsyncCopiesMatchRegisterStaging) {
  auto const saved_async = detail::dev::async_copy_setting();
  int const saved_slots = detail::dev::tail_slots_override();
  run_async_matches_staged<bfloat16>(51);
  detail::dev::async_copy_setting() = saved_async;
  detail::dev::tail_slots_override() = saved_slots;
}

TEST(ExpertOps, AsyncCopySettingIsChecked) {
  using detail::dev::AsyncCopies;
  using detail::dev::parse_async_copies;
  EXPECT_EQ(parse_async_copies(nullptr), AsyncCopies::bf16);  // the default
  EXPECT_EQ(parse_async_copies(""), AsyncCopies::bf16);
  EXPECT_EQ(parse_async_copies("1"), AsyncCopies::bf16);
  EXPECT_EQ(parse_async_copies("0"), AsyncCopies::none);
  EXPECT_EQ(parse_async_copies("stored"), AsyncCopies::stored_bf16);
  // "all" asked for the removed float32 path too: an error, not a silent change.
  for (char const *bad : {"yes", "all"}) {
    try {
      parse_async_copies(bad);
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (std::invalid_argument const &e) {
      EXPECT_NE(std::string(e.what()).find("HEXAMOE_ASYNC_COPY='" + std::string(bad) + "'"), std::string::npos)
          << e.what();
    }
  }
}

// The bf16 ESMM kernels on Hopper with sm_90a machine code: the
// warp-specialized kernel (core/EsmmHopper.hpp) where A's rows are the
// sorted positions (the default; gathered rows take the team kernel), and
// the team kernel alone (HEXAMOE_ESMM_WS=0). Elsewhere the settings change
// nothing: one run.
struct WsSetting {
  bool on;
  detail::dev::WsGather gather;
  char const *name;
};
std::vector<WsSetting> ws_settings() {
  using detail::dev::WsGather;
  if (!detail::dev::wgmma_in_use(Space()))
    return {{detail::dev::esmm_ws_enabled(), detail::dev::ws_gather(), "the backend's kernels"}};
  return {{true, WsGather::sort, "warp-specialized kernel for sorted rows (the default)"},
          {false, WsGather::team, "team kernel (HEXAMOE_ESMM_WS=0)"}};
}
struct WsRestore {
  bool on = detail::dev::esmm_ws_enabled();
  detail::dev::WsGather gather = detail::dev::ws_gather();
  ~WsRestore() {
    detail::dev::esmm_ws_enabled() = on;
    detail::dev::ws_gather() = gather;
  }
};

TEST(ExpertOps, BFloat16AgainstFloat64Reference) {
  auto const saved_async = detail::dev::async_copy_setting();
  WsRestore const saved_ws;
  for (auto const async : async_settings()) {
    detail::dev::async_copy_setting() = async;
    // (The register-staged copies never run the warp-specialized kernel.)
    auto const ws = async == detail::dev::AsyncCopies::none ? std::vector<WsSetting>{ws_settings().back()}
                                                            : ws_settings();
    for (auto const &w : ws) {
      detail::dev::esmm_ws_enabled() = w.on;
      detail::dev::ws_gather() = w.gather;
      run_all<bfloat16>((std::string("bfloat16, ") + async_name(async) + ", " + w.name).c_str());
    }
  }
  detail::dev::async_copy_setting() = saved_async;
  if (detail::dev::has_cuda_tensor_cores<Space>) {  // the FMA kernel of GPUs before compute capability 8.0
    detail::dev::bf16_fma_for_tests() = true;
    run_all<bfloat16>("bfloat16, FMA kernel");
    detail::dev::bf16_fma_for_tests() = false;
  }
}
TEST(ExpertOps, Float64AgainstFloat64Reference) { run_all<double>("double"); }

// Many tiles a block, A's rows sorted: the warp-specialized kernel on 1, 2
// and 5 blocks (dev::ws_blocks_override), so that each block's stage ring
// of six and its ring of four tiles' information wrap many times, its two
// multiplying warpgroups alternate over many tiles, and
// tiles of K = 456 take eight stages (the last of 8 of 64 elements); the
// last column tile is 8 wide, the last row tile of each expert partial. The
// transposed ESMM reduces over N = 136 into 456 columns. Elsewhere (and for
// the team kernel) one run.
TEST(ExpertOps, BFloat16ManyTilesAgainstFloat64Reference) {
  Shape const sh{2000, 2, 4, 456, 136, true};
  WsRestore const saved_ws;
  int const saved_blocks = detail::dev::ws_blocks_override();
  unsigned seed = 71;
  for (auto const &w : ws_settings()) {
    detail::dev::esmm_ws_enabled() = w.on;
    detail::dev::ws_gather() = w.gather;
    for (int blocks : w.on && detail::dev::wgmma_in_use(Space()) ? std::vector<int>{1, 2, 5} : std::vector<int>{0}) {
      SCOPED_TRACE(std::string(w.name) + ", blocks " + std::to_string(blocks));
      detail::dev::ws_blocks_override() = blocks;
      run_esmm_forward<bfloat16>(sh, Activation::gelu, seed++);
      run_esmm_forward<bfloat16>(sh, Activation::gelu, seed++, /*sorted=*/true);
      run_esmm_transposed_actgrad<bfloat16>(sh, seed++);
      run_esmm_transposed_actgrad<bfloat16>(sh, seed++, /*gated=*/true);
      run_esmm_token_out<bfloat16>(sh, seed++);
    }
  }
  detail::dev::ws_blocks_override() = saved_blocks;
}

// The copy of gathered bf16 rows into sorted order (HEXAMOE_ESMM_WS_GATHER=
// sort; the forward's index build makes it, forward_routed's this launch):
// row p of the copy is x's row of the token of the assignment at position
// p, exactly, with and without 16-byte vectors.
TEST(ExpertOps, SortedRowCopyCopiesEachAssignmentsRow) {
  for (Shape const sh : {Shape{301, 2, 8, 40, 8, true}, Shape{97, 3, 4, 37, 8, false}}) {
    SCOPED_TRACE("K=" + std::to_string(sh.K));
    Problem<bfloat16> P(sh, 5);
    int const S = P.S(), K = sh.K;
    V2<bfloat16> out("out", S, K);
    test::poison<bfloat16>(out);
    detail::copy_sorted_rows(Space(), P.R, SortedRowCopy<bfloat16, Mem>{V2<bfloat16 const>(P.x_d), out});
    Vec const got = test::from_view(out), xr = test::rounded<bfloat16>(P.x);
    int bad = 0;
    for (int f = 0; f < S; ++f)
      for (int c = 0; c < K; ++c)
        if (got[std::size_t(P.pos[f]) * K + c] != xr[std::size_t(f / sh.k) * K + c]) ++bad;
    EXPECT_EQ(bad, 0);
  }
}

TEST(ExpertOps, WarpSpecializedSettingIsChecked) {
  EXPECT_TRUE(detail::dev::parse_esmm_ws(nullptr));
  EXPECT_TRUE(detail::dev::parse_esmm_ws("1"));
  EXPECT_FALSE(detail::dev::parse_esmm_ws("0"));
  using detail::dev::WsGather;
  EXPECT_EQ(detail::dev::parse_ws_gather(nullptr), WsGather::sort);
  EXPECT_EQ(detail::dev::parse_ws_gather("sort"), WsGather::sort);
  EXPECT_EQ(detail::dev::parse_ws_gather("team"), WsGather::team);
  // Any other value: an error that names the variable and the value.
  auto rejects = [](auto parse, std::string const &var, char const *bad) {
    try {
      parse(bad);
      ADD_FAILURE() << var << "='" << bad << "' was accepted";
    } catch (std::invalid_argument const &e) {
      EXPECT_NE(std::string(e.what()).find(var + "='" + bad + "'"), std::string::npos) << e.what();
    }
  };
  for (char const *bad : {"yes", "off"}) {
    rejects(detail::dev::parse_esmm_ws, "HEXAMOE_ESMM_WS", bad);
    rejects(detail::dev::parse_ws_gather, "HEXAMOE_ESMM_WS_GATHER", bad);
  }
}

// The last shape above runs the host ESMM with teams of several row tiles
// (a host backend with up to three threads); one tile a team where the
// experts hold under two tiles, or where too few teams would be left.
TEST(ExpertOps, HostRowGroupsAreCovered) {
  auto const &sh = shapes.back();
  int const col_tiles = (sh.N + detail::TileShape<true>::TN - 1) / detail::TileShape<true>::TN;
  for (int threads = 1; threads <= 3; ++threads)
    EXPECT_GT(detail::esmm_host_row_group(sh.T * sh.k, sh.E, col_tiles, threads), 1) << threads << " threads";
  EXPECT_EQ(detail::esmm_host_row_group(720, 8, 24, 2), 1);     // 90 rows an expert
  EXPECT_EQ(detail::esmm_host_row_group(7200, 8, 24, 2), 4);    // 900 rows an expert
  EXPECT_EQ(detail::esmm_host_row_group(7200, 8, 6, 64), 1);    // 450 teams of one tile for 64 threads
}

TEST(ExpertOps, RejectsMismatchedExtents) {
  Problem<float> P({50, 2, 4, 16, 24, false}, 3);
  V2<float> out("out", P.S(), 24);
  EsmmEpilogue<float, Mem> ep;
  ep.pre = out;
  V2<float> xbad("xbad", 50, 15);
  auto expect_msg = [](auto f, std::string const &needle) {
    try {
      f();
      ADD_FAILURE() << "no exception, expected one mentioning '" << needle << "'";
    } catch (std::invalid_argument const &e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_msg([&] { esmm(Space(), P.R, token_rows(V2<float const>(xbad)), V3<float const>(P.w_d), false, V2<float const>(), ep); },
             "X has 15 columns");
  V2<float> bbad("bbad", 4, 23);
  expect_msg([&] { esmm(Space(), P.R, token_rows(V2<float const>(P.x_d)), V3<float const>(P.w_d), false, V2<float const>(bbad), ep); },
             "bias is [4, 23]");
  V3<float> wbad("wbad", 3, 16, 24);
  expect_msg([&] { esmm(Space(), P.R, token_rows(V2<float const>(P.x_d)), V3<float const>(wbad), false, V2<float const>(), ep); },
             "W has 3 experts");
  EsmmEpilogue<float, Mem> ep2;
  ep2.token_out = V2<float>("y", 50, 24);
  expect_msg([&] { esmm(Space(), P.R, token_rows(V2<float const>(P.x_d)), V3<float const>(P.w_d), false, V2<float const>(), ep2); },
             "top_k = 1");
  V3<float> gw("gw", 4, 16, 23);
  expect_msg([&] { estmm(Space(), P.R, token_rows(V2<float const>(P.x_d)), token_rows(V2<float const>(P.dy_d)), gw); },
             "output is [4, 16, 23]");
}

TEST(ExpertOps, BitIdenticalAcrossRuns) {
  Problem<float> P({513, 2, 8, 70, 90, true}, 21);
  auto once = [&] {
    V2<float> out("out", P.S(), 90);
    V3<float> gw("gw", 8, 70, 90);
    EsmmEpilogue<float, Mem> ep;
    ep.act = Activation::gelu;
    ep.post = out;
    esmm(Space(), P.R, token_rows(V2<float const>(P.x_d)), V3<float const>(P.w_d), false, V2<float const>(P.b_d), ep);
    estmm(Space(), P.R, token_rows(V2<float const>(P.x_d)), token_rows(V2<float const>(P.dy_d)), gw);
    Vec a = test::from_view(out), b = test::from_view(gw);
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  Vec first = once(), second = once();
  ASSERT_EQ(first.size(), second.size());
  EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(double)));
}

}  // namespace
