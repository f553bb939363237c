// Seeds, run lengths and sizes for the randomized tests; see randomized_run.h.
#include "tests/testing/randomized_run.h"

#include <cstdlib>

namespace tidepool {
namespace testing {

uint64_t SeedFromEnvironment(uint64_t fallback) {
  const char* text = std::getenv("TIDEPOOL_TEST_SEED");
  if (text == nullptr || *text == '\0') return fallback;
  return std::strtoull(text, nullptr, 10);
}

int64_t OpsFromEnvironment(int64_t fallback) {
  const char* text = std::getenv("TIDEPOOL_DIFFERENTIAL_OPS");
  if (text == nullptr || *text == '\0') return fallback;
  return std::strtoll(text, nullptr, 10);
}

size_t LogUniformSize(std::mt19937_64& random, int low_bits, int high_bits) {
  const uint64_t powers = static_cast<uint64_t>(high_bits - low_bits);
  const int bits = low_bits + static_cast<int>(random() % powers);
  const size_t base = size_t{1} << bits;
  return base + random() % base;
}

size_t RandomSize(std::mt19937_64& random, absl::Span<const SizeBand> bands) {
  const uint64_t percentile = random() % 100;
  for (const SizeBand& band : bands) {
    if (percentile < static_cast<uint64_t>(band.below_percent)) {
      return LogUniformSize(random, band.low_bits, band.high_bits);
    }
  }
  // Bands that stop short of 100: the rest falls in the last one.
  return LogUniformSize(random, bands.back().low_bits, bands.back().high_bits);
}

}  // namespace testing
}  // namespace tidepool
