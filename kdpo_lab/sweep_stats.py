"""The sweep's statistics: pure functions of its tidy table (`sweep.collect`), no files, no models.

The table has one row per evaluation of a run: identity columns (variant, kernel, divergence,
loss_type, learning_rate, seed, split, step) and the metrics of `evaluation.evaluate`
("reward/policy", "reward/policy/FAMILY", "kl", "winrate", "pref/accuracy", ...). Rows with
split "validation" are the evaluations during training (several steps per run); the row with split
"test" is the final evaluation on the test split.

Intervals are over seeds, paired by seed across variants: Student t with n - 1 degrees of freedom
around the estimate, with the jackknife (leave one seed out) standard error. For a mean of per-seed
paired differences that is exactly the paired t interval; for a ratio of means (the relative gain)
it is the standard delta-method-like jackknife interval. We chose t over a bootstrap because with
5 seeds a percentile bootstrap has only 126 distinct resamples and its intervals are too narrow.
"""
import math

import numpy as np
import pandas as pd
from scipy import stats

PAPER_GAIN = 0.092
"""The paper's average improvement of the hybrid loss over DPO (Das et al. 2025, abstract): +9.2%."""


def t_half_width(values, level=0.95):
    """Half the width of a Student t interval for the mean of `values` (NaN below 2 values)."""
    x = np.asarray(values, dtype=float)
    return stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else math.nan


def t_interval(values, level=0.95):
    """(mean, low, high) of a Student t interval for the mean of `values` (NaN bounds below 2 values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan
    half = t_half_width(x, level)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def jackknife_interval(statistic, n, level=0.95):
    """(estimate, low, high): statistic(all n seeds) +- t_{n-1} * jackknife standard error, where
    statistic(keep) takes an index array of the seeds to use and each leave-one-out drops one seed.
    For the mean of per-seed values this is exactly `t_interval`."""
    estimate = float(statistic(np.arange(n)))
    if n < 2:
        return estimate, math.nan, math.nan
    leave_one_out = np.array([statistic(np.delete(np.arange(n), i)) for i in range(n)])
    se = math.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    return estimate, estimate - half, estimate + half


def final_rows(table, split="test"):
    """One row per run: its evaluation on `split` at its last step."""
    rows = table[table["split"] == split]
    return rows.sort_values("step").groupby(["variant", "learning_rate", "seed"], as_index=False).last()


def families(table, metric="reward/policy"):
    """Family names for which the table has `metric/FAMILY` columns."""
    return sorted(c[len(metric) + 1:] for c in table.columns if c.startswith(metric + "/") and "/" not in c[len(metric) + 1:])


def choose_learning_rates(table, seed=0, metric="reward/policy"):
    """Each variant's learning rate: the best `metric` at the last validation evaluation of `seed`.
    Returns one row per (variant, learning_rate) with the metric and `chosen`; ties go to the smaller rate."""
    if metric not in table:
        raise ValueError(f"choose_learning_rates: select_by {metric!r} is not a column of the table (e.g. reward/policy, pref/accuracy)")
    rows = final_rows(table[table["seed"] == seed], split="validation")[["variant", "learning_rate", metric]]
    if rows[metric].isna().any():
        raise ValueError(f"choose_learning_rates: no {metric!r} in some validation rows (eval_generate must be > 0)")
    rows = rows.sort_values(["variant", "learning_rate"]).reset_index(drop=True)
    best = rows.loc[rows.groupby("variant")[metric].idxmax(), ["variant", "learning_rate"]]
    key = set(zip(best["variant"], best["learning_rate"]))
    rows["chosen"] = [(v, lr) in key for v, lr in zip(rows["variant"], rows["learning_rate"])]
    return rows


def learning_rate_grid(table, variant, rates, extend=0, finished=None, seed=0, metric="reward/policy"):
    """A variant's learning-rate grid: `rates`, widened by a factor of 2 past the edge where its best
    validation result lies, at most `extend` times. A best rate at the grid's edge does not bracket the
    optimum, and a variant held there would be compared at a rate the grid chose for it, not at its best.
    finished(lr): whether the variant's run at lr has finished (default: it has a row in `table`).
    Returns (grid, complete): complete once every rate of the grid has finished and no widening is due."""
    finished = finished or (lambda lr: bool(((table["variant"] == variant) & (table["learning_rate"] == lr)).any()))
    grid = sorted(rates)
    for widened in range(extend + 1):
        if not all(finished(lr) for lr in grid):
            return grid, False
        rows = choose_learning_rates(table[(table["variant"] == variant) & table["learning_rate"].isin(grid)], seed, metric)
        best = rows.loc[rows["chosen"], "learning_rate"].iloc[0]
        if widened == extend or grid[0] < best < grid[-1]:
            return grid, True
        grid = [grid[0] / 2, *grid] if best == grid[0] else [*grid, grid[-1] * 2]
    return grid, True


def final_runs(table, chosen, seeds):
    """Rows of the runs the comparison uses: each variant at its chosen learning rate, on `seeds`."""
    keep = [chosen.get(v) == lr for v, lr in zip(table["variant"], table["learning_rate"])]
    return table[pd.Series(keep, index=table.index, dtype=bool) & table["seed"].isin(list(seeds))]


def seed_matrix(final, variant, metric, seeds=None):
    """A variant's `metric` by seed (a Series indexed by seed), from one-row-per-run `final` rows."""
    rows = final[final["variant"] == variant].set_index("seed")[metric]
    if rows.index.has_duplicates:
        raise ValueError(f"variant {variant!r} has several runs per seed in the final rows (one learning rate each)")
    return rows if seeds is None else rows.reindex(seeds)


def paired_differences(final, metric="reward/policy", baseline="dpo", level=0.95):
    """Each variant minus the baseline on `metric`, paired by seed: mean difference, t interval, seeds.
    `final`: one row per run at the chosen learning rates (`final_rows` of the seed phase)."""
    base = seed_matrix(final, baseline, metric)
    out = []
    for variant in sorted(set(final["variant"]) - {baseline}):
        own = seed_matrix(final, variant, metric)
        both = own.index.intersection(base.index)
        diff = (own[both] - base[both]).dropna()
        mean, lo, hi = t_interval(diff, level)
        out.append({"variant": variant, "metric": metric, "n_seeds": len(diff), "variant_mean": own[both].mean(),
                    "baseline_mean": base[both].mean(), "difference": mean, "low": lo, "high": hi})
    return pd.DataFrame(out)


def frontier_area(points, kl_max):
    """Integral over k in [0, kl_max] of F(k) = the best reward among `points` (kl, reward) with kl <= k.
    The points must include one at kl = 0 (the reference); negative Monte Carlo KLs count as 0."""
    pts = sorted((max(0.0, k), r) for k, r in points)
    if not pts or pts[0][0] > 0:
        raise ValueError("frontier_area: the points need one at kl = 0 (the reference's reward)")
    area, best = 0.0, -math.inf
    for (k, r), nxt in zip(pts, [p[0] for p in pts[1:]] + [math.inf]):
        best = max(best, r)
        area += best * max(0.0, min(nxt, kl_max) - min(k, kl_max))
    return area


def frontier(evals, metric="reward/policy"):
    """(kl, reward) points of one run's validation evaluations, with the reference at kl = 0 first."""
    rows = evals.sort_values("step")
    return [(0.0, float(rows["reward/reference" + metric[len("reward/policy"):]].iloc[0]))] + \
        list(zip(rows["kl"].astype(float), rows[metric].astype(float)))


def frontier_gap(table, variant, baseline="dpo", metric="reward/policy", level=0.95):
    """Reward advantage of `variant` over `baseline` at equal KL, paired by seed: per seed, the mean over
    k in [0, K] of F_variant(k) - F_baseline(k), K the smaller of the two runs' largest KLs (the range
    both reached); then a t interval over seeds. `table`: validation rows of the final runs only."""
    rows = table[table["split"] == "validation"]
    gaps, reach = [], []
    for seed in sorted(set(rows["seed"][rows["variant"] == variant]) & set(rows["seed"][rows["variant"] == baseline])):
        a = frontier(rows[(rows["variant"] == variant) & (rows["seed"] == seed)], metric)
        b = frontier(rows[(rows["variant"] == baseline) & (rows["seed"] == seed)], metric)
        kl_max = min(max(k for k, _ in a), max(k for k, _ in b))
        if kl_max > 0:
            gaps.append((frontier_area(a, kl_max) - frontier_area(b, kl_max)) / kl_max)
            reach.append(kl_max)
    mean, lo, hi = t_interval(gaps, level)
    return {"variant": variant, "metric": metric, "n_seeds": len(gaps), "gap": mean, "low": lo, "high": hi,
            "kl_range": float(np.mean(reach)) if reach else math.nan}


def _family_arrays(final, variants, baseline, metric, fams):
    """Aligned [seed, variant, family] and [seed, family] arrays over the seeds every variant has."""
    seeds = sorted(set.intersection(*[set(final["seed"][final["variant"] == v]) for v in [*variants, baseline]]))
    if not seeds:
        raise ValueError(f"no seed has runs of all of {[*variants, baseline]}: nothing to pair")
    cols = [f"{metric}/{f}" for f in fams]
    a = np.stack([np.stack([seed_matrix(final, v, c, seeds).to_numpy() for c in cols], -1) for v in variants], 1)
    b = np.stack([seed_matrix(final, baseline, c, seeds).to_numpy() for c in cols], -1)
    return seeds, a, b


def relative_gain(final, variants, baseline="dpo", metric="reward/policy", level=0.95):
    """Relative gain of `variants` (together) over the baseline in `metric`, averaged over families:
    mean over variants v and families f of mean_s R_v,f,s / mean_s R_base,f,s - 1 (a ratio of means
    over seeds, so one seed's zero reward does not break it), with a jackknife t interval over seeds.
    A family where the baseline's mean is 0 has no relative gain; it is left out and named."""
    fams = families(final, metric)
    if not fams:
        raise ValueError(f"relative_gain: no per-family {metric!r} columns in the table")
    seeds, a, b = _family_arrays(final, variants, baseline, metric, fams)
    usable = b.mean(0) > 0

    def gain(keep):
        return float((a[keep].mean(0)[:, usable] / b[keep].mean(0)[usable] - 1).mean())
    est, lo, hi = jackknife_interval(gain, len(seeds), level) if usable.any() else (math.nan,) * 3
    per_family = {f: float((a.mean(0)[:, i] / b.mean(0)[i] - 1).mean()) if usable[i] else math.nan
                  for i, f in enumerate(fams)}
    return {"variants": "+".join(variants), "n_seeds": len(seeds), "gain": est, "low": lo, "high": hi,
            "families_left_out": ",".join(f for f, u in zip(fams, usable) if not u),
            **{f"gain/{f}": g for f, g in per_family.items()}}


def verdict(low, high, paper=PAPER_GAIN):
    """(label, reason) for a relative gain's interval against the paper's claimed gain.
    reproduced: the gain is positive (low > 0); not reproduced: the interval excludes the paper's
    gain from above (high < paper) and does not show a positive gain; not testable: the interval is
    too wide to tell (or missing)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not testable", "no interval (fewer than 2 seeds, or no usable family)"
    if low > 0:
        size = "as large as" if high >= paper else "smaller than"
        return "reproduced", f"gain > 0 ({low:+.1%} to {high:+.1%}), {size} the paper's {paper:+.1%}"
    if high < paper:
        return "not reproduced", f"interval {low:+.1%} to {high:+.1%} shows no gain and excludes the paper's {paper:+.1%}"
    return "not testable", f"interval {low:+.1%} to {high:+.1%} contains both 0 and the paper's {paper:+.1%}"


def hybrid_gains(final, kernels, divergence="kl", baseline="dpo", metric="reward/policy", level=0.95):
    """The README's verdict: relative gain of each kernel's hybrid loss (variant KERNEL+DIVERGENCE)
    over plain DPO averaged over the families, then all kernels together; with verdicts."""
    present = [k for k in kernels if f"{k}+{divergence}" in set(final["variant"])]
    groups = [[f"{k}+{divergence}"] for k in present] + ([[f"{k}+{divergence}" for k in present]] if len(present) > 1 else [])
    rows = [relative_gain(final, g, baseline, metric, level) for g in groups]
    for row in rows:
        row["verdict"], row["reason"] = verdict(row["low"], row["high"])
    return pd.DataFrame(rows)


def pair_results(final, metric="reward/policy", baseline="dpo"):
    """Achieved result per (kernel, divergence), overall (family "all") and per family: the mean over
    seeds of `metric`, and its paired difference to the baseline. The table selection's Spearman and
    regret functions take (one number per pair, per family)."""
    pairs = final[(final["kernel"] != "none") & (final["kernel"] != "hmk") & (final["loss_type"] == "sigmoid")]
    out = []
    for family in ["all", *families(final, metric)]:
        col = metric if family == "all" else f"{metric}/{family}"
        diffs = paired_differences(final[final["variant"].isin([*pairs["variant"].unique(), baseline])], col, baseline)
        for (kernel, divergence, variant), rows in pairs.groupby(["kernel", "divergence", "variant"]):
            d = diffs[diffs["variant"] == variant].iloc[0]
            out.append({"kernel": kernel, "divergence": divergence, "family": family, "value": rows[col].mean(),
                        "n_seeds": rows[col].notna().sum(), "vs_baseline": d["difference"],
                        "low": d["low"], "high": d["high"]})
    return pd.DataFrame(out, columns=["kernel", "divergence", "family", "value", "n_seeds", "vs_baseline", "low", "high"])
