// tidepool as PyTorch's CUDA allocator: the entry points a torch.cuda.memory.
// CUDAPluggableAllocator names, and the helpers the Python module (tidepool.torch) calls.
//
// Two ways in (docs/pytorch.md):
//   A. The current allocator: CUDAPluggableAllocator(libtidepool.so.1, "tidepool_torch_malloc",
//      "tidepool_torch_free") with every optional hook set to the functions below, installed with
//      change_current_allocator before CUDA allocates. Every CUDA tensor then comes from the
//      process's tidepool runtime (the same one the C API serves), and torch.cuda.graph captures
//      into tidepool's pools through the pool hooks (pool_hooks.h).
//   B. The segment source of one torch.cuda.MemPool, with PyTorch's own allocator current:
//      "tidepool_torch_symmetric_segment_malloc" / "_free" hand out whole segments from the
//      symmetric NCCL pool bound to the device (tidepool_torch_bind_segment_pool), reserved and
//      registered beforehand, so no collective registration ever runs inside PyTorch's malloc.
//
// The signatures are PyTorch's (torch/csrc/cuda/CUDAPluggableAllocator.h, torch 2.11), and the
// pool hooks take C++ types (std::pair, std::function): they must be built with the libstdc++
// ABI PyTorch was built with (_GLIBCXX_USE_CXX11_ABI=1 for its wheels). tidepool_torch_cxx11_abi
// says which this library has; the Python module refuses to install when it differs from
// torch._C._GLIBCXX_USE_CXX11_ABI.
//
// Failures are thrown as C++ exceptions, which PyTorch turns into Python ones (torch_errors.h):
// an allocation that does not fit is torch.OutOfMemoryError, anything else RuntimeError. The
// frees never throw (PyTorch calls them from destructors): a failed free is reported on stderr
// and the block stays where it was.
#ifndef TIDEPOOL_INTEGRATIONS_TORCH_TIDEPOOL_TORCH_H_
#define TIDEPOOL_INTEGRATIONS_TORCH_TIDEPOOL_TORCH_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#include "integrations/c_api/tidepool.h"

// cudaStream_t, without the CUDA headers.
struct CUstream_st;

extern "C" {

// --- A: the current allocator ----------------------------------------------------------------
void* tidepool_torch_malloc(size_t size, int device, CUstream_st* stream);
void tidepool_torch_free(void* ptr, size_t size, int device, CUstream_st* stream);
void tidepool_torch_init(int device_count);
// torch.cuda.empty_cache(): every device's cache goes back (nothing, during a capture).
void tidepool_torch_empty_cache();
// torch.cuda.set_per_process_memory_fraction: caps what tidepool holds on `device` at
// `fraction` of its memory (allocator/caching_allocator.h, SetMemoryLimit).
void tidepool_torch_set_memory_fraction(double fraction, int device);
// The segment that holds `ptr`: its base, and its size in *size (for sharing a tensor's memory
// between processes). A block of an expandable segment cannot be shared that way: error.
void* tidepool_torch_base_alloc(void* ptr, size_t* size);
void tidepool_torch_record_stream(void* ptr, CUstream_st* stream);
void tidepool_torch_begin_allocate_to_pool(int device,
                                           std::pair<unsigned long long, unsigned long long> pool,
                                           std::function<bool(CUstream_st*)> filter);
void tidepool_torch_end_allocate_to_pool(int device,
                                         std::pair<unsigned long long, unsigned long long> pool);
void tidepool_torch_release_pool(int device,
                                 std::pair<unsigned long long, unsigned long long> pool);

// --- B: whole segments of the device's bound symmetric pool, for torch.cuda.MemPool ------------
void* tidepool_torch_symmetric_segment_malloc(size_t size, int device, CUstream_st* stream);
void tidepool_torch_symmetric_segment_free(void* ptr, size_t size, int device,
                                           CUstream_st* stream);

// --- For the Python module (C, the C API's conventions) ---------------------------------------
// Which symmetric pool of `device` serves mode B's segments (NOT_FOUND for one that is not a
// symmetric pool of the device).
tidepool_status tidepool_torch_bind_segment_pool(int device, tidepool_pool_id pool);
// The _GLIBCXX_USE_CXX11_ABI this library was built with (0 or 1).
int tidepool_torch_cxx11_abi(void);
// 1 when a failed allocation raises torch.OutOfMemoryError (PyTorch's c10 is in the process and
// works), 0 when it can raise only RuntimeError.
int tidepool_torch_out_of_memory_error(void);
// 1 (the default): a scope that ends a capture's routing and begins it again keeps references
// balanced; 0: PyTorch's bookkeeping exactly (pool_hooks.h).
tidepool_status tidepool_torch_set_capture_behaviour(int balanced);
// References and routes of a pool, for tests that check they balance.
tidepool_status tidepool_torch_pool_info(int device, tidepool_pool_id pool, int64_t* references,
                                         int64_t* routes);

}  // extern "C"

#endif  // TIDEPOOL_INTEGRATIONS_TORCH_TIDEPOOL_TORCH_H_
