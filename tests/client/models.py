"""A small tied-weight language model and a brute-force reference for its gradient norms."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, DIM, HIDDEN, SEQ = 40, 16, 24, 6
# named_parameters() order: the root's own parameter first, then submodules as registered;
# "frozen" has no trainable parameter and "head.weight" is emb.weight (tied), so only
# head.bias stands for "head".
LAYERS = ["(root)", "emb", "fc1", "fc2", "norm", "head"]


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.frozen = nn.Linear(DIM, DIM).requires_grad_(False)
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(self.norm(self.frozen(x)) * self.scale)


def make(seed: int = 0, lr: float = 0.1) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def loss_of(model: nn.Module, batch: int = 4, seed: int | None = None) -> torch.Tensor:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=gen)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """float64 copies of every gradient, by every name a parameter has (tied ones twice)."""
    return {name: p.grad.detach().double().clone()
            for name, p in model.named_parameters(remove_duplicate=False)
            if p.requires_grad and p.grad is not None}


def reference_norms(model: nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer and total ("") L2 norms by brute force, each distinct tensor counted once.

    A tensor reachable under several names belongs to the first module that owns it.
    """
    sq: dict[str, float] = {"": 0.0}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            layer = module_name or "(root)"
            full = f"{module_name}.{pname}" if module_name else pname
            s = float(torch.linalg.vector_norm(grads[full]) ** 2) if full in grads else 0.0
            sq[layer] = sq.get(layer, 0.0) + s
            sq[""] += s
    return {k: math.sqrt(v) for k, v in sq.items()}
