// One runtime per process: two integrations loaded into one process share libtidepool.so's
// runtime, so a block allocated through one is found and freed through the other.
//
// The process is built as an integration's host would be: the test binary links nothing of
// tidepool. It loads libtidepool.so (RTLD_GLOBAL, as Python's ctypes.CDLL(mode=RTLD_GLOBAL) or a
// DT_NEEDED entry would), then two client libraries that call the C ABI and carry no runtime of
// their own. Were either to carry one (a static copy of the runtime, hidden by a version
// script), its blocks would be unknown to the other and the cross free below would fail.
//
//   one_runtime_test LIBTIDEPOOL CLIENT_A CLIENT_B
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "integrations/c_api/tidepool.h"

namespace {

int failures = 0;

void Check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

void* Open(const char* path, int mode) {
  void* handle = dlopen(path, mode);
  if (handle == nullptr) {
    std::printf("FAIL dlopen(%s): %s\n", path, dlerror());
    std::exit(1);
  }
  return handle;
}

template <typename F>
F Symbol(void* handle, const char* name) {
  void* symbol = dlsym(handle, name);
  if (symbol == nullptr) {
    std::printf("FAIL dlsym(%s): %s\n", name, dlerror());
    std::exit(1);
  }
  return reinterpret_cast<F>(symbol);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s LIBTIDEPOOL CLIENT_A CLIENT_B\n", argv[0]);
    return 2;
  }
  void* lib = Open(argv[1], RTLD_NOW | RTLD_GLOBAL);
  void* a = Open(argv[2], RTLD_NOW | RTLD_LOCAL);
  void* b = Open(argv[3], RTLD_NOW | RTLD_LOCAL);

  using InitSimulated = tidepool_status (*)(int, size_t);
  using StatsJson = tidepool_status (*)(int, const tidepool_pool_id*, char*, size_t, size_t*);
  using LastError = const char* (*)();
  auto init_simulated = Symbol<InitSimulated>(lib, "tidepool_init_simulated");
  auto stats_json = Symbol<StatsJson>(lib, "tidepool_stats_json");
  auto last_error = Symbol<LastError>(lib, "tidepool_last_error");
  auto a_malloc = Symbol<void* (*)(size_t)>(a, "client_a_malloc");
  auto a_free = Symbol<tidepool_status (*)(void*)>(a, "client_a_free");
  auto a_resolved = Symbol<void* (*)()>(a, "client_a_resolved_malloc");
  auto b_free = Symbol<tidepool_status (*)(void*)>(b, "client_b_free");
  auto b_pool_of = Symbol<tidepool_status (*)(const void*, int*)>(b, "client_b_pool_of");
  auto b_resolved = Symbol<void* (*)()>(b, "client_b_resolved_free");

  // The clients define no tidepool_* of their own (a handle's lookup covers that library and
  // its dependencies only), and call libtidepool.so's.
  dlerror();
  Check(dlsym(a, "tidepool_malloc") == nullptr, "client A defines no tidepool_malloc");
  Check(dlsym(b, "tidepool_free") == nullptr, "client B defines no tidepool_free");
  Check(a_resolved() == dlsym(lib, "tidepool_malloc"),
        "client A's tidepool_malloc is libtidepool.so's");
  Check(b_resolved() == dlsym(lib, "tidepool_free"), "client B's tidepool_free is libtidepool.so's");

  Check(init_simulated(1, size_t{256} << 20) == TIDEPOOL_OK, "tidepool_init_simulated");
  void* blocks[3];
  for (void*& block : blocks) block = a_malloc(1 << 20);
  Check(blocks[0] != nullptr && blocks[1] != nullptr && blocks[2] != nullptr,
        "client A allocates");
  int device = -1;
  Check(b_pool_of(blocks[1], &device) == TIDEPOOL_OK && device == 0,
        "client B finds client A's block on device 0");
  Check(b_free(blocks[0]) == TIDEPOOL_OK, "client B frees client A's block");
  Check(b_free(blocks[1]) == TIDEPOOL_OK, "client B frees another");
  const tidepool_status again = a_free(blocks[0]);
  Check(again == TIDEPOOL_FAILED_PRECONDITION,
        std::string("client A's free of the block client B freed is a double free: ") +
            last_error());
  Check(a_free(blocks[2]) == TIDEPOOL_OK, "client A frees its last block");

  char json[4096];
  size_t needed = 0;
  Check(stats_json(0, nullptr, json, sizeof json, &needed) == TIDEPOOL_OK, "tidepool_stats_json");
  const std::string stats(json);
  Check(stats.find("\"active_blocks\":{\"current\":0,") != std::string::npos,
        "no block is live at the end: " + stats);

  dlclose(b);
  dlclose(a);
  std::printf("%s\n", failures == 0 ? "one runtime: all checks passed" : "one runtime: FAILED");
  return failures == 0 ? 0 : 1;
}
