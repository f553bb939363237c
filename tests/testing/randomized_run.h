// What the randomized tests share besides their oracle: where a run's seed and length come from,
// and how it draws allocation sizes.
//
// A randomized run is only useful if a failure can be replayed, so every run takes its seed from
// TIDEPOOL_TEST_SEED when that is set (and prints the seed it used), and its number of operations
// from TIDEPOOL_DIFFERENTIAL_OPS. Allocation sizes are log-uniform within bands chosen by weight:
// an allocator's bugs sit at the size-class edges and in the large-block paths, which uniform
// sizes would almost never reach, while most real allocations are small. Each test keeps its own
// bands (they are part of what it exercises); the drawing is here, so two tests that name the same
// bands draw the same sizes.
#ifndef TIDEPOOL_TESTS_TESTING_RANDOMIZED_RUN_H_
#define TIDEPOOL_TESTS_TESTING_RANDOMIZED_RUN_H_

#include <cstddef>
#include <cstdint>
#include <random>

#include "absl/types/span.h"

namespace tidepool {
namespace testing {

// TIDEPOOL_TEST_SEED if it is set and not empty, else `fallback`.
uint64_t SeedFromEnvironment(uint64_t fallback);

// TIDEPOOL_DIFFERENTIAL_OPS if it is set and not empty, else `fallback`.
int64_t OpsFromEnvironment(int64_t fallback);

// A size in [2^low_bits, 2^high_bits): the power of two uniform among those, then uniform within
// it (two draws from `random`).
size_t LogUniformSize(std::mt19937_64& random, int low_bits, int high_bits);

// One band of sizes, [2^low_bits, 2^high_bits), taken when the percentile drawn is below
// `below_percent`. Bands are listed in rising order of below_percent, the last one at 100.
struct SizeBand {
  int below_percent = 100;
  int low_bits = 0;
  int high_bits = 1;
};

// A percentile (one draw), then LogUniformSize in the first band it falls below.
size_t RandomSize(std::mt19937_64& random, absl::Span<const SizeBand> bands);

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_TESTING_RANDOMIZED_RUN_H_
