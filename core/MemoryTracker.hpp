// MemoryTracker.hpp: counts the bytes Kokkos allocates, through the Kokkos
// Tools allocation callbacks (present in 3.4 and 4.x), so benchmarks and tests
// can report and assert current and peak usage per memory space.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace hexamoe {

class MemoryTracker {
 public:
  // Install the callbacks (idempotent). Call after Kokkos::initialize.
  static void install() {
    auto &s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.installed) return;
    Kokkos::Tools::Experimental::set_allocate_data_callback(&on_allocate);
    Kokkos::Tools::Experimental::set_deallocate_data_callback(&on_deallocate);
    s.installed = true;
  }
  // Bytes currently allocated in the named space ("Host", "Cuda", ...), and the
  // peak since the last reset_peak().
  static std::int64_t current(std::string const &space) { return get(space).current; }
  static std::int64_t peak(std::string const &space) { return get(space).peak; }
  static void reset_peak() {
    auto &s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    for (auto &kv : s.spaces) kv.second.peak = kv.second.current;
  }
  // Bytes currently held by allocations whose label starts with prefix, in
  // every space, or only in the named space (a device build also keeps host
  // mirrors of some device views under the same labels).
  static std::int64_t current_with_prefix(std::string const &prefix) { return with_prefix(prefix, nullptr); }
  static std::int64_t current_with_prefix(std::string const &prefix, std::string const &space) {
    return with_prefix(prefix, &space);
  }
  // The memory space name Kokkos reports for a space type.
  template <class MemorySpace>
  static std::string name_of() {
    return MemorySpace::name();
  }

 private:
  struct Counter {
    std::int64_t current = 0, peak = 0;
  };
  struct State {
    std::mutex mutex;
    bool installed = false;
    std::map<std::string, Counter> spaces;
    std::map<std::pair<std::string, std::string>, std::int64_t> labels;  // (space, label) -> bytes
  };
  static std::int64_t with_prefix(std::string const &prefix, std::string const *space) {
    auto &s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    std::int64_t total = 0;
    for (auto const &kv : s.labels)
      if ((!space || kv.first.first == *space) && kv.first.second.compare(0, prefix.size(), prefix) == 0)
        total += kv.second;
    return total;
  }
  static State &state() {
    static State s;
    return s;
  }
  static Counter get(std::string const &space) {
    auto &s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    auto it = s.spaces.find(space);
    return it == s.spaces.end() ? Counter{} : it->second;
  }
  static void on_allocate(Kokkos::Tools::SpaceHandle handle, char const *label, void const *, std::uint64_t size) {
    auto &s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    auto &c = s.spaces[handle.name];
    c.current += static_cast<std::int64_t>(size);
    if (c.current > c.peak) c.peak = c.current;
    s.labels[{handle.name, label}] += static_cast<std::int64_t>(size);
  }
  static void on_deallocate(Kokkos::Tools::SpaceHandle handle, char const *label, void const *, std::uint64_t size) {
    auto &s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.spaces[handle.name].current -= static_cast<std::int64_t>(size);
    s.labels[{handle.name, label}] -= static_cast<std::int64_t>(size);
  }
};

}  // namespace hexamoe
