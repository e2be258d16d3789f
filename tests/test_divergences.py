"""Divergences: closed forms (numpy/scipy), limits, peers (scipy, POT), numerics and bad arguments."""
import math

import numpy as np
import ot
import pytest
import torch
from scipy.spatial.distance import cdist, jensenshannon
from scipy.special import rel_entr

from kdpo_lab import divergences as D


pytestmark = pytest.mark.usefixtures("one_thread")


LINKED = [n for n in D.NAMES if n != "wasserstein"]
# every divergence with non-default parameters too, as (name, params)
CASES = [(n, {}) for n in D.NAMES] + [("renyi", {"order": 0.5}), ("renyi", {"order": 2.0}),
                                      ("alpha", {"alpha": 0.2}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 0.9})]
LINK_CASES = [(n, p) for n, p in CASES if n != "wasserstein"]


def dirichlet(shape, V, seed, conc=1.0):
    """Random distributions [*shape, V] in float64 (log-probabilities and probabilities)."""
    p = np.random.default_rng(seed).dirichlet(np.full(V, conc), size=shape)
    p = np.clip(p, 1e-12, None)
    p = p / p.sum(-1, keepdims=True)
    return torch.from_numpy(np.log(p)), p


def case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------- closed forms of the penalty

def numpy_penalty(name, p, q, params):
    if name == "kl":
        return rel_entr(p, q).sum(-1)
    if name == "forward_kl":
        return rel_entr(q, p).sum(-1)
    if name == "js":  # the textbook JSD; scipy returns its square root
        return jensenshannon(p, q, axis=-1) ** 2
    if name == "hellinger":
        return ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)
    if name == "renyi":
        a = params.get("order", 0.3)  # default order 0.3 (was 0.5 before the seven were made distinct)
        return np.log((p ** a * q ** (1 - a)).sum(-1)) / (a - 1)
    if name == "bhattacharyya":
        return -np.log(np.sqrt(p * q).sum(-1))
    if name == "alpha":
        a = params.get("alpha", 0.3)  # default alpha 0.3 (was 0.5)
        return ((p ** (1 - a) * q ** a).sum(-1) - 1) / (a * (a - 1))
    if name == "chi2":
        return (p ** 2 / q).sum(-1) - 1
    raise KeyError(name)


@pytest.mark.parametrize("case", LINK_CASES, ids=case_id)
def test_penalty_matches_numpy_closed_form(case):
    name, params = case
    logp, p = dirichlet((3, 4), 12, seed=1)
    logq, q = dirichlet((3, 4), 12, seed=2)
    got = D.get(name, **params).penalty(logp, logq)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got.numpy(), numpy_penalty(name, p, q, params), rtol=1e-9, atol=1e-10)


def test_js_penalty_is_scipy_jensenshannon_squared_and_at_most_log_two():
    logp, p = dirichlet((5,), 30, seed=3, conc=0.3)
    logq, q = dirichlet((5,), 30, seed=4, conc=0.3)
    got = D.get("js").penalty(logp, logq).numpy()
    np.testing.assert_allclose(got, jensenshannon(p, q, axis=-1) ** 2, rtol=1e-9)
    assert (got <= math.log(2)).all()
    disjoint = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=torch.float64)
    assert abs(float(D.get("js").penalty(disjoint[0], disjoint[1])) - math.log(2)) < 1e-12


@pytest.mark.parametrize("case", [c for c in LINK_CASES if D.get(c[0], **c[1]).is_f_divergence], ids=case_id)
def test_f_divergence_penalty_is_sum_q_f_of_ratio(case):
    div = D.get(case[0], **case[1])
    logp, p = dirichlet((6,), 10, seed=5)
    logq, q = dirichlet((6,), 10, seed=6)
    p, q = torch.from_numpy(p), torch.from_numpy(q)
    expected = (q * div.generator(p / q)).sum(-1)
    scale = 0.5 if case[0] == "js" else 1.0  # js: TRL's f gives 2 JSD; the penalty is the textbook JSD
    torch.testing.assert_close(div.penalty(logp, logq), scale * expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("order", [0.3, 0.5, 2.0, 3.0])
def test_renyi_is_log_transform_of_its_generating_alpha_divergence(order):
    div = D.get("renyi", order=order)
    logp, p = dirichlet((6,), 10, seed=7)
    logq, q = dirichlet((6,), 10, seed=8)
    p, q = torch.from_numpy(p), torch.from_numpy(q)
    d_f = (q * div.generator(p / q)).sum(-1)
    expected = torch.log1p(order * (order - 1) * d_f) / (order - 1)
    torch.testing.assert_close(div.penalty(logp, logq), expected, rtol=1e-9, atol=1e-10)


def test_bhattacharyya_is_minus_log_one_minus_half_hellinger():
    logp, _ = dirichlet((8,), 15, seed=9)
    logq, _ = dirichlet((8,), 15, seed=10)
    h2 = D.get("hellinger").penalty(logp, logq)
    torch.testing.assert_close(D.get("bhattacharyya").penalty(logp, logq), -torch.log(1 - h2 / 2))


# ---------------------------------------------------------------- links

RHO = torch.linspace(-6.0, 6.0, 49, dtype=torch.float64)


def closed_form_link(name, rho, params):
    """The link scores f'(e^rho) - f'(1) as written by hand (TRL's scores for kl/forward_kl/js/alpha)."""
    if name == "kl":
        return rho
    if name == "forward_kl":
        return 1 - np.exp(-rho)
    if name == "js":
        return np.log(2) - np.log1p(np.exp(-rho))
    if name in ("hellinger", "bhattacharyya"):
        return 1 - np.exp(-rho / 2)
    if name == "renyi":  # TRL alpha_divergence with f_alpha_divergence_coef = order
        c = params.get("order", 0.3)
        return (np.exp((c - 1) * rho) - 1) / (c - 1)
    if name == "alpha":  # TRL alpha_divergence with f_alpha_divergence_coef = 1 - alpha
        c = 1 - params.get("alpha", 0.3)
        return (np.exp((c - 1) * rho) - 1) / (c - 1)
    if name == "chi2":
        return 2 * (np.exp(rho) - 1)
    raise KeyError(name)


@pytest.mark.parametrize("case", LINK_CASES, ids=case_id)
def test_link_matches_closed_form(case):
    name, params = case
    got = D.get(name, **params).link(RHO)
    np.testing.assert_allclose(got.numpy(), closed_form_link(name, RHO.numpy(), params), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", LINK_CASES, ids=case_id)
def test_link_is_f_prime_of_exp_rho_minus_f_prime_one(case):
    div = D.get(case[0], **case[1])
    one = torch.ones((), dtype=torch.float64)
    torch.testing.assert_close(div.link(RHO), div.f_prime(RHO.exp()) - div.f_prime(one))


@pytest.mark.parametrize("case", LINK_CASES, ids=case_id)
def test_link_is_autograd_derivative_of_generator(case):
    div = D.get(case[0], **case[1])
    u = torch.cat([RHO.exp(), torch.ones(1, dtype=torch.float64)]).requires_grad_(True)
    (df,) = torch.autograd.grad(div.generator(u).sum(), u)
    torch.testing.assert_close(div.link(RHO), df[:-1] - df[-1])


@pytest.mark.parametrize("case", LINK_CASES, ids=case_id)
def test_generator_is_zero_at_one_and_convex(case):
    div = D.get(case[0], **case[1])
    u = torch.linspace(0.05, 5.0, 200, dtype=torch.float64)
    f = div.generator(u)
    assert abs(float(div.generator(torch.tensor(1.0, dtype=torch.float64)))) < 1e-12
    assert (f[:-2] + f[2:] - 2 * f[1:-1] >= -1e-12).all()  # second differences on a uniform grid


@pytest.mark.parametrize("case", LINK_CASES, ids=case_id)
def test_link_is_zero_at_zero_and_increasing(case):
    div = D.get(case[0], **case[1])
    assert float(div.link(torch.zeros(()))) == 0.0
    assert (div.link(RHO).diff() > 0).all()


def test_link_slope_is_f_second_derivative_times_u():
    """ds/drho = f''(u) u, the per-example DPO gradient weight."""
    r = RHO
    slopes = {"kl": torch.ones_like(r), "forward_kl": torch.exp(-r), "js": torch.sigmoid(-r),
              "hellinger": 0.5 * torch.exp(-r / 2), "bhattacharyya": 0.5 * torch.exp(-r / 2),
              "renyi": torch.exp(-0.7 * r), "alpha": torch.exp(-0.3 * r), "chi2": 2 * torch.exp(r)}  # defaults 0.3
    for name, expected in slopes.items():
        torch.testing.assert_close(D.link_slope(name, r), expected, msg=name)


def test_renyi_link_is_alpha_link_with_alpha_one_minus_order():
    for order in (0.2, 0.5, 0.8):
        torch.testing.assert_close(D.get("renyi", order=order).link(RHO), D.get("alpha", alpha=1 - order).link(RHO))


# ---------------------------------------------------------------- seven distinct losses

def proportional(a, b, tol=1e-6):
    """a = c * b for one constant c (least squares residual relative to |a|)."""
    c = (a * b).sum() / (b * b).sum()
    return float((a - c * b).norm() / a.norm()) < tol


def column(div):
    """The loss a grid column uses at divergence_form="auto": (link on RHO, penalty on random pairs or None)."""
    logp, _ = dirichlet((40,), 16, seed=61)
    logq, _ = dirichlet((40,), 16, seed=62)
    if div.has_link:
        return div.link(RHO), None
    return D.get("kl").link(RHO), div.penalty(logp, logq)


def same_loss(a, b):
    """Equal up to a factor on z (absorbed by beta) and a factor on the penalty (absorbed by lam)."""
    (link_a, pen_a), (link_b, pen_b) = a, b
    if (pen_a is None) != (pen_b is None):
        return False
    return proportional(link_a, link_b) and (pen_a is None or proportional(pen_a, pen_b))


def test_no_two_of_the_paper_seven_are_the_same_loss_at_default_parameters():
    seven = {name: column(D.get(name)) for name in D.PAPER_SEVEN}
    same = [(a, b) for i, a in enumerate(seven) for b in list(seven)[i + 1:] if same_loss(seven[a], seven[b])]
    assert same == []
    # the criterion sees the duplicates of the former defaults (Renyi 0.5, alpha 0.5, Bhattacharyya as a link)
    hellinger = column(D.get("hellinger"))
    for old in (D.get("renyi", order=0.5), D.get("alpha", alpha=0.5), D.Hellinger()):
        assert same_loss(column(old), hellinger)
    assert proportional(D.get("bhattacharyya").link(RHO), hellinger[0])  # its link would be Hellinger's


def test_renyi_and_alpha_defaults_sit_on_either_side_of_hellinger():
    assert D.get("alpha").alpha == 0.3 and D.get("renyi").order == 0.3  # links s_0.3 and s_0.7
    torch.testing.assert_close(D.get("renyi").link(RHO), D.get("alpha", alpha=0.7).link(RHO))


# ---------------------------------------------------------------- limits

@pytest.mark.parametrize("delta", [1e-5, -1e-5])
def test_renyi_order_to_one_is_kl(delta):
    logp, _ = dirichlet((5,), 12, seed=11)
    logq, _ = dirichlet((5,), 12, seed=12)
    renyi = D.get("renyi", order=1 + delta)
    torch.testing.assert_close(renyi.penalty(logp, logq), D.get("kl").penalty(logp, logq), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(renyi.link(RHO), D.get("kl").link(RHO), rtol=1e-3, atol=1e-6)


def test_alpha_to_zero_is_reverse_kl():
    logp, _ = dirichlet((5,), 12, seed=13)
    logq, _ = dirichlet((5,), 12, seed=14)
    a = D.get("alpha", alpha=1e-6)
    torch.testing.assert_close(a.link(RHO), D.get("kl").link(RHO), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.penalty(logp, logq), D.get("kl").penalty(logp, logq), rtol=1e-4, atol=1e-6)


def test_alpha_to_one_is_forward_kl():
    logp, _ = dirichlet((5,), 12, seed=15)
    logq, _ = dirichlet((5,), 12, seed=16)
    a = D.get("alpha", alpha=1 - 1e-6)
    torch.testing.assert_close(a.link(RHO), D.get("forward_kl").link(RHO), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.penalty(logp, logq), D.get("forward_kl").penalty(logp, logq), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_penalty_is_zero_at_equal_and_positive_otherwise(case):
    div = D.get(case[0], **case[1])
    logp, _ = dirichlet((4, 3), 10, seed=17)
    logq, _ = dirichlet((4, 3), 10, seed=18)
    torch.testing.assert_close(div.penalty(logp, logp), torch.zeros(4, 3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (div.penalty(logp, logq) > 1e-3).all()


def test_wasserstein_with_embeddings_is_zero_at_equal_and_positive_otherwise():
    E = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    div = D.get("wasserstein", token_embeddings=E)
    logp, _ = dirichlet((4,), 10, seed=19)
    logq, _ = dirichlet((4,), 10, seed=20)
    torch.testing.assert_close(div.penalty(logp, logp), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (div.penalty(logp, logq) > 1e-3).all()


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("name", LINKED)
def test_link_finite_with_finite_grads_at_extreme_rho(name):
    rho = torch.tensor([-1e4, -100.0, -50.0, 0.0, 50.0, 100.0, 1e4], requires_grad=True)
    s = D.get(name).link(rho)
    (g,) = torch.autograd.grad(s.sum(), rho)
    assert torch.isfinite(s).all() and torch.isfinite(g).all()
    s16 = D.get(name).link(rho.detach().bfloat16())
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()


@pytest.mark.parametrize("name", ["forward_kl", "hellinger", "bhattacharyya", "renyi", "alpha", "chi2"])
def test_exponential_links_finite_at_infinite_rho(name):
    rho = torch.tensor([-math.inf, math.inf], requires_grad=True)
    s = D.get(name).link(rho)
    (g,) = torch.autograd.grad(s.sum(), rho)
    assert torch.isfinite(s).all() and torch.isfinite(g).all()


def logits_with_extremes(seed):
    """[6, 12] logits: columns 0-1 masked (-inf) in both, column 2 at -1e4 in the policy only,
    column 3 at -1e4 in the reference only."""
    g = torch.Generator().manual_seed(seed)
    pl, rl = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    pl[:, :2] = rl[:, :2] = -math.inf
    pl[:, 2] = -1e4
    rl[:, 3] = -1e4
    return pl.requires_grad_(True), rl


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_penalty_finite_with_finite_grads_for_masked_and_tiny_logprobs(case):
    policy_logits, ref_logits = logits_with_extremes(seed=21)
    logp, logq = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    d = D.get(case[0], **case[1]).penalty(logp, logq)
    (g,) = torch.autograd.grad(d.sum(), policy_logits)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()
    assert (g[:, :2] == 0).all()  # masked tokens get no gradient


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_masked_tokens_contribute_nothing(case):
    """0 log 0 = 0: appending tokens with log-probability -inf on both sides changes nothing."""
    div = D.get(case[0], **case[1])
    if case[0] == "wasserstein":
        div = D.get("wasserstein", k=16)
    logp, _ = dirichlet((3,), 8, seed=22)
    logq, _ = dirichlet((3,), 8, seed=23)
    pad = torch.full((3, 4), -math.inf, dtype=torch.float64)
    torch.testing.assert_close(div.penalty(torch.cat([logp, pad], -1), torch.cat([logq, pad], -1)),
                               div.penalty(logp, logq))


def test_penalty_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        D.get("kl").penalty(torch.zeros(3, 5), torch.zeros(3, 6))


# ---------------------------------------------------------------- token_penalty

def test_token_penalty_is_mean_over_masked_positions():
    g = torch.Generator().manual_seed(0)
    pl, rl = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    pl[mask == 0] = math.nan  # never read: padding positions are not computed
    got = D.token_penalty("kl", pl, rl, mask)
    kl = D.get("kl")
    for i in range(3):
        pos = mask[i].bool()
        expected = kl.penalty(pl[i, pos].log_softmax(-1), rl[i, pos].log_softmax(-1)).mean() if pos.any() else 0.0
        torch.testing.assert_close(got[i], torch.as_tensor(expected, dtype=torch.float32))
    assert got[2] == 0


def test_token_penalty_keeps_float64():
    pl, rl = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    assert D.token_penalty("js", pl, rl, torch.ones(2, 3)).dtype == torch.float64


def test_token_penalty_backpropagates_to_policy_logits_in_float32():
    g = torch.Generator().manual_seed(1)
    pl = torch.randn(2, 4, 9, generator=g).bfloat16().requires_grad_(True)
    rl = torch.randn(2, 4, 9, generator=g).bfloat16()
    mask = torch.ones(2, 4)
    for name in D.NAMES:
        out = D.token_penalty(name, pl, rl, mask)
        assert out.dtype == torch.float32 and out.shape == (2,)
        (grad,) = torch.autograd.grad(out.sum(), pl)
        assert torch.isfinite(grad.float()).all() and grad.abs().sum() > 0, name


def test_token_penalty_bad_shapes_raise():
    with pytest.raises(ValueError, match="mask"):
        D.token_penalty("kl", torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits"):
        D.token_penalty("kl", torch.zeros(2, 3, 5), torch.zeros(2, 3, 6), torch.ones(2, 3))


# ---------------------------------------------------------------- Wasserstein

def entropy(logp):
    return (-(logp.exp() * logp).sum(-1)).numpy()


def test_wasserstein_under_01_metric_is_total_variation():
    eps = 0.01
    logp, p = dirichlet((4,), 20, seed=30, conc=0.5)
    logq, q = dirichlet((4,), 20, seed=31, conc=0.5)
    got = D.get("wasserstein", k=20, epsilon=eps, n_iter=300).penalty(logp, logq).numpy()
    tv = 0.5 * np.abs(p - q).sum(-1)
    assert (np.abs(got - tv) <= eps * np.maximum(entropy(logp), entropy(logq))).all()


@pytest.mark.parametrize("ground", ["embeddings", "matrix"])
def test_wasserstein_matches_exact_emd2_within_epsilon_bound(ground):
    """|S_eps - W1| <= eps * max(H(a), H(b)) (docstring of Wasserstein); POT's emd2 is exact."""
    V, eps = 15, 0.01
    g = torch.Generator().manual_seed(2)
    E = torch.randn(V, 6, generator=g, dtype=torch.float64)
    if ground == "embeddings":
        params = {"token_embeddings": E}
        unit = E.numpy() / np.linalg.norm(E.numpy(), axis=1, keepdims=True)
        C = cdist(unit, unit)  # chord distance of unit vectors
    else:
        C = cdist(E.numpy(), E.numpy(), metric="cityblock")
        C = C / C.max()
        params = {"cost": torch.from_numpy(C)}
    logp, p = dirichlet((4,), V, seed=50, conc=0.5)
    logq, q = dirichlet((4,), V, seed=51, conc=0.5)
    got = D.get("wasserstein", k=V, epsilon=eps, n_iter=300, **params).penalty(logp, logq).numpy()
    exact = np.array([ot.emd2(p[i], q[i], C) for i in range(4)])
    bound = eps * np.maximum(entropy(logp), entropy(logq))
    assert (np.abs(got - exact) <= bound).all()
    assert (bound < 0.2 * exact).all()  # the tolerance is meaningful


def test_sinkhorn_ot_matches_pot_entropic_plan():
    """OT_eps = <P, C> + eps KL(P || a b^T) with POT's Sinkhorn plan P (same optimum as POT's -eps H(P))."""
    V, eps = 10, 0.1
    C = cdist(*(2 * [np.random.default_rng(3).normal(size=(V, 3))]))
    C = C / C.max()
    logp, p = dirichlet((), V, seed=70)
    logq, q = dirichlet((), V, seed=71)
    P = ot.sinkhorn(p, q, C, reg=eps, method="sinkhorn_log", numItermax=10000, stopThr=1e-12)
    expected = (P * C).sum() + eps * rel_entr(P, np.outer(p, q)).sum()
    got = D.sinkhorn_ot(logp, logq, torch.from_numpy(C), epsilon=eps, n_iter=500)
    assert abs(float(got) - expected) < 1e-7


def test_wasserstein_gradient_matches_finite_differences():
    """One differentiable Sinkhorn step from converged potentials gives the exact gradient (eps = 0.3:
    converged to machine precision in 400 iterations; smaller eps converges more slowly)."""
    V = 8
    E = torch.randn(V, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    div = D.get("wasserstein", token_embeddings=E, k=V, epsilon=0.3, n_iter=400)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    logq, _ = dirichlet((), V, seed=72)
    value = lambda z: div.penalty(z.log_softmax(-1), logq)
    (grad,) = torch.autograd.grad(value(logits), logits)
    logits = logits.detach()
    direction = torch.randn(V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h = 1e-5
    numeric = (value(logits + h * direction) - value(logits - h * direction)) / (2 * h)
    assert abs(float(numeric) - float(grad @ direction)) < 1e-8


def test_wasserstein_small_support_is_exact_on_the_renormalised_union_of_top_k():
    V, k, eps = 30, 4, 0.01
    E = torch.randn(V, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    div = D.get("wasserstein", token_embeddings=E, k=k, epsilon=eps, n_iter=300)
    logp, p = dirichlet((), V, seed=73, conc=0.3)
    logq, q = dirichlet((), V, seed=74, conc=0.3)
    support = np.union1d(np.argsort(-p)[:k], np.argsort(-q)[:k])
    a, b = p[support] / p[support].sum(), q[support] / q[support].sum()
    C = div.ground_cost(torch.from_numpy(support)).numpy()
    exact = ot.emd2(a, b, C)
    H = max(-(a * np.log(a)).sum(), -(b * np.log(b)).sum())
    assert abs(float(div.penalty(logp, logq)) - exact) <= eps * H


def test_wasserstein_is_batched_over_leading_dims():
    E = torch.randn(12, 4, generator=torch.Generator().manual_seed(8))
    div = D.get("wasserstein", token_embeddings=E, k=5)
    logp, _ = dirichlet((2, 3), 12, seed=75)
    logq, _ = dirichlet((2, 3), 12, seed=76)
    batched = div.penalty(logp.float(), logq.float())
    rows = torch.stack([div.penalty(logp[i, j].float(), logq[i, j].float()) for i in range(2) for j in range(3)])
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched.reshape(-1), rows, atol=1e-5, rtol=1e-5)


def test_wasserstein_runs_on_a_large_vocabulary():
    V = 50_000
    g = torch.Generator().manual_seed(9)
    E = torch.randn(V, 16, generator=g)
    logits = (3 * torch.randn(4, V, generator=g)).requires_grad_(True)
    logq = (3 * torch.randn(4, V, generator=g)).log_softmax(-1)
    d = D.get("wasserstein", token_embeddings=E).penalty(logits.log_softmax(-1), logq)
    (grad,) = torch.autograd.grad(d.sum(), logits)
    assert torch.isfinite(d).all() and (d > 0).all() and torch.isfinite(grad).all()


def test_embedding_ground_cost_is_chord_distance_of_unit_vectors():
    E = torch.randn(7, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    unit = (E / E.norm(dim=1, keepdim=True)).numpy()
    C = D.get("wasserstein", token_embeddings=E).ground_cost(torch.arange(7))
    np.testing.assert_allclose(C.numpy(), cdist(unit, unit), atol=1e-6)


# ---------------------------------------------------------------- registry and bad arguments

def test_registry_holds_the_paper_seven_and_returns_instances():
    assert set(D.PAPER_SEVEN) <= set(D.NAMES) and len(D.PAPER_SEVEN) == 7
    for name in D.NAMES:
        div = D.get(name)
        assert div.name == name and D.get(div) is div
    penalty_only = {"wasserstein", "bhattacharyya"}
    assert all(D.get(n).has_link == (n not in penalty_only) for n in D.NAMES)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="bhattacharyya"):
        D.get("kullback")


@pytest.mark.parametrize("name, params, match", [
    ("kl", {"order": 2.0}, "bad parameters"),
    ("renyi", {"order": 1.0}, "'kl'"),
    ("renyi", {"order": 0.0}, "> 0"),
    ("renyi", {"order": -0.5}, "> 0"),
    ("renyi", {"order": math.inf}, "> 0"),
    ("alpha", {"alpha": 0.0}, r"\(0, 1\)"),
    ("alpha", {"alpha": 1.0}, r"\(0, 1\)"),
    ("alpha", {"alpha": 1.5}, r"\(0, 1\)"),
    ("wasserstein", {"k": 0}, "k"),
    ("wasserstein", {"epsilon": 0.0}, "epsilon"),
    ("wasserstein", {"n_iter": 0}, "n_iter"),
    ("wasserstein", {"cost": torch.ones(3, 4)}, "square"),
    ("wasserstein", {"cost": -torch.ones(3, 3)}, "non-negative"),
    ("wasserstein", {"token_embeddings": torch.ones(3)}, r"\[V, d\]"),
    ("wasserstein", {"token_embeddings": torch.ones(3, 2), "cost": torch.ones(3, 3)}, "not both"),
])
def test_bad_parameters_raise_value_error(name, params, match):
    with pytest.raises(ValueError, match=match):
        D.get(name, **params)


def test_params_with_an_instance_raise():
    with pytest.raises(ValueError):
        D.get(D.get("kl"), order=2)


def test_wasserstein_has_no_link_and_says_to_use_the_penalty():
    with pytest.raises(ValueError, match="penalty"):
        D.get("wasserstein").link(torch.zeros(3))


def test_wasserstein_cost_smaller_than_vocabulary_raises():
    div = D.get("wasserstein", cost=torch.ones(5, 5) - torch.eye(5))
    with pytest.raises(ValueError, match="covers 5 tokens"):
        div.penalty(torch.zeros(2, 8).log_softmax(-1), torch.zeros(2, 8).log_softmax(-1))


# ---------------------------------------------------------------- Wasserstein: the O(n) 0/1-metric solver

def near(V, seed, scale=3.0, noise=0.5, shape=(6,)):
    """Peaked next-token-like distributions p, q with p close to q (the hard case for plain Sinkhorn)."""
    g = torch.Generator().manual_seed(seed)
    ref = scale * torch.randn(*shape, V, generator=g, dtype=torch.float64)
    pol = ref + noise * torch.randn(*shape, V, generator=g, dtype=torch.float64)
    return pol.log_softmax(-1), ref.log_softmax(-1)


def plan(la, lb, f, g, C, eps):
    """P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps): the entropic plan of the potentials."""
    return (la.unsqueeze(-1) + lb.unsqueeze(-2) + (f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps).exp()


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.3])
def test_01_metric_potentials_give_a_plan_with_both_marginals_exact_when_p_is_close_to_q(eps):
    logp, logq = near(12, seed=80)
    f, g = D._potentials_01(logp, logq, eps, 50)
    P = plan(logp, logq, f, g, 1.0 - torch.eye(12, dtype=torch.float64), eps)
    torch.testing.assert_close(P.sum(-1), logp.exp(), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(P.sum(-2), logq.exp(), atol=1e-12, rtol=1e-9)


def test_01_metric_solver_matches_pot_sinkhorn_with_the_explicit_cost():
    """Same OT_eps as POT's log-domain Sinkhorn on C = 1 - I (eps = 0.1, where plain Sinkhorn converges)."""
    V, eps = 10, 0.1
    C = 1.0 - np.eye(V)
    logp, p = dirichlet((), V, seed=81)
    logq, q = dirichlet((), V, seed=82)
    P = ot.sinkhorn(p, q, C, reg=eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
    expected = (P * C).sum() + eps * rel_entr(P, np.outer(p, q)).sum()
    got = D.sinkhorn_ot(logp, logq, None, epsilon=eps)
    assert abs(float(got) - expected) < 1e-9


def test_01_metric_solver_matches_generic_sinkhorn_run_to_convergence():
    logp, logq = near(16, seed=83, noise=1.0)
    C = 1.0 - torch.eye(16, dtype=torch.float64)
    fast = D.sinkhorn_ot(logp, logq, None, epsilon=0.1)
    slow = D.sinkhorn_ot(logp, logq, C, epsilon=0.1, n_iter=5000)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)


def test_01_metric_penalty_gradient_matches_finite_differences_at_default_epsilon():
    """The potentials are exact, so the envelope gradient is exact at eps = 0.05 (where 50 plain
    Sinkhorn iterations were not converged)."""
    div = D.get("wasserstein", k=12)
    logits = (3 * torch.randn(12, generator=torch.Generator().manual_seed(84), dtype=torch.float64)).requires_grad_(True)
    logq = (logits.detach() + 0.5 * torch.randn(12, generator=torch.Generator().manual_seed(85),
                                                dtype=torch.float64)).log_softmax(-1)
    value = lambda z: div.penalty(z.log_softmax(-1), logq)
    (grad,) = torch.autograd.grad(value(logits), logits)
    direction = torch.randn(12, generator=torch.Generator().manual_seed(86), dtype=torch.float64)
    h = 1e-5
    numeric = (value(logits.detach() + h * direction) - value(logits.detach() - h * direction)) / (2 * h)
    assert abs(float(numeric) - float(grad @ direction)) < 1e-8


def test_default_01_penalty_is_within_its_epsilon_bound_of_total_variation_on_the_support():
    """Default settings (k = 16, eps = 0.05), float32, peaked and close p, q: |S_eps - W1| <= eps max H,
    W1 = TV of the renormalised distributions on the union of the top-16 supports."""
    logp, logq = near(512, seed=87, shape=(64,))
    got = D.get("wasserstein").penalty(logp.float(), logq.float()).double()
    idx, dup = D._union_support(logp, logq, 16)
    la, lb = D._restrict(logp, idx, dup), D._restrict(logq, idx, dup)
    tv = 0.5 * (la.exp() - lb.exp()).abs().sum(-1)
    H = torch.maximum(-(la.exp() * la.nan_to_num(neginf=0.0)).sum(-1), -(lb.exp() * lb.nan_to_num(neginf=0.0)).sum(-1))
    assert ((got - tv).abs() <= 0.05 * H).all()
    assert (tv > 0.02).all() and (0.05 * H < 0.2).all()  # the bound says something


def test_union_support_holds_each_top_k_token_once():
    logp, logq = near(40, seed=88, noise=2.0)
    idx, dup = D._union_support(logp, logq, 5)
    for i in range(logp.shape[0]):
        kept = set(idx[i][~dup[i]].tolist())
        expected = set(logp[i].topk(5).indices.tolist()) | set(logq[i].topk(5).indices.tolist())
        assert kept == expected and len(kept) == int((~dup[i]).sum())
