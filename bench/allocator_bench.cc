// The allocator benchmark: tidepool's cached malloc + free pair against the CUDA anchors, in one
// binary and one run so that the figures share a machine, a driver and a moment.
//
//   allocator_bench [--device=sim|cuda] [--quick] [--libtidepool=PATH]
//
// Measured (bench/pair_benchmark.h has the loops and the tables):
//   * tidepool: a CachingAllocator (configured by TIDEPOOL_CONF) on the chosen device;
//   * tidepool's PoolManager (Allocate with no route, then Free), the C++ call the C API makes;
//   * on cuda only, the C API: tidepool_malloc + tidepool_free linked into this binary, and the
//     same calls through libtidepool.so.1 opened with dlopen (--libtidepool, by default
//     installed/lib/libtidepool.so.1 beside this binary, as tools/gather_gpu_tests.sh lays it
//     out; the column is skipped, saying so, when there is none). Each keeps a runtime of its
//     own here: a benchmark measures the calls, not the one-runtime rule;
//   * on cuda only, the anchors: cudaMalloc + cudaFree (cuMemAlloc / cuMemFree) and
//     cudaMallocAsync + cudaFreeAsync (cuMemAllocAsync / cuMemFreeAsync on the device's default
//     memory pool, its release threshold at UINT64_MAX so that freed memory stays cached).
// The PyTorch anchor needs PyTorch and is measured by bench/pytorch_anchor.cc on the GPU host.
//
// --device: cuda (GPU 0) or sim (the simulated device: tidepool's CPU path alone, no anchors);
//   by default cuda when a GPU is usable. --quick: fewer repetitions, for a smoke run.
#include <cuda.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "allocator/cuda_driver.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/simulated_device.h"
#include "bench/pair_benchmark.h"
#include "integrations/c_api/tidepool.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"

namespace tidepool {
namespace {

using bench::Effort;
using bench::Fail;

void CheckOk(const absl::Status& status) {
  if (!status.ok()) Fail(status.ToString());
}

// Streams for every allocator measured here come from the device under test (a GraphDevice: the
// caching allocator's own Device seam makes no streams).
class DeviceStreams : public bench::PairAllocator {
 public:
  explicit DeviceStreams(GraphDevice* device) : device_(device) {}

  void* CreateStream() override {
    absl::StatusOr<Stream> stream = device_->CreateStream();
    CheckOk(stream.status());
    return *stream;
  }
  void SynchronizeStream(void* stream) override { CheckOk(device_->SynchronizeStream(stream)); }
  void DestroyStream(void* stream) override { CheckOk(device_->DestroyStream(stream)); }

 protected:
  GraphDevice* const device_;
};

class TidepoolPairs : public DeviceStreams {
 public:
  TidepoolPairs(GraphDevice* device, std::unique_ptr<CachingAllocator> allocator)
      : DeviceStreams(device), allocator_(std::move(allocator)) {}
  // Leaves the device as it was found.
  ~TidepoolPairs() override { CheckOk(allocator_->EmptyCache()); }

  std::string name() const override { return "tidepool"; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override { return bench::FastAllocatorEffort(quick); }
  void* Allocate(size_t bytes, void* stream) override {
    absl::StatusOr<void*> block = allocator_->Allocate(bytes, stream);
    CheckOk(block.status());
    return *block;
  }
  void Free(void* ptr, void*) override { CheckOk(allocator_->Free(ptr)); }

 private:
  const std::unique_ptr<CachingAllocator> allocator_;
};

// PoolManager::Allocate with no route anywhere, then the allocator's Free: the C++ pair the C
// API's tidepool_malloc + tidepool_free wrap (the C API's cost is the difference).
class PoolManagerPairs : public DeviceStreams {
 public:
  PoolManagerPairs(GraphDevice* device, std::unique_ptr<CachingAllocator> allocator)
      : DeviceStreams(device), allocator_(std::move(allocator)), manager_(allocator_.get()) {}
  ~PoolManagerPairs() override { CheckOk(allocator_->EmptyCache()); }

  std::string name() const override { return "tidepool PoolManager"; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override { return bench::FastAllocatorEffort(quick); }
  void* Allocate(size_t bytes, void* stream) override {
    absl::StatusOr<void*> block = manager_.Allocate(bytes, stream);
    CheckOk(block.status());
    return *block;
  }
  void Free(void* ptr, void*) override { CheckOk(allocator_->Free(ptr)); }

 protected:
  const std::unique_ptr<CachingAllocator> allocator_;
  PoolManager manager_;
};

// The same with the calling thread routed to a pool (a current-thread route, as sglang's
// symmetric-memory scope does): the difference to the PoolManager column is the cost of the
// routing decision. Each thread begins its route before its first pair; a thread's route ends,
// and its reference goes, when the thread exits.
class RoutedPairs : public PoolManagerPairs {
 public:
  RoutedPairs(GraphDevice* device, std::unique_ptr<CachingAllocator> allocator)
      : PoolManagerPairs(device, std::move(allocator)), pool_(NewUserPoolId()) {}

  std::string name() const override { return "tidepool, routed to a pool"; }
  void PrepareThread() override {
    thread_local PoolManager* routed = nullptr;
    if (routed == &manager_) return;
    CheckOk(manager_.Begin(pool_, RouteFilter::CurrentThread()));
    routed = &manager_;
  }

 private:
  const PoolId pool_;
};

// The C API's entry points, from this binary or from a libtidepool.so.1 opened with dlopen.
struct CApi {
  decltype(&tidepool_malloc) malloc = nullptr;
  decltype(&tidepool_free) free = nullptr;
  decltype(&tidepool_empty_cache) empty_cache = nullptr;
  decltype(&tidepool_last_error) last_error = nullptr;
};

CApi LinkedCApi() {
  return CApi{&tidepool_malloc, &tidepool_free, &tidepool_empty_cache, &tidepool_last_error};
}

// The entry points of the library at `path`, or nullopt (with why in `why`) if it cannot be
// opened. RTLD_LOCAL: its tidepool_* must not stand in for this binary's own.
std::optional<CApi> OpenedCApi(const std::string& path, std::string* why) {
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    *why = dlerror();
    return std::nullopt;
  }
  CApi api;
  api.malloc = reinterpret_cast<decltype(api.malloc)>(dlsym(library, "tidepool_malloc"));
  api.free = reinterpret_cast<decltype(api.free)>(dlsym(library, "tidepool_free"));
  api.empty_cache =
      reinterpret_cast<decltype(api.empty_cache)>(dlsym(library, "tidepool_empty_cache"));
  api.last_error =
      reinterpret_cast<decltype(api.last_error)>(dlsym(library, "tidepool_last_error"));
  if (api.malloc == nullptr || api.free == nullptr || api.empty_cache == nullptr ||
      api.last_error == nullptr) {
    *why = absl::StrCat(path, " lacks the C API");
    return std::nullopt;
  }
  return api;
}

// tidepool_malloc + tidepool_free on device 0, on streams of the benchmark's CUDA device (the C
// API's runtime drives the same GPU through the same primary context, so the handles are valid
// there).
class CApiPairs : public DeviceStreams {
 public:
  CApiPairs(GraphDevice* device, CApi api, std::string name)
      : DeviceStreams(device), api_(api), name_(std::move(name)) {}
  ~CApiPairs() override { Check(api_.empty_cache(0), "tidepool_empty_cache"); }

  std::string name() const override { return name_; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override { return bench::FastAllocatorEffort(quick); }
  void* Allocate(size_t bytes, void* stream) override {
    void* ptr = nullptr;
    Check(api_.malloc(&ptr, bytes, 0, stream), "tidepool_malloc");
    return ptr;
  }
  void Free(void* ptr, void*) override { Check(api_.free(ptr), "tidepool_free"); }

 private:
  void Check(tidepool_status status, const char* what) const {
    if (status != TIDEPOOL_OK) Fail(absl::StrCat(name_, ": ", what, ": ", api_.last_error()));
  }

  const CApi api_;
  const std::string name_;
};

// The anchors call the driver directly from the benchmark's threads, which need the device's
// context current (CudaDevice's own methods see to that themselves).
// Not an allocator: one Device::GetStreamId per pair and nothing else. tidepool asks the device
// for the stream's unique id on every allocation (handles are reused after a stream is
// destroyed, ids are not), so this column is the floor under tidepool's column.
class StreamIdLookups : public DeviceStreams {
 public:
  using DeviceStreams::DeviceStreams;
  std::string name() const override { return "stream id lookup alone"; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override { return bench::FastAllocatorEffort(quick); }
  void* Allocate(size_t, void* stream) override {
    absl::StatusOr<StreamId> id = device_->GetStreamId(stream);
    CheckOk(id.status());
    return reinterpret_cast<void*>(static_cast<uintptr_t>(*id) | 1);
  }
  void Free(void*, void*) override {}
};

class CudaAnchor : public DeviceStreams {
 public:
  explicit CudaAnchor(CudaDevice* device) : DeviceStreams(device), cuda_(device) {}
  void PrepareThread() override { CheckOk(cuda_->MakeCurrent()); }

 protected:
  void Check(CUresult result, absl::string_view what) const {
    if (result != CUDA_SUCCESS) CheckOk(cuda_->driver().Check(result, what));
  }
  const CudaDriver& driver() const { return cuda_->driver(); }

 private:
  CudaDevice* const cuda_;
};

class CudaMallocPairs : public CudaAnchor {
 public:
  using CudaAnchor::CudaAnchor;
  std::string name() const override { return "cudaMalloc + cudaFree"; }
  bool stream_ordered() const override { return false; }
  Effort effort(bool quick) const override { return bench::SlowAllocatorEffort(quick); }
  void* Allocate(size_t bytes, void*) override {
    CUdeviceptr address = 0;
    Check(driver().cuMemAlloc(&address, bytes), "cuMemAlloc");
    return reinterpret_cast<void*>(address);
  }
  void Free(void* ptr, void*) override {
    Check(driver().cuMemFree(reinterpret_cast<CUdeviceptr>(ptr)), "cuMemFree");
  }
};

class CudaMallocAsyncPairs : public CudaAnchor {
 public:
  using CudaAnchor::CudaAnchor;
  // Keeps every freed byte in the default pool, as PyTorch's cudaMallocAsync backend and RMM's
  // cuda_async_memory_resource do; with the default threshold of 0 the pool would return memory
  // to the device at every synchronization and the anchor would measure the driver instead.
  void KeepFreedMemoryCached(int ordinal) {
    CUdevice device = 0;
    Check(driver().cuDeviceGet(&device, ordinal), "cuDeviceGet");
    CUmemoryPool pool = nullptr;
    Check(driver().cuDeviceGetDefaultMemPool(&pool, device), "cuDeviceGetDefaultMemPool");
    cuuint64_t release_threshold = UINT64_MAX;
    Check(driver().cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                                         &release_threshold),
          "cuMemPoolSetAttribute(CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)");
  }

  std::string name() const override { return "cudaMallocAsync + cudaFreeAsync"; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override { return bench::FastAllocatorEffort(quick); }
  void* Allocate(size_t bytes, void* stream) override {
    CUdeviceptr address = 0;
    Check(driver().cuMemAllocAsync(&address, bytes, static_cast<CUstream>(stream)),
          "cuMemAllocAsync");
    return reinterpret_cast<void*>(address);
  }
  void Free(void* ptr, void* stream) override {
    Check(driver().cuMemFreeAsync(reinterpret_cast<CUdeviceptr>(ptr),
                                  static_cast<CUstream>(stream)),
          "cuMemFreeAsync");
  }
};

struct Flags {
  std::string device;  // "", "sim" or "cuda"; "" picks cuda when a GPU is usable
  bool quick = false;
  std::string libtidepool;  // "": installed/lib/libtidepool.so.1 beside the binary
};

Flags ParseFlags(int argc, char** argv) {
  constexpr char kUsage[] =
      "usage: allocator_bench [--device=sim|cuda] [--quick] [--libtidepool=PATH]";
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    const absl::string_view argument = argv[i];
    if (argument == "--device=sim" || argument == "--device=cuda") {
      flags.device = std::string(argument.substr(argument.find('=') + 1));
    } else if (argument == "--quick") {
      flags.quick = true;
    } else if (absl::StartsWith(argument, "--libtidepool=")) {
      flags.libtidepool = std::string(argument.substr(argument.find('=') + 1));
    } else {
      Fail(absl::StrCat("unknown argument \"", argument, "\"\n", kUsage));
    }
  }
  return flags;
}

int Main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);
  absl::StatusOr<Config> config = Config::FromEnvironment();
  CheckOk(config.status());

  std::unique_ptr<CudaDevice> cuda;
  std::unique_ptr<SimulatedDevice> simulated;
  std::string device_description;
  if (flags.device != "sim") {
    absl::StatusOr<std::unique_ptr<CudaDevice>> created = CudaDevice::Create(0);
    if (created.ok()) {
      cuda = *std::move(created);
      if (absl::Status s = cuda->driver().CheckTestEntryPoints(); !s.ok()) Fail(s.ToString());
      device_description = "cuda (GPU 0)";
    } else if (flags.device == "cuda") {
      Fail(created.status().ToString());
    } else {
      device_description =
          absl::StrCat("sim (no usable GPU: ", created.status().message(), ")");
    }
  }
  if (cuda == nullptr) {
    simulated = std::make_unique<SimulatedDevice>();
    if (device_description.empty()) device_description = "sim";
  }
  GraphDevice* device =
      cuda != nullptr ? static_cast<GraphDevice*>(cuda.get()) : simulated.get();

  std::printf("# tidepool allocator benchmark\n\ndevice: %s%s\n\n", device_description.c_str(),
              flags.quick ? ", --quick" : "");
  absl::StatusOr<std::unique_ptr<CachingAllocator>> allocator =
      CachingAllocator::Create(device, *config);
  CheckOk(allocator.status());
  TidepoolPairs tidepool(device, *std::move(allocator));
  absl::StatusOr<std::unique_ptr<CachingAllocator>> routed_allocator =
      CachingAllocator::Create(device, *config);
  CheckOk(routed_allocator.status());
  RoutedPairs routed(device, *std::move(routed_allocator));
  absl::StatusOr<std::unique_ptr<CachingAllocator>> manager_allocator =
      CachingAllocator::Create(device, *config);
  CheckOk(manager_allocator.status());
  PoolManagerPairs pool_manager(device, *std::move(manager_allocator));
  StreamIdLookups stream_ids(device);
  std::vector<bench::PairAllocator*> measured = {&tidepool, &pool_manager, &routed, &stream_ids};

  // The C API on the GPU only: its runtime starts from the CUDA devices, and a simulated one
  // would not know the benchmark's streams.
  std::unique_ptr<CApiPairs> c_linked;
  std::unique_ptr<CApiPairs> c_opened;
  if (cuda != nullptr) {
    c_linked = std::make_unique<CApiPairs>(device, LinkedCApi(), "C API, linked");
    measured.push_back(c_linked.get());
    std::string path = flags.libtidepool;
    if (path.empty()) {
      const std::string self = argv[0];
      const size_t slash = self.rfind('/');
      path = (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) +
             "/installed/lib/libtidepool.so.1";
    }
    std::string why;
    if (std::optional<CApi> api = OpenedCApi(path, &why)) {
      c_opened = std::make_unique<CApiPairs>(device, *api, "C API, libtidepool.so.1 (dlopen)");
      measured.push_back(c_opened.get());
    } else {
      std::printf("(the dlopen column is skipped: %s)\n\n", why.c_str());
    }
  }

  std::unique_ptr<CudaMallocPairs> cuda_malloc;
  std::unique_ptr<CudaMallocAsyncPairs> cuda_malloc_async;
  if (cuda != nullptr) {
    cuda_malloc = std::make_unique<CudaMallocPairs>(cuda.get());
    cuda_malloc_async = std::make_unique<CudaMallocAsyncPairs>(cuda.get());
    cuda_malloc_async->PrepareThread();
    cuda_malloc_async->KeepFreedMemoryCached(cuda->ordinal());
    measured.push_back(cuda_malloc.get());
    measured.push_back(cuda_malloc_async.get());
  }
  bench::RunPairBenchmarks(measured, flags.quick);
  return 0;
}

}  // namespace
}  // namespace tidepool

int main(int argc, char** argv) { return tidepool::Main(argc, argv); }
