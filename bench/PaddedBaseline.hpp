// PaddedBaseline.hpp: the GEMM baseline that HEXA-MoE is measured against on
// any backend: GShard/Tutel-style dispatch into a padded capacity buffer
// [E, C, d] (C = ceil(cf * k * T / E), overflow dropped, padding rows computed),
// one dense GEMM per expert (Kokkos Kernels' BLAS on the host when available,
// else the portable tiled kernel), and the combine back; backward the same way.
#pragma once

#include "core/Activation.hpp"
#include "core/MoeLayer.hpp"
#include "core/nn/DenseGemm.hpp"

namespace hexamoe::bench {

template <class ExecutionSpace>
class PaddedMoe {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using M2 = Matrix<float, memory_space>;
  using M3 = Tensor3<float, memory_space>;

  // Shares the weights of an existing layer (float32), so both compute the same model.
  PaddedMoe(MoeLayer<float, ExecutionSpace> &layer, double capacity_factor) : L_(layer), cf_(capacity_factor) {}

  void forward(ExecutionSpace const &space, M2 x, M2 y) {
    compat::ScopedRegion region("hexamoe::padded::forward");
    auto const &c = L_.config();
    int const T_ = static_cast<int>(x.extent(0)), d = c.dim, H = c.hidden, E = c.experts, k = c.top_k;
    L_.router.forward(space, Matrix<float const, memory_space>(x));
    R_ = build_routing_index(space, Kokkos::View<int const **, Kokkos::LayoutRight, memory_space>(L_.router.idx), E, cf_, false);
    int const C = R_.capacity;
    if (static_cast<int>(buf_.extent(1)) != C || static_cast<int>(buf_.extent(0)) != E) {
      buf_ = M3("hexamoe::padded.buf", E, C, d);
      z_ = M3("hexamoe::padded.z", E, C, H);
      h_ = M3("hexamoe::padded.h", E, C, H);
      o_ = M3("hexamoe::padded.o", E, C, d);
    }
    // Dispatch: slot (e, c) <- token of the c-th kept assignment of e; zeros pad.
    auto R = R_;
    auto buf = buf_;
    for_each_element(
        space, "hexamoe::padded_dispatch", E * C, d, KOKKOS_LAMBDA(int es, int j) {
          int const e = es / C, slot = es % C;
          bool const used = slot < R.counts(e);
          int const t = used ? R.sorted_flat(R.offsets(e) + slot) / k : 0;
          buf(e, slot, j) = used ? x(t, j) : 0.0f;
        });
    auto b1 = L_.b1, b2 = L_.b2;
    auto z = z_, h = h_, o = o_;
    Activation const act = c.activation;
    for (int e = 0; e < E; ++e) {
      auto w1 = Kokkos::subview(L_.w1, e, Kokkos::ALL, Kokkos::ALL);
      nn::dense_gemm(space, Kokkos::subview(buf_, e, Kokkos::ALL, Kokkos::ALL), w1, Kokkos::subview(z_, e, Kokkos::ALL, Kokkos::ALL));
    }
    for_each_element(
        space, "hexamoe::padded_act", E * C, H, KOKKOS_LAMBDA(int es, int n) {
          int const e = es / C, s = es % C;
          float const v = z(e, s, n) + b1(e, n);
          z(e, s, n) = v;
          h(e, s, n) = activate(act, v);
        });
    for (int e = 0; e < E; ++e) {
      auto w2 = Kokkos::subview(L_.w2, e, Kokkos::ALL, Kokkos::ALL);
      nn::dense_gemm(space, Kokkos::subview(h_, e, Kokkos::ALL, Kokkos::ALL), w2, Kokkos::subview(o_, e, Kokkos::ALL, Kokkos::ALL));
    }
    auto gate = L_.router.gate;
    auto pos = R.position;
    for_each_element(
        space, "hexamoe::padded_combine", T_, d, KOKKOS_LAMBDA(int t, int j) {
          float s = 0;
          for (int m = 0; m < k; ++m) {
            int const p = pos(t * k + m);
            if (p < 0) continue;
            int e = 0;
            while (p >= R.offsets(e + 1)) ++e;
            s += gate(t * k + m) * (o(e, p - R.offsets(e), j) + b2(e, j));
          }
          y(t, j) = s;
        });
  }

  // Expert part of the backward (weights and input), as the padded peers do it.
  void backward(ExecutionSpace const &space, M2 x, M2 dy, M2 dx) {
    compat::ScopedRegion region("hexamoe::padded::backward");
    auto const &c = L_.config();
    int const T_ = static_cast<int>(x.extent(0)), d = c.dim, H = c.hidden, E = c.experts, k = c.top_k;
    int const C = R_.capacity;
    auto R = R_;
    auto gate = L_.router.gate;
    if (static_cast<int>(dbuf_.extent(1)) != C || static_cast<int>(dbuf_.extent(0)) != E) {
      dbuf_ = M3("hexamoe::padded.dbuf", E, C, d);
      dz_ = M3("hexamoe::padded.dz", E, C, H);
    }
    auto dbuf = dbuf_, dz = dz_, z = z_;
    // dO in the padded layout (reuses o_): g * dy[t], zeros in padding.
    auto dO = o_;
    for_each_element(
        space, "hexamoe::padded_dispatch_grad", E * C, d, KOKKOS_LAMBDA(int es, int j) {
          int const e = es / C, slot = es % C;
          bool const used = slot < R.counts(e);
          int const f = used ? R.sorted_flat(R.offsets(e) + slot) : 0;
          dO(e, slot, j) = used ? gate(f) * dy(f / k, j) : 0.0f;
        });
    for (int e = 0; e < E; ++e) {
      auto sub = [e](auto v) { return Kokkos::subview(v, e, Kokkos::ALL, Kokkos::ALL); };
      nn::dense_gemm(space, sub(h_), sub(dO), sub(L_.w2_grad), 1.0f, 0.0f, true, false);  // dW2 = h^T dO
      nn::dense_gemm(space, sub(dO), sub(L_.w2), sub(dz_), 1.0f, 0.0f, false, true);      // dh = dO W2^T
    }
    Activation const act = c.activation;
    for_each_element(
        space, "hexamoe::padded_act_grad", E * C, H, KOKKOS_LAMBDA(int es, int n) {
          int const e = es / C, s = es % C;
          dz(e, s, n) *= activate_grad(act, z(e, s, n));
        });
    for (int e = 0; e < E; ++e) {
      auto sub = [e](auto v) { return Kokkos::subview(v, e, Kokkos::ALL, Kokkos::ALL); };
      nn::dense_gemm(space, sub(buf_), sub(dz_), sub(L_.w1_grad), 1.0f, 0.0f, true, false);  // dW1 = buf^T dz
      nn::dense_gemm(space, sub(dz_), sub(L_.w1), sub(dbuf_), 1.0f, 0.0f, false, true);      // dbuf = dz W1^T
    }
    auto pos = R.position;
    for_each_element(
        space, "hexamoe::padded_scatter_grad", T_, d, KOKKOS_LAMBDA(int t, int j) {
          float s = 0;
          for (int m = 0; m < k; ++m) {
            int const p = pos(t * k + m);
            if (p < 0) continue;
            int e = 0;
            while (p >= R.offsets(e + 1)) ++e;
            s += dbuf(e, p - R.offsets(e), j);
          }
          dx(t, j) = s;
        });
  }

 private:
  MoeLayer<float, ExecutionSpace> &L_;
  double cf_;
  RoutingIndex<memory_space> R_;
  M3 buf_, z_, h_, o_, dbuf_, dz_;
};

}  // namespace hexamoe::bench
