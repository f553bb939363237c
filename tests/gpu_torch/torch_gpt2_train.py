#!/usr/bin/env python3
"""GPT-2 training under tidepool (mode A) against PyTorch's own allocator, same seed.

GPT-2 (124M, from a transformers config: random weights, no download) trains for 50 steps
with AdamW, once in a process with PyTorch's native allocator and once in a process where
tidepool.torch.install() made tidepool the allocator. The losses must match to float
tolerance (the allocator must not change a single result); the median step time and the peak
reserved memory of both are printed side by side (targets: within 2% of native, at most
native's peak; recorded in docs/benchmarks.md, not asserted here, as timings are benchmarks).
"""
import json
import os
import subprocess
import sys

STEPS = 50

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _gpt2  # noqa: E402 (beside this script)


def run(allocator):
    import torch
    if allocator == "tidepool":
        import tidepool.torch as tt
        tt.install()
    losses, median = _gpt2.train(STEPS)
    if allocator == "tidepool":
        peak = tt.memory_stats()["reserved_bytes.all.peak"]
    else:
        peak = torch.cuda.max_memory_reserved()
    print(json.dumps({"losses": losses, "median_step_s": median, "peak_reserved": peak}))


def main():
    if len(sys.argv) > 1:
        run(sys.argv[1])
        return 0
    results = {}
    for allocator in ("native", "tidepool"):
        out = subprocess.run([sys.executable, __file__, allocator], capture_output=True,
                             text=True, env=os.environ)
        if out.returncode != 0:
            print(f"{allocator} run failed:\n{out.stdout}\n{out.stderr}")
            return 1
        results[allocator] = json.loads(out.stdout.strip().splitlines()[-1])
    native, tide = results["native"], results["tidepool"]
    worst = max(abs(a - b) for a, b in zip(native["losses"], tide["losses"]))
    print(f"step  native-loss  tidepool-loss")
    for i in (0, 1, 2, 10, 25, 49):
        print(f"{i:4d}  {native['losses'][i]:.6f}     {tide['losses'][i]:.6f}")
    print(f"largest loss difference over {STEPS} steps: {worst:.3g}")
    print(f"median step time: native {native['median_step_s'] * 1e3:.2f} ms, "
          f"tidepool {tide['median_step_s'] * 1e3:.2f} ms "
          f"({(tide['median_step_s'] / native['median_step_s'] - 1) * 100:+.2f}%)")
    print(f"peak reserved: native {native['peak_reserved'] / 2**20:.1f} MiB, "
          f"tidepool {tide['peak_reserved'] / 2**20:.1f} MiB")
    if worst > 1e-4:
        print("FAIL: the losses differ")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
