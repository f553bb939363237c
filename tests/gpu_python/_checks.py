"""PASS / FAIL reporting for the GPU Python scripts (tests/gpu_python, tests/gpu_torch): one line
per check, every failure kept, and the exit status at the end. Copied into the bundle's tests/
beside the scripts (tools/gather_gpu_tests.sh), which import it from there."""
import sys
import traceback

FAILURES = []


def check(name, condition, detail=""):
    if condition:
        print("PASS %s" % name)
    else:
        print("FAIL %s %s" % (name, detail))
        FAILURES.append(name)
    return condition


def run(name, fn):
    """Runs one part, reporting an exception as a failure and going on."""
    try:
        fn()
    except Exception:  # noqa: BLE001 (report every failure, keep going)
        print("FAIL %s raised:\n%s" % (name, traceback.format_exc()))
        FAILURES.append(name)


def finish():
    """The summary line, and the exit status: 1 if anything failed."""
    print("%s: %d failure(s)" % ("FAIL" if FAILURES else "PASS", len(FAILURES)))
    return 1 if FAILURES else 0

