// A CUDA program written without tidepool in mind, for the interposer's GPU test
// (preload_programs.sh builds it twice with nvcc: default flags, static cudart, and -cudart
// shared, and runs both under LD_PRELOAD=libtidepool_preload.so). It allocates with cudaMalloc
// and cudaMallocAsync, frees across streams, and captures a graph that allocates and frees, then
// replays it; every result is checked on the host. Prints PASS or FAIL lines.
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#define CHECK_CUDA(call)                                                               \
  do {                                                                                 \
    cudaError_t e = (call);                                                            \
    if (e != cudaSuccess) {                                                            \
      std::printf("FAIL %s: %s (line %d)\n", #call, cudaGetErrorString(e), __LINE__); \
      return 1;                                                                        \
    }                                                                                  \
  } while (0)

__global__ void Fill(float* out, float value, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

__global__ void AddInto(float* out, const float* in, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] += in[i];
}

bool AllEqual(const float* device_data, int n, float expected) {
  std::vector<float> host(n);
  if (cudaMemcpy(host.data(), device_data, n * sizeof(float), cudaMemcpyDeviceToHost) !=
      cudaSuccess) {
    return false;
  }
  for (float v : host) {
    if (v != expected) return false;
  }
  return true;
}

int main() {
  const int n = 1 << 20;
  const int blocks = (n + 255) / 256;
  bool ok = true;

  // cudaMalloc / cudaFree, many times (the cache's reuse), results checked.
  for (int round = 0; round < 100; ++round) {
    float* a = nullptr;
    CHECK_CUDA(cudaMalloc(&a, n * sizeof(float)));
    Fill<<<blocks, 256>>>(a, float(round), n);
    if (round % 25 == 0) ok = ok && AllEqual(a, n, float(round));
    CHECK_CUDA(cudaFree(a));
  }
  std::printf("%s cudaMalloc / cudaFree, 100 rounds\n", ok ? "PASS" : "FAIL");

  // cudaMallocAsync on one stream, used on another, freed on the second (across streams).
  cudaStream_t s1, s2;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  CHECK_CUDA(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  cudaEvent_t filled;
  CHECK_CUDA(cudaEventCreate(&filled));
  bool across = true;
  for (int round = 0; round < 100; ++round) {
    float *x = nullptr, *y = nullptr;
    CHECK_CUDA(cudaMallocAsync(&x, n * sizeof(float), s1));
    CHECK_CUDA(cudaMallocAsync(&y, n * sizeof(float), s1));
    Fill<<<blocks, 256, 0, s1>>>(x, 1.0f, n);
    Fill<<<blocks, 256, 0, s1>>>(y, 2.0f, n);
    CHECK_CUDA(cudaEventRecord(filled, s1));
    CHECK_CUDA(cudaStreamWaitEvent(s2, filled, 0));
    AddInto<<<blocks, 256, 0, s2>>>(y, x, n);
    CHECK_CUDA(cudaFreeAsync(x, s2));  // freed on the stream that used it last
    if (round % 25 == 0) {
      CHECK_CUDA(cudaStreamSynchronize(s2));
      across = across && AllEqual(y, n, 3.0f);
    }
    CHECK_CUDA(cudaFreeAsync(y, s2));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  std::printf("%s cudaMallocAsync on one stream, freed on another, 100 rounds\n",
              across ? "PASS" : "FAIL");

  // A captured graph that allocates and frees, replayed.
  float* result = nullptr;
  CHECK_CUDA(cudaMalloc(&result, n * sizeof(float)));
  CHECK_CUDA(cudaMemset(result, 0, n * sizeof(float)));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
  float* scratch = nullptr;
  CHECK_CUDA(cudaMallocAsync(&scratch, n * sizeof(float), s1));
  Fill<<<blocks, 256, 0, s1>>>(scratch, 5.0f, n);
  AddInto<<<blocks, 256, 0, s1>>>(result, scratch, n);
  CHECK_CUDA(cudaFreeAsync(scratch, s1));
  CHECK_CUDA(cudaStreamEndCapture(s1, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 10; ++replay) CHECK_CUDA(cudaGraphLaunch(exec, s1));
  CHECK_CUDA(cudaStreamSynchronize(s1));
  const bool replayed = AllEqual(result, n, 50.0f);
  std::printf("%s a captured graph that allocates and frees, 10 replays\n",
              replayed ? "PASS" : "FAIL");
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaFree(result));
  CHECK_CUDA(cudaStreamDestroy(s1));
  CHECK_CUDA(cudaStreamDestroy(s2));
  size_t free_bytes = 0, total_bytes = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  std::printf("cudaMemGetInfo: %zu of %zu bytes free\n", free_bytes, total_bytes);
  return ok && across && replayed ? 0 : 1;
}
