// The CUDA device seam on a real GPU, without the caching core: what CudaDevice promises in
// device.h, checked against the driver.
//
// Segments and mapped chunks hold data, out-of-memory is RESOURCE_EXHAUSTED (the code the caching
// core retries on), events and synchronization follow the work queued before them, stream ids are
// distinct and stable and never reused, capture is reported only while active, and device memory
// can be taken while a capture runs on this thread or another without invalidating it.
#include <cuda.h>

#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "allocator/cuda_device.h"
#include "allocator/cuda_driver.h"
#include "catch2/catch.hpp"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace gpu_test {
namespace {

// Long enough that the host certainly looks before the GPU finishes, short enough to keep the
// test quick.
constexpr uint64_t kSpinNanoseconds = 300'000'000;

TEST_CASE("the driver loads, names the device, and reports errors in words") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const CudaDriver& driver = device->driver();
  CHECK(driver.driver_version() >= CUDA_VERSION);
  char name[256] = {};
  TIDEPOOL_REQUIRE_OK(driver.Check(driver.cuDeviceGetName(name, sizeof(name), 0), "name"));
  INFO("device 0: " << name << ", driver for CUDA " << driver.driver_version());
  CHECK(device->ordinal() == 0);

  absl::Status oom = driver.Check(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc(1048576)");
  CHECK(oom.code() == absl::StatusCode::kResourceExhausted);
  CHECK(oom.message() == "cuMemAlloc(1048576): CUDA_ERROR_OUT_OF_MEMORY (out of memory)");
  CHECK(driver.Check(CUDA_ERROR_NO_DEVICE, "x").code() == absl::StatusCode::kUnavailable);
  CHECK(driver.Check(CUDA_ERROR_INVALID_VALUE, "x").code() == absl::StatusCode::kInternal);
  CHECK(driver.Check(CUDA_SUCCESS, "x").ok());
}

TEST_CASE("an ordinal the machine does not have is INVALID_ARGUMENT") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  int count = 0;
  TIDEPOOL_REQUIRE_OK(device->driver().Check(device->driver().cuDeviceGetCount(&count), "count"));
  CHECK(CudaDevice::Create(-1).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(CudaDevice::Create(count).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("memory info agrees with the driver") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  absl::StatusOr<MemoryInfo> info = device->GetMemoryInfo();
  TIDEPOOL_REQUIRE_OK(info);
  size_t total = 0;
  TIDEPOOL_REQUIRE_OK(
      device->driver().Check(device->driver().cuDeviceTotalMem(&total, 0), "cuDeviceTotalMem"));
  CHECK(info->total_bytes == total);
  CHECK(info->free_bytes > 0);
  CHECK(info->free_bytes <= info->total_bytes);
}

TEST_CASE("a plain segment holds data and its memory comes back when freed") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  Stream stream = RequireStream(*device);
  const size_t bytes = 64 * kMiB;
  const size_t free_before = RequireFreeBytes(*device);

  absl::StatusOr<uintptr_t> segment = device->AllocateSegment(bytes);
  TIDEPOOL_REQUIRE_OK(segment);
  CHECK(*segment % 512 == 0);
  const size_t free_while_held = RequireFreeBytes(*device);
  CHECK(free_before - free_while_held >= bytes);

  FillPattern(*device, *segment, bytes, 0x5eed0001u, stream);
  CHECK(CountMismatches(*device, *segment, bytes, 0x5eed0001u, stream) == 0);

  TIDEPOOL_REQUIRE_OK(device->FreeSegment(*segment, bytes));
  CHECK(RequireFreeBytes(*device) >= free_while_held + bytes);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("asking for more than the device has is RESOURCE_EXHAUSTED, with the call named") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  absl::StatusOr<MemoryInfo> info = device->GetMemoryInfo();
  TIDEPOOL_REQUIRE_OK(info);
  const size_t g = device->granularity();
  const size_t too_much = (info->total_bytes + kGiB) / g * g;

  absl::StatusOr<uintptr_t> segment = device->AllocateSegment(too_much);
  INFO("AllocateSegment -> " << segment.status().ToString());
  CHECK(segment.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(absl::StrContains(segment.status().message(),
                          "cuMemAlloc(" + std::to_string(too_much) + ")"));
  CHECK(absl::StrContains(segment.status().message(), "CUDA_ERROR_OUT_OF_MEMORY"));

  absl::StatusOr<PhysicalHandle> chunk = device->CreatePhysical(too_much);
  INFO("CreatePhysical -> " << chunk.status().ToString());
  CHECK(chunk.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(absl::StrContains(chunk.status().message(), "cuMemCreate("));

  // The failures left the device usable.
  absl::StatusOr<uintptr_t> small = device->AllocateSegment(kMiB);
  TIDEPOOL_REQUIRE_OK(small);
  TIDEPOOL_REQUIRE_OK(device->FreeSegment(*small, kMiB));
}

TEST_CASE("reserve, create, map and unmap: chunks hold data across their boundaries") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  Stream stream = RequireStream(*device);
  const size_t g = device->granularity();
  INFO("granularity " << g);
  REQUIRE(g >= 4096);
  REQUIRE((g & (g - 1)) == 0);

  CHECK(device->ReserveAddressRange(g + 1).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(device->CreatePhysical(g / 2).status().code() == absl::StatusCode::kInvalidArgument);

  const size_t free_before = RequireFreeBytes(*device);
  absl::StatusOr<uintptr_t> range = device->ReserveAddressRange(8 * g);
  TIDEPOOL_REQUIRE_OK(range);
  CHECK(*range % g == 0);
  // A reservation is address space only.
  CHECK(RequireFreeBytes(*device) + g >= free_before);

  absl::StatusOr<PhysicalHandle> one = device->CreatePhysical(g);
  absl::StatusOr<PhysicalHandle> three = device->CreatePhysical(3 * g);
  TIDEPOOL_REQUIRE_OK(one);
  TIDEPOOL_REQUIRE_OK(three);
  CHECK(free_before - RequireFreeBytes(*device) >= 4 * g);

  // [range, range + 4g): one chunk of g, then one of 3g, mapped separately.
  TIDEPOOL_REQUIRE_OK(device->Map(*range, g, *one));
  TIDEPOOL_REQUIRE_OK(device->Map(*range + g, 3 * g, *three));
  FillPattern(*device, *range, 4 * g, 0xc0ffee01u, stream);
  CHECK(CountMismatches(*device, *range, 4 * g, 0xc0ffee01u, stream) == 0);
  // Writes through one chunk stay in it.
  FillPattern(*device, *range, g, 0xc0ffee02u, stream);
  CHECK(CountMismatches(*device, *range, g, 0xc0ffee02u, stream) == 0);
  CHECK(CountMismatches(*device, *range + g, 3 * g, 0xc0ffee01u, stream) == 0);

  // One Unmap may span several whole mappings (the simulated device allows it too).
  TIDEPOOL_REQUIRE_OK(device->Unmap(*range, 4 * g));

  // A chunk can be mapped again elsewhere in the range (what trimming and regrowth do).
  TIDEPOOL_REQUIRE_OK(device->Map(*range + 7 * g, g, *one));
  FillPattern(*device, *range + 7 * g, g, 0xc0ffee03u, stream);
  CHECK(CountMismatches(*device, *range + 7 * g, g, 0xc0ffee03u, stream) == 0);
  TIDEPOOL_REQUIRE_OK(device->Unmap(*range + 7 * g, g));

  TIDEPOOL_REQUIRE_OK(device->ReleasePhysical(*one));
  TIDEPOOL_REQUIRE_OK(device->ReleasePhysical(*three));
  TIDEPOOL_REQUIRE_OK(device->ReleaseAddressRange(*range, 8 * g));
  CHECK(RequireFreeBytes(*device) + g >= free_before);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("events and synchronization follow the work queued before them") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  SpinKernel spin(*device);
  Stream stream = RequireStream(*device);
  absl::StatusOr<uintptr_t> flag = device->AllocateSegment(4096);
  TIDEPOOL_REQUIRE_OK(flag);
  FillPattern(*device, *flag, 4, 0, stream);
  absl::StatusOr<Event> event = device->CreateEvent();
  TIDEPOOL_REQUIRE_OK(event);

  SECTION("an event completes when the work before it does") {
    spin.Launch(*flag, kSpinNanoseconds, 7, stream);
    TIDEPOOL_REQUIRE_OK(device->RecordEvent(*event, stream));
    absl::StatusOr<bool> early = device->QueryEvent(*event);
    TIDEPOOL_REQUIRE_OK(early);
    CHECK_FALSE(*early);
    TIDEPOOL_REQUIRE_OK(device->SynchronizeEvent(*event));
    absl::StatusOr<bool> late = device->QueryEvent(*event);
    TIDEPOOL_REQUIRE_OK(late);
    CHECK(*late);
    CHECK(CountMismatches(*device, *flag, 4, 7, stream) == 0);
  }
  SECTION("synchronizing the stream waits for its work") {
    spin.Launch(*flag, kSpinNanoseconds, 8, stream);
    TIDEPOOL_REQUIRE_OK(device->RecordEvent(*event, stream));
    TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
    absl::StatusOr<bool> done = device->QueryEvent(*event);
    TIDEPOOL_REQUIRE_OK(done);
    CHECK(*done);
  }
  SECTION("synchronizing the device waits for every stream") {
    spin.Launch(*flag, kSpinNanoseconds, 9, stream);
    TIDEPOOL_REQUIRE_OK(device->RecordEvent(*event, stream));
    TIDEPOOL_REQUIRE_OK(device->SynchronizeDevice());
    absl::StatusOr<bool> done = device->QueryEvent(*event);
    TIDEPOOL_REQUIRE_OK(done);
    CHECK(*done);
  }
  SECTION("events work on the legacy default stream") {
    TIDEPOOL_REQUIRE_OK(device->RecordEvent(*event, nullptr));
    TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(nullptr));
    absl::StatusOr<bool> done = device->QueryEvent(*event);
    TIDEPOOL_REQUIRE_OK(done);
    CHECK(*done);
  }

  TIDEPOOL_REQUIRE_OK(device->DestroyEvent(*event));
  TIDEPOOL_REQUIRE_OK(device->FreeSegment(*flag, 4096));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("stream ids are distinct, stable, and never reused") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  Stream first = RequireStream(*device);
  Stream second = RequireStream(*device);
  absl::StatusOr<StreamId> first_id = device->GetStreamId(first);
  absl::StatusOr<StreamId> second_id = device->GetStreamId(second);
  absl::StatusOr<StreamId> legacy_id = device->GetStreamId(nullptr);
  absl::StatusOr<StreamId> per_thread_id = device->GetStreamId(CU_STREAM_PER_THREAD);
  TIDEPOOL_REQUIRE_OK(first_id);
  TIDEPOOL_REQUIRE_OK(second_id);
  TIDEPOOL_REQUIRE_OK(legacy_id);
  TIDEPOOL_REQUIRE_OK(per_thread_id);

  CHECK(*first_id != *second_id);
  CHECK(*legacy_id != *first_id);
  CHECK(*legacy_id != *second_id);
  CHECK(*per_thread_id != *legacy_id);
  CHECK(*per_thread_id != *first_id);
  CHECK(*per_thread_id != *second_id);

  // Stable: asking again gives the same answers. CU_STREAM_LEGACY is the same stream as nullptr.
  CHECK(device->GetStreamId(first).value() == *first_id);
  CHECK(device->GetStreamId(nullptr).value() == *legacy_id);
  CHECK(device->GetStreamId(CU_STREAM_LEGACY).value() == *legacy_id);

  // Another thread's per-thread default stream is another stream.
  StreamId other_thread_id = 0;
  absl::Status other_thread_status;
  std::thread other([&] {
    absl::StatusOr<StreamId> id = device->GetStreamId(CU_STREAM_PER_THREAD);
    other_thread_status = id.status();
    if (id.ok()) other_thread_id = *id;
  });
  other.join();
  TIDEPOOL_REQUIRE_OK(other_thread_status);
  CHECK(other_thread_id != *per_thread_id);

  // A new stream gets a new id even when the driver reuses the destroyed stream's handle.
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(first));
  Stream third = RequireStream(*device);
  absl::StatusOr<StreamId> third_id = device->GetStreamId(third);
  TIDEPOOL_REQUIRE_OK(third_id);
  CHECK(*third_id != *first_id);
  CHECK(*third_id != *second_id);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(second));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(third));
}

TEST_CASE("capture is reported only while active, with one id for the whole capture") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const CudaDriver& driver = device->driver();
  Stream stream = RequireStream(*device);

  absl::StatusOr<CaptureInfo> idle = device->GetCaptureInfo(stream);
  TIDEPOOL_REQUIRE_OK(idle);
  CHECK_FALSE(idle->capturing);
  CHECK(idle->capture_id == 0);
  absl::StatusOr<CaptureInfo> legacy = device->GetCaptureInfo(nullptr);
  TIDEPOOL_REQUIRE_OK(legacy);
  CHECK_FALSE(legacy->capturing);

  const size_t bytes = kMiB;
  absl::StatusOr<uintptr_t> buffer = device->AllocateSegment(bytes);
  TIDEPOOL_REQUIRE_OK(buffer);
  FillPattern(*device, *buffer, bytes, 0, stream);
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));

  // Global mode, the strictest (PyTorch's default): any unsafe call on this thread would
  // invalidate the capture.
  TIDEPOOL_REQUIRE_OK(driver.Check(
      driver.cuStreamBeginCapture(ToCuStream(stream), CU_STREAM_CAPTURE_MODE_GLOBAL),
      "cuStreamBeginCapture"));
  absl::StatusOr<CaptureInfo> active = device->GetCaptureInfo(stream);
  TIDEPOOL_REQUIRE_OK(active);
  CHECK(active->capturing);
  CHECK(active->capture_id != 0);
  CHECK(device->GetCaptureInfo(stream).value().capture_id == active->capture_id);
  FillPattern(*device, *buffer, bytes, 0xcafe0001u, stream);  // captured, not run

  // Taking device memory from inside the capture runs in relaxed mode and leaves it valid.
  absl::StatusOr<uintptr_t> during = device->AllocateSegment(bytes);
  INFO("AllocateSegment during capture -> " << during.status().ToString());

  CUgraph graph = nullptr;
  TIDEPOOL_REQUIRE_OK(
      driver.Check(driver.cuStreamEndCapture(ToCuStream(stream), &graph), "cuStreamEndCapture"));
  CHECK(during.ok());
  absl::StatusOr<CaptureInfo> after = device->GetCaptureInfo(stream);
  TIDEPOOL_REQUIRE_OK(after);
  CHECK_FALSE(after->capturing);
  CHECK(after->capture_id == 0);

  // The captured fill runs when the graph is launched.
  CUgraphExec exec = nullptr;
  TIDEPOOL_REQUIRE_OK(
      driver.Check(driver.cuGraphInstantiate(&exec, graph, 0), "cuGraphInstantiate"));
  TIDEPOOL_REQUIRE_OK(
      driver.Check(driver.cuGraphLaunch(exec, ToCuStream(stream)), "cuGraphLaunch"));
  CHECK(CountMismatches(*device, *buffer, bytes, 0xcafe0001u, stream) == 0);

  TIDEPOOL_REQUIRE_OK(driver.Check(driver.cuGraphExecDestroy(exec), "cuGraphExecDestroy"));
  TIDEPOOL_REQUIRE_OK(driver.Check(driver.cuGraphDestroy(graph), "cuGraphDestroy"));
  if (during.ok()) TIDEPOOL_REQUIRE_OK(device->FreeSegment(*during, bytes));
  TIDEPOOL_REQUIRE_OK(device->FreeSegment(*buffer, bytes));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("another thread can take device memory while a capture runs, without invalidating it") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const CudaDriver& driver = device->driver();
  Stream stream = RequireStream(*device);
  const size_t g = device->granularity();

  TIDEPOOL_REQUIRE_OK(driver.Check(
      driver.cuStreamBeginCapture(ToCuStream(stream), CU_STREAM_CAPTURE_MODE_GLOBAL),
      "cuStreamBeginCapture"));
  // What the caching core does when it grows during someone else's capture: a plain segment, and
  // an expandable range with a chunk mapped into it. The worker thread starts with no current
  // context, so this also checks that CudaDevice makes its context current.
  absl::StatusOr<uintptr_t> segment;
  absl::StatusOr<uintptr_t> range;
  absl::StatusOr<PhysicalHandle> chunk;
  absl::Status mapped;
  std::thread worker([&] {
    segment = device->AllocateSegment(4 * kMiB);
    range = device->ReserveAddressRange(4 * g);
    chunk = device->CreatePhysical(g);
    if (range.ok() && chunk.ok()) mapped = device->Map(*range, g, *chunk);
  });
  worker.join();
  CUgraph graph = nullptr;
  CUresult ended = driver.cuStreamEndCapture(ToCuStream(stream), &graph);

  TIDEPOOL_REQUIRE_OK(segment);
  TIDEPOOL_REQUIRE_OK(range);
  TIDEPOOL_REQUIRE_OK(chunk);
  TIDEPOOL_REQUIRE_OK(mapped);
  TIDEPOOL_REQUIRE_OK(driver.Check(ended, "cuStreamEndCapture (was the capture invalidated?)"));
  TIDEPOOL_REQUIRE_OK(driver.Check(driver.cuGraphDestroy(graph), "cuGraphDestroy"));

  // The memory taken during the capture is ordinary memory.
  FillPattern(*device, *range, g, 0xfeed0001u, stream);
  CHECK(CountMismatches(*device, *range, g, 0xfeed0001u, stream) == 0);
  TIDEPOOL_REQUIRE_OK(device->Unmap(*range, g));
  TIDEPOOL_REQUIRE_OK(device->ReleasePhysical(*chunk));
  TIDEPOOL_REQUIRE_OK(device->ReleaseAddressRange(*range, 4 * g));
  TIDEPOOL_REQUIRE_OK(device->FreeSegment(*segment, 4 * kMiB));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
