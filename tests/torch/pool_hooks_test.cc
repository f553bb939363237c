// PyTorch's pool hooks (integrations/torch/pool_hooks.h) on a simulated device, with filters
// shaped as PyTorch's: a capture's (accepts the streams of one capture, whose id it learns only
// after the begin) and a thread's (accepts everything). Checked: a capture is told apart and
// marked for exactly as long as it runs; its allocations go to its pool; sglang's order (the
// capture's routing ended in mid-capture and begun again) keeps the mark, and with balanced
// behaviour keeps references balanced, while PyTorch's behaviour leaks one as PyTorch does;
// misuse is refused.
#include <memory>
#include <thread>

#include "absl/status/status.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "catch2/catch.hpp"
#include "integrations/torch/pool_hooks.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "runtime/runtime.h"

namespace tidepool {
namespace {

using torch_hooks::PoolHooks;

constexpr size_t kKiB = size_t{1} << 10;

struct Harness {
  Harness() {
    absl::StatusOr<std::unique_ptr<Runtime>> made = Runtime::Create({&device}, Config{});
    REQUIRE(made.ok());
    runtime = *std::move(made);
    hooks = std::make_unique<PoolHooks>(runtime.get());
    absl::StatusOr<Stream> made_stream = device.CreateStream();
    REQUIRE(made_stream.ok());
    stream = *made_stream;
  }
  PoolManager& pools() { return **runtime->Pools(0); }
  int captures() { return pools().allocator()->captures_underway(); }
  PoolId HomeOf(void* block) {
    absl::StatusOr<BlockHome> home = runtime->HomeOf(block);
    REQUIRE(home.ok());
    return home->pool;
  }
  void* Allocate(size_t bytes = 64 * kKiB) {
    absl::StatusOr<void*> block = runtime->Allocate(0, bytes, stream);
    REQUIRE(block.ok());
    return *block;
  }
  // PyTorch's capture filter: the streams of the capture whose id `*capture_id` holds (0 until
  // the capture has begun).
  PoolHooks::Filter CaptureFilter(const uint64_t* capture_id) {
    return [this, capture_id](Stream s) {
      absl::StatusOr<CaptureInfo> info = device.GetCaptureInfo(s);
      return info.ok() && info->capturing && info->capture_id == *capture_id;
    };
  }
  // PyTorch's current-thread filter.
  static PoolHooks::Filter ThreadFilter() {
    return [id = std::this_thread::get_id()](Stream) { return std::this_thread::get_id() == id; };
  }

  SimulatedDevice device;
  std::unique_ptr<Runtime> runtime;
  std::unique_ptr<PoolHooks> hooks;
  Stream stream = nullptr;
};

TEST_CASE("a capture's begin marks the device until the capture's end, and routes its streams") {
  Harness h;
  const PoolId graph_pool = NewGraphPoolId();
  uint64_t capture_id = 0;
  REQUIRE(h.hooks->Begin(0, graph_pool, h.CaptureFilter(&capture_id)).ok());
  CHECK(h.captures() == 1);  // marked before the capture begins, as PyTorch's order needs
  CHECK(h.hooks->marks(0) == 1);
  absl::StatusOr<uint64_t> began = h.device.BeginCapture(h.stream);
  REQUIRE(began.ok());
  capture_id = *began;
  void* captured = h.Allocate();
  CHECK(h.HomeOf(captured) == graph_pool);
  // Another stream, not capturing, is not the capture's.
  absl::StatusOr<Stream> other = h.device.CreateStream();
  REQUIRE(other.ok());
  absl::StatusOr<void*> outside = h.runtime->Allocate(0, 4 * kKiB, *other);
  REQUIRE(outside.ok());
  CHECK(h.HomeOf(*outside).is_default());
  REQUIRE(h.device.EndCapture(h.stream).ok());
  REQUIRE(h.hooks->End(0, graph_pool).ok());
  CHECK(h.captures() == 0);
  CHECK(h.hooks->marks(0) == 0);
  // The graph pool keeps its memory through empty_cache (a graph replays into it).
  CHECK(h.pools().Info(graph_pool)->references == 1);
  REQUIRE(h.runtime->Free(captured).ok());
  REQUIRE(h.runtime->Free(*outside).ok());
  REQUIRE(h.hooks->Release(0, graph_pool).ok());
  CHECK(h.pools().Info(graph_pool)->released);
}

TEST_CASE("a thread's begin is no capture: no mark, and its allocations go to the pool") {
  Harness h;
  const PoolId pool = NewUserPoolId();
  REQUIRE(h.hooks->Begin(0, pool, Harness::ThreadFilter()).ok());
  CHECK(h.captures() == 0);
  void* mine = h.Allocate();
  CHECK(h.HomeOf(mine) == pool);
  PoolId other_thread;
  std::thread([&] {
    absl::StatusOr<void*> block = h.runtime->Allocate(0, 4 * kKiB, h.stream);
    REQUIRE(block.ok());
    other_thread = h.runtime->HomeOf(*block)->pool;
    REQUIRE(h.runtime->Free(*block).ok());
  }).join();
  CHECK(other_thread.is_default());
  REQUIRE(h.hooks->End(0, pool).ok());
  REQUIRE(h.hooks->Release(0, pool).ok());
  REQUIRE(h.runtime->Free(mine).ok());
}

TEST_CASE("sglang's order inside a capture keeps the mark and, balanced, the references") {
  const bool balanced = GENERATE(true, false);
  INFO((balanced ? "balanced" : "PyTorch's bookkeeping"));
  Harness h;
  h.hooks->set_balanced(balanced);
  const PoolId graph_pool = NewGraphPoolId();
  const PoolId symmetric = NewUserPoolId();
  uint64_t capture_id = 0;
  REQUIRE(h.hooks->Begin(0, graph_pool, h.CaptureFilter(&capture_id)).ok());
  absl::StatusOr<uint64_t> began = h.device.BeginCapture(h.stream);
  REQUIRE(began.ok());
  capture_id = *began;
  void* before = h.Allocate();  // the capture's filter learns its stream
  CHECK(h.HomeOf(before) == graph_pool);
  // sglang: end the capture's routing, route the thread to its pool, end, release, resume.
  REQUIRE(h.hooks->End(0, graph_pool).ok());
  CHECK(h.captures() == 1);  // still capturing: the mark stays
  REQUIRE(h.hooks->Begin(0, symmetric, Harness::ThreadFilter()).ok());
  void* inside = h.Allocate();
  CHECK(h.HomeOf(inside) == symmetric);
  REQUIRE(h.hooks->End(0, symmetric).ok());
  REQUIRE(h.hooks->Release(0, symmetric).ok());
  REQUIRE(h.hooks->Begin(0, graph_pool, Harness::ThreadFilter()).ok());
  CHECK(h.captures() == 1);  // the resumed entry carries the capture's mark, not a second one
  void* after = h.Allocate();
  CHECK(h.HomeOf(after) == graph_pool);
  // PyTorch's capture_end: the capture ends, then the hook.
  REQUIRE(h.device.EndCapture(h.stream).ok());
  REQUIRE(h.hooks->End(0, graph_pool).ok());
  CHECK(h.captures() == 0);
  CHECK(h.hooks->marks(0) == 0);
  const PoolInfo info = *h.pools().Info(graph_pool);
  CHECK(info.routes == 0);
  CHECK(info.references == (balanced ? 1 : 2));  // PyTorch leaks the resuming begin's reference
  // The graph's reset releases its reference.
  REQUIRE(h.hooks->Release(0, graph_pool).ok());
  CHECK(h.pools().Info(graph_pool)->released == balanced);
  for (void* block : {before, inside, after}) REQUIRE(h.runtime->Free(block).ok());
}

TEST_CASE("a capture whose routing is ended and never resumed is unmarked when released") {
  Harness h;
  const PoolId graph_pool = NewGraphPoolId();
  uint64_t capture_id = 0;
  REQUIRE(h.hooks->Begin(0, graph_pool, h.CaptureFilter(&capture_id)).ok());
  absl::StatusOr<uint64_t> began = h.device.BeginCapture(h.stream);
  REQUIRE(began.ok());
  capture_id = *began;
  void* block = h.Allocate();
  REQUIRE(h.hooks->End(0, graph_pool).ok());  // in mid-capture, by hand
  CHECK(h.captures() == 1);
  REQUIRE(h.device.EndCapture(h.stream).ok());
  // PyTorch's own end now finds no routing entry left: refused, and the mark still held.
  CHECK(absl::IsFailedPrecondition(h.hooks->End(0, graph_pool)));
  CHECK(h.captures() == 1);
  REQUIRE(h.hooks->Release(0, graph_pool).ok());
  CHECK(h.captures() == 0);
  REQUIRE(h.runtime->Free(block).ok());
}

TEST_CASE("misuse of the pool hooks is refused and changes nothing") {
  Harness h;
  const PoolId pool = NewUserPoolId();
  CHECK(absl::IsInvalidArgument(h.hooks->Begin(0, pool, PoolHooks::Filter())));
  CHECK(absl::IsFailedPrecondition(h.hooks->End(0, pool)));
  CHECK(absl::IsNotFound(h.hooks->Release(0, pool)));
  CHECK(absl::IsNotFound(h.hooks->Begin(3, pool, Harness::ThreadFilter())));
  uint64_t capture_id = 0;
  CHECK(absl::IsNotFound(h.hooks->Begin(5, NewGraphPoolId(), h.CaptureFilter(&capture_id))));
  CHECK(h.captures() == 0);
  CHECK(h.hooks->marks(0) == 0);
}

}  // namespace
}  // namespace tidepool
