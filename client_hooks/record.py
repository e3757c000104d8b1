"""One logged step between the training thread and the sender: a host copy in flight."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .window import unpack

# Order of the fields in a wire step record (client_hooks.wire docstring).
_ORDER = ("step", "wall_time", "step_time", "loss", "lr", "grad_norm", "batch_size", "samples",
          "tokens", "nonfinite", "layer_grad_norms", "layer_nonfinite", "clip_coef", "loss_scale",
          "local_grad_norm", "overflow", "micro_batches", "layer_param_norms",
          "layer_update_norms", "gns", "lrs", "scalars", "window")
_INT_FIELDS = frozenset(("batch_size", "samples", "tokens", "micro_batches"))
# What an overflowed (skipped) step does not report: its gradient is inf/NaN, scaled.
_NORM_FIELDS = ("grad_norm", "layer_grad_norms", "layer_nonfinite", "nonfinite", "clip_coef",
                "local_grad_norm", "layer_param_norms", "layer_update_norms", "gns")


class _Event(Protocol):
    def synchronize(self) -> None: ...


class _Late(Protocol):
    def result(self) -> list[float] | None: ...


@dataclass
class PendingStep:
    """A step whose device values are still being copied to the host.

    ``host`` holds, in order: when ``n_layers`` is not None, the packed norms of
    :meth:`client_hooks.norms.LayerNorms.compute` (``1 + 2 * n_layers`` values); when
    ``param_layers`` is not None, those of ``LayerNorms.param_update_norms`` (``2 *
    param_layers`` values); then one value per entry of ``packed``: ``(field, None)`` for a
    record field such as ``"loss"``, ``("scalars", name)`` for an extra scalar, ``("lrs", i)``
    for entry ``i`` of ``fields["lrs"]`` (a group whose lr is a tensor). ``fields`` and
    ``scalars`` hold the values that were Python numbers already. A packed ``overflow`` (a
    fused optimizer's ``found_inf`` device flag) becomes a bool here; when true the norms are
    dropped and ``on_overflow`` is called. When ``window`` is set (``(layout, steps,
    first_step)`` of :meth:`client_hooks.window.Window.pack`), the window's values follow,
    or are ``window_values`` when they were read back separately. With ``late_params``
    (:class:`client_hooks.param_overlap.Late`, computed after ``log()``), the
    ``2 * param_layers`` param norms are not in ``host``: they are waited for here.
    """

    step: int
    wall_time: float
    fields: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, int | float] = field(default_factory=dict)
    n_layers: int | None = None
    param_layers: int | None = None
    # Noise scale: {"mode", "b_small", "b_big", "layers"}; ``2 * len(layers)`` packed values
    # (small-batch then big-batch squared norms) follow the param norms.
    gns: dict[str, Any] | None = None
    packed: list[tuple[str, str | None]] = field(default_factory=list)
    host: torch.Tensor | None = None
    event: _Event | None = None
    on_overflow: Callable[[], None] | None = None
    window: tuple[list[tuple[str, int, int, bool]], int, int] | None = None
    window_values: list[float] | None = None
    late_params: _Late | None = None

    def to_record(self) -> dict[str, Any]:
        """The wire step record; waits for the device copy (sender thread only)."""
        if self.event is not None:
            self.event.synchronize()  # the one wait per step, off the training thread
        values: list[float] = self.host.tolist() if self.host is not None else []
        out: dict[str, Any] = {"step": self.step, "wall_time": self.wall_time, **self.fields}
        scalars = dict(self.scalars)
        skipped = False  # the device said this step was skipped
        pos = 0
        if self.n_layers is not None:
            n = self.n_layers
            bad = [int(x) for x in values[1 + n : 1 + 2 * n]]
            out.update(grad_norm=values[0], layer_grad_norms=values[1 : 1 + n],
                       layer_nonfinite=bad, nonfinite=sum(bad))
            pos = 1 + 2 * n
        if self.param_layers is not None and self.late_params is not None:
            late = self.late_params.result()  # bounded wait for the param-norm thread
            if late is not None:
                n = self.param_layers
                out.update(layer_param_norms=late[:n], layer_update_norms=late[n : 2 * n])
        elif self.param_layers is not None:
            n = self.param_layers
            out.update(layer_param_norms=values[pos : pos + n],
                       layer_update_norms=values[pos + n : pos + 2 * n])
            pos += 2 * n
        if self.gns is not None:  # noise scale
            n = len(self.gns["layers"])
            out["gns"] = {**self.gns, "small_sq": values[pos : pos + n],
                          "big_sq": values[pos + n : pos + 2 * n]}
            pos += 2 * n
        if "lrs" in out:
            out["lrs"] = list(out["lrs"])  # filled in below where a group's lr is a tensor
        end = pos + len(self.packed)
        for (name, sub), value in zip(self.packed, values[pos:end], strict=True):
            if name == "lrs" and sub is not None:
                out["lrs"][int(sub)] = value
            elif sub is not None:
                scalars[sub] = value
            elif name in _INT_FIELDS and math.isfinite(value):
                out[name] = int(value)
            elif name == "overflow":
                out[name] = skipped = value != 0
            else:
                out[name] = value
        if "lrs" in out and None in out["lrs"]:
            del out["lrs"]  # a group's lr was not a number: not recorded (log() warned)
        if skipped:
            for name in _NORM_FIELDS:
                out.pop(name, None)
            if self.on_overflow is not None:
                self.on_overflow()
        if scalars:
            out["scalars"] = scalars
        if self.window is not None:
            layout, steps, first = self.window
            wvals = self.window_values if self.window_values is not None else values[end:]
            out["window"] = unpack(layout, wvals, steps, first)
        return {k: out[k] for k in _ORDER if out.get(k) is not None}
