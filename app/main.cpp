// main.cpp: the hexamoe driver. Initialises MPI then Kokkos (Kokkos and MPI
// flags pass through: --kokkos-* options are taken by Kokkos), parses the
// command line with CLI11 and runs one subcommand:
//   hexamoe bench [...]         time the MoE layer on the Swin-MoE shapes
// Errors in the input give one clear message and exit status 2 on every rank.
#include "app/Commands.hpp"

#include <CLI/CLI.hpp>
#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cstring>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char *argv[]) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    // Kokkos consumed the flags it knows; drop any other --kokkos-* so that
    // CLI11 sees only ours.
    std::vector<char *> args;
    for (int i = 0; i < argc; ++i)
      if (i == 0 || std::strncmp(argv[i], "--kokkos-", 9) != 0) args.push_back(argv[i]);
    status = hexamoe::app::run(static_cast<int>(args.size()), args.data());
  }
  MPI_Finalize();
  return status;
}
