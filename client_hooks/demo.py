"""A small GPT-style model trained on synthetic tokens, streaming into a collector.

Run by ``gradsentry demo``; also ``python -m client_hooks.demo --help``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

import client_hooks


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyGPT(nn.Module):
    """Decoder-only transformer; the output head is tied to the token embedding."""

    def __init__(self, vocab: int = 64, dim: int = 64, depth: int = 4, heads: int = 4,
                 seq: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's init; N(0, 1) makes huge logits
        self.mask: torch.Tensor
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), -math.inf), 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, self.mask[: idx.shape[1], : idx.shape[1]])
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits


def markov_batches(vocab: int, seq: int, batch: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Sequences from a fixed random sparse Markov chain: learnable, with known structure."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probs = torch.softmax(logits, dim=-1)
    while True:
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(vocab, (batch,), generator=g)
        for t in range(seq):
            x[:, t + 1] = torch.multinomial(probs[x[:, t]], 1, generator=g).squeeze(1)
        yield x


def train(server: str, project: str, run: str | None, steps: int, batch: int = 16,
          seq: int = 32) -> str:
    torch.manual_seed(0)
    model = TinyGPT(seq=seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    mon = client_hooks.watch(model, opt, project=project, run=run, server=server,
                             batch_size=batch, config={"model": "TinyGPT", "steps": steps})
    data = markov_batches(64, seq, batch)
    start = time.monotonic()
    for i in range(steps):
        x = next(data)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.log(loss=loss, batch_size=batch, tokens=batch * seq)
        if i % 10 == 0 or i == steps - 1:
            # The demo's one deliberate host sync: reading the loss for the progress bar.
            _progress(i + 1, steps, loss.item(), time.monotonic() - start)
    sys.stderr.write("\n")
    mon.close()
    return mon.run_id


def _progress(done: int, total: int, loss: float, elapsed: float) -> None:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "-" * (width - filled)
    rate = done / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(f"\rtraining [{bar}] {done}/{total} steps  loss {loss:.3f}  "
                     f"{rate:.1f} steps/s")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--project", default="demo")
    parser.add_argument("--run", default=None)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    train(args.server, args.project, args.run, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
