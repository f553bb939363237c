"""tidepool.torch's symmetric-pool calls on the CPU. NCCL is the fake (tests/nccl/fake_nccl.cc,
through TIDEPOOL_NCCL_LIBRARY) and the devices are simulated, which cannot host a symmetric pool:
creating one gives the library's refusal, in its words, as a Python exception, and every other
call's misuse reaches the library and comes back with its class. The working path needs a GPU
(tests/gpu/symmetric_c_api_test proves it through the C API)."""

import ctypes
import os
import unittest

import tidepool
import tidepool.torch

import testing

COMM = 0x1000  # a stand-in communicator: the fake NCCL takes any pointer


class SymmetricTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        assert os.environ.get("TIDEPOOL_NCCL_LIBRARY"), "the BUILD file sets the fake NCCL"
        cls.lib = testing.start_simulated(devices=2)

    def assertSimulatedRefusal(self, caught, device=0):
        message = str(caught.exception)
        self.assertIn("tidepool_symmetric_pool_create: device %d is not a CUDA device" % device,
                      message)
        self.assertIn("simulated", message)

    def test_create_on_a_simulated_device_is_refused_in_words(self):
        for comm in (COMM, ctypes.c_void_p(COMM), ctypes.cast(COMM, ctypes.POINTER(ctypes.c_int))):
            with self.assertRaises(tidepool.FailedPreconditionError) as caught:
                tidepool.torch.symmetric_pool(comm)
            self.assertIsInstance(caught.exception, RuntimeError)
            self.assertSimulatedRefusal(caught)
        with self.assertRaises(tidepool.FailedPreconditionError) as caught:
            tidepool.torch.symmetric_pool(COMM, device="cuda:1", reserve=1 << 20)
        self.assertSimulatedRefusal(caught, device=1)

    def test_bad_arguments(self):
        for comm in (None, 0, ctypes.c_void_p()):
            with self.assertRaises(tidepool.InvalidArgumentError) as caught:
                tidepool.torch.symmetric_pool(comm)
            self.assertIn("is NULL: pass the rank's ncclComm_t", str(caught.exception))
        with self.assertRaises(ValueError):
            tidepool.torch.symmetric_pool("comm")
        with self.assertRaisesRegex(ValueError, "must be positive"):
            tidepool.torch.symmetric_pool(COMM, timeout=0)
        with self.assertRaisesRegex(LookupError, "device 7"):
            tidepool.torch.symmetric_pool(COMM, device=7)
        with self.assertRaisesRegex(ValueError, "expected a pool id"):
            tidepool.torch.reserve("pool", 1 << 20)

    def test_calls_on_a_pool_that_is_not_symmetric(self):
        pool = tidepool._library.PoolId()
        self.lib.call("tidepool_new_pool_id", pool)
        for call in (lambda: tidepool.torch.reserve(pool.as_tuple(), 1 << 20),
                     lambda: tidepool.torch.trim(pool.as_tuple()),
                     lambda: tidepool.torch.destroy(pool.as_tuple(), device=1)):
            with self.assertRaisesRegex(tidepool.NotFoundError, "not a symmetric pool"):
                call()

    def test_lookup_of_an_ordinary_block(self):
        ptr = testing.malloc(4096)
        try:
            with self.assertRaisesRegex(tidepool.InvalidArgumentError,
                                        "no live buffer of a symmetric"):
                tidepool.torch.lookup(ptr)

            class Tensor:
                def data_ptr(self):
                    return ptr
            with self.assertRaisesRegex(ValueError, "no live buffer of a symmetric"):
                tidepool.torch.lookup(Tensor())
        finally:
            testing.free(ptr)

    def test_mode_b_reaches_the_library_before_pytorch(self):
        with testing.FakeTorch(cxx11_abi=True) as fake:
            with self.assertRaises(tidepool.FailedPreconditionError) as caught:
                tidepool.torch.nccl_mem_pool(COMM, reserve=64 << 20)
        self.assertSimulatedRefusal(caught)
        self.assertEqual(fake.allocators, [])
        self.assertEqual(fake.mem_pools, [])


if __name__ == "__main__":
    unittest.main()
