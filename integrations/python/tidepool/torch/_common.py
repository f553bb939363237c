"""Small helpers shared by tidepool.torch's modules: reaching PyTorch (imported only when
needed, so the statistics, snapshot and symmetric-pool calls work in a process without it),
device indices, pool ids and pointers as PyTorch spells them."""

import ctypes
import sys

from tidepool import _errors
from tidepool import _library


def lib():
    return _library.load()


def import_torch(what):
    """PyTorch, or a TidepoolError saying that `what` needs it."""
    try:
        import torch  # noqa: PLC0415 (imported late on purpose)
    except ImportError as error:
        raise _errors.TidepoolRuntimeError(
            "%s needs PyTorch, which cannot be imported here: %s" % (what, error)) from error
    return torch


def device_index(device):
    """A device ordinal from None (PyTorch's current device, else 0), an int, a torch.device or
    a string such as "cuda:1"."""
    if device is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
        return 0
    if isinstance(device, bool):
        raise _errors.InvalidArgumentError("device %r: expected an int, a torch.device or a "
                                           "string like 'cuda:0'" % (device,))
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind != "cuda":
            raise _errors.InvalidArgumentError("device %r is not a CUDA device" % device)
        return int(index) if index else device_index(None)
    index = getattr(device, "index", None)
    if getattr(device, "type", "cuda") != "cuda":
        raise _errors.InvalidArgumentError("device %r is not a CUDA device" % (device,))
    return device_index(None) if index is None else int(index)


def pool_id(pool):
    """A pool id as a tidepool_pool_id, from a (first, second) pair (PyTorch's MempoolId_t)."""
    try:
        first, second = pool
        return _library.PoolId(int(first), int(second))
    except (TypeError, ValueError) as error:
        raise _errors.InvalidArgumentError(
            "pool %r: expected a pool id (first, second), as tidepool.torch.symmetric_pool "
            "returns" % (pool,)) from error


def address(value, what):
    """An address as an int from None (NULL), an int, a ctypes pointer or c_void_p, or anything
    with data_ptr() (a torch.Tensor)."""
    if value is None:
        return 0
    if hasattr(value, "data_ptr"):
        return int(value.data_ptr())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, ctypes.c_void_p):
        return value.value or 0
    if isinstance(value, ctypes._Pointer):
        return ctypes.cast(value, ctypes.c_void_p).value or 0
    raise _errors.InvalidArgumentError(
        "%s %r: expected an int address, a ctypes pointer or a tensor" % (what, value))
