// Tests of the configuration parser (allocator/config.h). TIDEPOOL_CONF is read once and then
// steers growth, splitting and tracing for the whole process, so a key that is silently
// misread or ignored changes behaviour without anyone noticing. These tests pin the defaults,
// the effect of every documented key (expandable_segments, max_split_size_mb,
// expandable_reserve_mb, release_free_chunks_on_growth; docs/configuration.md), and that an
// unknown key (including `trace`, which is deliberately not a key: TIDEPOOL_TRACE records at the
// runtime) or a bad value is an INVALID_ARGUMENT error whose message
// names the key at fault.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/config.h"

namespace tidepool {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

Config ParseOk(const std::string& text) {
  INFO("TIDEPOOL_CONF='" << text << "'");
  absl::StatusOr<Config> config = Config::Parse(text);
  REQUIRE(config.ok());
  return *config;
}

// Parsing must fail with INVALID_ARGUMENT and a message that names `key`.
void RequireErrorNaming(const std::string& text, const std::string& key) {
  INFO("TIDEPOOL_CONF='" << text << "'");
  absl::StatusOr<Config> config = Config::Parse(text);
  REQUIRE_FALSE(config.ok());
  CHECK(absl::IsInvalidArgument(config.status()));
  const std::string message(config.status().message());
  INFO("message: " << message);
  CHECK(message.find(key) != std::string::npos);
}

TEST_CASE("the empty configuration gives the documented defaults") {
  for (const char* empty : {"", " ", ",", " , "}) {
    Config config = ParseOk(empty);
    CHECK(config.expandable_segments);
    CHECK(config.max_split_size == SIZE_MAX);
    CHECK(config.expandable_reserve == 0);
    CHECK(config.expandable_run == 16 * kMiB);
    CHECK(config.release_free_chunks_on_growth);
  }
  // A default-constructed Config agrees with the parsed one.
  Config constructed;
  Config parsed = ParseOk("");
  CHECK(constructed.expandable_segments == parsed.expandable_segments);
  CHECK(constructed.max_split_size == parsed.max_split_size);
  CHECK(constructed.expandable_reserve == parsed.expandable_reserve);
  CHECK(constructed.expandable_run == parsed.expandable_run);
  CHECK(constructed.release_free_chunks_on_growth == parsed.release_free_chunks_on_growth);
}

TEST_CASE("expandable_segments takes true or false") {
  CHECK_FALSE(ParseOk("expandable_segments:false").expandable_segments);
  CHECK_FALSE(ParseOk("expandable_segments:False").expandable_segments);
  CHECK_FALSE(ParseOk("expandable_segments:0").expandable_segments);
  CHECK(ParseOk("expandable_segments:true").expandable_segments);
  CHECK(ParseOk("expandable_segments:True").expandable_segments);
  CHECK(ParseOk("expandable_segments:1").expandable_segments);
  // Only that key changes.
  Config config = ParseOk("expandable_segments:false");
  CHECK(config.max_split_size == SIZE_MAX);
  CHECK(config.release_free_chunks_on_growth);
}

TEST_CASE("release_free_chunks_on_growth takes true or false") {
  CHECK_FALSE(ParseOk("release_free_chunks_on_growth:false").release_free_chunks_on_growth);
  CHECK(ParseOk("release_free_chunks_on_growth:true").release_free_chunks_on_growth);
  Config config = ParseOk("release_free_chunks_on_growth:0");
  CHECK_FALSE(config.release_free_chunks_on_growth);
  CHECK(config.expandable_segments);
}

TEST_CASE("max_split_size_mb is read in MiB") {
  CHECK(ParseOk("max_split_size_mb:1").max_split_size == 1 * kMiB);
  CHECK(ParseOk("max_split_size_mb:200").max_split_size == 200 * kMiB);
  Config config = ParseOk("max_split_size_mb:64");
  CHECK(config.max_split_size == 64 * kMiB);
  CHECK(config.expandable_reserve == 0);
}

TEST_CASE("expandable_reserve_mb is read in MiB") {
  CHECK(ParseOk("expandable_reserve_mb:1024").expandable_reserve == 1024 * kMiB);
  Config config = ParseOk("expandable_reserve_mb:3");
  CHECK(config.expandable_reserve == 3 * kMiB);
  CHECK(config.max_split_size == SIZE_MAX);
}

TEST_CASE("expandable_run_mb is read in MiB, 16 by default") {
  CHECK(ParseOk("").expandable_run == 16 * kMiB);
  CHECK(ParseOk("expandable_run_mb:2").expandable_run == 2 * kMiB);
  CHECK(ParseOk("expandable_run_mb:1024").expandable_run == 1024 * kMiB);
  for (const char* value : {"0", "-1", "x", "1048577"}) {
    RequireErrorNaming(std::string("expandable_run_mb:") + value, "expandable_run_mb");
  }
}

TEST_CASE("trace is not a configuration key") {
  // docs/configuration.md: trace recording is TIDEPOOL_TRACE's job, not TIDEPOOL_CONF's.
  RequireErrorNaming("trace:/tmp/run.csv", "trace");
  RequireErrorNaming("expandable_segments:false,trace:/tmp/a:b.csv.gz", "trace");
}

TEST_CASE("several keys at once, with spaces, last one wins") {
  Config config = ParseOk(
      " expandable_segments : false , max_split_size_mb:32,expandable_reserve_mb: 512 ,"
      "release_free_chunks_on_growth:false");
  CHECK_FALSE(config.expandable_segments);
  CHECK(config.max_split_size == 32 * kMiB);
  CHECK(config.expandable_reserve == 512 * kMiB);
  CHECK_FALSE(config.release_free_chunks_on_growth);

  CHECK(ParseOk("max_split_size_mb:8,max_split_size_mb:16").max_split_size == 16 * kMiB);
}

TEST_CASE("an unknown key is an error that names it") {
  RequireErrorNaming("expandable_segment:true", "expandable_segment");  // a typo
  RequireErrorNaming("garbage_collection_threshold:0.8", "garbage_collection_threshold");
  RequireErrorNaming("expandable_segments:true,colour:blue", "colour");
  // Keys are case sensitive: a near miss is still unknown.
  RequireErrorNaming("Expandable_Segments:true", "Expandable_Segments");
}

TEST_CASE("a bad boolean is an error that names its key") {
  for (const char* value : {"yes", "no", "2", "", "truee", "-1"}) {
    RequireErrorNaming(std::string("expandable_segments:") + value, "expandable_segments");
    RequireErrorNaming(std::string("release_free_chunks_on_growth:") + value,
                       "release_free_chunks_on_growth");
  }
}

TEST_CASE("a bad size is an error that names its key") {
  for (const char* value : {"0", "-5", "abc", "1.5", "", "12MB", "99999999999999999999"}) {
    RequireErrorNaming(std::string("max_split_size_mb:") + value, "max_split_size_mb");
    RequireErrorNaming(std::string("expandable_reserve_mb:") + value, "expandable_reserve_mb");
  }
  // A reserve the host could not keep tables for is refused (1 TiB is the most).
  CHECK(Config::Parse("expandable_reserve_mb:1048576").ok());
  RequireErrorNaming("expandable_reserve_mb:1048577", "expandable_reserve_mb");
  RequireErrorNaming("expandable_reserve_mb:1099511627776", "expandable_reserve_mb");
  // So large that the byte count would not fit: refused, not wrapped around.
  absl::StatusOr<Config> huge = Config::Parse("max_split_size_mb:18446744073709551615");
  REQUIRE_FALSE(huge.ok());
  CHECK(absl::IsInvalidArgument(huge.status()));
}

TEST_CASE("an item without a value is an error") {
  for (const char* text : {"expandable_segments", ":true", "max_split_size_mb"}) {
    INFO("TIDEPOOL_CONF='" << text << "'");
    absl::StatusOr<Config> config = Config::Parse(text);
    REQUIRE_FALSE(config.ok());
    CHECK(absl::IsInvalidArgument(config.status()));
  }
}

TEST_CASE("FromEnvironment reads TIDEPOOL_CONF") {
  REQUIRE(setenv("TIDEPOOL_CONF", "expandable_segments:false,max_split_size_mb:4", 1) == 0);
  absl::StatusOr<Config> config = Config::FromEnvironment();
  REQUIRE(config.ok());
  CHECK_FALSE(config->expandable_segments);
  CHECK(config->max_split_size == 4 * kMiB);

  REQUIRE(setenv("TIDEPOOL_CONF", "not_a_key:1", 1) == 0);
  absl::StatusOr<Config> bad = Config::FromEnvironment();
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("not_a_key") != std::string::npos);

  REQUIRE(unsetenv("TIDEPOOL_CONF") == 0);
  absl::StatusOr<Config> unset = Config::FromEnvironment();
  REQUIRE(unset.ok());
  CHECK(unset->expandable_segments);
  CHECK(unset->max_split_size == SIZE_MAX);
}

}  // namespace
}  // namespace tidepool
