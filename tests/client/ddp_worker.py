"""The DDP test's worker processes, kept apart from the test module so that a spawned child
imports only torch, client_hooks and the test model (not the collector's test fixtures)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import client_hooks
from tests.client import models

WORLD, SHARD, STEPS = 2, 4, 3


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, models.VOCAB), tokens[:, 1:].reshape(-1))


def _norms_of(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Brute-force norms of a plain (not DDP) copy's gradient of the mean loss on ``tokens``."""
    _loss(model, tokens).backward()
    return models.reference_norms(model, models.snapshot(model))


def _worker(rank: int, port: int, urls: list[str], out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # everything is on 127.0.0.1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model, opt = models.make(seed=rank)  # different inits: DDP broadcasts rank 0's
        ddp = DistributedDataParallel(model)
        refs: list[dict[str, object]] = []
        indices = []
        # One monitor per rank sending to its own receiver, and a default one (rank 0 only).
        mine = client_hooks.watch(ddp, opt, run="ddp", server=urls[rank], all_ranks=True,
                                  flush_interval=60)
        default = client_hooks.watch(ddp, opt, run="ddp-default", server=urls[2],
                                     flush_interval=60)
        for step in range(STEPS):
            tokens = torch.randint(0, models.VOCAB, (WORLD * SHARD, models.SEQ + 1),
                                   generator=torch.Generator().manual_seed(step))
            shard = tokens[rank * SHARD:(rank + 1) * SHARD]
            plain = copy.deepcopy(model)  # same weights, no DDP: the independent references
            refs.append({"global": _norms_of(plain, tokens),
                         "local": _norms_of(copy.deepcopy(model), shard)[""]})
            _loss(ddp, shard).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
            mine.log()
            indices.append(default.log())
        assert mine.flush(timeout=10) and default.flush(timeout=10)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"refs": refs, "run_id": mine.run_id, "world": mine.world_size,
             "indices": indices, "stats": default.stats}))
        mine.close()
        default.close()
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
