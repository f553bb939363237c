"""Every PyTorch entry point that tidepool.torch uses is exported by libtidepool.so.1
(integrations/torch/tidepool_torch.h): a missing one fails here, by name, rather than at
install() time in someone's training job."""

import ctypes
import unittest

import tidepool
from tidepool import _library
from tidepool.torch import _install

# Written out, not taken from tidepool._library, so that dropping a name there is caught too.
EXPECTED = [
    "tidepool_torch_malloc",
    "tidepool_torch_free",
    "tidepool_torch_init",
    "tidepool_torch_empty_cache",
    "tidepool_torch_set_memory_fraction",
    "tidepool_torch_base_alloc",
    "tidepool_torch_record_stream",
    "tidepool_torch_begin_allocate_to_pool",
    "tidepool_torch_end_allocate_to_pool",
    "tidepool_torch_release_pool",
    "tidepool_torch_symmetric_segment_malloc",
    "tidepool_torch_symmetric_segment_free",
    "tidepool_torch_bind_segment_pool",
    "tidepool_torch_cxx11_abi",
    "tidepool_torch_out_of_memory_error",
    "tidepool_torch_set_capture_behaviour",
    "tidepool_torch_pool_info",
]


class TorchSymbolsTest(unittest.TestCase):

    def test_every_entry_point_is_exported(self):
        cdll = tidepool.library().cdll
        missing = [name for name in EXPECTED if not hasattr(cdll, name)]
        self.assertEqual(missing, [], "libtidepool.so.1 (%s) lacks the PyTorch entry points %s "
                         "(integrations/torch/tidepool_torch.h)" % (tidepool.library_path(),
                                                                    ", ".join(missing)))
        self.assertEqual(tidepool.library().missing_torch_symbols(), [])

    def test_the_binding_knows_each_one(self):
        self.assertEqual(sorted(EXPECTED), _library.TORCH_SYMBOLS)

    def test_every_hook_install_sets_is_exported_with_an_address(self):
        lib = tidepool.library()
        addresses = set()
        for _, symbol in _install.HOOK_SETTERS + (("", "tidepool_torch_malloc"),
                                                  ("", "tidepool_torch_free")):
            address = lib.address(symbol)
            self.assertIsInstance(address, int)
            self.assertNotEqual(address, 0, symbol)
            addresses.add(address)
        self.assertEqual(len(addresses), len(_install.HOOK_SETTERS) + 2)  # all distinct

    def test_plain_c_helpers_answer(self):
        cdll = tidepool.library().cdll
        self.assertIn(cdll.tidepool_torch_cxx11_abi(), (0, 1))
        # No PyTorch (no c10) in this process: only RuntimeError could be raised.
        self.assertEqual(cdll.tidepool_torch_out_of_memory_error(), 0)

    def test_missing_entry_points_are_named(self):
        lib = tidepool.library()
        bare = _library.Library.__new__(_library.Library)
        bare.cdll = ctypes.CDLL(None)  # the process itself: no tidepool_torch_* symbols
        bare.path = "the test process"
        with self.assertRaises(tidepool.LibraryNotFoundError) as caught:
            bare.require_torch()
        for name in EXPECTED:
            self.assertIn(name, str(caught.exception))
        lib.require_torch()  # the real one has them


if __name__ == "__main__":
    unittest.main()
