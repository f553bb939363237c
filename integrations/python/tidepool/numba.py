"""tidepool as Numba's CUDA memory manager: an External Memory Management (EMM) plugin
(docs/integrations.md; Numba's "External Memory Management (EMM) Plugin interface").

    NUMBA_CUDA_MEMORY_MANAGER=tidepool.numba python3 prog.py

or, first thing in the program, before CUDA is used:

    import tidepool.numba
    tidepool.numba.install()       # numba.cuda.set_memory_manager(TidepoolMemoryManager)

Then every device array Numba allocates (cuda.device_array, cuda.to_device, the temporaries of
kernel launches on host arrays) comes from tidepool, and goes back to it when the array dies.
Host memory (pinned, mapped) and managed memory stay Numba's own (HostOnlyCUDAMemoryManager).

Which stream. Numba's memalloc takes no stream, so every block is allocated on Numba's default
stream, cuda.default_stream(): the legacy default stream (handle 0) unless Numba runs with
NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM=1, in which case it is the per-thread default stream
(CU_STREAM_PER_THREAD). That is the stream Numba itself uses for every operation given no stream
(device_array, copy_to_host, kernel launches), and the legacy default stream also synchronizes
with every blocking stream (cuda.stream() makes blocking streams). tidepool reuses a freed block
at once for later work on that stream, without synchronizing (the stream-ordering contract of
tidepool.h). So:
  * a program that uses no stream of its own, or synchronizes the streams it uses before
    dropping their arrays, needs nothing more;
  * an array used on another stream (a kernel launched on cuda.stream() that is still running
    when the array is dropped) must be declared with record_stream(array, stream) before it is
    dropped, or that stream synchronized first. A kernel launched on a blocking stream and
    followed by legacy-default-stream work is ordered by CUDA already.

Freeing. memalloc returns a numba.cuda.MemoryPointer whose finalizer calls tidepool_free when
the pointer (and every view of it) is garbage collected. tidepool's frees never synchronize, so
defer_cleanup() (Numba's way of keeping deallocations out of a critical section) has nothing to
defer for device memory; it still defers Numba's host-memory deallocations.

reset() (Numba calls it from cuda.current_context().reset() and cuda.close()) returns tidepool's
free cache on the device to the driver (tidepool_empty_cache), after Numba's host-memory reset.
Unlike Numba's own manager it does not free arrays that are still alive: their blocks stay valid
(tidepool holds its own reference on the primary context) and go back when the arrays die.

get_memory_info() is MemoryInfo(free, total): total is the device's (cuMemGetInfo); free is what
the device has free plus what tidepool holds but has not handed out (reserved - allocated bytes
in tidepool's statistics), i.e. what an allocation could still get without another process
freeing anything; fragmentation inside tidepool's cache can make the largest single allocation
smaller. get_ipc_handle() raises: a tidepool block lives in a segment tidepool may unmap or
reuse, and expandable segments (the default) are not cuMemAlloc memory, which cuIpcGetMemHandle
needs.
"""

import contextlib
import ctypes
import gc
import json
import sys

try:
    from numba import cuda
    from numba.cuda import HostOnlyCUDAMemoryManager, MemoryInfo, MemoryPointer
except ImportError as _error:
    raise ImportError("tidepool.numba is a Numba memory manager and needs Numba with CUDA "
                      "(numba-cuda), which cannot be imported here: %s" % _error) from _error

from tidepool import _errors
from tidepool import _library

# CU_STREAM_PER_THREAD: the handle Numba's per-thread default stream has.
PER_THREAD_DEFAULT_STREAM = 2


def _lib():
    return _library.load()


def _driver_module():
    from numba.cuda.cudadrv import driver  # noqa: PLC0415
    return driver


def _uses_nvidia_binding(driver_module):
    flag = getattr(driver_module, "USE_NV_BINDING", None)
    if flag is not None:
        return bool(flag)
    return hasattr(driver_module, "binding")  # numba-cuda without the ctypes binding


def _device_pointer(value):
    """A device address as Numba's MemoryPointer takes it: a CUdeviceptr with the NVIDIA
    binding, a ctypes integer with Numba's own."""
    driver_module = _driver_module()
    if _uses_nvidia_binding(driver_module):
        return driver_module.binding.CUdeviceptr(value)
    return ctypes.c_uint64(value)


def _handle_value(handle):
    if handle is None:
        return 0
    value = getattr(handle, "value", handle)  # ctypes c_void_p, or CUstream (int() works)
    return int(value) if value is not None else 0


def _device_memory_info():
    """(free, total) of the current context's device, from the driver Numba loaded."""
    driver_module = _driver_module()
    drv = driver_module.driver
    if _uses_nvidia_binding(driver_module):
        free, total = drv.cuMemGetInfo()
        return int(free), int(total)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    drv.cuMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def _make_finalizer(ptr):
    def finalizer():
        lib = _lib()
        status = lib.cdll.tidepool_free(ctypes.c_void_p(ptr))
        if status != _errors.OK:  # a finalizer cannot raise usefully: say it, as Numba would
            sys.stderr.write("tidepool: tidepool.numba free(%#x) failed, and the block stays where "
                             "it was: %s\n" % (ptr, lib.last_error()))
    return finalizer


class TidepoolMemoryManager(HostOnlyCUDAMemoryManager):
    """Numba EMM plugin (interface version 1): device memory from tidepool, host memory Numba's.
    One instance per Numba context (device); the module docstring has the stream contract."""

    def __init__(self, *args, **kwargs):
        # numba.cuda.set_memory_manager makes one with context=None just to read
        # interface_version: nothing here may need a device.
        super().__init__(*args, **kwargs)
        self._stream = None

    @property
    def interface_version(self):
        return 1

    @property
    def device_id(self):
        return int(self.context.device.id)

    def stream_handle(self):
        """The handle of Numba's default stream (0, or CU_STREAM_PER_THREAD with
        NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM=1), on which every block is allocated."""
        if self._stream is None:
            stream = cuda.default_stream()
            self._stream = _handle_value(getattr(stream, "handle", None))
        return self._stream

    def initialize(self):
        """Starts tidepool's runtime (from the CUDA driver, or the simulated devices a test made)
        and checks that it has this context's device."""
        count = ctypes.c_int()
        _lib().call("tidepool_device_count", ctypes.byref(count))
        if not 0 <= self.device_id < count.value:
            raise _errors.NotFoundError(
                "tidepool.numba: Numba's device %d is not one of tidepool's %d devices (both "
                "number the devices CUDA_VISIBLE_DEVICES leaves)" % (self.device_id, count.value))

    def _malloc(self, size):
        lib = _lib()
        ptr = ctypes.c_void_p()
        status = lib.cdll.tidepool_malloc(ctypes.byref(ptr), size, self.device_id,
                                          ctypes.c_void_p(self.stream_handle() or None))
        return status, ptr.value

    def memalloc(self, size):
        """A MemoryPointer to `size` bytes from tidepool, freed by its finalizer. On out of
        memory it runs gc.collect() (device arrays that only a reference cycle keeps) and tries
        once more, then raises tidepool.OutOfMemoryError (a MemoryError)."""
        if size == 0:
            return MemoryPointer(self.context, _device_pointer(0), 0)
        status, ptr = self._malloc(size)
        if status == _errors.OUT_OF_MEMORY:
            gc.collect()
            status, ptr = self._malloc(size)
        _lib().check(status)
        return MemoryPointer(self.context, _device_pointer(ptr), size,
                             finalizer=_make_finalizer(ptr))

    def reset(self):
        """Numba's host-memory reset, then tidepool_empty_cache on this device (live arrays keep
        their blocks)."""
        super().reset()
        _lib().call("tidepool_empty_cache", self.device_id)

    @contextlib.contextmanager
    def defer_cleanup(self):
        """Defers Numba's host deallocations; tidepool's device frees never synchronize, so they
        go on inside it."""
        with super().defer_cleanup():
            yield

    def get_memory_info(self):
        """MemoryInfo(free=device free + tidepool's cached bytes, total=device total)."""
        free, total = _device_memory_info()
        stats = memory_stats(self.device_id)
        cached = int(stats["reserved_bytes"]["current"]) - int(stats["allocated_bytes"]["current"])
        return MemoryInfo(free=free + cached, total=total)

    def get_ipc_handle(self, memory):
        raise _errors.UnsupportedError(
            "tidepool.numba: IPC handles of tidepool blocks are not supported: a block lives in a "
            "segment that tidepool may reuse or give back while another process maps it, and "
            "expandable segments (the default) are not cuMemAlloc memory, which "
            "cuIpcGetMemHandle needs. Share such arrays through a copy into memory of Numba's own "
            "manager, or run the producer without tidepool.numba")


def record_stream(array, stream):
    """Declares that the tidepool block under `array` (a Numba device array, a MemoryPointer, or
    an int address of a block's start) is also used on `stream` (a numba.cuda stream or a handle),
    so that tidepool reuses it only once that stream has reached the free."""
    ptr = _block_address(array)
    handle = _handle_value(getattr(stream, "handle", stream))
    _lib().call("tidepool_record_stream", ctypes.c_void_p(ptr), ctypes.c_void_p(handle or None))


def _block_address(value):
    data = getattr(value, "gpu_data", None)  # DeviceNDArray -> its MemoryPointer
    if data is not None:
        value = data
    owner = getattr(value, "owner", None)  # a view's allocation (a root pointer's is itself)
    if owner is not None and hasattr(owner, "device_pointer_value"):
        value = owner
    pointer = getattr(value, "device_pointer_value", None)
    if pointer is not None:
        return int(pointer)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _errors.InvalidArgumentError(
        "%r: expected a Numba device array, a MemoryPointer or an int address" % (value,))


def memory_stats(device=0):
    """tidepool's statistics for a device, as docs/stats.md defines them."""
    return json.loads(_lib().json_call("tidepool_stats_json", int(device)))


def install():
    """numba.cuda.set_memory_manager(TidepoolMemoryManager). Call it before CUDA is used: a
    context made earlier keeps the manager it was made with."""
    cuda.set_memory_manager(TidepoolMemoryManager)


# NUMBA_CUDA_MEMORY_MANAGER=tidepool.numba: Numba imports this module and takes this class.
_numba_memory_manager = TidepoolMemoryManager

__all__ = ["TidepoolMemoryManager", "install", "memory_stats", "record_stream"]
