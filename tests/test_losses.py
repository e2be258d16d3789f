"""Facts about the DPO-Kernels loss: closed forms, limits, TRL as peer, numerics, errors."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdpo_lab import divergences, kernels, losses
from kdpo_lab.losses import LOSS_TYPES, kernel_dpo_loss

D = torch.float64


def random_logps(b=64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [(-20 + scale * torch.randn(b, generator=g, dtype=D)) for _ in range(4)]


# ---------------------------------------------------------------- closed forms and limits

def test_kl_without_kernel_is_exactly_dpo():
    pi_w, pi_l, ref_w, ref_l = random_logps()
    beta = 0.3
    loss, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
    dpo = -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))
    assert torch.equal(loss, dpo)
    assert torch.equal(m["rewards/margins"], beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def test_dpo_gradient_matches_closed_form():
    # d loss / d pi_w = -beta * sigmoid(-z)  (Rafailov et al. 2023, Sec. 4)
    pi_w, pi_l, ref_w, ref_l = random_logps()
    pi_w.requires_grad_(True)
    beta = 0.2
    loss, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
    loss.sum().backward()
    assert torch.allclose(pi_w.grad, -beta * torch.sigmoid(-m["logit/z"]))


@pytest.mark.parametrize("name", ["polynomial", "rbf", "spectral", "mahalanobis", "hmk"])
def test_gamma_zero_removes_the_kernel(name):
    pi_w, pi_l, ref_w, ref_l = random_logps(b=8)
    e = torch.randn(3, 8, 16, dtype=D)
    kernel = kernels.get(name).double().fit(torch.randn(64, 16, dtype=D))
    with_kernel, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, kernel=kernel, gamma=0.0, e_x=e[0], e_w=e[1], e_l=e[2])
    plain, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l)
    assert torch.equal(with_kernel, plain)


def test_kernel_term_adds_gamma_times_log_kernel_margin():
    pi_w, pi_l, ref_w, ref_l = random_logps(b=8)
    e_x, e_w, e_l = torch.randn(3, 8, 16, dtype=D)
    kernel, beta, gamma = kernels.get("rbf", sigma=0.7).double(), 0.1, 0.5
    loss, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, kernel=kernel, gamma=gamma, e_x=e_x, e_w=e_w, e_l=e_l)
    u = F.normalize(e_x, dim=-1)
    d_w = (u - F.normalize(e_w, dim=-1)).pow(2).sum(-1)
    d_l = (u - F.normalize(e_l, dim=-1)).pow(2).sum(-1)
    margin = -(d_w - d_l) / (2 * 0.7 ** 2)
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l)) + gamma * margin
    assert torch.allclose(loss, -F.logsigmoid(z))
    assert torch.allclose(m["kernel/margin"], margin)


def test_equal_chosen_and_rejected_embeddings_leave_plain_dpo():
    # The kernel margin log K(e_x, e_w) - log K(e_x, e_l) vanishes when e_w = e_l: linear kernel + KL is DPO.
    pi_w, pi_l, ref_w, ref_l = random_logps(b=8)
    e_x, e_w = torch.randn(2, 8, 16, dtype=D)
    loss, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, kernel=kernels.get("linear"), gamma=2.0, e_x=e_x, e_w=e_w, e_l=e_w)
    plain, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l)
    assert torch.allclose(loss, plain, atol=1e-12)


def test_link_form_uses_the_divergence_score():
    pi_w, pi_l, ref_w, ref_l = random_logps(scale=0.5)
    beta, a = 0.1, 0.3
    loss, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, divergence=divergences.get("alpha", alpha=a))
    s = lambda rho: (1 - torch.exp(-a * rho)) / a  # f'(u) = (1 - u^-alpha) / alpha, shifted so s(0) = 0
    assert torch.allclose(loss, -F.logsigmoid(beta * (s(pi_w - ref_w) - s(pi_l - ref_l))))


def test_renyi_near_order_one_gives_dpo():
    pi_w, pi_l, ref_w, ref_l = random_logps(scale=0.5)
    near, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, divergence=divergences.get("renyi", order=1 + 1e-7))
    plain, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l)
    assert torch.allclose(near, plain, atol=1e-6)


def test_penalty_form_adds_lambda_times_mean_token_divergence():
    b, t, v, lam = 4, 5, 11, 0.7
    pi_w, pi_l, ref_w, ref_l = random_logps(b=b)
    pi_logits, ref_logits = torch.randn(2, 2 * b, t, v, dtype=D)
    mask = torch.ones(2 * b, t, dtype=D)
    mask[:, 3:] = 0
    loss, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, divergence="js", divergence_form="penalty", lam=lam,
                              pi_logits=pi_logits, ref_logits=ref_logits, response_mask=mask)
    p, q = pi_logits.softmax(-1)[:, :3], ref_logits.softmax(-1)[:, :3]
    mid = (p + q) / 2
    js = 0.5 * (p * (p / mid).log()).sum(-1) + 0.5 * (q * (q / mid).log()).sum(-1)  # [2B, 3]
    per_row = js.mean(-1)
    expected_penalty = 0.5 * (per_row[:b] + per_row[b:])
    plain, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l)
    assert torch.allclose(m["divergence/penalty"], expected_penalty)
    assert torch.allclose(loss, plain + lam * expected_penalty)


def test_wasserstein_defaults_to_the_penalty_form():
    b, t, v = 2, 3, 7
    pi_w, pi_l, ref_w, ref_l = random_logps(b=b)
    with pytest.raises(ValueError, match="logits"):
        kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, divergence="wasserstein")
    logits = torch.randn(2, 2 * b, t, v, dtype=D)
    loss, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, divergence="wasserstein", pi_logits=logits[0],
                              ref_logits=logits[1], response_mask=torch.ones(2 * b, t, dtype=D))
    assert "divergence/penalty" in m and torch.isfinite(loss).all()


def test_hmk_entropy_bonus_is_subtracted():
    pi_w, pi_l, ref_w, ref_l = random_logps(b=8)
    e_x, e_w, e_l = torch.randn(3, 8, 16, dtype=D)
    hmk = kernels.get("hmk").double().fit(torch.randn(64, 16, dtype=D))
    kw = dict(kernel=hmk, gamma=1.0, e_x=e_x, e_w=e_w, e_l=e_l)
    without, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, **kw)
    with_bonus, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, eta=0.3, **kw)
    assert torch.allclose(with_bonus, without - 0.3 * hmk.entropy())
    assert torch.allclose(m["kernel/entropy"], hmk.entropy().detach().expand(8))


def test_kernel_embeddings_and_hmk_weights_receive_gradient():
    pi_w, pi_l, ref_w, ref_l = random_logps(b=8)
    e_x, e_w, e_l = (torch.randn(8, 16, dtype=D, requires_grad=True) for _ in range(3))
    hmk = kernels.get("hmk").double().fit(torch.randn(64, 16, dtype=D))
    loss, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, kernel=hmk, gamma=1.0, eta=0.1, e_x=e_x, e_w=e_w, e_l=e_l)
    loss.mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (e_x, e_w, e_l))
    grads = [p.grad for p in hmk.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_offset_shifts_the_logit_odpo():
    pi_w, pi_l, ref_w, ref_l = random_logps()
    delta = torch.rand(64, dtype=D)
    loss, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1, offset=delta)
    z = 0.1 * ((pi_w - ref_w) - (pi_l - ref_l)) - delta
    assert torch.allclose(loss, -F.logsigmoid(z))


def test_conservative_dpo_at_zero_smoothing_is_dpo_and_robust_dpo_is_unbiased():
    pi_w, pi_l, ref_w, ref_l = random_logps()
    plain, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l)
    cdpo, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, loss_type="cdpo", label_smoothing=0.0)
    assert torch.allclose(cdpo, plain)
    # rDPO: the expectation over a flip with probability eps recovers the clean loss (Chowdhury et al. 2024, Lemma 3.1).
    eps = 0.2
    rob, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, loss_type="robust", label_smoothing=eps)
    rob_flipped, _ = kernel_dpo_loss(pi_l, pi_w, ref_l, ref_w, loss_type="robust", label_smoothing=eps)
    assert torch.allclose((1 - eps) * rob + eps * rob_flipped, plain)


def test_ipo_minimum_is_at_margin_one_over_two_beta():
    beta = 0.25
    ref = torch.zeros(1, dtype=D)
    margin = torch.tensor([1 / (2 * beta)], dtype=D)
    loss, _ = kernel_dpo_loss(margin, ref, ref, ref, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0)


def test_length_normalisation_divides_scores_by_length():
    pi_w, pi_l, ref_w, ref_l = random_logps()
    n_w, n_l = torch.randint(1, 30, (2, 64)).to(D)
    loss, _ = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5, length_normalize=True, len_w=n_w, len_l=n_l)
    assert torch.allclose(loss, -F.logsigmoid(0.5 * ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l)))


# ---------------------------------------------------------------- TRL 1.16 as the peer

def trl_loss(pi_w, pi_l, ref_w, ref_l, n_w, n_l, *, beta, loss_type="sigmoid", f_divergence_type="reverse_kl",
             coef=0.5, label_smoothing=0.0):
    """Run TRL's own DPOTrainer._compute_loss on fixed sequence log-probs (a stub model returns them)."""
    from trl import DPOTrainer

    b = pi_w.shape[0]
    t = int(max(n_w.max(), n_l.max())) + 2
    lengths = torch.cat([n_w, n_l]).long()
    completion_mask = (torch.arange(t)[None, :] >= 1) & (torch.arange(t)[None, :] < 1 + lengths[:, None])
    shifted = completion_mask[:, 1:].float()
    per_token = shifted * (torch.cat([pi_w, pi_l]) / lengths)[:, None]  # sums to the sequence log-prob

    def model(**kwargs):
        n = per_token.shape[0]
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, t - 1), mean_logits=torch.zeros(n, t - 1),
                               is_top1=torch.zeros(n, t - 1, dtype=torch.bool))
    model.training = True
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    me = SimpleNamespace(model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                         f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef, loss_types=[loss_type],
                         loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                         _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * b, t, dtype=torch.long), "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
              "completion_mask": completion_mask.long(), "ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l}
    return DPOTrainer._compute_loss(me, model, inputs, return_outputs=False), me._metrics["train"]


TRL_CASES = [
    # (our kwargs, TRL kwargs)
    (dict(), dict()),
    (dict(divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    (dict(divergence="js"), dict(f_divergence_type="js_divergence")),
    (dict(divergence=divergences.get("alpha", alpha=0.3)), dict(f_divergence_type="alpha_divergence", coef=0.7)),
    (dict(divergence=divergences.get("alpha", alpha=0.8)), dict(f_divergence_type="alpha_divergence", coef=0.2)),
    (dict(divergence=divergences.get("renyi", order=0.6)), dict(f_divergence_type="alpha_divergence", coef=0.6)),
    (dict(loss_type="hinge"), dict(loss_type="hinge")),
    (dict(loss_type="ipo", length_normalize=True), dict(loss_type="ipo")),
    (dict(loss_type="robust", label_smoothing=0.1), dict(loss_type="robust", label_smoothing=0.1)),
    (dict(loss_type="robust", label_smoothing=0.3, divergence="js"),
     dict(loss_type="robust", label_smoothing=0.3, f_divergence_type="js_divergence")),
    (dict(length_normalize=True), dict(loss_type="sigmoid_norm")),
]


@pytest.mark.parametrize("ours,theirs", TRL_CASES, ids=[str(c[1]) or "dpo" for c in TRL_CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_agrees_with_trl(ours, theirs, seed):
    # float32: TRL's own domain (its exponent clamps are defined for fp32, bf16 and fp16 only). Log-ratios of a
    # few nats, as in training: at |rho| ~ 10 the alpha scores reach ~1e3 and float32 rounding alone exceeds 1e-6.
    pi_w, pi_l, ref_w, ref_l = (t.float() for t in random_logps(b=32, seed=seed, scale=1.0))
    n_w, n_l = torch.randint(1, 12, (2, 32), generator=torch.Generator().manual_seed(seed)).float()
    beta = 0.1 + 0.2 * seed
    loss, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, len_w=n_w, len_l=n_l, **ours)
    trl, trl_metrics = trl_loss(pi_w, pi_l, ref_w, ref_l, n_w, n_l, beta=beta, **theirs)
    assert loss.mean().item() == pytest.approx(trl.item(), abs=1e-6, rel=1e-6)
    assert m["rewards/margins"].mean().item() == pytest.approx(trl_metrics["rewards/margins"][0], abs=1e-6)
    assert m["rewards/accuracies"].mean().item() == pytest.approx(trl_metrics["rewards/accuracies"][0])


# ---------------------------------------------------------------- the kernel term's share of z

def test_kernel_share_and_margin_std_match_their_definitions():
    pi_w, pi_l, ref_w, ref_l = random_logps(b=16, scale=0.5)
    e_x, e_w, e_l = torch.randn(3, 16, 8, dtype=D)
    kernel, beta, gamma = kernels.get("rbf", sigma=0.5).double(), 0.2, 0.7
    _, m = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, kernel=kernel, gamma=gamma, e_x=e_x, e_w=e_w, e_l=e_l)
    margin = kernels.kernel_margin(kernel, e_x, e_w, e_l)
    prob = (beta * ((pi_w - ref_w) - (pi_l - ref_l))).abs().mean()
    share = (gamma * margin).abs().mean() / (prob + (gamma * margin).abs().mean())
    torch.testing.assert_close(m["kernel/share"], share.expand(16))
    torch.testing.assert_close(m["kernel/margin_std"], margin.std(unbiased=False).expand(16))
    assert 0 < share < 1


def test_kernel_share_is_one_at_the_reference_and_zero_without_gamma():
    zeros = torch.zeros(8, dtype=D)
    e_x, e_w, e_l = torch.randn(3, 8, 4, dtype=D)
    kw = dict(kernel=kernels.get("rbf").double(), e_x=e_x, e_w=e_w, e_l=e_l)
    _, at_start = kernel_dpo_loss(zeros, zeros, zeros, zeros, gamma=0.5, **kw)  # rho = 0: z is all kernel
    assert torch.equal(at_start["kernel/share"], torch.ones(8, dtype=D))
    pi_w, pi_l, ref_w, ref_l = random_logps(b=8)
    _, off = kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, gamma=0.0, **kw)
    assert torch.equal(off["kernel/share"], torch.zeros(8, dtype=D))
    _, nothing = kernel_dpo_loss(zeros, zeros, zeros, zeros, gamma=0.0, **kw)  # both terms vanish: 0, not nan
    assert torch.equal(nothing["kernel/share"], torch.zeros(8, dtype=D))


def test_kernel_trained_alone_reports_one_row_per_step():
    e_x, e_w, e_l, _ = kernels.toy_embedding_pairs(n=32, seed=0)
    hmk = kernels.get("hmk", k=2).fit(torch.cat([e_x, e_w, e_l]))
    history = losses.train_kernel_alone(hmk, e_x, e_w, e_l, losses.KernelOnlyRun(steps=5))
    assert list(history.step) == list(range(6))
    assert {"loss", "margin_std", "accuracy", "w_rbf", "w_poly", "w_spec", "w_maha"} <= set(history.columns)
    zeros = torch.zeros(32)
    first, _ = kernel_dpo_loss(zeros, zeros, zeros, zeros, kernel=kernels.get("hmk", k=2).fit(torch.cat([e_x, e_w, e_l])),
                               gamma=0.5, eta=0.01, e_x=e_x, e_w=e_w, e_l=e_l)
    assert history.loss[0] == pytest.approx(first.mean().item())
    assert history.loss.iloc[-1] < history.loss[0]


# ---------------------------------------------------------------- numerics at the extremes

EXTREME_RHO = torch.tensor([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4], dtype=D)


def extreme_inputs(d=8):
    n = len(EXTREME_RHO)
    rho_w = EXTREME_RHO.repeat_interleave(n)
    rho_l = EXTREME_RHO.repeat(n)
    b = rho_w.shape[0]
    u = torch.randn(d, dtype=D)
    z = torch.zeros(d, dtype=D)
    cases = [(u, u, u), (u, -u, u), (u, u, -u), (z, u, -u), (u, z, z)]
    e = torch.stack([torch.stack(c) for c in cases])  # [5, 3, d]
    e = e[torch.arange(b) % len(cases)]
    return rho_w, rho_l, e[:, 0], e[:, 1], e[:, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel_name", list(kernels.PAPER_FOUR) + ["hmk"])
@pytest.mark.parametrize("div_name", list(divergences.PAPER_SEVEN))
def test_every_pair_is_finite_at_extremes(div_name, kernel_name, dtype):
    rho_w, rho_l, e_x, e_w, e_l = (t.to(dtype) for t in extreme_inputs())
    b, t_len, v = rho_w.shape[0], 2, 6
    pi_w = rho_w.clone().requires_grad_(True)
    pi_l = rho_l.clone().requires_grad_(True)
    e_x, e_w, e_l = (x.clone().requires_grad_(True) for x in (e_x, e_w, e_l))
    pi_logits = (torch.randn(2 * b, t_len, v, dtype=dtype) * 1e4).requires_grad_(True)
    ref_logits = torch.randn(2 * b, t_len, v, dtype=dtype) * 1e4
    kernel = kernels.get(kernel_name).to(dtype).fit(torch.randn(64, 8, dtype=dtype))
    zeros = torch.zeros(b, dtype=dtype)
    loss, _ = kernel_dpo_loss(pi_w, pi_l, zeros, zeros, beta=0.1, divergence=div_name, divergence_form="auto",
                              kernel=kernel, gamma=0.5, eta=0.1,
                              e_x=e_x, e_w=e_w, e_l=e_l, pi_logits=pi_logits, ref_logits=ref_logits,
                              response_mask=torch.ones(2 * b, t_len, dtype=dtype))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    for x in (pi_w, pi_l, e_x, e_w, e_l, pi_logits):
        assert x.grad is None or torch.isfinite(x.grad).all()
    for p in kernel.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("div_name", list(divergences.PAPER_SEVEN))
def test_penalty_form_is_finite_at_extreme_logits(div_name):
    b, t_len, v = 3, 4, 9
    zeros = torch.zeros(b, dtype=D)
    pi_logits = (torch.randn(2 * b, t_len, v, dtype=D) * 1e4).requires_grad_(True)
    ref_logits = torch.randn(2 * b, t_len, v, dtype=D) * 1e4
    loss, m = kernel_dpo_loss(zeros, zeros, zeros, zeros, divergence=div_name, divergence_form="penalty", lam=1.0,
                              pi_logits=pi_logits, ref_logits=ref_logits, response_mask=torch.ones(2 * b, t_len, dtype=D))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pi_logits.grad).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_is_finite_at_extremes(loss_type):
    rho_w, rho_l, *_ = extreme_inputs()
    pi_w = rho_w.clone().requires_grad_(True)
    zeros = torch.zeros_like(rho_w)
    loss, _ = kernel_dpo_loss(pi_w, rho_l, zeros, zeros, loss_type=loss_type, label_smoothing=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pi_w.grad).all()


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=-0.1), "beta"),
    (dict(beta=0.0), "beta"),
    (dict(divergence="kullback"), "kullback"),
    (dict(loss_type="dpo2"), "loss_type"),
    (dict(divergence_form="both"), "divergence_form"),
    (dict(gamma=1.0), "kernel"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(length_normalize=True), "len_w"),
    (dict(divergence="wasserstein", divergence_form="link"), "penalty"),
    (dict(divergence="bhattacharyya", divergence_form="link"), "no link form"),
    (dict(divergence="bhattacharyya"), "pi_logits"),  # auto: the penalty form
    (dict(lam=-1.0), "lam"),
    (dict(eta=-1.0), "eta"),
    (dict(divergence="kl", divergence_form="penalty"), "pi_logits"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    pi_w, pi_l, ref_w, ref_l = random_logps(b=4)
    with pytest.raises(ValueError, match=message):
        kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, **kwargs)


def test_renyi_order_one_is_refused():
    with pytest.raises(ValueError, match="kl"):
        divergences.get("renyi", order=1.0)


def test_mismatched_shapes_are_refused():
    pi_w, pi_l, ref_w, ref_l = random_logps(b=4)
    with pytest.raises(ValueError, match="shape"):
        kernel_dpo_loss(pi_w, pi_l[:3], ref_w, ref_l)
    with pytest.raises(ValueError, match="e_x"):
        kernel_dpo_loss(pi_w, pi_l, ref_w, ref_l, kernel=kernels.get("rbf"), gamma=1.0,
                        e_x=torch.randn(4, 8, dtype=D), e_w=torch.randn(4, 8, dtype=D), e_l=torch.randn(3, 8, dtype=D))


def test_mean_loss_at_zero_margin_is_log_two():
    zeros = torch.zeros(5, dtype=D)
    loss, _ = kernel_dpo_loss(zeros, zeros, zeros, zeros)
    assert torch.allclose(loss, torch.full((5,), math.log(2), dtype=D))
