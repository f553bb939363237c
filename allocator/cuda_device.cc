// The CUDA device: see cuda_device.h for how the seam maps onto the driver API and why.
#include "allocator/cuda_device.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

// Physical memory for expandable segments: plain pinned memory on `device`, not exportable.
CUmemAllocationProp PinnedDeviceMemory(CUdevice device) {
  CUmemAllocationProp properties = {};
  properties.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  properties.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  properties.location.id = device;
  properties.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  return properties;
}

CUdeviceptr ToDevicePointer(uintptr_t address) { return static_cast<CUdeviceptr>(address); }
CUstream ToCuStream(Stream stream) { return static_cast<CUstream>(stream); }
CUevent ToCuEvent(Event event) { return static_cast<CUevent>(event); }

}  // namespace

absl::StatusOr<std::unique_ptr<CudaDevice>> CudaDevice::Create(int ordinal) {
  absl::StatusOr<const CudaDriver*> loaded = CudaDriver::Get();
  if (!loaded.ok()) return loaded.status();
  const CudaDriver& driver = **loaded;

  int count = 0;
  if (absl::Status s = driver.Check(driver.cuDeviceGetCount(&count), "cuDeviceGetCount");
      !s.ok()) {
    return s;
  }
  if (ordinal < 0 || ordinal >= count) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA device %d does not exist: this machine has %d device(s)", ordinal, count));
  }
  CUdevice device = 0;
  if (absl::Status s = driver.Check(driver.cuDeviceGet(&device, ordinal),
                                    absl::StrCat("cuDeviceGet(", ordinal, ")"));
      !s.ok()) {
    return s;
  }
  CUcontext context = nullptr;
  if (absl::Status s = driver.Check(driver.cuDevicePrimaryCtxRetain(&context, device),
                                    absl::StrCat("cuDevicePrimaryCtxRetain(", ordinal, ")"));
      !s.ok()) {
    return s;
  }
  // From here the destructor releases the context on every path.
  std::unique_ptr<CudaDevice> cuda_device(new CudaDevice(driver, ordinal, device, context));
  if (absl::Status s = cuda_device->MakeCurrent(); !s.ok()) return s;
  CUmemAllocationProp properties = PinnedDeviceMemory(device);
  if (absl::Status s = driver.Check(
          driver.cuMemGetAllocationGranularity(&cuda_device->granularity_, &properties,
                                               CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
          absl::StrCat("cuMemGetAllocationGranularity(device ", ordinal, ")"));
      !s.ok()) {
    return s;
  }
  return cuda_device;
}

CudaDevice::CudaDevice(const CudaDriver& driver, int ordinal, CUdevice device, CUcontext context)
    : driver_(driver), ordinal_(ordinal), device_(device), context_(context) {}

CudaDevice::~CudaDevice() {
  // The result is not checked: at process exit the driver may already be shutting down, and a
  // destructor has no one to tell.
  driver_.cuDevicePrimaryCtxRelease(device_);
}

absl::Status CudaDevice::MakeCurrent() const {
  CUcontext current = nullptr;
  if (driver_.cuCtxGetCurrent(&current) == CUDA_SUCCESS && current == context_) {
    return absl::OkStatus();
  }
  return driver_.Check(driver_.cuCtxSetCurrent(context_), "cuCtxSetCurrent");
}

bool CudaDevice::IsDefaultStream(Stream stream) {
  CUstream handle = ToCuStream(stream);
  return handle == nullptr || handle == CU_STREAM_LEGACY || handle == CU_STREAM_PER_THREAD;
}

template <typename Call>
CUresult CudaDevice::RunRelaxed(Call call) const {
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  CUresult exchanged = driver_.cuThreadExchangeStreamCaptureMode(&mode);
  if (exchanged != CUDA_SUCCESS) return exchanged;
  CUresult result = call();
  // `mode` now holds the thread's previous mode. Restoring it fails only when the driver is shutting
  // down; the call's own result is what the caller must act on (it may hold new memory).
  driver_.cuThreadExchangeStreamCaptureMode(&mode);
  return result;
}

// --- Plain segments ---------------------------------------------------------------------------

absl::StatusOr<uintptr_t> CudaDevice::AllocateSegment(size_t bytes) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUdeviceptr address = 0;
  CUresult result = RunRelaxed([&] { return driver_.cuMemAlloc(&address, bytes); });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrCat("cuMemAlloc(", bytes, ")"));
  }
  return static_cast<uintptr_t>(address);
}

absl::Status CudaDevice::FreeSegment(uintptr_t address, size_t bytes) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUresult result = RunRelaxed([&] { return driver_.cuMemFree(ToDevicePointer(address)); });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrFormat("cuMemFree(%#x, %d bytes)", address, bytes));
  }
  return absl::OkStatus();
}

// --- Virtual memory (expandable segments) -------------------------------------------------------

absl::StatusOr<uintptr_t> CudaDevice::ReserveAddressRange(size_t bytes) {
  if (bytes == 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA device %d: address range of %d bytes is not a multiple of the granularity (%d)",
        ordinal_, bytes, granularity_));
  }
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUdeviceptr address = 0;
  CUresult result = RunRelaxed([&] {
    return driver_.cuMemAddressReserve(&address, bytes, granularity_, /*addr=*/0, /*flags=*/0);
  });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrCat("cuMemAddressReserve(", bytes, ")"));
  }
  return static_cast<uintptr_t>(address);
}

absl::Status CudaDevice::ReleaseAddressRange(uintptr_t address, size_t bytes) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUresult result =
      RunRelaxed([&] { return driver_.cuMemAddressFree(ToDevicePointer(address), bytes); });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrFormat("cuMemAddressFree(%#x, %d)", address, bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<PhysicalHandle> CudaDevice::CreatePhysical(size_t bytes) {
  if (bytes == 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA device %d: physical chunk of %d bytes is not a multiple of the granularity (%d)",
        ordinal_, bytes, granularity_));
  }
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUmemAllocationProp properties = PinnedDeviceMemory(device_);
  CUmemGenericAllocationHandle handle = 0;
  CUresult result =
      RunRelaxed([&] { return driver_.cuMemCreate(&handle, bytes, &properties, /*flags=*/0); });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrCat("cuMemCreate(", bytes, ")"));
  }
  return static_cast<PhysicalHandle>(handle);
}

absl::Status CudaDevice::ReleasePhysical(PhysicalHandle handle) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUresult result = RunRelaxed(
      [&] { return driver_.cuMemRelease(static_cast<CUmemGenericAllocationHandle>(handle)); });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrFormat("cuMemRelease(%#x)", handle));
  }
  return absl::OkStatus();
}

absl::Status CudaDevice::Map(uintptr_t address, size_t bytes, PhysicalHandle handle) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUresult mapped = RunRelaxed([&] {
    return driver_.cuMemMap(ToDevicePointer(address), bytes, /*offset=*/0,
                            static_cast<CUmemGenericAllocationHandle>(handle), /*flags=*/0);
  });
  if (mapped != CUDA_SUCCESS) {
    return driver_.Check(mapped, absl::StrFormat("cuMemMap(%#x, %d)", address, bytes));
  }
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device_;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  CUresult granted = RunRelaxed([&] {
    return driver_.cuMemSetAccess(ToDevicePointer(address), bytes, &access, /*count=*/1);
  });
  if (granted != CUDA_SUCCESS) {
    // Leave no half-made mapping behind: the caller treats a failed Map as nothing mapped.
    RunRelaxed([&] { return driver_.cuMemUnmap(ToDevicePointer(address), bytes); });
    return driver_.Check(granted, absl::StrFormat("cuMemSetAccess(%#x, %d)", address, bytes));
  }
  return absl::OkStatus();
}

absl::Status CudaDevice::Unmap(uintptr_t address, size_t bytes) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUresult result =
      RunRelaxed([&] { return driver_.cuMemUnmap(ToDevicePointer(address), bytes); });
  if (result != CUDA_SUCCESS) {
    return driver_.Check(result, absl::StrFormat("cuMemUnmap(%#x, %d)", address, bytes));
  }
  return absl::OkStatus();
}

// --- Events, stream identity and capture info ----------------------------------------------------
// The calls on the allocator's hot path (record, query, stream id, capture info) skip the context
// check when the handle is a stream or event object: those carry their own context. Only the
// default-stream handles are resolved through the current context.

absl::StatusOr<Event> CudaDevice::CreateEvent() {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUevent event = nullptr;
  // Timing is off: the allocator only asks whether work finished, and untimed events are cheaper.
  CUresult result =
      RunRelaxed([&] { return driver_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING); });
  if (result != CUDA_SUCCESS) return driver_.Check(result, "cuEventCreate");
  return static_cast<Event>(event);
}

absl::Status CudaDevice::DestroyEvent(Event event) {
  return driver_.Check(driver_.cuEventDestroy(ToCuEvent(event)), "cuEventDestroy");
}

absl::Status CudaDevice::RecordEvent(Event event, Stream stream) {
  if (IsDefaultStream(stream)) {
    if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  }
  return driver_.Check(driver_.cuEventRecord(ToCuEvent(event), ToCuStream(stream)),
                       "cuEventRecord");
}

absl::StatusOr<bool> CudaDevice::QueryEvent(Event event) {
  CUresult result = driver_.cuEventQuery(ToCuEvent(event));
  if (result == CUDA_SUCCESS) return true;
  if (result == CUDA_ERROR_NOT_READY) return false;
  return driver_.Check(result, "cuEventQuery");
}

absl::Status CudaDevice::SynchronizeEvent(Event event) {
  return driver_.Check(driver_.cuEventSynchronize(ToCuEvent(event)), "cuEventSynchronize");
}

absl::Status CudaDevice::SynchronizeDevice() {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  return driver_.Check(driver_.cuCtxSynchronize(context_), "cuCtxSynchronize");
}

absl::StatusOr<StreamId> CudaDevice::GetStreamId(Stream stream) {
  if (IsDefaultStream(stream)) {
    if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  }
  unsigned long long id = 0;  // NOLINT(runtime/int): the driver's type
  CUresult result = driver_.cuStreamGetId(ToCuStream(stream), &id);
  if (result != CUDA_SUCCESS) return driver_.Check(result, "cuStreamGetId");
  return static_cast<StreamId>(id);
}

absl::StatusOr<CaptureInfo> CudaDevice::GetCaptureInfo(Stream stream) {
  if (IsDefaultStream(stream)) {
    if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  }
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  cuuint64_t capture_id = 0;
  CUresult result = driver_.cuStreamGetCaptureInfo(ToCuStream(stream), &status, &capture_id,
                                                   /*graph_out=*/nullptr,
                                                   /*dependencies_out=*/nullptr,
                                                   /*edgeData_out=*/nullptr,
                                                   /*numDependencies_out=*/nullptr);
  if (result != CUDA_SUCCESS) return driver_.Check(result, "cuStreamGetCaptureInfo");
  CaptureInfo info;
  // The id is valid only for an active capture; an invalidated one no longer captures anything.
  if (status == CU_STREAM_CAPTURE_STATUS_ACTIVE) {
    info.capturing = true;
    info.capture_id = capture_id;
  }
  info.invalidated = status == CU_STREAM_CAPTURE_STATUS_INVALIDATED;
  return info;
}

absl::StatusOr<MemoryInfo> CudaDevice::GetMemoryInfo() {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  MemoryInfo info;
  // Asked during captures too (growth checks it), where a global-mode capture may forbid it.
  CUresult result =
      RunRelaxed([&] { return driver_.cuMemGetInfo(&info.free_bytes, &info.total_bytes); });
  if (result != CUDA_SUCCESS) return driver_.Check(result, "cuMemGetInfo");
  return info;
}

// --- Streams (GraphDevice: the caching core never calls these) ---------------------------------

absl::StatusOr<Stream> CudaDevice::CreateStream() {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUstream stream = nullptr;
  CUresult result = driver_.cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING);
  if (result != CUDA_SUCCESS) return driver_.Check(result, "cuStreamCreate");
  return static_cast<Stream>(stream);
}

absl::Status CudaDevice::DestroyStream(Stream stream) {
  return driver_.Check(driver_.cuStreamDestroy(ToCuStream(stream)), "cuStreamDestroy");
}

absl::Status CudaDevice::SynchronizeStream(Stream stream) {
  if (IsDefaultStream(stream)) {
    if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  }
  return driver_.Check(driver_.cuStreamSynchronize(ToCuStream(stream)), "cuStreamSynchronize");
}

// --- Graph capture ----------------------------------------------------------------------------

absl::StatusOr<uint64_t> CudaDevice::BeginCapture(Stream stream, CaptureMode mode) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUstreamCaptureMode cu_mode = mode == CaptureMode::kGlobal        ? CU_STREAM_CAPTURE_MODE_GLOBAL
                                : mode == CaptureMode::kThreadLocal ? CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
                                                                    : CU_STREAM_CAPTURE_MODE_RELAXED;
  if (absl::Status s = driver_.Check(driver_.cuStreamBeginCapture(ToCuStream(stream), cu_mode),
                                     "cuStreamBeginCapture");
      !s.ok()) {
    return s;
  }
  absl::StatusOr<CaptureInfo> info = GetCaptureInfo(stream);
  if (!info.ok() || !info->capturing) {
    CUgraph graph = nullptr;
    if (driver_.cuStreamEndCapture(ToCuStream(stream), &graph) == CUDA_SUCCESS && graph) {
      driver_.cuGraphDestroy(graph);
    }
    return info.ok() ? absl::InternalError("cuStreamBeginCapture: the stream is not capturing")
                     : info.status();
  }
  return info->capture_id;
}

absl::StatusOr<GraphHandle> CudaDevice::EndCapture(Stream stream) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUgraph graph = nullptr;
  CUresult result = driver_.cuStreamEndCapture(ToCuStream(stream), &graph);
  if (result != CUDA_SUCCESS) {
    if (graph != nullptr) driver_.cuGraphDestroy(graph);
    return driver_.Check(result, "cuStreamEndCapture");
  }
  return static_cast<GraphHandle>(graph);
}

absl::StatusOr<GraphExecHandle> CudaDevice::InstantiateGraph(GraphHandle graph) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  CUgraphExec exec = nullptr;
  CUresult result = driver_.cuGraphInstantiate(&exec, static_cast<CUgraph>(graph), 0);
  if (result != CUDA_SUCCESS) return driver_.Check(result, "cuGraphInstantiate");
  return static_cast<GraphExecHandle>(exec);
}

absl::Status CudaDevice::LaunchGraph(GraphExecHandle exec, Stream stream) {
  if (absl::Status s = MakeCurrent(); !s.ok()) return s;
  return driver_.Check(driver_.cuGraphLaunch(static_cast<CUgraphExec>(exec), ToCuStream(stream)),
                       "cuGraphLaunch");
}

absl::Status CudaDevice::DestroyGraph(GraphHandle graph) {
  return driver_.Check(driver_.cuGraphDestroy(static_cast<CUgraph>(graph)), "cuGraphDestroy");
}

absl::Status CudaDevice::DestroyGraphExec(GraphExecHandle exec) {
  return driver_.Check(driver_.cuGraphExecDestroy(static_cast<CUgraphExec>(exec)),
                       "cuGraphExecDestroy");
}

}  // namespace tidepool
