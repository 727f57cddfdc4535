// MemoryCheck.hpp: a run whose model cannot fit is refused before anything
// is allocated or written, with the numbers, instead of being killed by the
// kernel's out-of-memory handler (host) or failing in an allocation deep
// inside a step (device).
//
// The need is a lower bound of what a rank allocates in the model's memory
// space: the parameters it holds (value, gradient and two AdamW moments, 16
// bytes each; expert weights as the MoE plan slices them) and the activation
// and gradient buffers every block keeps for the training and the evaluation
// batches, counted from the modules' own buffers (core/model/VisionMoE.hpp,
// core/nn/), and the data set in host memory; the MoE layers' activations,
// workspaces and the data-centric cache come on top and are not counted. A run
// is refused only when even this bound exceeds what the rank can have: free
// device memory, or host memory available to the job (MemAvailable and any
// cgroup limit, as Slurm sets with --mem) shared by the ranks of the node.
#pragma once

#include "bench/LayerBench.hpp"
#include "io/Deck.hpp"

#include <mpi.h>

#include <optional>
#include <string>
#include <vector>

namespace hexamoe::app {

struct MemoryNeed {
  double parameters = 0;        // elements this rank holds
  double activation_bytes = 0;  // buffers of the blocks for its images
  int images = 0;               // the rank's share of the training batch
  int eval_images = 0;          // its evaluation batch
  double data_bytes = 0;        // the training and test images (host memory; 0 where unknown)
  double parameter_bytes() const { return 16.0 * parameters; }
  double model_bytes() const { return parameter_bytes() + activation_bytes; }
};

// expert_share[i]: the fraction of the expert weights (W1, b1, W2) of MoE
// block deck.derived.moe_blocks[i] that this rank holds (1 when replicated);
// local_batch: its share of the training batch; nranks: the ranks that split
// the test set.
MemoryNeed memory_need(Deck const &deck, std::vector<double> const &expert_share, int local_batch, int nranks);

struct MemoryAvailable {
  double bytes = 0;    // for this rank
  std::string source;  // what was measured, for the message
};

// Host memory available to this rank: the smaller of MemAvailable and the
// headroom under the cgroup limits of this process, divided by the ranks of
// comm on this node. Empty where neither can be read.
std::optional<MemoryAvailable> host_memory_available(MPI_Comm comm);

// Headroom under the memory limits of this process's cgroups (the leaf and
// its ancestors; cgroup v2, else v1's memory controller): the smallest limit
// minus usage, with the page cache (not shared memory) counted as free, since
// the kernel reclaims it before it kills. Empty without limits. root: a
// directory standing for / (tests).
std::optional<double> cgroup_memory_headroom(std::string const &root = "");

// Free memory of the device this rank uses (CUDA, HIP); empty for host
// builds and backends without such a query.
std::optional<MemoryAvailable> device_memory_available();

// Throws InputError (naming the deck keys that set the size) when the model
// does not fit the device (device given) or the host (model and data), or the
// data does not fit the host. Unknown amounts are not checked.
void check_memory(Deck const &deck, MemoryNeed const &need, std::optional<MemoryAvailable> const &device,
                  std::optional<MemoryAvailable> const &host);

// Throws InputError when the largest row of `hexamoe bench` (its lower
// bound, bench::layer_bench_need) does not fit the device (device given) or
// the host, naming the row and --token-scale.
void check_bench_memory(bench::BenchNeed const &need, double token_scale,
                        std::optional<MemoryAvailable> const &device, std::optional<MemoryAvailable> const &host);

// A byte count for messages: "512 B", "3.2 MiB", "1.5 TiB".
std::string format_bytes(double bytes);

}  // namespace hexamoe::app
