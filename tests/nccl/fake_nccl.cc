// A fake NCCL for tidepool's CPU tests, built as a shared library that nccl/nccl_library.h
// loads like the real one: ncclMemAlloc hands out host memory, windows are bookkeeping, and every
// breach of NCCL's registration rules (docs/background.md §4) is counted as a violation rather
// than crashing, so a test can require zero. Controls for tests are the fake_nccl_* functions.
//
// Rules it checks: a window registered twice over the same memory on one communicator; a
// deregistration of an unknown window; ncclMemFree of memory a window still covers, or of memory
// it did not hand out; two register/deregister calls on one communicator at once.
//
// CLIQUES AND GROUPS, for one thread driving several GPUs (docs/nccl.md, "One process, several
// GPUs"). A test may declare communicators to be the ranks of one clique (fake_nccl_set_clique:
// communicator -> clique, rank, clique size); communicators in no clique behave as above. On a
// clique member, registration and deregistration are collective, as in NCCL: a rank's n-th
// registration completes only when every rank of the clique has made its n-th (of the same size;
// another size is a violation), and a window's deregistration only when every rank that got a
// window from that registration deregisters its own. A call outside a group waits there, as
// NCCL's blocks; since a test must never hang, the wait ends after a short bound
// (fake_nccl_set_collective_timeout_ms) with ncclSystemError, and counts a violation and a hang
// ("registration would hang"). ncclGroupStart/End nest per thread; inside a group, register and
// deregister calls (on any communicator) are only recorded, and performed at the outermost
// ncclGroupEnd, where the thread arrives for all of them at once and then waits for them; windows
// are filled in there. So one thread that registers its local ranks rank by rank hangs (counted),
// and one that registers them in a group does not.
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace {

struct FakeWindow {
  ncclComm_t comm;
  uintptr_t base;
  size_t bytes;
  // The clique registration that made it (clique < 0: none).
  int clique = -1;
  uint64_t round = 0;
  int rank = 0;
};

struct Member {
  int clique;
  int rank;
};

// One collective registration of a clique: each rank's arrival, and what each got.
struct RegisterRound {
  struct Arrival {
    ncclComm_t comm;
    uintptr_t base;
    size_t bytes;
  };
  std::map<int, Arrival> arrived;
  bool done = false;
  bool broken = false;  // a rank gave up waiting: the round would hang for ever
  std::map<int, std::pair<ncclResult_t, ncclWindow_t>> results;
  std::set<int> holders;  // the ranks that got a window
};

// The collective deregistration of one registration round's windows.
struct DeregisterRound {
  std::map<int, ncclWindow_t> arrived;
  bool done = false;
  bool broken = false;
  std::map<int, ncclResult_t> results;
};

struct Clique {
  int size = 0;
  std::map<int, uint64_t> next_round;  // per rank
  std::map<uint64_t, RegisterRound> registers;
  std::map<uint64_t, DeregisterRound> deregisters;  // by registration round
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
  // Cliques and groups.
  std::map<ncclComm_t, Member> members;
  std::map<int, Clique> cliques;
  std::condition_variable collective_changed;
  int collective_timeout_ms = 1000;
  int64_t hangs = 0;
  int64_t grouped_registrations = 0;  // registrations performed at a group's end
  std::set<ncclComm_t> null_window_comms;
};

// A register or deregister call made inside a group, performed at the outermost group end.
struct Deferred {
  bool registration;
  ncclComm_t comm;
  void* buff;
  size_t size;
  ncclWindow_t* win;     // registration: filled in at group end
  ncclWindow_t window;   // deregistration
};
thread_local int group_depth = 0;
thread_local std::vector<Deferred> deferred;

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

// One register (or deregister) call of a clique member, waiting for its round.
struct Ticket {
  bool registration;
  int clique;
  uint64_t round;
  int rank;
};

std::chrono::steady_clock::time_point Deadline(const State& s) {
  return std::chrono::steady_clock::now() + std::chrono::milliseconds(s.collective_timeout_ms);
}

// One rank's registration, as a communicator in no clique does it. Under s.mu.
ncclResult_t PerformRegister(State& s, ncclComm_t comm, void* buff, size_t size,
                             ncclWindow_t* win) {
  *win = nullptr;
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
  if (s.null_windows || s.null_window_comms.count(comm) != 0) {
    s.registered.erase({comm, base});
    return ncclSuccess;
  }
  ncclWindow_t window = reinterpret_cast<ncclWindow_t>(s.next_window);
  s.next_window += 0x10;
  s.windows[window] = FakeWindow{comm, base, size};
  *win = window;
  return ncclSuccess;
}

// One rank's deregistration, as a communicator in no clique does it. Under s.mu.
ncclResult_t PerformDeregister(State& s, ncclComm_t comm, ncclWindow_t win) {
  auto window = s.windows.find(win);
  if (window == s.windows.end() || window->second.comm != comm) {
    ++s.violations;
    return ncclInvalidArgument;
  }
  s.registered.erase({comm, window->second.base});
  s.windows.erase(window);
  return ncclSuccess;
}

// A clique member arrives at its next registration; the last rank to arrive performs the round
// for every rank. Under s.mu.
Ticket ArriveRegister(State& s, const Member& member, ncclComm_t comm, void* buff, size_t size) {
  Clique& clique = s.cliques[member.clique];
  const uint64_t number = clique.next_round[member.rank]++;
  RegisterRound& round = clique.registers[number];
  const Ticket ticket{true, member.clique, number, member.rank};
  if (round.broken) return ticket;  // Await reports it
  round.arrived[member.rank] = RegisterRound::Arrival{comm, reinterpret_cast<uintptr_t>(buff),
                                                      size};
  if (static_cast<int>(round.arrived.size()) < clique.size) return ticket;
  const size_t bytes = round.arrived.begin()->second.bytes;
  for (const auto& [rank, arrival] : round.arrived) {
    if (arrival.bytes != bytes) ++s.violations;  // the ranks registered different sizes
    ncclWindow_t window = nullptr;
    const ncclResult_t result = PerformRegister(s, arrival.comm,
                                                reinterpret_cast<void*>(arrival.base),
                                                arrival.bytes, &window);
    if (result == ncclSuccess && window != nullptr) {
      round.holders.insert(rank);
      FakeWindow& made = s.windows.at(window);
      made.clique = member.clique;
      made.round = number;
      made.rank = rank;
    }
    round.results[rank] = {result, window};
  }
  round.done = true;
  s.collective_changed.notify_all();
  return ticket;
}

// A clique member arrives at the deregistration of a window from a clique registration; the last
// holder to arrive performs it for every holder. No ticket for any other window (it is
// deregistered as a communicator in no clique does). Under s.mu.
std::optional<Ticket> ArriveDeregister(State& s, ncclComm_t comm, ncclWindow_t win) {
  auto window = s.windows.find(win);
  if (window == s.windows.end() || window->second.comm != comm || window->second.clique < 0) {
    return std::nullopt;
  }
  const FakeWindow made = window->second;
  auto clique = s.cliques.find(made.clique);
  if (clique == s.cliques.end()) return std::nullopt;
  auto registered = clique->second.registers.find(made.round);
  if (registered == clique->second.registers.end()) return std::nullopt;
  DeregisterRound& round = clique->second.deregisters[made.round];
  const Ticket ticket{false, made.clique, made.round, made.rank};
  if (round.broken) return ticket;
  round.arrived[made.rank] = win;
  for (int holder : registered->second.holders) {
    if (round.arrived.count(holder) == 0) return ticket;
  }
  for (const auto& [rank, held] : round.arrived) {
    auto found = s.windows.find(held);
    round.results[rank] = found == s.windows.end()
                              ? PerformDeregister(s, comm, held)  // counts the violation
                              : PerformDeregister(s, found->second.comm, held);
  }
  round.done = true;
  s.collective_changed.notify_all();
  return ticket;
}

// Waits until the ticket's round is done, or the deadline: then the round is broken (every
// other rank waiting in it fails too), and the wait counts as a violation and a hang, since NCCL
// would wait for ever. Under s.mu (held by `lock`).
ncclResult_t Await(State& s, std::unique_lock<std::mutex>& lock, const Ticket& ticket,
                   std::chrono::steady_clock::time_point deadline, ncclWindow_t* win) {
  Clique& clique = s.cliques[ticket.clique];
  bool* done = nullptr;
  bool* broken = nullptr;
  if (ticket.registration) {
    RegisterRound& round = clique.registers[ticket.round];
    done = &round.done;
    broken = &round.broken;
  } else {
    DeregisterRound& round = clique.deregisters[ticket.round];
    done = &round.done;
    broken = &round.broken;
  }
  s.collective_changed.wait_until(lock, deadline, [&] { return *done || *broken; });
  if (!*done) {
    *broken = true;
    ++s.violations;
    ++s.hangs;
    s.collective_changed.notify_all();
    if (win != nullptr) *win = nullptr;
    return ncclSystemError;
  }
  if (ticket.registration) {
    const auto& [result, window] = clique.registers[ticket.round].results[ticket.rank];
    if (win != nullptr) *win = window;
    return result;
  }
  return clique.deregisters[ticket.round].results[ticket.rank];
}

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
  s.members.clear();
  s.cliques.clear();
  s.collective_timeout_ms = 1000;
  s.hangs = 0;
  s.grouped_registrations = 0;
  s.null_window_comms.clear();
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
// Cliques and groups (see the file comment).
void fake_nccl_set_clique(ncclComm_t comm, int clique, int rank, int size) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  Fake().members[comm] = Member{clique, rank};
  Fake().cliques[clique].size = size;
}
void fake_nccl_set_collective_timeout_ms(int ms) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  Fake().collective_timeout_ms = ms;
}
int64_t fake_nccl_hangs() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  return Fake().hangs;
}
int64_t fake_nccl_grouped_registrations() {
  std::lock_guard<std::mutex> lock(Fake().mu);
  return Fake().grouped_registrations;
}
void fake_nccl_set_null_window_on(ncclComm_t comm, int on) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  if (on != 0) {
    Fake().null_window_comms.insert(comm);
  } else {
    Fake().null_window_comms.erase(comm);
  }
}
int64_t fake_nccl_live_windows_on(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  int64_t count = 0;
  for (const auto& [window, fake] : Fake().windows) count += fake.comm == comm ? 1 : 0;
  return count;
}
// The calling thread's group nesting depth (0 outside any group).
int fake_nccl_group_depth() { return group_depth; }

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
  if (flags != NCCL_WIN_COLL_SYMMETRIC) return ncclInvalidArgument;
  if (group_depth > 0) {
    *win = nullptr;  // filled in at group end
    deferred.push_back(Deferred{true, comm, buff, size, win, nullptr});
    return ncclSuccess;
  }
  RegistrationCall call(comm);
  State& s = Fake();
  std::unique_lock<std::mutex> lock(s.mu);
  auto member = s.members.find(comm);
  if (member == s.members.end()) return PerformRegister(s, comm, buff, size, win);
  // Collective: wait here for the other ranks of the clique, as NCCL blocks.
  const Ticket ticket = ArriveRegister(s, member->second, comm, buff, size);
  return Await(s, lock, ticket, Deadline(s), win);
}

ncclResult_t ncclCommWindowDeregister(ncclComm_t comm, ncclWindow_t win) {
  if (group_depth > 0) {
    deferred.push_back(Deferred{false, comm, nullptr, 0, nullptr, win});
    return ncclSuccess;
  }
  RegistrationCall call(comm);
  State& s = Fake();
  std::unique_lock<std::mutex> lock(s.mu);
  std::optional<Ticket> ticket = ArriveDeregister(s, comm, win);
  if (!ticket.has_value()) return PerformDeregister(s, comm, win);
  return Await(s, lock, *ticket, Deadline(s), nullptr);
}

ncclResult_t ncclGroupStart() {
  ++group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  State& s = Fake();
  if (group_depth == 0) {
    std::lock_guard<std::mutex> lock(s.mu);
    ++s.violations;  // an end without a start
    return ncclInvalidUsage;
  }
  if (--group_depth > 0) return ncclSuccess;
  std::vector<Deferred> calls = std::move(deferred);
  deferred.clear();
  if (calls.empty()) return ncclSuccess;
  // The group's calls run now; each communicator's are one registration call for the detector.
  std::set<ncclComm_t> comms;
  for (const Deferred& call : calls) comms.insert(call.comm);
  std::vector<std::unique_ptr<RegistrationCall>> running;
  for (ncclComm_t comm : comms) running.push_back(std::make_unique<RegistrationCall>(comm));
  std::unique_lock<std::mutex> lock(s.mu);
  const auto deadline = Deadline(s);
  ncclResult_t outcome = ncclSuccess;
  const auto note = [&](ncclResult_t result) {
    if (outcome == ncclSuccess) outcome = result;
  };
  // Arrive for every call at once, then wait for each.
  std::vector<std::pair<Ticket, ncclWindow_t*>> waits;
  for (const Deferred& call : calls) {
    if (call.registration) {
      auto member = s.members.find(call.comm);
      if (member == s.members.end()) {
        const int64_t before = s.registrations;
        note(PerformRegister(s, call.comm, call.buff, call.size, call.win));
        s.grouped_registrations += s.registrations - before;
      } else {
        waits.emplace_back(ArriveRegister(s, member->second, call.comm, call.buff, call.size),
                           call.win);
      }
    } else {
      std::optional<Ticket> ticket = ArriveDeregister(s, call.comm, call.window);
      if (ticket.has_value()) {
        waits.emplace_back(*ticket, nullptr);
      } else {
        note(PerformDeregister(s, call.comm, call.window));
      }
    }
  }
  for (const auto& [ticket, win] : waits) {
    const ncclResult_t result = Await(s, lock, ticket, deadline, win);
    if (ticket.registration && result == ncclSuccess) ++s.grouped_registrations;
    note(result);
  }
  return outcome;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  auto member = Fake().members.find(comm);
  *count = member == Fake().members.end() ? 1 : Fake().cliques[member->second.clique].size;
  return ncclSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  std::lock_guard<std::mutex> lock(Fake().mu);
  auto member = Fake().members.find(comm);
  *rank = member == Fake().members.end() ? 0 : member->second.rank;
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

}  // extern "C"
