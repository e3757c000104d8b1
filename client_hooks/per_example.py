"""Per-example gradient norms (b = 1) from forward/backward hooks, no extra backward pass.

Source: Goodfellow 2015 ("Efficient per-example gradient computations", arXiv:1510.01799)
for the rank-1 case; Li et al. 2022 ("Large Language Models Can Be Strong Differentially
Private Learners", §4, "ghost clipping") and Gray et al. 2023/2024 (nanoGNS, "Normalization
Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in Transformers")
for sequence inputs. Example i is index i of dimension 0 (a sequence, not a token).

Linear, y_t = W a_t + c for the T positions of example i (A_i: T×in, G_i = dL/dY_i: T×out)::

    ∇_W ℓ_i = G_iᵀ A_i        |∇_W ℓ_i|²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A_iA_iᵀ, G_iG_iᵀ⟩
    ∇_c ℓ_i = Σ_t g_t         |∇_c ℓ_i|²  = |Σ_t g_t|²

The Gram form costs T²(in+out) per example, the explicit product T·in·out: the cheaper one is
used. It is NOT Σ_t |a_t|²|g_t|² (that drops the cross-position terms t ≠ s).

Embedding (rows x_t picked by token ids): ∇_E ℓ_i has row v = Σ_{t: x_t = v} g_t, so
|∇_E ℓ_i|² = Σ_v |Σ_{t: x_t=v} g_t|² (repeated tokens add before squaring). Computed with a
sort of (example, token) keys and a segment sum: fixed shapes, no host sync.

LayerNorm / RMSNorm, y_t = x̂_t ⊙ w + c: ∇_w ℓ_i = Σ_t g_t ⊙ x̂_t, ∇_c ℓ_i = Σ_t g_t, with x̂
recomputed from the saved input (``F.layer_norm`` / ``F.rms_norm`` without affine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from .norms import ROOT_LAYER

_ACC = torch.float32  # per-example sums are formed in fp32 (bf16/fp16 activations upcast)
_RMSNORM: tuple[type[torch.nn.Module], ...] = (
    (torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()
)
KINDS = ("linear", "embedding", "norm")


def _flat3(x: torch.Tensor, last: int) -> torch.Tensor:
    """(N, ..., last) → (N, T, last) in fp32; a 2-D (N, last) input becomes T = 1."""
    return x.reshape(x.shape[0], -1, last).to(_ACC)


def linear_sq(a: torch.Tensor, g: torch.Tensor, bias: bool, weight: bool = True) -> torch.Tensor:
    """Per-example squared gradient norm (N,) of a Linear layer from its input ``a`` (N,…,in)
    and output gradient ``g`` (N,…,out): |G_iᵀA_i|²_F (+ |Σ_t g_t|² with a bias)."""
    a3, g3 = _flat3(a, a.shape[-1]), _flat3(g, g.shape[-1])
    n, t, d_in = a3.shape
    d_out = g3.shape[-1]
    out = torch.zeros(n, dtype=_ACC, device=g.device)
    if weight:
        if t == 1:
            out = out + a3.square().sum((1, 2)) * g3.square().sum((1, 2))
        elif t * (d_in + d_out) < d_in * d_out:
            aa = torch.bmm(a3, a3.transpose(1, 2))
            gg = torch.bmm(g3, g3.transpose(1, 2))
            out = out + (aa * gg).sum((1, 2))
        else:
            out = out + torch.bmm(g3.transpose(1, 2), a3).square().sum((1, 2))
    if bias:
        out = out + g3.sum(1).square().sum(1)
    return out


def embedding_sq(
    ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """Per-example squared gradient norm (N,) of an Embedding from its ids (N,…) and output
    gradient ``g`` (N,…,d): Σ_v |Σ_{t: id_t = v} g_t|² (the padding row gets no gradient)."""
    n = ids.shape[0]
    d = g.shape[-1]
    flat_ids = ids.reshape(n, -1)
    g2 = g.reshape(n, -1, d).to(_ACC)
    if padding_idx is not None:
        g2 = g2 * (flat_ids != padding_idx).unsqueeze(-1).to(_ACC)
    t = flat_ids.shape[1]
    keys = (
        torch.arange(n, device=ids.device).unsqueeze(1) * num_embeddings + flat_ids.long()
    ).reshape(-1)
    sorted_keys, order = torch.sort(keys)
    new = torch.ones_like(sorted_keys, dtype=torch.long)
    new[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    seg = torch.cumsum(new, 0) - 1
    sums = torch.zeros(n * t, d, dtype=_ACC, device=g.device)
    sums.index_add_(0, seg, g2.reshape(-1, d)[order])
    example_of_seg = torch.zeros(n * t, dtype=torch.long, device=ids.device)
    example_of_seg.scatter_(0, seg, torch.div(sorted_keys, num_embeddings, rounding_mode="floor"))
    out = torch.zeros(n, dtype=_ACC, device=g.device)
    return out.index_add_(0, example_of_seg, sums.square().sum(1))


def norm_sq(
    x: torch.Tensor,
    g: torch.Tensor,
    shape: Sequence[int],
    eps: float | None,
    rms: bool,
    weight: bool,
    bias: bool,
) -> torch.Tensor:
    """Per-example squared gradient norm (N,) of a LayerNorm (``rms`` False) or RMSNorm over
    the trailing ``shape``: |Σ_t g_t ⊙ x̂_t|² (+ |Σ_t g_t|² with a bias)."""
    shape = tuple(shape)
    d = math.prod(shape)
    xf = x.to(_ACC)
    if rms:
        xhat = F.rms_norm(xf, shape, None, eps)
    else:
        xhat = F.layer_norm(xf, shape, None, None, 1e-5 if eps is None else eps)
    x3, g3 = _flat3(xhat, d), _flat3(g, d)
    out = torch.zeros(x.shape[0], dtype=_ACC, device=g.device)
    if weight:
        out = out + (g3 * x3).sum(1).square().sum(1)
    if bias:
        out = out + g3.sum(1).square().sum(1)
    return out


def _kernel(module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-example kernel of a supported module, bound to its configuration."""
    wants = {
        name: p is not None and p.requires_grad
        for name, p in (
            ("weight", getattr(module, "weight", None)),
            ("bias", getattr(module, "bias", None)),
        )
    }
    if isinstance(module, torch.nn.Linear):
        return partial(_lin, bias=wants["bias"], weight=wants["weight"])
    if isinstance(module, torch.nn.Embedding):
        return partial(_emb, num=module.num_embeddings, pad=module.padding_idx)
    if isinstance(module, torch.nn.LayerNorm):
        return partial(
            _norm,
            shape=module.normalized_shape,
            eps=module.eps,
            rms=False,
            weight=wants["weight"],
            bias=wants["bias"],
        )
    if _RMSNORM and isinstance(module, _RMSNORM):
        shape: Sequence[int] = module.normalized_shape  # type: ignore[assignment]
        eps: float | None = module.eps  # type: ignore[assignment]
        return partial(_norm, shape=shape, eps=eps, rms=True, weight=wants["weight"], bias=False)
    raise TypeError(f"no per-example kernel for {type(module).__name__}")


def _lin(a: torch.Tensor, g: torch.Tensor, *, bias: bool, weight: bool) -> torch.Tensor:
    return linear_sq(a, g, bias, weight)


def _emb(a: torch.Tensor, g: torch.Tensor, *, num: int, pad: int | None) -> torch.Tensor:
    return embedding_sq(a, g, num, pad)


def _norm(
    a: torch.Tensor,
    g: torch.Tensor,
    *,
    shape: Sequence[int],
    eps: float | None,
    rms: bool,
    weight: bool,
    bias: bool,
) -> torch.Tensor:
    return norm_sq(a, g, shape, eps, rms, weight, bias)


def kind_of(module: torch.nn.Module) -> str | None:
    """``"linear"``, ``"embedding"``, ``"norm"`` or None (not supported)."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, (torch.nn.LayerNorm, *_RMSNORM)):
        return "norm"
    return None


class PerExampleNorms:
    """Sums of per-example squared gradient norms per layer, accumulated on the device.

    ``attach(model, layers)`` hooks every supported module (``kinds``) that owns a trainable
    parameter not shared with another module (tied weights would need the sum of both uses'
    contributions per example). ``layers`` are the run's layer names (module paths); the
    module at path ``p`` measures layer ``p``. A module called twice in one graph (reused
    block) is marked invalid for that step. Nothing is read back to the host.
    """

    def __init__(self, kinds: Sequence[str] = KINDS) -> None:
        bad = set(kinds) - set(KINDS)
        if bad:
            raise ValueError(f"unknown per-example kinds {sorted(bad)}; known: {KINDS}")
        self.kinds = tuple(kinds)
        self.layer_ids: list[int] = []  # run-layer index of each hooked module
        self._handles: list[RemovableHandle] = []
        self._sq: torch.Tensor | None = None  # (M,) float64 Σ_i |raw per-example grad|²
        self._count: list[int] = []  # examples seen per hooked module this step
        self._pending: list[int] = []  # forwards waiting for their backward, per module
        self._invalid: set[int] = set()

    def attach(self, model: torch.nn.Module, layers: Sequence[str]) -> PerExampleNorms:
        index = {name: i for i, name in enumerate(layers)}
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        device = None
        for name, module in model.named_modules():
            path = name or ROOT_LAYER  # parameters of the model itself: layer "(root)"
            kind = kind_of(module)
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if kind not in self.kinds or not own or path not in index:
                continue
            if any(owners[id(p)] > 1 for p in module.parameters(recurse=False)):
                continue  # tied / shared weights: per-module norms would not add up
            pos = len(self.layer_ids)
            self.layer_ids.append(index[path])
            device = own[0].device
            self._handles.append(
                module.register_forward_hook(partial(self._on_forward, pos, _kernel(module)))
            )
        self._sq = torch.zeros(len(self.layer_ids), dtype=torch.float64, device=device)
        self._count = [0] * len(self.layer_ids)
        self._pending = [0] * len(self.layer_ids)
        return self

    def _on_forward(
        self,
        pos: int,
        kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        module: torch.nn.Module,
        inputs: tuple[Any, ...],
        output: Any,
    ) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs:
            return
        if self._pending[pos] > 0:
            self._invalid.add(pos)  # reused in one graph: per-call norms do not add up
        self._pending[pos] += 1
        saved = inputs[0].detach()
        output.register_hook(  # type: ignore[no-untyped-call]
            partial(self._on_grad_out, pos, kernel, saved)
        )

    def _on_grad_out(
        self,
        pos: int,
        kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        saved: torch.Tensor,
        grad: torch.Tensor,
    ) -> None:
        self._pending[pos] = max(0, self._pending[pos] - 1)
        if self._sq is None:
            return
        with torch.no_grad():
            per_example = kernel(saved, grad.detach())
            self._sq[pos].add_(per_example.sum().to(torch.float64))
        self._count[pos] += int(grad.shape[0])

    def take(self, scale: torch.Tensor | None) -> tuple[list[int], torch.Tensor, int] | None:
        """``(layer ids, mean per-example |g_i|² per layer (float64, device), B)`` for the
        step, then reset.

        Undoes the loss scaling: with a mean loss over the step's B examples (divided by the
        accumulation count), the hook sees raw_i = scale·g_i/B, so
        mean_i |g_i|² = B·Σ_i |raw_i|² / scale². Layers seen with a different example count
        than the most common one, or marked invalid, are left out. None when nothing ran.
        """
        if self._sq is None or not any(self._count):
            self.reset()
            return None
        counts = self._count
        batch = max(set(counts), key=counts.count)
        keep = [i for i, c in enumerate(counts) if c == batch and c > 0 and i not in self._invalid]
        if not keep:
            self.reset()
            return None
        # All layers kept (the usual case): no index tensor to build on the host.
        sq = (self._sq if len(keep) == len(self._count) else self._sq[keep]) * float(batch)
        if scale is not None:
            sq = sq / scale.detach().reshape(1).to(sq.device, torch.float64).square()
        ids = [self.layer_ids[i] for i in keep]
        self.reset()
        return ids, sq, batch

    def reset(self) -> None:
        if self._sq is not None:
            self._sq = torch.zeros_like(self._sq)
        self._count = [0] * len(self.layer_ids)
        self._pending = [0] * len(self.layer_ids)
        self._invalid.clear()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
