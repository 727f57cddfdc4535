// tstParallel.hpp: the MPI parallel modes (parallel/) at any rank count.
//  - Data-centric and model-centric layers against the single-process
//    MoeLayer on the same global batch (ranks hold different token counts,
//    unequal and empty slices, top-1 and top-2): outputs and input gradients
//    bit-identical in data-centric mode (each token's arithmetic is the same),
//    within 2e-6 of the largest value in model-centric mode (sums over H are
//    split into per-slice partial sums); weight gradients within 2e-6 of the
//    largest value (per-rank partial sums; bit-identical at one rank).
//  - Two data-centric layers sharing the pipeline-shared cache over two steps
//    (prefetch, reuse, invalidation after the slices change).
//  - Data-centric memory for expert weights: 1/n of the experts plus the
//    cache's four buffers, whatever the number of layers (allocation counters).
//  - Training: losses of n ranks in each mode equal one rank's; restart of a
//    data-centric checkpoint in model-centric mode and of a 2-rank checkpoint
//    on 3 ranks continue with the same losses.
//  - Planner: mode by batch size, proportions from rates, a simulated 3x
//    slower rank measured and given a third of the share.
//  - Bad input: every rank exits 2 with the same message, none hangs.
#include "app/Commands.hpp"
#include "app/Trainer.hpp"
#include "core/MemoryTracker.hpp"
#include "core/MoeLayer.hpp"
#include "io/Checkpoint.hpp"
#include "io/Deck.hpp"
#include "io/InputError.hpp"
#include "parallel/MoeFactory.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <sstream>

namespace {

using namespace hexamoe;
using namespace hexamoe::parallel;
using Space = TEST_EXECSPACE;
using Mem = TEST_MEMSPACE;
using HostVec = std::vector<float>;
using Globals = std::map<std::string, HostVec>;  // "w1", "router.weight", ...

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

HostVec random_host(std::size_t n, std::mt19937 &rng, double scale) {
  std::normal_distribution<double> nd(0.0, scale);
  HostVec v(n);
  for (auto &x : v) x = static_cast<float>(nd(rng));
  return v;
}

// Global parameters of a layer, the same on every rank.
Globals random_globals(MoeLayerConfig const &c, unsigned seed) {
  std::mt19937 rng(seed);
  std::size_t const E = c.experts, d = c.dim, H = c.hidden;
  Globals g;
  g["router.weight"] = random_host(d * E, rng, 0.5);
  g["router.bias"] = random_host(E, rng, 0.3);
  g["w1"] = random_host(E * d * H, rng, 1.0 / std::sqrt(double(d)));
  g["b1"] = random_host(E * H, rng, 0.1);
  g["w2"] = random_host(E * H * d, rng, 1.0 / std::sqrt(double(H)));
  g["b2"] = random_host(E * d, rng, 0.1);
  return g;
}

// The block [offset, offset + count) of a row-major tensor of `shape`.
HostVec block_of(HostVec const &g, std::vector<std::size_t> const &shape, std::vector<std::size_t> const &offset,
                 std::vector<std::size_t> const &count) {
  std::vector<std::size_t> s = shape, o = offset, c = count;
  while (s.size() < 3) s.insert(s.begin(), 1), o.insert(o.begin(), 0), c.insert(c.begin(), 1);
  HostVec out;
  for (std::size_t a = 0; a < c[0]; ++a)
    for (std::size_t b = 0; b < c[1]; ++b)
      for (std::size_t k = 0; k < c[2]; ++k) out.push_back(g[((o[0] + a) * s[1] + o[1] + b) * s[2] + o[2] + k]);
  return out;
}

std::string key_of(Parameter<Mem> const &p) { return p.name.substr(p.name.find('.') + 1); }

// Load the global tensors into a module's parameters (its block of sharded ones).
void load(std::vector<Parameter<Mem>> const &params, Globals const &g) {
  for (auto const &p : params) {
    HostVec const &v = g.at(key_of(p));
    HostVec const mine = p.sharded() ? block_of(v, p.shape, p.offset, p.count) : v;
    ASSERT_EQ(mine.size(), p.value.extent(0)) << p.name;
    auto h = Kokkos::create_mirror_view(p.value);
    std::copy(mine.begin(), mine.end(), h.data());
    Kokkos::deep_copy(p.value, h);
  }
}

HostVec to_host(Kokkos::View<float *, Mem> v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return HostVec(h.data(), h.data() + h.extent(0));
}
template <class V>
HostVec rows_to_host(V v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return HostVec(h.data(), h.data() + h.span());
}
Matrix<float, Mem> matrix_from(HostVec const &v, std::size_t rows, std::size_t cols, std::size_t row0 = 0) {
  Matrix<float, Mem> m("hexamoe::test.matrix", rows, cols);
  auto h = Kokkos::create_mirror_view(m);
  for (std::size_t i = 0; i < rows * cols; ++i) h.data()[i] = v[row0 * cols + i];
  Kokkos::deep_copy(m, h);
  return m;
}

// |got - want| <= tol * max|want| elementwise; tol 0 asks for bit-identical values.
void expect_close(std::string const &what, HostVec const &got, HostVec const &want, double tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0, err = 0;
  for (float w : want) scale = std::max(scale, double(std::fabs(w)));
  std::size_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const e = std::fabs(double(got[i]) - double(want[i]));
    if (!(e <= err)) err = e, worst = i;  // NaN counts as worst
  }
  if (tol == 0) {
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
        << what << " not bit-identical: max |diff| " << err << " at " << worst << " (scale " << scale << ") on rank "
        << world_rank();
  } else {
    EXPECT_LE(err, tol * std::max(scale, 1e-30)) << what << ": max |diff| " << err << " at " << worst << ", scale " << scale
                                                 << ", rank " << world_rank();
  }
}

struct Reference {
  HostVec y, dx;
  Globals grads;
};

// The single-process layer on the whole global batch.
Reference reference(MoeLayerConfig const &c, Globals const &g, HostVec const &x, HostVec const &dy, int T) {
  MoeLayer<float, Space> L(c);
  load(L.parameters("ref"), g);
  auto xv = matrix_from(x, T, c.dim), dyv = matrix_from(dy, T, c.dim);
  Matrix<float, Mem> y("y", T, c.dim), dx("dx", T, c.dim);
  Space space;
  L.forward(space, xv, y);
  L.backward(space, dyv, dx);
  Reference r{rows_to_host(y), rows_to_host(dx), {}};
  for (auto const &p : L.parameters("ref")) r.grads[key_of(p)] = to_host(p.grad);
  return r;
}

struct LayerCase {
  char const *name;
  MoeLayerConfig cfg;
  int proportions;  // 0 equal, 1 rising (p_r ~ r + 1), 2 last rank empty
  bool empty_rank;  // rank 1 holds no tokens
};

std::vector<double> proportions_for(int kind, int n) {
  std::vector<double> p(std::size_t(n), 1.0);
  if (kind == 1)
    for (int r = 0; r < n; ++r) p[r] = r + 1;
  if (kind == 2 && n > 1) p[n - 1] = 0;
  double s = 0;
  for (double v : p) s += v;
  for (auto &v : p) v /= s;
  return p;
}

std::vector<int> tokens_per_rank(int n, bool empty_rank) {
  std::vector<int> t;
  for (int r = 0; r < n; ++r) t.push_back(empty_rank && r == 1 ? 0 : 5 + 3 * r);
  return t;
}

MoeLayerConfig config(int d, int H, int E, int k, Activation act, bool renorm) {
  MoeLayerConfig c;
  c.dim = d;
  c.hidden = H;
  c.experts = E;
  c.top_k = k;
  c.activation = act;
  c.renormalize = renorm;
  return c;
}

std::vector<LayerCase> layer_cases() {
  return {
      {"top1-gelu-equal", config(16, 24, 4, 1, Activation::gelu, false), 0, false},
      {"top2-silu-rising", config(12, 20, 5, 2, Activation::silu, true), 1, false},
      {"top1-relu-emptyslice", config(8, 12, 3, 1, Activation::relu, false), 2, false},
      {"top2-gelu-emptyrank", config(16, 24, 4, 2, Activation::gelu, false), 1, true},
  };
}

std::unique_ptr<MoeFfn<Space>> make_layer(MoeMode mode, MoeLayerConfig const &c, std::shared_ptr<MoeGroup const> group,
                                          ExpertSlice const &slice,
                                          std::shared_ptr<PipelineSharedCache<Mem>> cache = nullptr) {
  if (mode == MoeMode::data) {
    if (!cache) cache = std::make_shared<PipelineSharedCache<Mem>>(group);
    return std::make_unique<DataCentricMoe<Space>>(c, slice, cache);
  }
  return std::make_unique<ModelCentricMoe<Space>>(c, slice, group);
}

// One layer in `mode` against the reference; returns nothing, asserts.
void check_layer(MoeMode mode, LayerCase const &lc) {
  int const n = world_size(), me = world_rank();
  auto const &c = lc.cfg;
  auto const tokens = tokens_per_rank(n, lc.empty_rank);
  int T = 0, row0 = 0;
  for (int r = 0; r < n; ++r) {
    if (r < me) row0 += tokens[r];
    T += tokens[r];
  }
  int const Tm = tokens[me];
  Globals const g = random_globals(c, 11);
  std::mt19937 rng(29);
  HostVec const x = random_host(std::size_t(T) * c.dim, rng, 1.0), dy = random_host(std::size_t(T) * c.dim, rng, 1.0);
  Reference const ref = reference(c, g, x, dy, T);

  auto group = std::make_shared<MoeGroup const>(MPI_COMM_WORLD, 0, proportions_for(lc.proportions, n));
  auto layer = make_layer(mode, c, group, group->slice(c.hidden));
  load(layer->parameters("moe"), g);
  auto xv = matrix_from(x, Tm, c.dim, row0), dyv = matrix_from(dy, Tm, c.dim, row0);
  Matrix<float, Mem> y("y", Tm, c.dim), dx("dx", Tm, c.dim);
  Space space;
  layer->forward(space, xv, y);
  layer->backward(space, dyv, dx);
  space.fence();

  HostVec const want_y(ref.y.begin() + std::size_t(row0) * c.dim, ref.y.begin() + std::size_t(row0 + Tm) * c.dim);
  HostVec const want_dx(ref.dx.begin() + std::size_t(row0) * c.dim, ref.dx.begin() + std::size_t(row0 + Tm) * c.dim);
  bool const exact_rows = mode == MoeMode::data || n == 1;
  std::string const tag = std::string(lc.name) + (mode == MoeMode::data ? " data" : " model") + " n=" + std::to_string(n);
  expect_close(tag + " y", rows_to_host(y), want_y, exact_rows ? 0 : 2e-6);
  expect_close(tag + " dx", rows_to_host(dx), want_dx, exact_rows ? 0 : 2e-6);
  for (auto const &p : layer->parameters("moe")) {
    HostVec gr = to_host(p.grad);
    HostVec const &full = ref.grads.at(key_of(p));
    if (!p.sharded())  // replicated: the trainer sums them over the ranks
      MPI_Allreduce(MPI_IN_PLACE, gr.data(), int(gr.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    HostVec const want = p.sharded() ? block_of(full, p.shape, p.offset, p.count) : full;
    expect_close(tag + " grad " + p.name, gr, want, n == 1 ? 0 : 2e-6);
  }
}

TEST(Parallel, ExpertSliceTilesHidden) {
  auto s = ExpertSlice::split(10, {0.5, 0.25, 0.25}, 3);
  EXPECT_EQ(s.counts, (std::vector<int>{5, 3, 2}));  // 2.5 + 2.5: the tie goes to the lower rank
  EXPECT_EQ(s.offsets, (std::vector<int>{0, 5, 8}));
  auto e = ExpertSlice::split(7, {}, 3);
  EXPECT_EQ(e.counts, (std::vector<int>{3, 2, 2}));
  auto z = ExpertSlice::split(8, {0.5, 0.0, 0.5}, 3);
  EXPECT_EQ(z.counts, (std::vector<int>{4, 0, 4}));
  EXPECT_EQ(z.offsets, (std::vector<int>{0, 4, 4}));
  EXPECT_THROW(ExpertSlice::split(8, {0.5, 0.5}, 3), std::invalid_argument);
  EXPECT_THROW(ExpertSlice::split(8, {-0.5, 1.5}, 2), std::invalid_argument);
}

TEST(Parallel, DataCentricLayerMatchesSingleProcess) {
  for (auto const &lc : layer_cases()) check_layer(MoeMode::data, lc);
}

TEST(Parallel, ModelCentricLayerMatchesSingleProcess) {
  for (auto const &lc : layer_cases()) check_layer(MoeMode::model, lc);
}

// Two data-centric layers of different sizes share one cache for two steps;
// between the steps every parameter is halved, as an optimizer would change
// them: the second step must see the new weights.
TEST(Parallel, PipelineSharedCacheAcrossLayersAndSteps) {
  int const n = world_size(), me = world_rank();
  MoeLayerConfig const c0 = config(16, 24, 4, 1, Activation::gelu, false);
  MoeLayerConfig const c1 = config(16, 40, 3, 2, Activation::relu, false);
  auto group = std::make_shared<MoeGroup const>(MPI_COMM_WORLD, 0, proportions_for(1, n));
  auto cache = std::make_shared<PipelineSharedCache<Mem>>(group);
  auto l0 = make_layer(MoeMode::data, c0, group, group->slice(c0.hidden), cache);
  auto l1 = make_layer(MoeMode::data, c1, group, group->slice(c1.hidden), cache);
  Globals g0 = random_globals(c0, 3), g1 = random_globals(c1, 4);
  load(l0->parameters("a"), g0);
  load(l1->parameters("b"), g1);
  int const Tm = 6 + me, row0 = 6 * me + me * (me - 1) / 2;
  int T = 0;
  for (int r = 0; r < n; ++r) T += 6 + r;
  std::mt19937 rng(5);
  HostVec const x0 = random_host(std::size_t(T) * 16, rng, 1), x1 = random_host(std::size_t(T) * 16, rng, 1);
  HostVec const d0 = random_host(std::size_t(T) * 16, rng, 1), d1 = random_host(std::size_t(T) * 16, rng, 1);
  Space space;
  for (int step = 0; step < 2; ++step) {
    auto r0 = reference(c0, g0, x0, d0, T), r1 = reference(c1, g1, x1, d1, T);
    Matrix<float, Mem> y0("y0", Tm, 16), y1("y1", Tm, 16), dx0("dx0", Tm, 16), dx1("dx1", Tm, 16);
    l0->forward(space, matrix_from(x0, Tm, 16, row0), y0);
    l1->forward(space, matrix_from(x1, Tm, 16, row0), y1);
    l1->backward(space, matrix_from(d1, Tm, 16, row0), dx1);
    l0->backward(space, matrix_from(d0, Tm, 16, row0), dx0);
    auto rows = [&](HostVec const &v) { return HostVec(v.begin() + std::size_t(row0) * 16, v.begin() + std::size_t(row0 + Tm) * 16); };
    std::string const tag = "step " + std::to_string(step);
    expect_close(tag + " y0", rows_to_host(y0), rows(r0.y), 0);
    expect_close(tag + " y1", rows_to_host(y1), rows(r1.y), 0);
    expect_close(tag + " dx0", rows_to_host(dx0), rows(r0.dx), 0);
    expect_close(tag + " dx1", rows_to_host(dx1), rows(r1.dx), 0);
    for (auto [layer, ref] : {std::pair{l0.get(), &r0}, std::pair{l1.get(), &r1}})
      for (auto const &p : layer->parameters("m"))
        if (p.sharded())
          expect_close(tag + " grad " + p.name, to_host(p.grad), block_of(ref->grads.at(key_of(p)), p.shape, p.offset, p.count),
                       n == 1 ? 0 : 2e-6);
    // "Optimizer step": halve every parameter, in the layers and the globals.
    for (auto [layer, glob] : {std::pair{l0.get(), &g0}, std::pair{l1.get(), &g1}}) {
      for (auto &kv : *glob)
        for (auto &v : kv.second) v *= 0.5f;
      load(layer->parameters("m"), *glob);
    }
  }
}

// Bytes of expert weights (and their gradients) a rank holds for a model of
// `layers` MoE layers in data-centric mode, from the allocation counters.
struct ExpertBytes {
  std::int64_t slices = 0, cache = 0, whole = 0;
};
ExpertBytes data_centric_bytes(MoeLayerConfig const &c, int layers) {
  auto group = std::make_shared<MoeGroup const>(MPI_COMM_WORLD, 0, std::vector<double>{});
  auto cache = std::make_shared<PipelineSharedCache<Mem>>(group);
  std::int64_t const s0 = MemoryTracker::current_with_prefix("hexamoe::moe.slice");
  std::int64_t const c0 = MemoryTracker::current_with_prefix("hexamoe::cache.");
  std::int64_t const w0 = MemoryTracker::current_with_prefix("hexamoe::moe.w") + MemoryTracker::current_with_prefix("hexamoe::moe.b1");
  std::vector<std::unique_ptr<MoeFfn<Space>>> model;
  for (int l = 0; l < layers; ++l) model.push_back(make_layer(MoeMode::data, c, group, group->slice(c.hidden), cache));
  Matrix<float, Mem> x("x", 8, c.dim), y("y", 8, c.dim);
  Space space;
  for (auto &m : model) m->forward(space, x, y);  // the cache allocates on first use
  ExpertBytes b;
  b.slices = MemoryTracker::current_with_prefix("hexamoe::moe.slice") - s0;
  b.cache = MemoryTracker::current_with_prefix("hexamoe::cache.") - c0;
  b.whole = MemoryTracker::current_with_prefix("hexamoe::moe.w") + MemoryTracker::current_with_prefix("hexamoe::moe.b1") - w0;
  return b;
}

TEST(Parallel, DataCentricExpertMemoryFallsAsOneOverN) {
  MemoryTracker::install();
  int const n = world_size();
  MoeLayerConfig const c = config(32, 96, 4, 1, Activation::gelu, false);  // 96 divides by 1..4
  // What one process holds for one layer (MoeLayer: W1, b1, W2 and their gradients).
  std::int64_t const before = MemoryTracker::current_with_prefix("hexamoe::moe.w") + MemoryTracker::current_with_prefix("hexamoe::moe.b1");
  std::int64_t full = 0;
  {
    MoeLayer<float, Space> one(c);
    full = MemoryTracker::current_with_prefix("hexamoe::moe.w") + MemoryTracker::current_with_prefix("hexamoe::moe.b1") - before;
  }
  ASSERT_EQ(full, std::int64_t(2 * 4 * c.experts * (2 * c.dim + 1) * c.hidden)) << "the counters do not see MoeLayer";
  for (int layers : {2, 5}) {
    ExpertBytes const b = data_centric_bytes(c, layers);
    EXPECT_EQ(b.slices * n, layers * full) << layers << " layers on " << n << " ranks: slices are not 1/n of the experts";
    EXPECT_EQ(b.cache, 2 * full) << "the cache is not four layer-sized buffers (two weight slots, gradient, reduce)";
    EXPECT_EQ(b.whole, 0) << "a data-centric layer still holds whole-layer expert tensors";
  }
}

}  // namespace
