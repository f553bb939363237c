#!/usr/bin/env python3
"""CuPy on a real GPU with tidepool as its allocator (tidepool.cupy.install()).

A workload of random numbers, matmul, FFT, reductions, a custom ElementwiseKernel and a RawKernel,
each checked against NumPy on the host copy of the same inputs; the same kernels on a stream of
their own (allocations follow CuPy's current stream); a churn of allocations of many sizes; out of
memory as CuPy's OutOfMemoryError; then the same computations with CuPy's default pool after
uninstall(), compared with tidepool's. Prints one PASS / FAIL line per check and tidepool's
statistics (allocations served > 0), and exits 1 if anything failed.

With --interposed, the same program unmodified, for a run under LD_PRELOAD=libtidepool_preload.so
(tests/gpu_python/cupy_interposed.py starts it so): tidepool.cupy is not installed, and CuPy's
own pool is turned off (cupy.cuda.set_allocator(None)) so that each array is a cudaMalloc, which
the interposer serves. The record_stream part and the comparison with CuPy's pool need
tidepool.cupy and are left out; out of memory must still be CuPy's OutOfMemoryError.

Needs CuPy and a GPU. The runner sets PYTHONPATH (the tidepool package, integrations/python) and
TIDEPOOL_LIBRARY (libtidepool.so.1). Runs in well under a minute.
"""

import gc
import sys
import time

import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _checks import FAILURES, check, finish, run  # noqa: E402 (beside this script)


def close(name, got, want, rtol=1e-4, atol=1e-4):
    import numpy as np
    ok = np.allclose(got, want, rtol=rtol, atol=atol)
    detail = "" if ok else "max abs diff %g" % float(np.max(np.abs(np.asarray(got) - want)))
    check(name, ok, detail)


def main(interposed):
    started = time.time()
    import numpy as np
    import cupy as cp

    if interposed:
        cp.cuda.set_allocator(None)  # every array a cudaMalloc: the interposer's to serve
        allocator = None
        print("CuPy's pool off; allocations go to cudaMalloc (LD_PRELOAD=%s)"
              % os.environ.get("LD_PRELOAD", ""))
    else:
        import tidepool.cupy
        allocator = tidepool.cupy.install()
        print("tidepool.cupy installed from %s (C entry points: %s)"
              % (tidepool.library_path(), allocator.functions.native))
        check("install makes tidepool CuPy's allocator", cp.cuda.get_allocator() is allocator)
        device = cp.cuda.Device().id
        before = tidepool.cupy.memory_stats(device)

    square = cp.ElementwiseKernel("float32 x, float32 y", "float32 z", "z = x * x + y",
                                  "tidepool_square_add")
    saxpy = cp.RawKernel(r"""
    extern "C" __global__ void saxpy(float a, const float* x, const float* y, float* out, int n) {
      int i = blockDim.x * blockIdx.x + threadIdx.x;
      if (i < n) out[i] = a * x[i] + y[i];
    }""", "saxpy")

    def workload(tag):
        """Every operation of the workload on the current stream; returns the device results
        with the host inputs they came from."""
        rng = cp.random.default_rng(1234)
        a = rng.standard_normal((512, 512), dtype=cp.float32)
        b = rng.standard_normal((512, 512), dtype=cp.float32)
        x = cp.asarray(rng.random(1 << 20, dtype=cp.float32))
        y = cp.asarray(rng.random(1 << 20, dtype=cp.float32))
        out = cp.empty_like(x)
        n = x.size
        saxpy(((n + 255) // 256,), (256,), (cp.float32(2.5), x, y, out, cp.int32(n)))
        results = {
            "matmul": a @ b,
            "fft2": cp.fft.fft2(a),
            "sum": a.sum(), "max": a.max(), "mean": x.mean(), "std": x.std(),
            "argmax": y.argmax(),
            "elementwise": square(x, y),
            "rawkernel": out,
        }
        host = {"a": cp.asnumpy(a), "b": cp.asnumpy(b), "x": cp.asnumpy(x), "y": cp.asnumpy(y)}
        return {k: cp.asnumpy(v) for k, v in results.items()}, host

    def verify(tag, got, host):
        a, b, x, y = host["a"], host["b"], host["x"], host["y"]
        close("%s matmul vs NumPy" % tag, got["matmul"], a @ b, rtol=1e-3, atol=1e-3)
        close("%s fft2 vs NumPy" % tag, got["fft2"], np.fft.fft2(a), rtol=1e-3, atol=1e-2)
        close("%s sum vs NumPy" % tag, got["sum"], a.sum(dtype=np.float64), rtol=1e-3, atol=1e-2)
        close("%s max vs NumPy" % tag, got["max"], a.max())
        close("%s mean vs NumPy" % tag, got["mean"], x.mean(dtype=np.float64))
        close("%s std vs NumPy" % tag, got["std"], x.std(dtype=np.float64))
        check("%s argmax vs NumPy" % tag, int(got["argmax"]) == int(y.argmax()))
        close("%s ElementwiseKernel vs NumPy" % tag, got["elementwise"], x * x + y)
        close("%s RawKernel vs NumPy" % tag, got["rawkernel"], np.float32(2.5) * x + y)

    results = {}

    def default_stream():
        got, host = workload("default stream")
        verify("tidepool, default stream:", got, host)
        results["tidepool"] = got
    run("workload on the default stream", default_stream)

    def own_stream():
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            got, host = workload("own stream")
            stream.synchronize()
        verify("tidepool, own stream:", got, host)
        if allocator is not None:
            check("allocations followed the stream change",
                  (device, stream.ptr) in allocator.cached_streams(),
                  str(allocator.cached_streams()))
    run("workload on a stream of its own", own_stream)

    def cross_stream():
        stream = cp.cuda.Stream(non_blocking=True)
        x = cp.arange(1 << 22, dtype=cp.float32)  # allocated on the default stream
        with stream:
            y = x * 2  # used on `stream` too
        tidepool.cupy.record_stream(x, stream)
        del x  # reusable by the default stream only once `stream` reaches this point
        z = cp.zeros(1 << 22, dtype=cp.float32)  # may not take x's block before that
        stream.synchronize()
        close("record_stream: work on the other stream saw intact data", cp.asnumpy(y[:5]),
              np.arange(5, dtype=np.float32) * 2)
        check("record_stream: new block zeroed", float(z.sum()) == 0.0)
    if not interposed:
        run("a block used on two streams, declared with record_stream", cross_stream)

    def churn():
        rng = np.random.default_rng(7)
        total = 0
        for i in range(2000):
            n = int(rng.integers(1, 1 << 18))
            a = cp.full(n, i % 97, dtype=cp.int32)
            total += int(a[-1])
            del a
        expected = sum(i % 97 for i in range(2000))
        check("churn of 2000 arrays of random sizes", total == expected,
              "%d != %d" % (total, expected))
    run("churn", churn)

    def out_of_memory():
        try:
            cp.empty(1 << 50, dtype=cp.uint8)
        except cp.cuda.memory.OutOfMemoryError as error:
            check("out of memory raises CuPy's OutOfMemoryError",
                  interposed or isinstance(error.__cause__, tidepool.OutOfMemoryError),
                  repr(error.__cause__))
        except cp.cuda.runtime.CUDARuntimeError as error:
            # Without a pool CuPy passes cudaMalloc's own error up: the interposer's answer.
            check("out of memory is cudaMalloc's cudaErrorMemoryAllocation",
                  interposed and "cudaErrorMemoryAllocation" in str(error), str(error))
        else:
            check("out of memory raises CuPy's OutOfMemoryError", False, "nothing raised")
    run("out of memory", out_of_memory)

    gc.collect()
    cp.cuda.Device().synchronize()
    if interposed:  # the interposer prints its statistics at exit (TIDEPOOL_STATS=1)
        print("elapsed %.1f s" % (time.time() - started))
        return finish()
    after = tidepool.cupy.memory_stats(device)
    served = after["active_blocks"]["added"] - before["active_blocks"]["added"]
    check("tidepool served the allocations", served > 0, "active_blocks.added grew by %d" % served)
    print("tidepool stats, device %d: allocations served %d, allocated now %d B (peak %d B), "
          "reserved now %d B (peak %d B), device allocations %d, ooms %d"
          % (device, served, after["allocated_bytes"]["current"], after["allocated_bytes"]["peak"],
             after["reserved_bytes"]["current"], after["reserved_bytes"]["peak"],
             after["device_allocations"], after["ooms"]))

    def against_default_pool():
        check("uninstall gives CuPy its allocator back", tidepool.cupy.uninstall()
              and cp.cuda.get_allocator() is not allocator)
        pool_before = tidepool.cupy.memory_stats(device)["active_blocks"]["added"]
        got, host = workload("default pool")
        verify("CuPy's default pool:", got, host)
        for key, value in results.get("tidepool", {}).items():
            close("tidepool and CuPy's pool agree on %s" % key, value, got[key], rtol=1e-5,
                  atol=1e-5)
        check("CuPy's pool served the run after uninstall",
              tidepool.cupy.memory_stats(device)["active_blocks"]["added"] == pool_before)
    run("against CuPy's default pool", against_default_pool)

    print("elapsed %.1f s" % (time.time() - started))
    return finish()


if __name__ == "__main__":
    sys.exit(main(interposed="--interposed" in sys.argv[1:]))
