/* A C program built the way a user outside Bazel builds one: against an installed tidepool
 * (tools/install), with `cc prog.c $(pkg-config --cflags --libs tidepool)`. It checks that the
 * library it runs with implements its header, then allocates, routes to a pool, frees, and
 * reads the statistics back.
 *
 *   installed_program            on the machine's GPUs (the GPU bundle runs it with nothing but
 *                                the driver: an empty environment, no LD_LIBRARY_PATH)
 *   installed_program simulated  on two simulated devices (the CPU test)
 *
 * Prints what it did and "installed tidepool: ok"; exits non-zero on the first failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tidepool/tidepool.h>

static void require(tidepool_status status, tidepool_status expected, const char* what) {
  if (status != expected) {
    fprintf(stderr, "installed tidepool: %s returned %d, expected %d: %s\n", what, (int)status,
            (int)expected, tidepool_last_error());
    exit(1);
  }
}

int main(int argc, char** argv) {
  const int simulated = argc > 1 && strcmp(argv[1], "simulated") == 0;
  if (tidepool_api_version() != TIDEPOOL_API_VERSION) {
    fprintf(stderr, "installed tidepool: library API %d, header %d\n", tidepool_api_version(),
            TIDEPOOL_API_VERSION);
    return 1;
  }
  if (simulated) {
    require(tidepool_init_simulated(2, (size_t)256 << 20), TIDEPOOL_OK, "tidepool_init_simulated");
  }
  int devices = 0;
  require(tidepool_device_count(&devices), TIDEPOOL_OK, "tidepool_device_count");

  void* small = NULL;
  void* large = NULL;
  require(tidepool_malloc(&small, 512, 0, NULL), TIDEPOOL_OK, "tidepool_malloc(512)");
  require(tidepool_malloc(&large, (size_t)64 << 20, 0, NULL), TIDEPOOL_OK,
          "tidepool_malloc(64 MiB)");

  tidepool_pool_id pool;
  void* routed = NULL;
  require(tidepool_new_pool_id(&pool), TIDEPOOL_OK, "tidepool_new_pool_id");
  require(tidepool_begin_allocate_current_thread_to_pool(0, pool), TIDEPOOL_OK,
          "tidepool_begin_allocate_current_thread_to_pool");
  require(tidepool_malloc(&routed, (size_t)1 << 20, 0, NULL), TIDEPOOL_OK,
          "tidepool_malloc(1 MiB) in a pool");
  require(tidepool_end_allocate_to_pool(0, pool), TIDEPOOL_OK, "tidepool_end_allocate_to_pool");
  int device = -1;
  tidepool_pool_id found;
  require(tidepool_pool_of(routed, &device, &found), TIDEPOOL_OK, "tidepool_pool_of");
  if (device != 0 || found.first != pool.first || found.second != pool.second) {
    fprintf(stderr, "installed tidepool: the routed block is not in its pool\n");
    return 1;
  }

  require(tidepool_free(small), TIDEPOOL_OK, "tidepool_free(small)");
  require(tidepool_free(small), TIDEPOOL_FAILED_PRECONDITION, "a double free");
  require(tidepool_free(large), TIDEPOOL_OK, "tidepool_free(large)");
  require(tidepool_free(routed), TIDEPOOL_OK, "tidepool_free(routed)");
  require(tidepool_release_pool(0, pool), TIDEPOOL_OK, "tidepool_release_pool");
  require(tidepool_empty_cache(0), TIDEPOOL_OK, "tidepool_empty_cache");

  char stats[4096];
  size_t needed = 0;
  require(tidepool_stats_json(0, NULL, stats, sizeof stats, &needed), TIDEPOOL_OK,
          "tidepool_stats_json");
  if (strstr(stats, "\"active_blocks\":{\"current\":0,") == NULL) {
    fprintf(stderr, "installed tidepool: blocks still live: %s\n", stats);
    return 1;
  }
  printf("installed tidepool: ok (%s, %d device(s); device 0: %s)\n",
         simulated ? "simulated" : "CUDA", devices, stats);
  return 0;
}
