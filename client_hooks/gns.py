"""Small-batch squared gradient norms for the gradient noise scale, measured on the device.

The collector estimates |G|² and tr Σ from squared norms at two batch sizes b < B
(McCandlish et al. 2018, app. A.1; DESIGN.md). The big batch is the gradient the optimizer
sees (the monitor's pre-clip, unscaled per-layer norms); this module measures the small one,
at no extra backward pass, in one of three modes:

- ``"micro"``: each micro-batch's gradient before it is accumulated (a tensor hook
  ``param.register_hook`` sees it), b = B/k for k micro-batches. The hook sees
  scale·G_j/k when the loss is a mean divided by k (and multiplied by an AMP loss scale), so
  mean_j |G_j|² = k·Σ_j |raw_j|² / scale².
- ``"ddp"``: each rank's local gradient before the all-reduce (a DDP comm hook wrapping the
  default all-reduce), b = B/R for R ranks. The per-layer local squared norms are summed over
  ranks by one small asynchronous all-reduce per bucket, so the mean over ranks is used.
- ``"per_example"``: per-example norms, b = 1 (:mod:`client_hooks.per_example`).

Under DDP the logged ``batch_size`` must be the global batch (examples per optimizer step
over all R ranks): a micro-batch is then B/(k·R) examples of one rank, and in the per-example
mode the big batch is R times the examples this rank's hooks saw.

Every object freezes its measurement in an optimizer step post-hook (before a GradScaler's
``update()`` changes the scale) and :meth:`NoiseScale.take` hands it over as device tensors.
Nothing reads a device value back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .norms import layer_name
from .per_example import KINDS, PerExampleNorms

MODES = ("micro", "ddp", "per_example")


@dataclass
class NoiseSample:
    """One step's small-batch measurement (device tensors, float64)."""

    mode: str
    layer_ids: list[int]  # run-layer indices measured (order of ``small_sq``)
    small_sq: torch.Tensor  # per layer: mean over the small batches of |G_b|², unscaled
    b_small: float | None  # None: batch_size / ``parts`` once the batch size is known
    b_big: float | None  # None: the logged batch size
    parts: int  # micro-batches (micro), ranks (ddp), examples (per_example)

    def sizes(self, batch_size: int | None) -> tuple[float, float] | None:
        """(b, B); None when the batch size they derive from is unknown or b is not < B."""
        b_big = self.b_big if self.b_big is not None else batch_size
        if b_big is None:
            return None
        b_small = self.b_small if self.b_small is not None else b_big / self.parts
        return (float(b_small), float(b_big)) if 0 < b_small < b_big else None


def param_layers(
    model: torch.nn.Module, layers: Sequence[str]
) -> tuple[list[torch.Tensor], list[int]]:
    """Trainable parameters (tied ones once) and their run-layer indices, as LayerNorms
    maps them."""
    index = {name: i for i, name in enumerate(layers)}
    params: list[torch.Tensor] = []
    ids: list[int] = []
    for name, p in model.named_parameters():
        if p.requires_grad and layer_name(name) in index:
            params.append(p)
            ids.append(index[layer_name(name)])
    return params, ids


def _loss_scale(scaler: Any) -> torch.Tensor | None:
    """A GradScaler's current scale tensor (no sync), cloned: ``update()`` changes it."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale.detach().clone() if isinstance(scale, torch.Tensor) else None


class _Layered:
    """Per-layer accumulation of per-parameter squared norms on the device."""

    def __init__(self, layer_ids: list[int], device: torch.device) -> None:
        self.layer_ids = layer_ids
        self.measured = sorted(set(layer_ids))
        pos = {lid: i for i, lid in enumerate(self.measured)}
        self.slot = [pos[lid] for lid in layer_ids]  # param index -> position in measured
        self.device = device
        self._ids: dict[tuple[int, ...], torch.Tensor] = {}

    def ids(self, params: tuple[int, ...]) -> torch.Tensor:
        """Device tensor of measured positions of these parameter indices (cached)."""
        got = self._ids.get(params)
        if got is None:
            got = torch.tensor([self.slot[i] for i in params], device=self.device)
            if len(self._ids) < 64:
                self._ids[params] = got
        return got

    def zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.measured), dtype=torch.float64, device=self.device)


def _sumsq(grad: torch.Tensor) -> torch.Tensor:
    """|grad|² as a 0-d fp32 tensor: one BLAS dot for a dense fp32 gradient (about twice as
    fast as ``vector_norm`` on CPU), else the norm upcast to fp32 (half precision), squared."""
    g = grad.detach() if grad.requires_grad else grad
    if g.dtype is torch.float32 and g.layout is torch.strided:
        flat = g.reshape(-1)
        return torch.dot(flat, flat)
    norm: torch.Tensor = torch.linalg.vector_norm(g, dtype=torch.float32)
    return norm.square()


class MicroBatchNorms:
    """Squared norms of every micro-batch's gradient, per layer (mode ``"micro"``)."""

    def __init__(self, params: list[torch.Tensor], layer_ids: list[int], world: int = 1) -> None:
        device = params[0].device if params else torch.device("cpu")
        self._layers = _Layered(layer_ids, device)
        self._world = world  # under DDP a micro-batch is local: b = B/(k·R)
        self._sq: list[torch.Tensor] = []  # 0-d fp32 |raw micro-batch grad|² per hook call
        self._which: list[int] = []  # the parameter of each
        # Hook calls per parameter this step: k = the most of any parameter. A leaf's tensor
        # hook fires once per backward pass (with the sum over the parameter's uses), also
        # inside a reentrant checkpoint's inner backward, which has a graph task of its own:
        # counting graph tasks would count those as micro-batches.
        self._calls = [0] * len(params)
        self._handles: list[RemovableHandle] = [
            p.register_hook(partial(self._on_grad, i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(params)
        ]

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        self._calls[i] += 1
        self._sq.append(_sumsq(grad))
        self._which.append(i)

    def freeze(self, scale: torch.Tensor | None) -> NoiseSample | None:
        """k·Σ_j |raw_j|²/scale² per layer: the mean of |G_j|² over the k micro-batches."""
        k = max(self._calls, default=0)
        got, which = self._sq, tuple(self._which)
        self.reset()
        if k < 2 or not got:
            return None
        with torch.no_grad():
            sq = self._layers.zeros().index_add_(
                0, self._layers.ids(which), torch.stack(got).to(torch.float64)
            )
            sq = sq * float(k)
            if scale is not None:
                sq = sq / scale.reshape(1).to(sq.device, torch.float64).square()
        return NoiseSample("micro", self._layers.measured, sq, None, None, k * self._world)

    def reset(self) -> None:
        self._sq, self._which = [], []
        self._calls = [0] * len(self._calls)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class DDPLocalNorms:
    """Each rank's local gradient before the all-reduce, per layer (mode ``"ddp"``).

    Registers a comm hook on ``ddp`` (so no other comm hook may be registered): for each
    bucket it takes the per-parameter norms of the local gradient, starts an asynchronous
    SUM all-reduce of their squares, then runs the default all-reduce (mean) of the bucket.
    """

    def __init__(
        self,
        ddp: torch.nn.parallel.DistributedDataParallel,
        params: list[torch.Tensor],
        layer_ids: list[int],
    ) -> None:
        device = params[0].device if params else torch.device("cpu")
        self._layers = _Layered(layer_ids, device)
        self._index = {id(p): i for i, p in enumerate(params)}
        self._world = torch.distributed.get_world_size(ddp.process_group)
        self._sq = self._layers.zeros()
        self._seen = False
        # DDP inspects the hook's annotations (strings here): hand it an unannotated one.
        ddp.register_comm_hook(ddp.process_group, lambda group, bucket: self._hook(group, bucket))

    def _hook(self, group: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        grads, params = bucket.gradients(), bucket.parameters()
        which = tuple(self._index.get(id(p), -1) for p in params)
        keep = [j for j, i in enumerate(which) if i >= 0]
        local = None
        if keep:
            with torch.no_grad():
                local = (
                    torch.stack(torch._foreach_norm([grads[j] for j in keep]))
                    .to(torch.float64)
                    .square()
                )
            sq_work = torch.distributed.all_reduce(local, group=group, async_op=True)
        fut = default_hooks.allreduce_hook(group, bucket)
        if local is None:
            return fut
        ids = self._layers.ids(tuple(which[j] for j in keep))
        summed = local

        def finish(done: torch.futures.Future[list[torch.futures.Future[Any]]]) -> torch.Tensor:
            self._sq.index_add_(0, ids, summed)
            self._seen = True
            return done.value()[1].value()  # type: ignore[no-any-return]

        both = torch.futures.collect_all([sq_work.get_future(), fut])
        return both.then(finish)

    def freeze(self, scale: torch.Tensor | None) -> NoiseSample | None:
        """Σ_r |g_r|²/R/scale² per layer: the mean over ranks of the local |G_b|²."""
        sq, seen = self._sq, self._seen
        self.reset()
        if not seen or self._world < 2:
            return None
        sq = sq / float(self._world)
        if scale is not None:
            sq = sq / scale.reshape(1).to(sq.device, torch.float64).square()
        return NoiseSample("ddp", self._layers.measured, sq, None, None, self._world)

    def reset(self) -> None:
        self._sq = self._layers.zeros()
        self._seen = False

    def detach(self) -> None:
        """A DDP comm hook cannot be removed; it keeps running but is no longer read."""


class PerExampleMode:
    """Mode ``"per_example"``: b = 1, B = the examples the hooks saw this step."""

    def __init__(
        self, model: torch.nn.Module, layers: Sequence[str], kinds: Sequence[str], world: int = 1
    ) -> None:
        self._pe = PerExampleNorms(kinds).attach(model, layers)
        self._world = world  # under DDP the examples are local, the big gradient global

    def freeze(self, scale: torch.Tensor | None) -> NoiseSample | None:
        got = self._pe.take(scale)
        if got is None or got[2] < 2:
            return None
        ids, sq, batch = got
        return NoiseSample("per_example", ids, sq, 1.0, float(batch * self._world), batch)

    def reset(self) -> None:
        self._pe.reset()

    def detach(self) -> None:
        self._pe.detach()


def parse_mode(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"micro"``, ``"ddp"``, ``"per_example"`` (all supported layer kinds) or
    ``"per_example:norm"`` / ``"per_example:linear,norm"`` (only those kinds: ``linear``,
    ``embedding``, ``norm``) → (mode, kinds). Raises ValueError on anything else."""
    mode, _, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    kinds = tuple(k.strip() for k in rest.split(",") if k.strip()) if rest else KINDS
    if mode not in MODES or (rest and mode != "per_example") or not set(kinds) <= set(KINDS):
        raise ValueError(
            f"noise_scale must be one of {MODES}, or per_example:<kinds> with kinds from "
            f"{KINDS}; got {spec!r}"
        )
    return mode, kinds


class NoiseScale:
    """One noise-scale mode attached to a model and optimizer.

    ``wrapped`` is the model as the user passed it (the DDP wrapper for ``"ddp"``), ``model``
    the unwrapped module whose parameter names give ``layers``. The step post-hook freezes the
    step's sample; :meth:`take` returns it (or None) and drops any partial measurement (a
    step a GradScaler skipped).
    """

    def __init__(
        self,
        mode: str,
        wrapped: torch.nn.Module,
        model: torch.nn.Module,
        layers: Sequence[str],
        optimizer: torch.optim.Optimizer,
        scaler: Any = None,
    ) -> None:
        mode, kinds = parse_mode(mode)
        self.mode = mode
        self._scaler = scaler
        params, ids = param_layers(model, layers)
        world = 1
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            world = torch.distributed.get_world_size(wrapped.process_group)
        self._impl: MicroBatchNorms | DDPLocalNorms | PerExampleMode
        if mode == "micro":
            self._impl = MicroBatchNorms(params, ids, world)
        elif mode == "ddp":
            if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                raise ValueError('noise_scale="ddp" needs the DistributedDataParallel model')
            self._impl = DDPLocalNorms(wrapped, params, ids)
        else:
            self._impl = PerExampleMode(model, layers, kinds, world)
        self._frozen: NoiseSample | None = None
        self._handle = optimizer.register_step_post_hook(self._on_step)

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._frozen = self._impl.freeze(_loss_scale(self._scaler))

    def take(self) -> NoiseSample | None:
        frozen, self._frozen = self._frozen, None
        self._impl.reset()
        return frozen

    def close(self) -> None:
        self._handle.remove()
        self._impl.detach()
