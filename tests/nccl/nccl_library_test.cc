// The NCCL loader (nccl/nccl_library.h) against fake libraries: a library that is missing, too
// old, or lacks an entry point is refused with a message that says which and what to do; a
// current one loads with its version; Get() follows TIDEPOOL_NCCL_LIBRARY. The fakes' paths come
// in FAKE_NCCL_CURRENT, FAKE_NCCL_OLD and FAKE_NCCL_NO_WINDOW (tests/nccl/BUILD.bazel sets them).
#include <cstdlib>
#include <memory>
#include <string>

#include "catch2/catch.hpp"
#include "nccl/nccl_library.h"

namespace tidepool {
namespace {

std::string Fake(int index) {
  const char* paths[] = {std::getenv("FAKE_NCCL_CURRENT"), std::getenv("FAKE_NCCL_OLD"),
                         std::getenv("FAKE_NCCL_NO_WINDOW")};
  REQUIRE(paths[index] != nullptr);
  return paths[index];
}

TEST_CASE("a library that is not there is refused, saying where to point TIDEPOOL_NCCL_LIBRARY") {
  absl::StatusOr<std::unique_ptr<NcclLibrary>> library =
      NcclLibrary::Open("/nonexistent/libnccl.so.2");
  REQUIRE(absl::IsUnavailable(library.status()));
  const std::string message(library.status().message());
  INFO(message);
  CHECK(message.find("/nonexistent/libnccl.so.2") != std::string::npos);
  CHECK(message.find("TIDEPOOL_NCCL_LIBRARY") != std::string::npos);
}

TEST_CASE("an NCCL older than 2.27 is refused, naming its version") {
  absl::StatusOr<std::unique_ptr<NcclLibrary>> library = NcclLibrary::Open(Fake(1));
  REQUIRE(absl::IsFailedPrecondition(library.status()));
  const std::string message(library.status().message());
  INFO(message);
  CHECK(message.find("NCCL 2.26.5") != std::string::npos);
  CHECK(message.find("2.27.0 or newer") != std::string::npos);
}

TEST_CASE("a library without ncclCommWindowRegister is refused, naming it") {
  absl::StatusOr<std::unique_ptr<NcclLibrary>> library = NcclLibrary::Open(Fake(2));
  REQUIRE(absl::IsUnavailable(library.status()));
  INFO(library.status().message());
  CHECK(library.status().message().find("ncclCommWindowRegister") != std::string::npos);
}

TEST_CASE("a current library loads with its version, and Check words its results") {
  absl::StatusOr<std::unique_ptr<NcclLibrary>> library = NcclLibrary::Open(Fake(0));
  INFO(library.status().ToString());
  REQUIRE(library.ok());
  CHECK((*library)->version() == 22809);
  CHECK(NcclLibrary::VersionText((*library)->version()) == "2.28.9");
  CHECK(NcclLibrary::VersionText(2804) == "2.8.4");  // the old encoding
  void* ptr = nullptr;
  const absl::Status status =
      (*library)->Check((*library)->ncclMemAlloc(&ptr, 4096), "ncclMemAlloc(4096)");
  CHECK(absl::IsInvalidArgument(status));  // ncclInvalidUsage
  CHECK(status.message().find("ncclMemAlloc(4096)") != std::string::npos);
  CHECK(status.message().find("fake NCCL: not implemented") != std::string::npos);
  CHECK((*library)->Check(ncclSuccess, "anything").ok());
  CHECK(absl::IsUnavailable((*library)->Check(ncclRemoteError, "ncclAllGather")));
}

TEST_CASE("Get opens TIDEPOOL_NCCL_LIBRARY, once") {
  REQUIRE(setenv("TIDEPOOL_NCCL_LIBRARY", Fake(0).c_str(), 1) == 0);
  absl::StatusOr<const NcclLibrary*> first = NcclLibrary::Get();
  INFO(first.status().ToString());
  REQUIRE(first.ok());
  CHECK((*first)->path() == Fake(0));
  REQUIRE(setenv("TIDEPOOL_NCCL_LIBRARY", "/elsewhere/libnccl.so.2", 1) == 0);
  absl::StatusOr<const NcclLibrary*> again = NcclLibrary::Get();
  REQUIRE(again.ok());
  CHECK(*again == *first);
}

}  // namespace
}  // namespace tidepool
