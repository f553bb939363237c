// Starting the C API's simulated runtime: arguments out of range and a bad TIDEPOOL_CONF are
// refused and make nothing, so a corrected call still starts it; a second start is refused.
// One TEST_CASE in steps, because the runtime can be made once per process.
#include <cstdlib>
#include <string>

#include "catch2/catch.hpp"
#include "runtime/global_runtime.h"
#include "integrations/c_api/tidepool.h"
#include "runtime/runtime.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

TEST_CASE("init_simulated refuses bad arguments and configuration, then starts once") {
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_init_simulated(0, 1 << 30));
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_init_simulated(65, 1 << 30));
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_init_simulated(1, 0));
  // A device no host could describe is refused, not turned into host memory at the first malloc.
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                          tidepool_init_simulated(1, size_t{1} << 56));
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                          tidepool_init_simulated(1, (size_t{1} << 40) + 1));

  REQUIRE(setenv("TIDEPOOL_CONF", "expandable_segments:true,no_such_key:1", 1) == 0);
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_init_simulated(1, 1 << 30));
  const std::string message = tidepool_last_error();
  INFO(message);
  CHECK(message.rfind("tidepool_init_simulated: ", 0) == 0);
  CHECK(message.find("no_such_key") != std::string::npos);

  REQUIRE(setenv("TIDEPOOL_CONF", "expandable_segments:false", 1) == 0);
  TIDEPOOL_REQUIRE_OK(tidepool_init_simulated(3, 1 << 30));
  int count = 0;
  TIDEPOOL_REQUIRE_OK(tidepool_device_count(&count));
  CHECK(count == 3);
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  REQUIRE(runtime.ok());
  absl::StatusOr<PoolManager*> pools = (*runtime)->Pools(0);
  REQUIRE(pools.ok());
  CHECK_FALSE((*pools)->allocator()->config().expandable_segments);

  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_init_simulated(3, 1 << 30));
  TIDEPOOL_REQUIRE_OK(tidepool_device_count(&count));
  CHECK(count == 3);
}

}  // namespace
}  // namespace tidepool
