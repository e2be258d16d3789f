"""Facts about kdpo_lab.paper_claims: each claim's verdict on synthetic sweep tables whose answer is known,
partial tables read as pending, and the selection check on scores that rank the pairs perfectly."""
import math

import numpy as np
import pandas as pd
import pytest

from kdpo_lab import kernels, selection
from kdpo_lab import paper_claims as P

SEEDS = (1, 2, 3, 4, 5)
FAMILIES = ("factuality", "safety")
EXPECTED = P.Expected(SEEDS)
HYBRIDS = [f"{k}+kl" for k in kernels.PAPER_FOUR]


def run_row(variant, seed, rewards, step_s=0.1):
    """The test evaluation of one run: its per-family held-out rewards (overall = their mean)."""
    kernel, _, divergence = variant.partition("+") if "+" in variant else ("hmk" if variant == "hmk" else "none", "", "kl")
    return {"variant": variant, "kernel": kernel, "divergence": divergence or "kl", "loss_type": "sigmoid",
            "learning_rate": 5e-5, "seed": seed, "split": "test", "step": 150, "time/step_s": step_s,
            "reward/policy": float(np.mean(rewards)), **{f"reward/policy/{f}": r for f, r in zip(FAMILIES, rewards)}}


def dpo_reward(seed):
    return [0.40 + 0.02 * seed, 0.50 - 0.01 * seed]  # seeds differ; pairing by seed cancels it


def hybrid_table(gains, seeds=SEEDS):
    """DPO and the four KL hybrids; on seed s every hybrid earns DPO's reward times 1 + gains[s]."""
    rows = [run_row("dpo", s, dpo_reward(s)) for s in seeds]
    rows += [run_row(h, s, [r * (1 + gains[i]) for r in dpo_reward(s)]) for h in HYBRIDS for i, s in enumerate(seeds)]
    return pd.DataFrame(rows)


def claim(table, name, **inputs):
    rows = P.claims(table, expected=EXPECTED, **inputs)
    return rows[rows["claim"].str.startswith(name)].iloc[0]


def test_a_hybrid_ten_percent_above_dpo_give_or_take_one_is_reproduced():
    row = claim(hybrid_table([0.09, 0.11, 0.095, 0.105, 0.10]), "a.")
    assert row["verdict"] == "reproduced"
    assert row["estimate"] == pytest.approx(0.10, abs=0.003) and 0 < row["low"] < row["estimate"] < row["high"] < 0.12
    assert row["runs_done"] == row["runs_needed"] == 25


def test_a_hybrid_level_with_dpo_give_or_take_one_percent_is_not_reproduced():
    row = claim(hybrid_table([-0.01, 0.01, -0.005, 0.005, 0.0]), "a.")
    assert row["verdict"] == "not reproduced"
    assert row["low"] < 0 < row["high"] < 0.092


def test_a_wide_interval_holding_zero_and_the_papers_gain_is_not_testable():
    row = claim(hybrid_table([-0.3, 0.4, -0.2, 0.3, 0.05]), "a.")
    assert row["verdict"] == "not testable at this scale" and row["low"] < 0 and row["high"] > 0.092


def test_a_variant_missing_a_seed_makes_the_claim_pending_with_its_count_and_no_result():
    table = hybrid_table([0.09, 0.11, 0.095, 0.105, 0.10])
    table = table[~((table["variant"] == "spectral+kl") & (table["seed"] == 5))]
    row = claim(table, "a.")
    assert row["verdict"] == "pending: 24 of 25 runs done"
    assert "spectral+kl (4 of 5 seeds)" in row["reason"] and "provisional" in row["reason"]
    assert row["verdict"] not in P.VERDICTS


def test_an_empty_table_leaves_every_sweep_claim_pending_and_the_missing_htsr_summary_too():
    rows = P.claims(pd.DataFrame(columns=["variant", "seed", "split", "step"]), expected=EXPECTED)
    assert rows["verdict"].str.startswith("pending: 0 of").all()


def test_runs_outside_the_configured_seeds_do_not_count():
    table = hybrid_table([0.1] * 6, seeds=(0, *SEEDS))  # seed 0 is the learning-rate seed, not compared
    assert set(P.final_table(table, EXPECTED)["seed"]) == set(SEEDS)


def test_c_hmk_ahead_of_the_best_hybrid_on_every_seed_at_three_and_a_half_times_the_cost_reproduces_both():
    rows = [run_row("dpo", s, dpo_reward(s), step_s=0.10) for s in SEEDS]
    rows += [run_row(h, s, [r + 0.01 * i for r in dpo_reward(s)]) for i, h in enumerate(HYBRIDS) for s in SEEDS]
    rows += [run_row("hmk", s, [r + 0.05 + 0.002 * s for r in dpo_reward(s)], step_s=0.35 + 0.001 * s) for s in SEEDS]
    rows = P.claims(pd.DataFrame(rows), expected=EXPECTED).set_index("claim")
    best, cost = rows.loc["c. HMK is the best loss"], rows.loc["c. HMK costs 3-4x"]
    assert best["verdict"] == "reproduced" and "mahalanobis+kl" in best["ours"]  # the best of the four, +0.03
    assert best["estimate"] == pytest.approx(0.05 + 0.006 - 0.03)
    assert cost["verdict"] == "reproduced" and cost["estimate"] == pytest.approx(3.53, abs=0.01)


def test_c_hmk_at_the_cost_of_dpo_does_not_reproduce_three_to_four_times():
    rows = [run_row(v, s, dpo_reward(s), step_s=0.1 + 0.001 * s) for v in ("dpo", "hmk") for s in SEEDS]
    assert claim(pd.DataFrame(rows), "c. HMK costs")["verdict"] == "not reproduced"


@pytest.mark.parametrize("low, high, verdict", [(0.05, 0.2, "reproduced"), (-0.3, 0.25, "not reproduced"),
                                                (-0.2, 0.6, "not testable at this scale"), (math.nan, math.nan, "not testable at this scale")])
def test_correlation_rule_reads_the_interval_against_zero_and_a_useful_size(low, high, verdict):
    assert P.rule_correlation(low, high)[0] == verdict


@pytest.mark.parametrize("low, high, verdict", [(2.5, 3.1, "reproduced"), (3.9, 5.0, "reproduced"),
                                                (0.9, 1.2, "not reproduced"), (4.2, 4.8, "not reproduced")])
def test_cost_rule_reads_the_interval_against_three_to_four(low, high, verdict):
    assert P.rule_cost(low, high)[0] == verdict


def htsr(rows):
    return pd.DataFrame(rows, columns=["run", "n_reliable", "mean_alpha", "frac 2-6", "gen_gap"])


def test_d_a_run_in_the_band_that_over_fits_refutes_the_band_reading():
    summary = htsr([("dpo", 12, 4.3, 0.85, 0.01), ("overtrained", 12, 3.7, 1.0, 0.23)])
    assert claim(pd.DataFrame(), "d.", htsr=summary)["verdict"] == "not reproduced"


def test_d_over_fit_runs_out_of_the_band_and_healthy_runs_in_it_support_the_band_reading():
    summary = htsr([("dpo", 12, 4.3, 0.85, 0.01), ("overtrained", 12, 1.7, 0.2, 0.23)])
    assert claim(pd.DataFrame(), "d.", htsr=summary)["verdict"] == "reproduced"


def test_d_without_an_over_fit_run_the_band_is_never_tested_and_without_a_summary_it_is_pending():
    summary = htsr([("dpo", 12, 4.3, 0.85, 0.01), ("unreliable", 0, math.nan, math.nan, 0.3)])
    assert claim(pd.DataFrame(), "d.", htsr=summary)["verdict"] == "not testable at this scale"
    assert claim(pd.DataFrame(), "d.")["verdict"].startswith("pending")


# ---------------------------------------------------------------- the selection, validated on the sweep

def pair_sweep(seeds=(1, 2, 3)):
    """DPO and all 28 pairs; pair i (in selection.PAIRS order) earns DPO's reward + 0.01 i on every seed;
    the scores rank the pairs exactly by i; the recalled rule picks pair 3 in every group."""
    rows = [run_row("dpo", s, dpo_reward(s)) for s in seeds]
    rows += [run_row(f"{k}+{d}", s, [r + 0.01 * i for r in dpo_reward(s)]) for i, (k, d) in enumerate(selection.PAIRS) for s in seeds]
    scores = pd.DataFrame([{"group": g, "kernel": k, "divergence": d, "score": i / 100}
                           for g in ("all", *FAMILIES) for i, (k, d) in enumerate(selection.PAIRS)])
    k3, d3 = selection.PAIRS[3]
    rules = pd.DataFrame([{"group": g, "kernel": k3, "divergence": d3} for g in ("all", *FAMILIES)])
    return pd.DataFrame(rows), P.SelectionTables(scores, rules)


def test_scores_that_rank_the_pairs_perfectly_have_spearman_one_and_no_regret():
    table, tables = pair_sweep()
    check = P.selection_check(P.final_table(table, P.Expected((1, 2, 3))), tables)
    assert list(check.correlations["group"]) == ["all", *FAMILIES]
    assert np.allclose(check.correlations["spearman"], 1.0) and (check.correlations["regret"] == 0).all()
    assert (check.correlations["n"] == 28).all() and (check.correlations["recommended"] == check.correlations["best"]).all()


def test_the_three_pickers_gain_over_dpo_what_their_pairs_earn_on_each_seed():
    table, tables = pair_sweep()
    pickers = P.selection_check(P.final_table(table, P.Expected((1, 2, 3))), tables).pickers.set_index(["group", "picker"])
    assert pickers.loc[("all", "our score"), "mean"] == pytest.approx(0.27)             # the top pair, i = 27
    assert pickers.loc[("all", "rule of thumb (recalled)"), "mean"] == pytest.approx(0.03)
    assert pickers.loc[("all", "random pair"), "mean"] == pytest.approx(0.01 * np.mean(range(28)))
    assert (pickers["n_seeds"] == 3).all()


def test_e_a_perfect_score_reproduces_the_selection_claim():
    table, tables = pair_sweep()
    row = P.claims(table, selection=tables, expected=P.Expected((1, 2, 3))).set_index("claim").loc["e. selection metrics pick well"]
    assert row["verdict"] == "reproduced" and row["estimate"] == pytest.approx(1.0)


def test_b_a_recalled_pick_far_below_the_best_pair_in_a_family_is_not_reproduced():
    table, tables = pair_sweep()  # the recalled pick (pair 3) trails the best (pair 27) by 0.24 on every seed
    row = claim(table, "b.", selection=tables)
    assert row["verdict"].startswith("pending")  # 3 seeds of the configured 5
    row = P.claims(table, selection=tables, expected=P.Expected((1, 2, 3))).set_index("claim").loc["b. best pair per task family"]
    assert row["verdict"] == "not reproduced" and "mahalanobis+alpha" in row["ours"]


def test_b_a_recalled_pick_that_is_the_best_pair_in_every_family_is_reproduced():
    table, tables = pair_sweep()
    k, d = selection.PAIRS[27]
    tables.rules[["kernel", "divergence"]] = [k, d]
    row = P.claims(table, selection=tables, expected=P.Expected((1, 2, 3))).set_index("claim").loc["b. best pair per task family"]
    assert row["verdict"] == "reproduced"


# ---------------------------------------------------------------- the sweep's progress and costs

def test_progress_counts_learning_rate_runs_finished_on_the_lr_seed_and_seed_runs_evaluated_on_test():
    expected = P.Expected(seeds=(1, 2), variants=("dpo", "hmk"), learning_rates=(1e-4, 5e-5), lr_seed=0)
    val = lambda v, lr, step, r: {"variant": v, "learning_rate": lr, "seed": 0, "split": "validation", "step": step, "reward/policy": r}
    table = pd.DataFrame([val("dpo", 1e-4, 150, 0.4), val("dpo", 5e-5, 150, 0.5), val("hmk", 1e-4, 150, 0.3),
                          val("hmk", 5e-5, 50, 0.2),  # still training: not finished
                          run_row("dpo", 1, dpo_reward(1)), run_row("dpo", 2, dpo_reward(2))])
    progress = P.sweep_progress(table, expected).set_index("phase")
    assert list(progress["runs_done"]) == [3, 2] and list(progress["runs_planned"]) == [4, 4]
    rates = P.chosen_rates(table, expected)  # only dpo's grid has finished; its best rate is 5e-5
    assert list(rates.loc[rates["chosen"], "variant"]) == ["dpo"] and rates.loc[rates["chosen"], "learning_rate"].item() == 5e-5


def test_a_grid_widened_past_its_edge_chooses_from_the_wider_grid_and_drops_test_runs_at_the_old_rate():
    expected = P.Expected(seeds=(1,), variants=("dpo",), learning_rates=(5e-5, 1e-4), lr_seed=0, extend_grid=1)
    val = lambda lr, r: {"variant": "dpo", "learning_rate": lr, "seed": 0, "split": "validation", "step": 150, "reward/policy": r}
    old = {**run_row("dpo", 1, dpo_reward(1)), "learning_rate": 5e-5}  # ran while 5e-5, the low edge, was best
    table = pd.DataFrame([val(5e-5, 0.5), val(1e-4, 0.4), old])
    assert P.sweep_progress(table, expected)["runs_planned"].iloc[0] == 3  # 2.5e-5 is due
    assert not len(P.chosen_rates(table, expected)) and not len(P.final_table(table, expected))
    new = {**run_row("dpo", 1, dpo_reward(1)), "learning_rate": 2.5e-5}
    table = pd.concat([table, pd.DataFrame([val(2.5e-5, 0.6), new])])
    rates = P.chosen_rates(table, expected)
    assert rates.loc[rates["chosen"], "learning_rate"].item() == 2.5e-5
    assert list(P.final_table(table, expected)["learning_rate"]) == [2.5e-5]


def test_with_select_generate_a_rate_is_chosen_only_once_its_run_was_scored_on_that_many_prompts():
    expected = P.Expected(seeds=(1,), variants=("dpo",), learning_rates=(5e-5, 1e-4), lr_seed=0, select_generate=1000)
    val = lambda lr, r, n: {"variant": "dpo", "learning_rate": lr, "seed": 0, "split": "validation", "step": 150,
                            "reward/policy": r, "n_generated": n}
    table = pd.DataFrame([val(5e-5, 0.30, 1000), val(1e-4, 0.40, 96)])  # 1e-4 not yet scored on the whole split
    assert not len(P.chosen_rates(table, expected))
    rates = P.chosen_rates(pd.DataFrame([val(5e-5, 0.30, 1000), val(1e-4, 0.28, 1000)]), expected)
    assert rates.loc[rates["chosen"], "learning_rate"].item() == 5e-5


def test_costs_from_jobs_reads_the_seed_runs_cpu_seconds_and_skips_references_grid_runs_and_failures():
    jobs = pd.DataFrame([{"job": "sft/s1", "cpu_s": 150.0, "error": None},
                         {"job": "hmk/lr5e-05_s0", "cpu_s": 90.0, "error": None},
                         {"job": "hmk/lr5e-05_s1/test", "cpu_s": 120.0, "error": None},
                         {"job": "rbf+kl/lr0.0001_s2/test", "cpu_s": 100.0, "error": None},
                         {"job": "dpo/lr5e-05_s1/test", "cpu_s": 80.0, "error": "exit status 1"}])
    costs = P.costs_from_jobs(jobs)
    assert costs.to_dict("records") == [{"variant": "hmk", "seed": 1, "seconds": 120.0},
                                        {"variant": "rbf+kl", "seed": 2, "seconds": 100.0}]
