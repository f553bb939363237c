"""Shared by the Python tests: the library under test (TIDEPOOL_LIBRARY, set by the BUILD file
to the one Bazel built), the simulated runtime, and a fake `torch` module that records what
tidepool.torch asks of PyTorch (no PyTorch is installed where CI runs)."""

import ctypes
import os
import sys
import types

import tidepool

MIB = 1 << 20
DEVICE_BYTES = 1 << 30


def start_simulated(devices=2):
    """The process's runtime from simulated devices (once per process: each py_test is one)."""
    lib = tidepool.library()
    lib.call("tidepool_init_simulated", devices, DEVICE_BYTES)
    return lib


def malloc(size, device=0):
    ptr = ctypes.c_void_p()
    tidepool.library().call("tidepool_malloc", ctypes.byref(ptr), size, device, None)
    return ptr.value


def free(ptr):
    tidepool.library().call("tidepool_free", ctypes.c_void_p(ptr))


class InstalledModules:
    """Puts `self.modules` (name -> module) in sys.modules for the life of a `with`, and restores
    what was there: the base of the fake frameworks (FakeTorch here, FakeCupy and FakeNumba in
    fake_cupy_numba.py)."""

    modules = {}

    def __enter__(self):
        self.saved = {name: sys.modules.get(name) for name in self.modules}
        sys.modules.update(self.modules)
        return self

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class FakeTorch(InstalledModules):
    """Builds a fake `torch` package (torch, torch.cuda, torch.cuda.memory, torch._C) and puts it
    in sys.modules. Attributes record every call: `allocators` (each CUDAPluggableAllocator made,
    with its path, names, resolved addresses and setter calls), `current` (what
    change_current_allocator got), `mem_pools`."""

    def __init__(self, initialized=False, cxx11_abi=True, swap_error=None):
        self.initialized = initialized
        self.swap_error = swap_error
        self.allocators = []
        self.current = []
        self.mem_pools = []
        fake = self

        class AllocatorHandle:  # CUDAPluggableAllocator._allocator
            def __init__(self):
                self.setters = {}

            def __getattr__(self, name):
                if not name.startswith("set_"):
                    raise AttributeError(name)

                def setter(address):
                    if not isinstance(address, int):
                        raise TypeError("%s takes an int address" % name)
                    self.setters[name] = address
                return setter

        class CUDAPluggableAllocator:
            def __init__(self, path, alloc_fn_name, free_fn_name):
                library = ctypes.CDLL(path)  # as PyTorch does
                self.path = path
                self.names = (alloc_fn_name, free_fn_name)
                self.addresses = tuple(ctypes.cast(getattr(library, n), ctypes.c_void_p).value
                                       for n in self.names)
                self._allocator = AllocatorHandle()
                fake.allocators.append(self)

        def change_current_allocator(allocator):
            if fake.swap_error is not None:
                raise RuntimeError(fake.swap_error)
            fake.current.append(allocator)

        class MemPool:
            def __init__(self, allocator=None):
                self.allocator = allocator
                fake.mem_pools.append(self)

        def get_checkpoint_state(device, pool):
            return ("native checkpoint", device, pool)

        torch = types.ModuleType("torch")
        cuda = types.ModuleType("torch.cuda")
        memory = types.ModuleType("torch.cuda.memory")
        c = types.ModuleType("torch._C")
        memory.CUDAPluggableAllocator = CUDAPluggableAllocator
        memory.change_current_allocator = change_current_allocator
        cuda.memory = memory
        cuda.MemPool = MemPool
        cuda.is_initialized = lambda: fake.initialized
        cuda.current_device = lambda: 0
        c._GLIBCXX_USE_CXX11_ABI = cxx11_abi
        c._cuda_getCheckpointState = get_checkpoint_state
        c._cuda_setCheckpointPoolState = get_checkpoint_state
        torch.cuda = cuda
        torch._C = c
        self.module = torch
        self.modules = {"torch": torch, "torch.cuda": cuda, "torch.cuda.memory": memory,
                        "torch._C": c}



def library_path():
    return os.path.abspath(os.environ["TIDEPOOL_LIBRARY"])
