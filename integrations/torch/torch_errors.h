// Errors for PyTorch, raised from inside its allocator hooks.
//
// PyTorch's pluggable allocator checks nothing its malloc hook returns: a NULL block becomes a
// tensor at address 0, and the first kernel that touches it fails with an illegal memory access
// that ends the CUDA context (seen on the GPU host, torch 2.11). A hook therefore reports failure
// the way PyTorch's own allocator does, by throwing a C++ exception through PyTorch's frames,
// which PyTorch turns into a Python exception:
//   * out of memory: c10::OutOfMemoryError, which Python sees as torch.OutOfMemoryError (what
//     training loops catch to shrink a batch and go on);
//   * anything else: std::runtime_error, which Python sees as RuntimeError.
// tidepool does not link PyTorch, so c10::OutOfMemoryError is made from what PyTorch's own
// libc10 exports, found at run time in the process (dlsym): c10::Error's public constructor
// (source location, message), OutOfMemoryError's vtable and its type_info; the object is then
// thrown with __cxa_throw, exactly as `throw c10::OutOfMemoryError(...)` compiled inside PyTorch
// would. This follows the Itanium C++ ABI (the one g++ and PyTorch's wheels use) and needs the
// same libstdc++ string ABI as PyTorch (checked by the Python module at install). When any of
// the three is missing (no PyTorch in the process, a PyTorch built otherwise), the error is a
// std::runtime_error with the same message, and TorchOutOfMemoryErrorAvailable() says so.
//
// Thread safety: every function may be called from any thread.
#ifndef TIDEPOOL_INTEGRATIONS_TORCH_TORCH_ERRORS_H_
#define TIDEPOOL_INTEGRATIONS_TORCH_TORCH_ERRORS_H_

#include <string>

namespace tidepool {
namespace torch_hooks {

// Whether ThrowOutOfMemory throws c10::OutOfMemoryError (PyTorch's c10 was found and a test
// throw of it was caught as a std::exception with the message intact).
bool TorchOutOfMemoryErrorAvailable();

[[noreturn]] void ThrowOutOfMemory(const std::string& message);
[[noreturn]] void ThrowError(const std::string& message);

}  // namespace torch_hooks
}  // namespace tidepool

#endif  // TIDEPOOL_INTEGRATIONS_TORCH_TORCH_ERRORS_H_
