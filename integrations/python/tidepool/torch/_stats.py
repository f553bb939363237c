"""tidepool's statistics under torch.cuda.memory_stats()'s key names.

With tidepool installed as PyTorch's allocator, torch.cuda.memory_stats() raises (a pluggable
allocator has none), so tools that read it get the same keys from here. The numbers come from
tidepool_stats_json for the whole device (every pool of the caching allocator; symmetric NCCL
pools are not included, docs/nccl.md rule 19). docs/stats.md defines tidepool's fields; each is a
Stat {current, peak, added, removed}, which maps to PyTorch's {current, peak, allocated, freed}.

Only keys that tidepool can fill honestly are given (docs/pytorch.md lists them):
  allocated_bytes, requested_bytes, reserved_bytes, segment, allocation: tidepool's own.
  active_bytes, active: tidepool counts a block as freed at the free, also one whose events on
      other streams are still pending; PyTorch keeps such a block active until they complete.
      They are the allocated figures, which PyTorch's equal whenever no freed block awaits events.
Left out: the large_pool / small_pool split (tidepool keeps one set of stats per pool, not per
size class), inactive_split*, oversize_*, num_sync_all_streams, max_split_size.
"""

import json

from tidepool.torch import _common

_STAT_FIELDS = (("current", "current"), ("peak", "peak"), ("allocated", "added"),
                ("freed", "removed"))

# PyTorch's stat name -> tidepool's field.
_STATS = (
    ("allocated_bytes", "allocated_bytes"),
    ("requested_bytes", "requested_bytes"),
    ("reserved_bytes", "reserved_bytes"),
    ("active_bytes", "allocated_bytes"),
    ("allocation", "active_blocks"),
    ("active", "active_blocks"),
    ("segment", "segments"),
)

_COUNTERS = (
    ("num_alloc_retries", "retries"),
    ("num_ooms", "ooms"),
    ("num_device_alloc", "device_allocations"),
    ("num_device_free", "device_frees"),
)


def raw_stats(device=None, pool=None):
    """tidepool's own statistics (docs/stats.md) as a dict: the device's, or one pool's."""
    return json.loads(_common.lib().json_call("tidepool_stats_json",
                                              _common.device_index(device), pool))


def to_torch_keys(raw):
    """tidepool's statistics, renamed to torch.cuda.memory_stats()'s flat keys, sorted."""
    stats = {}
    for torch_name, tidepool_name in _STATS:
        for torch_field, tidepool_field in _STAT_FIELDS:
            stats["%s.all.%s" % (torch_name, torch_field)] = int(raw[tidepool_name][tidepool_field])
    for torch_name, tidepool_name in _COUNTERS:
        stats[torch_name] = int(raw[tidepool_name])
    return dict(sorted(stats.items()))


def memory_stats(device=None):
    """torch.cuda.memory_stats(device), from tidepool (the module docstring says which keys)."""
    return to_torch_keys(raw_stats(device))


def memory_allocated(device=None):
    """Bytes in live blocks (torch.cuda.memory_allocated)."""
    return raw_stats(device)["allocated_bytes"]["current"]


def max_memory_allocated(device=None):
    """Peak of memory_allocated since the process started (tidepool has no reset)."""
    return raw_stats(device)["allocated_bytes"]["peak"]


def memory_reserved(device=None):
    """Device memory tidepool holds (torch.cuda.memory_reserved)."""
    return raw_stats(device)["reserved_bytes"]["current"]


def max_memory_reserved(device=None):
    """Peak of memory_reserved since the process started (tidepool has no reset)."""
    return raw_stats(device)["reserved_bytes"]["peak"]
