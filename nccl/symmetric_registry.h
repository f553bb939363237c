// The symmetric pools of a runtime, one per communicator, each a routable pool of its device.
//
// A symmetric pool (symmetric_pool.h) places buffers alike on every rank; this file makes one a
// pool like any other of tidepool's: it gets a PoolId and is attached to its device's pool
// manager (pool/external_pool.h), so that
//   * a thread's allocations are routed to it by the ordinary begin / end / release
//     (tidepool_begin_allocate_current_thread_to_pool with its id: sglang's
//     SymmetricMemoryContext), or by a SymmetricScope (symmetric_scope.h);
//   * its buffers are freed by the ordinary free (Runtime::Free finds their pool), recorded in a
//     trace like every allocation, and reported by the pool's stats and snapshot (the snapshot
//     lists each segment's window and each block's offset);
//   * the pool's trim (Runtime pools' Trim, tidepool_trim_pool) is the symmetric pool's
//     collective trim.
// The communicator is passed in when the pool is made, never through the environment.
//
// Collective calls (every rank makes them, in the same order: docs/nccl.md rule 6): Create's
// first use of the communicator, Reserve, Trim, Destroy, and any allocation that grows the pool.
// Local calls: Find, Lookup, and allocations and frees that fit.
//
// A pool's life: Create attaches it with one reference, the registry's. Destroy (collective)
// refuses while a buffer is live or a route still points at it, gives every segment back (each
// deregistered before it is freed), then detaches the pool (PoolManager::Detach); the id then
// refuses every begin. The ordinary release never drops the registry's reference. A pool that broke (ranks diverged, or a rank timed out and the communicator was
// aborted) cannot give its segments back, since deregistering is collective: Destroy then
// releases the id and keeps that memory until the process ends, and says so.
//
// Thread safety: every method may be called from any thread. The registry's lock is never held
// across a collective call, so one pool's slow growth does not block another pool. Lock order:
// the registry's lock, then a pool manager's.
#ifndef TIDEPOOL_NCCL_SYMMETRIC_REGISTRY_H_
#define TIDEPOOL_NCCL_SYMMETRIC_REGISTRY_H_

#include <nccl.h>

#include <cstddef>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/mutex.h"
#include "nccl/nccl_library.h"
#include "nccl/rank_agreement.h"
#include "nccl/symmetric_pool.h"
#include "pool/pool_id.h"
#include "runtime/runtime.h"

namespace tidepool {

class SymmetricExternalPool;

// What Find says of a symmetric pool.
struct SymmetricPoolRef {
  int device = 0;
  PoolId id;
  ncclComm_t communicator = nullptr;
  SymmetricPool* pool = nullptr;  // valid while the registry holds the pool
};

class SymmetricRegistry {
 public:
  // `runtime` must outlive the registry.
  explicit SymmetricRegistry(Runtime* runtime);
  ~SymmetricRegistry();
  SymmetricRegistry(const SymmetricRegistry&) = delete;
  SymmetricRegistry& operator=(const SymmetricRegistry&) = delete;

  // Makes the symmetric pool of `comm` on `device`, over the process's NCCL (NcclLibrary::Get)
  // and an agreement on the communicator itself (nccl_agreement.h; the device must be a CUDA
  // device). Returns its new id ({0, n}). ALREADY_EXISTS when `comm` has a pool already,
  // INVALID_ARGUMENT for a null communicator, the runtime's error for an unknown device, NCCL's
  // for a library that cannot be used.
  absl::StatusOr<PoolId> Create(int device, ncclComm_t comm,
                                const SymmetricPool::Options& options) ABSL_LOCKS_EXCLUDED(mu_);
  // The same with the library and the agreement given (tests give a fake NCCL and ranks as
  // threads). `nccl` must outlive the pool.
  absl::StatusOr<PoolId> Create(int device, ncclComm_t comm, const NcclLibrary* nccl,
                                std::unique_ptr<RankAgreement> agreement,
                                const SymmetricPool::Options& options) ABSL_LOCKS_EXCLUDED(mu_);

  // The pool of an id on a device. NOT_FOUND for an id that names no symmetric pool there (an
  // ordinary pool, a destroyed one, another device's).
  absl::StatusOr<SymmetricPoolRef> Find(int device, PoolId id) const ABSL_LOCKS_EXCLUDED(mu_);
  // The pool of a communicator; NOT_FOUND when it has none.
  absl::StatusOr<SymmetricPoolRef> FindByCommunicator(ncclComm_t comm) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // The window and offset of the live symmetric block at `ptr` (or containing it), of any pool.
  // INVALID_ARGUMENT when no symmetric pool holds it.
  absl::StatusOr<SymmetricPool::Location> Lookup(const void* ptr) const ABSL_LOCKS_EXCLUDED(mu_);

  // Collective: SymmetricPool::Reserve and Trim of the pool.
  absl::Status Reserve(int device, PoolId id, size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Trim(int device, PoolId id) ABSL_LOCKS_EXCLUDED(mu_);
  // Collective: see the file comment. FAILED_PRECONDITION (nothing changed) while buffers are
  // live or routes point at the pool.
  absl::Status Destroy(int device, PoolId id) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    int device = 0;
    ncclComm_t communicator = nullptr;
    std::shared_ptr<SymmetricExternalPool> pool;
  };
  absl::StatusOr<Entry> FindEntry(int device, PoolId id) const ABSL_LOCKS_EXCLUDED(mu_);

  Runtime* const runtime_;
  mutable Mutex mu_;
  absl::flat_hash_map<PoolId, Entry> pools_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_SYMMETRIC_REGISTRY_H_
