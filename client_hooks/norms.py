"""Per-layer gradient, parameter and update norms, reduced on the device with no host sync."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .sharded import Sharding

ROOT_LAYER = "(root)"
# Plans are keyed by which parameters have a gradient; mixture-of-experts models can vary that
# every step, so the cache is bounded.
_MAX_PLANS = 16
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# A norm taken ahead of time: (the gradient read, its _version then, its 2-norm, 0-d).
Ready = tuple[torch.Tensor, int, torch.Tensor]


def layer_name(param_name: str) -> str:
    """The module path owning a parameter: its name minus the last component."""
    return param_name.rpartition(".")[0] or ROOT_LAYER


@dataclass(frozen=True)
class _Group:
    """Gradients that one ``_foreach_norm`` call can reduce (same device and dtype)."""

    positions: tuple[int, ...]
    layer_ids: torch.Tensor  # long, on the output device
    norm_dtype: torch.dtype | None
    weights: torch.Tensor | None = None  # per tensor, when sharded: 1 for shards, 1/ranks else
    everything: bool = False  # the group holds every tensor, in order (the common case)
    # layer_ids into [total, layers, bad] for [squares, squares, flags] (compute's fast path)
    packed_ids: torch.Tensor = torch.empty(0, dtype=torch.long)


class LayerNorms:
    """Maps trainable parameters to layers and reduces their gradients on the device.

    With ``g_t`` the gradient of parameter tensor ``t`` and ``T_l`` the tensors of layer ``l``::

        n_l   = sqrt( sum_{t in T_l} ||g_t||_2^2 )
        total = sqrt( sum_l n_l^2 ) = sqrt( sum_t ||g_t||_2^2 )

    A tensor without a gradient counts 0. ``bad_l`` counts the tensors of layer ``l`` whose norm
    is not finite (a NaN or Inf entry, or a float32 norm that overflows, entries >~ 1e19).
    Squares are summed in float64 (float32 on MPS, which has no float64) so that norms between
    ~1.8e19 and ~3.4e38 do not overflow when squared.

    Sharded parameters (FSDP2's ``fully_shard``: DTensor parameters and gradients) are reduced
    from their local shards: each rank sums its shards' squares per layer and one
    ``all_reduce`` over the shard dimensions of the mesh gives every rank the squares of the
    full gradient (:mod:`client_hooks.sharded`), so the norms are of the whole gradient, not
    of the local shard. ``bad_l`` then counts tensors with a non-finite value in any shard.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        index: dict[str, int] = {}
        self.params: list[torch.Tensor] = []
        self._layer_of: list[int] = []
        for name, param in named_parameters:
            if not param.requires_grad:
                continue
            self._layer_of.append(index.setdefault(layer_name(name), len(index)))
            self.params.append(param)
        self.layers: list[str] = list(index)
        self.sharding = Sharding.of(self.params)
        self.device = _local(self.params[0]).device if self.params else torch.device("cpu")
        self._acc = torch.float32 if self.device.type == "mps" else torch.float64
        self._plans: dict[tuple[torch.dtype | None, ...], list[_Group]] = {}
        self.reused = 0  # per-tensor norms taken from compute(ready=...) so far
        counts = torch.zeros(len(self.layers), dtype=self._acc)
        for layer in self._layer_of:
            counts[layer] += 1
        self._tensors_per_layer = counts.to(self.device)

    def compute(self, scale: torch.Tensor | None = None,
                ready: Mapping[int, Ready] | None = None) -> torch.Tensor:
        """``[total, n_1..n_L, bad_1..bad_L]`` as one float32 tensor on :attr:`device`.

        Norms are divided by ``scale`` (an AMP loss scale, a device tensor) when given.
        ``ready``: per-tensor norms taken earlier (:mod:`client_hooks.overlap`), by parameter
        position: ``(gradient, its _version, norm)``, used only where the parameter's gradient
        is still that tensor at that version. Enqueues a handful of kernels per (device,
        dtype) group; reads nothing back to the host.
        """
        n = len(self.layers)
        with torch.no_grad():  # grads require grad under create_graph=True; record nothing
            groups = self._group_norms(ready=ready)
            if len(groups) == 1 and groups[0][0].weights is None and not self.sharding.active:
                # The common case, in as few small ops as possible: one index_add_ of
                # [squares, squares, non-finite flags] into [total, layers, bad].
                group, stacked = groups[0]
                squares = stacked.square()
                src = torch.cat([squares, squares, (stacked < math.inf).logical_not_().to(
                    self._acc)])
                out = torch.zeros(1 + 2 * n, dtype=self._acc, device=self.device)
                out.index_add_(0, group.packed_ids, src)
                head = out[:1 + n]
                head.sqrt_()
                if scale is not None:
                    head.div_(scale.detach().reshape(1).to(self.device, self._acc))
                return out.to(torch.float32)
            sq = torch.zeros(n, dtype=self._acc, device=self.device)
            bad = torch.zeros(n, dtype=self._acc, device=self.device)
            total_sq = torch.zeros(1, dtype=self._acc, device=self.device)
            for group, stacked in groups:
                squares = self._weigh(group, stacked.square())
                sq.index_add_(0, group.layer_ids, squares)
                bad.index_add_(0, group.layer_ids, (~torch.isfinite(stacked)).to(self._acc))
                total_sq = total_sq + squares.sum()
            if self.sharding.active:
                sq, bad, total_sq = self.sharding.sum(sq, bad, total_sq)
                bad = torch.minimum(bad, self._tensors_per_layer)  # shards of one tensor
            total, layers = total_sq.sqrt(), sq.sqrt()
            if scale is not None:
                inv = 1 / scale.detach().reshape(1).to(self.device, self._acc)
                total, layers = total * inv, layers * inv
            return torch.cat([total, layers, bad]).to(torch.float32)

    def total(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The total norm alone, shape ``(1,)`` float32, computed exactly as :meth:`compute`
        computes it: equal gradients give bit-equal totals (a clip coefficient of exactly 1)."""
        with torch.no_grad():
            (total_sq,) = self.sharding.sum(self._total_sq(self._group_norms()))
            total = total_sq.sqrt()
            if scale is not None:
                total = total / scale.detach().reshape(1).to(self.device, self._acc)
            return total.to(torch.float32)

    def signature(self) -> tuple[tuple[int, int], ...]:
        """Identity and in-place version of every gradient, read without touching their data.

        Equal signatures mean no gradient was replaced or modified in place (clipping and
        unscaling are in place), so a norm computed earlier still holds. Not for sharded
        (DTensor) gradients: in-place ops on a DTensor bump no version counter.
        """
        return tuple((0, -1) if g is None else (g.data_ptr(), g._version)
                     for g in self._grads())

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of every parameter (one batched ``_foreach_mul``; torch falls back to one
        kernel per tensor when devices or dtypes are mixed), for :meth:`param_update_norms` to
        diff against after the optimizer step.

        Memory: one extra copy of the trainable weights, held until that call.
        """
        with torch.no_grad():
            return list(torch._foreach_mul([_local(p) for p in self.params], 1.0))

    def param_update_norms(self, before: list[torch.Tensor]) -> torch.Tensor:
        """``[w_1..w_L, u_1..u_L]`` as one float32 tensor on :attr:`device`.

        With ``w_t`` parameter tensor ``t`` now and ``b_t`` its copy from :meth:`snapshot`::

            w_l = sqrt( sum_{t in T_l} ||w_t||_2^2 )
            u_l = sqrt( sum_{t in T_l} ||w_t - b_t||_2^2 )

        The difference is taken in the parameters' dtype, in place in ``before`` (which is
        consumed: no second copy is allocated). Where an entry moved by at most half its value
        (the usual case) the subtraction is exact (Sterbenz's lemma), in bf16/fp16 too.
        Reads nothing back to the host.
        """
        n = len(self.layers)
        with torch.no_grad():
            local = [_local(p) for p in self.params]
            params = self._reduce(self._group_norms(local), n)
            torch._foreach_sub_(before, local)
            updates = self._reduce(self._group_norms(before), n)
            if self.sharding.active:
                params, updates = self.sharding.sum(params, updates)
            return torch.cat([params.sqrt(), updates.sqrt()]).to(torch.float32)

    def _reduce(self, groups: list[tuple[_Group, torch.Tensor]], n: int) -> torch.Tensor:
        """Per-layer sums of squares of grouped per-tensor norms (this rank's share)."""
        sq = torch.zeros(n, dtype=self._acc, device=self.device)
        for group, stacked in groups:
            sq.index_add_(0, group.layer_ids, self._weigh(group, stacked.square()))
        return sq

    def _total_sq(self, groups: list[tuple[_Group, torch.Tensor]]) -> torch.Tensor:
        sq = torch.zeros(1, dtype=self._acc, device=self.device)
        if len(groups) == 1 and groups[0][0].weights is None and not self.sharding.active:
            # The same additions in the same order as compute()'s fast path: bit-equal totals.
            group, stacked = groups[0]
            return sq.index_add_(0, group.packed_ids[:len(group.positions)], stacked.square())
        for group, stacked in groups:
            sq = sq + self._weigh(group, stacked.square()).sum()
        return sq

    def _weigh(self, group: _Group, squares: torch.Tensor) -> torch.Tensor:
        """Squares of tensors that every rank holds whole are summed once over the ranks."""
        return squares if group.weights is None else squares * group.weights

    def _group_norms(
        self, tensors: list[torch.Tensor] | None = None,
        ready: Mapping[int, Ready] | None = None,
    ) -> list[tuple[_Group, torch.Tensor]]:
        """Each group of ``tensors`` (one per parameter, in order; default: the current
        gradients) with its tensors' norms in the accumulator dtype (``ready``: see
        :meth:`compute`)."""
        grads: list[torch.Tensor | None] = self._grads() if tensors is None else (
            [_local(t) for t in tensors] if self.sharding.active else list(tensors))
        plan = self.plan_of(grads)
        out = []
        for group in plan:
            present = grads if group.everything else [grads[i] for i in group.positions]
            if ready:
                norms, reused = _reuse(present, group, ready)  # type: ignore[arg-type]
                self.reused += reused
            else:
                norms = _foreach_norm(present, group.norm_dtype)  # type: ignore[arg-type]
            out.append((group, torch.stack(norms).to(self.device, self._acc, non_blocking=True)))
        return out

    def plan_of(self, tensors: list[torch.Tensor | None]) -> list[_Group]:
        """The reduction plan of one tensor (or None) per parameter: cached by their dtypes.
        Training thread only (the cache is not locked)."""
        key = tuple(None if t is None else t.dtype for t in tensors)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(tensors)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def layer_param_update_norms(self, plan: list[_Group], weight_norms: list[torch.Tensor],
                                 update_norms: list[torch.Tensor]) -> torch.Tensor:
        """What :meth:`param_update_norms` returns, from per-tensor norms taken elsewhere
        (:mod:`client_hooks.param_overlap`; by parameter position, each taken by
        ``_foreach_norm`` with its group's ``norm_dtype``): the same stacking, casts and
        ``index_add_`` in the same order, so bit-equal results. Unsharded parameters only.
        Reads no mutable state of this object: any thread may call it."""
        n = len(self.layers)
        with torch.no_grad():
            sums = [self._reduce([(group, torch.stack([norms[i] for i in group.positions]).to(
                self.device, self._acc, non_blocking=True)) for group in plan], n)
                for norms in (weight_norms, update_norms)]
            return torch.cat([sums[0].sqrt(), sums[1].sqrt()]).to(torch.float32)

    def _grads(self) -> list[torch.Tensor | None]:
        """The current gradients (local shards when sharded), one per parameter."""
        if self.sharding.active:
            return [None if p.grad is None else _local(p.grad) for p in self.params]
        return [p.grad for p in self.params]

    def _plan(self, grads: list[torch.Tensor | None]) -> list[_Group]:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            if g is not None:
                groups.setdefault((g.device, g.dtype), []).append(i)
        plan = []
        for (_, dtype), positions in groups.items():
            # One host-to-device copy per plan, not per step: plans are cached.
            ids = torch.tensor([self._layer_of[i] for i in positions], device=self.device)
            low = dtype in _LOW_PRECISION  # a bf16 norm keeps ~3 digits: reduce into float32
            weights = self.sharding.weights([self.params[i] for i in positions])
            if weights is not None:
                weights = weights.to(self.device, self._acc)
            n = len(self.layers)
            packed = torch.cat([torch.zeros_like(ids), ids + 1, ids + 1 + n])
            plan.append(_Group(tuple(positions), ids, torch.float32 if low else None, weights,
                               len(positions) == len(grads), packed))
        return plan


def _reuse(present: list[torch.Tensor], group: _Group,
           ready: Mapping[int, Ready]) -> tuple[list[torch.Tensor], int]:
    """The group's norms: from ``ready`` where it holds this very gradient at this version,
    computed here for the rest; and how many came from ``ready``."""
    norms: list[torch.Tensor | None] = []
    missing: list[int] = []
    for j, (i, g) in enumerate(zip(group.positions, present, strict=True)):
        r = ready.get(i)
        if r is not None and r[0] is g and g._version == r[1]:
            norms.append(r[2])
        else:
            norms.append(None)
            missing.append(j)
    if missing:
        computed = _foreach_norm([present[j] for j in missing], group.norm_dtype)
        for j, norm in zip(missing, computed, strict=True):
            norms[j] = norm
    return norms, len(present) - len(missing)  # type: ignore[return-value]


def _foreach_norm(grads: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    if dtype is None:
        return list(torch._foreach_norm(grads))
    try:
        return list(torch._foreach_norm(grads, 2, dtype=dtype))
    except TypeError:  # torch < 2.5 has no dtype argument: lower-precision norms, still on device
        return list(torch._foreach_norm(grads))


def _local(t: Any) -> torch.Tensor:
    """A DTensor's local shard; any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()  # type: ignore[no-any-return]
