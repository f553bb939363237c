#!/usr/bin/env python3
"""sglang's SymmetricMemoryContext logic on tidepool, with a one-rank NCCL communicator.

The context's logic as sglang's seed version has it (docs/pytorch.md): on entry it begins
routing the current thread to the symmetric pool with torch.cuda.memory's
_cuda_beginAllocateCurrentThreadToPool; on exit it ends and releases; under graph capture it
first ends the capture's routing to the graph pool and, on exit, begins it again for the current
thread. The communicator is made through ctypes on the wheel's libnccl, as sglang's own wrapper
does. Run in two modes, each in its own process:
  A: tidepool.torch.install(); the pool is tidepool.torch.symmetric_pool(comm);
  B: PyTorch's allocator; the pool is tidepool.torch.nccl_mem_pool(comm, reserve=...), a
     torch.cuda.MemPool whose segments come from tidepool's symmetric pool.
Both outside and inside torch.cuda.graph: the buffers lie in registered windows, an
ncclAllReduce on them gives the right values (also when replayed from the graph), and (mode A)
the references of the symmetric and the graph pool balance.
"""
import ctypes
import os
import subprocess
import sys

import torch
from torch.cuda import memory as cuda_memory

import tidepool.torch as tt

MiB = 1 << 20


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def nccl_library():
    path = os.environ.get("TIDEPOOL_NCCL_LIBRARY")
    if not path:
        site = os.path.dirname(os.path.dirname(torch.__file__))
        path = os.path.join(site, "nvidia", "nccl", "lib", "libnccl.so.2")
    lib = ctypes.CDLL(path)
    lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, NcclUniqueId,
                                     ctypes.c_int]
    lib.ncclAllReduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def one_rank_communicator(lib):
    uid = NcclUniqueId()
    assert lib.ncclGetUniqueId(ctypes.byref(uid)) == 0
    comm = ctypes.c_void_p()
    assert lib.ncclCommInitRank(ctypes.byref(comm), 1, uid, 0) == 0
    return comm


NCCL_FLOAT32, NCCL_SUM = 7, 0


def all_reduce(lib, comm, send, receive):
    stream = torch.cuda.current_stream().cuda_stream
    result = lib.ncclAllReduce(send.data_ptr(), receive.data_ptr(), send.numel(), NCCL_FLOAT32,
                               NCCL_SUM, comm, ctypes.c_void_p(stream))
    assert result == 0, f"ncclAllReduce: {result}"


class SymmetricMemoryContext:
    """sglang's context, the seed's logic: the three torch.cuda.memory calls, directly."""

    def __init__(self, pool_id, graph_pool_id=None):
        self.pool_id = pool_id
        self.graph_pool_id = graph_pool_id
        self.device = torch.cuda.current_device()

    def __enter__(self):
        self.capturing = torch.cuda.is_current_stream_capturing()
        if self.capturing:
            cuda_memory._cuda_endAllocateToPool(self.device, self.graph_pool_id)
        cuda_memory._cuda_beginAllocateCurrentThreadToPool(self.device, self.pool_id)
        return self

    def __exit__(self, *exc):
        cuda_memory._cuda_endAllocateToPool(self.device, self.pool_id)
        cuda_memory._cuda_releasePool(self.device, self.pool_id)
        if self.capturing:
            cuda_memory._cuda_beginAllocateCurrentThreadToPool(self.device, self.graph_pool_id)
        return False


def check(name, ok):
    print(f"{'PASS' if ok else 'FAIL'} [{MODE}] {name}")
    return ok


def in_window(tensor):
    window, offset = tt.lookup(tensor.data_ptr())
    return window != 0 and window is not None


def pool_counts(pool):
    lib = ctypes.CDLL(os.environ["TIDEPOOL_LIBRARY"])
    refs, routes = ctypes.c_int64(), ctypes.c_int64()

    class PoolId(ctypes.Structure):
        _fields_ = [("first", ctypes.c_uint64), ("second", ctypes.c_uint64)]

    status = lib.tidepool_torch_pool_info(0, PoolId(*pool), ctypes.byref(refs),
                                          ctypes.byref(routes))
    assert status == 0, status
    return refs.value, routes.value


def run(mode):
    global MODE
    MODE = mode
    if mode == "A":
        tt.install()
    torch.cuda.init()
    lib = nccl_library()
    comm = one_rank_communicator(lib)
    if mode == "A":
        pool_id = tt.symmetric_pool(comm.value, reserve=256 * MiB)
    else:
        mem_pool = tt.nccl_mem_pool(comm.value, reserve=256 * MiB)
        pool_id = mem_pool.id
    results = []
    # Outside capture.
    with SymmetricMemoryContext(pool_id):
        send = torch.full((1 << 20,), 3.0, device="cuda")
        receive = torch.zeros(1 << 20, device="cuda")
    plain = torch.zeros(1024, device="cuda")
    results.append(check("buffers made in the context lie in registered windows",
                         in_window(send) and in_window(receive)))
    results.append(check("a buffer made outside it does not",
                         not _lies_in_window(plain)))
    all_reduce(lib, comm, send, receive)
    torch.cuda.synchronize()
    results.append(check("ncclAllReduce on them gives the right values",
                         bool((receive == 3.0).all())))
    if mode == "A":
        refs, routes = pool_counts(pool_id)
        results.append(check(f"symmetric pool references balance (1 reference, 0 routes: got "
                             f"{refs}, {routes})", (refs, routes) == (1, 0)))
    # Inside torch.cuda.graph, sglang's order.
    graph_pool = torch.cuda.graph_pool_handle()
    x = torch.ones(1 << 20, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (x * 2).sum()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=graph_pool):
        before = x * 2
        with SymmetricMemoryContext(pool_id, graph_pool):
            gsend = torch.empty(1 << 20, device="cuda")
            greceive = torch.empty(1 << 20, device="cuda")
        gsend.copy_(before)
        all_reduce(lib, comm, gsend, greceive)
        after = greceive + 1
    results.append(check("inside the capture, the context's buffers lie in windows",
                         in_window(gsend) and in_window(greceive)))
    results.append(check("the capture's other buffers do not",
                         not _lies_in_window(before) and not _lies_in_window(after)))
    ok = True
    for k in range(1, 101):
        x.fill_(float(k))
        g.replay()
        torch.cuda.synchronize()
        ok = ok and bool((after == 2.0 * k + 1).all())
    results.append(check("100 replays of the captured all-reduce give the right values", ok))
    if mode == "A":
        refs, routes = pool_counts(pool_id)
        results.append(check(f"after the capture, symmetric pool references balance ({refs}, "
                             f"{routes})", (refs, routes) == (1, 0)))
        refs, routes = pool_counts(graph_pool)
        results.append(check(f"the graph pool holds only the graph's reference ({refs}, {routes})",
                             (refs, routes) == (1, 0)))
    del g
    torch.cuda.synchronize()
    return 0 if all(results) else 1


def _lies_in_window(tensor):
    try:
        return in_window(tensor)
    except Exception:  # not in a symmetric pool: the lookup refuses
        return False


def main():
    if len(sys.argv) > 1:
        return run(sys.argv[1])
    failed = 0
    for mode in ("A", "B"):
        out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True)
        print(out.stdout, end="")
        if out.returncode != 0:
            print(out.stderr[-3000:])
            failed += 1
    print("PASS" if failed == 0 else "FAIL")
    return 1 if failed else 0


MODE = "?"

if __name__ == "__main__":
    sys.exit(main())
