"""gradsentry client hooks: stream gradient telemetry from a PyTorch training loop.

    mon = client_hooks.watch(model, optimizer, project="demo")
    ...  # loss.backward(); clip; optimizer.step(); optimizer.zero_grad()
    mon.log(loss=loss, batch_size=len(batch))
    mon.close()

Importing this package loads only the standard library: ``watch`` and ``Monitor`` import torch
on first use. The collector imports ``client_hooks.wire``, and importing a submodule runs this
file, so an eager ``import torch`` here would pull torch into the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .wire import WIRE_VERSION

if TYPE_CHECKING:
    from .monitor import Monitor, watch

__all__ = ["watch", "Monitor", "WIRE_VERSION"]


def __getattr__(name: str) -> Any:
    if name in ("watch", "Monitor"):
        from . import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
