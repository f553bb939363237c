#!/usr/bin/env python3
"""torch.cuda.set_per_process_memory_fraction under tidepool (mode A): a real cap.

A small model trains; the cap is set to what it uses plus a little; an allocation past it
raises torch.OutOfMemoryError (the type training loops catch), memory_snapshot() renders with
torch.cuda._memory_viz, and training goes on afterwards.
"""
import sys

import torch
import tidepool.torch as tt


def main():
    tt.install()
    print(f"torch.OutOfMemoryError available: {tt.out_of_memory_error_available()}"
          if hasattr(tt, "out_of_memory_error_available") else "")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())

    def step():
        x = torch.randn(256, 1024, device="cuda")
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()
    total = torch.cuda.get_device_properties(0).total_memory
    reserved = tt.memory_stats()["reserved_bytes.all.current"]
    fraction = (reserved + (256 << 20)) / total
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    print(f"cap: {fraction:.4f} of {total / 2**30:.1f} GiB = {fraction * total / 2**20:.0f} MiB "
          f"({reserved / 2**20:.0f} MiB reserved)")
    raised = None
    try:
        torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as e:
        raised = "torch.OutOfMemoryError"
        print(f"1 GiB past the cap raised torch.OutOfMemoryError: {str(e)[:160]}...")
    except RuntimeError as e:
        raised = "RuntimeError"
        print(f"1 GiB past the cap raised RuntimeError (not OutOfMemoryError): {str(e)[:160]}")
    losses = [step() for _ in range(5)]
    print(f"training went on: 5 more steps, last loss {losses[-1]:.5f}")
    snapshot = tt.memory_snapshot()
    from torch.cuda import _memory_viz
    segments = _memory_viz.segment_plot(snapshot)
    trace = _memory_viz.trace_plot(snapshot)
    print(f"_memory_viz rendered: segment plot {len(segments)} bytes, trace plot {len(trace)} "
          f"bytes, {len(snapshot['segments'])} segments")
    ok = raised == "torch.OutOfMemoryError" and all(l == l for l in losses)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
