// StackBench.hpp: `hexamoe bench --deck DECK`, the MoE layer stack of a deck
// in its planned parallel modes. Under mpirun/srun every rank builds the
// deck's MoE layers (one per MoE block, as the trainer does, through
// parallel::MoeFactory), feeds its share of the global batch (random tokens,
// batch share and hidden proportions from the plan) forward through all of
// them with residual connections and backward in reverse, and reports per
// rank: forward and forward+backward time, bytes sent and received and the
// time blocked in MPI per step (parallel/CommStats.hpp), and the peak memory
// allocated in the execution space's memory (core/MemoryTracker.hpp). Dense
// layers, the optimizer and the data are left out: the benchmark isolates
// what the MoE parallel modes cost.
#pragma once

#include <mpi.h>

#include <iosfwd>

#include "io/Deck.hpp"

namespace hexamoe::bench {

struct StackOptions {
  int reps = 10;
  int warmup = 2;
  bool json = false;  // JSON lines instead of a table
};

// Collective over comm; the report is written on rank 0's `out`.
int run_stack_bench(Deck const &deck, StackOptions const &opt, MPI_Comm comm, std::ostream &out);

}  // namespace hexamoe::bench
