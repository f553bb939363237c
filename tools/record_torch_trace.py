#!/usr/bin/env python3
"""Records a PyTorch workload's allocation trace on the GPU host, as the bundled traces were.

    record_torch_trace.py WORKLOAD OUT_DIR          (WORKLOAD: one of WORKLOADS below)

Runs the workload three times, each in a process of its own (PyTorch reads its allocator
configuration once): with PyTorch's allocator history on, to write OUT_DIR/WORKLOAD.csv.gz in the
replay format (trace/trace.h: Thread,Time,Action,Pointer,Size,Stream); then with PyTorch's
default allocator and with `expandable_segments:True`, each writing PyTorch's own peaks beside
the trace (WORKLOAD.json, WORKLOAD.expandable.json, the keys of the bundled JSON files). The
history run is not timed or measured: recording stack-free history still costs.

The workloads are unlike the bundled ones (issue 14), built from configs (no downloads):
  varlen_small_infer   GPT-2-small-shaped inference under 1 GiB, batch and length varying per step
  generate_tokens      a generation loop whose KV cache grows one token at a time
  checkpoint_amp_train GPT-2 training with activation checkpointing and bf16 autocast

Only the history-to-trace conversion runs off the GPU host: tests/python/record_trace_test.py
checks it on made-up history entries.
"""

import gzip
import json
import os
import random
import subprocess
import sys
import time

MIB = 1 << 20


def history_to_rows(entries):
    """The replay rows of PyTorch's allocator history (device_traces entries, oldest first).

    `alloc` is an allocation; `free_requested` the caller's free (a `free_completed` that follows
    is PyTorch waiting for other streams, which replay leaves to the allocator under test). Every
    other action (segments, snapshots, OOMs) is the allocator's own business. An allocation of a
    pointer still live, or a free of one that is not, cannot be replayed and is an error.
    """
    rows = []
    live = {}
    first_time = None
    for index, entry in enumerate(entries):
        action = entry.get("action")
        if action not in ("alloc", "free_requested"):
            continue
        time_us = entry.get("time_us", index)
        if first_time is None:
            first_time = time_us
        pointer = int(entry["addr"])
        size = int(entry["size"])
        stream = int(entry.get("stream", 0))
        if action == "alloc":
            if pointer in live:
                raise ValueError(f"history entry {index}: {pointer:#x} allocated while live")
            live[pointer] = size
            rows.append((0, time_us - first_time, "allocate", pointer, size, stream))
        else:
            if pointer not in live:
                raise ValueError(f"history entry {index}: free of {pointer:#x}, which is not live")
            rows.append((0, time_us - first_time, "free", pointer, live.pop(pointer), stream))
    return rows


def peak_live_bytes(rows):
    live = 0
    peak = 0
    for _, _, action, _, size, _ in rows:
        live += size if action == "allocate" else -size
        peak = max(peak, live)
    return peak


def write_trace(rows, path):
    with gzip.open(path, "wt", newline="") as out:
        out.write("Thread,Time,Action,Pointer,Size,Stream\n")
        for thread, time_us, action, pointer, size, stream in rows:
            out.write(f"{thread},{time_us},{action},{pointer:#x},{size},{stream:#x}\n")


# --- Workloads (GPU host only: they import torch and transformers) ---------------------------


def _gpt2(n_layer, n_embd, n_head, n_positions=1024):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=50257)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).cuda()


def varlen_small_infer():
    import torch

    model = _gpt2(n_layer=6, n_embd=512, n_head=8).eval()
    rng = random.Random(1)
    with torch.no_grad():
        for _ in range(400):
            batch = rng.choice([1, 2, 3, 4, 6, 8])
            length = rng.randint(8, 384)
            ids = torch.randint(0, 50257, (batch, length), device="cuda")
            model(ids).logits.argmax(-1)


def generate_tokens():
    import torch

    model = _gpt2(n_layer=12, n_embd=768, n_head=12).eval()
    rng = random.Random(2)
    with torch.no_grad():
        for _ in range(4):
            prompt = torch.randint(0, 50257, (rng.choice([1, 2, 4]), rng.randint(16, 96)),
                                   device="cuda")
            past = None
            token = prompt
            for _ in range(rng.randint(200, 400)):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)


def checkpoint_amp_train():
    import torch

    model = _gpt2(n_layer=12, n_embd=768, n_head=12)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = random.Random(3)
    for _ in range(30):
        ids = torch.randint(0, 50257, (8, rng.choice([256, 512, 768])), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


WORKLOADS = {
    "varlen_small_infer": varlen_small_infer,
    "generate_tokens": generate_tokens,
    "checkpoint_amp_train": checkpoint_amp_train,
}


def run_child(workload, mode, out_dir):
    """In a child process: runs the workload once, writing what `mode` asks for."""
    import torch

    torch.cuda.init()
    if mode == "history":
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                                 max_entries=10_000_000)
    start = time.time()
    WORKLOADS[workload]()
    torch.cuda.synchronize()
    wall = time.time() - start
    if mode == "history":
        entries = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
        rows = history_to_rows(entries)
        write_trace(rows, os.path.join(out_dir, f"{workload}.csv.gz"))
        summary = {"allocs": sum(r[2] == "allocate" for r in rows),
                   "frees": sum(r[2] == "free" for r in rows),
                   "trace_peak_live_bytes": peak_live_bytes(rows)}
        with open(os.path.join(out_dir, f"{workload}.history.json"), "w") as out:
            json.dump(summary, out)
        return
    stats = torch.cuda.memory_stats()
    with open(os.path.join(out_dir, f"{workload}.history.json")) as f:
        history = json.load(f)
    record = {
        "workload": workload,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "allocs": history["allocs"],
        "frees": history["frees"],
        "still_live_at_end": history["allocs"] - history["frees"],
        "trace_peak_live_bytes": history["trace_peak_live_bytes"],
        "torch_max_allocated_bytes": torch.cuda.max_memory_allocated(),
        "torch_max_reserved_bytes": torch.cuda.max_memory_reserved(),
        "torch_num_alloc_retries": stats.get("num_alloc_retries", 0),
        "torch_num_device_alloc": stats.get("num_device_alloc", 0),
        "torch_reserved_over_trace_peak":
            torch.cuda.max_memory_reserved() / history["trace_peak_live_bytes"],
        "wall_s": wall,
    }
    name = f"{workload}.expandable.json" if mode == "expandable" else f"{workload}.json"
    with open(os.path.join(out_dir, name), "w") as out:
        json.dump(record, out, indent=1)


def main(argv):
    if len(argv) == 4 and argv[1] == "--child":
        mode = argv[2]
        workload, out_dir = argv[3].split(":", 1)
        run_child(workload, mode, out_dir)
        return 0
    if len(argv) != 3 or argv[1] not in WORKLOADS:
        print(f"usage: {argv[0]} {{{','.join(WORKLOADS)}}} OUT_DIR", file=sys.stderr)
        return 2
    workload, out_dir = argv[1], argv[2]
    os.makedirs(out_dir, exist_ok=True)
    for mode, conf in (("history", ""), ("default", ""),
                       ("expandable", "expandable_segments:True")):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
        subprocess.run([sys.executable, argv[0], "--child", mode, f"{workload}:{out_dir}"],
                       env=env, check=True)
    with open(os.path.join(out_dir, f"{workload}.json")) as f:
        default = json.load(f)
    with open(os.path.join(out_dir, f"{workload}.expandable.json")) as f:
        expandable = json.load(f)
    os.remove(os.path.join(out_dir, f"{workload}.history.json"))
    print(f"{workload}: {default['allocs']} allocations, peak live "
          f"{default['trace_peak_live_bytes'] / MIB:.1f} MiB; PyTorch default "
          f"{default['torch_reserved_over_trace_peak']:.3f} "
          f"({default['torch_num_device_alloc']} device allocations), expandable "
          f"{expandable['torch_reserved_over_trace_peak']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
