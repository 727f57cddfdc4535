// Activation.hpp: the FFN activations (gelu, relu, silu) and their derivatives,
// evaluated in the accumulation type inside kernel epilogues.
#pragma once

#include "Compat.hpp"
#include "nn/HostMath.hpp"

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

// Host epilogues: the activation, or the multiplication by its derivative,
// over a row of n accumulators, with float32 exp and erf that vectorise
// (nn/HostMath.hpp; relative error below 3e-7) instead of libm's scalar calls.
template <class Acc>
KOKKOS_INLINE_FUNCTION void activate_row(Activation a, Acc *v, int n) {
  switch (a) {
    case Activation::gelu:
      for (int i = 0; i < n; ++i) v[i] = nn::gelu<true>(v[i]);
      break;
    case Activation::relu:
      for (int i = 0; i < n; ++i) v[i] = v[i] > Acc(0) ? v[i] : Acc(0);
      break;
    case Activation::silu:
      for (int i = 0; i < n; ++i) v[i] = v[i] / (Acc(1) + nn::exp_of<true>(-v[i]));
      break;
    default: break;
  }
}
// v[i] *= act'(z[i]) (z: storage values, converted).
template <class Acc, class TZ>
KOKKOS_INLINE_FUNCTION void activate_grad_row(Activation a, Acc *v, TZ const *z, int n) {
  switch (a) {
    case Activation::gelu:
      for (int i = 0; i < n; ++i) v[i] *= nn::gelu_grad<true>(static_cast<Acc>(z[i]));
      break;
    case Activation::relu:
      for (int i = 0; i < n; ++i) v[i] = static_cast<Acc>(z[i]) > Acc(0) ? v[i] : Acc(0);
      break;
    case Activation::silu:
      for (int i = 0; i < n; ++i) {
        Acc const x = static_cast<Acc>(z[i]), s = Acc(1) / (Acc(1) + nn::exp_of<true>(-x));
        v[i] *= s * (Acc(1) + x * (Acc(1) - s));
      }
      break;
    default: break;
  }
}

}  // namespace hexamoe
