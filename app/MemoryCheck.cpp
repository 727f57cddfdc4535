// MemoryCheck.cpp: see MemoryCheck.hpp.
#include "app/MemoryCheck.hpp"

#include "app/Trainer.hpp"
#include "core/model/VisionMoE.hpp"
#include "io/InputError.hpp"

#include <Kokkos_Core.hpp>
#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime_api.h>
#elif defined(KOKKOS_ENABLE_HIP)
#include <hip/hip_runtime_api.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace hexamoe::app {

namespace {

// The first number of a one-line file ("max" and unreadable files: empty).
std::optional<double> read_number(std::string const &path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word) || word == "max") return std::nullopt;
  try {
    return std::stod(word);
  } catch (...) {
    return std::nullopt;
  }
}

// A "key value" line of a stat file such as memory.stat or /proc/meminfo.
std::optional<double> read_stat(std::string const &path, std::string const &key) {
  std::ifstream f(path);
  std::string k;
  double v = 0;
  std::string rest;
  while (f >> k >> v) {
    std::getline(f, rest);
    if (k == key) return v;
  }
  return std::nullopt;
}

}  // namespace

std::optional<double> cgroup_memory_headroom(std::string const &root) {
  std::ifstream f(root + "/proc/self/cgroup");
  std::string line, v2, v1;
  while (std::getline(f, line)) {
    auto const a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    std::string const controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && controllers.empty()) v2 = path;
    std::stringstream cs(controllers);
    for (std::string c; std::getline(cs, c, ',');)
      if (c == "memory") v1 = path;
  }
  std::optional<double> best;
  auto consider = [&](std::optional<double> limit, std::optional<double> usage, std::optional<double> cache) {
    if (!limit || !usage || *limit >= 0x1p60) return;
    double const h = *limit - *usage + cache.value_or(0.0);
    best = best ? std::min(*best, h) : h;
  };
  auto walk = [](std::string p, auto const &visit) {
    while (true) {
      visit(p);
      if (p.empty() || p == "/") break;
      auto const s = p.find_last_of('/');
      if (s == std::string::npos) break;
      p = s == 0 ? "/" : p.substr(0, s);
    }
  };
  if (!v2.empty()) {
    walk(v2, [&](std::string const &p) {
      std::string const dir = root + "/sys/fs/cgroup" + (p == "/" ? std::string() : p);
      auto const file = read_stat(dir + "/memory.stat", "file"), shmem = read_stat(dir + "/memory.stat", "shmem");
      consider(read_number(dir + "/memory.max"), read_number(dir + "/memory.current"),
               file ? std::optional<double>(*file - shmem.value_or(0.0)) : std::nullopt);
    });
  } else if (!v1.empty()) {
    walk(v1, [&](std::string const &p) {
      std::string const dir = root + "/sys/fs/cgroup/memory" + (p == "/" ? std::string() : p);
      consider(read_number(dir + "/memory.limit_in_bytes"), read_number(dir + "/memory.usage_in_bytes"),
               read_stat(dir + "/memory.stat", "total_inactive_file"));
    });
  }
  return best;
}

std::string format_bytes(double bytes) {
  char const *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

MemoryNeed memory_need(Deck const &deck, std::vector<double> const &expert_share, int local_batch, int nranks) {
  VisionMoeSpec const s = spec_from(deck);
  VisionMoeParameterCounts const c = parameter_counts(s);
  MemoryNeed need;
  double const per_layer = s.moe_blocks.empty() ? 0.0 : c.expert / double(s.moe_blocks.size());
  need.parameters = c.replicated;
  for (std::size_t i = 0; i < s.moe_blocks.size(); ++i)
    need.parameters += per_layer * (i < expert_share.size() ? expert_share[i] : 1.0);

  // The images every rank loads (float pixels and an int label; an HDF5 set
  // without a sample count is not known before it is opened).
  auto const &data = deck.data;
  double train = 0, test = 0;
  switch (data.source) {
    case DataSection::Source::fashion_mnist:
      train = data.train_samples > 0 ? data.train_samples : 60000;
      test = data.test_samples > 0 ? data.test_samples : 10000;
      break;
    case DataSection::Source::synthetic:
      train = data.synthetic_train;
      test = data.synthetic_test;
      break;
    case DataSection::Source::hdf5:
      train = data.train_samples;
      test = data.test_samples;
      break;
  }
  need.data_bytes = (train + test) * (4.0 * s.channels * double(s.image_size) * s.image_size + 4.0);

  // Buffers, in floats, of the modules (core/model/VisionMoE.hpp, core/nn/)
  // for `images` images. The forward keeps per block the six block buffers,
  // attention's qkv, ctx and probabilities, the two LayerNorms' mean and rstd
  // and a dense block's pre-activation and activation, per model the tokens,
  // the final norm and its statistics and the patch matrix; the backward adds
  // per block the gradients of ctx, qkv and the scores and a dense block's
  // activation gradient, per model four gradient buffers. Evaluation (this
  // rank's share of the test set, eval_batch_size at a time) re-sizes the
  // forward's buffers while the backward's stay at the training batch.
  double const side = double(s.image_size / s.patch), L = side * side, d = s.dim, H = s.hidden;
  auto forward = [&](double images) {
    double const N = images * L;
    double f = N * d * 2.0 + N * s.channels * double(s.patch) * s.patch + 2.0 * N;
    for (int i = 0; i < s.depth; ++i) {
      f += N * d * 6.0 + N * d * 4.0 + images * s.heads * L * L + 4.0 * N;
      if (std::find(s.moe_blocks.begin(), s.moe_blocks.end(), i) == s.moe_blocks.end()) f += 2.0 * N * H;
    }
    return f;
  };
  auto backward = [&](double images) {
    double const N = images * L;
    double b = 4.0 * N * d;
    for (int i = 0; i < s.depth; ++i) {
      b += N * d * 4.0 + images * s.heads * L * L;
      if (std::find(s.moe_blocks.begin(), s.moe_blocks.end(), i) == s.moe_blocks.end()) b += N * H;
    }
    return b;
  };
  need.images = local_batch;
  double const test_share = std::ceil(test / std::max(1, nranks));
  need.eval_images = int(std::min<double>(deck.train.eval_batch_size, test_share));
  need.activation_bytes = 4.0 * (std::max(forward(local_batch), forward(need.eval_images)) + backward(local_batch));
  return need;
}

std::optional<MemoryAvailable> host_memory_available(MPI_Comm comm) {
  MPI_Comm node;
  MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int ranks = 1;
  MPI_Comm_size(node, &ranks);
  MPI_Comm_free(&node);
  std::optional<double> const avail_kib = read_stat("/proc/meminfo", "MemAvailable:");
  std::optional<double> const cg = cgroup_memory_headroom();
  if (!avail_kib && !cg) return std::nullopt;
  MemoryAvailable m;
  std::string what;
  if (avail_kib && (!cg || 1024.0 * *avail_kib <= *cg)) {
    m.bytes = 1024.0 * *avail_kib;
    what = "host memory available (MemAvailable)";
  } else {
    m.bytes = *cg;
    what = "host memory left under the job's cgroup limit";
  }
  m.bytes /= ranks;
  m.source = format_bytes(m.bytes) + " of " + what +
             (ranks > 1 ? ", shared by the " + std::to_string(ranks) + " ranks on this node" : "");
  return m;
}

std::optional<MemoryAvailable> device_memory_available() {
#if defined(KOKKOS_ENABLE_CUDA)
  std::size_t free = 0, total = 0;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) return std::nullopt;
  return MemoryAvailable{double(free), format_bytes(double(free)) + " free on CUDA device " + std::to_string(dev)};
#elif defined(KOKKOS_ENABLE_HIP)
  std::size_t free = 0, total = 0;
  int dev = 0;
  if (hipGetDevice(&dev) != hipSuccess || hipMemGetInfo(&free, &total) != hipSuccess) return std::nullopt;
  return MemoryAvailable{double(free), format_bytes(double(free)) + " free on HIP device " + std::to_string(dev)};
#else
  return std::nullopt;
#endif
}

void check_memory(Deck const &deck, MemoryNeed const &need, std::optional<MemoryAvailable> const &device,
                  std::optional<MemoryAvailable> const &host) {
  bool const on_host = !device;
  std::optional<MemoryAvailable> const &have = on_host ? host : device;
  double const model = need.model_bytes() + (on_host ? need.data_bytes : 0.0);
  char params[32];
  std::snprintf(params, sizeof params, "%.3g", need.parameters);
  // The message points at the key behind the largest part.
  std::string const data_key =
      deck.data.source == DataSection::Source::synthetic ? "data.synthetic_train" : "data.train_samples";
  std::string const test_key =
      deck.data.source == DataSection::Source::synthetic ? "data.synthetic_test" : "data.test_samples";
  double const parts[] = {need.parameter_bytes(), need.activation_bytes, on_host ? need.data_bytes : 0.0};
  int const largest = int(std::max_element(parts, parts + 3) - parts);
  std::string const key = largest == 0 ? "model.dim" : largest == 1 ? "train.batch_size" : data_key;
  std::string const advice = largest == 0 ? "Reduce model.dim, model.depth, model.mlp_ratio or moe.experts."
                             : largest == 1
                                 ? "Reduce train.batch_size, or run on more ranks (each takes a share of the batch)."
                                 : "Use fewer samples (" + data_key + ", " + test_key + ").";
  if (have && model > have->bytes)
    throw InputError(
        deck.where(key),
        "the run does not fit in memory: this rank needs at least " + format_bytes(model) + " of " +
            (on_host ? "host" : "device") + " memory (" + params +
            " parameters x 16 bytes for values, gradients and AdamW moments = " + format_bytes(need.parameter_bytes()) +
            ", " + format_bytes(need.activation_bytes) + " of activation buffers for its " +
            std::to_string(need.images) + " training and " + std::to_string(need.eval_images) +
            " evaluation images of " + std::to_string(deck.derived.num_patches) + " tokens" +
            (on_host ? ", " + format_bytes(need.data_bytes) + " of images" : std::string()) + "), but has " +
            have->source + ". " + advice);
  if (!on_host && host && need.data_bytes > host->bytes)
    throw InputError(deck.where(data_key), "the data does not fit in memory: this rank loads " +
                                               format_bytes(need.data_bytes) + " of images into host memory, but has " +
                                               host->source + ". Use fewer samples (" + data_key + ", " + test_key +
                                               ").");
}

void check_bench_memory(bench::BenchNeed const &need, double token_scale,
                        std::optional<MemoryAvailable> const &device, std::optional<MemoryAvailable> const &host) {
  std::optional<MemoryAvailable> const &have = device ? device : host;
  if (!have || need.bytes <= have->bytes) return;
  std::ostringstream scale;
  scale << token_scale;
  throw InputError("bench", "the " + need.row + " row at --token-scale " + scale.str() +
                                        " does not fit in memory: it needs at least " + format_bytes(need.bytes) +
                                        " of " + (device ? "device" : "host") +
                                        " memory (expert weights and gradients, its inputs and outputs, the "
                                        "activations of its routed rows), but has " +
                                        have->source + ". Use a smaller --token-scale, or --only other shapes.");
}

}  // namespace hexamoe::app
