// tstDeck.cpp: the input deck. A table of bad decks, each with the location
// ("FILE:LINE: section.key") and the words its message must carry; good decks
// against hand-computed values; the resolved-deck round trip; overrides;
// check_parallel; and every deck shipped in inputs/.
#include "io/Deck.hpp"
#include "io/InputError.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using hexamoe::Deck;
using hexamoe::InputError;

fs::path scratch() {
  static fs::path const dir = [] {
    fs::path d = fs::path(testing::TempDir()) / "hexamoe_tstDeck";
    fs::remove_all(d);  // nothing left over from an earlier run
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

std::string write_file(std::string const &name, std::string const &text) {
  fs::path const p = scratch() / name;
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

// A stand-in for the Fashion-MNIST directory: the four IDX files, empty (the
// deck only checks that they are there).
std::string fake_fashion_dir() {
  static std::string const dir = [] {
    fs::path d = scratch() / "fashion";
    fs::create_directories(d);
    for (char const *f : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                          "t10k-labels-idx1-ubyte.gz"})
      std::ofstream(d / f) << "";
    return d.string();
  }();
  return dir;
}

std::string fake_path_override() { return "data.path=\"" + fake_fashion_dir() + "\""; }

// ---- bad decks -------------------------------------------------------------------

struct BadDeck {
  char const *name;     // also the file name: <name>.toml
  char const *toml;     // without a [data] section, synthetic data is appended (after the last line)
  int line;             // expected line; 0 = the message names no line
  char const *key;      // expected key after "FILE:LINE: "
  char const *message;  // expected words of the message
};

BadDeck const bad_decks[] = {
    // structure
    {"unknown_section", "[run]\nname = \"x\"\n[modle]\ndim = 32\n", 3, "modle", "did you mean 'model'?"},
    {"unknown_section_far", "[optimizer]\nlr = 1\n", 1, "optimizer", "unknown section [optimizer]."},
    {"unknown_key_close", "[moe]\nexperts = 4\ntop_kk = 1\n", 3, "moe.top_kk", "did you mean 'top_k'?"},
    {"unknown_key_transposed", "[train]\nbatch_szie = 4\n", 2, "train.batch_szie", "did you mean 'batch_size'?"},
    {"unknown_key_other_section", "[model]\ndim = 32\ntop_k = 2\n", 3, "model.top_k", "it belongs in [moe]"},
    {"unknown_key_far", "[model]\nwidth = 32\n", 2, "model.width", "unknown key 'width' in [model]."},
    {"key_outside_section", "seed = 3\n[run]\nname = \"x\"\n", 1, "seed", "it belongs in [run]"},
    {"section_not_table", "model = 3\n", 1, "model", "[model] must be a table, got an integer"},
    // types
    {"string_for_int", "[model]\ndim = \"64\"\n", 2, "model.dim", "expected an integer, got a string (\"64\")"},
    {"float_for_int", "[train]\nbatch_size = 64.0\n", 2, "train.batch_size", "expected an integer, got a float (64.0)"},
    {"int_out_of_range", "[train]\nmax_steps = 3000000000\n", 2, "train.max_steps", "does not fit a 32-bit integer"},
    {"int_too_negative", "[model]\ndim = -3000000000\n", 2, "model.dim", "does not fit a 32-bit integer"},
    {"int_for_bool", "[moe]\nrenormalize = 1\n", 2, "moe.renormalize", "expected a boolean (true or false), got an integer"},
    {"string_for_float", "[train]\nlr = \"1e-3\"\n", 2, "train.lr", "expected a number, got a string"},
    {"nan_float", "[train]\nlr = nan\n", 2, "train.lr", "expected a finite number, got nan"},
    {"scalar_for_array", "[parallel]\nrates = 1.0\n", 2, "parallel.rates", "expected an array, got a float"},
    {"array_element_type", "[parallel]\nslowdown = [1.0,\n  \"2\"]\n", 3, "parallel.slowdown[1]",
     "expected a number, got a string"},
    {"float_in_int_array", "[output]\nactivations_layers = [1, 3.0]\nactivations_steps = [1]\n", 2,
     "output.activations_layers[1]", "expected an integer, got a float"},
    {"bad_enum", "[moe]\ndtype = \"bf16\"\n", 2, "moe.dtype", "expected one of \"float32\" or \"bfloat16\", got \"bf16\""},
    {"bad_enum_close", "[parallel]\nmode = \"modle\"\n", 2, "parallel.mode", "did you mean 'model'?"},
    {"enum_not_string", "[output]\nprogress = true\n", 2, "output.progress", "expected one of \"auto\", \"on\" or \"off\""},
    {"bad_activation", "[moe]\nactivation = \"gelo\"\n", 2, "moe.activation", "did you mean 'gelu'?"},
    // ranges
    {"negative_batch", "[train]\nbatch_size = -1\n", 2, "train.batch_size", "train.batch_size must be >= 1, got -1."},
    {"negative_samples", "[data]\nsource = \"synthetic\"\ntrain_samples = -5\n", 3, "data.train_samples", ">= 0, got -5"},
    {"zero_experts", "[moe]\nexperts = 0\n", 2, "moe.experts", "moe.experts must be >= 1"},
    {"top_k_gt_experts", "[moe]\nexperts = 2\ntop_k = 3\n", 3, "moe.top_k", "moe.top_k = 3 exceeds moe.experts = 2"},
    {"top_k_gt_default_experts", "[moe]\ntop_k = 5\n", 2, "moe.top_k", "exceeds moe.experts = 4"},
    {"dim_heads", "[model]\ndim = 30\nheads = 4\n", 3, "model.heads", "model.dim = 30 is not divisible by model.heads = 4"},
    {"dim_default_heads", "[model]\ndim = 30\n", 2, "model.dim", "model.heads = 4"},
    {"image_patch", "[data]\nsource = \"synthetic\"\nimage_size = 30\n[model]\npatch_size = 4\n", 5,
     "model.patch_size", "data.image_size = 30 is not divisible by model.patch_size = 4"},
    {"mlp_ratio_zero", "[model]\nmlp_ratio = 0\n", 2, "model.mlp_ratio", "must be > 0"},
    {"mlp_ratio_tiny", "[model]\nmlp_ratio = 0.001\n", 2, "model.mlp_ratio", "FFN hidden width"},
    {"moe_every_gt_depth", "[model]\ndepth = 2\nmoe_every = 3\n", 3, "model.moe_every", "no block would be MoE"},
    {"min_lr_gt_lr", "[train]\nlr = 0.001\nmin_lr = 0.01\n", 3, "train.min_lr", "train.min_lr = 0.01 exceeds train.lr = 0.001"},
    {"beta1_one", "[train]\nbeta1 = 1.0\n", 2, "train.beta1", "train.beta1 must be in [0, 1), got 1.0"},
    {"beta2_above", "[train]\nbeta2 = 1.5\n", 2, "train.beta2", "must be in [0, 1)"},
    {"eps_zero", "[train]\neps = 0\n", 2, "train.eps", "must be > 0"},
    {"negative_aux", "[moe]\naux_loss_weight = -0.1\n", 2, "moe.aux_loss_weight", "must be >= 0, got -0.1"},
    {"negative_capacity", "[moe]\ncapacity_factor = -1\n", 2, "moe.capacity_factor", "must be >= 0, got -1.0"},
    {"keep_zero", "[checkpoint]\nkeep = 0\n", 2, "checkpoint.keep", "must be >= 1"},
    {"negative_seed", "[run]\nseed = -1\n", 2, "run.seed", "run.seed must be >= 0"},
    {"empty_name", "[run]\nname = \"\"\n", 2, "run.name", "must not be empty"},
    {"proportions_sum", "[parallel]\nproportions = [0.5, 0.6]\n", 2, "parallel.proportions", "must sum to 1, got 1.1"},
    {"proportions_negative", "[parallel]\nproportions = [1.5, -0.5]\n", 2, "parallel.proportions",
     "parallel.proportions[1] = -0.5 must be >= 0"},
    {"rates_zero", "[parallel]\nrates = [1.0, 0.0]\n", 2, "parallel.rates", "parallel.rates[1] = 0.0 must be > 0"},
    {"slowdown_below_one", "[parallel]\nslowdown = [1.0, 0.5]\n", 2, "parallel.slowdown", "must be >= 1"},
    {"negative_group", "[parallel]\ngroup_size = -2\n", 2, "parallel.group_size", "must be >= 0"},
    {"overlap_not_bool", "[parallel]\noverlap = 1\n", 2, "parallel.overlap", "a boolean (true or false)"},
    {"activation_layer_not_moe", "[output]\nactivations_layers = [0]\nactivations_steps = [10]\n", 2,
     "output.activations_layers", "is not an MoE block; the MoE blocks are [1, 3]"},
    {"activation_steps_negative", "[output]\nactivations_layers = [1]\nactivations_steps = [-1]\n", 3,
     "output.activations_steps", "output.activations_steps[0] = -1 must be >= 0"},
    {"activation_layers_alone", "[output]\nactivations_layers = [1]\n", 2, "output.activations_layers",
     "must be given together"},
    // contradictions
    {"proportions_and_rates", "[parallel]\nproportions = [0.5, 0.5]\nrates = [1.0, 2.0]\n", 3, "parallel.rates",
     "parallel.proportions and parallel.rates are both given"},
    {"hdf5_without_file", "[data]\nsource = \"hdf5\"\n", 2, "data.source", "data.source = \"hdf5\" needs data.file"},
    {"fashion_wrong_shape", "[data]\nsource = \"fashion-mnist\"\nimage_size = 32\n", 3, "data.image_size",
     "28x28 images"},
    {"fashion_too_many_samples", "[data]\ntrain_samples = 70000\n", 2, "data.train_samples",
     "exceeds the 60000 training images"},
    // missing files
    {"missing_data_path", "[data]\nsource = \"fashion-mnist\"\npath = \"/nonexistent/hexamoe/fashion\"\n", 3,
     "data.path", "is not a directory"},
    {"missing_hdf5_file", "[data]\nsource = \"hdf5\"\nfile = \"/nonexistent/hexamoe/data.h5\"\n", 3, "data.file",
     "does not exist"},
    {"missing_resume", "[checkpoint]\nresume = \"/nonexistent/hexamoe/ckpt.h5\"\n", 2, "checkpoint.resume",
     "does not exist"},
    // unparsable TOML
    {"toml_no_value", "[model]\ndim = 32\nheads =\n", 3, "", "invalid TOML"},
    {"toml_bad_header", "[run]\nname = \"x\"\n[model\n", 3, "", "invalid TOML"},
    {"toml_duplicate_key", "[moe]\nexperts = 4\nexperts = 8\n", 3, "", "invalid TOML"},
    {"toml_unterminated_string", "[run]\nname = \"abc\n", 2, "", "invalid TOML"},
};

class BadDeckTest : public testing::TestWithParam<BadDeck> {};

TEST_P(BadDeckTest, names_key_and_line) {
  BadDeck const &c = GetParam();
  std::string text = c.toml;
  // Keep the machine's dataset out of it unless the case is about [data].
  if (text.find("[data]") == std::string::npos) text += "\n[data]\nsource = \"synthetic\"\n";
  std::string const path = write_file(std::string(c.name) + ".toml", text);

  try {
    hexamoe::load_deck(path);
    ADD_FAILURE() << c.name << ": no error for\n" << text;
  } catch (InputError const &e) {
    std::string const msg = e.what();
    std::string where = path + ":" + std::to_string(c.line);
    if (*c.key) where += ": " + std::string(c.key);
    EXPECT_EQ(e.where(), where) << msg;
    EXPECT_EQ(msg.rfind(where + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(c.message), std::string::npos) << "expected '" << c.message << "' in: " << msg;
    // One sentence: it ends with '.' or '?', and only there.
    EXPECT_TRUE(msg.back() == '.' || msg.back() == '?') << msg;
    EXPECT_EQ(msg.find("?."), std::string::npos) << msg;
  }
}

INSTANTIATE_TEST_SUITE_P(Deck, BadDeckTest, testing::ValuesIn(bad_decks),
                         [](testing::TestParamInfo<BadDeck> const &info) { return std::string(info.param.name); });

TEST(Deck, missing_idx_file) {
  fs::path const d = scratch() / "fashion_incomplete";
  fs::create_directories(d);
  for (char const *f : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte.gz"})
    std::ofstream(d / f) << "";
  std::string const path = write_file("incomplete.toml", "[data]\npath = \"" + d.string() + "\"\n");
  try {
    hexamoe::load_deck(path);
    ADD_FAILURE() << "no error";
  } catch (InputError const &e) {
    EXPECT_EQ(e.where(), path + ":2: data.path");
    EXPECT_NE(std::string(e.what()).find("has no t10k-labels-idx1-ubyte.gz"), std::string::npos) << e.what();
  }
  // Uncompressed files are accepted too.
  std::ofstream(d / "t10k-labels-idx1-ubyte") << "";
  EXPECT_NO_THROW(hexamoe::load_deck(path));
}

TEST(Deck, missing_deck_file) {
  try {
    hexamoe::load_deck((scratch() / "no_such_deck.toml").string());
    ADD_FAILURE() << "no error";
  } catch (InputError const &e) {
    EXPECT_NE(std::string(e.what()).find("cannot open the deck file"), std::string::npos) << e.what();
  }
}

// ---- good decks ------------------------------------------------------------------

TEST(Deck, defaults) {
  std::string const path = write_file("empty.toml", "# nothing set\n");
  Deck const d = hexamoe::load_deck(path, {fake_path_override()});
  EXPECT_EQ(d.run.name, "hexamoe");
  EXPECT_EQ(d.run.output_dir, "out/hexamoe");
  EXPECT_EQ(d.run.seed, 1234);
  EXPECT_EQ(d.data.source, hexamoe::DataSection::Source::fashion_mnist);
  EXPECT_EQ(d.data.path, fake_fashion_dir());
  EXPECT_EQ(d.model.patch_size, 4);
  EXPECT_EQ(d.model.dim, 64);
  EXPECT_EQ(d.moe.experts, 4);
  EXPECT_EQ(d.moe.top_k, 1);
  EXPECT_EQ(d.moe.activation, "gelu");
  EXPECT_EQ(d.train.batch_size, 64);
  EXPECT_DOUBLE_EQ(d.train.lr, 1e-3);
  EXPECT_EQ(d.checkpoint.keep, 2);
  EXPECT_EQ(d.output.progress, hexamoe::OutputSection::Progress::automatic);
  // Derived, by hand: 28/4 = 7 patches a side, 49 tokens, 1*4*4 = 16 features,
  // hidden round(64*2) = 128, head dim 64/4 = 16, MoE blocks 1 and 3 of 0..3.
  EXPECT_EQ(d.derived.patches_per_side, 7);
  EXPECT_EQ(d.derived.num_patches, 49);
  EXPECT_EQ(d.derived.patch_dim, 16);
  EXPECT_EQ(d.derived.hidden, 128);
  EXPECT_EQ(d.derived.head_dim, 16);
  EXPECT_EQ(d.derived.moe_blocks, (std::vector<int>{1, 3}));
  EXPECT_EQ(d.derived.checkpoint_dir, "out/hexamoe/checkpoints");
  EXPECT_EQ(d.derived.activations_path, "out/hexamoe/activations.h5");
  // Keys left at their defaults have no origin; the override has one.
  EXPECT_EQ(d.where("moe.top_k"), path + ": moe.top_k");
  EXPECT_EQ(d.where("data.path"), "--set data.path");
}

// Every key set to a value other than its default.
std::string full_deck(std::string const &hdf5_file) {
  return R"(# every key
[run]
name = "full \"deck\" \\ ü"
output_dir = "runs/full"
seed = 9007199254740993

[data]
source = "hdf5"
path = "unused/dir"
train_samples = 1000
test_samples = 100
synthetic_train = 77
synthetic_test = 0
image_size = 32
channels = 3
classes = 100
file = ")" + hdf5_file +
         R"("
train_images = "a/x"
train_labels = "a/y"
test_images = "b/x"
test_labels = "b/y"

[model]
patch_size = 8
dim = 48
depth = 6
heads = 3
mlp_ratio = 2.6666666666666665
moe_every = 3

[moe]
experts = 16
top_k = 4
activation = "silu"
renormalize = true
aux_loss_weight = 0.0
z_loss_weight = 1e-3
capacity_factor = 1.25
dtype = "bfloat16"

[parallel]
mode = "model"
proportions = [0.1, 0.2, 0.7]
rates = []
slowdown = [1.0, 2.5, 1.0]
group_size = 3
overlap = false

[train]
epochs = 7
max_steps = 12345
batch_size = 96
lr = 3e-4
min_lr = 1e-6
schedule = "constant"
weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
eps = 1e-6
warmup_steps = 500
clip_norm = 0.0
log_every = 0
eval_every = 250
eval_batch_size = 512

[checkpoint]
every = 1000
keep = 5
dir = "/abs/ckpt"
at_end = false
resume = ")" + hdf5_file +
         R"("

[output]
metrics = false
progress = "on"
activations_layers = [2, 5]
activations_steps = [0, 100, 1000]
activations_file = "acts/a.h5"
)";
}

TEST(Deck, full_deck_and_round_trip) {
  std::string const h5 = write_file("fake.h5", "");
  std::string const path = write_file("full.toml", full_deck(h5));
  Deck const d = hexamoe::load_deck(path);
  EXPECT_EQ(d.run.name, "full \"deck\" \\ \xc3\xbc");
  EXPECT_EQ(d.run.seed, 9007199254740993);  // not representable as a double
  EXPECT_EQ(d.data.source, hexamoe::DataSection::Source::hdf5);
  EXPECT_EQ(d.data.classes, 100);
  EXPECT_EQ(d.moe.dtype, hexamoe::MoeSection::Dtype::bfloat16);
  EXPECT_EQ(d.parallel.mode, hexamoe::ParallelSection::Mode::model);
  EXPECT_EQ(d.parallel.proportions, (std::vector<double>{0.1, 0.2, 0.7}));
  EXPECT_EQ(d.train.schedule, hexamoe::TrainSection::Schedule::constant);
  EXPECT_EQ(d.train.lr, 3e-4);
  EXPECT_EQ(d.model.mlp_ratio, 2.6666666666666665);
  EXPECT_EQ(d.where("moe.top_k"), path + ":33: moe.top_k");
  // Derived: 32/8 = 4 a side, 16 tokens, 3*8*8 = 192 features, round(48*8/3) =
  // 128 hidden, head dim 16, MoE blocks 2 and 5 of 0..5; an absolute
  // checkpoint.dir stays as it is.
  EXPECT_EQ(d.derived.num_patches, 16);
  EXPECT_EQ(d.derived.patch_dim, 192);
  EXPECT_EQ(d.derived.hidden, 128);
  EXPECT_EQ(d.derived.head_dim, 16);
  EXPECT_EQ(d.derived.moe_blocks, (std::vector<int>{2, 5}));
  EXPECT_EQ(d.derived.checkpoint_dir, "/abs/ckpt");
  EXPECT_EQ(d.derived.activations_path, "runs/full/acts/a.h5");

  // The resolved deck, loaded again, is the same deck, and prints the same.
  std::string const resolved = hexamoe::resolved_toml(d);
  std::string const path2 = write_file("full_resolved.toml", resolved);
  Deck const d2 = hexamoe::load_deck(path2);
  EXPECT_TRUE(d2 == d) << resolved;
  auto body = [](std::string const &t) { return t.substr(t.find("\n[run]")); };  // past the header naming the file
  EXPECT_EQ(body(hexamoe::resolved_toml(d2)), body(resolved));
  EXPECT_NE(resolved.find("lr = 3e-4\n"), std::string::npos) << resolved;
  EXPECT_NE(resolved.find("#   MoE blocks          = [2, 5]"), std::string::npos) << resolved;

  // One changed field breaks equality (operator== is not vacuous).
  Deck d3 = d2;
  d3.checkpoint.resume = "other";
  EXPECT_FALSE(d3 == d);
  d3 = d2;
  d3.derived.patch_dim += 1;
  EXPECT_FALSE(d3 == d);
}

TEST(Deck, defaults_round_trip_prints_every_key) {
  std::string const path = write_file("empty2.toml", "");
  Deck const d = hexamoe::load_deck(path, {fake_path_override()});
  std::string const resolved = hexamoe::resolved_toml(d);
  for (char const *k : {"[run]", "output_dir = \"out/hexamoe\"", "[data]", "source = \"fashion-mnist\"",
                        "file = \"\"", "[model]", "mlp_ratio = 2.0", "[moe]", "renormalize = false",
                        "dtype = \"float32\"", "[parallel]", "mode = \"auto\"", "proportions = []", "[train]",
                        "lr = 0.001", "eps = 1e-8", "schedule = \"cosine\"", "[checkpoint]", "resume = \"\"",
                        "[output]", "activations_layers = []", "progress = \"auto\""})
    EXPECT_NE(resolved.find(k), std::string::npos) << k << " missing in\n" << resolved;
  Deck const d2 = hexamoe::load_deck(write_file("empty2_resolved.toml", resolved));
  EXPECT_TRUE(d2 == d) << resolved;
}

TEST(Deck, moe_every_picks_blocks) {
  auto blocks = [](int depth, int every) {
    std::string const text = "[data]\nsource = \"synthetic\"\n[model]\ndepth = " + std::to_string(depth) +
                             "\nmoe_every = " + std::to_string(every) + "\n";
    return hexamoe::load_deck(write_file("blocks.toml", text)).derived.moe_blocks;
  };
  EXPECT_EQ(blocks(4, 2), (std::vector<int>{1, 3}));
  EXPECT_EQ(blocks(5, 2), (std::vector<int>{1, 3}));
  EXPECT_EQ(blocks(6, 3), (std::vector<int>{2, 5}));
  EXPECT_EQ(blocks(3, 1), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(blocks(3, 3), (std::vector<int>{2}));
  EXPECT_EQ(blocks(3, 0), (std::vector<int>{}));
}

TEST(Deck, integer_accepted_for_float) {
  std::string const path =
      write_file("int_float.toml", "[data]\nsource = \"synthetic\"\n[model]\nmlp_ratio = 3\n[train]\nlr = 1\n");
  Deck const d = hexamoe::load_deck(path);
  EXPECT_EQ(d.model.mlp_ratio, 3.0);
  EXPECT_EQ(d.train.lr, 1.0);
  EXPECT_EQ(d.derived.hidden, 192);
}

// ---- overrides -------------------------------------------------------------------

TEST(Deck, overrides) {
  std::string const path =
      write_file("ov.toml", "[data]\nsource = \"fashion-mnist\"\n[moe]\nexperts = 4\ntop_k = 1\n[train]\nlr = 0.01\n");
  Deck const d = hexamoe::load_deck(path, {"moe.experts=8", " moe.top_k = 2 ", "data.source=synthetic",
                                           "train.lr=3e-4", "parallel.proportions=[0.25, 0.75]",
                                           "run.name=\"a b\"", "moe.renormalize=true"});
  EXPECT_EQ(d.moe.experts, 8);
  EXPECT_EQ(d.moe.top_k, 2);
  EXPECT_EQ(d.data.source, hexamoe::DataSection::Source::synthetic);  // a bare word is a string
  EXPECT_EQ(d.train.lr, 3e-4);
  EXPECT_EQ(d.parallel.proportions, (std::vector<double>{0.25, 0.75}));
  EXPECT_EQ(d.run.name, "a b");
  EXPECT_EQ(d.run.output_dir, "out/a b");
  EXPECT_TRUE(d.moe.renormalize);
  EXPECT_EQ(d.where("moe.top_k"), "--set moe.top_k");
  EXPECT_EQ(d.where("moe.experts"), "--set moe.experts");
}

TEST(Deck, bad_overrides) {
  std::string const path = write_file("ov_bad.toml", "[data]\nsource = \"synthetic\"\n[moe]\nexperts = 4\n");
  struct Case {
    char const *override_, *where, *message;
  };
  Case const cases[] = {
      {"moe.top_k", "--set moe.top_k", "must have the form section.key=value"},
      {"top_k=1", "--set top_k", "must have the form section.key"},
      {"moe.top_k.x=1", "--set moe.top_k.x", "must have the form section.key"},
      {"moe.top_k=", "--set moe.top_k", "no value"},
      {"moe.top_k=9", "--set moe.top_k", "moe.top_k = 9 exceeds moe.experts = 4"},
      {"moe.top_k=1.5", "--set moe.top_k", "expected an integer, got a float"},
      {"moe.topk=1", "--set moe.topk", "did you mean 'top_k'?"},
      {"modle.dim=3", "--set modle.dim", "did you mean 'model'?"},
      {"moe.experts=[1", "--set moe.experts", "cannot parse '[1' as a TOML value"},
      {"moe.activation=tanh", "--set moe.activation", "got \"tanh\""},
      {"parallel.rates=[1, 1]", "--set parallel.rates", "both given"},
  };
  for (auto const &c : cases) {
    try {
      std::vector<std::string> ov{c.override_};
      if (std::string(c.override_).rfind("parallel.rates", 0) == 0) ov.insert(ov.begin(), "parallel.proportions=[0.5, 0.5]");
      hexamoe::load_deck(path, ov);
      ADD_FAILURE() << c.override_ << ": no error";
    } catch (InputError const &e) {
      EXPECT_EQ(e.where(), c.where) << c.override_ << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << c.override_ << ": " << e.what();
    }
  }
}

// ---- check_parallel ----------------------------------------------------------------

TEST(Deck, check_parallel) {
  auto deck = [](std::string const &parallel) {
    return hexamoe::load_deck(write_file("par.toml", "[data]\nsource = \"synthetic\"\n[parallel]\n" + parallel));
  };
  auto error = [](Deck const &d, int n) -> std::string {
    try {
      hexamoe::check_parallel(d, n);
    } catch (InputError const &e) {
      return e.what();
    }
    return "";
  };
  Deck const plain = deck("");
  for (int n : {1, 2, 3, 8}) EXPECT_EQ(error(plain, n), "") << n;
  EXPECT_NE(error(plain, 0).find("rank count must be >= 1"), std::string::npos);

  Deck const prop = deck("proportions = [0.25, 0.25, 0.5]\n");
  EXPECT_EQ(error(prop, 3), "");
  std::string const e2 = error(prop, 2);
  EXPECT_NE(e2.find(":4: parallel.proportions: parallel.proportions has 3 entries but the job has 2 ranks"),
            std::string::npos)
      << e2;

  Deck const rates = deck("rates = [1.0, 2.0]\nslowdown = [1.0, 3.0]\n");
  EXPECT_EQ(error(rates, 2), "");
  EXPECT_NE(error(rates, 4).find("parallel.rates has 2 entries"), std::string::npos);
  Deck const slow = deck("slowdown = [1.0, 3.0]\n");
  EXPECT_NE(error(slow, 1).find("parallel.slowdown has 2 entries but the job has 1 ranks"), std::string::npos);

  Deck const group = deck("group_size = 3\n");
  EXPECT_EQ(error(group, 3), "");
  EXPECT_EQ(error(group, 6), "");
  EXPECT_NE(error(group, 4).find("parallel.group_size = 3 does not divide the 4 ranks"), std::string::npos);
  EXPECT_NE(error(group, 2).find("parallel.group_size"), std::string::npos);
}

// ---- the decks shipped in inputs/ -------------------------------------------------------

TEST(Deck, inputs_load) {
  fs::path const dir = fs::path(HEXAMOE_SOURCE_DIR) / "inputs";
  std::vector<std::string> overrides;
  // Where the machine has no Fashion-MNIST, the default job points at a stand-in.
  if (!fs::is_directory("/usr/share/datasets/fashion-mnist")) overrides.push_back(fake_path_override());
  std::vector<std::string> seen;
  for (auto const &entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".toml") continue;
    seen.push_back(entry.path().filename().string());
    SCOPED_TRACE(entry.path().string());
    Deck d;
    ASSERT_NO_THROW(d = hexamoe::load_deck(entry.path().string(), overrides));
    Deck const again = hexamoe::load_deck(write_file("resolved_" + seen.back(), hexamoe::resolved_toml(d)));
    EXPECT_TRUE(again == d);
  }
  for (char const *f : {"fashion-mnist.toml", "quick.toml", "swin-moe-s-stage3.toml", "swin-moe-b-stage3.toml"})
    EXPECT_NE(std::find(seen.begin(), seen.end(), f), seen.end()) << f << " missing in inputs/";

  // The benchmark decks carry the MoE shapes of the design.
  Deck const s = hexamoe::load_deck((dir / "swin-moe-s-stage3.toml").string());
  EXPECT_EQ(s.model.dim, 384);
  EXPECT_EQ(s.derived.hidden, 1536);
  EXPECT_EQ(s.moe.experts, 8);
  EXPECT_EQ(s.moe.top_k, 1);
  Deck const b = hexamoe::load_deck((dir / "swin-moe-b-stage3.toml").string());
  EXPECT_EQ(b.model.dim, 512);
  EXPECT_EQ(b.derived.hidden, 2048);
  EXPECT_EQ(b.moe.experts, 8);
  EXPECT_EQ(b.moe.top_k, 1);
}

}  // namespace
