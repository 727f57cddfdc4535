// Trainer.hpp: `hexamoe train`: data, model, AdamW, logging, evaluation,
// HDF5 checkpoints (save, restart, preemption) and activation dumps.
#pragma once

#include "io/Deck.hpp"

#include <mpi.h>

#include <string>
#include <vector>

namespace hexamoe {
struct VisionMoeSpec;
}

namespace hexamoe::app {

struct TrainOptions {
  std::string restart;   // "", "latest" or a checkpoint path
  bool quiet = false;    // no step lines on stdout (tests)
  long stop_after = 0;   // behave as if preempted after this many steps of this run (0 = never)
  bool overwrite = false;  // start afresh where an earlier run's results are (they are removed first)
};

struct TrainSummary {
  long steps = 0;              // optimizer steps taken in total (restarts included)
  double final_train_loss = 0;  // mean cross-entropy over the last logged window
  double final_train_accuracy = 0;
  double test_loss = 0, test_accuracy = 0;  // last evaluation
  double wall_seconds = 0;     // this process's run
  bool preempted = false;      // stopped by SIGTERM/SIGUSR1 after writing a checkpoint
  std::vector<double> step_losses;  // total loss of every step this run took
};

// The model a deck describes.
VisionMoeSpec spec_from(Deck const &deck);

// Runs the training the deck describes on comm. Throws InputError for bad
// input (deck, data, checkpoint), std::runtime_error for failures.
TrainSummary train(Deck const &deck, TrainOptions const &opt, MPI_Comm comm);

// Installs SIGTERM/SIGUSR1 handlers that ask a running train() to checkpoint
// and stop at the next step boundary.
void install_preemption_handlers();

}  // namespace hexamoe::app
