// Tests of how the caching allocator carves its memory into blocks: rounding and alignment,
// splitting a large free block to serve smaller requests, coalescing freed neighbours back into
// one block, keeping small (<= 1 MiB) and large requests in separate segments, and honouring
// max_split_size. Splitting without coalescing would fragment the cache until every large
// request needs fresh device memory; coalescing wrongly would hand out bytes that are still
// live; mixing size classes lets a long-lived small block pin a large segment. These are checked
// through the public API only: addresses, BlockSize, and whether a large request gets the
// original large address back once its pieces are free. Every case runs with expandable
// segments on and off.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "tests/testing/sim_harness.h"

namespace tidepool {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kAlignment = 512;

using Harness = testing::SimHarness;

Config ModeConfig(bool expandable) { return testing::ExpandableConfig(expandable); }

uintptr_t Address(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); }

bool Inside(const void* ptr, size_t size, const void* range, size_t range_size) {
  return Address(ptr) >= Address(range) && Address(ptr) + size <= Address(range) + range_size;
}

bool Overlaps(const void* a, size_t a_size, const void* b, size_t b_size) {
  return Address(a) < Address(b) + b_size && Address(b) < Address(a) + a_size;
}

size_t RoundUp512(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

TEST_CASE("requests are rounded to 512 bytes and blocks are 512-byte aligned") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(ModeConfig(expandable));
  std::vector<void*> live;
  for (size_t size : {size_t{1}, size_t{100}, size_t{511}, size_t{512}, size_t{513},
                      size_t{1000}, size_t{1024}, size_t{4095}, 64 * kKiB + 1, kMiB - 1, kMiB,
                      kMiB + 1, 3 * kMiB + 7, 12 * kMiB + 1, 33 * kMiB}) {
    INFO("request " << size);
    void* ptr = h.Allocate(size);
    CHECK(Address(ptr) % kAlignment == 0);
    const size_t block = h.SizeOf(ptr);
    CHECK(block % kAlignment == 0);
    CHECK(block >= RoundUp512(size));
    if (size <= kMiB) {
      // Small blocks are split down to the 512-byte rounding exactly.
      CHECK(block == RoundUp512(size));
    } else {
      // A large block keeps an unsplit remainder only up to the small-request limit
      // (size_policy.h: ShouldSplit).
      CHECK(block - RoundUp512(size) <= kMiB);
    }
    live.push_back(ptr);
  }
  for (size_t i = 0; i < live.size(); ++i) {
    for (size_t j = i + 1; j < live.size(); ++j) {
      CHECK_FALSE(Overlaps(live[i], h.SizeOf(live[i]), live[j], h.SizeOf(live[j])));
    }
  }
  for (void* ptr : live) h.Free(ptr);
  h.RequireClean();
}

TEST_CASE("a large free block is split for smaller requests and its pieces coalesce again") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(ModeConfig(expandable));

  void* whole = h.Allocate(16 * kMiB);
  REQUIRE(h.SizeOf(whole) == 16 * kMiB);
  h.Free(whole);
  const size_t reserved = h.device->used_bytes();

  // Four 3 MiB pieces, cut from the front of the cached 16 MiB block, one after another.
  std::vector<void*> pieces;
  for (int i = 0; i < 4; ++i) {
    void* piece = h.Allocate(3 * kMiB);
    INFO("piece " << i);
    CHECK(Address(piece) == Address(whole) + i * 3 * kMiB);
    CHECK(h.SizeOf(piece) == 3 * kMiB);
    CHECK(Inside(piece, 3 * kMiB, whole, 16 * kMiB));
    pieces.push_back(piece);
  }
  CHECK(h.device->used_bytes() == reserved);  // no new device memory was needed

  // Free two neighbours (in reverse order): they coalesce into one 6 MiB block, which is the best
  // fit for a 6 MiB request (the 4 MiB tail is too small).
  h.Free(pieces[2]);
  h.Free(pieces[1]);
  void* joined = h.Allocate(6 * kMiB);
  CHECK(joined == pieces[1]);
  CHECK(h.SizeOf(joined) == 6 * kMiB);
  h.Free(joined);

  // Free the rest, out of order: the whole 16 MiB block is one again.
  h.Free(pieces[3]);
  h.Free(pieces[0]);
  void* again = h.Allocate(16 * kMiB);
  CHECK(again == whole);
  CHECK(h.SizeOf(again) == 16 * kMiB);
  CHECK(h.device->used_bytes() == reserved);
  h.Free(again);
  h.RequireClean();
}

TEST_CASE("many small blocks freed in random order coalesce into one") {
  const bool expandable = GENERATE(true, false);
  const uint32_t seed = GENERATE(1u, 2u, 3u);
  INFO("expandable_segments=" << expandable << " seed=" << seed);
  Harness h(ModeConfig(expandable));

  // 64 blocks of 16 KiB: the first MiB of the first small segment, back to back.
  const size_t block_size = 16 * kKiB;
  std::vector<void*> blocks;
  for (int i = 0; i < 64; ++i) blocks.push_back(h.Allocate(block_size));
  for (size_t i = 1; i < blocks.size(); ++i) {
    REQUIRE(Address(blocks[i]) == Address(blocks[0]) + i * block_size);
  }
  const size_t reserved = h.device->used_bytes();

  std::mt19937 random(seed);
  std::vector<void*> order = blocks;
  std::shuffle(order.begin(), order.end(), random);
  for (void* ptr : order) h.Free(ptr);

  // All 64 pieces (and the free rest of the segment) are one block again: a request for all of
  // them lands where the first one was, without new memory.
  void* whole = h.Allocate(64 * block_size);
  CHECK(whole == blocks[0]);
  CHECK(h.device->used_bytes() == reserved);
  h.Free(whole);
  h.RequireClean();
}

TEST_CASE("a freed block does not coalesce with a live neighbour") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(ModeConfig(expandable));
  void* left = h.Allocate(64 * kKiB);
  void* middle = h.Allocate(64 * kKiB);
  void* right = h.Allocate(64 * kKiB);
  h.Free(left);
  h.Free(right);
  // The middle block is still live and answers with its own size; a request as large as all
  // three does not land on top of it.
  CHECK(h.SizeOf(middle) == 64 * kKiB);
  void* big = h.Allocate(192 * kKiB);
  CHECK_FALSE(Overlaps(big, h.SizeOf(big), middle, 64 * kKiB));
  // The freed neighbours each serve a request of their size.
  void* left_again = h.Allocate(64 * kKiB);
  CHECK(left_again == left);
  h.Free(left_again);
  h.Free(big);
  h.Free(middle);
  h.RequireClean();
}

TEST_CASE("small and large requests never share a segment") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(ModeConfig(expandable));

  SECTION("a cached large block does not serve small requests") {
    void* large = h.Allocate(4 * kMiB);
    const size_t large_size = h.SizeOf(large);
    h.Free(large);
    std::vector<void*> small;
    for (size_t size : {kMiB, kMiB - 512, 256 * kKiB, 256 * kKiB, 256 * kKiB, 512 * kKiB,
                        size_t{512}, size_t{1}}) {
      void* ptr = h.Allocate(size);
      INFO("small request " << size);
      CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), large, large_size));
      small.push_back(ptr);
    }
    for (void* ptr : small) h.Free(ptr);
  }

  SECTION("a cached small block does not serve large requests") {
    void* small = h.Allocate(kMiB);  // the largest small request
    const size_t small_size = h.SizeOf(small);
    h.Free(small);
    std::vector<void*> large;
    for (size_t size : {kMiB + 1, kMiB + 512, kMiB + 513, 3 * kMiB / 2}) {
      void* ptr = h.Allocate(size);
      INFO("large request " << size);
      CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), small, small_size));
      large.push_back(ptr);
    }
    for (void* ptr : large) h.Free(ptr);
  }

  SECTION("live small and large blocks interleaved stay in their own segments") {
    std::vector<void*> small;
    std::vector<void*> large;
    for (int i = 0; i < 6; ++i) {
      small.push_back(h.Allocate(200 * kKiB));
      large.push_back(h.Allocate(2 * kMiB + 512));
    }
    // Free the large ones; then small requests must not reach into their space.
    std::vector<std::pair<void*, size_t>> freed_large;
    for (void* ptr : large) {
      freed_large.emplace_back(ptr, h.SizeOf(ptr));
      h.Free(ptr);
    }
    std::vector<void*> more_small;
    for (int i = 0; i < 20; ++i) {
      void* ptr = h.Allocate(300 * kKiB);
      for (const auto& [freed, size] : freed_large) {
        CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), freed, size));
      }
      more_small.push_back(ptr);
    }
    for (void* ptr : small) h.Free(ptr);
    for (void* ptr : more_small) h.Free(ptr);
  }
  h.RequireClean();
}

TEST_CASE("blocks above max_split_size are never split") {
  // Plain segments only: in expandable segments max_split_size does not apply (free granules
  // are unmapped and mapped again where needed, so no cached block must be kept whole;
  // docs/configuration.md).
  Config config = ModeConfig(/*expandable=*/false);
  config.max_split_size = 8 * kMiB;
  // Keep growth from unmapping the cached block, so that it stays observable at its address.
  config.release_free_chunks_on_growth = false;
  Harness h(config);

  void* oversize = h.Allocate(16 * kMiB);
  const size_t oversize_size = h.SizeOf(oversize);
  REQUIRE(oversize_size == 16 * kMiB);
  h.Free(oversize);

  std::vector<void*> live;
  // Requests below max_split_size are not served from it at all.
  for (size_t size : {2 * kMiB, 4 * kMiB, 7 * kMiB, 8 * kMiB - 512, size_t{4096}}) {
    void* ptr = h.Allocate(size);
    INFO("request " << size);
    CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), oversize, oversize_size));
    live.push_back(ptr);
  }
  // A request above max_split_size may be served by it, but then whole, never split.
  void* big = h.Allocate(12 * kMiB);
  if (big == oversize) {
    CHECK(h.SizeOf(big) == oversize_size);
  } else {
    CHECK_FALSE(Overlaps(big, h.SizeOf(big), oversize, oversize_size));
  }
  live.push_back(big);
  for (size_t size : {2 * kMiB, 3 * kMiB}) {
    void* ptr = h.Allocate(size);
    INFO("after the 12 MiB request: request " << size);
    CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), oversize, oversize_size));
    live.push_back(ptr);
  }
  for (void* ptr : live) h.Free(ptr);

  // The oversize block is still whole: an exact request gets it back.
  void* again = h.Allocate(16 * kMiB);
  CHECK(again == oversize);
  CHECK(h.SizeOf(again) == oversize_size);
  h.Free(again);
  h.RequireClean();
}

// The bug: with max_split_size at or below 2 MiB and plain segments, every small request got a
// whole 2 MiB segment (a small segment is at the limit, so it was never split): 32 mallocs of
// 512 B ran a 64 MiB device out of memory. Small segments are split whatever the limit, and a
// large request never gets a segment bigger than it needs that it may not split.
TEST_CASE("a max_split_size of 1 or 2 MiB still packs small requests into one segment") {
  const size_t max_split_mb = GENERATE(1, 2);
  INFO("max_split_size_mb=" << max_split_mb);
  Config config = ModeConfig(/*expandable=*/false);
  config.max_split_size = max_split_mb * kMiB;
  Harness h(config, 64 * kMiB);
  std::vector<void*> live;
  for (int i = 0; i < 1000; ++i) live.push_back(h.Allocate(512));
  CHECK(h.device->used_bytes() == 2 * kMiB);
  // Large requests: each exactly its own size rounded to 2 MiB, not a 20 MiB segment.
  for (int i = 0; i < 10; ++i) live.push_back(h.Allocate(3 * kMiB));
  CHECK(h.device->used_bytes() == 2 * kMiB + 10 * 4 * kMiB);
  for (void* ptr : live) h.Free(ptr);
  h.RequireClean();
}

TEST_CASE("requests below max_split_size are served even when growth yields an oversize block") {
  // A fresh plain segment for a 1-10 MiB request is 20 MiB, and an expandable segment grows in
  // 2 MiB chunks: either can make the new free block reach max_split_size, which must not make
  // the request it was grown for unservable.
  const bool expandable = GENERATE(true, false);
  const size_t max_split_mb = GENERATE(4, 8, 16);
  INFO("expandable_segments=" << expandable << " max_split_size_mb=" << max_split_mb);
  Config config = ModeConfig(expandable);
  config.max_split_size = max_split_mb * kMiB;
  Harness h(config);
  std::vector<void*> live;
  for (size_t size : {2 * kMiB, max_split_mb * kMiB - kMiB, max_split_mb * kMiB - 512}) {
    INFO("request " << size);
    absl::StatusOr<void*> ptr = h.allocator->Allocate(size, h.stream);
    INFO(ptr.status().ToString());
    REQUIRE(ptr.ok());
    live.push_back(*ptr);
  }
  // Growth for three requests of at most 16 MiB never needs more than a few segments' worth.
  CHECK(h.device->used_bytes() <= 64 * kMiB);
  for (void* ptr : live) h.Free(ptr);
  h.RequireClean();
}

TEST_CASE("without max_split_size a large cached block is split for a smaller large request") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Config config = ModeConfig(expandable);
  config.release_free_chunks_on_growth = false;
  Harness h(config);
  void* oversize = h.Allocate(16 * kMiB);
  h.Free(oversize);
  // The counterpart of the test above: with no limit, the same request is carved from it.
  void* piece = h.Allocate(2 * kMiB);
  CHECK(piece == oversize);
  CHECK(h.SizeOf(piece) == 2 * kMiB);
  h.Free(piece);
  h.RequireClean();
}

}  // namespace
}  // namespace tidepool
