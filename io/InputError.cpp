// InputError.cpp: see InputError.hpp.
#include "io/InputError.hpp"

namespace hexamoe {

InputError::InputError(std::string where, std::string const &what)
    : std::runtime_error(where.empty() ? what : where + ": " + what), where_(std::move(where)) {}

}  // namespace hexamoe
