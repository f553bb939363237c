"""tidepool's snapshot in the format of torch.cuda.memory._snapshot(), so that PyTorch's
torch.cuda._memory_viz (segment_plot, trace_plot, segsum, the flame graphs) renders it.

tidepool_snapshot_json (allocator/observation.cc) lists, per device, every segment (pool label,
address, size, stream id, expandable, small) with its blocks (address, size, requested, state).
PyTorch's format differs in four ways, each handled here:
  * An expandable segment is one reserved range of which only parts are mapped. PyTorch reports
    each mapped run as a segment of its own and leaves unmapped memory out; so do we (tidepool's
    "unmapped" blocks are dropped and the segment is split around them), so that the segments'
    total_size adds up to reserved memory and every segment's blocks tile it exactly, which the
    viewer relies on (it derives each block's address from the sizes before it).
  * Block states: allocated -> "active_allocated"; awaiting_events (freed, waiting for other
    streams) -> "active_pending_free"; free and free_parked -> "inactive".
  * The pool: tidepool's label ("default", "pool {a,b}") -> segment_pool_id (a, b).
  * No stack traces and no event history: tidepool records neither, so every "frames" is [] and
    "device_traces" holds one empty list per device (the viewers then show the state at the
    snapshot; tidepool's own trace, TIDEPOOL_TRACE, is a CSV for `tidepool replay`).
"stream" is tidepool's stream id (CUDA's unique stream id on a GPU), not the cudaStream_t handle.
Symmetric NCCL pools are not part of the device snapshot (docs/nccl.md rule 19).
"""

import json
import re

from tidepool.torch import _common

_STATES = {
    "allocated": "active_allocated",
    "awaiting_events": "active_pending_free",
    "free": "inactive",
    "free_parked": "inactive",
}
_POOL_LABEL = re.compile(r"^pool \{(\d+),(\d+)\}$")


def pool_of_label(label):
    """tidepool's arena label -> PyTorch's segment_pool_id."""
    if label == "default":
        return (0, 0)
    match = _POOL_LABEL.match(label)
    if match is None:
        raise ValueError("tidepool snapshot: unknown pool label %r" % label)
    return (int(match.group(1)), int(match.group(2)))


def _torch_block(block):
    state = _STATES.get(block["state"])
    if state is None:
        raise ValueError("tidepool snapshot: unknown block state %r" % block["state"])
    return {
        "address": int(block["address"]),
        "size": int(block["size"]),
        # PyTorch keeps the request of live and pending blocks; a free block has none.
        "requested_size": int(block["requested"]) if state != "inactive" else 0,
        "state": state,
        "frames": [],
    }


def _torch_segment(device, segment, blocks):
    allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    active = sum(b["size"] for b in blocks if b["state"] != "inactive")
    requested = sum(b["requested_size"] for b in blocks if b["state"] != "inactive")
    return {
        "device": device,
        "address": blocks[0]["address"],
        "total_size": sum(b["size"] for b in blocks),
        "allocated_size": allocated,
        "active_size": active,
        "requested_size": requested,
        "stream": int(segment["stream"]),
        "segment_type": "small" if segment["small"] else "large",
        "segment_pool_id": pool_of_label(segment["pool"]),
        "is_expandable": bool(segment["expandable"]),
        "frames": [],
        "blocks": blocks,
    }


def convert_device(raw):
    """One device's tidepool snapshot (parsed JSON) -> PyTorch's segment dicts."""
    device = int(raw["device"])
    segments = []
    for segment in raw["segments"]:
        run = []  # the blocks of one mapped run
        for block in segment["blocks"]:
            if block["state"] == "unmapped":
                if run:
                    segments.append(_torch_segment(device, segment, run))
                run = []
                continue
            run.append(_torch_block(block))
        if run:
            segments.append(_torch_segment(device, segment, run))
    return segments


def raw_snapshot(device=None, pool=None):
    """tidepool's own snapshot (parsed JSON) of one device, or of one pool of it."""
    return json.loads(_common.lib().json_call("tidepool_snapshot_json",
                                              _common.device_index(device), pool))


def _device_count():
    import ctypes  # noqa: PLC0415
    count = ctypes.c_int(0)
    _common.lib().call("tidepool_device_count", ctypes.byref(count))
    return count.value


def memory_snapshot(device=None):
    """torch.cuda.memory._snapshot() from tidepool: {"segments": [...], "device_traces": [...]}
    for every device (device=None) or one. Pass it to torch.cuda._memory_viz.segment_plot or
    trace_plot, or pickle it for https://pytorch.org/memory_viz."""
    count = _device_count()
    devices = range(count) if device is None else [_common.device_index(device)]
    segments = []
    for index in devices:
        segments.extend(convert_device(raw_snapshot(index)))
    return {"segments": segments, "device_traces": [[] for _ in range(count)]}
