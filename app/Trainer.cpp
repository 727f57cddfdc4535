// Trainer.cpp: see Trainer.hpp.
#include "app/Trainer.hpp"

#include "app/Collective.hpp"
#include "app/MemoryCheck.hpp"

#include "core/MemoryTracker.hpp"
#include "core/model/AdamW.hpp"
#include "core/model/VisionMoE.hpp"
#include "io/Checkpoint.hpp"
#include "io/Dataset.hpp"
#include "io/InputError.hpp"
#include "parallel/MoeFactory.hpp"

#include <Kokkos_Core.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <numeric>
#include <iostream>
#include <sstream>

namespace hexamoe::app {

namespace {

using Space = Kokkos::DefaultExecutionSpace;
using Mem = Space::memory_space;
using Clock = std::chrono::steady_clock;

std::atomic<int> g_stop_requested{0};
extern "C" void on_preemption_signal(int) { g_stop_requested.store(1); }

int comm_rank(MPI_Comm c) {
  int r = 0;
  MPI_Comm_rank(c, &r);
  return r;
}
int comm_size(MPI_Comm c) {
  int n = 1;
  MPI_Comm_size(c, &n);
  return n;
}

// Mean and standard deviation of all pixels (float64, in order).
std::pair<float, float> pixel_stats(ImageSet const &s) {
  double sum = 0, sq = 0;
  for (float v : s.images) {
    sum += v;
    sq += double(v) * v;
  }
  double const n = std::max<double>(1.0, double(s.images.size()));
  double const mean = sum / n;
  return {float(mean), float(std::sqrt(std::max(1e-12, sq / n - mean * mean)))};
}

struct Data {
  ImageSet train, test;
};

Data load_data(Deck const &deck) {
  auto const &d = deck.data;
  Data data;
  switch (d.source) {
    case DataSection::Source::fashion_mnist:
      data.train = load_fashion_mnist(d.path, true, d.train_samples);
      data.test = load_fashion_mnist(d.path, false, d.test_samples);
      normalise(data.train, fashion_mnist_mean, fashion_mnist_std);
      normalise(data.test, fashion_mnist_mean, fashion_mnist_std);
      return data;
    case DataSection::Source::synthetic:
      data.train = make_synthetic(d.synthetic_train, d.classes, d.channels, d.image_size, std::uint64_t(deck.run.seed));
      data.test = make_synthetic(d.synthetic_test, d.classes, d.channels, d.image_size, std::uint64_t(deck.run.seed),
                                 d.synthetic_train);
      break;
    case DataSection::Source::hdf5:
      data.train = load_hdf5_images(d.file, d.train_images, d.train_labels, d.train_samples);
      data.test = load_hdf5_images(d.file, d.test_images, d.test_labels, d.test_samples);
      break;
  }
  auto const [mean, stddev] = pixel_stats(data.train);
  normalise(data.train, mean, stddev);
  normalise(data.test, mean, stddev);
  for (ImageSet const *s : {&data.train, &data.test}) {
    if (s->height != d.image_size || s->width != d.image_size)
      throw InputError(deck.where("data.image_size"), "the data has " + std::to_string(s->height) + "x" +
                                                          std::to_string(s->width) + " images, the deck says " +
                                                          std::to_string(d.image_size));
    if (s->channels != d.channels)
      throw InputError(deck.where("data.channels"), "the data has " + std::to_string(s->channels) +
                                                        " channels, the deck says " + std::to_string(d.channels));
    for (int l : s->labels)
      if (l >= d.classes)
        throw InputError(deck.where("data.classes"), "the data has label " + std::to_string(l) + " but data.classes = " +
                                                         std::to_string(d.classes));
  }
  return data;
}

using ImagesView = Kokkos::View<float ****, Kokkos::LayoutRight, Mem>;
using LabelsView = Kokkos::View<int *, Mem>;

// Copy the samples `idx` of `set` into device views (reallocated on size change).
void stage_batch(ImageSet const &set, std::vector<std::int64_t> const &idx, ImagesView &images, LabelsView &labels) {
  int const B = static_cast<int>(idx.size());
  if (static_cast<int>(images.extent(0)) != B) {
    images = ImagesView(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::batch.images"), B, set.channels,
                        set.height, set.width);
    labels = LabelsView(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::batch.labels"), B);
  }
  auto hi = Kokkos::create_mirror_view(images);
  auto hl = Kokkos::create_mirror_view(labels);
  std::size_t const n = set.sample_size();
  for (int b = 0; b < B; ++b) {
    std::copy(set.image(int(idx[b])), set.image(int(idx[b])) + n, hi.data() + std::size_t(b) * n);
    hl(b) = set.labels[idx[b]];
  }
  Kokkos::deep_copy(images, hi);
  Kokkos::deep_copy(labels, hl);
}

// Sum the gradients of replicated parameters over the ranks (sharded expert
// slices are reduced by their parallel mode).
void allreduce_gradients(std::vector<Parameter<Mem>> const &params, MPI_Comm comm) {
  if (comm_size(comm) == 1) return;
  Kokkos::fence();
  for (auto const &p : params) {
    if (p.sharded()) continue;
    auto h = Kokkos::create_mirror_view(p.grad);
    Kokkos::deep_copy(h, p.grad);
    MPI_Allreduce(MPI_IN_PLACE, h.data(), static_cast<int>(h.extent(0)), MPI_FLOAT, MPI_SUM, comm);
    Kokkos::deep_copy(p.grad, h);
  }
}

struct EvalResult {
  double loss = 0, accuracy = 0;
};

EvalResult evaluate(VisionMoE<Space> &model, ImageSet const &set, int batch, MPI_Comm comm) {
  compat::ScopedRegion region("hexamoe::evaluate");
  int const r = comm_rank(comm), n = comm_size(comm);
  std::int64_t const lo = std::int64_t(set.count) * r / n, hi = std::int64_t(set.count) * (r + 1) / n;
  double sums[3] = {0, 0, 0};  // loss * count, correct, count
  ImagesView images;
  LabelsView labels;
  Space space;
  // Parallel MoE layers are collective: every rank runs as many forwards as
  // the rank with the most batches (extra ones on one sample, not counted).
  long batches = long((hi - lo + batch - 1) / batch);
  MPI_Allreduce(MPI_IN_PLACE, &batches, 1, MPI_LONG, MPI_MAX, comm);
  for (long b = 0; b < batches; ++b) {
    std::int64_t const s = lo + b * batch;
    std::vector<std::int64_t> idx;
    for (std::int64_t i = s; i < std::min(hi, s + batch); ++i) idx.push_back(i);
    bool const counted = !idx.empty();
    if (!counted) idx.push_back(std::min<std::int64_t>(lo, set.count - 1));
    stage_batch(set, idx, images, labels);
    StepStats st = model.forward(space, images, labels);
    if (!counted) continue;
    sums[0] += st.loss * st.count;
    sums[1] += st.correct;
    sums[2] += st.count;
  }
  MPI_Allreduce(MPI_IN_PLACE, sums, 3, MPI_DOUBLE, MPI_SUM, comm);
  return {sums[0] / std::max(1.0, sums[2]), sums[1] / std::max(1.0, sums[2])};
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream s;
  s << std::setprecision(9) << v;
  return s.str();
}

// Host copies of the state a checkpoint holds: values and AdamW moments.
struct HostState {
  std::vector<Kokkos::View<float *, Kokkos::HostSpace>> values, m, v;
};

HostState snapshot(AdamW<Space> const &opt) {
  HostState h;
  auto const &params = opt.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    h.values.push_back(Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), params[i].value));
    h.m.push_back(Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), opt.first_moment(i)));
    h.v.push_back(Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), opt.second_moment(i)));
  }
  return h;
}

Shape shape_of(Parameter<Mem> const &p) { return Shape(p.shape.begin(), p.shape.end()); }

// shard_writer: false on the replicas of an expert slice in MoE groups other
// than the first (the slice is written once). moe_plan: the MoE parallel plan
// (parallel::plan_to_string), kept by a resumed run.
void save_checkpoint(Deck const &deck, std::string const &signature, AdamW<Space> const &opt, EpochOrder const &order,
                     long step, MPI_Comm comm, bool shard_writer = true, std::string const &moe_plan = "") {
  compat::ScopedRegion region("hexamoe::save_checkpoint");
  HostState h = snapshot(opt);
  std::vector<TensorSlice> tensors;
  auto const &params = opt.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    Shape const s = shape_of(params[i]);
    auto slice = [&](std::string const &group, float const *data) {
      if (!params[i].sharded()) return TensorSlice::whole(group + params[i].name, s, data);
      Shape count(params[i].count.begin(), params[i].count.end());
      if (!shard_writer) count.assign(count.size(), 0);
      return TensorSlice::block(group + params[i].name, s, Shape(params[i].offset.begin(), params[i].offset.end()), count,
                                data);
    };
    tensors.push_back(slice("params/", h.values[i].data()));
    tensors.push_back(slice("adamw_m/", h.m[i].data()));
    tensors.push_back(slice("adamw_v/", h.v[i].data()));
  }
  Attributes attrs;
  attrs.strings["deck"] = resolved_toml(deck);
  attrs.ints["adamw_steps"] = opt.steps_taken();
  attrs.words["epoch_order"] = order.to_words();
  if (!moe_plan.empty()) attrs.strings["moe_plan"] = moe_plan;
  write_checkpoint(comm, deck.derived.checkpoint_dir, step, signature, tensors, attrs, deck.checkpoint.keep);
}

long load_checkpoint(std::string const &where, std::string const &signature, AdamW<Space> &opt, EpochOrder &order,
                     MPI_Comm comm) {
  compat::ScopedRegion region("hexamoe::load_checkpoint");
  CheckpointReader reader(comm, where, signature);
  auto const &params = opt.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    Shape const s = shape_of(params[i]);
    auto hv = Kokkos::create_mirror_view(params[i].value);
    auto hm = Kokkos::create_mirror_view(opt.first_moment(i));
    auto hs = Kokkos::create_mirror_view(opt.second_moment(i));
    Shape const off = params[i].sharded() ? Shape(params[i].offset.begin(), params[i].offset.end()) : Shape(s.size(), 0);
    Shape const cnt = params[i].sharded() ? Shape(params[i].count.begin(), params[i].count.end()) : s;
    reader.read("params/" + params[i].name, s, off, cnt, hv.data());
    reader.read("adamw_m/" + params[i].name, s, off, cnt, hm.data());
    reader.read("adamw_v/" + params[i].name, s, off, cnt, hs.data());
    Kokkos::deep_copy(params[i].value, hv);
    Kokkos::deep_copy(opt.first_moment(i), hm);
    Kokkos::deep_copy(opt.second_moment(i), hs);
  }
  opt.set_steps_taken(reader.int_attr("adamw_steps"));
  order.restore_words(reader.words_attr("epoch_order"));
  return reader.step();
}

class ProgressBar {
 public:
  ProgressBar(bool on, long total) : on_(on), total_(total) {}
  void show(long step, double loss) {
    if (!on_) return;
    int const width = 30;
    int const filled = total_ > 0 ? int(width * double(step) / double(total_)) : width;
    std::printf("\r[%s%s] %ld/%ld loss %.4f", std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                step, total_, loss);
    std::fflush(stdout);
    dirty_ = true;
  }
  void clear() {
    if (on_ && dirty_) std::printf("\r%s\r", std::string(70, ' ').c_str());
    dirty_ = false;
  }

 private:
  bool on_;
  long total_;
  bool dirty_ = false;
};

// The results of an earlier run in the deck's output directory: its
// checkpoint files, metrics, summary and activation dumps (what a fresh run
// would overwrite or mix with its own).
std::vector<std::string> earlier_run_files(Deck const &deck) {
  namespace fs = std::filesystem;
  std::vector<std::string> found = checkpoint_files(deck.derived.checkpoint_dir);
  std::error_code ec;
  fs::path const out(deck.run.output_dir);
  for (fs::path const &p : {out / "metrics.jsonl", out / "summary.json", fs::path(deck.derived.activations_path)})
    if (fs::exists(p, ec)) found.push_back(p.string());
  return found;
}

}  // namespace

VisionMoeSpec spec_from(Deck const &deck) {
  VisionMoeSpec s;
  s.channels = deck.data.channels;
  s.image_size = deck.data.image_size;
  s.patch = deck.model.patch_size;
  s.dim = deck.model.dim;
  s.depth = deck.model.depth;
  s.heads = deck.model.heads;
  s.hidden = deck.derived.hidden;
  s.classes = deck.data.classes;
  s.moe_blocks = deck.derived.moe_blocks;
  s.moe.experts = deck.moe.experts;
  s.moe.top_k = deck.moe.top_k;
  s.moe.activation = activation_from_string(deck.moe.activation);
  s.moe.renormalize = deck.moe.renormalize;
  s.moe.aux_loss_weight = deck.moe.aux_loss_weight;
  s.moe.z_loss_weight = deck.moe.z_loss_weight;
  s.moe.capacity_factor = deck.moe.capacity_factor;
  return s;
}

void install_preemption_handlers() {
  std::signal(SIGTERM, on_preemption_signal);
  std::signal(SIGUSR1, on_preemption_signal);
}

TrainSummary train(Deck const &deck, TrainOptions const &topt, MPI_Comm comm) {
  auto const t_start = Clock::now();
  int const rank = comm_rank(comm), nranks = comm_size(comm);
  bool const root = rank == 0;
  Space space;
  MemoryTracker::install();
  collectively(comm, [&] {
    check_parallel(deck, nranks);
    return 0;
  });
  // A fresh run never overwrites an earlier run's results unless asked to
  // (--overwrite); a continued run (--restart, checkpoint.resume) adds to them.
  std::string const continue_from = topt.restart.empty() ? deck.checkpoint.resume : topt.restart;
  std::vector<std::string> const replaced = collectively(comm, [&] {
    if (topt.overwrite && !continue_from.empty())
      throw InputError(topt.restart.empty() ? deck.where("checkpoint.resume") : std::string("--restart"),
                       "--overwrite starts afresh, so it cannot continue from a checkpoint; give one of them.");
    std::vector<std::string> found;
    if (root && continue_from.empty()) found = earlier_run_files(deck);
    if (!found.empty() && !topt.overwrite) {
      std::string list;
      for (std::size_t i = 0; i < found.size() && i < 4; ++i) list += (i ? ", " : "") + found[i];
      if (found.size() > 4) list += " and " + std::to_string(found.size() - 4) + " more";
      throw InputError(deck.where("run.output_dir"),
                       "run.output_dir \"" + deck.run.output_dir + "\" holds an earlier run (" + list +
                           "). Continue it with --restart latest, start afresh with --overwrite (which removes "
                           "those files), or choose another run.output_dir.");
    }
    return found;
  });
  int const B = deck.train.batch_size;
  if (B < nranks)
    throw InputError(deck.where("train.batch_size"), "the global batch of " + std::to_string(B) + " is smaller than the " +
                                                         std::to_string(nranks) + " ranks (each needs a sample)");
  // ---- MoE parallel modes (parallel/): the MoE group and the plan (mode and
  // proportions per MoE layer, the batch share of each rank; measured at
  // start-up when a choice needs it, or kept from the checkpoint a run
  // resumes, so that it splits the work alike). Collective.
  std::string moe_pinned;
  {
    std::string const r = topt.restart.empty() ? deck.checkpoint.resume : topt.restart;
    std::string const where = r == "latest" ? deck.derived.checkpoint_dir : r;
    if (!r.empty() && !(r == "latest" && find_latest_checkpoint(where).empty())) {
      CheckpointReader reader(comm, where);
      auto const &a = reader.attributes().strings;
      if (a.count("moe_plan")) moe_pinned = a.at("moe_plan");
    }
  }
  parallel::MoeFactory<Space> moe_parallel(space, deck, comm, false, moe_pinned);
  std::string const moe_plan_text = parallel::plan_to_string(moe_parallel.plan());
  int const local_b = moe_parallel.plan().batch.at(std::size_t(rank));
  long const first_b = std::accumulate(moe_parallel.plan().batch.begin(), moe_parallel.plan().batch.begin() + rank, 0L);
  // ---- end MoE parallel modes

  // A model or data set that cannot fit is refused here, before anything of
  // its size is allocated or written (app/MemoryCheck.hpp).
  collectively(comm, [&] {
    std::vector<double> share;
    for (int b : deck.derived.moe_blocks) {
      parallel::LayerPlan const *l = moe_parallel.plan().for_block(b);
      bool const sliced = deck.moe.dtype == MoeSection::Dtype::float32 && l != nullptr &&
                          l->mode != parallel::MoeMode::local && l->slice.hidden > 0;
      share.push_back(sliced ? double(l->slice.count(moe_parallel.group().rank())) / l->slice.hidden : 1.0);
    }
    auto const host = host_memory_available(comm);
    check_memory(deck, memory_need(deck, share, local_b, nranks), device_memory_available(), host);
    return 0;
  });

  Data data = collectively(comm, [&] { return load_data(deck); });
  if (data.train.count < B)
    throw InputError(deck.where("train.batch_size"), "the batch (" + std::to_string(B) + ") is larger than the training set (" +
                                                         std::to_string(data.train.count) + " samples)");

  VisionMoeSpec spec = spec_from(deck);
  // Each rank's auxiliary losses cover its tokens; their gradients are summed
  // over ranks below, so each rank carries 1/n of the weight.
  spec.moe.aux_loss_weight /= nranks;
  spec.moe.z_loss_weight /= nranks;
  typename VisionMoE<Space>::FfnFactory factory;
  if (deck.moe.dtype == MoeSection::Dtype::bfloat16)
    factory = [](MoeLayerConfig const &c, int) { return std::make_unique<LocalMoeFfnBf16<Space>>(c); };
  // ---- MoE parallel modes (parallel/): the layers built in their planned mode.
  if (!factory) {
    factory = moe_parallel.factory();
  } else if (deck.parallel.mode != ParallelSection::Mode::automatic) {
    throw InputError(deck.where("parallel.mode"), std::string("parallel.mode = \"") + to_string(deck.parallel.mode) +
                                                      "\" needs moe.dtype = \"float32\" (bfloat16 experts run replicated)");
  }
  int const moe_replicas = moe_parallel.group().num_replicas();
  bool const moe_shard_writer = moe_parallel.group().replica() == 0;
  if (root && !topt.quiet && nranks > 1 && deck.moe.dtype == MoeSection::Dtype::float32)
    std::cout << parallel::format_plan(moe_parallel.plan(), "MoE plan") << std::flush;
  // ---- end MoE parallel modes
  VisionMoE<Space> model(space, spec, factory);
  model.init(std::uint64_t(deck.run.seed));
  std::string const signature =
      spec_from(deck).signature() + (deck.moe.dtype == MoeSection::Dtype::bfloat16 ? " bf16" : "");
  AdamWOptions aopt{deck.train.beta1, deck.train.beta2, deck.train.eps, deck.train.weight_decay};
  AdamW<Space> opt(model.parameters(), aopt);
  EpochOrder order(data.train.count, std::uint64_t(deck.run.seed));

  long const steps_per_epoch = data.train.count / B;
  long total = long(deck.train.epochs) * steps_per_epoch;
  if (deck.train.max_steps > 0) total = std::min<long>(total, deck.train.max_steps);

  namespace fs = std::filesystem;
  // The output directory, and (--overwrite) the earlier run's files out of it.
  collectively(comm, [&] {
    if (!root) return 0;
    std::error_code ec;
    fs::create_directories(deck.run.output_dir, ec);
    if (ec)
      throw InputError(deck.where("run.output_dir"),
                       "cannot create the output directory \"" + deck.run.output_dir + "\": " + ec.message() + ".");
    for (auto const &f : replaced)
      if (!fs::remove(f, ec) && ec)
        throw InputError(deck.where("run.output_dir"), "--overwrite cannot remove " + f + ": " + ec.message() + ".");
    fs::path const resolved = fs::path(deck.run.output_dir) / "deck.resolved.toml";
    std::ofstream out(resolved);
    out << resolved_toml(deck);
    out.close();
    if (!out) throw InputError(deck.where("run.output_dir"), "cannot write " + resolved.string() + ".");
    return 0;
  });

  long step = 0;
  std::string restart = topt.restart.empty() ? deck.checkpoint.resume : topt.restart;
  if (!restart.empty()) {
    std::string const where = restart == "latest" ? deck.derived.checkpoint_dir : restart;
    if (restart == "latest" && find_latest_checkpoint(where).empty()) {
      if (root && !topt.quiet) std::cout << "no checkpoint in " << where << ": starting from step 0" << std::endl;
    } else {
      step = load_checkpoint(where, signature, opt, order, comm);
      if (root && !topt.quiet) std::cout << "restarted from " << where << " at step " << step << std::endl;
    }
  }

  bool const progress_on = root && !topt.quiet &&
                           (deck.output.progress == OutputSection::Progress::on ||
                            (deck.output.progress == OutputSection::Progress::automatic && isatty(1)));
  ProgressBar bar(progress_on, total);
  std::ofstream metrics;
  if (root && deck.output.metrics)
    metrics.open(fs::path(deck.run.output_dir) / "metrics.jsonl", step > 0 ? std::ios::app : std::ios::trunc);

  TrainSummary sum;
  ImagesView images;
  LabelsView labels;
  double win_loss = 0, win_aux = 0, win_correct = 0, win_count = 0;
  long win_steps = 0;
  auto win_start = Clock::now();
  EvalResult last_eval{};
  auto const &params = opt.parameters();
  if (root && !topt.quiet)
    std::cout << "hexamoe train: " << deck.run.name << ", " << data.train.count << " training / " << data.test.count
              << " test samples, " << total << " steps of " << B << " on " << nranks << " rank(s), "
              << Space::name() << " backend" << std::endl;

  while (step < total) {
    std::vector<std::int64_t> batch = order.next_batch(B);
    std::vector<std::int64_t> mine(batch.begin() + first_b, batch.begin() + first_b + local_b);
    stage_batch(data.train, mine, images, labels);
    StepStats st = model.forward(space, images, labels);
    model.backward(space, double(local_b) / double(B));
    allreduce_gradients(params, comm);
    double stats[5] = {st.loss * local_b, st.aux_loss, st.z_loss, double(st.correct), double(st.count)};
    MPI_Allreduce(MPI_IN_PLACE, stats, 5, MPI_DOUBLE, MPI_SUM, comm);
    double const ce = stats[0] / B, aux = stats[1], zl = stats[2];
    double sq[2] = {0, 0};  // replicated (identical on every rank), sharded (this rank's slice)
    for (auto const &p : params) sq[p.sharded() ? 1 : 0] += AdamW<Space>::sq_norm(space, p.grad);
    MPI_Allreduce(MPI_IN_PLACE, &sq[1], 1, MPI_DOUBLE, MPI_SUM, comm);
    sq[1] /= moe_replicas;  // each expert slice is held by one rank per MoE group
    double const norm = std::sqrt(sq[0] + sq[1]);
    double const clip = deck.train.clip_norm > 0 && norm > deck.train.clip_norm ? deck.train.clip_norm / (norm + 1e-6) : 1.0;
    double const lr = learning_rate(step, total, deck.train.lr, deck.train.min_lr, deck.train.warmup_steps,
                                    deck.train.schedule == TrainSection::Schedule::cosine);
    opt.step(space, lr, clip);
    ++step;
    sum.step_losses.push_back(ce + aux + zl);
    win_loss += ce;
    win_aux += aux + zl;
    win_correct += stats[3];
    win_count += stats[4];
    ++win_steps;
    bar.show(step, ce);

    // Activations of chosen MoE blocks at chosen steps.
    auto const &ls = deck.output.activations_steps;
    if (std::find(ls.begin(), ls.end(), int(step)) != ls.end()) {
      for (int layer : deck.output.activations_layers) {
        auto [in, out] = model.ffn_io(layer);
        auto hin = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), in);
        auto hout = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
        std::size_t const rows = in.extent(0), cols = in.extent(1), per_image = rows / std::size_t(local_b);
        Shape const g{per_image * std::size_t(B), cols}, off{per_image * std::size_t(first_b), 0}, cnt{rows, cols};
        write_activations(comm, deck.derived.activations_path,
                          "step_" + std::to_string(step) + "/layer_" + std::to_string(layer),
                          {TensorSlice::block("input", g, off, cnt, hin.data()),
                           TensorSlice::block("output", g, off, cnt, hout.data())});
      }
    }

    bool const log_now = deck.train.log_every > 0 && (step % deck.train.log_every == 0 || step == total);
    if (log_now) {
      double const secs = std::chrono::duration<double>(Clock::now() - win_start).count();
      double const mem = double(MemoryTracker::current(Mem::name())) / (1 << 20);
      std::vector<std::vector<int>> counts;
      for (int b : deck.derived.moe_blocks) {
        std::vector<int> c = model.moe(b)->expert_counts();
        MPI_Allreduce(MPI_IN_PLACE, c.data(), int(c.size()), MPI_INT, MPI_SUM, comm);
        counts.push_back(c);
      }
      sum.final_train_loss = win_loss / win_steps;
      sum.final_train_accuracy = win_correct / std::max(1.0, win_count);
      if (root) {
        bar.clear();
        std::ostringstream line;
        line << "step " << step << "/" << total << " | epoch " << (step - 1) / steps_per_epoch + 1 << " | loss "
             << std::fixed << std::setprecision(4) << win_loss / win_steps << " | aux " << std::setprecision(4)
             << win_aux / win_steps << " | acc " << std::setprecision(1) << 100.0 * sum.final_train_accuracy
             << "% | lr " << std::scientific << std::setprecision(2) << lr << std::fixed << " | "
             << std::setprecision(0) << double(B) * win_steps / secs << " img/s | " << std::setprecision(1)
             << 1000.0 * secs / win_steps << " ms/step | mem " << mem << " MiB | experts";
        for (auto const &c : counts) {
          line << " [";
          for (std::size_t e = 0; e < c.size(); ++e) line << (e ? " " : "") << c[e];
          line << "]";
        }
        if (!topt.quiet) std::cout << line.str() << std::endl;
        if (metrics.is_open()) {
          metrics << "{\"step\": " << step << ", \"epoch\": " << (step - 1) / steps_per_epoch + 1
                  << ", \"loss\": " << json_number(win_loss / win_steps) << ", \"aux_loss\": " << json_number(win_aux / win_steps)
                  << ", \"accuracy\": " << json_number(sum.final_train_accuracy) << ", \"lr\": " << json_number(lr)
                  << ", \"images_per_s\": " << json_number(double(B) * win_steps / secs)
                  << ", \"ms_per_step\": " << json_number(1000.0 * secs / win_steps) << ", \"mem_MiB\": " << json_number(mem)
                  << ", \"grad_norm\": " << json_number(norm) << ", \"expert_counts\": [";
          for (std::size_t i = 0; i < counts.size(); ++i) {
            metrics << (i ? ", " : "") << "[";
            for (std::size_t e = 0; e < counts[i].size(); ++e) metrics << (e ? ", " : "") << counts[i][e];
            metrics << "]";
          }
          metrics << "]}" << std::endl;
        }
      }
      win_loss = win_aux = win_correct = win_count = 0;
      win_steps = 0;
      win_start = Clock::now();
    }

    bool const epoch_end = step % steps_per_epoch == 0;
    bool const eval_now = deck.train.eval_every > 0 ? step % deck.train.eval_every == 0 : epoch_end;
    if (eval_now || step == total) {
      last_eval = evaluate(model, data.test, deck.train.eval_batch_size, comm);
      if (root && !topt.quiet) {
        bar.clear();
        std::cout << "eval at step " << step << ": test loss " << std::fixed << std::setprecision(4) << last_eval.loss
                  << ", test accuracy " << std::setprecision(2) << 100.0 * last_eval.accuracy << "%" << std::endl;
      }
      if (root && metrics.is_open())
        metrics << "{\"step\": " << step << ", \"test_loss\": " << json_number(last_eval.loss)
                << ", \"test_accuracy\": " << json_number(last_eval.accuracy) << "}" << std::endl;
    }

    if (deck.checkpoint.every > 0 && step % deck.checkpoint.every == 0 && step < total)
      save_checkpoint(deck, signature, opt, order, step, comm, moe_shard_writer, moe_plan_text);

    int stop = g_stop_requested.load() || (topt.stop_after > 0 && long(sum.step_losses.size()) >= topt.stop_after);
    MPI_Allreduce(MPI_IN_PLACE, &stop, 1, MPI_INT, MPI_MAX, comm);
    if (stop && step < total) {
      save_checkpoint(deck, signature, opt, order, step, comm, moe_shard_writer, moe_plan_text);
      bar.clear();
      if (root) std::cout << "preempted at step " << step << ", checkpoint written" << std::endl;
      sum.preempted = true;
      break;
    }
  }
  bar.clear();
  sum.steps = step;
  sum.test_loss = last_eval.loss;
  sum.test_accuracy = last_eval.accuracy;
  if (!sum.preempted && deck.checkpoint.at_end && step > 0) save_checkpoint(deck, signature, opt, order, step, comm, moe_shard_writer, moe_plan_text);
  sum.wall_seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  if (root && !sum.preempted) {
    std::ofstream js(fs::path(deck.run.output_dir) / "summary.json");
    js << "{\n  \"name\": \"" << deck.run.name << "\",\n  \"steps\": " << sum.steps
       << ",\n  \"final_train_loss\": " << json_number(sum.final_train_loss)
       << ",\n  \"final_train_accuracy\": " << json_number(sum.final_train_accuracy)
       << ",\n  \"test_loss\": " << json_number(sum.test_loss) << ",\n  \"test_accuracy\": " << json_number(sum.test_accuracy)
       << ",\n  \"wall_seconds\": " << json_number(sum.wall_seconds) << ",\n  \"ranks\": " << nranks
       << ",\n  \"backend\": \"" << Space::name() << "\"\n}\n";
  }
  return sum;
}

}  // namespace hexamoe::app
