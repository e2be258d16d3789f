"""Facts about the sweep: its statistics on tables whose answer is known, and its driver on the fast sweep."""
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kdpo_lab import cli, sweep, sweep_stats
from kdpo_lab.sweep import SweepConfig

FAMILIES = ("safety", "reasoning")


def runs_table(rewards, kls=None, split="test", lr=1e-4):
    """A sweep table from {variant: [[reward per family] per seed]}; overall reward = mean of families."""
    rows = []
    for variant, by_seed in rewards.items():
        kernel, _, divergence = variant.partition("+") if "+" in variant else ("none", "", "kl")
        for seed, fam in enumerate(by_seed):
            row = {"variant": variant, "kernel": kernel, "divergence": divergence, "loss_type": "sigmoid",
                   "learning_rate": lr, "seed": seed, "split": split, "step": 10, "reward/policy": float(np.mean(fam)),
                   "reward/reference": 0.2, "kl": (kls or {}).get(variant, 1.0)}
            row.update({f"reward/policy/{f}": r for f, r in zip(FAMILIES, fam)})
            row.update({f"reward/reference/{f}": 0.2 for f in FAMILIES})
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- intervals

def test_t_interval_is_the_textbook_interval():
    mean, lo, hi = sweep_stats.t_interval([1, 2, 3, 4, 5])
    half = stats.t.ppf(0.975, 4) * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3 and lo == pytest.approx(3 - half) and hi == pytest.approx(3 + half)
    assert math.isnan(sweep_stats.t_interval([1.0])[1])


def test_jackknife_interval_of_a_mean_is_the_t_interval():
    x = np.array([0.3, -0.1, 0.7, 0.2, 0.05])
    assert sweep_stats.jackknife_interval(lambda keep: x[keep].mean(), len(x)) == pytest.approx(sweep_stats.t_interval(x))


# ----------------------------------------------------------------------------- paired comparisons

def test_pairing_by_seed_removes_what_a_seed_shares():
    # seeds differ by a lot (0.1 .. 0.9); the variant is exactly 0.05 better on every seed
    base = [[s, s] for s in (0.1, 0.5, 0.9, 0.3, 0.7)]
    table = runs_table({"dpo": base, "rbf+kl": [[r + 0.05, r + 0.05] for r, _ in base]})
    row = sweep_stats.paired_differences(table).iloc[0]
    assert row["difference"] == pytest.approx(0.05) and row["high"] - row["low"] == pytest.approx(0, abs=1e-9)
    assert row["n_seeds"] == 5


def test_a_paired_difference_uses_only_the_seeds_both_variants_have():
    table = runs_table({"dpo": [[0.2, 0.2]] * 3, "ipo": [[0.3, 0.3]] * 2})
    assert sweep_stats.paired_differences(table).iloc[0]["n_seeds"] == 2


def test_frontier_area_integrates_the_best_reward_reached_so_far():
    points = [(0.0, 0.5), (1.0, 0.6), (1.5, 0.4), (2.0, 0.7)]  # (1.5, 0.4) is dominated
    assert sweep_stats.frontier_area(points, 2.0) == pytest.approx(0.5 * 1 + 0.6 * 1)
    assert sweep_stats.frontier_area(points, 1.5) == pytest.approx(0.5 * 1 + 0.6 * 0.5)
    with pytest.raises(ValueError, match="kl = 0"):
        sweep_stats.frontier_area([(1.0, 0.6)], 1.0)


def evals_table(curves):
    """Validation rows from {variant: [(kl, reward) per step]}, the same curve on seeds 0..2."""
    rows = [{"variant": v, "seed": s, "split": "validation", "step": 10 * (i + 1), "kl": kl, "reward/policy": r,
             "reward/reference": 0.2} for v, curve in curves.items() for s in range(3) for i, (kl, r) in enumerate(curve)]
    return pd.DataFrame(rows)


def test_a_variant_that_needs_twice_the_kl_for_the_same_reward_is_behind_on_the_frontier():
    table = evals_table({"dpo": [(1.0, 0.4), (2.0, 0.6)], "js+kl": [(2.0, 0.4), (4.0, 0.6)]})
    gap = sweep_stats.frontier_gap(table, "js+kl")
    # on [0, 2]: dpo is 0.2 then 0.4 from kl 1 and 0.6 at 2; js is 0.2 until kl 2
    assert gap["gap"] == pytest.approx(-(0.2 * 1) / 2) and gap["kl_range"] == 2.0
    assert sweep_stats.frontier_gap(table, "dpo", baseline="js+kl")["gap"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- the paper's claim

def test_relative_gain_of_a_variant_ten_percent_better_in_every_family_is_ten_percent():
    base = [[0.4, 0.2], [0.5, 0.3], [0.45, 0.25]]
    table = runs_table({"dpo": base, "rbf+kl": [[1.1 * a, 1.1 * b] for a, b in base]})
    gain = sweep_stats.relative_gain(table, ["rbf+kl"])
    assert gain["gain"] == pytest.approx(0.1) and gain["low"] == pytest.approx(0.1) and gain["high"] == pytest.approx(0.1)
    assert gain["gain/safety"] == pytest.approx(0.1) and gain["n_seeds"] == 3


def test_relative_gain_averages_families_not_pooled_rewards():
    # +50% in a low-reward family and 0% in a high one average to +25% (pooled reward would say ~+4%)
    table = runs_table({"dpo": [[0.9, 0.1]] * 3, "rbf+kl": [[0.9, 0.15]] * 3})
    assert sweep_stats.relative_gain(table, ["rbf+kl"])["gain"] == pytest.approx(0.25)


def test_variants_that_share_no_seed_have_no_gain_and_say_why():
    table = runs_table({"dpo": [[0.4, 0.2]], "rbf+kl": [[0.5, 0.3]] * 2})
    table = table[~((table["variant"] == "rbf+kl") & (table["seed"] == table["seed"].min()))]
    with pytest.raises(ValueError, match="no seed has runs of all"):
        sweep_stats.relative_gain(table, ["rbf+kl"])


def test_pair_results_without_pair_runs_is_an_empty_table_with_its_columns():
    table = runs_table({"dpo": [[0.4, 0.2]] * 2})
    assert list(sweep_stats.pair_results(table).columns)[:3] == ["kernel", "divergence", "family"]


def test_a_family_where_dpo_scores_zero_is_left_out_of_the_gain_and_named():
    table = runs_table({"dpo": [[0.4, 0.0]] * 3, "rbf+kl": [[0.5, 0.1]] * 3})
    gain = sweep_stats.relative_gain(table, ["rbf+kl"])
    assert gain["gain"] == pytest.approx(0.25) and gain["families_left_out"] == "reasoning"
    assert math.isnan(gain["gain/reasoning"])


def test_verdict_reads_the_interval_against_zero_and_the_papers_gain():
    assert sweep_stats.verdict(0.01, 0.05)[0] == "reproduced"
    assert sweep_stats.verdict(-0.05, 0.03)[0] == "not reproduced"
    assert sweep_stats.verdict(-0.05, 0.20)[0] == "not testable"
    assert sweep_stats.verdict(math.nan, math.nan)[0] == "not testable"


def test_hybrid_gains_gives_each_kernel_and_all_kernels_together():
    base = [[0.4, 0.2], [0.5, 0.3]]
    table = runs_table({"dpo": base, "rbf+kl": [[1.2 * a, 1.2 * b] for a, b in base],
                        "polynomial+kl": [[a, b] for a, b in base], "rbf+js": [[2 * a, 2 * b] for a, b in base]})
    gains = sweep_stats.hybrid_gains(table, ("polynomial", "rbf", "spectral")).set_index("variants")
    assert list(gains.index) == ["polynomial+kl", "rbf+kl", "polynomial+kl+rbf+kl"]
    assert gains.loc["polynomial+kl+rbf+kl", "gain"] == pytest.approx(0.1)
    assert gains.loc["rbf+kl", "verdict"] == "reproduced" and gains.loc["polynomial+kl", "verdict"] == "not reproduced"


def test_pair_results_give_one_number_per_pair_and_family():
    base = [[0.4, 0.2], [0.5, 0.3]]
    table = runs_table({"dpo": base, "rbf+kl": [[a + 0.1, b] for a, b in base], "rbf+js": base})
    pairs = sweep_stats.pair_results(table).set_index(["kernel", "divergence", "family"])
    assert len(pairs) == 2 * 3
    assert pairs.loc[("rbf", "kl", "safety"), "vs_baseline"] == pytest.approx(0.1)
    assert pairs.loc[("rbf", "kl", "reasoning"), "value"] == pytest.approx(0.25)
    assert pairs.loc[("rbf", "kl", "all"), "vs_baseline"] == pytest.approx(0.05)


def test_the_learning_rate_is_chosen_at_the_last_validation_step_and_ties_go_to_the_smaller_rate():
    rows = []
    for lr, curve in ((1e-4, [0.9, 0.3]), (3e-4, [0.1, 0.5]), (1e-3, [0.1, 0.5])):  # 1e-4 peaks early, then falls
        rows += [{"variant": "dpo", "learning_rate": lr, "seed": 0, "split": "validation", "step": s, "reward/policy": r}
                 for s, r in zip((5, 10), curve)]
    rows.append({"variant": "dpo", "learning_rate": 1e-4, "seed": 1, "split": "validation", "step": 10, "reward/policy": 1.0})
    rates = sweep_stats.choose_learning_rates(pd.DataFrame(rows), seed=0)
    assert rates.loc[rates["chosen"], "learning_rate"].tolist() == [3e-4]


# ----------------------------------------------------------------------------- the driver

def fast_config(tmp_path, **kw):
    return SweepConfig.from_yaml("configs/sweep_fast.yaml", out=str(tmp_path / "sweep"), processes=0, **kw)


def test_the_sweep_runs_the_headline_comparison_first_so_a_partial_sweep_answers_it():
    names = list(sweep.variants(SweepConfig()))
    assert names[:6] == ["dpo", "polynomial+kl", "rbf+kl", "spectral+kl", "mahalanobis+kl", "hmk"]
    assert list(sweep.variants(SweepConfig(variants=["rbf+js", "rbf+kl"]))) == ["dpo", "rbf+kl", "rbf+js"]


def test_variants_cover_the_28_pairs_hmk_and_the_four_baselines_with_dpo_first():
    names = list(sweep.variants(SweepConfig()))
    assert names[0] == "dpo" and len(names) == 28 + 1 + 4 and "hmk" in names and "rdpo" in names
    assert sweep.variants(SweepConfig(variants=["rbf+js"]))["rbf+js"] == {"kernel": "rbf", "gamma": 0.5, "divergence": "js"}
    with pytest.raises(ValueError, match="unknown 'rbf\\+kll'"):
        sweep.variants(SweepConfig(variants=["rbf+kll"]))


def test_a_sweep_config_with_an_unknown_field_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("seeds: [1]\ntrain: {max_step: 3}\n")
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['max_step'\\]"):
        SweepConfig.from_yaml(tmp_path / "bad.yaml")


def test_before_the_references_exist_only_the_references_are_listed(tmp_path, capsys):
    assert sweep.main(["configs/sweep_fast.yaml", "--list", "--out", str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["kdpo", "sft"]] * 2
    assert "--seed 1" in lines[1] and f"--output-dir {tmp_path}/sweep/sft/s1" in lines[1]


def test_with_a_shared_reference_every_seed_starts_from_the_lr_seeds_reference(tmp_path, capsys):
    cfg = fast_config(tmp_path, shared_reference=True)
    jobs, _, _ = sweep.plan(cfg)
    assert [j.name for j in jobs] == ["sft/s0"] and sweep.reference_folder(cfg, 1) == sweep.reference_folder(cfg, 0)


@pytest.fixture(scope="module")
def fast_sweep(tmp_path_factory):
    """The fast sweep, run once, in this process (processes: 0) through the same commands."""
    cfg = fast_config(tmp_path_factory.mktemp("fast"))
    assert sweep.execute(cfg, in_process=cli.main) == []
    return cfg


def test_the_fast_sweep_runs_every_variant_on_every_seed_and_evaluates_on_test(fast_sweep):
    table = pd.read_csv(f"{fast_sweep.out}/table.csv")
    test = table[table["split"] == "test"]
    assert set(test["variant"]) == {"dpo", "ipo", "rbf+kl", "polynomial+js"}
    assert sorted(test.groupby("variant")["seed"].apply(sorted).iloc[0]) == [0, 1]
    grids = table[table["seed"] == 0].groupby("variant")["learning_rate"].apply(lambda r: sorted(set(r)))
    # two rates: the best is always an edge, so each grid gained one rate a factor 2 beyond it (extend_grid: 1)
    assert all(g in ([5e-5, 1e-4, 1e-3], [1e-4, 1e-3, 2e-3]) for g in grids)
    assert set(table[table["split"] == "validation"]["step"]) == {2, 4}
    last = table[(table["split"] == "validation") & (table["step"] == 4)].set_index("run")["n_generated"]
    lr_runs = [r for r in last.index if r.endswith("_s0")]  # the rate is chosen on select_generate prompts, not eval_generate
    assert (last[lr_runs] == 16).all() and (last.drop(lr_runs) == 8).all()
    assert (table["time/step_s"] > 0).all()  # every row carries its run's cost
    total, done = sweep.count_jobs(fast_sweep)
    assert len(pd.read_json(f"{fast_sweep.out}/jobs.jsonl", lines=True)) == total == done == 2 + 4 * (3 + 2)


def test_a_finished_sweep_plans_nothing_and_writes_its_summary(fast_sweep):
    jobs, waiting, chosen = sweep.plan(fast_sweep)
    assert jobs == [] and waiting == 0 and set(chosen) == {"dpo", "ipo", "rbf+kl", "polynomial+js"}
    result = sweep.summarise(fast_sweep, sweep.collect(fast_sweep.out))
    assert set(result) == {"learning_rates", "paired", "frontier", "gains", "pairs"}
    assert set(result["paired"]["n_seeds"]) == {2}


def test_a_half_finished_run_is_resumed_and_a_missing_test_evaluation_redone(fast_sweep, tmp_path):
    cfg = fast_config(tmp_path)
    shutil.copytree(fast_sweep.out, cfg.out)
    _, _, chosen = sweep.plan(cfg)
    run = sweep.train_job(cfg, "ipo", chosen["ipo"], 1, test=True).folder
    shutil.rmtree(run / "model")
    (run / "eval_test.json").unlink()
    jobs, _, _ = sweep.plan(cfg)
    assert [j.name for j in jobs] == [f"ipo/lr{chosen['ipo']:g}_s1/test"]
    train, evaluate = jobs[0].commands
    assert train[0] == "train" and train[train.index("--resume") + 1] == "true"
    assert evaluate == ["eval", str(run), "--split", "test", "--n-generate", "16"]


def test_a_run_folder_made_with_other_settings_is_refused(fast_sweep, tmp_path):
    cfg = fast_config(tmp_path)
    shutil.copytree(fast_sweep.out, cfg.out)
    cfg.train = {**cfg.train, "max_steps": 5}
    with pytest.raises(ValueError, match="max_steps: 4 != 5"):
        sweep.plan(cfg)


def test_the_table_is_the_same_however_the_runs_were_run(fast_sweep, tmp_path):
    # a copy of the run folders alone (as a cluster would leave them) gives the same table
    shutil.copytree(f"{fast_sweep.out}/runs", tmp_path / "elsewhere" / "runs")
    pd.testing.assert_frame_equal(sweep.collect(tmp_path / "elsewhere"), sweep.collect(fast_sweep.out))


def test_the_full_sweep_config_follows_the_protocol():
    cfg = SweepConfig.from_yaml("configs/sweep.yaml")
    assert len(sweep.variants(cfg)) == 33 and len(cfg.learning_rates) == 3 and cfg.extend_grid == 2  # an edge best is bracketed
    assert len(cfg.seeds) >= 5 and cfg.lr_seed not in cfg.seeds  # the rate's validation luck stays out
    assert cfg.test_generate == 1000  # kdpo eval reads at least n_generate test pairs (runs._pairs)
    assert sweep.count_jobs(SweepConfig.from_yaml("configs/sweep.yaml", out="/nonexistent"))[0] == 6 + 33 * 8


def test_a_job_runs_as_a_one_thread_subprocess_and_a_failure_is_reported_not_raised(tmp_path):
    job = sweep.Job("bad", tmp_path / "runs" / "bad", [["generate-data", "--n-train", "many"]])
    _, _, cpu, error = sweep.run_job(job, processes=1)
    assert error.startswith("exit status 2") and cpu > 0
    log = (tmp_path / "runs" / "bad.log").read_text()
    assert log.startswith("$ kdpo generate-data --n-train many") and "invalid int value" in log


def test_every_subprocess_gets_one_thread(tmp_path, monkeypatch):
    seen = []

    class Proc:
        def __init__(self, args, env, **kw):
            seen.append((args, env))
            self.pid, self.returncode = 0, None
    monkeypatch.setattr(sweep.subprocess, "Popen", Proc)
    monkeypatch.setattr(sweep.os, "wait4", lambda pid, opt: (pid, 0, type("U", (), {"ru_utime": 1.0, "ru_stime": 0.5})))
    job = sweep.Job("two", tmp_path / "two", [["train", "a.yaml"], ["eval", "x"]])
    assert sweep.run_job(job, processes=2)[2:] == (3.0, None)
    assert [a[3:] for a, _ in seen] == [["train", "a.yaml"], ["eval", "x"]]
    assert all(env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1" for _, env in seen)


def test_jobs_start_in_the_plans_order_and_never_more_than_processes_at_once(tmp_path, monkeypatch):
    # the plan puts the headline comparison first, and a job that becomes runnable later (a seed run once its
    # learning rate is chosen) may outrank jobs already waiting: the driver re-plans before each start
    import threading
    import time as clock
    names = [f"job{i}" for i in range(7)]
    finished, started, running, peak, lock = set(), [], [0], [0], threading.Lock()

    def plan(cfg):
        order = (["urgent"] if finished else []) + names
        return [sweep.Job(n, tmp_path / n, [["x"]]) for n in order if n not in finished and n not in started], 0, {}

    def run_job(job, processes, in_process=None):
        with lock:
            started.append(job.name)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        clock.sleep(0.02)
        with lock:
            running[0] -= 1
            finished.add(job.name)
        return job, 0.02, 0.0, None
    monkeypatch.setattr(sweep, "plan", plan)
    monkeypatch.setattr(sweep, "run_job", run_job)
    monkeypatch.setattr(sweep, "count_jobs", lambda cfg: (len(names) + 1, 0))
    monkeypatch.setattr(sweep, "write_table", lambda out, table: None)
    assert sweep.execute(SweepConfig(out=str(tmp_path), processes=2)) == []
    assert started == ["job0", "job1", "urgent", *names[2:]] and peak[0] == 2


def lr_runs(rewards, variant="v", seed=0):
    """Validation rows of one variant's learning-rate runs: {lr: final reward}."""
    return pd.DataFrame([{"variant": variant, "learning_rate": lr, "seed": seed, "split": "validation", "step": 150,
                          "reward/policy": r} for lr, r in rewards.items()])


@pytest.mark.parametrize("rewards, grid", [
    ({1e-4: 0.1, 2e-4: 0.3, 4e-4: 0.2}, [1e-4, 2e-4, 4e-4]),                 # best inside: the grid stands
    ({1e-4: 0.3, 2e-4: 0.2, 4e-4: 0.1}, [5e-5, 1e-4, 2e-4, 4e-4]),           # best at the low edge: one rate below
    ({1e-4: 0.1, 2e-4: 0.2, 4e-4: 0.3}, [1e-4, 2e-4, 4e-4, 8e-4]),           # best at the high edge: one above
])
def test_a_grid_whose_best_rate_is_at_an_edge_is_widened_by_a_factor_of_two_on_that_side(rewards, grid):
    assert sweep_stats.learning_rate_grid(lr_runs(rewards), "v", [1e-4, 2e-4, 4e-4], extend=1) == (grid, grid == [1e-4, 2e-4, 4e-4])
    widened = {**rewards, **{lr: 0.0 for lr in grid if lr not in rewards}}  # the new rate ran, and lost
    assert sweep_stats.learning_rate_grid(lr_runs(widened), "v", [1e-4, 2e-4, 4e-4], extend=1) == (grid, True)


def test_a_grid_is_widened_at_most_extend_times_and_not_at_all_by_default():
    falling = {1e-4: 0.3, 2e-4: 0.2, 4e-4: 0.1, 5e-5: 0.4}  # the best keeps moving down
    assert sweep_stats.learning_rate_grid(lr_runs(falling), "v", [1e-4, 2e-4, 4e-4]) == ([1e-4, 2e-4, 4e-4], True)
    assert sweep_stats.learning_rate_grid(lr_runs(falling), "v", [1e-4, 2e-4, 4e-4], extend=1) == ([5e-5, 1e-4, 2e-4, 4e-4], True)
    assert sweep_stats.learning_rate_grid(lr_runs(falling), "v", [1e-4, 2e-4, 4e-4], extend=2) == ([2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4], False)
