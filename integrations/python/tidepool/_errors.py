"""tidepool's Python exceptions: one base class, and one class per tidepool_status.

Every failing call of libtidepool.so.1 returns a tidepool_status and leaves a message in
tidepool_last_error(); the Python binding raises the class of that status with the message.
Each class also derives from the built-in exception a Python caller would catch for that kind of
failure (MemoryError for out of memory, LookupError for an unknown device or pool, ValueError for
bad input, RuntimeError for everything else), so code written against the built-ins keeps working.
"""


class TidepoolError(Exception):
    """Base class of every exception tidepool raises.

    Attributes: status (the tidepool_status code, or None when the error did not come from a C
    call), status_name ("TIDEPOOL_OUT_OF_MEMORY", ...) and message (tidepool_last_error()'s text,
    or the binding's own words).
    """

    def __init__(self, message, status=None, status_name=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.status_name = status_name


class OutOfMemoryError(TidepoolError, MemoryError):
    """TIDEPOOL_OUT_OF_MEMORY: the device has no memory left for the request."""


class NotFoundError(TidepoolError, LookupError):
    """TIDEPOOL_NOT_FOUND: a device or a pool tidepool does not know."""


class InvalidArgumentError(TidepoolError, ValueError):
    """TIDEPOOL_INVALID_ARGUMENT: bad input (a foreign pointer, a size of 0, ...)."""


class TidepoolRuntimeError(TidepoolError, RuntimeError):
    """Every other status; also the binding's own refusals."""


class FailedPreconditionError(TidepoolRuntimeError):
    """TIDEPOOL_FAILED_PRECONDITION: a call out of order (double free, end without begin, ...)."""


class UnavailableError(TidepoolRuntimeError):
    """TIDEPOOL_UNAVAILABLE: no usable CUDA driver or GPU, or an NCCL that cannot be opened."""


class InternalError(TidepoolRuntimeError):
    """TIDEPOOL_INTERNAL: a fault inside tidepool or the driver."""


class DeadlineExceededError(TidepoolRuntimeError):
    """TIDEPOOL_DEADLINE_EXCEEDED: a rank of a symmetric pool did not come within the timeout."""


class UnsupportedError(TidepoolRuntimeError):
    """A PyTorch feature that tidepool, as PyTorch's allocator, does not support (the message
    says which, and what to do instead)."""


class LibraryNotFoundError(TidepoolError, OSError):
    """libtidepool.so.1 could not be found or loaded (the message lists every place tried)."""


# tidepool_status values (integrations/c_api/tidepool.h) and their classes.
OK = 0
INVALID_ARGUMENT = 1
OUT_OF_MEMORY = 2
NOT_FOUND = 3
FAILED_PRECONDITION = 4
UNAVAILABLE = 5
INTERNAL = 6
DEADLINE_EXCEEDED = 7

_BY_STATUS = {
    INVALID_ARGUMENT: InvalidArgumentError,
    OUT_OF_MEMORY: OutOfMemoryError,
    NOT_FOUND: NotFoundError,
    FAILED_PRECONDITION: FailedPreconditionError,
    UNAVAILABLE: UnavailableError,
    INTERNAL: InternalError,
    DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_for_status(status, message, status_name=None):
    """The exception to raise for a failed call: its class follows the status code (an unknown
    code gives TidepoolRuntimeError)."""
    cls = _BY_STATUS.get(status, TidepoolRuntimeError)
    return cls(message, status=status, status_name=status_name)
