#!/usr/bin/env python3
"""torch.cuda.graph through tidepool's pool hooks (mode A).

Captures and replays, checking outputs against eager runs: a training step of a small MLP
(100 replays, parameters compared with an eager copy), a GPT-2 decode step (100 replays), two
graphs sharing one pool (pool=g1.pool()), and torch.cuda.make_graphed_callables.
"""
import sys

import torch
import tidepool.torch as tt


def check(name, ok):
    print(f"{'PASS' if ok else 'FAIL'} {name}")
    return ok


def mlp_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).cuda()
    eager = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).cuda()
    eager.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.01)
    x = torch.randn(64, 256, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up, as the docs say, on a side stream
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            eager_opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(eager(x), y).backward()
            eager_opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    ok = True
    for i in range(100):
        xi = torch.randn(64, 256, device="cuda")
        yi = torch.randint(0, 10, (64,), device="cuda")
        x.copy_(xi)
        y.copy_(yi)
        g.replay()
        eager_opt.zero_grad(set_to_none=True)
        eager_loss = torch.nn.functional.cross_entropy(eager(xi), yi)
        eager_loss.backward()
        eager_opt.step()
        ok = ok and torch.allclose(loss, eager_loss, rtol=1e-4, atol=1e-5)
    ok = ok and all(torch.allclose(a, b, rtol=1e-3, atol=1e-5)
                    for a, b in zip(model.parameters(), eager.parameters()))
    return check("MLP training step: 100 replays match eager", ok), g


def gpt2_decode_step():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4)).cuda().eval()
    ids = torch.randint(0, 50257, (4, 32), device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(ids)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = model(ids).logits
        ok = True
        for _ in range(100):
            new = torch.randint(0, 50257, (4, 32), device="cuda")
            ids.copy_(new)
            g.replay()
            ok = ok and torch.allclose(logits, model(new).logits, rtol=1e-3, atol=1e-3)
    return check("GPT-2 decode step: 100 replays match eager", ok)


def shared_pool():
    a = torch.randn(1024, 1024, device="cuda")
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        (a @ a).relu()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g1):
        b = (a @ a).relu()
    with torch.cuda.graph(g2, pool=g1.pool()):
        c = (b * 2).sum()
    ok = g1.pool() == g2.pool()
    for _ in range(10):
        a.normal_()
        g1.replay()
        g2.replay()
        ok = ok and torch.allclose(c, ((a @ a).relu() * 2).sum(), rtol=1e-3)
    handle = torch.cuda.graph_pool_handle()
    g3, g4 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g3, pool=handle):
        d = a + 1
    with torch.cuda.graph(g4, pool=handle):
        e = d * 3
    g3.replay()
    g4.replay()
    ok = ok and torch.allclose(e, (a + 1) * 3)
    return check("two graphs share pool=g1.pool(), two share graph_pool_handle()", ok)


def graphed_callables():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).cuda()
    reference = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).cuda()
    reference.load_state_dict(module.state_dict())
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (x,))
    ok = True
    for _ in range(10):
        xi = torch.randn(16, 64, device="cuda", requires_grad=True)
        out = graphed(xi)
        out.sum().backward()
        xr = xi.detach().clone().requires_grad_(True)
        ref = reference(xr)
        ref.sum().backward()
        ok = ok and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        ok = ok and torch.allclose(xi.grad, xr.grad, rtol=1e-4, atol=1e-5)
    return check("make_graphed_callables: forward and backward match eager", ok)


def main():
    tt.install()
    results = [mlp_training_step()[0], gpt2_decode_step(), shared_pool(), graphed_callables()]
    stats = tt.memory_stats()
    print(f"tidepool: {stats['reserved_bytes.all.current'] / 2**20:.1f} MiB reserved, "
          f"{stats['allocated_bytes.all.current'] / 2**20:.1f} MiB allocated after the graphs")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
