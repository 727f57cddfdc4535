// Activation.hpp: the FFN activations (gelu, relu, silu) and their derivatives,
// evaluated in the accumulation type inside kernel epilogues.
#pragma once

#include "Compat.hpp"

#include <stdexcept>
#include <string>

namespace hexamoe {

enum class Activation { identity, gelu, relu, silu };

inline Activation activation_from_string(std::string const &name) {
  if (name == "gelu") return Activation::gelu;
  if (name == "relu") return Activation::relu;
  if (name == "silu") return Activation::silu;
  if (name == "identity") return Activation::identity;
  throw std::invalid_argument("unknown activation '" + name + "' (expected gelu, relu, silu or identity)");
}

inline char const *to_string(Activation a) {
  switch (a) {
    case Activation::gelu: return "gelu";
    case Activation::relu: return "relu";
    case Activation::silu: return "silu";
    default: return "identity";
  }
}

// Exact (erf) GELU, as PyTorch's default.
template <class Acc>
KOKKOS_INLINE_FUNCTION Acc activate(Activation a, Acc z) {
  switch (a) {
    case Activation::gelu:
      return Acc(0.5) * z * (Acc(1) + compat::erf(z * Acc(0.70710678118654752440)));
    case Activation::relu: return z > Acc(0) ? z : Acc(0);
    case Activation::silu: return z / (Acc(1) + compat::exp(-z));
    default: return z;
  }
}

template <class Acc>
KOKKOS_INLINE_FUNCTION Acc activate_grad(Activation a, Acc z) {
  switch (a) {
    case Activation::gelu: {
      Acc const cdf = Acc(0.5) * (Acc(1) + compat::erf(z * Acc(0.70710678118654752440)));
      Acc const pdf = Acc(0.39894228040143267794) * compat::exp(Acc(-0.5) * z * z);
      return cdf + z * pdf;
    }
    case Activation::relu: return z > Acc(0) ? Acc(1) : Acc(0);
    case Activation::silu: {
      Acc const s = Acc(1) / (Acc(1) + compat::exp(-z));
      return s * (Acc(1) + z * (Acc(1) - s));
    }
    default: return Acc(1);
  }
}

}  // namespace hexamoe
