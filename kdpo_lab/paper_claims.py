"""The paper's claims beside our results: one row per claim, with a verdict that follows from the numbers.

Das et al., "DPO Kernels" (arXiv 2501.03271, ACL Findings 2025) make five claims that the 28-pair sweep
(`kdpo sweep`, its committed table results/sweep/table.csv) and notebook 09's HT-SR run can answer:

a. the hybrid loss gains +9.2% on average over DPO (contribution i, the hybrid loss);
b. different task families prefer different kernel-divergence pairs (its results by category);
c. HMK aligns best, at about 3-4x the compute (contribution iv, HMK);
d. after alignment, the layers' weightwatcher exponents stay in the healthy band 2-6, read as "no
   over-fitting" (its HT-SR analysis);
e. its data-driven metrics pick a good pair (contribution iii; our metrics are our own design,
   `kdpo_lab.selection`, since the paper's definitions are not recoverable).

Each claim becomes a row: claim, paper, ours (numbers with 95% intervals over seeds, paired by seed),
verdict and reason, plus the numbers the verdict read (estimate, low, high) and how many of the runs it
needs are done (runs_done, runs_needed). The verdict is one of VERDICTS, or "pending: N of M runs done"
while a run the claim needs is missing: the sweep commits its table as it grows, and a partial table
never reads as a result (the reason then gives the provisional reading, labelled so).

The rules (functions `rule_*`, each a pure function of an interval, so a notebook can re-apply them):
* a gain or a difference: reproduced when the interval lies above 0, not reproduced when it lies
  below the paper's value and does not lie above 0 (sweep_stats.verdict, the README's rule), not
  testable at this scale when it contains both;
* "X is best": reproduced when X minus the best alternative lies above 0, not reproduced when it
  lies below 0, not testable when it contains 0. "The best alternative" is chosen on the same data
  (the winner's curse favours it), so the rule is conservative for X;
* a cost ratio: reproduced when its interval meets the paper's [3, 4], not reproduced when it lies
  wholly outside;
* a correlation: reproduced when its interval lies above 0, not reproduced when it lies below
  USEFUL_SPEARMAN (0.3; a rank correlation below it explains under a tenth of the ranks' variance,
  too little to pick by: our threshold), not testable otherwise;
* the best pair per family: per family, the recalled pick minus the best pair found, by the "X is
  best" rule (the pick is the best found: reproduced); see `claim_family_best`;
* the HT-SR band reading: see `rule_band`.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdpo_lab import kernels, package_root, selection, sweep, sweep_stats, sweep_table

PAPER = "Das et al. 2025 (arXiv 2501.03271)"
VERDICTS = ("reproduced", "not reproduced", "not testable at this scale")
PENDING = "pending"
COST_BAND = (3.0, 4.0)        # the paper's HMK compute, relative to DPO
USEFUL_SPEARMAN = 0.3         # below this a selection score is too weak to pick by (our threshold)
HEALTHY_FRACTION = 0.8        # a run is "in the band" when at least this share of its layers has 2 <= alpha <= 6
OVERFIT_GAP = 0.1             # a run over-fits when train minus held-out preference accuracy exceeds this
METRIC = "reward/policy"      # held-out exact reward, the sweep's metric


# ---------------------------------------------------------------- inputs

@dataclass
class Expected:
    """What the full sweep is configured to run (configs/sweep.yaml): the seeds of the comparison, the
    variants, the learning-rate grid and the seed it is chosen on. A claim is pending until each variant
    it needs has a test evaluation on every one of `seeds`."""
    seeds: tuple = (1, 2, 3, 4, 5)
    variants: tuple = ()
    learning_rates: tuple = ()
    lr_seed: int = 0
    extend_grid: int = 0
    select_generate: int = 0

    @classmethod
    def from_sweep(cls, path=None):
        cfg = sweep.SweepConfig.from_yaml(path or package_root() / "configs" / "sweep.yaml")
        return cls(tuple(cfg.seeds), tuple(sweep.variants(cfg)), tuple(cfg.learning_rates), cfg.lr_seed, cfg.extend_grid,
                   cfg.select_generate)


def _lr_rows(table, expected):
    """The learning-rate runs' validation rows, and those of finished runs: at the last step any run reached,
    scored on select_generate prompts where the sweep sets it (the row the rate is chosen on)."""
    rows = table[(table["split"] == "validation") & (table["seed"] == expected.lr_seed)] if len(table) and "split" in table else table.iloc[0:0]
    last = rows[rows["step"] == rows["step"].max()] if len(rows) else rows
    if expected.select_generate and len(last):
        last = last[last["n_generated"] >= expected.select_generate]
    return rows, last


def _grids(table, expected):
    """{variant: (its learning-rate grid, complete)}: sweep_stats.learning_rate_grid on the finished runs."""
    rows, last = _lr_rows(table, expected)
    return {v: sweep_stats.learning_rate_grid(last, v, expected.learning_rates, expected.extend_grid, seed=expected.lr_seed, metric=METRIC)
            for v in expected.variants}


def sweep_progress(table, expected):
    """The sweep's two phases, runs finished of runs planned: the learning-rate runs (on lr_seed, finished =
    evaluated on the validation split at the last step any run reached) and the seed runs (test evaluation)."""
    _, last = _lr_rows(table, expected)
    grids = _grids(table, expected) if len(last) else {v: (expected.learning_rates, False) for v in expected.variants}
    n_lr = sum(((last["variant"] == v) & last["learning_rate"].isin(grid)).sum() for v, (grid, _) in grids.items()) if len(last) else 0
    n_seed = len(final_table(table, expected))
    return pd.DataFrame([
        {"phase": f"learning rates (seed {expected.lr_seed}, validation split)", "runs_done": int(n_lr),
         "runs_planned": sum(len(grid) for grid, _ in grids.values())},
        {"phase": f"seeds {', '.join(map(str, expected.seeds))} (test split)", "runs_done": n_seed,
         "runs_planned": len(expected.variants) * len(expected.seeds)}])


def chosen_rates(table, expected):
    """The learning rate chosen so far for each variant whose whole grid has finished on lr_seed
    (sweep_stats.choose_learning_rates: best held-out exact reward on the validation split; the grid
    widened past an edge where the best lies, sweep_stats.learning_rate_grid)."""
    none = pd.DataFrame({"variant": pd.Series(dtype=str), "learning_rate": pd.Series(dtype=float),
                         METRIC: pd.Series(dtype=float), "chosen": pd.Series(dtype=bool)})
    rows, last = _lr_rows(table, expected)
    if not len(rows):
        return none
    grid = pd.concat([last[(last["variant"] == v) & last["learning_rate"].isin(g)] for v, (g, done) in _grids(table, expected).items() if done]
                     or [rows.iloc[0:0]])
    if not len(grid):
        return none
    return sweep_stats.choose_learning_rates(grid, expected.lr_seed, METRIC)


@dataclass
class SelectionTables:
    """`kdpo select` on the sweep's seed-0 reference: scores (its selection.csv: group, rank, kernel,
    divergence, score, ...) and rules (its rule_of_thumb.csv: group, kernel, divergence, reason, label)."""
    scores: pd.DataFrame
    rules: pd.DataFrame = None


@dataclass
class Tables:
    """The committed tables notebook 10 reads; a table not written yet is None (its claims: pending)."""
    sweep: pd.DataFrame
    htsr: pd.DataFrame = None
    selection: SelectionTables = None
    sources: dict = field(default_factory=dict)


def read_tables(root=None):
    """results/sweep/table.csv, results/htsr/summary.csv, results/selection/{scores,rule_of_thumb}.csv
    under `root` (default: the checkout). A missing sweep table reads as an empty table."""
    results = Path(root or package_root()) / "results"
    paths = {"sweep": results / "sweep" / "table.csv", "htsr": results / "htsr" / "summary.csv",
             "scores": results / "selection" / "scores.csv", "rules": results / "selection" / "rule_of_thumb.csv"}
    read = {k: pd.read_csv(p) if p.exists() else None for k, p in paths.items()}
    table = read["sweep"] if read["sweep"] is not None else pd.DataFrame(columns=["variant", "seed", "split", "step"])
    sel = SelectionTables(read["scores"], read["rules"]) if read["scores"] is not None else None
    return Tables(table, read["htsr"], sel, {k: f"results/{p.relative_to(results).as_posix()}" + ("" if p.exists() else " (not written yet)")
                                              for k, p in paths.items()})


def final_table(table, expected):
    """One row per finished run (its test evaluation) on the comparison's seeds, at its variant's chosen
    learning rate (a variant with no learning-rate runs in the table keeps all its rows): the paired runs."""
    if not len(table) or "split" not in table or not (table["split"] == "test").any():
        return pd.DataFrame(columns=[*sweep_table.ID, "split", "step", METRIC])
    final = sweep_stats.final_rows(table, "test")
    rates = chosen_rates(table, expected)  # a grid widened later leaves test runs at a rate no longer chosen
    chosen = dict(zip(rates.loc[rates["chosen"], "variant"], rates.loc[rates["chosen"], "learning_rate"]))
    tuned = set(_lr_rows(table, expected)[0]["variant"])
    keep = [v not in tuned or chosen.get(v) == lr for v, lr in zip(final["variant"], final["learning_rate"])]
    return final[final["seed"].isin(list(expected.seeds)) & pd.Series(keep, index=final.index, dtype=bool)].reset_index(drop=True)


def progress(final, variants, expected):
    """(runs done, runs needed, what is missing: a list of short phrases) for `variants` x the seeds."""
    seeds = set(expected.seeds)
    have = {v: len(seeds & set(final["seed"][final["variant"] == v])) for v in variants}
    partial = [f"{v} ({n} of {len(seeds)} seeds)" for v, n in have.items() if 0 < n < len(seeds)]
    none = [v for v, n in have.items() if n == 0]
    if none:
        partial.append(f"{len(none)} variant{'s' * (len(none) > 1)} with no finished run "
                       f"({', '.join(none[:4])}{', ...' if len(none) > 4 else ''})")
    return sum(have.values()), len(variants) * len(seeds), partial


def per_seed(final, variant, column):
    """A variant's `column` by seed (a Series; empty when the variant has no finished run)."""
    if "variant" not in final or not (final["variant"] == variant).any():
        return pd.Series(dtype=float)
    return sweep_stats.seed_matrix(final, variant, column).dropna()


def pair_table(final):
    """sweep_stats.pair_results (one row per pair and family: value, n_seeds, vs_baseline, low, high), or
    an empty table with those columns while plain DPO or every pair has no finished run."""
    columns = ["kernel", "divergence", "family", "value", "n_seeds", "vs_baseline", "low", "high"]
    if not len(per_seed(final, "dpo", METRIC)) or not (final["kernel"].isin(kernels.PAPER_FOUR)).any():
        return pd.DataFrame(columns=columns)
    return sweep_stats.pair_results(final)


def paired_interval(a, b, level=0.95):
    """(mean, low, high, n) of a - b over the seeds both have: a t interval of the paired differences."""
    both = a.index.intersection(b.index)
    mean, low, high = sweep_stats.t_interval((a[both] - b[both]).to_numpy(), level)
    return mean, low, high, len(both)


# ---------------------------------------------------------------- the rules

def rule_gain(low, high, paper=sweep_stats.PAPER_GAIN):
    """A relative gain against the paper's: sweep_stats.verdict (the README's rule), in VERDICTS' words."""
    label, reason = sweep_stats.verdict(low, high, paper)
    return ("not testable at this scale" if label == "not testable" else label), reason


def rule_better(low, high, what):
    """'what' (a difference X - best alternative) is positive: above 0 reproduced, below 0 not, else not testable."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not testable at this scale", "no interval (fewer than 2 paired seeds)"
    if low > 0:
        return "reproduced", f"{what} > 0 ({low:+.3f} to {high:+.3f})"
    if high < 0:
        return "not reproduced", f"{what} < 0 ({low:+.3f} to {high:+.3f})"
    return "not testable at this scale", f"{what}: interval {low:+.3f} to {high:+.3f} contains 0"


def rule_cost(low, high, band=COST_BAND):
    """A cost ratio's interval against the paper's band: meets it reproduced, wholly outside not reproduced."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not testable at this scale", "no interval (fewer than 2 paired seeds)"
    if high < band[0] or low > band[1]:
        return "not reproduced", f"ratio {low:.2f} to {high:.2f}x lies outside the paper's {band[0]:g}-{band[1]:g}x"
    return "reproduced", f"ratio {low:.2f} to {high:.2f}x meets the paper's {band[0]:g}-{band[1]:g}x"


def rule_correlation(low, high, useful=USEFUL_SPEARMAN):
    """A Spearman interval: above 0 reproduced, wholly below `useful` not reproduced, else not testable."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not testable at this scale", "no interval (scores or results all equal)"
    if low > 0:
        return "reproduced", f"Spearman interval {low:+.2f} to {high:+.2f} lies above 0"
    if high < useful:
        return "not reproduced", f"Spearman interval {low:+.2f} to {high:+.2f} lies below {useful} (too weak to pick by)"
    return "not testable at this scale", f"Spearman interval {low:+.2f} to {high:+.2f} contains 0 and {useful}"


def rule_band(summary, healthy=HEALTHY_FRACTION, overfit=OVERFIT_GAP):
    """The HT-SR reading "layers in the band 2-6, so no over-fitting", on notebook 09's runs (rows of its
    summary.csv with reliable layers and a gap). A run is in the band when at least `healthy` of its
    reliable layers are; it over-fits when its gap (train - held-out preference accuracy) > `overfit`.
    not reproduced: a run in the band over-fits (the band does not tell); reproduced: some run over-fits,
    every over-fitting run is out of the band and some run is in it; otherwise not testable (no reliable
    layers, or no over-fitting run to tell apart)."""
    rows = summary[(summary["n_reliable"] > 0) & np.isfinite(summary["gen_gap"])]
    if not len(rows):
        return "not testable at this scale", "no run with reliable layers and a generalisation gap"
    inside, over = rows["frac 2-6"] >= healthy, rows["gen_gap"] > overfit
    if (inside & over).any():
        names = ", ".join(rows["run"][inside & over].astype(str))
        return "not reproduced", f"in the band yet over-fit (gap > {overfit}): {names}"
    if over.any() and inside.any():
        return "reproduced", f"every over-fit run (gap > {overfit}) is out of the band"
    if not over.any():
        return "not testable at this scale", f"no run over-fits (gap > {overfit}): the band is never put to the test"
    return "not testable at this scale", "no run is in the band"


def _row(claim, paper, ours, verdict, done=(0, 0, []), estimate=math.nan, low=math.nan, high=math.nan):
    """A claims row; with runs missing the verdict is pending and the rule's reading provisional."""
    (label, reason), (n_done, n_needed, missing) = verdict, done
    if n_done < n_needed:
        reason = (f"waiting for {', '.join(missing)}; provisional reading on the runs done: {label} ({reason})"
                  if n_done else f"waiting for {', '.join(missing)}")
        label = f"{PENDING}: {n_done} of {n_needed} runs done"
    return {"claim": claim, "paper": paper, "ours": ours, "verdict": label, "reason": reason,
            "estimate": estimate, "low": low, "high": high, "runs_done": n_done, "runs_needed": n_needed}


def _interval(mean, low, high, fmt="+.3f"):
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]" if math.isfinite(low) else f"{mean:{fmt}} (no interval)"


# ---------------------------------------------------------------- the claims

def claim_hybrid_gain(final, expected):
    """(a) Relative gain in held-out exact reward of each kernel's hybrid loss (KL link) over plain DPO,
    averaged over the four families (sweep_stats.hybrid_gains); the verdict reads all four kernels together."""
    hybrids = [f"{k}+kl" for k in kernels.PAPER_FOUR]
    done = progress(final, ["dpo", *hybrids], expected)
    paper = f"+{sweep_stats.PAPER_GAIN:.1%} average over DPO on 12 datasets ({PAPER}: hybrid loss, contribution i)"
    dpo = set(per_seed(final, "dpo", METRIC).index)
    present = [h for h in hybrids if len(per_seed(final, h, METRIC))]
    shared = dpo.intersection(*[set(per_seed(final, h, METRIC).index) for h in present]) if present else set()
    if not shared:
        return _row("a. hybrid loss beats DPO by 9.2%", paper, "no seed shared by DPO and the hybrids yet",
                    ("not testable at this scale", "no paired runs"), done)
    gains = sweep_stats.hybrid_gains(final[final["seed"].isin(shared)], kernels.PAPER_FOUR)
    together = gains.iloc[-1]
    ours = (f"{together['gain']:+.1%} [{together['low']:+.1%}, {together['high']:+.1%}] over {together['n_seeds']} seeds, "
            f"{len(present)} kernels together")
    if len(gains) > 1:
        ours += "; " + ", ".join(f"{r['variants'].removesuffix('+kl')} {r['gain']:+.1%}" for _, r in gains.iloc[:-1].iterrows())
    return _row("a. hybrid loss beats DPO by 9.2%", paper, ours, rule_gain(together["low"], together["high"]), done,
                together["gain"], together["low"], together["high"])


def claim_family_best(final, tables, expected):
    """(b) The best pair per task family (its mean reward and difference to DPO, paired by seed) against the
    paper's per-family preference. The paper's per-category tables are not recoverable; what stands in is
    the paper's rule of thumb as RECALLED (unverified), applied to each family's reference data by `kdpo
    select` (its rule_of_thumb.csv). Per family: reproduced when the recalled pick is the best pair found;
    otherwise `rule_better` on the pick minus the best pair, paired by seed (not reproduced when it lies
    below 0, not testable when it holds 0). Overall: not reproduced if any family is, reproduced if all
    are, else not testable."""
    pairs = [f"{k}+{d}" for k, d in selection.PAIRS]
    done = progress(final, ["dpo", *pairs], expected)
    paper = "each family prefers its own pair (per-category tables, not recoverable); recalled rule of thumb (unverified) per family"
    if tables is None or tables.rules is None:
        return _row("b. best pair per task family", paper, "no recalled picks (results/selection/rule_of_thumb.csv)",
                    ("not testable at this scale", "no recalled per-family pick to compare"), done)
    results = pair_table(final)
    rules = tables.rules.set_index("group")
    found, verdicts = [], []
    for family in sweep_stats.families(final, METRIC):
        rows = results[(results["family"] == family) & (results["n_seeds"] > 0)]
        if family not in rules.index or not len(rows):
            continue
        best = rows.loc[rows["value"].idxmax()]
        pick = f"{rules.loc[family, 'kernel']}+{rules.loc[family, 'divergence']}"
        best_name = f"{best['kernel']}+{best['divergence']}"
        column = f"{METRIC}/{family}"
        if pick == best_name:
            verdicts.append(("reproduced", f"{family}: the recalled pick {pick} is the best found"))
        else:
            _, low, high, _ = paired_interval(per_seed(final, best_name, column), per_seed(final, pick, column))
            label, why = rule_better(-high, -low, f"{pick} - {best_name}")  # the pick minus the best found
            verdicts.append((label, f"{family}: {why}"))
        found.append(f"{family}: {best_name} {best['value']:.3f}, vs DPO {_interval(best['vs_baseline'], best['low'], best['high'])}"
                     f" (recalled pick {pick})")
    if not verdicts:
        return _row("b. best pair per task family", paper, "no paired pair runs yet", ("not testable at this scale", "no runs"), done)
    labels = [v[0] for v in verdicts]
    label = ("not reproduced" if "not reproduced" in labels else "reproduced" if set(labels) == {"reproduced"}
             else "not testable at this scale")
    return _row("b. best pair per task family", paper, "; ".join(found), (label, "; ".join(v[1] for v in verdicts)), done)


def costs_from_table(final):
    """(variant, seed, seconds): each run's median wall seconds per training step (time/step_s)."""
    return final[["variant", "seed", "time/step_s"]].rename(columns={"time/step_s": "seconds"}) if "time/step_s" in final \
        else pd.DataFrame(columns=["variant", "seed", "seconds"])


def costs_from_jobs(jobs):
    """(variant, seed, seconds) from the sweep's jobs.jsonl rows (a DataFrame): the CPU seconds of each seed
    run's job (training and its test evaluation, which costs the same for every variant, so the ratio
    understates the training's; each run's time/step_s, the default, does not)."""
    rows = jobs[jobs["job"].str.endswith("/test") & jobs["error"].isna()]
    parts = rows["job"].str.extract(r"^(?P<variant>[^/]+)/lr[^_]+_s(?P<seed>\d+)/test$")
    return pd.DataFrame({"variant": parts["variant"], "seed": parts["seed"].astype(int), "seconds": rows["cpu_s"]})


def claim_hmk(final, costs, expected):
    """(c) Two rows. HMK best: HMK minus the best single-kernel hybrid (KL link, chosen by mean reward on
    the same runs), paired by seed, by `rule_better`. Its cost: per seed, HMK's cost / plain DPO's (costs:
    variant, seed, seconds; default each run's time/step_s), a t interval of the ratios, by `rule_cost`."""
    hybrids = [f"{k}+kl" for k in kernels.PAPER_FOUR]
    hmk = per_seed(final, "hmk", METRIC)
    means = {h: per_seed(final, h, METRIC).mean() for h in hybrids if len(per_seed(final, h, METRIC))}
    paper_best = f"HMK aligns best of all variants ({PAPER}: HMK, contribution iv)"
    if not len(hmk) or not means:
        best_row = _row("c. HMK is the best loss", paper_best, "no paired runs yet", ("not testable at this scale", "no runs"),
                        progress(final, ["hmk", *hybrids], expected))
    else:
        best = max(means, key=means.get)
        mean, low, high, n = paired_interval(hmk, per_seed(final, best, METRIC))
        best_row = _row("c. HMK is the best loss", paper_best,
                        f"HMK - {best} (best single-kernel hybrid) {_interval(mean, low, high)} held-out reward, {n} seeds",
                        rule_better(low, high, f"HMK - {best}"), progress(final, ["hmk", *hybrids], expected), mean, low, high)
    costs = costs_from_table(final) if costs is None else costs
    by = {v: costs[costs["variant"] == v].set_index("seed")["seconds"].dropna() for v in ("hmk", "dpo")}
    paper_cost = f"about {COST_BAND[0]:g}-{COST_BAND[1]:g}x the compute of DPO ({PAPER}: HMK's cost)"
    done = progress(final, ["hmk", "dpo"], expected)
    both = by["hmk"].index.intersection(by["dpo"].index)
    if not len(both):
        return [best_row, _row("c. HMK costs 3-4x", paper_cost, "no paired runs yet", ("not testable at this scale", "no runs"), done)]
    ratio, low, high = sweep_stats.t_interval((by["hmk"][both] / by["dpo"][both]).to_numpy())
    return [best_row, _row("c. HMK costs 3-4x", paper_cost, f"HMK / DPO seconds per step {_interval(ratio, low, high, '.2f')}x, {len(both)} seeds",
                           rule_cost(low, high), done, ratio, low, high)]


def claim_htsr(summary):
    """(d) The HT-SR healthy-band reading, on notebook 09's full run (results/htsr/summary.csv)."""
    paper = f"aligned layers keep weightwatcher alpha in 2-6, so alignment does not over-fit ({PAPER}: HT-SR analysis)"
    if summary is None:
        return _row("d. HT-SR healthy band", paper, "results/htsr/summary.csv not written yet (notebook 09's full run)",
                    ("not testable at this scale", "no summary"), (0, 1, ["notebook 09's full run"]))
    rows = summary[summary["n_reliable"] > 0]
    ours = "; ".join(f"{r['run']}: alpha {r['mean_alpha']:.2f}, {r['frac 2-6']:.0%} in 2-6, gap {r['gen_gap']:+.3f}"
                     for _, r in rows.iterrows()) or "no run with reliable layers"
    return _row("d. HT-SR healthy band", paper, ours, rule_band(summary), (1, 1, []))


# ---------------------------------------------------------------- the selection, validated on the sweep

@dataclass
class SelectionCheck:
    """correlations: one row per group ("all", then each family): Spearman (with its bootstrap interval
    over pairs, selection.validate), regret, recommended and best pairs, n pairs. pickers: one row per
    (group, picker): the picked pair(s) minus plain DPO in held-out reward, paired by seed, t interval."""
    correlations: pd.DataFrame
    pickers: pd.DataFrame


def selection_check(final, tables):
    """Validate `kdpo select`'s scores on the sweep: per group, Spearman(score, achieved held-out reward)
    over the pairs with finished runs, the regret of the top-scored pair against the best found, and three
    pickers against plain DPO paired by seed: our recommended pair, the recalled rule of thumb's pick, and
    a random pair (per seed, the mean over all pairs with a run at that seed: the expected result of
    picking uniformly). Groups without a score table or without three pairs with results are skipped."""
    results = pair_table(final)
    rules = tables.rules.set_index("group") if tables.rules is not None else None
    correlations, pickers = [], []
    for group, scores in tables.scores.groupby("group", sort=False):
        achieved = results[(results["family"] == group) & (results["n_seeds"] > 0)]
        if len(achieved) < 3:
            continue
        check = selection.validate(scores, achieved, value="value")
        correlations.append({"group": group, **{k: check[k] for k in ("spearman", "low", "high", "regret", "n")},
                             "recommended": "+".join(check["recommended"]), "best": "+".join(check["best"])})
        column = METRIC if group == "all" else f"{METRIC}/{group}"
        dpo = per_seed(final, "dpo", column)
        top = scores.sort_values("score", ascending=False, kind="stable").iloc[0]
        picks = {"our score": f"{top['kernel']}+{top['divergence']}"}
        if rules is not None and group in rules.index:
            picks["rule of thumb (recalled)"] = f"{rules.loc[group, 'kernel']}+{rules.loc[group, 'divergence']}"
        for name, pair in picks.items():
            mean, low, high, n = paired_interval(per_seed(final, pair, column), dpo)
            pickers.append({"group": group, "picker": name, "pairs": pair, "n_seeds": n, "mean": mean, "low": low, "high": high})
        every = pd.DataFrame({f"{k}+{d}": per_seed(final, f"{k}+{d}", column) for k, d in selection.PAIRS})
        mean, low, high, n = paired_interval(every.mean(axis=1).dropna(), dpo)
        pickers.append({"group": group, "picker": "random pair", "pairs": f"mean of {int(every.notna().any().sum())}",
                        "n_seeds": n, "mean": mean, "low": low, "high": high})
    return SelectionCheck(pd.DataFrame(correlations), pd.DataFrame(pickers))


def claim_selection(final, tables, expected):
    """(e) The selection metrics' usefulness: Spearman over the 28 pairs (group "all") by `rule_correlation`;
    the regret and the three pickers in `ours`."""
    done = progress(final, ["dpo", *[f"{k}+{d}" for k, d in selection.PAIRS]], expected)
    paper = f"its data-driven metrics select the best pair ({PAPER}: contribution iii); ours are our own design"
    if tables is None:
        return _row("e. selection metrics pick well", paper, "no selection scores (results/selection/scores.csv)",
                    ("not testable at this scale", "no scores"), done)
    check = selection_check(final, tables)
    if not len(check.correlations) or "all" not in set(check.correlations["group"]):
        return _row("e. selection metrics pick well", paper, "fewer than 3 pairs with finished runs",
                    ("not testable at this scale", "no correlation yet"), done)
    c = check.correlations.set_index("group").loc["all"]
    p = check.pickers[check.pickers["group"] == "all"]
    ours = (f"Spearman {_interval(c['spearman'], c['low'], c['high'], '+.2f')} over {c['n']} pairs; regret {c['regret']:.3f} "
            f"({c['recommended']} vs best {c['best']}); vs DPO: "
            + "; ".join(f"{r['picker']} ({r['pairs']}) {_interval(r['mean'], r['low'], r['high'])}" for _, r in p.iterrows()))
    return _row("e. selection metrics pick well", paper, ours, rule_correlation(c["low"], c["high"]), done,
                c["spearman"], c["low"], c["high"])


def claims(table, htsr=None, selection=None, costs=None, expected=None):
    """The paper's claims beside ours: a DataFrame with columns claim, paper, ours, verdict, reason,
    estimate, low, high, runs_done, runs_needed (module docstring). table: the sweep's tidy table
    (partial is fine); htsr: notebook 09's summary.csv; selection: SelectionTables; costs: (variant,
    seed, seconds) to use instead of the runs' time/step_s; expected: Expected (default configs/sweep.yaml)."""
    expected = expected or Expected.from_sweep()
    final = final_table(table, expected)
    rows = [claim_hybrid_gain(final, expected), claim_family_best(final, selection, expected),
            *claim_hmk(final, costs, expected), claim_htsr(htsr), claim_selection(final, selection, expected)]
    return pd.DataFrame(rows)
