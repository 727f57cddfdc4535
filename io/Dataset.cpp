// Dataset.cpp: see Dataset.hpp.
#include "io/Dataset.hpp"

#include "io/InputError.hpp"

#include <zlib.h>
#ifdef HEXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <sstream>

namespace hexamoe {

namespace {

// ---------------------------------------------------------------- generator
// splitmix64: a small counter-friendly generator; integer arithmetic only, so
// the stream is the same on every platform.
std::uint64_t mix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class SplitMix {
 public:
  explicit SplitMix(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 24 random bits (exact in float).
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  // Approximately standard normal: Irwin-Hall sum of 4 uniforms, rescaled.
  // (No libm, so the bits do not depend on the platform's log/cos.)
  float normal() {
    float s = uniform() + uniform() + uniform() + uniform();
    return (s - 2.0f) * 1.7320508f;
  }
  // Uniform in [0, n), unbiased (rejection), n > 0.
  std::uint64_t bounded(std::uint64_t n) {
    std::uint64_t const threshold = (0 - n) % n;  // 2^64 mod n
    for (;;) {
      std::uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }

 private:
  std::uint64_t state_;
};

constexpr std::uint64_t template_stream = 0x7465'6D70'6C61'7465ull;  // "template"
constexpr std::uint64_t sample_stream = 0x7361'6D70'6C65'7321ull;    // "samples!"
constexpr std::uint64_t order_stream = 0x6F72'6465'7273'6571ull;     // "ordersq"

// ---------------------------------------------------------------- gzip IDX
class GzReader {
 public:
  explicit GzReader(std::string path) : path_(std::move(path)) {
    std::error_code ec;
    if (!std::filesystem::exists(path_, ec)) throw InputError(path_, "file not found.");
    if (std::filesystem::is_directory(path_, ec)) throw InputError(path_, "is a directory, not a data file.");
    errno = 0;
    file_ = gzopen(path_.c_str(), "rb");
    if (!file_) {
      throw InputError(path_, std::string("cannot be opened: ") + (errno ? std::strerror(errno) : "out of memory") + ".");
    }
    gzbuffer(file_, 1u << 17);
  }
  ~GzReader() {
    if (file_) gzclose(file_);
  }
  GzReader(GzReader const &) = delete;
  GzReader &operator=(GzReader const &) = delete;

  std::string const &path() const { return path_; }

  // Reads up to n bytes; returns how many were read (fewer at the end of the
  // data, or when a compressed stream is cut short).
  std::size_t read(void *buffer, std::size_t n) {
    auto *out = static_cast<unsigned char *>(buffer);
    std::size_t done = 0;
    while (done < n && !ended_) {
      unsigned const ask = static_cast<unsigned>(std::min<std::size_t>(n - done, 1u << 30));
      int const got = gzread(file_, out + done, ask);
      if (got < 0) {
        int code = Z_OK;
        char const *msg = gzerror(file_, &code);
        if (code == Z_BUF_ERROR) {  // "unexpected end of file": a cut gzip stream
          ended_ = true;
          break;
        }
        throw InputError(path_, std::string("is not a valid gzip file (zlib: ") + (msg ? msg : "unknown error") + ").");
      }
      if (got == 0) {
        ended_ = true;
        break;
      }
      done += static_cast<std::size_t>(got);
    }
    return done;
  }

  std::uint32_t read_be32(char const *what) {
    unsigned char b[4];
    if (read(b, 4) != 4) {
      throw InputError(path_, std::string("is too short to be an IDX file: it ends before the ") + what + ".");
    }
    return (std::uint32_t(b[0]) << 24) | (std::uint32_t(b[1]) << 16) | (std::uint32_t(b[2]) << 8) | std::uint32_t(b[3]);
  }

  // Reads exactly n bytes into a vector that grows with the data actually
  // present (a corrupt header cannot make us allocate a huge buffer up front).
  std::vector<unsigned char> read_exactly(std::size_t n, std::string const &what_is_expected) {
    std::vector<unsigned char> bytes;
    std::size_t const chunk = std::size_t(1) << 22;
    while (bytes.size() < n) {
      std::size_t const old = bytes.size();
      std::size_t const ask = std::min(chunk, n - old);
      bytes.resize(old + ask);
      std::size_t const got = read(bytes.data() + old, ask);
      bytes.resize(old + got);
      if (got < ask) {
        std::ostringstream msg;
        msg << "is truncated: its header announces " << what_is_expected << " (" << n << " bytes of data) but it holds only "
            << bytes.size() << " bytes of data.";
        throw InputError(path_, msg.str());
      }
    }
    return bytes;
  }

 private:
  std::string path_;
  gzFile file_ = nullptr;
  bool ended_ = false;
};

constexpr std::uint32_t idx_images_magic = 2051;  // 0x00000803: unsigned byte, 3 dimensions
constexpr std::uint32_t idx_labels_magic = 2049;  // 0x00000801: unsigned byte, 1 dimension
constexpr int idx_classes = 10;

void check_magic(GzReader &in, std::uint32_t magic, std::uint32_t expected) {
  if (magic == expected) return;
  std::ostringstream msg;
  msg << "has magic number " << magic << " (0x" << std::hex << magic << std::dec << "), expected " << expected << " ("
      << (expected == idx_images_magic ? "IDX3 unsigned-byte images" : "IDX1 unsigned-byte labels") << ")";
  if (magic == idx_labels_magic) msg << "; it looks like a labels file";
  if (magic == idx_images_magic) msg << "; it looks like an images file";
  if ((magic >> 16) == 0x1F8B) msg << "; it looks doubly gzip-compressed";
  msg << ".";
  throw InputError(in.path(), msg.str());
}

// The .gz file, or the uncompressed one where only that exists.
std::string fashion_file(std::string const &dir, std::string const &base) {
  std::filesystem::path const gz = std::filesystem::path(dir) / (base + ".gz");
  std::filesystem::path const plain = std::filesystem::path(dir) / base;
  std::error_code ec;
  return (!std::filesystem::exists(gz, ec) && std::filesystem::exists(plain, ec)) ? plain.string() : gz.string();
}

#ifdef HEXAMOE_ENABLE_HDF5
std::string shape_string(std::vector<std::uint64_t> const &dims) {
  std::ostringstream s;
  s << "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s << (i ? "," : "") << dims[i];
  s << "]";
  return s.str();
}

// Silences HDF5's automatic error-stack printing while alive: failures are
// reported as InputError instead.
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietHdf5(QuietHdf5 const &) = delete;
  QuietHdf5 &operator=(QuietHdf5 const &) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void *data_ = nullptr;
};

// An HDF5 identifier closed on scope exit.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  Handle(Handle const &) = delete;
  Handle &operator=(Handle const &) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  Closer close_;
};

std::vector<std::uint64_t> dataset_dims(hid_t dset) {
  Handle space(H5Dget_space(dset), H5Sclose);
  int const rank = H5Sget_simple_extent_ndims(space.get());
  std::vector<hsize_t> dims(static_cast<std::size_t>(std::max(rank, 0)));
  if (rank > 0) H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  return std::vector<std::uint64_t>(dims.begin(), dims.end());
}

// Reads the first n entries (along dimension 0) of dset as mem_type.
void read_leading(hid_t dset, std::vector<std::uint64_t> const &dims, std::uint64_t n, hid_t mem_type, void *out,
                  std::string const &file, std::string const &name) {
  std::vector<hsize_t> start(dims.size(), 0), count(dims.begin(), dims.end());
  count[0] = n;
  Handle fspace(H5Dget_space(dset), H5Sclose);
  H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr);
  Handle mspace(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr), H5Sclose);
  if (H5Dread(dset, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, out) < 0) {
    throw InputError(file, "dataset '" + name + "' cannot be read (the file is truncated or corrupted).");
  }
}
#endif

}  // namespace

// ------------------------------------------------------------------- IDX files
ImageSet load_idx_images(std::string const &images_gz, std::string const &labels_gz, int max_count) {
  GzReader images(images_gz);
  GzReader labels(labels_gz);

  check_magic(images, images.read_be32("magic number"), idx_images_magic);
  std::uint32_t const n_images = images.read_be32("image count");
  std::uint32_t const rows = images.read_be32("row count");
  std::uint32_t const cols = images.read_be32("column count");
  check_magic(labels, labels.read_be32("magic number"), idx_labels_magic);
  std::uint32_t const n_labels = labels.read_be32("label count");

  if (n_images == 0) throw InputError(images_gz, "holds no images (its header gives a count of 0).");
  if (n_images > (1u << 28)) {
    throw InputError(images_gz, "has an implausible image count " + std::to_string(n_images) + " in its header.");
  }
  if (rows == 0 || cols == 0 || rows > 4096 || cols > 4096) {
    throw InputError(images_gz, "has implausible image dimensions " + std::to_string(rows) + "x" + std::to_string(cols) +
                                    " in its header (expected 1..4096 each).");
  }
  if (n_labels != n_images) {
    throw InputError(labels_gz, "holds " + std::to_string(n_labels) + " labels but " + images_gz + " holds " +
                                    std::to_string(n_images) + " images; they must match.");
  }
  if (max_count < 0) throw InputError(images_gz, "max_count must be >= 0, got " + std::to_string(max_count) + ".");

  std::size_t const n = max_count > 0 ? std::min<std::size_t>(n_images, static_cast<std::size_t>(max_count)) : n_images;
  std::size_t const pixels = std::size_t(rows) * cols;

  std::string const announced_images =
      std::to_string(n) + " images of " + std::to_string(rows) + "x" + std::to_string(cols);
  std::vector<unsigned char> const image_bytes = images.read_exactly(n * pixels, announced_images);
  std::vector<unsigned char> const label_bytes = labels.read_exactly(n, std::to_string(n) + " labels");

  ImageSet set;
  set.count = static_cast<int>(n);
  set.channels = 1;
  set.height = static_cast<int>(rows);
  set.width = static_cast<int>(cols);
  set.classes = idx_classes;
  set.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    int const label = label_bytes[i];
    if (label >= idx_classes) {
      std::ostringstream msg;
      msg << "label " << label << " of sample " << i << " (byte offset " << 8 + i << ") is not in [0, " << idx_classes
          << ").";
      throw InputError(labels_gz, msg.str());
    }
    set.labels[i] = label;
  }
  set.images.resize(image_bytes.size());
  for (std::size_t i = 0; i < image_bytes.size(); ++i) set.images[i] = static_cast<float>(image_bytes[i]) / 255.0f;
  return set;
}

ImageSet load_fashion_mnist(std::string const &dir, bool train, int max_count) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    throw InputError(dir, "Fashion-MNIST directory not found (expected the {train,t10k}-*-ubyte.gz files there).");
  }
  std::string const prefix = train ? "train" : "t10k";
  return load_idx_images(fashion_file(dir, prefix + "-images-idx3-ubyte"), fashion_file(dir, prefix + "-labels-idx1-ubyte"),
                         max_count);
}

// ------------------------------------------------------------------ synthetic
ImageSet make_synthetic(int count, int classes, int channels, int size, std::uint64_t seed, int first) {
  std::string const where = "synthetic dataset";
  if (count <= 0) throw InputError(where, "count must be > 0, got " + std::to_string(count) + ".");
  if (classes < 2) throw InputError(where, "classes must be >= 2, got " + std::to_string(classes) + ".");
  if (channels <= 0) throw InputError(where, "channels must be > 0, got " + std::to_string(channels) + ".");
  if (size <= 0 || size > 4096) throw InputError(where, "size must be in 1..4096, got " + std::to_string(size) + ".");
  if (first < 0) throw InputError(where, "first must be >= 0, got " + std::to_string(first) + ".");

  ImageSet set;
  set.count = count;
  set.channels = channels;
  set.height = size;
  set.width = size;
  set.classes = classes;
  std::size_t const sample = set.sample_size();

  // Templates: a coarse grid x grid random pattern per class and channel,
  // bilinearly upsampled (neighbouring pixels are correlated), at reduced
  // contrast around 0.5.
  int const grid = std::min(size, 7);
  float const contrast = 0.3f;  // templates in [0.35, 0.65]: classes overlap under the noise
  std::vector<float> templates(static_cast<std::size_t>(classes) * sample);
  SplitMix trng(mix64(seed ^ template_stream));
  std::vector<float> coarse(static_cast<std::size_t>(grid) * grid);
  for (int c = 0; c < classes; ++c) {
    for (int ch = 0; ch < channels; ++ch) {
      for (auto &v : coarse) v = trng.uniform();
      float *t = templates.data() + static_cast<std::size_t>(c) * sample + static_cast<std::size_t>(ch) * size * size;
      for (int y = 0; y < size; ++y) {
        float const fy = size > 1 ? float(y) * float(grid - 1) / float(size - 1) : 0.0f;
        int const y0 = std::min(static_cast<int>(fy), grid - 1), y1 = std::min(y0 + 1, grid - 1);
        float const ay = fy - float(y0);
        for (int x = 0; x < size; ++x) {
          float const fx = size > 1 ? float(x) * float(grid - 1) / float(size - 1) : 0.0f;
          int const x0 = std::min(static_cast<int>(fx), grid - 1), x1 = std::min(x0 + 1, grid - 1);
          float const ax = fx - float(x0);
          float const top = coarse[y0 * grid + x0] * (1.0f - ax) + coarse[y0 * grid + x1] * ax;
          float const bottom = coarse[y1 * grid + x0] * (1.0f - ax) + coarse[y1 * grid + x1] * ax;
          t[y * size + x] = 0.5f + contrast * (top * (1.0f - ay) + bottom * ay - 0.5f);
        }
      }
    }
  }

  // Samples: template of a random class + N(0, 0.4^2) noise, clamped to [0,1].
  // At 28x28 and 10 classes a nearest-class-mean classifier (close to the best
  // possible here) reaches about 95%: learnable, not trivial.
  float const noise = 0.4f;
  set.images.resize(static_cast<std::size_t>(count) * sample);
  set.labels.resize(static_cast<std::size_t>(count));
  std::uint64_t const sample_seed = mix64(seed ^ sample_stream);
  for (int i = 0; i < count; ++i) {
    SplitMix rng(mix64(sample_seed + static_cast<std::uint64_t>(first) + static_cast<std::uint64_t>(i)));
    int const label = static_cast<int>(rng.bounded(static_cast<std::uint64_t>(classes)));
    set.labels[i] = label;
    float const *t = templates.data() + static_cast<std::size_t>(label) * sample;
    float *x = set.images.data() + static_cast<std::size_t>(i) * sample;
    for (std::size_t p = 0; p < sample; ++p) x[p] = std::clamp(t[p] + noise * rng.normal(), 0.0f, 1.0f);
  }
  return set;
}

// ------------------------------------------------------------------- HDF5 images
#ifdef HEXAMOE_ENABLE_HDF5
ImageSet load_hdf5_images(std::string const &file, std::string const &images_dataset,
                          std::string const &labels_dataset, int max_count) {
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) throw InputError(file, "file not found.");
  if (max_count < 0) throw InputError(file, "max_count must be >= 0, got " + std::to_string(max_count) + ".");
  QuietHdf5 quiet;
  Handle f(H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!f.valid()) throw InputError(file, "cannot be opened as an HDF5 file (not HDF5, truncated or corrupted).");

  auto open = [&](std::string const &name) {
    hid_t id = H5Dopen2(f.get(), name.c_str(), H5P_DEFAULT);
    if (id < 0) throw InputError(file, "dataset '" + name + "' is missing.");
    return id;
  };
  Handle images(open(images_dataset), H5Dclose);
  Handle labels(open(labels_dataset), H5Dclose);

  std::vector<std::uint64_t> const idims = dataset_dims(images.get());
  if (idims.size() != 3 && idims.size() != 4) {
    throw InputError(file, "dataset '" + images_dataset + "' has shape " + shape_string(idims) +
                               "; expected [N,H,W] or [N,C,H,W].");
  }
  for (auto d : idims) {
    if (d == 0) throw InputError(file, "dataset '" + images_dataset + "' has shape " + shape_string(idims) + ", which is empty.");
  }
  std::vector<std::uint64_t> const ldims = dataset_dims(labels.get());
  if (ldims.size() != 1) {
    throw InputError(file, "dataset '" + labels_dataset + "' has shape " + shape_string(ldims) + "; expected [N].");
  }
  if (ldims[0] != idims[0]) {
    throw InputError(file, "dataset '" + labels_dataset + "' holds " + std::to_string(ldims[0]) + " labels but '" +
                               images_dataset + "' holds " + std::to_string(idims[0]) + " images; they must match.");
  }
  std::uint64_t const c = idims.size() == 4 ? idims[1] : 1;
  std::uint64_t const h = idims[idims.size() - 2], w = idims[idims.size() - 1];
  if (idims[0] > std::uint64_t(std::numeric_limits<int>::max()) || c > 4096 || h > 4096 || w > 4096) {
    throw InputError(file, "dataset '" + images_dataset + "' has implausible shape " + shape_string(idims) + ".");
  }

  Handle itype(H5Dget_type(images.get()), H5Tclose);
  H5T_class_t const iclass = H5Tget_class(itype.get());
  bool const is_uint8 = iclass == H5T_INTEGER && H5Tget_size(itype.get()) == 1 && H5Tget_sign(itype.get()) == H5T_SGN_NONE;
  if (!is_uint8 && iclass != H5T_FLOAT) {
    throw InputError(file, "dataset '" + images_dataset + "' has an element type other than uint8 or floating point.");
  }
  Handle ltype(H5Dget_type(labels.get()), H5Tclose);
  if (H5Tget_class(ltype.get()) != H5T_INTEGER) {
    throw InputError(file, "dataset '" + labels_dataset + "' has a non-integer element type; labels must be integers.");
  }

  std::uint64_t const n = max_count > 0 ? std::min<std::uint64_t>(idims[0], std::uint64_t(max_count)) : idims[0];
  ImageSet set;
  set.count = static_cast<int>(n);
  set.channels = static_cast<int>(c);
  set.height = static_cast<int>(h);
  set.width = static_cast<int>(w);
  set.images.resize(n * c * h * w);
  set.labels.resize(n);
  read_leading(images.get(), idims, n, H5T_NATIVE_FLOAT, set.images.data(), file, images_dataset);
  read_leading(labels.get(), ldims, n, H5T_NATIVE_INT, set.labels.data(), file, labels_dataset);
  if (is_uint8) {
    for (auto &x : set.images) x /= 255.0f;
  }

  int max_label = -1;
  for (std::size_t i = 0; i < set.labels.size(); ++i) {
    if (set.labels[i] < 0) {
      throw InputError(file, "dataset '" + labels_dataset + "' has a negative label " + std::to_string(set.labels[i]) +
                                 " at index " + std::to_string(i) + ".");
    }
    max_label = std::max(max_label, set.labels[i]);
  }
  set.classes = max_label + 1;
  if (H5Aexists(labels.get(), "classes") > 0) {
    Handle attr(H5Aopen(labels.get(), "classes", H5P_DEFAULT), H5Aclose);
    int classes = 0;
    if (!attr.valid() || H5Aread(attr.get(), H5T_NATIVE_INT, &classes) < 0 || classes <= 0) {
      throw InputError(file, "dataset '" + labels_dataset + "' has an unreadable or non-positive 'classes' attribute.");
    }
    if (max_label >= classes) {
      throw InputError(file, "dataset '" + labels_dataset + "' holds label " + std::to_string(max_label) +
                                 " but its 'classes' attribute is " + std::to_string(classes) + ".");
    }
    set.classes = classes;
  }
  if (set.classes < 2) {
    throw InputError(file, "dataset '" + labels_dataset + "' holds fewer than 2 classes; nothing to classify.");
  }
  return set;
}
#else
ImageSet load_hdf5_images(std::string const &file, std::string const &, std::string const &, int) {
  throw InputError(file, "this build of hexamoe has no HDF5 support (configure with parallel HDF5).");
}
#endif

void normalise(ImageSet &set, float mean, float stddev) {
  std::string const where = "data normalisation";
  if (!(stddev > 0.0f)) throw InputError(where, "the standard deviation must be > 0, got " + std::to_string(stddev) + ".");
  if (set.mean != 0.0f || set.stddev != 1.0f) throw InputError(where, "the data set is already normalised.");
  float const inv = 1.0f / stddev;
  for (auto &x : set.images) x = (x - mean) * inv;
  set.mean = mean;
  set.stddev = stddev;
}

// ------------------------------------------------------------------ EpochOrder
std::vector<std::int64_t> EpochOrder::permutation(std::int64_t count, std::uint64_t seed, std::int64_t epoch) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i) order[static_cast<std::size_t>(i)] = i;
  SplitMix rng(mix64(mix64(seed ^ order_stream) + static_cast<std::uint64_t>(epoch)));
  for (std::int64_t i = count - 1; i > 0; --i) {
    auto const j = static_cast<std::int64_t>(rng.bounded(static_cast<std::uint64_t>(i) + 1));
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(j)]);
  }
  return order;
}

EpochOrder::EpochOrder(std::int64_t count, std::uint64_t seed) {
  if (count <= 0) throw InputError("data order", "the data set is empty; there is nothing to iterate over.");
  state_.seed = seed;
  state_.count = count;
  order_ = permutation(count, seed, 0);
}

std::int64_t EpochOrder::next() {
  if (state_.position == state_.count) {
    ++state_.epoch;
    state_.position = 0;
    order_ = permutation(state_.count, state_.seed, state_.epoch);
  }
  return order_[static_cast<std::size_t>(state_.position++)];
}

std::vector<std::int64_t> EpochOrder::next_batch(int batch_size) {
  std::vector<std::int64_t> batch(static_cast<std::size_t>(std::max(batch_size, 0)));
  for (auto &i : batch) i = next();
  return batch;
}

void EpochOrder::restore(State const &s) {
  std::string const where = "data order";
  if (s.count != state_.count) {
    throw InputError(where, "the saved order is for a data set of " + std::to_string(s.count) + " samples, this one has " +
                                std::to_string(state_.count) + ".");
  }
  if (s.epoch < 0 || s.position < 0 || s.position > s.count) {
    throw InputError(where, "the saved state (epoch " + std::to_string(s.epoch) + ", position " +
                                std::to_string(s.position) + ") is out of range.");
  }
  state_ = s;
  order_ = permutation(s.count, s.seed, s.epoch);
}

std::vector<std::uint64_t> EpochOrder::to_words() const {
  return {state_.seed, static_cast<std::uint64_t>(state_.count), static_cast<std::uint64_t>(state_.epoch),
          static_cast<std::uint64_t>(state_.position)};
}

void EpochOrder::restore_words(std::vector<std::uint64_t> const &words) {
  if (words.size() != 4) {
    throw InputError("data order", "the saved state has " + std::to_string(words.size()) + " words, expected 4.");
  }
  State s;
  s.seed = words[0];
  s.count = static_cast<std::int64_t>(words[1]);
  s.epoch = static_cast<std::int64_t>(words[2]);
  s.position = static_cast<std::int64_t>(words[3]);
  restore(s);
}

}  // namespace hexamoe
