// Deck.hpp: the input deck of `hexamoe train DECK.toml`, one plain struct per
// TOML section with the defaults in the struct, and the functions that load,
// validate and print it. Every key is documented in docs/DECK.md.
//
// load_deck() checks everything it can up front (unknown sections and keys,
// types, ranges, contradictions, missing files) and throws hexamoe::InputError
// with where = "DECK.toml:LINE: section.key". Checks that need the rank count
// are in check_parallel(), called by the driver once MPI is up.
//
// This header has no Kokkos, MPI or toml++ in it: the deck is plain data.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace hexamoe {

struct RunSection {
  std::string name = "hexamoe";
  std::string output_dir;  // default "out/<name>", filled by load_deck
  std::int64_t seed = 1234;
};

struct DataSection {
  enum class Source { fashion_mnist, synthetic, hdf5 };
  Source source = Source::fashion_mnist;
  // fashion-mnist: a directory with the four IDX files (.gz or uncompressed).
  std::string path = "/usr/share/datasets/fashion-mnist";
  int train_samples = 0;  // use the first N training samples; 0 = all
  int test_samples = 0;   // use the first N test samples; 0 = all
  // synthetic: sizes of the generated sets (generated from run.seed).
  int synthetic_train = 2048;
  int synthetic_test = 512;
  // Image shape and class count (fashion-mnist: must be 28, 1, 10).
  int image_size = 28;
  int channels = 1;
  int classes = 10;
  // hdf5: one file holding four datasets.
  std::string file;
  std::string train_images = "train_images";
  std::string train_labels = "train_labels";
  std::string test_images = "test_images";
  std::string test_labels = "test_labels";
};

struct ModelSection {
  int patch_size = 4;
  int dim = 64;
  int depth = 4;
  int heads = 4;
  double mlp_ratio = 2.0;  // FFN hidden width = round(dim * mlp_ratio)
  int moe_every = 2;       // block i is MoE iff (i + 1) % moe_every == 0; 0 = no MoE
};

struct MoeSection {
  int experts = 4;
  int top_k = 1;
  // "gelu", "relu" or "silu" (validated here); core's activation_from_string parses it.
  std::string activation = "gelu";
  bool renormalize = false;  // renormalise the top-k gate weights to sum to 1
  double aux_loss_weight = 0.01;
  double z_loss_weight = 0.0;
  double capacity_factor = 0.0;  // 0 = dropless
  enum class Dtype { float32, bfloat16 };
  Dtype dtype = Dtype::float32;
};

struct ParallelSection {
  enum class Mode { automatic, data, model };  // TOML: "auto", "data", "model"
  Mode mode = Mode::automatic;
  std::vector<double> proportions;  // per rank, >= 0, sum 1; empty = from rates or equal
  std::vector<double> rates;        // per rank relative speed, > 0; empty = equal
  std::vector<double> slowdown;     // per rank simulated compute slowdown, >= 1; empty = none
  int group_size = 0;               // ranks per MoE group; 0 = all ranks
  bool overlap = true;              // data-centric: gather the next layer's weights during this layer
};

struct TrainSection {
  int epochs = 1;
  int max_steps = 0;  // 0 = no cap
  int batch_size = 64;  // global: samples per optimizer step over all ranks
  double lr = 1e-3;
  double min_lr = 0.0;
  enum class Schedule { cosine, constant };
  Schedule schedule = Schedule::cosine;
  double weight_decay = 0.05;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  int warmup_steps = 0;
  double clip_norm = 1.0;  // 0 = no clipping
  int log_every = 50;      // 0 = no step lines
  int eval_every = 0;      // steps; 0 = at the end of each epoch
  int eval_batch_size = 256;
};

struct CheckpointSection {
  int every = 0;  // steps; 0 = only at the end
  int keep = 2;
  std::string dir = "checkpoints";  // relative to run.output_dir unless absolute
  bool at_end = true;
  std::string resume;  // checkpoint to resume from; empty = start fresh
};

struct OutputSection {
  bool metrics = true;
  enum class Progress { automatic, on, off };  // TOML: "auto", "on", "off"
  Progress progress = Progress::automatic;
  std::vector<int> activations_layers;  // MoE block indices to record
  std::vector<int> activations_steps;   // steps at which to record
  std::string activations_file = "activations.h5";  // relative to run.output_dir unless absolute
};

// Values computed from the keys; filled by load_deck, never read from TOML.
struct DerivedValues {
  int hidden = 0;            // FFN / expert hidden width, round(dim * mlp_ratio)
  int head_dim = 0;          // dim / heads
  int patches_per_side = 0;  // image_size / patch_size
  int num_patches = 0;       // tokens per image
  int patch_dim = 0;         // channels * patch_size^2, inputs of the patch embedding
  std::vector<int> moe_blocks;   // indices of the blocks with an MoE FFN
  std::string checkpoint_dir;    // checkpoint.dir resolved against run.output_dir
  std::string activations_path;  // output.activations_file resolved against run.output_dir
};

struct Deck {
  RunSection run;
  DataSection data;
  ModelSection model;
  MoeSection moe;
  ParallelSection parallel;
  TrainSection train;
  CheckpointSection checkpoint;
  OutputSection output;
  DerivedValues derived;

  std::string path;  // the deck file as given (for messages)
  // "section.key" -> where it was set: "DECK.toml:LINE" or "--set". Keys left
  // at their defaults are absent.
  std::map<std::string, std::string> origins;

  // Error location of a key: "DECK.toml:LINE: section.key", "--set section.key"
  // or, for a default, "DECK.toml: section.key".
  std::string where(std::string const &key) const;
};

// Read, override, validate and derive. overrides are "section.key=value" with a
// TOML value (a bare word that is not valid TOML is taken as a string).
// Throws InputError on the first problem.
Deck load_deck(std::string const &path, std::vector<std::string> const &overrides = {});

// As load_deck, from TOML text; name stands for the file in messages.
Deck parse_deck(std::string const &toml_text, std::string const &name,
                std::vector<std::string> const &overrides = {});

// The fully resolved deck as TOML (every key, defaults filled), followed by the
// derived values as comments. Loading it again gives the same Deck.
std::string resolved_toml(Deck const &deck);

// Checks that need the number of ranks: per-rank list lengths and group_size.
void check_parallel(Deck const &deck, int nranks);

// TOML spellings of the enumerated keys.
char const *to_string(DataSection::Source s);
char const *to_string(MoeSection::Dtype d);
char const *to_string(ParallelSection::Mode m);
char const *to_string(TrainSection::Schedule s);
char const *to_string(OutputSection::Progress p);

// Field-by-field equality (sections and derived values; not path or origins).
bool operator==(Deck const &a, Deck const &b);
inline bool operator!=(Deck const &a, Deck const &b) { return !(a == b); }

}  // namespace hexamoe
