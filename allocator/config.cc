// Parsing of TIDEPOOL_CONF. Each key here has a line in docs/configuration.md.
#include "allocator/config.h"

#include <cstdlib>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "allocator/size_policy.h"

namespace tidepool {
namespace {

absl::StatusOr<bool> ParseBool(absl::string_view key, absl::string_view value) {
  if (value == "true" || value == "True" || value == "1") return true;
  if (value == "false" || value == "False" || value == "0") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("TIDEPOOL_CONF: ", key, " takes true or false, not '", value, "'"));
}

absl::StatusOr<size_t> ParseMegabytes(absl::string_view key, absl::string_view value,
                                      uint64_t max_mb) {
  uint64_t mb = 0;
  if (!absl::SimpleAtoi(value, &mb) || mb == 0 || mb > max_mb) {
    return absl::InvalidArgumentError(absl::StrCat("TIDEPOOL_CONF: ", key,
                                                   " takes a positive number of MiB up to ",
                                                   max_mb, ", not '", value, "'"));
  }
  return static_cast<size_t>(mb) << 20;
}

}  // namespace

absl::StatusOr<Config> Config::Parse(absl::string_view text) {
  Config config;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits(':', 1));
    if (kv.size() != 2 || kv[0].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("TIDEPOOL_CONF: expected key:value, got '", item, "'"));
    }
    absl::string_view key = absl::StripAsciiWhitespace(kv[0]);
    absl::string_view value = absl::StripAsciiWhitespace(kv[1]);
    if (key == "expandable_segments") {
      auto v = ParseBool(key, value);
      if (!v.ok()) return v.status();
      config.expandable_segments = *v;
    } else if (key == "release_free_chunks_on_growth") {
      auto v = ParseBool(key, value);
      if (!v.ok()) return v.status();
      config.release_free_chunks_on_growth = *v;
    } else if (key == "max_split_size_mb") {
      auto v = ParseMegabytes(key, value, uint64_t{1} << 40);
      if (!v.ok()) return v.status();
      config.max_split_size = *v;
    } else if (key == "expandable_reserve_mb") {
      auto v = ParseMegabytes(key, value, kMaxExpandableReserve >> 20);
      if (!v.ok()) return v.status();
      config.expandable_reserve = *v;
    } else if (key == "expandable_run_mb") {
      auto v = ParseMegabytes(key, value, kMaxExpandableReserve >> 20);
      if (!v.ok()) return v.status();
      config.expandable_run = *v;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "TIDEPOOL_CONF: unknown key '", key,
          "' (known: expandable_segments, max_split_size_mb, expandable_reserve_mb, "
          "expandable_run_mb, release_free_chunks_on_growth; see docs/configuration.md)"));
    }
  }
  return config;
}

absl::StatusOr<Config> Config::FromEnvironment() {
  const char* text = std::getenv("TIDEPOOL_CONF");
  return Parse(text == nullptr ? "" : text);
}

}  // namespace tidepool
