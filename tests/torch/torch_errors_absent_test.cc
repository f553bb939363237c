// Without PyTorch's c10 in the process (integrations/torch/torch_errors.h), an allocation
// failure is a std::runtime_error with the same message, and TorchOutOfMemoryErrorAvailable
// says so.
#include <stdexcept>
#include <string>

#include "catch2/catch.hpp"
#include "integrations/torch/torch_errors.h"

namespace tidepool {
namespace {

TEST_CASE("without c10, an allocation failure is a std::runtime_error") {
  CHECK_FALSE(torch_hooks::TorchOutOfMemoryErrorAvailable());
  bool caught = false;
  try {
    torch_hooks::ThrowOutOfMemory("tidepool: out of memory");
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "tidepool: out of memory";
  }
  CHECK(caught);
}

}  // namespace
}  // namespace tidepool
