// tstRoutingIndex.hpp: the routing index against a direct host computation.
#include "Reference.hpp"
#include "core/RoutingIndex.hpp"

#include <gtest/gtest.h>

namespace {

using namespace hexamoe;
using Space = TEST_EXECSPACE;
using Mem = TEST_MEMSPACE;

Kokkos::View<int **, Kokkos::LayoutRight, Mem> ids_view(std::vector<int> const &ids, int T, int k) {
  Kokkos::View<int **, Kokkos::LayoutRight, Mem> v("ids", T, k);
  auto h = Kokkos::create_mirror_view(v);
  for (int i = 0; i < T * k; ++i) h.data()[i] = ids[i];
  Kokkos::deep_copy(v, h);
  return v;
}

// Options of a build under test: chunk counts given (assignments per chunk,
// 0: none; padded columns past E) and a copy of rows (d columns, 0: none).
struct BuildOptions {
  int per = 0;
  int pad_columns = 0;
  int d = 0;
  bool one_launch = false;  // expect the one-launch build (no count table of its own with given counts)
};

// The index of ids (and, with a copy, each kept assignment's row at its
// position in the copy, exactly) against a walk over the assignments.
void check_index(int T, int k, int E, bool skewed, double cf, unsigned seed, BuildOptions const &o = {}) {
  std::mt19937 rng(seed);
  auto ids = test::random_routing(T, k, E, rng, skewed);
  int const S = T * k;
  ChunkCounts<Mem> given;
  if (o.per > 0) {  // counted here from the ids: an input, as the router's
    int const nch = (S + o.per - 1) / o.per;
    Kokkos::View<int **, Kokkos::LayoutRight, Mem> n("n", nch, E + o.pad_columns);
    auto h = Kokkos::create_mirror_view(n);
    for (int c = 0; c < nch; ++c)
      for (int e = 0; e < E + o.pad_columns; ++e) h(c, e) = e < E ? 0 : 1000 + e;  // padding: never read
    for (int s = 0; s < S; ++s) ++h(s / o.per, ids[s]);
    Kokkos::deep_copy(n, h);
    given = {n, o.per};
  }
  SortedRowCopy<double, Mem> copy;
  std::vector<double> rows;
  if (o.d > 0) {
    Kokkos::View<double **, Kokkos::LayoutRight, Mem> from("from", T, o.d), to("to", S, o.d);
    auto h = Kokkos::create_mirror_view(from);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < o.d; ++c) rows.push_back(h(t, c) = 1000.0 * t + c + 0.25);
    Kokkos::deep_copy(from, h);
    Kokkos::deep_copy(to, -1.0);
    copy = {from, to};
  }
  auto R = build_routing_index(Space(), Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_view(ids, T, k)), E,
                               cf, true, {}, given, copy);
  // Reference: walk the assignments in (t, j) order, each expert keeps its first cap.
  int const cap = cf > 0 ? static_cast<int>(std::ceil(cf * S / E)) : S;
  std::vector<std::vector<int>> per(E);
  for (int s = 0; s < S; ++s)
    if (static_cast<int>(per[ids[s]].size()) < cap) per[ids[s]].push_back(s);
  auto counts = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.counts);
  auto offsets = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.offsets);
  auto sorted = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.sorted_flat);
  auto pos = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.position);
  if (o.per > 0) {
    if (o.one_launch) {
      EXPECT_EQ(R.workspace.extent(0), 0u) << "the given chunk counts were not used";
    } else {
      EXPECT_GT(R.workspace.extent(0), 0u);
    }
  }
  int off = 0;
  std::vector<int> expect_pos(S, -1);
  for (int e = 0; e < E; ++e) {
    ASSERT_EQ(counts(e), static_cast<int>(per[e].size())) << "expert " << e;
    ASSERT_EQ(offsets(e), off) << "expert " << e;
    for (std::size_t i = 0; i < per[e].size(); ++i) {
      ASSERT_EQ(sorted(off + i), per[e][i]) << "expert " << e << " rank " << i;
      expect_pos[per[e][i]] = off + static_cast<int>(i);
    }
    off += static_cast<int>(per[e].size());
  }
  ASSERT_EQ(offsets(E), off);
  for (int s = 0; s < S; ++s) ASSERT_EQ(pos(s), expect_pos[s]) << "flat id " << s;
  if (o.d > 0) {
    auto to = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), copy.to);
    for (int s = 0; s < S; ++s)
      for (int c = 0; c < o.d; ++c)
        ASSERT_EQ(to(expect_pos[s], c), rows[std::size_t(s / k) * o.d + c]) << "flat id " << s << " column " << c;
  }
}

// Sets the fused path's switch for a scope (detail::routing_fused_setting).
struct FusedPath {
  int saved = detail::routing_fused_setting();
  explicit FusedPath(int v) { detail::routing_fused_setting() = v; }
  ~FusedPath() { detail::routing_fused_setting() = saved; }
};

TEST(RoutingIndex, UniformSkewedAndEdgeShapes) {
  check_index(1000, 2, 8, false, 0.0, 1);
  check_index(1000, 2, 8, true, 0.0, 2);
  check_index(777, 1, 1, false, 0.0, 3);    // E = 1
  check_index(333, 4, 4, false, 0.0, 4);    // k = E
  check_index(5, 1, 16, true, 0.0, 5);      // most experts empty
  check_index(3001, 3, 64, true, 0.0, 6);   // many chunks, skew
  check_index(0, 1, 4, false, 0.0, 7);      // no tokens
}

// The one-launch build (the default on devices) on every backend, from
// counted chunks and from chunk counts given as the router gives them
// (chunks of 64 tokens; odd sizes; padded columns), and the three-launch
// build; each also copying rows (16 bytes at a time, d even, or one
// element at a time, d odd).
TEST(RoutingIndex, FusedAndSeparateBuildsWithGivenCountsAndRowCopies) {
  for (int fused : {1, -1}) {
    FusedPath const path(fused);
    SCOPED_TRACE(fused > 0 ? "one launch" : "three launches");
    for (BuildOptions const o : {BuildOptions{}, BuildOptions{0, 0, 6}, BuildOptions{0, 0, 5}, BuildOptions{64, 0, 0},
                                 BuildOptions{7, 3, 4}}) {
      SCOPED_TRACE("per " + std::to_string(o.per) + ", d " + std::to_string(o.d));
      int const per1 = o.per > 0 ? o.per : 0, per2 = o.per > 0 ? 2 * o.per : 0, per4 = o.per > 0 ? 4 * o.per : 0;
      check_index(1000, 2, 8, false, 0.0, 21, {per2, o.pad_columns, o.d, fused > 0});
      check_index(1000, 2, 8, true, 0.0, 22, {per2, o.pad_columns, o.d, fused > 0});
      check_index(777, 1, 1, false, 0.0, 23, {per1, o.pad_columns, o.d, fused > 0});   // E = 1
      check_index(333, 4, 4, false, 0.0, 24, {per4, o.pad_columns, o.d, fused > 0});   // k = E
      check_index(5, 1, 16, true, 0.0, 25, {per1, o.pad_columns, o.d, fused > 0});     // most experts empty
      check_index(3001, 3, 64, true, 0.0, 26, {o.per > 0 ? 3 * o.per : 0, o.pad_columns, o.d, fused > 0});  // many chunks, skew
      check_index(0, 1, 4, false, 0.0, 27, {per1, o.pad_columns, o.d, fused > 0});     // no tokens
      check_index(300, 1, 300, true, 0.0, 28, {per1, o.pad_columns, o.d, fused > 0});  // experts past one group of partial sums
    }
  }
}

TEST(RoutingIndex, CapacityDropsByPosition) {
  check_index(1000, 1, 8, true, 1.25, 8);
  check_index(999, 2, 8, true, 1.0, 9);
}

TEST(RoutingIndex, RejectsBadArguments) {
  std::vector<int> ids = {0, 1, 2, 7};
  auto v = Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_view(ids, 2, 2));
  EXPECT_THROW(build_routing_index(Space(), v, 1), std::invalid_argument);  // k > E
  try {
    build_routing_index(Space(), v, 4);
    FAIL() << "expert id 7 >= 4 accepted";
  } catch (std::invalid_argument const &e) {
    EXPECT_NE(std::string(e.what()).find("outside [0, 4)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(build_routing_index(Space(), v, 0), std::invalid_argument);
  EXPECT_THROW(build_routing_index(Space(), v, 8, -1.0), std::invalid_argument);
  auto v0 = Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(Kokkos::View<int **, Kokkos::LayoutRight, Mem>("k0", 3, 0));
  EXPECT_THROW(build_routing_index(Space(), v0, 4), std::invalid_argument);  // k < 1
  // Chunk counts that do not cover the assignments or the experts, and a
  // copy of rows where assignments may be dropped or rows do not fit.
  std::vector<int> ok = {0, 1, 2, 3};
  auto w = Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_view(ok, 2, 2));
  auto rejects = [&](auto build, char const *what) {
    try {
      build();
      ADD_FAILURE() << what << " accepted";
    } catch (std::invalid_argument const &e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  Kokkos::View<int **, Kokkos::LayoutRight, Mem> n1("n", 1, 4), n3("n", 2, 3);
  rejects([&] { build_routing_index(Space(), w, 4, 0.0, true, {}, ChunkCounts<Mem>{n1, 2}); }, "chunk counts [1, 4] of 2");
  rejects([&] { build_routing_index(Space(), w, 4, 0.0, true, {}, ChunkCounts<Mem>{n3, 2}); }, "chunk counts [2, 3] of 2");
  Kokkos::View<float **, Kokkos::LayoutRight, Mem> from("from", 2, 3), to("to", 4, 3), small("small", 3, 3);
  rejects([&] { build_routing_index(Space(), w, 4, 1.0, true, {}, {}, SortedRowCopy<float, Mem>{from, to}); },
          "needs a dropless index");
  rejects([&] { build_routing_index(Space(), w, 4, 0.0, true, {}, {}, SortedRowCopy<float, Mem>{from, small}); },
          "room for 4 of them");
}

TEST(RoutingIndex, RefusesMoreRoutedRowsThan32BitsNumber) {
  // 2^30 tokens x top-2 = 2^31 routed rows: one past what int numbers. The
  // ids are never read (an unmanaged view over a small buffer stands for them).
  Kokkos::View<int *, Mem> buf("buf", 8);
  using Unmanaged = Kokkos::View<int const **, Kokkos::LayoutRight, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  auto Ids = [&](std::size_t T, std::size_t k) {
    return Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(Unmanaged(buf.data(), T, k));
  };
  try {
    build_routing_index(Space(), Ids(std::size_t(1) << 30, 2), 8);
    FAIL() << "2^31 routed rows accepted";
  } catch (std::length_error const &e) {
    EXPECT_NE(std::string(e.what()).find("1073741824 tokens x top_k 2 = 2147483648 routed rows"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(build_routing_index(Space(), Ids(std::size_t(1) << 31, 1), 8), std::length_error);
  EXPECT_EQ(routed_rows("t", (std::size_t(1) << 30) - 1, 2), 2147483646);
  EXPECT_EQ(routed_rows("t", 2147483647, 1), 2147483647);
  EXPECT_THROW(routed_rows("t", std::size_t(1) << 40, 4096), std::length_error);
}

TEST(RoutingIndex, Deterministic) {
  std::mt19937 rng(11);
  auto ids = test::random_routing(5000, 2, 16, rng, true);
  auto v = Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_view(ids, 5000, 2));
  auto a = build_routing_index(Space(), v, 16);
  auto b = build_routing_index(Space(), v, 16);
  EXPECT_EQ(test::from_view(a.sorted_flat), test::from_view(b.sorted_flat));
}

}  // namespace
