// EnvSwitch.hpp: on/off switches read from the environment (kernel choices
// kept for comparison runs): unset, empty or "1" is on, "0" is off, and any
// other value is an error that names the variable.
#pragma once

#include <stdexcept>
#include <string>

namespace hexamoe {
namespace detail {

inline bool parse_env_switch(char const *name, char const *v) {
  std::string const s = v == nullptr ? "" : v;
  if (s.empty() || s == "1") return true;
  if (s == "0") return false;
  throw std::invalid_argument(std::string(name) + "='" + s + "' is not 0 or 1");
}

}  // namespace detail
}  // namespace hexamoe
