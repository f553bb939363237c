// A symmetric pool: see symmetric_pool.h for the same-program rule and the stream rule.
#include "nccl/symmetric_pool.h"

#include <algorithm>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/size_policy.h"

namespace tidepool {
namespace {

const char* KindName(uint64_t kind) {
  switch (kind) {
    case 1:
      return "reserve";
    case 2:
      return "growth";
    case 3:
      return "trim";
    case 4:
      return "allocation report (allocated)";
    case 5:
      return "allocation report (failed)";
    case 6:
      return "registration report (registered)";
    case 7:
      return "registration report (failed)";
  }
  return "unknown step";
}

std::string ProposalText(const Proposal& proposal) {
  return absl::StrFormat("step %u (%s of %u bytes)", proposal.sequence, KindName(proposal.kind),
                         proposal.bytes);
}

}  // namespace

SymmetricPool::SymmetricPool(SymmetricSegments* segments, RankAgreement* agreement,
                             Options options)
    : segments_(segments), agreement_(agreement), options_(options) {}

absl::Status SymmetricPool::Broken() const {
  if (broken_.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "tidepool: this symmetric pool is broken and its communicator of no further use: ",
      broken_));
}

absl::Status SymmetricPool::GroupOnly(const char* what, const char* call) const {
  if (group_ranks_ == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: a %s of one symmetric pool of a group of %d local ranks driven by one thread: it "
      "would wait for the other local ranks, which this thread has not reached. Call the "
      "group's %s (SymmetricPoolGroup), which makes the step for every local rank at once",
      what, group_ranks_, call));
}

absl::Status SymmetricPool::Judge(const Proposal& mine,
                                  const absl::StatusOr<std::vector<Proposal>>& all) {
  absl::Status outcome;
  if (!all.ok()) {
    outcome = absl::Status(
        all.status().code(),
        absl::StrCat("tidepool: the ranks did not all reach ", ProposalText(mine), " of rank ",
                     agreement_->rank(), "'s symmetric pool: ", all.status().message()));
  } else {
    for (size_t rank = 0; rank < all->size(); ++rank) {
      if ((*all)[rank] == mine) continue;
      outcome = absl::FailedPreconditionError(absl::StrCat(
          "tidepool: the ranks diverged: rank ", agreement_->rank(), " is at ", ProposalText(mine),
          ", rank ", rank, " at ", ProposalText((*all)[rank]),
          ". Every rank must make the same symmetric-pool calls with the same sizes "
          "(docs/nccl.md); nothing was registered"));
      break;
    }
  }
  if (!outcome.ok()) {
    broken_ = std::string(outcome.message());
    return outcome;
  }
  ++next_step_;
  return absl::OkStatus();
}

absl::Status SymmetricPool::Agree(Kind kind, uint64_t bytes) {
  const Proposal mine = Propose(kind, bytes);
  return Judge(mine, agreement_->Exchange(mine, options_.agreement_timeout));
}

absl::Status SymmetricPool::JudgeAllocations(size_t bytes, const absl::Status& mine,
                                             const absl::StatusOr<std::vector<Proposal>>& all) {
  if (!all.ok()) {
    broken_ = absl::StrCat("the ranks did not all report their allocation of an agreed segment: ",
                           all.status().message());
    return all.status();
  }
  ++next_step_;
  std::string failed;
  for (size_t rank = 0; rank < all->size(); ++rank) {
    if ((*all)[rank].kind == kAllocated && (*all)[rank].bytes == bytes) continue;
    absl::StrAppend(&failed, failed.empty() ? "" : ", ", rank);
  }
  if (failed.empty()) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "tidepool: a symmetric segment of ", bytes, " bytes could not be allocated on rank(s) ",
      failed, mine.ok() ? "" : absl::StrCat(" (here: ", mine.message(), ")"),
      "; no rank registered it, and the pool is as it was"));
}

void SymmetricPool::Adopt(const SymmetricSegment& segment) {
  held_[segment.ordinal] = segment;
  free_[Place{segment.ordinal, 0}] = segment.bytes;
}

std::vector<uint64_t> SymmetricPool::EmptySegments(uint64_t* bytes) const {
  std::vector<uint64_t> empty;
  *bytes = 0;
  for (const auto& [number, segment] : held_) {
    auto range = free_.find(Place{number, 0});
    if (range != free_.end() && range->second == segment.bytes) {
      empty.push_back(number);
      *bytes += segment.bytes;
    }
  }
  return empty;
}

void SymmetricPool::Drop(uint64_t number) {
  free_.erase(Place{number, 0});
  held_.erase(number);
}

absl::Status SymmetricPool::AddSegment(size_t bytes) {
  absl::StatusOr<void*> memory = segments_->AllocateMemory(bytes);
  const Proposal mine = Propose(memory.ok() ? kAllocated : kAllocationFailed, bytes);
  absl::Status judged = JudgeAllocations(bytes, memory.status(),
                                         agreement_->Exchange(mine, options_.agreement_timeout));
  if (!judged.ok()) {
    if (memory.ok()) segments_->FreeMemory(*memory);
    return judged;
  }
  absl::StatusOr<SymmetricSegment> segment = segments_->Register(*memory, bytes);
  // The third round: did every rank get a window? NCCL gives a NULL window (or fails) on every
  // rank alike when it can, but a rank that alone failed would otherwise leave the others placing
  // buffers in a segment it does not have. Every rank learns of it here and fails alike.
  const Proposal registered = Propose(segment.ok() ? kRegistered : kRegistrationFailed, bytes);
  return JudgeRegistrations(bytes, segment,
                            agreement_->Exchange(registered, options_.agreement_timeout));
}

absl::Status SymmetricPool::JudgeRegistrations(size_t bytes,
                                               const absl::StatusOr<SymmetricSegment>& mine,
                                               const absl::StatusOr<std::vector<Proposal>>& all) {
  std::string failed;
  if (all.ok()) {
    ++next_step_;
    for (size_t rank = 0; rank < all->size(); ++rank) {
      if ((*all)[rank].kind == kRegistered && (*all)[rank].bytes == bytes) continue;
      absl::StrAppend(&failed, failed.empty() ? "" : ", ", rank);
    }
    if (failed.empty()) {
      Adopt(*mine);
      return absl::OkStatus();
    }
  }
  if (mine.ok()) Keep(*mine);
  broken_ = !all.ok() ? absl::StrCat("the ranks did not all report their registration: ",
                                     all.status().message())
                      : absl::StrCat("registering an agreed segment of ", bytes,
                                     " bytes failed on rank(s) ", failed,
                                     mine.ok() ? "" : absl::StrCat(" (here: ",
                                                                   mine.status().message(), ")"));
  if (!all.ok()) return all.status();
  return absl::FailedPreconditionError(absl::StrCat(
      "tidepool: ", broken_, "; every rank's pool is broken, and none places in that segment"));
}

absl::Status SymmetricPool::Reserve(size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("tidepool: a reserve of 0 bytes");
  MutexLock lock(&mu_);
  if (absl::Status s = Broken(); !s.ok()) return s;
  if (absl::Status s = GroupOnly("reserve", "Reserve"); !s.ok()) return s;
  if (absl::Status s = segments_->RefuseDuringCapture("creation"); !s.ok()) return s;
  if (absl::Status s = Agree(kReserve, bytes); !s.ok()) return s;
  return AddSegment(bytes);
}

std::map<SymmetricPool::Place, size_t>::iterator SymmetricPool::FirstFit(size_t bytes) {
  for (auto range = free_.begin(); range != free_.end(); ++range) {
    if (range->second >= bytes) return range;
  }
  return free_.end();
}

absl::StatusOr<void*> SymmetricPool::Allocate(size_t bytes) {
  absl::StatusOr<size_t> rounded = RoundRequest(bytes);
  if (!rounded.ok()) return rounded.status();
  MutexLock lock(&mu_);
  if (absl::Status s = Broken(); !s.ok()) return s;
  auto range = FirstFit(*rounded);
  if (range == free_.end()) {
    if (group_ranks_ != 0) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "tidepool: no room for %u bytes in the symmetric pool of rank %d, one of %d local ranks "
          "driven by one thread: it cannot grow on its own (growing needs every local rank at "
          "once, and this thread drives them all). Grow it with the group's Reserve "
          "(SymmetricPoolGroup::Reserve) before allocating; nothing was changed",
          *rounded, agreement_->rank(), group_ranks_));
    }
    if (options_.growth_bytes == 0) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "tidepool: no room for %u bytes in the symmetric pool, and it grows only by Reserve",
          *rounded));
    }
    const size_t growth = std::max(options_.growth_bytes, *rounded);
    // Every rank is capturing alike under the same-program rule, so every rank refuses alike.
    if (absl::Status s = segments_->RefuseDuringCapture("creation"); !s.ok()) return s;
    if (absl::Status s = Agree(kGrow, growth); !s.ok()) return s;
    if (absl::Status s = AddSegment(growth); !s.ok()) return s;
    ++growths_;
    range = FirstFit(*rounded);
  }
  const Place place = range->first;
  const size_t free_bytes = range->second;
  free_.erase(range);
  if (free_bytes > *rounded) {
    free_[Place{place.first, place.second + *rounded}] = free_bytes - *rounded;
  }
  const uintptr_t address = held_.at(place.first).base + place.second;
  live_[address] = Live{place.first, place.second, *rounded};
  return reinterpret_cast<void*>(address);
}

absl::Status SymmetricPool::Free(void* ptr) {
  MutexLock lock(&mu_);
  auto live = live_.find(reinterpret_cast<uintptr_t>(ptr));
  if (live == live_.end()) return NotLive(ptr, "free");
  Place place{live->second.segment, live->second.offset};
  size_t bytes = live->second.bytes;
  live_.erase(live);
  // Merge with the free neighbours in the same segment, so placement sees whole ranges.
  auto next = free_.find(Place{place.first, place.second + bytes});
  if (next != free_.end()) {
    bytes += next->second;
    free_.erase(next);
  }
  auto after = free_.lower_bound(place);
  if (after != free_.begin()) {
    auto before = std::prev(after);
    if (before->first.first == place.first &&
        before->first.second + before->second == place.second) {
      place = before->first;
      bytes += before->second;
      free_.erase(before);
    }
  }
  free_[place] = bytes;
  return absl::OkStatus();
}

absl::StatusOr<SymmetricPool::Location> SymmetricPool::Lookup(const void* ptr) const {
  MutexLock lock(&mu_);
  const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  auto live = live_.upper_bound(address);
  if (live != live_.begin()) {
    --live;
    if (address < live->first + live->second.bytes) {
      const SymmetricSegment& segment = held_.at(live->second.segment);
      return Location{segment.window, segment.ordinal, address - segment.base,
                      live->second.bytes};
    }
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: %p is not in a live block of this symmetric pool", ptr));
}

absl::Status SymmetricPool::Trim() {
  MutexLock lock(&mu_);
  if (absl::Status s = Broken(); !s.ok()) return s;
  if (absl::Status s = GroupOnly("trim", "Trim"); !s.ok()) return s;
  // The segments that are wholly free; the same on every rank under the same-program rule, and
  // the agreement checks how many bytes they come to.
  uint64_t empty_bytes = 0;
  const std::vector<uint64_t> empty = EmptySegments(&empty_bytes);
  if (absl::Status s = segments_->RefuseDuringCapture("destruction"); !s.ok()) return s;
  if (absl::Status s = Agree(kTrim, empty_bytes); !s.ok()) return s;
  for (uint64_t number : empty) {
    if (absl::Status s = segments_->Destroy(held_.at(number)); !s.ok()) {
      broken_ = absl::StrCat("giving back an agreed segment failed: ", s.message());
      return s;
    }
    Drop(number);
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> SymmetricPool::LiveBlockSize(const void* ptr) const {
  MutexLock lock(&mu_);
  auto live = live_.find(reinterpret_cast<uintptr_t>(ptr));
  if (live != live_.end()) return live->second.bytes;
  return NotLive(ptr, "size query");
}

absl::Status SymmetricPool::NotLive(const void* ptr, const char* operation) const {
  const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  for (const auto& [number, segment] : held_) {
    if (address >= segment.base && address < segment.base + segment.bytes) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "tidepool: %s of %p, which is in segment %u of a symmetric pool but is not a live "
          "block there (a double free, or a pointer into a block); nothing was changed",
          operation, ptr, number));
    }
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: %s of %p, which is in no segment of this symmetric pool (another pool's "
      "pointer?); nothing was changed",
      operation, ptr));
}

bool SymmetricPool::broken() const {
  MutexLock lock(&mu_);
  return !broken_.empty();
}

SymmetricPool::Stats SymmetricPool::GetStats() const {
  MutexLock lock(&mu_);
  Stats stats;
  stats.segments = static_cast<int64_t>(held_.size());
  for (const auto& [number, segment] : held_) stats.reserved_bytes += segment.bytes;
  stats.live_blocks = static_cast<int64_t>(live_.size());
  for (const auto& [address, live] : live_) stats.live_bytes += live.bytes;
  stats.growths = growths_;
  return stats;
}

std::string SymmetricPool::SnapshotJson() const {
  MutexLock lock(&mu_);
  std::string json = "{\"segments\":[";
  bool first_segment = true;
  for (const auto& [number, segment] : held_) {
    absl::StrAppendFormat(&json,
                          "%s{\"segment\":%u,\"window\":\"%p\",\"address\":%u,\"size\":%u,"
                          "\"blocks\":[",
                          first_segment ? "" : ",", number, static_cast<void*>(segment.window),
                          segment.base, segment.bytes);
    first_segment = false;
    bool first_block = true;
    for (const auto& [address, live] : live_) {
      if (live.segment != number) continue;
      absl::StrAppendFormat(&json, "%s{\"offset\":%u,\"size\":%u}", first_block ? "" : ",",
                            live.offset, live.bytes);
      first_block = false;
    }
    json += "]}";
  }
  json += "]}";
  return json;
}

}  // namespace tidepool
