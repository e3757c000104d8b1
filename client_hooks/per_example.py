"""Per-example gradient norms (b = 1) from forward/backward hooks, no extra backward pass.

Source: Goodfellow 2015 ("Efficient per-example gradient computations", arXiv:1510.01799)
for the rank-1 case; Li et al. 2022 ("Large Language Models Can Be Strong Differentially
Private Learners", §4, "ghost clipping") and Gray et al. 2023/2024 (nanoGNS, "Normalization
Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in Transformers")
for sequence inputs. Example i is index i of dimension 0 (a sequence, not a token).

Linear, y_t = W a_t + c for the T positions of example i (A_i: T×in, G_i = dL/dY_i: T×out)::

    ∇_W ℓ_i = G_iᵀ A_i        |∇_W ℓ_i|²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A_iA_iᵀ, G_iG_iᵀ⟩
    ∇_c ℓ_i = Σ_t g_t         |∇_c ℓ_i|²  = |Σ_t g_t|²

The Gram form costs T²(in+out) per example (about 3/4 of that from T = 64: both Grams are
symmetric, so of two row blocks only the upper block triangle is formed), the explicit
product T·in·out: the cheaper one is used. It is NOT Σ_t |a_t|²|g_t|² (that drops the
cross-position terms t ≠ s).

Embedding (rows x_t picked by token ids): ∇_E ℓ_i has row v = Σ_{t: x_t = v} g_t, so
|∇_E ℓ_i|² = Σ_v |Σ_{t: x_t=v} g_t|² (repeated tokens add before squaring). Computed with a
sort of (example, token) keys and a segment sum: fixed shapes, no host sync.

LayerNorm / RMSNorm, y_t = x̂_t ⊙ w + c: ∇_w ℓ_i = Σ_t g_t ⊙ x̂_t, ∇_c ℓ_i = Σ_t g_t. For a
LayerNorm x̂ = (x - μ)·rstd from the mean and 1/σ its forward saved for autograd (read from
the autograd node in the gradient hook: no second normalisation); otherwise (RMSNorm, or
another node) recomputed from the input (``F.layer_norm`` / ``F.rms_norm`` without affine).

In the hooks only Σ_i over the examples is needed: those sums are single BLAS dots, and each
hook call leaves one 0-d tensor, summed per layer once per step in ``take()``.
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
    if x.dim() == 3 and x.dtype is _ACC:  # already so: no dispatch (the usual case)
        return x
    return x.reshape(x.shape[0], -1, last).to(_ACC)


def _sumsq(x: torch.Tensor, total: bool) -> torch.Tensor:
    """Σ x² over everything (``total``: a 0-d tensor, one BLAS dot) or per example (N,)."""
    if total:
        flat = x.reshape(-1)
        return torch.dot(flat, flat)
    return x.reshape(x.shape[0], -1).square().sum(1)


def _blocks(t: int) -> int:
    """Row blocks of the T×T Grams (fewer multiply-adds vs more, smaller products)."""
    return 2 if t >= 64 else 1  # 4 or more blocks: slower on CPU (small matrix products)


def _gram_share(t: int) -> float:
    """Multiply-adds of the blocked Gram pair relative to the full T²(in + out)."""
    nb = _blocks(t)
    return (nb + 1) / (2 * nb)


def _gram(a3: torch.Tensor, g3: torch.Tensor, total: bool) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per example (or summed) = ⟨A Aᵀ, G Gᵀ⟩.

    Both Grams are symmetric: with the T positions cut into ``nb`` row blocks, block row i
    against the columns from block i on (its diagonal block and everything right of it)
    holds every off-diagonal pair once; counting those twice and the diagonal blocks once
    gives the sum at (nb + 1)/(2·nb) of the full product's multiply-adds."""
    t = a3.shape[1]
    nb = _blocks(t)
    if nb == 1:
        aa = torch.bmm(a3, a3.transpose(1, 2))
        gg = torch.bmm(g3, g3.transpose(1, 2))
        if total:
            return torch.dot(aa.reshape(-1), gg.reshape(-1))
        return (aa * gg).sum((1, 2))
    h = -(-t // nb)
    out: torch.Tensor | None = None
    for i in range(0, t, h):
        end = min(i + h, t)
        aa = torch.bmm(a3[:, i:end], a3[:, i:].transpose(1, 2))  # (N, h, T - i)
        gg = torch.bmm(g3[:, i:end], g3[:, i:].transpose(1, 2))
        d = end - i
        if total:
            part = 2.0 * torch.dot(aa.reshape(-1), gg.reshape(-1)) - torch.dot(
                aa[:, :, :d].reshape(-1), gg[:, :, :d].reshape(-1)
            )
        else:
            prod = aa * gg
            part = 2.0 * prod.sum((1, 2)) - prod[:, :, :d].sum((1, 2))
        out = part if out is None else out + part
    assert out is not None
    return out


def _linear(
    a: torch.Tensor, g: torch.Tensor, bias: bool, weight: bool, total: bool
) -> torch.Tensor:
    a3, g3 = _flat3(a, a.shape[-1]), _flat3(g, g.shape[-1])
    n, t, d_in = a3.shape
    d_out = g3.shape[-1]
    out = None
    if weight:
        if t == 1:
            asq, gsq = a3.reshape(n, d_in).square().sum(1), g3.reshape(n, d_out).square().sum(1)
            out = torch.dot(asq, gsq) if total else asq * gsq
        elif t * (d_in + d_out) * _gram_share(t) < d_in * d_out:  # the cheaper form
            out = _gram(a3, g3, total)
        else:
            out = _sumsq(torch.bmm(g3.transpose(1, 2), a3), total)
    if bias:
        b = _sumsq(g3.sum(1), total)
        out = b if out is None else out + b
    if out is None:
        return torch.zeros(() if total else n, dtype=_ACC, device=g.device)
    return out


def linear_sq(a: torch.Tensor, g: torch.Tensor, bias: bool, weight: bool = True) -> torch.Tensor:
    """Per-example squared gradient norm (N,) of a Linear layer from its input ``a`` (N,…,in)
    and output gradient ``g`` (N,…,out): |G_iᵀA_i|²_F (+ |Σ_t g_t|² with a bias)."""
    return _linear(a, g, bias, weight, False)


def _embedding(
    ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None, total: bool
) -> torch.Tensor:
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
    if total:  # the segments of all examples together: one dot
        return _sumsq(sums, True)
    example_of_seg = torch.zeros(n * t, dtype=torch.long, device=ids.device)
    example_of_seg.scatter_(0, seg, torch.div(sorted_keys, num_embeddings, rounding_mode="floor"))
    out = torch.zeros(n, dtype=_ACC, device=g.device)
    return out.index_add_(0, example_of_seg, sums.square().sum(1))


def embedding_sq(
    ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """Per-example squared gradient norm (N,) of an Embedding from its ids (N,…) and output
    gradient ``g`` (N,…,d): Σ_v |Σ_{t: id_t = v} g_t|² (the padding row gets no gradient)."""
    return _embedding(ids, g, num_embeddings, padding_idx, False)


def _norm(
    x: torch.Tensor,
    g: torch.Tensor,
    shape: Sequence[int],
    eps: float | None,
    rms: bool,
    weight: bool,
    bias: bool,
    total: bool,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    shape = tuple(shape)
    d = math.prod(shape)
    n = x.shape[0]
    g3 = _flat3(g, d)
    out = None
    if weight:
        x3 = _flat3(x, d)
        if stats is not None:  # the forward's own mean and 1/σ: x̂ = (x - μ)·rstd
            mean, rstd = stats
            if mean.dim() != 3:
                mean, rstd = mean.reshape(n, -1, 1), rstd.reshape(n, -1, 1)
            prod = torch.sub(x3, mean).mul_(rstd)
        elif rms:
            prod = F.rms_norm(x3, (d,), None, eps)
        else:
            prod = F.layer_norm(x3, (d,), None, None, 1e-5 if eps is None else eps)
        out = _sumsq(prod.mul_(g3).sum(1), total)  # Σ_t g_t ⊙ x̂_t per example
    if bias:
        b = _sumsq(g3.sum(1), total)
        out = b if out is None else out + b
    if out is None:
        return torch.zeros(() if total else n, dtype=_ACC, device=g.device)
    return out


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
    return _norm(x, g, shape, eps, rms, weight, bias, False)


Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LN_NODE = "NativeLayerNormBackward0"
_current_node: Callable[[], Any] | None = getattr(torch._C, "_current_autograd_node", None)


def _ln_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and 1/σ that the LayerNorm's forward saved for its backward
    (``native_layer_norm``'s outputs 1 and 2), read from the autograd node about to run (a
    gradient hook on the LayerNorm's output runs just before that node). None, and x̂ is
    recomputed, unless the node is a ``native_layer_norm`` backward whose saved input is
    ``x`` itself."""
    node = _current_node() if _current_node is not None else None
    if node is None or type(node).__name__ != _LN_NODE:
        return None
    try:
        saved = node._saved_input
        if saved.data_ptr() != x.data_ptr() or saved.shape != x.shape:
            return None
        return node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):  # saved tensors freed, or another layout
        return None


def _kernel(module: torch.nn.Module) -> Kernel:
    """The per-example kernel of a supported module, bound to its configuration: called with
    the module's input and the gradient of its output (inside that gradient's hook), it
    returns Σ_i |g_i|² over the examples (0-d, fp32)."""
    wants = {
        name: p is not None and p.requires_grad
        for name, p in (
            ("weight", getattr(module, "weight", None)),
            ("bias", getattr(module, "bias", None)),
        )
    }
    if isinstance(module, torch.nn.Linear):
        return partial(_lin_k, bias=wants["bias"], weight=wants["weight"])
    if isinstance(module, torch.nn.Embedding):
        return partial(_emb_k, num=module.num_embeddings, pad=module.padding_idx)
    if isinstance(module, torch.nn.LayerNorm):
        return partial(
            _norm_k,
            shape=module.normalized_shape,
            eps=module.eps,
            rms=False,
            weight=wants["weight"],
            bias=wants["bias"],
        )
    if _RMSNORM and isinstance(module, _RMSNORM):
        shape: Sequence[int] = module.normalized_shape  # type: ignore[assignment]
        eps: float | None = module.eps  # type: ignore[assignment]
        return partial(_norm_k, shape=shape, eps=eps, rms=True, weight=wants["weight"], bias=False)
    raise TypeError(f"no per-example kernel for {type(module).__name__}")


def _lin_k(a: torch.Tensor, g: torch.Tensor, *, bias: bool, weight: bool) -> torch.Tensor:
    return _linear(a, g, bias, weight, True)


def _emb_k(a: torch.Tensor, g: torch.Tensor, *, num: int, pad: int | None) -> torch.Tensor:
    return _embedding(a, g, num, pad, True)


def _norm_k(
    a: torch.Tensor,
    g: torch.Tensor,
    *,
    shape: Sequence[int],
    eps: float | None,
    rms: bool,
    weight: bool,
    bias: bool,
) -> torch.Tensor:
    stats = None if rms or not weight else _ln_stats(a)
    return _norm(a, g, shape, eps, rms, weight, bias, True, stats)


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
        self._device: torch.device | None = None
        self._attached = False
        # This step's Σ_i |raw per-example grad|², one 0-d fp32 tensor per hook call, and the
        # hooked module (position) of each: summed per module in take().
        self._vals: list[torch.Tensor] = []
        self._where: list[int] = []
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self._count: list[int] = []  # examples seen per hooked module this step
        self._pending: list[int] = []  # forwards waiting for their backward, per module
        self._invalid: set[int] = set()

    def attach(self, model: torch.nn.Module, layers: Sequence[str]) -> PerExampleNorms:
        index = {name: i for i, name in enumerate(layers)}
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
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
            self._device = own[0].device
            self._handles.append(
                module.register_forward_hook(partial(self._on_forward, pos, _kernel(module)))
            )
        self._attached = True
        self._count = [0] * len(self.layer_ids)
        self._pending = [0] * len(self.layer_ids)
        return self

    def _on_forward(
        self,
        pos: int,
        kernel: Kernel,
        module: torch.nn.Module,
        inputs: tuple[Any, ...],
        output: Any,
    ) -> None:
        node = output.grad_fn if isinstance(output, torch.Tensor) else None
        if node is None or not inputs:
            return
        if self._pending[pos] > 0:
            self._invalid.add(pos)  # reused in one graph: per-call norms do not add up
        self._pending[pos] += 1
        # A pre-hook on the output's autograd node (what a tensor hook on the output becomes,
        # at a third of the registration cost). The input is kept as is (no detach: one op
        # less); the kernel runs under no_grad.
        node.register_prehook(
            partial(self._on_grad_out, pos, kernel, inputs[0], output.output_nr)
        )

    def _on_grad_out(
        self, pos: int, kernel: Kernel, saved: torch.Tensor, nr: int, grads: tuple[Any, ...]
    ) -> None:
        self._pending[pos] = max(0, self._pending[pos] - 1)
        grad = grads[nr]
        if not self._attached or grad is None:
            return
        with torch.no_grad():
            self._vals.append(kernel(saved, grad))
        self._where.append(pos)
        self._count[pos] += int(grad.shape[0])

    def _sums(self) -> torch.Tensor:
        """(M,) float64: this step's hook-call values summed per hooked module."""
        where = tuple(self._where)
        idx = self._index.get(where)
        if idx is None:
            idx = torch.tensor(where, device=self._device)
            if len(self._index) < 16:
                self._index[where] = idx
        sq = torch.zeros(len(self.layer_ids), dtype=torch.float64, device=self._device)
        return sq.index_add_(0, idx, torch.stack(self._vals).to(torch.float64))

    def take(self, scale: torch.Tensor | None) -> tuple[list[int], torch.Tensor, int] | None:
        """``(layer ids, mean per-example |g_i|² per layer (float64, device), B)`` for the
        step, then reset.

        Undoes the loss scaling: with a mean loss over the step's B examples (divided by the
        accumulation count), the hook sees raw_i = scale·g_i/B, so
        mean_i |g_i|² = B·Σ_i |raw_i|² / scale². Layers seen with a different example count
        than the most common one, or marked invalid, are left out. None when nothing ran.
        """
        if not self._vals or not any(self._count):
            self.reset()
            return None
        counts = self._count
        batch = max(set(counts), key=counts.count)
        keep = [i for i, c in enumerate(counts) if c == batch and c > 0 and i not in self._invalid]
        if not keep:
            self.reset()
            return None
        sq = self._sums()
        # All layers kept (the usual case): no index tensor to build on the host.
        sq = (sq if len(keep) == len(counts) else sq[keep]) * float(batch)
        if scale is not None:
            sq = sq / scale.detach().reshape(1).to(sq.device, torch.float64).square()
        ids = [self.layer_ids[i] for i in keep]
        self.reset()
        return ids, sq, batch

    def reset(self) -> None:
        self._vals, self._where = [], []
        self._count = [0] * len(self.layer_ids)
        self._pending = [0] * len(self.layer_ids)
        self._invalid.clear()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
