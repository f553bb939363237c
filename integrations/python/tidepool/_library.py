"""libtidepool.so.1 through ctypes: where it is found, the signature of every C function, and
the one way a failed call becomes a Python exception.

Shared by every Python integration (tidepool.torch now; tidepool.cupy, tidepool.numba later),
so that a process loads the library once and has one tidepool runtime (docs/design.md, "One
runtime per process").

Where the library is found, first match wins:
  1. the environment variable TIDEPOOL_LIBRARY, a path (an error if nothing is there);
  2. libtidepool.so.1 inside the package directory, next to it (its parent directory), or in
     ../lib relative to either;
  3. the dynamic loader's own search: ctypes.CDLL("libtidepool.so.1") (LD_LIBRARY_PATH, the
     ld.so cache; `tools/install PREFIX` puts it in PREFIX/lib).

Calling convention (integrations/c_api/tidepool.h): each function returns a tidepool_status and
leaves a message in tidepool_last_error() for the calling thread. `call(name, *args)` runs one
and raises the status's exception class (tidepool._errors) with that message.
"""

import ctypes
import os
import threading

from tidepool import _errors

SONAME = "libtidepool.so.1"
API_VERSION = 1  # TIDEPOOL_API_VERSION of the header this binding follows
ENV_LIBRARY = "TIDEPOOL_LIBRARY"


class PoolId(ctypes.Structure):
    """tidepool_pool_id: a pool's identity, one-to-one with PyTorch's MempoolId_t."""

    _fields_ = [("first", ctypes.c_uint64), ("second", ctypes.c_uint64)]

    def as_tuple(self):
        return (int(self.first), int(self.second))


_status = ctypes.c_int
_int = ctypes.c_int
_size = ctypes.c_size_t
_ptr = ctypes.c_void_p
_PoolIdP = ctypes.POINTER(PoolId)
_AllocSegment = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
_FreeSegment = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                ctypes.c_void_p)

# Every function of tidepool.h: name -> (restype, argtypes).
C_API = {
    "tidepool_api_version": (_int, []),
    "tidepool_last_error": (ctypes.c_char_p, []),
    "tidepool_status_name": (ctypes.c_char_p, [_int]),
    "tidepool_init_simulated": (_status, [_int, _size]),
    "tidepool_device_count": (_status, [ctypes.POINTER(_int)]),
    "tidepool_malloc": (_status, [ctypes.POINTER(_ptr), _size, _int, _ptr]),
    "tidepool_free": (_status, [_ptr]),
    "tidepool_free_async": (_status, [_ptr, _ptr]),
    "tidepool_record_stream": (_status, [_ptr, _ptr]),
    "tidepool_empty_cache": (_status, [_int]),
    "tidepool_new_pool_id": (_status, [_PoolIdP]),
    "tidepool_new_graph_pool_id": (_status, [_PoolIdP]),
    "tidepool_begin_allocate_current_thread_to_pool": (_status, [_int, PoolId]),
    "tidepool_begin_allocate_to_pool": (_status, [_int, PoolId, _int, ctypes.c_uint64]),
    "tidepool_end_allocate_to_pool": (_status, [_int, PoolId]),
    "tidepool_release_pool": (_status, [_int, PoolId]),
    "tidepool_create_callback_pool": (_status, [_int, PoolId, _AllocSegment, _FreeSegment, _ptr]),
    "tidepool_trim_pool": (_status, [_int, PoolId]),
    "tidepool_pool_of": (_status, [_ptr, ctypes.POINTER(_int), _PoolIdP]),
    "tidepool_capture_begin": (_status, [_int, _ptr, _PoolIdP, _int, ctypes.POINTER(_ptr)]),
    "tidepool_capture_end": (_status, [_ptr, ctypes.POINTER(_ptr)]),
    "tidepool_capture_abandon": (_status, [_ptr]),
    "tidepool_capture_pool": (_status, [_ptr, _PoolIdP]),
    "tidepool_graph_launch": (_status, [_ptr, _ptr]),
    "tidepool_graph_pool": (_status, [_ptr, _PoolIdP]),
    "tidepool_graph_destroy": (_status, [_ptr]),
    "tidepool_graph_pool_create": (_status, [_int, _PoolIdP]),
    "tidepool_symmetric_pool_create": (_status, [_int, _ptr, _size, ctypes.c_double, _PoolIdP]),
    "tidepool_symmetric_pool_reserve": (_status, [_int, PoolId, _size]),
    "tidepool_symmetric_pool_trim": (_status, [_int, PoolId]),
    "tidepool_symmetric_pool_destroy": (_status, [_int, PoolId]),
    "tidepool_symmetric_lookup": (_status, [_ptr, ctypes.POINTER(_ptr), ctypes.POINTER(_size)]),
    "tidepool_symmetric_begin": (_status, [_int, PoolId]),
    "tidepool_symmetric_end": (_status, [_int, PoolId]),
    "tidepool_stats_json": (_status, [_int, _PoolIdP, ctypes.c_char_p, _size,
                                      ctypes.POINTER(_size)]),
    "tidepool_snapshot_json": (_status, [_int, _PoolIdP, ctypes.c_char_p, _size,
                                         ctypes.POINTER(_size)]),
}

# The PyTorch entry points (integrations/torch/tidepool_torch.h), plain C, callable from here.
TORCH_C = {
    "tidepool_torch_bind_segment_pool": (_status, [_int, PoolId]),
    "tidepool_torch_cxx11_abi": (_int, []),
    "tidepool_torch_out_of_memory_error": (_int, []),
    "tidepool_torch_set_capture_behaviour": (_status, [_int]),
    "tidepool_torch_pool_info": (_status, [_int, PoolId, ctypes.POINTER(ctypes.c_int64),
                                           ctypes.POINTER(ctypes.c_int64)]),
}

# PyTorch's pluggable-allocator hooks: only their addresses are used, handed to
# CUDAPluggableAllocator. Never call them through ctypes: they throw C++ exceptions (which
# would end the process here) and the pool hooks take std::pair / std::function by value, which
# ctypes cannot build. The signatures are recorded (None: C++ types) for reference only.
TORCH_HOOKS = {
    "tidepool_torch_malloc": (_ptr, [_size, _int, _ptr]),
    "tidepool_torch_free": (None, [_ptr, _size, _int, _ptr]),
    "tidepool_torch_init": (None, [_int]),
    "tidepool_torch_empty_cache": (None, []),
    "tidepool_torch_set_memory_fraction": (None, [ctypes.c_double, _int]),
    "tidepool_torch_base_alloc": (_ptr, [_ptr, ctypes.POINTER(_size)]),
    "tidepool_torch_record_stream": (None, [_ptr, _ptr]),
    "tidepool_torch_begin_allocate_to_pool": (None, None),  # (int, std::pair, std::function)
    "tidepool_torch_end_allocate_to_pool": (None, None),  # (int, std::pair)
    "tidepool_torch_release_pool": (None, None),  # (int, std::pair)
    "tidepool_torch_symmetric_segment_malloc": (_ptr, [_size, _int, _ptr]),
    "tidepool_torch_symmetric_segment_free": (None, [_ptr, _size, _int, _ptr]),
}

TORCH_SYMBOLS = sorted(list(TORCH_C) + list(TORCH_HOOKS))


class Library:
    """The loaded library: `path` (what was passed to the loader), `cdll`, and the calls."""

    def __init__(self, cdll, path):
        self.cdll = cdll
        self.path = path
        missing = [name for name in C_API if not hasattr(cdll, name)]
        if missing:
            raise _errors.LibraryNotFoundError(
                "%s does not export %s: it is not a tidepool library of API version %d"
                % (path, ", ".join(missing), API_VERSION))
        for table in (C_API, TORCH_C, TORCH_HOOKS):
            for name, (restype, argtypes) in table.items():
                if not hasattr(cdll, name):
                    continue  # the PyTorch symbols: checked by require_torch()
                fn = getattr(cdll, name)
                fn.restype = restype
                if argtypes is not None:
                    fn.argtypes = argtypes
        version = cdll.tidepool_api_version()
        if version != API_VERSION:
            raise _errors.LibraryNotFoundError(
                "%s implements tidepool API version %d; this Python package needs %d: install "
                "the library and the package from the same tidepool build" % (path, version,
                                                                              API_VERSION))

    def missing_torch_symbols(self):
        return [name for name in TORCH_SYMBOLS if not hasattr(self.cdll, name)]

    def require_torch(self):
        """Raises unless every tidepool_torch_* entry point is exported."""
        missing = self.missing_torch_symbols()
        if missing:
            raise _errors.LibraryNotFoundError(
                "%s has no PyTorch entry points (missing: %s): it was built without "
                "integrations/torch; rebuild //integrations/c_api:libtidepool.so.1 from a tidepool "
                "that has them" % (self.path, ", ".join(missing)))

    def address(self, name):
        """The address of an exported function, as PyTorch's set_*_fn setters take it."""
        return ctypes.cast(getattr(self.cdll, name), ctypes.c_void_p).value

    def last_error(self):
        message = self.cdll.tidepool_last_error()
        return message.decode("utf-8", "replace") if message is not None else ""

    def status_name(self, status):
        return self.cdll.tidepool_status_name(status).decode("utf-8", "replace")

    def check(self, status):
        """Raises the exception of a failed call's status, with the thread's message."""
        if status != _errors.OK:
            name = self.status_name(status)
            message = self.last_error() or name
            raise _errors.error_for_status(status, message, name)

    def call(self, name, *args):
        """Calls a function that returns a tidepool_status; raises on anything but OK."""
        self.check(getattr(self.cdll, name)(*args))

    def json_call(self, name, device, pool=None):
        """tidepool_stats_json / tidepool_snapshot_json: the text, however long it grows between
        the size query and the copy."""
        fn = getattr(self.cdll, name)
        pool_arg = None if pool is None else ctypes.byref(PoolId(*pool))
        needed = ctypes.c_size_t(0)
        self.check(fn(device, pool_arg, None, 0, ctypes.byref(needed)))
        while True:
            capacity = needed.value + 4096
            buffer = ctypes.create_string_buffer(capacity)
            status = fn(device, pool_arg, buffer, capacity, ctypes.byref(needed))
            if status == _errors.INVALID_ARGUMENT and needed.value > capacity:
                continue  # it grew past the margin: ask again
            self.check(status)
            return buffer.value.decode("utf-8")


def _package_dir():
    return os.path.dirname(os.path.abspath(__file__))


def candidate_paths():
    """The files tried before the loader's search, in order (after TIDEPOOL_LIBRARY)."""
    package = _package_dir()
    parent = os.path.dirname(package)
    places = [package, parent, os.path.join(package, os.pardir, "lib"),
              os.path.join(parent, os.pardir, "lib")]
    return [os.path.normpath(os.path.join(place, SONAME)) for place in places]


def _open(path):
    try:
        return ctypes.CDLL(path)
    except OSError as error:
        raise _errors.LibraryNotFoundError("could not load %s: %s" % (path, error)) from error


def find_and_load():
    """Loads the library by the rules above. Raises LibraryNotFoundError saying what was tried."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        if not os.path.isfile(explicit):
            raise _errors.LibraryNotFoundError(
                "%s=%s: no such file; point it at a built libtidepool.so.1 "
                "(bazel-bin/integrations/c_api/libtidepool.so.1, or PREFIX/lib after "
                "tools/install PREFIX), or unset it to search" % (ENV_LIBRARY, explicit))
        path = os.path.abspath(explicit)
        return Library(_open(path), path)
    for path in candidate_paths():
        if os.path.isfile(path):
            return Library(_open(path), path)
    try:
        return Library(ctypes.CDLL(SONAME), SONAME)
    except OSError as error:
        raise _errors.LibraryNotFoundError(
            "libtidepool.so.1 not found: %s is unset, none of %s exists, and the dynamic loader "
            "said: %s. Build it (bazel build //integrations/c_api:libtidepool.so.1) and set %s to "
            "its path, or install it (tools/install PREFIX) and add PREFIX/lib to LD_LIBRARY_PATH"
            % (ENV_LIBRARY, ", ".join(candidate_paths()), error, ENV_LIBRARY)) from error


_lock = threading.Lock()
_loaded = None


def load():
    """The process's Library, loaded on first use."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = find_and_load()
        return _loaded
