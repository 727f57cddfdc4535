// Checkpoint.cpp: see Checkpoint.hpp.
#include "io/Checkpoint.hpp"

#include "io/InputError.hpp"

#include <hdf5.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <utility>

namespace hexamoe {

namespace fs = std::filesystem;

namespace {

// ------------------------------------------------------------ HDF5 helpers
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

// An HDF5 identifier closed on scope exit (H5Fclose of a parallel file is
// collective: errors are made collective first, so every rank unwinds).
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  ~Handle() { reset(); }
  Handle(Handle &&o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), close_(o.close_) {}
  Handle &operator=(Handle &&o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      close_ = o.close_;
    }
    return *this;
  }
  Handle(Handle const &) = delete;
  Handle &operator=(Handle const &) = delete;

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now; returns false if closing failed.
  bool reset() {
    bool ok = true;
    if (id_ >= 0 && close_) ok = close_(id_) >= 0;
    id_ = H5I_INVALID_HID;
    return ok;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

hid_t file_type(ElementType t) {
  switch (t) {
    case ElementType::Float32: return H5T_IEEE_F32LE;
    case ElementType::Float64: return H5T_IEEE_F64LE;
    case ElementType::Int64: return H5T_STD_I64LE;
  }
  return H5T_IEEE_F32LE;
}

hid_t memory_type(ElementType t) {
  switch (t) {
    case ElementType::Float32: return H5T_NATIVE_FLOAT;
    case ElementType::Float64: return H5T_NATIVE_DOUBLE;
    case ElementType::Int64: return H5T_NATIVE_INT64;
  }
  return H5T_NATIVE_FLOAT;
}

char const *type_name(ElementType t) {
  switch (t) {
    case ElementType::Float32: return "float32";
    case ElementType::Float64: return "float64";
    case ElementType::Int64: return "int64";
  }
  return "?";
}

std::string shape_string(Shape const &s) {
  std::ostringstream o;
  o << "[";
  for (std::size_t i = 0; i < s.size(); ++i) o << (i ? "," : "") << s[i];
  o << "]";
  return o.str();
}

std::size_t volume(Shape const &s) {
  std::size_t v = 1;
  for (auto d : s) v *= d;
  return v;
}

std::vector<hsize_t> to_hsize(Shape const &s) { return std::vector<hsize_t>(s.begin(), s.end()); }

// A file access property list: MPI-IO on comm, HDF5 1.8 file format (large
// attributes go to dense storage; readable by HDF5 >= 1.8).
Handle mpio_fapl(MPI_Comm comm) {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_fapl_mpio(fapl.get(), comm, MPI_INFO_NULL);
  H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_V18);
  H5Pset_coll_metadata_write(fapl.get(), true);
  return fapl;
}

Handle serial_fapl() {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_V18);
  return fapl;
}

// ------------------------------------------------------- collective errors
int comm_rank(MPI_Comm comm) {
  int r = 0;
  MPI_Comm_rank(comm, &r);
  return r;
}
int comm_size(MPI_Comm comm) {
  int s = 1;
  MPI_Comm_size(comm, &s);
  return s;
}

void bcast_string(MPI_Comm comm, std::string &s, int root) {
  unsigned long long n = s.size();
  MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG_LONG, root, comm);
  s.resize(static_cast<std::size_t>(n));
  if (n > 0) MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, root, comm);
}

// Every rank brings its verdict (failed, where, what); if any rank failed,
// every rank throws the error of the lowest failing rank.
void agree(MPI_Comm comm, bool failed, std::string where, std::string what) {
  int const size = comm_size(comm);
  int const mine = failed ? comm_rank(comm) : size;
  int first = size;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == size) return;
  bcast_string(comm, where, first);
  bcast_string(comm, what, first);
  throw InputError(where, what);
}

// The message of an InputError without its "where: " prefix.
std::string bare_message(InputError const &e) {
  std::string m = e.what();
  std::string const prefix = e.where() + ": ";
  if (!e.where().empty() && m.compare(0, prefix.size(), prefix) == 0) m.erase(0, prefix.size());
  return m;
}

// Runs f on this rank and makes its outcome collective: an exception on any
// rank becomes the same InputError on every rank (default_where for errors
// that are not InputErrors, such as a failed rename).
template <class F>
void collectively(MPI_Comm comm, std::string const &default_where, F &&f) {
  bool failed = false;
  std::string where, what;
  try {
    f();
  } catch (InputError const &e) {
    failed = true;
    where = e.where();
    what = bare_message(e);
  } catch (fs::filesystem_error const &e) {
    failed = true;
    where = default_where;
    what = std::string(e.code().message()) + " (" + e.path1().string() + ").";
  } catch (std::exception const &e) {
    failed = true;
    where = default_where;
    what = e.what();
  }
  agree(comm, failed, where, what);
}

// --------------------------------------------------------- slice checks
void check_slice(std::string const &where, TensorSlice const &t, int rank) {
  std::string const ds = "dataset '" + t.name + "'";
  if (t.name.empty() || t.name.front() == '/' || t.name.back() == '/') {
    throw InputError(where, "tensor name '" + t.name + "' must be non-empty and not start or end with '/'.");
  }
  if (t.global_shape.empty()) throw InputError(where, ds + " needs a global shape of rank >= 1.");
  if (t.offset.size() != t.global_shape.size() || t.count.size() != t.global_shape.size()) {
    throw InputError(where, ds + ": offset " + shape_string(t.offset) + " and count " + shape_string(t.count) +
                                " must have the rank of its global shape " + shape_string(t.global_shape) + ".");
  }
  for (std::size_t d = 0; d < t.global_shape.size(); ++d) {
    if (t.offset[d] > t.global_shape[d] || t.count[d] > t.global_shape[d] - t.offset[d]) {
      throw InputError(where, "rank " + std::to_string(rank) + "'s block of " + ds + " (offset " +
                                  shape_string(t.offset) + ", count " + shape_string(t.count) +
                                  ") lies outside its global shape " + shape_string(t.global_shape) + ".");
    }
  }
  if (volume(t.count) > 0 && t.data == nullptr) {
    throw InputError(where, "rank " + std::to_string(rank) + " passes no data for its block of " + ds + ".");
  }
}

bool writes_block(TensorSlice const &t, int rank) { return (!t.replicated || rank == 0) && volume(t.count) > 0; }

// Local checks, then: all ranks pass the same tensor list, and the blocks of
// each tensor add up to its volume.
void check_slices_collectively(MPI_Comm comm, std::string const &where, std::vector<TensorSlice> const &tensors) {
  int const rank = comm_rank(comm);
  collectively(comm, where, [&] {
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      check_slice(where, tensors[i], rank);
      for (std::size_t j = 0; j < i; ++j) {
        if (tensors[j].name == tensors[i].name) {
          throw InputError(where, "dataset '" + tensors[i].name + "' is given twice.");
        }
      }
    }
  });

  // FNV-1a of the description of the list; min == max over ranks iff all agree.
  std::ostringstream desc;
  for (auto const &t : tensors) {
    desc << t.name << '\n' << type_name(t.type) << shape_string(t.global_shape) << (t.replicated ? 'r' : 'b') << '\n';
  }
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : desc.str()) h = (h ^ c) * 1099511628211ull;
  unsigned long long const mine = h;
  unsigned long long lo = 0, hi = 0;
  MPI_Allreduce(&mine, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, comm);
  MPI_Allreduce(&mine, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, comm);
  if (lo != hi) {
    throw InputError(where, "the ranks pass different tensor lists (names, shapes, types or order); every rank must "
                            "pass the same tensors in the same order.");
  }

  std::vector<unsigned long long> mine_v(tensors.size()), sum(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) mine_v[i] = writes_block(tensors[i], rank) ? volume(tensors[i].count) : 0;
  if (!tensors.empty()) {
    MPI_Allreduce(mine_v.data(), sum.data(), static_cast<int>(tensors.size()), MPI_UNSIGNED_LONG_LONG, MPI_SUM, comm);
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (sum[i] != volume(tensors[i].global_shape)) {
      throw InputError(where, "the ranks' blocks of dataset '" + tensors[i].name + "' hold " + std::to_string(sum[i]) +
                                  " elements but its shape " + shape_string(tensors[i].global_shape) + " has " +
                                  std::to_string(volume(tensors[i].global_shape)) +
                                  "; the blocks must cover it exactly once.");
    }
  }
}

// ------------------------------------------------------------- writing
bool link_exists(hid_t loc, std::string const &path) {
  // Component by component: H5Lexists fails when an intermediate group is missing.
  std::size_t pos = 0;
  for (;;) {
    std::size_t const slash = path.find('/', pos);
    std::string const prefix = path.substr(0, slash);
    if (H5Lexists(loc, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (slash == std::string::npos) return true;
    pos = slash + 1;
  }
}

// Creates dataset t.name under loc and writes this rank's block, collectively.
// Returns false when HDF5 failed.
bool write_dataset(hid_t loc, TensorSlice const &t, int rank) {
  std::vector<hsize_t> const dims = to_hsize(t.global_shape);
  Handle fspace(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER);  // every element is written
  Handle dset(H5Dcreate2(loc, t.name.c_str(), file_type(t.type), fspace.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT),
              H5Dclose);
  if (!dset.valid()) return false;

  bool const mine = writes_block(t, rank);
  std::vector<hsize_t> const off = to_hsize(t.offset), cnt = to_hsize(t.count);
  Handle mspace;
  if (mine) {
    H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, off.data(), nullptr, cnt.data(), nullptr);
    mspace = Handle(H5Screate_simple(static_cast<int>(cnt.size()), cnt.data(), nullptr), H5Sclose);
  } else {
    H5Sselect_none(fspace.get());
    hsize_t const one = 1;
    mspace = Handle(H5Screate_simple(1, &one, nullptr), H5Sclose);
    H5Sselect_none(mspace.get());
  }
  Handle dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
  H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE);
  double dummy = 0.0;
  void const *buf = mine ? t.data : &dummy;
  return H5Dwrite(dset.get(), memory_type(t.type), mspace.get(), fspace.get(), dxpl.get(), buf) >= 0;
}

void write_string_attr(hid_t loc, std::string const &name, std::string const &value) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), std::max<std::size_t>(value.size(), 1));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(loc, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  char const zero = '\0';
  if (!attr.valid() || H5Awrite(attr.get(), type.get(), value.empty() ? &zero : value.data()) < 0) {
    throw InputError("", "cannot write attribute '" + name + "'.");
  }
}

template <class T>
void write_scalar_attr(hid_t loc, std::string const &name, hid_t ftype, hid_t mtype, T value) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(loc, name.c_str(), ftype, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attr.valid() || H5Awrite(attr.get(), mtype, &value) < 0) {
    throw InputError("", "cannot write attribute '" + name + "'.");
  }
}

void write_words_attr(hid_t loc, std::string const &name, std::vector<std::uint64_t> const &w) {
  hsize_t const n = w.size();
  Handle space(n ? H5Screate_simple(1, &n, nullptr) : H5Screate(H5S_NULL), H5Sclose);
  Handle attr(H5Acreate2(loc, name.c_str(), H5T_STD_U64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attr.valid() || (n && H5Awrite(attr.get(), H5T_NATIVE_UINT64, w.data()) < 0)) {
    throw InputError("", "cannot write attribute '" + name + "'.");
  }
}

bool is_reserved(std::string const &name) {
  return name == "format_version" || name == "step" || name == "model_signature";
}

// Makes a file's data durable before it is renamed into place.
void sync_path(fs::path const &p) {
  int const fd = ::open(p.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// Replaces `target` with `content` atomically (temp file + rename).
void write_file_atomically(fs::path const &target, std::string const &content) {
  fs::path const tmp = target.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << content;
    out.flush();
    if (!out) throw InputError(tmp.string(), "cannot be written.");
  }
  sync_path(tmp);
  fs::rename(tmp, target);
}

// ckpt-<step>.h5 (complete) and ckpt-<step>.h5.tmp (interrupted) in dir.
struct DirEntry {
  std::int64_t step;
  fs::path path;
};
void list_checkpoints(fs::path const &dir, std::vector<DirEntry> &complete, std::vector<DirEntry> *partial) {
  static std::regex const done("ckpt-([0-9]{1,18})\\.h5");
  static std::regex const tmp("ckpt-([0-9]{1,18})\\.h5\\.tmp");
  std::error_code ec;
  for (auto const &e : fs::directory_iterator(dir, ec)) {
    std::string const name = e.path().filename().string();
    std::smatch m;
    if (std::regex_match(name, m, done)) {
      complete.push_back({std::stoll(m[1].str()), e.path()});
    } else if (partial && std::regex_match(name, m, tmp)) {
      partial->push_back({std::stoll(m[1].str()), e.path()});
    }
  }
}

// -------------------------------------------------------------- reading
struct DatasetInfo {
  Shape shape;
  bool is_float = true;
};

herr_t collect_dataset(hid_t group, char const *name, H5L_info_t const *info, void *data) {
  if (info->type != H5L_TYPE_HARD) return 0;
  hid_t const obj = H5Oopen(group, name, H5P_DEFAULT);
  if (obj < 0) return -1;
  if (H5Iget_type(obj) == H5I_DATASET) {
    DatasetInfo d;
    Handle space(H5Dget_space(obj), H5Sclose);
    Handle type(H5Dget_type(obj), H5Tclose);
    int const rank = H5Sget_simple_extent_ndims(space.get());
    if (rank < 0 || !type.valid()) {
      H5Oclose(obj);
      return -1;
    }
    std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
    if (rank > 0) H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    d.shape.assign(dims.begin(), dims.end());
    d.is_float = H5Tget_class(type.get()) == H5T_FLOAT;
    (*static_cast<std::map<std::string, DatasetInfo> *>(data))[name] = d;
  }
  H5Oclose(obj);
  return 0;
}

struct AttrCollector {
  Attributes attrs;
  std::string error;
};

herr_t collect_attribute(hid_t loc, char const *name, H5A_info_t const *, void *data) {
  auto &out = *static_cast<AttrCollector *>(data);
  Handle attr(H5Aopen(loc, name, H5P_DEFAULT), H5Aclose);
  if (!attr.valid()) return -1;
  Handle type(H5Aget_type(attr.get()), H5Tclose);
  Handle space(H5Aget_space(attr.get()), H5Sclose);
  if (!type.valid() || !space.valid()) return -1;
  H5T_class_t const cls = H5Tget_class(type.get());
  H5S_class_t const scls = H5Sget_simple_extent_type(space.get());
  hssize_t const n = H5Sget_simple_extent_npoints(space.get());
  if (cls == H5T_STRING && !H5Tis_variable_str(type.get()) && scls == H5S_SCALAR) {
    std::size_t const size = H5Tget_size(type.get());
    std::string s(size, '\0');
    if (H5Aread(attr.get(), type.get(), s.data()) < 0) return -1;
    s.resize(std::strlen(s.c_str()));  // fixed-length strings are NUL-padded
    out.attrs.strings[name] = s;
  } else if (cls == H5T_INTEGER && scls == H5S_SCALAR) {
    std::int64_t v = 0;
    if (H5Aread(attr.get(), H5T_NATIVE_INT64, &v) < 0) return -1;
    out.attrs.ints[name] = v;
  } else if (cls == H5T_INTEGER && (scls == H5S_SIMPLE || scls == H5S_NULL)) {
    std::vector<std::uint64_t> w(scls == H5S_NULL ? 0 : static_cast<std::size_t>(n));
    if (!w.empty() && H5Aread(attr.get(), H5T_NATIVE_UINT64, w.data()) < 0) return -1;
    out.attrs.words[name] = std::move(w);
  } else if (cls == H5T_FLOAT && scls == H5S_SCALAR) {
    double v = 0;
    if (H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &v) < 0) return -1;
    out.attrs.doubles[name] = v;
  }  // other attributes (not written by hexamoe) are ignored
  return 0;
}

}  // namespace

// ------------------------------------------------------------- public API
std::string checkpoint_file_name(std::int64_t step) { return "ckpt-" + std::to_string(step) + ".h5"; }

std::string find_latest_checkpoint(std::string const &dir) {
  fs::path const d(dir);
  std::error_code ec;
  fs::path const latest = d / "latest";
  if (fs::is_regular_file(latest, ec)) {
    std::ifstream in(latest);
    std::string name;
    std::getline(in, name);
    if (name.empty() || name.find('/') != std::string::npos) {
      throw InputError(latest.string(), "does not name a checkpoint file (it should hold e.g. 'ckpt-100.h5').");
    }
    if (!fs::is_regular_file(d / name, ec)) {
      throw InputError(latest.string(), "names '" + name + "', which does not exist in " + dir + ".");
    }
    return (d / name).string();
  }
  std::vector<DirEntry> complete;
  list_checkpoints(d, complete, nullptr);
  if (complete.empty()) return "";
  return std::max_element(complete.begin(), complete.end(), [](auto const &a, auto const &b) {
           return a.step < b.step;
         })->path.string();
}

std::vector<std::string> checkpoint_files(std::string const &dir) {
  std::vector<DirEntry> all, partial;
  list_checkpoints(fs::path(dir), all, &partial);
  all.insert(all.end(), partial.begin(), partial.end());
  std::stable_sort(all.begin(), all.end(), [](auto const &a, auto const &b) { return a.step < b.step; });
  std::vector<std::string> files;
  for (auto const &e : all) files.push_back(e.path.string());
  std::error_code ec;
  if (fs::exists(fs::path(dir) / "latest", ec)) files.push_back((fs::path(dir) / "latest").string());
  return files;
}

std::string write_checkpoint(MPI_Comm comm, std::string const &dir, std::int64_t step,
                             std::string const &model_signature, std::vector<TensorSlice> const &tensors,
                             Attributes const &attrs, int keep) {
  int const rank = comm_rank(comm);
  fs::path const final_path = fs::path(dir) / checkpoint_file_name(step);
  fs::path const tmp_path = final_path.string() + ".tmp";
  std::string const where = final_path.string();

  collectively(comm, where, [&] {
    if (step < 0) throw InputError(where, "the step must be >= 0, got " + std::to_string(step) + ".");
    if (rank == 0) {
      auto check = [&](std::string const &n) {
        if (is_reserved(n) || n.empty()) {
          throw InputError(where, "attribute name '" + n + "' is reserved or empty.");
        }
      };
      for (auto const &kv : attrs.strings) check(kv.first);
      for (auto const &kv : attrs.ints) check(kv.first);
      for (auto const &kv : attrs.doubles) check(kv.first);
      for (auto const &kv : attrs.words) check(kv.first);
    }
  });
  check_slices_collectively(comm, where, tensors);
  collectively(comm, dir, [&] {
    if (rank == 0) fs::create_directories(dir);
  });

  QuietHdf5 quiet;
  {  // the data, collectively, into the temporary file
    Handle fapl = mpio_fapl(comm);
    Handle file(H5Fcreate(tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    agree(comm, !file.valid(), tmp_path.string(), "cannot be created (is the directory writable?).");
    bool ok = true;
    std::string failed_name;
    for (auto const &t : tensors) {
      if (!write_dataset(file.get(), t, rank) && ok) {
        ok = false;
        failed_name = t.name;
      }
    }
    bool const closed = file.reset();
    agree(comm, !ok || !closed, tmp_path.string(),
          ok ? std::string("cannot be closed (disk full?).")
             : "dataset '" + failed_name + "' cannot be written (disk full or file system error?).");
  }

  // Rank 0: attributes, sync, rename, `latest`, pruning. Until the rename
  // nothing else in dir has changed; afterwards the new checkpoint is complete.
  collectively(comm, where, [&] {
    if (rank != 0) return;
    {
      Handle fapl = serial_fapl();
      Handle file(H5Fopen(tmp_path.c_str(), H5F_ACC_RDWR, fapl.get()), H5Fclose);
      if (!file.valid()) throw InputError(tmp_path.string(), "cannot be reopened to write its attributes.");
      hid_t const root = file.get();
      try {
        write_scalar_attr<std::int64_t>(root, "format_version", H5T_STD_I64LE, H5T_NATIVE_INT64,
                                        checkpoint_format_version);
        write_scalar_attr<std::int64_t>(root, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, step);
        write_string_attr(root, "model_signature", model_signature);
        for (auto const &kv : attrs.strings) write_string_attr(root, kv.first, kv.second);
        for (auto const &kv : attrs.ints)
          write_scalar_attr<std::int64_t>(root, kv.first, H5T_STD_I64LE, H5T_NATIVE_INT64, kv.second);
        for (auto const &kv : attrs.doubles)
          write_scalar_attr<double>(root, kv.first, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, kv.second);
        for (auto const &kv : attrs.words) write_words_attr(root, kv.first, kv.second);
      } catch (InputError const &e) {
        throw InputError(tmp_path.string(), bare_message(e));
      }
      if (!file.reset()) throw InputError(tmp_path.string(), "cannot be closed after writing its attributes.");
    }
    sync_path(tmp_path);
    fs::rename(tmp_path, final_path);
    sync_path(fs::path(dir));
    write_file_atomically(fs::path(dir) / "latest", checkpoint_file_name(step) + "\n");
    sync_path(fs::path(dir));

    if (keep > 0) {
      std::vector<DirEntry> complete, partial;
      list_checkpoints(dir, complete, &partial);
      std::sort(complete.begin(), complete.end(), [](auto const &a, auto const &b) { return a.step > b.step; });
      int kept = 1;  // this one
      for (auto const &c : complete) {
        if (c.step == step) continue;
        if (kept < keep) {
          ++kept;
        } else {
          std::error_code ec;
          fs::remove(c.path, ec);
        }
      }
      for (auto const &p : partial) {  // leftovers of interrupted saves
        std::error_code ec;
        fs::remove(p.path, ec);
      }
    }
  });
  return final_path.string();
}

// ------------------------------------------------------------- the reader
struct CheckpointReader::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  std::string path;
  Handle file;
  std::int64_t step = 0;
  std::string signature;
  Attributes attrs;
  std::map<std::string, DatasetInfo> datasets;

  Impl() = default;
  Impl(Impl const &) = delete;
  Impl &operator=(Impl const &) = delete;
  ~Impl() {  // collective (H5Fclose); also runs when the constructor throws, on every rank
    {
      QuietHdf5 quiet;
      file.reset();
    }
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
  }
};

CheckpointReader::CheckpointReader(MPI_Comm comm, std::string const &path, std::string const &expected_signature)
    : impl_(std::make_unique<Impl>()) {
  int const rank = comm_rank(comm);
  MPI_Comm_dup(comm, &impl_->comm);

  // Rank 0 resolves the path (a directory means its latest checkpoint), so
  // every rank opens the same file.
  std::string resolved = path;
  collectively(comm, path, [&] {
    if (rank != 0) return;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      resolved = find_latest_checkpoint(path);
      if (resolved.empty()) {
        throw InputError(path, "holds no checkpoint (no 'latest' file and no complete ckpt-<step>.h5).");
      }
    } else if (!fs::exists(path, ec)) {
      throw InputError(path, "checkpoint file not found.");
    }
  });
  bcast_string(comm, resolved, 0);
  impl_->path = resolved;

  QuietHdf5 quiet;
  Handle fapl = mpio_fapl(comm);
  impl_->file = Handle(H5Fopen(resolved.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose);
  agree(comm, !impl_->file.valid(), resolved,
        "cannot be opened as an HDF5 file: it is truncated, corrupted or not HDF5.");

  collectively(comm, resolved, [&] {
    AttrCollector c;
    hsize_t idx = 0;
    if (H5Aiterate2(impl_->file.get(), H5_INDEX_NAME, H5_ITER_INC, &idx, collect_attribute, &c) < 0) {
      throw InputError(resolved, "its attributes cannot be read: the file is corrupted.");
    }
    if (H5Lvisit(impl_->file.get(), H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &impl_->datasets) < 0) {
      throw InputError(resolved, "its datasets cannot be listed: the file is corrupted.");
    }
    Attributes &a = c.attrs;
    auto version = a.ints.find("format_version");
    if (version == a.ints.end()) {
      throw InputError(resolved, "is not a hexamoe checkpoint (it has no 'format_version' attribute).");
    }
    if (version->second != checkpoint_format_version) {
      throw InputError(resolved, "has checkpoint format version " + std::to_string(version->second) +
                                     "; this build reads version " + std::to_string(checkpoint_format_version) + ".");
    }
    auto step = a.ints.find("step");
    auto sig = a.strings.find("model_signature");
    if (step == a.ints.end() || sig == a.strings.end()) {
      throw InputError(resolved, "is incomplete: the 'step' or 'model_signature' attribute is missing.");
    }
    impl_->step = step->second;
    impl_->signature = sig->second;
    a.ints.erase("format_version");
    a.ints.erase("step");
    a.strings.erase("model_signature");
    impl_->attrs = std::move(a);
    if (!expected_signature.empty() && impl_->signature != expected_signature) {
      throw InputError(resolved, "was written for model signature '" + impl_->signature +
                                     "', but this model's signature is '" + expected_signature + "'.");
    }
  });
}

CheckpointReader::~CheckpointReader() = default;

CheckpointReader::CheckpointReader(CheckpointReader &&) noexcept = default;
CheckpointReader &CheckpointReader::operator=(CheckpointReader &&o) noexcept {
  if (this != &o) {
    CheckpointReader old(std::move(*this));  // closes the current file (collectively) on scope exit
    impl_ = std::move(o.impl_);
  }
  return *this;
}

std::string const &CheckpointReader::path() const { return impl_->path; }
std::int64_t CheckpointReader::step() const { return impl_->step; }
std::string const &CheckpointReader::model_signature() const { return impl_->signature; }
Attributes const &CheckpointReader::attributes() const { return impl_->attrs; }

namespace {
template <class Map>
auto const &find_attr(Map const &m, std::string const &name, std::string const &path, char const *kind) {
  auto it = m.find(name);
  if (it == m.end()) throw InputError(path, std::string("has no ") + kind + " attribute '" + name + "'.");
  return it->second;
}
}  // namespace

std::string const &CheckpointReader::string_attr(std::string const &name) const {
  return find_attr(impl_->attrs.strings, name, impl_->path, "string");
}
std::int64_t CheckpointReader::int_attr(std::string const &name) const {
  return find_attr(impl_->attrs.ints, name, impl_->path, "integer");
}
double CheckpointReader::double_attr(std::string const &name) const {
  return find_attr(impl_->attrs.doubles, name, impl_->path, "floating-point");
}
std::vector<std::uint64_t> const &CheckpointReader::words_attr(std::string const &name) const {
  return find_attr(impl_->attrs.words, name, impl_->path, "word-array");
}

std::vector<std::string> CheckpointReader::datasets() const {
  std::vector<std::string> names;
  for (auto const &kv : impl_->datasets) names.push_back(kv.first);
  return names;
}
bool CheckpointReader::has_dataset(std::string const &name) const { return impl_->datasets.count(name) > 0; }

Shape CheckpointReader::shape(std::string const &name) const {
  auto it = impl_->datasets.find(name);
  if (it == impl_->datasets.end()) throw InputError(impl_->path, "dataset '" + name + "' is missing.");
  return it->second.shape;
}

void CheckpointReader::read(std::string const &name, Shape const &global_shape, Shape const &offset,
                            Shape const &count, float *out) {
  read_any(name, global_shape, offset, count, ElementType::Float32, out);
}
void CheckpointReader::read(std::string const &name, Shape const &global_shape, Shape const &offset,
                            Shape const &count, double *out) {
  read_any(name, global_shape, offset, count, ElementType::Float64, out);
}
void CheckpointReader::read(std::string const &name, Shape const &global_shape, Shape const &offset,
                            Shape const &count, std::int64_t *out) {
  read_any(name, global_shape, offset, count, ElementType::Int64, out);
}

void CheckpointReader::read_any(std::string const &name, Shape const &global_shape, Shape const &offset,
                                Shape const &count, ElementType type, void *out) {
  MPI_Comm const comm = impl_->comm;
  int const rank = comm_rank(comm);
  std::string const &where = impl_->path;
  collectively(comm, where, [&] {
    auto it = impl_->datasets.find(name);
    if (it == impl_->datasets.end()) {
      std::string have;
      int listed = 0;
      for (auto const &kv : impl_->datasets) {
        if (listed++ == 8) {
          have += ", ...";
          break;
        }
        have += (have.empty() ? "" : ", ") + kv.first;
      }
      throw InputError(where, "dataset '" + name + "' is missing (the checkpoint holds " +
                                  std::to_string(impl_->datasets.size()) + " datasets: " + have + ").");
    }
    if (it->second.shape != global_shape) {
      throw InputError(where, "dataset '" + name + "' has shape " + shape_string(it->second.shape) +
                                  ", the model expects " + shape_string(global_shape) + ".");
    }
    bool const want_float = type != ElementType::Int64;
    if (it->second.is_float != want_float) {
      throw InputError(where, "dataset '" + name + "' holds " + (it->second.is_float ? "floating-point" : "integer") +
                                  " values, but is read as " + type_name(type) + ".");
    }
    TensorSlice s;
    s.name = name;
    s.global_shape = global_shape;
    s.offset = offset;
    s.count = count;
    s.data = out;
    check_slice(where, s, rank);
  });

  QuietHdf5 quiet;
  Handle dset(H5Dopen2(impl_->file.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
  bool ok = dset.valid();
  if (ok) {
    Handle fspace(H5Dget_space(dset.get()), H5Sclose);
    std::vector<hsize_t> const off = to_hsize(offset), cnt = to_hsize(count);
    bool const mine = volume(count) > 0;
    Handle mspace;
    if (mine) {
      H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, off.data(), nullptr, cnt.data(), nullptr);
      mspace = Handle(H5Screate_simple(static_cast<int>(cnt.size()), cnt.data(), nullptr), H5Sclose);
    } else {
      H5Sselect_none(fspace.get());
      hsize_t const one = 1;
      mspace = Handle(H5Screate_simple(1, &one, nullptr), H5Sclose);
      H5Sselect_none(mspace.get());
    }
    Handle dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
    H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE);
    double dummy = 0.0;
    ok = H5Dread(dset.get(), memory_type(type), mspace.get(), fspace.get(), dxpl.get(), mine ? out : &dummy) >= 0;
  }
  agree(comm, !ok, where, "dataset '" + name + "' cannot be read: the file is truncated or corrupted.");
}

// ------------------------------------------------------------ activations
void write_activations(MPI_Comm comm, std::string const &file, std::string const &group,
                       std::vector<TensorSlice> const &tensors) {
  int const rank = comm_rank(comm);
  std::string const g = group.empty() ? std::string() : group + "/";
  check_slices_collectively(comm, file, tensors);
  int exists = 0;
  collectively(comm, file, [&] {
    if (rank != 0) return;
    if (group.empty() || group.front() == '/' || group.back() == '/') {
      throw InputError(file, "activation group '" + group + "' must be non-empty and not start or end with '/'.");
    }
    fs::path const parent = fs::path(file).parent_path();
    if (!parent.empty()) fs::create_directories(parent);
    exists = fs::exists(file) ? 1 : 0;
  });
  MPI_Bcast(&exists, 1, MPI_INT, 0, comm);

  QuietHdf5 quiet;
  Handle fapl = mpio_fapl(comm);
  Handle f = exists ? Handle(H5Fopen(file.c_str(), H5F_ACC_RDWR, fapl.get()), H5Fclose)
                    : Handle(H5Fcreate(file.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), H5Fclose);
  agree(comm, !f.valid(), file,
        exists ? "cannot be opened for appending activations (not HDF5, corrupted, or read-only)."
               : "cannot be created (is the directory writable?).");
  bool ok = true;
  std::string failed_name;
  for (auto const &t : tensors) {
    TensorSlice full = t;
    full.name = g + t.name;
    bool this_ok = !link_exists(f.get(), full.name) || H5Ldelete(f.get(), full.name.c_str(), H5P_DEFAULT) >= 0;
    this_ok = write_dataset(f.get(), full, rank) && this_ok;  // called on every rank: collective
    if (!this_ok && ok) {
      ok = false;
      failed_name = full.name;
    }
  }
  bool const closed = f.reset();
  agree(comm, !ok || !closed, file,
        ok ? std::string("cannot be closed (disk full?).")
           : "dataset '" + failed_name + "' cannot be written (disk full or file system error?).");
}

}  // namespace hexamoe
