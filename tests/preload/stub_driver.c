/* A stand-in for libcuda.so.1 for the interposer's CPU tests (preload_test.cc): the few driver
 * functions libtidepool_preload.so calls, each counting its calls, with one primary context on
 * one device. Its cuMemAlloc hands out addresses no tidepool allocation has (0x5000_0000_0000
 * up), so the test can tell a foreign pointer that the interposer passed back here. Its
 * cuGetProcAddress answers by name from its own table, as the real driver does. */
#include <cuda.h>
#undef cuGetProcAddress
#include <stdint.h>
#include <string.h>

static CUcontext const kPrimary = (CUcontext)0x1234;
static uint64_t next_address = 0x500000000000ull;

long stub_allocations = 0, stub_frees = 0, stub_async_allocations = 0, stub_async_frees = 0;
long stub_begin_captures = 0, stub_end_captures = 0, stub_streams = 0;

CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytes) {
  ++stub_allocations;
  *dptr = (CUdeviceptr)next_address;
  next_address += (bytes + 4095) / 4096 * 4096;
  return CUDA_SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr dptr) {
  (void)dptr;
  ++stub_frees;
  return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* dptr, size_t bytes, CUstream stream) {
  (void)stream;
  ++stub_async_allocations;
  return cuMemAlloc_v2(dptr, bytes);
}
CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream) {
  (void)dptr;
  (void)stream;
  ++stub_async_frees;
  return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = (size_t)100 << 20;
  *total_bytes = (size_t)1 << 30;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* ctx) {
  *ctx = kPrimary;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* device) {
  *device = 0;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
  (void)device;
  *ctx = kPrimary;
  return CUDA_SUCCESS;
}
CUresult cuStreamGetCtx(CUstream stream, CUcontext* ctx) {
  (void)stream;
  *ctx = kPrimary;
  return CUDA_SUCCESS;
}
CUresult cuStreamGetDevice(CUstream stream, CUdevice* device) {
  (void)stream;
  *device = 0;
  return CUDA_SUCCESS;
}
CUresult cuStreamCreate(CUstream* stream, unsigned int flags) {
  (void)flags;
  ++stub_streams;
  *stream = (CUstream)(uintptr_t)(0x7000 + stub_streams);
  return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(CUstream stream) {
  (void)stream;
  return CUDA_SUCCESS;
}
CUresult cuStreamBeginCapture_v2(CUstream stream, CUstreamCaptureMode mode) {
  (void)stream;
  (void)mode;
  ++stub_begin_captures;
  return CUDA_SUCCESS;
}
CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
  (void)stream;
  ++stub_end_captures;
  *graph = (CUgraph)0x9999;
  return CUDA_SUCCESS;
}

CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult* status);

static void* Lookup(const char* symbol) {
  static const struct {
    const char* name;
    void* fn;
  } table[] = {
      {"cuMemAlloc", (void*)&cuMemAlloc_v2},       {"cuMemFree", (void*)&cuMemFree_v2},
      {"cuMemAllocAsync", (void*)&cuMemAllocAsync}, {"cuMemFreeAsync", (void*)&cuMemFreeAsync},
      {"cuMemGetInfo", (void*)&cuMemGetInfo_v2},    {"cuCtxGetCurrent", (void*)&cuCtxGetCurrent},
      {"cuStreamCreate", (void*)&cuStreamCreate},
  };
  if (strcmp(symbol, "cuGetProcAddress") == 0) return (void*)&cuGetProcAddress_v2;
  for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); ++i) {
    if (strcmp(table[i].name, symbol) == 0) return table[i].fn;
  }
  return NULL;
}

CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult* status) {
  (void)version;
  (void)flags;
  *pfn = Lookup(symbol);
  if (status != NULL) *status = *pfn != NULL ? CU_GET_PROC_ADDRESS_SUCCESS
                                             : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return *pfn != NULL ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}
