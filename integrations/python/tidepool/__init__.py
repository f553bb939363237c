"""tidepool from Python: the stream-ordered caching allocator for CUDA device memory.

This package is pure Python over libtidepool.so.1 (ctypes); tidepool._library says where the
library is found (TIDEPOOL_LIBRARY first). Integrations live in submodules: tidepool.torch makes
tidepool PyTorch's CUDA allocator (docs/pytorch.md). Importing this package loads nothing: the
library is opened by the first call that needs it.

Every failure raises a subclass of tidepool.TidepoolError carrying tidepool_last_error()'s text;
the subclasses also derive from MemoryError, LookupError, ValueError or RuntimeError.
"""

from tidepool._errors import (DeadlineExceededError, FailedPreconditionError, InternalError,
                              InvalidArgumentError, LibraryNotFoundError, NotFoundError,
                              OutOfMemoryError, TidepoolError, TidepoolRuntimeError,
                              UnavailableError, UnsupportedError)


def library():
    """The loaded libtidepool.so.1 (a tidepool._library.Library), loading it if needed."""
    from tidepool import _library
    return _library.load()


def library_path():
    """The path (or soname) the library was loaded from."""
    return library().path


__all__ = [
    "DeadlineExceededError", "FailedPreconditionError", "InternalError", "InvalidArgumentError",
    "LibraryNotFoundError", "NotFoundError", "OutOfMemoryError", "TidepoolError",
    "TidepoolRuntimeError", "UnavailableError", "UnsupportedError", "library", "library_path",
]
