// MoeGroup.hpp: the ranks that share the experts of every MoE layer (DESIGN.md
// section 3), as an MPI communicator split from the job's (MPI_Comm_split,
// consecutive ranks: group g = ranks [g*size, (g+1)*size)), and the matching
// replica communicator that links the ranks holding the same expert slice in
// different groups (their slice gradients are summed over it, like the
// gradients of replicated parameters).
//
// The proportions p_i are the group members' shares of the FFN hidden
// dimension; given per job rank (the deck's list), each group takes its own
// entries and rescales them to sum to 1. Empty = equal shares.
#pragma once

#include <mpi.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/ExpertSlice.hpp"

namespace hexamoe::parallel {

class MoeGroup {
 public:
  // Collective over parent. group_size 0 (or the job size) = one group of all ranks.
  MoeGroup(MPI_Comm parent, int group_size, std::vector<double> const &job_proportions = {}) {
    int prank = 0, psize = 1;
    MPI_Comm_rank(parent, &prank);
    MPI_Comm_size(parent, &psize);
    if (group_size <= 0) group_size = psize;
    if (psize % group_size != 0)
      throw std::invalid_argument("MoeGroup: a group size of " + std::to_string(group_size) + " does not divide " +
                                  std::to_string(psize) + " ranks");
    if (!job_proportions.empty() && static_cast<int>(job_proportions.size()) != psize)
      throw std::invalid_argument("MoeGroup: " + std::to_string(job_proportions.size()) + " proportions for " +
                                  std::to_string(psize) + " ranks");
    group_index_ = prank / group_size;
    MPI_Comm_split(parent, group_index_, prank, &comm_);
    MPI_Comm_split(parent, prank % group_size, prank, &replicas_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(replicas_, &replica_);
    MPI_Comm_size(replicas_, &num_replicas_);
    if (!job_proportions.empty()) {
      double sum = 0;
      for (int i = 0; i < size_; ++i) sum += job_proportions[std::size_t(group_index_ * size_ + i)];
      for (int i = 0; i < size_; ++i)
        proportions_.push_back(sum > 0 ? job_proportions[std::size_t(group_index_ * size_ + i)] / sum : 1.0 / size_);
    } else {
      proportions_.assign(std::size_t(size_), 1.0 / size_);
    }
  }
  ~MoeGroup() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    if (replicas_ != MPI_COMM_NULL) MPI_Comm_free(&replicas_);
  }
  MoeGroup(MoeGroup const &) = delete;
  MoeGroup &operator=(MoeGroup const &) = delete;

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int index() const { return group_index_; }  // which group of the job
  // Ranks holding this rank's slice in the other groups (size 1 with one group).
  MPI_Comm replicas() const { return replicas_; }
  int replica() const { return replica_; }
  int num_replicas() const { return num_replicas_; }
  std::vector<double> const &proportions() const { return proportions_; }
  ExpertSlice slice(int hidden) const { return ExpertSlice::split(hidden, proportions_, size_); }
  ExpertSlice slice(int hidden, std::vector<double> const &proportions) const {
    return ExpertSlice::split(hidden, proportions, size_);
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL, replicas_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, group_index_ = 0, replica_ = 0, num_replicas_ = 1;
  std::vector<double> proportions_;
};

}  // namespace hexamoe::parallel
