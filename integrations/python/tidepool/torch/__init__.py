"""tidepool as PyTorch's CUDA allocator, and its extras (docs/pytorch.md).

Mode A, tidepool allocates every CUDA tensor:

    import torch, tidepool.torch
    tidepool.torch.install()          # first thing, before CUDA is used

Mode B, PyTorch keeps its allocator and one torch.cuda.MemPool takes its segments from a
symmetric NCCL pool:

    pool = tidepool.torch.nccl_mem_pool(comm, reserve=1 << 30)
    with torch.cuda.use_mem_pool(pool): ...

Extras: symmetric_pool / reserve / trim / destroy / lookup (symmetric NCCL pools, routed with
torch.cuda.memory._cuda_beginAllocateCurrentThreadToPool in mode A); memory_stats and
memory_snapshot (torch.cuda.memory_stats() / torch.cuda.memory._snapshot() raise with a pluggable
allocator current; these give tidepool's numbers in PyTorch's format); set_capture_behaviour.
PyTorch is imported only by the calls that need it (install, nccl_mem_pool).
"""

from tidepool.torch._install import install, installed, pool_info, set_capture_behaviour
from tidepool.torch._snapshot import memory_snapshot
from tidepool.torch._stats import (max_memory_allocated, max_memory_reserved, memory_allocated,
                                   memory_reserved, memory_stats)
from tidepool.torch._symmetric import (destroy, lookup, nccl_mem_pool, reserve, symmetric_pool,
                                       trim)

__all__ = [
    "destroy", "install", "installed", "lookup", "max_memory_allocated", "max_memory_reserved",
    "memory_allocated", "memory_reserved", "memory_snapshot", "memory_stats", "nccl_mem_pool",
    "pool_info", "reserve", "set_capture_behaviour", "symmetric_pool", "trim",
]
