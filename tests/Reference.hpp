// Reference.hpp: independent double-precision dense references and helpers
// for the tests. Nothing here uses the routing index or the operators: every
// (token, slot) is computed directly from its expert's dense weights.
#pragma once

#include "core/Activation.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace hexamoe::test {

using Vec = std::vector<double>;

inline Vec random_vec(std::size_t n, std::mt19937 &rng, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  Vec v(n);
  for (auto &x : v) x = d(rng);
  return v;
}

// Round every value to what storage type T can hold (the reference then sees
// exactly the operands the kernels see).
template <class T>
Vec rounded(Vec v) {
  for (auto &x : v) x = static_cast<double>(static_cast<T>(x));
  return v;
}

// A device view of extents dims filled from (or copied back to) a host vector.
template <class T, class View>
View to_view(Vec const &v, View view) {
  auto h = Kokkos::create_mirror_view(view);
  T *p = h.data();
  for (std::size_t i = 0; i < v.size(); ++i) p[i] = static_cast<T>(v[i]);
  Kokkos::deep_copy(view, h);
  return view;
}

template <class View>
Vec from_view(View const &view) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), view);
  Vec v(view.span());
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(h.data()[i]);
  return v;
}

// Fill a view with NaN so that an element the code under test never writes fails.
template <class T, class View>
void poison(View view) {
  auto h = Kokkos::create_mirror_view(view);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = static_cast<T>(std::numeric_limits<double>::quiet_NaN());
  Kokkos::deep_copy(view, h);
}

inline double act_ref(hexamoe::Activation a, double z) {
  switch (a) {
    case hexamoe::Activation::gelu: return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case hexamoe::Activation::relu: return z > 0 ? z : 0.0;
    case hexamoe::Activation::silu: return z / (1.0 + std::exp(-z));
    default: return z;
  }
}

// Routing ids: uniform, or skewed so that expert 0 takes most assignments and
// some experts none. Each token gets k distinct experts.
inline std::vector<int> random_routing(int T, int k, int E, std::mt19937 &rng, bool skewed) {
  std::vector<int> idx(static_cast<std::size_t>(T) * k);
  std::vector<int> perm(E);
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    if (skewed) {
      // Move expert 0 to the front 90% of the time; the last expert never appears if k < E.
      std::uniform_real_distribution<double> u(0, 1);
      if (u(rng) < 0.9) std::iter_swap(perm.begin(), std::find(perm.begin(), perm.end(), 0));
      if (k < E) std::iter_swap(std::find(perm.begin(), perm.end(), E - 1), perm.end() - 1);
    }
    for (int j = 0; j < k; ++j) idx[static_cast<std::size_t>(t) * k + j] = perm[j];
  }
  return idx;
}

// max |a - b| / max(max |b|, floor): a norm-relative error.
inline double rel_error(Vec const &a, Vec const &b, double floor = 1e-30) {
  double err = 0.0, mag = floor;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double const d = std::fabs(a[i] - b[i]);
    err = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(err, d);
    mag = std::max(mag, std::fabs(b[i]));
  }
  return err / mag;
}

}  // namespace hexamoe::test
