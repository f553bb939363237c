/* A library that looks like NCCL to the loader (nccl/nccl_library.h) and nothing more: every
 * entry point tidepool resolves, answering ncclInvalidUsage, and an ncclGetVersion that reports
 * FAKE_NCCL_VERSION. Built three ways (tests/nccl/BUILD.bazel): current, too old, and without
 * ncclCommWindowRegister. The fake with ranks and collectives for the pool's tests is another. */
#include <nccl.h>

ncclResult_t ncclGetVersion(int* version) {
  *version = FAKE_NCCL_VERSION;
  return ncclSuccess;
}
const char* ncclGetErrorString(ncclResult_t result) {
  return result == ncclSuccess ? "no error" : "fake NCCL: not implemented";
}
ncclResult_t ncclMemAlloc(void** ptr, size_t size) {
  (void)ptr;
  (void)size;
  return ncclInvalidUsage;
}
ncclResult_t ncclMemFree(void* ptr) { (void)ptr; return ncclInvalidUsage; }
#ifndef FAKE_NCCL_OMIT_WINDOW_REGISTER
ncclResult_t ncclCommWindowRegister(ncclComm_t comm, void* buff, size_t size, ncclWindow_t* win,
                                    int flags) {
  (void)comm; (void)buff; (void)size; (void)win; (void)flags;
  return ncclInvalidUsage;
}
#endif
ncclResult_t ncclCommWindowDeregister(ncclComm_t comm, ncclWindow_t win) {
  (void)comm; (void)win;
  return ncclInvalidUsage;
}
ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  (void)comm;
  *count = 1;
  return ncclSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  (void)comm;
  *rank = 0;
  return ncclSuccess;
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* error) {
  (void)comm;
  *error = ncclSuccess;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) { (void)comm; return ncclSuccess; }
ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
  (void)send; (void)recv; (void)count; (void)type; (void)comm; (void)stream;
  return ncclInvalidUsage;
}
ncclResult_t ncclGroupStart(void) { return ncclSuccess; }
ncclResult_t ncclGroupEnd(void) { return ncclSuccess; }
