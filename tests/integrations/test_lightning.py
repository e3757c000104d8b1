"""GradsentryCallback under a real Lightning Trainer: pre-clip norms with accumulation."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client_hooks.integrations.lightning import GradsentryCallback
from tests.client import models
from tests.client.receiver import Receiver

pytestmark = [
    # Lightning's advice to use DataLoader workers: irrelevant for an in-memory dataset.
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    # Lightning 2.6 builds torch.utils._pytree.LeafSpec, which torch 2.13 deprecates: not ours.
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
]

RTOL = 1e-5
STEPS, ACCUMULATE, BATCH, CLIP = 5, 2, 4, 0.05


class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm = models.TinyLM()
        self.refs: list[dict[str, float]] = []  # pre-clip norms, one per optimizer step
        self.losses: list[float] = []  # raw micro-batch losses

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> dict[str, Any]:
        (tokens,) = batch
        logits = self.lm(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, models.VOCAB),
                                                 tokens[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return {"loss": loss}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning clips after this hook: these are the accumulated, pre-clip gradients.
        self.refs.append(models.reference_norms(self, models.snapshot(self)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, models.VOCAB, (STEPS * ACCUMULATE * BATCH, models.SEQ + 1),
                           generator=gen)
    return DataLoader(TensorDataset(tokens), batch_size=BATCH)


def fit(receiver: Receiver) -> tuple[LitLM, list[dict[str, Any]], list[str]]:
    module = LitLM()
    callback = GradsentryCallback(project="tests", run="lightning-1", server=receiver.url,
                                  batch_size=ACCUMULATE * BATCH, flush_interval=60)
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE,
                         gradient_clip_val=CLIP, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, loader())
    assert callback.monitor is None  # closed (and flushed) at the end of training
    (run,) = receiver.runs
    return module, receiver.steps, run["layers"]


def test_lightning_pre_clip_norms_with_accumulation(receiver: Receiver) -> None:
    module, records, layers = fit(receiver)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert len(module.refs) == STEPS
    for rec, ref, i in zip(records, module.refs, range(STEPS), strict=True):
        assert ref[""] > 4 * CLIP  # the clip really changed the gradient
        assert math.isclose(rec["grad_norm"], ref[""], rel_tol=RTOL)
        got = dict(zip(layers, rec["layer_grad_norms"], strict=True))
        assert got.keys() == ref.keys() - {""}
        for layer, norm in got.items():
            assert math.isclose(norm, ref[layer], rel_tol=RTOL), (i, layer, norm, ref[layer])
        assert rec["micro_batches"] == ACCUMULATE
        step_losses = module.losses[ACCUMULATE * i: ACCUMULATE * (i + 1)]
        assert math.isclose(rec["loss"], sum(step_losses) / ACCUMULATE, rel_tol=1e-6)
        assert rec["lr"] == 0.1 and rec["batch_size"] == ACCUMULATE * BATCH


def test_lightning_clip_coef(receiver: Receiver) -> None:
    module, records, _ = fit(receiver)
    for rec, ref in zip(records, module.refs, strict=True):
        assert math.isclose(rec["clip_coef"], CLIP / ref[""], rel_tol=1e-4)
