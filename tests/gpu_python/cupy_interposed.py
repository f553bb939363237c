#!/usr/bin/env python3
"""CuPy, unmodified, under the LD_PRELOAD interposer (issue 13: "run the same workload through
the interposer too").

Starts cupy_workload --interposed (beside this script) in a child process with
LD_PRELOAD=libtidepool_preload.so and TIDEPOOL_STATS=1, with CuPy's own pool off so that every
array is a cudaMalloc: the child checks its results against NumPy as the installed run does, and
the interposer's statistics line at exit must show that tidepool served allocations. Prints the
child's output, then PASS / FAIL lines; exits 1 if anything failed.

The bundle's layout (tools/gather_gpu_tests.sh): this script in tests/, the preload library in
installed/lib/.
"""

import os
import re
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from _checks import check, finish  # noqa: E402 (beside this script)


def main():
    preload = os.path.join(os.path.dirname(here), "installed", "lib", "libtidepool_preload.so")
    if not check("the bundle has the interposer", os.path.exists(preload), preload):
        return finish()
    # In the bundle the scripts lose their .py (tools/gather_gpu_tests.sh).
    workload = os.path.join(here, "cupy_workload")
    if not os.path.exists(workload):
        workload += ".py"
    env = dict(os.environ, LD_PRELOAD=preload, TIDEPOOL_STATS="1")
    started = time.time()
    child = subprocess.run(
        [sys.executable, workload, "--interposed"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    elapsed = time.time() - started
    print(child.stdout, end="")
    print("child: exit status %d, %.1f s" % (child.returncode, elapsed))
    check("the workload under the interposer passed", child.returncode == 0
          and "PASS: 0 failure(s)" in child.stdout)
    served = re.search(r"tidepool: device 0: (\d+) allocations served by tidepool", child.stdout)
    check("the interposer served CuPy's allocations", served is not None and int(served.group(1)) > 0,
          "no statistics line with allocations served")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
