"""A tabular DPO toy (notebook 01): one prompt x, n responses, a known reward r.

The policy is a vector of logits theta in R^n, pi_theta(y|x) = softmax(theta)_y, so the "sequence
log-prob" of response y is log_softmax(theta)[y]. Preferences follow Bradley-Terry,
    p(y_w > y_l | x) = sigma(r(y_w) - r(y_l)).
The KL-regularised objective J(pi) = E_pi[r] - beta KL(pi || pi_ref) is maximised by
    pi*(y|x) = pi_ref(y|x) exp(r(y) / beta) / Z(x),    Z(x) = sum_y pi_ref(y|x) exp(r(y) / beta),
with maximum J(pi*) = beta log Z(x). DPO trained on the exact expected loss (every ordered pair
weighted by its probability under Bradley-Terry) has pi* as its unique optimum; trained on n sampled
pairs its optimum is the Bradley-Terry maximum-likelihood fit: beta * rho(y) = r_hat(y) + const.
"""
import torch
import torch.nn.functional as F

from kdpo_lab.losses import kernel_dpo_loss


def make_problem(n=8, seed=0):
    """A seeded toy: rewards r ~ N(0, 1) and a reference pi_ref = softmax(N(0, 1)), both [n], float64.

    n counts responses (docs/notation.md: counts are never K, which is a kernel)."""
    if n < 2:
        raise ValueError(f"the toy needs n >= 2 responses to compare; got n={n}")
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    pi_ref = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), -1)
    return r, pi_ref


def _check(r, pi_ref, beta):
    if r.dim() != 1 or pi_ref.shape != r.shape:
        raise ValueError(f"r and pi_ref must be 1-D tensors of one shape [n]; got {tuple(r.shape)}, {tuple(pi_ref.shape)}")
    if (pi_ref <= 0).any() or abs(pi_ref.sum().item() - 1) > 1e-6:
        raise ValueError("pi_ref must be a strictly positive distribution that sums to 1")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")


def optimal_policy(r, pi_ref, beta):
    """pi* = pi_ref exp(r / beta) / Z, computed stably as softmax(log pi_ref + r / beta)."""
    _check(r, pi_ref, beta)
    return torch.softmax(pi_ref.log() + r / beta, -1)


def kl(p, q):
    """KL(p || q) = sum_y p(y) (log p(y) - log q(y)) over the last dimension, with 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def objective(pi, r, pi_ref, beta):
    """The KL-regularised RL objective J(pi) = E_pi[r] - beta KL(pi || pi_ref) (over the last dimension)."""
    return (pi * r).sum(-1) - beta * kl(pi, pi_ref)


def bt_matrix(r):
    """P[i, j] = p(y_i > y_j | x) = sigma(r_i - r_j) under Bradley-Terry."""
    return torch.sigmoid(r[:, None] - r[None, :])


def expected_pairs(r):
    """Every ordered pair (y_w, y_l), w != l, with its probability under the data process of sample_pairs.

    A distinct pair {i, j} is drawn uniformly and labelled by Bradley-Terry, so the outcome (w, l) has
    probability 2 sigma(r_w - r_l) / (n (n - 1)), n = len(r). Returns w, l (long [n(n-1)]) and weight (sums to 1).
    """
    n = len(r)
    w, l = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = w != l
    w, l = w[keep], l[keep]
    weight = 2 * torch.sigmoid(r[w] - r[l]) / (n * (n - 1))
    return w, l, weight


def sample_pairs(r, n, seed=0):
    """n preference pairs: {i, j} uniform over distinct pairs, then y_i wins with probability sigma(r_i - r_j).

    Returns w, l: long [n] indices of the chosen and rejected responses.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    n_resp, g = len(r), torch.Generator().manual_seed(seed)
    i = torch.randint(n_resp, (n,), generator=g)
    j = (i + torch.randint(1, n_resp, (n,), generator=g)) % n_resp  # uniform over j != i
    i_wins = torch.rand(n, generator=g, dtype=r.dtype) < torch.sigmoid(r[i] - r[j])
    return torch.where(i_wins, i, j), torch.where(i_wins, j, i)


def train_dpo(w, l, pi_ref, beta, weight=None, steps=300, lr=0.3):
    """Fit tabular logits theta by full-batch Adam on the weighted DPO loss sum_k weight_k ell(z_k).

    z_k = beta (rho(y_w) - rho(y_l)) with rho = log_softmax(theta) - log pi_ref, via kernel_dpo_loss.
    theta starts at log pi_ref (pi = pi_ref, as DPO starts from the reference). weight defaults to 1/n
    (the empirical loss of sampled pairs); pass expected_pairs' weight for the exact expected loss.
    The learning rate decays linearly to 0 so that Adam settles at the optimum.
    Returns the policy after every step: [steps + 1, n].
    """
    if w.shape != l.shape or w.dim() != 1:
        raise ValueError(f"w and l must be 1-D index tensors of one shape; got {tuple(w.shape)}, {tuple(l.shape)}")
    weight = torch.full(w.shape, 1 / len(w), dtype=pi_ref.dtype) if weight is None else weight
    log_ref = pi_ref.log()
    theta = log_ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    history = [pi_ref.clone()]
    for _ in range(steps):
        logp = F.log_softmax(theta, -1)
        loss, _ = kernel_dpo_loss(logp[w], logp[l], log_ref[w], log_ref[l], beta=beta)
        opt.zero_grad()
        (weight * loss).sum().backward()
        opt.step()
        sched.step()
        history.append(torch.softmax(theta.detach(), -1))
    return torch.stack(history)
