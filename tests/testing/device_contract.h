// The device contract: what the caching core, graph/ and the runtime rely on from a device,
// written once and checked against every implementation of the seam (allocator/device.h,
// allocator/graph_device.h).
//
// The caching core is tested on the simulated device and run on the CUDA one, so the two must
// agree wherever the core looks. Each clause below is one promise, checked the same way on both:
// tests/allocator/device_contract_test runs them on SimulatedDevice (and on a ForwardingDevice
// over it), tests/gpu/device_contract_test on CudaDevice. A clause answers in text (its
// findings, empty when the device keeps it), not in Catch2 assertions, so the CPU test can also
// hand each clause a device broken on purpose and require a finding: no clause passes
// vacuously.
//
// A device under test is described by a `Subject`; a test names its devices by factory types,
// each with
//
//   static constexpr const char* kName;   // the device, for messages
//   Factory();                            // makes a fresh device; REQUIREs success, saying why
//   Subject subject();                    // the device and its hooks, owned by the factory
//
// and runs RunDeviceContract<Factory>() in a TEMPLATE_TEST_CASE: every clause on a fresh device
// of its own, one Catch2 section each.
//
// Only the capacity clause depends on the device's size: it takes all of the device's memory, so
// it runs only where `exhaustible_capacity` is set (a simulated device). A real GPU is never
// exhausted (other processes share it, and a 141 GB H200 would take minutes); the section says,
// as a warning, that the clause was not run there. Every other clause runs on every device:
// a single request larger than the whole device is refused with RESOURCE_EXHAUSTED on a GPU too.
#ifndef TIDEPOOL_TESTS_TESTING_DEVICE_CONTRACT_H_
#define TIDEPOOL_TESTS_TESTING_DEVICE_CONTRACT_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "catch2/catch.hpp"

namespace tidepool {
namespace testing {
namespace device_contract {

constexpr size_t kMiB = size_t{1} << 20;
// cuMemAlloc's promise for a plain segment's address.
constexpr uintptr_t kSegmentAlignment = 256;

// A device under test and what the contract needs besides the seam itself.
struct Subject {
  GraphDevice* device = nullptr;
  // The device's whole memory when a check may take all of it (a small simulated device); 0 for
  // a device that must never be exhausted (a real GPU).
  size_t exhaustible_capacity = 0;
  // Queues work on `stream` that is still pending when the call returns, and stays pending until
  // something synchronizes it (simulated: one unit on the stream's logical clock) or for a few
  // hundred milliseconds (CUDA: a spin kernel). Queued on a capturing stream, it is captured.
  std::function<absl::Status(Stream)> queue_work;
};

// What a clause found wrong, in words.
class Findings {
 public:
  void Add(std::string finding) { list_.push_back(std::move(finding)); }
  // A finding `what` unless `kept`.
  void Expect(bool kept, absl::string_view what) {
    if (!kept) Add(std::string(what));
  }
  // A finding when `call` failed; returns whether it succeeded.
  bool Ok(const absl::Status& status, absl::string_view call) {
    if (status.ok()) return true;
    Add(absl::StrCat(call, " failed: ", status.ToString()));
    return false;
  }
  template <typename T>
  bool Ok(const absl::StatusOr<T>& result, absl::string_view call) {
    return Ok(result.status(), call);
  }
  // A finding unless `status` has `code` (the call was expected to be refused that way).
  void ExpectCode(const absl::Status& status, absl::StatusCode code, absl::string_view call) {
    if (status.code() == code) return;
    Add(absl::StrCat(call, " should fail with ", absl::StatusCodeToString(code), ", got ",
                     status.ToString()));
  }

  bool empty() const { return list_.empty(); }
  const std::vector<std::string>& list() const { return list_; }
  std::string ToString() const { return absl::StrJoin(list_, "\n"); }

 private:
  std::vector<std::string> list_;
};

inline bool IsPowerOfTwo(size_t n) { return n != 0 && (n & (n - 1)) == 0; }

inline size_t RoundUpTo(size_t n, size_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Sets `*free_bytes` to the device's free bytes and returns true; a finding and false when
// GetMemoryInfo fails.
inline bool FreeBytes(GraphDevice& device, Findings& findings, size_t* free_bytes) {
  absl::StatusOr<MemoryInfo> info = device.GetMemoryInfo();
  if (!findings.Ok(info, "GetMemoryInfo()")) return false;
  *free_bytes = info->free_bytes;
  return true;
}

// A stream made for a clause, synchronized and destroyed at the end of the clause.
class ScopedStream {
 public:
  ScopedStream(GraphDevice& device, Findings& findings) : device_(device) {
    absl::StatusOr<Stream> made = device.CreateStream();
    if (findings.Ok(made, "CreateStream()")) stream_ = *made;
  }
  ~ScopedStream() {
    if (stream_ == nullptr) return;
    device_.SynchronizeStream(stream_).IgnoreError();
    device_.DestroyStream(stream_).IgnoreError();
  }
  ScopedStream(const ScopedStream&) = delete;
  ScopedStream& operator=(const ScopedStream&) = delete;

  bool ok() const { return stream_ != nullptr; }
  Stream get() const { return stream_; }
  // Synchronizes and destroys the stream now, as part of the clause.
  void Destroy(Findings& findings) {
    if (stream_ == nullptr) return;
    findings.Ok(device_.SynchronizeStream(stream_), "SynchronizeStream()");
    findings.Ok(device_.DestroyStream(stream_), "DestroyStream()");
    stream_ = nullptr;
  }

 private:
  GraphDevice& device_;
  Stream stream_ = nullptr;
};

// An event made for a clause, destroyed at the end of the clause.
class ScopedEvent {
 public:
  ScopedEvent(GraphDevice& device, Findings& findings) : device_(device) {
    absl::StatusOr<Event> made = device.CreateEvent();
    if (findings.Ok(made, "CreateEvent()")) {
      event_ = *made;
      made_ = true;
    }
  }
  ~ScopedEvent() {
    if (made_) device_.DestroyEvent(event_).IgnoreError();
  }
  ScopedEvent(const ScopedEvent&) = delete;
  ScopedEvent& operator=(const ScopedEvent&) = delete;

  bool ok() const { return made_; }
  Event get() const { return event_; }
  void Destroy(Findings& findings) {
    if (!made_) return;
    findings.Ok(device_.DestroyEvent(event_), "DestroyEvent()");
    made_ = false;
  }

 private:
  GraphDevice& device_;
  Event event_ = nullptr;
  bool made_ = false;
};

// QueryEvent's answer, or a finding (and `fallback`) when the query fails.
inline bool QueryOr(GraphDevice& device, Event event, Findings& findings, absl::string_view when,
                    bool fallback) {
  absl::StatusOr<bool> done = device.QueryEvent(event);
  if (!findings.Ok(done, absl::StrCat("QueryEvent() ", when))) return fallback;
  return *done;
}

// --- The clauses ---------------------------------------------------------------------------------

// granularity() is a power of two, and fixed.
inline void CheckGranularity(const Subject& subject, Findings& findings) {
  const size_t g = subject.device->granularity();
  findings.Expect(IsPowerOfTwo(g),
                  absl::StrFormat("granularity() is %u, not a power of two", g));
  findings.Expect(subject.device->granularity() == g, "granularity() changed between two calls");
}

// GetMemoryInfo: a total that is not zero, never less free than total, and a fixed total.
inline void CheckMemoryInfo(const Subject& subject, Findings& findings) {
  absl::StatusOr<MemoryInfo> info = subject.device->GetMemoryInfo();
  if (!findings.Ok(info, "GetMemoryInfo()")) return;
  findings.Expect(info->total_bytes > 0, "GetMemoryInfo(): total_bytes is 0");
  findings.Expect(info->free_bytes <= info->total_bytes,
                  absl::StrFormat("GetMemoryInfo(): free_bytes %u is more than total_bytes %u",
                                  info->free_bytes, info->total_bytes));
  absl::StatusOr<MemoryInfo> again = subject.device->GetMemoryInfo();
  if (!findings.Ok(again, "GetMemoryInfo() again")) return;
  findings.Expect(again->total_bytes == info->total_bytes,
                  absl::StrFormat("GetMemoryInfo(): total_bytes changed from %u to %u",
                                  info->total_bytes, again->total_bytes));
}

// AllocateSegment / FreeSegment: aligned, disjoint segments that take device memory while held
// and give it back when freed.
inline void CheckPlainSegments(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  // The sizes the core asks for: 2 MiB (small requests) and a multiple of 2 MiB.
  const size_t small = 2 * kMiB;
  const size_t large = 6 * kMiB;
  size_t free_before = 0;
  if (!FreeBytes(device, findings, &free_before)) return;

  absl::StatusOr<uintptr_t> a = device.AllocateSegment(small);
  if (!findings.Ok(a, "AllocateSegment(2 MiB)")) return;
  absl::Cleanup free_a = [&] { device.FreeSegment(*a, small).IgnoreError(); };
  absl::StatusOr<uintptr_t> b = device.AllocateSegment(large);
  if (!findings.Ok(b, "AllocateSegment(6 MiB)")) return;
  absl::Cleanup free_b = [&] { device.FreeSegment(*b, large).IgnoreError(); };

  findings.Expect(*a % kSegmentAlignment == 0,
                  absl::StrFormat("AllocateSegment(2 MiB) gave %#x, not %u-byte aligned", *a,
                                  kSegmentAlignment));
  findings.Expect(*b % kSegmentAlignment == 0,
                  absl::StrFormat("AllocateSegment(6 MiB) gave %#x, not %u-byte aligned", *b,
                                  kSegmentAlignment));
  findings.Expect(*a + small <= *b || *b + large <= *a,
                  absl::StrFormat("two live segments overlap: [%#x, +%u) and [%#x, +%u)", *a,
                                  small, *b, large));
  size_t free_held = 0;
  if (FreeBytes(device, findings, &free_held)) {
    findings.Expect(free_held + small + large <= free_before,
                    absl::StrFormat("free bytes went from %u to %u while 8 MiB of segments were "
                                    "held: segments must take device memory",
                                    free_before, free_held));
  }

  std::move(free_a).Cancel();
  std::move(free_b).Cancel();
  findings.Ok(device.FreeSegment(*a, small), "FreeSegment(2 MiB)");
  findings.Ok(device.FreeSegment(*b, large), "FreeSegment(6 MiB)");
  size_t free_after = 0;
  if (FreeBytes(device, findings, &free_after)) {
    findings.Expect(free_after >= free_held + small + large,
                    absl::StrFormat("free bytes %u after FreeSegment, %u while held: freed "
                                    "segments must give their memory back",
                                    free_after, free_held));
  }
}

// A single request larger than the whole device is RESOURCE_EXHAUSTED (the one code the core
// recovers from), for a plain segment and a physical chunk, and leaves the device usable. Safe
// on a real GPU: the driver refuses such a request at once.
inline void CheckOversizeRequests(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  const size_t g = device.granularity();
  absl::StatusOr<MemoryInfo> info = device.GetMemoryInfo();
  if (!findings.Ok(info, "GetMemoryInfo()") || g == 0) return;
  const size_t too_much = RoundUpTo(info->total_bytes + g, g);

  absl::StatusOr<uintptr_t> segment = device.AllocateSegment(too_much);
  if (segment.ok()) {
    findings.Add(absl::StrFormat("AllocateSegment(%u) succeeded on a device of %u bytes",
                                 too_much, info->total_bytes));
    device.FreeSegment(*segment, too_much).IgnoreError();
  } else {
    findings.ExpectCode(segment.status(), absl::StatusCode::kResourceExhausted,
                        "AllocateSegment(more than the device has)");
  }
  absl::StatusOr<PhysicalHandle> chunk = device.CreatePhysical(too_much);
  if (chunk.ok()) {
    findings.Add(absl::StrFormat("CreatePhysical(%u) succeeded on a device of %u bytes",
                                 too_much, info->total_bytes));
    device.ReleasePhysical(*chunk).IgnoreError();
  } else {
    findings.ExpectCode(chunk.status(), absl::StatusCode::kResourceExhausted,
                        "CreatePhysical(more than the device has)");
  }
  // The refusals left the device usable.
  absl::StatusOr<uintptr_t> small = device.AllocateSegment(2 * kMiB);
  if (findings.Ok(small, "AllocateSegment(2 MiB) after the refusals")) {
    findings.Ok(device.FreeSegment(*small, 2 * kMiB), "FreeSegment(2 MiB)");
  }
}

// Virtual memory: ranges and chunks in granularity multiples (others refused with
// INVALID_ARGUMENT), aligned disjoint ranges that take no memory, chunks that do, one Unmap
// across several mappings, a chunk mapped again elsewhere, and everything given back.
inline void CheckVirtualMemory(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  const size_t g = device.granularity();
  if (g < 2) {
    findings.Add(absl::StrFormat("granularity() is %u: no multiple can be told apart", g));
    return;
  }
  const size_t not_multiple = g + g / 2;
  absl::StatusOr<uintptr_t> odd_range = device.ReserveAddressRange(not_multiple);
  if (odd_range.ok()) {
    findings.Add(absl::StrFormat("ReserveAddressRange(%u) succeeded; granularity is %u",
                                 not_multiple, g));
    device.ReleaseAddressRange(*odd_range, not_multiple).IgnoreError();
  } else {
    findings.ExpectCode(odd_range.status(), absl::StatusCode::kInvalidArgument,
                        "ReserveAddressRange(not a multiple of the granularity)");
  }
  absl::StatusOr<PhysicalHandle> odd_chunk = device.CreatePhysical(g / 2);
  if (odd_chunk.ok()) {
    findings.Add(absl::StrFormat("CreatePhysical(%u) succeeded; granularity is %u", g / 2, g));
    device.ReleasePhysical(*odd_chunk).IgnoreError();
  } else {
    findings.ExpectCode(odd_chunk.status(), absl::StatusCode::kInvalidArgument,
                        "CreatePhysical(not a multiple of the granularity)");
  }

  size_t free_before = 0;
  if (!FreeBytes(device, findings, &free_before)) return;
  absl::StatusOr<uintptr_t> range = device.ReserveAddressRange(4 * g);
  if (!findings.Ok(range, "ReserveAddressRange(4 granules)")) return;
  absl::Cleanup release_range = [&] { device.ReleaseAddressRange(*range, 4 * g).IgnoreError(); };
  absl::StatusOr<uintptr_t> other = device.ReserveAddressRange(2 * g);
  if (!findings.Ok(other, "ReserveAddressRange(2 granules)")) return;
  absl::Cleanup release_other = [&] { device.ReleaseAddressRange(*other, 2 * g).IgnoreError(); };
  findings.Expect(*range % g == 0 && *other % g == 0,
                  absl::StrFormat("reserved ranges at %#x and %#x: not aligned to the "
                                  "granularity %u",
                                  *range, *other, g));
  findings.Expect(*range + 4 * g <= *other || *other + 2 * g <= *range,
                  "two reserved ranges overlap");
  size_t free_reserved = 0;
  if (FreeBytes(device, findings, &free_reserved)) {
    findings.Expect(free_reserved + g >= free_before,
                    absl::StrFormat("free bytes went from %u to %u for a reservation: address "
                                    "space must take no memory",
                                    free_before, free_reserved));
  }

  absl::StatusOr<PhysicalHandle> one = device.CreatePhysical(g);
  if (!findings.Ok(one, "CreatePhysical(1 granule)")) return;
  absl::Cleanup release_one = [&] { device.ReleasePhysical(*one).IgnoreError(); };
  absl::StatusOr<PhysicalHandle> two = device.CreatePhysical(2 * g);
  if (!findings.Ok(two, "CreatePhysical(2 granules)")) return;
  absl::Cleanup release_two = [&] { device.ReleasePhysical(*two).IgnoreError(); };
  size_t free_chunks = 0;
  if (FreeBytes(device, findings, &free_chunks)) {
    findings.Expect(free_chunks + 3 * g <= free_before,
                    absl::StrFormat("free bytes went from %u to %u while 3 granules of chunks "
                                    "were held: chunks must take device memory",
                                    free_before, free_chunks));
  }

  // [range, +3g): a chunk of one granule, then one of two, mapped separately; then one Unmap
  // across both (the core unmaps whole free runs that way).
  if (!findings.Ok(device.Map(*range, g, *one), "Map(1 granule)")) return;
  absl::Cleanup unmap_one = [&] { device.Unmap(*range, g).IgnoreError(); };
  if (!findings.Ok(device.Map(*range + g, 2 * g, *two), "Map(2 granules) next to it")) return;
  absl::Cleanup unmap_two = [&] { device.Unmap(*range + g, 2 * g).IgnoreError(); };
  std::move(unmap_one).Cancel();
  std::move(unmap_two).Cancel();
  if (!findings.Ok(device.Unmap(*range, 3 * g), "Unmap(3 granules, over two mappings)")) return;
  // A chunk maps again elsewhere in a range (what reclaiming free chunks does).
  if (findings.Ok(device.Map(*range + 3 * g, g, *one), "Map(the first chunk, elsewhere)")) {
    findings.Ok(device.Unmap(*range + 3 * g, g), "Unmap(1 granule)");
  }

  std::move(release_one).Cancel();
  std::move(release_two).Cancel();
  std::move(release_range).Cancel();
  std::move(release_other).Cancel();
  findings.Ok(device.ReleasePhysical(*one), "ReleasePhysical(1 granule)");
  findings.Ok(device.ReleasePhysical(*two), "ReleasePhysical(2 granules)");
  findings.Ok(device.ReleaseAddressRange(*range, 4 * g), "ReleaseAddressRange(4 granules)");
  findings.Ok(device.ReleaseAddressRange(*other, 2 * g), "ReleaseAddressRange(2 granules)");
  size_t free_after = 0;
  if (FreeBytes(device, findings, &free_after)) {
    findings.Expect(free_after + g >= free_before,
                    absl::StrFormat("free bytes %u after everything was released, %u before: "
                                    "released chunks must give their memory back",
                                    free_after, free_before));
  }
}

// Capacity (only on a device small enough to take whole): once the device is full, one more
// chunk or segment is RESOURCE_EXHAUSTED and free bytes are below a granule; a released chunk
// makes room again, and releasing everything gives every byte back.
inline void CheckCapacity(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  const size_t g = device.granularity();
  absl::StatusOr<MemoryInfo> info = device.GetMemoryInfo();
  if (!findings.Ok(info, "GetMemoryInfo()") || g == 0) return;
  findings.Expect(info->total_bytes == subject.exhaustible_capacity,
                  absl::StrFormat("GetMemoryInfo(): total_bytes %u, but the device was made with "
                                  "%u",
                                  info->total_bytes, subject.exhaustible_capacity));
  const size_t granules = info->free_bytes / g;
  if (granules < 2) {
    findings.Add(absl::StrFormat("only %u free granules: too little to check capacity", granules));
    return;
  }
  // All but one granule in one chunk, then the last granule.
  const size_t most = (granules - 1) * g;
  absl::StatusOr<PhysicalHandle> bulk = device.CreatePhysical(most);
  if (!findings.Ok(bulk, "CreatePhysical(all but one granule)")) return;
  absl::Cleanup release_bulk = [&] { device.ReleasePhysical(*bulk).IgnoreError(); };
  absl::StatusOr<PhysicalHandle> last = device.CreatePhysical(g);
  if (!findings.Ok(last, "CreatePhysical(the last granule)")) return;
  absl::Cleanup release_last = [&] { device.ReleasePhysical(*last).IgnoreError(); };

  absl::StatusOr<PhysicalHandle> beyond = device.CreatePhysical(g);
  if (beyond.ok()) {
    findings.Add("CreatePhysical(1 granule) succeeded on a full device");
    device.ReleasePhysical(*beyond).IgnoreError();
  } else {
    findings.ExpectCode(beyond.status(), absl::StatusCode::kResourceExhausted,
                        "CreatePhysical(1 granule) on a full device");
  }
  absl::StatusOr<uintptr_t> segment = device.AllocateSegment(g);
  if (segment.ok()) {
    findings.Add("AllocateSegment(1 granule) succeeded on a full device");
    device.FreeSegment(*segment, g).IgnoreError();
  } else {
    findings.ExpectCode(segment.status(), absl::StatusCode::kResourceExhausted,
                        "AllocateSegment(1 granule) on a full device");
  }
  size_t free_full = 0;
  if (FreeBytes(device, findings, &free_full)) {
    findings.Expect(free_full < g,
                    absl::StrFormat("a full device reports %u free bytes", free_full));
  }

  // Room comes back with a released chunk.
  std::move(release_last).Cancel();
  findings.Ok(device.ReleasePhysical(*last), "ReleasePhysical(the last granule)");
  absl::StatusOr<PhysicalHandle> again = device.CreatePhysical(g);
  if (findings.Ok(again, "CreatePhysical(1 granule) after one was released")) {
    findings.Ok(device.ReleasePhysical(*again), "ReleasePhysical(1 granule)");
  }
  std::move(release_bulk).Cancel();
  findings.Ok(device.ReleasePhysical(*bulk), "ReleasePhysical(all but one granule)");
  size_t free_after = 0;
  if (FreeBytes(device, findings, &free_after)) {
    findings.Expect(free_after == info->free_bytes,
                    absl::StrFormat("free bytes %u after everything was released, %u before",
                                    free_after, info->free_bytes));
  }
}

// Events: a fresh event reports complete; a recorded one is complete exactly when the work
// queued before it is, and SynchronizeEvent, SynchronizeStream and events on the legacy default
// stream behave so; events are destroyed cleanly.
inline void CheckEvents(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  ScopedStream stream(device, findings);
  ScopedEvent a(device, findings);
  ScopedEvent b(device, findings);
  if (!stream.ok() || !a.ok() || !b.ok()) return;
  findings.Expect(a.get() != b.get(), "CreateEvent() gave the same event twice");
  findings.Expect(QueryOr(device, a.get(), findings, "of a fresh event", true),
                  "a fresh event, never recorded, does not report complete");

  // Nothing queued: complete once synchronized.
  if (!findings.Ok(device.RecordEvent(a.get(), stream.get()), "RecordEvent(idle stream)")) return;
  findings.Ok(device.SynchronizeEvent(a.get()), "SynchronizeEvent()");
  findings.Expect(QueryOr(device, a.get(), findings, "after SynchronizeEvent", false),
                  "an event on an idle stream is not complete after SynchronizeEvent");

  // Work queued before the event: pending until synchronized.
  if (!findings.Ok(subject.queue_work(stream.get()), "queueing work")) return;
  if (!findings.Ok(device.RecordEvent(a.get(), stream.get()), "RecordEvent(busy stream)")) return;
  findings.Expect(!QueryOr(device, a.get(), findings, "while work is pending", false),
                  "QueryEvent() says complete while the work recorded before it is pending");
  findings.Ok(device.SynchronizeEvent(a.get()), "SynchronizeEvent()");
  findings.Expect(QueryOr(device, a.get(), findings, "after SynchronizeEvent", false),
                  "QueryEvent() says not complete after SynchronizeEvent()");

  // SynchronizeStream waits for the stream's work.
  if (!findings.Ok(subject.queue_work(stream.get()), "queueing work")) return;
  if (!findings.Ok(device.RecordEvent(b.get(), stream.get()), "RecordEvent(busy stream)")) return;
  findings.Expect(!QueryOr(device, b.get(), findings, "while work is pending", false),
                  "QueryEvent() says complete while the work recorded before it is pending");
  findings.Ok(device.SynchronizeStream(stream.get()), "SynchronizeStream()");
  findings.Expect(QueryOr(device, b.get(), findings, "after SynchronizeStream", false),
                  "QueryEvent() says not complete after SynchronizeStream() of its stream");

  // The legacy default stream takes events too.
  if (findings.Ok(device.RecordEvent(a.get(), nullptr), "RecordEvent(legacy default stream)")) {
    findings.Ok(device.SynchronizeEvent(a.get()), "SynchronizeEvent() on the default stream");
    findings.Expect(QueryOr(device, a.get(), findings, "on the default stream", false),
                    "an event on the legacy default stream is not complete after "
                    "SynchronizeEvent()");
  }
  a.Destroy(findings);
  b.Destroy(findings);
  stream.Destroy(findings);
}

// SynchronizeDevice succeeds, idle or busy, and waits for the work of every stream.
inline void CheckDeviceSynchronization(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  findings.Ok(device.SynchronizeDevice(), "SynchronizeDevice() on an idle device");
  ScopedStream first(device, findings);
  ScopedStream second(device, findings);
  ScopedEvent on_first(device, findings);
  ScopedEvent on_second(device, findings);
  if (!first.ok() || !second.ok() || !on_first.ok() || !on_second.ok()) return;
  if (!findings.Ok(subject.queue_work(first.get()), "queueing work")) return;
  if (!findings.Ok(subject.queue_work(second.get()), "queueing work")) return;
  if (!findings.Ok(device.RecordEvent(on_first.get(), first.get()), "RecordEvent()")) return;
  if (!findings.Ok(device.RecordEvent(on_second.get(), second.get()), "RecordEvent()")) return;
  findings.Expect(!QueryOr(device, on_first.get(), findings, "while work is pending", false),
                  "QueryEvent() says complete while the work recorded before it is pending");
  findings.Ok(device.SynchronizeDevice(), "SynchronizeDevice() on a busy device");
  findings.Expect(QueryOr(device, on_first.get(), findings, "after SynchronizeDevice", false) &&
                      QueryOr(device, on_second.get(), findings, "after SynchronizeDevice", false),
                  "an event of some stream is not complete after SynchronizeDevice()");
  on_first.Destroy(findings);
  on_second.Destroy(findings);
  first.Destroy(findings);
  second.Destroy(findings);
}

// Stream ids: distinct for distinct streams (the legacy default stream included), stable, never
// with the top bit (CaptureSafeStreamId's mark), and never reused after a stream is destroyed,
// even where the driver reuses its handle.
inline void CheckStreamIds(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  absl::flat_hash_set<StreamId> seen;
  auto note = [&](Stream stream, absl::string_view which) -> bool {
    absl::StatusOr<StreamId> id = device.GetStreamId(stream);
    if (!findings.Ok(id, absl::StrCat("GetStreamId(", which, ")"))) return false;
    findings.Expect((*id & kCapturingStreamIdBit) == 0,
                    absl::StrFormat("GetStreamId(%s) is %#x, with the top bit that marks a "
                                    "capturing stream's CaptureSafeStreamId",
                                    which, *id));
    findings.Expect(seen.insert(*id).second,
                    absl::StrFormat("GetStreamId(%s) is %#x, an id another stream had", which,
                                    *id));
    absl::StatusOr<StreamId> again = device.GetStreamId(stream);
    findings.Expect(again.ok() && *again == *id,
                    absl::StrFormat("GetStreamId(%s) changed between two calls", which));
    return true;
  };
  note(nullptr, "legacy default stream");
  std::vector<Stream> live;
  auto destroy_live = absl::MakeCleanup([&] {
    for (Stream stream : live) device.DestroyStream(stream).IgnoreError();
  });
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Stream> stream = device.CreateStream();
    if (!findings.Ok(stream, "CreateStream()")) return;
    live.push_back(*stream);
    findings.Expect(*stream != nullptr, "CreateStream() gave the legacy default stream");
    note(*stream, absl::StrCat("new stream ", i));
  }
  // Destroy one, make one, eight times over: the new ids are new.
  for (int round = 0; round < 8; ++round) {
    Stream oldest = live.front();
    live.erase(live.begin());
    findings.Ok(device.DestroyStream(oldest), "DestroyStream()");
    absl::StatusOr<Stream> stream = device.CreateStream();
    if (!findings.Ok(stream, "CreateStream() after DestroyStream()")) return;
    live.push_back(*stream);
    note(*stream, absl::StrCat("a stream made after ", round + 1, " were destroyed"));
  }
  std::move(destroy_live).Cancel();
  for (Stream stream : live) findings.Ok(device.DestroyStream(stream), "DestroyStream()");
}

// Capture info and graph capture: a fresh stream (and the default stream) is not capturing;
// the default stream cannot be captured; between BeginCapture and EndCapture a stream captures
// with the id BeginCapture returned, other streams do not, and a second capture has another id;
// the core's memory calls leave a capture running; after EndCapture the stream is an ordinary
// stream again, and the graph instantiates, launches and is destroyed.
inline void CheckCaptureInfo(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  ScopedStream stream(device, findings);
  ScopedStream other(device, findings);
  if (!stream.ok() || !other.ok()) return;
  auto capture_of = [&](Stream s, absl::string_view which) -> CaptureInfo {
    absl::StatusOr<CaptureInfo> info = device.GetCaptureInfo(s);
    findings.Ok(info, absl::StrCat("GetCaptureInfo(", which, ")"));
    return info.ok() ? *info : CaptureInfo{};
  };
  auto idle = [](const CaptureInfo& info) {
    return !info.capturing && !info.invalidated && info.capture_id == 0;
  };
  findings.Expect(idle(capture_of(stream.get(), "a fresh stream")),
                  "a fresh stream reports a capture");
  findings.Expect(idle(capture_of(nullptr, "the legacy default stream")),
                  "the legacy default stream reports a capture");

  absl::StatusOr<uint64_t> on_default = device.BeginCapture(nullptr, CaptureMode::kGlobal);
  findings.Expect(!on_default.ok(), "BeginCapture() on the legacy default stream succeeded");
  if (on_default.ok()) {
    absl::StatusOr<GraphHandle> graph = device.EndCapture(nullptr);
    if (graph.ok()) device.DestroyGraph(*graph).IgnoreError();
  }
  findings.Expect(idle(capture_of(nullptr, "the legacy default stream, after a refused capture")),
                  "the legacy default stream reports a capture after BeginCapture was refused");

  absl::StatusOr<uint64_t> id = device.BeginCapture(stream.get(), CaptureMode::kGlobal);
  if (!findings.Ok(id, "BeginCapture()")) return;
  absl::Cleanup end_capture = [&] {
    absl::StatusOr<GraphHandle> graph = device.EndCapture(stream.get());
    if (graph.ok()) device.DestroyGraph(*graph).IgnoreError();
  };
  findings.Expect(*id != 0, "BeginCapture() returned capture id 0");
  const CaptureInfo during = capture_of(stream.get(), "a capturing stream");
  findings.Expect(during.capturing && !during.invalidated,
                  "a stream between BeginCapture and EndCapture does not report capturing");
  findings.Expect(during.capture_id == *id,
                  absl::StrFormat("GetCaptureInfo() reports capture id %u; BeginCapture "
                                  "returned %u",
                                  during.capture_id, *id));
  findings.Expect(idle(capture_of(other.get(), "another stream during a capture")),
                  "a stream that is not capturing reports a capture while another stream captures");
  if (!findings.Ok(subject.queue_work(stream.get()), "queueing work to capture")) return;

  // What the core does during someone's capture: take device memory. The capture goes on.
  absl::StatusOr<uintptr_t> segment = device.AllocateSegment(2 * kMiB);
  findings.Ok(segment, "AllocateSegment() during a capture");
  const CaptureInfo after_growth = capture_of(stream.get(), "after AllocateSegment");
  findings.Expect(after_growth.capturing && after_growth.capture_id == *id,
                  "AllocateSegment() during a capture ended or invalidated it");

  // A second capture, on another stream, has an id of its own.
  absl::StatusOr<uint64_t> other_id = device.BeginCapture(other.get(), CaptureMode::kGlobal);
  if (findings.Ok(other_id, "BeginCapture() on a second stream")) {
    findings.Expect(*other_id != *id, "two captures running at once have the same id");
    findings.Ok(subject.queue_work(other.get()), "queueing work to capture");
    absl::StatusOr<GraphHandle> other_graph = device.EndCapture(other.get());
    if (findings.Ok(other_graph, "EndCapture() of the second capture")) {
      findings.Ok(device.DestroyGraph(*other_graph), "DestroyGraph()");
    }
  }

  std::move(end_capture).Cancel();
  absl::StatusOr<GraphHandle> graph = device.EndCapture(stream.get());
  findings.Expect(idle(capture_of(stream.get(), "after EndCapture")),
                  "a stream still reports a capture after EndCapture");
  if (segment.ok()) findings.Ok(device.FreeSegment(*segment, 2 * kMiB), "FreeSegment()");
  if (!findings.Ok(graph, "EndCapture()")) return;
  absl::StatusOr<GraphExecHandle> exec = device.InstantiateGraph(*graph);
  findings.Ok(device.DestroyGraph(*graph), "DestroyGraph()");  // the executable does not need it
  if (!findings.Ok(exec, "InstantiateGraph()")) return;
  findings.Ok(device.LaunchGraph(*exec, stream.get()), "LaunchGraph()");
  findings.Ok(device.SynchronizeStream(stream.get()), "SynchronizeStream() after LaunchGraph()");
  findings.Ok(device.DestroyGraphExec(*exec), "DestroyGraphExec()");
  stream.Destroy(findings);
  other.Destroy(findings);
}

// CaptureSafeStreamId (device.h): a stream's device id outside captures; during its capture the
// handle with the top bit, the same on every call, unlike any device id; the device id again
// once the capture ends. Streams not capturing keep their device ids throughout.
inline void CheckCaptureSafeStreamId(const Subject& subject, Findings& findings) {
  GraphDevice& device = *subject.device;
  ScopedStream stream(device, findings);
  ScopedStream other(device, findings);
  if (!stream.ok() || !other.ok()) return;
  absl::StatusOr<StreamId> plain = device.GetStreamId(stream.get());
  absl::StatusOr<StreamId> other_plain = device.GetStreamId(other.get());
  if (!findings.Ok(plain, "GetStreamId()") || !findings.Ok(other_plain, "GetStreamId()")) return;
  absl::StatusOr<StreamId> before = CaptureSafeStreamId(device, stream.get());
  if (findings.Ok(before, "CaptureSafeStreamId() outside a capture")) {
    findings.Expect(*before == *plain,
                    "CaptureSafeStreamId() outside a capture is not the stream's device id");
  }

  absl::StatusOr<uint64_t> id = device.BeginCapture(stream.get(), CaptureMode::kGlobal);
  if (!findings.Ok(id, "BeginCapture()")) return;
  absl::Cleanup end_capture = [&] {
    absl::StatusOr<GraphHandle> graph = device.EndCapture(stream.get());
    if (graph.ok()) device.DestroyGraph(*graph).IgnoreError();
  };
  findings.Ok(subject.queue_work(stream.get()), "queueing work to capture");
  const StreamId marked =
      kCapturingStreamIdBit | static_cast<StreamId>(reinterpret_cast<uintptr_t>(stream.get()));
  absl::StatusOr<StreamId> during = CaptureSafeStreamId(device, stream.get());
  if (findings.Ok(during, "CaptureSafeStreamId() of a capturing stream")) {
    findings.Expect(*during == marked,
                    absl::StrFormat("CaptureSafeStreamId() of a capturing stream is %#x, not its "
                                    "handle with the top bit (%#x)",
                                    *during, marked));
    findings.Expect(*during != *plain && *during != *other_plain,
                    "CaptureSafeStreamId() of a capturing stream equals a device id");
    absl::StatusOr<StreamId> again = CaptureSafeStreamId(device, stream.get());
    findings.Expect(again.ok() && *again == *during,
                    "CaptureSafeStreamId() of a capturing stream changed between two calls");
  }
  absl::StatusOr<StreamId> other_during = CaptureSafeStreamId(device, other.get());
  if (findings.Ok(other_during, "CaptureSafeStreamId() of another stream during a capture")) {
    findings.Expect(*other_during == *other_plain,
                    "a stream that is not capturing lost its device id while another captures");
  }

  std::move(end_capture).Cancel();
  absl::StatusOr<GraphHandle> graph = device.EndCapture(stream.get());
  if (findings.Ok(graph, "EndCapture()")) {
    findings.Ok(device.DestroyGraph(*graph), "DestroyGraph()");
  }
  absl::StatusOr<StreamId> after = CaptureSafeStreamId(device, stream.get());
  if (findings.Ok(after, "CaptureSafeStreamId() after the capture")) {
    findings.Expect(*after == *plain,
                    "CaptureSafeStreamId() after the capture is not the stream's device id");
  }
  stream.Destroy(findings);
  other.Destroy(findings);
}

// --- The contract as a whole ---------------------------------------------------------------------

struct Clause {
  const char* name;
  void (*check)(const Subject&, Findings&);
  // Runs only on a device with `exhaustible_capacity` (see the file comment).
  bool takes_whole_device = false;
};

inline const std::vector<Clause>& Clauses() {
  static const std::vector<Clause>* const clauses = new std::vector<Clause>{
      {"granularity is a fixed power of two", &CheckGranularity},
      {"memory info: total is fixed and not below free", &CheckMemoryInfo},
      {"plain segments: aligned, disjoint, counted, given back", &CheckPlainSegments},
      {"a request beyond the whole device is RESOURCE_EXHAUSTED", &CheckOversizeRequests},
      {"virtual memory: reserve, create, map, unmap, release", &CheckVirtualMemory},
      {"capacity runs out with RESOURCE_EXHAUSTED and comes back", &CheckCapacity,
       /*takes_whole_device=*/true},
      {"events follow the work recorded before them", &CheckEvents},
      {"SynchronizeDevice waits for every stream", &CheckDeviceSynchronization},
      {"stream ids are distinct, stable and never reused", &CheckStreamIds},
      {"capture info follows BeginCapture and EndCapture", &CheckCaptureInfo},
      {"CaptureSafeStreamId marks a capturing stream only", &CheckCaptureSafeStreamId},
  };
  return *clauses;
}

// The clause named `name`; REQUIREs that there is one.
inline const Clause& ClauseNamed(absl::string_view name) {
  for (const Clause& clause : Clauses()) {
    if (clause.name == name) return clause;
  }
  FAIL("no contract clause is named \"" << std::string(name) << "\"");
  return Clauses().front();  // not reached
}

inline Findings Check(const Clause& clause, const Subject& subject) {
  Findings findings;
  clause.check(subject, findings);
  return findings;
}

// Every clause on a fresh device from `Factory`, one section each (see the file comment).
template <typename Factory>
void RunDeviceContract() {
  for (const Clause& clause : Clauses()) {
    DYNAMIC_SECTION(clause.name) {
      Factory factory;
      const Subject subject = factory.subject();
      REQUIRE(subject.device != nullptr);
      REQUIRE(subject.queue_work);
      if (clause.takes_whole_device && subject.exhaustible_capacity == 0) {
        WARN("not run on " << Factory::kName << ": \"" << clause.name
                           << "\" takes all of the device's memory, and this device must never "
                              "be exhausted (a request beyond the whole device is checked by "
                              "another clause)");
      } else {
        const Findings findings = Check(clause, subject);
        INFO(Factory::kName << ", \"" << clause.name << "\": "
                            << (findings.empty() ? "kept" : "broken:\n" + findings.ToString()));
        CHECK(findings.empty());
      }
    }
  }
}

}  // namespace device_contract
}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_TESTING_DEVICE_CONTRACT_H_
