// The C API from C: a program that includes tidepool.h as C99 and links libtidepool.so, on two
// simulated devices.
//
// It proves three things the C++ tests cannot: the header is valid C, the shared library exports
// what the header declares, and the whole tour a C program takes works through it (start,
// memory, pools with each primitive, a callback pool, pool lookup, statistics and snapshots, and
// the errors a C program most often meets, graph capture's included). The error matrix and the threaded cases are in the
// C++ tests beside this file.
#define _POSIX_C_SOURCE 200112L

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "integrations/c_api/tidepool.h"

static int failures = 0;

// Records a failure, with the calling thread's last tidepool error, and goes on.
#define EXPECT(condition)                                                                   \
  do {                                                                                      \
    if (!(condition)) {                                                                     \
      fprintf(stderr, "%s:%d: EXPECT(%s) failed (last tidepool error: \"%s\")\n", __FILE__, \
              __LINE__, #condition, tidepool_last_error());                                 \
      ++failures;                                                                           \
    }                                                                                       \
  } while (0)

// Records a failure unless `call` returns `expected`; on an expected error, also checks that
// a message was left.
#define EXPECT_STATUS(expected, call)                                                       \
  do {                                                                                      \
    tidepool_status actual_status = (call);                                                 \
    if (actual_status != (expected)) {                                                      \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (last tidepool error: \"%s\")\n", \
              __FILE__, __LINE__, #call, tidepool_status_name(actual_status),               \
              tidepool_status_name(expected), tidepool_last_error());                       \
      ++failures;                                                                           \
    } else if ((expected) != TIDEPOOL_OK && tidepool_last_error()[0] == '\0') {             \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #call);   \
      ++failures;                                                                           \
    }                                                                                       \
  } while (0)

static const size_t kMiB = (size_t)1 << 20;
static const tidepool_pool_id kDefaultPool = {0, 0};

static int SamePool(tidepool_pool_id a, tidepool_pool_id b) {
  return a.first == b.first && a.second == b.second;
}

// The "current" value of one statistic in a stats JSON text ("reserved_bytes", ...), or -1.
static long long CurrentOf(const char* json, const char* statistic) {
  char key[64];
  const char* found;
  long long value = -1;
  snprintf(key, sizeof key, "\"%s\":{\"current\":", statistic);
  found = strstr(json, key);
  if (found != NULL) sscanf(found + strlen(key), "%lld", &value);
  return value;
}

// The reserved bytes now of a device (pool NULL) or of one pool, or -1 on error.
static long long ReservedBytes(int device, const tidepool_pool_id* pool) {
  char json[4096];
  if (tidepool_stats_json(device, pool, json, sizeof json, NULL) != TIDEPOOL_OK) return -1;
  return CurrentOf(json, "reserved_bytes");
}

static void TestVersionAndStart(void) {
  int count = 0;
  EXPECT(tidepool_api_version() == TIDEPOOL_API_VERSION);
  EXPECT(strcmp(tidepool_status_name(TIDEPOOL_OUT_OF_MEMORY), "TIDEPOOL_OUT_OF_MEMORY") == 0);
  EXPECT(strcmp(tidepool_status_name((tidepool_status)99), "unknown tidepool_status") == 0);
  EXPECT(tidepool_last_error()[0] == '\0');

  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_init_simulated(0, 1024 * kMiB));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_init_simulated(2, 1024 * kMiB));
  EXPECT_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_init_simulated(2, 1024 * kMiB));
  EXPECT(strstr(tidepool_last_error(), "tidepool_init_simulated") != NULL);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_device_count(&count));
  EXPECT(count == 2);
}

static void TestMemory(void) {
  void* first = NULL;
  void* second = NULL;
  void* failed = (void*)&first;
  int device = -1;
  tidepool_pool_id pool = {7, 7};
  int not_tidepools = 0;

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&first, 1000, 0, NULL));
  EXPECT(first != NULL && (uintptr_t)first % 512 == 0);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&second, 3 * kMiB, 1, NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_pool_of(second, &device, &pool));
  EXPECT(device == 1 && SamePool(pool, kDefaultPool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_record_stream(first, NULL));

  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_malloc(&failed, 0, 0, NULL));
  EXPECT(failed == NULL);
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_malloc(&failed, 1000, 2, NULL));
  EXPECT(strstr(tidepool_last_error(), "device 2") != NULL);
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_malloc(&failed, 1000, -1, NULL));
  EXPECT_STATUS(TIDEPOOL_OUT_OF_MEMORY, tidepool_malloc(&failed, 4096 * kMiB, 0, NULL));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_malloc(NULL, 1000, 0, NULL));

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(first));
  EXPECT_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_free(first));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_free(&not_tidepools));
  EXPECT(strstr(tidepool_last_error(), "not allocated by tidepool") != NULL);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(second));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_empty_cache(0));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_empty_cache(1));
  EXPECT(ReservedBytes(0, NULL) == 0);
  EXPECT(ReservedBytes(1, NULL) == 0);
}

// sglang's pattern with the three primitives: begin (this thread) -> malloc -> end -> release;
// the block stays usable after end and release and returns to its pool, which is then gone.
static void TestPoolPrimitives(void) {
  tidepool_pool_id pool;
  tidepool_pool_id graph_pool;
  tidepool_pool_id found = {0, 0};
  void* inside = NULL;
  void* outside = NULL;
  int device = -1;

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_new_pool_id(&pool));
  EXPECT(pool.first == 0 && pool.second != 0);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_new_graph_pool_id(&graph_pool));
  EXPECT(graph_pool.first != 0 && graph_pool.second == 0);

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_begin_allocate_current_thread_to_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&inside, 5000, 0, NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_end_allocate_to_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_release_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&outside, 5000, 0, NULL));

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_pool_of(inside, &device, &found));
  EXPECT(device == 0 && SamePool(found, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_pool_of(outside, &device, &found));
  EXPECT(SamePool(found, kDefaultPool));
  EXPECT(ReservedBytes(0, &pool) > 0);

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(inside));
  EXPECT(ReservedBytes(0, &pool) == 0);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(outside));

  EXPECT_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_end_allocate_to_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_release_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_release_pool(0, graph_pool));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_release_pool(0, kDefaultPool));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_begin_allocate_current_thread_to_pool(5, graph_pool));
  EXPECT(strstr(tidepool_last_error(), "device 5") != NULL);
}

// Routing for everyone on device 1: every allocation there goes to the pool until the end.
static void TestEveryoneFilter(void) {
  tidepool_pool_id pool;
  tidepool_pool_id found;
  void* block = NULL;
  int device = -1;

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_new_pool_id(&pool));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_begin_allocate_to_pool(1, pool, TIDEPOOL_ROUTE_EVERYONE, 3));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_begin_allocate_to_pool(1, pool, 42, 0));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_begin_allocate_to_pool(1, pool, TIDEPOOL_ROUTE_CAPTURE, 0));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_begin_allocate_to_pool(1, pool, TIDEPOOL_ROUTE_EVERYONE, 0));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&block, 100, 1, NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_pool_of(block, &device, &found));
  EXPECT(device == 1 && SamePool(found, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_end_allocate_to_pool(1, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(block));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_trim_pool(1, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_release_pool(1, pool));
}

// A callback pool takes its segments from a bump allocator over a static buffer, handed out in
// 4 KiB steps from its first 4 KiB boundary (the host memory is never touched: simulated blocks
// are not dereferenced).
#define kArenaBytes (64 << 20)
#define kArenaStep 4096
static unsigned char host_arena[kArenaBytes + kArenaStep];

struct BumpArena {
  size_t used;
  int allocations;
  int frees;
  size_t bytes_out;
};

static unsigned char* ArenaStart(void) {
  uintptr_t start = ((uintptr_t)host_arena + kArenaStep - 1) / kArenaStep * kArenaStep;
  return (unsigned char*)start;
}

static void* BumpAllocate(size_t size, int device, void* context) {
  struct BumpArena* arena = (struct BumpArena*)context;
  void* segment;
  (void)device;
  if (arena->used + size > kArenaBytes) return NULL;
  segment = ArenaStart() + arena->used;
  arena->used += (size + kArenaStep - 1) / kArenaStep * kArenaStep;
  ++arena->allocations;
  arena->bytes_out += size;
  return segment;
}

static void BumpFree(void* ptr, size_t size, int device, void* context) {
  struct BumpArena* arena = (struct BumpArena*)context;
  (void)ptr;
  (void)device;
  ++arena->frees;
  arena->bytes_out -= size;
}

static void TestCallbackPool(void) {
  struct BumpArena arena = {0, 0, 0, 0};
  tidepool_pool_id pool;
  tidepool_pool_id found;
  void* block = NULL;
  void* too_big = NULL;
  int device = -1;

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_new_pool_id(&pool));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_create_callback_pool(0, pool, NULL, BumpFree, &arena));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_create_callback_pool(0, kDefaultPool, BumpAllocate, BumpFree, &arena));
  EXPECT_STATUS(TIDEPOOL_OK,
                tidepool_create_callback_pool(0, pool, BumpAllocate, BumpFree, &arena));
  EXPECT_STATUS(TIDEPOOL_FAILED_PRECONDITION,
                tidepool_create_callback_pool(0, pool, BumpAllocate, BumpFree, &arena));
  EXPECT(arena.allocations == 0);

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_begin_allocate_current_thread_to_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&block, 3000, 0, NULL));
  EXPECT_STATUS(TIDEPOOL_OUT_OF_MEMORY, tidepool_malloc(&too_big, 100 * kMiB, 0, NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_end_allocate_to_pool(0, pool));
  EXPECT(arena.allocations >= 1);
  EXPECT((unsigned char*)block >= ArenaStart() &&
         (unsigned char*)block < ArenaStart() + kArenaBytes);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_pool_of(block, &device, &found));
  EXPECT(device == 0 && SamePool(found, pool));

  // One reference from create and one from begin: two releases; the segment goes back to the
  // callbacks once the block is freed.
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_release_pool(0, pool));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_release_pool(0, pool));
  EXPECT(arena.bytes_out > 0);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(block));
  EXPECT(arena.frees == arena.allocations);
  EXPECT(arena.bytes_out == 0);
}

static void TestObservability(void) {
  char small[8];
  char json[65536];
  size_t needed = 0;
  size_t needed_again = 0;
  tidepool_pool_id unknown = {0, UINT64_MAX};
  void* block = NULL;

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_malloc(&block, 1000, 0, NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_stats_json(0, NULL, NULL, 0, &needed));
  EXPECT(needed > 1);
  memset(small, 'x', sizeof small);
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_stats_json(0, NULL, small, sizeof small, &needed_again));
  EXPECT(needed_again == needed && small[0] == 'x');
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_stats_json(0, NULL, NULL, 10, &needed));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_stats_json(0, NULL, json, sizeof json, &needed));
  EXPECT(strlen(json) + 1 == needed && json[0] == '{');
  EXPECT(CurrentOf(json, "active_blocks") == 1);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_stats_json(0, &kDefaultPool, json, sizeof json, NULL));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_stats_json(0, &unknown, json, sizeof json, NULL));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_stats_json(9, NULL, json, sizeof json, NULL));

  EXPECT_STATUS(TIDEPOOL_OK, tidepool_snapshot_json(0, NULL, json, sizeof json, &needed));
  EXPECT(strstr(json, "\"segments\":[") != NULL && strlen(json) + 1 == needed);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_snapshot_json(0, &kDefaultPool, json, sizeof json, NULL));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_snapshot_json(0, &unknown, json, sizeof json, NULL));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_free(block));
}

// Graph capture from C. Streams of a simulated device exist only inside tidepool and the NULL
// stream cannot be captured, so a C program on simulated devices meets only the refusals; the
// whole capture path is in graph_test.cc. A shared graph pool is made and released.
static void TestGraphCapture(void) {
  tidepool_pool_id shared = {0, 0};
  tidepool_pool_id found = {0, 0};
  tidepool_capture* capture = (tidepool_capture*)&found;
  tidepool_graph* graph = (tidepool_graph*)&found;
  const tidepool_capture_mode modes[3] = {TIDEPOOL_CAPTURE_MODE_GLOBAL,
                                          TIDEPOOL_CAPTURE_MODE_THREAD_LOCAL,
                                          TIDEPOOL_CAPTURE_MODE_RELAXED};

  EXPECT(modes[0] == 0 && modes[1] == 1 && modes[2] == 2);
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_graph_pool_create(1, &shared));
  EXPECT(shared.first != 0 && shared.second == 0);
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_capture_begin(1, NULL, &shared, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture));
  EXPECT(capture == NULL);
  EXPECT(strstr(tidepool_last_error(), "tidepool_capture_begin") != NULL);
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT,
                tidepool_capture_begin(1, NULL, NULL, TIDEPOOL_CAPTURE_MODE_RELAXED, NULL));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_capture_begin(2, NULL, NULL, 0, &capture));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_capture_end(NULL, &graph));
  EXPECT(graph == NULL);
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_capture_abandon(NULL));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_capture_pool(NULL, &found));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_graph_launch(NULL, NULL));
  EXPECT_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_graph_pool(NULL, &found));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_graph_destroy(NULL));
  EXPECT_STATUS(TIDEPOOL_NOT_FOUND, tidepool_graph_pool_create(2, &found));
  EXPECT_STATUS(TIDEPOOL_OK, tidepool_release_pool(1, shared));
  EXPECT_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_release_pool(1, shared));
}

int main(void) {
  TestVersionAndStart();
  TestMemory();
  TestPoolPrimitives();
  TestEveryoneFilter();
  TestCallbackPool();
  TestObservability();
  TestGraphCapture();
  if (failures != 0) {
    fprintf(stderr, "c_api_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("c_api_test: all passed\n");
  return 0;
}
