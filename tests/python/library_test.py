"""tidepool._library: where libtidepool.so.1 is found (TIDEPOOL_LIBRARY, next to the package,
../lib, the loader's search, nothing at all), and how a failed C call becomes an exception (the
class follows the status, the text is tidepool_last_error()'s).

Discovery runs in child processes, each with its own copy of the package and its own
environment, since a process loads the library once."""

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import tidepool
from tidepool import _errors
from tidepool import _library

import testing

_PROBE = ("import tidepool\n"
          "try:\n"
          "    print('LOADED', tidepool.library_path())\n"
          "except tidepool.LibraryNotFoundError as e:\n"
          "    print('NOTFOUND', e)\n")


def _package_source():
    return os.path.dirname(os.path.abspath(tidepool.__file__))


class DiscoveryTest(unittest.TestCase):

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.site = os.path.join(self.root, "site")
        shutil.copytree(_package_source(), os.path.join(self.site, "tidepool"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.so*"))

    def probe(self, **extra_env):
        env = {k: v for k, v in os.environ.items()
               if k not in ("TIDEPOOL_LIBRARY", "LD_LIBRARY_PATH", "PYTHONPATH")}
        env.update(extra_env)
        env["PYTHONPATH"] = self.site
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=self.root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stdout)
        return out.stdout.strip()

    def place(self, *parts):
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(testing.library_path(), path)
        return os.path.realpath(path)

    def test_environment_variable_wins(self):
        self.place("site", "tidepool", "libtidepool.so.1")  # would be found, but is not asked
        chosen = self.place("elsewhere", "libtidepool.so.1")
        self.assertEqual(self.probe(TIDEPOOL_LIBRARY=chosen), "LOADED " + chosen)

    def test_environment_variable_naming_nothing_is_an_error(self):
        out = self.probe(TIDEPOOL_LIBRARY=os.path.join(self.root, "missing.so"))
        self.assertTrue(out.startswith("NOTFOUND TIDEPOOL_LIBRARY="), out)
        self.assertIn("no such file", out)

    def test_inside_the_package(self):
        path = self.place("site", "tidepool", "libtidepool.so.1")
        self.assertEqual(os.path.realpath(self.probe()[len("LOADED "):]), path)

    def test_next_to_the_package(self):
        path = self.place("site", "libtidepool.so.1")
        self.assertEqual(os.path.realpath(self.probe()[len("LOADED "):]), path)

    def test_lib_beside_the_package(self):
        path = self.place("site", "lib", "libtidepool.so.1")  # site/tidepool/../lib
        self.assertEqual(os.path.realpath(self.probe()[len("LOADED "):]), path)

    def test_lib_beside_the_package_directory(self):
        path = self.place("lib", "libtidepool.so.1")  # site/../lib
        self.assertEqual(os.path.realpath(self.probe()[len("LOADED "):]), path)

    def test_inside_before_next_to(self):
        inside = self.place("site", "tidepool", "libtidepool.so.1")
        self.place("site", "libtidepool.so.1")
        self.assertEqual(os.path.realpath(self.probe()[len("LOADED "):]), inside)

    def test_loader_search(self):
        self.place("ldpath", "libtidepool.so.1")
        out = self.probe(LD_LIBRARY_PATH=os.path.join(self.root, "ldpath"))
        self.assertEqual(out, "LOADED libtidepool.so.1")

    def test_nothing_found_says_what_was_tried(self):
        out = self.probe()
        self.assertTrue(out.startswith("NOTFOUND libtidepool.so.1 not found"), out)
        self.assertIn("TIDEPOOL_LIBRARY", out)
        self.assertIn(os.path.join(self.site, "tidepool", "libtidepool.so.1"), out)
        self.assertIn("tools/install", out)

    def test_a_file_that_is_not_tidepool(self):
        bogus = os.path.join(self.root, "bogus.so")
        with open(bogus, "w") as f:
            f.write("not a library")
        out = self.probe(TIDEPOOL_LIBRARY=bogus)
        self.assertTrue(out.startswith("NOTFOUND could not load " + bogus), out)


class SignaturesTest(unittest.TestCase):

    def test_every_c_function_of_the_header_has_a_signature(self):
        header = os.path.join(os.environ["TEST_SRCDIR"], os.environ["TEST_WORKSPACE"],
                              "integrations", "c_api", "tidepool.h")
        with open(header) as f:
            text = f.read()
        import re
        declared = set(re.findall(r"^[a-z_ ]+\*? *(tidepool_[a-z_0-9]+)\(", text, re.M))
        self.assertGreater(len(declared), 30)
        self.assertEqual(declared, set(_library.C_API))

    def test_every_function_is_typed_in_the_loaded_library(self):
        lib = tidepool.library()
        for name, (restype, argtypes) in _library.C_API.items():
            fn = getattr(lib.cdll, name)
            self.assertIs(fn.restype, restype, name)
            self.assertEqual(fn.argtypes, argtypes, name)


class ErrorsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.lib = testing.start_simulated(devices=2)

    def assertRaisesWith(self, cls, builtin, status_name, words, fn, *args):
        with self.assertRaises(cls) as caught:
            fn(*args)
        error = caught.exception
        self.assertIsInstance(error, builtin)
        self.assertIsInstance(error, tidepool.TidepoolError)
        self.assertEqual(error.status_name, status_name)
        self.assertIn(words, str(error))
        self.assertEqual(str(error), error.message)
        return error

    def test_out_of_memory_is_a_memory_error(self):
        ptr = ctypes.c_void_p()
        error = self.assertRaisesWith(tidepool.OutOfMemoryError, MemoryError,
                                      "TIDEPOOL_OUT_OF_MEMORY", "tidepool_malloc: out of memory",
                                      self.lib.call, "tidepool_malloc", ctypes.byref(ptr), 2 << 30,
                                      0, None)
        self.assertEqual(error.status, _errors.OUT_OF_MEMORY)
        self.assertIsNone(ptr.value)

    def test_unknown_device_is_a_lookup_error(self):
        self.assertRaisesWith(tidepool.NotFoundError, LookupError, "TIDEPOOL_NOT_FOUND",
                              "device 9", self.lib.json_call, "tidepool_stats_json", 9)

    def test_bad_input_is_a_value_error(self):
        self.assertRaisesWith(tidepool.InvalidArgumentError, ValueError,
                              "TIDEPOOL_INVALID_ARGUMENT", "tidepool_free",
                              self.lib.call, "tidepool_free", ctypes.c_void_p(0x1234))

    def test_out_of_order_is_a_runtime_error(self):
        ptr = testing.malloc(4096, device=1)
        testing.free(ptr)
        error = self.assertRaisesWith(tidepool.FailedPreconditionError, RuntimeError,
                                      "TIDEPOOL_FAILED_PRECONDITION", "not a live allocation",
                                      testing.free, ptr)
        self.assertIsInstance(error, tidepool.TidepoolRuntimeError)

    def test_init_after_start_is_refused(self):
        self.assertRaisesWith(tidepool.FailedPreconditionError, RuntimeError,
                              "TIDEPOOL_FAILED_PRECONDITION", "tidepool_init_simulated",
                              self.lib.call, "tidepool_init_simulated", 1, 1 << 20)

    def test_every_status_has_its_class(self):
        expected = {
            _errors.INVALID_ARGUMENT: (tidepool.InvalidArgumentError, ValueError),
            _errors.OUT_OF_MEMORY: (tidepool.OutOfMemoryError, MemoryError),
            _errors.NOT_FOUND: (tidepool.NotFoundError, LookupError),
            _errors.FAILED_PRECONDITION: (tidepool.FailedPreconditionError, RuntimeError),
            _errors.UNAVAILABLE: (tidepool.UnavailableError, RuntimeError),
            _errors.INTERNAL: (tidepool.InternalError, RuntimeError),
            _errors.DEADLINE_EXCEEDED: (tidepool.DeadlineExceededError, RuntimeError),
            99: (tidepool.TidepoolRuntimeError, RuntimeError),
        }
        for status, (cls, builtin) in expected.items():
            error = _errors.error_for_status(status, "words")
            self.assertIs(type(error), cls)
            self.assertIsInstance(error, builtin)
            self.assertEqual(error.status, status)
        names = {1: "INVALID_ARGUMENT", 2: "OUT_OF_MEMORY", 3: "NOT_FOUND",
                 4: "FAILED_PRECONDITION", 5: "UNAVAILABLE", 6: "INTERNAL",
                 7: "DEADLINE_EXCEEDED"}
        for status, name in names.items():  # the codes are the library's
            self.assertEqual(self.lib.status_name(status), "TIDEPOOL_" + name)
            self.assertEqual(getattr(_errors, name), status)

    def test_ok_raises_nothing(self):
        count = ctypes.c_int()
        self.lib.call("tidepool_device_count", ctypes.byref(count))
        self.assertEqual(count.value, 2)


if __name__ == "__main__":
    unittest.main()
