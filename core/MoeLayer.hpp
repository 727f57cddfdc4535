// MoeLayer.hpp: the HEXA-MoE layer, forward and backward (DESIGN.md section 1).
//
// Forward:  route (Router) -> routing index -> z1 = ESMM(x, W1) + b1, h = act(z1)
//           (one ESMM, both stored) -> o = ESMM(h, W2) + b2 -> y[t] = sum_j g o.
//           For top-1 the combine is fused into the second ESMM's epilogue.
//           infer() is the same forward without what backward needs (no z1,
//           and no o when the combine is fused).
// Backward: dg = <dy, o>; dW2, db2 = ESTMM/ESS(h, g dy) (one pass);
//           dz1 = ESMM(g dy, W2^T) * act'(z1) (written over z1);
//           dW1, db1 = ESTMM/ESS(x, dz1); dx = sum_j ESMM(dz1, W1^T) + router part.
//           On CUDA the two ESTMMs run on a second stream beside the ESMMs
//           (SideStream.hpp).
// No dispatch buffer, no padding, no dropped tokens (unless a capacity factor
// is set to reproduce padded peers), no transposed weight copies.
//
// The expert weights may be a slice of the FFN hidden dimension (hidden_local
// of hidden columns of W1 and rows of W2): the parallel modes use that; the
// output is then this slice's partial sum (b2 is added by the slice that
// holds hidden offset 0).
#pragma once

#include "Esmm.hpp"
#include "Estmm.hpp"
#include "ForEachElement.hpp"
#include "Parameter.hpp"
#include "Router.hpp"
#include "RoutingIndex.hpp"
#include "SideStream.hpp"

#include <random>
#include <stdexcept>
#include <string>

namespace hexamoe {

struct MoeLayerConfig {
  int dim = 0;       // d
  int hidden = 0;    // H (of the whole expert)
  int experts = 0;   // E
  int top_k = 1;
  Activation activation = Activation::gelu;
  bool renormalize = false;
  double aux_loss_weight = 0.0;
  double z_loss_weight = 0.0;
  double capacity_factor = 0.0;  // 0 = dropless
  int hidden_offset = 0;         // first hidden unit this instance holds
  int hidden_local = -1;         // hidden units held here (-1 = all)

  void validate() const {
    auto bad = [](std::string const &m) { throw std::invalid_argument("MoeLayer: " + m); };
    if (dim < 1) bad("dim must be >= 1, got " + std::to_string(dim));
    if (hidden < 1) bad("hidden must be >= 1, got " + std::to_string(hidden));
    if (experts < 1) bad("experts must be >= 1, got " + std::to_string(experts));
    if (top_k < 1 || top_k > experts)
      bad("top_k must be in [1, experts=" + std::to_string(experts) + "], got " + std::to_string(top_k));
    if (aux_loss_weight < 0) bad("aux_loss_weight must be >= 0");
    if (z_loss_weight < 0) bad("z_loss_weight must be >= 0");
    if (capacity_factor < 0) bad("capacity_factor must be >= 0 (0 = dropless)");
    int const hl = hidden_local < 0 ? hidden : hidden_local;
    if (hidden_offset < 0 || hl < 0 || hidden_offset + hl > hidden)
      bad("hidden slice [" + std::to_string(hidden_offset) + ", " + std::to_string(hidden_offset + hl) +
          ") is outside [0, " + std::to_string(hidden) + ")");
  }
  int local_hidden() const { return hidden_local < 0 ? hidden : hidden_local; }
};

template <class T, class ExecutionSpace>
class MoeLayer {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using Acc = accumulator_t<T>;
  using index_type = RoutingIndex<memory_space>;

  explicit MoeLayer(MoeLayerConfig cfg) : cfg_((cfg.validate(), cfg)) {
    int const E = cfg_.experts, d = cfg_.dim, H = cfg_.local_hidden();
    router = Router<T, ExecutionSpace>(d, E, RouterOptions{cfg_.top_k, cfg_.renormalize, cfg_.aux_loss_weight, cfg_.z_loss_weight});
    w1 = Tensor3<T, memory_space>("hexamoe::moe.w1", E, d, H);
    b1 = Matrix<T, memory_space>("hexamoe::moe.b1", E, H);
    w2 = Tensor3<T, memory_space>("hexamoe::moe.w2", E, H, d);
    b2 = Matrix<T, memory_space>("hexamoe::moe.b2", E, d);
    w1_grad = Tensor3<Acc, memory_space>("hexamoe::moe.w1_grad", E, d, H);
    b1_grad = Matrix<Acc, memory_space>("hexamoe::moe.b1_grad", E, H);
    w2_grad = Tensor3<Acc, memory_space>("hexamoe::moe.w2_grad", E, H, d);
    b2_grad = Matrix<Acc, memory_space>("hexamoe::moe.b2_grad", E, d);
  }

  MoeLayerConfig const &config() const { return cfg_; }

  Router<T, ExecutionSpace> router;
  Tensor3<T, memory_space> w1;  // [E, d, H_local]
  Matrix<T, memory_space> b1;   // [E, H_local]
  Tensor3<T, memory_space> w2;  // [E, H_local, d]
  Matrix<T, memory_space> b2;   // [E, d] (used by the slice at hidden offset 0)
  Tensor3<Acc, memory_space> w1_grad;
  Matrix<Acc, memory_space> b1_grad;
  Tensor3<Acc, memory_space> w2_grad;
  Matrix<Acc, memory_space> b2_grad;

  // Deterministic initialisation: normal(0, std) weights (std = 0.02 like
  // Swin/timm for the experts, 0.02 for the router), zero biases. Values are
  // drawn for the whole expert, so every hidden slice sees the same model.
  void init(std::uint64_t seed, double std = 0.02) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> nd(0.0, std);
    int const E = cfg_.experts, d = cfg_.dim, H = cfg_.hidden, h0 = cfg_.hidden_offset, hl = cfg_.local_hidden();
    auto hw1 = Kokkos::create_mirror_view(w1);
    auto hw2 = Kokkos::create_mirror_view(w2);
    auto hr = Kokkos::create_mirror_view(router.weight);
    for (int i = 0; i < d; ++i)
      for (int e = 0; e < E; ++e) hr(i, e) = static_cast<Acc>(nd(rng));
    for (int e = 0; e < E; ++e)
      for (int i = 0; i < d; ++i)
        for (int h = 0; h < H; ++h) {
          double const v = nd(rng);
          if (h >= h0 && h < h0 + hl) hw1(e, i, h - h0) = static_cast<T>(v);
        }
    for (int e = 0; e < E; ++e)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < d; ++i) {
          double const v = nd(rng);
          if (h >= h0 && h < h0 + hl) hw2(e, h - h0, i) = static_cast<T>(v);
        }
    Kokkos::deep_copy(w1, hw1);
    Kokkos::deep_copy(w2, hw2);
    Kokkos::deep_copy(router.weight, hr);
    Kokkos::deep_copy(router.bias, Acc(0));
    Kokkos::deep_copy(b1, T(Acc(0)));
    Kokkos::deep_copy(b2, T(Acc(0)));
  }

  // y[T, d] = MoE(x[T, d]). Keeps what backward needs until the next forward.
  void forward(ExecutionSpace const &space, Matrix<T const, memory_space> x, Matrix<T, memory_space> y) {
    compat::ScopedRegion region("hexamoe::MoeLayer::forward");
    forward_impl(space, x, y, true);
  }

  // y[T, d] = MoE(x[T, d]) for inference (evaluation, serving): the same
  // routing, router statistics and y as forward, but nothing is kept for
  // backward (the pre-activation z1 and, for dropless top-1, the expert
  // outputs o are not written), as a framework's no-grad forward. backward
  // after infer is an error.
  void infer(ExecutionSpace const &space, Matrix<T const, memory_space> x, Matrix<T, memory_space> y) {
    compat::ScopedRegion region("hexamoe::MoeLayer::infer");
    forward_impl(space, x, y, false);
  }

  // Forward with a given routing (idx, gate); the router is bypassed. Used by
  // the model-centric mode (routing computed by the token's owner) and tests.
  void forward_routed(ExecutionSpace const &space, Matrix<T const, memory_space> x,
                      Kokkos::View<int const **, Kokkos::LayoutRight, memory_space> idx,
                      Kokkos::View<Acc const *, memory_space> gate, Matrix<T, memory_space> y) {
    compat::ScopedRegion region("hexamoe::MoeLayer::forward_routed");
    int const S = routed_rows("MoeLayer", x.extent(0), cfg_.top_k);
    int const T_ = static_cast<int>(x.extent(0)), d = cfg_.dim, H = cfg_.local_hidden(), k = cfg_.top_k;
    check_tokens("x", x, T_);
    check_tokens("y", y, T_);
    if (idx.extent(0) != x.extent(0) || static_cast<int>(idx.extent(1)) != k || gate.extent(0) != std::size_t(S))
      throw std::invalid_argument("MoeLayer: routing is [" + std::to_string(idx.extent(0)) + ", " + std::to_string(idx.extent(1)) +
                                  "] with " + std::to_string(gate.extent(0)) + " gates, expected [" + std::to_string(T_) + ", " +
                                  std::to_string(k) + "] and T*k gates");
    route(space, idx);
    ensure(space, S, H, d);
    x_ = x;
    gate_ = gate;
    forward_done_ = true;
    inferred_ = false;
    backward_done_ = false;
    run_experts(space, x, y, true);
  }

  // dx[T, d] from dy[T, d]; overwrites every parameter gradient. With
  // routed_only (after forward_routed), the router is skipped and dgate()
  // holds dL/dg for the caller.
  void backward(ExecutionSpace const &space, Matrix<T const, memory_space> dy, Matrix<T, memory_space> dx) {
    compat::ScopedRegion region("hexamoe::MoeLayer::backward");
    if (inferred_)
      throw std::logic_error("MoeLayer::backward: the last forward was infer(), which keeps no activations; run forward");
    if (!forward_done_) throw std::logic_error("MoeLayer::backward called before forward");
    if (backward_done_) throw std::logic_error("MoeLayer::backward: the saved activations were consumed; run forward again");
    int const T_ = static_cast<int>(x_.extent(0)), k = cfg_.top_k;
    check_tokens("dy", dy, T_);
    check_tokens("dx", dx, T_);
    int const S = T_ * k;
    auto const R = index_;
    auto gate = gate_;
    bool const fused = k == 1 && R.capacity == 0;
    bool const bias2 = cfg_.hidden_offset == 0;

    // dg[f] = <dy[t], o[pos(f)]> (zero for dropped assignments): a thread per
    // assignment, its vector lanes along the row (one lane on hosts: the sum
    // in column order; a warp on GPUs: coalesced rows instead of a row per
    // thread, which took 85 us of the H200's backward at 14400 tokens).
    {
      auto o = o_;
      auto dg = dgate_;
      auto pos = R.position;
      int const d = cfg_.dim;
      constexpr bool host = detail::runs_on_host<ExecutionSpace>;
      int const ts = host ? 1 : 8, vl = host ? 1 : 32;
      using policy = Kokkos::TeamPolicy<ExecutionSpace>;
      using member = typename policy::member_type;
      if (S > 0)
        Kokkos::parallel_for(
            "hexamoe::moe_dgate", compat::light(policy(space, (S + ts - 1) / ts, ts, vl)), KOKKOS_LAMBDA(member const &team) {
              int const f0 = team.league_rank() * ts, f1 = f0 + ts < S ? f0 + ts : S;
              Kokkos::parallel_for(Kokkos::TeamThreadRange(team, f0, f1), [&](int f) {
                int const p = pos(f), t = f / k;
                Acc s = 0;
                if (p >= 0)
                  Kokkos::parallel_reduce(
                      Kokkos::ThreadVectorRange(team, d),
                      [&](int c, Acc &a) { a += to_acc<Acc>(dy(t, c)) * to_acc<Acc>(o(p, c)); }, s);
                Kokkos::single(Kokkos::PerThread(team), [&]() { dg(f) = s; });
              });
            });
    }
    auto const gdy = gated_token_rows(dy, gate);
    // The weight gradients (ESTMM) run on a side queue beside the input
    // gradients (ESMM) on space: on a GPU each fills the multiprocessors the
    // other's last wave leaves idle (SideStream.hpp; elsewhere one queue).
    detail::SideStream<ExecutionSpace> const side(space);
    detail::SideStreamJoin<ExecutionSpace> const join(side);  // space waits for the side queue on return
    side.wait_for();
    // dW2 = ESTMM(h, g dy), db2 = ESS(g dy) fused (reads h, dy, g; not z1 or o).
    estmm(side.side(), R, sorted_rows(Matrix<T const, memory_space>(h_)), gdy, w2_grad,
          bias2 ? b2_grad : Matrix<Acc, memory_space>());
    if (!bias2) Kokkos::deep_copy(space, b2_grad, Acc(0));
    // dz1 = (g dy W2^T) * act'(z1), written over z1.
    {
      EsmmEpilogue<T, memory_space> ep;
      ep.act = cfg_.activation;
      ep.act_grad_of = z1_;
      ep.pre = z1_;
      esmm(space, R, gdy, Tensor3<T const, memory_space>(w2), true, Matrix<T const, memory_space>(), ep);
    }
    auto const dz1 = Matrix<T const, memory_space>(z1_);
    backward_done_ = true;
    // dW1 = ESTMM(x, dz1), db1 = ESS(dz1) fused, once dz1 is written.
    side.wait_for();
    estmm(side.side(), R, token_rows(x_), sorted_rows(dz1), w1_grad, b1_grad);
    // dx = sum_j dz1 W1^T (fused into token rows for dropless top-1).
    {
      EsmmEpilogue<T, memory_space> ep;
      if (fused) {
        ep.token_out = dx;
      } else {
        ep.pre = o_;  // o is dead now: reuse its [S, d] buffer
      }
      esmm(space, R, sorted_rows(dz1), Tensor3<T const, memory_space>(w1), true, Matrix<T const, memory_space>(), ep);
      if (!fused) combine(space, Matrix<T const, memory_space>(o_), Kokkos::View<Acc const *, memory_space>(), dx);
    }
    if (routed_) return;
    router.backward(space, x_, Kokkos::View<Acc const *, memory_space>(dgate_), dx);
  }

  // Routing and statistics of the last forward.
  index_type const &routing_index() const { return index_; }
  Kokkos::View<Acc *, memory_space> dgate() const { return dgate_; }
  std::pair<double, double> router_losses() const { return router.losses(); }

  // Parameters for the optimiser and checkpoints (float storage only).
  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) {
    static_assert(std::is_same_v<T, float>, "MoeLayer::parameters: the optimiser works on float32 parameters");
    int const E = cfg_.experts, d = cfg_.dim, H = cfg_.hidden;
    using S = std::vector<std::size_t>;
    return {
        {prefix + ".router.weight", S{std::size_t(d), std::size_t(E)}, flat(router.weight), flat(router.weight_grad), true, false, {}, {}},
        {prefix + ".router.bias", S{std::size_t(E)}, flat(router.bias), flat(router.bias_grad), false, false, {}, {}},
        {prefix + ".w1", S{std::size_t(E), std::size_t(d), std::size_t(H)}, flat(w1), flat(w1_grad), true, true, {}, {}},
        {prefix + ".b1", S{std::size_t(E), std::size_t(H)}, flat(b1), flat(b1_grad), false, true, {}, {}},
        {prefix + ".w2", S{std::size_t(E), std::size_t(H), std::size_t(d)}, flat(w2), flat(w2_grad), true, true, {}, {}},
        {prefix + ".b2", S{std::size_t(E), std::size_t(d)}, flat(b2), flat(b2_grad), false, false, {}, {}},
    };
  }

  // (Public because CUDA forbids extended lambdas in private member functions.)
  // out[t] = sum_j g[t, j] * rows[pos(t, j)] in slot order (g = 1 when absent);
  // dropped assignments contribute nothing. Each row written once.
  void combine(ExecutionSpace const &space, Matrix<T const, memory_space> rows, Kokkos::View<Acc const *, memory_space> gate,
               Matrix<T, memory_space> out) {
    compat::ScopedRegion region("hexamoe::combine");
    int const T_ = static_cast<int>(out.extent(0)), d = cfg_.dim, k = cfg_.top_k;
    auto pos = index_.position;
    bool const gated = gate.data() != nullptr;
    for_each_element(
        space, "hexamoe::combine", T_, d, KOKKOS_LAMBDA(int t, int c) {
          Acc s = 0;
          for (int j = 0; j < k; ++j) {
            int const p = pos(t * k + j);
            if (p >= 0) s += (gated ? gate(t * k + j) : Acc(1)) * to_acc<Acc>(rows(p, c));
          }
          out(t, c) = from_acc<T>(s);
        });
  }

 private:
  // forward (keep = true) and infer (keep = false).
  void forward_impl(ExecutionSpace const &space, Matrix<T const, memory_space> x, Matrix<T, memory_space> y,
                    bool keep) {
    int const S = routed_rows("MoeLayer", x.extent(0), cfg_.top_k);
    int const T_ = static_cast<int>(x.extent(0)), d = cfg_.dim, H = cfg_.local_hidden();
    check_tokens("x", x, T_);
    check_tokens("y", y, T_);
    router.forward(space, x);
    ensure(space, S, H, d);
    // (bf16 on Hopper, esmm_sorts_gathered_rows: x's rows copied into sorted
    // order in o_, which h W2 overwrites afterwards, by the index's build.)
    SortedRowCopy<T, memory_space> copy;
    if (esmm_sorts_gathered_rows<T>(space, cfg_.capacity_factor == 0.0)) copy = {x, o_};
    route(space, Kokkos::View<int const **, Kokkos::LayoutRight, memory_space>(router.idx), copy);
    x_ = x;
    forward_done_ = keep;
    inferred_ = !keep;
    backward_done_ = false;
    run_experts(space, x, y, keep);
  }

  template <class V>
  void check_tokens(char const *name, V const &v, int T_) const {
    if (static_cast<int>(v.extent(0)) != T_ || static_cast<int>(v.extent(1)) != cfg_.dim)
      throw std::invalid_argument(std::string("MoeLayer: ") + name + " is [" + std::to_string(v.extent(0)) + ", " +
                                  std::to_string(v.extent(1)) + "], expected [" + std::to_string(T_) + ", " +
                                  std::to_string(cfg_.dim) + "]");
  }

  // copy (optional): x's rows into sorted order on the way (x_sorted_).
  void route(ExecutionSpace const &space, Kokkos::View<int const **, Kokkos::LayoutRight, memory_space> idx,
             SortedRowCopy<T, memory_space> const &copy = {}) {
    bool const own = idx.data() == router.idx.data();
    // Recycles the last index's buffers: no allocation (and no implied device
    // sync) per step. The router's chunk counts spare the build its count.
    index_ = build_routing_index(space, idx, cfg_.experts, cfg_.capacity_factor, /*validate=*/!own, index_,
                                 own ? router.chunk_counts() : ChunkCounts<memory_space>{}, copy);
    x_sorted_ = copy.to.data() != nullptr;
    routed_ = !own;
    if (own) gate_ = router.gate;
  }

  void ensure(ExecutionSpace const &space, int S, int H, int d) {
    if (static_cast<int>(z1_.extent(0)) == S) return;
    z1_ = Matrix<T, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::moe.z1"), S, H);
    h_ = Matrix<T, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::moe.h"), S, H);
    o_ = Matrix<T, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::moe.o"), S, d);
    dgate_ = Kokkos::View<Acc *, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::moe.dgate"), S);
  }

  // keep = false (infer): z1 and, when the combine is fused, o are not stored.
  void run_experts(ExecutionSpace const &space, Matrix<T const, memory_space> x, Matrix<T, memory_space> y, bool keep) {
    auto const &R = index_;
    bool const fused = cfg_.top_k == 1 && R.capacity == 0;
    bool const bias2 = cfg_.hidden_offset == 0;
    {
      EsmmEpilogue<T, memory_space> ep;
      ep.act = cfg_.activation;
      if (keep) ep.pre = z1_;
      ep.post = h_;
      // (bf16 on Hopper, esmm_sorts_gathered_rows: x's rows copied into
      // sorted order in o_, which h W2 overwrites afterwards, then read as
      // sorted rows, through tensor copies; the forward's index build made
      // the copy, forward_routed's is made here.)
      if (x_sorted_ || esmm_sorts_gathered_rows<T>(space, R.capacity == 0)) {
        if (!x_sorted_) detail::copy_sorted_rows(space, R, SortedRowCopy<T, memory_space>{x, o_});
        esmm(space, R, sorted_rows(Matrix<T const, memory_space>(o_)), Tensor3<T const, memory_space>(w1), false,
             Matrix<T const, memory_space>(b1), ep);
      } else {
        esmm(space, R, token_rows(x), Tensor3<T const, memory_space>(w1), false, Matrix<T const, memory_space>(b1),
             ep);
      }
    }
    {
      EsmmEpilogue<T, memory_space> ep;
      if (keep || !fused) ep.pre = o_;
      if (fused) {
        ep.token_out = y;
        ep.token_gate = gate_;
      }
      esmm(space, R, sorted_rows(Matrix<T const, memory_space>(h_)), Tensor3<T const, memory_space>(w2), false,
           bias2 ? Matrix<T const, memory_space>(b2) : Matrix<T const, memory_space>(), ep);
    }
    if (!fused) combine(space, Matrix<T const, memory_space>(o_), Kokkos::View<Acc const *, memory_space>(gate_), y);
  }

  MoeLayerConfig cfg_;
  index_type index_;
  bool routed_ = false;
  bool x_sorted_ = false;  // the last route copied x's rows into o_ in sorted order
  bool forward_done_ = false;
  bool inferred_ = false;  // the last forward was infer()
  bool backward_done_ = false;
  Matrix<T const, memory_space> x_;
  Kokkos::View<Acc const *, memory_space> gate_;
  Matrix<T, memory_space> z1_, h_, o_;
  Kokkos::View<Acc *, memory_space> dgate_;
};

}  // namespace hexamoe
