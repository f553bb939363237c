"""The `tidepool` console command of the wheel (docs/integrations.md).

    tidepool run [--stats] [--trace PATH] -- PROGRAM ARGS...
        runs PROGRAM with the wheel's libtidepool_preload.so in LD_PRELOAD (before whatever
        LD_PRELOAD already holds), TIDEPOOL_STATS=1 with --stats, TIDEPOOL_TRACE=PATH with
        --trace; the program replaces this process (exec), so its exit status and signals are
        its own.
    tidepool where
        prints the paths of the bundled libraries and command, for LD_PRELOAD by hand.
    tidepool --version
    tidepool --help
    tidepool COMMAND ARGS...
        any other command (replay, ...) runs the bundled C++ `tidepool` command with the same
        arguments (exec): `tidepool replay TRACE... --device=sim`.

Imports nothing that loads libtidepool.so.1 into this process.
"""

import os
import sys

PROGRAM = "tidepool"
PRELOAD_NAME = "libtidepool_preload.so"
LIBRARY_NAME = "libtidepool.so.1"
ENV_STATS = "TIDEPOOL_STATS"
ENV_TRACE = "TIDEPOOL_TRACE"

USAGE = """\
usage: tidepool run [--stats] [--trace PATH] -- PROGRAM [ARGS...]
       tidepool where
       tidepool --version | --help
       tidepool COMMAND [ARGS...]   (the bundled C++ command: replay, ...)

  run      runs PROGRAM with tidepool's LD_PRELOAD interposer (%(preload)s) in front of
           LD_PRELOAD; its exit status is the program's.
             --stats        sets %(stats)s=1 (statistics at exit)
             --trace PATH   sets %(trace)s=PATH (a trace for `tidepool replay`)
  where    prints where the bundled libraries and command are (for LD_PRELOAD by hand).
""" % {"preload": PRELOAD_NAME, "stats": ENV_STATS, "trace": ENV_TRACE}


def package_dir():
    return os.path.dirname(os.path.abspath(__file__))


def preload_path():
    return os.path.join(package_dir(), PRELOAD_NAME)


def library_path():
    return os.path.join(package_dir(), LIBRARY_NAME)


def tool_path():
    return os.path.join(package_dir(), "_bin", PROGRAM)


def version():
    """The installed distribution's version (the wheel's METADATA)."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return "unknown"
    try:
        return metadata.version(PROGRAM)
    except metadata.PackageNotFoundError:
        return "unknown (not installed from a wheel)"


def _error(message, status=2):
    sys.stderr.write("tidepool: %s\n" % message)
    return status


def _exec(path, argv, env=None):
    """Replaces this process; returns (with a status) only if it could not."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if env is None:
            os.execv(path, argv)
        os.execvpe(path, argv, env)
    except OSError as error:
        return _error("cannot run %s: %s" % (argv[0], error.strerror or error),
                      127 if isinstance(error, FileNotFoundError) else 126)
    return 1  # not reached


def _tool_usage():
    """The bundled command's own usage text, or None."""
    import subprocess
    try:
        out = subprocess.run([tool_path(), "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def cmd_help():
    sys.stdout.write(USAGE)
    usage = _tool_usage()
    if usage:
        sys.stdout.write("\nThe bundled C++ command (%s):\n" % tool_path())
        sys.stdout.write("".join("  " + line for line in usage.splitlines(True)))
    else:
        sys.stdout.write("\n(the bundled C++ command is missing: %s)\n" % tool_path())
    return 0


def cmd_where():
    rows = [("package", package_dir()), ("library", library_path()),
            ("preload", preload_path()), ("command", tool_path())]
    for name, path in rows:
        present = os.path.isdir(path) if name == "package" else os.path.isfile(path)
        sys.stdout.write("%-8s %s%s\n" % (name, path, "" if present else "  (missing)"))
    if os.path.isfile(preload_path()):
        sys.stdout.write("\nBy hand: LD_PRELOAD=%s PROGRAM ...\n" % preload_path())
    return 0


def cmd_run(args):
    stats = False
    trace = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg == "--stats":
            stats = True
        elif arg == "--trace" or arg.startswith("--trace="):
            if "=" in arg:
                trace = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    return _error("run: --trace needs a PATH\n" + USAGE)
                i += 1
                trace = args[i]
            if not trace:
                return _error("run: --trace needs a PATH\n" + USAGE)
        elif arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        elif arg.startswith("-"):
            return _error("run: unknown option %s\n%s" % (arg, USAGE))
        else:
            break  # the program, without a `--` before it
        i += 1
    program = args[i:]
    if not program:
        return _error("run: no PROGRAM given\n" + USAGE)
    preload = preload_path()
    if not os.path.isfile(preload):
        return _error(
            "run: the LD_PRELOAD interposer is not in this installation: %s does not exist. "
            "This wheel was built without //integrations/preload:libtidepool_preload.so; "
            "rebuild it with tools/build_wheel from a tidepool that has it. (Python programs "
            "can use tidepool without it: tidepool.torch.install().)" % preload, 1)
    env = dict(os.environ)
    existing = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = preload + (" " + existing if existing else "")
    if stats:
        env[ENV_STATS] = "1"
    if trace is not None:
        env[ENV_TRACE] = os.path.abspath(trace)
    return _exec(program[0], program, env)


def cmd_tool(args):
    tool = tool_path()
    if not os.path.isfile(tool):
        return _error("the bundled C++ command is missing: %s does not exist (a broken "
                      "installation: reinstall the wheel)" % tool, 1)
    if not os.access(tool, os.X_OK):
        return _error("the bundled C++ command %s is not executable (the installer dropped its "
                      "mode): chmod +x it, or reinstall the wheel with pip" % tool, 1)
    return _exec(tool, [PROGRAM] + list(args))


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(USAGE)
        return 2
    command, rest = args[0], args[1:]
    if command in ("-h", "--help", "help"):
        return cmd_help()
    if command in ("-V", "--version", "version"):
        sys.stdout.write("tidepool %s\n" % version())
        return 0
    if command == "where":
        return cmd_where()
    if command == "run":
        return cmd_run(rest)
    if command.startswith("-"):
        return _error("unknown option %s\n%s" % (command, USAGE))
    return cmd_tool(args)


if __name__ == "__main__":
    sys.exit(main())
