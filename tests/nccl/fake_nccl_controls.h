// The fake NCCL (fake_nccl.cc) as tests use it: its library opened through nccl/nccl_library.h,
// and its controls (violation and window counts, NULL windows, a failing registration; cliques of
// communicators whose registration is collective, and the hangs it would cause), reset for each
// test. The library's path comes in FAKE_NCCL (tests/nccl/BUILD.bazel sets it).
#ifndef TIDEPOOL_TESTS_NCCL_FAKE_NCCL_CONTROLS_H_
#define TIDEPOOL_TESTS_NCCL_FAKE_NCCL_CONTROLS_H_

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <memory>

#include "catch2/catch.hpp"
#include "nccl/nccl_library.h"

namespace tidepool {
namespace testing {

// The fake's library and its controls.
struct Fake {
  std::unique_ptr<NcclLibrary> nccl;
  void (*reset)() = nullptr;
  int64_t (*violations)() = nullptr;
  int64_t (*live_windows)() = nullptr;
  int64_t (*live_allocations)() = nullptr;
  int64_t (*registrations)() = nullptr;
  void (*set_null_windows)(int) = nullptr;
  void (*fail_next_register)() = nullptr;
  void (*fail_next_alloc)() = nullptr;
  // Cliques and groups (fake_nccl.cc, CLIQUES AND GROUPS).
  void (*set_clique)(ncclComm_t comm, int clique, int rank, int size) = nullptr;
  void (*set_collective_timeout_ms)(int ms) = nullptr;
  int64_t (*hangs)() = nullptr;
  int64_t (*grouped_registrations)() = nullptr;
  void (*set_null_window_on)(ncclComm_t comm, int on) = nullptr;
  int64_t (*live_windows_on)(ncclComm_t comm) = nullptr;
  int (*group_depth)() = nullptr;
};

template <typename Fn>
void Control(void* handle, const char* name, Fn* slot) {
  *slot = reinterpret_cast<Fn>(dlsym(handle, name));
  REQUIRE(*slot != nullptr);
}

inline Fake& TheFake() {
  static Fake* const fake = [] {
    auto* made = new Fake();
    const char* path = std::getenv("FAKE_NCCL");
    REQUIRE(path != nullptr);
    absl::StatusOr<std::unique_ptr<NcclLibrary>> nccl = NcclLibrary::Open(path);
    INFO(nccl.status().ToString());
    REQUIRE(nccl.ok());
    made->nccl = *std::move(nccl);
    void* handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    REQUIRE(handle != nullptr);
    Control(handle, "fake_nccl_reset", &made->reset);
    Control(handle, "fake_nccl_violations", &made->violations);
    Control(handle, "fake_nccl_live_windows", &made->live_windows);
    Control(handle, "fake_nccl_live_allocations", &made->live_allocations);
    Control(handle, "fake_nccl_registrations", &made->registrations);
    Control(handle, "fake_nccl_set_null_windows", &made->set_null_windows);
    Control(handle, "fake_nccl_fail_next_register", &made->fail_next_register);
    Control(handle, "fake_nccl_fail_next_alloc", &made->fail_next_alloc);
    Control(handle, "fake_nccl_set_clique", &made->set_clique);
    Control(handle, "fake_nccl_set_collective_timeout_ms", &made->set_collective_timeout_ms);
    Control(handle, "fake_nccl_hangs", &made->hangs);
    Control(handle, "fake_nccl_grouped_registrations", &made->grouped_registrations);
    Control(handle, "fake_nccl_set_null_window_on", &made->set_null_window_on);
    Control(handle, "fake_nccl_live_windows_on", &made->live_windows_on);
    Control(handle, "fake_nccl_group_depth", &made->group_depth);
    return made;
  }();
  fake->reset();
  return *fake;
}

// Communicators are opaque to the fake: any distinct pointers do.
inline ncclComm_t FakeCommunicator(int n) {
  return reinterpret_cast<ncclComm_t>(uintptr_t{0x100} * (n + 1));
}

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_NCCL_FAKE_NCCL_CONTROLS_H_
