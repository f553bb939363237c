// The malloc + free pair benchmark, shared by every allocator it compares.
//
// Two measurements, the ones docs/background.md §1 gives H200 anchor figures for:
//   * latency: one thread, one non-blocking stream, a cached block allocated and freed again and
//     again, at 512 B, 1 MiB and 64 MiB; batches of pairs are timed and the median batch gives the
//     nanoseconds per pair;
//   * throughput: 1, 2, 4, 8 and 16 threads doing 1 MiB pairs at once, each on its own stream and
//     then all on one shared stream; wall time divided by all pairs done (a perfectly scaling
//     allocator divides the one-thread figure by the thread count).
// The tables are printed in markdown with the H200 anchor figures beside the measured ones.
//
// Header-only and standard C++ only, because two programs include it: bench/allocator_bench.cc
// (built by Bazel, tidepool and the CUDA anchors) and bench/pytorch_anchor.cc (compiled by g++ on
// the GPU host against PyTorch, where no Abseil is installed). Sharing it is what makes their
// figures comparable: same loops, same counts, same table.
//
// A benchmark has no use for a partial run, so an allocator error ends the program with its
// message (Fail) instead of travelling back as a status.
#ifndef TIDEPOOL_BENCH_PAIR_BENCHMARK_H_
#define TIDEPOOL_BENCH_PAIR_BENCHMARK_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace tidepool {
namespace bench {

// Prints `message` and ends the program.
[[noreturn]] inline void Fail(const std::string& message) {
  std::fprintf(stderr, "benchmark failed: %s\n", message.c_str());
  std::exit(1);
}

// How much work one allocator is measured with.
struct Effort {
  int pairs_per_batch = 0;           // latency: pairs timed together
  int batches = 0;                   // latency: batches, of which the median is reported
  int pairs_per_thread = 0;          // throughput: pairs each thread does in one run
  int throughput_repetitions = 0;    // throughput: runs, of which the median is reported
};

// Enough repetitions for a stable median when a pair costs under a microsecond or so.
inline Effort FastAllocatorEffort(bool quick) {
  return quick ? Effort{200, 21, 2000, 3} : Effort{1000, 101, 100000, 3};
}

// For allocators that go to the driver on every call (tens of microseconds a pair).
inline Effort SlowAllocatorEffort(bool quick) {
  return quick ? Effort{5, 5, 20, 1} : Effort{20, 21, 100, 3};
}

// One allocator under test. Streams are opaque handles (a CUstream / cudaStream_t).
class PairAllocator {
 public:
  virtual ~PairAllocator() = default;
  // Column heading in the tables.
  virtual std::string name() const = 0;
  // False for allocators that take no stream (cudaMalloc): their shared-stream run is skipped.
  virtual bool stream_ordered() const = 0;
  virtual Effort effort(bool quick) const = 0;
  // Runs once on each thread before its first call (to make a CUDA context current, say).
  virtual void PrepareThread() {}
  virtual void* Allocate(size_t bytes, void* stream) = 0;
  virtual void Free(void* ptr, void* stream) = 0;
  // A new non-blocking stream on the device under test, and its end.
  virtual void* CreateStream() = 0;
  virtual void SynchronizeStream(void* stream) = 0;
  virtual void DestroyStream(void* stream) = 0;
};

constexpr size_t kMiB = size_t{1} << 20;
constexpr int kThreadCounts[] = {1, 2, 4, 8, 16};
constexpr size_t kThroughputBytes = kMiB;

// docs/background.md §1, measured on an H200 (CUDA 13.0, driver 580, PyTorch 2.11.0), in
// nanoseconds. The latency table is measured at exactly these sizes.
struct ReferenceLatency {
  size_t bytes;
  double cuda_malloc_ns;
  double cuda_malloc_async_ns;
  double pytorch_ns;
};
constexpr ReferenceLatency kReferenceLatencies[] = {
    {512, 74500, 676, 382},
    {kMiB, 71800, 904, 394},
    {64 * kMiB, 231000, 662, 318},
};
struct ReferenceThroughput {
  int threads;
  double cuda_malloc_async_ns;
  double pytorch_ns;
};
// Own stream per thread; no figure was taken at 2 threads.
constexpr ReferenceThroughput kReferenceThroughputs[] = {
    {1, 702, 465},
    {4, 3355, 2540},
    {8, 3326, 2965},
    {16, 3094, 3689},
};

using Clock = std::chrono::steady_clock;

inline double Median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  const size_t middle = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + middle, values.end());
  return values[middle];
}

inline double NanosecondsBetween(Clock::time_point start, Clock::time_point end) {
  return static_cast<double>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count());
}

// The streams one allocator is measured on, made once for all its runs so that every run finds
// the allocator's state for its streams as the previous runs left it (warm), not new streams.
struct StreamSet {
  std::vector<void*> own;  // one per thread, the first also for the latency runs
  void* shared = nullptr;  // for the shared-stream throughput runs
};

inline StreamSet CreateStreams(PairAllocator& allocator) {
  StreamSet streams;
  streams.own.resize(kThreadCounts[std::size(kThreadCounts) - 1]);
  for (void*& stream : streams.own) stream = allocator.CreateStream();
  streams.shared = allocator.CreateStream();
  return streams;
}

inline void DestroyStreams(PairAllocator& allocator, const StreamSet& streams) {
  for (void* stream : streams.own) {
    allocator.SynchronizeStream(stream);
    allocator.DestroyStream(stream);
  }
  allocator.SynchronizeStream(streams.shared);
  allocator.DestroyStream(streams.shared);
}

// Median nanoseconds per cached allocate + free pair of `bytes`, one thread, one stream.
inline double MeasurePairLatency(PairAllocator& allocator, size_t bytes, void* stream,
                                 const Effort& effort) {
  allocator.PrepareThread();
  // The first pair may grow the cache; the ones after it are what is measured.
  allocator.Free(allocator.Allocate(bytes, stream), stream);
  std::vector<double> batch_ns_per_pair;
  batch_ns_per_pair.reserve(effort.batches);
  for (int batch = 0; batch < effort.batches; ++batch) {
    const Clock::time_point start = Clock::now();
    for (int pair = 0; pair < effort.pairs_per_batch; ++pair) {
      allocator.Free(allocator.Allocate(bytes, stream), stream);
    }
    const Clock::time_point end = Clock::now();
    batch_ns_per_pair.push_back(NanosecondsBetween(start, end) / effort.pairs_per_batch);
  }
  allocator.SynchronizeStream(stream);
  return Median(batch_ns_per_pair);
}

// Median over runs of wall nanoseconds per 1 MiB pair, `thread_count` threads at once, each on
// its own stream or all on the shared one.
inline double MeasureThroughput(PairAllocator& allocator, int thread_count, bool shared_stream,
                                const StreamSet& streams, const Effort& effort) {
  std::vector<double> run_ns_per_pair;
  for (int run = 0; run < effort.throughput_repetitions; ++run) {
    // Threads get ready (context, first growth) before the clock starts, then go together.
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    threads.reserve(thread_count);
    for (int index = 0; index < thread_count; ++index) {
      void* stream = shared_stream ? streams.shared : streams.own[index];
      threads.emplace_back([&allocator, &ready, &go, &effort, stream] {
        allocator.PrepareThread();
        allocator.Free(allocator.Allocate(kThroughputBytes, stream), stream);
        ready.fetch_add(1);
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        for (int pair = 0; pair < effort.pairs_per_thread; ++pair) {
          allocator.Free(allocator.Allocate(kThroughputBytes, stream), stream);
        }
      });
    }
    while (ready.load() < thread_count) std::this_thread::yield();
    const Clock::time_point start = Clock::now();
    go.store(true, std::memory_order_release);
    for (std::thread& thread : threads) thread.join();
    const Clock::time_point end = Clock::now();
    run_ns_per_pair.push_back(NanosecondsBetween(start, end) /
                              (static_cast<double>(thread_count) * effort.pairs_per_thread));
  }
  return Median(run_ns_per_pair);
}

// "382 ns", "74.5 µs", as docs/background.md writes them.
inline std::string FormatNs(double ns) {
  char text[32];
  if (ns >= 100000) {
    std::snprintf(text, sizeof(text), "%.0f µs", ns / 1000);
  } else if (ns >= 10000) {
    std::snprintf(text, sizeof(text), "%.1f µs", ns / 1000);
  } else if (ns >= 100) {
    std::snprintf(text, sizeof(text), "%.0f ns", ns);
  } else {
    std::snprintf(text, sizeof(text), "%.1f ns", ns);
  }
  return text;
}

inline std::string FormatSize(size_t bytes) {
  return bytes >= kMiB ? std::to_string(bytes / kMiB) + " MiB" : std::to_string(bytes) + " B";
}

inline void PrintMarkdownRow(const std::vector<std::string>& cells) {
  std::string row = "|";
  for (const std::string& cell : cells) row += " " + cell + " |";
  std::printf("%s\n", row.c_str());
}

inline void PrintMarkdownHeader(const std::vector<std::string>& headings) {
  PrintMarkdownRow(headings);
  std::string rule = "|";
  for (size_t i = 0; i < headings.size(); ++i) rule += i == 0 ? "---|" : "---:|";
  std::printf("%s\n", rule.c_str());
}

inline std::string OptionalNs(std::optional<double> ns) {
  return ns.has_value() ? FormatNs(*ns) : "—";
}

// Measures every allocator and prints the two tables. `allocators` are measured in order, one at
// a time, so they never compete for the machine.
inline void RunPairBenchmarks(const std::vector<PairAllocator*>& allocators, bool quick) {
  std::vector<StreamSet> streams;
  for (PairAllocator* allocator : allocators) streams.push_back(CreateStreams(*allocator));

  std::printf("## Cached malloc + free pair, one thread, one non-blocking stream\n\n");
  std::printf("Median of batches, nanoseconds per pair (lower is better); `H200 ref` columns are\n"
              "docs/background.md §1.\n\n");
  std::vector<std::string> headings = {"size"};
  for (PairAllocator* allocator : allocators) headings.push_back(allocator->name());
  headings.insert(headings.end(), {"H200 ref: cudaMalloc + cudaFree",
                                   "H200 ref: cudaMallocAsync + cudaFreeAsync",
                                   "H200 ref: PyTorch caching allocator"});
  PrintMarkdownHeader(headings);
  for (const ReferenceLatency& reference : kReferenceLatencies) {
    std::vector<std::string> cells = {FormatSize(reference.bytes)};
    for (size_t i = 0; i < allocators.size(); ++i) {
      PairAllocator& allocator = *allocators[i];
      std::fprintf(stderr, "latency: %s, %s\n", allocator.name().c_str(),
                   FormatSize(reference.bytes).c_str());
      cells.push_back(FormatNs(MeasurePairLatency(allocator, reference.bytes, streams[i].own[0],
                                                  allocator.effort(quick))));
    }
    cells.insert(cells.end(), {FormatNs(reference.cuda_malloc_ns),
                               FormatNs(reference.cuda_malloc_async_ns),
                               FormatNs(reference.pytorch_ns)});
    PrintMarkdownRow(cells);
    std::fflush(stdout);
  }

  std::printf("\n## Aggregate throughput, 1 MiB pairs\n\n");
  std::printf("Wall time divided by all pairs done, nanoseconds (lower is better; perfect scaling\n"
              "divides the 1-thread figure by the thread count). `own`: each thread on its own\n"
              "stream; `shared`: all threads on one stream. `H200 ref` columns (own streams) are\n"
              "docs/background.md §1.\n\n");
  headings = {"threads"};
  for (PairAllocator* allocator : allocators) {
    headings.push_back(allocator->name() + (allocator->stream_ordered() ? ", own" : ""));
    if (allocator->stream_ordered()) headings.push_back(allocator->name() + ", shared");
  }
  headings.insert(headings.end(),
                  {"H200 ref: cudaMallocAsync, own", "H200 ref: PyTorch caching allocator, own"});
  PrintMarkdownHeader(headings);
  for (int thread_count : kThreadCounts) {
    std::vector<std::string> cells = {std::to_string(thread_count)};
    for (size_t i = 0; i < allocators.size(); ++i) {
      PairAllocator& allocator = *allocators[i];
      std::fprintf(stderr, "throughput: %s, %d threads\n", allocator.name().c_str(),
                   thread_count);
      const Effort effort = allocator.effort(quick);
      cells.push_back(FormatNs(MeasureThroughput(allocator, thread_count,
                                                 /*shared_stream=*/false, streams[i], effort)));
      if (allocator.stream_ordered()) {
        cells.push_back(FormatNs(MeasureThroughput(allocator, thread_count,
                                                   /*shared_stream=*/true, streams[i], effort)));
      }
    }
    std::optional<double> reference_async;
    std::optional<double> reference_pytorch;
    for (const ReferenceThroughput& reference : kReferenceThroughputs) {
      if (reference.threads != thread_count) continue;
      reference_async = reference.cuda_malloc_async_ns;
      reference_pytorch = reference.pytorch_ns;
    }
    cells.insert(cells.end(), {OptionalNs(reference_async), OptionalNs(reference_pytorch)});
    PrintMarkdownRow(cells);
    std::fflush(stdout);
  }
  for (size_t i = 0; i < allocators.size(); ++i) DestroyStreams(*allocators[i], streams[i]);
}

}  // namespace bench
}  // namespace tidepool

#endif  // TIDEPOOL_BENCH_PAIR_BENCHMARK_H_
