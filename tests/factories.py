"""Plain factory functions for test data."""

from __future__ import annotations

import math
from typing import Any

import httpx

from client_hooks.wire import dumps, encode_batch
from tests.conftest import new_run_id


def create_run(api: httpx.Client, layers: list[str] | None = None, **fields: Any) -> str:
    run_id = fields.pop("id", None) or new_run_id()
    body = {"id": run_id, "project": fields.pop("project", "tests"),
            "layers": layers if layers is not None else ["a", "b", "c"], **fields}
    resp = api.post("/api/v1/runs", content=dumps(body),
                    headers={"Content-Type": "application/json"})
    assert resp.status_code in (200, 201), resp.text
    return run_id


def make_steps(start: int, stop: int, n_layers: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "step": i,
            "wall_time": 1.7e9 + i,
            "loss": 2.0 / (1 + i),
            "lr": 1e-3,
            "grad_norm": math.sqrt(n_layers) * (1 + i % 7),
            "batch_size": 8,
            "samples": 8 * (i + 1),
            "layer_grad_norms": [float(1 + i % 7)] * n_layers,
            "layer_nonfinite": [0] * n_layers,
        }
        for i in range(start, stop)
    ]


def post_steps(api: httpx.Client, run_id: str, steps: list[dict[str, Any]],
               compress: bool = True) -> httpx.Response:
    body, headers = encode_batch(steps, compress=compress)
    return api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)


def num_steps(api: httpx.Client, run_id: str) -> int:
    resp = api.get(f"/api/v1/runs/{run_id}")
    assert resp.status_code == 200, resp.text
    return int(resp.json()["num_steps"])
