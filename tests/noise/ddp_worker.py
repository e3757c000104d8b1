"""Worker of the DDP noise-scale tests: 2 gloo ranks train the linear-regression problem."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.noise import linreg

WORLD = 2


def worker(rank: int, port: int, runs: list[tuple[int, str, str, str]], steps: int) -> None:
    """Train each (seed, run id, collector URL, noise-scale mode) in turn; rank 0 sends."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        for seed, run, url, mode in runs:
            linreg.train(
                mode,
                seed,
                url,
                run,
                steps=steps,
                rank=rank,
                world=WORLD,
                wrap=DistributedDataParallel,
            )
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
