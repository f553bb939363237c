"""tidepool.torch.memory_stats: tidepool's statistics under torch.cuda.memory_stats()'s keys.

The mapping is checked field by field on made-up statistics whose every number differs, then
end to end on a simulated device with known allocations and exact expected numbers (requests
rounded to 512 bytes; expandable segments, the default, map 2 MiB granules; docs/stats.md)."""

import unittest

import tidepool.torch
from tidepool.torch import _stats

import testing

MIB = testing.MIB

# Every PyTorch key tidepool.torch gives, and the tidepool field it comes from.
STAT_SOURCES = {
    "allocated_bytes": "allocated_bytes",
    "requested_bytes": "requested_bytes",
    "reserved_bytes": "reserved_bytes",
    "active_bytes": "allocated_bytes",
    "allocation": "active_blocks",
    "active": "active_blocks",
    "segment": "segments",
}
COUNTER_SOURCES = {
    "num_alloc_retries": "retries",
    "num_ooms": "ooms",
    "num_device_alloc": "device_allocations",
    "num_device_free": "device_frees",
}
FIELDS = {"current": "current", "peak": "peak", "allocated": "added", "freed": "removed"}


def made_up_raw():
    raw, n = {}, 1
    for field in ("requested_bytes", "allocated_bytes", "active_blocks", "reserved_bytes",
                  "segments"):
        raw[field] = {}
        for part in ("current", "peak", "added", "removed"):
            raw[field][part] = n * 1000 + 7
            n += 1
    for field in ("device_allocations", "device_frees", "retries", "ooms"):
        raw[field] = n * 1000 + 7
        n += 1
    return raw


class MappingTest(unittest.TestCase):

    def test_every_key_comes_from_its_field(self):
        raw = made_up_raw()
        stats = _stats.to_torch_keys(raw)
        expected = {}
        for torch_name, source in STAT_SOURCES.items():
            for torch_field, field in FIELDS.items():
                expected["%s.all.%s" % (torch_name, torch_field)] = raw[source][field]
        for torch_name, source in COUNTER_SOURCES.items():
            expected[torch_name] = raw[source]
        self.assertEqual(stats, expected)
        self.assertEqual(list(stats), sorted(stats))  # sorted, as PyTorch's

    def test_no_key_is_claimed_that_tidepool_cannot_fill(self):
        stats = _stats.to_torch_keys(made_up_raw())
        for key in stats:
            self.assertNotIn("large_pool", key)
            self.assertNotIn("small_pool", key)
            self.assertNotIn("inactive_split", key)


class SimulatedDeviceTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        testing.start_simulated(devices=2)

    def test_known_allocations_on_a_fresh_device(self):
        device = 1
        before = tidepool.torch.memory_stats(device)
        self.assertTrue(all(v == 0 for v in before.values()), before)

        small = testing.malloc(1000, device)          # 1024 B in a small segment: 1 granule
        large = testing.malloc(3 * MIB, device)       # 3 MiB in a large segment: 2 granules,
                                                      # one physical allocation (run)
        stats = tidepool.torch.memory_stats(device)
        self.assertEqual(stats["allocated_bytes.all.current"], 1024 + 3 * MIB)
        self.assertEqual(stats["allocated_bytes.all.peak"], 1024 + 3 * MIB)
        self.assertEqual(stats["allocated_bytes.all.allocated"], 1024 + 3 * MIB)
        self.assertEqual(stats["allocated_bytes.all.freed"], 0)
        self.assertEqual(stats["requested_bytes.all.current"], 1000 + 3 * MIB)
        self.assertEqual(stats["active_bytes.all.current"], 1024 + 3 * MIB)
        self.assertEqual(stats["allocation.all.current"], 2)
        self.assertEqual(stats["active.all.current"], 2)
        self.assertEqual(stats["reserved_bytes.all.current"], 6 * MIB)
        self.assertEqual(stats["segment.all.current"], 2)
        self.assertEqual(stats["num_device_alloc"], 2)
        self.assertEqual(stats["num_device_free"], 0)
        self.assertEqual(stats["num_ooms"], 0)

        testing.free(small)
        stats = tidepool.torch.memory_stats(device)
        self.assertEqual(stats["allocated_bytes.all.current"], 3 * MIB)
        self.assertEqual(stats["allocated_bytes.all.peak"], 1024 + 3 * MIB)
        self.assertEqual(stats["allocated_bytes.all.freed"], 1024)
        self.assertEqual(stats["requested_bytes.all.current"], 3 * MIB)
        self.assertEqual(stats["requested_bytes.all.freed"], 1000)
        self.assertEqual(stats["allocation.all.current"], 1)
        self.assertEqual(stats["allocation.all.allocated"], 2)
        self.assertEqual(stats["allocation.all.freed"], 1)
        self.assertEqual(stats["reserved_bytes.all.current"], 6 * MIB)  # cached, not returned

        self.assertEqual(tidepool.torch.memory_allocated(device), 3 * MIB)
        self.assertEqual(tidepool.torch.max_memory_allocated(device), 1024 + 3 * MIB)
        self.assertEqual(tidepool.torch.memory_reserved(device), 6 * MIB)
        self.assertEqual(tidepool.torch.max_memory_reserved(device), 6 * MIB)

        with self.assertRaises(MemoryError):
            testing.malloc(2 << 30, device)
        self.assertEqual(tidepool.torch.memory_stats(device)["num_ooms"], 1)
        testing.free(large)
        tidepool.library().call("tidepool_empty_cache", device)
        stats = tidepool.torch.memory_stats(device)
        self.assertEqual(stats["allocated_bytes.all.current"], 0)
        self.assertEqual(stats["reserved_bytes.all.current"], 0)
        self.assertEqual(stats["num_device_free"], stats["num_device_alloc"])

    def test_devices_are_named_as_pytorch_names_them(self):
        ptr = testing.malloc(4096, 0)
        try:
            expected = tidepool.torch.memory_allocated(0)
            self.assertGreaterEqual(expected, 4096)
            self.assertEqual(tidepool.torch.memory_allocated(), expected)  # None: device 0
            self.assertEqual(tidepool.torch.memory_allocated("cuda:0"), expected)

            class Device:  # a torch.device
                type, index = "cuda", 0
            self.assertEqual(tidepool.torch.memory_allocated(Device()), expected)
            with self.assertRaises(ValueError):
                tidepool.torch.memory_allocated("cpu")
            with self.assertRaises(LookupError):
                tidepool.torch.memory_stats(5)
        finally:
            testing.free(ptr)


if __name__ == "__main__":
    unittest.main()
