"""GPU checks of the client: no host sync in the hooks, and the overhead on a ~100M model.

1. Sync check: a training loop with ``client_hooks.watch`` (AdamW, ``clip_grad_norm_``, a
   logged loss tensor, parameter norms every step, and a second phase with bf16 autocast) runs
   its steady-state steps under ``torch.cuda.set_sync_debug_mode("error")``, which raises on
   any synchronising CUDA call made by the training thread: ``.item()``, a blocking
   device-to-host copy, ``nonzero`` ... The sender thread's waits (it synchronises on a CUDA
   event per record, by design) run on another thread and do not count. Warm-up steps run
   first without the check (one-time plan building copies layer ids to the device).
2. Overhead: bare loop vs the same loop with ``watch()`` + ``log()`` every step, on copies of
   one model, interleaved round by round; each step is timed with a ``torch.cuda.synchronize``
   around it (in this script, not in the hooks). Prints the ratio of the medians.

Run on a machine with CUDA: ``python bench/gpu_check.py`` (``--help`` for sizes). Without a
GPU it says so and exits with status 2. Record the figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import TinyGPT


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
         mon: client_hooks.Monitor | None, amp: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if mon is not None:
        mon.log(loss=loss, batch_size=x.shape[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--check-steps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this where a GPU is)")
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = TinyGPT(vocab=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads,
                   seq=args.seq).to(dev)
    n_params = sum(q.numel() for q in base.parameters())
    n_tensors = sum(1 for _ in base.parameters())
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: TinyGPT "
          f"{n_params / 1e6:.0f}M parameters in {n_tensors} tensors, "
          f"batch {args.batch} x {args.seq}")
    xs = [torch.randint(args.vocab, (args.batch, args.seq + 1), device=dev) for _ in range(4)]

    # 1. no host sync on the training thread
    for amp in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mon = client_hooks.watch(model, opt, project="gpu-check", server=None, offline=True,
                                 param_every=1)
        for i in range(5):  # warm-up: plans, allocator, lazy init
            step(model, opt, xs[i % 4], mon, amp)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(args.check_steps):
                step(model, opt, xs[i % 4], mon, amp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        mon.close()
        print(f"sync check ({'bf16 autocast' if amp else 'fp32'}, param norms every step): "
              f"{args.check_steps} steps under set_sync_debug_mode('error'): no sync; "
              f"client stats {mon.stats}")

    # 2. overhead, interleaved
    runs: dict[str, list[float]] = {"bare": [], "gradsentry": []}
    setups = {}
    for name in runs:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mon = (client_hooks.watch(model, opt, project="gpu-check", server=None, offline=True)
               if name == "gradsentry" else None)
        setups[name] = (model, opt, mon)
    for r in range(args.rounds + 3):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for name in order:
            model, opt, mon = setups[name]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, opt, xs[r % 4], mon, amp=True)
            torch.cuda.synchronize()
            if r >= 3:
                runs[name].append(time.perf_counter() - t0)
    for _, _, mon in setups.values():
        if mon is not None:
            mon.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"overhead, bf16 autocast, medians of {args.rounds} interleaved steps: bare "
          f"{1e3 * med['bare']:.2f} ms, with hooks {1e3 * med['gradsentry']:.2f} ms, ratio "
          f"{med['gradsentry'] / med['bare']:.4f} (+{1e3 * (med['gradsentry'] - med['bare']):.2f} "
          f"ms per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
