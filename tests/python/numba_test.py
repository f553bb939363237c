"""tidepool.numba, the Numba EMM plugin, against a fake `numba` (fake_cupy_numba.py) on two
simulated devices of the real library: the module attribute NUMBA_CUDA_MEMORY_MANAGER reads,
install(), memalloc and its finalizer (tidepool's allocated bytes back to 0), the stream it
allocates on, out of memory and the gc retry, get_memory_info from tidepool's stats and the
device's, reset() emptying tidepool's cache (live arrays kept), initialize, IPC refused."""

import ctypes
import gc
import unittest

import fake_cupy_numba
import testing

FAKE = fake_cupy_numba.FakeNumba()
FAKE.__enter__()  # for the whole process: tidepool.numba subclasses numba's class at import

import tidepool  # noqa: E402
import tidepool.numba  # noqa: E402

MIB = testing.MIB


def allocated(device):
    return tidepool.numba.memory_stats(device)["allocated_bytes"]["current"]


def reserved(device):
    return tidepool.numba.memory_stats(device)["reserved_bytes"]["current"]


def device_of(ptr):
    device = ctypes.c_int(-1)
    pool = tidepool._library.PoolId()
    tidepool.library().call("tidepool_pool_of", ctypes.c_void_p(ptr), ctypes.byref(device),
                            ctypes.byref(pool))
    return device.value


class NumbaPluginTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        testing.start_simulated(devices=2)

    def setUp(self):
        FAKE.stream_handle = None
        FAKE.finalized.clear()
        self.manager = self.make(1)
        self.baseline = allocated(1)

    def tearDown(self):
        gc.collect()
        self.assertEqual(allocated(1), self.baseline, "a block was not freed")

    def make(self, device):
        manager = tidepool.numba.TidepoolMemoryManager(context=fake_cupy_numba.FakeContext(device))
        manager.initialize()
        return manager

    def test_the_module_names_the_plugin_and_install_sets_it(self):
        self.assertIs(tidepool.numba._numba_memory_manager, tidepool.numba.TidepoolMemoryManager)
        self.assertTrue(issubclass(tidepool.numba.TidepoolMemoryManager,
                                   FAKE.module.cuda.HostOnlyCUDAMemoryManager))
        self.assertEqual(self.manager.interface_version, 1)
        made = len(FAKE.managers)
        tidepool.numba.install()
        self.assertIs(FAKE.memory_manager, tidepool.numba.TidepoolMemoryManager)
        self.assertIsNone(FAKE.managers[made].context)  # Numba's probe with context=None

    def test_memalloc_gives_a_block_and_its_finalizer_frees_it(self):
        pointer = self.manager.memalloc(5 * MIB + 3)
        self.assertIsInstance(pointer.device_pointer, ctypes.c_uint64)
        address = pointer.device_pointer.value
        self.assertNotEqual(address, 0)
        self.assertEqual(address % 512, 0)
        self.assertEqual(pointer.size, 5 * MIB + 3)
        self.assertIs(pointer.context, self.manager.context)
        self.assertEqual(device_of(address), 1)
        self.assertGreaterEqual(allocated(1), self.baseline + 5 * MIB)
        del pointer
        self.assertEqual(FAKE.finalized, [address])
        self.assertEqual(allocated(1), self.baseline)

    def test_each_device_its_own_manager(self):
        manager0 = self.make(0)
        before = allocated(0)
        pointer = manager0.memalloc(MIB)
        self.assertEqual(device_of(pointer.device_pointer.value), 0)
        self.assertEqual(allocated(1), self.baseline)
        del pointer
        self.assertEqual(allocated(0), before)

    def test_size_zero_allocates_nothing(self):
        pointer = self.manager.memalloc(0)
        self.assertEqual(pointer.device_pointer.value, 0)
        self.assertFalse(hasattr(pointer, "_finalizer"))

    def test_it_allocates_on_numbas_default_stream(self):
        self.assertEqual(self.manager.stream_handle(), 0)  # the legacy default stream
        FAKE.stream_handle = tidepool.numba.PER_THREAD_DEFAULT_STREAM
        per_thread = self.make(1)
        self.assertEqual(per_thread.stream_handle(), 2)
        # The simulated device knows only the NULL stream from C: tidepool refusing the handle
        # shows that it reached tidepool_malloc as the stream.
        with self.assertRaises(tidepool.InvalidArgumentError):
            per_thread.memalloc(MIB)

    def test_out_of_memory_raises_memory_error(self):
        with self.assertRaises(MemoryError) as raised:
            self.manager.memalloc(2 * testing.DEVICE_BYTES)
        self.assertIsInstance(raised.exception, tidepool.OutOfMemoryError)
        self.assertIn("tidepool_malloc", raised.exception.message)

    def test_gc_collect_frees_arrays_held_by_a_cycle_then_retries(self):
        gc.disable()
        self.addCleanup(gc.enable)
        ooms = tidepool.numba.memory_stats(1)["ooms"]
        cycle = [self.manager.memalloc(700 * MIB)]
        cycle.append(cycle)
        del cycle
        pointer = self.manager.memalloc(700 * MIB)
        self.assertEqual(tidepool.numba.memory_stats(1)["ooms"], ooms + 1)
        self.assertEqual(len(FAKE.finalized), 1)
        del pointer

    def test_get_memory_info_adds_tidepools_cache_to_the_devices_free(self):
        pointer = self.manager.memalloc(10 * MIB)
        live = self.manager.memalloc(MIB)
        del pointer
        cached = reserved(1) - allocated(1)
        self.assertGreaterEqual(cached, 10 * MIB)
        info = self.manager.get_memory_info()
        self.assertEqual(info.total, FAKE.device_total)
        self.assertEqual(info.free, FAKE.device_free + cached)
        self.assertEqual(info, FAKE.module.cuda.MemoryInfo(free=info.free, total=info.total))
        del live

    def test_reset_empties_tidepools_cache_and_keeps_live_arrays(self):
        live = self.manager.memalloc(3 * MIB)
        dropped = self.manager.memalloc(8 * MIB)
        del dropped
        before = reserved(1)
        self.assertGreaterEqual(before - allocated(1), 8 * MIB)
        self.manager.reset()
        self.assertEqual(self.manager.host_resets, 1)  # Numba's host-memory reset ran
        # The freed 8 MiB went back; what stays is the rest of the live block's last 2 MiB
        # granule (expandable segments map 2 MiB at a time).
        self.assertLessEqual(reserved(1), before - 8 * MIB)
        self.assertLess(reserved(1) - allocated(1), 2 * MIB)
        self.assertEqual(device_of(live.device_pointer.value), 1)  # still a live block
        del live
        self.assertEqual(allocated(1), self.baseline)

    def test_defer_cleanup_defers_host_memory_only(self):
        with self.manager.defer_cleanup():
            self.assertEqual(self.manager.deferring, 1)
            pointer = self.manager.memalloc(MIB)
            del pointer
            self.assertEqual(allocated(1), self.baseline)
        self.assertEqual(self.manager.deferring, 0)

    def test_initialize_refuses_a_device_tidepool_lacks(self):
        manager = tidepool.numba.TidepoolMemoryManager(context=fake_cupy_numba.FakeContext(5))
        with self.assertRaises(tidepool.NotFoundError):
            manager.initialize()

    def test_ipc_handles_are_refused(self):
        pointer = self.manager.memalloc(MIB)
        with self.assertRaises(tidepool.UnsupportedError):
            self.manager.get_ipc_handle(pointer)
        del pointer

    def test_record_stream(self):
        pointer = self.manager.memalloc(MIB)
        array = FAKE.module.cuda.DeviceNDArray(pointer)
        tidepool.numba.record_stream(array, FAKE.module.cuda.Stream(ctypes.c_void_p(None)))
        with self.assertRaises(tidepool.InvalidArgumentError):
            tidepool.numba.record_stream(array, FAKE.module.cuda.Stream(ctypes.c_void_p(0x5000)))
        with self.assertRaises(tidepool.InvalidArgumentError):
            tidepool.numba.record_stream(object(), 0)
        del array, pointer

    def test_a_failing_finalizer_says_so_and_raises_nothing(self):
        finalizer = tidepool.numba._make_finalizer(0x1000)
        finalizer()  # a pointer tidepool never gave: a message on stderr, nothing raised


if __name__ == "__main__":
    unittest.main()
