// Replays the bundled PyTorch traces on the real GPU, and checks that the CUDA device gives
// the same answer as the simulated one.
//
// Placement in tidepool depends on the sequence of calls, the device's granularity, and (to break
// ties between equal free blocks) the order of the addresses the device hands out. So a trace
// replayed on the H200 must reserve what it reserves on the simulated device with the same
// granularity, within 1% (address order may differ): this is what makes the simulated replay a
// faithful stand-in. The test also checks that real memory was reserved at least up to the live peak and
// handed back at the end (the driver's free memory returns to where it was).
//
// The traces are read from traces/ under the working directory (Bazel's runfiles, or the GPU
// bundle's folder).
#include <string>

#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "allocator/simulated_device.h"
#include "trace/trace.h"
#include "catch2/catch.hpp"
#include "tests/gpu/gpu_test_util.h"
#include "tools/replay.h"

namespace tidepool {
namespace gpu_test {
namespace {

TEST_CASE("bundled traces replay on the GPU exactly as on the simulated device", "[gpu]") {
  const std::string name = GENERATE(as<std::string>{}, "gpt2_train", "gpt2_varlen_infer",
                                    "resnet18_prefetch_train", "resnet50_train",
                                    "varlen_small_infer", "generate_tokens",
                                    "checkpoint_amp_train");
  const bool expandable = GENERATE(true, false);
  INFO("trace " << name << (expandable ? " (expandable segments)" : " (plain segments)"));
  absl::StatusOr<Trace> trace = ReadTrace("traces/" + name + ".csv.gz");
  TIDEPOOL_REQUIRE_OK(trace);
  Config config;
  config.expandable_segments = expandable;

  std::unique_ptr<CudaDevice> gpu = RequireDevice();
  absl::StatusOr<MemoryInfo> before = gpu->GetMemoryInfo();
  TIDEPOOL_REQUIRE_OK(before);
  absl::StatusOr<ReplayResult> on_gpu = ReplayTrace(*trace, gpu.get(), config);
  TIDEPOOL_REQUIRE_OK(on_gpu);
  absl::StatusOr<MemoryInfo> after = gpu->GetMemoryInfo();
  TIDEPOOL_REQUIRE_OK(after);

  SimulatedDevice::Options options;
  options.granularity = gpu->granularity();
  options.capacity = before->total_bytes;
  SimulatedDevice simulated(options);
  absl::StatusOr<ReplayResult> on_sim = ReplayTrace(*trace, &simulated, config);
  TIDEPOOL_REQUIRE_OK(on_sim);

  const AllocatorStats& gpu_stats = on_gpu->stats;
  WARN(name << (expandable ? " expandable" : " plain") << ": peak live " << on_gpu->peak_live_bytes
            << ", peak reserved " << gpu_stats.reserved_bytes.peak << " (ratio "
            << on_gpu->reserved_over_live() << "), device allocations "
            << gpu_stats.device_allocations << ", malloc p50 " << on_gpu->malloc_latency.p50_ns
            << " ns, free p50 " << on_gpu->free_latency.p50_ns << " ns");
  CHECK(on_gpu->allocations == on_sim->allocations);
  CHECK(gpu_stats.reserved_bytes.peak >= on_gpu->peak_live_bytes);
  const double sim_peak = static_cast<double>(on_sim->stats.reserved_bytes.peak);
  CHECK(static_cast<double>(gpu_stats.reserved_bytes.peak) <= sim_peak * 1.01);
  CHECK(static_cast<double>(gpu_stats.reserved_bytes.peak) >= sim_peak * 0.99);
  CHECK(gpu_stats.ooms == 0);
  // Everything went back: the driver's free memory is where it was, give or take other users.
  CHECK(after->free_bytes + (size_t{256} << 20) >= before->free_bytes);
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
