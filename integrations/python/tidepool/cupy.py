"""tidepool as CuPy's device-memory allocator (docs/integrations.md).

    import cupy, tidepool.cupy
    tidepool.cupy.install()        # every later cupy array's memory comes from tidepool
    ...
    tidepool.cupy.uninstall()      # back to the allocator CuPy had before

How it works. install() calls cupy.cuda.set_allocator with a TidepoolCupyAllocator, a callable
that CuPy calls with a size for every device allocation. It reads CuPy's current device
(cupy.cuda.device.get_device_id()) and current stream (cupy.cuda.get_current_stream().ptr) and
serves the request from a cupy.cuda.memory.CFunctionAllocator made once per (device, stream):
its C functions are tidepool_cupy_malloc / tidepool_cupy_free (integrations/cupy/tidepool_cupy.h,
exported by libtidepool.so.1) and its `param` is the stream. So allocations follow CuPy's current
stream even when the program changes it, and CuPy frees each block through C, with no Python on
the free path.

The stream contract (tidepool.h; allocator/caching_allocator.h):
  * a block belongs to the stream that was CuPy's current stream when it was allocated (NULL,
    CuPy's default, is the legacy default stream; cupy.cuda.Stream.ptds is the per-thread
    default stream);
  * when the array is freed, the block is reusable at once by later work on that stream, with no
    synchronization: work already queued on that stream finishes first, in stream order;
  * an array also used on another stream must be declared with record_stream(array, stream)
    before it is freed, or that stream synchronized (stream.synchronize(), or an event the
    allocation stream waits on) before the array is dropped. Otherwise tidepool may hand the
    block to new work on the allocation stream while the other stream still reads it.
  * a stream must outlive the blocks allocated on it while they are in use; tidepool resolves the
    handle to the stream's id at each allocation, so a handle reused by a new stream is that new
    stream.

Out of memory. CuPy does not check what a CFunctionAllocator's malloc returns: a NULL becomes an
array at address 0. TidepoolCupyAllocator checks every allocation. On TIDEPOOL_OUT_OF_MEMORY
(tidepool already returned its own cache and retried) it runs gc.collect(), as CuPy's own pool
does, to free arrays that only a reference cycle keeps, and tries once more; if that fails too it
raises cupy.cuda.memory.OutOfMemoryError(size, bytes tidepool has allocated on the device), with
tidepool's message as the exception's __cause__ (a tidepool.OutOfMemoryError). Any other failure
(an unknown stream, a device tidepool does not have) raises the tidepool error of its status.

Pinned (page-locked host) memory is left alone: cupy.cuda.set_pinned_memory_allocator is not
touched, and CuPy's pinned memory pool keeps serving cupyx.empty_pinned and the like. IPC: CuPy's
cupy.cuda.runtime.ipcGetMemHandle on a tidepool block is not supported (expandable segments, the
default, are not cudaMalloc memory; docs/integrations.md).

The C entry points are in libtidepool.so.1 when it is built with //integrations/cupy:
cupy_entry_points. A library without them still works: install() then hands CuPy ctypes
trampolines that call tidepool_malloc / tidepool_free from Python (correct, slower: a Python call
per allocation and per free), and warns. install(native=True) refuses such a library instead.
"""

import ctypes
import gc
import json
import sys
import threading
import warnings

from tidepool import _errors
from tidepool import _library

MALLOC = "tidepool_cupy_malloc"
FREE = "tidepool_cupy_free"
LAST_STATUS = "tidepool_cupy_last_status"

# CuPy's C signatures (cupy/cuda/memory.pyx: malloc_func_type, free_func_type).
MallocFunc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
FreeFunc = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)

# The most (device, stream) pairs whose CFunctionAllocator is kept; past it the cache starts over
# (a program that makes and destroys streams forever would otherwise grow it forever).
MAX_CACHED_ALLOCATORS = 1024


def _lib():
    return _library.load()


def _import_cupy(what):
    try:
        import cupy  # noqa: PLC0415 (imported late on purpose)
    except ImportError as error:
        raise _errors.TidepoolRuntimeError(
            "%s needs CuPy, which cannot be imported here: %s" % (what, error)) from error
    return cupy


class CFunctions:
    """The malloc / free pair handed to CuPy: their addresses, whether they are the library's own
    C functions (`native`), and the status of the calling thread's latest call (`last_status`).
    Made once per process and kept for its life: CuPy's CFunctionAllocatorMemory keeps only the
    free function's address, and calls it whenever an array dies, installed or not."""

    def __init__(self, malloc_address, free_address, native, last_status, keepalive=()):
        self.malloc_address = malloc_address
        self.free_address = free_address
        self.native = native
        self.last_status = last_status
        self._keepalive = keepalive


def _native_functions(lib):
    if not all(hasattr(lib.cdll, name) for name in (MALLOC, FREE, LAST_STATUS)):
        return None
    for name, restype, argtypes in (
            (MALLOC, ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
            (FREE, None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
            (LAST_STATUS, ctypes.c_int, [])):
        fn = getattr(lib.cdll, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return CFunctions(lib.address(MALLOC), lib.address(FREE), True,
                      getattr(lib.cdll, LAST_STATUS))


def _python_functions(lib):
    state = threading.local()
    tidepool_malloc = lib.cdll.tidepool_malloc
    tidepool_free = lib.cdll.tidepool_free

    def malloc(param, size, device_id):
        ptr = ctypes.c_void_p()
        status = tidepool_malloc(ctypes.byref(ptr), size, device_id, param)
        state.status = status
        return ptr.value if status == _errors.OK else None

    def free(param, ptr, device_id):
        status = tidepool_free(ptr)
        state.status = status
        if status != _errors.OK:
            sys.stderr.write("tidepool: tidepool.cupy free(%#x) failed, and the block stays where "
                             "it was: %s\n" % (ptr or 0, lib.last_error()))

    c_malloc, c_free = MallocFunc(malloc), FreeFunc(free)
    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    return CFunctions(address(c_malloc), address(c_free), False,
                      lambda: getattr(state, "status", _errors.OK),
                      keepalive=(malloc, free, c_malloc, c_free))


_functions_lock = threading.Lock()
_functions = {}  # native (bool) -> CFunctions, for the life of the process


def functions(native=None):
    """The CFunctions install() hands CuPy. native None: the library's C functions if it exports
    them, else Python trampolines; True: the C functions or an error; False: the trampolines."""
    lib = _lib()
    with _functions_lock:
        if native is not False:
            if True not in _functions:
                found = _native_functions(lib)
                if found is not None:
                    _functions[True] = found
            if True in _functions:
                return _functions[True]
            if native:
                raise _errors.LibraryNotFoundError(
                    "%s has no CuPy entry points (%s, %s, %s): it was built without "
                    "//integrations/cupy:cupy_entry_points; rebuild it, or call install() "
                    "without native=True to use Python trampolines" % (lib.path, MALLOC, FREE,
                                                                        LAST_STATUS))
        if False not in _functions:
            _functions[False] = _python_functions(lib)
        return _functions[False]


def native_available():
    """Whether the loaded libtidepool.so.1 exports tidepool_cupy_malloc / _free."""
    lib = _lib()
    return all(hasattr(lib.cdll, name) for name in (MALLOC, FREE, LAST_STATUS))


class TidepoolCupyAllocator:
    """The callable install() gives cupy.cuda.set_allocator: size -> cupy MemoryPointer, from
    tidepool, on CuPy's current device and stream (the module docstring has the contract)."""

    def __init__(self, cupy, c_functions):
        self._cupy = cupy
        self._memory = cupy.cuda.memory
        self.functions = c_functions
        self._lock = threading.Lock()
        self._allocators = {}  # (device, stream) -> cupy.cuda.memory.CFunctionAllocator

    def allocator_for(self, device, stream):
        """The CFunctionAllocator of a (device, stream handle) pair, made on first use."""
        key = (device, stream)
        allocator = self._allocators.get(key)
        if allocator is None:
            with self._lock:
                allocator = self._allocators.get(key)
                if allocator is None:
                    if len(self._allocators) >= MAX_CACHED_ALLOCATORS:
                        self._allocators.clear()
                    allocator = self._memory.CFunctionAllocator(
                        stream, self.functions.malloc_address, self.functions.free_address,
                        self.functions)
                    self._allocators[key] = allocator
        return allocator

    def __call__(self, size):
        cuda = self._cupy.cuda
        device = cuda.device.get_device_id()
        stream = cuda.get_current_stream().ptr or 0
        allocator = self.allocator_for(device, stream)
        memptr = allocator.malloc(size)
        if memptr.ptr != 0 or size == 0:
            return memptr
        status, message = self._failure()
        if status == _errors.OUT_OF_MEMORY:
            del memptr
            gc.collect()  # arrays that only a reference cycle keeps give their blocks back
            memptr = allocator.malloc(size)
            if memptr.ptr != 0:
                return memptr
            status, message = self._failure()
        lib = _lib()
        error = _errors.error_for_status(status, message, lib.status_name(status))
        if status == _errors.OUT_OF_MEMORY:
            raise self._memory.OutOfMemoryError(size, _allocated_bytes(device)) from error
        raise error

    def _failure(self):
        lib = _lib()
        status = self.functions.last_status()
        if status == _errors.OK:  # CuPy must have passed something odd; say what we know
            return _errors.INTERNAL, "tidepool.cupy: the allocator returned NULL without an error"
        return status, lib.last_error() or lib.status_name(status)

    def cached_streams(self):
        """The (device, stream) pairs this allocator has served."""
        with self._lock:
            return sorted(self._allocators)


_install_lock = threading.Lock()
_installed = None  # the TidepoolCupyAllocator handed to CuPy
_previous = None  # what cupy.cuda.get_allocator() gave before


def install(native=None):
    """Makes tidepool CuPy's device-memory allocator (cupy.cuda.set_allocator) and returns the
    TidepoolCupyAllocator. Idempotent. Arrays made before keep their memory from CuPy's previous
    allocator and give it back there; cupy.get_default_memory_pool().free_all_blocks() returns
    CuPy's cache to the device so that tidepool can use it. Pinned host memory is not touched.
    native: see functions(); with None a library lacking the C entry points gets Python
    trampolines and a warning. Raises CuPy's ValueError inside cupy.cuda.using_allocator."""
    global _installed, _previous
    cupy = _import_cupy("tidepool.cupy.install")
    with _install_lock:
        if _installed is not None and cupy.cuda.get_allocator() is _installed:
            return _installed
        c_functions = functions(native)
        if not c_functions.native and native is None:
            warnings.warn(
                "tidepool.cupy: %s has no %s / %s (built without //integrations/cupy:"
                "cupy_entry_points); CuPy gets Python trampolines instead, which work but cost a "
                "Python call per allocation and free" % (_lib().path, MALLOC, FREE),
                RuntimeWarning, stacklevel=2)
        allocator = TidepoolCupyAllocator(cupy, c_functions)
        previous = cupy.cuda.get_allocator()
        cupy.cuda.set_allocator(allocator)
        _installed, _previous = allocator, previous
        return allocator


def installed():
    """Whether tidepool is CuPy's current allocator (set by install() and still in place)."""
    if _installed is None:
        return False
    cupy = sys.modules.get("cupy")
    return cupy is not None and cupy.cuda.get_allocator() is _installed


def uninstall():
    """Gives CuPy back the allocator it had before install(), if tidepool's is still current
    (another allocator set since is left in place). Arrays tidepool allocated stay valid and go
    back to tidepool when freed; tidepool keeps its cache (free_all_blocks() returns it). Returns
    whether anything was changed."""
    global _installed, _previous
    cupy = _import_cupy("tidepool.cupy.uninstall")
    with _install_lock:
        if _installed is None:
            return False
        changed = False
        if cupy.cuda.get_allocator() is _installed:
            cupy.cuda.set_allocator(_previous)
            changed = True
        _installed, _previous = None, None
        return changed


def record_stream(array, stream):
    """Declares that the tidepool block under `array` (a cupy.ndarray, a MemoryPointer, or an int
    address of a block's start) is also used on `stream` (a cupy Stream or a handle): tidepool
    then reuses it only once that stream has reached the free (tidepool_record_stream)."""
    ptr = _block_address(array)
    handle = getattr(stream, "ptr", stream)
    _lib().call("tidepool_record_stream", ctypes.c_void_p(ptr), ctypes.c_void_p(handle or None))


def _block_address(value):
    data = getattr(value, "data", None)  # cupy.ndarray -> MemoryPointer
    if data is not None and hasattr(data, "mem"):
        value = data
    mem = getattr(value, "mem", None)  # MemoryPointer -> its allocation (the block's start)
    if mem is not None and hasattr(mem, "ptr"):
        return int(mem.ptr)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _errors.InvalidArgumentError(
        "%r: expected a cupy.ndarray, a cupy MemoryPointer or an int address" % (value,))


def _device(device):
    if device is not None:
        return int(getattr(device, "id", device))
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return int(cupy.cuda.device.get_device_id())
    return 0


def memory_stats(device=None):
    """tidepool's statistics for a device (default: CuPy's current device), as docs/stats.md
    defines them: {"allocated_bytes": {"current", "peak", "added", "removed"}, ...,
    "device_allocations", "ooms", ...}. Every pool of the device's caching allocator is counted
    (symmetric NCCL pools are not)."""
    return json.loads(_lib().json_call("tidepool_stats_json", _device(device)))


def _allocated_bytes(device):
    try:
        return int(memory_stats(device)["allocated_bytes"]["current"])
    except _errors.TidepoolError:
        return -1  # CuPy's OutOfMemoryError prints nothing for -1


def used_bytes(device=None):
    """Bytes in live tidepool blocks on the device (cupy MemoryPool.used_bytes)."""
    return int(memory_stats(device)["allocated_bytes"]["current"])


def total_bytes(device=None):
    """Device memory tidepool holds (cupy MemoryPool.total_bytes)."""
    return int(memory_stats(device)["reserved_bytes"]["current"])


def free_bytes(device=None):
    """Held but not in live blocks (cupy MemoryPool.free_bytes)."""
    stats = memory_stats(device)
    return int(stats["reserved_bytes"]["current"]) - int(stats["allocated_bytes"]["current"])


def free_all_blocks(device=None):
    """Returns the device's whole free segments to the driver (tidepool_empty_cache), as cupy
    MemoryPool.free_all_blocks does for CuPy's pool."""
    _lib().call("tidepool_empty_cache", _device(device))


__all__ = [
    "CFunctions", "TidepoolCupyAllocator", "free_all_blocks", "free_bytes", "functions",
    "install", "installed", "memory_stats", "native_available", "record_stream", "total_bytes",
    "uninstall", "used_bytes",
]
