// Checks the GPU tests make through the C API (integrations/c_api/tidepool.h): a call that must
// succeed (REQUIRE_TP, with tidepool's own words on failure), and a pool's statistics read back
// from tidepool_stats_json. Shared by the single-GPU symmetric test and the multi-GPU one.
#ifndef TIDEPOOL_TESTS_GPU_C_API_CHECKS_H_
#define TIDEPOOL_TESTS_GPU_C_API_CHECKS_H_

#include <string>
#include <vector>

#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"

// REQUIREs that a C API call returned TIDEPOOL_OK, naming the call, its status and
// tidepool_last_error() otherwise.
#define REQUIRE_TP(call)                                                   \
  do {                                                                     \
    const tidepool_status tp_status = (call);                             \
    INFO(#call << ": " << tidepool_status_name(tp_status) << ": "         \
               << tidepool_last_error());                                  \
    REQUIRE(tp_status == TIDEPOOL_OK);                                     \
  } while (0)

namespace tidepool {
namespace gpu_test {

// The statistics JSON of `pool` on `device`.
inline std::string StatsOf(int device, tidepool_pool_id pool) {
  std::vector<char> json(1 << 14);
  REQUIRE_TP(tidepool_stats_json(device, &pool, json.data(), json.size(), nullptr));
  return json.data();
}

// A number from the stats JSON: `field`'s "current" (for a Stat) or its value.
inline long long StatField(const std::string& json, const std::string& field) {
  const size_t at = json.find("\"" + field + "\":");
  REQUIRE(at != std::string::npos);
  size_t value = at + field.size() + 3;
  if (json[value] == '{') value = json.find("\"current\":", value) + 10;
  return std::stoll(json.substr(value));
}

}  // namespace gpu_test
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_GPU_C_API_CHECKS_H_
