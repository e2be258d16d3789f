"""Facts about the course's exercise checks: each accepts the reference solution (the one in
notebooks/solutions/), rejects a typical wrong answer, and reports a stub as not yet right without raising."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdpo_lab import exercises as ex


def stub(*args):
    """What the notebooks ship: the student has not written anything yet."""
    return None


def raises(*args):
    raise NotImplementedError("write me")


def paired_t(a, b, z=None):
    """Notebook 10's solution: mean of d = a - b and its 95% t interval (z: a normal quantile instead)."""
    from scipy import stats
    d = a - b
    half = (z or stats.t.ppf(0.975, len(d) - 1)) * d.std(unbiased=True) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


# (check, reference solution, typical wrong answer)
CASES = {
    "optimal_policy": (ex.check_optimal_policy,
                       lambda r, pi_ref, beta: torch.softmax(pi_ref.log() + r / beta, -1),
                       lambda r, pi_ref, beta: torch.softmax(pi_ref.log() + r * beta, -1)),    # beta upside down
    "optimal_value": (ex.check_optimal_value,
                      lambda r, pi_ref, beta: beta * torch.log((pi_ref * torch.exp(r / beta)).sum()),
                      lambda r, pi_ref, beta: torch.log((pi_ref * torch.exp(r / beta)).sum())),  # no beta
    "dpo_loss": (ex.check_dpo_loss,
                 lambda pw, pl, rw, rl, beta: -F.logsigmoid(beta * ((pw - rw) - (pl - rl))),
                 lambda pw, pl, rw, rl, beta: -F.logsigmoid(beta * (pw - pl))),                 # no reference
    "rbf_log_kernel": (ex.check_rbf_log_kernel,
                       lambda x, y, s: -(F.normalize(x, dim=-1) - F.normalize(y, dim=-1)).pow(2).sum(-1) / (2 * s**2),
                       lambda x, y, s: -(x - y).pow(2).sum(-1) / (2 * s**2)),                   # not on directions
    "normalised_spectral": (ex.check_normalised_spectral,
                            lambda u, v, A: (torch.einsum("bi,ij,bj->b", u, A, v)
                                             - 0.5 * torch.einsum("bi,ij,bj->b", u, A, u)
                                             - 0.5 * torch.einsum("bi,ij,bj->b", v, A, v)),
                            lambda u, v, A: torch.einsum("bi,ij,bj->b", u, A, v) - 1.0),        # "a constant"
    "gram_matrix": (ex.check_gram_matrix,
                    lambda kernel, X: kernel.log_kernel(X[:, None, :], X[None, :, :]).exp().detach(),
                    lambda kernel, X: kernel.log_kernel(X[:, None, :], X[None, :, :]).detach()),  # log, not K
    "link": (ex.check_link,
             lambda f_prime, rho: f_prime(torch.exp(rho)) - f_prime(torch.ones(())),
             lambda f_prime, rho: f_prime(torch.exp(rho))),                                       # no - f'(1)
    "js_link": (ex.check_js_link,
                lambda rho: math.log(2) + F.logsigmoid(rho),
                lambda rho: torch.sigmoid(rho)),
    "hellinger": (ex.check_hellinger,
                  lambda lp, lq: ((lp / 2).exp() - (lq / 2).exp()).pow(2).sum(-1),
                  lambda lp, lq: 0.5 * ((lp / 2).exp() - (lq / 2).exp()).pow(2).sum(-1)),       # the 1/2 convention
    "hmk_weights": (ex.check_hmk_weights,
                    lambda t, a, g: torch.cat([t.softmax(-1)[0] * a.softmax(-1), t.softmax(-1)[1] * g.softmax(-1)]),
                    lambda t, a, g: torch.cat([t, a, g])[:4].softmax(-1)),                       # one softmax
    "hmk_entropy": (ex.check_hmk_entropy,
                    lambda t, a, g: sum(torch.special.entr(x.softmax(-1)).sum() for x in (t, a, g)),
                    lambda t, a, g: torch.special.entr(torch.cat([t.softmax(-1)[0] * a.softmax(-1),
                                                                  t.softmax(-1)[1] * g.softmax(-1)])).sum()),
    "dpo_logit": (ex.check_dpo_logit,
                  lambda rw, rl, beta, gamma, m: beta * (rw - rl) + gamma * m,
                  lambda rw, rl, beta, gamma, m: beta * (rw - rl + gamma * m)),                  # gamma inside beta
    "sampled_kl": (ex.check_sampled_kl,
                   lambda lp, lr: (lp - lr).mean(),
                   lambda lp, lr: (lr - lp).mean()),
    "winrate": (ex.check_winrate,
                lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean(),
                lambda a, b: (a > b).float().mean()),                                            # ties lost
    "param_count": (ex.check_param_count,
                    lambda V, d, L, ff: 2 * V * d + L * (4 * d * d + 3 * d * ff + 2 * d) + d,
                    lambda V, d, L, ff: V * d + L * (4 * d * d + 3 * d * ff)),                    # one embedding, no norms
    "lora_param_count": (ex.check_lora_param_count,
                         lambda d, L, ff, r: r * L * (4 * 2 * d + 3 * (d + ff)),
                         lambda d, L, ff, r: r * L * 4 * 2 * d),                                  # attention only
    "full_finetune_bytes": (ex.check_full_finetune_bytes,
                            lambda P, b: 5 * b * P,
                            lambda P, b: 4 * b * P),                                              # reference forgotten
    "hill_alpha": (ex.check_hill_alpha,
                   lambda ev, xmin: 1 + (ev >= xmin).sum() / torch.log(ev[ev >= xmin] / xmin).sum(),
                   lambda ev, xmin: (ev >= xmin).sum() / torch.log(ev[ev >= xmin] / xmin).sum()),  # the 1 +
    "band": (ex.check_band,
             lambda a: "<2" if a < 2 else "2-4" if a < 4 else "4-6" if a <= 6 else ">6",
             lambda a: "<2" if a <= 2 else "2-4" if a <= 4 else "4-6" if a < 6 else ">6"),       # edges
    "mp_edges": (ex.check_mp_edges,
                 lambda s2, Q: (s2 * (1 - Q**-0.5) ** 2, s2 * (1 + Q**-0.5) ** 2),
                 lambda s2, Q: (s2 * (1 - Q**0.5) ** 2, s2 * (1 + Q**0.5) ** 2)),                 # Q upside down
    "auc": (ex.check_auc,
            lambda p, n: ((p[:, None] > n[None, :]).double() + 0.5 * (p[:, None] == n[None, :]).double()).mean(),
            lambda p, n: (p[:, None] > n[None, :]).double().mean()),                             # ties dropped
    "link_score": (ex.check_link_score,
                   lambda o, k, d, c: o * (1 - abs(c - max(k, 0) / (max(k, 0) + 3) * (1 - d / (d + 1)))),
                   lambda o, k, d, c: o * (1 - abs(c - k / (k + 3)))),                          # no drift term
    "regret": (ex.check_regret,
               lambda t, r: (lambda m: m.result.max() - m.loc[m.score.idxmax(), "result"])(t.merge(r)),
               lambda t, r: (lambda m: m.result.max() - m.loc[m.score.idxmin(), "result"])(t.merge(r))),
    "mixture_margin": (ex.check_mixture_margin,
                       lambda lw, kw, kl: torch.logsumexp(lw + kw, -1) - torch.logsumexp(lw + kl, -1),
                       lambda lw, kw, kl: ((lw.exp() * (kw - kl)).sum(-1))),                    # mixes log-kernels
    "kernel_share": (ex.check_kernel_share,
                     lambda p, m, g: (g * m).abs().mean() / (p.abs().mean() + (g * m).abs().mean()),
                     lambda p, m, g: ((g * m).abs() / (p.abs() + (g * m).abs())).mean()),       # mean of ratios
    "paired_interval": (ex.check_paired_interval, paired_t,
                        lambda a, b: paired_t(a, b, z=1.96)),                                     # normal, not t
    "relative_gain": (ex.check_relative_gain,
                      lambda a, b: (a.mean(0) / b.mean(0) - 1).mean(),
                      lambda a, b: a.mean() / b.mean() - 1),                                        # pooled rewards
}


@pytest.mark.parametrize("name", CASES)
def test_check_accepts_the_reference_solution(name, capsys):
    check, solution, _ = CASES[name]
    assert check(solution) is True
    assert capsys.readouterr().out.startswith("right:")


@pytest.mark.parametrize("name", CASES)
def test_check_rejects_a_typical_wrong_answer_with_a_hint(name, capsys):
    check, _, wrong = CASES[name]
    assert check(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("not yet right:") and "Hint:" in out


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("unfinished", [stub, raises], ids=["returns None", "raises"])
def test_check_reports_an_unfinished_exercise_without_raising(name, unfinished, capsys):
    assert CASES[name][0](unfinished) is False
    assert "not yet right" in capsys.readouterr().out


def test_every_check_in_the_module_is_tested():
    checks = {n for n in dir(ex) if n.startswith("check_")}
    assert checks == {CASES[name][0].__name__ for name in CASES}
