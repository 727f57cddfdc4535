// InputError.hpp: the error every input check throws (deck, data files,
// checkpoints). It names what is wrong and where, so the driver can print one
// clear line on every rank and exit with status 2.
#pragma once

#include <stdexcept>
#include <string>

namespace hexamoe {

class InputError : public std::runtime_error {
 public:
  // where: a file, or a file:line, or a deck key ("moe.top_k"); what: the problem.
  InputError(std::string where, std::string const &what);
  std::string const &where() const { return where_; }

 private:
  std::string where_;
};

}  // namespace hexamoe
