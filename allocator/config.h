// Configuration of the caching allocator, read once from TIDEPOOL_CONF.
//
// The format is "key:value,key:value". Every key is documented in docs/configuration.md; a key
// that is not known is an error, never silence, so a typo cannot quietly change behaviour.
#ifndef TIDEPOOL_ALLOCATOR_CONFIG_H_
#define TIDEPOOL_ALLOCATOR_CONFIG_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tidepool {

struct Config {
  // Grow by mapping physical chunks into one large reserved range per stream (true), or by
  // taking whole segments from the device (false).
  bool expandable_segments = true;
  // Blocks larger than this are never split for a smaller request (bytes; SIZE_MAX = no limit).
  size_t max_split_size = SIZE_MAX;
  // Address space reserved for each expandable segment (bytes; 0 = the device's total memory, at
  // most kMaxExpandableReserve).
  size_t expandable_reserve = 0;
  // The largest physical allocation (run) an expandable growth takes from the device, in bytes,
  // rounded down to whole granules (at least one). Larger runs mean fewer driver calls; smaller
  // ones keep reserved memory closer to live memory (a run moves or goes back only whole).
  size_t expandable_run = size_t{16} << 20;
  // When growing an expandable segment, first unmap whole free chunks anywhere in the allocator
  // (those whose stream's fence shows the work queued before their free done) and map them where
  // they are needed, so that reserved memory tracks live memory.
  bool release_free_chunks_on_growth = true;

  // Parses "key:value,..." ("" gives the defaults).
  static absl::StatusOr<Config> Parse(absl::string_view text);
  // Parses the TIDEPOOL_CONF environment variable.
  static absl::StatusOr<Config> FromEnvironment();
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CONFIG_H_
