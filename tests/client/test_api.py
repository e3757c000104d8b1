"""The public surface: pinned names, torch-and-stdlib-only imports, setup checks, hygiene."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import client_hooks
from client_hooks.monitor import RUN_ID_RE
from client_hooks.norms import LayerNorms
from tests.client import models
from tests.client.receiver import Receiver

PACKAGE = Path(client_hooks.__file__).parent
FORBIDDEN = ("fastapi", "sqlalchemy", "numpy", "server", "requests", "pydantic", "httpx")


def test_public_names_are_pinned() -> None:
    assert client_hooks.__all__ == ["watch", "Monitor", "WIRE_VERSION"]
    assert client_hooks.WIRE_VERSION == client_hooks.wire.WIRE_VERSION
    assert callable(client_hooks.watch) and isinstance(client_hooks.Monitor, type)


def modules_after(code: str) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_import_loads_no_server_side_packages() -> None:
    # The collector imports client_hooks.wire: the package itself must load only the stdlib.
    got = modules_after("import json, sys; import client_hooks; "
                        "print(json.dumps({'all': sorted(sys.modules)}))")
    loaded = {m.partition(".")[0] for m in got["all"]}
    assert not loaded & {*FORBIDDEN, "torch"}, sorted(loaded & {*FORBIDDEN, "torch"})


def test_client_code_adds_only_stdlib_to_torch() -> None:
    # torch may load numpy itself; everything client_hooks adds on top must be stdlib.
    got = modules_after(
        "import json, sys, torch; before = set(sys.modules); "
        "import client_hooks, client_hooks.monitor, client_hooks.sender, client_hooks.record; "
        "client_hooks.watch; new = sorted(set(sys.modules) - before); "
        "print(json.dumps({'new': new, 'all': sorted(sys.modules)}))")
    new = {m.partition(".")[0] for m in got["new"]} - {"client_hooks"}
    assert new <= set(sys.stdlib_module_names), sorted(new - set(sys.stdlib_module_names))
    loaded = {m.partition(".")[0] for m in got["all"]}
    assert not loaded & (set(FORBIDDEN) - {"numpy"})


def test_source_imports_only_torch_and_stdlib() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch", "client_hooks"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.partition(".")[0] in allowed, f"{path.name} imports {name}"


def test_run_ids_generated_and_validated() -> None:
    model, opt = models.make()
    with client_hooks.watch(model, opt, project="my proj/x", enabled=False) as mon:
        assert RUN_ID_RE.match(mon.run_id)
        assert re.fullmatch(r"my-proj-x-\d{8}-\d{6}-[0-9a-f]{6}", mon.run_id)
    for bad in ("", "-lead", "has space", "a/b", "x" * 129):
        with pytest.raises(ValueError, match="run id"):
            client_hooks.watch(model, opt, run=bad, enabled=False)
    with pytest.raises(ValueError, match="server"):
        client_hooks.watch(model, opt, server="127.0.0.1:8000", enabled=False)


def hook_counts(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    # Private registries, read only to prove close() leaves the model as it found it.
    grads = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return grads, len(opt._optimizer_step_post_hooks)


def test_hooks_are_owned_and_removed(receiver: Receiver) -> None:
    model, opt = models.make()
    attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    mon = client_hooks.watch(model, opt, server=receiver.url, flush_interval=60)
    assert hook_counts(model, opt) == (len(LayerNorms(model.named_parameters()).params), 1)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs
    mon.close()
    assert hook_counts(model, opt) == (0, 0)
    models.loss_of(model).backward()
    opt.step()
    assert mon.log() is None and receiver.steps == []


def test_disabled_monitor_does_nothing(receiver: Receiver) -> None:
    model, opt = models.make()
    with client_hooks.watch(model, opt, server=receiver.url, enabled=False) as mon:
        assert hook_counts(model, opt) == (0, 0)
        assert mon.log(loss=1.0) is None and mon.flush(timeout=0.1)
    assert receiver.log == []


def test_internal_errors_never_reach_training(receiver: Receiver,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: LayerNorms, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("reduction bug")

    monkeypatch.setattr(LayerNorms, "compute", broken)
    model, opt = models.make()
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for i in range(3):
            loss = models.loss_of(model, seed=i)
            loss.backward()  # the hook's failure stays inside the hook
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss, note="text", vec=torch.ones(3), ok=torch.tensor(2.0))
        assert mon.flush(timeout=5)
        assert mon.stats["errors"] == 9  # 3 steps x (reduction, note, vec)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # one per kind of failure, not one per step
    assert any("reduction bug" in (r.exc_text or "") for r in warnings)
    assert [r["step"] for r in receiver.steps] == [0, 1, 2]
    for rec in receiver.steps:  # the rest of the record survives
        assert "grad_norm" not in rec and isinstance(rec["loss"], float)
        assert rec["scalars"] == {"ok": 2.0}
