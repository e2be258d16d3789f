"""The DPO-Kernels objective and the DPO family it is compared with.

Notation (the notebooks use the same symbols):

    rho(y)  = log pi(y|x) - log pi_ref(y|x)          summed over response tokens only
    s(y)    = f'(exp rho(y)) - f'(1)                  the divergence's link score (s = rho for KL)
    z       = beta * (s_w - s_l)                      probability term
              + gamma * (log K(e_x, e_w) - log K(e_x, e_l))   kernel term (hybrid loss)
              - delta                                 optional offset (ODPO)
    loss    = ell(z)                                  ell = -log sigmoid(z) for DPO
              + lam * mean_t D(pi(.|x,y<t) || pi_ref(.|x,y<t))   penalty form of a divergence
              - eta * H(HMK weights)                  entropy term against kernel collapse

With `divergence="kl"`, no kernel (or gamma = 0) and no offset this is exactly DPO
(Rafailov et al. 2023). A divergence enters in one of two forms (see notebook 03):
* link form (Wang et al. 2023, "Beyond Reverse KL"): regularising the RL objective with
  D_f(pi || pi_ref) makes the implicit reward beta * f'(pi / pi_ref), so s replaces rho;
* penalty form (the paper's literal "- alpha D(pi || pi_ref)"): DPO plus lam times the divergence
  between next-token distributions, averaged over response positions of chosen and rejected.
`divergence_form="auto"` picks the link form where it exists and the penalty form otherwise
(Wasserstein).

The kernel term (Das et al. 2025, arXiv 2501.03271): embeddings come from the policy's own hidden
states and carry gradient; with a frozen external encoder the same term is a fixed per-pair offset.
Its scale is fixed by the kernel's calibration (see `kernels`), so gamma alone sets its weight; the
metrics `kernel/share` and `kernel/margin_std` (`kernel_metrics`) show how much of z it takes, and
`train_kernel_alone` trains a kernel against a frozen policy to check that it cannot inflate itself.

Parameter mapping to TRL 1.16 (the peer the tests compare with): our `divergence="alpha", alpha=a`
is TRL's `f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1 - a`; our Renyi of order
a uses TRL's coefficient a. TRL 1.x dropped label smoothing from its sigmoid loss: our conservative
DPO (`loss_type="cdpo"`) has no TRL counterpart since then; our `robust` is TRL's `robust`. TRL's
`ipo` averages scores per token: that is our `ipo` with `length_normalize=True`.
"""
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from kdpo_lab import divergences

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "cdpo", "robust")


def preference_loss(z, beta, loss_type="sigmoid", label_smoothing=0.0):
    """ell(z): the per-example loss of the preference logit z (shape [B])."""
    eps = label_smoothing
    # DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7.
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    # SLiC hinge: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback".
    if loss_type == "hinge":
        return torch.relu(1 - z)
    # IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    # Preferences", Eq. 17, with tau = beta: (z / beta - 1 / (2 beta))^2.
    if loss_type == "ipo":
        return (z / beta - 1 / (2 * beta)) ** 2
    # Conservative DPO: Mitchell 2023, "A note on DPO with noisy preferences" (label smoothing eps).
    if loss_type == "cdpo":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    # Robust DPO: Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8 (unbiased under flip rate eps).
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def kernel_dpo_loss(
    pi_w, pi_l, ref_w, ref_l, *,
    beta=0.1,
    divergence="kl", divergence_form="auto", lam=0.1,
    pi_logits=None, ref_logits=None, response_mask=None,
    kernel=None, gamma=0.0, e_x=None, e_w=None, e_l=None, eta=0.0,
    loss_type="sigmoid", label_smoothing=0.0,
    offset=None,
    length_normalize=False, len_w=None, len_l=None,
):
    """DPO-Kernels loss per example, and a dict of detached metrics.

    pi_w, pi_l, ref_w, ref_l: [B] sequence log-probs (response tokens summed) of the chosen (w) and
        rejected (l) responses under the policy pi and the reference pi_ref.
    beta: > 0, strength of the implicit KL constraint.
    divergence: a name from `divergences.NAMES` or a `Divergence`. divergence_form: "link",
        "penalty" or "auto" (link where it exists). lam: weight of the penalty form.
    pi_logits, ref_logits: [2B, T, V] next-token logits at response positions (chosen rows first,
        then rejected) and response_mask [2B, T]; needed only for the penalty form.
    kernel: a `kernels.Kernel` (or None); gamma >= 0 its weight; e_x, e_w, e_l: [B, d] embeddings of
        prompt, chosen and rejected. eta >= 0: weight of the HMK entropy bonus.
    loss_type: "sigmoid" (DPO), "hinge" (SLiC), "ipo", "cdpo" (label smoothing), "robust" (rDPO);
        label_smoothing: eps for cdpo and robust.
    offset: [B] or scalar delta subtracted from z (ODPO, Amini et al. 2024, "Direct Preference
        Optimization with an Offset": delta = alpha * log of the reward gap).
    length_normalize: divide each score by its response length len_w, len_l [B] (LN-DPO, Ahrabian
        et al. 2025, "A Practical Analysis of Human Alignment with *PO"; TRL's sigmoid_norm).
    """
    div = divergences.get(divergence)
    _check_scores(pi_w, pi_l, ref_w, ref_l, beta, loss_type, label_smoothing, length_normalize, len_w, len_l)
    form = _check_divergence(div, divergence_form, lam, _Penalty(pi_logits, ref_logits, response_mask), len(pi_w))
    _check_kernel(_KernelTerm(kernel, gamma, eta, e_x, e_w, e_l), len(pi_w))
    rho_w, rho_l = pi_w - ref_w, pi_l - ref_l
    link = div if form == "link" else divergences.get("kl")
    s_w, s_l = link.link(rho_w), link.link(rho_l)
    if length_normalize:
        s_w, s_l = s_w / len_w.clamp(min=1), s_l / len_l.clamp(min=1)
    z = beta * (s_w - s_l)

    metrics = {}
    if kernel is not None:
        k_margin = kernel.log_kernel(e_x, e_w) - kernel.log_kernel(e_x, e_l)
        metrics.update(kernel_metrics(z, k_margin, gamma))
        if gamma != 0:
            z = z + gamma * k_margin
        metrics["kernel/margin"] = k_margin.detach()
        metrics["kernel/accuracy"] = (k_margin > 0).float().detach()
    if offset is not None:
        z = z - offset

    loss = preference_loss(z, beta, loss_type, label_smoothing)
    if form == "penalty":
        per_row = divergences.token_penalty(div, pi_logits, ref_logits, response_mask)  # [2B]
        penalty = 0.5 * (per_row[: len(pi_w)] + per_row[len(pi_w):])
        loss = loss + lam * penalty
        metrics["divergence/penalty"] = penalty.detach()
    if kernel is not None and eta != 0:
        entropy = kernel.entropy()
        loss = loss - eta * entropy
        metrics["kernel/entropy"] = entropy.detach().expand_as(z)

    metrics.update({
        "rewards/chosen": (beta * rho_w).detach(),
        "rewards/rejected": (beta * rho_l).detach(),
        "rewards/margins": (beta * (rho_w - rho_l)).detach(),
        "rewards/accuracies": (rho_w > rho_l).float().detach(),
        "logit/z": z.detach(),
    })
    return loss, metrics


def kernel_metrics(prob_term, margin, gamma):
    """Batch statistics of the kernel term gamma * m beside the probability term beta * (s_w - s_l),
    each broadcast to [B] (the trainer averages metrics over its micro-batches):

    kernel/share      = mean |gamma m| / (mean |beta (s_w - s_l)| + mean |gamma m|), in [0, 1]: the
                        kernel term's share of the logit z's size (0 when both terms vanish). Ratio of
                        batch means, not a mean of per-pair ratios, which a pair with two tiny terms
                        would dominate. At the start of training rho = 0, so the share is 1 whenever
                        gamma > 0; it should fall as the policy learns, and a share that stays near 1
                        says the kernel decides z and the policy's gradient sigma(-z) is spent on it.
    kernel/margin_std = std over the batch of the (unweighted) kernel margin m, the quantity whose
                        growth shows a kernel, or the policy's hidden states, inflating the term.
    """
    margin = margin.detach()
    prob, kern = prob_term.detach().abs().mean(), (gamma * margin).abs().mean()
    total = prob + kern
    share = torch.where(total > 0, kern / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))
    return {"kernel/share": share.expand_as(margin),
            "kernel/margin_std": margin.std(unbiased=False).expand_as(margin)}


@dataclass
class _Penalty:
    """The inputs of the penalty form: next-token logits [2B, T, V] and the response mask [2B, T]."""
    pi_logits: torch.Tensor = None
    ref_logits: torch.Tensor = None
    response_mask: torch.Tensor = None


@dataclass
class _KernelTerm:
    """The inputs of the kernel term: kernel, weights gamma and eta, embeddings [B, d]."""
    kernel: object = None
    gamma: float = 0.0
    eta: float = 0.0
    e_x: torch.Tensor = None
    e_w: torch.Tensor = None
    e_l: torch.Tensor = None


def _check_scores(pi_w, pi_l, ref_w, ref_l, beta, loss_type, label_smoothing, length_normalize, len_w, len_l):
    """Validate the sequence log-probs and the preference loss's own options."""
    shapes = {name: tuple(t.shape) for name, t in
              (("pi_w", pi_w), ("pi_l", pi_l), ("ref_w", ref_w), ("ref_l", ref_l))}
    if len(set(shapes.values())) != 1 or len(shapes["pi_w"]) != 1:
        raise ValueError(f"pi_w, pi_l, ref_w, ref_l must be 1-D tensors of one shape [B]; got {shapes}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the implicit reward); got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type in ("cdpo", "robust") and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for {loss_type}; got {label_smoothing}")
    if length_normalize and (len_w is None or len_l is None):
        raise ValueError("length_normalize=True needs the response lengths len_w and len_l ([B] token counts)")


def _check_divergence(div, form, lam, penalty, batch):
    """Validate the divergence options; return the resolved form ("link" or "penalty")."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0; got {lam}")
    if form not in ("auto", "link", "penalty"):
        raise ValueError(f"divergence_form must be 'auto', 'link' or 'penalty'; got {form!r}")
    if form == "auto":
        form = "link" if div.has_link else "penalty"
    if form == "link" and not div.has_link:
        raise ValueError(f"divergence {div.name!r} has no link form of its own; use divergence_form='penalty'")
    if form == "penalty":
        p = penalty
        if p.pi_logits is None or p.ref_logits is None or p.response_mask is None:
            raise ValueError(f"the penalty form of {div.name!r} needs pi_logits, ref_logits and response_mask "
                             "([2B, T, V] next-token logits at response positions, chosen rows first)")
        if p.pi_logits.shape != p.ref_logits.shape or p.pi_logits.shape[:2] != p.response_mask.shape \
                or p.pi_logits.shape[0] != 2 * batch:
            raise ValueError(f"penalty inputs must be pi_logits, ref_logits [2B, T, V] and response_mask [2B, T] "
                             f"with B = {batch}; got {tuple(p.pi_logits.shape)}, {tuple(p.ref_logits.shape)}, "
                             f"{tuple(p.response_mask.shape)}")
    return form


def _check_kernel(term, batch):
    """Validate the kernel term's options."""
    for name, value in (("gamma", term.gamma), ("eta", term.eta)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0; got {value}")
    if term.kernel is None:
        if term.gamma != 0 or term.eta != 0:
            raise ValueError("gamma and eta weight the kernel term: pass kernel=... (or leave them at 0)")
        return
    if term.e_x is None or term.e_w is None or term.e_l is None:
        raise ValueError("a kernel needs the embeddings e_x, e_w and e_l ([B, d] each)")
    if not (term.e_x.shape == term.e_w.shape == term.e_l.shape) or term.e_x.shape[0] != batch:
        raise ValueError(f"e_x, e_w, e_l must all be [B, d] with B = {batch}; got "
                         f"{tuple(term.e_x.shape)}, {tuple(term.e_w.shape)}, {tuple(term.e_l.shape)}")


# ---------------------------------------------------------------- the kernel alone against a frozen policy

@dataclass
class KernelOnlyRun:
    """Settings of `train_kernel_alone` (defaults: the trainer's kernel_lr and the quickstart's HMK run)."""
    steps: int = 300
    lr: float = 1e-2       # AdamW, as the trainer's kernel_lr
    gamma: float = 0.5
    eta: float = 0.01
    beta: float = 0.1
    weight_decay: float = 0.01  # AdamW's default


def train_kernel_alone(kernel, e_x, e_w, e_l, run=KernelOnlyRun()):
    """Train only the kernel's parameters on the hybrid loss with the policy frozen at the reference.

    rho_w = rho_l = 0, so z = gamma * m with m = log K(e_x, e_w) - log K(e_x, e_l) on fixed embeddings
    [n, d] (full batch), and the loss is mean -log sigmoid(z) - eta H(weights) (`kernel_dpo_loss`).
    Whatever lowers this loss can only do so by changing m: the test bed for a kernel that might
    rescale itself. The kernel should already be fitted. Returns a pandas table with one row per step
    (step 0 = before any update): step, loss, margin_std (std over pairs of m), accuracy (m > 0) and,
    for an HMK, its `weights()` (w_rbf, ..., tau_L, ...).
    """
    params = [p for p in kernel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay) if params else None
    zeros = torch.zeros(len(e_x), dtype=e_x.dtype)
    rows = []
    for step in range(run.steps + 1):
        loss, m = kernel_dpo_loss(zeros, zeros, zeros, zeros, beta=run.beta, kernel=kernel, gamma=run.gamma,
                                  eta=run.eta, e_x=e_x, e_w=e_w, e_l=e_l)
        loss = loss.mean()
        row = {"step": step, "loss": loss.item(), "margin_std": m["kernel/margin_std"][0].item(),
               "accuracy": m["kernel/accuracy"].mean().item()}
        rows.append({**row, **(kernel.weights() if hasattr(kernel, "weights") else {})})
        if opt is None or step == run.steps:
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pd.DataFrame(rows)
