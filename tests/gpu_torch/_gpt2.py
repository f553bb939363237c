"""GPT-2 training steps for the PyTorch GPU scripts (torch_gpt2_train, torch_preload_gpt2): the
same model, seed, data and loop wherever an allocator is compared, so their losses can be
compared to float tolerance. Copied into the bundle's tests/ beside the scripts."""
import time

BATCH, SEQ = 8, 512


def train(steps):
    """GPT-2 124M from a transformers config (random weights, no download), AdamW, `steps` steps
    of batch BATCH x SEQ tokens. Returns the losses and the median step time after 5 warm-up
    steps, in seconds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cuda").manual_seed(1)
    losses, times = [], []
    for _ in range(steps):
        ids = torch.randint(0, 50257, (BATCH, SEQ), device="cuda", generator=g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = sorted(times[5:])
    return losses, steady[len(steady) // 2]
