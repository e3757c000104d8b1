"""The FSDP2 test's worker processes (``fully_shard`` on gloo, CPU), apart from the test module
so that a spawned child imports only torch, client_hooks and the demo model."""

from __future__ import annotations

import copy
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import TinyGPT
from client_hooks.norms import layer_name

WORLD, SHARD, STEPS, VOCAB, SEQ = 2, 4, 3, 32, 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyGPT(vocab=VOCAB, dim=32, depth=2, heads=2, seq=SEQ)


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def layer_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer and total ("") L2 norms in float64, by brute force."""
    sq: dict[str, float] = defaultdict(float)
    for name, t in tensors.items():
        s = float(t.detach().double().pow(2).sum())
        sq[layer_name(name)] += s
        sq[""] += s
    return {k: math.sqrt(v) for k, v in sq.items()}


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (WORLD * SHARD, SEQ + 1),
                         generator=torch.Generator().manual_seed(100 + step))


def worker(rank: int, port: int, urls: list[str], out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model = make_model()
        plain = copy.deepcopy(model)  # the unsharded reference, trained in lockstep
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        refs: list[dict[str, object]] = []
        mon = client_hooks.watch(model, opt, run="fsdp", server=urls[rank], all_ranks=True,
                                 flush_interval=60, param_every=2)
        for step in range(STEPS):
            tokens = batch(step)
            loss_of(plain, tokens).backward()  # the global batch, no sharding
            grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
            pre = layer_norms(grads)
            post_total = min(1.0, 0.05 / (pre[""] + 1e-6)) * pre[""]
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
            plain_opt.step()
            plain_opt.zero_grad()
            loss_of(model, tokens[rank * SHARD:(rank + 1) * SHARD]).backward()
            local_total = math.sqrt(sum(float(p.grad.to_local().double().pow(2).sum())
                                        for p in model.parameters()))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
            mon.log()
            weights = {n: p.full_tensor() for n, p in model.named_parameters()}
            refs.append({"grad": pre, "clip_coef": post_total / pre[""],
                         "local_total": local_total, "weights": layer_norms(weights),
                         "plain_weights": layer_norms(dict(plain.named_parameters()))})
        assert mon.flush(timeout=10)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"refs": refs, "layers": mon.layers, "stats": mon.stats}))
        mon.close()
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
