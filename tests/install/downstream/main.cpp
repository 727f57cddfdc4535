// main.cpp: uses an installed hexamoe as a library. Builds the routing index of
// six tokens routed top-2 over three experts and checks its counts and order
// against values worked out by hand, then parses a deck and checks a derived
// value. Prints "downstream: ok" and exits 0 when everything matches.
#include "core/RoutingIndex.hpp"
#include "io/Deck.hpp"

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cstdio>
#include <vector>

namespace {

int check_routing() {
  using Space = Kokkos::DefaultExecutionSpace;
  using Mem = Space::memory_space;
  // Expert ids [token][choice]; expert 0 gets (0,0) (2,1) (3,0) (5,1), expert 1
  // gets (0,1) (1,0) (4,1), expert 2 gets (1,1) (2,0) (3,1) (4,0) (5,0).
  int const ids[6][2] = {{0, 1}, {1, 2}, {2, 0}, {0, 2}, {2, 1}, {2, 0}};
  Kokkos::View<int **, Kokkos::LayoutRight, Mem> idx("downstream::idx", 6, 2);
  auto h = Kokkos::create_mirror_view(idx);
  for (int t = 0; t < 6; ++t)
    for (int j = 0; j < 2; ++j) h(t, j) = ids[t][j];
  Kokkos::deep_copy(idx, h);
  auto R = hexamoe::build_routing_index(Space(), Kokkos::View<int const **, Kokkos::LayoutRight, Mem>(idx), 3);
  std::vector<int> const counts = R.counts_host();
  std::vector<int> const want_counts{4, 3, 5};
  auto sorted = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), R.sorted_flat);
  // Flat id = t*2 + j, sorted by expert, stable in (t, j).
  std::vector<int> const want_sorted{0, 5, 6, 11, 1, 2, 9, 3, 4, 7, 8, 10};
  int errors = counts == want_counts ? 0 : 1;
  for (int p = 0; p < 12; ++p) errors += sorted(p) != want_sorted[p];
  if (errors) std::printf("downstream: routing index differs from the hand-worked one\n");
  return errors;
}

int check_deck() {
  hexamoe::Deck const d =
      hexamoe::parse_deck("[data]\nsource = \"synthetic\"\n[model]\ndim = 48\nmlp_ratio = 2.5\nheads = 4\n", "downstream.toml");
  if (d.derived.hidden != 120 || d.derived.head_dim != 12) {
    std::printf("downstream: deck derived hidden=%d head_dim=%d, expected 120 and 12\n", d.derived.hidden,
                d.derived.head_dim);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char *argv[]) {
  MPI_Init(&argc, &argv);
  int errors = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    errors += check_routing();
    errors += check_deck();
  }
  MPI_Finalize();
  if (errors == 0) std::printf("downstream: ok\n");
  return errors == 0 ? 0 : 1;
}
