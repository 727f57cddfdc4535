// Commands.hpp: the subcommands of the hexamoe driver.
#pragma once

namespace hexamoe::app {

// Parse the command line (MPI and Kokkos are initialised) and run; returns the
// process exit status: 0 success, 1 runtime failure, 2 bad input.
int run(int argc, char **argv);

}  // namespace hexamoe::app
