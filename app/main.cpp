// main.cpp: the hexamoe driver. Initialises MPI then Kokkos (Kokkos and MPI
// flags pass through: --kokkos-* options are taken by Kokkos), parses the
// command line with CLI11 and runs one subcommand:
//   hexamoe train DECK          train the model a deck describes (checkpoints, restarts)
//   hexamoe check DECK          validate a deck and print it fully resolved
//   hexamoe plan DECK           print the MoE parallel plan on this job's ranks
//   hexamoe bench [...]         time the MoE layer on the Swin-MoE shapes
//   hexamoe bench --deck DECK   time a deck's MoE layer stack in its parallel modes
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
    // Kokkos sees only the --kokkos-* flags (its unprefixed aliases such as
    // --help or --threads would clash with ours); CLI11 sees the rest.
    std::vector<char *> kokkos_args{argv[0]}, args{argv[0]};
    for (int i = 1; i < argc; ++i) (std::strncmp(argv[i], "--kokkos-", 9) == 0 ? kokkos_args : args).push_back(argv[i]);
    int kargc = static_cast<int>(kokkos_args.size());
    Kokkos::ScopeGuard kokkos(kargc, kokkos_args.data());
    status = hexamoe::app::run(static_cast<int>(args.size()), args.data());
  }
  MPI_Finalize();
  return status;
}
