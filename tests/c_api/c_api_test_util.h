// Helpers for the C++ tests of the C API (tests/c_api/): checking a call's code with the
// thread's message in the failure, starting the process's simulated runtime once, and reading
// the state behind the C API through the C++ runtime it wraps (streams of a simulated device,
// pool information and statistics) so that a test can tell that a failed call changed nothing.
//
// Each test binary is one process with one runtime: a binary that needs another start (a bad
// configuration, no runtime yet) is a binary of its own.
#ifndef TIDEPOOL_TESTS_C_API_C_API_TEST_UTIL_H_
#define TIDEPOOL_TESTS_C_API_C_API_TEST_UTIL_H_

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "allocator/caching_allocator.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/simulated_device.h"
#include "allocator/stats.h"
#include "catch2/catch.hpp"
#include "runtime/global_runtime.h"
#include "integrations/c_api/tidepool.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "runtime/runtime.h"

namespace tidepool {
namespace c_api_test {

// REQUIREs that `call` returned `expected`, showing the code and the thread's last error
// otherwise.
#define TIDEPOOL_REQUIRE_STATUS(expected, call)                                         \
  do {                                                                                  \
    const tidepool_status tidepool_actual = (call);                                     \
    INFO(#call << " -> " << tidepool_status_name(tidepool_actual) << " (last error: \"" \
               << tidepool_last_error() << "\")");                                      \
    REQUIRE(tidepool_actual == (expected));                                             \
  } while (false)

#define TIDEPOOL_REQUIRE_OK(call) TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_OK, call)

// The devices and the size every test binary's simulated runtime has.
inline constexpr int kDevices = 2;
inline constexpr size_t kBytesPerDevice = size_t{1} << 30;

// Makes the process's runtime simulated on first call; later calls do nothing.
inline void StartSimulatedRuntime() {
  static const tidepool_status started = tidepool_init_simulated(kDevices, kBytesPerDevice);
  INFO("tidepool_init_simulated: " << tidepool_last_error());
  REQUIRE(started == TIDEPOOL_OK);
}

// The C++ runtime behind the C API (started first).
inline Runtime& TheRuntime() {
  StartSimulatedRuntime();
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  REQUIRE(runtime.ok());
  return **runtime;
}

inline PoolManager& PoolsOf(int device) {
  absl::StatusOr<PoolManager*> pools = TheRuntime().Pools(device);
  REQUIRE(pools.ok());
  return **pools;
}

// The runtime's device of an ordinal, with its streams and graphs (allocator/graph_device.h).
inline GraphDevice& GraphDeviceOf(int device) {
  absl::StatusOr<GraphDevice*> graph_device = TheRuntime().GraphDeviceOf(device);
  REQUIRE(graph_device.ok());
  return **graph_device;
}

// A new stream of a simulated device: the C API has no call for one, the device does.
inline Stream NewStream(int device) {
  absl::StatusOr<Stream> stream = GraphDeviceOf(device).CreateStream();
  REQUIRE(stream.ok());
  return *stream;
}

inline PoolId ToPoolId(tidepool_pool_id pool) { return PoolId{pool.first, pool.second}; }

inline tidepool_pool_id NewPoolId() {
  tidepool_pool_id pool;
  TIDEPOOL_REQUIRE_OK(tidepool_new_pool_id(&pool));
  return pool;
}

inline bool SamePool(tidepool_pool_id a, tidepool_pool_id b) {
  return a.first == b.first && a.second == b.second;
}

// What the pool manager says of a pool (it must exist).
inline PoolInfo InfoOf(int device, tidepool_pool_id pool) {
  absl::StatusOr<PoolInfo> info = PoolsOf(device).Info(ToPoolId(pool));
  REQUIRE(info.ok());
  return *info;
}

inline AllocatorStats StatsOf(int device, tidepool_pool_id pool) {
  absl::StatusOr<AllocatorStats> stats = PoolsOf(device).Stats(ToPoolId(pool));
  REQUIRE(stats.ok());
  return *stats;
}

// The pool of a live block, through the C API.
inline tidepool_pool_id PoolOf(const void* ptr) {
  int device = -1;
  tidepool_pool_id pool{};
  TIDEPOOL_REQUIRE_OK(tidepool_pool_of(ptr, &device, &pool));
  return pool;
}

// The simulated device behind a device ordinal of the runtime.
inline SimulatedDevice& Simulated(int device) {
  auto* simulated = dynamic_cast<SimulatedDevice*>(PoolsOf(device).allocator()->device());
  REQUIRE(simulated != nullptr);
  return *simulated;
}

// Everything a failed call must leave as it was, as text: each device's stats, snapshot, captures
// and graphs, its route for the NULL stream, and the counts of `pools`.
inline std::string Fingerprint(const std::vector<tidepool_pool_id>& pools) {
  std::string state;
  for (int device = 0; device < kDevices; ++device) {
    PoolManager& manager = PoolsOf(device);
    absl::StrAppend(&state, "device ", device, " stats ", manager.allocator()->GetStats().ToJson(),
                    " snapshot ", manager.allocator()->SnapshotJson(), " captures ",
                    manager.allocator()->captures_underway(), " graphs ",
                    Simulated(device).live_graphs());
    absl::StatusOr<PoolId> route = manager.RouteOf(nullptr);
    absl::StrAppend(&state, " route ", route.ok() ? route->ToString() : route.status().ToString());
    for (tidepool_pool_id pool : pools) {
      absl::StatusOr<PoolInfo> info = manager.Info(ToPoolId(pool));
      if (!info.ok()) continue;
      absl::StrAppend(&state, " pool ", ToPoolId(pool).ToString(), " references ", info->references,
                      " routes ", info->routes, " live ", info->live_blocks, " released ",
                      info->released);
    }
  }
  return state;
}

// One misuse of the C API: the call, the code it must return, and a phrase its message holds.
struct Misuse {
  const char* function;  // the C function called: the message starts with its name
  std::function<tidepool_status()> call;
  tidepool_status expected;
  const char* message_holds;
};

// Makes each call and checks its code, that its message starts with the function's name and holds
// the phrase, and that nothing (Fingerprint of `pools`) changed.
inline void CheckMisuses(const std::vector<Misuse>& misuses,
                         const std::vector<tidepool_pool_id>& pools) {
  for (const Misuse& misuse : misuses) {
    const std::string before = Fingerprint(pools);
    const tidepool_status status = misuse.call();
    const std::string message = tidepool_last_error();
    INFO(misuse.function << " -> " << tidepool_status_name(status) << ": \"" << message << "\"");
    CHECK(status == misuse.expected);
    CHECK(message.rfind(absl::StrCat(misuse.function, ": "), 0) == 0);
    CHECK(message.find(misuse.message_holds) != std::string::npos);
    CHECK(Fingerprint(pools) == before);
  }
}

}  // namespace c_api_test
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_C_API_C_API_TEST_UTIL_H_
