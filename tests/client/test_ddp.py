"""DDP, 2 processes on gloo: norms of the all-reduced gradient, each rank's local norm too."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.client import models
from tests.client.ddp_worker import SHARD, STEPS, WORLD, _norms_of, _worker
from tests.client.receiver import Receiver
from tests.client.test_norms import assert_close, assert_norms
from tests.conftest import free_port


def test_ddp_all_reduced_and_local_norms(tmp_path: Path) -> None:
    receivers = [Receiver() for _ in range(3)]
    try:
        mp.spawn(_worker, args=(free_port(), [r.url for r in receivers], str(tmp_path)),
                 nprocs=WORLD, join=True)
        results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
        assert [r["run_id"] for r in results] == ["ddp", "ddp-rank1"]
        assert [r["world"] for r in results] == [2, 2]
        for rank, (rec_, result) in enumerate(zip(receivers[:2], results, strict=True)):
            (run,) = rec_.runs
            assert run["world_size"] == 2
            assert run["semantics"]["world_size"] == 2 and run["semantics"]["rank"] == rank
            assert run["layers"] == models.LAYERS  # "module." stripped
            records = rec_.steps
            assert [r["step"] for r in records] == list(range(STEPS))
            for rec, ref in zip(records, result["refs"], strict=True):
                assert_norms(rec, ref["global"])  # the averaged gradient, pre-clip
                assert_close(rec["local_grad_norm"], ref["local"], f"rank {rank} local")
                assert abs(rec["local_grad_norm"] - rec["grad_norm"]) > 1e-3 * rec["grad_norm"]
                assert rec["clip_coef"] < 1.0 and rec["micro_batches"] == 1
        # Each rank saw the same all-reduced gradient.
        for a, b in zip(receivers[0].steps, receivers[1].steps, strict=True):
            assert a["layer_grad_norms"] == b["layer_grad_norms"]
        # By default only rank 0 sends; rank 1 still counts steps and returns the index.
        assert [r["id"] for r in receivers[2].runs] == ["ddp-default"]
        assert len(receivers[2].steps) == STEPS
        assert [r["indices"] for r in results] == [list(range(STEPS))] * WORLD
        assert results[1]["stats"]["errors"] == 0
    finally:
        for r in receivers:
            r.close()


def test_reference_is_not_trivial() -> None:
    # The global reference is the mean of the shards' gradients, not either shard's.
    model, _ = models.make(seed=0)
    tokens = torch.randint(0, models.VOCAB, (WORLD * SHARD, models.SEQ + 1),
                           generator=torch.Generator().manual_seed(0))
    full = _norms_of(copy.deepcopy(model), tokens)[""]
    halves = [_norms_of(copy.deepcopy(model), tokens[i * SHARD:(i + 1) * SHARD])[""]
              for i in range(WORLD)]
    assert all(not math.isclose(full, h, rel_tol=1e-3) for h in halves)
