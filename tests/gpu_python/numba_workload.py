#!/usr/bin/env python3
"""Numba on a real GPU with tidepool as its memory manager (tidepool.numba, the EMM plugin).

@cuda.jit kernels over device arrays allocated and dropped in a loop of 1000 iterations (sizes
varying), results checked against NumPy; the same on a stream of Numba's own; the plugin's
get_memory_info, reset and out of memory; tidepool's statistics printed (allocations served > 0,
every block back at the end). One PASS / FAIL line per check; exit 1 if anything failed.

Needs Numba (numba-cuda) and a GPU. The runner sets PYTHONPATH (the tidepool package,
integrations/python) and TIDEPOOL_LIBRARY (libtidepool.so.1). Runs in well under a minute, most of
it compiling the kernels.
"""

import gc
import sys
import time

import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _checks import FAILURES, check, finish, run  # noqa: E402 (beside this script)


def main():
    started = time.time()
    import numpy as np
    from numba import cuda
    import tidepool.numba

    tidepool.numba.install()  # before anything touches CUDA
    context = cuda.current_context()
    manager = context.memory_manager
    check("Numba's context uses tidepool's memory manager",
          isinstance(manager, tidepool.numba.TidepoolMemoryManager), repr(manager))
    device = context.device.id
    print("tidepool.numba from %s, device %d, allocating on stream handle %d"
          % (tidepool.library_path(), device, manager.stream_handle()))
    before = tidepool.numba.memory_stats(device)

    # `a` comes in a one-element array, not as a scalar argument: on the GPU host (numba-cuda with
    # NumPy 2.5) compiling a kernel with a float scalar argument fails inside Numba
    # (np.row_stack, removed from NumPy). It is one more allocation per iteration besides.
    @cuda.jit
    def axpy(out, a, x, y):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = a[0] * x[i] + y[i]

    @cuda.jit
    def row_sums(out, m):
        i = cuda.grid(1)
        if i < m.shape[0]:
            total = 0.0
            for j in range(m.shape[1]):
                total += m[i, j]
            out[i] = total

    # On the GPU host (numba-cuda with NumPy 2.5) Numba cannot compile any kernel, with tidepool
    # or without (np.row_stack, removed from NumPy): then the loops move the data with copies
    # only, which still allocate and free every array through the plugin, and say so.
    try:
        probe = cuda.device_array(1, dtype=np.float32)
        axpy[1, 1](probe, cuda.to_device(np.ones(1, np.float32)), probe, probe)
        kernels = True
    except AttributeError as error:
        kernels = False
        print("SKIP kernels: Numba cannot compile a kernel on this host, with or without tidepool "
              "(%s); the loops below copy instead" % error)
    del probe  # every block must be back at the end

    rng = np.random.default_rng(3)
    host_x = rng.random(1 << 18, dtype=np.float32)
    host_y = rng.random(1 << 18, dtype=np.float32)

    def loop(stream=None, iterations=1000, tag="default stream"):
        bad = 0
        kwargs = {} if stream is None else {"stream": stream}
        for i in range(iterations):
            n = 1000 + (i * 7919) % ((1 << 18) - 1000)
            a = np.float32(0.5 + (i % 7))
            a_device = cuda.to_device(np.array([a], dtype=np.float32), **kwargs)
            x = cuda.to_device(host_x[:n], **kwargs)
            y = cuda.to_device(host_y[:n], **kwargs)
            out = cuda.device_array(n, dtype=np.float32, **kwargs)
            blocks = (n + 255) // 256
            if not kernels:
                out.copy_to_device(a * host_x[:n] + host_y[:n], **kwargs)
            elif stream is None:
                axpy[blocks, 256](out, a_device, x, y)
            else:
                axpy[blocks, 256, stream](out, a_device, x, y)
            if i % 50 == 0 or i == iterations - 1:
                got = out.copy_to_host(**kwargs)
                if stream is not None:
                    stream.synchronize()
                if not np.allclose(got, a * host_x[:n] + host_y[:n], rtol=1e-6, atol=1e-6):
                    bad += 1
            del a_device, x, y, out
        if stream is not None:
            stream.synchronize()
        check("%s: %d iterations of axpy over fresh device arrays match NumPy" % (tag, iterations),
              bad == 0, "%d checks differed" % bad)

    run("loop on Numba's default stream", loop)

    def matrix():
        m = rng.random((2048, 300), dtype=np.float32)
        d_m = cuda.to_device(m)
        d_out = cuda.device_array(2048, dtype=np.float32)
        if not kernels:
            check("a 2048x300 matrix round-trips (kernels skipped)",
                  np.array_equal(d_m.copy_to_host(), m))
            return
        row_sums[(2048 + 127) // 128, 128](d_out, d_m)
        check("row sums of a 2048x300 matrix match NumPy",
              np.allclose(d_out.copy_to_host(), m.sum(axis=1), rtol=1e-4, atol=1e-3))
    run("2-D kernel", matrix)

    def own_stream():
        stream = cuda.stream()
        loop(stream=stream, iterations=200, tag="cuda.stream()")
        x = cuda.to_device(host_x, stream=stream)
        tidepool.numba.record_stream(x, stream)  # declared: freed below while `stream` may run
        out = cuda.device_array_like(x, stream=stream)
        two = cuda.to_device(np.array([2.0], dtype=np.float32), stream=stream)
        if kernels:
            axpy[(x.size + 255) // 256, 256, stream](out, two, x, x)
        else:
            out.copy_to_device(4.0 * host_x, stream=stream)
        del x
        got = out.copy_to_host(stream=stream)
        stream.synchronize()
        check("record_stream'd array used on its stream", np.allclose(got, 4.0 * host_x))
    run("a stream of Numba's own", own_stream)

    def memory_info():
        info = context.get_memory_info()
        check("get_memory_info: 0 < free <= total", 0 < info.free <= info.total, repr(info))
    run("get_memory_info", memory_info)

    def out_of_memory():
        try:
            cuda.device_array(1 << 48, dtype=np.uint8)
        except MemoryError as error:
            check("out of memory raises MemoryError (tidepool.OutOfMemoryError)",
                  isinstance(error, tidepool.OutOfMemoryError), repr(error))
        else:
            check("out of memory raises MemoryError", False, "nothing raised")
    run("out of memory", out_of_memory)

    gc.collect()
    cuda.synchronize()
    after = tidepool.numba.memory_stats(device)
    served = after["active_blocks"]["added"] - before["active_blocks"]["added"]
    check("tidepool served Numba's allocations (>= 3600)", served >= 3600, "served %d" % served)
    check("every block went back", after["allocated_bytes"]["current"]
          == before["allocated_bytes"]["current"],
          "%d B still allocated" % after["allocated_bytes"]["current"])
    print("tidepool stats, device %d: allocations served %d, allocated now %d B (peak %d B), "
          "reserved now %d B (peak %d B), device allocations %d, ooms %d"
          % (device, served, after["allocated_bytes"]["current"], after["allocated_bytes"]["peak"],
             after["reserved_bytes"]["current"], after["reserved_bytes"]["peak"],
             after["device_allocations"], after["ooms"]))

    def reset():
        manager.reset()
        stats = tidepool.numba.memory_stats(device)
        check("reset returns tidepool's cache",
              stats["reserved_bytes"]["current"] - stats["allocated_bytes"]["current"]
              < (2 << 20), repr(stats["reserved_bytes"]))
    run("reset", reset)

    print("elapsed %.1f s" % (time.time() - started))
    return finish()


if __name__ == "__main__":
    sys.exit(main())
