// LayerBench.hpp: times the HEXA-MoE layer (forward, forward+backward) on the
// Swin-MoE layer shapes of DESIGN.md section 5, beside the padded GEMM
// baseline, and reports ms, useful GFLOP/s and peak bytes allocated.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace hexamoe::bench {

struct BenchShape {
  std::string name;
  int tokens, dim, hidden, experts, top_k;
  double skew = 0.0;  // added to router bias of expert 0 (imbalanced routing)
};

// Swin-MoE-S/B stage 3 and 4 layers (batch 100) and a 64-expert skewed case.
std::vector<BenchShape> const &swin_shapes();

struct BenchOptions {
  std::vector<std::string> only;  // shape names; empty = all
  double token_scale = 1.0;       // multiply every shape's token count
  int reps = 5;
  int warmup = 1;
  std::vector<std::string> dtypes = {"float32", "bfloat16"};
  bool baseline = true;           // also time the padded GEMM baseline (float32)
  double capacity_factor = 1.25;  // of the baseline
  bool json = false;              // JSON lines instead of a table
  bool reference = true;          // compare sampled output rows with a float64 evaluation
  unsigned seed = 1;
};

// A lower bound of the bytes the largest row of a run allocates in the
// default memory space: the expert weights and their gradients, the row's
// input and output buffers, the layer's activations (S = T*k rows of z1, h
// and o) and the router's and routing index's per-token buffers; the padded
// row adds its capacity buffers. Workspaces and partial sums come on top.
// Throws std::invalid_argument for a token scale that layer calls cannot
// index.
struct BenchNeed {
  double bytes = 0;
  std::string row;  // "swinS-s3-top1 float32 (hexamoe, 14400 tokens)"
};
BenchNeed layer_bench_need(BenchOptions const &opt);

// Runs the benchmark on Kokkos' default execution space; returns 0 on success.
int run_layer_bench(BenchOptions const &opt, std::ostream &out);

}  // namespace hexamoe::bench
