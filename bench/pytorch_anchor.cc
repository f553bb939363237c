// The PyTorch anchor of the allocator benchmark: PyTorch's CUDA caching allocator, called from
// C++ (`c10::cuda::CUDACachingAllocator::raw_alloc_with_stream` + `raw_delete`), measured with
// exactly the loops, sizes, thread counts and tables of bench/allocator_bench (both include
// bench/pair_benchmark.h), so its figures stand next to tidepool's.
//
// With --replay it replays traces instead, through bench/replay_loop.h, the loop `tidepool
// replay` runs (one created stream per trace stream, each call timed alone), and prints the same
// figures side by side: wall time per operation, malloc p50 / p99 / max, free p50 / p99, peak
// reserved over peak live, and device allocations (PyTorch's num_device_alloc). With
// --timeline=DIR it writes DIR/TRACE.pytorch.csv, `event,reserved_bytes` per bucket, which
// `tidepool replay TRACE --plot=out.svg --plot-compare=PyTorch:DIR/TRACE.pytorch.csv` draws.
//
// NOT BUILT BY BAZEL: it links the installed PyTorch (libc10_cuda.so, libc10.so) and the CUDA
// runtime, which exist only on the GPU host. Build it there with bench/build_pytorch_anchor.sh,
// then run it: `pytorch_anchor [--quick]`, or `pytorch_anchor --replay [--timeline=DIR]
// TRACE.csv[.gz]...`. PYTORCH_CUDA_ALLOC_CONF applies as in PyTorch.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench/pair_benchmark.h"
#include "bench/replay_loop.h"
#include "bench/trace_csv.h"

namespace {

using tidepool::bench::Effort;
using tidepool::bench::Fail;

void CheckCuda(cudaError_t result, const char* what) {
  if (result != cudaSuccess) {
    Fail(std::string(what) + ": " + cudaGetErrorName(result) + " (" + cudaGetErrorString(result) +
         ")");
  }
}

class PytorchPairs : public tidepool::bench::PairAllocator {
 public:
  std::string name() const override { return "PyTorch caching allocator"; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override {
    return tidepool::bench::FastAllocatorEffort(quick);
  }
  // PyTorch's allocator serves the calling thread's current device.
  void PrepareThread() override { CheckCuda(cudaSetDevice(0), "cudaSetDevice(0)"); }
  void* Allocate(size_t bytes, void* stream) override {
    try {
      return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(
          bytes, static_cast<cudaStream_t>(stream));
    } catch (const std::exception& error) {
      Fail(std::string("raw_alloc_with_stream: ") + error.what());
    }
  }
  void Free(void* ptr, void*) override {
    try {
      c10::cuda::CUDACachingAllocator::raw_delete(ptr);
    } catch (const std::exception& error) {
      Fail(std::string("raw_delete: ") + error.what());
    }
  }
  void* CreateStream() override {
    cudaStream_t stream = nullptr;
    CheckCuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
              "cudaStreamCreateWithFlags");
    return stream;
  }
  void SynchronizeStream(void* stream) override {
    CheckCuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  }
  void DestroyStream(void* stream) override {
    CheckCuda(cudaStreamDestroy(static_cast<cudaStream_t>(stream)), "cudaStreamDestroy");
  }
};

// PyTorch's caching allocator as bench/replay_loop.h drives it: raw_alloc_with_stream and
// raw_delete on a stream made for each trace stream, and the device's reserved bytes.
class PytorchReplay {
 public:
  explicit PytorchReplay(const std::vector<tidepool::bench::LoopEvent>& events) {
    for (const tidepool::bench::LoopEvent& event : events) {
      if (streams_.count(event.stream) != 0) continue;
      cudaStream_t stream = nullptr;
      CheckCuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                "cudaStreamCreateWithFlags");
      streams_[event.stream] = stream;
    }
  }
  ~PytorchReplay() {
    for (const auto& [trace_stream, stream] : streams_) {
      CheckCuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      CheckCuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
    }
  }
  bool Allocate(size_t bytes, uint64_t trace_stream, void** block, std::string* error) {
    try {
      *block = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes,
                                                                      streams_.at(trace_stream));
      return true;
    } catch (const std::exception& failure) {
      *error = std::string("raw_alloc_with_stream: ") + failure.what();
      return false;
    }
  }
  bool Free(void* block, std::string* error) {
    try {
      c10::cuda::CUDACachingAllocator::raw_delete(block);
      return true;
    } catch (const std::exception& failure) {
      *error = std::string("raw_delete: ") + failure.what();
      return false;
    }
  }
  // Index 0 of a StatArray is StatType::AGGREGATE (every pool together).
  int64_t ReservedBytes() {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(0).reserved_bytes[0].current;
  }
  size_t streams() const { return streams_.size(); }

 private:
  std::unordered_map<uint64_t, cudaStream_t> streams_;
};

std::string TraceName(const std::string& path) {
  std::string name = path.substr(path.find_last_of('/') + 1);
  for (const char* suffix : {".gz", ".csv"}) {
    const std::string ending(suffix);
    if (name.size() > ending.size() &&
        name.compare(name.size() - ending.size(), ending.size(), ending) == 0) {
      name.resize(name.size() - ending.size());
    }
  }
  return name;
}

int Replay(const std::vector<std::string>& traces, const std::string& timeline_dir) {
  using tidepool::bench::LoopResult;
  std::printf(
      "| trace | allocations | peak live | PyTorch peak reserved | reserved / live | device "
      "allocations | wall per op | malloc p50 | malloc p99 | malloc max | free p50 | free p99 |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const std::string& path : traces) {
    std::vector<tidepool::bench::LoopEvent> events;
    std::string error;
    if (!tidepool::bench::ReadTraceCsv(path, &events, &error)) Fail(error);
    // Each trace from an empty cache, its peaks and counts its own.
    c10::cuda::CUDACachingAllocator::emptyCache();
    c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    c10::cuda::CUDACachingAllocator::resetAccumulatedStats(0);
    LoopResult result;
    {
      PytorchReplay pytorch(events);
      const bool ok = tidepool::bench::ReplayLoop(events, pytorch, &result, &error);
      for (const auto& [trace_pointer, block] : result.live) {
        std::string ignored;
        pytorch.Free(block.block, &ignored);
      }
      if (!ok) Fail(path + ": " + error);
    }
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
    const int64_t peak_reserved = stats.reserved_bytes[0].peak;
    const double wall_per_op = tidepool::bench::WallPerOperationNs(
        result.malloc_latency, result.free_latency, result.allocations + result.frees);
    const double gib = static_cast<double>(int64_t{1} << 30);
    std::printf("| %s | %lld | %.2f GiB | %.2f GiB | %.3f | %lld | %.0f ns | %lld ns | %lld ns | "
                "%lld ns | %lld ns | %lld ns |\n",
                TraceName(path).c_str(), static_cast<long long>(result.allocations),
                result.peak_live_bytes / gib, peak_reserved / gib,
                result.peak_live_bytes == 0
                    ? 0.0
                    : static_cast<double>(peak_reserved) / result.peak_live_bytes,
                static_cast<long long>(stats.num_device_alloc), wall_per_op,
                static_cast<long long>(result.malloc_latency.p50_ns),
                static_cast<long long>(result.malloc_latency.p99_ns),
                static_cast<long long>(result.malloc_latency.max_ns),
                static_cast<long long>(result.free_latency.p50_ns),
                static_cast<long long>(result.free_latency.p99_ns));
    if (!timeline_dir.empty()) {
      const std::string out = timeline_dir + "/" + TraceName(path) + ".pytorch.csv";
      FILE* file = std::fopen(out.c_str(), "w");
      if (file == nullptr) Fail("cannot write " + out);
      std::fprintf(file, "event,reserved_bytes\n");
      for (const tidepool::bench::LoopPoint& point : result.timeline) {
        std::fprintf(file, "%lld,%lld\n", static_cast<long long>(point.event),
                     static_cast<long long>(point.reserved_bytes));
      }
      std::fclose(file);
    }
    c10::cuda::CUDACachingAllocator::emptyCache();
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  bool replay = false;
  std::string timeline_dir;
  std::vector<std::string> traces;
  const std::string usage =
      "usage: pytorch_anchor [--quick] | pytorch_anchor --replay [--timeline=DIR] TRACE...";
  for (int i = 1; i < argc; ++i) {
    const std::string argument = argv[i];
    if (argument == "--quick") {
      quick = true;
    } else if (argument == "--replay") {
      replay = true;
    } else if (argument.rfind("--timeline=", 0) == 0) {
      timeline_dir = argument.substr(11);
    } else if (replay && argument.rfind("--", 0) != 0) {
      traces.push_back(argument);
    } else {
      Fail("unknown argument \"" + argument + "\"\n" + usage);
    }
  }
  if (replay) {
    if (traces.empty()) Fail("--replay needs at least one trace\n" + usage);
    CheckCuda(cudaSetDevice(0), "cudaSetDevice(0)");
    c10::cuda::CUDACachingAllocator::init(1);
    return Replay(traces, timeline_dir);
  }
  PytorchPairs pytorch;
  pytorch.PrepareThread();
  cudaDeviceProp properties{};
  CheckCuda(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties(0)");
  // One device: the benchmark uses GPU 0 only.
  c10::cuda::CUDACachingAllocator::init(1);

  std::printf("# PyTorch caching allocator anchor\n\ndevice: cuda (GPU 0, %s)%s\n\n",
              properties.name, quick ? ", --quick" : "");
  tidepool::bench::RunPairBenchmarks({&pytorch}, quick);
  return 0;
}
