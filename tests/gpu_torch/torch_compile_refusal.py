#!/usr/bin/env python3
"""torch.compile(mode="reduce-overhead") under tidepool (mode A): refused in words.

CUDA graph trees checkpoint the native caching allocator's state, which PyTorch offers no
pluggable allocator; tidepool.torch.install() makes the attempt fail with tidepool's message
(what to do instead) rather than PyTorch's "does not yet support". A plain torch.compile
(no CUDA graphs) works and gives the eager result.
"""
import sys

import torch
import tidepool
import tidepool.torch as tt


def main():
    tt.install()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).cuda()
    x = torch.randn(8, 64, device="cuda")
    plain = torch.compile(model)
    ok = torch.allclose(plain(x), model(x), rtol=1e-4, atol=1e-5)
    print(f"{'PASS' if ok else 'FAIL'} torch.compile without CUDA graphs matches eager")
    graphed = torch.compile(model, mode="reduce-overhead")
    message = None
    try:
        for _ in range(5):
            graphed(x)
            torch.cuda.synchronize()
    except Exception as e:  # the refusal may come wrapped by dynamo / inductor
        message = f"{type(e).__name__}: {e}"
    refused = message is not None and "tidepool" in message and "reduce-overhead" in message
    print(f"{'PASS' if refused else 'FAIL'} reduce-overhead refused in words: "
          f"{(message or 'no error')[:300]}")
    return 0 if ok and refused else 1


if __name__ == "__main__":
    sys.exit(main())
