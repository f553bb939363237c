// A randomized differential test of the caching allocator against a model, with a safety oracle.
//
// Hand-written cases (the other tests in this folder) check the rules one at a time; bugs in an
// allocator live in the interleavings nobody writes down: a split after a coalesce after an
// out-of-memory retry after a RecordStream on a block whose stream is three events behind. So
// this test drives a million random operations (allocations from 1 B to 64 MiB skewed toward
// small, frees, RecordStream, EmptyCache, work enqueued and completed on the simulated clock,
// and device allocation faults injected at random) across four streams, and after every one an
// oracle checks:
//   * no two live blocks overlap; every new block is 512-aligned and at least the size asked;
//     live blocks keep the size they were given;
//   * requested / allocated / active-block statistics equal the model's, and reserved bytes equal
//     what the simulated device holds;
//   * SAFETY: bytes last freed on stream S (with RecordStream uses U...) are handed out again on
//     stream T only if T == S or all work enqueued on S up to that free has completed, and every
//     U has completed up to where it was at that free (SimulatedDevice::IsComplete); this, the
//     non-overlap check and the give-back check below are the shared reuse-safety oracle
//     (tests/testing/reuse_oracle.h);
//   * an allocation fails only with RESOURCE_EXHAUSTED, and then only when a fault was injected
//     or the live blocks could plausibly pin the whole device;
//   * every range the allocator gives back to the device or unmaps (seen through a Device
//     wrapper, WatchedDevice) holds no live block, and no work that may use its bytes (by the
//     same rule as SAFETY) is still pending: this sees physical chunks moved between places;
//   * every 5,000 operations, SnapshotJson agrees with the model and with itself (segments tiled
//     by their blocks, neighbours coalesced, size classes apart, mapped bytes == reserved);
// and at the end everything is freed, the cache emptied, and the device must hold nothing (no
// segment, chunk, range or event leaked). Each mode runs on a roomy device (a million
// operations) and on a tight one, where out-of-memory recovery runs all the time.
//
// A second case runs twelve threads (eight on their own streams, four sharing one, so that they
// meet on its shard's lock and move to lanes of their own) with blocks handed between threads to
// be freed, checking non-overlap in one global interval map and the same SAFETY and give-back
// rules; it is the test to run under --config=tsan and --config=asan.
//
// Runs are seeded and reproducible: the seed is printed, and TIDEPOOL_TEST_SEED=<n> (e.g.
// `bazel test --test_env=TIDEPOOL_TEST_SEED=123 //tests/allocator:differential_test`) replays
// one; TIDEPOOL_DIFFERENTIAL_OPS overrides the number of operations. On failure the message
// names the seed and the operation index.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/forwarding_device.h"
#include "allocator/simulated_device.h"
#include "allocator/stats.h"
#include "tests/testing/randomized_run.h"
#include "tests/testing/reuse_oracle.h"

namespace tidepool {
namespace {

using testing::ReuseOracle;

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kAlignment = 512;
constexpr size_t kGranule = 2 * kMiB;  // the simulated device's default granularity

size_t RoundUp(size_t bytes, size_t to) { return (bytes + to - 1) / to * to; }

// The single-threaded run's sizes: 1 B to 64 MiB, most of them small, so that small and large
// segments, splitting and the out-of-memory path all see steady traffic.
constexpr testing::SizeBand kSizes[] = {
    {60, 0, 16},    // 1 B .. 64 KiB
    {85, 16, 20},   // 64 KiB .. 1 MiB
    {97, 20, 23},   // 1 MiB .. 8 MiB
    {100, 23, 26},  // 8 MiB .. 64 MiB
};

// ------------------------------------------------------------------------------------------------
// SnapshotJson, read back: a minimal JSON reader (objects, arrays, strings without escapes
// beyond \" and \\, unsigned integers, true / false / null), enough for the snapshot format of
// docs/stats.md.

struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  uint64_t number = 0;
  std::string text;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json* Find(const std::string& key) const {
    for (const auto& [name, value] : fields) {
      if (name == key) return &value;
    }
    return nullptr;
  }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : text_(text) {}

  bool Read(Json* out) {
    if (!Value(out)) return false;
    SkipSpace();
    return at_ == text_.size();
  }

 private:
  void SkipSpace() {
    while (at_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[at_]))) ++at_;
  }
  bool Consume(char c) {
    SkipSpace();
    if (at_ < text_.size() && text_[at_] == c) {
      ++at_;
      return true;
    }
    return false;
  }
  bool Word(const char* word) {
    const size_t length = std::strlen(word);
    if (text_.compare(at_, length, word) != 0) return false;
    at_ += length;
    return true;
  }
  bool String(std::string* out) {
    if (!Consume('"')) return false;
    while (at_ < text_.size() && text_[at_] != '"') {
      if (text_[at_] == '\\' && at_ + 1 < text_.size()) ++at_;
      out->push_back(text_[at_++]);
    }
    return Consume('"');
  }
  bool Value(Json* out) {
    if (++depth_ > 16) return false;
    SkipSpace();
    if (at_ >= text_.size()) return false;
    const char c = text_[at_];
    bool ok = false;
    if (c == '{') {
      out->kind = Json::Kind::kObject;
      ++at_;
      ok = Consume('}');
      while (!ok) {
        std::string name;
        Json value;
        if (!String(&name) || !Consume(':') || !Value(&value)) break;
        out->fields.emplace_back(std::move(name), std::move(value));
        if (Consume('}')) ok = true;
        else if (!Consume(',')) break;
      }
    } else if (c == '[') {
      out->kind = Json::Kind::kArray;
      ++at_;
      ok = Consume(']');
      while (!ok) {
        Json value;
        if (!Value(&value)) break;
        out->items.push_back(std::move(value));
        if (Consume(']')) ok = true;
        else if (!Consume(',')) break;
      }
    } else if (c == '"') {
      out->kind = Json::Kind::kString;
      ok = String(&out->text);
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      out->kind = Json::Kind::kNumber;
      ok = true;
      while (at_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[at_]))) {
        const uint64_t digit = static_cast<uint64_t>(text_[at_++] - '0');
        if (out->number > (UINT64_MAX - digit) / 10) ok = false;
        out->number = out->number * 10 + digit;
      }
    } else if (Word("true")) {
      out->kind = Json::Kind::kBool;
      out->boolean = true;
      ok = true;
    } else if (Word("false")) {
      out->kind = Json::Kind::kBool;
      ok = true;
    } else if (Word("null")) {
      ok = true;
    }
    --depth_;
    return ok;
  }

  const std::string& text_;
  size_t at_ = 0;
  int depth_ = 0;
};

// A live block as the test knows it, for comparison with the snapshot.
struct KnownBlock {
  size_t size = 0;
  size_t requested = 0;
  StreamId stream = 0;
};

// Checks the allocator's own picture of its memory (SnapshotJson) against its invariants and
// against what the test knows: segments are disjoint and tiled exactly by their blocks; states
// are the documented ones; no two neighbouring blocks are both free (coalescing) or both
// unmapped; only expandable segments have unmapped blocks; small segments hold only small
// blocks and large segments only large ones; the mapped bytes add up to reserved_bytes; the
// segment count matches the statistics; and the allocated blocks are exactly the live blocks
// known to the test, with their sizes, requests and streams. Returns "" or what is wrong.
std::string CheckSnapshot(const std::string& snapshot, const AllocatorStats& stats,
                          const std::map<uintptr_t, KnownBlock>& known) {
  Json root;
  if (!JsonReader(snapshot).Read(&root) || root.kind != Json::Kind::kObject) {
    return "SnapshotJson is not valid JSON";
  }
  const Json* segments = root.Find("segments");
  if (segments == nullptr || segments->kind != Json::Kind::kArray) return "no segments array";
  auto number = [](const Json& object, const char* key, uint64_t* out) {
    const Json* field = object.Find(key);
    if (field == nullptr || field->kind != Json::Kind::kNumber) return false;
    *out = field->number;
    return true;
  };
  auto flag = [](const Json& object, const char* key, bool* out) {
    const Json* field = object.Find(key);
    if (field == nullptr || field->kind != Json::Kind::kBool) return false;
    *out = field->boolean;
    return true;
  };
  std::map<uintptr_t, uintptr_t> segment_ranges;
  size_t allocated_seen = 0;
  uint64_t mapped_bytes = 0;
  for (const Json& segment : segments->items) {
    uint64_t base = 0, size = 0, stream = 0;
    bool expandable = false, small = false;
    if (!number(segment, "address", &base) || !number(segment, "size", &size) ||
        !number(segment, "stream", &stream) || !flag(segment, "expandable", &expandable) ||
        !flag(segment, "small", &small)) {
      return "a segment lacks address / size / stream / expandable / small";
    }
    const Json* blocks = segment.Find("blocks");
    if (blocks == nullptr || blocks->kind != Json::Kind::kArray || blocks->items.empty()) {
      return absl::StrCat("segment ", base, " has no blocks");
    }
    if (!segment_ranges.emplace(base, base + size).second) {
      return absl::StrCat("two segments at ", base);
    }
    uint64_t cursor = base;
    std::string previous_state;
    for (const Json& block : blocks->items) {
      uint64_t address = 0, block_size = 0, requested = 0;
      const Json* state = block.Find("state");
      if (!number(block, "address", &address) || !number(block, "size", &block_size) ||
          !number(block, "requested", &requested) || state == nullptr ||
          state->kind != Json::Kind::kString) {
        return "a block lacks address / size / requested / state";
      }
      const std::string& name = state->text;
      if (address != cursor) {
        return absl::StrCat("segment ", base, " is not tiled: block at ", address,
                            " where one was expected at ", cursor);
      }
      if (block_size == 0 || address % kAlignment != 0 || block_size % kAlignment != 0) {
        return absl::StrCat("block ", address, " of ", block_size, " is not 512-aligned");
      }
      cursor += block_size;
      if (name != "allocated" && name != "free" && name != "free_parked" &&
          name != "awaiting_events" && name != "unmapped") {
        return absl::StrCat("block ", address, " has unknown state ", name);
      }
      if ((name == "free" || name == "unmapped") && name == previous_state) {
        return absl::StrCat("block ", address, " is ", name,
                            " next to a neighbour in the same state: not coalesced");
      }
      if (name == "unmapped" && !expandable) {
        return absl::StrCat("plain segment ", base, " has an unmapped block");
      }
      if (name != "unmapped") mapped_bytes += block_size;
      if (name == "allocated") {
        ++allocated_seen;
        auto it = known.find(address);
        if (it == known.end()) {
          return absl::StrCat("block ", address, " is allocated but not live for the test");
        }
        if (it->second.size != block_size || it->second.requested != requested) {
          return absl::StrCat("block ", address, " is listed as ", block_size, " bytes for ",
                              requested, " requested; the test knows ", it->second.size,
                              " for ", it->second.requested);
        }
        if (it->second.stream != stream) {
          return absl::StrCat("block ", address, " sits in a segment of stream ", stream,
                              " but was allocated on stream ", it->second.stream);
        }
        const bool small_request = RoundUp(requested, kAlignment) <= kMiB;
        if (small_request != small) {
          return absl::StrCat("a ", requested, "-byte block sits in a ",
                              small ? "small" : "large", " segment");
        }
      }
      previous_state = name;
    }
    if (cursor != base + size) {
      return absl::StrCat("segment ", base, " of ", size, " bytes has blocks ending at ", cursor);
    }
  }
  uintptr_t previous_end = 0;
  for (const auto& [begin, end] : segment_ranges) {
    if (begin < previous_end) return absl::StrCat("segments overlap at ", begin);
    previous_end = end;
  }
  if (allocated_seen != known.size()) {
    return absl::StrCat("the snapshot lists ", allocated_seen, " allocated blocks; ",
                        known.size(), " are live");
  }
  if (static_cast<int64_t>(segment_ranges.size()) != stats.segments.current) {
    return absl::StrCat("the snapshot lists ", segment_ranges.size(),
                        " segments; segments.current is ", stats.segments.current);
  }
  if (static_cast<int64_t>(mapped_bytes) != stats.reserved_bytes.current) {
    return absl::StrCat("the snapshot's mapped blocks add up to ", mapped_bytes,
                        " bytes; reserved_bytes.current is ", stats.reserved_bytes.current);
  }
  return "";
}

// ------------------------------------------------------------------------------------------------
// A Device that forwards everything to a SimulatedDevice and, before the allocator gives a range
// back (FreeSegment) or unmaps it (Unmap), reports the range to a hook: the reuse oracle then
// checks that no live block lies in it and that no work that may still use its bytes is pending.
// This sees what addresses alone cannot: physical memory moved from one place (or stream) to
// another.

class WatchedDevice : public ForwardingDevice {
 public:
  using Hook = std::function<void(const char* operation, uintptr_t address, size_t bytes)>;

  explicit WatchedDevice(SimulatedDevice* inner) : ForwardingDevice(inner) {}
  void set_hook(Hook hook) { hook_ = std::move(hook); }

  absl::Status FreeSegment(uintptr_t address, size_t bytes) override {
    if (hook_) hook_("FreeSegment", address, bytes);
    return ForwardingDevice::FreeSegment(address, bytes);
  }
  absl::Status Unmap(uintptr_t address, size_t bytes) override {
    if (hook_) hook_("Unmap", address, bytes);
    return ForwardingDevice::Unmap(address, bytes);
  }

 private:
  Hook hook_;
};

// ------------------------------------------------------------------------------------------------
// Single-threaded differential run.

constexpr int kStreams = 4;

struct LiveBlock {
  uintptr_t address = 0;
  size_t requested = 0;
  size_t size = 0;  // BlockSize when it was handed out
  int stream = 0;
  uint8_t uses = 0;  // bit u: RecordStream on stream u (never the block's own stream)
};

class DifferentialRun {
 public:
  DifferentialRun(bool expandable, size_t capacity, uint64_t seed, int64_t ops)
      : expandable_(expandable), capacity_(capacity), seed_(seed), ops_(ops), random_(seed) {
    SimulatedDevice::Options options;
    options.capacity = capacity;
    device_ = std::make_unique<SimulatedDevice>(options);
    REQUIRE(device_->granularity() == kGranule);
    watched_ = std::make_unique<WatchedDevice>(device_.get());
    watched_->set_hook([this](const char* operation, uintptr_t address, size_t bytes) {
      OnGiveBack(operation, address, bytes);
    });
    Config config;
    config.expandable_segments = expandable;
    absl::StatusOr<std::unique_ptr<CachingAllocator>> made =
        CachingAllocator::Create(watched_.get(), config);
    REQUIRE(made.ok());
    allocator_ = std::move(*made);
    for (int i = 0; i < kStreams; ++i) {
      absl::StatusOr<Stream> stream = device_->CreateStream();
      REQUIRE(stream.ok());
      streams_[i] = *stream;
      absl::StatusOr<StreamId> id = device_->GetStreamId(*stream);
      REQUIRE(id.ok());
      stream_ids_[i] = *id;
    }
    oracle_.emplace(device_.get(), streams_);
  }

  void Run() {
    std::printf("differential run: expandable_segments=%d capacity=%zu MiB seed=%" PRIu64
                " ops=%" PRId64 "\n",
                expandable_ ? 1 : 0, capacity_ >> 20, seed_, ops_);
    std::fflush(stdout);
    for (op_ = 0; op_ < ops_; ++op_) {
      Step();
      CheckAfterStep();
      if (op_ % 4096 == 0) oracle_->ForgetSettled();  // keeps the oracle small
      if (op_ % 5000 == 0) CheckSnapshotNow();
      if (op_ % 100000 == 0) CheckEveryLiveBlock();
    }
    Teardown();
    std::printf(
        "differential run done: %" PRId64 " ops, %" PRId64 " allocations, %" PRId64
        " frees, %" PRId64 " out-of-memory refusals (%" PRId64 " with a fault armed), %" PRId64
        " reuses across a RecordStream checked, %" PRId64 " snapshots, %" PRId64
        " give-backs checked, %" PRId64 " oracle checks, retries %" PRId64 "\n",
        ops_, allocations_, frees_, ooms_, ooms_with_fault_, oracle_->guarded_reuses(), snapshots_,
        give_backs_, checks_, final_retries_);
    std::fflush(stdout);
    // The run exercised what it is meant to exercise.
    CHECK(allocations_ > ops_ / 4);
    CHECK(frees_ > ops_ / 4);
    CHECK(oracle_->guarded_reuses() > 0);
  }

 private:
  void Fail(const std::string& what) {
    FAIL("differential run (expandable_segments=" << expandable_ << ", capacity "
                                                  << (capacity_ >> 20) << " MiB, seed " << seed_
                                                  << ") failed at operation " << op_ << ": "
                                                  << what << "\nlast operations:\n"
                                                  << absl::StrJoin(history_, "\n"));
  }

  void Check(bool condition, const char* what) {
    ++checks_;
    if (!condition) Fail(what);
  }

  void Note(std::string text) {
    if (history_.size() == 12) history_.pop_front();
    history_.push_back(absl::StrCat(op_, ": ", text));
  }

  void Step() {
    const uint64_t dice = random_() % 1000;
    // Keep the live set around a couple of hundred blocks.
    const int alloc_share = live_.size() < 64 ? 700 : live_.size() > 320 ? 300 : 480;
    if (live_.empty() || dice < static_cast<uint64_t>(alloc_share)) return DoAllocate();
    if (dice < 860) return DoFree();
    if (dice < 900) return DoRecordStream();
    if (dice < 960) {
      const int s = static_cast<int>(random_() % kStreams);
      enqueued_[s] = device_->Enqueue(streams_[s]);
      Note(absl::StrCat("Enqueue(stream ", s, ") -> ", enqueued_[s]));
      return;
    }
    if (dice < 998) {
      const int s = static_cast<int>(random_() % kStreams);
      const uint64_t position = random_() % 3 == 0 ? enqueued_[s] : random_() % (enqueued_[s] + 1);
      device_->Complete(streams_[s], position);
      Note(absl::StrCat("Complete(stream ", s, ", ", position, ")"));
      return;
    }
    if (dice < 999 && random_() % 4 == 0) {
      absl::Status emptied = allocator_->EmptyCache();
      Note("EmptyCache()");
      Check(emptied.ok(), "EmptyCache failed");
      return;
    }
    if (!fault_armed_) {
      const int64_t nth = 1 + static_cast<int64_t>(random_() % 4);
      device_->FailNthAllocation(nth);
      fault_armed_ = true;
      fault_disarms_at_ = allocator_->GetStats().device_allocations + nth;
      Note(absl::StrCat("FailNthAllocation(", nth, ")"));
    }
  }

  // Host bytes a live block can keep reserved after the cache is returned, at most.
  size_t Pinned(const LiveBlock& block) const {
    if (expandable_) return RoundUp(block.size, kGranule) + kGranule;
    return block.size <= kMiB ? 2 * kMiB : 64 * kMiB;  // small segments; the largest plain one
  }

  void DoAllocate() {
    const size_t size = testing::RandomSize(random_, kSizes);
    const int s = static_cast<int>(random_() % kStreams);
    absl::StatusOr<void*> result = allocator_->Allocate(size, streams_[s]);
    Note(absl::StrCat("Allocate(", size, ", stream ", s, ") -> ",
                      result.ok() ? absl::StrCat(reinterpret_cast<uintptr_t>(*result))
                                  : result.status().ToString()));
    if (!result.ok()) {
      Check(absl::IsResourceExhausted(result.status()),
            "an allocation failed with something other than RESOURCE_EXHAUSTED");
      ++ooms_;
      if (fault_armed_) {
        ++ooms_with_fault_;
      } else {
        const size_t need =
            expandable_ ? RoundUp(size, kGranule) + kGranule : std::max(RoundUp(size, 2 * kMiB), 20 * kMiB);
        Check(pinned_ + need > capacity_,
              "out of memory although the live blocks cannot pin the device and no fault was "
              "injected");
      }
      return;
    }
    ++allocations_;
    LiveBlock block;
    block.address = reinterpret_cast<uintptr_t>(*result);
    block.requested = size;
    block.stream = s;
    absl::StatusOr<size_t> block_size = allocator_->BlockSize(*result);
    Check(block_size.ok(), "BlockSize of a block just handed out failed");
    block.size = *block_size;
    Check(block.address % kAlignment == 0, "a block is not 512-byte aligned");
    Check(block.size >= size, "a block is smaller than what was asked");
    Check(block.size % kAlignment == 0, "a block's size is not a multiple of 512");
    Check(block.address + block.size > block.address, "a block wraps around the address space");

    // No overlap with any live block, and freed bytes reused only under the SAFETY rule.
    const std::vector<std::string> unsafe =
        oracle_->Admit(block.address, block.address + block.size, s);
    ++checks_;
    if (!unsafe.empty()) Fail(absl::StrJoin(unsafe, "\n"));
    live_.push_back(block);
    requested_ += static_cast<int64_t>(block.requested);
    allocated_ += static_cast<int64_t>(block.size);
    pinned_ += Pinned(block);
  }

  void DoFree() {
    const size_t index = random_() % live_.size();
    const LiveBlock block = live_[index];
    live_[index] = live_.back();
    live_.pop_back();
    absl::Status freed = allocator_->Free(reinterpret_cast<void*>(block.address));
    Note(absl::StrCat("Free(", block.address, " of ", block.size, ", stream ", block.stream,
                      ", uses ", block.uses, ") -> ", freed.ToString()));
    Check(freed.ok(), "Free of a live block failed");
    ++frees_;
    requested_ -= static_cast<int64_t>(block.requested);
    allocated_ -= static_cast<int64_t>(block.size);
    pinned_ -= Pinned(block);
    // After Free, not before: a give-back inside Free must still find the block live.
    const std::string not_live = oracle_->Retire(block.address, block.uses, enqueued_);
    ++checks_;
    if (!not_live.empty()) Fail(not_live);
  }

  void DoRecordStream() {
    LiveBlock& block = live_[random_() % live_.size()];
    const int u = static_cast<int>(random_() % kStreams);
    absl::Status recorded = allocator_->RecordStream(reinterpret_cast<void*>(block.address),
                                                     streams_[u]);
    Note(absl::StrCat("RecordStream(", block.address, " of stream ", block.stream, ", stream ",
                      u, ") -> ", recorded.ToString()));
    Check(recorded.ok(), "RecordStream on a live block failed");
    if (u != block.stream) block.uses |= static_cast<uint8_t>(1u << u);
  }

  void CheckAfterStep() {
    if (!give_back_problem_.empty()) {
      Fail(absl::StrCat("memory went back to the device unsafely: ", give_back_problem_));
    }
    const AllocatorStats stats = allocator_->GetStats();
    Check(stats.requested_bytes.current == requested_, "requested_bytes.current != model");
    Check(stats.allocated_bytes.current == allocated_, "allocated_bytes.current != model");
    Check(stats.active_blocks.current == static_cast<int64_t>(live_.size()),
          "active_blocks.current != number of live blocks");
    Check(stats.reserved_bytes.current == static_cast<int64_t>(device_->used_bytes()),
          "reserved_bytes.current != SimulatedDevice::used_bytes()");
    Check(device_->used_bytes() <= capacity_, "the device holds more than its capacity");
    Check(stats.requested_bytes.peak >= stats.requested_bytes.current, "a peak below current");
    if (fault_armed_ && stats.device_allocations >= fault_disarms_at_) fault_armed_ = false;
    // One live block, chosen at random, still answers with its size.
    if (!live_.empty()) {
      const LiveBlock& block = live_[random_() % live_.size()];
      absl::StatusOr<size_t> size = allocator_->BlockSize(reinterpret_cast<void*>(block.address));
      Check(size.ok() && *size == block.size, "a live block's BlockSize changed");
    }
    Check(device_->capture_violations() == 0, "an event was queried during capture");
  }

  void CheckSnapshotNow() {
    std::map<uintptr_t, KnownBlock> known;
    for (const LiveBlock& block : live_) {
      known[block.address] = KnownBlock{block.size, block.requested, stream_ids_[block.stream]};
    }
    const std::string problem =
        CheckSnapshot(allocator_->SnapshotJson(), allocator_->GetStats(), known);
    ++snapshots_;
    ++checks_;
    if (!problem.empty()) Fail(absl::StrCat("snapshot: ", problem));
  }

  void CheckEveryLiveBlock() {
    for (const LiveBlock& block : live_) {
      absl::StatusOr<size_t> size = allocator_->BlockSize(reinterpret_cast<void*>(block.address));
      Check(size.ok() && *size == block.size, "a live block's BlockSize changed (full sweep)");
    }
  }

  // The WatchedDevice's hook: the allocator is about to give back or unmap [address, +bytes).
  // Called inside an allocator call, so it only records the first problem; CheckAfterStep
  // reports it.
  void OnGiveBack(const char* operation, uintptr_t address, size_t bytes) {
    ++give_backs_;
    ++checks_;
    if (!give_back_problem_.empty()) return;
    const std::string problem = oracle_->CheckGiveBack(address, address + bytes);
    if (!problem.empty()) {
      give_back_problem_ = absl::StrCat(operation, "(", address, ", ", bytes, ") while ", problem);
    }
  }

  void Teardown() {
    CheckEveryLiveBlock();
    CheckSnapshotNow();
    while (!live_.empty()) {
      op_ = ops_;  // failures here are reported as "after the last operation"
      DoFree();
      CheckAfterStep();
    }
    final_retries_ = allocator_->GetStats().retries;
    REQUIRE(allocator_->EmptyCache().ok());
    const AllocatorStats stats = allocator_->GetStats();
    CHECK(stats.requested_bytes.current == 0);
    CHECK(stats.allocated_bytes.current == 0);
    CHECK(stats.active_blocks.current == 0);
    CHECK(stats.reserved_bytes.current == 0);
    CHECK(stats.segments.current == 0);
    CHECK(device_->used_bytes() == 0);
    CHECK(device_->live_segments() == 0);
    CHECK(CheckSnapshot(allocator_->SnapshotJson(), stats, {}) == "");
    allocator_.reset();
    CHECK(device_->live_events() == 0);  // the allocator's events went with it
    CHECK(device_->used_bytes() == 0);
    INFO(give_back_problem_);
    CHECK(give_back_problem_.empty());
    CHECK(give_backs_ > 0);
  }

  const bool expandable_;
  const size_t capacity_;
  const uint64_t seed_;
  const int64_t ops_;
  std::mt19937_64 random_;
  std::unique_ptr<SimulatedDevice> device_;
  // Made once the streams are; before the allocator, whose destruction may still give memory
  // back through the hook.
  std::optional<ReuseOracle> oracle_;
  std::unique_ptr<WatchedDevice> watched_;
  std::unique_ptr<CachingAllocator> allocator_;
  std::array<Stream, kStreams> streams_{};
  std::array<StreamId, kStreams> stream_ids_{};
  std::array<uint64_t, kStreams> enqueued_{};

  int64_t op_ = 0;
  std::vector<LiveBlock> live_;
  int64_t requested_ = 0;
  int64_t allocated_ = 0;
  size_t pinned_ = 0;
  bool fault_armed_ = false;
  int64_t fault_disarms_at_ = 0;
  std::deque<std::string> history_;

  int64_t allocations_ = 0;
  int64_t frees_ = 0;
  int64_t ooms_ = 0;
  int64_t ooms_with_fault_ = 0;
  int64_t checks_ = 0;
  int64_t snapshots_ = 0;
  int64_t give_backs_ = 0;
  std::string give_back_problem_;  // the first unsafe give-back the hook saw
  int64_t final_retries_ = 0;
};

TEST_CASE("a million random operations agree with the model and never reuse memory unsafely") {
  const bool expandable = GENERATE(true, false);
  // A roomy device, where out-of-memory is rare, for a million operations per mode (about a
  // second each in the optimized build); and a tight one, where the retry path runs all the
  // time, for a quarter of that.
  const bool tight = GENERATE(false, true);
  const size_t capacity = tight ? size_t{256} << 20 : size_t{1} << 30;
  const int64_t ops = testing::OpsFromEnvironment(tight ? 250000 : 1000000);
  const uint64_t seed =
      testing::SeedFromEnvironment(20240601 + (expandable ? 0 : 1) + (tight ? 2 : 0));
  INFO("expandable_segments=" << expandable << " capacity=" << (capacity >> 20)
                              << " MiB seed=" << seed << " ops=" << ops);
  DifferentialRun run(expandable, capacity, seed, ops);
  run.Run();
}

// ------------------------------------------------------------------------------------------------
// Multi-threaded variant.
//
// Twelve threads: 0..7 on streams of their own, 8 to 11 sharing the ninth (they contend on its
// shard and move to lanes: caching_allocator_impl.h; a block freed by another thread goes back
// to its own lane's shard). Blocks are sometimes
// handed to another thread to free. One reuse oracle for all threads (under one mutex) checks that
// no two live blocks overlap, applies the same SAFETY rule as above to reuse, and checks every
// range the WatchedDevice sees given back or unmapped. Stream positions are tracked
// conservatively (a racing Enqueue may be missed, which can only make the oracle more lenient,
// never wrong).

constexpr int kThreadStreams = 9;

struct HeldBlock {
  void* ptr = nullptr;
  size_t requested = 0;
  int stream = 0;
  uint16_t uses = 0;  // bit u: RecordStream on stream u
};

struct SharedState {
  SharedState(SimulatedDevice& sim, const std::array<Stream, kThreadStreams>& made)
      : device(sim), streams(made), oracle(&sim, made) {}

  SimulatedDevice& device;
  const std::array<Stream, kThreadStreams> streams;
  std::array<std::atomic<uint64_t>, kThreadStreams> enqueued{};  // highest position seen

  std::mutex mu;
  ReuseOracle oracle;  // guarded by mu
  std::vector<HeldBlock> handed_over;  // blocks waiting for another thread to free
  std::vector<std::string> errors;
  std::atomic<bool> failed{false};
  std::atomic<int64_t> give_backs_checked{0};

  void Error(std::string what) {
    std::lock_guard<std::mutex> lock(mu);
    ErrorLocked(std::move(what));
  }
  void ErrorLocked(std::string what) {
    if (errors.size() < 20) errors.push_back(std::move(what));
    failed.store(true);
  }

  void NoteEnqueued(int stream, uint64_t position) {
    uint64_t seen = enqueued[stream].load();
    while (seen < position && !enqueued[stream].compare_exchange_weak(seen, position)) {
    }
  }

  // Called by the WatchedDevice, inside the allocator, whenever memory is given back or unmapped.
  void OnGiveBack(const char* operation, uintptr_t address, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    give_backs_checked.fetch_add(1, std::memory_order_relaxed);
    const std::string problem = oracle.CheckGiveBack(address, address + bytes);
    if (!problem.empty()) {
      ErrorLocked(absl::StrCat(operation, "(", address, ", ", bytes, ") while ", problem));
    }
  }

  // A new block [begin, end) on `stream`: must not overlap a live block, and may reuse freed
  // bytes only under the SAFETY rule. Records it as live.
  void AdmitLocked(int thread, int op, uintptr_t begin, uintptr_t end, int stream) {
    for (const std::string& problem : oracle.Admit(begin, end, stream, {}, thread)) {
      ErrorLocked(absl::StrCat("thread ", thread, " op ", op, ": ", problem));
    }
  }

  // Before a Free: the block leaves the live blocks, and its bytes are remembered as freed with
  // every stream's position now.
  void RetireLocked(int thread, int op, const HeldBlock& block) {
    std::array<uint64_t, kThreadStreams> positions{};
    for (int s = 0; s < kThreadStreams; ++s) positions[s] = enqueued[s].load();
    const std::string problem =
        oracle.Retire(reinterpret_cast<uintptr_t>(block.ptr), block.uses, positions);
    if (!problem.empty()) ErrorLocked(absl::StrCat("thread ", thread, " op ", op, ": ", problem));
  }
};

struct ThreadTotals {
  int64_t allocations = 0;
  int64_t frees = 0;
  int64_t frees_of_others = 0;
  int64_t ooms = 0;
};

void ThreadBody(int thread, int stream_index, CachingAllocator& allocator, SharedState& shared,
                uint64_t seed, int ops, ThreadTotals& totals) {
  std::mt19937_64 random(seed);
  SimulatedDevice& device = shared.device;
  const Stream stream = shared.streams[stream_index];
  std::vector<HeldBlock> mine;
  auto error = [&](int op, const std::string& what) {
    shared.Error(absl::StrCat("thread ", thread, " op ", op, ": ", what));
  };
  auto free_block = [&](int op, const HeldBlock& block) {
    // Often the block was just used by work still queued on its stream.
    if (random() % 2 == 0) {
      shared.NoteEnqueued(block.stream, device.Enqueue(shared.streams[block.stream]));
    }
    {
      std::lock_guard<std::mutex> lock(shared.mu);
      shared.RetireLocked(thread, op, block);
    }
    absl::Status freed = allocator.Free(block.ptr);
    if (!freed.ok()) error(op, absl::StrCat("Free failed: ", freed.ToString()));
  };
  for (int op = 0; op < ops && !shared.failed.load(std::memory_order_relaxed); ++op) {
    const uint64_t dice = random() % 1000;
    const int alloc_share = mine.size() < 8 ? 800 : mine.size() > 48 ? 250 : 450;
    if (mine.empty() || dice < static_cast<uint64_t>(alloc_share)) {
      // 1 B .. 4 MiB, mostly small.
      const size_t size = testing::LogUniformSize(random, 0, 22);
      absl::StatusOr<void*> ptr = allocator.Allocate(size, stream);
      if (!ptr.ok()) {
        if (!absl::IsResourceExhausted(ptr.status())) {
          error(op, absl::StrCat("Allocate(", size, ") failed: ", ptr.status().ToString()));
        }
        ++totals.ooms;
        continue;
      }
      ++totals.allocations;
      absl::StatusOr<size_t> block_size = allocator.BlockSize(*ptr);
      const uintptr_t begin = reinterpret_cast<uintptr_t>(*ptr);
      if (!block_size.ok() || *block_size < size || begin % kAlignment != 0) {
        error(op, absl::StrCat("block ", begin, " for ", size, " bytes: bad size or alignment"));
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(shared.mu);
        shared.AdmitLocked(thread, op, begin, begin + *block_size, stream_index);
      }
      mine.push_back(HeldBlock{*ptr, size, stream_index, 0});
    } else if (dice < 850) {
      const size_t index = random() % mine.size();
      const HeldBlock block = mine[index];
      mine[index] = mine.back();
      mine.pop_back();
      free_block(op, block);
      ++totals.frees;
    } else if (dice < 900) {
      // Hand a block over: some other thread frees it.
      const size_t index = random() % mine.size();
      const HeldBlock block = mine[index];
      mine[index] = mine.back();
      mine.pop_back();
      std::lock_guard<std::mutex> lock(shared.mu);
      shared.handed_over.push_back(block);
    } else if (dice < 950) {
      HeldBlock block;
      {
        std::lock_guard<std::mutex> lock(shared.mu);
        if (!shared.handed_over.empty()) {
          const size_t index = random() % shared.handed_over.size();
          block = shared.handed_over[index];
          shared.handed_over[index] = shared.handed_over.back();
          shared.handed_over.pop_back();
        }
      }
      if (block.ptr != nullptr) {
        absl::StatusOr<size_t> size = allocator.BlockSize(block.ptr);
        if (!size.ok() || *size < block.requested) error(op, "a handed-over block lost its size");
        free_block(op, block);
        ++totals.frees_of_others;
      }
    } else if (dice < 970) {
      HeldBlock& block = mine[random() % mine.size()];
      const int u = static_cast<int>(random() % kThreadStreams);
      // The other stream uses the block: work queued there before the free.
      shared.NoteEnqueued(u, device.Enqueue(shared.streams[u]));
      absl::Status recorded = allocator.RecordStream(block.ptr, shared.streams[u]);
      if (!recorded.ok()) error(op, absl::StrCat("RecordStream failed: ", recorded.ToString()));
      if (u != block.stream) block.uses |= static_cast<uint16_t>(1u << u);
    } else if (dice < 985) {
      shared.NoteEnqueued(stream_index, device.Enqueue(stream));
    } else if (dice < 999) {
      device.Complete(shared.streams[random() % kThreadStreams]);
    } else if (random() % 2 == 0) {
      absl::Status emptied = allocator.EmptyCache();
      if (!emptied.ok()) error(op, absl::StrCat("EmptyCache failed: ", emptied.ToString()));
    } else {
      const HeldBlock& block = mine[random() % mine.size()];
      absl::StatusOr<size_t> block_size = allocator.BlockSize(block.ptr);
      if (!block_size.ok() || *block_size < block.requested) error(op, "a live block lost its size");
    }
  }
  // Leave what is still held for the main thread to check and free.
  std::lock_guard<std::mutex> lock(shared.mu);
  for (const HeldBlock& block : mine) shared.handed_over.push_back(block);
}

TEST_CASE("ten threads on nine streams never get overlapping blocks, and tear down cleanly") {
  const bool expandable = GENERATE(true, false);
  // Roomy: no out-of-memory at all. Tight: threads keep running into out-of-memory recovery,
  // which returns other threads' cached memory while they allocate and free.
  const bool tight = GENERATE(false, true);
  const size_t capacity = tight ? size_t{160} << 20 : size_t{16} << 30;
  const uint64_t seed = testing::SeedFromEnvironment(77 + (expandable ? 0 : 1) + (tight ? 2 : 0));
  constexpr int kThreads = 12;
  constexpr int kTotalOps = 200000;
  INFO("expandable_segments=" << expandable << " capacity=" << (capacity >> 20)
                              << " MiB seed=" << seed);
  std::printf("threaded run: expandable_segments=%d capacity=%zu MiB seed=%" PRIu64
              " threads=%d ops=%d\n",
              expandable ? 1 : 0, capacity >> 20, seed, kThreads, kTotalOps);
  std::fflush(stdout);

  SimulatedDevice::Options options;
  options.capacity = capacity;
  SimulatedDevice device(options);
  std::array<Stream, kThreadStreams> streams{};
  for (Stream& stream : streams) {
    absl::StatusOr<Stream> made = device.CreateStream();
    REQUIRE(made.ok());
    stream = *made;
  }
  SharedState shared(device, streams);
  WatchedDevice watched(&device);
  watched.set_hook([&shared](const char* operation, uintptr_t address, size_t bytes) {
    shared.OnGiveBack(operation, address, bytes);
  });
  Config config;
  config.expandable_segments = expandable;
  absl::StatusOr<std::unique_ptr<CachingAllocator>> made =
      CachingAllocator::Create(&watched, config);
  REQUIRE(made.ok());
  std::unique_ptr<CachingAllocator> allocator = std::move(*made);

  std::vector<ThreadTotals> totals(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(ThreadBody, t, std::min(t, kThreadStreams - 1), std::ref(*allocator),
                         std::ref(shared), seed * 1000 + static_cast<uint64_t>(t),
                         kTotalOps / kThreads, std::ref(totals[t]));
  }
  for (std::thread& thread : threads) thread.join();

  {
    std::lock_guard<std::mutex> lock(shared.mu);
    INFO(absl::StrJoin(shared.errors, "\n"));
    REQUIRE(shared.errors.empty());
  }
  ThreadTotals sum;
  for (const ThreadTotals& t : totals) {
    sum.allocations += t.allocations;
    sum.frees += t.frees;
    sum.frees_of_others += t.frees_of_others;
    sum.ooms += t.ooms;
  }
  std::printf("threaded run done: %" PRId64 " allocations, %" PRId64 " frees, %" PRId64
              " freed by another thread, %" PRId64 " out-of-memory refusals, %" PRId64
              " give-backs checked\n",
              sum.allocations, sum.frees, sum.frees_of_others, sum.ooms,
              shared.give_backs_checked.load());
  std::fflush(stdout);
  CHECK(sum.allocations > kTotalOps / 4);
  CHECK(sum.frees_of_others > 0);
  CHECK(shared.give_backs_checked.load() > 0);
  if (!tight) CHECK(sum.ooms == 0);  // 16 GiB for at most ~500 live blocks of up to 4 MiB
  AllocatorStats stats = allocator->GetStats();
  if (tight) CHECK(stats.retries > 0);

  // The books agree with what is still held, and every held block is still intact.
  std::vector<StreamId> stream_ids;
  for (Stream stream : shared.streams) {
    absl::StatusOr<StreamId> id = device.GetStreamId(stream);
    REQUIRE(id.ok());
    stream_ids.push_back(*id);
  }
  std::map<uintptr_t, KnownBlock> known;
  int64_t requested = 0;
  for (const HeldBlock& block : shared.handed_over) {
    absl::StatusOr<size_t> block_size = allocator->BlockSize(block.ptr);
    REQUIRE(block_size.ok());
    CHECK(*block_size >= block.requested);
    known[reinterpret_cast<uintptr_t>(block.ptr)] =
        KnownBlock{*block_size, block.requested, stream_ids[block.stream]};
    requested += static_cast<int64_t>(block.requested);
  }
  CHECK(stats.active_blocks.current == static_cast<int64_t>(shared.handed_over.size()));
  CHECK(stats.active_blocks.current == shared.oracle.live_blocks());
  CHECK(stats.requested_bytes.current == requested);
  CHECK(stats.reserved_bytes.current == static_cast<int64_t>(device.used_bytes()));
  const std::string snapshot = allocator->SnapshotJson();
  const std::string problem = CheckSnapshot(snapshot, stats, known);
  INFO("snapshot: " << problem);
  CHECK(problem.empty());
  // How much of the run went through lanes (how often the shared stream's threads met on its
  // lock depends on the machine; the oracle above holds either way).
  int64_t lane_segments = 0;
  for (size_t at = snapshot.find("\"lane\":"); at != std::string::npos;
       at = snapshot.find("\"lane\":", at + 1)) {
    lane_segments += snapshot.compare(at, 9, "\"lane\":0,") != 0;
  }
  std::printf("threaded run: %" PRId64 " segments held in lanes other than 0\n", lane_segments);
  std::fflush(stdout);

  for (const HeldBlock& block : shared.handed_over) {
    {
      std::lock_guard<std::mutex> lock(shared.mu);
      shared.RetireLocked(-1, -1, block);
    }
    CHECK(allocator->Free(block.ptr).ok());
  }
  shared.handed_over.clear();
  REQUIRE(allocator->EmptyCache().ok());
  stats = allocator->GetStats();
  CHECK(stats.active_blocks.current == 0);
  CHECK(stats.allocated_bytes.current == 0);
  CHECK(stats.reserved_bytes.current == 0);
  CHECK(device.used_bytes() == 0);
  CHECK(device.live_segments() == 0);
  allocator.reset();
  CHECK(device.live_events() == 0);
  std::lock_guard<std::mutex> lock(shared.mu);
  INFO(absl::StrJoin(shared.errors, "\n"));
  CHECK(shared.errors.empty());
}

}  // namespace
}  // namespace tidepool
