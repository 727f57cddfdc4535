// tstCheckpoint.cpp: parallel HDF5 checkpoints and activation files, run at
// 1, 2 and 3 ranks. Values are a closed-form function of the global index, so
// every block read back is compared exactly against an independent reference,
// whatever split wrote it and whatever split (and number of ranks) reads it.
#include "io/Checkpoint.hpp"
#include "io/InputError.hpp"

#include <gtest/gtest.h>
#include <hdf5.h>
#include <mpi.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using hexamoe::InputError;
using hexamoe::Shape;
using hexamoe::TensorSlice;

#define EXPECT_CONTAINS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// A directory shared by all ranks (made by rank 0), removed afterwards.
struct SharedDir {
  fs::path path;
  SharedDir() {
    std::string name;
    if (world_rank() == 0) {
      std::string pattern = (fs::temp_directory_path() / "hexamoe-ckpt-XXXXXX").string();
      char *made = mkdtemp(pattern.data());
      name = made ? made : "";
    }
    int n = static_cast<int>(name.size());
    MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
    name.resize(static_cast<std::size_t>(n));
    MPI_Bcast(name.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (name.empty()) throw std::runtime_error("mkdtemp failed");
    path = name;
  }
  ~SharedDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  }
  std::string operator/(std::string const &name) const { return (path / name).string(); }
};

template <class F>
InputError error_of(F &&f) {
  try {
    f();
  } catch (InputError const &e) {
    return e;
  }
  ADD_FAILURE() << "no InputError was thrown on rank " << world_rank();
  return InputError("", "");
}

// [begin, end) of part `index` of n split into `parts` uneven parts with
// weights w(i): boundaries at floor(n * W(i) / W(parts)).
std::pair<std::size_t, std::size_t> uneven(std::size_t n, int parts, int index, bool reversed) {
  auto weight = [&](int i) { return reversed ? std::size_t(parts - i) : std::size_t(i + 1); };
  std::size_t total = 0, before = 0;
  for (int i = 0; i < parts; ++i) {
    total += weight(i);
    if (i < index) before += weight(i);
  }
  return {n * before / total, n * (before + weight(index)) / total};
}

// The reference values: a function of the tensor and the global flat index.
float fvalue(int tensor, std::size_t i, int step = 0) { return float(i % 65536) * 0.25f + float(tensor) + float(step); }
double dvalue(std::size_t i) { return double(i) * 1e-3 + 1.0 / 3.0; }
std::int64_t ivalue(std::size_t i) { return std::int64_t(i) * 1000000000000LL - 7; }

// Global flat index of the element at local position `local` of a block.
std::size_t global_index(Shape const &shape, Shape const &offset, Shape const &count, std::size_t local) {
  std::size_t g = 0;
  for (std::size_t d = count.size(); d-- > 0;) {
    std::size_t const idx = local % count[d] + offset[d];
    local /= count[d];
    std::size_t stride = 1;
    for (std::size_t e = d + 1; e < shape.size(); ++e) stride *= shape[e];
    g += idx * stride;
  }
  return g;
}

std::size_t volume(Shape const &s) {
  std::size_t v = 1;
  for (auto d : s) v *= d;
  return v;
}

// A block of `shape` split along `dim` into uneven parts.
struct Block {
  Shape offset, count;
};
Block block_along(Shape const &shape, std::size_t dim, int parts, int index, bool reversed) {
  Block b{Shape(shape.size(), 0), shape};
  auto [lo, hi] = uneven(shape[dim], parts, index, reversed);
  b.offset[dim] = lo;
  b.count[dim] = hi - lo;
  return b;
}

template <class T, class F>
std::vector<T> fill_block(Shape const &shape, Block const &b, F value) {
  std::vector<T> v(volume(b.count));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = value(global_index(shape, b.offset, b.count, i));
  return v;
}

// The model of the tests: W1 [E,d,H] (expert weights), its Adam moment in
// float64, a replicated embedding, and int64 counters, split along dim 1.
Shape const w1_shape{4, 10, 6};
Shape const b1_shape{4, 10};
Shape const emb_shape{7, 5};
Shape const cnt_shape{3, 10};

struct ModelData {
  std::vector<float> w1, b1, emb;
  std::vector<double> m1;
  std::vector<std::int64_t> cnt;
  std::vector<TensorSlice> slices;
};

ModelData make_model(int parts, int index, bool reversed, int step) {
  ModelData m;
  Block const bw = block_along(w1_shape, 1, parts, index, reversed);
  Block const bb = block_along(b1_shape, 1, parts, index, reversed);
  Block const bc = block_along(cnt_shape, 1, parts, index, reversed);
  m.w1 = fill_block<float>(w1_shape, bw, [&](std::size_t i) { return fvalue(0, i, step); });
  m.b1 = fill_block<float>(b1_shape, bb, [&](std::size_t i) { return fvalue(1, i, step); });
  m.emb = fill_block<float>(emb_shape, Block{Shape{0, 0}, emb_shape}, [&](std::size_t i) { return fvalue(2, i, step); });
  m.m1 = fill_block<double>(w1_shape, bw, dvalue);
  m.cnt = fill_block<std::int64_t>(cnt_shape, bc, ivalue);
  m.slices = {TensorSlice::block("moe1.w1", w1_shape, bw.offset, bw.count, m.w1.data()),
              TensorSlice::block("moe1.b1", b1_shape, bb.offset, bb.count, m.b1.data()),
              TensorSlice::block("opt/adam_m/moe1.w1", w1_shape, bw.offset, bw.count, m.m1.data()),
              TensorSlice::whole("embed.weight", emb_shape, m.emb.data()),
              TensorSlice::block("router.counts", cnt_shape, bc.offset, bc.count, m.cnt.data())};
  return m;
}

std::string write_model(std::string const &dir, std::int64_t step, int keep,
                        hexamoe::Attributes const &attrs = {}) {
  ModelData m = make_model(world_size(), world_rank(), false, static_cast<int>(step));
  return hexamoe::write_checkpoint(MPI_COMM_WORLD, dir, step, "moe-test-v1", m.slices, attrs, keep);
}

// Reads every tensor with `parts` uneven parts along `dim` (part `index` on
// this rank of comm) and compares with the reference values.
void check_model(hexamoe::CheckpointReader &r, int parts, int index, std::size_t dim, bool reversed, int step) {
  Block const bw = block_along(w1_shape, dim, parts, index, reversed);
  std::vector<float> w1(volume(bw.count), -1.0f);
  r.read("moe1.w1", w1_shape, bw.offset, bw.count, w1.data());
  EXPECT_EQ(w1, fill_block<float>(w1_shape, bw, [&](std::size_t i) { return fvalue(0, i, step); }));
  std::vector<double> m1(volume(bw.count), -1.0);
  r.read("opt/adam_m/moe1.w1", w1_shape, bw.offset, bw.count, m1.data());
  EXPECT_EQ(m1, fill_block<double>(w1_shape, bw, dvalue));
  Block const bb = block_along(b1_shape, dim == 2 ? 1 : dim, parts, index, reversed);
  std::vector<float> b1(volume(bb.count), -1.0f);
  r.read("moe1.b1", b1_shape, bb.offset, bb.count, b1.data());
  EXPECT_EQ(b1, fill_block<float>(b1_shape, bb, [&](std::size_t i) { return fvalue(1, i, step); }));
  std::vector<float> emb(volume(emb_shape));
  r.read_whole("embed.weight", emb_shape, emb.data());
  EXPECT_EQ(emb, fill_block<float>(emb_shape, Block{Shape{0, 0}, emb_shape}, [&](std::size_t i) {
              return fvalue(2, i, step);
            }));
  Block const bc = block_along(cnt_shape, 1, parts, index, reversed);
  std::vector<std::int64_t> cnt(volume(bc.count));
  r.read("router.counts", cnt_shape, bc.offset, bc.count, cnt.data());
  EXPECT_EQ(cnt, fill_block<std::int64_t>(cnt_shape, bc, ivalue));
}

// ------------------------------------------------------------------ tests
TEST(Checkpoint, WrittenByNReadByM) {
  SharedDir dir;
  hexamoe::Attributes attrs;
  attrs.strings["deck"] = std::string(200000, 'x') + "\n[moe]\nexperts = 4\n";  // larger than 64 KiB
  attrs.strings["empty"] = "";
  attrs.ints["epoch"] = 3;
  attrs.ints["negative"] = -5;
  attrs.doubles["lr"] = 3e-4;
  attrs.words["rng"] = {0, 1, 0xFFFFFFFFFFFFFFFFull, 0xDEADBEEFCAFEF00Dull};
  attrs.words["none"] = {};
  std::string const path = write_model(dir.path.string(), 100, 0, attrs);
  EXPECT_EQ(path, dir / "ckpt-100.h5");

  hexamoe::CheckpointReader r(MPI_COMM_WORLD, path, "moe-test-v1");
  EXPECT_EQ(r.step(), 100);
  EXPECT_EQ(r.model_signature(), "moe-test-v1");
  EXPECT_TRUE(r.attributes() == attrs);
  EXPECT_EQ(r.string_attr("deck"), attrs.strings["deck"]);
  EXPECT_EQ(r.int_attr("negative"), -5);
  EXPECT_EQ(r.double_attr("lr"), 3e-4);
  EXPECT_EQ(r.words_attr("rng"), attrs.words["rng"]);
  EXPECT_CONTAINS(error_of([&] { r.int_attr("nope"); }).what(), "has no integer attribute 'nope'");
  EXPECT_EQ(r.datasets(),
            (std::vector<std::string>{"embed.weight", "moe1.b1", "moe1.w1", "opt/adam_m/moe1.w1", "router.counts"}));
  EXPECT_EQ(r.shape("moe1.w1"), w1_shape);
  EXPECT_FALSE(r.has_dataset("moe1.w2"));

  // The same ranks with a different split, and along another dimension.
  check_model(r, world_size(), world_rank(), 1, true, 100);
  check_model(r, world_size(), world_rank(), 0, false, 100);
  check_model(r, world_size(), world_rank(), 2, true, 100);

  // m ranks for every m < n: the world splits into a group of m and the rest;
  // both groups read with their own uneven splits.
  for (int m = 1; m < world_size(); ++m) {
    MPI_Comm sub;
    MPI_Comm_split(MPI_COMM_WORLD, world_rank() < m ? 0 : 1, world_rank(), &sub);
    int sub_rank = 0, sub_size = 0;
    MPI_Comm_rank(sub, &sub_rank);
    MPI_Comm_size(sub, &sub_size);
    {
      hexamoe::CheckpointReader rs(sub, dir.path.string());  // the directory: its latest checkpoint
      EXPECT_EQ(rs.step(), 100);
      check_model(rs, sub_size, sub_rank, 1, sub_rank % 2 == 0, 100);
    }
    MPI_Comm_free(&sub);
  }
  // Each rank alone, reading everything.
  hexamoe::CheckpointReader self(MPI_COMM_SELF, path);
  check_model(self, 1, 0, 1, false, 100);
}

TEST(Checkpoint, KeepAndLatest) {
  SharedDir dir;
  std::string const d = dir.path.string();
  for (int step : {10, 20, 30, 40}) write_model(d, step, 2);
  auto listing = [&] {
    std::vector<std::string> names;
    for (auto const &e : fs::directory_iterator(dir.path)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  };
  EXPECT_EQ(listing(), (std::vector<std::string>{"ckpt-30.h5", "ckpt-40.h5", "latest"}));
  std::ifstream latest(dir / "latest");
  std::string line;
  std::getline(latest, line);
  EXPECT_EQ(line, "ckpt-40.h5");
  EXPECT_EQ(hexamoe::find_latest_checkpoint(d), dir / "ckpt-40.h5");
  {
    hexamoe::CheckpointReader r(MPI_COMM_WORLD, d);
    EXPECT_EQ(r.step(), 40);
    EXPECT_EQ(r.path(), dir / "ckpt-40.h5");
    check_model(r, world_size(), world_rank(), 1, true, 40);
  }
  // A run restarted from an earlier step: the new checkpoint is always kept and
  // becomes `latest`, even though a higher step exists.
  write_model(d, 15, 2);
  EXPECT_EQ(listing(), (std::vector<std::string>{"ckpt-15.h5", "ckpt-40.h5", "latest"}));
  EXPECT_EQ(hexamoe::find_latest_checkpoint(d), dir / "ckpt-15.h5");
  // keep <= 0 keeps everything.
  write_model(d, 50, 0);
  write_model(d, 60, 0);
  EXPECT_EQ(listing().size(), 5u);
  // Without `latest`, the highest step.
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove(dir / "latest");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(hexamoe::find_latest_checkpoint(d), dir / "ckpt-60.h5");
}

TEST(Checkpoint, InterruptedSaveKeepsTheLastGoodOne) {
  SharedDir dir;
  std::string const d = dir.path.string();
  write_model(d, 10, 3);
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) {  // a save of step 20 that died half-way
    fs::copy_file(dir / "ckpt-10.h5", dir / "ckpt-20.h5.tmp");
    fs::resize_file(dir / "ckpt-20.h5.tmp", fs::file_size(dir / "ckpt-20.h5.tmp") / 2);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(hexamoe::find_latest_checkpoint(d), dir / "ckpt-10.h5");
  {
    hexamoe::CheckpointReader r(MPI_COMM_WORLD, d);
    EXPECT_EQ(r.step(), 10);
    check_model(r, world_size(), world_rank(), 1, false, 10);
  }

  // A save that fails (the last rank's block is out of range) throws on every
  // rank and changes nothing.
  {
    ModelData m = make_model(world_size(), world_rank(), false, 30);
    if (world_rank() == world_size() - 1) m.slices[0].offset[1] = 9;
    InputError e = error_of([&] {
      hexamoe::write_checkpoint(MPI_COMM_WORLD, d, 30, "moe-test-v1", m.slices, {}, 1);
    });
    EXPECT_EQ(e.where(), dir / "ckpt-30.h5");
    EXPECT_CONTAINS(e.what(), "rank " + std::to_string(world_size() - 1) + "'s block of dataset 'moe1.w1'");
    EXPECT_CONTAINS(e.what(), "lies outside its global shape [4,10,6]");
  }
  EXPECT_FALSE(fs::exists(dir / "ckpt-30.h5"));
  EXPECT_EQ(hexamoe::find_latest_checkpoint(d), dir / "ckpt-10.h5");

  // Without `latest` the .tmp is ignored as well.
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::rename(dir / "latest", dir / "latest.saved");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(hexamoe::find_latest_checkpoint(d), dir / "ckpt-10.h5");
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::rename(dir / "latest.saved", dir / "latest");
  MPI_Barrier(MPI_COMM_WORLD);

  // The next good save replaces the leftover and keeps step 10.
  write_model(d, 20, 3);
  EXPECT_FALSE(fs::exists(dir / "ckpt-20.h5.tmp"));
  EXPECT_TRUE(fs::exists(dir / "ckpt-10.h5"));
  {
    hexamoe::CheckpointReader r(MPI_COMM_WORLD, d);
    EXPECT_EQ(r.step(), 20);
    check_model(r, world_size(), world_rank(), 1, true, 20);
  }

  // A `latest` that names a missing file is refused clearly.
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::ofstream(dir / "latest") << "ckpt-99.h5\n";
  MPI_Barrier(MPI_COMM_WORLD);
  InputError e = error_of([&] { hexamoe::CheckpointReader r(MPI_COMM_WORLD, d); });
  EXPECT_EQ(e.where(), dir / "latest");
  EXPECT_CONTAINS(e.what(), "names 'ckpt-99.h5', which does not exist");
}

TEST(Checkpoint, CorruptedFilesAreRefused) {
  SharedDir dir;
  std::string const good = write_model(dir.path.string(), 5, 0);
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) {
    fs::copy_file(good, dir / "truncated.h5");
    fs::resize_file(dir / "truncated.h5", fs::file_size(good) / 2);
    std::vector<char> junk(fs::file_size(good));
    for (std::size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<char>((i * 2654435761u) >> 13);
    std::ofstream(dir / "garbage.h5", std::ios::binary).write(junk.data(), std::streamsize(junk.size()));
    fs::copy_file(good, dir / "header.h5");
    {
      std::fstream f(dir / "header.h5", std::ios::in | std::ios::out | std::ios::binary);
      f.write(junk.data(), 512);
    }
    hid_t f = H5Fcreate((dir / "plain.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
    fs::create_directory(dir / "empty");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  for (std::string const name : {"truncated.h5", "garbage.h5", "header.h5"}) {
    InputError e = error_of([&] { hexamoe::CheckpointReader r(MPI_COMM_WORLD, dir / name); });
    EXPECT_EQ(e.where(), dir / name);
    EXPECT_CONTAINS(e.what(), "cannot be opened as an HDF5 file: it is truncated, corrupted or not HDF5");
  }
  InputError e = error_of([&] { hexamoe::CheckpointReader r(MPI_COMM_WORLD, dir / "plain.h5"); });
  EXPECT_CONTAINS(e.what(), "is not a hexamoe checkpoint");
  e = error_of([&] { hexamoe::CheckpointReader r(MPI_COMM_WORLD, dir / "nothere.h5"); });
  EXPECT_EQ(e.where(), dir / "nothere.h5");
  EXPECT_CONTAINS(e.what(), "checkpoint file not found");
  e = error_of([&] { hexamoe::CheckpointReader r(MPI_COMM_WORLD, dir / "empty"); });
  EXPECT_CONTAINS(e.what(), "holds no checkpoint");
  // The good file still opens after all that.
  hexamoe::CheckpointReader r(MPI_COMM_WORLD, good);
  EXPECT_EQ(r.step(), 5);
}

TEST(Checkpoint, ValidationMessages) {
  SharedDir dir;
  Shape const big{8, 384, 1536};
  Block const b = block_along(big, 1, world_size(), world_rank(), false);
  std::vector<float> w(volume(b.count), 0.5f);
  std::string const path = hexamoe::write_checkpoint(
      MPI_COMM_WORLD, dir.path.string(), 7, "sigA", {TensorSlice::block("moe1.w1", big, b.offset, b.count, w.data())}, {}, 1);

  hexamoe::CheckpointReader r(MPI_COMM_WORLD, path, "sigA");
  std::vector<float> out(volume(b.count));
  InputError e = error_of([&] { r.read("moe1.w1", {4, 384, 1536}, b.offset, b.count, out.data()); });
  EXPECT_EQ(e.where(), path);
  EXPECT_EQ(std::string(e.what()),
            path + ": dataset 'moe1.w1' has shape [8,384,1536], the model expects [4,384,1536].");
  e = error_of([&] { r.read("moe9.w1", big, b.offset, b.count, out.data()); });
  EXPECT_CONTAINS(e.what(), "dataset 'moe9.w1' is missing (the checkpoint holds 1 datasets: moe1.w1)");
  std::vector<std::int64_t> as_int(volume(b.count));
  e = error_of([&] { r.read("moe1.w1", big, b.offset, b.count, as_int.data()); });
  EXPECT_CONTAINS(e.what(), "holds floating-point values, but is read as int64");
  // Only the last rank asks for a block outside the tensor: every rank throws.
  Shape off = b.offset;
  if (world_rank() == world_size() - 1) off[0] = 5;
  e = error_of([&] { r.read("moe1.w1", big, off, b.count, out.data()); });
  EXPECT_CONTAINS(e.what(), "rank " + std::to_string(world_size() - 1) + "'s block of dataset 'moe1.w1'");
  // And the reader still works afterwards.
  r.read("moe1.w1", big, b.offset, b.count, out.data());
  EXPECT_EQ(out, w);

  e = error_of([&] { hexamoe::CheckpointReader other(MPI_COMM_WORLD, path, "sigB"); });
  EXPECT_EQ(std::string(e.what()),
            path + ": was written for model signature 'sigA', but this model's signature is 'sigB'.");

  // Writes: blocks that do not cover the tensor, reserved attribute names,
  // and (with several ranks) ranks that disagree on the tensor list.
  std::vector<float> small(6, 1.0f);
  Shape const half = world_rank() == 0 ? Shape{1, 3} : Shape{0, 3};  // row 1 is nobody's
  e = error_of([&] {
    hexamoe::write_checkpoint(MPI_COMM_WORLD, dir.path.string(), 8, "sigA",
                              {TensorSlice::block("x", {2, 3}, {0, 0}, half, small.data())}, {}, 1);
  });
  EXPECT_CONTAINS(e.what(), "blocks must cover it exactly once");
  hexamoe::Attributes reserved;
  reserved.ints["step"] = 1;
  e = error_of([&] {
    hexamoe::write_checkpoint(MPI_COMM_WORLD, dir.path.string(), 8, "sigA",
                              {TensorSlice::whole("x", {2, 3}, small.data())}, reserved, 1);
  });
  EXPECT_CONTAINS(e.what(), "attribute name 'step' is reserved");
  if (world_size() > 1) {
    std::string const name = world_rank() == 0 ? "x" : "y";
    e = error_of([&] {
      hexamoe::write_checkpoint(MPI_COMM_WORLD, dir.path.string(), 8, "sigA",
                                {TensorSlice::whole(name, {2, 3}, small.data())}, {}, 1);
    });
    EXPECT_CONTAINS(e.what(), "the ranks pass different tensor lists");
  }
  EXPECT_EQ(hexamoe::find_latest_checkpoint(dir.path.string()), path);
}

// Reads a whole dataset of an activations file with the plain (serial) HDF5 API.
std::vector<float> h5_read(std::string const &file, std::string const &name, Shape &shape) {
  std::vector<float> v;
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(f, 0);
  if (f < 0) return v;
  hid_t d = H5Dopen2(f, name.c_str(), H5P_DEFAULT);
  EXPECT_GE(d, 0) << name;
  if (d >= 0) {
    hid_t s = H5Dget_space(d);
    int const rank = H5Sget_simple_extent_ndims(s);
    std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
    H5Sget_simple_extent_dims(s, dims.data(), nullptr);
    shape.assign(dims.begin(), dims.end());
    v.resize(volume(shape));
    EXPECT_GE(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
    H5Sclose(s);
    H5Dclose(d);
  }
  H5Fclose(f);
  return v;
}

TEST(Activations, AppendAndReadBack) {
  SharedDir dir;
  std::string const file = dir / "acts/activations.h5";  // the directory is created
  // Tokens split across ranks along dim 0.
  auto write = [&](std::string const &group, Shape const &shape, int tag) {
    Block const b = block_along(shape, 0, world_size(), world_rank(), true);
    std::vector<float> h = fill_block<float>(shape, b, [&](std::size_t i) { return fvalue(tag, i); });
    std::vector<float> p = fill_block<float>(Shape{shape[0], 4}, Block{b.offset, Shape{b.count[0], 4}},
                                             [&](std::size_t i) { return fvalue(tag + 100, i); });
    hexamoe::write_activations(MPI_COMM_WORLD, file, group,
                               {TensorSlice::block("hidden", shape, b.offset, b.count, h.data()),
                                TensorSlice::block("router_probs", Shape{shape[0], 4}, b.offset,
                                                   Shape{b.count[0], 4}, p.data())});
  };
  write("step_3/layer_1", {11, 6}, 1);
  write("step_3/layer_2", {11, 6}, 2);
  write("step_5/layer_1", {11, 6}, 3);
  write("step_3/layer_1", {9, 6}, 4);  // a restarted run rewrites step 3
  MPI_Barrier(MPI_COMM_WORLD);

  auto expect = [&](std::string const &name, Shape const &shape, int tag) {
    Shape got;
    std::vector<float> v = h5_read(file, name, got);
    EXPECT_EQ(got, shape) << name;
    EXPECT_EQ(v, fill_block<float>(shape, Block{Shape(shape.size(), 0), shape},
                                   [&](std::size_t i) { return fvalue(tag, i); }))
        << name;
  };
  expect("step_3/layer_1/hidden", {9, 6}, 4);
  expect("step_3/layer_1/router_probs", {9, 4}, 104);
  expect("step_3/layer_2/hidden", {11, 6}, 2);
  expect("step_5/layer_1/hidden", {11, 6}, 3);
  expect("step_5/layer_1/router_probs", {11, 4}, 103);
  MPI_Barrier(MPI_COMM_WORLD);

  InputError e = error_of([&] { hexamoe::write_activations(MPI_COMM_WORLD, file, "/abs", {}); });
  EXPECT_CONTAINS(e.what(), "activation group '/abs' must be non-empty");
}

}  // namespace
