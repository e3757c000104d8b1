"""FSDP2 (``fully_shard``), 2 processes on gloo, CPU: the norms are of the full gradient,
assembled from the shards, not of a rank's local shard."""

from __future__ import annotations

import json
from pathlib import Path

import torch.multiprocessing as mp

from tests.client.fsdp_worker import STEPS, WORLD, worker
from tests.client.receiver import Receiver
from tests.client.test_norms import assert_close
from tests.conftest import free_port


def test_fsdp2_norms_are_of_the_full_gradient(tmp_path: Path) -> None:
    receivers = [Receiver() for _ in range(WORLD)]
    try:
        mp.spawn(worker, args=(free_port(), [r.url for r in receivers], str(tmp_path)),
                 nprocs=WORLD, join=True)
        results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
        for rank, (rec_, result) in enumerate(zip(receivers, results, strict=True)):
            assert result["stats"]["errors"] == 0
            (run,) = rec_.runs
            assert run["world_size"] == WORLD and run["semantics"]["rank"] == rank
            layers = result["layers"]
            assert "blocks.0.attn" in layers and not any("_fsdp" in x for x in layers)
            records = rec_.steps
            assert [r["step"] for r in records] == list(range(STEPS))
            for rec, ref in zip(records, result["refs"], strict=True):
                step = rec["step"]
                grad = ref["grad"]
                assert_close(rec["grad_norm"], grad[""], f"rank {rank} step {step} total")
                for layer, got in zip(layers, rec["layer_grad_norms"], strict=True):
                    assert_close(got, grad[layer], f"rank {rank} step {step} {layer}")
                # not the local shard's norm
                assert abs(rec["grad_norm"] - ref["local_total"]) > 1e-2 * rec["grad_norm"]
                assert rec["layer_nonfinite"] == [0] * len(layers)
                assert_close(rec["clip_coef"], ref["clip_coef"], f"rank {rank} clip_coef")
                assert rec["clip_coef"] < 0.9
                assert "local_grad_norm" not in rec  # no pre-reduction norm under FSDP
                if step % 2 == 0:
                    for layer, got in zip(layers, rec["layer_param_norms"], strict=True):
                        assert_close(got, ref["weights"][layer], f"step {step} {layer} |w|")
                        # the sharded model trains like the plain one
                        assert_close(got, ref["plain_weights"][layer], f"{layer} vs plain")
                else:
                    assert "layer_param_norms" not in rec
        # Both ranks report the same full-gradient norms.
        for a, b in zip(receivers[0].steps, receivers[1].steps, strict=True):
            assert a["layer_grad_norms"] == b["layer_grad_norms"]
    finally:
        for r in receivers:
            r.close()
