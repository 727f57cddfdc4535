// ExpertSlice.hpp: which hidden units of every expert each rank of an MoE group
// holds (DESIGN.md section 3). Rank i holds H_i = p_i * H consecutive hidden
// units starting at offset_i: columns of W1 and b1, rows of W2. The H_i are
// integers summing to H exactly (largest remainder rounding, ties to the lower
// rank), so the slices tile [0, H) without gap or overlap.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace hexamoe::parallel {

struct ExpertSlice {
  int hidden = 0;            // H of the whole expert
  std::vector<int> counts;   // H_i per rank
  std::vector<int> offsets;  // first hidden unit of rank i (exclusive scan of counts)

  int ranks() const { return static_cast<int>(counts.size()); }
  int count(int rank) const { return counts.at(rank); }
  int offset(int rank) const { return offsets.at(rank); }

  // Split H by proportions (>= 0, summing to 1 up to rounding; they are
  // renormalised). An empty list means equal shares.
  static ExpertSlice split(int hidden, std::vector<double> proportions, int ranks) {
    if (hidden < 0) throw std::invalid_argument("ExpertSlice: hidden must be >= 0, got " + std::to_string(hidden));
    if (ranks < 1) throw std::invalid_argument("ExpertSlice: the group needs at least one rank");
    if (proportions.empty()) proportions.assign(std::size_t(ranks), 1.0);
    if (static_cast<int>(proportions.size()) != ranks)
      throw std::invalid_argument("ExpertSlice: " + std::to_string(proportions.size()) + " proportions for " +
                                  std::to_string(ranks) + " ranks");
    double sum = 0;
    for (double p : proportions) {
      if (!(p >= 0) || !std::isfinite(p))
        throw std::invalid_argument("ExpertSlice: proportions must be finite and >= 0");
      sum += p;
    }
    if (!(sum > 0)) throw std::invalid_argument("ExpertSlice: the proportions sum to zero");
    ExpertSlice s;
    s.hidden = hidden;
    s.counts.assign(std::size_t(ranks), 0);
    std::vector<double> rem(static_cast<std::size_t>(ranks));
    int used = 0;
    for (int i = 0; i < ranks; ++i) {
      double const exact = proportions[i] / sum * hidden;
      s.counts[i] = static_cast<int>(std::floor(exact));
      rem[i] = exact - s.counts[i];
      used += s.counts[i];
    }
    std::vector<int> order(static_cast<std::size_t>(ranks));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return rem[a] > rem[b]; });
    for (int j = 0; used < hidden; ++j, ++used) ++s.counts[order[std::size_t(j % ranks)]];
    s.offsets.assign(std::size_t(ranks), 0);
    for (int i = 1; i < ranks; ++i) s.offsets[i] = s.offsets[i - 1] + s.counts[i - 1];
    return s;
  }
};

}  // namespace hexamoe::parallel
