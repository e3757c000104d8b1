"""Norms of sharded parameters (FSDP2 ``fully_shard``, DTensor): sum the shards' squares.

A DTensor gradient sharded over mesh dimensions D holds, on each rank, a disjoint piece of
the full gradient, so ``||g||² = Σ_ranks ||local shard||²``: one ``all_reduce(SUM)`` over the
process groups of D turns every rank's local sums of squares into the full gradient's. A
tensor that is not sharded over some of D (a replicated DTensor, or a plain tensor) is held
whole by each rank of those dimensions; its squares are weighted by 1 / (their size) so the
sum counts it once. The collective runs inside the autograd callback on every rank, in the
same order, like FSDP's own; on NCCL it is queued on the stream, no host sync.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("client_hooks")


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


class Sharding:
    """The process groups over which a model's parameters are sharded (none: not sharded)."""

    def __init__(self, groups: Sequence[Any] = (), dims: Sequence[int] = (),
                 sizes: Sequence[int] = ()) -> None:
        self.groups = list(groups)
        self.dims = tuple(dims)
        self.sizes = tuple(sizes)
        self.active = bool(self.groups)

    @classmethod
    def of(cls, params: Sequence[torch.Tensor]) -> Sharding:
        """The sharding of ``params``: every DTensor must live on one mesh (FSDP2's)."""
        dtensors = [p for p in params if _is_dtensor(p)]
        if not dtensors:
            return cls()
        mesh = dtensors[0].device_mesh  # type: ignore[attr-defined]
        if any(p.device_mesh != mesh for p in dtensors):  # type: ignore[attr-defined]
            logger.warning("gradsentry: parameters on several device meshes are not supported; "
                           "norms are of this rank's local shards")
            return cls()
        dims = sorted({i for p in dtensors
                       for i, pl in enumerate(p.placements)  # type: ignore[attr-defined]
                       if pl.is_shard()})
        return cls([mesh.get_group(i) for i in dims], dims, [mesh.size(i) for i in dims])

    def weights(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Per-tensor weight of its squared norm in the cross-rank sum (None: all 1)."""
        if not self.active:
            return None
        out = []
        for p in params:
            placements = p.placements if _is_dtensor(p) else ()  # type: ignore[attr-defined]
            sharded = {i for i, pl in enumerate(placements) if pl.is_shard()}
            whole = [n for d, n in zip(self.dims, self.sizes, strict=True) if d not in sharded]
            out.append(1.0 / math.prod(whole))
        return None if all(w == 1.0 for w in out) else torch.tensor(out, dtype=torch.float64)

    def sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tensors`` summed over the shard groups (one collective per group)."""
        if not self.active:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        for group in self.groups:
            torch.distributed.all_reduce(flat, group=group)
        parts = torch.split(flat, [t.numel() for t in tensors])
        return tuple(part.reshape(t.shape) for part, t in zip(parts, tensors, strict=True))
