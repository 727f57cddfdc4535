// Parameter.hpp: how a module exposes its trainable tensors to the optimiser,
// the gradient all-reduce and the checkpoints: a named flat view of the values,
// the matching gradient, and the global shape.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <string>
#include <vector>

namespace hexamoe {

template <class T, class MemorySpace>
using Matrix = Kokkos::View<T **, Kokkos::LayoutRight, MemorySpace>;
template <class T, class MemorySpace>
using Tensor3 = Kokkos::View<T ***, Kokkos::LayoutRight, MemorySpace>;

template <class MemorySpace>
struct Parameter {
  std::string name;                   // "block3.attn.qkv.weight"
  std::vector<std::size_t> shape;     // global shape (as in checkpoints)
  Kokkos::View<float *, MemorySpace> value;  // flat, contiguous, same memory as the module's view
  Kokkos::View<float *, MemorySpace> grad;   // flat gradient, same extent
  bool decay = true;                  // AdamW weight decay applies (not to biases, norms)
  bool expert = false;                // sharded expert weight (not replicated across the MoE group)
  // The block of the global tensor this process holds (empty = all of it).
  // Sharded tensors (expert slices) are neither all-reduced nor written whole.
  std::vector<std::size_t> offset, count;

  bool sharded() const { return !count.empty(); }
};

// A flat view over a contiguous multi-dimensional view's memory.
template <class View>
Kokkos::View<float *, typename View::memory_space> flat(View const &v) {
  static_assert(std::is_same_v<typename View::non_const_value_type, float>, "parameters are float32");
  return Kokkos::View<float *, typename View::memory_space>(v.data(), v.span());
}

}  // namespace hexamoe
