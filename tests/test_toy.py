"""Facts about the tabular DPO toy of notebook 01: DPO recovers the closed-form RLHF optimum."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from kdpo_lab import toy
from kdpo_lab.losses import kernel_dpo_loss

D = torch.float64


# ---------------------------------------------------------------- the closed-form optimum

@pytest.mark.parametrize("beta", [0.25, 1.0, 4.0])
def test_closed_form_optimum_maximises_kl_regularised_objective_among_random_policies(beta):
    r, pi_ref = toy.make_problem(n=6, seed=1)
    pi_star = toy.optimal_policy(r, pi_ref, beta)
    g = torch.Generator().manual_seed(0)
    # random policies, from spread out to near pi* (small perturbations of its logits)
    spread = torch.empty(2000, 6, dtype=D).exponential_(generator=g)  # normalised: Dirichlet(1, ..., 1)
    spread = spread / spread.sum(-1, keepdim=True)
    near = torch.softmax(pi_star.log() + 0.05 * torch.randn(2000, 6, generator=g, dtype=D), -1)
    best = toy.objective(pi_star, r, pi_ref, beta)
    assert (toy.objective(torch.cat([spread, near]), r, pi_ref, beta) < best).all()


@pytest.mark.parametrize("beta", [0.25, 1.0, 4.0])
def test_optimal_value_is_beta_log_partition_function(beta):
    # J(pi*) = beta log Z, Z = E_{pi_ref}[exp(r / beta)]  (Gibbs variational principle)
    r, pi_ref = toy.make_problem(n=6, seed=2)
    value = toy.objective(toy.optimal_policy(r, pi_ref, beta), r, pi_ref, beta)
    assert torch.allclose(value, beta * torch.log((pi_ref * torch.exp(r / beta)).sum()))


def test_optimum_tends_to_reference_as_beta_grows_and_to_argmax_reward_as_beta_shrinks():
    r, pi_ref = toy.make_problem(n=6, seed=3)
    assert torch.allclose(toy.optimal_policy(r, pi_ref, 1e6), pi_ref, atol=1e-5)
    assert torch.allclose(toy.optimal_policy(r, pi_ref, 1e-3), F.one_hot(r.argmax(), 6).to(D), atol=1e-6)


def test_reward_is_recovered_from_optimum_up_to_beta_log_partition():
    # r = beta log(pi* / pi_ref) + beta log Z: the constant cancels in every Bradley-Terry difference
    r, pi_ref = toy.make_problem(n=6, seed=4)
    beta = 0.7
    implicit = beta * (toy.optimal_policy(r, pi_ref, beta).log() - pi_ref.log())
    log_z = torch.log((pi_ref * torch.exp(r / beta)).sum())
    assert torch.allclose(implicit + beta * log_z, r)


def test_kl_of_a_distribution_with_itself_is_zero_and_matches_torch_elsewhere():
    p, q = torch.softmax(torch.randn(2, 5, dtype=D), -1)
    assert toy.kl(p, p).item() == 0
    assert torch.allclose(toy.kl(p, q), F.kl_div(q.log(), p, reduction="sum"))
    one_hot = F.one_hot(torch.tensor(2), 5).to(D)  # 0 log 0 = 0
    assert torch.allclose(toy.kl(one_hot, q), -q[2].log())


# ---------------------------------------------------------------- Bradley-Terry data

def test_bt_sampling_frequencies_match_sigmoid_of_reward_gap():
    r, _ = toy.make_problem(n=4, seed=5)
    n = 60_000
    w, l = toy.sample_pairs(r, n, seed=0)
    assert (w != l).all()
    P = toy.bt_matrix(r)
    for i in range(4):
        for j in range(i + 1, 4):
            wins = ((w == i) & (l == j)).sum().item()
            total = wins + ((w == j) & (l == i)).sum().item()
            p = P[i, j].item()
            assert abs(wins / total - p) < 5 * math.sqrt(p * (1 - p) / total)
            assert abs(total / n - 1 / 6) < 5 * math.sqrt((1 / 6) * (5 / 6) / n)  # pairs uniform


def test_expected_pairs_weights_are_the_limit_of_sampled_frequencies():
    r, _ = toy.make_problem(n=4, seed=6)
    w, l, weight = toy.expected_pairs(r)
    assert torch.allclose(weight.sum(), torch.tensor(1.0, dtype=D))
    n = 60_000
    sw, sl = toy.sample_pairs(r, n, seed=1)
    counts = torch.zeros(4, 4, dtype=D).index_put_((sw, sl), torch.ones(n, dtype=D), accumulate=True)
    freq = counts[w, l] / n
    assert ((freq - weight).abs() < 5 * (weight * (1 - weight) / n).sqrt()).all()


def test_bt_matrix_is_complementary():
    r, _ = toy.make_problem(n=5, seed=7)
    P = toy.bt_matrix(r)
    assert torch.allclose(P + P.T, torch.ones(5, 5, dtype=D))
    assert torch.allclose(P.diagonal(), torch.full((5,), 0.5, dtype=D))


# ---------------------------------------------------------------- DPO on the toy

@pytest.mark.parametrize("beta", [0.25, 1.0, 4.0])
def test_dpo_on_exact_expected_loss_converges_to_closed_form_optimum(beta):
    r, pi_ref = toy.make_problem(n=8, seed=0)
    w, l, weight = toy.expected_pairs(r)
    history = toy.train_dpo(w, l, pi_ref, beta, weight=weight)
    pi_star = toy.optimal_policy(r, pi_ref, beta)
    assert torch.allclose(history[0], pi_ref)
    assert torch.allclose(history[-1], pi_star, atol=1e-4)
    assert toy.kl(history[-1], pi_star) < 1e-3 * toy.kl(history[0], pi_star)


def test_dpo_on_sampled_pairs_is_the_bradley_terry_maximum_likelihood_fit():
    # peer: fit BT scores r_hat by scipy on the same pairs; DPO's implicit reward beta*rho must match
    r, pi_ref = toy.make_problem(n=5, seed=8)
    w, l = toy.sample_pairs(r, 400, seed=2)
    beta = 0.5
    pi = toy.train_dpo(w, l, pi_ref, beta, steps=600)[-1]
    rho = pi.log() - pi_ref.log()
    wn, ln = w.numpy(), l.numpy()

    def nll(s):  # s[0] = 0 fixes the gauge
        s = np.concatenate([[0.0], s])
        return np.logaddexp(0, -(s[wn] - s[ln])).mean()

    s_hat = np.concatenate([[0.0], minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x])
    assert np.allclose((beta * (rho - rho[0])).numpy(), s_hat, atol=1e-3)


def test_tabular_dpo_gradient_is_weighted_difference_of_one_hots():
    # grad_theta log pi(y) = onehot(y) - pi, so grad_theta ell = -beta sigma(-z) (onehot(y_w) - onehot(y_l))
    r, pi_ref = toy.make_problem(n=6, seed=9)
    theta = torch.randn(6, dtype=D, requires_grad=True)
    beta, w, l = 0.3, torch.tensor([4]), torch.tensor([1])
    logp = F.log_softmax(theta, -1)
    loss, m = kernel_dpo_loss(logp[w], logp[l], pi_ref.log()[w], pi_ref.log()[l], beta=beta)
    loss.sum().backward()
    expected = -beta * torch.sigmoid(-m["logit/z"]) * (F.one_hot(w, 6) - F.one_hot(l, 6)).to(D)
    assert torch.allclose(theta.grad, expected[0])


# ---------------------------------------------------------------- bad input

def test_bad_arguments_raise_value_error():
    r, pi_ref = toy.make_problem(n=4)
    with pytest.raises(ValueError, match="beta"):
        toy.optimal_policy(r, pi_ref, 0.0)
    with pytest.raises(ValueError, match="distribution"):
        toy.optimal_policy(r, 2 * pi_ref, 1.0)
    with pytest.raises(ValueError, match="shape"):
        toy.optimal_policy(r, pi_ref[:3], 1.0)
    with pytest.raises(ValueError, match="n >= 2"):
        toy.make_problem(n=1)
    with pytest.raises(ValueError, match="n must"):
        toy.sample_pairs(r, 0)
    with pytest.raises(ValueError, match="index tensors"):
        toy.train_dpo(torch.tensor([0, 1]), torch.tensor([1]), pi_ref, 1.0)
