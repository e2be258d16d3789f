"""Choosing the kernel-divergence pair from data, before training (our own design).

The paper names data-driven metrics that pick one of its 4 x 7 = 28 pairs, but their definitions are
not recoverable; everything below is kdpo_lab's design, to be validated against short runs of all 28
pairs (`validate`), not assumed. All metrics are computed BEFORE training, from the reference model:
its pair embeddings (e_x, e_w, e_l, as the trainer computes them) and its next-token distributions
along the chosen and the rejected responses. At the start the policy IS the reference, so rho = 0 and
nothing about rho itself can be measured; the divergence-side metrics use what exists instead:

* support overlap: the mean Jaccard overlap of the reference's top-k next-token sets along the chosen
  and along the rejected continuation, at the same response position r >= 1 (at r = 0 both share the
  prompt as context). DPO raises the policy on one continuation and lowers it on the other: where
  their supports are disjoint, it moves mass between different parts of the vocabulary, which ratio
  divergences price by pi/pi_ref on tokens the reference barely covers and Wasserstein by how far the
  tokens are. Also reported: coverage, the fraction of response tokens inside the reference's top-k.
* tail heaviness: the excess kurtosis of the per-token reference log-probs of the response tokens.
  A token's log-ratio grows under training where the reference leaves room (the softmax gradient of
  log pi is 1 - pi), so a heavy tail of unlikely tokens is where rho will be heavy-tailed.
* drift: how far the reference must move, mean over pairs of relu(mean token log-prob of the rejected
  - that of the chosen), in nats per token (0 when the reference already prefers every chosen).

Scores (each in [0, 1]; the reason column says where each number comes from):
* kernel: the AUC with which log K(e_x, e) tells chosen from rejected responses (Mann-Whitney, over
  all chosen and rejected scores) after `fit` on the same embeddings; a kernel whose margin already
  agrees with the preferences adds a right prior to z, one that disagrees fights the policy term.
  Reported beside it: paired accuracy (margin > 0), normalised gap mean/std of the margin, the
  data's global share (how much of e_w - e_l lies in the top principal directions) and anisotropy.
  On the unit sphere RBF and polynomial are both increasing functions of the cosine, so they always
  have the same AUC and accuracy (ranks); they differ in the gap and, in training, in the gradient.
* divergence: every link-form divergence damps the growth of rho by its slope s'(rho) ~ exp(-c rho)
  for rho > 0: damping c = 0 (KL), 0.3 (alpha 0.3), 0.5 (Hellinger), 0.7 (Renyi 0.3), 1 (JS). Heavy
  tails call for damping, a large drift calls against it: wanted c* = tail * (1 - drift), tail =
  k / (k + 3) of the excess kurtosis k >= 0, drift = d / (d + 1) of the drift d. A link-form score is
  overlap * (1 - |c - c*|) (ratios are only informative where supports overlap); Wasserstein's
  1 - overlap; Bhattacharyya's penalty on near-identical smooth distributions, overlap * (1 - drift).
* a pair: the geometric mean sqrt(kernel score * divergence score).
A second picker, `rule_of_thumb`, applies the paper's rule as recalled from secondary summaries
(unverified), with thresholds of our own.
"""
import math
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from kdpo_lab import data, divergences, kernels, models
from kdpo_lab.losses import kernel_dpo_loss

PAIRS = [(k, d) for k in kernels.PAPER_FOUR for d in divergences.PAPER_SEVEN]
DAMPING = {"kl": 0.0, "alpha": 0.3, "hellinger": 0.5, "renyi": 0.7, "js": 1.0}  # c in s'(rho) ~ exp(-c rho)
RULE_LABEL = "recalled from secondary summaries, unverified"


# ---------------------------------------------------------------- the toy grid (notebooks 02-04, quickstart)

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


# ---------------------------------------------------------------- reference features (one pass of the model)

@dataclass
class ReferenceFeatures:
    """What the reference says about a set of n pairs. Response-aligned arrays have 2n rows (chosen rows
    first) and R columns, column r = the r-th response token (left-aligned, `mask` 1 where it exists)."""
    e_x: torch.Tensor          # [n, d] pair embeddings (models.pair_embeddings)
    e_w: torch.Tensor
    e_l: torch.Tensor
    logp_w: torch.Tensor       # [n] sequence log-probs of chosen and rejected
    logp_l: torch.Tensor
    n_w: torch.Tensor          # [n] response lengths in tokens
    n_l: torch.Tensor
    token_logps: torch.Tensor  # [2n, R] log pi_ref(y_r | x, y_<r)
    mask: torch.Tensor         # [2n, R] bool
    topk_idx: torch.Tensor     # [2n, R, k] the reference's top-k next tokens at each response position
    topk_logps: torch.Tensor   # [2n, R, k] and their log-probs
    tokens: torch.Tensor       # [2n, R] the response tokens themselves
    families: list             # [n] family of each pair ("" when unknown)

    def subset(self, rows):
        """The features of pairs `rows` (a list of pair indices)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        both = torch.cat([idx, idx + len(self.e_x)])
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "families":
                out[f.name] = [value[i] for i in rows]
            else:
                out[f.name] = value[both] if value.shape[0] == 2 * len(self.e_x) else value[idx]
        return ReferenceFeatures(**out)


def _left_align(values, mask):
    """Rows of values [N, T, ...] with their masked positions moved to the front: [N, R, ...], and the mask."""
    counts = mask.sum(1)
    R = int(counts.max()) if len(counts) else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :R]  # masked positions first, in order
    index = order.reshape(order.shape + (1,) * (values.dim() - 2)).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index), torch.arange(R)[None, :] < counts[:, None]


def _pad_cat(chunks, fill):
    """Concatenate [N_i, R_i, ...] along rows, padding R to the largest with `fill`."""
    R = max(c.shape[1] for c in chunks)
    padded = [F.pad(c.to(torch.uint8) if c.dtype == torch.bool else c, (0, 0) * (c.dim() - 2) + (0, R - c.shape[1]),
                    value=fill) for c in chunks]
    return torch.cat(padded).to(chunks[0].dtype)


@torch.no_grad()
def reference_features(model, feats, pad_id, batch_size=16, top_k=16):
    """One no-grad pass of the reference over `feats` (data.encode_pairs features): embeddings, sequence
    and token log-probs, and only the top-k next-token log-probs at response positions (a full [T, V]
    per row is not kept). Returns ReferenceFeatures on the CPU."""
    if not feats:
        raise ValueError("reference_features needs at least one pair")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1; got {top_k!r}")
    model.eval()
    device = next(model.parameters()).device
    parts = {name: [] for name in ("emb", "logp", "n", "tok", "mask", "idx", "top", "ids")}
    for start in range(0, len(feats), batch_size):
        batch = {k: v.to(device) for k, v in data.collate(feats[start:start + batch_size], pad_id).items()}
        out = models.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                    return_hidden=True, return_logits=True)
        parts["emb"].append(torch.stack(models.pair_embeddings(out["hidden"], batch["prompt_mask"],
                                                               batch["response_mask"])).float().cpu())
        parts["logp"].append(out["logps"].cpu())
        parts["n"].append(out["n_tokens"].cpu())
        mask = out["mask"].bool()
        top = out["logits"].float().log_softmax(-1).topk(min(top_k, out["logits"].shape[-1]), dim=-1)
        for name, values in (("tok", out["token_logps"]), ("idx", top.indices), ("top", top.values),
                             ("ids", batch["input_ids"][:, 1:])):
            aligned, aligned_mask = _left_align(values.cpu(), mask.cpu())
            parts[name].append(aligned)
        parts["mask"].append(aligned_mask)
    emb = torch.cat(parts["emb"], dim=1)
    n = len(feats)
    halves = lambda name: torch.cat([torch.cat([p[: len(p) // 2] for p in parts[name]]),
                                     torch.cat([p[len(p) // 2:] for p in parts[name]])])
    rows = lambda name, fill: _reorder(parts[name], fill)
    logp, lengths = halves("logp"), halves("n")
    return ReferenceFeatures(e_x=emb[0], e_w=emb[1], e_l=emb[2], logp_w=logp[:n], logp_l=logp[n:],
                             n_w=lengths[:n], n_l=lengths[n:], token_logps=rows("tok", 0.0),
                             mask=rows("mask", False), topk_idx=rows("idx", -1), topk_logps=rows("top", -math.inf),
                             tokens=rows("ids", -1), families=[f.get("family", "") for f in feats])


def _reorder(chunks, fill):
    """Batches of [2b, R, ...] (chosen rows first in each) -> [2n, R, ...] with all chosen rows first."""
    chosen = [c[: len(c) // 2] for c in chunks]
    rejected = [c[len(c) // 2:] for c in chunks]
    return _pad_cat(chosen + rejected, fill)


# ---------------------------------------------------------------- pure metrics on tensors

def auc(positive, negative):
    """P(positive > negative) + P(tie)/2 over all pairs of the two samples (Mann-Whitney AUC)."""
    positive, negative = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if positive.size == 0 or negative.size == 0:
        raise ValueError("auc needs two non-empty samples")
    ranks = stats.rankdata(np.concatenate([positive, negative]))
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


def normalised_gap(margin):
    """mean / std of a margin (0 when it has no spread)."""
    margin = torch.as_tensor(margin, dtype=torch.float64)
    std = margin.std(unbiased=False)
    return float(margin.mean() / std) if std > 0 else 0.0


def kernel_separation(kernel, e_x, e_w, e_l):
    """How a fitted kernel separates chosen from rejected: AUC of log K(e_x, e) (chosen vs rejected
    scores), paired accuracy (margin > 0) and normalised gap mean/std of the margin."""
    with torch.no_grad():
        k_w, k_l = kernel.log_kernel(e_x, e_w), kernel.log_kernel(e_x, e_l)
    margin = k_w - k_l
    return {"auc": auc(k_w, k_l), "accuracy": float((margin > 0).double().mean()),
            "gap": normalised_gap(margin)}


def principal_axes(embeddings, k):
    """The top-k principal directions [d, k] of the unit-normalised embeddings and all eigenvalues (descending)."""
    u = kernels.unit(embeddings.double())
    centred = u - u.mean(0)
    evals, evecs = torch.linalg.eigh(centred.T @ centred / max(len(u) - 1, 1))
    return evecs.flip(1)[:, :k], evals.flip(0).clamp_min(0)


def global_share(e_x, e_w, e_l, k=8):
    """Fraction of |u_w - u_l|^2 (unit directions) that lies in the top-k principal directions of all
    the embeddings: near 1 when chosen and rejected differ along the data's dominant axes (global
    structure, what the spectral kernel sees), near 0 when they differ in low-variance directions
    (local structure, what RBF and Mahalanobis see)."""
    U, _ = principal_axes(torch.cat([e_x, e_w, e_l]), k)
    diff = kernels.unit(e_w.double()) - kernels.unit(e_l.double())
    total = diff.pow(2).sum()
    return float((diff @ U).pow(2).sum() / total) if total > 0 else 0.0


def anisotropy(embeddings):
    """1 - effective rank / d of the embedding covariance (effective rank = exp of the entropy of the
    normalised eigenvalues): 0 for isotropic data, -> 1 as the variance concentrates on one axis."""
    _, evals = principal_axes(embeddings, 1)
    p = evals / evals.sum()
    return float(1 - torch.exp(torch.special.entr(p).sum()) / len(p))


def support_overlap(topk_idx, mask):
    """Mean Jaccard overlap |A_r & B_r| / |A_r | B_r| of the top-k sets along the chosen (rows :n) and the
    rejected (rows n:) continuation at the same response position r >= 1 where both exist."""
    n = topk_idx.shape[0] // 2
    a, b = topk_idx[:n, 1:], topk_idx[n:, 1:]
    both = mask[:n, 1:] & mask[n:, 1:]
    if not both.any():
        raise ValueError("support_overlap: no response position r >= 1 shared by chosen and rejected")
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()
    k = topk_idx.shape[-1]
    return float((inter / (2 * k - inter))[both].mean())


def coverage(tokens, topk_idx, mask):
    """Fraction of response tokens that lie inside the reference's top-k at their position."""
    inside = (topk_idx == tokens.unsqueeze(-1)).any(-1)
    return float(inside[mask].double().mean())


def excess_kurtosis(values):
    """Fisher's excess kurtosis E[(x - mean)^4] / var^2 - 3 (0 for a Gaussian; biased estimator)."""
    x = np.asarray(values, dtype=float)
    return float(stats.kurtosis(x, fisher=True, bias=True)) if x.size > 3 and x.std() > 0 else 0.0


def drift(logp_w, logp_l, n_w, n_l):
    """Mean over pairs of relu(mean token log-prob of rejected - of chosen), nats per token."""
    per_token_w, per_token_l = logp_w / n_w.clamp_min(1), logp_l / n_l.clamp_min(1)
    return float(torch.relu(per_token_l - per_token_w).double().mean())


# ---------------------------------------------------------------- scores and the ranked table

def kernel_table(ref, spectral_k=8):
    """One row per kernel of the paper's four (fitted on the reference's embeddings): auc, accuracy,
    gap, score (= auc) and a reason."""
    e = torch.cat([ref.e_x, ref.e_w, ref.e_l])
    shared = {"global_share": global_share(ref.e_x, ref.e_w, ref.e_l, spectral_k), "anisotropy": anisotropy(e)}
    rows = []
    for name in kernels.PAPER_FOUR:
        kernel = kernels.get(name, **({"k": spectral_k} if name == "spectral" else {})).fit(e)
        sep = kernel_separation(kernel, ref.e_x, ref.e_w, ref.e_l)
        reason = (f"{name}: AUC {sep['auc']:.2f}, accuracy {sep['accuracy']:.2f}, gap {sep['gap']:+.2f} "
                  f"(global share {shared['global_share']:.2f}, anisotropy {shared['anisotropy']:.2f})")
        rows.append({"kernel": name, **sep, **shared, "kernel_score": sep["auc"], "kernel_reason": reason})
    return pd.DataFrame(rows)


def divergence_features(ref):
    """The divergence-side features of the reference (module docstring): overlap, coverage, kurtosis, drift."""
    tokens = ref.token_logps[ref.mask]
    return {"overlap": support_overlap(ref.topk_idx, ref.mask), "coverage": coverage(ref.tokens, ref.topk_idx, ref.mask),
            "kurtosis": excess_kurtosis(tokens), "drift": drift(ref.logp_w, ref.logp_l, ref.n_w, ref.n_l)}


def divergence_table(features):
    """One row per divergence of the paper's seven: score in [0, 1] and a reason (module docstring)."""
    overlap, kurt, d = features["overlap"], features["kurtosis"], features["drift"]
    tail, move = max(kurt, 0.0) / (max(kurt, 0.0) + 3), d / (d + 1)
    wanted = tail * (1 - move)
    where = f"overlap {overlap:.2f}, kurtosis {kurt:.1f}, drift {d:.2f} nats/token"
    rows = []
    for name in divergences.PAPER_SEVEN:
        if name in DAMPING:
            score = overlap * (1 - abs(DAMPING[name] - wanted))
            reason = f"{name}: damping {DAMPING[name]:.1f} vs wanted {wanted:.2f}, x overlap ({where})"
        elif name == "wasserstein":
            score, reason = 1 - overlap, f"wasserstein: 1 - overlap ({where})"
        else:
            score, reason = overlap * (1 - move), f"bhattacharyya: overlap x (1 - drift {move:.2f}) ({where})"
        rows.append({"divergence": name, "divergence_score": score, "divergence_reason": reason})
    return pd.DataFrame(rows)


def rank_pairs(kernel_rows, divergence_rows):
    """The 4 x 7 table, best first: kernel, divergence, score = sqrt(kernel score x divergence score),
    reason, and both halves' scores."""
    table = kernel_rows.merge(divergence_rows, how="cross")
    table["score"] = np.sqrt(table.kernel_score * table.divergence_score)
    table["reason"] = table.kernel_reason + "; " + table.divergence_reason
    columns = ["kernel", "divergence", "score", "reason", "kernel_score", "divergence_score"]
    return table[columns].sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


@dataclass
class Selection:
    """Ranked tables and recommended pairs: key "all" for the whole suite, then one key per family."""
    tables: dict
    recommended: dict
    features: dict


def select_pairs(ref, spectral_k=8, min_pairs=8):
    """The ranked 4 x 7 table and the recommended (kernel, divergence) pair, for all pairs of `ref` and
    for each family with at least `min_pairs` pairs. Returns a Selection."""
    groups = {"all": list(range(len(ref.e_x)))}
    for family in sorted(set(ref.families) - {""}):
        rows = [i for i, f in enumerate(ref.families) if f == family]
        if len(rows) >= min_pairs:
            groups[family] = rows
    tables, recommended, feats = {}, {}, {}
    for group, rows in groups.items():
        sub = ref if group == "all" else ref.subset(rows)
        feats[group] = divergence_features(sub)
        tables[group] = rank_pairs(kernel_table(sub, spectral_k), divergence_table(feats[group]))
        recommended[group] = tuple(tables[group].loc[0, ["kernel", "divergence"]])
    return Selection(tables, recommended, feats)


def rule_of_thumb(features, kernel_rows, overlap_low=0.5, kurtosis_heavy=3.0, drift_small=0.1):
    """The paper's rule of thumb as RECALLED FROM SECONDARY SUMMARIES, UNVERIFIED; thresholds are ours.
    Divergence: low support overlap -> wasserstein; heavy-tailed log-ratios -> renyi; near-identical
    smooth distributions (small drift) -> kl; otherwise (a need for symmetry) -> js. Kernel: tight local
    neighbourhoods (the preference signal outside the top principal directions) -> rbf; otherwise
    (non-linear interactions) -> polynomial. Returns {"kernel", "divergence", "reason", "label"}."""
    if features["overlap"] < overlap_low:
        div, why = "wasserstein", f"support overlap {features['overlap']:.2f} < {overlap_low}"
    elif features["kurtosis"] > kurtosis_heavy:
        div, why = "renyi", f"kurtosis {features['kurtosis']:.1f} > {kurtosis_heavy}"
    elif features["drift"] < drift_small:
        div, why = "kl", f"drift {features['drift']:.2f} < {drift_small} (near-identical distributions)"
    else:
        div, why = "js", "none of the above: symmetric JS"
    share = float(kernel_rows.global_share.iloc[0])
    kernel = "rbf" if share < 0.5 else "polynomial"
    why += f"; global share {share:.2f} -> {'tight local neighbourhoods' if kernel == 'rbf' else 'non-linear'}"
    return {"kernel": kernel, "divergence": div, "reason": why, "label": RULE_LABEL}


# ---------------------------------------------------------------- validation against achieved results

def validate(table, results, value="result", n_boot=1000, seed=0):
    """Compare a ranked table (kernel, divergence, score) with achieved results (kernel, divergence,
    `value`, higher is better, e.g. held-out exact reward): Spearman correlation with a percentile
    bootstrap 95% interval over pairs, and the regret of the top-ranked pair (best achieved - its result).
    Returns {"spearman", "low", "high", "regret", "recommended", "best", "n"}; spearman is NaN when the
    scores or the results are all equal, and the interval NaN when no resample varies in both."""
    merged = table.merge(results[["kernel", "divergence", value]], on=["kernel", "divergence"])
    if len(merged) < 3:
        raise ValueError(f"validate needs results for at least 3 pairs of the table; got {len(merged)}")
    score, achieved = merged.score.to_numpy(), merged[value].to_numpy(dtype=float)
    rho = stats.spearmanr(score, achieved).statistic if np.ptp(score) > 0 and np.ptp(achieved) > 0 else np.nan
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(merged), len(merged))
        if np.ptp(score[i]) > 0 and np.ptp(achieved[i]) > 0:
            boot.append(stats.spearmanr(score[i], achieved[i]).statistic)
    top = merged.sort_values("score", ascending=False, kind="stable").iloc[0]
    best = merged.loc[merged[value].idxmax()]
    low, high = (np.percentile(boot, 2.5), np.percentile(boot, 97.5)) if boot else (np.nan, np.nan)
    return {"spearman": float(rho), "low": float(low), "high": float(high),
            "regret": float(best[value] - top[value]), "recommended": (top.kernel, top.divergence),
            "best": (best.kernel, best.divergence), "n": len(merged)}
