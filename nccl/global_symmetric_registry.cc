// The process's symmetric registry: see GlobalSymmetricRegistry in symmetric_registry.h.
#include "nccl/global_symmetric_registry.h"

#include "runtime/global_runtime.h"

namespace tidepool {

absl::StatusOr<SymmetricRegistry*> GlobalSymmetricRegistry() {
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  if (!runtime.ok()) return runtime.status();
  static SymmetricRegistry* const registry = new SymmetricRegistry(*runtime);
  return registry;
}

}  // namespace tidepool
