"""Assembles tidepool's wheel from what Bazel built: the `tidepool` Python package, the shared
libraries inside it and the `tidepool` command's C++ binary. Standard library only (zipfile), no
network, no pip, no setuptools. docs/integrations.md describes the result.

    assemble_wheel.py --out_dir DIR --version_file VERSION --library libtidepool.so.1
        [--preload libtidepool_preload.so] --tool tidepool
        --source SRC DEST [--source SRC DEST ...]

writes DIR/tidepool-VERSION-py3-none-PLATFORM.whl, one file. Layout inside the wheel:

    tidepool/...                     the package (every --source, DEST relative to the wheel)
    tidepool/libtidepool.so.1        found by tidepool._library (inside the package directory)
    tidepool/libtidepool_preload.so  the LD_PRELOAD interposer, when built (`tidepool run`)
    tidepool/_bin/tidepool           the C++ command (`tidepool replay ...` execs it)
    tidepool-VERSION.dist-info/      METADATA, WHEEL, entry_points.txt, top_level.txt, RECORD

PLATFORM is computed from the binaries, never assumed: every GLIBC_, GLIBCXX_, CXXABI_ and GCC_
symbol version they need (their ELF version-needs tables, what `objdump -T` lists) and every
library they need (DT_NEEDED) is checked against the manylinux policies (PEP 600; the symbol
versions auditwheel's policy admits for x86_64), and the oldest policy that admits them all is
the tag. A binary that needs a library outside the policies (libcuda, say, which tidepool opens
with dlopen; or a sanitizer's runtime, under --config=asan) gets the plain linux_x86_64 tag and a
warning; tests/wheel fails unless the tag is manylinux.

Reproducible: the same inputs give the same bytes (entries sorted, fixed timestamps and modes,
fixed compression level)."""

import argparse
import base64
import hashlib
import io
import os
import re
import struct
import sys
import zipfile

NAME = "tidepool"
SUMMARY = "A stream-ordered caching allocator for CUDA device memory"
REQUIRES_PYTHON = ">=3.8"
CONSOLE_SCRIPTS = {"tidepool": "tidepool._cli:main"}
# Zip timestamps: the earliest a zip can hold (1980-01-01), so that the bytes are the inputs'.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)

# manylinux policies for x86_64, oldest first: the newest symbol version of each versioned
# library that a binary may need under that tag (auditwheel's policy/manylinux-policy.json; the
# GLIBC ceiling is the tag's own glibc). Only the policies whose limits were checked against
# auditwheel's table are listed; a binary between two of them gets the newer, which is honest.
POLICIES = [
    ("manylinux_2_17", {"GLIBC": (2, 17), "GLIBCXX": (3, 4, 19), "CXXABI": (1, 3, 7),
                        "GCC": (4, 8, 0)}),
    ("manylinux_2_24", {"GLIBC": (2, 24), "GLIBCXX": (3, 4, 22), "CXXABI": (1, 3, 10),
                        "GCC": (4, 8, 0)}),
    ("manylinux_2_31", {"GLIBC": (2, 31), "GLIBCXX": (3, 4, 28), "CXXABI": (1, 3, 12),
                        "GCC": (7, 0, 0)}),
    ("manylinux_2_34", {"GLIBC": (2, 34), "GLIBCXX": (3, 4, 29), "CXXABI": (1, 3, 13),
                        "GCC": (7, 0, 0)}),
    ("manylinux_2_36", {"GLIBC": (2, 36), "GLIBCXX": (3, 4, 30), "CXXABI": (1, 3, 13),
                        "GCC": (12, 0, 0)}),
    ("manylinux_2_39", {"GLIBC": (2, 39), "GLIBCXX": (3, 4, 33), "CXXABI": (1, 3, 15),
                        "GCC": (14, 0, 0)}),
]
# The libraries every manylinux policy lets a wheel need from the system (auditwheel's
# lib_whitelist), the dynamic loader, and the library the wheel carries itself.
ALLOWED_NEEDED = {
    "libatomic.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libmvec.so.1",
    "libanl.so.1", "libdl.so.2", "librt.so.1", "libc.so.6", "libnsl.so.1", "libutil.so.1",
    "libpthread.so.0", "libresolv.so.2", "libexpat.so.1", "libz.so.1",
    "ld-linux-x86-64.so.2", "libtidepool.so.1",
}
ARCH = "x86_64"
EM_X86_64 = 62


class ElfError(Exception):
    pass


def elf_dependencies(path):
    """(needed libraries, {(library, version name)}) of an ELF64 little-endian file: its
    DT_NEEDED entries and its version-needs table (SHT_GNU_verneed)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("%s is not a 64-bit little-endian ELF file" % path)
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine != EM_X86_64:
        raise ElfError("%s is not x86_64 (e_machine %d)" % (path, machine))
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        (name, kind, flags, addr, offset, size, link, info, align,
         entsize) = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        sections.append((kind, offset, size, link))

    def string(table, at):
        start = sections[table][1] + at
        return data[start:data.index(b"\0", start)].decode("ascii")

    needed, versions = [], set()
    for kind, offset, size, link in sections:
        if kind == 6:  # SHT_DYNAMIC
            for at in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, at)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(string(link, value))
        elif kind == 0x6FFFFFFE:  # SHT_GNU_verneed
            at = offset
            while True:
                _, count, file_name, aux, following = struct.unpack_from("<HHIII", data, at)
                library = string(link, file_name)
                entry = at + aux
                for _ in range(count):
                    _, _, _, name, next_aux = struct.unpack_from("<IHHII", data, entry)
                    versions.add((library, string(link, name)))
                    entry += next_aux
                if not following:
                    break
                at += following
    return needed, versions


def _version_tuple(text):
    return tuple(int(part) for part in text.split("."))


def platform_tag(binaries):
    """The oldest manylinux tag every binary fits, and the lines that say why."""
    newest = {}  # family -> (version tuple, binary)
    why = []
    not_manylinux = []
    for path in binaries:
        needed, versions = elf_dependencies(path)
        outside = sorted(set(needed) - ALLOWED_NEEDED)
        if outside:
            not_manylinux.append("%s needs %s, outside every manylinux policy (link it in, or "
                                 "open it with dlopen)" % (os.path.basename(path),
                                                           ", ".join(outside)))
        for _, version in versions:
            match = re.match(r"^(GLIBC|GLIBCXX|CXXABI|GCC)_([0-9.]+)$", version)
            if not match:
                continue  # the library's own version nodes, or one no policy limits
            family, number = match.group(1), _version_tuple(match.group(2))
            if family not in newest or number > newest[family][0]:
                newest[family] = (number, path)
        why.append("%s: needs %s" % (os.path.basename(path), " ".join(sorted(needed))))
    for family, (number, path) in sorted(newest.items()):
        why.append("newest %s_%s (%s)" % (family, ".".join(map(str, number)),
                                          os.path.basename(path)))
    if not not_manylinux:
        for tag, limits in POLICIES:
            if all(number <= limits[family] for family, (number, _) in newest.items()):
                return "%s_%s" % (tag, ARCH), why
        not_manylinux.append("no manylinux policy admits these symbol versions")
    # Not a manylinux wheel (a sanitizer build, whose libraries need the sanitizer's runtime, or
    # a dependency that crept in): the plain tag, which promises this machine's kind only.
    # tests/wheel insists on manylinux for the shipped build.
    why += ["WARNING: " + line + ": tagged linux_%s, not manylinux" % ARCH
            for line in not_manylinux]
    return "linux_%s" % ARCH, why


def _record_hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _metadata(version):
    return ("Metadata-Version: 2.1\n"
            "Name: %s\n"
            "Version: %s\n"
            "Summary: %s\n"
            "Requires-Python: %s\n"
            "Classifier: Programming Language :: Python :: 3\n"
            "Classifier: Operating System :: POSIX :: Linux\n"
            "Classifier: Environment :: GPU :: NVIDIA CUDA\n"
            "Description-Content-Type: text/plain\n"
            "\n"
            "tidepool: a stream-ordered caching allocator for CUDA device memory.\n"
            "\n"
            "This wheel carries libtidepool.so.1 (the C API; tidepool.torch makes it PyTorch's\n"
            "CUDA allocator), the LD_PRELOAD interposer libtidepool_preload.so when it was\n"
            "built, and the `tidepool` command: `tidepool run -- PROGRAM` runs a program with\n"
            "the interposer, `tidepool replay TRACE...` replays allocation traces, `tidepool\n"
            "where` prints the libraries' paths. The libraries need nothing at run time but the\n"
            "C and C++ runtimes and the NVIDIA driver, which they open themselves.\n"
            % (NAME, version, SUMMARY, REQUIRES_PYTHON))


def _wheel_file(tag):
    return ("Wheel-Version: 1.0\n"
            "Generator: tidepool integrations/python/wheel/assemble_wheel.py\n"
            "Root-Is-Purelib: false\n"
            "Tag: %s\n" % tag)


def _entry_points():
    lines = ["[console_scripts]"]
    lines += ["%s = %s" % item for item in sorted(CONSOLE_SCRIPTS.items())]
    return "\n".join(lines) + "\n"


def build(out_dir, version, sources, library, tool, preload=None, log=sys.stderr):
    """Writes the wheel into out_dir; returns its path."""
    if not re.match(r"^[0-9]+(\.[0-9]+)*([a-z]+[0-9]+)?(\.(post|dev)[0-9]+)?$", version):
        raise ValueError("version %r is not a plain PEP 440 version" % version)
    files = {}  # name in the wheel -> (bytes, executable)
    for src, dest in sources:
        if not dest.startswith(NAME + "/") or not dest.endswith(".py"):
            raise ValueError("package file %s would land at %s, outside %s/" % (src, dest, NAME))
        with open(src, "rb") as f:
            files[dest] = (f.read(), False)
    if NAME + "/__init__.py" not in files:
        raise ValueError("no %s/__init__.py among the package files" % NAME)
    binaries = [(library, NAME + "/libtidepool.so.1"), (tool, NAME + "/_bin/tidepool")]
    if preload:
        binaries.append((preload, NAME + "/libtidepool_preload.so"))
    for src, dest in binaries:
        with open(src, "rb") as f:
            files[dest] = (f.read(), True)
    tag, why = platform_tag([src for src, _ in binaries])
    dist_info = "%s-%s.dist-info" % (NAME, version)
    files[dist_info + "/METADATA"] = (_metadata(version).encode(), False)
    files[dist_info + "/WHEEL"] = (_wheel_file("py3-none-" + tag).encode(), False)
    files[dist_info + "/entry_points.txt"] = (_entry_points().encode(), False)
    files[dist_info + "/top_level.txt"] = ((NAME + "\n").encode(), False)
    record_name = dist_info + "/RECORD"
    record = io.StringIO()
    for name in sorted(files):
        data = files[name][0]
        record.write("%s,%s,%d\n" % (name, _record_hash(data), len(data)))
    record.write("%s,,\n" % record_name)
    files[record_name] = (record.getvalue().encode(), False)

    wheel_name = "%s-%s-py3-none-%s.whl" % (NAME, version, tag)
    path = os.path.join(out_dir, wheel_name)
    os.makedirs(out_dir, exist_ok=True)
    # RECORD last, the rest sorted, .dist-info after the package (as the wheel spec recommends).
    order = sorted(name for name in files if name != record_name) + [record_name]
    with zipfile.ZipFile(path, "w") as wheel:
        for name in order:
            data, executable = files[name]
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system = 3  # Unix, so that the mode below is read
            info.external_attr = ((0o100755 if executable else 0o100644) << 16)
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    print("assemble_wheel: %s (%d files)" % (wheel_name, len(files)), file=log)
    for line in why:
        print("assemble_wheel:   " + line, file=log)
    if not preload:
        print("assemble_wheel: WARNING: no libtidepool_preload.so in this wheel: `tidepool run` "
              "will say so (//integrations/preload:libtidepool_preload.so was not given)",
              file=log)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--version_file", required=True)
    parser.add_argument("--library", required=True)
    parser.add_argument("--tool", required=True)
    parser.add_argument("--preload")
    parser.add_argument("--source", nargs=2, action="append", default=[],
                        metavar=("SRC", "DEST"))
    args = parser.parse_args(argv)
    with open(args.version_file) as f:
        version = f.read().strip()
    try:
        build(args.out_dir, version, args.source, args.library, args.tool, args.preload)
    except (ElfError, ValueError, OSError) as error:
        print("assemble_wheel: %s" % error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
