// ModelCentricMoe.hpp: an MoE layer in the model-centric mode (DESIGN.md
// section 3): weights stay put, each rank holding its hidden slice of every
// expert; tokens move.
//
// Forward: the router runs on the tokens' owner; tokens, expert ids and gates
// are all-gathered over the MoE group (variable counts: ranks may hold
// different batch sizes); every rank runs its slice of the experts on all
// tokens (ESMM on H_i hidden units) giving a partial output; the partial
// outputs are reduce-scattered back to the owners (b2 is added by the slice
// at hidden offset 0). Backward mirrors it: dy is all-gathered, each slice
// gives a partial dx and a partial dL/dgate (both are sums over hidden
// units), reduce-scattered to the owners, whose router then adds its part.
// Weight gradients stay local (sharded); router and b2 are replicated.
//
// Outputs and gradients equal the single-process layer's up to float
// rounding: a sum over H is split into per-slice partial sums (bit-identical
// with one rank).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/MoeLayer.hpp"
#include "core/model/MoeFfn.hpp"
#include "parallel/CommStats.hpp"
#include "parallel/ExpertSlice.hpp"
#include "parallel/MoeGroup.hpp"
#include "parallel/MpiView.hpp"
#include "parallel/SimulatedSlowdown.hpp"

namespace hexamoe::parallel {

template <class ExecutionSpace>
class ModelCentricMoe final : public MoeFfn<ExecutionSpace> {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<float, memory_space>;
  using const_matrix = Matrix<float const, memory_space>;
  using index_view = Kokkos::View<int **, Kokkos::LayoutRight, memory_space>;
  using gate_view = Kokkos::View<float *, memory_space>;

  ModelCentricMoe(MoeLayerConfig cfg, ExpertSlice slice, std::shared_ptr<MoeGroup const> group,
                  SimulatedSlowdown slowdown = {})
      : layer_(sliced(cfg, slice, group->rank())),
        slice_(std::move(slice)),
        group_(std::move(group)),
        slowdown_(slowdown) {
    h0_ = slice_.offset(group_->rank());
    hl_ = slice_.count(group_->rank());
  }

  void forward(ExecutionSpace const &space, const_matrix x, matrix y) override {
    compat::ScopedRegion region("hexamoe::ModelCentricMoe::forward");
    auto const &c = layer_.config();
    int const d = c.dim, k = c.top_k, me = group_->rank();
    tokens_ = static_cast<int>(x.extent(0));
    count_tokens();
    int const N = total_, off = offsets_[me];
    ensure(space, N);
    x_ = x;
    if (tokens_ > 0) {
      layer_.router.forward(space, x);
      auto rows = std::make_pair(off, off + tokens_);
      Kokkos::deep_copy(space, Kokkos::subview(x_all_, rows, Kokkos::ALL), x);
      Kokkos::deep_copy(space, Kokkos::subview(idx_all_, rows, Kokkos::ALL), layer_.router.idx);
      Kokkos::deep_copy(space, Kokkos::subview(gate_all_, std::make_pair(off * k, (off + tokens_) * k)),
                        layer_.router.gate);
    }
    all_gather(x_all_, d);
    all_gather(idx_all_, k);
    all_gather(gate_all_, k);
    slowdown_.begin(space);
    if (hl_ > 0 && N > 0)
      layer_.forward_routed(space, x_all_, idx_all_, gate_all_, part_);
    else
      Kokkos::deep_copy(space, part_, 0.0f);
    slowdown_.end(space);
    reduce_scatter(part_, y, d);
  }

  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) override {
    compat::ScopedRegion region("hexamoe::ModelCentricMoe::backward");
    auto const &c = layer_.config();
    int const d = c.dim, k = c.top_k, me = group_->rank();
    int const N = total_, off = offsets_[me];
    if (tokens_ > 0)
      Kokkos::deep_copy(space, Kokkos::subview(dy_all_, std::make_pair(off, off + tokens_), Kokkos::ALL), dy);
    all_gather(dy_all_, d);
    slowdown_.begin(space);
    gate_view dg_part;
    if (hl_ > 0 && N > 0) {
      layer_.backward(space, dy_all_, part_);  // part_ = this slice's dx
      dg_part = layer_.dgate();
    } else {
      Kokkos::deep_copy(space, part_, 0.0f);
      Kokkos::deep_copy(space, dg_zero_, 0.0f);
      Kokkos::deep_copy(space, layer_.b2_grad, 0.0f);
      dg_part = dg_zero_;
    }
    slowdown_.end(space);
    reduce_scatter(part_, dx, d);
    reduce_scatter(dg_part, dg_mine_, k);
    if (tokens_ > 0) {
      layer_.router.backward(space, x_, Kokkos::View<float const *, memory_space>(dg_mine_), dx);
    } else {
      Kokkos::deep_copy(space, layer_.router.weight_grad, 0.0f);
      Kokkos::deep_copy(space, layer_.router.bias_grad, 0.0f);
    }
    if (group_->num_replicas() > 1)
      for (auto &p : parameters("")) {
        if (!p.sharded()) continue;
        auto &c = comm_stats()[CommKind::replica_reduce];
        CommTimer timer(c.blocked_seconds);
        auto h = staging(p.grad, 0);
        to_host(h, p.grad);
        MPI_Allreduce(MPI_IN_PLACE, h.data(), static_cast<int>(h.extent(0)), MPI_FLOAT, MPI_SUM, group_->replicas());
        from_host(p.grad, h);
        double const b = double(h.extent(0)) * sizeof(float) * (group_->num_replicas() - 1);
        c.calls += 1;
        c.bytes_sent += b;
        c.bytes_received += b;
      }
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) override {
    auto p = layer_.parameters(prefix);
    auto const &c = layer_.config();
    std::size_t const E = c.experts, d = c.dim, h0 = h0_, hl = hl_;
    using S = std::vector<std::size_t>;
    for (auto &q : p) {
      if (q.name == prefix + ".w1") q.offset = S{0, 0, h0}, q.count = S{E, d, hl};
      if (q.name == prefix + ".b1") q.offset = S{0, h0}, q.count = S{E, hl};
      if (q.name == prefix + ".w2") q.offset = S{0, h0, 0}, q.count = S{E, hl, d};
    }
    return p;
  }
  std::pair<double, double> losses() const override {
    return tokens_ > 0 ? layer_.router_losses() : std::pair<double, double>{0, 0};
  }
  // Assignments per expert of this rank's own tokens.
  std::vector<int> expert_counts() const override {
    std::vector<int> c(std::size_t(layer_.config().experts), 0);
    if (tokens_ == 0) return c;
    auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer_.router.idx);
    for (std::size_t t = 0; t < idx.extent(0); ++t)
      for (std::size_t j = 0; j < idx.extent(1); ++j) ++c[std::size_t(idx(t, j))];
    return c;
  }
  void init(std::uint64_t seed) override { layer_.init(seed); }

  int hidden_offset() const { return h0_; }
  int hidden_local() const { return hl_; }
  MoeLayer<float, ExecutionSpace> &layer() { return layer_; }

 private:
  // The slice's layer. An empty slice gets offset H so that it never counts
  // as the holder of hidden offset 0 (which adds b2).
  static MoeLayerConfig sliced(MoeLayerConfig c, ExpertSlice const &s, int rank) {
    c.hidden_local = s.count(rank);
    c.hidden_offset = s.count(rank) > 0 ? s.offset(rank) : c.hidden;
    return c;
  }

  void count_tokens() {
    int const n = group_->size();
    counts_.assign(std::size_t(n), 0);
    auto &c = comm_stats()[CommKind::token_gather];
    {
      CommTimer timer(c.blocked_seconds);
      MPI_Allgather(&tokens_, 1, MPI_INT, counts_.data(), 1, MPI_INT, group_->comm());
    }
    c.calls += 1;
    c.bytes_sent += double(sizeof(int)) * (n - 1);
    c.bytes_received += double(sizeof(int)) * (n - 1);
    offsets_.assign(std::size_t(n), 0);
    for (int r = 1; r < n; ++r) offsets_[r] = offsets_[r - 1] + counts_[r - 1];
    total_ = offsets_[n - 1] + counts_[n - 1];
  }

  void ensure(ExecutionSpace const &space, int N) {
    auto const &c = layer_.config();
    int const d = c.dim, k = c.top_k;
    if (static_cast<int>(x_all_.extent(0)) != N) {
      auto alloc = [&](char const *label) {
        return Kokkos::view_alloc(space, Kokkos::WithoutInitializing, std::string(label));
      };
      x_all_ = matrix(alloc("hexamoe::model_centric.x"), N, d);
      dy_all_ = matrix(alloc("hexamoe::model_centric.dy"), N, d);
      part_ = matrix(alloc("hexamoe::model_centric.partial"), N, d);
      idx_all_ = index_view(alloc("hexamoe::model_centric.idx"), N, k);
      gate_all_ = gate_view(alloc("hexamoe::model_centric.gate"), std::size_t(N) * k);
      dg_zero_ = gate_view(alloc("hexamoe::model_centric.dgate"), std::size_t(N) * k);
    }
    if (static_cast<int>(dg_mine_.extent(0)) != tokens_ * k)
      dg_mine_ = gate_view(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::model_centric.dgate_mine"),
                           std::size_t(tokens_) * k);
  }

  // In place: this rank's rows are at its offset; `width` values per token.
  template <class View>
  void all_gather(View const &v, int width) {
    using T = typename View::value_type;
    int const n = group_->size();
    std::vector<int> cnt(static_cast<std::size_t>(n)), dsp(static_cast<std::size_t>(n));
    for (int r = 0; r < n; ++r) cnt[r] = counts_[r] * width, dsp[r] = offsets_[r] * width;
    auto &c = comm_stats()[CommKind::token_gather];
    CommTimer timer(c.blocked_seconds);
    auto h = staging(v, 0);
    to_host(h, v);
    MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, h.data(), cnt.data(), dsp.data(), mpi_type<T>(), group_->comm());
    from_host(v, h);
    double const mine = double(cnt[group_->rank()]) * sizeof(T), all = double(total_) * width * sizeof(T);
    c.calls += 1;
    c.bytes_sent += mine * (n - 1);
    c.bytes_received += all - mine;
  }

  // Sum the ranks' partial values and give each owner its rows.
  template <class Src, class Dst>
  void reduce_scatter(Src const &src, Dst const &dst, int width) {
    int const n = group_->size();
    std::vector<int> cnt(static_cast<std::size_t>(n));
    for (int r = 0; r < n; ++r) cnt[r] = counts_[r] * width;
    auto &c = comm_stats()[CommKind::partial_reduce];
    CommTimer timer(c.blocked_seconds);
    auto hs = staging(src, 0);
    auto hd = staging(dst, 1);
    to_host(hs, src);
    MPI_Reduce_scatter(hs.data(), hd.data(), cnt.data(), MPI_FLOAT, MPI_SUM, group_->comm());
    from_host(dst, hd);
    double const mine = double(cnt[group_->rank()]) * sizeof(float), all = double(total_) * width * sizeof(float);
    c.calls += 1;
    c.bytes_sent += all - mine;
    c.bytes_received += mine * (n - 1);
  }

  // The host view MPI uses for v: v itself when the host can access it, else
  // a view of the same shape over host staging buffer `slot` (kept from call
  // to call, grown as needed, so that steps allocate nothing).
  template <class View>
  auto staging(View const &v, int slot) {
    if constexpr (host_accessible<typename View::memory_space>) {
      return v;
    } else {
      using T = typename View::non_const_value_type;
      std::size_t const bytes = v.span() * sizeof(T);
      auto &buf = stage_[slot];
      if (buf.extent(0) < bytes)
        buf = Kokkos::View<char *, host_staging_space<memory_space>>(
            Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::model_centric.host_stage"), bytes);
      return Kokkos::View<typename View::non_const_data_type, typename View::array_layout, host_staging_space<memory_space>,
                          Kokkos::MemoryTraits<Kokkos::Unmanaged>>(reinterpret_cast<T *>(buf.data()), v.layout());
    }
  }

  MoeLayer<float, ExecutionSpace> layer_;
  ExpertSlice slice_;
  std::shared_ptr<MoeGroup const> group_;
  SimulatedSlowdown slowdown_;
  int h0_ = 0, hl_ = 0, tokens_ = 0, total_ = 0;
  std::vector<int> counts_, offsets_;
  const_matrix x_;
  matrix x_all_, dy_all_, part_;
  index_view idx_all_;
  gate_view gate_all_, dg_zero_, dg_mine_;
  Kokkos::View<char *, host_staging_space<memory_space>> stage_[2];
};

}  // namespace hexamoe::parallel
