// sglang's symmetric-memory pattern as one object: while a SymmetricScope lives, the calling
// thread's allocations on the pool's device come from a communicator's symmetric pool
// (symmetric_registry.h), and when it ends they go where they went before.
//
// Inside a CUDA graph capture this pauses the capture's routing for this thread only, and
// restores it on exit, with references balanced: the scope's route is the newest, and the newest
// route wins (docs/graphs.md rule 11). sglang does the same today by ending the capture's route
// by hand and beginning it again, which leaks a reference to the graph's pool each time.
// Allocations that fit the pool's reserve are local; one that would grow the pool is refused
// during a capture (docs/nccl.md rule 4): reserve before capturing.
//
// Scopes nest, with other pool scopes too; each ends its own route. A scope whose pool cannot be
// found or is no longer held does nothing, and status() says why.
//
// Thread safety: a scope belongs to the thread that made it (it routes that thread only).
#ifndef TIDEPOOL_NCCL_SYMMETRIC_SCOPE_H_
#define TIDEPOOL_NCCL_SYMMETRIC_SCOPE_H_

#include <nccl.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nccl/symmetric_registry.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "runtime/runtime.h"

namespace tidepool {

class SymmetricScope {
 public:
  // The symmetric pool of `comm`.
  SymmetricScope(Runtime* runtime, const SymmetricRegistry* registry, ncclComm_t comm)
      : SymmetricScope(runtime, registry->FindByCommunicator(comm)) {}
  // The symmetric pool `id` of `device`.
  SymmetricScope(Runtime* runtime, const SymmetricRegistry* registry, int device, PoolId id)
      : SymmetricScope(runtime, registry->Find(device, id)) {}
  ~SymmetricScope() {
    if (!status_.ok()) return;
    // Both succeed: the constructor's begin made the route and took the reference they undo.
    pools_->End(pool_, RouteFilter::CurrentThread()).IgnoreError();
    pools_->Release(pool_).IgnoreError();
  }
  SymmetricScope(const SymmetricScope&) = delete;
  SymmetricScope& operator=(const SymmetricScope&) = delete;

  // Whether the scope was entered; if not, it does nothing on exit.
  const absl::Status& status() const { return status_; }
  PoolId pool() const { return pool_; }

 private:
  SymmetricScope(Runtime* runtime, const absl::StatusOr<SymmetricPoolRef>& found) {
    if (!found.ok()) {
      status_ = found.status();
      return;
    }
    pool_ = found->id;
    absl::StatusOr<PoolManager*> pools = runtime->Pools(found->device);
    if (!pools.ok()) {
      status_ = pools.status();
      return;
    }
    pools_ = *pools;
    // BeginHeld, not Begin: a destroyed pool is refused rather than made anew as an empty one.
    status_ = pools_->BeginHeld(pool_, RouteFilter::CurrentThread());
  }

  PoolManager* pools_ = nullptr;
  PoolId pool_;
  absl::Status status_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_SYMMETRIC_SCOPE_H_
