"""tidepool.cupy against a fake `cupy` (fake_cupy_numba.py) on two simulated devices of the real
library: install() hands CuPy the right C functions and params, allocations follow CuPy's current
device and stream, frees give the memory back (tidepool's allocated bytes back to 0), a failed
allocation raises CuPy's OutOfMemoryError (CuPy itself would make an array at address 0), the gc
retry, uninstall(), record_stream, the statistics.

Run twice by BUILD.bazel: as cupy_test against //integrations/c_api:libtidepool.so.1 (with or
without the CuPy entry points, whichever it has), and as cupy_native_test against
//tests/cupy:libtidepool_cupy_test.so, which has them (TIDEPOOL_TEST_CUPY_NATIVE=1). Every test
also runs with the Python trampolines (install(native=False))."""

import ctypes
import gc
import os
import unittest
import warnings

import tidepool
import tidepool.cupy
from tidepool import _errors

import fake_cupy_numba
import testing

MIB = testing.MIB
EXPECT_NATIVE = os.environ.get("TIDEPOOL_TEST_CUPY_NATIVE") == "1"


def allocated(device=0):
    return tidepool.cupy.memory_stats(device)["allocated_bytes"]["current"]


def device_of(ptr):
    device = ctypes.c_int(-1)
    pool = tidepool._library.PoolId()
    tidepool.library().call("tidepool_pool_of", ctypes.c_void_p(ptr), ctypes.byref(device),
                            ctypes.byref(pool))
    return device.value


class CupyTestBase(unittest.TestCase):
    NATIVE = None  # install(native=...)

    @classmethod
    def setUpClass(cls):
        if not getattr(CupyTestBase, "_started", False):
            testing.start_simulated(devices=2)
            CupyTestBase._started = True

    def setUp(self):
        self.fake = fake_cupy_numba.FakeCupy()
        self.fake.__enter__()
        self.addCleanup(self.fake.__exit__, None, None, None)
        self.addCleanup(self._forget_install)
        with warnings.catch_warnings(record=True) as self.warned:
            warnings.simplefilter("always")
            self.allocator = tidepool.cupy.install(native=self.NATIVE)
        self.cupy = self.fake.module
        self.baseline = [allocated(0), allocated(1)]

    def _forget_install(self):
        tidepool.cupy._installed = None
        tidepool.cupy._previous = None

    def tearDown(self):
        gc.collect()
        self.assertEqual([allocated(0), allocated(1)], self.baseline, "a block was not freed")


class InstallTest(CupyTestBase):

    def expected_functions(self):
        if self.NATIVE is False or not tidepool.cupy.native_available():
            return tidepool.cupy.functions(native=False)
        lib = tidepool.library()
        functions = tidepool.cupy.functions(native=True)
        self.assertEqual(functions.malloc_address, lib.address("tidepool_cupy_malloc"))
        self.assertEqual(functions.free_address, lib.address("tidepool_cupy_free"))
        return functions

    def test_cupy_gets_the_allocator_and_the_functions(self):
        self.assertIs(self.cupy.cuda.get_allocator(), self.allocator)
        self.assertTrue(tidepool.cupy.installed())
        memptr = self.cupy.cuda.alloc(3 * MIB + 1000)
        expected = self.expected_functions()
        self.assertEqual(self.fake.made, [(0, expected.malloc_address, expected.free_address,
                                           expected)])
        self.assertIs(self.allocator.functions, expected)
        self.assertNotEqual(memptr.ptr, 0)
        self.assertEqual(memptr.ptr % 512, 0)
        self.assertGreaterEqual(allocated(0), self.baseline[0] + 3 * MIB + 1000)
        del memptr
        self.assertEqual(allocated(0), self.baseline[0])
        self.assertEqual(len(self.fake.frees), 1)

    def test_native_when_the_library_has_the_entry_points(self):
        if EXPECT_NATIVE:
            self.assertTrue(tidepool.cupy.native_available())
        native = self.allocator.functions.native
        if self.NATIVE is False:
            self.assertFalse(native)
            self.assertEqual(self.warned, [])
        elif tidepool.cupy.native_available():
            self.assertTrue(native)
            self.assertEqual(self.warned, [])
        else:
            self.assertFalse(native)
            self.assertEqual(len(self.warned), 1)
            self.assertIn("Python trampolines", str(self.warned[0].message))

    def test_install_is_idempotent(self):
        self.assertIs(tidepool.cupy.install(native=self.NATIVE), self.allocator)
        self.assertIs(self.cupy.cuda.get_allocator(), self.allocator)

    def test_uninstall_restores_cupy_and_live_arrays_still_free(self):
        previous = self.fake.default_pool.malloc
        memptr = self.cupy.cuda.alloc(MIB)
        self.assertTrue(tidepool.cupy.uninstall())
        self.assertEqual(self.cupy.cuda.get_allocator(), previous)
        self.assertFalse(tidepool.cupy.installed())
        self.assertFalse(tidepool.cupy.uninstall())
        self.assertGreater(allocated(0), self.baseline[0])
        del memptr  # freed into tidepool after the uninstall
        self.assertEqual(allocated(0), self.baseline[0])

    def test_uninstall_leaves_an_allocator_set_since(self):
        mine = lambda size: None  # noqa: E731
        self.cupy.cuda.set_allocator(mine)
        self.assertFalse(tidepool.cupy.installed())
        self.assertFalse(tidepool.cupy.uninstall())
        self.assertIs(self.cupy.cuda.get_allocator(), mine)


class DeviceAndStreamTest(CupyTestBase):

    def test_allocations_follow_the_current_device(self):
        first = self.cupy.cuda.alloc(MIB)
        self.fake.device_id = 1
        second = self.cupy.cuda.alloc(MIB)
        self.assertEqual(device_of(first.ptr), 0)
        self.assertEqual(device_of(second.ptr), 1)
        self.assertEqual(self.allocator.cached_streams(), [(0, 0), (1, 0)])
        self.assertEqual([m[2] for m in self.fake.mallocs], [0, 1])  # CuPy's device_id
        del first, second

    def test_allocations_follow_a_stream_change(self):
        before = self.cupy.cuda.alloc(MIB)
        # The simulated device knows only the NULL stream from C: tidepool refusing this handle
        # shows that it reached tidepool_malloc as the stream.
        with self.fake.use_stream(0x5000):
            with self.assertRaises(tidepool.InvalidArgumentError) as raised:
                self.cupy.cuda.alloc(MIB)
        self.assertIn("tidepool_malloc", str(raised.exception))
        after = self.cupy.cuda.alloc(MIB)
        self.assertEqual([made[0] for made in self.fake.made], [0, 0x5000])  # 0 served twice
        self.assertEqual([m[0] for m in self.fake.mallocs], [0, 0x5000, 0])
        self.assertEqual(self.allocator.cached_streams(), [(0, 0), (0, 0x5000)])
        del before, after

    def test_the_cache_of_allocators_is_bounded(self):
        saved = tidepool.cupy.MAX_CACHED_ALLOCATORS
        tidepool.cupy.MAX_CACHED_ALLOCATORS = 2
        self.addCleanup(setattr, tidepool.cupy, "MAX_CACHED_ALLOCATORS", saved)
        for stream in (0x10, 0x20, 0x30):
            self.allocator.allocator_for(0, stream)
        self.assertEqual(self.allocator.cached_streams(), [(0, 0x30)])

    def test_size_zero_never_reaches_tidepool(self):
        memptr = self.cupy.cuda.alloc(0)
        self.assertEqual(memptr.ptr, 0)
        self.assertEqual(self.fake.mallocs, [])


class FailureTest(CupyTestBase):

    def test_out_of_memory_raises_cupys_error_with_tidepools_reason(self):
        oom = self.cupy.cuda.memory.OutOfMemoryError
        held = self.cupy.cuda.alloc(5 * MIB)
        with self.assertRaises(oom) as raised:
            self.cupy.cuda.alloc(2 * testing.DEVICE_BYTES)
        error = raised.exception
        self.assertIsInstance(error, MemoryError)
        self.assertEqual(error._size, 2 * testing.DEVICE_BYTES)
        self.assertEqual(error._total, allocated(0))  # what tidepool has handed out
        self.assertIsInstance(error.__cause__, tidepool.OutOfMemoryError)
        self.assertIn("tidepool_malloc", error.__cause__.message)
        # Two tries (the second after gc.collect()), both NULL, nothing to free.
        self.assertEqual([m[3] for m in self.fake.mallocs], [held.ptr, 0, 0])
        self.assertEqual(len(self.fake.frees), 0)
        del held

    def test_gc_collect_frees_arrays_held_by_a_cycle_then_retries(self):
        gc.disable()
        self.addCleanup(gc.enable)
        ooms = tidepool.cupy.memory_stats(0)["ooms"]
        cycle = [self.cupy.cuda.alloc(700 * MIB)]
        cycle.append(cycle)
        del cycle  # unreachable, not freed until a collection
        self.assertGreaterEqual(allocated(0), self.baseline[0] + 700 * MIB)
        memptr = self.cupy.cuda.alloc(700 * MIB)  # fails once, collects, succeeds
        self.assertNotEqual(memptr.ptr, 0)
        self.assertEqual(tidepool.cupy.memory_stats(0)["ooms"], ooms + 1)
        self.assertEqual([m[3] == 0 for m in self.fake.mallocs], [False, True, False])
        del memptr

    def test_a_failed_free_keeps_the_block_and_sets_the_status(self):
        functions = self.allocator.functions
        free = fake_cupy_numba._FreeFunc(functions.free_address)
        foreign = ctypes.c_int()
        free(None, ctypes.addressof(foreign), 0)
        self.assertEqual(functions.last_status(), _errors.INVALID_ARGUMENT)
        free(None, None, 0)
        self.assertEqual(functions.last_status(), _errors.OK)


class ExtrasTest(CupyTestBase):

    def test_record_stream_uses_the_blocks_start(self):
        memptr = self.cupy.cuda.alloc(2 * MIB)
        inner = self.cupy.cuda.memory.MemoryPointer(memptr.mem, 4096)
        tidepool.cupy.record_stream(inner, self.cupy.cuda.Stream(0))
        with self.assertRaises(tidepool.FailedPreconditionError):  # inside a block: refused
            tidepool.cupy.record_stream(inner.ptr, None)
        with self.assertRaises(tidepool.InvalidArgumentError):  # a stream tidepool lacks
            tidepool.cupy.record_stream(memptr, self.cupy.cuda.Stream(0x5000))
        with self.assertRaises(tidepool.InvalidArgumentError):
            tidepool.cupy.record_stream("not an array", None)
        del inner, memptr

    def test_stats_and_free_all_blocks(self):
        self.fake.device_id = 1
        memptr = self.cupy.cuda.alloc(6 * MIB)
        self.assertEqual(tidepool.cupy.used_bytes(), allocated(1))
        self.assertGreaterEqual(tidepool.cupy.used_bytes(1), 6 * MIB)
        self.assertGreaterEqual(tidepool.cupy.total_bytes(1), tidepool.cupy.used_bytes(1))
        stats = tidepool.cupy.memory_stats(1)
        self.assertGreater(stats["allocated_bytes"]["added"], 0)
        del memptr
        self.assertGreater(tidepool.cupy.free_bytes(1), 0)  # kept in tidepool's cache
        tidepool.cupy.free_all_blocks(1)
        self.assertEqual(tidepool.cupy.total_bytes(1), 0)


class PythonTrampolinesInstallTest(InstallTest):
    NATIVE = False


class PythonTrampolinesDeviceAndStreamTest(DeviceAndStreamTest):
    NATIVE = False


class PythonTrampolinesFailureTest(FailureTest):
    NATIVE = False


class NativeRequiredTest(unittest.TestCase):

    def test_native_true_refuses_a_library_without_the_entry_points(self):
        if tidepool.cupy.native_available():
            self.assertTrue(tidepool.cupy.functions(native=True).native)
            return
        self.assertFalse(EXPECT_NATIVE, "the test library lacks tidepool_cupy_malloc")
        with self.assertRaises(tidepool.LibraryNotFoundError) as raised:
            tidepool.cupy.functions(native=True)
        self.assertIn("cupy_entry_points", str(raised.exception))

    def test_without_cupy_install_says_so(self):
        with fake_cupy_numba.FakeCupy() as fake:
            import sys
            sys.modules["cupy"] = None  # import cupy raises ImportError
            with self.assertRaises(tidepool.TidepoolError) as raised:
                tidepool.cupy.install()
            self.assertIn("needs CuPy", str(raised.exception))
            del fake


if __name__ == "__main__":
    unittest.main()
