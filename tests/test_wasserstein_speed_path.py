"""The Wasserstein penalty's fast path (logits gathered on the support, blocked top-k, the symmetric
0/1-metric solves) gives the numbers of the plain path it replaced, kept here as the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdpo_lab import divergences as D


pytestmark = pytest.mark.usefixtures("one_thread")


def plain_token_penalty(div, policy_logits, ref_logits, mask):
    """The path before the speed-up: log-softmax over the vocabulary, floor, torch.topk on both sides,
    and the three problems (a, b), (a, a), (b, b) of the debiased divergence in one sinkhorn_ot call."""
    m = mask.bool()
    logp = F.log_softmax(D._f32(policy_logits[m]), -1).clamp(min=D.LOG_FLOOR)
    logq = F.log_softmax(D._f32(ref_logits[m]).to(logp.dtype), -1).clamp(min=D.LOG_FLOOR)
    k = min(div.k, logp.shape[-1])
    ip, iq = logp.detach().topk(k, -1).indices, logq.detach().topk(k, -1).indices
    dup = (iq.unsqueeze(-1) == ip.unsqueeze(-2)).any(-1)
    idx, dup = torch.cat([ip, iq], -1), torch.cat([torch.zeros_like(dup), dup], -1)

    def restrict(lp):
        la = lp.gather(-1, idx).masked_fill(dup, -math.inf)
        return la - la.logsumexp(-1, keepdim=True)

    la, lb = restrict(logp), restrict(logq)
    C = None if div._discrete() else div.ground_cost(idx).to(la.dtype).unsqueeze(0)
    ot = D.sinkhorn_ot(torch.stack([la, la, lb]), torch.stack([lb, la, lb]), C, div.epsilon, div.n_iter)
    d = torch.zeros(m.shape, dtype=la.dtype).masked_scatter(m, ot[0] - 0.5 * ot[1] - 0.5 * ot[2])
    return d.sum(-1) / m.sum(-1).clamp(min=1)


def logits(V, seed, dtype=torch.float32, shape=(6, 9)):
    """Peaked policy and reference next-token logits, the policy close to the reference, and a response
    mask with a row of no position."""
    g = torch.Generator().manual_seed(seed)
    ref = 3 * torch.randn(*shape, V, generator=g, dtype=torch.float64)
    pol = ref + 0.7 * torch.randn(*shape, V, generator=g, dtype=torch.float64)
    mask = (torch.rand(*shape, generator=g) < 0.7).float()
    mask[0] = 0
    return pol.to(dtype), ref.to(dtype), mask


CASES = {  # name: (V, divergence parameters, dtype)
    "0/1, V = 512 (blocked top-k)": (512, {}, torch.float32),
    "0/1, V = 1003 (blocked top-k, 3 left over)": (1003, {}, torch.float32),
    "0/1, V = 100 (plain top-k)": (100, {}, torch.float32),
    "0/1, float64": (512, {}, torch.float64),
    "0/1, k = 4, eps = 0.3": (300, {"k": 4, "epsilon": 0.3}, torch.float32),
    "0/1, eps below the O(n) solver's range": (200, {"epsilon": 0.004, "n_iter": 100}, torch.float64),
    "embeddings": (256, {"token_embeddings": torch.randn(256, 8, generator=torch.Generator().manual_seed(3))},
                   torch.float32),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_token_penalty_and_its_gradient_equal_the_plain_path(case, layout):
    V, params, dtype = CASES[case]
    div = D.get("wasserstein", **params)
    pol, ref, mask = logits(V, seed=len(case), dtype=dtype)
    if layout == "sliced":  # [N, T-1, V] views of [N, T, V] logits, as a model's shifted logits are
        pol, ref = torch.cat([pol, pol[:, :1]], 1)[:, :-1], torch.cat([ref, ref[:, :1]], 1)[:, :-1]
        assert not pol.is_contiguous()
    pol_fast, pol_plain = pol.clone().requires_grad_(True), pol.clone().requires_grad_(True)
    fast = D.token_penalty(div, pol_fast, ref, mask)
    plain = plain_token_penalty(div, pol_plain, ref, mask)
    (g_fast,) = torch.autograd.grad(fast.sum(), pol_fast)
    (g_plain,) = torch.autograd.grad(plain.sum(), pol_plain)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    assert fast.dtype == plain.dtype and (plain[1:] > 0.01).all()  # the values compared are not ~0
    torch.testing.assert_close(fast, plain, **tol)
    torch.testing.assert_close(g_fast, g_plain, **tol)


@pytest.mark.parametrize("V", [40, 512, 1001, 4096])
def test_top_k_selects_the_values_of_torch_topk_even_with_ties(V):
    x = torch.randint(0, 25, (300, V), generator=torch.Generator().manual_seed(V)).float()  # many ties
    x[:5, : V // 2] = -math.inf  # masked vocabulary
    idx = D._top_k(x, 16)
    assert idx.shape == (300, 16)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # each index once
    got = x.gather(-1, idx).sort(-1).values
    torch.testing.assert_close(got, x.topk(16, -1).values.sort(-1).values)


def test_symmetric_solver_gives_the_general_potentials_with_a_equal_b():
    g = torch.Generator().manual_seed(5)
    la = (3 * torch.randn(50, 32, generator=g, dtype=torch.float64)).log_softmax(-1)
    la[:, :3] = -math.inf  # duplicate slots
    for eps in (0.01, 0.05, 0.3):
        f, g_ = D._potentials_01(la, la, eps, 50)
        fs, gs = D._self_potentials_01(la, eps, 50)
        torch.testing.assert_close(fs, f, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(gs, g_, atol=1e-12, rtol=1e-10)


def test_wasserstein_penalty_is_unchanged_by_a_per_row_shift_of_its_inputs():
    """It may be given logits: only their renormalised restriction to the support is used."""
    pol, ref, _ = logits(512, seed=6, dtype=torch.float64, shape=(20,))
    shift = 1e3 * torch.randn(20, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    div = D.get("wasserstein")
    on_logprobs = div.penalty(pol.log_softmax(-1), ref.log_softmax(-1))
    torch.testing.assert_close(div.penalty(pol + shift, ref - shift), on_logprobs, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("params", [{}, {"token_embeddings": torch.randn(64, 4)}], ids=["0/1", "embeddings"])
def test_token_penalty_of_a_batch_without_response_positions_is_zero(params):
    pol = torch.randn(2, 3, 64, requires_grad=True)
    d = D.token_penalty(D.get("wasserstein", **params), pol, torch.randn(2, 3, 64), torch.zeros(2, 3))
    (g,) = torch.autograd.grad(d.sum(), pol)
    assert (d == 0).all() and (g == 0).all()
