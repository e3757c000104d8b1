"""Per-example gradient norm kernels against a per-example autograd loop (fp32)."""

from __future__ import annotations

import pytest
import torch

from client_hooks import per_example
from client_hooks.per_example import PerExampleNorms, embedding_sq, linear_sq, norm_sq

N, T = 5, 7


def _loop_truth(module: torch.nn.Module, x: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """|∇_θ ℓ_i|² by one backward per example, ℓ_i = Σ w_out ⊙ module(x_i)."""
    out = []
    for i in range(x.shape[0]):
        module.zero_grad()
        (module(x[i : i + 1]) * w_out[i : i + 1]).sum().backward()
        out.append(sum(float(p.grad.double().square().sum()) for p in module.parameters()))
    return torch.tensor(out, dtype=torch.float64)


def _hooked(module: torch.nn.Module, x: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """The same per-example norms through PerExampleNorms' hooks on one batched backward."""
    names = ["(root)"]
    wrapper = torch.nn.Sequential()
    wrapper.add_module("m", module)
    pe = PerExampleNorms().attach(wrapper, ["m"])
    assert pe.layer_ids == [0], names
    module.zero_grad()
    (wrapper(x) * w_out).sum().backward()  # raw_i = g_i (sum loss): take() multiplies by B
    got = pe.take(None)
    assert got is not None
    ids, sq, batch = got
    assert ids == [0] and batch == x.shape[0]
    pe.detach()
    return sq / batch  # Σ_i |g_i|², the sum over examples


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


@pytest.mark.parametrize("shape", [(N, 6), (N, T, 6), (N, 3, T, 6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wide", [False, True])  # wide: the explicit G_iᵀA_i path
def test_linear_matches_loop(shape: tuple[int, ...], bias: bool, wide: bool) -> None:
    torch.manual_seed(0)
    d_out = 40 if wide else 4
    lin = torch.nn.Linear(6 if not wide else 6, d_out, bias=bias)
    x = torch.randn(*shape)
    w_out = torch.randn(*shape[:-1], d_out)
    truth = _loop_truth(lin, x, w_out)
    a, g = x, w_out  # dL/dy = w_out
    assert _rel(linear_sq(a, g, bias), truth) <= 1e-5
    assert _rel(_hooked(lin, x, w_out).sum(), truth.sum()) <= 1e-5


def test_linear_catches_token_sum_mistake() -> None:
    """Σ_t |a_t|²|g_t|² drops the cross-position terms: it is not the per-example norm."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 4, bias=False)
    x, w_out = torch.randn(N, T, 6), torch.randn(N, T, 4)
    truth = _loop_truth(lin, x, w_out)
    wrong = (x.square().sum(-1) * w_out.square().sum(-1)).sum(1)
    assert _rel(wrong, truth) > 0.05  # the mistake is visible at this size
    assert _rel(linear_sq(x, w_out, False), truth) <= 1e-5


def test_embedding_matches_loop_with_repeats_and_padding() -> None:
    torch.manual_seed(2)
    emb = torch.nn.Embedding(11, 6, padding_idx=0)
    ids = torch.randint(0, 4, (N, T))  # few distinct ids: many repeats within an example
    ids[0, :3] = 0
    w_out = torch.randn(N, T, 6)
    truth = torch.tensor(
        [
            sum(
                float(p.square().sum())
                for p in torch.autograd.grad(
                    (emb(ids[i : i + 1]) * w_out[i : i + 1]).sum(), list(emb.parameters())
                )
            )
            for i in range(N)
        ],
        dtype=torch.float64,
    )
    assert _rel(embedding_sq(ids, w_out, 11, 0), truth) <= 1e-5
    # Treating each token as its own row (no repeat merging) is wrong here.
    wrong = (w_out.square().sum(-1) * (ids != 0)).sum(1)
    assert _rel(wrong, truth) > 0.05
    assert _rel(_hooked(emb, ids, w_out).sum(), truth.sum()) <= 1e-5


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(N, 6), (N, T, 6)])
def test_norm_layers_match_loop(rms: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    mod: torch.nn.Module = torch.nn.RMSNorm(6, eps=1e-6) if rms else torch.nn.LayerNorm(6)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, w_out = torch.randn(*shape), torch.randn(*shape)
    truth = _loop_truth(mod, x, w_out)
    eps = mod.eps
    got = norm_sq(x, w_out, (6,), eps, rms, True, not rms)
    assert _rel(got, truth) <= 1e-5
    assert _rel(_hooked(mod, x, w_out).sum(), truth.sum()) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_linear_blocked_gram_matches_loop(bias: bool) -> None:
    """T ≥ 64 with in·out above T(in+out): the Gram pair in two row blocks (each off-diagonal
    pair once, counted twice), an odd T so the blocks differ in size."""
    torch.manual_seed(4)
    n, t, d = 3, 67, 112
    lin = torch.nn.Linear(d, d, bias=bias)
    x, w_out = torch.randn(n, t, d), torch.randn(n, t, d)
    assert per_example._blocks(t) == 2 and t * 2 * d * per_example._gram_share(t) < d * d
    truth = _loop_truth(lin, x, w_out)
    assert _rel(linear_sq(x, w_out, bias), truth) <= 1e-5
    assert _rel(_hooked(lin, x, w_out).sum(), truth.sum()) <= 1e-5


def test_layernorm_hook_reads_the_forward_statistics() -> None:
    """Inside the hook the LayerNorm's own saved mean and 1/σ are used (no recomputation);
    a gradient hook under another node gets None (and the kernel recomputes x̂)."""
    torch.manual_seed(5)
    ln = torch.nn.LayerNorm(6)
    x = torch.randn(N, T, 6, requires_grad=True)
    seen: list[object] = []
    y = ln(x)
    y.grad_fn.register_prehook(lambda grads: seen.append(per_example._ln_stats(x)))
    z = y * 2.0
    z.grad_fn.register_prehook(lambda grads: seen.append(per_example._ln_stats(x)))
    other = torch.randn(N, T, 6)
    y.grad_fn.register_prehook(lambda grads: seen.append(per_example._ln_stats(other)))
    z.sum().backward()
    assert seen[0] is None  # the multiplication's node
    stats = seen[1]
    assert isinstance(stats, tuple)
    var, mean = torch.var_mean(x.detach(), -1, keepdim=True, correction=0)
    assert torch.allclose(stats[0], mean, atol=1e-6)
    assert torch.allclose(stats[1], torch.rsqrt(var + ln.eps), rtol=1e-5)
    assert seen[2] is None  # not this node's input
