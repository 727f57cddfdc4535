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

void check_index(int T, int k, int E, bool skewed, double cf, unsigned seed) {
  std::mt19937 rng(seed);
  auto ids = test::random_routing(T, k, E, rng, skewed);
  auto R = build_routing_index(Space(), Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(ids_view(ids, T, k)), E, cf);
  int const S = T * k;
  // Reference: walk the assignments in (t, j) order, each expert keeps its first cap.
  int const cap = cf > 0 ? static_cast<int>(std::ceil(cf * S / E)) : S;
  std::vector<std::vector<int>> per(E);
  for (int s = 0; s < S; ++s)
    if (static_cast<int>(per[ids[s]].size()) < cap) per[ids[s]].push_back(s);
  auto counts = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.counts);
  auto offsets = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.offsets);
  auto sorted = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.sorted_flat);
  auto pos = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.position);
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
}

TEST(RoutingIndex, UniformSkewedAndEdgeShapes) {
  check_index(1000, 2, 8, false, 0.0, 1);
  check_index(1000, 2, 8, true, 0.0, 2);
  check_index(777, 1, 1, false, 0.0, 3);    // E = 1
  check_index(333, 4, 4, false, 0.0, 4);    // k = E
  check_index(5, 1, 16, true, 0.0, 5);      // most experts empty
  check_index(3001, 3, 64, true, 0.0, 6);   // many chunks, skew
  check_index(0, 1, 4, false, 0.0, 7);      // no tokens
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
