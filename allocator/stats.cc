// JSON form of the allocator statistics (docs/stats.md explains the fields).
#include "allocator/stats.h"

#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

std::string StatJson(const Stat& s) {
  return absl::StrFormat(R"({"current":%d,"peak":%d,"added":%d,"removed":%d})", s.current,
                         s.peak, s.added, s.removed);
}

}  // namespace

std::string AllocatorStats::ToJson() const {
  return absl::StrFormat(
      R"({"requested_bytes":%s,"allocated_bytes":%s,"active_blocks":%s,"reserved_bytes":%s,)"
      R"("segments":%s,"device_allocations":%d,"device_frees":%d,"retries":%d,"ooms":%d})",
      StatJson(requested_bytes), StatJson(allocated_bytes), StatJson(active_blocks),
      StatJson(reserved_bytes), StatJson(segments), device_allocations, device_frees, retries,
      ooms);
}

}  // namespace tidepool
