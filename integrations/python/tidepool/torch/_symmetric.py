"""Symmetric NCCL pools for PyTorch programs (docs/nccl.md, docs/pytorch.md).

Mode A (tidepool is PyTorch's allocator): symmetric_pool(comm) makes the communicator's pool and
returns its id as PyTorch's pool id tuple, for torch.cuda.memory._cuda_beginAllocateCurrentThread
ToPool / _cuda_endAllocateToPool / _cuda_releasePool (sglang's SymmetricMemoryContext): every
tensor the thread allocates in between lands at the same offset of the same window on every rank.

Mode B (PyTorch's allocator stays): nccl_mem_pool(comm, reserve) returns a torch.cuda.MemPool
whose segments are whole pieces of a reserved symmetric pool (tidepool_torch_symmetric_segment_
malloc / _free); PyTorch caches inside them as in any MemPool.

The collective calls (create's later growth, reserve, trim, destroy) must be made by every rank
of the communicator in the same order (docs/nccl.md rules 6-7, 18-23).
"""

import ctypes

from tidepool import _errors
from tidepool import _library
from tidepool.torch import _common
from tidepool.torch import _install


def _communicator(comm):
    value = _common.address(comm, "communicator")
    if not value:
        raise _errors.InvalidArgumentError(
            "communicator %r is NULL: pass the rank's ncclComm_t (an int address or a ctypes "
            "pointer)" % (comm,))
    return value


def symmetric_pool(comm, device=None, reserve=0, growth_bytes=64 << 20, timeout=30.0):
    """Makes the symmetric pool of `comm` (an ncclComm_t of `device`'s rank: int or ctypes
    pointer) and returns its id (first, second). `reserve` > 0 then reserves that many bytes
    (collective). `growth_bytes`: an allocation that finds no room grows the pool by at least
    this much, collectively (0: only reserve grows it). `timeout`: seconds the ranks wait for
    each other at a growth, reserve or trim. One pool per communicator."""
    lib = _common.lib()
    index = _common.device_index(device)
    pool = _library.PoolId(0, 0)
    lib.call("tidepool_symmetric_pool_create", index, _communicator(comm), int(growth_bytes),
             float(timeout), ctypes.byref(pool))
    result = pool.as_tuple()
    if reserve:
        lib.call("tidepool_symmetric_pool_reserve", index, pool, int(reserve))
    return result


def reserve(pool, nbytes, device=None):
    """Collective: adds one registered segment of `nbytes` to the pool."""
    _common.lib().call("tidepool_symmetric_pool_reserve", _common.device_index(device),
                       _common.pool_id(pool), int(nbytes))


def trim(pool, device=None):
    """Collective: gives back every segment of the pool with no live buffer."""
    _common.lib().call("tidepool_symmetric_pool_trim", _common.device_index(device),
                       _common.pool_id(pool))


def destroy(pool, device=None):
    """Collective: gives back every segment and ends the pool (refused while a buffer is live or
    a begin still holds it)."""
    _common.lib().call("tidepool_symmetric_pool_destroy", _common.device_index(device),
                       _common.pool_id(pool))


def lookup(tensor_or_ptr):
    """(window, offset) of a buffer of a symmetric pool: the ncclWindow_t (as an int) of its
    segment and the offset of the pointer in it, the same on every rank."""
    window = ctypes.c_void_p()
    offset = ctypes.c_size_t()
    _common.lib().call("tidepool_symmetric_lookup", _common.address(tensor_or_ptr, "pointer"),
                       ctypes.byref(window), ctypes.byref(offset))
    return (window.value or 0, offset.value)


def nccl_mem_pool(comm, reserve, device=None, growth_bytes=0, timeout=30.0):
    """Mode B: a torch.cuda.MemPool whose segments come from the symmetric pool of `comm`, made
    here with `reserve` bytes reserved (collective) and bound to the device. PyTorch's own
    allocator must be current: call this without tidepool.torch.install()."""
    if _install.installed():
        raise _errors.FailedPreconditionError(
            "tidepool.torch.nccl_mem_pool is mode B: it gives segments to PyTorch's own caching "
            "allocator, but tidepool.torch.install() (mode A) made tidepool PyTorch's allocator "
            "in this process, and torch.cuda.MemPool cannot be made with a pluggable allocator "
            "current. In mode A use tidepool.torch.symmetric_pool(comm) with "
            "torch.cuda.memory._cuda_beginAllocateCurrentThreadToPool (docs/pytorch.md)")
    torch = _common.import_torch("tidepool.torch.nccl_mem_pool")
    lib = _common.lib()
    lib.require_torch()
    index = _common.device_index(device)
    pool = symmetric_pool(comm, index, reserve=reserve, growth_bytes=growth_bytes,
                          timeout=timeout)
    lib.call("tidepool_torch_bind_segment_pool", index, _common.pool_id(pool))
    plugin = torch.cuda.memory.CUDAPluggableAllocator(
        lib.path, "tidepool_torch_symmetric_segment_malloc",
        "tidepool_torch_symmetric_segment_free")
    return torch.cuda.MemPool(allocator=plugin._allocator)
