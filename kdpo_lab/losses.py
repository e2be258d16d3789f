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

The kernel term follows paper-notes section 4: embeddings come from the policy's own hidden states
and carry gradient; with a frozen external encoder the same term is a fixed per-pair offset.

Parameter mapping to TRL 1.16 (the peer the tests compare with): our `divergence="alpha", alpha=a`
is TRL's `f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1 - a`; our Renyi of order
a uses TRL's coefficient a. TRL 1.x dropped label smoothing from its sigmoid loss: our conservative
DPO (`loss_type="cdpo"`) has no TRL counterpart since then; our `robust` is TRL's `robust`. TRL's
`ipo` averages scores per token: that is our `ipo` with `length_normalize=True`.
"""
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
    form = _check_args(pi_w, pi_l, ref_w, ref_l, beta, div, divergence_form, lam, pi_logits, ref_logits,
                       response_mask, kernel, gamma, e_x, e_w, e_l, eta, loss_type, label_smoothing,
                       length_normalize, len_w, len_l)
    rho_w, rho_l = pi_w - ref_w, pi_l - ref_l
    link = div if form == "link" else divergences.get("kl")
    s_w, s_l = link.link(rho_w), link.link(rho_l)
    if length_normalize:
        s_w, s_l = s_w / len_w.clamp(min=1), s_l / len_l.clamp(min=1)
    z = beta * (s_w - s_l)

    metrics = {}
    if kernel is not None:
        k_margin = kernel.log_kernel(e_x, e_w) - kernel.log_kernel(e_x, e_l)
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


def _check_args(pi_w, pi_l, ref_w, ref_l, beta, div, form, lam, pi_logits, ref_logits, response_mask,
                kernel, gamma, e_x, e_w, e_l, eta, loss_type, label_smoothing, length_normalize,
                len_w, len_l):
    """Validate the arguments of kernel_dpo_loss; return the resolved divergence form."""
    shapes = {name: tuple(t.shape) for name, t in
              (("pi_w", pi_w), ("pi_l", pi_l), ("ref_w", ref_w), ("ref_l", ref_l))}
    if len(set(shapes.values())) != 1 or len(shapes["pi_w"]) != 1:
        raise ValueError(f"pi_w, pi_l, ref_w, ref_l must be 1-D tensors of one shape [B]; got {shapes}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the implicit reward); got {beta}")
    for name, value in (("gamma", gamma), ("eta", eta), ("lam", lam)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0; got {value}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type in ("cdpo", "robust") and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for {loss_type}; got {label_smoothing}")
    if form not in ("auto", "link", "penalty"):
        raise ValueError(f"divergence_form must be 'auto', 'link' or 'penalty'; got {form!r}")
    if form == "auto":
        form = "link" if div.has_link else "penalty"
    if form == "link" and not div.has_link:
        raise ValueError(f"divergence {div.name!r} has no link form; use divergence_form='penalty'")
    if form == "penalty":
        if pi_logits is None or ref_logits is None or response_mask is None:
            raise ValueError(f"the penalty form of {div.name!r} needs pi_logits, ref_logits and response_mask "
                             "([2B, T, V] next-token logits at response positions, chosen rows first)")
        if pi_logits.shape != ref_logits.shape or pi_logits.shape[:2] != response_mask.shape \
                or pi_logits.shape[0] != 2 * pi_w.shape[0]:
            raise ValueError(f"penalty inputs must be pi_logits, ref_logits [2B, T, V] and response_mask [2B, T] "
                             f"with B = {pi_w.shape[0]}; got {tuple(pi_logits.shape)}, {tuple(ref_logits.shape)}, "
                             f"{tuple(response_mask.shape)}")
    if kernel is not None:
        if e_x is None or e_w is None or e_l is None:
            raise ValueError("a kernel needs the embeddings e_x, e_w and e_l ([B, d] each)")
        if not (e_x.shape == e_w.shape == e_l.shape) or e_x.shape[0] != pi_w.shape[0]:
            raise ValueError(f"e_x, e_w, e_l must all be [B, d] with B = {pi_w.shape[0]}; got "
                             f"{tuple(e_x.shape)}, {tuple(e_w.shape)}, {tuple(e_l.shape)}")
    elif gamma != 0 or eta != 0:
        raise ValueError("gamma and eta weight the kernel term: pass kernel=... (or leave them at 0)")
    if length_normalize and (len_w is None or len_l is None):
        raise ValueError("length_normalize=True needs the response lengths len_w and len_l ([B] token counts)")
    return form
