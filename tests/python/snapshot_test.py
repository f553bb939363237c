"""tidepool.torch.memory_snapshot: tidepool's snapshot in torch.cuda.memory._snapshot()'s format.

Checked against what PyTorch's viewers read (torch/utils/viz/MemoryViz.js behind segment_plot
and trace_plot, and torch/cuda/_memory_viz.py's segsum and flame graphs): every segment has
device, address, total_size, stream, blocks (and the other documented fields); its blocks tile
it exactly from its address (the viewer derives each block's address that way, and segsum
asserts the sum); states are PyTorch's; device_traces has a list for every device; and the
pickle uses only the opcodes MemoryViz.js's own unpickler reads. Then exact sizes and states for
known blocks on a simulated device, and the conversion of states and unmapped ranges that C
cannot produce on a simulated device (blocks awaiting events, unmapped holes)."""

import pickle
import pickletools
import unittest

import tidepool
import tidepool.torch
from tidepool.torch import _snapshot

import testing

MIB = testing.MIB

SEGMENT_KEYS = {"device", "address", "total_size", "allocated_size", "active_size",
                "requested_size", "stream", "segment_type", "segment_pool_id", "is_expandable",
                "frames", "blocks"}
BLOCK_KEYS = {"address", "size", "requested_size", "state", "frames"}
STATES = {"active_allocated", "active_pending_free", "inactive"}
# The opcodes MemoryViz.js's unpickler handles (protocol 2 to 4).
VIEWER_OPCODES = {"PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE",
                  "DICT", "LIST", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS",
                  "APPEND", "APPENDS", "SHORT_BINUNICODE", "BINUNICODE", "BININT", "BININT1",
                  "BININT2", "LONG1", "NEWTRUE", "NEWFALSE", "NONE", "BINFLOAT", "MEMOIZE",
                  "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"}


def check_viewable(test, snapshot):
    """Everything PyTorch's viewers need of a snapshot."""
    test.assertEqual(set(snapshot), {"segments", "device_traces"})
    devices = len(snapshot["device_traces"])
    for segment in snapshot["segments"]:
        test.assertEqual(set(segment), SEGMENT_KEYS)
        test.assertLess(segment["device"], devices)
        test.assertIn(segment["segment_type"], ("small", "large"))
        test.assertIsInstance(segment["segment_pool_id"], tuple)
        test.assertEqual(segment["frames"], [])
        address = segment["address"]
        allocated = active = requested = 0
        for block in segment["blocks"]:
            test.assertEqual(set(block), BLOCK_KEYS)
            test.assertEqual(block["address"], address)  # tiles the segment, in order
            test.assertIn(block["state"], STATES)
            test.assertGreater(block["size"], 0)
            test.assertLessEqual(block["requested_size"], block["size"])
            test.assertEqual(block["frames"], [])
            if block["state"] == "inactive":
                test.assertEqual(block["requested_size"], 0)
            else:
                active += block["size"]
                requested += block["requested_size"]
            if block["state"] == "active_allocated":
                allocated += block["size"]
            address += block["size"]
        test.assertEqual(address - segment["address"], segment["total_size"])
        test.assertEqual(segment["allocated_size"], allocated)
        test.assertEqual(segment["active_size"], active)
        test.assertEqual(segment["requested_size"], requested)
    for protocol in (2, 3, 4):
        used = {op.name for op, _, _ in pickletools.genops(pickle.dumps(snapshot, protocol))}
        test.assertLessEqual(used, VIEWER_OPCODES, "protocol %d" % protocol)


class SimulatedDeviceTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.lib = testing.start_simulated(devices=2)

    def test_known_blocks(self):
        device = 1
        self.assertEqual(tidepool.torch.memory_snapshot(device)["segments"], [])
        small = testing.malloc(1000, device)
        freed = testing.malloc(5000, device)
        large = testing.malloc(3 * MIB, device)
        testing.free(freed)
        pool = tidepool._library.PoolId()
        self.lib.call("tidepool_new_pool_id", pool)
        self.lib.call("tidepool_begin_allocate_current_thread_to_pool", device, pool)
        pooled = testing.malloc(8192, device)
        self.lib.call("tidepool_end_allocate_to_pool", device, pool)

        snapshot = tidepool.torch.memory_snapshot(device)
        check_viewable(self, snapshot)
        self.assertEqual(snapshot["device_traces"], [[], []])
        by_address = {}
        for segment in snapshot["segments"]:
            self.assertEqual(segment["device"], device)
            for block in segment["blocks"]:
                by_address[block["address"]] = (segment, block)

        segment, block = by_address[small]
        self.assertEqual((block["size"], block["requested_size"], block["state"]),
                         (1024, 1000, "active_allocated"))
        self.assertEqual((segment["segment_type"], segment["segment_pool_id"]),
                         ("small", (0, 0)))
        self.assertTrue(segment["is_expandable"])
        self.assertEqual(segment["total_size"], 2 * MIB)  # one mapped granule, unmapped left out
        self.assertEqual(segment["allocated_size"], 1024)
        self.assertEqual(segment["requested_size"], 1000)
        segment, block = by_address[freed]  # coalesced with the granule's free tail
        self.assertEqual((block["size"], block["requested_size"], block["state"]),
                         (2 * MIB - 1024, 0, "inactive"))
        segment, block = by_address[large]
        self.assertEqual((block["size"], block["requested_size"], block["state"]),
                         (3 * MIB, 3 * MIB, "active_allocated"))
        self.assertEqual((segment["segment_type"], segment["total_size"]), ("large", 4 * MIB))
        segment, block = by_address[pooled]
        self.assertEqual((block["size"], block["state"]), (8192, "active_allocated"))
        self.assertEqual(segment["segment_pool_id"], pool.as_tuple())

        reserved = tidepool.torch.memory_reserved(device)
        self.assertEqual(sum(s["total_size"] for s in snapshot["segments"]), reserved)
        allocated = tidepool.torch.memory_allocated(device)
        self.assertEqual(sum(s["allocated_size"] for s in snapshot["segments"]), allocated)

        everything = tidepool.torch.memory_snapshot()
        check_viewable(self, everything)
        self.assertEqual(len(everything["device_traces"]), 2)
        for ptr in (small, large, pooled):
            testing.free(ptr)
        self.lib.call("tidepool_release_pool", device, pool)


def raw_segment(blocks, pool="default", small=False):
    address = 1 << 40
    out = []
    for state, size, requested in blocks:
        out.append({"address": address, "size": size, "requested": requested, "state": state})
        address += size
    return {"device": 0, "granularity": 2 * MIB, "segments": [
        {"pool": pool, "address": 1 << 40, "size": address - (1 << 40), "stream": 7,
         "expandable": True, "small": small, "blocks": out}]}


class ConversionTest(unittest.TestCase):

    def test_states(self):
        raw = raw_segment([("allocated", 1024, 1000), ("awaiting_events", 2048, 2000),
                           ("free_parked", 512, 0), ("free", 4096, 96)])  # a stale request
        segments = _snapshot.convert_device(raw)
        self.assertEqual(len(segments), 1)
        states = [(b["state"], b["size"], b["requested_size"]) for b in segments[0]["blocks"]]
        self.assertEqual(states, [("active_allocated", 1024, 1000),
                                  ("active_pending_free", 2048, 2000),
                                  ("inactive", 512, 0), ("inactive", 4096, 0)])
        self.assertEqual(segments[0]["allocated_size"], 1024)
        self.assertEqual(segments[0]["active_size"], 1024 + 2048)
        self.assertEqual(segments[0]["requested_size"], 3000)
        self.assertEqual(segments[0]["stream"], 7)
        check_viewable(self, {"segments": segments, "device_traces": [[]]})

    def test_unmapped_ranges_split_the_segment(self):
        raw = raw_segment([("unmapped", 2 * MIB, 0), ("allocated", MIB, MIB), ("free", MIB, 0),
                           ("unmapped", 4 * MIB, 0), ("allocated", 2 * MIB, 2 * MIB),
                           ("unmapped", 8 * MIB, 0)], pool="pool {3,0}")
        segments = _snapshot.convert_device(raw)
        self.assertEqual([(s["address"] - (1 << 40), s["total_size"]) for s in segments],
                         [(2 * MIB, 2 * MIB), (8 * MIB, 2 * MIB)])
        self.assertTrue(all(s["segment_pool_id"] == (3, 0) for s in segments))
        check_viewable(self, {"segments": segments, "device_traces": [[]]})

    def test_wholly_unmapped_segment_is_left_out(self):
        self.assertEqual(_snapshot.convert_device(raw_segment([("unmapped", 2 * MIB, 0)])), [])

    def test_unknown_words_are_refused(self):
        with self.assertRaises(ValueError):
            _snapshot.convert_device(raw_segment([("haunted", 512, 0)]))
        with self.assertRaises(ValueError):
            _snapshot.convert_device(raw_segment([("free", 512, 0)], pool="lake"))

    def test_pool_labels(self):
        self.assertEqual(_snapshot.pool_of_label("default"), (0, 0))
        self.assertEqual(_snapshot.pool_of_label("pool {0,12}"), (0, 12))
        self.assertEqual(_snapshot.pool_of_label("pool {18446744073709551615,0}"),
                         (18446744073709551615, 0))


if __name__ == "__main__":
    unittest.main()
