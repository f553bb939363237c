"""The wheel (//integrations/python/wheel:wheel, docs/integrations.md), on the CPU:

  ContentsTest   every file in it, and nothing else; RECORD's hashes and sizes; METADATA,
                 WHEEL, entry_points.txt, top_level.txt; modes and timestamps; the platform tag
                 against what the binaries need (objdump -T); exports (nm -D); assembling again
                 from the same inputs gives the same bytes.
  InstalledTest  installed offline into a fresh virtual environment (python3 -m venv, then
                 pip install --no-index --no-deps): `import tidepool` loads the bundled library;
                 the console command (--version, --help, where, replay through the bundled C++
                 command, run); and the Python package's CPU tests (tests/python, with the fake
                 torch they carry) against the installed package.

A wheel built without libtidepool_preload.so passes, but says so loudly, and `tidepool run` is
checked to refuse with its message; with it, `tidepool run -- /bin/true` must succeed on this
GPU-less machine.
"""

import csv
import base64
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile

NAME = "tidepool"
PRELOAD = "tidepool/libtidepool_preload.so"
LIBRARY = "tidepool/libtidepool.so.1"
TOOL = "tidepool/_bin/tidepool"
# tests/python's tests that need nothing but the library (and the fakes of torch, CuPy and
# Numba that tests/python carries).
PYTHON_TESTS = ["library_test", "torch_symbols_test", "stats_test", "snapshot_test",
                "install_test", "cupy_test", "numba_test"]
PYTHON_HELPERS = ["testing", "fake_cupy_numba"]


def runfile(*parts):
    return os.path.join(os.environ["TEST_SRCDIR"], os.environ["TEST_WORKSPACE"], *parts)


def the_wheel():
    folder = runfile("integrations", "python", "wheel", "wheel")
    wheels = sorted(name for name in os.listdir(folder) if name.endswith(".whl"))
    if len(wheels) != 1:
        raise AssertionError("expected one wheel in %s, found %s" % (folder, wheels))
    return os.path.join(folder, wheels[0])


def version():
    with open(runfile("integrations", "python", "wheel", "VERSION")) as f:
        return f.read().strip()


def package_sources():
    """{name in the wheel: path} of every .py file of the package in the source tree."""
    root = runfile("integrations", "python")
    found = {}
    for folder, _, files in os.walk(os.path.join(root, NAME)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, root).replace(os.sep, "/")] = path
    return found


def assembler():
    spec = importlib.util.spec_from_file_location(
        "assemble_wheel", runfile("integrations", "python", "wheel", "assemble_wheel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(**extra):
    """The environment for a child: nothing of Bazel's Python path, no tidepool settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "TIDEPOOL_LIBRARY",
                        "LD_PRELOAD", "LD_LIBRARY_PATH", "TIDEPOOL_STATS", "TIDEPOOL_TRACE",
                        "TIDEPOOL_CONF", "RUNFILES_DIR", "RUNFILES_MANIFEST_FILE")
           and not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1",
               PIP_NO_INPUT="1")
    env.update(extra)
    return env


def run(argv, timeout=120, **kwargs):
    kwargs.setdefault("env", clean_env())
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, **kwargs)


def loud(message):
    bar = "!" * 78
    sys.stderr.write("\n%s\n%s\n%s\n" % (bar, message, bar))


class ContentsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.path = the_wheel()
        cls.zip = zipfile.ZipFile(cls.path)
        cls.names = cls.zip.namelist()
        cls.dist_info = "%s-%s.dist-info" % (NAME, version())
        cls.has_preload = PRELOAD in cls.names
        if not cls.has_preload:
            loud("wheel_test: this wheel has NO libtidepool_preload.so "
                 "(//integrations/preload:libtidepool_preload.so is not wired into "
                 "//integrations/python/wheel:wheel): `tidepool run` refuses")

    @classmethod
    def tearDownClass(cls):
        cls.zip.close()

    def read(self, name):
        return self.zip.read(name).decode("utf-8")

    def test_file_name(self):
        match = re.match(r"^tidepool-(.+)-py3-none-(manylinux_2_([0-9]+)_x86_64)\.whl$",
                         os.path.basename(self.path))
        self.assertIsNotNone(match, self.path)
        self.assertEqual(match.group(1), version())

    def test_every_file_and_nothing_else(self):
        expected = set(package_sources())
        expected |= {LIBRARY, TOOL}
        if self.has_preload:
            expected.add(PRELOAD)
        expected |= {self.dist_info + "/" + name for name in
                     ("METADATA", "WHEEL", "entry_points.txt", "top_level.txt", "RECORD")}
        self.assertEqual(sorted(self.names), sorted(expected))
        self.assertEqual(len(self.names), len(set(self.names)))  # no duplicates
        self.assertEqual(self.names[-1], self.dist_info + "/RECORD")
        self.assertIn("tidepool/_cli.py", self.names)
        self.assertIn("tidepool/torch/__init__.py", self.names)

    def test_package_files_are_the_sources(self):
        for name, path in package_sources().items():
            with open(path, "rb") as f:
                self.assertEqual(self.zip.read(name), f.read(), name)

    def test_record(self):
        rows = list(csv.reader(io.StringIO(self.read(self.dist_info + "/RECORD"))))
        listed = [row[0] for row in rows]
        self.assertEqual(sorted(listed), sorted(self.names))
        for row in rows:
            self.assertEqual(len(row), 3, row)
            name, digest, size = row
            if name == self.dist_info + "/RECORD":
                self.assertEqual((digest, size), ("", ""))
                continue
            data = self.zip.read(name)
            expected = base64.urlsafe_b64encode(
                hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
            self.assertEqual(digest, "sha256=" + expected, name)
            self.assertEqual(int(size), len(data), name)

    def headers(self, name):
        text = self.read(self.dist_info + "/" + name).split("\n\n", 1)[0]
        fields = {}
        for line in text.splitlines():
            key, value = line.split(": ", 1)
            fields.setdefault(key, []).append(value)
        return fields

    def test_metadata(self):
        fields = self.headers("METADATA")
        self.assertEqual(fields["Metadata-Version"], ["2.1"])
        self.assertEqual(fields["Name"], [NAME])
        self.assertEqual(fields["Version"], [version()])
        self.assertEqual(fields["Requires-Python"], [">=3.8"])
        self.assertTrue(fields["Summary"][0])

    def test_wheel_file(self):
        fields = self.headers("WHEEL")
        self.assertEqual(fields["Wheel-Version"], ["1.0"])
        self.assertEqual(fields["Root-Is-Purelib"], ["false"])
        tag = os.path.basename(self.path)[:-len(".whl")].split("-", 2)[2]
        self.assertEqual(fields["Tag"], [tag])

    def test_entry_points_and_top_level(self):
        self.assertEqual(self.read(self.dist_info + "/entry_points.txt"),
                         "[console_scripts]\ntidepool = tidepool._cli:main\n")
        self.assertEqual(self.read(self.dist_info + "/top_level.txt"), "tidepool\n")

    def test_modes_and_timestamps(self):
        for info in self.zip.infolist():
            self.assertEqual(info.date_time, (1980, 1, 1, 0, 0, 0), info.filename)
            mode = info.external_attr >> 16
            executable = info.filename in (LIBRARY, TOOL, PRELOAD)
            self.assertEqual(mode, 0o100755 if executable else 0o100644, info.filename)

    def extract_binaries(self, into):
        paths = {}
        for name in (LIBRARY, TOOL, PRELOAD):
            if name in self.names:
                paths[name] = self.zip.extract(name, into)
        return paths

    def test_platform_tag_matches_what_the_binaries_need(self):
        tag = re.search(r"manylinux_2_([0-9]+)_x86_64", os.path.basename(self.path))
        glibc_minor = int(tag.group(1))
        objdump = shutil.which("objdump")
        with tempfile.TemporaryDirectory() as root:
            for name, path in self.extract_binaries(root).items():
                if objdump:
                    out = run([objdump, "-T", path]).stdout
                    needed = [int(m) for m in re.findall(r"\bGLIBC_2\.([0-9]+)", out)]
                    self.assertTrue(needed, name)
                    self.assertLessEqual(max(needed), glibc_minor,
                                         "%s needs GLIBC_2.%d" % (name, max(needed)))
                # The assembler's own reading, independently of objdump.
                libraries, versions = assembler().elf_dependencies(path)
                self.assertIn("libc.so.6", libraries, name)
                self.assertNotIn("libcuda.so.1", libraries, name)  # opened with dlopen
                self.assertTrue(any(v.startswith("GLIBC_") for _, v in versions), name)
        if not objdump:
            sys.stderr.write("wheel_test: objdump not found (binutils): GLIBC versions checked "
                             "by the assembler's ELF reader only\n")

    def exported(self, path):
        out = run(["nm", "-D", "--defined-only", path])
        self.assertEqual(out.returncode, 0, out.stderr)
        # Upper-case type letters are global and weak symbols: the exported ones.
        return sorted(fields[2] for fields in (line.split() for line in out.stdout.splitlines())
                      if len(fields) == 3 and fields[1].isupper())

    def test_exports(self):
        if not shutil.which("nm"):
            self.skipTest("nm not found (binutils): the exports are not checked")
        with tempfile.TemporaryDirectory() as root:
            paths = self.extract_binaries(root)
            exported = self.exported(paths[LIBRARY])
            self.assertIn("tidepool_api_version", exported)
            self.assertEqual([s for s in exported if not s.startswith("tidepool_")], [])
            if PRELOAD in paths:
                # The interposer exports the entry points it replaces (cu* of the driver API,
                # cuda* of the runtime's, and dlsym, through which the runtime finds the
                # driver) and perhaps tidepool_*: nothing of Abseil or C++.
                exported = self.exported(paths[PRELOAD])
                self.assertIn("cuMemAlloc_v2", exported)
                others = [s for s in exported
                          if not re.match(r"^(tidepool_|cu(da)?[A-Z]|dlsym$)", s)]
                self.assertEqual(others, [], "libtidepool_preload.so exports more")

    def test_assembling_again_gives_the_same_bytes(self):
        module = assembler()
        with tempfile.TemporaryDirectory() as root:
            inputs = os.path.join(root, "in")
            self.zip.extractall(inputs)
            sources = [(os.path.join(inputs, name), name) for name in self.names
                       if name.endswith(".py")]
            binary = lambda name: os.path.join(inputs, name) if name in self.names else None
            again = module.build(os.path.join(root, "out"), version(), sources,
                                 binary(LIBRARY), binary(TOOL), binary(PRELOAD),
                                 log=io.StringIO())
            self.assertEqual(os.path.basename(again), os.path.basename(self.path))
            with open(again, "rb") as a, open(self.path, "rb") as b:
                self.assertEqual(a.read(), b.read())


class InstalledTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="wheel_test_")
        cls.venv = os.path.join(cls.root, "venv")
        out = run([sys.executable, "-m", "venv", cls.venv], timeout=300)
        if out.returncode != 0:
            raise AssertionError(
                "python3 -m venv failed (%s): the venv module or ensurepip is missing; on "
                "Debian: apt-get install python3-venv (tools/setup installs it)\n%s%s"
                % (sys.executable, out.stdout, out.stderr))
        cls.python = os.path.join(cls.venv, "bin", "python")
        cls.wheel = the_wheel()
        out = run([cls.python, "-m", "pip", "install", "--no-index", "--no-deps", cls.wheel],
                  timeout=300)
        if out.returncode != 0:
            raise AssertionError("pip install %s failed:\n%s%s" % (cls.wheel, out.stdout,
                                                                    out.stderr))
        cls.command = os.path.join(cls.venv, "bin", "tidepool")
        cls.site = run([cls.python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                        "['platlib'])"]).stdout.strip()
        cls.package = os.path.join(cls.site, NAME)
        cls.has_preload = os.path.isfile(os.path.join(cls.package, "libtidepool_preload.so"))
        if not cls.has_preload:
            loud("wheel_test: the installed wheel has NO libtidepool_preload.so: checking that "
                 "`tidepool run` refuses with a clear message instead of running")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def tidepool(self, *args, **kwargs):
        return run([self.command] + list(args), cwd=self.root, **kwargs)

    def test_import_finds_the_bundled_library(self):
        out = run([self.python, "-c",
                   "import tidepool\n"
                   "print(tidepool.__file__)\n"
                   "print(tidepool.library_path())\n"
                   "print(tidepool.library().cdll.tidepool_api_version())\n"],
                  cwd=self.root)
        self.assertEqual(out.returncode, 0, out.stderr)
        package_file, library, api = out.stdout.split()
        self.assertEqual(os.path.dirname(package_file), self.package)
        self.assertEqual(library, os.path.join(self.package, "libtidepool.so.1"))
        self.assertEqual(api, "1")

    def test_version(self):
        out = self.tidepool("--version")
        self.assertEqual((out.returncode, out.stdout), (0, "tidepool %s\n" % version()),
                         out.stderr)

    def test_help_lists_every_command(self):
        out = self.tidepool("--help")
        self.assertEqual(out.returncode, 0, out.stderr)
        for word in ("tidepool run", "tidepool where", "--stats", "--trace",
                     "usage: tidepool replay"):  # the last from the C++ command itself
            self.assertIn(word, out.stdout)
        out = self.tidepool()
        self.assertEqual(out.returncode, 2)
        self.assertIn("usage:", out.stderr)

    def test_where(self):
        out = self.tidepool("where")
        self.assertEqual(out.returncode, 0, out.stderr)
        rows = dict(line.split(None, 1) for line in out.stdout.splitlines()
                    if line and not line.startswith("By hand"))
        self.assertEqual(rows["library"], os.path.join(self.package, "libtidepool.so.1"))
        self.assertEqual(rows["command"], os.path.join(self.package, "_bin", "tidepool"))
        preload = os.path.join(self.package, "libtidepool_preload.so")
        self.assertEqual(rows["preload"], preload if self.has_preload
                         else preload + "  (missing)")

    def test_the_cpp_command_runs_with_the_same_arguments(self):
        trace = os.path.join(self.root, "tiny.csv")
        with open(trace, "w") as f:
            f.write("Thread,Time,Action,Pointer,Size,Stream\n"
                    "1,0,allocate,0x1000,1048576,0x0\n"
                    "1,1,allocate,0x2000,4096,0x0\n"
                    "1,2,free,0x1000,1048576,0x0\n"
                    "1,3,free,0x2000,4096,0x0\n")
        out = self.tidepool("replay", trace, "--device=sim")
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("device: sim", out.stdout)
        self.assertIn("replayed %s: 4 events" % trace, out.stderr)
        # Its status comes back: 2 on bad usage, with its own words.
        out = self.tidepool("replay", "--bogus")
        self.assertEqual(out.returncode, 2)
        self.assertIn("tidepool replay: unknown option --bogus", out.stderr)
        out = self.tidepool("no-such-command")
        self.assertEqual(out.returncode, 2)
        self.assertIn('unknown command "no-such-command"', out.stderr)

    def test_run(self):
        if not self.has_preload:
            out = self.tidepool("run", "--", "/bin/true")
            self.assertEqual(out.returncode, 1)
            self.assertIn("libtidepool_preload.so does not exist", out.stderr)
            self.assertIn("built without //integrations/preload", out.stderr)
            return
        # A program that never uses CUDA, on a machine without a GPU: the interposer is loaded
        # and must not get in the way.
        self.assertEqual(self.tidepool("run", "--", "/bin/true").returncode, 0)
        self.assertEqual(self.tidepool("run", "--stats", "--", "/bin/true").returncode, 0)
        out = self.tidepool("run", "--", "/bin/sh", "-c", "exit 7")
        self.assertEqual(out.returncode, 7, out.stderr)
        out = self.tidepool("run", "--", "/bin/sh", "-c", "echo $LD_PRELOAD")
        self.assertEqual(out.stdout.split()[0],
                         os.path.join(self.package, "libtidepool_preload.so"))

    def fake_installation(self):
        """A copy of the installed package with a stand-in preload library (libtidepool.so.1,
        which loads anywhere), so that run's environment and exec are checked with or without
        the real interposer."""
        site = tempfile.mkdtemp(dir=self.root)
        shutil.copytree(self.package, os.path.join(site, NAME))
        preload = os.path.join(site, NAME, "libtidepool_preload.so")
        if not os.path.isfile(preload):
            shutil.copy(os.path.join(self.package, "libtidepool.so.1"), preload)
        return site, preload

    def test_run_sets_the_environment_and_execs(self):
        site, preload = self.fake_installation()
        other = os.path.join(self.package, "libtidepool.so.1")
        env = clean_env(PYTHONPATH=site, LD_PRELOAD=other)
        cli = [self.python, "-m", "tidepool._cli", "run"]
        show = ["--", "/bin/sh", "-c",
                'echo "$LD_PRELOAD|${TIDEPOOL_STATS-unset}|${TIDEPOOL_TRACE-unset}"']
        out = run(cli + show, env=env, cwd=self.root)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, "%s %s|unset|unset\n" % (preload, other))
        out = run(cli + ["--stats", "--trace", "t.csv"] + show, env=env, cwd=self.root)
        self.assertEqual(out.stdout, "%s %s|1|%s\n" % (preload, other,
                                                       os.path.join(self.root, "t.csv")))
        out = run(cli + ["--trace=/x/y.csv", "/bin/sh", "-c", 'echo "$TIDEPOOL_TRACE"'],
                  env=clean_env(PYTHONPATH=site), cwd=self.root)
        self.assertEqual(out.stdout, "/x/y.csv\n", out.stderr)
        # exec: the program's status, and its death by a signal, are the command's.
        out = run(cli + ["--", "/bin/sh", "-c", "exit 42"], env=env, cwd=self.root)
        self.assertEqual(out.returncode, 42)
        out = run(cli + ["--", "/bin/sh", "-c", "kill -TERM $$"], env=env, cwd=self.root)
        self.assertEqual(out.returncode, -15)
        out = run(cli + ["--", "/no/such/program"], env=env, cwd=self.root)
        self.assertEqual(out.returncode, 127)
        self.assertIn("cannot run /no/such/program", out.stderr)
        out = run(cli + ["--bogus", "--", "/bin/true"], env=env, cwd=self.root)
        self.assertEqual(out.returncode, 2)
        self.assertIn("unknown option --bogus", out.stderr)
        out = run(cli, env=env, cwd=self.root)
        self.assertEqual(out.returncode, 2)
        self.assertIn("no PROGRAM given", out.stderr)

    def test_python_package_tests_against_the_installed_package(self):
        work = os.path.join(self.root, "python_tests")
        os.makedirs(work, exist_ok=True)
        for name in PYTHON_TESTS + PYTHON_HELPERS:
            shutil.copy(runfile("tests", "python", name + ".py"), work)
        library = os.path.join(self.package, "libtidepool.so.1")
        failed = []
        for name in PYTHON_TESTS:
            # Only the venv's tidepool is importable (PYTHONPATH is the tests' folder), and the
            # library under test is the bundled one.
            out = run([self.python, os.path.join(work, name + ".py")], cwd=work, timeout=300,
                      env=clean_env(PYTHONPATH=work, TIDEPOOL_LIBRARY=library))
            lines = out.stderr.strip().splitlines() or ["(no output)"]
            sys.stderr.write("wheel_test: tests/python/%s.py against the installed wheel: %s\n"
                             % (name, lines[-1]))
            if out.returncode != 0 or not re.search(r"\nOK", out.stderr):
                failed.append("%s (status %d):\n%s%s" % (name, out.returncode, out.stdout,
                                                          out.stderr))
        self.assertEqual(failed, [], "\n".join(failed))


if __name__ == "__main__":
    unittest.main(verbosity=2)
