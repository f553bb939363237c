// The C API's symmetric-pool calls on the CPU (tidepool.h, "Symmetric NCCL pools"): every misuse
// a C caller can make returns its code and a message and changes nothing. NCCL is the fake
// (tests/nccl/fake_nccl.cc, through TIDEPOOL_NCCL_LIBRARY) and the devices are simulated, so a
// pool cannot be made here (its agreement needs a CUDA device; the refusal says so): the working
// path is proven on the GPU by tests/gpu/symmetric_c_api_test, and the pools themselves on the
// CPU by tests/nccl/symmetric_registry_test.
#include <cstring>
#include <string>

#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

using c_api_test::Fingerprint;
using c_api_test::NewPoolId;
using c_api_test::StartSimulatedRuntime;

// A stand-in communicator: the fake NCCL takes any pointer.
void* const kCommunicator = reinterpret_cast<void*>(uintptr_t{0x1000});

TEST_CASE("symmetric-pool calls refuse every misuse in words and change nothing") {
  StartSimulatedRuntime();
  void* live = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&live, 4096, 0, nullptr));
  const tidepool_pool_id ordinary = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, ordinary));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, ordinary));
  const tidepool_pool_id never = NewPoolId();
  const std::string before = Fingerprint({ordinary, never});

  struct Case {
    const char* what;
    tidepool_status expected;
    const char* words;  // the message must hold these
    tidepool_status status;
  };
  tidepool_pool_id made{};
  void* window = nullptr;
  size_t offset = 0;
  const Case cases[] = {
      {"create without an output", TIDEPOOL_INVALID_ARGUMENT, "pool is NULL",
       tidepool_symmetric_pool_create(0, kCommunicator, 0, 30.0, nullptr)},
      {"create with a NULL communicator", TIDEPOOL_INVALID_ARGUMENT, "communicator is NULL",
       tidepool_symmetric_pool_create(0, nullptr, 0, 30.0, &made)},
      {"create with no timeout", TIDEPOOL_INVALID_ARGUMENT, "must be positive",
       tidepool_symmetric_pool_create(0, kCommunicator, 0, 0.0, &made)},
      {"create on a simulated device", TIDEPOOL_FAILED_PRECONDITION, "not a CUDA device",
       tidepool_symmetric_pool_create(0, kCommunicator, 0, 30.0, &made)},
      {"create on an unknown device", TIDEPOOL_NOT_FOUND, "device 7",
       tidepool_symmetric_pool_create(7, kCommunicator, 0, 30.0, &made)},
      {"reserve of an ordinary pool", TIDEPOOL_NOT_FOUND, "not a symmetric pool",
       tidepool_symmetric_pool_reserve(0, ordinary, 1 << 20)},
      {"reserve of an unknown pool", TIDEPOOL_NOT_FOUND, "not a symmetric pool",
       tidepool_symmetric_pool_reserve(0, never, 1 << 20)},
      {"trim of an ordinary pool", TIDEPOOL_NOT_FOUND, "not a symmetric pool",
       tidepool_symmetric_pool_trim(0, ordinary)},
      {"destroy of an unknown pool", TIDEPOOL_NOT_FOUND, "not a symmetric pool",
       tidepool_symmetric_pool_destroy(1, never)},
      {"begin of an ordinary pool", TIDEPOOL_NOT_FOUND, "not a symmetric pool",
       tidepool_symmetric_begin(0, ordinary)},
      {"end without a symmetric pool", TIDEPOOL_NOT_FOUND, "not a symmetric pool",
       tidepool_symmetric_end(0, never)},
      {"lookup of an ordinary block", TIDEPOOL_INVALID_ARGUMENT, "no live buffer of a symmetric",
       tidepool_symmetric_lookup(live, &window, &offset)},
      {"lookup without a window output", TIDEPOOL_INVALID_ARGUMENT, "window is NULL",
       tidepool_symmetric_lookup(live, nullptr, &offset)},
      {"lookup without an offset output", TIDEPOOL_INVALID_ARGUMENT, "offset is NULL",
       tidepool_symmetric_lookup(live, &window, nullptr)},
  };
  for (const Case& c : cases) {
    INFO(c.what << " -> " << tidepool_status_name(c.status));
    CHECK(c.status == c.expected);
  }
  // Messages are per call: check each again for its words.
  CHECK(tidepool_symmetric_pool_create(0, kCommunicator, 0, 30.0, &made) ==
        TIDEPOOL_FAILED_PRECONDITION);
  CHECK(std::strstr(tidepool_last_error(), "tidepool_symmetric_pool_create: device 0 is not a "
                                           "CUDA device") != nullptr);
  CHECK(tidepool_symmetric_begin(0, ordinary) == TIDEPOOL_NOT_FOUND);
  CHECK(std::strstr(tidepool_last_error(), "is not a symmetric pool") != nullptr);
  CHECK(std::string(tidepool_status_name(TIDEPOOL_DEADLINE_EXCEEDED)) ==
        "TIDEPOOL_DEADLINE_EXCEEDED");
  CHECK(Fingerprint({ordinary, never}) == before);
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, ordinary));
  TIDEPOOL_REQUIRE_OK(tidepool_free(live));
}

}  // namespace
}  // namespace tidepool
