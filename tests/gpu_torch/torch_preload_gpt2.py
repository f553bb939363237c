#!/usr/bin/env python3
"""Unmodified PyTorch under the interposer: GPT-2 training with PYTORCH_NO_CUDA_MEMORY_CACHING=1
and LD_PRELOAD=libtidepool_preload.so, against PyTorch with its own caching and with caching off.

PyTorch with caching off calls the CUDA runtime's cudaMalloc / cudaFree for every tensor; under
the interposer tidepool serves them. 50 steps of GPT-2 (124M, batch 8 x 512, AdamW), same seed,
each configuration in its own process: the losses must match native caching's to float
tolerance, and tidepool must have served the allocations (TIDEPOOL_STATS=1 line). Step times
are printed side by side (target: at least 95% of native caching speed; a benchmark, recorded in
docs/benchmarks.md, not asserted).
"""
import json
import os
import re
import subprocess
import sys

STEPS = 50

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _gpt2  # noqa: E402 (beside this script)


def run():
    losses, median = _gpt2.train(STEPS)
    print(json.dumps({"losses": losses, "median_step_s": median}))


def main():
    if len(sys.argv) > 1:
        run()
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    preload = os.path.join(here, "installed", "lib", "libtidepool_preload.so")
    configurations = {
        "native caching": {},
        "native, caching off": {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        "caching off, under tidepool's interposer": {
            "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "LD_PRELOAD": preload, "TIDEPOOL_STATS": "1"},
    }
    results = {}
    for name, extra in configurations.items():
        env = dict(os.environ, **extra)
        out = subprocess.run([sys.executable, __file__, "run"], capture_output=True, text=True,
                             env=env)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            return 1
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        results[name]["stderr"] = out.stderr
    base = results["native caching"]
    ok = True
    for name, result in results.items():
        worst = max(abs(a - b) for a, b in zip(base["losses"], result["losses"]))
        ok = ok and worst < 1e-4
        print(f"{name:42s} median step {result['median_step_s'] * 1e3:8.2f} ms "
              f"({base['median_step_s'] / result['median_step_s'] * 100:6.1f}% of native caching "
              f"speed), largest loss difference {worst:.3g}")
    served = re.search(r"tidepool: device 0: (\d+) allocations served by tidepool, (\d+) frees "
                       r"passed", results["caching off, under tidepool's interposer"]["stderr"])
    if served:
        print(f"the interposer served {served.group(1)} allocations ({served.group(2)} frees "
              f"passed to the driver)")
    ok = ok and served is not None and int(served.group(1)) > 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
