"""AMP + clipping + accumulation through the client, stored and read back on both databases."""

from __future__ import annotations

import math

import httpx
import torch
from sqlalchemy import select

import client_hooks
from server.db import make_engine
from server.models import Run, Step
from tests.client import models
from tests.conftest import Collector, new_run_id


def _values(series: dict[str, list[float | str]]) -> list[float]:
    return [float(v.replace("Infinity", "inf")) if isinstance(v, str) else float(v)
            for v in series["max"]]


def test_clip_scale_overflow_and_micro_batches_are_stored(collector: Collector,
                                                         api: httpx.Client) -> None:
    model, opt = models.make(seed=12)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    run_id = new_run_id("sem")
    poison = 1

    def inject(grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf if step == poison else grad

    model.fc2.bias.register_hook(inject)
    with client_hooks.watch(model, opt, run=run_id, server=collector.url,
                            scaler=scaler) as mon:
        for step in range(4):
            for k in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = models.loss_of(model, seed=10 * step + k) / 2
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            mon.log(loss=loss)
        assert mon.flush(timeout=30)
        assert mon.stats["overflow"] == 1 and mon.stats["sent"] == 4

    got = api.get(f"/api/v1/runs/{run_id}/series", params={
        "names": "clip_coef,loss_scale,micro_batches,local_grad_norm,grad_norm"}).json()
    by_name = {s["name"]: s for s in got["series"]}
    assert by_name["micro_batches"]["step"] == [0, 1, 2, 3]
    assert _values(by_name["micro_batches"]) == [2, 2, 2, 2]
    assert _values(by_name["loss_scale"]) == [256, 256, 128, 128]
    assert by_name["clip_coef"]["step"] == [0, 2, 3]  # none for the overflowed step
    assert all(0 < c < 1 for c in _values(by_name["clip_coef"]))
    assert by_name["grad_norm"]["step"] == [0, 2, 3]
    assert by_name["local_grad_norm"]["step"] == []  # world size 1

    engine = make_engine(collector.settings.database_url)
    try:
        with engine.connect() as conn:
            run_pk = conn.execute(select(Run.pk).where(Run.id == run_id)).scalar_one()
            flags = conn.execute(select(Step.step, Step.overflow).where(Step.run_pk == run_pk)
                                 .order_by(Step.step)).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in flags] == [(0, False), (1, True), (2, False), (3, False)]
