// Attention.hpp: multi-head self-attention over B images of L tokens each
// (rows b*L .. b*L+L-1 of a [B*L, D] matrix), no mask, as timm's ViT:
//   qkv = x Wqkv + bqkv                  [B*L, 3D]: q | k | v, head h at columns h*dh..
//   P[b, h] = softmax(q k^T / sqrt(dh))   [L, L] per (image, head)
//   ctx[b*L + i, h*dh ..] = P[b, h] v     [B*L, D]
//   y = ctx Wproj + bproj
// The two projections are GEMMs over all tokens (Linear); the attention core
// runs one team per (image, head) (see AttentionCoreKernel), each output
// element written by one thread in a fixed order.
//
// forward saves qkv, P [B*H, L, L] and ctx (module-owned buffers) and a view of
// x; backward overwrites the gradients of both projections and writes dx.
#pragma once

#include "core/nn/HostMath.hpp"
#include "core/nn/Linear.hpp"

namespace hexamoe {
namespace nn {
namespace detail {

// cs[M, N] += xs[M, K] ws[K, N] for row-major blocks with leading dimensions
// ldx, ldw, ldc, as rows of axpys: cs[i, :] += xs[i, k] ws[k, :] for k in
// increasing order. For these small blocks (L, dh <= 64) this form vectorises
// well where register-blocked micro-kernels with run-time strides do not.
template <class T>
KOKKOS_INLINE_FUNCTION void host_block_gemm(T const *KOKKOS_RESTRICT xs, int ldx, T const *KOKKOS_RESTRICT ws,
                                            int ldw, T *KOKKOS_RESTRICT cs, int ldc, int M, int N, int K) {
  for (int i = 0; i < M; ++i) {
    T *KOKKOS_RESTRICT c = cs + i * ldc;
    for (int k = 0; k < K; ++k) {
      T const a = xs[i * ldx + k];
      T const *KOKKOS_RESTRICT w = ws + k * ldw;
      for (int j = 0; j < N; ++j) c[j] += a * w[j];
    }
  }
}

// The attention core, one team per (image b, head h), for the rows
// b*L .. b*L+L-1 and the head's columns of q, k and v.
//   forward:  S = scale * q k^T, P = softmax(S) (saved), ctx = P v
//   backward: dP = dctx v^T, dS = scale * P o (dP - rowsum(dP o P)),
//             dq = dS k, dk = dS^T q, dv = P^T dctx
// Host backends (one thread per team): every product is a small row-major
// block product (host_block_gemm), the transposed operands (k^T, v^T, dS^T,
// P^T) staged in scratch. Devices: each output element is one thread's dot
// product in a fixed order, k^T or v^T staged in scratch.
template <class ExecutionSpace, class Scalar>
struct AttentionCoreKernel {
  using memory_space = typename ExecutionSpace::memory_space;
  using member_type = typename Kokkos::TeamPolicy<ExecutionSpace>::member_type;
  static constexpr bool host = on_host<ExecutionSpace>;
  static constexpr int device_team_size = 128;

  Matrix<Scalar const, memory_space> qkv;   // [B*L, 3D]
  Tensor3<Scalar, memory_space> probs;      // [B*H, L, L]
  Matrix<Scalar, memory_space> ctx;         // [B*L, D] (forward output)
  Matrix<Scalar const, memory_space> dctx;  // [B*L, D] (backward input)
  Tensor3<Scalar, memory_space> dscores;    // [B*H, L, L] (backward work)
  Matrix<Scalar, memory_space> dqkv;        // [B*L, 3D] (backward output)
  int L, H, dh, D;
  Scalar scale;
  bool backward;

  // Device: k^T or v^T. Host: four [dh, L] blocks and one [L, L] block.
  static std::size_t scratch_bytes(int L, int dh) {
    std::size_t const n = host ? 4 * std::size_t(L) * dh + std::size_t(L) * L : std::size_t(L) * dh;
    return sizeof(Scalar) * n + 5 * 64;
  }

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    if (backward)
      run_backward(team);
    else
      run_forward(team);
  }

  // t[d*L + j] = qkv(row0 + j, col + d): the [L, dh] block at column col, transposed.
  KOKKOS_INLINE_FUNCTION void stage_transposed(member_type const &team, Scalar *t, int row0, int col) const {
    Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L * dh), [&](int idx) {
      int const j = idx / dh, d = idx % dh;
      t[d * L + j] = qkv(row0 + j, col + d);
    });
  }

  // Host: t[c*rows + r] = a[r*lda + c] for an [rows, cols] block, and back.
  static KOKKOS_INLINE_FUNCTION void transpose(Scalar const *KOKKOS_RESTRICT a, int lda, Scalar *KOKKOS_RESTRICT t,
                                               int rows, int cols) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) t[c * rows + r] = a[r * lda + c];
  }
  static KOKKOS_INLINE_FUNCTION void untranspose(Scalar const *KOKKOS_RESTRICT t, Scalar *KOKKOS_RESTRICT a, int lda,
                                                 int rows, int cols) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) a[r * lda + c] = t[c * rows + r];
  }
  static KOKKOS_INLINE_FUNCTION void zero(Scalar *a, int n) {
    for (int i = 0; i < n; ++i) a[i] = Scalar(0);
  }

  KOKKOS_INLINE_FUNCTION void run_forward(member_type const &team) const {
    int const bh = team.league_rank(), b = bh / H, h = bh % H;
    int const row0 = b * L, qc = h * dh, kc = D + h * dh, vc = 2 * D + h * dh;
    if constexpr (host) {
      // Products with a long (L) inner dimension: S = q k^T, ctx^T = v^T P^T.
      auto &shmem = team.team_shmem();
      Scalar *kt = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *vt = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *ot = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *pt = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * L));
      int const ld = 3 * D;
      Scalar *p = &probs(bh, 0, 0);
      transpose(&qkv(row0, kc), ld, kt, L, dh);
      transpose(&qkv(row0, vc), ld, vt, L, dh);
      zero(p, L * L);
      host_block_gemm(&qkv(row0, qc), ld, kt, L, p, L, L, L, dh);
      for (int i = 0; i < L; ++i) softmax_row(p + i * L);
      transpose(p, L, pt, L, L);
      zero(ot, L * dh);
      host_block_gemm(vt, L, pt, L, ot, L, dh, L, L);
      untranspose(ot, &ctx(row0, qc), D, L, dh);
    } else {
      Scalar *kt = static_cast<Scalar *>(team.team_shmem().get_shmem(sizeof(Scalar) * L * dh));
      stage_transposed(team, kt, row0, kc);
      team.team_barrier();
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L * L), [&](int ij) {
        int const i = ij / L, j = ij % L;
        Scalar s = 0;
        for (int d = 0; d < dh; ++d) s += qkv(row0 + i, qc + d) * kt[d * L + j];
        probs(bh, i, j) = s;
      });
      team.team_barrier();
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L), [&](int i) { softmax_row(&probs(bh, i, 0)); });
      team.team_barrier();
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L * dh), [&](int id) {
        int const i = id / dh, d = id % dh;
        Scalar o = 0;
        for (int j = 0; j < L; ++j) o += probs(bh, i, j) * qkv(row0 + j, vc + d);
        ctx(row0 + i, qc + d) = o;
      });
    }
  }

  // s (one row of q k^T) -> softmax(scale * s), in place.
  KOKKOS_INLINE_FUNCTION void softmax_row(Scalar *s) const {
    for (int j = 0; j < L; ++j) s[j] *= scale;
    Scalar m = s[0];
    for (int j = 1; j < L; ++j) m = s[j] > m ? s[j] : m;
    for (int j = 0; j < L; ++j) s[j] = exp_of<host>(s[j] - m);  // vectorises on the host
    Scalar sum = 0;
    for (int j = 0; j < L; ++j) sum += s[j];
    Scalar const inv = Scalar(1) / sum;
    for (int j = 0; j < L; ++j) s[j] *= inv;
  }

  // ds: one row of dP on entry, scale * P o (dP - <dP, P>) on exit.
  KOKKOS_INLINE_FUNCTION void scores_grad_row(Scalar *ds, Scalar const *p) const {
    Scalar dot = 0;
    for (int j = 0; j < L; ++j) dot += ds[j] * p[j];
    for (int j = 0; j < L; ++j) ds[j] = scale * p[j] * (ds[j] - dot);
  }

  KOKKOS_INLINE_FUNCTION void run_backward(member_type const &team) const {
    int const bh = team.league_rank(), b = bh / H, h = bh % H;
    int const row0 = b * L, qc = h * dh, kc = D + h * dh, vc = 2 * D + h * dh;
    if constexpr (host) {
      // dP = dctx v^T; dS in place; then, with L as the inner dimension,
      // dq^T = k^T dS^T, dk^T = q^T dS, dv^T = dctx^T P.
      auto &shmem = team.team_shmem();
      Scalar *vt = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *kt = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *qt = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *ot = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * dh));
      Scalar *st = static_cast<Scalar *>(shmem.get_shmem(sizeof(Scalar) * L * L));
      int const ld = 3 * D;
      Scalar *ds = &dscores(bh, 0, 0);
      Scalar const *p = &probs(bh, 0, 0);
      Scalar const *g = &dctx(row0, qc);
      transpose(&qkv(row0, vc), ld, vt, L, dh);
      zero(ds, L * L);
      host_block_gemm(g, D, vt, L, ds, L, L, L, dh);
      for (int i = 0; i < L; ++i) scores_grad_row(ds + i * L, p + i * L);
      transpose(ds, L, st, L, L);
      transpose(&qkv(row0, kc), ld, kt, L, dh);
      zero(ot, L * dh);
      host_block_gemm(kt, L, st, L, ot, L, dh, L, L);
      untranspose(ot, &dqkv(row0, qc), ld, L, dh);
      transpose(&qkv(row0, qc), ld, qt, L, dh);
      zero(ot, L * dh);
      host_block_gemm(qt, L, ds, L, ot, L, dh, L, L);
      untranspose(ot, &dqkv(row0, kc), ld, L, dh);
      transpose(g, D, qt, L, dh);  // dctx^T (q^T is no longer needed)
      zero(ot, L * dh);
      host_block_gemm(qt, L, p, L, ot, L, dh, L, L);
      untranspose(ot, &dqkv(row0, vc), ld, L, dh);
    } else {
      Scalar *vt = static_cast<Scalar *>(team.team_shmem().get_shmem(sizeof(Scalar) * L * dh));
      stage_transposed(team, vt, row0, vc);
      team.team_barrier();
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L * L), [&](int ij) {
        int const i = ij / L, j = ij % L;
        Scalar s = 0;
        for (int d = 0; d < dh; ++d) s += dctx(row0 + i, qc + d) * vt[d * L + j];
        dscores(bh, i, j) = s;
      });
      team.team_barrier();
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L),
                           [&](int i) { scores_grad_row(&dscores(bh, i, 0), &probs(bh, i, 0)); });
      team.team_barrier();
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L * dh), [&](int id) {
        int const i = id / dh, d = id % dh;
        Scalar dq = 0;
        for (int j = 0; j < L; ++j) dq += dscores(bh, i, j) * qkv(row0 + j, kc + d);
        dqkv(row0 + i, qc + d) = dq;
      });
      Kokkos::parallel_for(Kokkos::TeamThreadRange(team, L * dh), [&](int jd) {
        int const j = jd / dh, d = jd % dh;
        Scalar dk = 0, dv = 0;
        for (int i = 0; i < L; ++i) {
          dk += dscores(bh, i, j) * qkv(row0 + i, qc + d);
          dv += probs(bh, i, j) * dctx(row0 + i, qc + d);
        }
        dqkv(row0 + j, kc + d) = dk;
        dqkv(row0 + j, vc + d) = dv;
      });
    }
  }
};

}  // namespace detail

template <class ExecutionSpace, class Scalar = float>
class Attention {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;

  Linear<ExecutionSpace, Scalar> qkv;   // D -> 3D
  Linear<ExecutionSpace, Scalar> proj;  // D -> D

  Attention() = default;
  Attention(ExecutionSpace const &space, int dim, int heads)
      : qkv(space, dim, 3 * dim), proj(space, dim, dim), dim_(dim), heads_(heads) {
    detail::require(heads > 0 && dim % heads == 0, "Attention",
                    "dim " + std::to_string(dim) + " is not a positive multiple of heads " + std::to_string(heads));
  }

  int dim() const { return dim_; }
  int heads() const { return heads_; }
  int head_dim() const { return dim_ / heads_; }

  void init(std::uint64_t seed) {
    qkv.init(detail::derive_seed(seed, 0));
    proj.init(detail::derive_seed(seed, 1));
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) const {
    auto p = qkv.parameters(prefix + ".qkv");
    auto q = proj.parameters(prefix + ".proj");
    p.insert(p.end(), q.begin(), q.end());
    return p;
  }

  // x [B*L, D] -> y [B*L, D], L tokens per image. Saves x, qkv, P, ctx.
  void forward(ExecutionSpace const &space, const_matrix x, matrix y, int tokens_per_image) {
    compat::ScopedRegion region("hexamoe::nn::Attention::forward");
    std::string const op = "Attention::forward";
    int const L = tokens_per_image;
    detail::require(L > 0 && x.extent(0) % std::size_t(L) == 0, op,
                    "x has " + std::to_string(x.extent(0)) + " rows, not a multiple of " + std::to_string(L) +
                        " tokens per image");
    std::size_t const n = x.extent(0);
    detail::require_extents(x, {n, std::size_t(dim_)}, op, "x");
    detail::require_extents(y, {n, std::size_t(dim_)}, op, "y");
    int const B = static_cast<int>(n / L);
    detail::ensure(space, qkv_, "hexamoe::nn::Attention::qkv", n, std::size_t(3 * dim_));
    detail::ensure(space, ctx_, "hexamoe::nn::Attention::ctx", n, std::size_t(dim_));
    detail::ensure(space, probs_, "hexamoe::nn::Attention::probabilities", std::size_t(B) * heads_, std::size_t(L),
                   std::size_t(L));
    tokens_ = L;
    qkv.forward(space, x, qkv_);
    {
      compat::ScopedRegion core("hexamoe::nn::Attention::core_forward");
      Kernel k = kernel(L);
      k.probs = probs_;
      k.ctx = ctx_;
      k.backward = false;
      launch(space, k, B, "hexamoe::nn::Attention::core_forward");
    }
    proj.forward(space, ctx_, y);
  }

  // dy [B*L, D] -> projection gradients (overwritten), dx [B*L, D] (skipped when empty).
  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) {
    compat::ScopedRegion region("hexamoe::nn::Attention::backward");
    detail::require(tokens_ > 0, "Attention::backward", "called before forward");
    std::size_t const n = qkv_.extent(0);
    int const L = tokens_, B = static_cast<int>(n / L);
    detail::require_extents(dy, {n, std::size_t(dim_)}, "Attention::backward", "dy");
    detail::ensure(space, dctx_, "hexamoe::nn::Attention::dctx", n, std::size_t(dim_));
    detail::ensure(space, dqkv_, "hexamoe::nn::Attention::dqkv", n, std::size_t(3 * dim_));
    detail::ensure(space, dscores_, "hexamoe::nn::Attention::dscores", std::size_t(B) * heads_, std::size_t(L),
                   std::size_t(L));
    proj.backward(space, dy, dctx_);
    {
      compat::ScopedRegion core("hexamoe::nn::Attention::core_backward");
      Kernel k = kernel(L);
      k.probs = probs_;
      k.dctx = dctx_;
      k.dscores = dscores_;
      k.dqkv = dqkv_;
      k.backward = true;
      launch(space, k, B, "hexamoe::nn::Attention::core_backward");
    }
    qkv.backward(space, dqkv_, dx);
  }

  // The saved softmax probabilities [B*H, L, L] (row (b*H + h), query i, key j).
  Tensor3<Scalar const, memory_space> probabilities() const { return probs_; }

 private:
  using Kernel = detail::AttentionCoreKernel<ExecutionSpace, Scalar>;

  Kernel kernel(int L) const {
    Kernel k;
    k.qkv = qkv_;
    k.L = L;
    k.H = heads_;
    k.dh = head_dim();
    k.D = dim_;
    k.scale = Scalar(1) / static_cast<Scalar>(std::sqrt(static_cast<double>(head_dim())));
    return k;
  }

  void launch(ExecutionSpace const &space, Kernel const &k, int B, std::string const &label) const {
    if (B == 0) return;
    int const team = Kernel::host ? 1 : Kernel::device_team_size;
    Kokkos::TeamPolicy<ExecutionSpace> policy(space, B * heads_, team);
    policy.set_scratch_size(0, Kokkos::PerTeam(Kernel::scratch_bytes(k.L, k.dh)));
    Kokkos::parallel_for(label, policy, k);
  }

  int dim_ = 0, heads_ = 1, tokens_ = 0;
  matrix qkv_, ctx_, dctx_, dqkv_;
  Tensor3<Scalar, memory_space> probs_, dscores_;
};

}  // namespace nn
}  // namespace hexamoe
