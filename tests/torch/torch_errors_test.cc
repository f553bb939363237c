// torch.OutOfMemoryError from outside PyTorch (integrations/torch/torch_errors.h). With the
// stand-in c10 (fake_c10.h) linked into this binary and exported (-rdynamic), as PyTorch's c10
// is in a PyTorch process, ThrowOutOfMemory must throw an object that a `catch` of
// c10::OutOfMemoryError takes, carrying the message, and that a `catch` of std::exception takes
// too. The test fails if the object is built from the wrong constructor, gets the wrong vtable,
// or is thrown with the wrong type.
#include <stdexcept>
#include <string>

#include "catch2/catch.hpp"
#include "integrations/torch/torch_errors.h"
#include "tests/torch/fake_c10.h"

namespace tidepool {
namespace {

using torch_hooks::ThrowError;
using torch_hooks::ThrowOutOfMemory;
using torch_hooks::TorchOutOfMemoryErrorAvailable;

TEST_CASE("with c10 in the process, an allocation failure is c10::OutOfMemoryError") {
  REQUIRE(TorchOutOfMemoryErrorAvailable());
  bool caught = false;
  try {
    ThrowOutOfMemory("tidepool: out of memory on device 0: tried to allocate 2.00 GiB");
  } catch (const c10::OutOfMemoryError& e) {
    caught = true;
    CHECK(e.msg() == "tidepool: out of memory on device 0: tried to allocate 2.00 GiB");
    CHECK(std::string(e.what()).find("raised from tidepool_torch_malloc") != std::string::npos);
  }
  CHECK(caught);
  // Also as its bases, which is how PyTorch's other handlers would see it.
  caught = false;
  try {
    ThrowOutOfMemory("second");
  } catch (const c10::Error& e) {
    caught = e.msg() == "second";
  }
  CHECK(caught);
}

TEST_CASE("any other failure is a std::runtime_error, never a c10 error") {
  bool caught = false;
  try {
    ThrowError("tidepool: a bad begin");
  } catch (const c10::Error&) {
    FAIL("a plain error must not be a c10 error");
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "tidepool: a bad begin";
  }
  CHECK(caught);
}

}  // namespace
}  // namespace tidepool
