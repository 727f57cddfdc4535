// Checkpoint.hpp: checkpoints and activation dumps in parallel HDF5 (DESIGN.md
// section 4).
//
// A checkpoint is one HDF5 file per save holding every tensor at its global
// shape; each rank writes its block (hyperslab) collectively, so a checkpoint
// written by n ranks loads on m ranks with any other split. Root attributes
// hold the format version, the step, the model signature and the caller's
// attributes (resolved deck, RNG and data-order state, ...).
//
// Saves are crash-safe: the file is written as ckpt-<step>.h5.tmp, closed,
// synced, renamed to ckpt-<step>.h5; then dir/latest (the file name of the
// newest complete checkpoint) is replaced atomically, and only then are old
// checkpoints beyond `keep` deleted. An interrupted save leaves at most a .tmp
// file, which readers ignore.
//
// Every function here is collective over its communicator, and every error is
// collective too: when any rank finds a problem, every rank throws the same
// hexamoe::InputError (where = the file path), so no rank is left waiting.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace hexamoe {

// Bumped when the layout changes incompatibly; readers refuse other versions.
inline constexpr std::int64_t checkpoint_format_version = 1;

using Shape = std::vector<std::size_t>;  // as Parameter::shape

enum class ElementType { Float32, Float64, Int64 };

namespace detail {
template <class T>
struct ElementTypeOf;
template <>
struct ElementTypeOf<float> {
  static constexpr ElementType value = ElementType::Float32;
};
template <>
struct ElementTypeOf<double> {
  static constexpr ElementType value = ElementType::Float64;
};
template <>
struct ElementTypeOf<std::int64_t> {
  static constexpr ElementType value = ElementType::Int64;
};
}  // namespace detail

// One rank's block of a global tensor: elements [offset, offset+count) of the
// global array, row-major and contiguous at data. A count with a zero extent
// writes nothing (the rank still takes part in the collective write).
// name may contain '/' (groups are created): "opt/adam_m/moe1.w1".
struct TensorSlice {
  std::string name;
  Shape global_shape;
  Shape offset;
  Shape count;
  ElementType type = ElementType::Float32;
  void const *data = nullptr;  // host memory
  bool replicated = false;     // every rank holds the whole tensor; rank 0 writes it

  template <class T>
  static TensorSlice block(std::string name, Shape global_shape, Shape offset, Shape count, T const *data) {
    TensorSlice s;
    s.name = std::move(name);
    s.global_shape = std::move(global_shape);
    s.offset = std::move(offset);
    s.count = std::move(count);
    s.type = detail::ElementTypeOf<T>::value;
    s.data = data;
    return s;
  }
  // A tensor every rank holds in full (replicated parameters, small state).
  template <class T>
  static TensorSlice whole(std::string name, Shape shape, T const *data) {
    TensorSlice s = block(std::move(name), shape, Shape(shape.size(), 0), shape, data);
    s.replicated = true;
    return s;
  }
};

// Root attributes of a checkpoint besides the reserved ones (format_version,
// step, model_signature). Strings may be large (a resolved deck).
struct Attributes {
  std::map<std::string, std::string> strings;
  std::map<std::string, std::int64_t> ints;
  std::map<std::string, double> doubles;
  std::map<std::string, std::vector<std::uint64_t>> words;  // RNG state, EpochOrder::to_words(), ...

  bool operator==(Attributes const &o) const {
    return strings == o.strings && ints == o.ints && doubles == o.doubles && words == o.words;
  }
};

// "ckpt-<step>.h5"
std::string checkpoint_file_name(std::int64_t step);

// The newest complete checkpoint in dir: the file `dir/latest` names, or
// without that file the ckpt-<step>.h5 of highest step; "" when there is none.
// .tmp files are never returned. Not collective (reads the directory).
std::string find_latest_checkpoint(std::string const &dir);

// The checkpoint files in dir: complete and interrupted ckpt-<step>.h5
// (.tmp) files and `latest`, in step order, `latest` last; empty when there
// are none or no such directory. Not collective.
std::vector<std::string> checkpoint_files(std::string const &dir);

// Writes dir/ckpt-<step>.h5 (see the file comment) and returns its path.
// Every rank passes the same tensors (names, shapes, types, in the same
// order) with its own blocks; the blocks of a tensor must cover it exactly
// once. attrs and model_signature are taken from rank 0. keep > 0 keeps the
// newest `keep` checkpoints by step (always including this one), keep <= 0
// keeps all. dir is created if needed.
std::string write_checkpoint(MPI_Comm comm, std::string const &dir, std::int64_t step,
                             std::string const &model_signature, std::vector<TensorSlice> const &tensors,
                             Attributes const &attrs, int keep);

// An open checkpoint. Construction, read() and destruction are collective over
// comm; the getters are local.
class CheckpointReader {
 public:
  // path: a checkpoint file, or a directory (its latest checkpoint). A
  // non-empty expected_signature must equal the stored model signature.
  CheckpointReader(MPI_Comm comm, std::string const &path, std::string const &expected_signature = "");
  ~CheckpointReader();
  CheckpointReader(CheckpointReader &&) noexcept;
  CheckpointReader &operator=(CheckpointReader &&) noexcept;
  CheckpointReader(CheckpointReader const &) = delete;
  CheckpointReader &operator=(CheckpointReader const &) = delete;

  std::string const &path() const;  // the file opened (resolved from a directory)
  std::int64_t step() const;
  std::string const &model_signature() const;
  Attributes const &attributes() const;
  // Typed getters; a missing attribute throws InputError.
  std::string const &string_attr(std::string const &name) const;
  std::int64_t int_attr(std::string const &name) const;
  double double_attr(std::string const &name) const;
  std::vector<std::uint64_t> const &words_attr(std::string const &name) const;

  std::vector<std::string> datasets() const;  // every dataset, "group/name"
  bool has_dataset(std::string const &name) const;
  Shape shape(std::string const &name) const;  // throws InputError if missing

  // Collective: every rank reads its block [offset, offset+count) of dataset
  // `name` into out (row-major, contiguous); a zero extent reads nothing.
  // global_shape is what the model expects; a different stored shape, a
  // missing dataset, a block outside the shape or a float/integer mismatch
  // throws InputError on every rank. float <-> double converts.
  void read(std::string const &name, Shape const &global_shape, Shape const &offset, Shape const &count, float *out);
  void read(std::string const &name, Shape const &global_shape, Shape const &offset, Shape const &count, double *out);
  void read(std::string const &name, Shape const &global_shape, Shape const &offset, Shape const &count,
            std::int64_t *out);
  // Every rank reads the whole tensor.
  template <class T>
  void read_whole(std::string const &name, Shape const &shape, T *out) {
    read(name, shape, Shape(shape.size(), 0), shape, out);
  }

 private:
  struct Impl;
  void read_any(std::string const &name, Shape const &global_shape, Shape const &offset, Shape const &count,
                ElementType type, void *out);
  std::unique_ptr<Impl> impl_;
};

// Writes tensors into group `group` ("step_<s>/layer_<l>", groups created as
// needed) of the HDF5 file `file`, created if missing, appended to otherwise;
// a dataset that already exists there is replaced (a restarted run rewrites
// the steps it repeats). Same slice rules as write_checkpoint; readable with
// h5dump or any HDF5 reader.
void write_activations(MPI_Comm comm, std::string const &file, std::string const &group,
                       std::vector<TensorSlice> const &tensors);

}  // namespace hexamoe
