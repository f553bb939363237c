"""Mode A: tidepool as PyTorch's CUDA allocator, through torch.cuda.memory.
CUDAPluggableAllocator with every optional hook set (integrations/torch/tidepool_torch.h).

install() refuses, in words, the two situations in which it cannot work:
  * PyTorch's allocator already initialized (torch.cuda has been used): PyTorch cannot swap it
    any more, and tensors already made would be freed into the wrong allocator;
  * a libstdc++ ABI mismatch: the pool hooks take std::pair and std::function by value, whose
    layout depends on _GLIBCXX_USE_CXX11_ABI, so hooks built with the other ABI would corrupt
    memory on the first torch.cuda.graph capture.
It also makes the CUDA-graph-trees checkpoint calls (torch.compile mode="reduce-overhead"),
which no pluggable allocator supports, fail with tidepool's explanation instead of PyTorch's.
"""

import threading
import warnings

from tidepool import _errors
from tidepool.torch import _common

# CUDAPluggableAllocator._allocator's setters (PyTorch 2.11) and the hooks they get.
HOOK_SETTERS = (
    ("set_init_fn", "tidepool_torch_init"),
    ("set_reset_fn", "tidepool_torch_empty_cache"),
    ("set_memory_fraction_fn", "tidepool_torch_set_memory_fraction"),
    ("set_base_alloc_fn", "tidepool_torch_base_alloc"),
    ("set_record_stream_fn", "tidepool_torch_record_stream"),
    ("set_begin_allocate_to_pool", "tidepool_torch_begin_allocate_to_pool"),
    ("set_end_allocate_to_pool_fn", "tidepool_torch_end_allocate_to_pool"),
    ("set_release_pool", "tidepool_torch_release_pool"),
)

# torch._C functions of the native allocator's checkpoint API, which torch/_inductor/
# cudagraph_trees.py calls as torch._C.<name>(...) when it records a graph tree.
CHECKPOINT_FUNCTIONS = (
    "_cuda_getCheckpointState",
    "_cuda_setCheckpointPoolState",
    "_cuda_checkPoolLiveAllocations",
)

_lock = threading.Lock()
_allocator = None


def installed():
    """Whether install() made tidepool PyTorch's allocator in this process."""
    return _allocator is not None


def _check_abi(torch, lib):
    ours = bool(lib.cdll.tidepool_torch_cxx11_abi())
    theirs = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if ours != theirs:
        raise _errors.FailedPreconditionError(
            "tidepool.torch.install: %s was built with _GLIBCXX_USE_CXX11_ABI=%d but this PyTorch "
            "with _GLIBCXX_USE_CXX11_ABI=%d. The pool hooks (torch.cuda.graph, "
            "_cuda_beginAllocateCurrentThreadToPool) take std::pair and std::function, whose "
            "layout depends on that ABI, so they would corrupt memory. Rebuild libtidepool.so.1 "
            "with --copt=-D_GLIBCXX_USE_CXX11_ABI=%d" % (lib.path, ours, theirs, theirs))


_TOO_LATE = (
    "tidepool.torch.install: PyTorch's CUDA allocator is already initialized (torch.cuda was "
    "used before install(): a tensor was put on the GPU, or torch.cuda.current_device(), "
    "init() or the like ran), and PyTorch cannot swap an initialized allocator. Call "
    "tidepool.torch.install() first thing, right after `import torch`, before anything touches "
    "CUDA")


def _check_not_initialized(torch):
    if torch.cuda.is_initialized():
        raise _errors.FailedPreconditionError(_TOO_LATE)


def _unsupported_checkpoint(name):
    def refuse(*args, **kwargs):
        raise _errors.UnsupportedError(
            "torch._C.%s: CUDA graph trees (torch.compile(mode=\"reduce-overhead\"), "
            "\"max-autotune\" with CUDA graphs) checkpoint the native caching allocator's state, "
            "and PyTorch gives a pluggable allocator such as tidepool no such API. With tidepool "
            "installed, compile without CUDA graphs (mode=\"default\" or "
            "\"max-autotune-no-cudagraphs\"), or capture with torch.cuda.graph / "
            "torch.cuda.make_graphed_callables, which tidepool supports (docs/pytorch.md)" % name)
    refuse.__name__ = name
    refuse.__tidepool_refusal__ = True
    return refuse


def _guard_compile(torch):
    for name in CHECKPOINT_FUNCTIONS:
        if hasattr(torch._C, name):
            setattr(torch._C, name, _unsupported_checkpoint(name))


def install():
    """Makes tidepool PyTorch's CUDA allocator (mode A) and returns the CUDAPluggableAllocator.
    Call it right after `import torch`, before CUDA is used. A second call does nothing and
    returns the same allocator."""
    global _allocator
    with _lock:
        if _allocator is not None:
            return _allocator
        torch = _common.import_torch("tidepool.torch.install")
        lib = _common.lib()
        lib.require_torch()
        _check_abi(torch, lib)
        _check_not_initialized(torch)
        allocator = torch.cuda.memory.CUDAPluggableAllocator(lib.path, "tidepool_torch_malloc",
                                                             "tidepool_torch_free")
        for setter, symbol in HOOK_SETTERS:
            getattr(allocator._allocator, setter)(lib.address(symbol))
        try:
            torch.cuda.memory.change_current_allocator(allocator)
        except RuntimeError as error:
            if "already initialized" in str(error):
                raise _errors.FailedPreconditionError(_TOO_LATE + " (PyTorch said: %s)" %
                                                      error) from error
            raise
        _guard_compile(torch)
        _allocator = allocator
        if not lib.cdll.tidepool_torch_out_of_memory_error():
            warnings.warn("tidepool: PyTorch's c10 library was not found in the process, so an "
                          "allocation that does not fit raises RuntimeError, not "
                          "torch.OutOfMemoryError", RuntimeWarning, stacklevel=2)
        return allocator


def set_capture_behaviour(balanced):
    """True (the default): a scope that ends a CUDA graph capture's routing and begins it again
    (sglang's context) keeps the pool's references balanced. False: PyTorch's bookkeeping
    exactly, which leaks a reference to the graph's pool each time."""
    lib = _common.lib()
    lib.require_torch()
    lib.call("tidepool_torch_set_capture_behaviour", 1 if balanced else 0)


def pool_info(pool, device=None):
    """(references, routes) of a pool: how many references hold it and how many routing entries
    send allocations to it (for checking that scopes balance)."""
    import ctypes  # noqa: PLC0415
    lib = _common.lib()
    lib.require_torch()
    references = ctypes.c_int64()
    routes = ctypes.c_int64()
    lib.call("tidepool_torch_pool_info", _common.device_index(device), _common.pool_id(pool),
             ctypes.byref(references), ctypes.byref(routes))
    return (references.value, routes.value)
