// The symmetric registry (symmetric_registry.h) of the process's one runtime
// (runtime/global_runtime.h), made with it on first use and kept as long (never destroyed). The
// C API and the PyTorch hooks, both inside libtidepool.so, share it; like the global runtime,
// only that library (and tests) may link it.
#ifndef TIDEPOOL_NCCL_GLOBAL_SYMMETRIC_REGISTRY_H_
#define TIDEPOOL_NCCL_GLOBAL_SYMMETRIC_REGISTRY_H_

#include "absl/status/statusor.h"
#include "nccl/symmetric_registry.h"

namespace tidepool {

absl::StatusOr<SymmetricRegistry*> GlobalSymmetricRegistry();

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_GLOBAL_SYMMETRIC_REGISTRY_H_
