// tstDataset.cpp: the data loaders and the epoch order. Fashion-MNIST is
// checked against facts about the published files (counts, class balance,
// first labels, a pixel sum computed independently); crafted IDX and HDF5 files
// check the values and every validation message; the synthetic task is checked
// for determinism and learnability with a nearest-class-mean classifier.
#include "io/Dataset.hpp"
#include "io/InputError.hpp"

#include <gtest/gtest.h>
#include <zlib.h>
#ifdef HEXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using hexamoe::ImageSet;
using hexamoe::InputError;

#define EXPECT_CONTAINS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

// A temporary directory of this test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "hexamoe-dataset-XXXXXX").string();
    char *made = mkdtemp(pattern.data());
    if (!made) throw std::runtime_error("mkdtemp failed");
    path = made;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(std::string const &name) const { return (path / name).string(); }
};

// The InputError f throws (its where() and what()); a test failure if none.
template <class F>
InputError error_of(F &&f) {
  try {
    f();
  } catch (InputError const &e) {
    return e;
  }
  ADD_FAILURE() << "no InputError was thrown";
  return InputError("", "");
}

void put_be32(std::vector<unsigned char> &b, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<unsigned char>(v >> s));
}

std::vector<unsigned char> idx_images(std::uint32_t n, std::uint32_t rows, std::uint32_t cols,
                                      std::uint32_t magic = 2051, std::size_t pixels_present = ~std::size_t(0)) {
  std::vector<unsigned char> b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, rows);
  put_be32(b, cols);
  std::size_t const total = std::min<std::size_t>(std::size_t(n) * rows * cols, pixels_present);
  for (std::size_t i = 0; i < total; ++i) b.push_back(static_cast<unsigned char>((i * 7) % 256));
  return b;
}

std::vector<unsigned char> idx_labels(std::vector<unsigned char> const &labels, std::uint32_t magic = 2049,
                                      std::uint32_t announced = ~0u) {
  std::vector<unsigned char> b;
  put_be32(b, magic);
  put_be32(b, announced == ~0u ? static_cast<std::uint32_t>(labels.size()) : announced);
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

void write_gz(std::string const &path, std::vector<unsigned char> const &bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  if (!bytes.empty()) {
    ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), int(bytes.size()));
  }
  gzclose(f);
}

void write_plain(std::string const &path, std::vector<unsigned char> const &bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<char const *>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::string fashion_dir() {
  char const *env = std::getenv("HEXAMOE_FASHION_MNIST_DIR");
  return env ? env : hexamoe::default_fashion_mnist_dir;
}

// ------------------------------------------------------------ Fashion-MNIST
TEST(FashionMnist, TrainingAndTestSets) {
  if (!fs::is_directory(fashion_dir())) GTEST_SKIP() << "Fashion-MNIST not installed at " << fashion_dir();
  ImageSet const train = hexamoe::load_fashion_mnist(fashion_dir(), true);
  EXPECT_EQ(train.count, 60000);
  EXPECT_EQ(train.channels, 1);
  EXPECT_EQ(train.height, 28);
  EXPECT_EQ(train.width, 28);
  EXPECT_EQ(train.classes, 10);
  ASSERT_EQ(train.images.size(), 60000u * 784u);
  ASSERT_EQ(train.labels.size(), 60000u);
  std::vector<int> histogram(10, 0);
  for (int l : train.labels) histogram.at(static_cast<std::size_t>(l))++;
  for (int c = 0; c < 10; ++c) EXPECT_EQ(histogram[c], 6000) << "class " << c;
  // The first labels and the pixel sum of image 0 (read independently from the files).
  std::vector<int> const first{9, 0, 0, 3, 0, 2, 7, 2, 5, 5};
  EXPECT_EQ(std::vector<int>(train.labels.begin(), train.labels.begin() + 10), first);
  double sum0 = 0;
  for (std::size_t p = 0; p < 784; ++p) sum0 += std::lround(train.images[p] * 255.0f);
  EXPECT_EQ(sum0, 76247.0);
  auto const [lo, hi] = std::minmax_element(train.images.begin(), train.images.end());
  EXPECT_EQ(*lo, 0.0f);
  EXPECT_EQ(*hi, 1.0f);
  double const mean = std::accumulate(train.images.begin(), train.images.end(), 0.0) / double(train.images.size());
  EXPECT_NEAR(mean, hexamoe::fashion_mnist_mean, 1e-4);
  double var = 0;
  for (float x : train.images) var += (x - mean) * (x - mean);
  EXPECT_NEAR(std::sqrt(var / double(train.images.size())), hexamoe::fashion_mnist_std, 1e-3);

  ImageSet const test = hexamoe::load_fashion_mnist(fashion_dir(), false);
  EXPECT_EQ(test.count, 10000);
  std::fill(histogram.begin(), histogram.end(), 0);
  for (int l : test.labels) histogram.at(static_cast<std::size_t>(l))++;
  for (int c = 0; c < 10; ++c) EXPECT_EQ(histogram[c], 1000) << "class " << c;
  std::vector<int> const first_test{9, 2, 1, 1, 6, 1, 4, 6, 5, 7};
  EXPECT_EQ(std::vector<int>(test.labels.begin(), test.labels.begin() + 10), first_test);

  // max_count reads a prefix.
  ImageSet const head = hexamoe::load_fashion_mnist(fashion_dir(), true, 100);
  EXPECT_EQ(head.count, 100);
  EXPECT_EQ(head.labels, std::vector<int>(train.labels.begin(), train.labels.begin() + 100));
  EXPECT_EQ(head.images, std::vector<float>(train.images.begin(), train.images.begin() + 100 * 784));
}

TEST(FashionMnist, Normalise) {
  ImageSet set = hexamoe::make_synthetic(20, 3, 1, 5, 1);
  std::vector<float> const raw = set.images;
  hexamoe::normalise(set, 0.25f, 0.5f);
  for (std::size_t i = 0; i < raw.size(); ++i) EXPECT_FLOAT_EQ(set.images[i], (raw[i] - 0.25f) / 0.5f);
  EXPECT_EQ(set.mean, 0.25f);
  EXPECT_EQ(set.stddev, 0.5f);
  EXPECT_CONTAINS(error_of([&] { hexamoe::normalise(set, 0.25f, 0.5f); }).what(), "already normalised");
  ImageSet other = hexamoe::make_synthetic(2, 3, 1, 5, 1);
  EXPECT_CONTAINS(error_of([&] { hexamoe::normalise(other, 0.0f, 0.0f); }).what(), "must be > 0");
  EXPECT_CONTAINS(error_of([] { hexamoe::load_fashion_mnist("/nonexistent/fashion", true); }).what(),
                  "directory not found");
}

// ------------------------------------------------------------ crafted IDX files
TEST(IdxFiles, ValuesOfASmallFile) {
  TempDir dir;
  write_gz(dir / "img.gz", idx_images(5, 3, 4));
  write_gz(dir / "lab.gz", idx_labels({3, 0, 9, 1, 7}));
  ImageSet const s = hexamoe::load_idx_images(dir / "img.gz", dir / "lab.gz");
  EXPECT_EQ(s.count, 5);
  EXPECT_EQ(s.channels, 1);
  EXPECT_EQ(s.height, 3);
  EXPECT_EQ(s.width, 4);
  EXPECT_EQ(s.classes, 10);
  EXPECT_EQ(s.labels, (std::vector<int>{3, 0, 9, 1, 7}));
  ASSERT_EQ(s.images.size(), 60u);
  for (std::size_t i = 0; i < 60; ++i) EXPECT_EQ(s.images[i], float((i * 7) % 256) / 255.0f);
  EXPECT_EQ(s.image(2)[0], float((24 * 7) % 256) / 255.0f);

  // Uncompressed files read the same; max_count keeps a prefix.
  write_plain(dir / "img.raw", idx_images(5, 3, 4));
  write_plain(dir / "lab.raw", idx_labels({3, 0, 9, 1, 7}));
  ImageSet const plain = hexamoe::load_idx_images(dir / "img.raw", dir / "lab.raw", 2);
  EXPECT_EQ(plain.count, 2);
  EXPECT_EQ(plain.labels, (std::vector<int>{3, 0}));
  EXPECT_EQ(plain.images, std::vector<float>(s.images.begin(), s.images.begin() + 24));
}

TEST(IdxFiles, WrongMagic) {
  TempDir dir;
  write_gz(dir / "img.gz", idx_images(5, 3, 4));
  write_gz(dir / "lab.gz", idx_labels({3, 0, 9, 1, 7}));
  // Swapped files.
  InputError e = error_of([&] { hexamoe::load_idx_images(dir / "lab.gz", dir / "img.gz"); });
  EXPECT_EQ(e.where(), dir / "lab.gz");
  EXPECT_CONTAINS(e.what(), "has magic number 2049");
  EXPECT_CONTAINS(e.what(), "expected 2051");
  EXPECT_CONTAINS(e.what(), "looks like a labels file");
  write_gz(dir / "bad.gz", idx_images(5, 3, 4, 0x12345678));
  e = error_of([&] { hexamoe::load_idx_images(dir / "bad.gz", dir / "lab.gz"); });
  EXPECT_EQ(e.where(), dir / "bad.gz");
  EXPECT_CONTAINS(e.what(), "magic number 305419896 (0x12345678), expected 2051");
  write_gz(dir / "badlab.gz", idx_labels({1, 2, 3, 4, 5}, 2051));
  e = error_of([&] { hexamoe::load_idx_images(dir / "img.gz", dir / "badlab.gz"); });
  EXPECT_EQ(e.where(), dir / "badlab.gz");
  EXPECT_CONTAINS(e.what(), "expected 2049");
}

TEST(IdxFiles, Truncated) {
  TempDir dir;
  write_gz(dir / "lab.gz", idx_labels({3, 0, 9, 1, 7}));
  // The header announces 5 images of 3x4 (60 bytes), only 50 are there.
  write_gz(dir / "short.gz", idx_images(5, 3, 4, 2051, 50));
  InputError e = error_of([&] { hexamoe::load_idx_images(dir / "short.gz", dir / "lab.gz"); });
  EXPECT_EQ(e.where(), dir / "short.gz");
  EXPECT_CONTAINS(e.what(), "is truncated: its header announces 5 images of 3x4 (60 bytes of data) but it holds only 50");
  // The labels file cut short.
  write_gz(dir / "shortlab.gz", idx_labels({3, 0, 9}, 2049, 5));
  write_gz(dir / "img.gz", idx_images(5, 3, 4));
  e = error_of([&] { hexamoe::load_idx_images(dir / "img.gz", dir / "shortlab.gz"); });
  EXPECT_EQ(e.where(), dir / "shortlab.gz");
  EXPECT_CONTAINS(e.what(), "is truncated");
  // A gzip stream cut in half (as by an interrupted download).
  write_gz(dir / "big.gz", idx_images(200, 28, 28));
  fs::resize_file(dir / "big.gz", fs::file_size(dir / "big.gz") / 2);
  write_gz(dir / "lab200.gz", idx_labels(std::vector<unsigned char>(200, 1)));
  e = error_of([&] { hexamoe::load_idx_images(dir / "big.gz", dir / "lab200.gz"); });
  EXPECT_EQ(e.where(), dir / "big.gz");
  EXPECT_CONTAINS(e.what(), "is truncated");
  // A header cut short.
  write_plain(dir / "tiny", {0, 0, 8, 3, 0, 0});
  e = error_of([&] { hexamoe::load_idx_images(dir / "tiny", dir / "lab.gz"); });
  EXPECT_EQ(e.where(), dir / "tiny");
  EXPECT_CONTAINS(e.what(), "too short to be an IDX file");
}

TEST(IdxFiles, CountMismatchBadLabelsMissingFile) {
  TempDir dir;
  write_gz(dir / "img.gz", idx_images(5, 3, 4));
  write_gz(dir / "lab4.gz", idx_labels({3, 0, 9, 1}));
  InputError e = error_of([&] { hexamoe::load_idx_images(dir / "img.gz", dir / "lab4.gz"); });
  EXPECT_EQ(e.where(), dir / "lab4.gz");
  EXPECT_CONTAINS(e.what(), "holds 4 labels but " + (dir / "img.gz") + " holds 5 images");

  write_gz(dir / "lab10.gz", idx_labels({3, 0, 9, 10, 1}));
  e = error_of([&] { hexamoe::load_idx_images(dir / "img.gz", dir / "lab10.gz"); });
  EXPECT_EQ(e.where(), dir / "lab10.gz");
  EXPECT_CONTAINS(e.what(), "label 10 of sample 3 (byte offset 11) is not in [0, 10)");

  e = error_of([&] { hexamoe::load_idx_images(dir / "nothere.gz", dir / "lab4.gz"); });
  EXPECT_EQ(e.where(), dir / "nothere.gz");
  EXPECT_CONTAINS(e.what(), "file not found");

  write_gz(dir / "zero.gz", idx_images(0, 3, 4));
  e = error_of([&] { hexamoe::load_idx_images(dir / "zero.gz", dir / "lab4.gz"); });
  EXPECT_CONTAINS(e.what(), "holds no images");
  write_gz(dir / "huge.gz", idx_images(1, 100000, 4));
  e = error_of([&] { hexamoe::load_idx_images(dir / "huge.gz", dir / "lab4.gz"); });
  EXPECT_CONTAINS(e.what(), "implausible image dimensions 100000x4");
}

// ------------------------------------------------------------ synthetic task
TEST(Synthetic, DeterministicAndPrefixStable) {
  ImageSet const a = hexamoe::make_synthetic(300, 10, 1, 28, 42);
  ImageSet const b = hexamoe::make_synthetic(300, 10, 1, 28, 42);
  ImageSet const c = hexamoe::make_synthetic(300, 10, 1, 28, 43);
  EXPECT_EQ(a.images, b.images);
  EXPECT_EQ(a.labels, b.labels);
  EXPECT_NE(a.images, c.images);
  EXPECT_EQ(a.count, 300);
  EXPECT_EQ(a.classes, 10);
  EXPECT_EQ(a.sample_size(), 784u);
  for (float x : a.images) ASSERT_TRUE(x >= 0.0f && x <= 1.0f);
  std::vector<int> histogram(10, 0);
  for (int l : a.labels) histogram.at(static_cast<std::size_t>(l))++;
  for (int h : histogram) EXPECT_GT(h, 10);
  // Samples 100..299 of the set are the set that starts at sample 100.
  ImageSet const tail = hexamoe::make_synthetic(200, 10, 1, 28, 42, 100);
  EXPECT_EQ(tail.labels, std::vector<int>(a.labels.begin() + 100, a.labels.end()));
  EXPECT_EQ(tail.images, std::vector<float>(a.images.begin() + 100 * 784, a.images.end()));
  ImageSet const rgb = hexamoe::make_synthetic(4, 3, 3, 8, 7);
  EXPECT_EQ(rgb.images.size(), 4u * 3u * 64u);
  EXPECT_CONTAINS(error_of([] { hexamoe::make_synthetic(0, 10, 1, 28, 1); }).what(), "count must be > 0");
}

TEST(Synthetic, LearnableButNoisy) {
  int const classes = 10, n_train = 2000, n_test = 1000;
  ImageSet const train = hexamoe::make_synthetic(n_train, classes, 1, 28, 5);
  ImageSet const test = hexamoe::make_synthetic(n_test, classes, 1, 28, 5, n_train);
  std::size_t const d = train.sample_size();
  std::vector<double> means(classes * d, 0.0);
  std::vector<int> counts(classes, 0);
  for (int i = 0; i < n_train; ++i) {
    int const l = train.labels[i];
    counts[l]++;
    for (std::size_t p = 0; p < d; ++p) means[l * d + p] += train.image(i)[p];
  }
  for (int c = 0; c < classes; ++c) {
    for (std::size_t p = 0; p < d; ++p) means[c * d + p] /= counts[c];
  }
  int correct = 0, correct_train = 0;
  double spread = 0;  // mean squared distance to the class mean: the noise is real
  auto classify = [&](float const *x) {
    int best = 0;
    double best_d = 1e300;
    for (int c = 0; c < classes; ++c) {
      double dist = 0;
      for (std::size_t p = 0; p < d; ++p) dist += (x[p] - means[c * d + p]) * (x[p] - means[c * d + p]);
      if (dist < best_d) best_d = dist, best = c;
    }
    return std::make_pair(best, best_d);
  };
  for (int i = 0; i < n_test; ++i) correct += classify(test.image(i)).first == test.labels[i];
  for (int i = 0; i < 200; ++i) {
    auto const [c, dist] = classify(train.image(i));
    correct_train += c == train.labels[i];
    spread += dist / double(d) / 200.0;
  }
  // The nearest class mean is close to Bayes-optimal here: learnable (far above
  // the 10% of chance) but not trivial.
  EXPECT_GT(correct, n_test * 85 / 100) << "held-out accuracy of the nearest class mean";
  EXPECT_LT(correct, n_test * 99 / 100) << "the task should not be trivial";
  EXPECT_GT(correct_train, 160);
  EXPECT_GT(spread, 0.05) << "samples of a class must differ";
}

// ------------------------------------------------------------ epoch order
TEST(EpochOrder, PermutationsAndRestart) {
  using hexamoe::EpochOrder;
  std::int64_t const n = 103;
  auto p0 = EpochOrder::permutation(n, 11, 0);
  auto p1 = EpochOrder::permutation(n, 11, 1);
  auto sorted = p0;
  std::sort(sorted.begin(), sorted.end());
  for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(sorted[i], i);
  EXPECT_NE(p0, p1);
  EXPECT_EQ(p0, EpochOrder::permutation(n, 11, 0));
  EXPECT_NE(p0, EpochOrder::permutation(n, 12, 0));

  // An uninterrupted run and a run restarted from a saved state see the same samples.
  EpochOrder run(n, 11);
  std::vector<std::int64_t> seen;
  for (int b = 0; b < 20; ++b) {
    auto batch = run.next_batch(16);
    seen.insert(seen.end(), batch.begin(), batch.end());
  }
  // 320 samples: epochs 0, 1, 2 complete (309) and 11 of epoch 3; batches wrap across epochs.
  EXPECT_EQ(run.epoch(), 3);
  EXPECT_EQ(run.position(), 320 - 3 * n);
  for (int e = 0; e < 3; ++e) {
    auto expect = EpochOrder::permutation(n, 11, e);
    EXPECT_EQ(std::vector<std::int64_t>(seen.begin() + e * n, seen.begin() + (e + 1) * n), expect);
  }
  EpochOrder partial(n, 11);
  for (int b = 0; b < 9; ++b) partial.next_batch(16);
  std::vector<std::uint64_t> const saved = partial.to_words();
  EpochOrder restarted(n, 999);  // seed and position come from the saved state
  restarted.restore_words(saved);
  EXPECT_EQ(restarted.epoch(), 1);
  std::vector<std::int64_t> resumed;
  for (int b = 9; b < 20; ++b) {
    auto batch = restarted.next_batch(16);
    resumed.insert(resumed.end(), batch.begin(), batch.end());
  }
  EXPECT_EQ(resumed, std::vector<std::int64_t>(seen.begin() + 9 * 16, seen.end()));

  EpochOrder other(n + 1, 11);
  InputError e = error_of([&] { other.restore(partial.state()); });
  EXPECT_CONTAINS(e.what(), "data set of 103 samples, this one has 104");
  EXPECT_CONTAINS(error_of([&] { other.restore_words({1, 2}); }).what(), "2 words, expected 4");
}

TEST(EpochOrder, ShuffleIsUniform) {
  // Where element 0 lands, and how often an element stays in place, over many
  // epochs: a biased or Sattolo-like shuffle fails one of the two.
  int const n = 5, epochs = 20000;
  std::vector<int> lands(n, 0);
  int fixed = 0;
  for (int e = 0; e < epochs; ++e) {
    auto p = hexamoe::EpochOrder::permutation(n, 3, e);
    for (int i = 0; i < n; ++i) {
      if (p[i] == 0) lands[i]++;
      fixed += p[i] == i;
    }
  }
  for (int i = 0; i < n; ++i) EXPECT_NEAR(lands[i], epochs / n, 300) << "position " << i;
  EXPECT_NEAR(double(fixed) / epochs, 1.0, 0.05);  // expected number of fixed points is 1
}

// ------------------------------------------------------------ HDF5 images
#ifdef HEXAMOE_ENABLE_HDF5
void h5_write(hid_t file, char const *name, hid_t type, std::vector<hsize_t> const &dims, void const *data) {
  hid_t space = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  hid_t dset = H5Dcreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(dset, 0);
  ASSERT_GE(H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), 0);
  H5Dclose(dset);
  H5Sclose(space);
}

TEST(Hdf5Images, ValuesAndValidation) {
  TempDir dir;
  std::string const path = dir / "images.h5";
  std::vector<unsigned char> u8(6 * 2 * 3 * 4);
  for (std::size_t i = 0; i < u8.size(); ++i) u8[i] = static_cast<unsigned char>(i * 5 % 256);
  std::vector<float> f32(6 * 3 * 4);
  for (std::size_t i = 0; i < f32.size(); ++i) f32[i] = float(i) / 100.0f;
  std::vector<std::int64_t> labels{0, 2, 1, 2, 0, 1}, labels5{0, 1, 2, 0, 1};
  std::vector<double> flabels{0, 1, 0, 1, 0, 1};
  std::vector<float> flat(6 * 12);
  {
    hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    h5_write(f, "u8", H5T_NATIVE_UCHAR, {6, 2, 3, 4}, u8.data());
    h5_write(f, "f32", H5T_NATIVE_FLOAT, {6, 3, 4}, f32.data());
    h5_write(f, "flat", H5T_NATIVE_FLOAT, {6, 12}, flat.data());
    h5_write(f, "labels", H5T_NATIVE_INT64, {6}, labels.data());
    h5_write(f, "labels5", H5T_NATIVE_INT64, {5}, labels5.data());
    h5_write(f, "flabels", H5T_NATIVE_DOUBLE, {6}, flabels.data());
    hid_t g = H5Gcreate2(f, "with_classes", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    h5_write(g, "labels", H5T_NATIVE_INT64, {6}, labels.data());
    hid_t lab = H5Dopen2(g, "labels", H5P_DEFAULT);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(lab, "classes", H5T_NATIVE_INT, sp, H5P_DEFAULT, H5P_DEFAULT);
    int const classes = 7;
    H5Awrite(attr, H5T_NATIVE_INT, &classes);
    H5Aclose(attr);
    H5Sclose(sp);
    H5Dclose(lab);
    H5Gclose(g);
    H5Fclose(f);
  }
  ImageSet const a = hexamoe::load_hdf5_images(path, "u8", "labels");
  EXPECT_EQ(a.count, 6);
  EXPECT_EQ(a.channels, 2);
  EXPECT_EQ(a.height, 3);
  EXPECT_EQ(a.width, 4);
  EXPECT_EQ(a.classes, 3);
  EXPECT_EQ(a.labels, (std::vector<int>{0, 2, 1, 2, 0, 1}));
  for (std::size_t i = 0; i < u8.size(); ++i) EXPECT_EQ(a.images[i], float(u8[i]) / 255.0f);
  ImageSet const b = hexamoe::load_hdf5_images(path, "f32", "with_classes/labels", 4);
  EXPECT_EQ(b.count, 4);
  EXPECT_EQ(b.channels, 1);
  EXPECT_EQ(b.classes, 7);
  EXPECT_EQ(b.images, std::vector<float>(f32.begin(), f32.begin() + 4 * 12));

  InputError e = error_of([&] { hexamoe::load_hdf5_images(path, "nope", "labels"); });
  EXPECT_EQ(e.where(), path);
  EXPECT_CONTAINS(e.what(), "dataset 'nope' is missing");
  e = error_of([&] { hexamoe::load_hdf5_images(path, "flat", "labels"); });
  EXPECT_CONTAINS(e.what(), "dataset 'flat' has shape [6,12]; expected [N,H,W] or [N,C,H,W]");
  e = error_of([&] { hexamoe::load_hdf5_images(path, "u8", "labels5"); });
  EXPECT_CONTAINS(e.what(), "dataset 'labels5' holds 5 labels but 'u8' holds 6 images");
  e = error_of([&] { hexamoe::load_hdf5_images(path, "u8", "flabels"); });
  EXPECT_CONTAINS(e.what(), "non-integer element type");
  e = error_of([&] { hexamoe::load_hdf5_images(dir / "missing.h5", "u8", "labels"); });
  EXPECT_CONTAINS(e.what(), "file not found");
  write_plain(dir / "junk.h5", std::vector<unsigned char>(4096, 0x5A));
  e = error_of([&] { hexamoe::load_hdf5_images(dir / "junk.h5", "u8", "labels"); });
  EXPECT_EQ(e.where(), dir / "junk.h5");
  EXPECT_CONTAINS(e.what(), "cannot be opened as an HDF5 file");
}
#endif

}  // namespace
