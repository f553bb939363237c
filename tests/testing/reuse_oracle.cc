// The reuse-safety oracle of the randomized differential tests; see reuse_oracle.h for the rule.
#include "tests/testing/reuse_oracle.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tidepool {
namespace testing {
namespace {

// A test that misuses the oracle (too many streams, a position list of the wrong length) would
// otherwise be checked against garbage; stop it at once, from any thread.
void RequireUsage(bool condition, const char* what) {
  if (condition) return;
  std::fprintf(stderr, "ReuseOracle misused: %s\n", what);
  std::abort();
}

std::string Range(uintptr_t begin, uintptr_t end) {
  return absl::StrCat("[", begin, ", ", end, ")");
}

std::string OfThread(int thread) {
  return thread < 0 ? std::string() : absl::StrCat(" of thread ", thread);
}

}  // namespace

ReuseOracle::ReuseOracle(SimulatedDevice* device, absl::Span<const Stream> streams)
    : device_(device), streams_(streams.begin(), streams.end()) {
  RequireUsage(device != nullptr, "no device");
  RequireUsage(streams.size() <= kMaxStreams, "more streams than a use mask holds");
}

std::vector<std::string> ReuseOracle::Admit(uintptr_t begin, uintptr_t end, int stream,
                                            ArenaTag arena, int thread) {
  RequireUsage(stream >= 0 && stream < static_cast<int>(streams_.size()), "no such stream");
  std::vector<std::string> problems;
  auto live = LiveOverlapping(begin, end);
  if (live != live_.end()) {
    problems.push_back(absl::StrCat("block ", Range(begin, end), OfThread(thread),
                                    " overlaps live block ", Range(live->first, live->second.end),
                                    OfThread(live->second.thread)));
    return problems;
  }
  std::vector<std::pair<uintptr_t, FreedRange>> outside;  // the parts the new block leaves free
  for (auto it = FirstFreedFrom(begin); it != freed_.end() && it->first < end;) {
    const FreedRange& freed = it->second;
    // Messages are made only on failure: this runs for every allocation of a million-step run.
    auto reused = [&] {
      return absl::StrCat("bytes ", Range(std::max(it->first, begin), std::min(freed.end, end)),
                          " handed out on stream ", stream, OfThread(thread));
    };
    if (freed.arena != arena) {
      problems.push_back(absl::StrCat(reused(), " were freed into pool ", freed.arena.pool,
                                      " (generation ", freed.arena.generation,
                                      ") but handed out by pool ", arena.pool, " (generation ",
                                      arena.generation, ")"));
    }
    if (stream != freed.stream && !Completed(freed.stream, freed.enqueued[freed.stream])) {
      problems.push_back(absl::StrCat(reused(), " were freed on stream ", freed.stream,
                                      ", whose work up to the free is still pending"));
    }
    if (freed.uses != 0) ++guarded_reuses_;
    const Positions* use_positions = UsePositions(freed);
    if (freed.deferred_epoch >= 0) {
      if (use_positions == nullptr) {
        problems.push_back(absl::StrCat(
            reused(), " belong to a block freed during capture after use on another stream; "
                      "the captures are not over yet"));
      } else {
        ++deferred_reuses_;
      }
    }
    for (int u = 0; use_positions != nullptr && u < static_cast<int>(streams_.size()); ++u) {
      if ((freed.uses & (1u << u)) == 0 || Completed(u, (*use_positions)[u])) continue;
      problems.push_back(absl::StrCat(
          reused(), " belong to a block used on stream ", u, " (RecordStream), whose work up to ",
          freed.deferred_epoch >= 0 ? "the end of the capture it was freed in"
                                    : "the free",
          " is still pending"));
    }
    if (it->first < begin) outside.emplace_back(it->first, freed).second.end = begin;
    if (freed.end > end) outside.emplace_back(end, freed);
    it = freed_.erase(it);
  }
  for (auto& [start, range] : outside) freed_.emplace(start, std::move(range));
  live_.emplace(begin, LiveBlock{end, stream, arena, thread});
  return problems;
}

std::string ReuseOracle::Retire(uintptr_t begin, uint32_t uses,
                                absl::Span<const uint64_t> enqueued, bool deferred) {
  auto it = live_.find(begin);
  if (it == live_.end()) return absl::StrCat("the block at ", begin, " to be freed is not live");
  FreedRange freed;
  freed.end = it->second.end;
  freed.stream = it->second.stream;
  freed.arena = it->second.arena;
  freed.uses = uses;
  freed.enqueued = ToPositions(enqueued);
  freed.deferred_epoch = deferred ? static_cast<int64_t>(epoch_ends_.size()) : -1;
  live_.erase(it);
  // Admit forgot whatever freed range covered these bytes before they went out.
  freed_.insert_or_assign(begin, freed);
  return "";
}

void ReuseOracle::EndCaptureEpoch(absl::Span<const uint64_t> enqueued) {
  epoch_ends_.push_back(ToPositions(enqueued));
}

std::string ReuseOracle::CheckGiveBack(uintptr_t begin, uintptr_t end) {
  auto live = LiveOverlapping(begin, end);
  if (live != live_.end()) {
    return absl::StrCat("live block ", Range(live->first, live->second.end),
                        OfThread(live->second.thread), " is inside it");
  }
  for (auto it = FirstFreedFrom(begin); it != freed_.end() && it->first < end; ++it) {
    if (!Settled(it->second)) {
      return absl::StrCat("work that may use the bytes freed at ", it->first, " on stream ",
                          it->second.stream,
                          " (on that stream or one it was recorded on) is still pending");
    }
  }
  return "";
}

void ReuseOracle::ForgetSettled() {
  for (auto it = freed_.begin(); it != freed_.end();) {
    it = Settled(it->second) ? freed_.erase(it) : std::next(it);
  }
}

void ReuseOracle::ForgetArenas(const std::function<bool(const ArenaTag&)>& gone) {
  for (auto it = freed_.begin(); it != freed_.end();) {
    it = gone(it->second.arena) ? freed_.erase(it) : std::next(it);
  }
}

std::map<uintptr_t, ReuseOracle::FreedRange>::iterator ReuseOracle::FirstFreedFrom(
    uintptr_t begin) {
  auto it = freed_.lower_bound(begin);
  if (it != freed_.begin() && std::prev(it)->second.end > begin) it = std::prev(it);
  return it;
}

std::map<uintptr_t, ReuseOracle::LiveBlock>::const_iterator ReuseOracle::LiveOverlapping(
    uintptr_t begin, uintptr_t end) const {
  auto next = live_.lower_bound(begin);
  if (next != live_.end() && next->first < end) return next;
  if (next != live_.begin() && std::prev(next)->second.end > begin) return std::prev(next);
  return live_.end();
}

bool ReuseOracle::Completed(int stream, uint64_t position) const {
  return device_->IsComplete(streams_[stream], position);
}

const ReuseOracle::Positions* ReuseOracle::UsePositions(const FreedRange& range) const {
  if (range.deferred_epoch < 0) return &range.enqueued;
  if (range.deferred_epoch >= static_cast<int64_t>(epoch_ends_.size())) return nullptr;
  return &epoch_ends_[range.deferred_epoch];
}

bool ReuseOracle::Settled(const FreedRange& range) const {
  if (!Completed(range.stream, range.enqueued[range.stream])) return false;
  const Positions* use_positions = UsePositions(range);
  if (use_positions == nullptr) return false;
  for (int u = 0; u < static_cast<int>(streams_.size()); ++u) {
    if ((range.uses & (1u << u)) != 0 && !Completed(u, (*use_positions)[u])) return false;
  }
  return true;
}

ReuseOracle::Positions ReuseOracle::ToPositions(absl::Span<const uint64_t> enqueued) const {
  RequireUsage(enqueued.size() == streams_.size(), "one position per stream is needed");
  Positions positions{};
  std::copy(enqueued.begin(), enqueued.end(), positions.begin());
  return positions;
}

}  // namespace testing
}  // namespace tidepool
