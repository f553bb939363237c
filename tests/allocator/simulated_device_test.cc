// Tests of the simulated device (allocator/simulated_device.h), the ground every other allocator
// test stands on. If its logical clock completed events too early, the stream-reuse and
// differential tests would bless unsafe reuse; if its capture check were silent, graph-capture
// bugs would pass; if its byte and segment counts were wrong, leak checks would lie. So this
// file pins down each of those: the per-stream clock (Enqueue / Complete / IsComplete) and the
// events that ride on it, synchronization, capture begin / join / end with its violation count,
// injected faults, capacity exhaustion, address-range / mapping bookkeeping, the accounting
// getters, and stream ids that are never reused.
#include <catch2/catch.hpp>

#include <cstdint>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/simulated_device.h"

namespace tidepool {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

SimulatedDevice::Options SmallDeviceOptions(size_t capacity) {
  SimulatedDevice::Options options;
  options.capacity = capacity;
  return options;
}

Stream NewStream(SimulatedDevice& device) {
  absl::StatusOr<Stream> stream = device.CreateStream();
  REQUIRE(stream.ok());
  return *stream;
}

Event NewEvent(SimulatedDevice& device) {
  absl::StatusOr<Event> event = device.CreateEvent();
  REQUIRE(event.ok());
  return *event;
}

bool EventDone(SimulatedDevice& device, Event event) {
  absl::StatusOr<bool> done = device.QueryEvent(event);
  REQUIRE(done.ok());
  return *done;
}

TEST_CASE("addresses stay inside the device's own space: fresh first, then reused lowest first") {
  constexpr size_t kSpace = 16 * kMiB;
  SimulatedDevice::Options first_options = SmallDeviceOptions(64 * kMiB);
  first_options.base_address = uintptr_t{1} << 40;
  first_options.address_space = kSpace;
  SimulatedDevice::Options second_options = first_options;
  second_options.ordinal = 1;
  second_options.base_address = first_options.base_address + kSpace;
  SimulatedDevice first(first_options);
  SimulatedDevice second(second_options);
  const uintptr_t base = first_options.base_address;

  // Fresh addresses, in order, until the space is walked through.
  std::vector<uintptr_t> held;
  for (int i = 0; i < 8; ++i) {
    absl::StatusOr<uintptr_t> range = first.ReserveAddressRange(2 * kMiB);
    REQUIRE(range.ok());
    CHECK(*range == base + i * 2 * kMiB);
    held.push_back(*range);
  }
  // Full: RESOURCE_EXHAUSTED, never an address of the next device.
  absl::StatusOr<uintptr_t> none = first.AllocateSegment(kMiB);
  REQUIRE_FALSE(none.ok());
  CHECK(absl::IsResourceExhausted(none.status()));
  CHECK(first.used_bytes() == 0);  // the refused segment took no memory either
  // Freed addresses come back, lowest gap first, whether ranges or segments held them.
  REQUIRE(first.ReleaseAddressRange(held[5], 2 * kMiB).ok());
  REQUIRE(first.ReleaseAddressRange(held[2], 2 * kMiB).ok());
  REQUIRE(first.ReleaseAddressRange(held[3], 2 * kMiB).ok());
  absl::StatusOr<uintptr_t> segment = first.AllocateSegment(3 * kMiB);  // 4 MiB of addresses
  REQUIRE(segment.ok());
  CHECK(*segment == held[2]);
  absl::StatusOr<uintptr_t> range = first.ReserveAddressRange(2 * kMiB);
  REQUIRE(range.ok());
  CHECK(*range == held[5]);
  CHECK_FALSE(first.ReserveAddressRange(2 * kMiB).ok());
  // The other device's addresses are its own.
  absl::StatusOr<uintptr_t> other = second.AllocateSegment(kMiB);
  REQUIRE(other.ok());
  CHECK(*other == second_options.base_address);
}

TEST_CASE("the logical clock of a stream advances only when told") {
  SimulatedDevice device;
  Stream stream = NewStream(device);

  CHECK(device.IsComplete(stream, 0));  // nothing enqueued: position 0 is trivially done
  const uint64_t first = device.Enqueue(stream);
  const uint64_t second = device.Enqueue(stream);
  const uint64_t third = device.Enqueue(stream);
  CHECK(first < second);
  CHECK(second < third);
  CHECK_FALSE(device.IsComplete(stream, first));
  CHECK_FALSE(device.IsComplete(stream, third));

  device.Complete(stream, second);
  CHECK(device.IsComplete(stream, first));
  CHECK(device.IsComplete(stream, second));
  CHECK_FALSE(device.IsComplete(stream, third));

  // Completing an earlier position never moves the clock back.
  device.Complete(stream, first);
  CHECK(device.IsComplete(stream, second));

  device.Complete(stream);  // default: everything enqueued so far
  CHECK(device.IsComplete(stream, third));
}

TEST_CASE("Complete cannot run ahead of the work that was enqueued") {
  SimulatedDevice device;
  Stream stream = NewStream(device);
  const uint64_t enqueued = device.Enqueue(stream);
  device.Complete(stream, enqueued + 100);  // beyond what exists: clamps to what was enqueued
  CHECK(device.IsComplete(stream, enqueued));
  const uint64_t later = device.Enqueue(stream);
  CHECK_FALSE(device.IsComplete(stream, later));
}

TEST_CASE("each stream has its own clock") {
  SimulatedDevice device;
  Stream a = NewStream(device);
  Stream b = NewStream(device);
  const uint64_t on_a = device.Enqueue(a);
  const uint64_t on_b = device.Enqueue(b);
  device.Complete(a);
  CHECK(device.IsComplete(a, on_a));
  CHECK_FALSE(device.IsComplete(b, on_b));
  device.CompleteAll();
  CHECK(device.IsComplete(b, on_b));
}

TEST_CASE("an event completes only when its stream's clock passes the position it recorded") {
  SimulatedDevice device;
  Stream a = NewStream(device);
  Stream b = NewStream(device);
  Event event = NewEvent(device);

  device.Enqueue(a);
  const uint64_t recorded_at = device.Enqueue(a);
  REQUIRE(device.RecordEvent(event, a).ok());
  // Work enqueued after the record does not delay the event.
  const uint64_t after_record = device.Enqueue(a);

  CHECK_FALSE(EventDone(device, event));
  device.Complete(b);  // another stream's progress is irrelevant
  CHECK_FALSE(EventDone(device, event));
  device.Complete(a, recorded_at - 1);
  CHECK_FALSE(EventDone(device, event));
  device.Complete(a, recorded_at);
  CHECK(EventDone(device, event));
  CHECK_FALSE(device.IsComplete(a, after_record));
}

TEST_CASE("an event recorded on an idle stream is complete at once") {
  SimulatedDevice device;
  Stream stream = NewStream(device);
  const uint64_t done = device.Enqueue(stream);
  device.Complete(stream, done);
  Event event = NewEvent(device);
  REQUIRE(device.RecordEvent(event, stream).ok());
  CHECK(EventDone(device, event));
}

TEST_CASE("synchronizing completes events and streams and is counted") {
  SimulatedDevice device;
  Stream a = NewStream(device);
  Stream b = NewStream(device);
  const int64_t syncs_at_start = device.synchronizations();

  SECTION("SynchronizeEvent completes the event's work, not later work") {
    Event event = NewEvent(device);
    const uint64_t recorded_at = device.Enqueue(a);
    REQUIRE(device.RecordEvent(event, a).ok());
    const uint64_t later = device.Enqueue(a);
    REQUIRE_FALSE(EventDone(device, event));
    REQUIRE(device.SynchronizeEvent(event).ok());
    CHECK(EventDone(device, event));
    CHECK(device.IsComplete(a, recorded_at));
    CHECK_FALSE(device.IsComplete(a, later));
    CHECK(device.synchronizations() == syncs_at_start + 1);
  }

  SECTION("SynchronizeStream completes everything on that stream only") {
    Event on_a = NewEvent(device);
    Event on_b = NewEvent(device);
    const uint64_t last_a = device.Enqueue(a);
    const uint64_t last_b = device.Enqueue(b);
    REQUIRE(device.RecordEvent(on_a, a).ok());
    REQUIRE(device.RecordEvent(on_b, b).ok());
    REQUIRE(device.SynchronizeStream(a).ok());
    CHECK(device.IsComplete(a, last_a));
    CHECK(EventDone(device, on_a));
    CHECK_FALSE(device.IsComplete(b, last_b));
    CHECK_FALSE(EventDone(device, on_b));
    CHECK(device.synchronizations() == syncs_at_start + 1);
  }

  SECTION("SynchronizeDevice completes every stream") {
    const uint64_t last_a = device.Enqueue(a);
    const uint64_t last_b = device.Enqueue(b);
    REQUIRE(device.SynchronizeDevice().ok());
    CHECK(device.IsComplete(a, last_a));
    CHECK(device.IsComplete(b, last_b));
    CHECK(device.synchronizations() == syncs_at_start + 1);
  }

  SECTION("Complete and QueryEvent are not synchronizations") {
    Event event = NewEvent(device);
    device.Enqueue(a);
    REQUIRE(device.RecordEvent(event, a).ok());
    EventDone(device, event);
    device.Complete(a);
    EventDone(device, event);
    device.CompleteAll();
    CHECK(device.synchronizations() == syncs_at_start);
  }
}

TEST_CASE("events and streams that do not exist are refused") {
  SimulatedDevice device;
  Stream stream = NewStream(device);
  Event event = NewEvent(device);
  REQUIRE(device.DestroyEvent(event).ok());
  CHECK_FALSE(device.DestroyEvent(event).ok());
  CHECK_FALSE(device.QueryEvent(event).ok());
  CHECK_FALSE(device.RecordEvent(event, stream).ok());

  Event live_event = NewEvent(device);
  Stream never_made = reinterpret_cast<Stream>(uintptr_t{0xdead0});
  CHECK_FALSE(device.RecordEvent(live_event, never_made).ok());
  CHECK_FALSE(device.SynchronizeStream(never_made).ok());
  CHECK_FALSE(device.GetStreamId(never_made).ok());
  CHECK_FALSE(device.GetCaptureInfo(never_made).ok());
}

TEST_CASE("capture: begin, join and end, and what they report") {
  SimulatedDevice device;
  Stream origin = NewStream(device);
  Stream joined = NewStream(device);
  Stream outside = NewStream(device);

  absl::StatusOr<CaptureInfo> before = device.GetCaptureInfo(origin);
  REQUIRE(before.ok());
  CHECK_FALSE(before->capturing);

  absl::StatusOr<uint64_t> began = device.BeginCapture(origin);
  REQUIRE(began.ok());
  const uint64_t capture_id = *began;
  CHECK(capture_id != 0);
  device.JoinCapture(joined, origin);

  absl::StatusOr<CaptureInfo> origin_info = device.GetCaptureInfo(origin);
  absl::StatusOr<CaptureInfo> joined_info = device.GetCaptureInfo(joined);
  absl::StatusOr<CaptureInfo> outside_info = device.GetCaptureInfo(outside);
  REQUIRE(origin_info.ok());
  REQUIRE(joined_info.ok());
  REQUIRE(outside_info.ok());
  CHECK(origin_info->capturing);
  CHECK(origin_info->capture_id == capture_id);
  CHECK(joined_info->capturing);
  CHECK(joined_info->capture_id == capture_id);
  CHECK_FALSE(outside_info->capturing);

  // Only the stream that began the capture can end it (as on CUDA); ending it ends the capture
  // for every stream in it.
  CHECK_FALSE(device.EndCapture(joined).ok());
  CHECK(device.GetCaptureInfo(joined)->capturing);
  absl::StatusOr<GraphHandle> graph = device.EndCapture(origin);
  REQUIRE(graph.ok());
  CHECK(device.live_graphs() == 1);
  REQUIRE(device.DestroyGraph(*graph).ok());
  CHECK(device.live_graphs() == 0);
  origin_info = device.GetCaptureInfo(origin);
  joined_info = device.GetCaptureInfo(joined);
  REQUIRE(origin_info.ok());
  REQUIRE(joined_info.ok());
  CHECK_FALSE(origin_info->capturing);
  CHECK_FALSE(joined_info->capturing);

  // A second capture gets a different id.
  absl::StatusOr<uint64_t> second_id = device.BeginCapture(outside);
  REQUIRE(second_id.ok());
  CHECK(*second_id != capture_id);
  // An invalidated capture stops reporting itself, and ending it fails.
  device.InvalidateCapture(outside);
  CHECK_FALSE(device.GetCaptureInfo(outside)->capturing);
  CHECK_FALSE(device.EndCapture(outside).ok());
  CHECK(device.live_graphs() == 0);
  CHECK(device.capture_violations() == 0);
}

TEST_CASE("querying or synchronizing an event during any capture is an error and a violation") {
  SimulatedDevice device;
  Stream capturing = NewStream(device);
  Stream elsewhere = NewStream(device);
  // The event lives on a stream that is not capturing: a real driver still forbids the query.
  Event event = NewEvent(device);
  device.Enqueue(elsewhere);
  REQUIRE(device.RecordEvent(event, elsewhere).ok());
  const int64_t syncs_before = device.synchronizations();

  REQUIRE(device.BeginCapture(capturing).ok());
  CHECK(device.capture_violations() == 0);

  CHECK_FALSE(device.QueryEvent(event).ok());
  CHECK(device.capture_violations() == 1);
  CHECK_FALSE(device.SynchronizeEvent(event).ok());
  CHECK(device.capture_violations() == 2);
  CHECK_FALSE(device.SynchronizeStream(capturing).ok());
  CHECK(device.capture_violations() == 3);
  CHECK_FALSE(device.SynchronizeDevice().ok());
  CHECK(device.capture_violations() == 4);
  // The refused synchronization did not complete anything.
  CHECK(device.synchronizations() == syncs_before);
  CHECK_FALSE(device.IsComplete(elsewhere, 1));

  REQUIRE(device.EndCapture(capturing).ok());
  absl::StatusOr<bool> after = device.QueryEvent(event);
  CHECK(after.ok());
  CHECK(device.SynchronizeEvent(event).ok());
  CHECK(device.capture_violations() == 4);
}

TEST_CASE("FailNthAllocation fails exactly the nth device allocation from now") {
  SimulatedDevice device;
  device.FailNthAllocation(3);
  absl::StatusOr<uintptr_t> first = device.AllocateSegment(2 * kMiB);
  absl::StatusOr<PhysicalHandle> second = device.CreatePhysical(2 * kMiB);
  const size_t used_before_failure = device.used_bytes();
  absl::StatusOr<uintptr_t> third = device.AllocateSegment(2 * kMiB);
  absl::StatusOr<uintptr_t> fourth = device.AllocateSegment(2 * kMiB);
  CHECK(first.ok());
  CHECK(second.ok());  // physical chunks count as device allocations too
  REQUIRE_FALSE(third.ok());
  CHECK(absl::IsResourceExhausted(third.status()));
  CHECK(fourth.ok());
  CHECK(device.used_bytes() == used_before_failure + 2 * kMiB);  // the failure took nothing

  SECTION("and it counts physical chunks when they come nth") {
    device.FailNthAllocation(1);
    absl::StatusOr<PhysicalHandle> chunk = device.CreatePhysical(2 * kMiB);
    REQUIRE_FALSE(chunk.ok());
    CHECK(absl::IsResourceExhausted(chunk.status()));
    CHECK(device.CreatePhysical(2 * kMiB).ok());
  }
}

TEST_CASE("SetFailAllAllocations fails every device allocation while set") {
  SimulatedDevice device;
  device.SetFailAllAllocations(true);
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<uintptr_t> segment = device.AllocateSegment(2 * kMiB);
    REQUIRE_FALSE(segment.ok());
    CHECK(absl::IsResourceExhausted(segment.status()));
    absl::StatusOr<PhysicalHandle> chunk = device.CreatePhysical(2 * kMiB);
    REQUIRE_FALSE(chunk.ok());
    CHECK(absl::IsResourceExhausted(chunk.status()));
  }
  CHECK(device.used_bytes() == 0);
  CHECK(device.live_segments() == 0);
  // Address space is not memory: reserving it still works.
  absl::StatusOr<uintptr_t> range = device.ReserveAddressRange(4 * kMiB);
  CHECK(range.ok());

  device.SetFailAllAllocations(false);
  CHECK(device.AllocateSegment(2 * kMiB).ok());
  CHECK(device.CreatePhysical(2 * kMiB).ok());
}

TEST_CASE("capacity runs out with RESOURCE_EXHAUSTED and comes back when memory is returned") {
  SimulatedDevice device(SmallDeviceOptions(8 * kMiB));
  absl::StatusOr<uintptr_t> big = device.AllocateSegment(6 * kMiB);
  REQUIRE(big.ok());
  absl::StatusOr<uintptr_t> too_much = device.AllocateSegment(4 * kMiB);
  REQUIRE_FALSE(too_much.ok());
  CHECK(absl::IsResourceExhausted(too_much.status()));
  // Physical chunks draw on the same capacity.
  absl::StatusOr<PhysicalHandle> chunk = device.CreatePhysical(2 * kMiB);
  REQUIRE(chunk.ok());
  CHECK(device.used_bytes() == 8 * kMiB);
  absl::StatusOr<PhysicalHandle> no_chunk = device.CreatePhysical(2 * kMiB);
  REQUIRE_FALSE(no_chunk.ok());
  CHECK(absl::IsResourceExhausted(no_chunk.status()));

  absl::StatusOr<MemoryInfo> full = device.GetMemoryInfo();
  REQUIRE(full.ok());
  CHECK(full->total_bytes == 8 * kMiB);
  CHECK(full->free_bytes == 0);

  REQUIRE(device.FreeSegment(*big, 6 * kMiB).ok());
  absl::StatusOr<MemoryInfo> after_free = device.GetMemoryInfo();
  REQUIRE(after_free.ok());
  CHECK(after_free->free_bytes == 6 * kMiB);
  CHECK(device.AllocateSegment(4 * kMiB).ok());
}

TEST_CASE("segments get distinct addresses that are never handed out again") {
  SimulatedDevice device;
  std::vector<std::pair<uintptr_t, size_t>> taken;
  for (size_t size : {2 * kMiB, 512 * size_t{1024}, 20 * kMiB, 3 * kMiB}) {
    absl::StatusOr<uintptr_t> address = device.AllocateSegment(size);
    REQUIRE(address.ok());
    for (const auto& [other, other_size] : taken) {
      const bool disjoint = *address + size <= other || other + other_size <= *address;
      CHECK(disjoint);
    }
    taken.emplace_back(*address, size);
  }
  CHECK(device.live_segments() == 4);
  CHECK(device.used_bytes() == 2 * kMiB + 512 * 1024 + 20 * kMiB + 3 * kMiB);

  const uintptr_t freed = taken[0].first;
  REQUIRE(device.FreeSegment(freed, taken[0].second).ok());
  CHECK(device.live_segments() == 3);
  // A stale pointer stays foreign: a segment of the same size does not land on it.
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<uintptr_t> again = device.AllocateSegment(taken[0].second);
    REQUIRE(again.ok());
    CHECK(*again != freed);
  }
}

TEST_CASE("FreeSegment refuses what was not allocated, or with the wrong size") {
  SimulatedDevice device;
  absl::StatusOr<uintptr_t> segment = device.AllocateSegment(2 * kMiB);
  REQUIRE(segment.ok());
  CHECK_FALSE(device.FreeSegment(*segment, 4 * kMiB).ok());
  CHECK_FALSE(device.FreeSegment(*segment + 512, 2 * kMiB).ok());
  CHECK(device.used_bytes() == 2 * kMiB);
  REQUIRE(device.FreeSegment(*segment, 2 * kMiB).ok());
  CHECK_FALSE(device.FreeSegment(*segment, 2 * kMiB).ok());  // twice
  CHECK(device.used_bytes() == 0);
  CHECK(device.live_segments() == 0);
}

TEST_CASE("address ranges, physical chunks and mappings are booked and checked") {
  SimulatedDevice device;
  const size_t g = device.granularity();
  REQUIRE(g > 0);

  CHECK_FALSE(device.ReserveAddressRange(g + 512).ok());  // not a multiple of granularity
  CHECK_FALSE(device.CreatePhysical(g / 2).ok());

  absl::StatusOr<uintptr_t> range = device.ReserveAddressRange(4 * g);
  REQUIRE(range.ok());
  CHECK(*range % g == 0);
  CHECK(device.live_segments() == 1);  // address ranges count
  CHECK(device.used_bytes() == 0);     // but hold no memory

  absl::StatusOr<PhysicalHandle> chunk_a = device.CreatePhysical(g);
  absl::StatusOr<PhysicalHandle> chunk_b = device.CreatePhysical(g);
  absl::StatusOr<PhysicalHandle> chunk_2g = device.CreatePhysical(2 * g);
  REQUIRE(chunk_a.ok());
  REQUIRE(chunk_b.ok());
  REQUIRE(chunk_2g.ok());
  CHECK(*chunk_a != *chunk_b);
  CHECK(device.used_bytes() == 4 * g);
  CHECK(device.live_segments() == 4);

  REQUIRE(device.Map(*range, g, *chunk_a).ok());
  CHECK_FALSE(device.Map(*range, g, *chunk_b).ok());  // already mapped there
  CHECK_FALSE(device.Map(*range + g, g, *chunk_2g).ok());  // size does not match the chunk
  CHECK_FALSE(device.Map(*range + 4 * g, g, *chunk_b).ok());  // outside the range
  CHECK_FALSE(device.Map(*range + 3 * g, 2 * g, *chunk_2g).ok());  // runs off its end
  CHECK_FALSE(device.Map(*range + g, g, PhysicalHandle{987654321}).ok());  // unknown chunk
  REQUIRE(device.Map(*range + g, g, *chunk_b).ok());
  REQUIRE(device.Map(*range + 2 * g, 2 * g, *chunk_2g).ok());

  // A mapped chunk cannot be released, nor can a range with mappings.
  CHECK_FALSE(device.ReleasePhysical(*chunk_a).ok());
  CHECK_FALSE(device.ReleaseAddressRange(*range, 4 * g).ok());
  // An unmap may not cut a mapping in half, nor cover unmapped bytes.
  CHECK_FALSE(device.Unmap(*range + 2 * g, g).ok());

  REQUIRE(device.Unmap(*range, 2 * g).ok());  // two mappings at once
  CHECK_FALSE(device.Unmap(*range, g).ok());  // no longer mapped
  REQUIRE(device.ReleasePhysical(*chunk_a).ok());
  REQUIRE(device.ReleasePhysical(*chunk_b).ok());
  CHECK_FALSE(device.ReleasePhysical(*chunk_a).ok());  // twice
  CHECK(device.used_bytes() == 2 * g);
  CHECK_FALSE(device.ReleaseAddressRange(*range, 4 * g).ok());  // chunk_2g still mapped

  REQUIRE(device.Unmap(*range + 2 * g, 2 * g).ok());
  REQUIRE(device.ReleasePhysical(*chunk_2g).ok());
  CHECK_FALSE(device.ReleaseAddressRange(*range, 2 * g).ok());  // wrong size
  REQUIRE(device.ReleaseAddressRange(*range, 4 * g).ok());
  CHECK(device.used_bytes() == 0);
  CHECK(device.live_segments() == 0);

  // Reserved ranges never overlap one another, nor segments.
  absl::StatusOr<uintptr_t> r1 = device.ReserveAddressRange(8 * g);
  absl::StatusOr<uintptr_t> s1 = device.AllocateSegment(g);
  absl::StatusOr<uintptr_t> r2 = device.ReserveAddressRange(8 * g);
  REQUIRE(r1.ok());
  REQUIRE(s1.ok());
  REQUIRE(r2.ok());
  CHECK((*r1 + 8 * g <= *s1 || *s1 + g <= *r1));
  CHECK((*r1 + 8 * g <= *r2 || *r2 + 8 * g <= *r1));
  CHECK((*r2 + 8 * g <= *s1 || *s1 + g <= *r2));
  CHECK(*r1 != *range);  // never reused
}

TEST_CASE("live_events counts events until they are destroyed") {
  SimulatedDevice device;
  CHECK(device.live_events() == 0);
  Event a = NewEvent(device);
  Event b = NewEvent(device);
  CHECK(a != b);
  CHECK(device.live_events() == 2);
  REQUIRE(device.DestroyEvent(a).ok());
  CHECK(device.live_events() == 1);
  REQUIRE(device.DestroyEvent(b).ok());
  CHECK(device.live_events() == 0);
}

TEST_CASE("stream ids are unique and never reused after DestroyStream") {
  SimulatedDevice device;
  std::set<StreamId> seen;
  absl::StatusOr<StreamId> default_id = device.GetStreamId(nullptr);
  REQUIRE(default_id.ok());  // the legacy default stream always exists
  seen.insert(*default_id);
  CHECK_FALSE(device.DestroyStream(nullptr).ok());

  for (int round = 0; round < 20; ++round) {
    Stream stream = NewStream(device);
    absl::StatusOr<StreamId> id = device.GetStreamId(stream);
    REQUIRE(id.ok());
    INFO("round " << round << " id " << *id);
    CHECK(seen.insert(*id).second);
    absl::StatusOr<StreamId> again = device.GetStreamId(stream);
    REQUIRE(again.ok());
    CHECK(*again == *id);  // stable while the stream lives
    REQUIRE(device.DestroyStream(stream).ok());
    CHECK_FALSE(device.GetStreamId(stream).ok());
    CHECK_FALSE(device.DestroyStream(stream).ok());
  }
  CHECK(seen.size() == 21);
}

}  // namespace
}  // namespace tidepool
