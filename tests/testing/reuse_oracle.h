// The reuse-safety oracle of the randomized differential tests: a model of which device bytes are
// live and which were freed, and under what stream-ordered obligation, that answers two questions
// after the fact: was it safe for the allocator to hand these bytes out again, and was it safe to
// give them back to the device (FreeSegment) or unmap them?
//
// A caching allocator is only as safe as its stream-ordering contract (docs/design.md), and that
// contract is what randomized runs are best at breaking, so every differential test checks it
// after every operation. The rule:
//   * bytes are never live twice: a new block overlaps no live block;
//   * bytes freed on stream S go out again at once on S (S runs in order), but on another stream
//     only once all work enqueued on S up to the free has completed;
//   * bytes of a block used on another stream U (RecordStream) go out again only once all work
//     enqueued on U up to the free has completed;
//   * a free during graph capture after use on another stream is deferred: its events are
//     recorded only when the last capture underway ends, so the work on U that must complete is
//     the work enqueued up to the end of that capture epoch, and until the epoch ends the bytes
//     must not go out at all;
//   * with pools, bytes go out again only from the arena (pool and incarnation) they were freed
//     into;
//   * memory goes back to the device only when no live block lies in it and every freed range in
//     it is settled (all the work above has completed).
// The tests used to carry one copy of this bookkeeping each; here it is written once, so every
// differential test checks the same rule and a change to the rule is made in one place.
//
// The oracle sees the device's clock through SimulatedDevice::IsComplete and is told the rest:
// each stream's position (the last work the test enqueued on it) when a block is freed and when a
// capture epoch ends. Streams are the test's own indexes into the list given at construction; a
// block's RecordStream uses are a bit mask of those indexes. Problems come back as text, one line
// each, for the test to report with its own context (operation, seed, thread): a single-threaded
// test fails at once, a multi-threaded one collects them. Not thread safe: a multi-threaded test
// guards the oracle with a mutex of its own.
#ifndef TIDEPOOL_TESTS_TESTING_REUSE_ORACLE_H_
#define TIDEPOOL_TESTS_TESTING_REUSE_ORACLE_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "allocator/device.h"
#include "allocator/simulated_device.h"

namespace tidepool {
namespace testing {

// Which arena bytes belong to: a pool (the test's index for it) and the incarnation of that pool's
// arena. Tests without pools leave it at the default, so every block shares one arena.
struct ArenaTag {
  int pool = 0;
  int generation = 0;

  bool operator==(const ArenaTag& other) const {
    return pool == other.pool && generation == other.generation;
  }
  bool operator!=(const ArenaTag& other) const { return !(*this == other); }
};

class ReuseOracle {
 public:
  // Stream indexes fit in a use mask of this many bits.
  static constexpr int kMaxStreams = 16;

  // `streams[i]` is the stream the test calls stream i (at most kMaxStreams of them), all on
  // `device`, which must outlive the oracle.
  ReuseOracle(SimulatedDevice* device, absl::Span<const Stream> streams);

  // The allocator handed out [begin, end) on stream `stream`, in `arena`, to test thread
  // `thread` (named in messages only; -1: none in particular). Returns what was unsafe about it,
  // empty when nothing was. A block that overlaps a live one is reported and not recorded;
  // otherwise it is checked against every freed range it covers, recorded as live, and those
  // freed ranges are forgotten (only the parts outside the block remain).
  std::vector<std::string> Admit(uintptr_t begin, uintptr_t end, int stream, ArenaTag arena = {},
                                 int thread = -1);

  // The live block at `begin` is being freed, after RecordStream on the streams set in `uses`
  // (never its own stream). `enqueued[s]` is the position of the last work the test enqueued on
  // stream s; one entry per stream. `deferred`: freed during capture after use on another stream
  // (see the rule above). Call it before Free, and a give-back inside that Free sees the bytes as
  // freed; after, and it sees them as live (the stricter of the two). Returns "" or what is wrong
  // (the block is not live).
  std::string Retire(uintptr_t begin, uint32_t uses, absl::Span<const uint64_t> enqueued,
                     bool deferred = false);

  // The last capture underway ended with the streams at `enqueued` (one entry per stream): the
  // frees deferred since the previous end have their uses counted up to here.
  void EndCaptureEpoch(absl::Span<const uint64_t> enqueued);

  // The allocator is about to give [begin, end) back to the device or unmap it. Returns "" when
  // that is safe, else why not.
  std::string CheckGiveBack(uintptr_t begin, uintptr_t end);

  // Forgets the freed ranges whose work has all completed: any reuse of them is safe. Keeps the
  // oracle small over a long run.
  void ForgetSettled();
  // Forgets the freed ranges of every arena `gone` says has gone back to the device (which never
  // hands the same addresses out again).
  void ForgetArenas(const std::function<bool(const ArenaTag&)>& gone);

  int64_t live_blocks() const { return static_cast<int64_t>(live_.size()); }
  // How many freed ranges handed out again had been used on another stream (RecordStream), and
  // how many of those were deferred frees: the run shows it exercised the guarded paths.
  int64_t guarded_reuses() const { return guarded_reuses_; }
  int64_t deferred_reuses() const { return deferred_reuses_; }

 private:
  using Positions = std::array<uint64_t, kMaxStreams>;

  struct LiveBlock {
    uintptr_t end = 0;
    int stream = 0;
    ArenaTag arena;
    int thread = -1;
  };

  // Bytes freed and not handed out since.
  struct FreedRange {
    uintptr_t end = 0;
    int stream = 0;
    ArenaTag arena;
    uint32_t uses = 0;
    Positions enqueued{};       // every stream's position at the free
    int64_t deferred_epoch = -1;  // the capture epoch a deferred free waits for, else -1
  };

  // The first freed range that overlaps [begin, ...), or the first one after it.
  std::map<uintptr_t, FreedRange>::iterator FirstFreedFrom(uintptr_t begin);
  // A live block overlapping [begin, end), or live_.end().
  std::map<uintptr_t, LiveBlock>::const_iterator LiveOverlapping(uintptr_t begin,
                                                                 uintptr_t end) const;
  bool Completed(int stream, uint64_t position) const;
  // The positions the uses of `range` must reach; null while its capture epoch has not ended.
  const Positions* UsePositions(const FreedRange& range) const;
  // All work that may use the bytes of `range` has completed.
  bool Settled(const FreedRange& range) const;
  Positions ToPositions(absl::Span<const uint64_t> enqueued) const;

  SimulatedDevice* const device_;
  const std::vector<Stream> streams_;
  std::map<uintptr_t, LiveBlock> live_;    // begin -> block, disjoint
  std::map<uintptr_t, FreedRange> freed_;  // begin -> range, disjoint
  std::vector<Positions> epoch_ends_;      // capture epoch i ended at epoch_ends_[i]
  int64_t guarded_reuses_ = 0;
  int64_t deferred_reuses_ = 0;
};

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_TESTING_REUSE_ORACLE_H_
