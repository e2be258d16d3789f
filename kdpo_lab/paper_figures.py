"""The tables behind notebook 10's figures, from the sweep's final rows (paper_claims.final_table) and the
committed selection scores; `kdpo figures` draws the same tables with the same plots.* calls.

    differences_to_dpo(final)          every variant minus plain DPO, paired by seed  -> plots.plot_differences
    family_differences(final)          HMK and the KL hybrids minus DPO, per family   -> plots.plot_family_differences
    selection_scatter(final, tables)   score vs achieved reward, and the three pickers -> plots.plot_selection_check
"""
import pandas as pd

from kdpo_lab import kernels, sweep_stats
from kdpo_lab.paper_claims import METRIC, pair_table, per_seed, selection_check

COLUMNS = ["variant", "mean", "low", "high", "n_seeds"]
SHOWN = ["hmk", *[f"{k}+kl" for k in kernels.PAPER_FOUR]]
"""The variants of the per-family figure: HMK and each kernel's hybrid loss with the KL link (claim a)."""


def _paired(final, metric):
    """sweep_stats.paired_differences as variant, mean, low, high, n_seeds; only variants with paired seeds."""
    if not len(per_seed(final, "dpo", metric)) or final["variant"].nunique() < 2:
        return pd.DataFrame(columns=COLUMNS)
    d = sweep_stats.paired_differences(final, metric).rename(columns={"difference": "mean"})
    return d.loc[d["n_seeds"] > 0, COLUMNS].sort_values("mean").reset_index(drop=True)


def differences_to_dpo(final):
    """Held-out exact reward minus plain DPO's at the same seed, per variant, with a t interval over seeds
    (empty while DPO and another variant share no finished seed)."""
    return _paired(final, METRIC)


def family_differences(final, shown=SHOWN):
    """As differences_to_dpo, per task family, for `shown` variants: columns family + COLUMNS."""
    fams = sweep_stats.families(final, METRIC) if len(final) else []
    keep = final[final["variant"].isin(["dpo", *shown])] if len(final) else final
    parts = [_paired(keep, f"{METRIC}/{f}").assign(family=f) for f in fams]
    return pd.concat(parts, ignore_index=True)[["family", *COLUMNS]] if parts else pd.DataFrame(columns=["family", *COLUMNS])


def selection_scatter(final, tables):
    """(points, pickers, note) for the whole suite: points = one row per pair with a run (kernel, divergence,
    score, value = mean held-out reward, mark = recommended / rule of thumb (recalled) / ""), pickers = the
    three pickers minus DPO (paper_claims.selection_check), note = Spearman with its interval; empty tables
    while no pair has a finished run."""
    check = selection_check(final, tables) if tables is not None else None
    if check is None or not len(check.correlations):
        return pd.DataFrame(columns=["kernel", "divergence", "score", "value", "mark"]), pd.DataFrame(columns=COLUMNS), ""
    c = check.correlations.set_index("group").loc["all"]
    scores = tables.scores[tables.scores["group"] == "all"][["kernel", "divergence", "score"]]
    pairs = pair_table(final)
    points = pairs[pairs["family"] == "all"].merge(scores, on=["kernel", "divergence"])[["kernel", "divergence", "score", "value"]]
    marks = {c["recommended"]: "recommended"}
    if tables.rules is not None and "all" in set(tables.rules["group"]):
        rule = tables.rules.set_index("group").loc["all"]
        marks.setdefault(f"{rule['kernel']}+{rule['divergence']}", "rule of thumb (recalled)")
    points["mark"] = (points["kernel"] + "+" + points["divergence"]).map(marks).fillna("")
    p = check.pickers[check.pickers["group"] == "all"]
    pickers = pd.DataFrame({"variant": p["picker"] + " (" + p["pairs"] + ")", **{k: p[k] for k in COLUMNS[1:]}})
    return points, pickers.reset_index(drop=True), f"Spearman {c['spearman']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] over {int(c['n'])} pairs"
