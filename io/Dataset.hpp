// Dataset.hpp: image classification data on the host: Fashion-MNIST (gzip IDX
// files), images stored in HDF5, a synthetic learnable task, and the
// deterministic, restartable order in which an epoch visits the samples.
//
// Every loader validates what it reads and throws hexamoe::InputError naming the
// file (and the dataset or offset) with one sentence on what is wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace hexamoe {

// Where Debian's dataset-fashion-mnist package puts the files.
inline constexpr char const *default_fashion_mnist_dir = "/usr/share/datasets/fashion-mnist";
// Per-pixel statistics of the Fashion-MNIST training set (after scaling to [0,1]).
inline constexpr float fashion_mnist_mean = 0.2860f;
inline constexpr float fashion_mnist_std = 0.3530f;

struct ImageSet {
  int count = 0;
  int channels = 0;
  int height = 0;
  int width = 0;
  int classes = 0;
  std::vector<float> images;  // [count, channels*height*width], row-major; see normalise()
  std::vector<int> labels;    // [count], in [0, classes)
  float mean = 0.0f;          // normalisation applied: x = (pixel/255 - mean) / stddev
  float stddev = 1.0f;

  std::size_t sample_size() const {
    return static_cast<std::size_t>(channels) * static_cast<std::size_t>(height) * static_cast<std::size_t>(width);
  }
  float const *image(int i) const { return images.data() + static_cast<std::size_t>(i) * sample_size(); }
};

// Reads a pair of IDX files (gzip-compressed or plain; IDX3 unsigned-byte
// images, IDX1 unsigned-byte labels in [0,10)). Pixels are scaled to [0,1].
// max_count > 0 keeps only the first max_count samples (the rest is not read).
ImageSet load_idx_images(std::string const &images_gz, std::string const &labels_gz, int max_count = 0);

// Fashion-MNIST from dir: train-*-ubyte.gz (60000) or t10k-*-ubyte.gz (10000).
ImageSet load_fashion_mnist(std::string const &dir, bool train, int max_count = 0);

// A learnable synthetic task, deterministic from the seed: class c has a fixed
// random template (a smooth, low-contrast pattern around 0.5); sample i is its
// class's template plus Gaussian noise (sigma 0.4), clamped to [0,1]. At 28x28
// and 10 classes the best classifier reaches about 95%; smaller images are harder. The templates depend on the seed only
// and sample i on (seed, first + i), so sets with the same seed and disjoint
// index ranges are a train/test split of one task, and a set is a prefix of a
// larger one. The generator is integer-only (no std:: distributions, no libm),
// so other platforms give the same labels and, up to floating-point
// contraction (FMA) in the template interpolation, the same pixels.
ImageSet make_synthetic(int count, int classes, int channels, int size, std::uint64_t seed, int first = 0);

// Images from an HDF5 file: images_dataset [N,H,W] or [N,C,H,W] of uint8
// (scaled by 1/255) or floating point (taken as is), labels_dataset [N] of any
// integer type, >= 0. classes is the "classes" attribute of the labels dataset
// if present, else max label + 1. Read by the calling process alone (no MPI).
ImageSet load_hdf5_images(std::string const &file, std::string const &images_dataset,
                          std::string const &labels_dataset, int max_count = 0);

// x = (x - mean) / stddev for every pixel, recorded in set.mean / set.stddev.
// Call once, on [0,1]-scaled data (throws InputError otherwise or if stddev <= 0).
void normalise(ImageSet &set, float mean, float stddev);

// The order in which epochs visit the samples: epoch e is a permutation of
// [0, count) drawn from (seed, e) alone, so a run restarted from a saved state
// continues with exactly the samples the uninterrupted run would have seen.
// Portable (own generator and Fisher-Yates, no std:: distributions).
class EpochOrder {
 public:
  struct State {
    std::uint64_t seed = 0;
    std::int64_t count = 0;     // dataset size, checked on restore
    std::int64_t epoch = 0;     // current epoch
    std::int64_t position = 0;  // samples of the current epoch already handed out
  };

  EpochOrder(std::int64_t count, std::uint64_t seed);

  // The next sample index; at the end of an epoch the next epoch begins.
  std::int64_t next();
  // The next batch_size indices; a batch that reaches the end of an epoch is
  // completed from the start of the next one (every batch is full).
  std::vector<std::int64_t> next_batch(int batch_size);

  std::int64_t count() const { return state_.count; }
  std::int64_t epoch() const { return state_.epoch; }
  std::int64_t position() const { return state_.position; }
  std::vector<std::int64_t> const &current_permutation() const { return order_; }

  State state() const { return state_; }
  // Throws InputError when the state does not fit this order (other dataset
  // size, position out of range).
  void restore(State const &s);

  // The state as four words (seed, count, epoch, position), for a checkpoint
  // attribute, and back.
  std::vector<std::uint64_t> to_words() const;
  void restore_words(std::vector<std::uint64_t> const &words);

  // The permutation of epoch `epoch`.
  static std::vector<std::int64_t> permutation(std::int64_t count, std::uint64_t seed, std::int64_t epoch);

 private:
  State state_;
  std::vector<std::int64_t> order_;  // permutation of state_.epoch
};

}  // namespace hexamoe
