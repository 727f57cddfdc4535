// SideStream.hpp: a second queue for the independent halves of the MoE
// backward. The weight gradients (ESTMM) do not feed the input gradients
// (ESMM), so on a GPU the two can run side by side: the blocks of one fill
// the multiprocessors that the other's last, partial wave leaves idle.
//
// On CUDA the side queue is one process-wide Kokkos::Cuda instance on its
// own stream, ordered against the caller's instance with events (no host
// waits): wait_for() makes the side queue wait for what the caller's
// instance has queued so far, join() makes the caller's instance wait for
// what the side queue has queued.
// Everywhere else (host backends, HIP) side() is the caller's own instance
// and both calls do nothing, so the order is the program order.
//
// Every ESTMM of the layer runs on the side queue, so two of them never
// overlap (they share one workspace of partial sums). The side stream and
// its events are released at Kokkos::finalize.
// HEXAMOE_BACKWARD_STREAMS=0 in the environment keeps everything on the
// caller's instance (for comparison); backward_streams_override() does the
// same from code (tests: 1 on, -1 off, 0 as the environment says); any
// other value of the variable is an error that names it.
#pragma once

#include "EnvSwitch.hpp"

#include <Kokkos_Core.hpp>

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace hexamoe {
namespace detail {

inline int &backward_streams_override() {
  static int v = 0;
  return v;
}
inline bool parse_backward_streams(char const *v) { return parse_env_switch("HEXAMOE_BACKWARD_STREAMS", v); }
inline bool backward_streams_enabled() {
  if (backward_streams_override() != 0) return backward_streams_override() > 0;
  static bool const on = parse_backward_streams(std::getenv("HEXAMOE_BACKWARD_STREAMS"));
  return on;
}

template <class ExecutionSpace>
class SideStream {
 public:
  explicit SideStream(ExecutionSpace const &main) : main_(main) {}
  ExecutionSpace const &side() const { return main_; }
  void wait_for() const {}
  void join() const {}

 private:
  ExecutionSpace main_;
};

#if defined(KOKKOS_ENABLE_CUDA)
namespace side_stream_impl {

inline void check(cudaError_t e, char const *what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("hexamoe side stream: ") + what + ": " + cudaGetErrorString(e));
}

struct CudaSide {
  cudaStream_t stream = nullptr;
  cudaEvent_t main_done = nullptr, side_done = nullptr;
  Kokkos::Cuda *space = nullptr;
};

// The process-wide side queue, created on first use.
inline CudaSide &cuda_side() {
  static CudaSide *s = nullptr;
  if (s == nullptr) {
    auto *n = new CudaSide();
    check(cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check(cudaEventCreateWithFlags(&n->main_done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    check(cudaEventCreateWithFlags(&n->side_done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    n->space = new Kokkos::Cuda(n->stream);
    s = n;
    Kokkos::push_finalize_hook([] {
      s->space->fence("hexamoe: side stream, finalize");
      delete s->space;
      cudaEventDestroy(s->main_done);
      cudaEventDestroy(s->side_done);
      cudaStreamDestroy(s->stream);
      delete s;
      s = nullptr;
    });
  }
  return *s;
}

}  // namespace side_stream_impl

template <>
class SideStream<Kokkos::Cuda> {
 public:
  explicit SideStream(Kokkos::Cuda const &main)
      : main_(main), s_(backward_streams_enabled() ? &side_stream_impl::cuda_side() : nullptr) {}
  Kokkos::Cuda const &side() const { return s_ != nullptr ? *s_->space : main_; }
  void wait_for() const {
    if (s_ == nullptr) return;
    side_stream_impl::check(cudaEventRecord(s_->main_done, main_.cuda_stream()), "cudaEventRecord");
    side_stream_impl::check(cudaStreamWaitEvent(s_->stream, s_->main_done, 0), "cudaStreamWaitEvent");
  }
  void join() const {
    if (s_ == nullptr) return;
    side_stream_impl::check(cudaEventRecord(s_->side_done, s_->stream), "cudaEventRecord");
    side_stream_impl::check(cudaStreamWaitEvent(main_.cuda_stream(), s_->side_done, 0), "cudaStreamWaitEvent");
  }

 private:
  Kokkos::Cuda main_;
  side_stream_impl::CudaSide *s_;
};
#endif

// Joins the side queue into the caller's instance when it leaves scope
// (also on an exception).
template <class ExecutionSpace>
class SideStreamJoin {
 public:
  explicit SideStreamJoin(SideStream<ExecutionSpace> const &s) : s_(s) {}
  ~SideStreamJoin() {
    try {
      s_.join();
    } catch (...) {
    }
  }
  SideStreamJoin(SideStreamJoin const &) = delete;
  SideStreamJoin &operator=(SideStreamJoin const &) = delete;

 private:
  SideStream<ExecutionSpace> const &s_;
};

}  // namespace detail
}  // namespace hexamoe
