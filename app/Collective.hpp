// Collective.hpp: input checks that every rank passes or fails together.
// A check that throws InputError on some ranks only would leave the others
// waiting in the next collective; collectively() turns it into the same
// InputError (the lowest failing rank's message) on every rank.
#pragma once

#include "io/InputError.hpp"

#include <mpi.h>

#include <climits>
#include <string>
#include <utility>

namespace hexamoe::app {

template <class F>
auto collectively(MPI_Comm comm, F &&f) -> decltype(f()) {
  std::string msg;
  decltype(f()) result{};
  try {
    result = f();
  } catch (InputError const &e) {
    msg = e.what();
  }
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  int first_bad = msg.empty() ? INT_MAX : rank;
  MPI_Allreduce(MPI_IN_PLACE, &first_bad, 1, MPI_INT, MPI_MIN, comm);
  if (first_bad == INT_MAX) return result;
  int len = static_cast<int>(msg.size());
  MPI_Bcast(&len, 1, MPI_INT, first_bad, comm);
  msg.resize(static_cast<std::size_t>(len));
  MPI_Bcast(msg.data(), len, MPI_CHAR, first_bad, comm);
  if (first_bad != rank) msg += " (found on rank " + std::to_string(first_bad) + ")";
  throw InputError("", msg);
}

}  // namespace hexamoe::app
