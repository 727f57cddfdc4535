// Commands.cpp: command-line parsing (CLI11) and dispatch to the subcommands.
#include "app/Commands.hpp"

#include "app/Collective.hpp"
#include "app/MemoryCheck.hpp"
#include "app/Trainer.hpp"
#include "bench/LayerBench.hpp"
#include "bench/StackBench.hpp"
#include "core/SideStream.hpp"
#include "core/TileGemm.hpp"
#include "io/Deck.hpp"
#include "io/InputError.hpp"
#include "parallel/MoeFactory.hpp"

#include <CLI/CLI.hpp>
#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <sstream>

#ifndef HEXAMOE_VERSION
#define HEXAMOE_VERSION "unknown"
#endif

namespace hexamoe::app {

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// A numeric option's check with a plain message: CLI11's range checks print
// DBL_MAX as their upper bound and let "nan" through.
CLI::Validator at_least(double lo, bool strict) {
  std::ostringstream bound;
  bound << (strict ? "> " : ">= ") << lo;
  return CLI::Validator(
      [lo, strict, b = bound.str()](std::string &s) -> std::string {
        char *end = nullptr;
        double const v = std::strtod(s.c_str(), &end);
        bool const number = !s.empty() && end == s.c_str() + s.size() && std::isfinite(v);
        if (number && (strict ? v > lo : v >= lo)) return std::string();
        return "must be a finite number " + b + ", got '" + s + "'";
      },
      strict ? "POSITIVE" : "NONNEGATIVE");
}

std::string version_string() {
  std::ostringstream s;
  s << "hexamoe " << HEXAMOE_VERSION << " (Kokkos " << KOKKOS_VERSION / 10000 << "." << KOKKOS_VERSION / 100 % 100 << "."
    << KOKKOS_VERSION % 100 << ", default execution space " << Kokkos::DefaultExecutionSpace::name() << ")";
  return s.str();
}

// A deck loaded on every rank and checked against this job's rank count
// (collective: every rank stops with the same message when one finds a
// problem).
Deck load_job_deck(std::string const &path, std::vector<std::string> const &overrides) {
  Deck deck = collectively(MPI_COMM_WORLD, [&] { return load_deck(path, overrides); });
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  collectively(MPI_COMM_WORLD, [&] {
    check_parallel(deck, n);
    if (deck.train.batch_size < n)
      throw InputError(deck.where("train.batch_size"), "the global batch of " + std::to_string(deck.train.batch_size) +
                                                           " is smaller than the " + std::to_string(n) +
                                                           " ranks (each needs a sample)");
    return 0;
  });
  return deck;
}

}  // namespace

int run(int argc, char **argv) {
  CLI::App cli{"hexamoe: HEXA-MoE Mixture-of-Experts training on Kokkos + MPI"};
  cli.require_subcommand(1);
  cli.set_version_flag("--version", version_string());
  cli.footer("Kokkos options (--kokkos-...) and MPI launchers (mpirun, srun) pass through.");

  bench::BenchOptions bopt;
  auto *bench_cmd = cli.add_subcommand("bench", "Time the MoE layer (forward, forward+backward) on the Swin-MoE shapes");
  auto *only_opt = bench_cmd
      ->add_option("--only", bopt.only,
                   "Shape names, space- or comma-separated (swinS-s3-top1, swinS-s3-top2, swinS-s4-top1, swinB-s3-top1, "
                   "swinB-s4-top1, e64-top2-skew)")
      ->delimiter(',');
  auto *scale_opt = bench_cmd->add_option("--token-scale", bopt.token_scale, "Multiply every shape's token count")
                        ->check(at_least(0, true));
  bench_cmd->add_option("--reps", bopt.reps, "Timed runs per measurement (median reported)")->check(at_least(0, true));
  bench_cmd->add_option("--warmup", bopt.warmup, "Untimed warm-up runs")->check(at_least(0, false));
  auto *dtype_opt = bench_cmd->add_option("--dtype", bopt.dtypes, "Storage types: float32, bfloat16")
                        ->delimiter(',')
                        ->check(CLI::IsMember({"float32", "bfloat16"}));
  auto *baseline_opt = bench_cmd->add_flag("!--no-baseline", bopt.baseline, "Skip the padded GEMM baseline");
  auto *reference_opt = bench_cmd->add_flag("!--no-reference", bopt.reference,
                                            "Skip the float64 check of sampled output rows (max |y - y64| / max |y64|)");
  auto *cf_opt = bench_cmd->add_option("--capacity-factor", bopt.capacity_factor, "Capacity factor of the padded baseline")
                     ->check(at_least(0, true));
  bench_cmd->add_flag("--json", bopt.json, "JSON lines instead of a table");
  std::string stack_deck;
  std::vector<std::string> stack_overrides;
  auto *deck_opt = bench_cmd->add_option(
      "--deck", stack_deck,
      "Instead of the layer shapes: the MoE layer stack of this deck in its planned parallel modes, on the job's ranks "
      "(per rank: times, bytes communicated, time blocked in MPI, peak memory)");
  bench_cmd->add_option("--set", stack_overrides, "With --deck: override a deck key (section.key=value, repeatable)")
      ->needs(deck_opt);
  // The layer shapes' options mean nothing to a deck's stack: refused, not ignored.
  for (auto *o : {only_opt, scale_opt, dtype_opt, baseline_opt, reference_opt, cf_opt}) deck_opt->excludes(o);

  std::string deck_path;
  std::vector<std::string> overrides;
  TrainOptions topt;
  auto *train_cmd = cli.add_subcommand("train", "Train the model a deck describes");
  train_cmd->add_option("deck", deck_path, "Input deck (TOML)")->required();
  train_cmd->add_option("--set", overrides, "Override a deck key: section.key=value (repeatable)");
  train_cmd->add_option("--restart", topt.restart, "Continue from a checkpoint: 'latest' or a path")
      ->check(CLI::Validator(
          [](std::string &s) { return s.empty() ? std::string("needs 'latest' or a checkpoint path, got ''") : ""; },
          "CHECKPOINT"));
  train_cmd->add_flag("--quiet", topt.quiet, "No per-step lines");
  train_cmd->add_flag("--overwrite", topt.overwrite,
                      "Start afresh in a run.output_dir that holds an earlier run, removing its checkpoints, metrics, "
                      "summary and activation dumps first (without it such a run is refused)");
  train_cmd->add_option("--stop-after", topt.stop_after,
                        "Act as if preempted after N steps of this run (checkpoint, exit 0); for testing restarts")
      ->check(at_least(0, false));
  auto *check_cmd = cli.add_subcommand("check", "Validate a deck and print it fully resolved (exit 0 valid, 2 invalid)");
  check_cmd->add_option("deck", deck_path, "Input deck (TOML)")->required();
  check_cmd->add_option("--set", overrides, "Override a deck key: section.key=value (repeatable)");
  // hexamoe plan (parallel/): run with the job's rank count, e.g. mpiexec -n 4 hexamoe plan DECK.
  auto *plan_cmd = cli.add_subcommand(
      "plan", "Print the MoE parallel plan of a deck on this job's ranks: per MoE layer the mode, the proportions, the "
              "predicted time and the memory per rank (start-up benchmarks, no training)");
  plan_cmd->add_option("deck", deck_path, "Input deck (TOML)")->required();
  plan_cmd->add_option("--set", overrides, "Override a deck key: section.key=value (repeatable)");

  try {
    cli.parse(argc, argv);
  } catch (CLI::ParseError const &e) {
    // Every rank parses the same arguments, so every rank exits alike.
    int const code = cli.exit(e, world_rank() == 0 ? std::cout : std::cerr, world_rank() == 0 ? std::cerr : std::cerr);
    return code == 0 ? 0 : 2;
  }

  try {
    // The environment's kernel choices are read once; a bad value stops here, on every rank.
    (void)detail::dev::float32_math();
    (void)detail::dev::async_copy_setting();
    (void)detail::router_mma_env();
    (void)detail::backward_streams_enabled();
    if (*check_cmd) {
      Deck deck = collectively(MPI_COMM_WORLD, [&] { return load_deck(deck_path, overrides); });
      int n = 1;
      MPI_Comm_size(MPI_COMM_WORLD, &n);
      collectively(MPI_COMM_WORLD, [&] {
        check_parallel(deck, n);
        return 0;
      });
      if (world_rank() == 0) {
        // What train's memory check counts, for a job with this rank count
        // and even shares (app/MemoryCheck.hpp).
        bool const sliced = n > 1 && deck.moe.dtype == MoeSection::Dtype::float32;
        MemoryNeed const need = memory_need(deck, std::vector<double>(deck.derived.moe_blocks.size(), sliced ? 1.0 / n : 1.0),
                                            (deck.train.batch_size + n - 1) / n, n);
        char params[32];
        std::snprintf(params, sizeof params, "%.4g", need.parameters);
        std::cout << resolved_toml(deck) << "#   memory per rank     = at least " << format_bytes(need.model_bytes())
                  << "  # " << n << " rank(s): " << params << " parameters x 16 bytes, activation buffers for "
                  << need.images << " training / " << need.eval_images << " evaluation images; images "
                  << format_bytes(need.data_bytes) << " in host memory\n";
      }
      return 0;
    }
    if (*train_cmd) {
      Deck deck = collectively(MPI_COMM_WORLD, [&] { return load_deck(deck_path, overrides); });
      install_preemption_handlers();
      collectively(MPI_COMM_WORLD, [&] { return train(deck, topt, MPI_COMM_WORLD).steps; });
      return 0;
    }
    if (*plan_cmd) {
      Deck const deck = load_job_deck(deck_path, overrides);
      Kokkos::DefaultExecutionSpace space;
      parallel::MoeFactory<Kokkos::DefaultExecutionSpace> moe(space, deck, MPI_COMM_WORLD, /*measure=*/true);
      if (world_rank() == 0) std::cout << parallel::format_plan(moe.plan(), "hexamoe plan " + deck_path);
      return 0;
    }
    if (*bench_cmd && !stack_deck.empty()) {
      Deck const deck = load_job_deck(stack_deck, stack_overrides);  // (run_stack_bench refuses bf16 decks)
      bench::StackOptions sopt;
      sopt.reps = bopt.reps;
      sopt.warmup = bopt.warmup;
      sopt.json = bopt.json;
      std::ostringstream sink;
      return bench::run_stack_bench(deck, sopt, MPI_COMM_WORLD, world_rank() == 0 ? std::cout : sink);
    }
    if (*bench_cmd) {
      // Rows that cannot fit are refused before anything is allocated (on a
      // host, the out-of-memory killer would end the run without a word).
      collectively(MPI_COMM_WORLD, [&] {
        check_bench_memory(bench::layer_bench_need(bopt), bopt.token_scale, device_memory_available(),
                           host_memory_available(MPI_COMM_WORLD));
        return 0;
      });
      std::ostringstream sink;
      return bench::run_layer_bench(bopt, world_rank() == 0 ? std::cout : sink);
    }
  } catch (InputError const &e) {
    std::cerr << "hexamoe: error: " << e.what() << std::endl;
    return 2;
  } catch (std::invalid_argument const &e) {
    std::cerr << "hexamoe: error: " << e.what() << std::endl;
    return 2;
  } catch (std::exception const &e) {
    std::cerr << "hexamoe: failed on rank " << world_rank() << ": " << e.what() << std::endl;
    // A failure on one rank would leave the others waiting in a collective.
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (n > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  return 0;
}

}  // namespace hexamoe::app
