// tstTrainer.cpp: the training application end to end on the quick deck:
// the loss falls, a stopped-and-restarted run continues bit-identically, bad
// checkpoints are refused, the driver exits 2 on bad input, and runs that
// cannot fit in memory are refused before they allocate or write anything.
#include "app/Commands.hpp"
#include "app/MemoryCheck.hpp"
#include "app/Trainer.hpp"
#include "core/MemoryTracker.hpp"
#include "core/model/VisionMoE.hpp"
#include "io/Checkpoint.hpp"
#include "io/Deck.hpp"
#include "io/InputError.hpp"

#include <gtest/gtest.h>
#include <hdf5.h>
#include <mpi.h>

#include <cmath>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

namespace {

namespace fs = std::filesystem;
using namespace hexamoe;

#define EXPECT_CONTAINS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

std::string quick_deck() { return std::string(HEXAMOE_SOURCE_DIR) + "/inputs/quick.toml"; }

// A fresh output directory per test, the same on every rank, unique per
// launch (ctest runs the 1- and 2-rank instances at the same time).
std::string out_dir(std::string const &name) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  long pid = static_cast<long>(getpid());
  MPI_Bcast(&pid, 1, MPI_LONG, 0, MPI_COMM_WORLD);
  std::string d = testing::TempDir() + "hexamoe_trainer_" + std::to_string(pid) + "_n" + std::to_string(size) + "_" + name;
  // Removed again when the test program exits (rank 0 owns the directory).
  static struct Cleanup {
    std::vector<std::string> dirs;
    ~Cleanup() {
      for (auto const &x : dirs) fs::remove_all(x);
    }
  } cleanup;
  if (rank == 0) {
    fs::remove_all(d);
    cleanup.dirs.push_back(d);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return d;
}

Deck deck_with(std::string const &dir, std::vector<std::string> extra = {}) {
  std::vector<std::string> o = {"run.output_dir=\"" + dir + "\""};
  o.insert(o.end(), extra.begin(), extra.end());
  return load_deck(quick_deck(), o);
}

double mean(std::vector<double> const &v, std::size_t a, std::size_t b) {
  return std::accumulate(v.begin() + a, v.begin() + b, 0.0) / double(b - a);
}

TEST(Trainer, QuickDeckLossFalls) {
  app::TrainOptions opt;
  opt.quiet = true;
  std::string const dir = out_dir("quick");
  auto sum = app::train(deck_with(dir), opt, MPI_COMM_WORLD);
  ASSERT_EQ(sum.steps, 150);
  ASSERT_EQ(sum.step_losses.size(), 150u);
  double const first = mean(sum.step_losses, 0, 10), last = mean(sum.step_losses, 140, 150);
  EXPECT_LT(last, 0.8 * first) << "loss did not fall: first 10 steps " << first << ", last 10 " << last;
  EXPECT_GT(sum.test_accuracy, 0.3) << "test accuracy " << sum.test_accuracy << " (chance is 0.1)";
  EXPECT_TRUE(fs::exists(dir + "/summary.json"));
  EXPECT_TRUE(fs::exists(dir + "/metrics.jsonl"));
  EXPECT_TRUE(fs::exists(dir + "/deck.resolved.toml"));
}

TEST(Trainer, Bfloat16ExpertsLearnToo) {
  app::TrainOptions opt;
  opt.quiet = true;
  auto sum = app::train(deck_with(out_dir("bf16"), {"moe.dtype=\"bfloat16\""}), opt, MPI_COMM_WORLD);
  ASSERT_EQ(sum.step_losses.size(), 150u);
  EXPECT_LT(mean(sum.step_losses, 140, 150), 0.8 * mean(sum.step_losses, 0, 10));
}

TEST(Trainer, WritesChosenActivations) {
  std::string const dir = out_dir("activations");
  app::TrainOptions opt;
  opt.quiet = true;
  app::train(deck_with(dir, {"train.max_steps=4", "output.activations_layers=[1]", "output.activations_steps=[2, 4]"}), opt,
             MPI_COMM_WORLD);
  int ranks = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  // Plain HDF5, as h5dump would read it: [global tokens, dim] per dataset.
  hid_t f = H5Fopen((dir + "/activations.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  for (char const *name : {"step_2/layer_1/input", "step_2/layer_1/output", "step_4/layer_1/output"}) {
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ASSERT_GE(d, 0) << name;
    hid_t sp = H5Dget_space(d);
    hsize_t dims[2] = {0, 0};
    ASSERT_EQ(H5Sget_simple_extent_ndims(sp), 2);
    H5Sget_simple_extent_dims(sp, dims, nullptr);
    EXPECT_EQ(dims[0], hsize_t(32 * 16)) << name << ": batch 32 x 16 tokens";
    EXPECT_EQ(dims[1], hsize_t(32)) << name;
    std::vector<float> v(dims[0] * dims[1]);
    H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    double s = 0;
    for (float x : v) s += std::fabs(x);
    EXPECT_GT(s, 0.0) << name << " is all zeros";
    H5Sclose(sp);
    H5Dclose(d);
  }
  EXPECT_LE(H5Lexists(f, "step_3", H5P_DEFAULT), 0) << "step 3 was not asked for";
  H5Fclose(f);
  (void)ranks;
}

// Read every dataset of a checkpoint as raw floats.
std::map<std::string, std::vector<float>> read_all(std::string const &path) {
  CheckpointReader r(MPI_COMM_WORLD, path);
  std::map<std::string, std::vector<float>> out;
  for (auto const &name : r.datasets()) {
    Shape s = r.shape(name);
    std::size_t n = 1;
    for (auto e : s) n *= e;
    std::vector<float> v(n);
    r.read_whole(name, s, v.data());
    out[name] = std::move(v);
  }
  return out;
}

TEST(Trainer, RestartContinuesBitIdentically) {
  // The plan is pinned (mode and per-rank rates): "auto" measures the ranks at
  // start-up, so two fresh runs may split the work differently. A restart
  // reuses the plan stored in its checkpoint.
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  std::string rates = "parallel.rates=[";
  for (int r = 0; r < n; ++r) rates += (r ? ", " : "") + std::string("1.0");
  std::vector<std::string> const common = {"train.max_steps=30", "checkpoint.keep=5", "parallel.mode=\"data\"",
                                           rates + "]"};
  // Uninterrupted run.
  std::string const da = out_dir("straight");
  app::TrainOptions quiet;
  quiet.quiet = true;
  auto a = app::train(deck_with(da, common), quiet, MPI_COMM_WORLD);
  ASSERT_EQ(a.steps, 30);
  // Stopped after 13 steps (as a preemption would), then restarted from latest.
  std::string const db = out_dir("restarted");
  app::TrainOptions stop = quiet;
  stop.stop_after = 13;
  auto b1 = app::train(deck_with(db, common), stop, MPI_COMM_WORLD);
  ASSERT_TRUE(b1.preempted);
  ASSERT_EQ(b1.steps, 13);
  app::TrainOptions again = quiet;
  again.restart = "latest";
  auto b2 = app::train(deck_with(db, common), again, MPI_COMM_WORLD);
  ASSERT_EQ(b2.steps, 30);
  ASSERT_EQ(b2.step_losses.size(), 17u);
  for (std::size_t i = 0; i < 13; ++i) EXPECT_EQ(a.step_losses[i], b1.step_losses[i]) << "step " << i + 1;
  for (std::size_t i = 0; i < 17; ++i) EXPECT_EQ(a.step_losses[13 + i], b2.step_losses[i]) << "step " << 14 + i;
  // Final parameters and optimiser moments: bit for bit.
  auto pa = read_all(find_latest_checkpoint(da + "/checkpoints"));
  auto pb = read_all(find_latest_checkpoint(db + "/checkpoints"));
  ASSERT_EQ(pa.size(), pb.size());
  for (auto const &[name, va] : pa) {
    ASSERT_TRUE(pb.count(name)) << name;
    ASSERT_EQ(va.size(), pb[name].size()) << name;
    EXPECT_EQ(0, std::memcmp(va.data(), pb[name].data(), va.size() * sizeof(float))) << name << " differs";
  }
}

TEST(Trainer, RefusesBadCheckpoints) {
  std::string const d = out_dir("badckpt");
  app::TrainOptions quiet;
  quiet.quiet = true;
  quiet.stop_after = 2;
  app::train(deck_with(d, {"train.max_steps=4"}), quiet, MPI_COMM_WORLD);
  std::string const good = find_latest_checkpoint(d + "/checkpoints");
  ASSERT_FALSE(good.empty());
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::string const cut = d + "/truncated.h5";
  if (rank == 0) {
    fs::copy_file(good, cut);
    fs::resize_file(cut, fs::file_size(good) / 2);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  app::TrainOptions r = quiet;
  r.restart = cut;
  r.stop_after = 0;
  EXPECT_THROW(app::train(deck_with(d, {"train.max_steps=4"}), r, MPI_COMM_WORLD), InputError);
  // A checkpoint of a different model (more experts) is refused by name.
  r.restart = good;
  try {
    app::train(deck_with(d, {"train.max_steps=4", "moe.experts=8"}), r, MPI_COMM_WORLD);
    ADD_FAILURE() << "a checkpoint of another model was accepted";
  } catch (InputError const &e) {
    EXPECT_NE(std::string(e.what()).find("E4"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::exists(good)) << "the last good checkpoint was lost";
}

int run_cli(std::vector<std::string> args) {
  std::vector<char *> argv;
  for (auto &a : args) argv.push_back(a.data());
  return app::run(static_cast<int>(argv.size()), argv.data());
}

TEST(Trainer, DriverExitCodes) {
  testing::internal::CaptureStdout();
  EXPECT_EQ(0, run_cli({"hexamoe", "check", quick_deck()}));
  std::string const resolved = testing::internal::GetCapturedStdout();
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    EXPECT_CONTAINS(resolved, "memory per rank     = at least ");
  }
  EXPECT_EQ(2, run_cli({"hexamoe", "check", quick_deck(), "--set", "moe.top_k=9"}));
  EXPECT_EQ(2, run_cli({"hexamoe", "check", "/nonexistent/deck.toml"}));
  EXPECT_EQ(2, run_cli({"hexamoe", "train", quick_deck(), "--set", "data.source=fashion-mnist", "--set",
                        "data.path=/nonexistent"}));
  EXPECT_EQ(2, run_cli({"hexamoe", "frobnicate"}));
  // An empty --restart (an unset variable in a job script) is not a fresh start.
  EXPECT_EQ(2, run_cli({"hexamoe", "train", quick_deck(), "--restart", ""}));
  EXPECT_EQ(2, run_cli({"hexamoe", "train", quick_deck(), "--stop-after", "-1"}));
}

// Bench arguments that cannot mean what they say: refused with a message
// naming the option, exit 2, before anything runs.
TEST(Trainer, BenchRefusesBadArguments) {
  auto refused = [](std::vector<std::string> args, std::string const &needle) {
    args.insert(args.begin(), {"hexamoe", "bench"});
    testing::internal::CaptureStderr();
    testing::internal::CaptureStdout();
    int const rc = run_cli(args);
    std::string const err = testing::internal::GetCapturedStderr();
    std::string const out = testing::internal::GetCapturedStdout();
    EXPECT_EQ(rc, 2) << args.back();
    EXPECT_NE(err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << err;
    EXPECT_EQ(out.find("hexamoe "), std::string::npos) << "a benchmark ran: " << out;
  };
  refused({"--token-scale", "nan"}, "--token-scale: must be a finite number > 0, got 'nan'");
  refused({"--token-scale", "inf"}, "got 'inf'");
  refused({"--token-scale", "0"}, "> 0, got '0'");
  refused({"--token-scale", "1e300"}, "routed rows, more than the 2147483647 one layer call can index");
  // 14400 x 200000 tokens of the top-1 shape: 2.88e9 routed rows.
  refused({"--only", "swinS-s3-top1", "--token-scale", "200000"},
          "gives swinS-s3-top1 2880000000 tokens x top_k 1 = 2880000000 routed rows");
  // 288e6 tokens fit int's routed rows but no machine's memory (13 TiB for the padded row).
  refused({"--only", "swinS-s3-top1", "--token-scale", "20000"},
          "bench: the swinS-s3-top1 float32 (padded-gemm, 288000000 tokens) row at --token-scale 20000 does not fit in "
          "memory: it needs at least");
  refused({"--only", "swinS-s3-top1", "--token-scale", "20000", "--no-baseline", "--dtype", "bfloat16"},
          "bfloat16 (hexamoe, 288000000 tokens) row at --token-scale 20000 does not fit in memory");
  refused({"--reps", "0"}, "--reps: must be a finite number > 0");
  refused({"--warmup", "-1"}, "--warmup: must be a finite number >= 0");
  refused({"--capacity-factor", "nan"}, "--capacity-factor: must be a finite number > 0");
  // Options of one mode given to the other are refused, not ignored.
  refused({"--set", "model.dim=8"}, "--set requires --deck");
  refused({"--deck", quick_deck(), "--only", "swinS-s3-top1"}, "excludes");
  refused({"--deck", quick_deck(), "--dtype", "bfloat16"}, "excludes");
  refused({"--deck", quick_deck(), "--token-scale", "2"}, "excludes");
}

// The parameter counts the memory check uses, against the parameters of the
// model itself (replicated and expert elements, several shapes).
TEST(Trainer, ParameterCountsMatchTheModel) {
  using Space = Kokkos::DefaultExecutionSpace;
  std::vector<std::vector<std::string>> const variants = {
      {},
      {"model.moe_every=1", "moe.experts=3", "moe.top_k=1"},
      {"model.moe_every=0"},
      {"data.source=\"synthetic\"", "data.channels=3", "data.image_size=12", "model.patch_size=3", "data.classes=5",
       "model.mlp_ratio=1.5", "model.depth=3", "model.dim=24", "model.heads=3"}};
  for (auto const &v : variants) {
    Deck const deck = load_deck(quick_deck(), v);
    VisionMoeSpec const spec = app::spec_from(deck);
    VisionMoE<Space> model(Space(), spec);
    double replicated = 0, expert = 0;
    for (auto const &p : model.parameters()) (p.expert ? expert : replicated) += double(p.value.extent(0));
    VisionMoeParameterCounts const c = parameter_counts(spec);
    EXPECT_EQ(c.replicated, replicated) << spec.signature();
    EXPECT_EQ(c.expert, expert) << spec.signature();
  }
}

// The memory a run needs by the check's count is a lower bound of what a
// run allocates in the model's memory space (Kokkos' allocation callbacks),
// and not a vacuous one. One process (MPI_COMM_SELF) so that the whole batch
// and the whole test set are its own.
TEST(Trainer, MemoryNeedIsALowerBoundOfWhatARunAllocates) {
  std::string const d = out_dir("memneed");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    using Mem = Kokkos::DefaultExecutionSpace::memory_space;
    std::string const space = MemoryTracker::name_of<Mem>();
    app::TrainOptions quiet;
    quiet.quiet = true;
    quiet.overwrite = true;  // the variants share one directory
    // Dense models bound tightly (every buffer of theirs is counted); the MoE
    // layers' own buffers (and a GPU build's split-K workspaces) are not.
    struct Variant {
      std::vector<std::string> set;
      bool tight;
    };
    std::vector<Variant> const variants = {
        {{"train.eval_batch_size=32"}, false},
        {{"model.moe_every=0", "train.eval_batch_size=16", "train.batch_size=64"}, true},
        {{"model.moe_every=0", "train.eval_batch_size=500", "data.test_samples=300"}, true}};
    for (auto const &v : variants) {
      std::vector<std::string> o = {"train.max_steps=2", "checkpoint.every=0"};
      o.insert(o.end(), v.set.begin(), v.set.end());
      Deck const deck = deck_with(d, o);
      app::MemoryNeed const need =
          app::memory_need(deck, std::vector<double>(deck.derived.moe_blocks.size(), 1.0), deck.train.batch_size, 1);
      MemoryTracker::install();
      MemoryTracker::reset_peak();
      double const before = double(MemoryTracker::current(space));
      try {  // (an exception must not skip the barrier below: the other ranks wait there)
        app::train(deck, quiet, MPI_COMM_SELF);
      } catch (std::exception const &e) {
        ADD_FAILURE() << e.what();
        continue;
      }
      double const used = double(MemoryTracker::peak(space)) - before;
      std::string const name = o.back();
      EXPECT_LE(need.model_bytes(), used) << name;
      if (v.tight) {
        EXPECT_GE(need.model_bytes(), 0.8 * used) << name;
      }
      std::cout << "[ memory   ] " << name << ": need " << need.model_bytes() << " B, the run's peak " << used << " B\n";
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Runs too large for any machine are refused with the numbers and the key,
// on every rank, before any output is written (the model's width, the
// activations of huge images, a huge synthetic data set), by train() and by
// the driver (exit 2).
TEST(Trainer, RefusesRunsThatDoNotFitInMemory) {
  std::string const d = out_dir("toolarge");
  app::TrainOptions quiet;
  quiet.quiet = true;
  struct Case {
    std::vector<std::string> set;
    std::string key;
  };
  std::vector<Case> const cases = {
      {{"model.dim=1048576"}, "model.dim"},
      {{"data.source=\"synthetic\"", "data.image_size=224", "model.patch_size=1"}, "train.batch_size"},
      {{"data.source=\"synthetic\"", "data.synthetic_train=2000000000"}, "data.synthetic_train"}};
  for (auto const &c : cases) {
    try {
      app::train(deck_with(d, c.set), quiet, MPI_COMM_WORLD);
      ADD_FAILURE() << c.set.front() << ": a run that cannot fit was started";
    } catch (InputError const &e) {
      EXPECT_CONTAINS(e.what(), "does not fit in memory");
      EXPECT_CONTAINS(e.what(), c.key);
    }
  }
  EXPECT_FALSE(fs::exists(d)) << "a refused run wrote output";
  EXPECT_EQ(2, run_cli({"hexamoe", "train", quick_deck(), "--set", "run.output_dir=\"" + d + "\"", "--set",
                        "model.dim=1048576"}));
  EXPECT_FALSE(fs::exists(d)) << "a refused run wrote output";
}

// The cgroup headroom on made-up trees: v2 with an unlimited leaf under a
// limited job (as Slurm's --mem sets it), page cache counted as free but not
// shared memory, the tighter of two limits; v1's memory controller; none.
TEST(Trainer, CgroupMemoryHeadroom) {
  std::string const root = out_dir("cgroup");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    auto put = [&](std::string const &rel, std::string const &text) {
      fs::create_directories(fs::path(root + rel).parent_path());
      std::ofstream(root + rel) << text;
    };
    double const GiB = 1024.0 * 1024.0 * 1024.0;
    put("/proc/self/cgroup", "0::/job_7/step_0/task_0\n");
    put("/sys/fs/cgroup/job_7/step_0/task_0/memory.max", "max\n");
    put("/sys/fs/cgroup/job_7/step_0/task_0/memory.current", "1073741824\n");
    put("/sys/fs/cgroup/job_7/memory.max", "8589934592\n");
    put("/sys/fs/cgroup/job_7/memory.current", "6442450944\n");
    put("/sys/fs/cgroup/job_7/memory.stat", "anon 4294967296\nfile 2147483648\nshmem 1073741824\n");
    auto h = app::cgroup_memory_headroom(root);
    ASSERT_TRUE(h.has_value());
    EXPECT_EQ(*h, 3 * GiB);  // 8 - 6 + (2 - 1)
    put("/sys/fs/cgroup/memory.max", "4294967296\n");  // a tighter limit above
    put("/sys/fs/cgroup/memory.current", "3221225472\n");
    h = app::cgroup_memory_headroom(root);
    ASSERT_TRUE(h.has_value());
    EXPECT_EQ(*h, 1 * GiB);
    put("/proc/self/cgroup", "12:cpuset:/\n9:memory,hugetlb:/slurm/uid_0/job_9\n");
    put("/sys/fs/cgroup/memory/slurm/uid_0/job_9/memory.limit_in_bytes", "2147483648\n");
    put("/sys/fs/cgroup/memory/slurm/uid_0/job_9/memory.usage_in_bytes", "1610612736\n");
    put("/sys/fs/cgroup/memory/slurm/uid_0/job_9/memory.stat", "cache 100\ntotal_inactive_file 536870912\n");
    put("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");  // unlimited
    h = app::cgroup_memory_headroom(root);
    ASSERT_TRUE(h.has_value());
    EXPECT_EQ(*h, 1 * GiB);  // 2 - 1.5 + 0.5
    put("/proc/self/cgroup", "0::/\n");
    fs::remove(root + "/sys/fs/cgroup/memory.max");
    EXPECT_FALSE(app::cgroup_memory_headroom(root).has_value());
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

std::string file_text(std::string const &path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A fresh run into a directory that holds an earlier run is refused and
// leaves it as it was; --overwrite replaces it (no checkpoint of the earlier
// run stays behind to mix with the new ones); --overwrite with --restart is
// refused; an output directory that cannot be created is an input error.
TEST(Trainer, KeepsAnEarlierRunUnlessToldToOverwrite) {
  std::string const d = out_dir("rerun");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  app::TrainOptions quiet;
  quiet.quiet = true;
  app::train(deck_with(d, {"train.max_steps=3"}), quiet, MPI_COMM_WORLD);
  std::string const metrics = file_text(d + "/metrics.jsonl");
  std::vector<std::string> const ckpts = checkpoint_files(d + "/checkpoints");
  ASSERT_NE(metrics.find("\"step\": 3"), std::string::npos) << metrics;
  ASSERT_EQ(ckpts.size(), 2u);  // ckpt-3.h5, latest
  try {
    app::train(deck_with(d, {"train.max_steps=2"}), quiet, MPI_COMM_WORLD);
    ADD_FAILURE() << "a fresh run replaced an earlier one";
  } catch (InputError const &e) {
    EXPECT_CONTAINS(e.what(), "holds an earlier run");
    EXPECT_CONTAINS(e.what(), "ckpt-3.h5");
    EXPECT_CONTAINS(e.what(), "--overwrite");
  }
  EXPECT_EQ(2, run_cli({"hexamoe", "train", quick_deck(), "--set", "run.output_dir=\"" + d + "\"", "--set",
                        "train.max_steps=2"}));
  EXPECT_EQ(metrics, file_text(d + "/metrics.jsonl"));
  EXPECT_EQ(ckpts, checkpoint_files(d + "/checkpoints"));
  app::TrainOptions both = quiet;
  both.overwrite = true;
  both.restart = "latest";
  EXPECT_THROW(app::train(deck_with(d, {"train.max_steps=4"}), both, MPI_COMM_WORLD), InputError);
  EXPECT_EQ(ckpts, checkpoint_files(d + "/checkpoints"));

  app::TrainOptions over = quiet;
  over.overwrite = true;
  auto const sum = app::train(deck_with(d, {"train.max_steps=2"}), over, MPI_COMM_WORLD);
  EXPECT_EQ(sum.steps, 2);
  std::vector<std::string> const now = checkpoint_files(d + "/checkpoints");
  ASSERT_EQ(now.size(), 2u);
  EXPECT_EQ(fs::path(now[0]).filename(), "ckpt-2.h5");
  EXPECT_EQ(find_latest_checkpoint(d + "/checkpoints"), now[0]);
  std::string const m2 = file_text(d + "/metrics.jsonl");
  EXPECT_EQ(m2.find("\"step\": 3"), std::string::npos) << m2;

  // An output directory below a regular file cannot be created.
  if (rank == 0) std::ofstream(d + "/plain") << "x";
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    app::train(deck_with(d + "/plain/run"), quiet, MPI_COMM_WORLD);
    ADD_FAILURE() << "a run started without an output directory";
  } catch (InputError const &e) {
    EXPECT_CONTAINS(e.what(), "cannot create the output directory");
    EXPECT_CONTAINS(e.what(), "run.output_dir");
  }
}

}  // namespace
