// LayerBench.cpp: see LayerBench.hpp.
#include "bench/LayerBench.hpp"

#include "bench/PaddedBaseline.hpp"
#include "core/MemoryTracker.hpp"
#include "core/MoeLayer.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <ostream>
#include <random>
#include <sstream>
#include <vector>

namespace hexamoe::bench {

std::vector<BenchShape> const &swin_shapes() {
  static std::vector<BenchShape> const shapes = {
      {"swinS-s3-top1", 14400, 384, 1536, 8, 1},
      {"swinS-s3-top2", 14400, 384, 1536, 8, 2},
      {"swinS-s4-top1", 3600, 768, 3072, 8, 1},
      {"swinB-s3-top1", 14400, 512, 2048, 8, 1},
      {"swinB-s4-top1", 3600, 1024, 4096, 8, 1},
      {"e64-top2-skew", 16384, 1024, 4096, 64, 2, 2.0},
  };
  return shapes;
}

namespace {

using Space = Kokkos::DefaultExecutionSpace;
using Mem = Space::memory_space;

template <class F>
double median_ms(F &&f, int reps, int warmup) {
  for (int i = 0; i < warmup; ++i) f();
  Kokkos::fence();
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    Kokkos::fence();
    ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

template <class T>
void fill_random(Matrix<T, Mem> v, unsigned seed, double scale) {
  auto h = Kokkos::create_mirror_view(v);
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = static_cast<T>(nd(rng));
  Kokkos::deep_copy(v, h);
}

struct Row {
  std::string shape, impl, dtype;
  int tokens;
  double fwd_ms, fb_ms, fwd_gflops, fb_gflops, peak_mib;
  double check = -1;  // max relative difference to the other implementation
  std::string math = {};  // the expert GEMMs' arithmetic
  std::string router = {};  // ours: the router forward's path
  double ref_err = -1;  // max |y - y64| / max |y64| over sampled tokens
  double fwd_train_ms = -1;  // ours: forward that keeps activations for backward
};

// The arithmetic of our expert GEMMs for storage T on this backend.
template <class T>
std::string math_name() {
  using detail::dev::Math;
  switch (detail::dev::math_for<Space, T, T>()) {
    case Math::bf16_mma: return detail::dev::wgmma_in_use(Space()) ? "bf16-wgmma" : "bf16-mma";
    case Math::tf32_mma: return "tf32";
    case Math::tf32x3_mma: return "3xtf32";
    case Math::simt: return "fma";
    default: return "portable";
  }
}

// y against a float64 evaluation of the layer, on the routing the router chose,
// for an evenly spaced sample of tokens (plain loops on the host; the operands
// as stored): max |y - y64| / max |y64| over the sample, as the peers report it.
template <class T>
double reference_error(MoeLayer<T, Space> const &L, Matrix<T, Mem> x, Matrix<T, Mem> y) {
  auto const &c = L.config();
  int const Tn = static_cast<int>(x.extent(0)), d = c.dim, H = c.local_hidden(), k = c.top_k;
  auto hx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  auto hy = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  auto w1 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.w1);
  auto b1 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.b1);
  auto w2 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.w2);
  auto b2 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.b2);
  auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.router.idx);
  auto gate = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.router.gate);
  double const per_token = 4.0 * k * d * double(H);
  int const samples = std::max(1, std::min(256, std::min(Tn, static_cast<int>(2e9 / per_token))));
  double err = 0, mag = 1e-300;
  std::vector<double> h(H), o(d);
  for (int si = 0; si < samples; ++si) {
    int const t = static_cast<int>((static_cast<long long>(si) * Tn) / samples);
    std::fill(o.begin(), o.end(), 0.0);
    for (int j = 0; j < k; ++j) {
      int const e = idx(t, j);
      double const g = static_cast<double>(gate(t * k + j));
      for (int n = 0; n < H; ++n) h[n] = static_cast<double>(static_cast<float>(b1(e, n)));
      for (int i = 0; i < d; ++i) {
        double const xi = static_cast<double>(static_cast<float>(hx(t, i)));
        for (int n = 0; n < H; ++n) h[n] += xi * static_cast<double>(static_cast<float>(w1(e, i, n)));
      }
      for (int n = 0; n < H; ++n) h[n] = 0.5 * h[n] * (1.0 + std::erf(h[n] / std::sqrt(2.0)));
      for (int i = 0; i < d; ++i) {
        double v = static_cast<double>(static_cast<float>(b2(e, i)));
        for (int n = 0; n < H; ++n) v += h[n] * static_cast<double>(static_cast<float>(w2(e, n, i)));
        o[i] += g * v;
      }
    }
    for (int i = 0; i < d; ++i) {
      err = std::max(err, std::fabs(static_cast<double>(static_cast<float>(hy(t, i))) - o[i]));
      mag = std::max(mag, std::fabs(o[i]));
    }
  }
  return err / mag;
}

MoeLayerConfig config_of(BenchShape const &s, int tokens, double cf) {
  MoeLayerConfig c;
  c.dim = s.dim;
  c.hidden = s.hidden;
  c.experts = s.experts;
  c.top_k = s.top_k;
  c.activation = Activation::gelu;
  c.aux_loss_weight = 0.01;
  c.capacity_factor = cf;
  (void)tokens;
  return c;
}

template <class T>
Row bench_ours(BenchShape const &s, int tokens, BenchOptions const &opt, char const *dtype) {
  detail::release_split_workspace<Mem>();  // this row's peak includes the buffer it needs
  MemoryTracker::reset_peak();
  std::string const space = Mem::name();
  std::int64_t const base = MemoryTracker::current(space);
  Row r{s.name, "hexamoe", dtype, tokens, 0, 0, 0, 0, 0};
  r.math = math_name<T>();
  r.router = detail::router_mma_in_use<T, Space>(s.experts) ? "mma"
             : Kokkos::SpaceAccessibility<Space, Kokkos::HostSpace>::accessible ? "host"
                                                                                : "lanes";
  {
    MoeLayer<T, Space> L(config_of(s, tokens, 0.0));
    L.init(opt.seed);
    if (s.skew != 0.0) {
      auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.router.bias);
      hb(0) += static_cast<typename MoeLayer<T, Space>::Acc>(s.skew);
      Kokkos::deep_copy(L.router.bias, hb);
    }
    Matrix<T, Mem> x("bench.x", tokens, s.dim), y("bench.y", tokens, s.dim), dy("bench.dy", tokens, s.dim),
        dx("bench.dx", tokens, s.dim);
    fill_random<T>(x, opt.seed + 1, 1.0);
    fill_random<T>(dy, opt.seed + 2, 1.0);
    Space space_;
    // "fwd" is the inference forward (nothing kept for backward), as the
    // peers time theirs under torch.no_grad(); the training forward is
    // reported beside it.
    r.fwd_ms = median_ms([&] { L.infer(space_, x, y); }, opt.reps, opt.warmup);
    r.fwd_train_ms = median_ms([&] { L.forward(space_, x, y); }, opt.reps, opt.warmup);
    r.fb_ms = median_ms(
        [&] {
          L.forward(space_, x, y);
          L.backward(space_, dy, dx);
        },
        opt.reps, opt.warmup);
    r.peak_mib = double(MemoryTracker::peak(space) - base) / (1 << 20);
    if (opt.reference) {
      L.infer(space_, x, y);
      r.ref_err = reference_error(L, x, y);
    }
  }
  double const flops = 4.0 * tokens * s.top_k * double(s.dim) * s.hidden;  // two GEMMs, useful work
  r.fwd_gflops = flops / r.fwd_ms / 1e6;
  r.fb_gflops = 3 * flops / r.fb_ms / 1e6;
  return r;
}

Row bench_padded(BenchShape const &s, int tokens, BenchOptions const &opt) {
  detail::release_split_workspace<Mem>();
  MemoryTracker::reset_peak();
  std::string const space = Mem::name();
  std::int64_t const base = MemoryTracker::current(space);
  Row r{s.name, "padded-gemm", "float32", tokens, 0, 0, 0, 0, 0};
  {
    MoeLayer<float, Space> L(config_of(s, tokens, opt.capacity_factor));
    L.init(opt.seed);
    if (s.skew != 0.0) {
      auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.router.bias);
      hb(0) += static_cast<float>(s.skew);
      Kokkos::deep_copy(L.router.bias, hb);
    }
    PaddedMoe<Space> P(L, opt.capacity_factor);
    Matrix<float, Mem> x("bench.x", tokens, s.dim), y("bench.y", tokens, s.dim), y2("bench.y2", tokens, s.dim),
        dy("bench.dy", tokens, s.dim), dx("bench.dx", tokens, s.dim);
    fill_random<float>(x, opt.seed + 1, 1.0);
    fill_random<float>(dy, opt.seed + 2, 1.0);
    Space space_;
    r.fwd_ms = median_ms([&] { P.forward(space_, x, y); }, opt.reps, opt.warmup);
    r.fb_ms = median_ms(
        [&] {
          P.forward(space_, x, y);
          P.backward(space_, x, dy, dx);
        },
        opt.reps, opt.warmup);
    r.peak_mib = double(MemoryTracker::peak(space) - base) / (1 << 20);
    // Sanity check: our layer with the same capacity computes the same output.
    L.forward(space_, x, y2);
    auto a = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
    auto b = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y2);
    double err = 0, mag = 1e-30;
    for (std::size_t i = 0; i < a.span(); ++i) {
      err = std::max(err, double(std::fabs(a.data()[i] - b.data()[i])));
      mag = std::max(mag, double(std::fabs(b.data()[i])));
    }
    r.check = err / mag;
  }
  double const flops = 4.0 * tokens * s.top_k * double(s.dim) * s.hidden;
  r.fwd_gflops = flops / r.fwd_ms / 1e6;
  r.fb_gflops = 3 * flops / r.fb_ms / 1e6;
  return r;
}

void print(std::ostream &out, Row const &r, bool json) {
  if (json) {
    out << "{\"cfg\": \"" << r.shape << "\", \"impl\": \"" << r.impl << "\", \"dtype\": \"" << r.dtype
        << "\", \"tokens\": " << r.tokens << ", \"fwd_ms\": " << r.fwd_ms << ", \"fwdbwd_ms\": " << r.fb_ms
        << ", \"fwd_GFLOPs\": " << r.fwd_gflops << ", \"fwdbwd_GFLOPs\": " << r.fb_gflops
        << ", \"peak_MiB\": " << r.peak_mib;
    if (r.check >= 0) out << ", \"check_rel_diff\": " << r.check;
    if (!r.math.empty()) out << ", \"math\": \"" << r.math << "\"";
    if (!r.router.empty()) out << ", \"router\": \"" << r.router << "\"";
    if (r.ref_err >= 0) out << ", \"max_rel_diff_fp64\": " << r.ref_err;
    if (r.fwd_train_ms >= 0) out << ", \"fwd_train_ms\": " << r.fwd_train_ms;
    out << "}" << std::endl;
    return;
  }
  out << std::left << std::setw(15) << r.shape << std::setw(13) << r.impl << std::setw(9) << r.dtype << std::right
      << std::setw(7) << r.tokens << std::fixed << std::setprecision(2) << std::setw(11) << r.fwd_ms << std::setw(11)
      << r.fb_ms << std::setprecision(1) << std::setw(10) << r.fwd_gflops << std::setw(10) << r.fb_gflops
      << std::setw(10) << r.peak_mib;
  if (r.check >= 0) out << std::scientific << std::setprecision(1) << "  check " << r.check;
  if (!r.math.empty()) out << "  " << r.math;
  if (!r.router.empty()) out << "  router " << r.router;
  if (r.ref_err >= 0) out << std::scientific << std::setprecision(1) << "  fp64 diff " << r.ref_err;
  out << std::defaultfloat << std::endl;
}

// The shape's token count times the scale; refused where the layer could not
// number its routed rows (T * top_k) with int.
int scaled_tokens(BenchShape const &s, double scale) {
  std::ostringstream what;
  what << "bench: --token-scale " << scale;
  if (!std::isfinite(scale) || !(scale > 0)) throw std::invalid_argument(what.str() + ": must be a finite number > 0");
  double const tokens = std::max(1.0, std::round(s.tokens * scale));
  if (tokens * s.top_k > double(INT_MAX)) {
    what << std::setprecision(15) << " gives " << s.name << " " << tokens << " tokens x top_k " << s.top_k
         << " = " << tokens * s.top_k << " routed rows, more than the " << INT_MAX << " one layer call can index";
    throw std::invalid_argument(what.str());
  }
  return static_cast<int>(tokens);
}

}  // namespace

BenchNeed layer_bench_need(BenchOptions const &opt) {
  BenchNeed need;
  auto consider = [&](BenchShape const &s, int T, char const *impl, char const *dtype, double bytes) {
    if (bytes <= need.bytes) return;
    need.bytes = bytes;
    need.row = s.name + " " + dtype + " (" + impl + ", " + std::to_string(T) + " tokens)";
  };
  for (auto const &s : swin_shapes()) {
    if (!opt.only.empty() && std::find(opt.only.begin(), opt.only.end(), s.name) == opt.only.end()) continue;
    int const T = scaled_tokens(s, opt.token_scale);
    double const E = s.experts, d = s.dim, H = s.hidden, S = double(T) * s.top_k;
    double const weights = E * (2.0 * d * H + H + d);  // gradients in float32
    // Our row: x, y, dy, dx; z1, h, o and dL/dg of the S routed rows; the
    // router's probabilities, their gradient and log-sum-exp per token; its
    // expert ids and gates and the routing index's two lists per routed row.
    double const routing = 4.0 * T * (2.0 * E + 1.0) + 16.0 * S;
    auto ours = [&](double elem) {
      return weights * (elem + 4.0) + 4.0 * T * d * elem + S * (2.0 * H + d) * elem + 4.0 * S + routing;
    };
    for (auto const &dt : opt.dtypes) consider(s, T, "hexamoe", dt.c_str(), ours(dt == "bfloat16" ? 2.0 : 4.0));
    if (opt.baseline) {
      // The padded row: x, y, y2, dy, dx; the [E, C, .] buffers (dispatch, z,
      // h, o, and the gradients dbuf, dz); routing as ours.
      double const C = std::ceil(opt.capacity_factor * S / E);
      consider(s, T, "padded-gemm", "float32",
               weights * 8.0 + 20.0 * T * d + 4.0 * E * C * (3.0 * d + 3.0 * H) + routing);
    }
  }
  return need;
}

int run_layer_bench(BenchOptions const &opt, std::ostream &out) {
  for (auto const &name : opt.only) {
    auto const &all = swin_shapes();
    if (std::none_of(all.begin(), all.end(), [&](BenchShape const &s) { return s.name == name; })) {
      std::string known;
      for (auto const &s : all) known += (known.empty() ? "" : ", ") + s.name;
      throw std::invalid_argument("bench: unknown shape '" + name + "' (known: " + known + ")");
    }
  }
  for (auto const &dt : opt.dtypes)
    if (dt != "float32" && dt != "bfloat16")
      throw std::invalid_argument("bench: unknown dtype '" + dt + "' (expected float32 or bfloat16)");
  for (auto const &s : swin_shapes())
    if (opt.only.empty() || std::find(opt.only.begin(), opt.only.end(), s.name) != opt.only.end())
      (void)scaled_tokens(s, opt.token_scale);
  MemoryTracker::install();
  if (!opt.json) {
    out << "# backend " << Space::name() << ", " << opt.reps << " timed runs (median), " << opt.warmup
        << " warm-up; GFLOP/s count useful work only (4*T*k*d*H forward, 3x for forward+backward); hexamoe fwd is"
           " the inference forward (MoeLayer::infer), f+b uses the training forward\n";
    out << std::left << std::setw(15) << "shape" << std::setw(13) << "impl" << std::setw(9) << "dtype" << std::right
        << std::setw(7) << "tokens" << std::setw(11) << "fwd ms" << std::setw(11) << "f+b ms" << std::setw(10)
        << "fwd GF/s" << std::setw(10) << "f+b GF/s" << std::setw(10) << "peak MiB" << std::endl;
  }
  for (auto const &s : swin_shapes()) {
    if (!opt.only.empty() && std::find(opt.only.begin(), opt.only.end(), s.name) == opt.only.end()) continue;
    int const tokens = scaled_tokens(s, opt.token_scale);
    for (auto const &dt : opt.dtypes) {
      if (dt == "float32") {
        print(out, bench_ours<float>(s, tokens, opt, "float32"), opt.json);
      } else if (dt == "bfloat16") {
        print(out, bench_ours<bfloat16>(s, tokens, opt, "bfloat16"), opt.json);
      } else {
        throw std::invalid_argument("bench: unknown dtype '" + dt + "' (expected float32 or bfloat16)");
      }
    }
    if (opt.baseline) print(out, bench_padded(s, tokens, opt), opt.json);
  }
  return 0;
}

}  // namespace hexamoe::bench
