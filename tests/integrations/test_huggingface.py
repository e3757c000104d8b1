"""GradsentryCallback under a real transformers Trainer: pre-clip norms, lr and logged loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from client_hooks.integrations.huggingface import GradsentryCallback
from tests.client import models
from tests.client.receiver import Receiver

RTOL = 1e-5
STEPS, BATCH, CLIP = 4, 4, 0.05


class HFLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm = models.TinyLM()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.lm(input_ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, models.VOCAB), labels.reshape(-1))
        return {"loss": loss}


class RecordingTrainer(Trainer):
    """Snapshots the gradient after each backward: before the Trainer clips it."""

    refs: list[dict[str, float]]
    losses: list[float]

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.refs.append(models.reference_norms(model, models.snapshot(model)))
        self.losses.append(float(loss))
        return loss


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def dataset(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, models.VOCAB, (n, models.SEQ + 1), generator=gen)
    return [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_huggingface_pre_clip_norms(receiver: Receiver, tmp_path: Path, accumulate: int) -> None:
    model = HFLM()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulate,
        max_grad_norm=CLIP, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True)
    callback = GradsentryCallback(project="tests", run="hf-1", server=receiver.url,
                                  flush_interval=60)
    logs = LogRecorder()
    trainer = RecordingTrainer(model=model, args=args,
                               train_dataset=dataset(STEPS * BATCH * accumulate),
                               callbacks=[callback, logs])
    trainer.refs, trainer.losses = [], []
    trainer.train()
    assert callback.monitor is None  # closed (and flushed) at the end of training

    (run,) = receiver.runs
    records = receiver.steps
    assert [r["step"] for r in records] == list(range(STEPS))
    assert len(trainer.refs) == len(trainer.losses) == accumulate * STEPS
    assert len(logs.logs) == STEPS
    # The last backward of each step leaves the accumulated gradient; training_step returns
    # each micro-batch loss divided by the accumulation steps: their sum is the step's mean.
    refs = trainer.refs[accumulate - 1::accumulate]
    losses = [sum(trainer.losses[i:i + accumulate]) for i in range(0, len(trainer.losses),
                                                                   accumulate)]
    for rec, ref, log, loss in zip(records, refs, logs.logs, losses, strict=True):
        assert ref[""] > 4 * CLIP  # the clip really changed the gradient
        assert math.isclose(rec["grad_norm"], ref[""], rel_tol=RTOL)
        assert math.isclose(rec["grad_norm"], log["grad_norm"], rel_tol=RTOL)  # HF's pre-clip
        got = dict(zip(run["layers"], rec["layer_grad_norms"], strict=True))
        assert got.keys() == ref.keys() - {""}
        for layer, norm in got.items():
            assert math.isclose(norm, ref[layer], rel_tol=RTOL), (rec["step"], layer)
        assert math.isclose(rec["clip_coef"], CLIP / ref[""], rel_tol=1e-4)
        assert rec["loss"] == log["loss"] and math.isclose(rec["loss"], loss, rel_tol=1e-6)
        assert math.isclose(rec["lr"], log["learning_rate"], rel_tol=1e-12)
        assert rec["batch_size"] == BATCH * accumulate and rec["micro_batches"] == accumulate
