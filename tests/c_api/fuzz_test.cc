// A model-checked, randomized fuzzer of the whole C API (integrations/c_api/tidepool.h), on
// simulated devices small enough to run out of memory.
//
// Every C function is called, with good arguments and bad ones: NULL outputs, size 0, sizes no
// device holds (SIZE_MAX, 1<<60), unknown and negative devices, unknown pools, the default pool
// where it is refused, foreign, interior and freed pointers (double frees), ends without begins,
// double releases, releases that would leave fewer references than routes, bad filter kinds and
// values, bad capture modes, NULL captures and graphs, and callback pools whose callbacks hand out
// host memory (malloc, aligned_alloc, posix_memalign) under a byte budget.
//
// A model keeps what the header says the state is: live blocks (address, size, device, pool,
// stream), pools per device with their references and routes (current-thread routes per thread),
// callback segments, captures and graphs. After every call the fuzzer checks that
//   * the code is one the header allows for that call in that state, derived from the model
//     wherever the header determines it (OK or OUT_OF_MEMORY from a bound on what the device can
//     still hold, computed from the live blocks);
//   * a failed call changed nothing (statistics, snapshots, pool references and routes, routing,
//     compared as text before and after), left a message naming the function in
//     tidepool_last_error(), and a failed tidepool_malloc stored NULL; a successful call left the
//     message as it was;
// and after every step that no two live blocks overlap, that tidepool_pool_of places live blocks
// (a sample, and every new one) on the right device and pool, that tidepool_stats_json agrees
// with the model's sums per device and per pool, that the simulated devices hold what the
// statistics say, that callback pools hold exactly the segments their callbacks handed out, and
// that released pools whose last block is gone hold nothing. At the end, once everything is freed,
// ended, released and emptied, every device holds zero bytes and every callback segment is back.
//
// Two modes, one runtime (tidepool_init_simulated once per process):
//   * serial: one thread, TIDEPOOL_FUZZ_STEPS steps, every step checked against the full model.
//     It also captures graphs on streams of the simulated devices (made through the C++ runtime,
//     as graph_test does; from C only the NULL stream exists, and capture_begin refuses it), and
//     runs short helper threads that route themselves, allocate and exit with routes open.
//   * concurrent: TIDEPOOL_FUZZ_THREADS threads of TIDEPOOL_FUZZ_THREAD_STEPS steps each, every
//     thread with its own blocks, stream per device, pools, callback pools and captures, its own
//     references and routes on pools it shares with the others, and calls on shared state
//     (empty_cache, trim of the default pool, statistics). On the last device the threads race:
//     they route everyone's allocations to "race pools" and end and release those routes while
//     the others allocate there (an allocation may then land in any race pool, or find its pool
//     released: FAILED_PRECONDITION, docs/pools.md rule 9). Each thread checks its own model
//     after each call; the whole model (every thread's) is checked at quiescent points between
//     TIDEPOOL_FUZZ_PHASES phases, after the threads exit (routes they left open are ended and
//     their references dropped: rule 10) and at the end.
//
// Knobs (environment variables; defaults keep the test to a few seconds optimized):
//   TIDEPOOL_FUZZ_SEED          the seed (default 1); each thread's seed derives from it
//   TIDEPOOL_FUZZ_STEPS         serial steps (default 4000)
//   TIDEPOOL_FUZZ_THREADS       concurrent threads (default 4)
//   TIDEPOOL_FUZZ_THREAD_STEPS  steps per concurrent thread (default 2000)
//   TIDEPOOL_FUZZ_PHASES        quiescent checks in the concurrent mode (default 6)
//   TIDEPOOL_FUZZ_DEVICES       simulated devices (default 3)
//   TIDEPOOL_FUZZ_DEVICE_MIB    MiB per simulated device (default 256)
//   TIDEPOOL_FUZZ_CHECK_EVERY   serial mode: compare whole states (before and after each call,
//                               and the invariants after each step) on every Nth step only
//                               (default 1: every step). Return codes, messages, pool_of of new
//                               blocks and the checks on release, trim and empty_cache still run
//                               on every step; long sanitizer runs use 64.
//   TIDEPOOL_FUZZ_TRACE         1: print every operation as it runs
// A failure prints the seed, the mode, the thread, the step, the operation, the operations before
// it and the command line that runs the same again. The serial mode replays exactly from the seed;
// the concurrent one reruns the same seeds, but threads interleave differently on every run.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "allocator/simulated_device.h"
#include "catch2/catch.hpp"
#include "runtime/global_runtime.h"
#include "integrations/c_api/tidepool.h"
#include "pool/pool_manager.h"
#include "runtime/runtime.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

using c_api_test::SamePool;
using c_api_test::ToPoolId;

// --- Constants of the contract ---------------------------------------------------------------

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kBlockAlignment = 512;
// Where simulated device d's addresses lie (integrations/c_api/global_runtime.cc), and where host
// memory (a callback pool's) ends.
constexpr uintptr_t kFirstSimulatedAddress = uintptr_t{1} << 52;
constexpr uintptr_t kSimulatedAddressRange = uintptr_t{1} << 48;
constexpr uintptr_t kHostAddressLimit = uintptr_t{1} << 47;
// The size policy of plain segments (allocator/size_policy.h), for callback pools.
constexpr size_t kSmallRequest = kMiB;
constexpr size_t kSmallSegment = 2 * kMiB;
constexpr size_t kMediumRequest = 10 * kMiB;
constexpr size_t kMediumSegment = 20 * kMiB;
constexpr size_t kLargeRounding = 2 * kMiB;

constexpr tidepool_pool_id kDefaultPool = {0, 0};
void* const kSentinel = reinterpret_cast<void*>(uintptr_t{0x5e5e5e5e5e00});
void* const kBogusStream = reinterpret_cast<void*>(uintptr_t{0xdead0});

constexpr uint32_t kOK = 1u << TIDEPOOL_OK;
constexpr uint32_t kIA = 1u << TIDEPOOL_INVALID_ARGUMENT;
constexpr uint32_t kOOM = 1u << TIDEPOOL_OUT_OF_MEMORY;
constexpr uint32_t kNF = 1u << TIDEPOOL_NOT_FOUND;
constexpr uint32_t kFP = 1u << TIDEPOOL_FAILED_PRECONDITION;
constexpr uint32_t kUN = 1u << TIDEPOOL_UNAVAILABLE;
constexpr uint32_t kIN = 1u << TIDEPOOL_INTERNAL;
constexpr uint32_t kAnyError = kIA | kOOM | kNF | kFP | kUN | kIN;
// What the driver may answer for a stream it cannot capture (tidepool.h leaves it to the driver).
constexpr uint32_t kDriverRefusal = kIA | kFP | kIN;

size_t RoundUp(size_t bytes, size_t to) { return (bytes + to - 1) / to * to; }
size_t Round512(size_t bytes) { return RoundUp(bytes, kBlockAlignment); }

// allocator/size_policy.h's PlainSegmentSize with the default max_split_size (none).
size_t PlainSegmentSize(size_t rounded) {
  if (rounded <= kSmallRequest) return kSmallSegment;
  if (rounded <= kMediumRequest) return kMediumSegment;
  return RoundUp(rounded, kLargeRounding);
}

bool KnownStatus(tidepool_status status) {
  return static_cast<unsigned>(status) <= static_cast<unsigned>(TIDEPOOL_DEADLINE_EXCEEDED);
}

std::string CodeName(tidepool_status status) {
  if (!KnownStatus(status)) return absl::StrCat("<status ", static_cast<int>(status), ">");
  return tidepool_status_name(status);
}

std::string CodesText(uint32_t codes) {
  std::string text;
  for (int code = TIDEPOOL_OK; code <= TIDEPOOL_DEADLINE_EXCEEDED; ++code) {
    if ((codes & (1u << code)) == 0) continue;
    absl::StrAppend(&text, text.empty() ? "" : " or ",
                    tidepool_status_name(static_cast<tidepool_status>(code)));
  }
  return text.empty() ? "nothing" : text;
}

std::string IdText(tidepool_pool_id pool) {
  return absl::StrFormat("{%u,%u}", pool.first, pool.second);
}

bool IsDefault(tidepool_pool_id pool) { return pool.first == 0 && pool.second == 0; }
// A pool shares its free memory (empty_cache, out-of-memory recovery) iff its id is {0,n}.
bool Shares(tidepool_pool_id pool) { return pool.first == 0; }

bool StartsWith(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

// --- Options ---------------------------------------------------------------------------------

uint64_t EnvNumber(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(text, &end, 0);
  if (end == text || *end != '\0') {
    std::fprintf(stderr, "fuzz_test: %s=%s is not a number; using %llu\n", name, text,
                 static_cast<unsigned long long>(fallback));
    return fallback;
  }
  return value;
}

struct FuzzOptions {
  uint64_t seed = 1;
  int64_t serial_steps = 4000;
  int threads = 4;
  int64_t thread_steps = 2000;
  int phases = 6;
  int devices = 3;
  size_t bytes_per_device = 256 * kMiB;
  int64_t check_every = 1;
  bool trace = false;

  static FuzzOptions FromEnvironment() {
    FuzzOptions options;
    options.seed = EnvNumber("TIDEPOOL_FUZZ_SEED", options.seed);
    options.serial_steps =
        static_cast<int64_t>(EnvNumber("TIDEPOOL_FUZZ_STEPS", options.serial_steps));
    options.threads = static_cast<int>(
        std::clamp<uint64_t>(EnvNumber("TIDEPOOL_FUZZ_THREADS", options.threads), 1, 64));
    options.thread_steps =
        static_cast<int64_t>(EnvNumber("TIDEPOOL_FUZZ_THREAD_STEPS", options.thread_steps));
    options.phases = static_cast<int>(
        std::clamp<uint64_t>(EnvNumber("TIDEPOOL_FUZZ_PHASES", options.phases), 1, 1000));
    options.devices = static_cast<int>(
        std::clamp<uint64_t>(EnvNumber("TIDEPOOL_FUZZ_DEVICES", options.devices), 1, 8));
    options.bytes_per_device =
        std::clamp<uint64_t>(EnvNumber("TIDEPOOL_FUZZ_DEVICE_MIB", 256), 16, 4096) * kMiB;
    options.check_every = static_cast<int64_t>(
        std::clamp<uint64_t>(EnvNumber("TIDEPOOL_FUZZ_CHECK_EVERY", 1), 1, 1 << 20));
    options.trace = EnvNumber("TIDEPOOL_FUZZ_TRACE", 0) != 0;
    return options;
  }

  // The command line that runs the same fuzzing again.
  std::string Reproduce(const char* test_case) const {
    return absl::StrFormat(
        "bazel test //tests/c_api:fuzz_test --test_env=TIDEPOOL_FUZZ_SEED=%u "
        "--test_env=TIDEPOOL_FUZZ_STEPS=%d --test_env=TIDEPOOL_FUZZ_THREADS=%d "
        "--test_env=TIDEPOOL_FUZZ_THREAD_STEPS=%d --test_env=TIDEPOOL_FUZZ_PHASES=%d "
        "--test_env=TIDEPOOL_FUZZ_DEVICES=%d --test_env=TIDEPOOL_FUZZ_DEVICE_MIB=%u "
        "--test_env=TIDEPOOL_FUZZ_CHECK_EVERY=%d --test_arg='%s' --test_output=all (add "
        "--test_env=TIDEPOOL_FUZZ_TRACE=1 to see every call; CHECK_EVERY=1 to find the first "
        "step that goes wrong)",
        seed, serial_steps, threads, thread_steps, phases, devices, bytes_per_device / kMiB,
        check_every, test_case);
  }
};

// --- Deterministic randomness ----------------------------------------------------------------

class Random {
 public:
  explicit Random(uint64_t seed) : engine_(seed) {}
  uint64_t Next() { return engine_(); }
  // Uniform in [0, n), n > 0.
  uint64_t Below(uint64_t n) { return Next() % n; }
  // Uniform in [lo, hi].
  uint64_t Between(uint64_t lo, uint64_t hi) { return lo + Below(hi - lo + 1); }
  bool Chance(double p) { return static_cast<double>(Next() >> 11) * 0x1.0p-53 < p; }
  template <typename T>
  const T& Pick(const std::vector<T>& items) {
    return items[Below(items.size())];
  }

 private:
  std::mt19937_64 engine_;
};

// A request size: mostly small, some medium and large, a few near or beyond a device's size.
size_t RandomSize(Random& random, size_t capacity) {
  const uint64_t kind = random.Below(100);
  if (kind < 40) return random.Between(1, 4096);
  if (kind < 62) return random.Between(4097, kMiB);
  if (kind < 80) return random.Between(kMiB + 1, 10 * kMiB);
  if (kind < 91) return random.Between(10 * kMiB + 1, 40 * kMiB);
  if (kind < 96) return random.Between(40 * kMiB, capacity / 2);
  const size_t special[] = {1,
                            511,
                            512,
                            513,
                            kMiB,
                            kMiB + 1,
                            2 * kMiB,
                            10 * kMiB,
                            10 * kMiB + 512,
                            capacity - 2 * kMiB,
                            capacity,
                            capacity + 1};
  return special[random.Below(sizeof special / sizeof special[0])];
}

// --- Statistics and snapshots through the C API ----------------------------------------------

// Reads tidepool_stats_json (or tidepool_snapshot_json) into `out`, looping while the text grows.
tidepool_status ReadJson(bool snapshot, int device, const tidepool_pool_id* pool,
                         std::string* out) {
  auto* call = snapshot ? tidepool_snapshot_json : tidepool_stats_json;
  for (int attempt = 0; attempt < 1000; ++attempt) {
    size_t needed = 0;
    tidepool_status status = call(device, pool, nullptr, 0, &needed);
    if (status != TIDEPOOL_OK) return status;
    std::string buffer(needed + 16, '\0');
    size_t again = 0;
    status = call(device, pool, &buffer[0], buffer.size(), &again);
    if (status == TIDEPOOL_OK) {
      buffer.resize(again == 0 ? 0 : again - 1);
      *out = std::move(buffer);
      return TIDEPOOL_OK;
    }
    if (status != TIDEPOOL_INVALID_ARGUMENT) return status;
  }
  return TIDEPOOL_INTERNAL;
}

// The allocated blocks of a snapshot text whose size differs from `recorded` (address to size and
// the thread that holds it), and the recorded blocks the snapshot lacks: what a statistics
// mismatch comes from, named block by block.
std::string SnapshotDifferences(const std::string& snapshot,
                                std::map<uintptr_t, std::pair<size_t, int>> recorded) {
  std::string out;
  std::string pool = "?";
  size_t at = 0;
  while (true) {
    const size_t next_pool = snapshot.find("\"pool\":\"", at);
    const size_t next_block = snapshot.find("{\"address\":", at);
    if (next_block == std::string::npos) break;
    if (next_pool != std::string::npos && next_pool < next_block) {
      const size_t start = next_pool + 8;
      pool = snapshot.substr(start, snapshot.find('"', start) - start);
      at = start;
      continue;
    }
    unsigned long long address = 0, size = 0, requested = 0;
    char state[32] = {0};
    if (std::sscanf(snapshot.c_str() + next_block,
                    "{\"address\":%llu,\"size\":%llu,\"requested\":%llu,\"state\":\"%31[a-z_]",
                    &address, &size, &requested, state) == 4 &&
        std::string(state) == "allocated") {
      auto it = recorded.find(address);
      if (it == recorded.end()) {
        absl::StrAppendFormat(&out, " [%#x in pool %s: %u bytes, held by no thread]", address,
                              pool, size);
      } else {
        if (it->second.first != size) {
          absl::StrAppendFormat(&out, " [%#x in pool %s: %u bytes, thread %d recorded %u]",
                                address, pool, size, it->second.second, it->second.first);
        }
        recorded.erase(it);
      }
    }
    at = next_block + 1;
  }
  for (const auto& [address, entry] : recorded) {
    absl::StrAppendFormat(&out, " [%#x of thread %d (%u bytes) not in the snapshot]", address,
                          entry.second, entry.first);
  }
  return out.empty() ? " none" : out;
}

// One number of a statistics text: `stat` is a field name; `field` the member of its object
// ("current", "removed", ...) or nullptr for a plain counter. INT64_MIN when it is missing.
int64_t JsonNumber(const std::string& json, const char* stat, const char* field) {
  const std::string key = absl::StrCat("\"", stat, "\":");
  size_t at = json.find(key);
  if (at == std::string::npos) return INT64_MIN;
  at += key.size();
  if (field != nullptr) {
    const std::string member = absl::StrCat("\"", field, "\":");
    const size_t end = json.find('}', at);
    at = json.find(member, at);
    if (at == std::string::npos || at > end) return INT64_MIN;
    at += member.size();
  }
  char* parsed_end = nullptr;
  const long long value = std::strtoll(json.c_str() + at, &parsed_end, 10);
  if (parsed_end == json.c_str() + at) return INT64_MIN;
  return value;
}

struct Stats {
  int64_t requested = 0;
  int64_t allocated = 0;
  int64_t active = 0;
  int64_t reserved = 0;
  int64_t segments = 0;
  // How many segments have gone back (each one that did dropped its addresses from the page map):
  // the "epoch" after which a double free of a block freed before may read as a foreign pointer.
  int64_t segments_removed = 0;
  int64_t device_frees = 0;
  int64_t retries = 0;
  int64_t ooms = 0;
  std::string json;
};

// Parses a statistics text; false when a field is missing.
bool ParseStats(const std::string& json, Stats* stats) {
  stats->json = json;
  stats->requested = JsonNumber(json, "requested_bytes", "current");
  stats->allocated = JsonNumber(json, "allocated_bytes", "current");
  stats->active = JsonNumber(json, "active_blocks", "current");
  stats->reserved = JsonNumber(json, "reserved_bytes", "current");
  stats->segments = JsonNumber(json, "segments", "current");
  stats->segments_removed = JsonNumber(json, "segments", "removed");
  stats->device_frees = JsonNumber(json, "device_frees", nullptr);
  stats->retries = JsonNumber(json, "retries", nullptr);
  stats->ooms = JsonNumber(json, "ooms", nullptr);
  for (int64_t value :
       {stats->requested, stats->allocated, stats->active, stats->reserved, stats->segments,
        stats->segments_removed, stats->device_frees, stats->retries, stats->ooms}) {
    if (value == INT64_MIN) return false;
  }
  return true;
}

// --- Callback pools --------------------------------------------------------------------------
// The callbacks hand out host memory and never call tidepool. Every segment they hand out is
// recorded, so that the fuzzer knows which host memory a callback pool's blocks must lie in, what
// a pool's reserved bytes must be, and that every segment came back at the end.

struct CallbackPool {
  int device = 0;
  tidepool_pool_id id{};
  int kind = 0;       // 0: aligned_alloc, 1: malloc and align by hand, 2: posix_memalign
  size_t budget = 0;  // the callback refuses (returns NULL) beyond this many live bytes
  // Guarded by the registry's mutex.
  size_t live_bytes = 0;
  int64_t live_segments = 0;
  int64_t allocations = 0;
  int64_t refusals = 0;
};

struct CallbackSegment {
  size_t size = 0;
  void* raw = nullptr;  // what to hand to free()
  CallbackPool* pool = nullptr;
};

class CallbackRegistry {
 public:
  static CallbackRegistry& Get() {
    static CallbackRegistry* const registry = new CallbackRegistry();  // never destroyed
    return *registry;
  }

  CallbackPool* NewPool(int device, tidepool_pool_id id, int kind, size_t budget) {
    std::lock_guard<std::mutex> lock(mu_);
    pools_.push_back(std::make_unique<CallbackPool>());
    CallbackPool* pool = pools_.back().get();
    pool->device = device;
    pool->id = id;
    pool->kind = kind;
    pool->budget = budget;
    return pool;
  }

  void* Allocate(size_t size, int device, CallbackPool* pool) {
    if (device < 0 || device >= 64) {
      Violation(absl::StrFormat("alloc_segment called with device %d", device));
      return nullptr;
    }
    Inside inside(this, device);
    std::lock_guard<std::mutex> lock(mu_);
    if (pool == nullptr || pool->device != device) {
      ViolationLocked(absl::StrFormat("alloc_segment for device %d got the context of device %d",
                                      device, pool == nullptr ? -1 : pool->device));
      return nullptr;
    }
    if (size == 0 || size % kBlockAlignment != 0) {
      ViolationLocked(absl::StrFormat("alloc_segment asked for %u bytes", size));
    }
    if (pool->live_bytes + size > pool->budget) {
      ++pool->refusals;
      return nullptr;
    }
    void* raw = nullptr;
    void* aligned = nullptr;
    switch (pool->kind) {
      case 0:
        raw = std::aligned_alloc(kBlockAlignment, RoundUp(size, kBlockAlignment));
        aligned = raw;
        break;
      case 1:
        raw = std::malloc(size + kBlockAlignment);
        if (raw != nullptr) {
          aligned = reinterpret_cast<void*>(
              RoundUp(reinterpret_cast<uintptr_t>(raw) + 1, kBlockAlignment));
        }
        break;
      default:
        if (posix_memalign(&raw, 4096, size) != 0) raw = nullptr;
        aligned = raw;
        break;
    }
    if (raw == nullptr) return nullptr;
    const uintptr_t address = reinterpret_cast<uintptr_t>(aligned);
    if (address + size > kHostAddressLimit) {
      ViolationLocked(absl::StrFormat("host memory at %#x, above 2^47", address));
    }
    segments_[address] = CallbackSegment{size, raw, pool};
    pool->live_bytes += size;
    ++pool->live_segments;
    ++pool->allocations;
    return aligned;
  }

  void Free(void* ptr, size_t size, int device, CallbackPool* pool) {
    if (device < 0 || device >= 64) {
      Violation(absl::StrFormat("free_segment called with device %d", device));
      return;
    }
    Inside inside(this, device);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = segments_.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == segments_.end()) {
      ViolationLocked(absl::StrFormat("free_segment of %p (%u bytes), which no callback handed out",
                                      ptr, size));
      return;
    }
    if (it->second.size != size || it->second.pool != pool || pool->device != device) {
      ViolationLocked(absl::StrFormat(
          "free_segment of %p with %u bytes, device %d, context %p; it was handed out with %u "
          "bytes for device %d, context %p",
          ptr, size, device, static_cast<void*>(pool), it->second.size, it->second.pool->device,
          static_cast<void*>(it->second.pool)));
      return;
    }
    pool->live_bytes -= size;
    --pool->live_segments;
    std::free(it->second.raw);
    segments_.erase(it);
  }

  // The live segment that holds [address, address + size), if any.
  bool Holds(const CallbackPool* pool, uintptr_t address, size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = segments_.upper_bound(address);
    if (it == segments_.begin()) return false;
    --it;
    return it->second.pool == pool && address + size <= it->first + it->second.size;
  }

  // The live segments of a pool: start -> size.
  std::map<uintptr_t, size_t> SegmentsOf(const CallbackPool* pool) {
    std::lock_guard<std::mutex> lock(mu_);
    std::map<uintptr_t, size_t> result;
    for (const auto& [address, segment] : segments_) {
      if (segment.pool == pool) result[address] = segment.size;
    }
    return result;
  }

  size_t LiveBytes(const CallbackPool* pool) {
    std::lock_guard<std::mutex> lock(mu_);
    return pool->live_bytes;
  }

  // Everything handed out and not given back, as text (for fingerprints and the final check).
  std::string Summary(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t count = 0;
    size_t bytes = 0;
    for (const auto& [address, segment] : segments_) {
      if (segment.pool->device != device) continue;
      ++count;
      bytes += segment.size;
    }
    return absl::StrFormat("callback segments %d (%u bytes)", count, bytes);
  }

  size_t LiveBytesOn(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t bytes = 0;
    for (const auto& [address, segment] : segments_) {
      if (segment.pool->device == device) bytes += segment.size;
    }
    return bytes;
  }

  int64_t LiveSegments() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(segments_.size());
  }

  std::vector<std::string> TakeViolations() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> taken;
    taken.swap(violations_);
    return taken;
  }

 private:
  // Counts the callbacks running for one device: tidepool promises never two at once.
  class Inside {
   public:
    Inside(CallbackRegistry* registry, int device) : registry_(registry), device_(device) {
      if (registry_->inside_[device_].fetch_add(1) != 0) {
        registry_->Violation(
            absl::StrFormat("two segment callbacks ran at once for device %d", device_));
      }
    }
    ~Inside() { registry_->inside_[device_].fetch_sub(1); }

   private:
    CallbackRegistry* registry_;
    int device_;
  };

  void Violation(const std::string& what) {
    std::lock_guard<std::mutex> lock(mu_);
    ViolationLocked(what);
  }
  void ViolationLocked(const std::string& what) { violations_.push_back(what); }

  std::mutex mu_;
  std::map<uintptr_t, CallbackSegment> segments_;
  std::vector<std::unique_ptr<CallbackPool>> pools_;
  std::vector<std::string> violations_;
  std::atomic<int> inside_[64] = {};
};

extern "C" void* FuzzAllocSegment(size_t size, int device, void* context) {
  return CallbackRegistry::Get().Allocate(size, device, static_cast<CallbackPool*>(context));
}

extern "C" void FuzzFreeSegment(void* ptr, size_t size, int device, void* context) {
  CallbackRegistry::Get().Free(ptr, size, device, static_cast<CallbackPool*>(context));
}

// --- Reporting -------------------------------------------------------------------------------

struct FuzzFailure {
  std::string message;
};

// Where the fuzzer is (seed, mode, thread, step, operation, recent operations), for messages
// that reproduce a failure.
class Reporter {
 public:
  // `seed` is TIDEPOOL_FUZZ_SEED; `thread_seed` the seed this thread's choices come from;
  // `reproduce` the command line that runs the same again.
  Reporter(std::string mode, uint64_t seed, uint64_t thread_seed, int thread, int64_t steps,
           bool trace, std::string reproduce)
      : mode_(std::move(mode)),
        seed_(seed),
        thread_seed_(thread_seed),
        thread_(thread),
        steps_(steps),
        trace_(trace),
        reproduce_(std::move(reproduce)) {}

  void Begin(int64_t step, std::string operation) {
    step_ = step;
    operation_ = std::move(operation);
    history_.push_back(absl::StrCat("step ", step_, ": ", operation_));
    if (history_.size() > 30) history_.pop_front();
    if (trace_) {
      std::printf("[%s t%d] step %lld: %s\n", mode_.c_str(), thread_, static_cast<long long>(step_),
                  operation_.c_str());
      std::fflush(stdout);
    }
  }

  // Adds what the call returned to the current operation's line.
  void Note(const std::string& more) {
    if (!history_.empty()) absl::StrAppend(&history_.back(), " ", more);
  }

  [[noreturn]] void Fail(const std::string& what) const { throw FuzzFailure{Report(what)}; }

  std::string Report(const std::string& what) const {
    std::string report = absl::StrFormat(
        "tidepool C API fuzz failure\n"
        "  TIDEPOOL_FUZZ_SEED=%u (this thread's seed %u), mode %s, thread %d, step %d of %d\n"
        "  operation: %s\n"
        "  what went wrong: %s\n"
        "  the operations before it, oldest first:\n",
        seed_, thread_seed_, mode_, thread_, step_, steps_, operation_, what);
    for (const std::string& line : history_) absl::StrAppend(&report, "    ", line, "\n");
    absl::StrAppend(&report, "  reproduce: ", reproduce_, "\n");
    return report;
  }

  int64_t step() const { return step_; }

 private:
  const std::string mode_;
  const uint64_t seed_;
  const uint64_t thread_seed_;
  const int thread_;
  const int64_t steps_;
  const bool trace_;
  const std::string reproduce_;
  int64_t step_ = 0;
  std::string operation_ = "(start)";
  std::deque<std::string> history_;
};

// --- The runtime -----------------------------------------------------------------------------

struct World {
  FuzzOptions options;
  int devices = 0;
  size_t capacity = 0;
  size_t granularity = 0;
  bool expandable = true;
  std::vector<PoolManager*> managers;
  std::vector<SimulatedDevice*> sims;
  // Two streams per device, made through the device (the C API has no call for one).
  std::vector<std::vector<void*>> streams;

  uintptr_t Base(int device) const {
    return kFirstSimulatedAddress + static_cast<uintptr_t>(device) * kSimulatedAddressRange;
  }
};

// Bytes of the physical allocations that the given live blocks (device, block) touch, as the
// simulated devices have them mapped: what those blocks keep from going back to the device (a
// run of physical memory goes back only whole). Each run counts once.
template <typename BlockType>
size_t PinnedRunBytes(const World& w, const std::vector<std::pair<int, const BlockType*>>& blocks) {
  std::set<std::pair<int, uintptr_t>> runs;
  size_t bytes = 0;
  for (const auto& [device, block] : blocks) {
    const uintptr_t end = block->address + block->size;
    for (uintptr_t at = block->address / w.granularity * w.granularity; at < end;) {
      const auto [start, size] = w.sims[device]->MappingAt(at);
      if (size == 0) {  // not mapped: counted as the granule it is, so a mismatch shows
        if (runs.insert({device, at}).second) bytes += w.granularity;
        at += w.granularity;
        continue;
      }
      if (runs.insert({device, start}).second) bytes += size;
      at = start + size;
    }
  }
  return bytes;
}

// What tidepool says before any runtime exists: versions, names, empty messages, and the
// refusals of tidepool_init_simulated that must not make one.
void CheckBeforeInit(const FuzzOptions& options) {
  REQUIRE(tidepool_api_version() == TIDEPOOL_API_VERSION);
  REQUIRE(tidepool_last_error() != nullptr);
  CHECK(std::string(tidepool_last_error()).empty());
  const char* const names[] = {
      "TIDEPOOL_OK",        "TIDEPOOL_INVALID_ARGUMENT",    "TIDEPOOL_OUT_OF_MEMORY",
      "TIDEPOOL_NOT_FOUND", "TIDEPOOL_FAILED_PRECONDITION", "TIDEPOOL_UNAVAILABLE",
      "TIDEPOOL_INTERNAL",  "TIDEPOOL_DEADLINE_EXCEEDED"};
  for (int code = 0; code <= TIDEPOOL_DEADLINE_EXCEEDED; ++code) {
    CHECK(std::string(tidepool_status_name(static_cast<tidepool_status>(code))) == names[code]);
  }
  CHECK(std::string(tidepool_status_name(static_cast<tidepool_status>(8))) ==
        "unknown tidepool_status");
  const struct {
    int devices;
    size_t bytes;
  } refused[] = {{0, options.bytes_per_device},  {-1, options.bytes_per_device},
                 {65, options.bytes_per_device}, {INT32_MIN, options.bytes_per_device},
                 {options.devices, 0},           {options.devices, SIZE_MAX}};
  for (const auto& init : refused) {
    INFO("tidepool_init_simulated(" << init.devices << ", " << init.bytes << ")");
    TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                            tidepool_init_simulated(init.devices, init.bytes));
    CHECK(StartsWith(tidepool_last_error(), "tidepool_init_simulated: "));
  }
}

World& TheWorld() {
  static World* const world = [] {
    auto* made = new World();  // never destroyed: the runtime is not either
    made->options = FuzzOptions::FromEnvironment();
    CheckBeforeInit(made->options);
    TIDEPOOL_REQUIRE_OK(
        tidepool_init_simulated(made->options.devices, made->options.bytes_per_device));
    TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_FAILED_PRECONDITION,
                            tidepool_init_simulated(made->options.devices, kMiB));
    int count = 0;
    TIDEPOOL_REQUIRE_OK(tidepool_device_count(&count));
    REQUIRE(count == made->options.devices);
    absl::StatusOr<Runtime*> runtime = GlobalRuntime();
    REQUIRE(runtime.ok());
    made->devices = count;
    made->capacity = made->options.bytes_per_device;
    for (int device = 0; device < count; ++device) {
      absl::StatusOr<PoolManager*> pools = (*runtime)->Pools(device);
      REQUIRE(pools.ok());
      made->managers.push_back(*pools);
      auto* sim = dynamic_cast<SimulatedDevice*>((*pools)->allocator()->device());
      REQUIRE(sim != nullptr);
      made->sims.push_back(sim);
      std::vector<void*> streams;
      for (int i = 0; i < 2; ++i) {
        absl::StatusOr<Stream> stream = sim->CreateStream();
        REQUIRE(stream.ok());
        streams.push_back(*stream);
      }
      made->streams.push_back(streams);
    }
    made->granularity = made->sims[0]->granularity();
    made->expandable = made->managers[0]->allocator()->config().expandable_segments;
    REQUIRE(made->granularity > 0);
    std::printf(
        "tidepool fuzz: %d simulated devices of %zu MiB, granularity %zu KiB, %s segments\n",
        made->devices, made->capacity / kMiB, made->granularity / 1024,
        made->expandable ? "expandable" : "plain");
    std::fflush(stdout);
    return made;
  }();
  return *world;
}

// Foreign pointers: addresses tidepool never handed out.
char g_static_foreign[64];

std::vector<void*> ForeignPointers(const World& world, void* heap, void* stack) {
  std::vector<void*> pointers = {
      heap,
      stack,
      g_static_foreign,
      reinterpret_cast<void*>(uintptr_t{0x1000}),
      reinterpret_cast<void*>(uintptr_t{1} << 60),
      reinterpret_cast<void*>(UINTPTR_MAX & ~uintptr_t{511}),
      // Inside a device's address space but far beyond anything it handed out.
      reinterpret_cast<void*>(world.Base(0) + (uintptr_t{1} << 47)),
      // The space of a device the runtime does not have.
      reinterpret_cast<void*>(world.Base(40) + 4096),
  };
  for (int device = 0; device < world.devices; ++device) {
    pointers.push_back(reinterpret_cast<void*>(world.Base(device) + (uintptr_t{3} << 46)));
  }
  return pointers;
}

// --- The model -------------------------------------------------------------------------------

constexpr int kMainThread = 0;
constexpr int kHelperThread = 1;
// Pools a device may have had before the serial fuzzer stops making new ones (every pool ever made
// stays known to its device).
constexpr int kMaxPoolsPerDevice = 40;
constexpr int kMaxRoutes = 8;

struct Key {
  int device;
  uint64_t first;
  uint64_t second;
  bool operator<(const Key& other) const {
    if (device != other.device) return device < other.device;
    if (first != other.first) return first < other.first;
    return second < other.second;
  }
};

Key KeyOf(int device, tidepool_pool_id pool) { return Key{device, pool.first, pool.second}; }

// A live block.
struct MBlock {
  uint64_t serial = 0;  // the order blocks were made in: random picks go by it, not by address
  uintptr_t address = 0;
  size_t size = 0;  // the block's size, as the statistics counted it
  size_t requested = 0;
  int device = 0;
  tidepool_pool_id pool{};
  void* stream = nullptr;
  CallbackPool* callback = nullptr;
};

// A freed block's address, kept for double frees. `epoch` is the device's segments.removed
// before the free: while it has not moved, the block's memory is still held, and a second free
// must be FAILED_PRECONDITION; once it has, the memory may have gone back (INVALID_ARGUMENT).
struct MFreed {
  uintptr_t address = 0;
  int device = 0;
  int64_t epoch = 0;
  // A newer block covers the address (a double free would be of that block): never used again,
  // but kept, so that which records exist never depends on where host memory lies.
  bool stale = false;
};

// A pool the device has had (the default pool included).
struct MPool {
  int device = 0;
  tidepool_pool_id id{};
  int64_t refs = 0;
  CallbackPool* callback = nullptr;
  // Released and its last block freed, outside any capture on the device: its memory went back.
  // It stays gone (through later captures) until it is begun again.
  bool gone = false;
};

struct MRoute {
  uint64_t seq = 0;
  int device = 0;
  int kind = TIDEPOOL_ROUTE_CURRENT_THREAD;
  int thread = kMainThread;       // current-thread routes: whose
  void* stream = nullptr;         // stream routes
  bool stream_capturing = false;  // stream routes: the stream was capturing at the begin
  uint64_t capture_id = 0;        // capture routes
  tidepool_pool_id pool{};
};

struct MCapture {
  tidepool_capture* handle = nullptr;
  int device = 0;
  void* stream = nullptr;
  uint64_t id = 0;         // the device's capture id
  uint64_t began_seq = 0;  // the sequence of its route: routes begun later are newer
  tidepool_pool_id pool{};
  bool invalidated = false;
};

struct MGraph {
  tidepool_graph* handle = nullptr;
  int device = 0;
  tidepool_pool_id pool{};
};

// Frees a block from a thread_local destructor at thread exit (tidepool.h: every function may be
// called from any thread, at any time).
struct FreeAtThreadExit {
  void* ptr = nullptr;
  std::atomic<int>* status = nullptr;
  ~FreeAtThreadExit() {
    if (ptr != nullptr) status->store(static_cast<int>(tidepool_free(ptr)));
  }
};
thread_local FreeAtThreadExit free_at_thread_exit;

enum class Compare {
  kNone,        // the call may change things
  kLive,        // live blocks, pools and routes (an out-of-memory failure returns the cache)
  kFull,        // everything
};

// Which things to compare, as text.
struct Fingerprint {
  std::string live;
  std::string full;
};

class SerialFuzzer {
 public:
  SerialFuzzer(World& world, uint64_t seed, int64_t steps)
      : w_(world),
        random_(seed),
        rep_("serial", seed, seed, 0, steps, world.options.trace,
             world.options.Reproduce("fuzz: serial*")),
        steps_(steps),
        heap_foreign_(std::malloc(64)),
        device_stats_(world.devices),
        stats_fresh_(world.devices, false) {
    for (int device = 0; device < w_.devices; ++device) {
      pools_[KeyOf(device, kDefaultPool)] = MPool{device, kDefaultPool, 0, nullptr};
    }
  }
  ~SerialFuzzer() { std::free(heap_foreign_); }

  void Run() {
    rep_.Begin(0, "initial check");
    CheckInvariants(/*all_pools=*/true);
    for (step_ = 1; step_ <= steps_; ++step_) {
      touched_.clear();
      compare_states_ = step_ % w_.options.check_every == 0;
      Step();
      if (compare_states_) {
        CheckInvariants(/*all_pools=*/(step_ / w_.options.check_every) % 16 == 0);
      } else {
        std::vector<Sums> by_device;
        std::map<Key, Sums> by_pool;
        SumLiveAndMarkGone(&by_device, &by_pool);
        std::fill(stats_fresh_.begin(), stats_fresh_.end(), false);
      }
    }
    compare_states_ = true;
    Drain();
  }

  int64_t Calls() const {
    int64_t calls = 0;
    for (const auto& [what, count] : outcomes_) calls += count;
    return calls;
  }

  std::string Summary() const {
    std::string text;
    for (const auto& [what, count] : outcomes_)
      absl::StrAppendFormat(&text, "    %s: %d\n", what, count);
    return text;
  }

 private:
  // --- Choosing --------------------------------------------------------------------------------

  void Step() {
    struct Choice {
      int weight;
      void (SerialFuzzer::*op)();
    };
    const bool crowded = live_.size() > 150 || MemoryPressure();
    const bool routed = RouteCount() > kMaxRoutes;
    // References beyond routes keep pools (and graph pools' free memory) alive: release them
    // about as often as begins make them, or the devices fill with cache nobody can take back.
    int64_t surplus = 0;
    for (const auto& [key, pool] : pools_)
      surplus += std::max<int64_t>(0, pool.refs - RoutesTo(key.device, pool.id));
    const Choice choices[] = {
        {crowded ? 10 : 24, &SerialFuzzer::OpMalloc},
        {crowded ? 30 : 14, &SerialFuzzer::OpFree},
        {4, &SerialFuzzer::OpMallocMisuse},
        {5, &SerialFuzzer::OpFreeMisuse},
        {4, &SerialFuzzer::OpRecordStream},
        {4, &SerialFuzzer::OpPoolOf},
        {2, &SerialFuzzer::OpEmptyCache},
        {2, &SerialFuzzer::OpNewIds},
        {routed ? 1 : 7, &SerialFuzzer::OpBegin},
        {routed ? 12 : 5, &SerialFuzzer::OpEnd},
        {static_cast<int>(std::min<int64_t>(40, 3 + surplus)), &SerialFuzzer::OpRelease},
        {2, &SerialFuzzer::OpCreateCallbackPool},
        {3, &SerialFuzzer::OpTrim},
        {3, &SerialFuzzer::OpJson},
        {3, &SerialFuzzer::OpCaptureBegin},
        {captures_.empty() ? 0 : 3, &SerialFuzzer::OpCaptureEnd},
        {graphs_.empty() ? 0 : 3, &SerialFuzzer::OpGraph},
        {1, &SerialFuzzer::OpGraphPoolCreate},
        {1, &SerialFuzzer::OpHelperThread},
        {captures_.empty() ? 0 : 1, &SerialFuzzer::OpInvalidateCapture},
        {2, &SerialFuzzer::OpMisc},
    };
    int total = 0;
    for (const Choice& choice : choices) total += choice.weight;
    int pick = static_cast<int>(random_.Below(total));
    for (const Choice& choice : choices) {
      if (pick < choice.weight) {
        (this->*choice.op)();
        return;
      }
      pick -= choice.weight;
    }
  }

  bool MemoryPressure() const {
    std::vector<size_t> bytes(w_.devices, 0);
    for (const auto& [address, block] : live_) {
      if (block.callback == nullptr) bytes[block.device] += block.size;
    }
    for (size_t used : bytes) {
      if (used > w_.capacity / 2) return true;
    }
    return false;
  }

  int RandomDevice() { return static_cast<int>(random_.Below(w_.devices)); }
  int BadDevice() {
    const int bad[] = {-1, -7, INT32_MIN, w_.devices, w_.devices + 1, 64, INT32_MAX};
    return bad[random_.Below(sizeof bad / sizeof bad[0])];
  }
  uint32_t DeviceCodes(int device) const {
    if (device < 0) return kIA;
    if (device >= w_.devices) return kNF;
    return 0;
  }
  // NULL or one of the device's two streams.
  void* RandomStream(int device) {
    const uint64_t pick = random_.Below(4);
    return pick < 2 ? nullptr : w_.streams[device][pick - 2];
  }
  // A handle the device does not know: another device's stream, or one no device made.
  void* ForeignStream(int device) {
    if (w_.devices > 1 && random_.Chance(0.5)) {
      return w_.streams[(device + 1) % w_.devices][random_.Below(2)];
    }
    return kBogusStream;
  }
  bool StreamOf(int device, void* stream) const {
    return stream == nullptr || stream == w_.streams[device][0] || stream == w_.streams[device][1];
  }
  std::string StreamName(void* stream) const {
    if (stream == nullptr) return "NULL";
    for (int device = 0; device < w_.devices; ++device) {
      for (int i = 0; i < 2; ++i) {
        if (w_.streams[device][i] == stream) return absl::StrFormat("S%d.%d", device, i);
      }
    }
    return absl::StrFormat("%p", stream);
  }
  std::string BlockText(const MBlock& block) const {
    return absl::StrFormat("%#x (%u bytes, asked %u, device %d, pool %s, stream %s%s)",
                           block.address, block.size, block.requested, block.device,
                           IdText(block.pool), StreamName(block.stream),
                           block.callback != nullptr ? ", callback pool" : "");
  }

  // A random live block (live_ must not be empty). Picked in the order blocks were made, so that
  // host addresses (callback pools' memory moves with ASLR) do not change the choices.
  std::map<uintptr_t, MBlock>::iterator RandomLive() {
    auto it = live_order_.begin();
    std::advance(it, random_.Below(live_order_.size()));
    return live_.find(it->second);
  }
  // A random freed block's record (freed_ must not be empty); the caller skips a stale one.
  MFreed RandomFreed() {
    auto it = freed_.begin();
    std::advance(it, random_.Below(freed_.size()));
    return it->second;
  }

  // --- Model queries ---------------------------------------------------------------------------

  MPool* FindPool(int device, tidepool_pool_id id) {
    auto it = pools_.find(KeyOf(device, id));
    return it == pools_.end() ? nullptr : &it->second;
  }
  MPool& EnsurePool(int device, tidepool_pool_id id) {
    auto it = pools_.find(KeyOf(device, id));
    if (it != pools_.end()) return it->second;
    return pools_[KeyOf(device, id)] = MPool{device, id, 0, nullptr};
  }
  int PoolCount(int device) const {
    int count = 0;
    for (const auto& [key, pool] : pools_) count += key.device == device;
    return count;
  }
  std::vector<tidepool_pool_id> KnownPools(int device, bool with_default) const {
    std::vector<tidepool_pool_id> known;
    for (const auto& [key, pool] : pools_) {
      if (key.device == device && (with_default || !IsDefault(pool.id))) known.push_back(pool.id);
    }
    return known;
  }
  int64_t RoutesTo(int device, tidepool_pool_id id) const {
    int64_t count = 0;
    for (const MRoute& route : routes_) {
      count += route.device == device && SamePool(route.pool, id);
    }
    return count;
  }
  int RouteCount() const { return static_cast<int>(routes_.size()); }
  int CapturesOn(int device) const {
    int count = 0;
    for (const MCapture& capture : captures_) count += capture.device == device;
    return count;
  }
  const MCapture* CaptureOf(int device, void* stream) const {
    for (const MCapture& capture : captures_) {
      if (capture.device == device && capture.stream == stream) return &capture;
    }
    return nullptr;
  }

  // The pool an allocation by `thread` on `stream` of `device` goes to: the newest route that
  // matches (docs/pools.md rule 1).
  tidepool_pool_id Choose(int device, void* stream, int thread) const {
    const MRoute* route = ChooseRoute(device, stream, thread);
    return route == nullptr ? kDefaultPool : route->pool;
  }
  const MRoute* ChooseRoute(int device, void* stream, int thread) const {
    for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
      const MRoute& route = *it;
      if (route.device != device) continue;
      bool match = false;
      switch (route.kind) {
        case TIDEPOOL_ROUTE_CURRENT_THREAD:
          match = route.thread == thread;
          break;
        case TIDEPOOL_ROUTE_EVERYONE:
          match = true;
          break;
        case TIDEPOOL_ROUTE_STREAM:
          // A capturing stream has another id (pool/route.h): the route matches only on the
          // side of a capture it was begun on.
          match = route.stream == stream &&
                  route.stream_capturing == (CaptureOf(device, stream) != nullptr);
          break;
        case TIDEPOOL_ROUTE_CAPTURE: {
          const MCapture* capture = CaptureOf(device, stream);
          match = capture != nullptr && !capture->invalidated && capture->id == route.capture_id;
          break;
        }
      }
      if (match) return &route;
    }
    return nullptr;
  }

  void ModelBegin(int device, tidepool_pool_id id, MRoute route) {
    MPool& pool = EnsurePool(device, id);
    if (!IsDefault(id)) ++pool.refs;
    pool.gone = false;
    route.seq = next_seq_++;
    route.device = device;
    route.pool = id;
    routes_.push_back(route);
    touched_.insert(KeyOf(device, id));
  }

  // The route tidepool_end_allocate_to_pool by `thread` ends: its own newest current-thread
  // route to the pool, else the newest route of another filter to it; -1 for none.
  int EndTarget(int device, tidepool_pool_id id, int thread) const {
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      const MRoute& route = routes_[i];
      if (route.device == device && route.kind == TIDEPOOL_ROUTE_CURRENT_THREAD &&
          route.thread == thread && SamePool(route.pool, id)) {
        return i;
      }
    }
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      const MRoute& route = routes_[i];
      if (route.device == device && route.kind != TIDEPOOL_ROUTE_CURRENT_THREAD &&
          SamePool(route.pool, id)) {
        return i;
      }
    }
    return -1;
  }

  uint32_t ReleaseCodes(int device, tidepool_pool_id id) {
    if (uint32_t bad = DeviceCodes(device)) return bad;
    if (IsDefault(id)) return kIA;
    const MPool* pool = FindPool(device, id);
    if (pool == nullptr) return kNF;
    if (pool->refs == 0) return kFP;
    if (pool->refs - 1 < RoutesTo(device, id)) return kFP;
    return kOK;
  }

  // A release that succeeded: one reference fewer; at zero the pool keeps only what its live
  // blocks need (unless a capture holds its memory back).
  void ModelReleased(int device, tidepool_pool_id id) {
    MPool& pool = *FindPool(device, id);
    --pool.refs;
    touched_.insert(KeyOf(device, id));
    if (pool.refs == 0 && CapturesOn(device) == 0) CheckHoldsOnlyLive(pool, "released");
  }

  uint32_t FreedCodes(const MFreed& freed) {
    return StatsAtStepStart(freed.device).segments_removed == freed.epoch ? kFP : (kFP | kIA);
  }

  // --- Memory bounds ---------------------------------------------------------------------------

  // Bytes of the physical allocations (runs: docs/design.md) that the live blocks matching
  // `which` touch, as the simulated device maps them: a run goes back to the device only whole.
  template <typename Which>
  size_t GranuleBytes(Which which) const {
    std::vector<std::pair<int, const MBlock*>> blocks;
    for (const auto& [address, block] : live_) {
      if (which(block)) blocks.push_back({block.device, &block});
    }
    return PinnedRunBytes(w_, blocks);
  }

  // Bytes of a callback pool's segments that hold live blocks (all of them for a pool that does
  // not share its free memory).
  size_t CallbackPinned(const MPool& pool) const {
    size_t pinned = 0;
    for (const auto& [start, size] : CallbackRegistry::Get().SegmentsOf(pool.callback)) {
      auto it = live_.lower_bound(start);
      if (!Shares(pool.id) || (it != live_.end() && it->first < start + size)) pinned += size;
    }
    return pinned;
  }

  // Whether tidepool_malloc of `size` bytes into `pool` may run out of memory. The device (or the
  // callback's budget) must lack room for the growth now, and, unless a capture keeps the cache,
  // also once the cache went back: then only live blocks' granules and pools that keep their
  // memory (graph ids) hold any.
  bool OomAllowed(int device, const MPool& pool, size_t size) {
    if (size > w_.capacity) return true;
    const size_t rounded = Round512(size);
    if (pool.callback != nullptr) {
      const size_t segment = PlainSegmentSize(rounded);
      if (segment > w_.capacity) return true;
      // During a capture the cache is not given back: every segment the pool has stays.
      const size_t pinned = CapturesOn(device) > 0
                                ? CallbackRegistry::Get().LiveBytes(pool.callback)
                                : CallbackPinned(pool);
      return pinned + segment > pool.callback->budget;
    }
    const size_t need =
        w_.expandable ? RoundUp(rounded, w_.granularity) : PlainSegmentSize(rounded);
    if (need > w_.capacity) return true;
    if (w_.sims[device]->used_bytes() + need <= w_.capacity) return false;
    if (CapturesOn(device) > 0 || !w_.expandable) return true;
    size_t pinned = GranuleBytes([device](const MBlock& block) {
      return block.device == device && block.callback == nullptr;
    });
    for (const auto& [key, other] : pools_) {
      if (key.device != device || Shares(other.id) || other.callback != nullptr) continue;
      pinned += static_cast<size_t>(PoolStats(device, other.id).reserved);
    }
    return pinned + need > w_.capacity;
  }

  // After empty_cache, trim or the release that retired it: the pool holds exactly what its live
  // blocks need (the granules they touch, or the callback segments that hold them).
  void CheckHoldsOnlyLive(const MPool& pool, const char* after) {
    if (pool.callback == nullptr && !w_.expandable) return;
    const Stats stats = PoolStats(pool.device, pool.id);
    size_t expected;
    if (pool.callback != nullptr) {
      expected = 0;
      for (const auto& [start, size] : CallbackRegistry::Get().SegmentsOf(pool.callback)) {
        auto it = live_.lower_bound(start);
        if (it != live_.end() && it->first < start + size) expected += size;
      }
    } else {
      const int device = pool.device;
      const tidepool_pool_id id = pool.id;
      expected = GranuleBytes([device, id](const MBlock& block) {
        return block.device == device && SamePool(block.pool, id);
      });
    }
    if (static_cast<size_t>(stats.reserved) != expected) {
      rep_.Fail(absl::StrFormat(
          "after %s, pool %s of device %d reserves %d bytes; its live blocks need %u (%s)", after,
          IdText(pool.id), pool.device, stats.reserved, expected,
          pool.callback != nullptr ? "callback segments holding them" : "granules they touch"));
    }
  }

  // --- Observation -----------------------------------------------------------------------------

  Stats ReadStats(int device, const tidepool_pool_id* pool) {
    std::string json;
    const tidepool_status status = ReadJson(false, device, pool, &json);
    if (status != TIDEPOOL_OK) {
      rep_.Fail(absl::StrFormat("tidepool_stats_json(%d, %s) -> %s: %s", device,
                                pool == nullptr ? "NULL" : IdText(*pool), CodeName(status),
                                tidepool_last_error()));
    }
    Stats stats;
    if (!ParseStats(json, &stats)) rep_.Fail(absl::StrCat("unparsable statistics: ", json));
    return stats;
  }
  Stats PoolStats(int device, tidepool_pool_id id) { return ReadStats(device, &id); }

  // The device's statistics as the last check read them; after a step that skipped the check
  // (TIDEPOOL_FUZZ_CHECK_EVERY), read again on first use, before or after this step's own calls.
  const Stats& StatsAtStepStart(int device) {
    if (!stats_fresh_[device]) {
      device_stats_[device] = ReadStats(device, nullptr);
      stats_fresh_[device] = true;
    }
    return device_stats_[device];
  }

  std::string RouteText(int device, void* stream) {
    absl::StatusOr<PoolId> route = w_.managers[device]->RouteOf(stream);
    return route.ok() ? route->ToString() : route.status().ToString();
  }

  Fingerprint TakeFingerprint() {
    Fingerprint print;
    for (int device = 0; device < w_.devices; ++device) {
      std::string stats_json;
      std::string snapshot_json;
      if (ReadJson(false, device, nullptr, &stats_json) != TIDEPOOL_OK ||
          ReadJson(true, device, nullptr, &snapshot_json) != TIDEPOOL_OK) {
        rep_.Fail(absl::StrCat("reading the state failed: ", tidepool_last_error()));
      }
      Stats stats;
      ParseStats(stats_json, &stats);
      std::string live = absl::StrFormat(
          "[device %d: requested %d allocated %d active %d captures %d graphs %d routes", device,
          stats.requested, stats.allocated, stats.active,
          w_.managers[device]->allocator()->captures_underway(), w_.sims[device]->live_graphs());
      for (void* stream :
           {static_cast<void*>(nullptr), w_.streams[device][0], w_.streams[device][1]}) {
        absl::StrAppend(&live, " ", RouteText(device, stream));
      }
      for (const auto& [key, pool] : pools_) {
        if (key.device != device) continue;
        absl::StatusOr<PoolInfo> info = w_.managers[device]->Info(ToPoolId(pool.id));
        if (!info.ok()) {
          absl::StrAppend(&live, " pool ", IdText(pool.id), " ", info.status().ToString());
          continue;
        }
        absl::StrAppendFormat(&live, " pool %s refs %d routes %d live %d%s%s", IdText(pool.id),
                              info->references, info->routes, info->live_blocks,
                              info->released ? " released" : "", info->gone ? " gone" : "");
      }
      live += "]";
      const std::string rest =
          absl::StrFormat(" stats %s used %u %s", stats_json, w_.sims[device]->used_bytes(),
                          CallbackRegistry::Get().Summary(device));
      print.live += live;
      print.full += live + rest + " snapshot " + snapshot_json;
    }
    return print;
  }

  void CompareFingerprints(const Fingerprint& before, const Fingerprint& after, Compare mode,
                           const std::string& what) {
    const std::string& a = mode == Compare::kFull ? before.full : before.live;
    const std::string& b = mode == Compare::kFull ? after.full : after.live;
    if (a == b) return;
    size_t at = 0;
    while (at < a.size() && at < b.size() && a[at] == b[at]) ++at;
    const size_t from = at > 160 ? at - 160 : 0;
    rep_.Fail(absl::StrCat(what, " changed the state (first difference at offset ", at,
                           "):\n      before: ...", a.substr(from, 320), "\n      after:  ...",
                           b.substr(from, 320)));
  }

  // Makes one C call and checks its code against `allowed`, the message, and (on failure, or on
  // success when `unchanged_on_success`) that nothing changed.
  tidepool_status Call(const char* function, uint32_t allowed,
                       const std::function<tidepool_status()>& call,
                       Compare on_failure = Compare::kFull, bool unchanged_on_success = false) {
    // A call that may only succeed needs no "before": failing is wrong whatever it changed.
    if (!compare_states_) {
      on_failure = Compare::kNone;
      unchanged_on_success = false;
    }
    Fingerprint before;
    if (((allowed & kAnyError) != 0 && on_failure != Compare::kNone) || unchanged_on_success) {
      before = TakeFingerprint();
    }
    const std::string error_before = tidepool_last_error();
    const tidepool_status status = call();
    rep_.Note(absl::StrCat("-> ", CodeName(status)));
    ++outcomes_[absl::StrCat(function, " -> ", CodeName(status))];
    if (!KnownStatus(status) || (allowed & (1u << status)) == 0) {
      rep_.Fail(absl::StrCat(function, " returned ", CodeName(status), " where the model allows ",
                             CodesText(allowed), "; tidepool_last_error: \"", tidepool_last_error(),
                             "\""));
    }
    const char* message = tidepool_last_error();
    if (message == nullptr) rep_.Fail("tidepool_last_error() returned NULL");
    if (status == TIDEPOOL_OK) {
      if (error_before != message) {
        rep_.Fail(absl::StrCat(function, " succeeded but changed tidepool_last_error from \"",
                               error_before, "\" to \"", message, "\""));
      }
      if (unchanged_on_success) {
        CompareFingerprints(before, TakeFingerprint(), Compare::kFull,
                            absl::StrCat("a successful ", function, " that must change nothing"));
      }
      return status;
    }
    const std::string text = message;
    if (text.empty()) rep_.Fail(absl::StrCat(function, " failed with an empty last error"));
    if (!StartsWith(text, absl::StrCat(function, ": "))) {
      rep_.Fail(
          absl::StrCat(function, " failed with a message that does not name it: \"", text, "\""));
    }
    Compare mode = on_failure;
    if (status == TIDEPOOL_OUT_OF_MEMORY && mode != Compare::kNone) mode = Compare::kLive;
    if (mode != Compare::kNone) {
      CompareFingerprints(before, TakeFingerprint(), mode, absl::StrCat("a failed ", function));
    }
    return status;
  }

  // --- Blocks ----------------------------------------------------------------------------------

  void InsertBlock(const MBlock& block) {
    auto next = live_.lower_bound(block.address);
    if (next != live_.end() && next->first < block.address + block.size) {
      rep_.Fail(absl::StrCat("new block ", BlockText(block), " overlaps live block ",
                             BlockText(next->second)));
    }
    if (next != live_.begin()) {
      const MBlock& prev = std::prev(next)->second;
      if (prev.address + prev.size > block.address) {
        rep_.Fail(
            absl::StrCat("new block ", BlockText(block), " overlaps live block ", BlockText(prev)));
      }
    }
    MBlock added = block;
    added.serial = next_serial_++;
    live_[block.address] = added;
    live_order_[added.serial] = block.address;
    // A freed address inside the new block is no freed block any more.
    for (auto it = freed_at_.lower_bound(block.address);
         it != freed_at_.end() && it->first < block.address + block.size;) {
      freed_.at(it->second).stale = true;
      it = freed_at_.erase(it);
    }
    touched_.insert(KeyOf(block.device, block.pool));
  }

  void RemoveBlock(uintptr_t address, int64_t epoch) {
    const MBlock block = live_.at(address);
    live_.erase(address);
    live_order_.erase(block.serial);
    const uint64_t serial = next_serial_++;
    freed_[serial] = MFreed{address, block.device, epoch};
    freed_at_.emplace(address, serial);
    if (freed_.size() > 400) {
      const auto oldest = freed_.begin();
      for (auto it = freed_at_.lower_bound(oldest->second.address);
           it != freed_at_.end() && it->first == oldest->second.address; ++it) {
        if (it->second == oldest->first) {
          freed_at_.erase(it);
          break;
        }
      }
      freed_.erase(oldest);
    }
    touched_.insert(KeyOf(block.device, block.pool));
  }

  void CheckPoolOf(const MBlock& block) {
    int device = -1;
    tidepool_pool_id pool{~uint64_t{0}, ~uint64_t{0}};
    const tidepool_status status =
        tidepool_pool_of(reinterpret_cast<void*>(block.address), &device, &pool);
    if (status != TIDEPOOL_OK || device != block.device || !SamePool(pool, block.pool)) {
      rep_.Fail(absl::StrFormat("tidepool_pool_of(%s) -> %s, device %d, pool %s (%s)",
                                BlockText(block), CodeName(status), device, IdText(pool),
                                status == TIDEPOOL_OK ? "" : tidepool_last_error()));
    }
  }

  // A tidepool_malloc that succeeded: checks the block and adds it to the model.
  void AcceptBlock(int device, void* stream, size_t size, tidepool_pool_id target, void* out,
                   const Stats& before) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(out);
    if (out == nullptr || address % kBlockAlignment != 0) {
      rep_.Fail(absl::StrFormat("tidepool_malloc returned OK with %p", out));
    }
    const Stats after = ReadStats(device, nullptr);
    const int64_t block_size = after.allocated - before.allocated;
    if (after.requested - before.requested != static_cast<int64_t>(size) ||
        after.active - before.active != 1) {
      rep_.Fail(absl::StrFormat(
          "a malloc of %u bytes moved requested_bytes by %d and active_blocks by %d", size,
          after.requested - before.requested, after.active - before.active));
    }
    const MPool& pool = *FindPool(device, target);
    const size_t rounded = Round512(size);
    const bool exact = pool.callback == nullptr && w_.expandable;
    if (block_size < static_cast<int64_t>(rounded) ||
        (exact && block_size != static_cast<int64_t>(rounded)) ||
        block_size > static_cast<int64_t>(rounded + kMiB)) {
      rep_.Fail(absl::StrFormat("a malloc of %u bytes (%u rounded) made a block of %d bytes", size,
                                rounded, block_size));
    }
    MBlock block{0,      address,      static_cast<size_t>(block_size), size, device, target,
                 stream, pool.callback};
    if (pool.callback != nullptr) {
      if (!CallbackRegistry::Get().Holds(pool.callback, address, block.size)) {
        rep_.Fail(absl::StrCat("block ", BlockText(block),
                               " is not inside a segment its pool's callback handed out"));
      }
    } else if (address < w_.Base(device) ||
               address + block.size > w_.Base(device) + kSimulatedAddressRange) {
      rep_.Fail(absl::StrCat("block ", BlockText(block), " is outside device ", device,
                             "'s address space"));
    }
    CheckPoolOf(block);
    InsertBlock(block);
  }

  void DoMalloc(int device, void* stream, size_t size) {
    const tidepool_pool_id target = Choose(device, stream, kMainThread);
    const MPool& pool = *FindPool(device, target);
    const bool may_oom = OomAllowed(device, pool, size);
    rep_.Begin(step_, absl::StrFormat("tidepool_malloc(&p, %u, %d, %s) into pool %s%s%s", size,
                                      device, StreamName(stream), IdText(target),
                                      pool.callback != nullptr ? " (callbacks)" : "",
                                      may_oom ? " [may run out]" : ""));
    const Stats before = StatsAtStepStart(device);
    const MRoute* route = ChooseRoute(device, stream, kMainThread);
    const char* const kinds[] = {"current thread", "stream", "capture", "everyone"};
    ++outcomes_[absl::StrCat("(malloc routed by ",
                             route == nullptr ? "no route" : kinds[route->kind],
                             pool.callback != nullptr ? ", into a callback pool" : "", ")")];
    void* out = kSentinel;
    const tidepool_status status = Call("tidepool_malloc", kOK | (may_oom ? kOOM : 0), [&] {
      return tidepool_malloc(&out, size, device, stream);
    });
    if (status != TIDEPOOL_OK) {
      if (out != nullptr) rep_.Fail(absl::StrFormat("a failed tidepool_malloc stored %p", out));
      ++outcomes_[size > w_.capacity         ? "(out of memory: larger than the device)"
                  : pool.callback != nullptr ? "(out of memory: callback budget)"
                  : CapturesOn(device) > 0   ? "(out of memory: device full during a capture)"
                                             : "(out of memory: device full)"];
      return;
    }
    AcceptBlock(device, stream, size, target, out, before);
  }

  // --- Operations: memory ----------------------------------------------------------------------

  void OpMalloc() {
    const int device = RandomDevice();
    DoMalloc(device, RandomStream(device), RandomSize(random_, w_.capacity));
  }

  void OpMallocMisuse() {
    const int device = RandomDevice();
    void* stream = RandomStream(device);
    void* out = kSentinel;
    auto expect_null = [&] {
      if (out != nullptr) rep_.Fail(absl::StrFormat("a failed tidepool_malloc stored %p", out));
    };
    switch (random_.Below(6)) {
      case 0:
        rep_.Begin(step_, absl::StrFormat("tidepool_malloc(NULL, 1000, %d, %s)", device,
                                          StreamName(stream)));
        Call("tidepool_malloc", kIA,
             [&] { return tidepool_malloc(nullptr, 1000, device, stream); });
        return;
      case 1:
        rep_.Begin(step_,
                   absl::StrFormat("tidepool_malloc(&p, 0, %d, %s)", device, StreamName(stream)));
        Call("tidepool_malloc", kIA, [&] { return tidepool_malloc(&out, 0, device, stream); });
        expect_null();
        return;
      case 2: {
        const size_t huge[] = {SIZE_MAX,
                               SIZE_MAX - 511,
                               size_t{1} << 60,
                               (size_t{1} << 56) + 1,
                               size_t{1} << 56,
                               w_.capacity + 1,
                               w_.capacity + w_.granularity,
                               size_t{1} << 40};
        const size_t size = huge[random_.Below(sizeof huge / sizeof huge[0])];
        rep_.Begin(step_,
                   absl::StrFormat("tidepool_malloc(&p, %u, %d, %s) [larger than the device]", size,
                                   device, StreamName(stream)));
        Call("tidepool_malloc", kOOM, [&] { return tidepool_malloc(&out, size, device, stream); });
        expect_null();
        return;
      }
      case 3: {
        const int bad = BadDevice();
        rep_.Begin(step_, absl::StrFormat("tidepool_malloc(&p, 1000, %d, NULL)", bad));
        Call("tidepool_malloc", DeviceCodes(bad),
             [&] { return tidepool_malloc(&out, 1000, bad, nullptr); });
        expect_null();
        return;
      }
      case 4: {
        void* foreign = ForeignStream(device);
        rep_.Begin(step_, absl::StrFormat("tidepool_malloc(&p, 1000, %d, %s) [unknown stream]",
                                          device, StreamName(foreign)));
        Call("tidepool_malloc", kIA, [&] { return tidepool_malloc(&out, 1000, device, foreign); });
        expect_null();
        return;
      }
      default: {
        const int bad = BadDevice();
        rep_.Begin(step_, absl::StrFormat("tidepool_malloc(NULL, 0, %d, %p)", bad, kBogusStream));
        Call("tidepool_malloc", kIA,
             [&] { return tidepool_malloc(nullptr, 0, bad, kBogusStream); });
        return;
      }
    }
  }

  void OpFree() {
    if (live_.empty()) {
      OpMalloc();
      return;
    }
    const MBlock block = RandomLive()->second;
    rep_.Begin(step_, absl::StrCat("tidepool_free(", BlockText(block), ")"));
    const int64_t epoch = StatsAtStepStart(block.device).segments_removed;
    Call("tidepool_free", kOK,
         [&] { return tidepool_free(reinterpret_cast<void*>(block.address)); });
    RemoveBlock(block.address, epoch);
  }

  // A pointer into the middle of a live block: 512-aligned, or not.
  void* InteriorPointer(const MBlock& block) {
    if (block.size >= 2 * kBlockAlignment && random_.Chance(0.6)) {
      return reinterpret_cast<void*>(
          block.address + kBlockAlignment * random_.Between(1, block.size / kBlockAlignment - 1));
    }
    return reinterpret_cast<void*>(block.address + random_.Between(1, kBlockAlignment - 1));
  }

  void* RandomForeign() {
    int on_stack = 0;
    const std::vector<void*> foreign = ForeignPointers(w_, heap_foreign_, &on_stack);
    return random_.Pick(foreign);
  }

  void OpFreeMisuse() {
    switch (random_.Below(5)) {
      case 0:
        rep_.Begin(step_, "tidepool_free(NULL)");
        Call(
            "tidepool_free", kOK, [] { return tidepool_free(nullptr); }, Compare::kFull,
            /*unchanged_on_success=*/true);
        return;
      case 1: {
        if (live_.empty()) break;
        const MBlock block = RandomLive()->second;
        void* inside = InteriorPointer(block);
        rep_.Begin(step_,
                   absl::StrFormat("tidepool_free(%p) [inside %s]", inside, BlockText(block)));
        Call("tidepool_free", kFP, [&] { return tidepool_free(inside); });
        return;
      }
      case 2: {
        if (freed_.empty()) break;
        const MFreed freed = RandomFreed();
        const uintptr_t address = freed.address;
        if (freed.stale) {
          rep_.Begin(step_, "(a double free skipped: a newer block holds the address)");
          return;
        }
        const uint32_t codes = FreedCodes(freed);
        rep_.Begin(step_, absl::StrFormat("tidepool_free(%#x) [double free on device %d%s]",
                                          address, freed.device,
                                          codes == kFP ? "" : ", memory may have gone back"));
        Call("tidepool_free", codes,
             [address = address] { return tidepool_free(reinterpret_cast<void*>(address)); });
        return;
      }
      default:
        break;
    }
    void* foreign = RandomForeign();
    rep_.Begin(step_, absl::StrFormat("tidepool_free(%p) [foreign]", foreign));
    Call("tidepool_free", kIA, [&] { return tidepool_free(foreign); });
  }

  void OpRecordStream() {
    const uint64_t variant = random_.Below(10);
    if (variant < 5 && !live_.empty()) {
      const MBlock block = RandomLive()->second;
      void* stream = RandomStream(block.device);
      rep_.Begin(step_, absl::StrFormat("tidepool_record_stream(%s, %s)", BlockText(block),
                                        StreamName(stream)));
      Call("tidepool_record_stream", kOK,
           [&] { return tidepool_record_stream(reinterpret_cast<void*>(block.address), stream); });
      return;
    }
    if (variant == 5 && !live_.empty()) {
      const MBlock block = RandomLive()->second;
      void* stream = ForeignStream(block.device);
      rep_.Begin(step_, absl::StrFormat("tidepool_record_stream(%s, %s) [unknown stream]",
                                        BlockText(block), StreamName(stream)));
      Call("tidepool_record_stream", kIA,
           [&] { return tidepool_record_stream(reinterpret_cast<void*>(block.address), stream); });
      return;
    }
    if (variant == 6 && !freed_.empty()) {
      const MFreed freed = RandomFreed();
      const uintptr_t address = freed.address;
      void* stream = RandomStream(freed.device);
      if (freed.stale) {
        rep_.Begin(step_, "(a record_stream of a freed block skipped: a newer block holds it)");
        return;
      }
      rep_.Begin(step_, absl::StrFormat("tidepool_record_stream(%#x, %s) [freed block]", address,
                                        StreamName(stream)));
      Call("tidepool_record_stream", FreedCodes(freed), [&, address = address] {
        return tidepool_record_stream(reinterpret_cast<void*>(address), stream);
      });
      return;
    }
    if (variant == 7 && !live_.empty()) {
      const MBlock block = RandomLive()->second;
      void* inside = InteriorPointer(block);
      rep_.Begin(step_, absl::StrFormat("tidepool_record_stream(%p, NULL) [inside %s]", inside,
                                        BlockText(block)));
      Call("tidepool_record_stream", kFP, [&] { return tidepool_record_stream(inside, nullptr); });
      return;
    }
    void* foreign = variant == 8 ? nullptr : RandomForeign();
    rep_.Begin(step_, absl::StrFormat("tidepool_record_stream(%p, NULL) [foreign]", foreign));
    Call("tidepool_record_stream", kIA, [&] { return tidepool_record_stream(foreign, nullptr); });
  }

  void OpPoolOf() {
    int device = -1;
    tidepool_pool_id pool{};
    const uint64_t variant = random_.Below(10);
    if (variant < 4 && !live_.empty()) {
      const MBlock block = RandomLive()->second;
      rep_.Begin(step_, absl::StrCat("tidepool_pool_of(", BlockText(block), ")"));
      Call(
          "tidepool_pool_of", kOK,
          [&] { return tidepool_pool_of(reinterpret_cast<void*>(block.address), &device, &pool); },
          Compare::kFull, /*unchanged_on_success=*/true);
      if (device != block.device || !SamePool(pool, block.pool)) {
        rep_.Fail(
            absl::StrFormat("tidepool_pool_of said device %d, pool %s", device, IdText(pool)));
      }
      return;
    }
    if (variant < 6 && !live_.empty()) {
      const MBlock block = RandomLive()->second;
      const bool no_device = random_.Chance(0.5);
      rep_.Begin(step_,
                 absl::StrFormat("tidepool_pool_of(%#x, %s, %s)", block.address,
                                 no_device ? "NULL" : "&device", no_device ? "&pool" : "NULL"));
      Call("tidepool_pool_of", kIA, [&] {
        return tidepool_pool_of(reinterpret_cast<void*>(block.address),
                                no_device ? nullptr : &device, no_device ? &pool : nullptr);
      });
      return;
    }
    if (variant == 6 && !freed_.empty()) {
      const MFreed freed = RandomFreed();
      const uintptr_t address = freed.address;
      if (freed.stale) {
        rep_.Begin(step_, "(a pool_of of a freed block skipped: a newer block holds it)");
        return;
      }
      rep_.Begin(step_, absl::StrFormat("tidepool_pool_of(%#x) [freed block]", address));
      Call("tidepool_pool_of", FreedCodes(freed), [&, address = address] {
        return tidepool_pool_of(reinterpret_cast<void*>(address), &device, &pool);
      });
      return;
    }
    if (variant == 7 && !live_.empty()) {
      const MBlock block = RandomLive()->second;
      void* inside = InteriorPointer(block);
      rep_.Begin(step_,
                 absl::StrFormat("tidepool_pool_of(%p) [inside %s]", inside, BlockText(block)));
      Call("tidepool_pool_of", kFP, [&] { return tidepool_pool_of(inside, &device, &pool); });
      return;
    }
    void* foreign = variant == 8 ? nullptr : RandomForeign();
    rep_.Begin(step_, absl::StrFormat("tidepool_pool_of(%p) [foreign]", foreign));
    Call("tidepool_pool_of", kIA, [&] { return tidepool_pool_of(foreign, &device, &pool); });
  }

  void OpEmptyCache() {
    const int device = random_.Chance(0.1) ? BadDevice() : RandomDevice();
    uint32_t codes = DeviceCodes(device);
    if (codes == 0) codes = CapturesOn(device) > 0 ? kFP : kOK;
    rep_.Begin(step_, absl::StrFormat("tidepool_empty_cache(%d)", device));
    const tidepool_status status =
        Call("tidepool_empty_cache", codes, [&] { return tidepool_empty_cache(device); });
    if (status != TIDEPOOL_OK) return;
    for (const auto& [key, pool] : pools_) {
      if (key.device == device && Shares(pool.id)) CheckHoldsOnlyLive(pool, "empty_cache");
    }
  }

  // --- Operations: pools -----------------------------------------------------------------------

  tidepool_pool_id NewUserId() {
    tidepool_pool_id id{7, 7};
    Call("tidepool_new_pool_id", kOK, [&] { return tidepool_new_pool_id(&id); });
    if (id.first != 0 || id.second <= last_user_id_) {
      rep_.Fail(
          absl::StrFormat("tidepool_new_pool_id gave %s after {0,%u}", IdText(id), last_user_id_));
    }
    last_user_id_ = id.second;
    return id;
  }

  tidepool_pool_id NewGraphId() {
    tidepool_pool_id id{7, 7};
    Call("tidepool_new_graph_pool_id", kOK, [&] { return tidepool_new_graph_pool_id(&id); });
    if (id.second != 0 || id.first <= last_graph_id_) {
      rep_.Fail(absl::StrFormat("tidepool_new_graph_pool_id gave %s after {%u,0}", IdText(id),
                                last_graph_id_));
    }
    last_graph_id_ = id.first;
    return id;
  }

  // An id neither counter gives: {2^40 + n, 3}. Any id may be begun (docs/pools.md rule 13).
  tidepool_pool_id WeirdId() { return tidepool_pool_id{(uint64_t{1} << 40) + ++weird_ids_, 3}; }

  void OpNewIds() {
    switch (random_.Below(4)) {
      case 0:
        rep_.Begin(step_, "tidepool_new_pool_id(&id)");
        NewUserId();
        return;
      case 1:
        rep_.Begin(step_, "tidepool_new_graph_pool_id(&id)");
        NewGraphId();
        return;
      case 2:
        rep_.Begin(step_, "tidepool_new_pool_id(NULL)");
        Call("tidepool_new_pool_id", kIA, [] { return tidepool_new_pool_id(nullptr); });
        return;
      default:
        rep_.Begin(step_, "tidepool_new_graph_pool_id(NULL)");
        Call("tidepool_new_graph_pool_id", kIA, [] { return tidepool_new_graph_pool_id(nullptr); });
        return;
    }
  }

  // A pool to begin on `device`: a known one, the default, one only another device has, or a new
  // id of either kind (or neither) while the device may still get pools.
  tidepool_pool_id PoolForBegin(int device) {
    const std::vector<tidepool_pool_id> known = KnownPools(device, /*with_default=*/false);
    const bool may_create = PoolCount(device) < kMaxPoolsPerDevice;
    const uint64_t pick = random_.Below(100);
    if (pick < 50 && !known.empty()) return random_.Pick(known);
    if (pick < 60) return kDefaultPool;
    if (pick < 70 && may_create) {
      std::vector<tidepool_pool_id> elsewhere;
      for (const auto& [key, pool] : pools_) {
        if (key.device != device && !IsDefault(pool.id) && FindPool(device, pool.id) == nullptr) {
          elsewhere.push_back(pool.id);
        }
      }
      if (!elsewhere.empty()) return random_.Pick(elsewhere);
    }
    if (!may_create) return known.empty() ? kDefaultPool : random_.Pick(known);
    if (pick < 88) return NewUserId();
    if (pick < 96) return NewGraphId();
    return WeirdId();
  }

  void OpBegin() {
    const bool bad_device = random_.Chance(0.05);
    const int device = bad_device ? BadDevice() : RandomDevice();
    const int valid = bad_device ? 0 : device;
    const tidepool_pool_id id = PoolForBegin(valid);
    MRoute route;
    const uint64_t pick = random_.Below(100);
    if (pick < 40) {
      route.kind = TIDEPOOL_ROUTE_CURRENT_THREAD;
      rep_.Begin(step_, absl::StrFormat("tidepool_begin_allocate_current_thread_to_pool(%d, %s)",
                                        device, IdText(id)));
      const tidepool_status status = Call(
          "tidepool_begin_allocate_current_thread_to_pool", bad_device ? DeviceCodes(device) : kOK,
          [&] { return tidepool_begin_allocate_current_thread_to_pool(device, id); });
      if (status == TIDEPOOL_OK) ModelBegin(device, id, route);
      return;
    }
    int kind = TIDEPOOL_ROUTE_CURRENT_THREAD;
    uint64_t value = 0;
    bool bad_filter = false;
    if (pick < 52) {
      kind = TIDEPOOL_ROUTE_CURRENT_THREAD;
    } else if (pick < 64) {
      kind = TIDEPOOL_ROUTE_STREAM;
      route.stream = RandomStream(valid);
      route.stream_capturing = CaptureOf(valid, route.stream) != nullptr;
      value = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(route.stream));
    } else if (pick < 72) {
      kind = TIDEPOOL_ROUTE_CAPTURE;
      std::vector<uint64_t> ids;
      for (const MCapture& capture : captures_) {
        if (capture.device == valid) ids.push_back(capture.id);
      }
      value = !ids.empty() && random_.Chance(0.7) ? random_.Pick(ids) : random_.Between(1, 1000000);
      route.capture_id = value;
    } else if (pick < 82) {
      kind = TIDEPOOL_ROUTE_EVERYONE;
    } else if (pick < 88) {
      const int bad[] = {-1, 4, 9, INT32_MAX, INT32_MIN};
      kind = bad[random_.Below(5)];
      bad_filter = true;
    } else if (pick < 94) {
      kind = random_.Chance(0.5) ? TIDEPOOL_ROUTE_CURRENT_THREAD : TIDEPOOL_ROUTE_EVERYONE;
      value = random_.Between(1, UINT64_MAX);
      bad_filter = true;
    } else if (pick < 97) {
      kind = TIDEPOOL_ROUTE_STREAM;
      value = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ForeignStream(valid)));
      bad_filter = true;
    } else {
      kind = TIDEPOOL_ROUTE_CAPTURE;
      value = 0;
      bad_filter = true;
    }
    route.kind = kind;
    const uint32_t codes = bad_device ? DeviceCodes(device) : bad_filter ? kIA : kOK;
    rep_.Begin(step_, absl::StrFormat("tidepool_begin_allocate_to_pool(%d, %s, kind %d, value %#x)",
                                      device, IdText(id), kind, value));
    const tidepool_status status = Call("tidepool_begin_allocate_to_pool", codes, [&] {
      return tidepool_begin_allocate_to_pool(device, id, kind, value);
    });
    if (status == TIDEPOOL_OK) ModelBegin(device, id, route);
  }

  void OpEnd() {
    const bool bad_device = random_.Chance(0.05);
    int device = bad_device ? BadDevice() : RandomDevice();
    tidepool_pool_id id = kDefaultPool;
    const uint64_t pick = random_.Below(100);
    if (pick < 75 && !routes_.empty() && !bad_device) {
      const MRoute& route = random_.Pick(routes_);
      device = route.device;
      id = route.pool;
    } else if (pick < 90) {
      const std::vector<tidepool_pool_id> known = KnownPools(bad_device ? 0 : device, true);
      id = random_.Pick(known);
    } else {
      id = WeirdId();  // a pool the device never had
    }
    const int target = bad_device ? -1 : EndTarget(device, id, kMainThread);
    const uint32_t codes = bad_device ? DeviceCodes(device) : target >= 0 ? kOK : kFP;
    rep_.Begin(step_, absl::StrFormat("tidepool_end_allocate_to_pool(%d, %s)%s", device, IdText(id),
                                      target >= 0 ? "" : " [no route to end]"));
    const tidepool_status status = Call("tidepool_end_allocate_to_pool", codes,
                                        [&] { return tidepool_end_allocate_to_pool(device, id); });
    if (status == TIDEPOOL_OK) {
      routes_.erase(routes_.begin() + target);
      touched_.insert(KeyOf(device, id));
    }
  }

  void OpRelease() {
    const bool bad_device = random_.Chance(0.05);
    int device = bad_device ? BadDevice() : RandomDevice();
    const int valid = bad_device ? 0 : device;
    tidepool_pool_id id = kDefaultPool;
    std::vector<tidepool_pool_id> releasable;  // references beyond its routes
    std::vector<tidepool_pool_id> held;        // references, all needed by routes
    std::vector<tidepool_pool_id> unheld;
    for (const auto& [key, pool] : pools_) {
      if (key.device != valid || IsDefault(pool.id)) continue;
      if (pool.refs > RoutesTo(valid, pool.id)) {
        releasable.push_back(pool.id);
      } else {
        (pool.refs > 0 ? held : unheld).push_back(pool.id);
      }
    }
    const uint64_t pick = random_.Below(100);
    if (pick < 60 && !releasable.empty()) {
      id = random_.Pick(releasable);
    } else if (pick < 70 && !held.empty()) {
      id = random_.Pick(held);
    } else if (pick < 80 && !unheld.empty()) {
      id = random_.Pick(unheld);
    } else if (pick < 88) {
      id = kDefaultPool;
    } else {
      id = random_.Chance(0.5) ? WeirdId() : tidepool_pool_id{0, last_user_id_ + 1000000};
    }
    const uint32_t codes = ReleaseCodes(device, id);
    rep_.Begin(step_,
               absl::StrFormat(
                   "tidepool_release_pool(%d, %s) [refs %d, routes %d]", device, IdText(id),
                   bad_device || FindPool(device, id) == nullptr ? -1 : FindPool(device, id)->refs,
                   bad_device ? -1 : RoutesTo(device, id)));
    const tidepool_status status =
        Call("tidepool_release_pool", codes, [&] { return tidepool_release_pool(device, id); });
    if (status == TIDEPOOL_OK) ModelReleased(device, id);
  }

  int LiveCallbackPools(int device) const {
    int count = 0;
    for (const auto& [key, pool] : pools_) {
      count += key.device == device && pool.callback != nullptr && pool.refs > 0;
    }
    return count;
  }

  void OpCreateCallbackPool() {
    const uint64_t pick = random_.Below(100);
    int device = RandomDevice();
    const bool may_create = PoolCount(device) < kMaxPoolsPerDevice && LiveCallbackPools(device) < 6;
    tidepool_pool_id id;
    bool null_alloc = false;
    bool null_free = false;
    if (pick < 62 && may_create) {
      id = pick < 54 ? NewUserId() : NewGraphId();
    } else if (pick < 72) {
      id = random_.Pick(KnownPools(device, /*with_default=*/false).empty()
                            ? std::vector<tidepool_pool_id>{kDefaultPool}
                            : KnownPools(device, false));
    } else if (pick < 78) {
      id = kDefaultPool;
    } else if (pick < 84) {
      id = NewUserId();
      null_alloc = true;
    } else if (pick < 90) {
      id = NewUserId();
      null_free = true;
    } else {
      device = BadDevice();
      id = NewUserId();
      null_alloc = random_.Chance(0.3);
    }
    const size_t budgets[] = {0, 4 * kMiB, 8 * kMiB, 24 * kMiB, 64 * kMiB, 96 * kMiB, 96 * kMiB};
    CallbackPool* context = CallbackRegistry::Get().NewPool(DeviceCodes(device) == 0 ? device : 0,
                                                            id, static_cast<int>(random_.Below(3)),
                                                            budgets[random_.Below(7)]);
    uint32_t codes;
    if (null_alloc || null_free || IsDefault(id)) {
      codes = kIA;
    } else if (DeviceCodes(device) != 0) {
      codes = DeviceCodes(device);
    } else if (FindPool(device, id) != nullptr) {
      codes = kFP;
    } else {
      codes = kOK;
    }
    rep_.Begin(step_, absl::StrFormat(
                          "tidepool_create_callback_pool(%d, %s, %s, %s, budget %u MiB, kind %d)",
                          device, IdText(id), null_alloc ? "NULL" : "alloc",
                          null_free ? "NULL" : "free", context->budget / kMiB, context->kind));
    const tidepool_status status = Call("tidepool_create_callback_pool", codes, [&] {
      return tidepool_create_callback_pool(device, id, null_alloc ? nullptr : FuzzAllocSegment,
                                           null_free ? nullptr : FuzzFreeSegment, context);
    });
    if (status != TIDEPOOL_OK) return;
    MPool& pool = EnsurePool(device, id);
    pool.refs = 1;
    pool.callback = context;
    touched_.insert(KeyOf(device, id));
  }

  void OpTrim() {
    const bool bad_device = random_.Chance(0.05);
    const int device = bad_device ? BadDevice() : RandomDevice();
    tidepool_pool_id id;
    const uint64_t pick = random_.Below(100);
    if (pick < 80) {
      id = random_.Pick(KnownPools(bad_device ? 0 : device, /*with_default=*/true));
    } else {
      id = WeirdId();
    }
    uint32_t codes = DeviceCodes(device);
    const MPool* pool = bad_device ? nullptr : FindPool(device, id);
    if (codes == 0) {
      if (pool == nullptr) {
        codes = kNF;
      } else if (id.first != 0 && pool->refs > 0) {
        codes = kFP;  // a graph pool something holds
      } else if (CapturesOn(device) > 0) {
        codes = kFP;
      } else {
        codes = kOK;
      }
    }
    rep_.Begin(step_, absl::StrFormat("tidepool_trim_pool(%d, %s)", device, IdText(id)));
    const tidepool_status status =
        Call("tidepool_trim_pool", codes, [&] { return tidepool_trim_pool(device, id); });
    if (status == TIDEPOOL_OK) {
      touched_.insert(KeyOf(device, id));
      CheckHoldsOnlyLive(*pool, "trim");
    }
  }

  // tidepool_stats_json and tidepool_snapshot_json with every kind of buffer.
  void OpJson() {
    const bool snapshot = random_.Chance(0.4);
    const char* function = snapshot ? "tidepool_snapshot_json" : "tidepool_stats_json";
    auto* call = snapshot ? tidepool_snapshot_json : tidepool_stats_json;
    const bool bad_device = random_.Chance(0.05);
    const int device = bad_device ? BadDevice() : RandomDevice();
    const int valid = bad_device ? 0 : device;
    tidepool_pool_id id{};
    const tidepool_pool_id* pool = nullptr;
    const uint64_t pick = random_.Below(100);
    if (pick < 45) {
      pool = nullptr;
    } else if (pick < 90) {
      id = random_.Pick(KnownPools(valid, /*with_default=*/true));
      pool = &id;
    } else {
      id = WeirdId();
      pool = &id;
    }
    uint32_t refusal = DeviceCodes(device);
    if (refusal == 0 && pool != nullptr && FindPool(device, *pool) == nullptr) refusal = kNF;
    std::string text;
    size_t size = 0;  // the text's size with its NUL, when it can be read
    if (refusal == 0) {
      if (ReadJson(snapshot, device, pool, &text) != TIDEPOOL_OK) {
        rep_.Fail(absl::StrCat("reading JSON failed: ", tidepool_last_error()));
      }
      size = text.size() + 1;
    }
    const std::string what =
        absl::StrFormat("%s(%d, %s, ", function, device, pool == nullptr ? "NULL" : IdText(*pool));
    size_t needed = 777777;
    const uint64_t variant = random_.Below(5);
    auto check_needed = [&](const char* after) {
      if (refusal == 0 && needed != size) {
        rep_.Fail(
            absl::StrFormat("%s: *needed is %u, the text takes %u bytes", after, needed, size));
      }
    };
    switch (variant) {
      case 0:
        rep_.Begin(step_, what + "NULL, 0, &needed)");
        Call(
            function, refusal != 0 ? refusal : kOK,
            [&] { return call(device, pool, nullptr, 0, &needed); }, Compare::kFull, true);
        if (refusal == 0) check_needed("a size query");
        return;
      case 1:
        rep_.Begin(step_, what + "NULL, 0, NULL)");
        Call(
            function, refusal != 0 ? refusal : kOK,
            [&] { return call(device, pool, nullptr, 0, nullptr); }, Compare::kFull, true);
        return;
      case 2: {
        const size_t capacity = random_.Between(1, 100);
        rep_.Begin(step_, what + absl::StrFormat("NULL, %u, &needed)", capacity));
        Call(function, refusal != 0 ? refusal : kIA,
             [&] { return call(device, pool, nullptr, capacity, &needed); });
        if (refusal == 0) check_needed("a NULL buffer with a capacity");
        return;
      }
      case 3: {
        const size_t capacity = refusal == 0 ? random_.Below(size) : 8;
        std::string buffer(capacity + 8, '#');
        rep_.Begin(step_, what + absl::StrFormat("buffer, %u, &needed) [too small]", capacity));
        Call(function, refusal != 0 ? refusal : kIA,
             [&] { return call(device, pool, &buffer[0], capacity, &needed); });
        if (buffer != std::string(capacity + 8, '#')) {
          rep_.Fail("a buffer too small was written to");
        }
        if (refusal == 0) check_needed("a buffer too small");
        return;
      }
      default: {
        const size_t capacity = size + random_.Below(64) + (refusal == 0 ? 0 : 4096);
        std::string buffer(capacity, '#');
        rep_.Begin(step_, what + absl::StrFormat("buffer, %u, &needed)", capacity));
        const tidepool_status status = Call(
            function, refusal != 0 ? refusal : kOK,
            [&] { return call(device, pool, &buffer[0], capacity, &needed); }, Compare::kFull,
            true);
        if (status != TIDEPOOL_OK) return;
        check_needed("a read");
        if (std::strlen(buffer.c_str()) + 1 != needed || buffer.substr(0, size - 1) != text) {
          rep_.Fail(absl::StrCat("the text read differs from the one read just before: ",
                                 buffer.substr(0, 200)));
        }
        if (text.empty() || text.front() != '{' || text.back() != '}') {
          rep_.Fail(absl::StrCat("not a JSON object: ", text.substr(0, 200)));
        }
        if (!snapshot) {
          Stats stats;
          if (!ParseStats(text, &stats)) rep_.Fail(absl::StrCat("unparsable statistics: ", text));
          int64_t requested = 0;
          int64_t allocated = 0;
          int64_t active = 0;
          for (const auto& [address, block] : live_) {
            if (block.device != device || (pool != nullptr && !SamePool(block.pool, *pool)))
              continue;
            requested += block.requested;
            allocated += block.size;
            ++active;
          }
          if (stats.requested != requested || stats.allocated != allocated ||
              stats.active != active) {
            rep_.Fail(absl::StrFormat(
                "statistics say requested %d allocated %d active %d; the model %d %d %d",
                stats.requested, stats.allocated, stats.active, requested, allocated, active));
          }
        } else if (!StartsWith(text, absl::StrFormat("{\"device\":%d,", device))) {
          rep_.Fail(absl::StrCat("a snapshot of device ", device, " reads ", text.substr(0, 100)));
        }
        return;
      }
    }
  }

  // --- Operations: captures and graphs ---------------------------------------------------------

  void OpCaptureBegin() {
    const bool bad_device = random_.Chance(0.04);
    const int device = bad_device ? BadDevice() : RandomDevice();
    const int valid = bad_device ? 0 : device;
    // The stream: one of the device's own (unless it captures already), NULL, or a foreign one.
    void* stream = nullptr;
    const uint64_t stream_pick = random_.Below(100);
    if (stream_pick < 72) {
      stream = w_.streams[valid][random_.Below(2)];
    } else if (stream_pick < 86) {
      stream = nullptr;
    } else {
      stream = ForeignStream(valid);
    }
    const bool good_mode = random_.Chance(0.92);
    const int bad_modes[] = {-1, 3, 7, INT32_MAX};
    const int mode = good_mode ? static_cast<int>(random_.Below(3)) : bad_modes[random_.Below(4)];
    // The pool to share, if any.
    tidepool_pool_id share{};
    const tidepool_pool_id* share_pool = nullptr;
    std::vector<tidepool_pool_id> held_graph;
    std::vector<tidepool_pool_id> released_graph;
    for (const auto& [key, pool] : pools_) {
      if (key.device != valid || pool.id.first == 0) continue;
      (pool.refs > 0 ? held_graph : released_graph).push_back(pool.id);
    }
    const uint64_t share_pick = random_.Below(100);
    const bool may_create = PoolCount(valid) < kMaxPoolsPerDevice;
    if (share_pick < 25 && !held_graph.empty()) {
      share = random_.Pick(held_graph);
      share_pool = &share;
    } else if (share_pick < 31) {
      share = kDefaultPool;
      share_pool = &share;
    } else if (share_pick < 37) {
      share = random_.Chance(0.5) ? NewUserId() : tidepool_pool_id{0, 1};
      share_pool = &share;
    } else if (share_pick < 43) {
      share = NewGraphId();
      share_pool = &share;
    } else if (share_pick < 50 && !released_graph.empty()) {
      share = random_.Pick(released_graph);
      share_pool = &share;
    } else if (!may_create) {
      if (held_graph.empty()) {
        share = kDefaultPool;
      } else {
        share = random_.Pick(held_graph);
      }
      share_pool = &share;
    }
    const bool null_out = random_.Chance(0.03);
    // The code, in the order tidepool checks: arguments, device, stream, shared pool.
    uint32_t codes = kOK;
    Compare compare = Compare::kFull;
    const MPool* shared = share_pool == nullptr || bad_device ? nullptr : FindPool(device, share);
    if (null_out || !good_mode || (share_pool != nullptr && IsDefault(share))) {
      codes = kIA;
    } else if (bad_device) {
      codes = DeviceCodes(device);
    } else if (share_pool != nullptr && share.first == 0) {
      codes = kIA;
    } else if (stream == nullptr || !StreamOf(device, stream) ||
               CaptureOf(device, stream) != nullptr) {
      codes = kDriverRefusal;
    } else if (share_pool != nullptr && shared == nullptr) {
      codes = kNF;
    } else if (share_pool != nullptr && shared->refs == 0) {
      codes = kFP;
    }
    tidepool_capture* capture = reinterpret_cast<tidepool_capture*>(kSentinel);
    rep_.Begin(step_,
               absl::StrFormat("tidepool_capture_begin(%d, %s, %s, mode %d, %s)", device,
                               StreamName(stream), share_pool == nullptr ? "NULL" : IdText(share),
                               mode, null_out ? "NULL" : "&capture"));
    const tidepool_status status = Call(
        "tidepool_capture_begin", codes,
        [&] {
          return tidepool_capture_begin(device, stream, share_pool, mode,
                                        null_out ? nullptr : &capture);
        },
        compare);
    if (status != TIDEPOOL_OK) {
      if (!null_out && capture != nullptr) {
        rep_.Fail(absl::StrFormat("a failed tidepool_capture_begin stored %p",
                                  static_cast<void*>(capture)));
      }
      return;
    }
    if (capture == nullptr || capture == reinterpret_cast<tidepool_capture*>(kSentinel)) {
      rep_.Fail("tidepool_capture_begin returned OK without a capture");
    }
    tidepool_pool_id pool{};
    Call("tidepool_capture_pool", kOK, [&] { return tidepool_capture_pool(capture, &pool); });
    if (share_pool != nullptr
            ? !SamePool(pool, share)
            : pool.first == 0 || pool.second != 0 || FindPool(device, pool) != nullptr) {
      rep_.Fail(absl::StrFormat("the capture's pool is %s", IdText(pool)));
    }
    absl::StatusOr<CaptureInfo> info = w_.sims[device]->GetCaptureInfo(stream);
    if (!info.ok() || !info->capturing || info->capture_id == 0) {
      rep_.Fail("the stream is not capturing after tidepool_capture_begin");
    }
    MCapture made;
    made.handle = capture;
    made.device = device;
    made.stream = stream;
    made.id = info->capture_id;
    made.began_seq = next_seq_;
    made.pool = pool;
    MRoute route;
    route.kind = TIDEPOOL_ROUTE_CAPTURE;
    route.capture_id = made.id;
    ModelBegin(device, pool, route);
    captures_.push_back(made);
  }

  // What a capture's End or Abandon does to routes before the pool reference: ends the capture's
  // route, or, when someone ended it by hand, the route this thread began to the pool since (the
  // capture's route resumed: graph/capture.h), dropping that route's reference.
  void ModelFinish(const MCapture& capture) {
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      const MRoute& route = routes_[i];
      if (route.device == capture.device && route.kind == TIDEPOOL_ROUTE_CAPTURE &&
          route.capture_id == capture.id && SamePool(route.pool, capture.pool)) {
        routes_.erase(routes_.begin() + i);
        return;
      }
    }
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      const MRoute& route = routes_[i];
      if (route.device == capture.device && route.kind == TIDEPOOL_ROUTE_CURRENT_THREAD &&
          route.thread == kMainThread && SamePool(route.pool, capture.pool) &&
          route.seq >= capture.began_seq) {
        routes_.erase(routes_.begin() + i);
        if (!IsDefault(capture.pool)) --FindPool(capture.device, capture.pool)->refs;
        return;
      }
    }
  }

  // Ends, abandons or ends without a graph to store one capture; `how`: 0 end, 1 end with NULL
  // graph, 2 abandon.
  void FinishCapture(size_t index, int how) {
    const MCapture capture = captures_[index];
    const char* function = how == 2 ? "tidepool_capture_abandon" : "tidepool_capture_end";
    rep_.Begin(step_,
               absl::StrFormat("%s(capture %u on device %d, %s, pool %s%s)%s", function, capture.id,
                               capture.device, StreamName(capture.stream), IdText(capture.pool),
                               capture.invalidated ? ", invalidated" : "",
                               how == 1 ? " with NULL graph" : ""));
    // The code: abandon says whether dropping the reference worked; end fails for an
    // invalidated capture (the driver's error) and for a NULL graph.
    captures_.erase(captures_.begin() + index);
    ModelFinish(capture);
    uint32_t codes;
    if (how == 2) {
      codes = ReleaseCodes(capture.device, capture.pool);
    } else if (how == 1) {
      codes = kIA;
    } else {
      codes = capture.invalidated ? (kAnyError & ~kOOM & ~kNF) : kOK;
    }
    tidepool_graph* graph = reinterpret_cast<tidepool_graph*>(kSentinel);
    const tidepool_status status = Call(
        function, codes,
        [&] {
          if (how == 2) return tidepool_capture_abandon(capture.handle);
          return tidepool_capture_end(capture.handle, how == 1 ? nullptr : &graph);
        },
        Compare::kNone);
    touched_.insert(KeyOf(capture.device, capture.pool));
    if (how == 0 && status == TIDEPOOL_OK) {
      if (graph == nullptr || graph == reinterpret_cast<tidepool_graph*>(kSentinel)) {
        rep_.Fail("tidepool_capture_end returned OK without a graph");
      }
      graphs_.push_back(MGraph{graph, capture.device, capture.pool});
      tidepool_pool_id pool{};
      Call(
          "tidepool_graph_pool", kOK, [&] { return tidepool_graph_pool(graph, &pool); },
          Compare::kFull, true);
      if (!SamePool(pool, capture.pool)) rep_.Fail("the graph's pool is not the capture's");
      return;
    }
    if (how == 0 && graph != nullptr) rep_.Fail("a failed tidepool_capture_end stored a graph");
    // A failed end and an abandon drop the capture's reference (an end ignores whether that
    // worked; an abandon's code said).
    if (how != 2 ? ReleaseCodes(capture.device, capture.pool) == kOK : status == TIDEPOOL_OK) {
      ModelReleased(capture.device, capture.pool);
    }
  }

  void OpCaptureEnd() {
    const uint64_t pick = random_.Below(100);
    if (pick < 90) {
      FinishCapture(random_.Below(captures_.size()), pick < 55 ? 0 : pick < 68 ? 1 : 2);
      return;
    }
    tidepool_graph* graph = reinterpret_cast<tidepool_graph*>(kSentinel);
    tidepool_pool_id pool{};
    switch (random_.Below(5)) {
      case 0:
        rep_.Begin(step_, "tidepool_capture_end(NULL, &graph)");
        Call("tidepool_capture_end", kIA, [&] { return tidepool_capture_end(nullptr, &graph); });
        if (graph != nullptr) rep_.Fail("tidepool_capture_end(NULL, &graph) left the graph set");
        return;
      case 1:
        rep_.Begin(step_, "tidepool_capture_end(NULL, NULL)");
        Call("tidepool_capture_end", kIA, [] { return tidepool_capture_end(nullptr, nullptr); });
        return;
      case 2:
        rep_.Begin(step_, "tidepool_capture_abandon(NULL)");
        Call("tidepool_capture_abandon", kIA, [] { return tidepool_capture_abandon(nullptr); });
        return;
      case 3:
        rep_.Begin(step_, "tidepool_capture_pool(NULL, &pool)");
        Call("tidepool_capture_pool", kIA, [&] { return tidepool_capture_pool(nullptr, &pool); });
        return;
      default: {
        const MCapture& capture = random_.Pick(captures_);
        const bool null_pool = random_.Chance(0.5);
        rep_.Begin(step_, absl::StrFormat("tidepool_capture_pool(capture %u, %s)", capture.id,
                                          null_pool ? "NULL" : "&pool"));
        Call(
            "tidepool_capture_pool", null_pool ? kIA : kOK,
            [&] { return tidepool_capture_pool(capture.handle, null_pool ? nullptr : &pool); },
            Compare::kFull, true);
        if (!null_pool && !SamePool(pool, capture.pool))
          rep_.Fail("tidepool_capture_pool is wrong");
        return;
      }
    }
  }

  void DestroyGraph(size_t index) {
    const MGraph graph = graphs_[index];
    graphs_.erase(graphs_.begin() + index);
    const uint32_t codes = ReleaseCodes(graph.device, graph.pool);
    rep_.Begin(step_, absl::StrFormat("tidepool_graph_destroy(graph of pool %s on device %d)",
                                      IdText(graph.pool), graph.device));
    const tidepool_status status = Call(
        "tidepool_graph_destroy", codes, [&] { return tidepool_graph_destroy(graph.handle); },
        Compare::kNone);
    if (status == TIDEPOOL_OK) ModelReleased(graph.device, graph.pool);
  }

  void OpGraph() {
    const size_t index = random_.Below(graphs_.size());
    const MGraph graph = graphs_[index];
    const uint64_t pick = random_.Below(100);
    tidepool_pool_id pool{};
    if (pick < 35) {
      void* stream = RandomStream(graph.device);
      rep_.Begin(step_, absl::StrFormat("tidepool_graph_launch(graph of %s, %s)",
                                        IdText(graph.pool), StreamName(stream)));
      Call("tidepool_graph_launch", kOK,
           [&] { return tidepool_graph_launch(graph.handle, stream); });
    } else if (pick < 45) {
      void* stream = ForeignStream(graph.device);
      rep_.Begin(step_, absl::StrFormat("tidepool_graph_launch(graph of %s, %s) [unknown stream]",
                                        IdText(graph.pool), StreamName(stream)));
      Call("tidepool_graph_launch", kIA,
           [&] { return tidepool_graph_launch(graph.handle, stream); });
    } else if (pick < 55) {
      rep_.Begin(step_,
                 absl::StrFormat("tidepool_graph_pool(graph of %s, &pool)", IdText(graph.pool)));
      Call(
          "tidepool_graph_pool", kOK, [&] { return tidepool_graph_pool(graph.handle, &pool); },
          Compare::kFull, true);
      if (!SamePool(pool, graph.pool)) rep_.Fail("tidepool_graph_pool is wrong");
    } else if (pick < 70) {
      switch (random_.Below(4)) {
        case 0:
          rep_.Begin(step_, "tidepool_graph_pool(graph, NULL)");
          Call("tidepool_graph_pool", kIA,
               [&] { return tidepool_graph_pool(graph.handle, nullptr); });
          break;
        case 1:
          rep_.Begin(step_, "tidepool_graph_pool(NULL, &pool)");
          Call("tidepool_graph_pool", kIA, [&] { return tidepool_graph_pool(nullptr, &pool); });
          break;
        case 2:
          rep_.Begin(step_, "tidepool_graph_launch(NULL, NULL)");
          Call("tidepool_graph_launch", kIA,
               [] { return tidepool_graph_launch(nullptr, nullptr); });
          break;
        default:
          rep_.Begin(step_, "tidepool_graph_destroy(NULL)");
          Call(
              "tidepool_graph_destroy", kOK, [] { return tidepool_graph_destroy(nullptr); },
              Compare::kFull, true);
          break;
      }
    } else {
      DestroyGraph(index);
    }
  }

  void OpGraphPoolCreate() {
    const uint64_t pick = random_.Below(100);
    tidepool_pool_id pool{7, 7};
    if (pick < 10) {
      const int device = RandomDevice();
      rep_.Begin(step_, absl::StrFormat("tidepool_graph_pool_create(%d, NULL)", device));
      Call("tidepool_graph_pool_create", kIA,
           [&] { return tidepool_graph_pool_create(device, nullptr); });
      return;
    }
    const int device = pick < 18 ? BadDevice() : RandomDevice();
    if (DeviceCodes(device) == 0 && PoolCount(device) >= kMaxPoolsPerDevice) return;
    rep_.Begin(step_, absl::StrFormat("tidepool_graph_pool_create(%d, &pool)", device));
    const tidepool_status status =
        Call("tidepool_graph_pool_create", DeviceCodes(device) != 0 ? DeviceCodes(device) : kOK,
             [&] { return tidepool_graph_pool_create(device, &pool); });
    if (status != TIDEPOOL_OK) return;
    if (pool.first == 0 || pool.second != 0 || pool.first <= last_graph_id_ ||
        FindPool(device, pool) != nullptr) {
      rep_.Fail(absl::StrFormat("tidepool_graph_pool_create made %s", IdText(pool)));
    }
    last_graph_id_ = pool.first;
    EnsurePool(device, pool).refs = 1;
    touched_.insert(KeyOf(device, pool));
  }

  // An illegal call during capture, as the driver sees it (the C API cannot make one).
  void OpInvalidateCapture() {
    MCapture& capture = captures_[random_.Below(captures_.size())];
    rep_.Begin(step_, absl::StrFormat("(driver) invalidate capture %u on device %d", capture.id,
                                      capture.device));
    w_.sims[capture.device]->InvalidateCapture(capture.stream);
    capture.invalidated = true;
  }

  // --- Operations: threads ---------------------------------------------------------------------

  // A helper thread routes itself to a pool, allocates, fails a call, and (while the main thread
  // checks that none of it shows on its side) waits; then it may end one route, may free a block
  // from a thread_local destructor, and exits with its other routes open (docs/pools.md rule 10).
  void OpHelperThread() {
    const int device = RandomDevice();
    std::vector<tidepool_pool_id> candidates = KnownPools(device, /*with_default=*/true);
    tidepool_pool_id id = random_.Pick(candidates);
    if (random_.Chance(0.25) && PoolCount(device) < kMaxPoolsPerDevice) id = NewUserId();
    const int begins = static_cast<int>(random_.Between(1, 2));
    std::vector<size_t> sizes(random_.Below(4));
    for (size_t& size : sizes) size = random_.Between(1, 64 * 1024);
    void* stream = random_.Chance(0.5) ? nullptr : w_.streams[device][0];
    const bool end_one = random_.Chance(0.4);
    const bool free_at_exit = !sizes.empty() && random_.Chance(0.5);
    const MPool* existing = FindPool(device, id);
    MPool probe = existing != nullptr ? *existing : MPool{device, id, 0, nullptr};
    const bool may_oom = OomAllowed(device, probe, 3 * w_.granularity);
    rep_.Begin(step_, absl::StrFormat(
                          "helper thread: %d begin(s) to %s on device %d, %u malloc(s) on %s%s%s%s",
                          begins, IdText(id), device, sizes.size(), StreamName(stream),
                          end_one ? ", ends one route" : "",
                          free_at_exit ? ", frees a block from a thread_local destructor" : "",
                          may_oom ? " [may run out]" : ""));
    const int64_t epoch = StatsAtStepStart(device).segments_removed;
    const int64_t routes_before = RoutesTo(device, id);
    const std::string main_error = tidepool_last_error();

    struct Allocation {
      tidepool_status status = TIDEPOOL_INTERNAL;
      void* ptr = kSentinel;
      int64_t block_size = -1;
      tidepool_status pool_of = TIDEPOOL_INTERNAL;
      int device = -1;
      tidepool_pool_id pool{};
      bool in_callback_segment = false;
    };
    const CallbackPool* helper_callback = nullptr;  // of the pool the helper's blocks go to
    std::vector<tidepool_status> begun(begins, TIDEPOOL_INTERNAL);
    std::vector<Allocation> allocations(sizes.size());
    tidepool_status foreign_free = TIDEPOOL_OK;
    std::string foreign_message;
    tidepool_status ended = TIDEPOOL_OK;
    std::atomic<int> exit_free{-1};
    std::mutex mu;
    std::condition_variable cv;
    int phase = 0;
    int g_static_local = 0;
    {
      const MPool* target_pool = FindPool(device, id);
      helper_callback = target_pool == nullptr ? nullptr : target_pool->callback;
    }
    std::thread helper([&] {
      for (int i = 0; i < begins; ++i) {
        begun[i] = tidepool_begin_allocate_current_thread_to_pool(device, id);
      }
      for (size_t i = 0; i < sizes.size(); ++i) {
        Allocation& allocation = allocations[i];
        std::string before;
        std::string after;
        ReadJson(false, device, &id, &before);
        allocation.status = tidepool_malloc(&allocation.ptr, sizes[i], device, stream);
        ReadJson(false, device, &id, &after);
        allocation.block_size = JsonNumber(after, "allocated_bytes", "current") -
                                JsonNumber(before, "allocated_bytes", "current");
        if (allocation.status == TIDEPOOL_OK) {
          allocation.pool_of =
              tidepool_pool_of(allocation.ptr, &allocation.device, &allocation.pool);
          allocation.in_callback_segment =
              helper_callback == nullptr ||
              CallbackRegistry::Get().Holds(
                  helper_callback, reinterpret_cast<uintptr_t>(allocation.ptr), Round512(sizes[i]));
        }
      }
      foreign_free = tidepool_free(&g_static_local);
      foreign_message = tidepool_last_error();
      {
        std::unique_lock<std::mutex> lock(mu);
        phase = 1;
        cv.notify_all();
        cv.wait(lock, [&] { return phase == 2; });
      }
      if (end_one) ended = tidepool_end_allocate_to_pool(device, id);
      if (free_at_exit && allocations[0].status == TIDEPOOL_OK) {
        free_at_thread_exit.ptr = allocations[0].ptr;
        free_at_thread_exit.status = &exit_free;
      }
    });
    // While the helper's routes are open: they show in the pool, never in this thread's routing.
    std::string problem;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return phase == 1; });
    }
    int64_t begun_ok = 0;
    for (tidepool_status status : begun) begun_ok += status == TIDEPOOL_OK;
    absl::StatusOr<PoolInfo> info = w_.managers[device]->Info(ToPoolId(id));
    if (!info.ok() || info->routes != routes_before + begun_ok) {
      problem =
          absl::StrFormat("while the helper is routed, pool %s has %d routes; expected %d",
                          IdText(id), info.ok() ? info->routes : -1, routes_before + begun_ok);
    }
    for (void* mine : {static_cast<void*>(nullptr), w_.streams[device][0]}) {
      const std::string route = RouteText(device, mine);
      const std::string expected = ToPoolId(Choose(device, mine, kMainThread)).ToString();
      if (problem.empty() && route != expected) {
        problem = absl::StrCat("the helper's routes changed the main thread's route on ",
                               StreamName(mine), ": ", route, " where the model has ", expected);
      }
    }
    if (problem.empty() && main_error != tidepool_last_error()) {
      problem = "the helper's failed call changed the main thread's tidepool_last_error";
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      phase = 2;
      cv.notify_all();
    }
    helper.join();
    if (!problem.empty()) rep_.Fail(problem);

    // The model: the helper's routes, blocks, end, exit free and thread exit.
    for (tidepool_status status : begun) {
      if (status != TIDEPOOL_OK)
        rep_.Fail(absl::StrCat("the helper's begin -> ", CodeName(status)));
      MRoute route;
      route.kind = TIDEPOOL_ROUTE_CURRENT_THREAD;
      route.thread = kHelperThread;
      ModelBegin(device, id, route);
    }
    const tidepool_pool_id target = Choose(device, stream, kHelperThread);
    const MPool& pool = *FindPool(device, target);
    for (size_t i = 0; i < sizes.size(); ++i) {
      const Allocation& allocation = allocations[i];
      if (allocation.status == TIDEPOOL_OUT_OF_MEMORY && may_oom) continue;
      if (allocation.status != TIDEPOOL_OK) {
        rep_.Fail(absl::StrFormat("the helper's malloc of %u bytes -> %s", sizes[i],
                                  CodeName(allocation.status)));
      }
      const size_t rounded = Round512(sizes[i]);
      if (allocation.pool_of != TIDEPOOL_OK || allocation.device != device ||
          !SamePool(allocation.pool, target) ||
          allocation.block_size != static_cast<int64_t>(rounded)) {
        rep_.Fail(absl::StrFormat(
            "the helper's block %p of %u bytes: pool_of -> %s, device %d, pool %s (expected %s); "
            "block of %d bytes (expected %u)",
            allocation.ptr, sizes[i], CodeName(allocation.pool_of), allocation.device,
            IdText(allocation.pool), IdText(target), allocation.block_size, rounded));
      }
      InsertBlock(MBlock{0, reinterpret_cast<uintptr_t>(allocation.ptr), rounded, sizes[i], device,
                         target, stream, pool.callback});
      if (!allocation.in_callback_segment || pool.callback != helper_callback) {
        rep_.Fail("the helper's block is not in its callback pool's segments");
      }
    }
    if (foreign_free != TIDEPOOL_INVALID_ARGUMENT ||
        !StartsWith(foreign_message, "tidepool_free: ")) {
      rep_.Fail(absl::StrFormat("the helper's foreign free -> %s \"%s\"", CodeName(foreign_free),
                                foreign_message));
    }
    if (end_one) {
      const int index = EndTarget(device, id, kHelperThread);
      if (ended != TIDEPOOL_OK || index < 0) {
        rep_.Fail(absl::StrCat("the helper's end -> ", CodeName(ended)));
      }
      routes_.erase(routes_.begin() + index);
    }
    if (free_at_exit && allocations[0].status == TIDEPOOL_OK) {
      if (exit_free.load() != TIDEPOOL_OK) {
        rep_.Fail(absl::StrCat("a free from a thread_local destructor at thread exit -> ",
                               exit_free.load()));
      }
      RemoveBlock(reinterpret_cast<uintptr_t>(allocations[0].ptr), epoch);
    }
    // Thread exit: each route left open is ended and its reference dropped, oldest first.
    for (size_t i = 0; i < routes_.size();) {
      if (routes_[i].kind == TIDEPOOL_ROUTE_CURRENT_THREAD && routes_[i].thread == kHelperThread) {
        MPool& routed = *FindPool(routes_[i].device, routes_[i].pool);
        routes_.erase(routes_.begin() + i);
        if (!IsDefault(routed.id) && routed.refs > 0) {
          --routed.refs;
          if (routed.refs == 0 && CapturesOn(device) == 0)
            CheckHoldsOnlyLive(routed, "thread exit");
        }
      } else {
        ++i;
      }
    }
    touched_.insert(KeyOf(device, id));
  }

  // --- Operations: the rest --------------------------------------------------------------------

  void OpMisc() {
    switch (random_.Below(7)) {
      case 0: {
        int count = -1;
        rep_.Begin(step_, "tidepool_device_count(&count)");
        Call(
            "tidepool_device_count", kOK, [&] { return tidepool_device_count(&count); },
            Compare::kFull, true);
        if (count != w_.devices) rep_.Fail(absl::StrCat("tidepool_device_count said ", count));
        return;
      }
      case 1:
        rep_.Begin(step_, "tidepool_device_count(NULL)");
        Call("tidepool_device_count", kIA, [] { return tidepool_device_count(nullptr); });
        return;
      case 2: {
        rep_.Begin(step_, "tidepool_api_version, tidepool_status_name, tidepool_last_error");
        const std::string error = tidepool_last_error();
        if (tidepool_api_version() != TIDEPOOL_API_VERSION) rep_.Fail("tidepool_api_version");
        const int code = static_cast<int>(random_.Below(9));
        const char* name = tidepool_status_name(static_cast<tidepool_status>(code));
        if (name == nullptr || (code == 8) != (std::string(name) == "unknown tidepool_status")) {
          rep_.Fail(absl::StrCat("tidepool_status_name(", code, ")"));
        }
        if (error != tidepool_last_error()) rep_.Fail("reading names changed the last error");
        return;
      }
      case 3:
        rep_.Begin(step_, "tidepool_init_simulated(devices, 256 MiB) [runtime exists]");
        Call("tidepool_init_simulated", kFP,
             [&] { return tidepool_init_simulated(w_.devices, 256 * kMiB); });
        return;
      case 4:
        rep_.Begin(step_, "tidepool_init_simulated(0, 256 MiB)");
        Call("tidepool_init_simulated", kIA, [] { return tidepool_init_simulated(0, 256 * kMiB); });
        return;
      case 5:
        rep_.Begin(step_, "tidepool_init_simulated(2, 0)");
        Call("tidepool_init_simulated", kIA, [] { return tidepool_init_simulated(2, 0); });
        return;
      default: {
        // A malloc on every stream of a random device (routing coverage).
        const int device = RandomDevice();
        DoMalloc(device, w_.streams[device][random_.Below(2)], random_.Between(1, 8192));
        return;
      }
    }
  }

  // --- Invariants ------------------------------------------------------------------------------

  struct Sums {
    int64_t requested = 0;
    int64_t allocated = 0;
    int64_t active = 0;
  };

  // The model's sums of live blocks per device and per pool; and which pools are gone now (a pool
  // is gone once it has no reference, no block and no capture under way on its device, and stays
  // gone until begun again: so this runs after every step, checked or not).
  void SumLiveAndMarkGone(std::vector<Sums>* by_device, std::map<Key, Sums>* by_pool) {
    by_device->assign(w_.devices, Sums{});
    by_pool->clear();
    for (const auto& [address, block] : live_) {
      for (Sums* sums :
           {&(*by_device)[block.device], &(*by_pool)[KeyOf(block.device, block.pool)]}) {
        sums->requested += block.requested;
        sums->allocated += block.size;
        ++sums->active;
      }
    }
    for (auto& [key, pool] : pools_) {
      auto sums = by_pool->find(key);
      const int64_t active = sums == by_pool->end() ? 0 : sums->second.active;
      if (pool.refs > 0 || active > 0) {
        pool.gone = false;  // begun again (a block can come only from a pool that is not gone)
      } else if (!IsDefault(pool.id) && CapturesOn(key.device) == 0) {
        pool.gone = true;
      }
    }
  }

  void CheckInvariants(bool all_pools) {
    for (const std::string& violation : CallbackRegistry::Get().TakeViolations()) {
      rep_.Fail(absl::StrCat("segment callback contract: ", violation));
    }
    std::vector<Sums> by_device;
    std::map<Key, Sums> by_pool;
    SumLiveAndMarkGone(&by_device, &by_pool);
    std::vector<size_t> callback_bytes(w_.devices, 0);
    for (int device = 0; device < w_.devices; ++device) {
      const Stats stats = ReadStats(device, nullptr);
      const Sums& sums = by_device[device];
      if (stats.requested != sums.requested || stats.allocated != sums.allocated ||
          stats.active != sums.active) {
        rep_.Fail(absl::StrFormat(
            "device %d's statistics say requested %d, allocated %d, active %d; the model's "
            "live blocks %d, %d, %d",
            device, stats.requested, stats.allocated, stats.active, sums.requested, sums.allocated,
            sums.active));
      }
      if (stats.reserved < stats.allocated || stats.allocated < stats.requested) {
        rep_.Fail(absl::StrFormat("device %d: reserved %d < allocated %d, or < requested %d",
                                  device, stats.reserved, stats.allocated, stats.requested));
      }
      SimulatedDevice& sim = *w_.sims[device];
      if (w_.managers[device]->allocator()->captures_underway() != CapturesOn(device)) {
        rep_.Fail(absl::StrFormat("device %d has %d captures underway; the model %d", device,
                                  w_.managers[device]->allocator()->captures_underway(),
                                  CapturesOn(device)));
      }
      int64_t graphs = 0;
      for (const MGraph& graph : graphs_) graphs += graph.device == device;
      if (sim.live_graphs() != graphs) {
        rep_.Fail(absl::StrFormat("device %d holds %d graphs; the model %d", device,
                                  sim.live_graphs(), graphs));
      }
      if (sim.capture_violations() != 0 || sim.destroyed_stream_uses() != 0) {
        rep_.Fail(absl::StrFormat("device %d saw %d capture violations, %d destroyed stream uses",
                                  device, sim.capture_violations(), sim.destroyed_stream_uses()));
      }
      for (void* stream :
           {static_cast<void*>(nullptr), w_.streams[device][0], w_.streams[device][1]}) {
        const std::string route = RouteText(device, stream);
        const std::string expected = ToPoolId(Choose(device, stream, kMainThread)).ToString();
        if (route != expected) {
          rep_.Fail(absl::StrFormat("device %d routes %s to %s; the model to %s", device,
                                    StreamName(stream), route, expected));
        }
      }
      int64_t pools_reserved = 0;
      bool every_pool = true;
      int index = 0;
      for (auto& [key, pool] : pools_) {
        if (key.device != device) continue;
        ++index;
        const bool check =
            all_pools || touched_.count(key) > 0 || IsDefault(pool.id) || (index + step_) % 7 == 0;
        if (!check) {
          every_pool = false;
          continue;
        }
        const Stats pool_stats = PoolStats(device, pool.id);
        const Sums& pool_sums = by_pool[key];
        if (pool_stats.requested != pool_sums.requested ||
            pool_stats.allocated != pool_sums.allocated || pool_stats.active != pool_sums.active) {
          rep_.Fail(absl::StrFormat(
              "pool %s of device %d: statistics say requested %d, allocated %d, active %d; the "
              "model %d, %d, %d",
              IdText(pool.id), device, pool_stats.requested, pool_stats.allocated,
              pool_stats.active, pool_sums.requested, pool_sums.allocated, pool_sums.active));
        }
        if (pool_stats.reserved < pool_stats.allocated) {
          rep_.Fail(absl::StrFormat("pool %s of device %d reserves %d < allocated %d",
                                    IdText(pool.id), device, pool_stats.reserved,
                                    pool_stats.allocated));
        }
        pools_reserved += pool_stats.reserved;
        if (pool.callback != nullptr) {
          const size_t handed = CallbackRegistry::Get().LiveBytes(pool.callback);
          callback_bytes[device] += handed;
          if (static_cast<size_t>(pool_stats.reserved) != handed) {
            rep_.Fail(absl::StrFormat(
                "callback pool %s of device %d reserves %d bytes; its callbacks handed out %u",
                IdText(pool.id), device, pool_stats.reserved, handed));
          }
        }
        absl::StatusOr<PoolInfo> info = w_.managers[device]->Info(ToPoolId(pool.id));
        if (!info.ok()) rep_.Fail(absl::StrCat("Info of a known pool: ", info.status().ToString()));
        const bool released = !IsDefault(pool.id) && pool.refs == 0;
        const bool gone = pool.gone;
        if (info->references != pool.refs || info->routes != RoutesTo(device, pool.id) ||
            info->live_blocks != pool_sums.active || info->released != released ||
            info->gone != gone) {
          rep_.Fail(absl::StrFormat(
              "pool %s of device %d: references %d, routes %d, live %d, released %d, gone %d; the "
              "model %d, %d, %d, %d, %d",
              IdText(pool.id), device, info->references, info->routes, info->live_blocks,
              info->released, info->gone, pool.refs, RoutesTo(device, pool.id), pool_sums.active,
              released, gone));
        }
        if (gone && pool_stats.reserved != 0) {
          rep_.Fail(absl::StrFormat("pool %s of device %d is gone but reserves %d bytes",
                                    IdText(pool.id), device, pool_stats.reserved));
        }
      }
      if (every_pool) {
        if (pools_reserved != stats.reserved) {
          rep_.Fail(absl::StrFormat("device %d reserves %d bytes; its pools together %d", device,
                                    stats.reserved, pools_reserved));
        }
        if (static_cast<int64_t>(sim.used_bytes()) !=
            stats.reserved - static_cast<int64_t>(callback_bytes[device])) {
          rep_.Fail(absl::StrFormat(
              "simulated device %d holds %u bytes; tidepool reserves %d, %u of them from callbacks",
              device, sim.used_bytes(), stats.reserved, callback_bytes[device]));
        }
      }
      device_stats_[device] = stats;
      stats_fresh_[device] = true;
    }
    // A sample of live blocks are where the model says.
    for (int i = 0; i < 4 && !live_.empty(); ++i) CheckPoolOf(RandomLive()->second);
  }

  // --- The end ---------------------------------------------------------------------------------

  // Ends every capture, destroys every graph, frees every block, ends every route, releases every
  // reference and empties every cache; then every device must hold nothing.
  void Drain() {
    step_ = steps_ + 1;
    while (!captures_.empty()) FinishCapture(captures_.size() - 1, random_.Chance(0.5) ? 0 : 2);
    while (!graphs_.empty()) DestroyGraph(graphs_.size() - 1);
    CheckInvariants(true);
    while (!live_.empty()) {
      const MBlock block = live_.at(live_order_.begin()->second);
      rep_.Begin(step_, absl::StrCat("drain: tidepool_free(", BlockText(block), ")"));
      Call(
          "tidepool_free", kOK,
          [&] { return tidepool_free(reinterpret_cast<void*>(block.address)); }, Compare::kNone);
      RemoveBlock(block.address, StatsAtStepStart(block.device).segments_removed);
    }
    while (!routes_.empty()) {
      const MRoute route = routes_.back();
      const int target = EndTarget(route.device, route.pool, kMainThread);
      rep_.Begin(step_, absl::StrFormat("drain: tidepool_end_allocate_to_pool(%d, %s)",
                                        route.device, IdText(route.pool)));
      Call(
          "tidepool_end_allocate_to_pool", kOK,
          [&] { return tidepool_end_allocate_to_pool(route.device, route.pool); }, Compare::kNone);
      routes_.erase(routes_.begin() + target);
    }
    for (auto& [key, pool] : pools_) {
      while (pool.refs > 0) {
        rep_.Begin(step_, absl::StrFormat("drain: tidepool_release_pool(%d, %s)", key.device,
                                          IdText(pool.id)));
        Call(
            "tidepool_release_pool", kOK,
            [device = key.device, id = pool.id] { return tidepool_release_pool(device, id); },
            Compare::kNone);
        --pool.refs;
      }
    }
    CheckInvariants(true);
    for (int device = 0; device < w_.devices; ++device) {
      rep_.Begin(step_, absl::StrFormat("drain: tidepool_empty_cache(%d)", device));
      Call(
          "tidepool_empty_cache", kOK, [&] { return tidepool_empty_cache(device); },
          Compare::kNone);
    }
    CheckInvariants(true);
    rep_.Begin(step_, "drain: everything went back");
    CheckAllBack(w_, rep_);
  }

 public:
  // Every device holds nothing, and every callback segment went back.
  static void CheckAllBack(World& world, Reporter& reporter) {
    for (int device = 0; device < world.devices; ++device) {
      std::string json;
      Stats stats;
      if (ReadJson(false, device, nullptr, &json) != TIDEPOOL_OK || !ParseStats(json, &stats)) {
        reporter.Fail("statistics unreadable at the end");
      }
      SimulatedDevice& sim = *world.sims[device];
      if (stats.reserved != 0 || stats.allocated != 0 || stats.active != 0 || stats.segments != 0 ||
          sim.used_bytes() != 0 || sim.live_segments() != 0 || sim.live_graphs() != 0 ||
          world.managers[device]->allocator()->captures_underway() != 0) {
        std::string snapshot;
        ReadJson(true, device, nullptr, &snapshot);
        reporter.Fail(absl::StrFormat(
            "after freeing, releasing and emptying everything, device %d reserves %d bytes in %d "
            "segments (allocated %d, active %d); the simulated device holds %u bytes in %d "
            "segments, chunks or ranges, %d graphs. Snapshot: %s",
            device, stats.reserved, stats.segments, stats.allocated, stats.active, sim.used_bytes(),
            sim.live_segments(), sim.live_graphs(), snapshot.substr(0, 2000)));
      }
    }
    const int64_t segments = CallbackRegistry::Get().LiveSegments();
    if (segments != 0) {
      reporter.Fail(absl::StrCat(segments, " callback segments were never given back"));
    }
    for (const std::string& violation : CallbackRegistry::Get().TakeViolations()) {
      reporter.Fail(absl::StrCat("segment callback contract: ", violation));
    }
  }

 private:
  World& w_;
  Random random_;
  Reporter rep_;
  const int64_t steps_;
  int64_t step_ = 0;
  // Whether this step compares whole states (TIDEPOOL_FUZZ_CHECK_EVERY); true outside steps.
  bool compare_states_ = true;
  void* heap_foreign_;
  std::map<uintptr_t, MBlock> live_;
  std::map<uint64_t, uintptr_t> live_order_;     // serial -> address
  std::map<uint64_t, MFreed> freed_;             // serial -> record
  std::multimap<uintptr_t, uint64_t> freed_at_;  // address -> serial, for records not stale
  uint64_t next_serial_ = 1;
  std::map<Key, MPool> pools_;
  std::vector<MRoute> routes_;
  uint64_t next_seq_ = 1;
  std::vector<MCapture> captures_;
  std::vector<MGraph> graphs_;
  std::vector<Stats> device_stats_;  // at the last check
  std::vector<bool> stats_fresh_;     // whether device_stats_ is from the last step
  std::set<Key> touched_;            // pools this step changed
  uint64_t last_user_id_ = 0;
  uint64_t last_graph_id_ = 0;
  uint64_t weird_ids_ = 0;
  std::map<std::string, int64_t> outcomes_;
};

// --- The concurrent fuzzer ------------------------------------------------------------------

// Every thread's live blocks, for overlaps across threads, and a bound on the device memory they
// and the allocations under way hold (for whether an out-of-memory error is allowed): the
// physical allocations (runs) the live blocks touch, as the simulated devices map them, since a
// run goes back to the device only whole.
class GlobalBlocks {
 public:
  explicit GlobalBlocks(const World& world)
      : world_(world),
        pinned_(world.devices),
        pinned_bytes_(world.devices, 0),
        inflight_(world.devices, 0) {}

  // An allocation of up to `need` bytes of device memory is under way; returns its ticket.
  int64_t Begin(int device, size_t need) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t ticket = next_ticket_++;
    inflight_[device] += need;
    tickets_[ticket] = Ticket{device, need, 0};
    Touch(device);
    return ticket;
  }
  // The allocation is over; returns the most memory live blocks and allocations under way held
  // on its device meanwhile (an upper bound of what the device could not give back).
  size_t End(int64_t ticket) {
    std::lock_guard<std::mutex> lock(mu_);
    const Ticket done = tickets_.at(ticket);
    tickets_.erase(ticket);
    inflight_[done.device] -= done.need;
    return done.peak;
  }
  // Lists a new live block; the text of a block it overlaps, or "".
  std::string Insert(uintptr_t address, size_t size, int device, bool device_memory, int thread) {
    std::lock_guard<std::mutex> lock(mu_);
    auto next = live_.lower_bound(address);
    if (next != live_.end() && next->first < address + size) return Describe(*next);
    if (next != live_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second.size > address) return Describe(*prev);
    }
    live_[address] = Listed{size, device, thread};
    if (device_memory) {
      // The block was just allocated: the runs it lies in are mapped, and cannot move while it
      // lives. They are remembered, since after its free they may move at once.
      std::vector<uintptr_t>& runs = block_runs_[{device, address}];
      const size_t g = world_.granularity;
      for (uintptr_t at = address / g * g; at < address + size;) {
        auto [start, bytes] = world_.sims[device]->MappingAt(at);
        if (bytes == 0) start = at, bytes = g;  // unmapped: counted as a granule
        Run& run = pinned_[device][start];
        if (run.blocks++ == 0) {
          run.bytes = bytes;
          pinned_bytes_[device] += bytes;
        }
        runs.push_back(start);
        at = start + bytes;
      }
      Touch(device);
    }
    return "";
  }
  // Before its free: the block is no longer listed (its address may be handed out again).
  void Unlist(uintptr_t address) {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(address);
  }
  // After its free: its runs no longer count.
  void Unpin(uintptr_t address, int device) {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = block_runs_.find({device, address});
    if (found == block_runs_.end()) return;
    for (uintptr_t start : found->second) {
      auto it = pinned_[device].find(start);
      if (it != pinned_[device].end() && --it->second.blocks == 0) {
        pinned_bytes_[device] -= it->second.bytes;
        pinned_[device].erase(it);
      }
    }
    block_runs_.erase(found);
  }
  size_t ListedCount() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_.size();
  }

 private:
  struct Ticket {
    int device;
    size_t need;
    size_t peak;
  };
  struct Listed {
    size_t size;
    int device;
    int thread;
  };
  std::string Describe(const std::pair<const uintptr_t, Listed>& listed) const {
    return absl::StrFormat("%#x (%u bytes, device %d, thread %d)", listed.first, listed.second.size,
                           listed.second.device, listed.second.thread);
  }
  struct Run {
    int64_t blocks = 0;
    size_t bytes = 0;
  };
  void Touch(int device) {
    const size_t load = pinned_bytes_[device] + inflight_[device];
    for (auto& [id, ticket] : tickets_) {
      if (ticket.device == device) ticket.peak = std::max(ticket.peak, load);
    }
  }

  const World& world_;
  std::mutex mu_;
  std::map<uintptr_t, Listed> live_;
  std::vector<std::map<uintptr_t, Run>> pinned_;  // per device: run start -> live blocks on it
  std::vector<size_t> pinned_bytes_;              // per device: the bytes of those runs
  std::map<std::pair<int, uintptr_t>, std::vector<uintptr_t>> block_runs_;  // each block's runs
  std::vector<size_t> inflight_;
  std::map<int64_t, Ticket> tickets_;
  int64_t next_ticket_ = 1;
};

// A barrier for the workers and the main thread.
class Barrier {
 public:
  explicit Barrier(int parties) : parties_(parties) {}
  void ArriveAndWait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t generation = generation_;
    if (++arrived_ == parties_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int parties_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

// What every worker shares.
struct Shared {
  Shared(World& world, int threads)
      : world(world),
        threads(threads),
        blocks(world),
        barrier(threads + 1),
        captures(world.devices),
        capture_attempts(world.devices),
        kept_pools(world.devices) {}

  World& world;
  const int threads;
  GlobalBlocks blocks;
  Barrier barrier;
  // Per device: captures under way (empty_cache and trim may then be refused, out-of-memory
  // recovery does not give the cache back), captures ever begun, and pools with graph ids that
  // may keep free memory (out-of-memory recovery leaves it).
  std::vector<std::atomic<int>> captures;
  std::vector<std::atomic<int64_t>> capture_attempts;
  std::vector<std::atomic<int>> kept_pools;
  // Per device: the pools the main thread made for every thread to share (it holds one reference
  // to each for the whole run): an ordinary pool and a callback pool.
  std::vector<tidepool_pool_id> shared_plain;
  std::vector<tidepool_pool_id> shared_callback;
  std::vector<CallbackPool*> shared_callback_context;
  // The device where threads race: they route everyone's allocations to the race pools (nobody
  // else holds them) and end and release those routes while the others allocate, so an
  // allocation may land in any race pool, or find its pool released (FAILED_PRECONDITION,
  // docs/pools.md rule 9). -1 with one device.
  int race_device = -1;
  std::vector<tidepool_pool_id> race_pools;

  // Every call a worker makes holds this shared; a double free holds it alone. A double free is
  // tried only while no segment of its device went back since the first free (so the address is
  // still its thread's): with the others' calls (any of which may give memory back, and then
  // hand the addresses to another thread) held off, that stays true during the call.
  std::shared_mutex release_guard;

  std::atomic<bool> stop{false};
  std::mutex failure_mu;
  std::string failure;
  void Failed(const std::string& message) {
    std::lock_guard<std::mutex> lock(failure_mu);
    if (failure.empty()) failure = message;
    stop = true;
  }
};

struct WBlock {
  uintptr_t address = 0;
  size_t size = 0;
  size_t requested = 0;
  int device = 0;
  tidepool_pool_id pool{};
  void* stream = nullptr;
  CallbackPool* callback = nullptr;
  // Allocated on this thread's own stream outside the shared callback pool: its address can come
  // back to no other thread, so a double free of it is safe to try.
  bool exclusive = false;
};

struct WPool {
  int device = 0;
  tidepool_pool_id id{};
  bool shared = false;  // one of Shared's pools: `refs` counts this thread's references only
  int64_t refs = 0;
  CallbackPool* callback = nullptr;
  bool kept = false;  // counted in Shared::kept_pools
};

struct WRoute {
  uint64_t seq = 0;
  int device = 0;
  int kind = TIDEPOOL_ROUTE_CURRENT_THREAD;  // or TIDEPOOL_ROUTE_CAPTURE (its capture's)
  uint64_t capture_id = 0;
  tidepool_pool_id pool{};
};

struct WCapture {
  tidepool_capture* handle = nullptr;
  int device = 0;
  uint64_t id = 0;
  uint64_t began_seq = 0;
  tidepool_pool_id pool{};
};

// One thread of the concurrent mode, with its own model: its blocks, pools, routes, captures.
class Worker {
 public:
  Worker(Shared& shared, int index, uint64_t seed, int64_t steps_per_phase, int phases,
         std::vector<void*> streams)
      : s_(shared),
        w_(shared.world),
        index_(index),
        random_(seed),
        rep_("concurrent", shared.world.options.seed, seed, index, steps_per_phase * phases,
             shared.world.options.trace,
             shared.world.options.Reproduce("fuzz: concurrent*") +
                 " (threads interleave differently each run)"),
        steps_per_phase_(steps_per_phase),
        phases_(phases),
        streams_(std::move(streams)) {
    for (int device = 0; device < w_.devices; ++device) {
      pools_[KeyOf(device, kDefaultPool)] = WPool{device, kDefaultPool};
      pools_[KeyOf(device, s_.shared_plain[device])] = WPool{device, s_.shared_plain[device], true};
      pools_[KeyOf(device, s_.shared_callback[device])] =
          WPool{device, s_.shared_callback[device], true, 0, s_.shared_callback_context[device]};
    }
    for (const tidepool_pool_id& id : s_.race_pools) {
      pools_[KeyOf(s_.race_device, id)] = WPool{s_.race_device, id, true};
    }
  }

  void Run() {
    for (int phase = 0; phase < phases_; ++phase) {
      if (!failed_) {
        try {
          for (int64_t i = 0; i < steps_per_phase_ && !s_.stop.load(); ++i) {
            ++step_;
            Step();
          }
          EndCaptures();  // the main thread checks with no capture under way
        } catch (const FuzzFailure& failure) {
          failed_ = true;
          s_.Failed(failure.message);
        }
      }
      s_.barrier.ArriveAndWait();  // the main thread checks everything
      s_.barrier.ArriveAndWait();  // and lets the workers go on
    }
    if (failed_) return;
    try {
      Finish();
    } catch (const FuzzFailure& failure) {
      failed_ = true;
      s_.Failed(failure.message);
    }
  }

  // For the main thread's checks, while this thread waits at the barrier or has exited.
  const std::map<uintptr_t, WBlock>& blocks() const { return blocks_; }
  const std::map<Key, WPool>& pools() const { return pools_; }
  int64_t RoutesTo(int device, tidepool_pool_id id) const {
    int64_t count = 0;
    for (const WRoute& route : routes_) count += route.device == device && SamePool(route.pool, id);
    return count;
  }
  int64_t steps() const { return step_; }
  int64_t GraphsOn(int device) const {
    int64_t count = 0;
    for (const MGraph& graph : graphs_) count += graph.device == device;
    return count;
  }
  int index() const { return index_; }
  const std::map<std::string, int64_t>& outcomes() const { return outcomes_; }
  bool failed() const { return failed_; }

  // After the thread exited: the current-thread routes it left open were ended, each dropping a
  // reference if any remained (docs/pools.md rule 10). Its other routes (everyone, capture) were
  // ended before it exited.
  void ApplyThreadExit() {
    for (const WRoute& route : routes_) {
      if (route.kind != TIDEPOOL_ROUTE_CURRENT_THREAD) continue;
      WPool& pool = pools_.at(KeyOf(route.device, route.pool));
      if (!IsDefault(pool.id) && pool.refs > 0) --pool.refs;
    }
    routes_.clear();
  }

 private:
  // --- Choosing --------------------------------------------------------------------------------

  void Step() {
    struct Choice {
      int weight;
      void (Worker::*op)();
    };
    const bool crowded = blocks_.size() > 48 || my_device_bytes_ > w_.capacity / (2 * s_.threads);
    const Choice choices[] = {
        {crowded ? 8 : 26, &Worker::OpMalloc},
        {crowded ? 30 : 14, &Worker::OpFree},
        {5, &Worker::OpMisuse},
        {4, &Worker::OpFreeMisuse},
        {3, &Worker::OpRecordStream},
        {3, &Worker::OpPoolOf},
        {routes_.size() > 8 ? 1 : 7, &Worker::OpBegin},
        {routes_.size() > 8 ? 12 : 5, &Worker::OpEnd},
        {5, &Worker::OpRelease},
        {2, &Worker::OpCreateCallbackPool},
        {2, &Worker::OpTrim},
        {2, &Worker::OpEmptyCache},
        {3, &Worker::OpJson},
        {2, &Worker::OpCapture},
        {2, &Worker::OpGraph},
        {1, &Worker::OpGraphPoolCreate},
        {1, &Worker::OpCheckMine},
        {s_.race_device >= 0 ? 4 : 0, &Worker::OpRace},
    };
    int total = 0;
    for (const Choice& choice : choices) total += choice.weight;
    int pick = static_cast<int>(random_.Below(total));
    for (const Choice& choice : choices) {
      if (pick < choice.weight) {
        (this->*choice.op)();
        return;
      }
      pick -= choice.weight;
    }
  }

  int RandomDevice() { return static_cast<int>(random_.Below(w_.devices)); }
  int BadDevice() {
    const int bad[] = {-1, -9, INT32_MIN, w_.devices, w_.devices + 2, INT32_MAX};
    return bad[random_.Below(sizeof bad / sizeof bad[0])];
  }
  uint32_t DeviceCodes(int device) const {
    if (device < 0) return kIA;
    if (device >= w_.devices) return kNF;
    return 0;
  }
  std::string StreamName(void* stream) const {
    if (stream == nullptr) return "NULL";
    for (int device = 0; device < w_.devices; ++device) {
      if (streams_[device] == stream) return absl::StrFormat("own S%d", device);
    }
    return absl::StrFormat("%p", stream);
  }
  std::string BlockText(const WBlock& block) const {
    return absl::StrFormat("%#x (%u bytes, asked %u, device %d, pool %s, stream %s)", block.address,
                           block.size, block.requested, block.device, IdText(block.pool),
                           StreamName(block.stream));
  }
  std::map<uintptr_t, WBlock>::iterator RandomBlock() {
    auto it = blocks_.begin();
    std::advance(it, random_.Below(blocks_.size()));
    return it;
  }
  WPool* FindPool(int device, tidepool_pool_id id) {
    auto it = pools_.find(KeyOf(device, id));
    return it == pools_.end() ? nullptr : &it->second;
  }
  // This thread's pools on a device (not shared, not default).
  std::vector<tidepool_pool_id> OwnPools(int device) const {
    std::vector<tidepool_pool_id> own;
    for (const auto& [key, pool] : pools_) {
      if (key.device == device && !pool.shared && !IsDefault(pool.id)) own.push_back(pool.id);
    }
    return own;
  }
  const WCapture* CaptureOn(int device) const {
    for (const WCapture& capture : captures_) {
      if (capture.device == device) return &capture;
    }
    return nullptr;
  }
  // The pool this thread's routes choose; `everyone` false: ignoring its everyone routes (which
  // another thread's end may have taken: an end takes the newest route to the pool, anyone's).
  tidepool_pool_id Choose(int device, void* stream, bool everyone = true) const {
    for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
      if (it->device != device) continue;
      if (it->kind == TIDEPOOL_ROUTE_EVERYONE && !everyone) continue;
      if (it->kind == TIDEPOOL_ROUTE_CURRENT_THREAD || it->kind == TIDEPOOL_ROUTE_EVERYONE) {
        return it->pool;
      }
      const WCapture* capture = CaptureOn(device);
      if (capture != nullptr && stream == streams_[device] && capture->id == it->capture_id) {
        return it->pool;
      }
    }
    return kDefaultPool;
  }
  int64_t LiveIn(int device, tidepool_pool_id id) const {
    int64_t count = 0;
    for (const auto& [address, block] : blocks_) {
      count += block.device == device && SamePool(block.pool, id);
    }
    return count;
  }

  // The capture window of a call on `device`: captures were under way when it began, or began
  // while it ran.
  struct Window {
    int device;
    int captures;
    int64_t attempts;
  };
  Window OpenWindow(int device) const {
    return Window{device, s_.captures[device].load(), s_.capture_attempts[device].load()};
  }
  bool Captured(const Window& window) const {
    return window.captures > 0 || s_.capture_attempts[window.device].load() != window.attempts;
  }

  // --- Observation -----------------------------------------------------------------------------

  Stats ReadStats(int device, const tidepool_pool_id* pool) {
    std::string json;
    const tidepool_status status = ReadJson(false, device, pool, &json);
    if (status != TIDEPOOL_OK) {
      rep_.Fail(absl::StrFormat("tidepool_stats_json(%d, %s) -> %s: %s", device,
                                pool == nullptr ? "NULL" : IdText(*pool), CodeName(status),
                                tidepool_last_error()));
    }
    Stats stats;
    if (!ParseStats(json, &stats)) rep_.Fail(absl::StrCat("unparsable statistics: ", json));
    return stats;
  }

  // What this thread alone changes: its own pools' live blocks, references and routes, and its
  // routing on every device.
  std::string Mine() {
    std::string text;
    for (const auto& [key, pool] : pools_) {
      if (pool.shared || IsDefault(pool.id)) continue;
      const Stats stats = ReadStats(key.device, &pool.id);
      absl::StatusOr<PoolInfo> info = w_.managers[key.device]->Info(ToPoolId(pool.id));
      absl::StrAppendFormat(&text, "[%d %s: %d %d %d refs %d routes %d live %d] ", key.device,
                            IdText(pool.id), stats.requested, stats.allocated, stats.active,
                            info.ok() ? info->references : -1, info.ok() ? info->routes : -1,
                            info.ok() ? info->live_blocks : -1);
    }
    for (int device = 0; device < w_.devices; ++device) {
      if (device == s_.race_device) continue;  // the other threads' everyone routes steer it
      for (void* stream : {static_cast<void*>(nullptr), streams_[device]}) {
        absl::StatusOr<PoolId> route = w_.managers[device]->RouteOf(stream);
        absl::StrAppend(&text, " route ",
                        route.ok() ? route->ToString() : route.status().ToString());
      }
    }
    return text;
  }

  // One C call: its code, its message, and (on failure, or on success when `unchanged`) that
  // nothing this thread owns changed.
  tidepool_status Call(const char* function, uint32_t allowed,
                       const std::function<tidepool_status()>& call, bool compare = true,
                       bool unchanged = false) {
    std::string before;
    if (((allowed & kAnyError) != 0 && compare) || unchanged) before = Mine();
    const std::string error_before = tidepool_last_error();
    std::shared_lock<std::shared_mutex> guard(s_.release_guard, std::defer_lock);
    if (!holding_guard_) guard.lock();
    const tidepool_status status = call();
    if (guard.owns_lock()) guard.unlock();
    rep_.Note(absl::StrCat("-> ", CodeName(status)));
    ++outcomes_[absl::StrCat(function, " -> ", CodeName(status))];
    if (!KnownStatus(status) || (allowed & (1u << status)) == 0) {
      rep_.Fail(absl::StrCat(function, " returned ", CodeName(status), " where the model allows ",
                             CodesText(allowed), "; tidepool_last_error: \"", tidepool_last_error(),
                             "\""));
    }
    const std::string message = tidepool_last_error();
    if (status == TIDEPOOL_OK) {
      if (message != error_before) {
        rep_.Fail(absl::StrCat(function, " succeeded but changed this thread's last error to \"",
                               message, "\""));
      }
    } else if (!StartsWith(message, absl::StrCat(function, ": "))) {
      rep_.Fail(absl::StrCat(function, " failed; this thread's last error is \"", message, "\""));
    }
    if ((status != TIDEPOOL_OK && compare && (allowed & kAnyError) != 0) ||
        (status == TIDEPOOL_OK && unchanged)) {
      const std::string after = Mine();
      if (after != before) {
        rep_.Fail(absl::StrCat("a ", status == TIDEPOOL_OK ? "successful " : "failed ", function,
                               " changed this thread's state:\n      before: ", before,
                               "\n      after:  ", after));
      }
    }
    return status;
  }

  void CheckPoolOf(const WBlock& block) {
    int device = -1;
    tidepool_pool_id pool{~uint64_t{0}, ~uint64_t{0}};
    const tidepool_status status =
        tidepool_pool_of(reinterpret_cast<void*>(block.address), &device, &pool);
    if (status != TIDEPOOL_OK || device != block.device || !SamePool(pool, block.pool)) {
      rep_.Fail(absl::StrFormat("tidepool_pool_of(%s) -> %s, device %d, pool %s (%s)",
                                BlockText(block), CodeName(status), device, IdText(pool),
                                status == TIDEPOOL_OK ? "" : tidepool_last_error()));
    }
  }

  // Own pools: their statistics and counts are this thread's alone.
  void CheckOwnPool(const WPool& pool) {
    int64_t requested = 0;
    int64_t allocated = 0;
    int64_t active = 0;
    for (const auto& [address, block] : blocks_) {
      if (block.device != pool.device || !SamePool(block.pool, pool.id)) continue;
      requested += block.requested;
      allocated += block.size;
      ++active;
    }
    const Stats stats = ReadStats(pool.device, &pool.id);
    absl::StatusOr<PoolInfo> info = w_.managers[pool.device]->Info(ToPoolId(pool.id));
    if (stats.requested != requested || stats.allocated != allocated || stats.active != active ||
        !info.ok() || info->references != pool.refs ||
        info->routes != RoutesTo(pool.device, pool.id) || info->live_blocks != active) {
      rep_.Fail(absl::StrFormat(
          "own pool %s of device %d: requested %d allocated %d active %d references %d routes %d "
          "live %d; the model %d %d %d %d %d %d",
          IdText(pool.id), pool.device, stats.requested, stats.allocated, stats.active,
          info.ok() ? info->references : -1, info.ok() ? info->routes : -1,
          info.ok() ? info->live_blocks : -1, requested, allocated, active, pool.refs,
          RoutesTo(pool.device, pool.id), active));
    }
  }

  void CheckRoutes() {
    for (int device = 0; device < w_.devices; ++device) {
      if (device == s_.race_device) continue;
      for (void* stream : {static_cast<void*>(nullptr), streams_[device]}) {
        absl::StatusOr<PoolId> route = w_.managers[device]->RouteOf(stream);
        const PoolId expected = ToPoolId(Choose(device, stream));
        if (!route.ok() || !(*route == expected)) {
          rep_.Fail(absl::StrFormat("device %d routes this thread's %s to %s; the model to %s",
                                    device, StreamName(stream),
                                    route.ok() ? route->ToString() : route.status().ToString(),
                                    expected.ToString()));
        }
      }
    }
  }

  void OpCheckMine() {
    rep_.Begin(step_, "check this thread's pools and routes");
    for (const auto& [key, pool] : pools_) {
      if (!pool.shared && !IsDefault(pool.id)) CheckOwnPool(pool);
    }
    CheckRoutes();
    for (int i = 0; i < 4 && !blocks_.empty(); ++i) CheckPoolOf(RandomBlock()->second);
  }

  // --- Memory ----------------------------------------------------------------------------------

  void OpMalloc() {
    const int device = RandomDevice();
    void* stream = random_.Chance(0.7) ? streams_[device] : nullptr;
    size_t size;
    const uint64_t kind = random_.Below(100);
    if (kind < 55) {
      size = random_.Between(1, 8192);
    } else if (kind < 80) {
      size = random_.Between(8193, kMiB);
    } else if (kind < 95) {
      size = random_.Between(kMiB, 12 * kMiB);
    } else if (kind < 99) {
      size = random_.Between(12 * kMiB, w_.capacity / 3);
    } else {
      size = w_.capacity + random_.Between(1, kMiB);
    }
    DoMalloc(device, stream, size);
  }

  void DoMalloc(int device, void* stream, size_t size) {
    const tidepool_pool_id target = Choose(device, stream);
    WPool& pool = *FindPool(device, target);
    // On the race device the allocation may go to a race pool another thread routes everyone to,
    // or find that pool released under it, or fall through to this thread's other routes.
    const bool race = device == s_.race_device;
    // Blocks of the shared callback pool are small: their size is then exactly the rounded one
    // (a larger one may take a whole segment, and other threads allocate there, so its size could
    // not be read off the pool's statistics). On the race device the block may land in the pool
    // this thread's other routes name, so that one counts too.
    for (const tidepool_pool_id& id :
         {target, race ? Choose(device, stream, /*everyone=*/false) : target}) {
      const WPool& candidate = *FindPool(device, id);
      if (candidate.shared && candidate.callback != nullptr) size = std::min(size, kMiB);
    }
    const size_t rounded = Round512(size);
    const bool device_memory = pool.callback == nullptr;
    rep_.Begin(step_, absl::StrFormat("tidepool_malloc(&p, %u, %d, %s) into pool %s%s", size,
                                      device, StreamName(stream), IdText(target),
                                      pool.callback != nullptr ? " (callbacks)" : ""));
    // Whether it may run out: the own callback pool's budget is this thread's to judge; the
    // device's memory is judged from every thread's live blocks and allocations under way.
    bool budget_oom = false;
    for (const tidepool_pool_id& id :
         {target, race ? Choose(device, stream, /*everyone=*/false) : target}) {
      const WPool& candidate = *FindPool(device, id);
      if (candidate.callback == nullptr || candidate.shared) continue;
      size_t pinned = 0;
      for (const auto& [start, bytes] : CallbackRegistry::Get().SegmentsOf(candidate.callback)) {
        auto it = blocks_.lower_bound(start);
        if (it != blocks_.end() && it->first < start + bytes) pinned += bytes;
      }
      budget_oom = budget_oom || pinned + PlainSegmentSize(rounded) > candidate.callback->budget;
    }
    const size_t need = device_memory || race ? RoundUp(rounded, w_.granularity) : 0;
    const int64_t ticket = s_.blocks.Begin(device, need);
    const Window window = OpenWindow(device);
    void* out = kSentinel;
    const tidepool_status status = Call("tidepool_malloc", kOK | kOOM | (race ? kFP : 0), [&] {
      return tidepool_malloc(&out, size, device, stream);
    });
    if (status == TIDEPOOL_FAILED_PRECONDITION) {
      s_.blocks.End(ticket);
      ++outcomes_["(malloc raced a release of the pool routed to: FAILED_PRECONDITION)"];
      if (out != nullptr) rep_.Fail(absl::StrFormat("a failed tidepool_malloc stored %p", out));
      if (std::string(tidepool_last_error()).find("released while still routed") ==
          std::string::npos) {
        rep_.Fail("a malloc on the race device failed with FAILED_PRECONDITION for another reason");
      }
      return;
    }
    if (status != TIDEPOOL_OK) {
      const size_t peak = s_.blocks.End(ticket);
      if (out != nullptr) rep_.Fail(absl::StrFormat("a failed tidepool_malloc stored %p", out));
      const bool too_large = size > w_.capacity || RoundUp(rounded, w_.granularity) > w_.capacity;
      const bool allowed =
          too_large || budget_oom || Captured(window) || s_.kept_pools[device].load() > 0 ||
          ((device_memory || race) && peak > w_.capacity) ||
          (pool.callback != nullptr &&
           CallbackRegistry::Get().LiveBytes(pool.callback) + PlainSegmentSize(rounded) >
               pool.callback->budget);
      ++outcomes_[too_large                             ? "(out of memory: larger than the device)"
                  : budget_oom                          ? "(out of memory: own callback budget)"
                  : device_memory && peak > w_.capacity ? "(out of memory: device full)"
                  : Captured(window)                    ? "(out of memory: during a capture)"
                  : s_.kept_pools[device].load() > 0    ? "(out of memory: graph pools keep memory)"
                                                        : "(out of memory: callback budget)"];
      if (!allowed) {
        rep_.Fail(absl::StrFormat(
            "tidepool_malloc of %u bytes ran out of memory although live blocks and allocations "
            "under way held at most %u bytes of device %d's %u (no capture, no kept pool); "
            "message: %s",
            size, peak, device, w_.capacity, tidepool_last_error()));
      }
      return;
    }
    const uintptr_t address = reinterpret_cast<uintptr_t>(out);
    if (out == nullptr || address % kBlockAlignment != 0) {
      s_.blocks.End(ticket);
      rep_.Fail(absl::StrFormat("tidepool_malloc returned OK with %p", out));
    }
    tidepool_pool_id landed = target;
    if (race) {
      int where = -1;
      tidepool_pool_id home{};
      const tidepool_status found = tidepool_pool_of(out, &where, &home);
      const tidepool_pool_id fallback = Choose(device, stream, /*everyone=*/false);
      bool expected = found == TIDEPOOL_OK && where == device &&
                      (SamePool(home, target) || SamePool(home, fallback));
      for (const tidepool_pool_id& id : s_.race_pools) {
        expected = expected || (found == TIDEPOOL_OK && where == device && SamePool(home, id));
      }
      if (!expected) {
        s_.blocks.End(ticket);
        rep_.Fail(absl::StrFormat(
            "a block on the race device landed on device %d, pool %s (%s); expected pool %s or a "
            "race pool",
            where, IdText(home), CodeName(found), IdText(target)));
      }
      landed = home;
      if (!SamePool(landed, target))
        ++outcomes_["(malloc on the race device landed elsewhere than its newest route)"];
    }
    WPool& home_pool = *FindPool(device, landed);
    size_t block_size = rounded;
    if (!home_pool.shared && !IsDefault(landed)) {
      // Only this thread allocates in its own pools: the new block is what the pool's statistics
      // count beyond this thread's other blocks there.
      const Stats after = ReadStats(device, &landed);
      int64_t requested = 0;
      int64_t allocated = 0;
      int64_t active = 0;
      for (const auto& [other, block] : blocks_) {
        if (block.device != device || !SamePool(block.pool, landed)) continue;
        requested += block.requested;
        allocated += block.size;
        ++active;
      }
      block_size = static_cast<size_t>(after.allocated - allocated);
      if (after.requested - requested != static_cast<int64_t>(size) || after.active - active != 1 ||
          block_size < rounded || (home_pool.callback == nullptr && block_size != rounded) ||
          block_size > rounded + kMiB) {
        s_.blocks.End(ticket);
        rep_.Fail(absl::StrFormat(
            "a malloc of %u bytes into own pool %s: the pool counts %d more requested bytes, %d "
            "more allocated, %d more blocks than this thread's others",
            size, IdText(landed), after.requested - requested, block_size, after.active - active));
      }
    }
    // Exclusive (safe to double free): on this thread's own stream, in device memory. A callback
    // pool's host memory, once its segment went back, may come back to another thread's pool.
    const WBlock block{address,
                       block_size,
                       size,
                       device,
                       landed,
                       stream,
                       home_pool.callback,
                       stream != nullptr && home_pool.callback == nullptr};
    const bool in_device_memory = home_pool.callback == nullptr;
    const std::string overlap =
        s_.blocks.Insert(address, block_size, device, in_device_memory, index_);
    s_.blocks.End(ticket);
    if (!overlap.empty()) {
      rep_.Fail(absl::StrCat("new block ", BlockText(block), " overlaps live block ", overlap));
    }
    if (home_pool.callback != nullptr) {
      if (!CallbackRegistry::Get().Holds(home_pool.callback, address, block_size)) {
        rep_.Fail(absl::StrCat("block ", BlockText(block),
                               " is not inside a segment its pool's callback handed out"));
      }
    } else if (address < w_.Base(device) ||
               address + block_size > w_.Base(device) + kSimulatedAddressRange) {
      rep_.Fail(absl::StrCat("block ", BlockText(block), " is outside its device's addresses"));
    }
    blocks_[address] = block;
    if (in_device_memory) my_device_bytes_ += block_size;
    freed_.erase(freed_.lower_bound(address), freed_.lower_bound(address + block_size));
    CheckPoolOf(block);
  }

  void FreeBlock(const WBlock block, const char* label) {  // a copy: the map entry goes
    rep_.Begin(step_, absl::StrCat(label, "tidepool_free(", BlockText(block), ")"));
    const int64_t epoch = ReadStats(block.device, nullptr).segments_removed;
    s_.blocks.Unlist(block.address);
    Call(
        "tidepool_free", kOK, [&] { return tidepool_free(reinterpret_cast<void*>(block.address)); },
        /*compare=*/false);
    s_.blocks.Unpin(block.address, block.device);
    blocks_.erase(block.address);
    if (block.callback == nullptr) my_device_bytes_ -= block.size;
    if (block.exclusive) {
      freed_[block.address] = MFreed{block.address, block.device, epoch};
      if (freed_.size() > 200) freed_.erase(freed_.begin());
    }
    AfterPoolChange(block.device, block.pool);
  }

  void OpFree() {
    if (blocks_.empty()) {
      OpMalloc();
      return;
    }
    FreeBlock(RandomBlock()->second, "");
  }

  void* InteriorPointer(const WBlock& block) {
    if (block.size >= 2 * kBlockAlignment && random_.Chance(0.6)) {
      return reinterpret_cast<void*>(
          block.address + kBlockAlignment * random_.Between(1, block.size / kBlockAlignment - 1));
    }
    return reinterpret_cast<void*>(block.address + random_.Between(1, kBlockAlignment - 1));
  }

  void OpFreeMisuse() {
    const uint64_t pick = random_.Below(4);
    if (pick == 0 && !blocks_.empty()) {
      const WBlock block = RandomBlock()->second;
      void* inside = InteriorPointer(block);
      rep_.Begin(step_, absl::StrFormat("tidepool_free(%p) [inside %s]", inside, BlockText(block)));
      Call("tidepool_free", kFP, [&] { return tidepool_free(inside); });
      return;
    }
    if (pick == 1 && !freed_.empty()) {
      auto it = freed_.begin();
      std::advance(it, random_.Below(freed_.size()));
      const uintptr_t address = it->first;
      const MFreed freed = it->second;
      std::unique_lock<std::shared_mutex> alone(s_.release_guard);
      if (ReadStats(freed.device, nullptr).segments_removed != freed.epoch) {
        // Its segment may have gone back, and its addresses to another thread's block.
        rep_.Begin(step_,
                   absl::StrFormat("(double free of %#x skipped: memory went back)", address));
        freed_.erase(it);
        return;
      }
      // No segment went back, and none can meanwhile: the memory is still held, so the header
      // says FAILED_PRECONDITION.
      rep_.Begin(step_, absl::StrFormat("tidepool_free(%#x) [double free]", address));
      holding_guard_ = true;
      Call("tidepool_free", kFP, [&] { return tidepool_free(reinterpret_cast<void*>(address)); });
      holding_guard_ = false;
      return;
    }
    if (pick == 2) {
      rep_.Begin(step_, "tidepool_free(NULL)");
      Call(
          "tidepool_free", kOK, [] { return tidepool_free(nullptr); }, true, /*unchanged=*/true);
      return;
    }
    int on_stack = 0;
    void* heap = std::malloc(16);
    const std::vector<void*> foreign = ForeignPointers(w_, heap, &on_stack);
    void* pointer = random_.Pick(foreign);
    rep_.Begin(step_, absl::StrFormat("tidepool_free(%p) [foreign]", pointer));
    Call("tidepool_free", kIA, [&] { return tidepool_free(pointer); });
    std::free(heap);
  }

  void OpRecordStream() {
    if (blocks_.empty()) return;
    const WBlock block = RandomBlock()->second;
    const uint64_t pick = random_.Below(4);
    void* stream = pick == 0 ? kBogusStream : pick == 1 ? nullptr : streams_[block.device];
    rep_.Begin(step_, absl::StrFormat("tidepool_record_stream(%s, %s)", BlockText(block),
                                      StreamName(stream)));
    Call("tidepool_record_stream", pick == 0 ? kIA : kOK,
         [&] { return tidepool_record_stream(reinterpret_cast<void*>(block.address), stream); });
  }

  void OpPoolOf() {
    if (blocks_.empty()) return;
    const WBlock block = RandomBlock()->second;
    int device = -1;
    tidepool_pool_id pool{};
    switch (random_.Below(4)) {
      case 0: {
        void* inside = InteriorPointer(block);
        rep_.Begin(step_,
                   absl::StrFormat("tidepool_pool_of(%p) [inside %s]", inside, BlockText(block)));
        Call("tidepool_pool_of", kFP, [&] { return tidepool_pool_of(inside, &device, &pool); });
        return;
      }
      case 1:
        rep_.Begin(step_, absl::StrFormat("tidepool_pool_of(%#x, NULL, &pool)", block.address));
        Call("tidepool_pool_of", kIA, [&] {
          return tidepool_pool_of(reinterpret_cast<void*>(block.address), nullptr, &pool);
        });
        return;
      default:
        rep_.Begin(step_, absl::StrCat("tidepool_pool_of(", BlockText(block), ")"));
        CheckPoolOf(block);
        return;
    }
  }

  void OpMisuse() {
    void* out = kSentinel;
    const int device = RandomDevice();
    switch (random_.Below(8)) {
      case 0:
        rep_.Begin(step_, "tidepool_malloc(&p, 0, device, own stream)");
        Call("tidepool_malloc", kIA,
             [&] { return tidepool_malloc(&out, 0, device, streams_[device]); });
        break;
      case 1: {
        const size_t size = random_.Chance(0.5) ? SIZE_MAX : size_t{1} << 60;
        rep_.Begin(step_, absl::StrFormat("tidepool_malloc(&p, %u, %d, NULL)", size, device));
        Call("tidepool_malloc", kOOM, [&] { return tidepool_malloc(&out, size, device, nullptr); });
        break;
      }
      case 2: {
        const int bad = BadDevice();
        rep_.Begin(step_, absl::StrFormat("tidepool_malloc(&p, 64, %d, NULL)", bad));
        Call("tidepool_malloc", DeviceCodes(bad),
             [&] { return tidepool_malloc(&out, 64, bad, nullptr); });
        break;
      }
      case 3:
        rep_.Begin(step_, "tidepool_malloc(&p, 64, device, bogus stream)");
        Call("tidepool_malloc", kIA,
             [&] { return tidepool_malloc(&out, 64, device, kBogusStream); });
        break;
      case 4:
        rep_.Begin(step_, "tidepool_malloc(NULL, 64, device, NULL)");
        Call("tidepool_malloc", kIA, [&] { return tidepool_malloc(nullptr, 64, device, nullptr); });
        return;
      case 5: {
        const int kinds[] = {-1, 4, 77};
        const int kind = kinds[random_.Below(3)];
        rep_.Begin(step_,
                   absl::StrFormat("tidepool_begin_allocate_to_pool(%d, default, kind %d, 0)",
                                   device, kind));
        Call("tidepool_begin_allocate_to_pool", kIA,
             [&] { return tidepool_begin_allocate_to_pool(device, kDefaultPool, kind, 0); });
        return;
      }
      case 6: {
        int count = 0;
        rep_.Begin(step_, "tidepool_device_count");
        Call(
            "tidepool_device_count", kOK, [&] { return tidepool_device_count(&count); }, true,
            true);
        if (count != w_.devices) rep_.Fail("tidepool_device_count is wrong");
        Call("tidepool_device_count", kIA, [] { return tidepool_device_count(nullptr); });
        return;
      }
      default: {
        tidepool_pool_id id{};
        rep_.Begin(step_, "tidepool_new_pool_id, tidepool_new_graph_pool_id");
        Call(
            "tidepool_new_pool_id", kOK, [&] { return tidepool_new_pool_id(&id); }, true, true);
        if (id.first != 0 || id.second == 0) rep_.Fail("a bad user pool id");
        Call(
            "tidepool_new_graph_pool_id", kOK, [&] { return tidepool_new_graph_pool_id(&id); },
            true, true);
        if (id.first == 0 || id.second != 0) rep_.Fail("a bad graph pool id");
        Call("tidepool_new_pool_id", kIA, [] { return tidepool_new_pool_id(nullptr); });
        return;
      }
    }
    if (out != nullptr) rep_.Fail(absl::StrFormat("a failed tidepool_malloc stored %p", out));
  }

  // --- Pools -----------------------------------------------------------------------------------

  tidepool_pool_id NewUserId() {
    tidepool_pool_id id{};
    Call(
        "tidepool_new_pool_id", kOK, [&] { return tidepool_new_pool_id(&id); }, false);
    return id;
  }

  // After a release or a free: a graph pool that held memory and is gone now keeps none.
  void AfterPoolChange(int device, tidepool_pool_id id) {
    WPool* pool = FindPool(device, id);
    if (pool == nullptr || !pool->kept || pool->refs > 0 || LiveIn(device, id) > 0) return;
    pool->kept = false;
    --s_.kept_pools[device];
  }

  void OpBegin() {
    const int device = RandomDevice();
    // Graph pools take routes from captures only (so that what they keep is known).
    std::vector<tidepool_pool_id> candidates;
    for (const tidepool_pool_id& own : OwnPools(device)) {
      if (own.first == 0) candidates.push_back(own);
    }
    const bool may_create = OwnPools(device).size() < 12;
    candidates.push_back(kDefaultPool);
    candidates.push_back(s_.shared_plain[device]);
    candidates.push_back(s_.shared_callback[device]);
    tidepool_pool_id id = random_.Pick(candidates);
    if (may_create && random_.Chance(0.2)) id = NewUserId();
    rep_.Begin(step_, absl::StrFormat("tidepool_begin_allocate_current_thread_to_pool(%d, %s)",
                                      device, IdText(id)));
    const tidepool_status status = Call("tidepool_begin_allocate_current_thread_to_pool", kOK, [&] {
      return tidepool_begin_allocate_current_thread_to_pool(device, id);
    });
    if (status != TIDEPOOL_OK) return;
    auto it = pools_.find(KeyOf(device, id));
    if (it == pools_.end()) it = pools_.emplace(KeyOf(device, id), WPool{device, id}).first;
    if (!IsDefault(id)) ++it->second.refs;
    routes_.push_back(WRoute{next_seq_++, device, TIDEPOOL_ROUTE_CURRENT_THREAD, 0, id});
  }

  // The route this thread's end would end: its newest current-thread route to the pool, else its
  // capture's route to it (a global route: the only kind this thread makes).
  int EndTarget(int device, tidepool_pool_id id) const {
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      if (routes_[i].device == device && routes_[i].kind == TIDEPOOL_ROUTE_CURRENT_THREAD &&
          SamePool(routes_[i].pool, id)) {
        return i;
      }
    }
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      if (routes_[i].device == device && SamePool(routes_[i].pool, id)) return i;
    }
    return -1;
  }

  void OpEnd() {
    int device = RandomDevice();
    tidepool_pool_id id;
    if (!routes_.empty() && random_.Chance(0.8)) {
      const WRoute& route = random_.Pick(routes_);
      device = route.device;
      id = route.pool;
    } else {
      std::vector<tidepool_pool_id> candidates = OwnPools(device);
      candidates.push_back(kDefaultPool);
      candidates.push_back(s_.shared_plain[device]);
      id = random_.Pick(candidates);
    }
    const int target = EndTarget(device, id);
    rep_.Begin(step_, absl::StrFormat("tidepool_end_allocate_to_pool(%d, %s)%s", device, IdText(id),
                                      target < 0 ? " [no route of this thread]" : ""));
    const tidepool_status status = Call("tidepool_end_allocate_to_pool", target >= 0 ? kOK : kFP,
                                        [&] { return tidepool_end_allocate_to_pool(device, id); });
    if (status == TIDEPOOL_OK) routes_.erase(routes_.begin() + target);
  }

  uint32_t ReleaseCodes(int device, tidepool_pool_id id) {
    if (IsDefault(id)) return kIA;
    const WPool* pool = FindPool(device, id);
    if (pool == nullptr) return kNF;
    if (pool->refs == 0) return kFP;
    if (pool->refs - 1 < RoutesTo(device, id)) return kFP;
    return kOK;
  }

  void Released(int device, tidepool_pool_id id) {
    --FindPool(device, id)->refs;
    AfterPoolChange(device, id);
  }

  void OpRelease() {
    const int device = RandomDevice();
    tidepool_pool_id id;
    const uint64_t pick = random_.Below(100);
    std::vector<tidepool_pool_id> own = OwnPools(device);
    if (pick < 70 && !own.empty()) {
      id = random_.Pick(own);
    } else if (pick < 80) {
      id = s_.shared_plain[device];
      const WPool& pool = *FindPool(device, id);
      // Only a reference this thread holds beyond its routes: the others' are not its to drop.
      if (pool.refs <= RoutesTo(device, id)) return;
    } else if (pick < 88) {
      id = kDefaultPool;
    } else {
      id = tidepool_pool_id{uint64_t{1} << 41, static_cast<uint64_t>(index_) + 1};  // never had
    }
    const uint32_t codes = ReleaseCodes(device, id);
    rep_.Begin(step_, absl::StrFormat("tidepool_release_pool(%d, %s)", device, IdText(id)));
    const tidepool_status status =
        Call("tidepool_release_pool", codes, [&] { return tidepool_release_pool(device, id); });
    if (status == TIDEPOOL_OK) Released(device, id);
  }

  void OpCreateCallbackPool() {
    const int device = RandomDevice();
    int own_callbacks = 0;
    for (const auto& [key, pool] : pools_)
      own_callbacks += !pool.shared && pool.callback != nullptr;
    const uint64_t pick = random_.Below(100);
    tidepool_pool_id id = NewUserId();
    int call_device = device;
    bool null_alloc = false;
    uint32_t codes = kOK;
    if (pick < 15 || own_callbacks >= 4) {
      null_alloc = true;
      codes = kIA;
    } else if (pick < 25) {
      const std::vector<tidepool_pool_id> own = OwnPools(device);
      if (own.empty()) return;
      id = random_.Pick(own);
      codes = kFP;
    } else if (pick < 32) {
      call_device = BadDevice();
      codes = DeviceCodes(call_device);
    }
    const size_t budgets[] = {0, 4 * kMiB, 12 * kMiB, 32 * kMiB};
    CallbackPool* context = CallbackRegistry::Get().NewPool(
        device, id, static_cast<int>(random_.Below(3)), budgets[random_.Below(4)]);
    rep_.Begin(step_,
               absl::StrFormat("tidepool_create_callback_pool(%d, %s, %s, free, budget %u MiB)",
                               call_device, IdText(id), null_alloc ? "NULL" : "alloc",
                               context->budget / kMiB));
    const tidepool_status status = Call("tidepool_create_callback_pool", codes, [&] {
      return tidepool_create_callback_pool(call_device, id, null_alloc ? nullptr : FuzzAllocSegment,
                                           FuzzFreeSegment, context);
    });
    if (status == TIDEPOOL_OK) pools_[KeyOf(device, id)] = WPool{device, id, false, 1, context};
  }

  void OpTrim() {
    const int device = RandomDevice();
    std::vector<tidepool_pool_id> candidates = OwnPools(device);
    candidates.push_back(kDefaultPool);
    candidates.push_back(s_.shared_plain[device]);
    const bool unknown = random_.Chance(0.1);
    const tidepool_pool_id id =
        unknown ? tidepool_pool_id{uint64_t{1} << 42, 1} : random_.Pick(candidates);
    const WPool* pool = unknown ? nullptr : FindPool(device, id);
    rep_.Begin(step_, absl::StrFormat("tidepool_trim_pool(%d, %s)", device, IdText(id)));
    const Window window = OpenWindow(device);
    uint32_t codes = kOK | kFP;  // refused while a capture is under way on the device
    if (unknown) {
      codes = kNF;
    } else if (id.first != 0 && pool->refs > 0) {
      codes = kFP;
    }
    const tidepool_status status =
        Call("tidepool_trim_pool", codes, [&] { return tidepool_trim_pool(device, id); });
    if (status == TIDEPOOL_FAILED_PRECONDITION && codes != kFP && !Captured(window)) {
      rep_.Fail("tidepool_trim_pool refused although no capture was under way on the device");
    }
    if (status == TIDEPOOL_OK && pool != nullptr && !pool->shared && !IsDefault(id)) {
      CheckHoldsOnlyLive(*pool);
    }
  }

  // After trim of an own pool: it holds exactly what its live blocks need.
  void CheckHoldsOnlyLive(const WPool& pool) {
    const Stats stats = ReadStats(pool.device, &pool.id);
    size_t expected = 0;
    if (pool.callback != nullptr) {
      for (const auto& [start, size] : CallbackRegistry::Get().SegmentsOf(pool.callback)) {
        auto it = blocks_.lower_bound(start);
        if (it != blocks_.end() && it->first < start + size) expected += size;
      }
    } else {
      std::vector<std::pair<int, const WBlock*>> mine;
      for (const auto& [address, block] : blocks_) {
        if (block.device == pool.device && SamePool(block.pool, pool.id)) {
          mine.push_back({block.device, &block});
        }
      }
      expected = PinnedRunBytes(w_, mine);
    }
    if (static_cast<size_t>(stats.reserved) != expected) {
      rep_.Fail(
          absl::StrFormat("after trim, own pool %s of device %d reserves %d bytes; its live "
                          "blocks need %u",
                          IdText(pool.id), pool.device, stats.reserved, expected));
    }
  }

  void OpEmptyCache() {
    const bool bad = random_.Chance(0.1);
    const int device = bad ? BadDevice() : RandomDevice();
    rep_.Begin(step_, absl::StrFormat("tidepool_empty_cache(%d)", device));
    if (bad) {
      Call("tidepool_empty_cache", DeviceCodes(device),
           [&] { return tidepool_empty_cache(device); });
      return;
    }
    const Window window = OpenWindow(device);
    const tidepool_status status =
        Call("tidepool_empty_cache", kOK | kFP, [&] { return tidepool_empty_cache(device); });
    if (status != TIDEPOOL_OK && !Captured(window)) {
      rep_.Fail("tidepool_empty_cache refused although no capture was under way on the device");
    }
  }

  void OpJson() {
    const int device = RandomDevice();
    const uint64_t pick = random_.Below(4);
    if (pick == 0) {
      rep_.Begin(step_, absl::StrFormat("tidepool_stats_json(%d, NULL) [whole device]", device));
      const Stats stats = ReadStats(device, nullptr);
      if (stats.reserved < stats.allocated || stats.allocated < stats.requested ||
          stats.active < 0) {
        rep_.Fail(absl::StrCat("device statistics out of order: ", stats.json));
      }
      return;
    }
    if (pick == 1) {
      std::string text;
      const std::vector<tidepool_pool_id> own = OwnPools(device);
      const tidepool_pool_id id = own.empty() ? kDefaultPool : random_.Pick(own);
      rep_.Begin(step_, absl::StrFormat("tidepool_snapshot_json(%d, %s)", device, IdText(id)));
      if (ReadJson(true, device, &id, &text) != TIDEPOOL_OK ||
          !StartsWith(text, absl::StrFormat("{\"device\":%d,", device))) {
        rep_.Fail(absl::StrCat("snapshot: ", tidepool_last_error(), " ", text.substr(0, 100)));
      }
      return;
    }
    if (pick == 2) {
      char small[8];
      size_t needed = 0;
      rep_.Begin(step_,
                 absl::StrFormat("tidepool_stats_json(%d, NULL, small, 8, &needed)", device));
      Call("tidepool_stats_json", kIA,
           [&] { return tidepool_stats_json(device, nullptr, small, sizeof small, &needed); });
      if (needed < 100) rep_.Fail("a buffer too small did not say how much is needed");
      return;
    }
    const tidepool_pool_id never{uint64_t{1} << 43, 5};
    rep_.Begin(step_, absl::StrFormat("tidepool_stats_json(%d, never had)", device));
    Call("tidepool_stats_json", kNF,
         [&] { return tidepool_stats_json(device, &never, nullptr, 0, nullptr); });
  }

  // Begins an everyone route to a race pool (and allocates through it), or ends one and releases
  // the reference its begin took, while the other threads allocate on the race device.
  void OpRace() {
    const int device = s_.race_device;
    std::vector<int> mine;
    for (int i = 0; i < static_cast<int>(routes_.size()); ++i) {
      if (routes_[i].kind == TIDEPOOL_ROUTE_EVERYONE) mine.push_back(i);
    }
    for (const tidepool_pool_id& id : s_.race_pools) {
      WPool& pool = *FindPool(device, id);
      if (pool.refs > RoutesTo(device, id)) {  // a route that a plain end took: its reference
        rep_.Begin(step_, absl::StrFormat("tidepool_release_pool(%d, %s) [race pool]", device,
                                          IdText(id)));
        Call("tidepool_release_pool", kOK, [&] { return tidepool_release_pool(device, id); });
        --pool.refs;
        return;
      }
    }
    if (!mine.empty() && (mine.size() >= 2 || random_.Chance(0.5))) {
      const int index = mine[random_.Below(mine.size())];
      const tidepool_pool_id id = routes_[index].pool;
      rep_.Begin(step_, absl::StrFormat("tidepool_end_allocate_to_pool(%d, %s) [race pool]", device,
                                        IdText(id)));
      Call("tidepool_end_allocate_to_pool", kOK,
           [&] { return tidepool_end_allocate_to_pool(device, id); });
      routes_.erase(routes_.begin() + index);
      rep_.Begin(step_,
                 absl::StrFormat("tidepool_release_pool(%d, %s) [race pool]", device, IdText(id)));
      Call("tidepool_release_pool", kOK, [&] { return tidepool_release_pool(device, id); });
      --FindPool(device, id)->refs;
      return;
    }
    const tidepool_pool_id id = random_.Pick(s_.race_pools);
    rep_.Begin(step_,
               absl::StrFormat("tidepool_begin_allocate_to_pool(%d, %s, everyone) [race pool]",
                               device, IdText(id)));
    Call("tidepool_begin_allocate_to_pool", kOK,
         [&] { return tidepool_begin_allocate_to_pool(device, id, TIDEPOOL_ROUTE_EVERYONE, 0); });
    ++FindPool(device, id)->refs;
    routes_.push_back(WRoute{next_seq_++, device, TIDEPOOL_ROUTE_EVERYONE, 0, id});
    DoMalloc(device, random_.Chance(0.5) ? streams_[device] : nullptr, random_.Between(1, 65536));
  }

  // --- Captures and graphs ---------------------------------------------------------------------

  void OpCapture() {
    const int device = RandomDevice();
    const WCapture* open = CaptureOn(device);
    const uint64_t pick = random_.Below(100);
    if (open != nullptr && pick < 60) {
      FinishCapture(static_cast<size_t>(open - captures_.data()), pick < 40 ? 0 : 2);
      return;
    }
    tidepool_capture* capture = reinterpret_cast<tidepool_capture*>(kSentinel);
    if (pick < 75 || open != nullptr) {
      // Refused before anything happens: the NULL stream, a bad mode, a pool that is no graph pool.
      const uint64_t how = random_.Below(4);
      const tidepool_pool_id user = s_.shared_plain[device];
      rep_.Begin(step_, absl::StrFormat("tidepool_capture_begin(%d, %s, %s, mode %d) [refused]",
                                        device, how == 0 ? "NULL" : "own stream",
                                        how == 2 ? IdText(user) : "NULL", how == 1 ? 9 : 0));
      // Not counted as a capture window: a refused capture leaves nothing behind (tidepool.h), so
      // the other threads' empty_cache and trim must not see it.
      Call("tidepool_capture_begin", how == 0 ? kDriverRefusal : kIA, [&] {
        return tidepool_capture_begin(device, how == 0 ? nullptr : streams_[device],
                                      how == 2 ? &user : nullptr, how == 1 ? 9 : 0,
                                      how == 3 ? nullptr : &capture);
      });
      if (how != 3 && capture != nullptr)
        rep_.Fail("a failed tidepool_capture_begin stored a capture");
      return;
    }
    // A real capture of this thread's own stream, into a new pool or one of its graph pools.
    std::vector<tidepool_pool_id> held;
    for (const auto& [key, pool] : pools_) {
      if (key.device == device && !pool.shared && pool.id.first != 0 && pool.refs > 0) {
        held.push_back(pool.id);
      }
    }
    const bool share = !held.empty() && random_.Chance(0.5);
    const tidepool_pool_id share_id = share ? random_.Pick(held) : kDefaultPool;
    const int mode = static_cast<int>(random_.Below(3));
    rep_.Begin(step_, absl::StrFormat("tidepool_capture_begin(%d, own stream, %s, mode %d)", device,
                                      share ? IdText(share_id) : "NULL", mode));
    s_.captures[device]++;
    s_.capture_attempts[device]++;
    const tidepool_status status = Call("tidepool_capture_begin", kOK, [&] {
      return tidepool_capture_begin(device, streams_[device], share ? &share_id : nullptr, mode,
                                    &capture);
    });
    if (status != TIDEPOOL_OK) {
      s_.captures[device]--;
      return;
    }
    tidepool_pool_id pool{};
    Call(
        "tidepool_capture_pool", kOK, [&] { return tidepool_capture_pool(capture, &pool); }, false);
    if (share ? !SamePool(pool, share_id)
              : (pool.first == 0 || pool.second != 0 || FindPool(device, pool) != nullptr)) {
      rep_.Fail(absl::StrFormat("the capture's pool is %s", IdText(pool)));
    }
    absl::StatusOr<CaptureInfo> info = w_.sims[device]->GetCaptureInfo(streams_[device]);
    if (!info.ok() || !info->capturing) rep_.Fail("the own stream is not capturing");
    auto it = pools_.find(KeyOf(device, pool));
    if (it == pools_.end()) it = pools_.emplace(KeyOf(device, pool), WPool{device, pool}).first;
    ++it->second.refs;
    if (!it->second.kept) {
      it->second.kept = true;
      ++s_.kept_pools[device];
    }
    captures_.push_back(WCapture{capture, device, info->capture_id, next_seq_, pool});
    routes_.push_back(WRoute{next_seq_++, device, TIDEPOOL_ROUTE_CAPTURE, info->capture_id, pool});
    // Captures are short, as in a program: a few allocations into the graph's pool, then the end
    // (a capture under way keeps every thread's cache from going back to the device).
    const int allocations = static_cast<int>(random_.Below(4));
    for (int i = 0; i < allocations; ++i) {
      DoMalloc(device, streams_[device], random_.Between(1, 256 * 1024));
    }
    if (random_.Chance(0.95)) FinishCapture(captures_.size() - 1, random_.Chance(0.7) ? 0 : 2);
  }

  // how: 0 end (and keep the graph), 2 abandon.
  void FinishCapture(size_t index, int how) {
    const WCapture capture = captures_[index];
    captures_.erase(captures_.begin() + index);
    // The capture's route ends; or, if this thread ended it by hand, the route it began to the
    // pool since, with that route's reference (graph/capture.h).
    bool found = false;
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0 && !found; --i) {
      if (routes_[i].device == capture.device && routes_[i].kind == TIDEPOOL_ROUTE_CAPTURE &&
          routes_[i].capture_id == capture.id && SamePool(routes_[i].pool, capture.pool)) {
        routes_.erase(routes_.begin() + i);
        found = true;
      }
    }
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0 && !found; --i) {
      if (routes_[i].device == capture.device && routes_[i].kind == TIDEPOOL_ROUTE_CURRENT_THREAD &&
          SamePool(routes_[i].pool, capture.pool) && routes_[i].seq >= capture.began_seq) {
        routes_.erase(routes_.begin() + i);
        --FindPool(capture.device, capture.pool)->refs;
        found = true;
      }
    }
    const uint32_t codes = how == 2 ? ReleaseCodes(capture.device, capture.pool) : kOK;
    tidepool_graph* graph = nullptr;
    rep_.Begin(step_,
               absl::StrFormat("%s(capture %u on device %d, pool %s)",
                               how == 2 ? "tidepool_capture_abandon" : "tidepool_capture_end",
                               capture.id, capture.device, IdText(capture.pool)));
    const tidepool_status status = Call(
        how == 2 ? "tidepool_capture_abandon" : "tidepool_capture_end", codes,
        [&] {
          return how == 2 ? tidepool_capture_abandon(capture.handle)
                          : tidepool_capture_end(capture.handle, &graph);
        },
        false);
    s_.captures[capture.device]--;
    if (how == 2) {
      if (status == TIDEPOOL_OK) Released(capture.device, capture.pool);
      return;
    }
    if (graph == nullptr) rep_.Fail("tidepool_capture_end returned OK without a graph");
    graphs_.push_back(MGraph{graph, capture.device, capture.pool});
  }

  void EndCaptures() {
    while (!captures_.empty()) FinishCapture(captures_.size() - 1, random_.Chance(0.5) ? 0 : 2);
  }

  void DestroyGraph(size_t index) {
    const MGraph graph = graphs_[index];
    graphs_.erase(graphs_.begin() + index);
    rep_.Begin(step_, absl::StrFormat("tidepool_graph_destroy(graph of %s on device %d)",
                                      IdText(graph.pool), graph.device));
    const tidepool_status status = Call(
        "tidepool_graph_destroy", ReleaseCodes(graph.device, graph.pool),
        [&] { return tidepool_graph_destroy(graph.handle); }, false);
    if (status == TIDEPOOL_OK) Released(graph.device, graph.pool);
  }

  void OpGraph() {
    if (graphs_.empty()) {
      tidepool_pool_id pool{};
      rep_.Begin(
          step_,
          "tidepool_graph_launch(NULL), tidepool_graph_pool(NULL), tidepool_graph_destroy(NULL)");
      Call("tidepool_graph_launch", kIA, [] { return tidepool_graph_launch(nullptr, nullptr); });
      Call("tidepool_graph_pool", kIA, [&] { return tidepool_graph_pool(nullptr, &pool); });
      Call(
          "tidepool_graph_destroy", kOK, [] { return tidepool_graph_destroy(nullptr); }, true,
          true);
      Call("tidepool_capture_end", kIA, [] { return tidepool_capture_end(nullptr, nullptr); });
      Call("tidepool_capture_abandon", kIA, [] { return tidepool_capture_abandon(nullptr); });
      return;
    }
    const size_t index = random_.Below(graphs_.size());
    const MGraph graph = graphs_[index];
    const uint64_t pick = random_.Below(100);
    if (pick < 40) {
      void* stream = random_.Chance(0.5) ? streams_[graph.device] : kBogusStream;
      rep_.Begin(step_, absl::StrFormat("tidepool_graph_launch(graph of %s, %s)",
                                        IdText(graph.pool), StreamName(stream)));
      Call("tidepool_graph_launch", stream == kBogusStream ? kIA : kOK,
           [&] { return tidepool_graph_launch(graph.handle, stream); });
    } else if (pick < 55) {
      tidepool_pool_id pool{};
      rep_.Begin(step_, "tidepool_graph_pool");
      Call(
          "tidepool_graph_pool", kOK, [&] { return tidepool_graph_pool(graph.handle, &pool); },
          true, true);
      if (!SamePool(pool, graph.pool)) rep_.Fail("tidepool_graph_pool is wrong");
    } else {
      DestroyGraph(index);
    }
  }

  void OpGraphPoolCreate() {
    const int device = RandomDevice();
    int own_graph_pools = 0;
    for (const auto& [key, pool] : pools_)
      own_graph_pools += !pool.shared && pool.id.first != 0 && pool.refs > 0;
    if (own_graph_pools >= 4) {
      // Release one instead.
      for (const auto& [key, pool] : pools_) {
        if (pool.shared || pool.id.first == 0 || pool.refs == 0) continue;
        const int d = key.device;
        const tidepool_pool_id id = pool.id;
        rep_.Begin(step_,
                   absl::StrFormat("tidepool_release_pool(%d, %s) [graph pool]", d, IdText(id)));
        if (Call("tidepool_release_pool", ReleaseCodes(d, id),
                 [&] { return tidepool_release_pool(d, id); }) == TIDEPOOL_OK) {
          Released(d, id);
        }
        return;
      }
      return;
    }
    tidepool_pool_id pool{};
    rep_.Begin(step_, absl::StrFormat("tidepool_graph_pool_create(%d, &pool)", device));
    Call("tidepool_graph_pool_create", kOK,
         [&] { return tidepool_graph_pool_create(device, &pool); });
    if (pool.first == 0 || pool.second != 0)
      rep_.Fail("tidepool_graph_pool_create made no graph id");
    pools_[KeyOf(device, pool)] = WPool{device, pool, false, 1};
    // A trim of a graph pool something holds is refused.
    rep_.Begin(step_, absl::StrFormat("tidepool_trim_pool(%d, %s) [held graph pool]", device,
                                      IdText(pool)));
    Call("tidepool_trim_pool", kFP, [&] { return tidepool_trim_pool(device, pool); });
  }

  // --- The end ---------------------------------------------------------------------------------

  // Frees most blocks (the main thread frees the rest), ends most routes, releases most references;
  // what is left open is what thread exit must clean up.
  void Finish() {
    step_ = steps_per_phase_ * phases_ + 1;
    EndCaptures();
    // Everyone routes outlive their thread (docs/pools.md rule 10): end them all, and drop what
    // this thread holds of the race pools.
    for (int i = static_cast<int>(routes_.size()) - 1; i >= 0; --i) {
      if (routes_[i].kind != TIDEPOOL_ROUTE_EVERYONE) continue;
      const WRoute route = routes_[i];
      rep_.Begin(step_, absl::StrFormat("finish: tidepool_end_allocate_to_pool(%d, %s) [race pool]",
                                        route.device, IdText(route.pool)));
      Call(
          "tidepool_end_allocate_to_pool", kOK,
          [&] { return tidepool_end_allocate_to_pool(route.device, route.pool); }, false);
      routes_.erase(routes_.begin() + i);
    }
    for (const tidepool_pool_id& id : s_.race_pools) {
      const int device = s_.race_device;
      WPool& pool = *FindPool(device, id);
      for (; pool.refs > 0; --pool.refs) {
        rep_.Begin(step_, absl::StrFormat("finish: tidepool_release_pool(%d, %s) [race pool]",
                                          device, IdText(id)));
        Call(
            "tidepool_release_pool", kOK, [&] { return tidepool_release_pool(device, id); }, false);
      }
    }
    while (!graphs_.empty()) DestroyGraph(graphs_.size() - 1);
    std::vector<WBlock> all;
    for (const auto& [address, block] : blocks_) all.push_back(block);
    for (const WBlock& block : all) {
      if (random_.Chance(0.85)) FreeBlock(block, "finish: ");
    }
    while (!routes_.empty() && random_.Chance(0.8)) {
      const WRoute route = routes_.back();
      const int target = EndTarget(route.device, route.pool);
      rep_.Begin(step_, absl::StrFormat("finish: tidepool_end_allocate_to_pool(%d, %s)",
                                        route.device, IdText(route.pool)));
      Call(
          "tidepool_end_allocate_to_pool", kOK,
          [&] { return tidepool_end_allocate_to_pool(route.device, route.pool); }, false);
      routes_.erase(routes_.begin() + target);
    }
    for (auto& [key, pool] : pools_) {
      while (pool.refs > RoutesTo(key.device, pool.id) && random_.Chance(0.8)) {
        const int device = key.device;
        const tidepool_pool_id id = pool.id;
        rep_.Begin(step_,
                   absl::StrFormat("finish: tidepool_release_pool(%d, %s)", device, IdText(id)));
        Call(
            "tidepool_release_pool", kOK, [&] { return tidepool_release_pool(device, id); }, false);
        --pool.refs;
        AfterPoolChange(device, id);
      }
    }
  }

  Shared& s_;
  World& w_;
  const int index_;
  Random random_;
  Reporter rep_;
  const int64_t steps_per_phase_;
  const int phases_;
  const std::vector<void*> streams_;  // this thread's own stream on each device
  int64_t step_ = 0;
  bool failed_ = false;
  std::map<uintptr_t, WBlock> blocks_;
  std::map<uintptr_t, MFreed> freed_;  // exclusive blocks only
  std::map<Key, WPool> pools_;
  std::vector<WRoute> routes_;
  uint64_t next_seq_ = 1;
  std::vector<WCapture> captures_;
  std::vector<MGraph> graphs_;
  size_t my_device_bytes_ = 0;
  bool holding_guard_ = false;  // this thread holds Shared::release_guard alone
  std::map<std::string, int64_t> outcomes_;
};

// The whole model of the concurrent mode, checked by the main thread while every worker waits at
// the barrier (or has exited): statistics per device and per pool against every thread's blocks,
// references and routes, overlaps across threads, pool_of of every block, the simulated devices
// and the callbacks.
void CheckQuiescent(Shared& shared, const std::vector<std::unique_ptr<Worker>>& workers,
                    Reporter& rep) {
  World& w = shared.world;
  for (const std::string& violation : CallbackRegistry::Get().TakeViolations()) {
    rep.Fail(absl::StrCat("segment callback contract: ", violation));
  }
  struct Sums {
    int64_t requested = 0;
    int64_t allocated = 0;
    int64_t active = 0;
  };
  struct Expected {
    int64_t refs = 0;
    int64_t routes = 0;
    CallbackPool* callback = nullptr;
  };
  std::vector<Sums> by_device(w.devices);
  std::map<Key, Sums> by_pool;
  std::map<uintptr_t, std::pair<WBlock, int>> all;
  std::map<Key, Expected> pools;
  for (int device = 0; device < w.devices; ++device) {
    pools[KeyOf(device, kDefaultPool)] = Expected{};
    pools[KeyOf(device, shared.shared_plain[device])] = Expected{1, 0, nullptr};
    pools[KeyOf(device, shared.shared_callback[device])] =
        Expected{1, 0, shared.shared_callback_context[device]};
  }
  for (const tidepool_pool_id& id : shared.race_pools) {
    pools[KeyOf(shared.race_device, id)] = Expected{};  // nobody but the threads holds them
  }
  for (const auto& worker : workers) {
    for (const auto& [address, block] : worker->blocks()) {
      for (Sums* sums : {&by_device[block.device], &by_pool[KeyOf(block.device, block.pool)]}) {
        sums->requested += block.requested;
        sums->allocated += block.size;
        ++sums->active;
      }
      if (!all.emplace(address, std::make_pair(block, worker->index())).second) {
        rep.Fail(absl::StrFormat("threads %d and %d both hold a block at %#x", worker->index(),
                                 all.at(address).second, address));
      }
    }
    for (const auto& [key, pool] : worker->pools()) {
      Expected& expected = pools[key];
      expected.routes += worker->RoutesTo(key.device, pool.id);
      if (pool.shared) {
        expected.refs += pool.refs;
      } else if (!IsDefault(pool.id)) {
        expected.refs = pool.refs;
        expected.callback = pool.callback;
      }
    }
  }
  uintptr_t end = 0;
  for (const auto& [address, entry] : all) {
    if (address < end) {
      rep.Fail(absl::StrFormat("block %#x of thread %d overlaps the block before it", address,
                               entry.second));
    }
    end = address + entry.first.size;
  }
  for (int device = 0; device < w.devices; ++device) {
    std::string json;
    Stats stats;
    if (ReadJson(false, device, nullptr, &json) != TIDEPOOL_OK || !ParseStats(json, &stats)) {
      rep.Fail("device statistics unreadable");
    }
    const Sums& sums = by_device[device];
    if (stats.requested != sums.requested || stats.allocated != sums.allocated ||
        stats.active != sums.active || stats.reserved < stats.allocated) {
      std::string snapshot;
      ReadJson(true, device, nullptr, &snapshot);
      std::map<uintptr_t, std::pair<size_t, int>> recorded;
      for (const auto& [address, entry] : all) {
        if (entry.first.device == device) recorded[address] = {entry.first.size, entry.second};
      }
      rep.Fail(absl::StrFormat(
          "device %d's statistics say requested %d, allocated %d, active %d, reserved %d; the "
          "threads' blocks %d, %d, %d; where the snapshot differs from the threads' record: %s",
          device, stats.requested, stats.allocated, stats.active, stats.reserved, sums.requested,
          sums.allocated, sums.active, SnapshotDifferences(snapshot, recorded)));
    }
    SimulatedDevice& sim = *w.sims[device];
    int64_t graphs = 0;
    for (const auto& worker : workers) graphs += worker->GraphsOn(device);
    if (w.managers[device]->allocator()->captures_underway() != 0 || sim.live_graphs() != graphs ||
        sim.capture_violations() != 0 || sim.destroyed_stream_uses() != 0) {
      rep.Fail(absl::StrFormat(
          "device %d: %d captures under way (none expected), %d graphs (%d expected), %d capture "
          "violations, %d destroyed stream uses",
          device, w.managers[device]->allocator()->captures_underway(), sim.live_graphs(), graphs,
          sim.capture_violations(), sim.destroyed_stream_uses()));
    }
    int64_t pools_reserved = 0;
    for (const auto& [key, expected] : pools) {
      if (key.device != device) continue;
      const tidepool_pool_id id{key.first, key.second};
      const Sums& pool_sums = by_pool[key];
      absl::StatusOr<PoolInfo> info = w.managers[device]->Info(ToPoolId(id));
      if (absl::IsNotFound(info.status()) && expected.refs == 0 && expected.routes == 0 &&
          pool_sums.active == 0) {
        continue;  // a race pool nobody has begun yet
      }
      std::string pool_json;
      Stats pool_stats;
      if (ReadJson(false, device, &id, &pool_json) != TIDEPOOL_OK ||
          !ParseStats(pool_json, &pool_stats)) {
        rep.Fail(absl::StrCat("statistics of pool ", IdText(id),
                              " unreadable: ", tidepool_last_error()));
      }
      const bool released = !IsDefault(id) && expected.refs == 0;
      const bool gone = released && pool_sums.active == 0;
      if (pool_stats.requested != pool_sums.requested ||
          pool_stats.allocated != pool_sums.allocated || pool_stats.active != pool_sums.active ||
          pool_stats.reserved < pool_stats.allocated || !info.ok() ||
          info->references != expected.refs || info->routes != expected.routes ||
          info->live_blocks != pool_sums.active || info->released != released ||
          info->gone != gone || (gone && pool_stats.reserved != 0)) {
        rep.Fail(absl::StrFormat(
            "pool %s of device %d: requested %d allocated %d active %d reserved %d, references %d "
            "routes %d live %d released %d gone %d; the threads' model: %d %d %d, references %d "
            "routes %d, released %d gone %d",
            IdText(id), device, pool_stats.requested, pool_stats.allocated, pool_stats.active,
            pool_stats.reserved, info.ok() ? info->references : -1, info.ok() ? info->routes : -1,
            info.ok() ? info->live_blocks : -1, info.ok() && info->released,
            info.ok() && info->gone, pool_sums.requested, pool_sums.allocated, pool_sums.active,
            expected.refs, expected.routes, released, gone));
      }
      if (expected.callback != nullptr &&
          static_cast<size_t>(pool_stats.reserved) !=
              CallbackRegistry::Get().LiveBytes(expected.callback)) {
        rep.Fail(
            absl::StrFormat("callback pool %s of device %d reserves %d; its callbacks handed "
                            "out %u",
                            IdText(id), device, pool_stats.reserved,
                            CallbackRegistry::Get().LiveBytes(expected.callback)));
      }
      pools_reserved += pool_stats.reserved;
    }
    // Every other pool the device has had (the serial test's) is gone and holds nothing.
    const size_t callback_bytes = CallbackRegistry::Get().LiveBytesOn(device);
    if (pools_reserved != stats.reserved ||
        static_cast<int64_t>(sim.used_bytes()) !=
            stats.reserved - static_cast<int64_t>(callback_bytes)) {
      rep.Fail(absl::StrFormat(
          "device %d reserves %d bytes; the threads' pools together %d; the simulated device "
          "holds %u and callbacks handed out %u",
          device, stats.reserved, pools_reserved, sim.used_bytes(), callback_bytes));
    }
  }
  for (const auto& [address, entry] : all) {
    const WBlock& block = entry.first;
    int device = -1;
    tidepool_pool_id pool{};
    const tidepool_status status =
        tidepool_pool_of(reinterpret_cast<void*>(address), &device, &pool);
    if (status != TIDEPOOL_OK || device != block.device || !SamePool(pool, block.pool)) {
      rep.Fail(absl::StrFormat(
          "tidepool_pool_of(%#x) of thread %d -> %s, device %d, pool %s; the model: device %d, "
          "pool %s (%s)",
          address, entry.second, CodeName(status), device, IdText(pool), block.device,
          IdText(block.pool), status == TIDEPOOL_OK ? "" : tidepool_last_error()));
    }
  }
  if (shared.blocks.ListedCount() != all.size()) {
    rep.Fail(absl::StrFormat("%u blocks listed, the threads hold %u", shared.blocks.ListedCount(),
                             all.size()));
  }
}

// --- The tests -------------------------------------------------------------------------------

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TEST_CASE("fuzz: serial, every step checked against the model") {
  World& world = TheWorld();
  const FuzzOptions& options = world.options;
  std::printf(
      "tidepool fuzz serial: seed %llu (TIDEPOOL_FUZZ_SEED), %lld steps (TIDEPOOL_FUZZ_STEPS)\n",
      static_cast<unsigned long long>(options.seed), static_cast<long long>(options.serial_steps));
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  SerialFuzzer fuzzer(world, options.seed, options.serial_steps);
  std::string failure;
  try {
    fuzzer.Run();
  } catch (const FuzzFailure& caught) {
    failure = caught.message;
  }
  std::printf("tidepool fuzz serial: %s after %.2f s, %lld checked C calls; outcomes:\n%s%s",
              failure.empty() ? "passed" : "FAILED", SecondsSince(start),
              static_cast<long long>(fuzzer.Calls()), fuzzer.Summary().c_str(), failure.c_str());
  std::fflush(stdout);
  if (!failure.empty()) FAIL(failure);
}

TEST_CASE("fuzz: concurrent threads, each with its own model, checked at quiescent points") {
  World& world = TheWorld();
  const FuzzOptions& options = world.options;
  const int threads = options.threads;
  const int phases = options.phases;
  const int64_t steps_per_phase =
      std::max<int64_t>(1, (options.thread_steps + phases - 1) / phases);
  std::printf(
      "tidepool fuzz concurrent: seed %llu (TIDEPOOL_FUZZ_SEED), %d threads "
      "(TIDEPOOL_FUZZ_THREADS) x %lld steps (TIDEPOOL_FUZZ_THREAD_STEPS) in %d phases "
      "(TIDEPOOL_FUZZ_PHASES)\n",
      static_cast<unsigned long long>(options.seed), threads,
      static_cast<long long>(steps_per_phase * phases), phases);
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  Shared shared(world, threads);
  Reporter rep("concurrent (main thread)", options.seed, options.seed, -1, phases, options.trace,
               options.Reproduce("fuzz: concurrent*"));
  // The serial test case must have left nothing behind (if it failed, it did: fix that first).
  for (int device = 0; device < world.devices; ++device) {
    std::string json;
    Stats stats;
    REQUIRE(ReadJson(false, device, nullptr, &json) == TIDEPOOL_OK);
    REQUIRE(ParseStats(json, &stats));
    INFO("device " << device
                   << " before the concurrent mode (an earlier test case that failed "
                      "leaves its blocks, routes and captures): "
                   << json);
    REQUIRE(stats.active == 0);
    REQUIRE(stats.reserved == 0);
    REQUIRE(world.managers[device]->allocator()->captures_underway() == 0);
  }

  // The pools every thread shares; the main thread holds one reference to each throughout.
  for (int device = 0; device < world.devices; ++device) {
    tidepool_pool_id plain{};
    TIDEPOOL_REQUIRE_OK(tidepool_new_pool_id(&plain));
    TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(device, plain));
    TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(device, plain));
    tidepool_pool_id with_callbacks{};
    TIDEPOOL_REQUIRE_OK(tidepool_new_pool_id(&with_callbacks));
    CallbackPool* context =
        CallbackRegistry::Get().NewPool(device, with_callbacks, device % 3, size_t{1} << 40);
    TIDEPOOL_REQUIRE_OK(tidepool_create_callback_pool(device, with_callbacks, FuzzAllocSegment,
                                                      FuzzFreeSegment, context));
    shared.shared_plain.push_back(plain);
    shared.shared_callback.push_back(with_callbacks);
    shared.shared_callback_context.push_back(context);
  }
  if (world.devices > 1) {
    shared.race_device = world.devices - 1;
    for (int i = 0; i < 2; ++i) {
      tidepool_pool_id race{};
      TIDEPOOL_REQUIRE_OK(tidepool_new_pool_id(&race));
      shared.race_pools.push_back(race);
    }
  }
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < threads; ++i) {
    std::vector<void*> streams;
    for (int device = 0; device < world.devices; ++device) {
      absl::StatusOr<Stream> stream = world.sims[device]->CreateStream();
      REQUIRE(stream.ok());
      streams.push_back(*stream);
    }
    const uint64_t seed = options.seed * 1000003 + static_cast<uint64_t>(i) + 1;
    workers.push_back(
        std::make_unique<Worker>(shared, i, seed, steps_per_phase, phases, std::move(streams)));
  }
  std::vector<std::thread> running;
  for (auto& worker : workers) running.emplace_back([&worker] { worker->Run(); });
  for (int phase = 0; phase < phases; ++phase) {
    shared.barrier.ArriveAndWait();
    if (!shared.stop.load()) {
      rep.Begin(phase + 1, absl::StrFormat("quiescent check after phase %d", phase + 1));
      try {
        CheckQuiescent(shared, workers, rep);
      } catch (const FuzzFailure& failure) {
        shared.Failed(failure.message);
      }
    }
    shared.barrier.ArriveAndWait();
  }
  for (std::thread& thread : running) thread.join();

  if (!shared.stop.load()) {
    try {
      // The threads have exited: the routes they left open were ended, their references dropped.
      for (auto& worker : workers) worker->ApplyThreadExit();
      rep.Begin(phases + 1, "check after every thread exited");
      CheckQuiescent(shared, workers, rep);
      // The main thread frees what the threads left, and drops every reference left.
      for (auto& worker : workers) {
        for (const auto& [address, block] : worker->blocks()) {
          rep.Begin(phases + 1, absl::StrFormat("main: tidepool_free(%#x) of thread %d", address,
                                                worker->index()));
          shared.blocks.Unlist(address);
          const tidepool_status status = tidepool_free(reinterpret_cast<void*>(address));
          if (status != TIDEPOOL_OK) {
            rep.Fail(absl::StrCat("-> ", CodeName(status), ": ", tidepool_last_error()));
          }
        }
        for (const auto& [key, pool] : worker->pools()) {
          if (pool.shared) continue;
          for (int64_t i = 0; i < pool.refs; ++i) {
            rep.Begin(phases + 1,
                      absl::StrFormat("main: tidepool_release_pool(%d, %s) of thread %d",
                                      key.device, IdText(pool.id), worker->index()));
            const tidepool_status status = tidepool_release_pool(key.device, pool.id);
            if (status != TIDEPOOL_OK) {
              rep.Fail(absl::StrCat("-> ", CodeName(status), ": ", tidepool_last_error()));
            }
          }
        }
      }
      for (int device = 0; device < world.devices; ++device) {
        for (const tidepool_pool_id& id :
             {shared.shared_plain[device], shared.shared_callback[device]}) {
          int64_t refs = 1;
          for (const auto& worker : workers) refs += worker->pools().at(KeyOf(device, id)).refs;
          for (int64_t i = 0; i < refs; ++i) {
            rep.Begin(phases + 1, absl::StrFormat("main: tidepool_release_pool(%d, %s) [shared]",
                                                  device, IdText(id)));
            const tidepool_status status = tidepool_release_pool(device, id);
            if (status != TIDEPOOL_OK) {
              rep.Fail(absl::StrCat("-> ", CodeName(status), ": ", tidepool_last_error()));
            }
          }
        }
        rep.Begin(phases + 1, absl::StrFormat("main: tidepool_empty_cache(%d)", device));
        const tidepool_status status = tidepool_empty_cache(device);
        if (status != TIDEPOOL_OK) {
          rep.Fail(absl::StrCat("-> ", CodeName(status), ": ", tidepool_last_error()));
        }
      }
      rep.Begin(phases + 1, "everything went back");
      SerialFuzzer::CheckAllBack(world, rep);
    } catch (const FuzzFailure& failure) {
      shared.Failed(failure.message);
    }
  }
  std::map<std::string, int64_t> outcomes;
  int64_t steps = 0;
  for (const auto& worker : workers) {
    steps += worker->steps();
    for (const auto& [what, count] : worker->outcomes()) outcomes[what] += count;
  }
  std::string summary;
  int64_t calls = 0;
  for (const auto& [what, count] : outcomes) {
    absl::StrAppendFormat(&summary, "    %s: %d\n", what, count);
    calls += count;
  }
  std::printf(
      "tidepool fuzz concurrent: %s after %.2f s, %lld steps in all, %lld checked C calls; "
      "outcomes:\n%s%s",
      shared.failure.empty() ? "passed" : "FAILED", SecondsSince(start),
      static_cast<long long>(steps), static_cast<long long>(calls), summary.c_str(),
      shared.failure.c_str());
  std::fflush(stdout);
  if (!shared.failure.empty()) FAIL(shared.failure);
}

}  // namespace
}  // namespace tidepool
