"""tidepool.torch.install() against a fake `torch` (tests/python/testing.py) that records what it
is asked: every hook set to the right exported function, PyTorch's allocator swapped once, the
refusals (CUDA already initialized, another libstdc++ ABI, PyTorch's own "already initialized")
with nothing installed, idempotence, the torch.compile checkpoint calls answered in tidepool's
words, and mode B refused after mode A."""

import sys
import unittest
import warnings

import tidepool
import tidepool.torch
from tidepool.torch import _install

import testing

EXPECTED_SETTERS = {
    "set_init_fn": "tidepool_torch_init",
    "set_reset_fn": "tidepool_torch_empty_cache",
    "set_memory_fraction_fn": "tidepool_torch_set_memory_fraction",
    "set_base_alloc_fn": "tidepool_torch_base_alloc",
    "set_record_stream_fn": "tidepool_torch_record_stream",
    "set_begin_allocate_to_pool": "tidepool_torch_begin_allocate_to_pool",
    "set_end_allocate_to_pool_fn": "tidepool_torch_end_allocate_to_pool",
    "set_release_pool": "tidepool_torch_release_pool",
}


def library_abi():
    return bool(tidepool.library().cdll.tidepool_torch_cxx11_abi())


class InstallTest(unittest.TestCase):

    def setUp(self):
        _install._allocator = None  # each test starts before any install
        self.addCleanup(setattr, _install, "_allocator", None)

    def install(self, fake):
        with fake, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            allocator = tidepool.torch.install()
        return allocator, caught

    def test_every_hook_is_set_to_its_function(self):
        lib = tidepool.library()
        fake = testing.FakeTorch(cxx11_abi=library_abi())
        allocator, caught = self.install(fake)
        self.assertEqual(len(fake.allocators), 1)
        self.assertIs(allocator, fake.allocators[0])
        self.assertEqual(fake.current, [allocator])
        self.assertEqual(allocator.path, tidepool.library_path())
        self.assertEqual(allocator.names, ("tidepool_torch_malloc", "tidepool_torch_free"))
        self.assertEqual(allocator.addresses, (lib.address("tidepool_torch_malloc"),
                                               lib.address("tidepool_torch_free")))
        self.assertEqual(allocator._allocator.setters,
                         {setter: lib.address(symbol)
                          for setter, symbol in EXPECTED_SETTERS.items()})
        self.assertTrue(tidepool.torch.installed())
        # No c10 here, so the library says only RuntimeError can be raised: install warns.
        self.assertEqual(lib.cdll.tidepool_torch_out_of_memory_error(), 0)
        self.assertEqual(len(caught), 1)
        self.assertIn("torch.OutOfMemoryError", str(caught[0].message))

    def test_second_install_does_nothing(self):
        fake = testing.FakeTorch(cxx11_abi=library_abi())
        first, _ = self.install(fake)
        fake.initialized = True  # CUDA in use by now: a second install must not care
        second, _ = self.install(fake)
        self.assertIs(first, second)
        self.assertEqual(len(fake.allocators), 1)
        self.assertEqual(len(fake.current), 1)

    def test_refused_once_cuda_is_initialized(self):
        fake = testing.FakeTorch(initialized=True, cxx11_abi=library_abi())
        with self.assertRaises(tidepool.FailedPreconditionError) as caught:
            self.install(fake)
        self.assertIn("already initialized", str(caught.exception))
        self.assertIn("Call tidepool.torch.install() first thing", str(caught.exception))
        self.assertEqual(fake.current, [])
        self.assertFalse(tidepool.torch.installed())

    def test_refused_when_pytorch_cannot_swap(self):
        fake = testing.FakeTorch(cxx11_abi=library_abi(),
                                 swap_error="Can't swap an already initialized allocator")
        with self.assertRaises(tidepool.FailedPreconditionError) as caught:
            self.install(fake)
        self.assertIn("install() first thing", str(caught.exception))
        self.assertIn("Can't swap", str(caught.exception))
        self.assertFalse(tidepool.torch.installed())
        self.assertEqual(fake.module._C._cuda_getCheckpointState(0, (1, 0))[0],
                         "native checkpoint")  # nothing wrapped either

    def test_other_swap_errors_pass_through(self):
        fake = testing.FakeTorch(cxx11_abi=library_abi(), swap_error="something else")
        with self.assertRaisesRegex(RuntimeError, "^something else$"):
            self.install(fake)
        self.assertFalse(tidepool.torch.installed())

    def test_refused_for_another_abi(self):
        fake = testing.FakeTorch(cxx11_abi=not library_abi())
        with self.assertRaises(tidepool.FailedPreconditionError) as caught:
            self.install(fake)
        message = str(caught.exception)
        self.assertIn("_GLIBCXX_USE_CXX11_ABI=%d" % library_abi(), message)
        self.assertIn("std::pair and std::function", message)
        self.assertEqual(fake.allocators, [])
        self.assertEqual(fake.current, [])
        self.assertFalse(tidepool.torch.installed())

    def test_compile_checkpoints_are_answered_in_words(self):
        fake = testing.FakeTorch(cxx11_abi=library_abi())
        self.install(fake)
        for name in ("_cuda_getCheckpointState", "_cuda_setCheckpointPoolState"):
            with self.assertRaises(tidepool.UnsupportedError) as caught:
                getattr(fake.module._C, name)(0, (1, 0))
            self.assertIsInstance(caught.exception, RuntimeError)
            self.assertIn("reduce-overhead", str(caught.exception))
            self.assertIn("torch._C." + name, str(caught.exception))
        self.assertFalse(hasattr(fake.module._C, "_cuda_checkPoolLiveAllocations"))

    def test_mode_b_is_refused_after_mode_a(self):
        fake = testing.FakeTorch(cxx11_abi=library_abi())
        self.install(fake)
        with fake, self.assertRaises(tidepool.FailedPreconditionError) as caught:
            tidepool.torch.nccl_mem_pool(0x1000, reserve=1 << 20)
        self.assertIn("mode B", str(caught.exception))
        self.assertIn("install()", str(caught.exception))
        self.assertEqual(fake.mem_pools, [])

    def test_without_pytorch(self):
        saved = sys.modules.get("torch")
        sys.modules["torch"] = None  # import torch raises ImportError, installed or not
        try:
            with self.assertRaises(tidepool.TidepoolRuntimeError) as caught:
                tidepool.torch.install()
        finally:
            if saved is None:
                del sys.modules["torch"]
            else:
                sys.modules["torch"] = saved
        self.assertIn("needs PyTorch", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
