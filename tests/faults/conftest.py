"""Fault tests: a real collector process that is down, killed, restarted; spool and sync."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import torch

import client_hooks
from client_hooks import monitor
from client_hooks.monitor import Monitor
from client_hooks.sender import Sender
from tests.client import models
from tests.conftest import free_port, spawn_collector


class CollectorProcess:
    """``python -m server.cli serve`` on a fixed port, which it keeps across restarts."""

    def __init__(self, database_url: str, port: int | None = None) -> None:
        self.database_url = database_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn_collector(self.database_url, self.port)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections cut mid-request."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tests run beside collector processes on a small shared machine, where two
    intra-op threads spinning against them make a step take 10-100x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def collector_process(backend: str, database_urls: dict[str, str]) -> Iterator[CollectorProcess]:
    proc = CollectorProcess(database_urls[backend])
    yield proc
    proc.stop()


@contextmanager
def spool_options(**options: Any) -> Iterator[None]:
    """Have watch() build its Sender with these spool options (whatever watch() passes)."""

    def build(*args: Any, **kwargs: Any) -> Sender:
        return Sender(*args, **{**kwargs, **options})

    with mock.patch.object(monitor, "Sender", build):
        yield


def watch(model: torch.nn.Module, opt: torch.optim.Optimizer, server: str, run: str,
          spool_dir: Path, **options: Any) -> Monitor:
    with spool_options(spool_dir=spool_dir, **options):
        return client_hooks.watch(model, opt, project="faults", run=run, server=server,
                                  batch_size=4, flush_interval=0.05)


def train_step(mon: Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer,
               seed: int) -> None:
    loss = models.loss_of(model, seed=seed)
    loss.backward()
    opt.step()
    opt.zero_grad()
    mon.log(loss=loss, batch_size=4)


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def stored_steps(server: str, run_id: str) -> tuple[int, list[int]]:
    """(num_steps, every stored step in order) as the REST API reports them."""
    run = httpx.get(f"{server}/api/v1/runs/{run_id}", timeout=30).json()
    series = httpx.get(f"{server}/api/v1/runs/{run_id}/series",
                       params={"names": "loss", "max_points": 100_000}, timeout=30).json()
    (loss,) = series["series"]
    assert loss["bucket_size"] == 1
    return int(run["num_steps"]), list(loss["step"])
