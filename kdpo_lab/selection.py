"""The 4 x 7 = 28 kernel-divergence pairs of DPO-Kernels, evaluated side by side.

`pair_grid` computes, for every pair on one batch, the mean loss, the fraction of pairs ranked right
(z > 0), and the mean gradient weight |d loss / d rho_w| that the pair puts on the chosen log-ratio:
the quantities notebooks 02-04 derive one at a time. Data-driven selection metrics (which pair to pick
for a data set, validated by short runs of all 28) build on this grid; the paper's own metric
definitions are not recoverable (paper-notes section 6).
"""
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from kdpo_lab import divergences, kernels
from kdpo_lab.losses import kernel_dpo_loss

PAIRS = [(k, d) for k in kernels.PAPER_FOUR for d in divergences.PAPER_SEVEN]


@dataclass
class ToyBatch:
    """A synthetic batch: log-ratios, embeddings (chosen nearer the prompt than rejected) and logits."""
    rho_w: torch.Tensor
    rho_l: torch.Tensor
    e_x: torch.Tensor
    e_w: torch.Tensor
    e_l: torch.Tensor
    pi_logits: torch.Tensor
    ref_logits: torch.Tensor
    mask: torch.Tensor


def toy_batch(b=256, d=16, t=4, v=32, seed=0):
    """rho_w ~ N(0.3, 1), rho_l ~ N(-0.3, 1); e_w = e_x + 0.5 noise, e_l = e_x + 1.0 noise; the policy's
    next-token logits are the reference's plus N(0, 0.5) drift."""
    g = torch.Generator().manual_seed(seed)
    n = lambda *shape: torch.randn(*shape, generator=g)
    e_x = n(b, d)
    ref_logits = 2 * n(2 * b, t, v)
    return ToyBatch(rho_w=0.3 + n(b), rho_l=-0.3 + n(b), e_x=e_x, e_w=e_x + 0.5 * n(b, d), e_l=e_x + 1.0 * n(b, d),
                    pi_logits=ref_logits + 0.5 * n(2 * b, t, v), ref_logits=ref_logits, mask=torch.ones(2 * b, t))


def pair_grid(batch, beta=0.1, gamma=0.5, lam=0.1, pairs=PAIRS):
    """One row per (kernel, divergence): loss, accuracy (z > 0), mean |d loss / d rho_w|, penalty."""
    embeddings = torch.cat([F.normalize(batch.e_x, dim=-1), F.normalize(batch.e_w, dim=-1)])
    rows = []
    for kernel_name, div_name in pairs:
        kernel = kernels.get(kernel_name).fit(embeddings)
        rho_w = batch.rho_w.clone().requires_grad_(True)
        zeros = torch.zeros_like(rho_w)
        loss, m = kernel_dpo_loss(rho_w, batch.rho_l, zeros, zeros, beta=beta, divergence=div_name, lam=lam,
                                  kernel=kernel, gamma=gamma, e_x=batch.e_x, e_w=batch.e_w, e_l=batch.e_l,
                                  pi_logits=batch.pi_logits, ref_logits=batch.ref_logits, response_mask=batch.mask)
        loss.sum().backward()
        rows.append({"kernel": kernel_name, "divergence": div_name, "loss": loss.mean().item(),
                     "accuracy": (m["logit/z"] > 0).float().mean().item(),
                     "grad_weight": rho_w.grad.abs().mean().item(),
                     "kernel_accuracy": m["kernel/accuracy"].mean().item(),
                     "penalty": m["divergence/penalty"].mean().item() if "divergence/penalty" in m else 0.0})
    return pd.DataFrame(rows)
