"""Fake `cupy` and `numba` modules for the CPU tests of tidepool.cupy and tidepool.numba (no CuPy,
Numba or GPU where CI runs). Each keeps the parts of the real library's contract that tidepool
relies on, as the real one has them, and records what it is asked:

FakeCupy (cupy/cuda/memory.pyx): CFunctionAllocator(param, malloc_func, free_func, owner) whose
malloc(size) calls the C function at malloc_func(param, size, device) through ctypes and, like
CuPy, does NOT check the result (NULL gives a MemoryPointer at 0); its memory calls
free_func(param, ptr, device) when it dies (CPython's reference counting: at once), never for a
NULL; CuPy never calls malloc for size 0. set_allocator / get_allocator (None restores the plain
allocator), OutOfMemoryError(size, total, limit), the current stream (`.ptr`, changed with
use_stream) and device (device.get_device_id()), cuda.alloc(size). `made` records every
CFunctionAllocator as (param, malloc_func, free_func, owner).

FakeNumba (numba/cuda/cudadrv/driver.py): HostOnlyCUDAMemoryManager(context=...) with its
allocations / deallocations, reset() and defer_cleanup(); MemoryPointer(context, pointer, size,
owner=None, finalizer=None) whose finalizer runs once when it is collected (weakref.finalize, as
Numba); MemoryInfo; set_memory_manager, which makes the plugin with context=None and checks its
interface_version as Numba does; default_stream(); the ctypes driver's cuMemGetInfo.
"""

import collections
import contextlib
import ctypes
import sys
import types
import weakref

from testing import InstalledModules

_MallocFunc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_FreeFunc = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


class FakeCupy(InstalledModules):

    def __init__(self):
        self.made = []  # (param, malloc_func, free_func, owner) of each CFunctionAllocator
        self.mallocs = []  # (param, size, device, ptr) of each C malloc call
        self.frees = []  # (param, ptr, device) of each C free call
        self.stream_ptr = 0
        self.device_id = 0
        fake = self

        class OutOfMemoryError(MemoryError):
            def __init__(self, size, total, limit=0):
                self._size, self._total, self._limit = size, total, limit
                super().__init__("Out of memory allocating {:,} bytes (allocated so far: {:,} "
                                 "bytes).".format(size, total))

        class BaseMemory:
            pass

        class CFunctionAllocatorMemory(BaseMemory):
            def __init__(self, size, param, malloc_func, free_func, device_id):
                self._param, self._free_func = param, free_func
                self.device_id, self.size, self.ptr = device_id, size, 0
                if size > 0:
                    self.ptr = _MallocFunc(malloc_func)(param, size, device_id) or 0
                    fake.mallocs.append((param, size, device_id, self.ptr))

            def __del__(self):
                if self.ptr:
                    fake.frees.append((self._param, self.ptr, self.device_id))
                    _FreeFunc(self._free_func)(self._param, self.ptr, self.device_id)

        class MemoryPointer:
            def __init__(self, mem, offset):
                assert mem.ptr != 0 or offset == 0
                self.mem, self.ptr, self.device_id = mem, mem.ptr + offset, mem.device_id

        class CFunctionAllocator:
            def __init__(self, param, malloc_func, free_func, owner):
                for value in (param, malloc_func, free_func):
                    if not isinstance(value, int):  # CuPy's intptr_t arguments
                        raise TypeError("CFunctionAllocator takes int addresses, got %r" % value)
                self._param, self._malloc_func, self._free_func = param, malloc_func, free_func
                self._owner = owner
                fake.made.append((param, malloc_func, free_func, owner))

            def malloc(self, size):
                mem = CFunctionAllocatorMemory(size, self._param, self._malloc_func,
                                               self._free_func, fake.device_id)
                return MemoryPointer(mem, 0)

        def plain_malloc(size):  # CuPy's _malloc: what set_allocator(None) restores
            raise AssertionError("the fake's plain allocator was called")

        self.plain_malloc = plain_malloc

        class Pool:  # stands for cupy.get_default_memory_pool()
            def malloc(self, size):
                raise AssertionError("the fake's default pool was called")

        self.default_pool = Pool()
        self.current_allocator = self.default_pool.malloc

        def set_allocator(allocator=None):
            fake.current_allocator = plain_malloc if allocator is None else allocator

        def get_allocator():
            return fake.current_allocator

        class Stream:
            def __init__(self, ptr):
                self.ptr = ptr

        cupy = types.ModuleType("cupy")
        cuda = types.ModuleType("cupy.cuda")
        memory = types.ModuleType("cupy.cuda.memory")
        device = types.ModuleType("cupy.cuda.device")
        memory.OutOfMemoryError = OutOfMemoryError
        memory.BaseMemory = BaseMemory
        memory.CFunctionAllocatorMemory = CFunctionAllocatorMemory
        memory.CFunctionAllocator = CFunctionAllocator
        memory.MemoryPointer = MemoryPointer
        memory.set_allocator = set_allocator
        memory.get_allocator = get_allocator
        device.get_device_id = lambda: fake.device_id
        cuda.memory = memory
        cuda.device = device
        cuda.set_allocator = set_allocator
        cuda.get_allocator = get_allocator
        cuda.alloc = lambda size: get_allocator()(size)
        cuda.get_current_stream = lambda: Stream(fake.stream_ptr)
        cuda.Stream = Stream
        cupy.cuda = cuda
        cupy.get_default_memory_pool = lambda: fake.default_pool
        self.module = cupy
        self.modules = {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.memory": memory,
                        "cupy.cuda.device": device}

    @contextlib.contextmanager
    def use_stream(self, ptr):
        saved, self.stream_ptr = self.stream_ptr, ptr
        try:
            yield
        finally:
            self.stream_ptr = saved


class FakeNumba(InstalledModules):

    def __init__(self, device_free=700 << 20, device_total=1 << 30, stream_handle=None):
        self.device_free, self.device_total = device_free, device_total
        self.stream_handle = stream_handle  # None: the legacy default stream, as Numba's
        self.managers = []  # every memory manager made
        self.memory_manager = None  # what set_memory_manager took
        self.finalized = []  # pointers whose finalizer ran
        fake = self

        MemoryInfo = collections.namedtuple("MemoryInfo", "free,total")

        class HostOnlyCUDAMemoryManager:
            def __init__(self, *args, **kwargs):
                if "context" not in kwargs:
                    raise RuntimeError("Memory manager requires a context")
                self.context = kwargs.pop("context")
                self.allocations = {}
                self.deallocations = []
                self.host_resets = 0
                self.deferring = 0
                fake.managers.append(self)

            def reset(self):
                self.allocations.clear()
                self.deallocations.clear()
                self.host_resets += 1

            @contextlib.contextmanager
            def defer_cleanup(self):
                self.deferring += 1
                try:
                    yield
                finally:
                    self.deferring -= 1

        class MemoryPointer:
            def __init__(self, context, pointer, size, owner=None, finalizer=None):
                self.context, self.device_pointer, self.size = context, pointer, size
                self.handle = pointer
                self._owner = owner
                if finalizer is not None:
                    ptr = pointer.value

                    def run():
                        fake.finalized.append(ptr)
                        finalizer()
                    self._finalizer = weakref.finalize(self, run)

            @property
            def owner(self):
                return self if self._owner is None else self._owner

            @property
            def device_pointer_value(self):
                return self.handle.value or None

        class DeviceNDArray:  # just what tidepool.numba.record_stream reads
            def __init__(self, gpu_data):
                self.gpu_data = gpu_data

        def set_memory_manager(plugin):
            dummy = plugin(context=None)
            if dummy.interface_version != 1:
                raise RuntimeError("EMM Plugin interface has version %d - version 1 required"
                                   % dummy.interface_version)
            fake.memory_manager = plugin

        class Stream:
            def __init__(self, handle):
                self.handle = handle

        class Driver:
            def cuMemGetInfo(self, free, total):  # the ctypes binding: byref outputs
                ctypes.cast(free, ctypes.POINTER(ctypes.c_size_t))[0] = fake.device_free
                ctypes.cast(total, ctypes.POINTER(ctypes.c_size_t))[0] = fake.device_total

        numba = types.ModuleType("numba")
        cuda = types.ModuleType("numba.cuda")
        cudadrv = types.ModuleType("numba.cuda.cudadrv")
        driver = types.ModuleType("numba.cuda.cudadrv.driver")
        driver.USE_NV_BINDING = False
        driver.driver = Driver()
        driver.HostOnlyCUDAMemoryManager = HostOnlyCUDAMemoryManager
        driver.MemoryPointer = MemoryPointer
        driver.MemoryInfo = MemoryInfo
        driver.set_memory_manager = set_memory_manager
        cudadrv.driver = driver
        cuda.cudadrv = cudadrv
        cuda.HostOnlyCUDAMemoryManager = HostOnlyCUDAMemoryManager
        cuda.MemoryPointer = MemoryPointer
        cuda.MemoryInfo = MemoryInfo
        cuda.set_memory_manager = set_memory_manager
        cuda.default_stream = lambda: Stream(ctypes.c_void_p(fake.stream_handle))
        cuda.DeviceNDArray = DeviceNDArray
        cuda.Stream = Stream
        numba.cuda = cuda
        self.module = numba
        self.modules = {"numba": numba, "numba.cuda": cuda, "numba.cuda.cudadrv": cudadrv,
                        "numba.cuda.cudadrv.driver": driver}


class FakeContext:
    """A Numba context as a memory manager sees it: `device.id`."""

    def __init__(self, device_id):
        self.device = types.SimpleNamespace(id=device_id)
