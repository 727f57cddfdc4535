// PipelineSharedCache.hpp: the pipeline-shared cache of the data-centric mode
// (DESIGN.md section 3). Each rank keeps only its hidden slice of every
// expert of every data-centric layer; before a layer runs, the full weights
// (W1, b1, W2) are gathered from the slices of all ranks of the MoE group into
// one of two slots. The slots are sized for the largest registered layer and
// shared by all layers, so the weight memory per rank is 1/n of the experts
// plus two slots, whatever the number of layers.
//
// Pipelining: when layer l acquires its weights (waiting for them if needed),
// the gather of the layer that runs next (l+1 in forward, l-1 in backward) is
// issued into the other slot as a non-blocking collective, so it travels
// while layer l (and the dense blocks between MoE layers) compute. The last
// layer of the forward is still cached when the backward starts.
//
// The gather is an all-gather with variable counts along H. A rank's slice is
// strided inside the full [E, d, H] W1 (H_i columns of every row), so the
// receive side is described by one MPI datatype per peer (W1, b1 and W2
// blocks of that peer's hidden range) and the collective is MPI_Ialltoallw
// sending the same contiguous slice to every peer: an all-gatherv whose
// receive layout differs per peer, written straight into the slot with no
// unpacking copy.
//
// Gradients: a layer's backward writes the full weight gradient into the
// shared gradient buffer; it is packed rank-blocked (a kernel) into the shared
// reduce buffer and reduce-scattered to the slices with MPI_Ireduce_scatter
// (variable counts E*(2d+1)*H_i), never all-reduced. The reduction of layer l
// travels while layer l-1 computes; the first layer (last in backward)
// completes them all. With several MoE groups the slice gradients are then
// summed over the replicas of the slice.
//
// Layers register in forward order. A forward of the first layer starts a new
// pass: the slots are invalidated (the optimizer changed the slices).
//
// With overlap = false (the deck's parallel.overlap) nothing is issued ahead:
// each layer's gather starts when the layer acquires its weights, and each
// gradient reduction is waited for as soon as it is issued. The step time
// against overlap = true measures what the pipelining hides. Traffic and
// blocked time go to comm_stats() (parallel/CommStats.hpp).
#pragma once

#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/Parameter.hpp"
#include "parallel/CommStats.hpp"
#include "parallel/ExpertSlice.hpp"
#include "parallel/MoeGroup.hpp"
#include "parallel/MpiView.hpp"

namespace hexamoe::parallel {

enum class Pass { forward, backward };

template <class MemorySpace>
class PipelineSharedCache {
 public:
  using memory_space = MemorySpace;
  using flat_view = Kokkos::View<float *, memory_space>;

  // A layer's expert tensors over a slot (full hidden width H).
  struct Experts {
    Tensor3<float, memory_space> w1;  // [E, d, H]
    Matrix<float, memory_space> b1;   // [E, H]
    Tensor3<float, memory_space> w2;  // [E, H, d]
  };

  explicit PipelineSharedCache(std::shared_ptr<MoeGroup const> group, bool overlap = true)
      : group_(std::move(group)), overlap_(overlap) {}
  ~PipelineSharedCache() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto &s : slots_)
      if (s.pending) MPI_Wait(&s.request, MPI_STATUS_IGNORE);
    if (reduce_pending_ >= 0) MPI_Wait(&reduce_request_, MPI_STATUS_IGNORE);
    for (auto &l : layers_)
      for (auto &t : l.recv_types)
        if (t != MPI_FLOAT) MPI_Type_free(&t);
  }
  PipelineSharedCache(PipelineSharedCache const &) = delete;
  PipelineSharedCache &operator=(PipelineSharedCache const &) = delete;

  MoeGroup const &group() const { return *group_; }
  bool overlap() const { return overlap_; }

  // Floats of a rank's slice: [W1 (E, d, H_i) | b1 (E, H_i) | W2 (E, H_i, d)].
  static std::size_t slice_size(int E, int d, int h) {
    return std::size_t(E) * (2 * std::size_t(d) + 1) * std::size_t(h);
  }

  // Register a layer (in forward order) whose slices live in values/grads
  // (each slice_size(E, d, H_i) floats, contiguous). Returns its id.
  int add_layer(int E, int d, ExpertSlice const &slice, flat_view values, flat_view grads) {
    if (slots_[0].buf.data()) throw std::logic_error("PipelineSharedCache: layers must be added before the first use");
    int const n = group_->size(), me = group_->rank(), H = slice.hidden;
    if (slice.ranks() != n) throw std::invalid_argument("PipelineSharedCache: the slice is for another group size");
    if (values.extent(0) != slice_size(E, d, slice.count(me)) || grads.extent(0) != values.extent(0))
      throw std::invalid_argument("PipelineSharedCache: the slice buffers have the wrong size");
    Layer L;
    L.E = E;
    L.d = d;
    L.H = H;
    L.slice = slice;
    L.values = values;
    L.grads = grads;
    L.values_host = host_mirror(values);
    L.grads_host = host_mirror(grads);
    int const mine = static_cast<int>(values.extent(0));
    // Receive types: peer r's W1 columns, b1 columns and W2 rows, at their
    // places in the slot [W1 (E, d, H) | b1 (E, H) | W2 (E, H, d)].
    for (int r = 0; r < n; ++r) {
      int const hr = slice.count(r), h0 = slice.offset(r);
      L.send_counts.push_back(mine);
      L.send_types.push_back(MPI_FLOAT);
      L.displs.push_back(0);
      L.reduce_counts.push_back(static_cast<int>(slice_size(E, d, hr)));
      if (hr == 0) {
        L.recv_counts.push_back(0);
        L.recv_types.push_back(MPI_FLOAT);
        continue;
      }
      MPI_Datatype parts[3];
      MPI_Type_vector(E * d, hr, H, MPI_FLOAT, &parts[0]);
      MPI_Type_vector(E, hr, H, MPI_FLOAT, &parts[1]);
      MPI_Type_vector(E, hr * d, H * d, MPI_FLOAT, &parts[2]);
      int lens[3] = {1, 1, 1};
      MPI_Aint const f = sizeof(float);
      MPI_Aint disp[3] = {f * h0, f * (MPI_Aint(E) * d * H + h0),
                          f * (MPI_Aint(E) * d * H + MPI_Aint(E) * H + MPI_Aint(h0) * d)};
      MPI_Datatype t;
      MPI_Type_create_struct(3, lens, disp, parts, &t);
      MPI_Type_commit(&t);
      for (auto &p : parts) MPI_Type_free(&p);
      L.recv_counts.push_back(1);
      L.recv_types.push_back(t);
    }
    // Pack tables: owner rank of each hidden unit, and each rank's offset in
    // the rank-blocked reduce buffer.
    auto owner = Kokkos::View<int *, Kokkos::HostSpace>("owner", std::size_t(H));
    auto base = Kokkos::View<std::int64_t *, Kokkos::HostSpace>("base", std::size_t(n));
    auto off = Kokkos::View<int *, Kokkos::HostSpace>("off", std::size_t(n));
    auto cnt = Kokkos::View<int *, Kokkos::HostSpace>("cnt", std::size_t(n));
    std::int64_t b = 0;
    for (int r = 0; r < n; ++r) {
      for (int h = slice.offset(r); h < slice.offset(r) + slice.count(r); ++h) owner(h) = r;
      base(r) = b;
      off(r) = slice.offset(r);
      cnt(r) = slice.count(r);
      b += static_cast<std::int64_t>(slice_size(E, d, slice.count(r)));
    }
    L.owner = Kokkos::create_mirror_view_and_copy(memory_space(), owner);
    L.base = Kokkos::create_mirror_view_and_copy(memory_space(), base);
    L.off = Kokkos::create_mirror_view_and_copy(memory_space(), off);
    L.cnt = Kokkos::create_mirror_view_and_copy(memory_space(), cnt);
    layers_.push_back(std::move(L));
    return static_cast<int>(layers_.size()) - 1;
  }

  int num_layers() const { return static_cast<int>(layers_.size()); }
  // Floats of one slot / of all four shared buffers (2 weight slots, the
  // gradient buffer, the reduce buffer); 0 before the first use.
  std::size_t slot_floats() const { return slot_floats_; }

  // The full weights of layer id, ready to read; issues the next layer's gather.
  Experts acquire(int id, Pass pass) {
    check_id(id);
    allocate();
    if (pass == Pass::forward && id == 0) invalidate();
    int s = holding(id);
    if (s < 0) {
      s = victim();
      start_gather(s, id);
    }
    complete_gather(s);
    slots_[s].used = ++clock_;
    int const next = pass == Pass::forward ? id + 1 : id - 1;
    if (overlap_ && next >= 0 && next < num_layers() && holding(next) < 0) {
      int const o = 1 - s;
      complete_gather(o);
      start_gather(o, next);
    }
    return experts(slots_[s].buf, layers_[id]);
  }

  // The shared buffer layer id's backward writes its full weight gradient into.
  Experts gradient_buffer(int id) {
    check_id(id);
    allocate();
    return experts(grad_, layers_[id]);
  }

  // Start reducing layer id's full gradient (in the gradient buffer) to the
  // slices; completes the previous reduction first. Kernels writing the
  // gradient buffer must have been issued on `space`.
  template <class ExecutionSpace>
  void reduce_gradients(ExecutionSpace const &space, int id) {
    check_id(id);
    finish_reduction();
    Layer &L = layers_[id];
    pack(space, L);
    space.fence();
    {
      auto &c = comm_stats()[CommKind::gradient_reduce];
      CommTimer timer(c.issue_seconds);
      to_host(reduce_host_, reduce_);
      MPI_Ireduce_scatter(reduce_host_.data(), L.grads_host.data(), L.reduce_counts.data(), MPI_FLOAT, MPI_SUM,
                          group_->comm(), &reduce_request_);
      double const all = double(layer_floats(L)) * sizeof(float), mine = double(L.grads_host.extent(0)) * sizeof(float);
      c.calls += 1;
      c.bytes_sent += all - mine;
      c.bytes_received += mine * (group_->size() - 1);
    }
    reduce_pending_ = id;
    if (!overlap_) finish_reduction();
  }

  // Wait for the pending gradient reduction (slice gradients final after this).
  void finish_reduction() {
    if (reduce_pending_ < 0) return;
    Layer &L = layers_[reduce_pending_];
    {
      CommTimer timer(comm_stats()[CommKind::gradient_reduce].blocked_seconds);
      MPI_Wait(&reduce_request_, MPI_STATUS_IGNORE);
    }
    reduce_pending_ = -1;
    if (group_->num_replicas() > 1) {
      auto &c = comm_stats()[CommKind::replica_reduce];
      CommTimer timer(c.blocked_seconds);
      MPI_Allreduce(MPI_IN_PLACE, L.grads_host.data(), static_cast<int>(L.grads_host.extent(0)), MPI_FLOAT, MPI_SUM,
                    group_->replicas());
      double const b = double(L.grads_host.extent(0)) * sizeof(float) * (group_->num_replicas() - 1);
      c.calls += 1;
      c.bytes_sent += b;
      c.bytes_received += b;
    }
    {
      CommTimer timer(comm_stats()[CommKind::gradient_reduce].blocked_seconds);
      from_host(L.grads, L.grads_host);
    }
  }

  // Finish the MPI part of the pending collectives now (the copies to the
  // device follow when a layer acquires the slot, or the reduction finishes).
  // MPI progresses non-blocking collectives only inside its calls, so the
  // layers call this right after launching their kernels: on a device
  // backend the host then drives the transfers while the device computes.
  // A completed request becomes MPI_REQUEST_NULL, so the later wait is free.
  void drive() {
    if (!overlap_) return;  // nothing is pending then
    for (auto &s : slots_)
      if (s.pending && s.request != MPI_REQUEST_NULL) {
        CommTimer timer(comm_stats()[CommKind::weight_gather].blocked_seconds);
        MPI_Wait(&s.request, MPI_STATUS_IGNORE);
      }
    if (reduce_pending_ >= 0 && reduce_request_ != MPI_REQUEST_NULL) {
      CommTimer timer(comm_stats()[CommKind::gradient_reduce].blocked_seconds);
      MPI_Wait(&reduce_request_, MPI_STATUS_IGNORE);
    }
  }

  // Let pending collectives advance without waiting for them.
  void progress() {
    int done = 0;
    for (auto &s : slots_)
      if (s.pending) MPI_Test(&s.request, &done, MPI_STATUS_IGNORE);
    if (reduce_pending_ >= 0) MPI_Test(&reduce_request_, &done, MPI_STATUS_IGNORE);
  }

  // Drop the cached weights (they are stale once the slices change).
  void invalidate() {
    for (int s = 0; s < 2; ++s) {
      complete_gather(s);
      slots_[s].layer = -1;
    }
  }

 public:
  // (Public because pack(), a public member for CUDA's sake, takes it.)
  struct Layer {
    int E = 0, d = 0, H = 0;
    ExpertSlice slice;
    flat_view values, grads;
    host_mirror_t<flat_view> values_host, grads_host;
    std::vector<int> send_counts, recv_counts, displs, reduce_counts;
    std::vector<MPI_Datatype> send_types, recv_types;
    Kokkos::View<int *, memory_space> owner, off, cnt;
    Kokkos::View<std::int64_t *, memory_space> base;
  };

 private:
  struct Slot {
    flat_view buf;
    host_mirror_t<flat_view> host;
    int layer = -1;
    bool pending = false;
    MPI_Request request = MPI_REQUEST_NULL;
    long used = 0;
  };

  void check_id(int id) const {
    if (id < 0 || id >= num_layers()) throw std::out_of_range("PipelineSharedCache: no layer " + std::to_string(id));
  }

  static std::size_t layer_floats(Layer const &L) { return slice_size(L.E, L.d, L.H); }

  void allocate() {
    if (slots_[0].buf.data()) return;
    for (auto const &L : layers_) slot_floats_ = std::max(slot_floats_, layer_floats(L));
    for (int s = 0; s < 2; ++s) {
      slots_[s].buf = flat_view(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::cache.slot" + std::to_string(s)), slot_floats_);
      slots_[s].host = host_mirror(slots_[s].buf);
    }
    grad_ = flat_view(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::cache.grad"), slot_floats_);
    reduce_ = flat_view(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::cache.reduce"), slot_floats_);
    reduce_host_ = host_mirror(reduce_);
  }

  static Experts experts(flat_view buf, Layer const &L) {
    std::size_t const E = L.E, d = L.d, H = L.H;
    float *p = buf.data();
    return {Tensor3<float, memory_space>(p, E, d, H), Matrix<float, memory_space>(p + E * d * H, E, H),
            Tensor3<float, memory_space>(p + E * d * H + E * H, E, H, d)};
  }

  int holding(int id) const {
    for (int s = 0; s < 2; ++s)
      if (slots_[s].layer == id) return s;
    return -1;
  }
  int victim() const {
    if (slots_[0].layer < 0) return 0;
    if (slots_[1].layer < 0) return 1;
    return slots_[0].used <= slots_[1].used ? 0 : 1;
  }

  void start_gather(int s, int id) {
    Layer &L = layers_[id];
    Slot &S = slots_[s];
    Kokkos::fence();  // no kernel may still read the slot, and the slice values are final
    auto &c = comm_stats()[CommKind::weight_gather];
    CommTimer timer(c.issue_seconds);
    to_host(L.values_host, L.values);
    MPI_Ialltoallw(L.values_host.data(), L.send_counts.data(), L.displs.data(), L.send_types.data(), S.host.data(),
                   L.recv_counts.data(), L.displs.data(), L.recv_types.data(), group_->comm(), &S.request);
    double const all = double(layer_floats(L)) * sizeof(float), mine = double(L.values_host.extent(0)) * sizeof(float);
    c.calls += 1;
    c.bytes_sent += mine * (group_->size() - 1);
    c.bytes_received += all - mine;
    S.layer = id;
    S.pending = true;
  }

  void complete_gather(int s) {
    Slot &S = slots_[s];
    if (!S.pending) return;
    CommTimer timer(comm_stats()[CommKind::weight_gather].blocked_seconds);
    MPI_Wait(&S.request, MPI_STATUS_IGNORE);
    S.pending = false;
    auto const n = layer_floats(layers_[S.layer]);
    from_host(Kokkos::subview(S.buf, std::make_pair(std::size_t(0), n)),
              Kokkos::subview(S.host, std::make_pair(std::size_t(0), n)));
  }

 public:
  // (Public because CUDA forbids extended lambdas in private member functions.)
  // Rank-blocked copy of the gradient buffer: rank r's block is its slice
  // [dW1 (E, d, H_r) | db1 (E, H_r) | dW2 (E, H_r, d)].
  template <class ExecutionSpace>
  void pack(ExecutionSpace const &space, Layer const &L) {
    std::int64_t const E = L.E, d = L.d, H = L.H;
    std::int64_t const n1 = E * d * H, n2 = n1 + E * H, total = n2 + E * H * d;
    auto g = grad_;
    auto out = reduce_;
    auto owner = L.owner;
    auto base = L.base;
    auto off = L.off;
    auto cnt = L.cnt;
    Kokkos::parallel_for(
        "hexamoe::cache.pack_gradients",
        Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::int64_t>>(space, 0, total),
        KOKKOS_LAMBDA(std::int64_t q) {
          std::int64_t dst;
          if (q < n1) {
            std::int64_t const e = q / (d * H), rem = q % (d * H), i = rem / H, h = rem % H;
            int const r = owner(h);
            dst = base(r) + (e * d + i) * cnt(r) + (h - off(r));
          } else if (q < n2) {
            std::int64_t const e = (q - n1) / H, h = (q - n1) % H;
            int const r = owner(h);
            dst = base(r) + E * d * cnt(r) + e * cnt(r) + (h - off(r));
          } else {
            std::int64_t const e = (q - n2) / (H * d), rem = (q - n2) % (H * d), h = rem / d, c = rem % d;
            int const r = owner(h);
            dst = base(r) + E * d * cnt(r) + E * cnt(r) + (e * cnt(r) + (h - off(r))) * d + c;
          }
          out(dst) = g(q);
        });
  }

 private:
  std::shared_ptr<MoeGroup const> group_;
  std::vector<Layer> layers_;
  Slot slots_[2];
  flat_view grad_, reduce_;
  host_mirror_t<flat_view> reduce_host_;
  MPI_Request reduce_request_ = MPI_REQUEST_NULL;
  int reduce_pending_ = -1;
  std::size_t slot_floats_ = 0;
  long clock_ = 0;
  bool overlap_ = true;
};

}  // namespace hexamoe::parallel
