// A fake NCCL for tidepool's CPU tests, built as a shared library that nccl/nccl_library.h
// loads like the real one: ncclMemAlloc hands out host memory, windows are bookkeeping, and every
// breach of NCCL's registration rules (docs/background.md §4) is counted as a violation rather
// than crashing, so a test can require zero. Controls for tests are the fake_nccl_* functions.
//
// Rules it checks: a window registered twice over the same memory on one communicator; a
// deregistration of an unknown window; ncclMemFree of memory a window still covers, or of memory
// it did not hand out; two register/deregister calls on one communicator at once.
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

namespace {

struct FakeWindow {
  ncclComm_t comm;
  uintptr_t base;
  size_t bytes;
};

struct State {
  std::mutex mu;
  std::map<uintptr_t, size_t> allocations;          // base -> bytes
  std::map<ncclWindow_t, FakeWindow> windows;       // live windows
  std::set<std::pair<ncclComm_t, uintptr_t>> registered;
  uintptr_t next_window = 0x1000;
  int64_t violations = 0;
  int64_t registrations = 0;
  bool null_windows = false;
  bool fail_next_register = false;
  bool fail_next_alloc = false;
  std::map<ncclComm_t, int> in_registration;        // concurrent register/deregister detector
};

State& Fake() {
  static State* const state = new State();
  return *state;
}

// Marks a register/deregister on `comm` as running; a second one at once is a violation.
class RegistrationCall {
 public:
  explicit RegistrationCall(ncclComm_t comm) : comm_(comm) {
    {
      std::lock_guard<std::mutex> lock(Fake().mu);
      if (Fake().in_registration[comm_]++ != 0) ++Fake().violations;
    }
    // Real registrations take from tens of microseconds to milliseconds: a call that overlaps
    // another must have the time to be seen doing so.
    std::this_thread::sleep_for(std::chrono::microseconds(30));
  }
  ~RegistrationCall() {
    std::lock_guard<std::mutex> lock(Fake().mu);
    --Fake().in_registration[comm_];
  }

 private:
  const ncclComm_t comm_;
};

}  // namespace

extern "C" {

// --- Controls for tests ----------------------------------------------------------------------
void fake_nccl_reset() {
  State& s = Fake();
  std::lock_guard<std::mutex> lock(s.mu);
  s.violations = 0;
  s.registrations = 0;
  s.null_windows = false;
  s.fail_next_register = false;
  s.fail_next_alloc = false;
}
int64_t fake_nccl_violations() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  return Fake().violations;
}
int64_t fake_nccl_live_windows() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  return static_cast<int64_t>(Fake().windows.size());
}
int64_t fake_nccl_live_allocations() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  return static_cast<int64_t>(Fake().allocations.size());
}
int64_t fake_nccl_registrations() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  return Fake().registrations;
}
void fake_nccl_set_null_windows(int on) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  Fake().null_windows = on != 0;
}
void fake_nccl_fail_next_alloc() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  Fake().fail_next_alloc = true;
}
void fake_nccl_fail_next_register() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  Fake().fail_next_register = true;
}

// --- NCCL ------------------------------------------------------------------------------------
ncclResult_t ncclGetVersion(int* version) {
  *version = 22809;
  return ncclSuccess;
}
const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclInvalidArgument:
      return "invalid argument (fake NCCL)";
    case ncclInvalidUsage:
      return "invalid usage (fake NCCL)";
    default:
      return "error (fake NCCL)";
  }
}

ncclResult_t ncclMemAlloc(void** ptr, size_t size) {
  {
    std::lock_guard<std::mutex> lock(Fake().mu);
    if (Fake().fail_next_alloc) {
      Fake().fail_next_alloc = false;
      return ncclUnhandledCudaError;  // as the real one answers a full device
    }
  }
  const size_t rounded = (size + 4095) / 4096 * 4096;
  void* memory = std::aligned_alloc(4096, rounded);
  if (memory == nullptr) return ncclSystemError;
  std::lock_guard<std::mutex> lock(Fake().mu);
  Fake().allocations[reinterpret_cast<uintptr_t>(memory)] = rounded;
  *ptr = memory;
  return ncclSuccess;
}

ncclResult_t ncclMemFree(void* ptr) {
  State& s = Fake();
  std::lock_guard<std::mutex> lock(s.mu);
  const uintptr_t base = reinterpret_cast<uintptr_t>(ptr);
  auto allocation = s.allocations.find(base);
  if (allocation == s.allocations.end()) {
    ++s.violations;
    return ncclInvalidArgument;
  }
  for (const auto& [window, fake] : s.windows) {
    if (fake.base >= base && fake.base < base + allocation->second) ++s.violations;
  }
  s.allocations.erase(allocation);
  std::free(ptr);
  return ncclSuccess;
}

ncclResult_t ncclCommWindowRegister(ncclComm_t comm, void* buff, size_t size, ncclWindow_t* win,
                                    int flags) {
  RegistrationCall call(comm);
  State& s = Fake();
  std::lock_guard<std::mutex> lock(s.mu);
  if (flags != NCCL_WIN_COLL_SYMMETRIC) return ncclInvalidArgument;
  if (s.fail_next_register) {
    s.fail_next_register = false;
    return ncclInternalError;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(buff);
  if (!s.registered.insert({comm, base}).second) {
    ++s.violations;
    return ncclInvalidUsage;
  }
  ++s.registrations;
  if (s.null_windows) {
    s.registered.erase({comm, base});
    *win = nullptr;
    return ncclSuccess;
  }
  ncclWindow_t window = reinterpret_cast<ncclWindow_t>(s.next_window);
  s.next_window += 0x10;
  s.windows[window] = FakeWindow{comm, base, size};
  *win = window;
  return ncclSuccess;
}

ncclResult_t ncclCommWindowDeregister(ncclComm_t comm, ncclWindow_t win) {
  RegistrationCall call(comm);
  State& s = Fake();
  std::lock_guard<std::mutex> lock(s.mu);
  auto window = s.windows.find(win);
  if (window == s.windows.end() || window->second.comm != comm) {
    ++s.violations;
    return ncclInvalidArgument;
  }
  s.registered.erase({comm, window->second.base});
  s.windows.erase(window);
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t, int* count) {
  *count = 1;
  return ncclSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t, int* rank) {
  *rank = 0;
  return ncclSuccess;
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* error) {
  *error = ncclSuccess;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t) { return ncclSuccess; }
ncclResult_t ncclAllGather(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t) {
  return ncclInvalidUsage;  // the ranks' rendezvous comes with the symmetric pool's tests
}
ncclResult_t ncclGroupStart() { return ncclSuccess; }
ncclResult_t ncclGroupEnd() { return ncclSuccess; }

}  // extern "C"
