"""The figures drawn from training runs (the README's quickstart, notebooks 05-09): runs made through the
sweep's run driver, figures drawn from their tables.

Each notebook's runs are its recipe (variants, learning rates, steps, seeds) written as `kdpo sft` /
`kdpo train` command lines, one `sweep.Job` per run, run by `sweep.run_job` when the run's folder has no
model/ yet: a second `kdpo figures` reuses every finished run. Full mode uses the notebooks' full sizes;
fast mode (CI) replaces the model and data sizes with those of configs/sweep_fast.yaml (a 1-layer model,
a handful of steps), so its figures are smoke tests of the same path, not results. The README's four
figures come from `kdpo quickstart` (--fast in fast mode), as the README says.

As in figures_math, `NAME_data(ctx)` returns {table: DataFrame} (the CSV) plus "_"-keys the drawing
needs ("_config" names what the runs were: the manifest's config column), and `NAME_draw(data)` returns
the matplotlib Figure. The notebooks call the draw functions: a plotting cell trains or reads its runs
and computes what its lesson teaches, then draws with
`figures_runs.NAME_draw(figures_runs.NAME_tables(...its variables...))`. `NAME_tables(...)` builds the
draw function's input from the notebook's variables in the notebook's own form (dicts of run tables
keyed by run name, the summary tables the cells compute); the data functions read the runs' folders,
build that form and call the same helpers, so each figure's table glue is written once. Data functions
that recompute a notebook cell's summary of its runs (a pick, an interval, a ratio) are marked
"mirrors notebook NN".
"""
import contextlib
import functools
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kdpo_lab import kernels, package_root, plots, selection, spectra_runs, sweep, sweep_stats
from kdpo_lab.sweep_table import write_table

SIZE_KEYS = ("d_model", "n_layers", "n_heads", "vocab_size", "max_steps", "warmup_steps", "max_train_pairs", "max_eval_pairs",
             "per_device_train_batch_size", "max_length", "max_prompt_length", "eval_generate")
"""The fields fast mode takes from configs/sweep_fast.yaml: sizes only, never the loss or the learning rate."""


def fast_sizes(command):
    """configs/sweep_fast.yaml's sizes for `kdpo sft` ("sft") or `kdpo train` ("train") runs."""
    cfg = sweep.SweepConfig.from_yaml(package_root() / "configs" / "sweep_fast.yaml")
    return {k: v for k, v in getattr(cfg, command).items() if k in SIZE_KEYS}


def _value(v):
    return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


def kdpo_argv(command, fields):
    """`kdpo COMMAND --field value ...` as argv (no YAML file: every field on the line)."""
    argv = [command]
    for k, v in fields.items():
        argv += [f"--{k.replace('_', '-')}", _value(v)]
    return argv


def run_job_of(ctx, command, folder, fields):
    """A sweep.Job training one run into `folder` (nothing to do when its model/ exists). In fast mode the
    sizes of configs/sweep_fast.yaml replace the recipe's, every step is logged, and train runs evaluate
    every 2 steps if the recipe evaluates along the way, and save only at the end."""
    fields = {"data": str(package_root() / "data" / "suite"), **fields, "output_dir": str(folder), "progress": False}
    if ctx.fast:
        evaluates = fields.get("eval_steps", 0) > 0
        fields.update(fast_sizes(command), logging_steps=1)
        if command == "train":
            fields.update(eval_steps=2 if evaluates else 0, save_steps=fields["max_steps"])
    folder = Path(folder)
    return sweep.Job(f"{folder.parent.name}/{folder.name}", folder, [] if (folder / "model").exists() else [kdpo_argv(command, fields)])


def ensure(ctx, jobs, done="model"):
    """Run the jobs whose result (`done` in their folder) is missing through sweep.run_job, ctx.processes
    at a time (the jobs of one call must not depend on each other; 0: one by one in this process);
    RuntimeError naming the run and its log if one fails. Returns the jobs' folders."""
    todo = [job for job in jobs if job.commands and not (job.folder / done).exists()]
    run = functools.partial(sweep.run_job, processes=ctx.processes, in_process=ctx.kdpo)
    if ctx.processes > 1 and len(todo) > 1:
        with ThreadPoolExecutor(ctx.processes) as pool:
            results = list(pool.map(run, todo))
    else:
        results = [run(job) for job in todo]
    for job, _, _, error in results:
        if error or not (job.folder / done).exists():
            raise RuntimeError(f"run {job.name} failed: {error or 'no ' + done}; see {job.folder.parent / job.folder.name}.log")
    return [job.folder for job in jobs]


def _runs_dir(ctx, name):
    return Path(ctx.runs) / ctx.mode / name


def _read(path):
    return pd.read_json(path, lines=True) if Path(path).exists() else pd.DataFrame()


def _scalars(df):
    """A run table without its columns of lists or dicts (eval.jsonl's samples, 'unavailable' notes)."""
    nested = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (dict, list))).any()]
    return df.drop(columns=nested)


def _long(frames, key="run"):
    """{name: DataFrame} as one table with a `key` column first; `_split` undoes it."""
    return pd.concat([_scalars(df).assign(**{key: name}) for name, df in frames.items()])[
        lambda t: [key] + [c for c in t.columns if c != key]].reset_index(drop=True)


def _finals(evals, key):
    """The last evaluation of each run, one row per run named in column `key`."""
    return pd.DataFrame([{key: n, **_scalars(e).iloc[-1].drop("step", errors="ignore")} for n, e in evals.items()])


def _split(table, key="run"):
    return {name: t.drop(columns=key).reset_index(drop=True) for name, t in table.groupby(key, sort=False)}


def _mode_note(ctx, recipe):
    return f"{recipe} ({'configs/sweep_fast.yaml sizes' if ctx.fast else 'full sizes'})"


# ---- the README: `kdpo quickstart` ------------------------------------------------------------------

@functools.cache
def _quickstart(ctx):
    from kdpo_lab import quickstart
    out = _runs_dir(ctx, "quickstart")
    job = sweep.Job("quickstart", out, [["quickstart", "--out", str(out)] + (["--fast"] if ctx.fast else [])])
    ensure(ctx, [job], done="results.csv")
    runs = {name: out / quickstart._slug(name) for name in quickstart.VARIANTS}
    metrics = {name: _read(run / "metrics.jsonl") for name, run in runs.items()}
    evals = {name: _read(run / "eval.jsonl") for name, run in runs.items()}
    return metrics, evals, "kdpo quickstart" + (" --fast" if ctx.fast else "")


def qs_training_curves_data(ctx):
    metrics, _, config = _quickstart(ctx)
    return {"metrics": _long(metrics), "_config": config}


def qs_training_curves_draw(d):
    from kdpo_lab import quickstart  # imported here: it sets matplotlib's Agg backend, wrong in a notebook
    return quickstart.draw_training_curves(_split(d["metrics"]))


def qs_reward_vs_kl_data(ctx):
    _, evals, config = _quickstart(ctx)
    return {"evals": _long(evals), "_config": config}


def qs_reward_vs_kl_draw(d):
    from kdpo_lab import quickstart
    return quickstart.draw_reward_vs_kl(_split(d["evals"]))


def qs_winrate_data(ctx):
    _, evals, config = _quickstart(ctx)
    return {"final": _finals(evals, "variant"), "_config": config}


def qs_winrate_draw(d):
    from kdpo_lab import quickstart
    return quickstart.draw_winrate(d["final"].set_index("variant"))


# ---- notebook 05: one SFT reference, three aligned runs --------------------------------------------

VARIANTS_05 = {"DPO (KL)": dict(divergence="kl"), "hybrid RBF": dict(kernel="rbf", gamma=0.5), "JS link": dict(divergence="js")}


@functools.cache
def _nb05(ctx):
    """Notebook 05's runs (cells 6 and 13) as command lines, and their metrics and evaluations."""
    out, fast = _runs_dir(ctx, "nb05"), ctx.fast
    full = dict(max_train_pairs=0, max_eval_pairs=256, seed=ctx.seed)
    sft = run_job_of(ctx, "sft", out / "sft", dict(
        model="tiny-llama", d_model=128, n_layers=4, n_heads=4, vocab_size=1024, learning_rate=3e-3 if fast else 2e-3,
        per_device_train_batch_size=32, max_steps=400, warmup_steps=20, logging_steps=5, **full))
    ensure(ctx, [sft])
    jobs = {name: run_job_of(ctx, "train", out / name.split()[0].lower(), dict(
        model=str(out / "sft" / "model"), beta=0.1, learning_rate=1e-3 if fast else 1e-4, per_device_train_batch_size=16,
        max_steps=150, warmup_steps=10, logging_steps=5, eval_steps=25, eval_generate=96, save_steps=150, **full, **loss))
        for name, loss in VARIANTS_05.items()}
    runs = dict(zip(jobs, ensure(ctx, list(jobs.values()))))
    return {"sft": _read(out / "sft" / "metrics.jsonl"), "metrics": {n: _read(r / "metrics.jsonl") for n, r in runs.items()},
            "evals": {n: _read(r / "eval.jsonl") for n, r in runs.items()}, "config": _mode_note(ctx, "notebook 05's runs")}


def sft_loss_tables(sft_log):
    """sft_loss_draw's input: the SFT run's metrics.jsonl as read."""
    return {"sft_metrics": sft_log}


def sft_loss_data(ctx):
    s = _nb05(ctx)
    return {**sft_loss_tables(s["sft"]), "_config": s["config"]}


def sft_loss_draw(d):
    """Notebook 05's SFT loss and its last held-out loss."""
    log = d["sft_metrics"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    plots.plot_training_curves({"SFT": log}, keys=("loss",), axes=[ax])
    if "eval/loss" in log and log["eval/loss"].notna().any():
        held_out = log["eval/loss"].dropna().iloc[-1]
        ax.axhline(held_out, color="grey", ls="--", lw=1, label=f"held-out: {held_out:.2f}")
    ax.set(ylabel="nats per response token", title="SFT loss")
    ax.legend()
    return fig


def dpo_curves_tables(metrics):
    """dpo_curves_draw's input from the runs' metrics {run name: metrics.jsonl as read}: one long table."""
    return {"metrics": _long(metrics)}


def dpo_curves_data(ctx):
    s = _nb05(ctx)
    return {**dpo_curves_tables(s["metrics"]), "_config": s["config"]}


def dpo_curves_draw(d):
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.4))
    plots.plot_training_curves(_split(d["metrics"]), keys=("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen"), axes=axes)
    return fig


def eval_curves_tables(evals):
    """eval_curves_draw's input from the runs' evaluations {run name: eval.jsonl as read}: one long table."""
    return {"evals": _long(evals)}


def eval_curves_data(ctx):
    s = _nb05(ctx)
    return {**eval_curves_tables(s["evals"]), "_config": s["config"]}


def eval_curves_draw(d):
    evals = _split(d["evals"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.6))
    plots.plot_training_curves(evals, keys=("pref/accuracy", "kl"), axes=axes[:2])
    axes[0].set_title("held-out preference accuracy")
    axes[1].set_title(r"sampled KL$(\pi\,\|\,\pi_{ref})$")
    plots.plot_reward_vs_kl(evals, reference_reward=d["evals"]["reward/reference"].mean(), ax=axes[2])
    return fig


def by_family_tables(evals):
    """by_family_draw's input from the runs' evaluations {run name: eval.jsonl as read}: each run's last one."""
    return {"final": _finals(evals, "run")}


def by_family_data(ctx):
    s = _nb05(ctx)
    return {**by_family_tables(s["evals"]), "_config": s["config"]}


def by_family_draw(d):
    final = d["final"].set_index("run")
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.6))
    plots.plot_by_family(final, "winrate/", ax=axes[0])
    plots.plot_by_family(final, "pref/accuracy/", ax=axes[1], title="held-out preference accuracy")
    axes[1].axhline(0.5, color="grey", ls="--", lw=1)
    return fig


# ---- notebooks 06 and 07: a shared reference, pairs and kernels trained on it ----------------------

def _reference_0607(ctx):
    """The reference notebooks 06 and 07 share (their cell 'sft_cfg')."""
    out = _runs_dir(ctx, "reference_0607")
    job = run_job_of(ctx, "sft", out, dict(
        model="tiny-llama", d_model=128, n_layers=4, n_heads=4, vocab_size=1024, learning_rate=3e-3 if ctx.fast else 2e-3,
        per_device_train_batch_size=32, max_steps=400, warmup_steps=20, logging_steps=10, seed=ctx.seed, max_train_pairs=0,
        max_eval_pairs=256))
    ensure(ctx, [job])
    return out / "model"


def _common_0607(ctx):
    return dict(max_train_pairs=1024, max_eval_pairs=256, eval_steps=0)


def _short_run(ctx, folder, reference, seed, loss, steps=60, n_generate=128, log_every=6):
    """A run of notebooks 06/07's `train_one` / variant loop: lr 5e-5, evaluated once at the end."""
    return run_job_of(ctx, "train", folder, dict(
        model=str(reference), learning_rate=5e-5, max_steps=steps, warmup_steps=max(1, steps // 10), eval_generate=n_generate,
        save_steps=steps, logging_steps=max(1, steps // log_every), seed=seed, **_common_0607(ctx), **loss))


@functools.cache
def _nb06(ctx):
    """Notebook 06: the selection report on the reference, then plain DPO and the picked pairs on each seed."""
    from kdpo_lab import selection_report
    from kdpo_lab.config import TrainConfig
    reference, out = _reference_0607(ctx), _runs_dir(ctx, "nb06")
    seeds, n_random = ((0, 1), 2) if ctx.fast else ((0, 1, 2), 3)
    cfg = TrainConfig(model=str(reference), seed=ctx.seed, data=str(package_root() / "data" / "suite"), progress=False,
                      max_train_pairs=fast_sizes("train")["max_train_pairs"] if ctx.fast else 1024,
                      max_eval_pairs=64 if ctx.fast else 256)
    with contextlib.redirect_stdout(io.StringIO()):
        report = selection_report.select(cfg, out / "select", top=3)
    sel, rules = report.selection, report.rules
    ours, rule = sel.recommended["all"], (rules["all"]["kernel"], rules["all"]["divergence"])
    rng = np.random.default_rng(ctx.seed)
    others = [p for p in selection.PAIRS if p not in (ours, rule)]
    random_pairs = [others[i] for i in sorted(rng.choice(len(others), n_random, replace=False))]
    pairs = list(dict.fromkeys([ours, rule, *random_pairs]))
    jobs = {(pair, seed): _short_run(ctx, out / ("dpo" if pair is None else "_".join(pair)) / f"seed{seed}", reference, seed,
                                     {} if pair is None else dict(kernel=pair[0], gamma=0.5, divergence=pair[1]))
            for seed in seeds for pair in [None, *pairs]}
    ensure(ctx, list(jobs.values()))
    rows = []
    for (pair, seed), job in jobs.items():
        last = _read(job.folder / "eval.jsonl").iloc[-1]
        rows.append({"kernel": pair[0] if pair else None, "divergence": pair[1] if pair else "kl (plain DPO)", "seed": seed,
                     "reward": last["reward/policy"], "accuracy": last["pref/accuracy"], "kl": last["kl"]})
    return dict(sel=sel, rules=rules, ours=ours, rule=rule, random_pairs=random_pairs, results=pd.DataFrame(rows),
                config=_mode_note(ctx, "notebook 06's reference, selection and runs"))


def _grid_long(sel, rules, group):
    from kdpo_lab import selection_report
    grid = selection_report.score_grid(sel.tables[group])
    marks = selection_report.marks(sel, rules, group)
    table = grid.stack().rename("score").reset_index().assign(group=group)
    table["marks"] = [", ".join(m for m, cell in marks.items() if cell == (k, dv)) for k, dv in zip(table["kernel"], table["divergence"])]
    return table


def _grid_of(table):
    grid = table.pivot(index="kernel", columns="divergence", values="score")
    grid = grid.reindex(index=list(dict.fromkeys(table["kernel"])), columns=list(dict.fromkeys(table["divergence"])))
    marks = {}
    for _, row in table[table["marks"].fillna("") != ""].iterrows():
        for m in row["marks"].split(", "):
            marks[m] = (row["kernel"], row["divergence"])
    order = ["recommended (our score)", "rule of thumb (recalled)"]
    return grid, {m: marks[m] for m in sorted(marks, key=lambda m: order.index(m) if m in order else 9)}


def selection_heatmap_tables(sel, rules):
    """selection_heatmap_draw's input from notebook 06's selection (report.selection) and rules of thumb
    (report.rules): the whole suite's score grid, long, with the marked cells."""
    return {"scores": _grid_long(sel, rules, "all")}


def selection_heatmap_data(ctx):
    s = _nb06(ctx)
    return {**selection_heatmap_tables(s["sel"], s["rules"]), "_config": s["config"]}


def selection_heatmap_draw(d):
    grid, marks = _grid_of(d["scores"])
    return plots.plot_selection_heatmap(grid, marks=marks, title="selection score, whole suite (our metrics)").figure


def selection_by_family_tables(sel, rules):
    """selection_by_family_draw's input from notebook 06's selection and rules of thumb: every family's
    score grid, long, with the marked cells (column group: the family)."""
    return {"scores": pd.concat([_grid_long(sel, rules, g) for g in sel.tables if g != "all"])}


def selection_by_family_data(ctx):
    s = _nb06(ctx)
    return {**selection_by_family_tables(s["sel"], s["rules"]), "_config": s["config"]}


def selection_by_family_draw(d):
    groups = list(dict.fromkeys(d["scores"]["group"]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8.5, 3.1 * len(groups)))
    for ax, (family, table) in zip(np.atleast_1d(axes), d["scores"].groupby("group", sort=False)):
        grid, marks = _grid_of(table)
        plots.plot_selection_heatmap(grid, ax=ax, marks=marks, title=f"selection score, {family}")
    return fig


RUN_COLUMNS_06 = ["kernel", "divergence", "seed", "reward", "accuracy", "kl"]
"""The columns of notebook 06's `results` (one row per run) that pickers' table keeps."""


def pickers_tables(side_by_side, results):
    """pickers_draw's input from notebook 06's `side_by_side` (per picker: mean, low and high of its reward
    minus plain DPO's, and its pairs) and `results` (one row per run)."""
    pickers = side_by_side.rename_axis("picker").reset_index()
    pickers[["mean", "low", "high"]] = pickers[["mean", "low", "high"]].astype(float)
    return {"pickers": pickers, "runs": results[RUN_COLUMNS_06]}


def pickers_data(ctx):
    """mirrors notebook 06 cell 13: each picker's reward minus plain DPO's, paired by seed, with a t interval."""
    s = _nb06(ctx)
    results = s["results"]
    trained = results.dropna(subset=["kernel"])
    dpo = results[results.kernel.isna()].set_index("seed").reward

    def reward_of(picks):
        rows = trained[[(k, dv) in picks for k, dv in zip(trained.kernel, trained.divergence)]]
        return rows.groupby("seed").reward.mean()

    pickers = {"our score": [s["ours"]], "rule of thumb (recalled)": [s["rule"]],
               f"random pair (mean of {len(s['random_pairs'])})": s["random_pairs"]}
    rows = {}
    for name, picks in pickers.items():
        delta = (reward_of(picks) - dpo).to_numpy()
        half = sweep_stats.t_half_width(delta)
        rows[name] = {"mean": delta.mean(), "low": delta.mean() - half, "high": delta.mean() + half,
                      "pairs": ", ".join("+".join(p) for p in picks)}
    return {**pickers_tables(pd.DataFrame(rows).T, results), "_config": s["config"]}


def pickers_draw(d):
    n_seeds = d["runs"]["seed"].nunique()
    ax = plots.plot_intervals(d["pickers"].set_index("picker"), xlabel="held-out exact reward minus plain DPO's (same seed)",
                              title=f"three pickers against plain DPO ({n_seeds} seeds, 95% t-interval)")
    ax.figure.set_size_inches(8, 2.4)
    return ax.figure


GAMMA_07, ETA_07 = 0.5, 0.01
HMK_07, HMK0_07 = f"HMK eta={ETA_07}", "HMK eta=0"


@functools.cache
def _nb07(ctx):
    """Notebook 07's runs: plain DPO, the four single kernels and HMK with and without its entropy term, per seed."""
    reference, out = _reference_0607(ctx), _runs_dir(ctx, "nb07")
    variants = {"plain DPO": {}, **{name: dict(kernel=name, gamma=GAMMA_07) for name in kernels.PAPER_FOUR},
                HMK_07: dict(kernel="hmk", gamma=GAMMA_07, eta=ETA_07), HMK0_07: dict(kernel="hmk", gamma=GAMMA_07, eta=0.0)}
    jobs = {}
    for seed in (0, 1):
        for name in (list(variants) if seed % 2 == 0 else list(variants)[::-1]):
            folder = out / name.replace(" ", "_").replace("=", "") / f"seed{seed}"
            jobs[name, seed] = _short_run(ctx, folder, reference, seed, variants[name], log_every=20)
    ensure(ctx, list(jobs.values()))
    metrics, finals = {}, []
    for (name, seed), job in jobs.items():
        metrics[name, seed] = _read(job.folder / "metrics.jsonl")
        last = _read(job.folder / "eval.jsonl").iloc[-1]
        finals.append({"variant": name, "seed": seed, "accuracy": last["pref/accuracy"], "reward": last["reward/policy"],
                       "kl": last["kl"], "step_s": metrics[name, seed]["time/step_s"].median()})
    return dict(metrics=metrics, finals=pd.DataFrame(finals), config=_mode_note(ctx, "notebook 07's runs"))


def _entropy_07(df):
    """mirrors notebook 07 cell 6: H of the three softmax groups, per logged step."""
    groups = [["hmk/tau_L", "hmk/tau_G"], ["hmk/a_rbf", "hmk/a_poly"], ["hmk/a_spec", "hmk/a_maha"]]
    return sum(-(df[g] * np.log(df[g])).sum(axis=1) for g in groups)


def hmk_training_tables(metrics, seed, entropy=_entropy_07):
    """hmk_training_draw's input from notebook 07's `metrics` {(variant, seed): metrics.jsonl as read}: the
    two HMK runs of `seed`, each with its mixture entropy entropy(df) per logged step."""
    frames = {name: metrics[name, seed].assign(entropy=entropy(metrics[name, seed])) for name in (HMK_07, HMK0_07)}
    return {"metrics": _long(frames), "_seed": seed}


def hmk_training_data(ctx):
    s = _nb07(ctx)
    return {**hmk_training_tables(s["metrics"], ctx.seed), "_config": s["config"]}


def hmk_training_draw(d):
    runs = _split(d["metrics"])
    w = [f"hmk/w_{c}" for c in kernels.HMKKernel.COMPONENTS]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.6))
    for ax, (name, df) in zip(axes, runs.items()):
        plots.plot_hmk_weights(df.set_index("step").rename(columns=lambda c: c.removeprefix("hmk/")), ax=ax,
                               title=rf"HMK weights $w_c$, $\gamma$ = {GAMMA_07}, {name.split()[1]} (seed {d['_seed']})")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=4)
    first = next(iter(runs.values()))
    plots.plot_lines(first["step"], {name: df["entropy"] for name, df in runs.items()}, ax=axes[2],
                     xlabel="step", ylabel=r"$H$ (nats)", title=r"mixture entropy (max $3\log 2$ = 2.079)")
    axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    span = max(0.1, max(np.abs(df[w].to_numpy() - 0.25).max() for df in runs.values()) + 0.03)
    for ax in axes[:2]:
        ax.set_ylim(0.25 - span, 0.25 + span)
    return fig


FINAL_COLUMNS_07 = ["variant", "seed", "accuracy", "reward", "kl", "step_s"]
"""The columns of notebook 07's `finals` (one row per run) that hmk_vs_dpo's table keeps."""


def hmk_vs_dpo_tables(versus, finals):
    """hmk_vs_dpo_draw's input from notebook 07's `versus` (per variant, plain DPO first: "KEY - DPO" and
    "KEY - DPO, 95% half-width" for KEY accuracy and reward) and `finals` (one row per run): each
    variant's mean difference to plain DPO with its interval."""
    rows = []
    for name in versus.index.drop("plain DPO"):
        for key in ("accuracy", "reward"):
            mean, half = versus.loc[name, f"{key} - DPO"], versus.loc[name, f"{key} - DPO, 95% half-width"]
            rows.append({"variant": name, "metric": key, "mean": mean, "low": mean - half, "high": mean + half})
    return {"versus_dpo": pd.DataFrame(rows), "runs": finals[FINAL_COLUMNS_07]}


def hmk_vs_dpo_data(ctx):
    """mirrors notebook 07 cell 8: plain DPO, the best single kernel and HMK, each minus plain DPO by seed."""
    s = _nb07(ctx)
    finals = s["finals"]
    mean = finals.groupby("variant")[["accuracy", "reward"]].mean()
    best_single = mean.loc[list(kernels.PAPER_FOUR), "reward"].idxmax()
    dpo = finals[finals.variant == "plain DPO"].set_index("seed")
    rows = {}
    for name in ("plain DPO", best_single, HMK_07, HMK0_07):
        runs = finals[finals.variant == name].set_index("seed")
        row = {"accuracy": runs.accuracy.mean(), "reward": runs.reward.mean()}
        for key in ("accuracy", "reward"):
            delta = (runs[key] - dpo[key]).to_numpy()
            row.update({f"{key} - DPO": delta.mean(), f"{key} - DPO, 95% half-width": sweep_stats.t_half_width(delta)})
        rows[name if name != best_single else f"best single: {name}"] = row
    return {**hmk_vs_dpo_tables(pd.DataFrame(rows).T, finals), "_config": s["config"]}


def hmk_vs_dpo_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    n_seeds = d["runs"]["seed"].nunique()
    for ax, key in zip(axes, ("accuracy", "reward")):
        table = d["versus_dpo"][d["versus_dpo"]["metric"] == key].set_index("variant")[["mean", "low", "high"]]
        plots.plot_intervals(table, ax=ax, xlabel=f"held-out {'preference accuracy' if key == 'accuracy' else 'exact reward'} "
                                                  "minus plain DPO's (same seed)", title=f"{n_seeds} seeds, 95% t-interval")
    return fig


def step_cost_tables(cost):
    """step_cost_draw's input from notebook 07's `cost` (per variant: "median step time (s)" and "x plain
    DPO"), in the order plain DPO, the four single kernels, HMK, HMK with eta = 0."""
    return {"cost": cost.reindex(["plain DPO", *kernels.PAPER_FOUR, HMK_07, HMK0_07]).rename_axis("variant").reset_index()}


def step_cost_data(ctx):
    """mirrors notebook 07 cell 10: median step time per run, mean over seeds, over plain DPO's."""
    s = _nb07(ctx)
    cost = s["finals"].groupby("variant")["step_s"].mean().rename("median step time (s)").to_frame()
    cost["x plain DPO"] = cost.iloc[:, 0] / cost.loc["plain DPO"].iloc[0]
    return {**step_cost_tables(cost), "_config": s["config"]}


def step_cost_draw(d):
    """Notebook 07's step cost (no plots.* function: a pandas horizontal bar chart)."""
    ax = d["cost"].set_index("variant")["x plain DPO"].plot.barh(figsize=(7, 3), color="C0")
    ax.axvline(1, color="grey", ls="--", lw=1)
    ax.set(xlabel="median step time / plain DPO's", ylabel="variant", title="cost per training step (CPU)")
    ax.invert_yaxis()
    return ax.figure


def kernel_share_tables(kernel_runs, seed):
    """kernel_share_draw's input from notebook 07's `kernel_runs` {variant: metrics.jsonl of its run on
    `seed`}: step, the kernel term's share of |z| and sd(m), one long table."""
    keep = ["step", "kernel/share", "kernel/margin_std"]
    return {"metrics": _long({n: df[[c for c in keep if c in df]] for n, df in kernel_runs.items()}), "_seed": seed}


def kernel_share_data(ctx):
    s = _nb07(ctx)
    kernel_runs = {name: s["metrics"][name, ctx.seed] for name in (*kernels.PAPER_FOUR, HMK_07, HMK0_07)}
    return {**kernel_share_tables(kernel_runs, ctx.seed), "_config": s["config"]}


def kernel_share_draw(d):
    runs, seed = _split(d["metrics"]), d["_seed"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.6))
    plots.plot_run_metric(runs, "kernel/share", ax=axes[0], ylabel=r"share of $|z|$: kernel term",
                          title=rf"$\overline{{|\gamma m|}} / (\overline{{|\beta(\rho_w-\rho_l)|}} + \overline{{|\gamma m|}})$, seed {seed}")
    axes[0].set_ylim(0, 1.02)
    plots.plot_run_metric(runs, "kernel/margin_std", ax=axes[1], ylabel=r"sd of $m$ over the batch", title=rf"kernel margin scale, seed {seed}")
    axes[1].set_ylim(0, None)
    return fig


# ---- notebook 08: the CPU rehearsal of the 7B recipe ------------------------------------------------

def rehearsal_data(ctx):
    """mirrors notebook 08 cell 18 (`rehearse`): a few steps of the GPU recipe at a fraction of the 7B shape,
    traced by evaluation.memory_timeline (a measurement of this process, so it trains in-process, not
    through the run driver), with and without gradient checkpointing."""
    import torch

    from kdpo_lab import data as kdata
    from kdpo_lab import evaluation, loading, models, training
    from kdpo_lab.config import TrainConfig
    from kdpo_lab.figures_math import _tokenizer_08
    scale, out = (1 / 16 if ctx.fast else 1 / 4), _runs_dir(ctx, "nb08")
    _tokenizer_08().save_pretrained(out / "tokenizer")
    results, timelines = {}, {}
    for gc in (False, True):
        name = f"scale {scale:g}, " + ("checkpointing" if gc else "no checkpointing")
        cfg = TrainConfig(output_dir=str(out / f"rehearsal_{scale:g}_{'ckpt' if gc else 'nockpt'}"), data=str(kdata.SUITE_DIR),
                          model="llama-7b-shape", tokenizer=str(out / "tokenizer"), model_scale=scale, dtype="bf16", lora_r=8,
                          lora_alpha=16, gradient_checkpointing=gc, kernel="rbf", gamma=0.5, per_device_train_batch_size=8,
                          max_train_pairs=8, max_eval_pairs=8, max_steps=4, warmup_steps=1, logging_steps=1, save_steps=4,
                          progress=False, seed=ctx.seed)
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run, timeline, step_ends = evaluation.memory_timeline(training.train, cfg)
        steady = timeline[(timeline.t_s > step_ends[0]) & (timeline.t_s <= step_ends[-1])]
        tokenizer = models.load_tokenizer(run / "model")
        pairs, report = loading.read_pairs(cfg, "train", cfg.max_train_pairs)
        T = kdata.collate(loading.encode(cfg, tokenizer, pairs, report, "train"), tokenizer.pad_token_id)["input_ids"].shape[1]
        config = models.shape_config("llama-7b-shape", scale, vocab_size=len(tokenizer))
        results[name] = {**models.memory_row(config, 8, batch=16, seq_len=T, gradient_checkpointing=gc),
                         "measured MB": steady["allocated_mb"].max()}
        timelines[name] = (timeline, step_ends)
    return {**rehearsal_tables(pd.DataFrame.from_dict(results, orient="index"), timelines),
            "_config": f"llama-7b-shape x {scale:g}, LoRA r=8, bf16, 4 steps of 8 pairs"}


def rehearsal_tables(rehearsal, timelines):
    """rehearsal_draw's input from notebook 08's `rehearsal` (one row per run, indexed by its name: the
    estimates and the measured MB) and `timelines` {run: (memory timeline, optimizer step ends)}, a timeline
    None where there is none (a GPU run): each timeline's peaks (`_peaks`), then its step ends as rows
    without allocated_mb."""
    parts = []
    for name, (timeline, step_ends) in timelines.items():
        if timeline is not None:
            parts.append(_peaks(timeline).assign(run=name))
        parts.append(pd.DataFrame({"run": name, "t_s": list(step_ends), "allocated_mb": np.nan}))
    return {"rehearsal": rehearsal.rename_axis("run").reset_index(), "timeline": pd.concat(parts)[["run", "t_s", "allocated_mb"]]}


def _peaks(timeline, bins=2000):
    """The memory timeline at most `bins` rows long: the largest allocation in each time bin, at the
    bin's first event (the profiler records every allocation: 10^5 rows for four steps). Peaks survive:
    the figure, in notebook 08 too, draws this envelope of the full timeline."""
    if len(timeline) <= bins:
        return timeline[["t_s", "allocated_mb"]]
    b = np.minimum((timeline["t_s"] / timeline["t_s"].max() * bins).astype(int), bins - 1)
    return timeline.groupby(b).agg(t_s=("t_s", "first"), allocated_mb=("allocated_mb", "max")).reset_index(drop=True)


def rehearsal_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(15, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    rehearsal = d["rehearsal"].set_index("run")
    name = [r for r in rehearsal.index if r.endswith(", checkpointing")][0]
    t = d["timeline"][d["timeline"]["run"] == name]
    step_ends = t[t["allocated_mb"].isna()]["t_s"].to_numpy()
    if t["allocated_mb"].notna().any():
        plots.plot_memory_timeline(t.dropna(subset=["allocated_mb"]), step_ends, estimate=rehearsal.loc[name, "estimate MB"], ax=axes[0],
                                   title=f"tensor memory during training.train ({name})")
    else:  # a GPU run: no CPU memory timeline
        axes[0].text(0.5, 0.5, "on a GPU: see torch.cuda.memory_summary()", ha="center", transform=axes[0].transAxes)
    plots.plot_grouped_bars(rehearsal[["measured MB", "estimate MB", "estimate without LoRA inputs MB"]], ax=axes[1],
                            title="peak of a training step", ylabel="MB")
    axes[1].legend(fontsize=7, loc="upper right")
    axes[1].tick_params(axis="x", labelsize=7)
    return fig


# ---- notebook 09: HT-SR runs ----------------------------------------------------------------------

@functools.cache
def _nb09(ctx):
    """Notebook 09's runs (spectra_runs.train_htsr_runs) and their HT-SR analysis (spectra_runs.analyse_runs)."""
    out = _runs_dir(ctx, "nb09")
    run_dirs = [Path(r) for r in spectra_runs.train_htsr_runs(out, ctx.fast, ctx.processes, ctx.kdpo)]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        summary = spectra_runs.analyse_runs(run_dirs, out / "spectra", verbose=False)
    return dict(run_dirs=run_dirs, summary=summary, layers=pd.read_csv(out / "spectra" / "layers.csv"),
                delta=pd.read_csv(out / "spectra" / "delta_alpha.csv"), config=_mode_note(ctx, "spectra_runs.train_htsr_runs"))


def alpha_by_layer_tables(layers, delta_alpha):
    """alpha_by_layer_draw's input: analyse_runs' layers.csv and delta_alpha.csv as read."""
    return {"layers": layers, "delta_alpha": delta_alpha}


def alpha_by_layer_data(ctx):
    s = _nb09(ctx)
    return {**alpha_by_layer_tables(s["layers"], s["delta"]), "_config": s["config"]}


def alpha_by_layer_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(15, 3.8))
    plots.plot_alpha_by_layer({run: t for run, t in d["layers"].groupby("run", sort=False)}, ax=axes[0])
    plots.plot_delta_alpha(d["delta_alpha"], ax=axes[1])
    return fig


def esd_data(ctx):
    """mirrors notebook 09 cell 23: the ESD of the largest reliable layer, in the reference and in the run
    whose mean alpha moved most."""
    from kdpo_lab import spectra, spectra_runs
    s = _nb09(ctx)
    summary, by_name = s["summary"], dict(zip(spectra_runs.run_names(s["run_dirs"]), s["run_dirs"]))
    first = summary["run"].iloc[0]
    layer = spectra_runs.esd_layer(s["layers"][s["layers"]["run"] == first])
    moved = summary.drop(index=0)["mean_delta_alpha"].abs()
    other = summary.loc[moved.idxmax(), "run"] if moved.notna().any() else summary["run"].iloc[-1]
    esds = {run: spectra.esd_data(by_name[run], layer) for run in (first, other)}
    return {**esd_tables(esds), "_config": s["config"]}


def esd_tables(esds):
    """esd_draw's input from {run: spectra.esd_data(run, layer)}, i.e. {run: (eigenvalues, the layer's
    layer_table row)}: the eigenvalues and the fits, one long table each."""
    eig = [pd.DataFrame({"run": run, "eigenvalue": lam}) for run, (lam, _) in esds.items()]
    fits = [row.to_frame().T.assign(run=run) for run, (_, row) in esds.items()]
    return {"eigenvalues": pd.concat(eig), "fit": pd.concat(fits)}


def esd_draw(d):
    from matplotlib.ticker import NullFormatter
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, (run, row) in zip(axes, d["fit"].set_index("run").iterrows()):
        lam = d["eigenvalues"][d["eigenvalues"]["run"] == run]["eigenvalue"].to_numpy()
        plots.plot_esd(lam, row, ax=ax)
        ax.set_title(f"{run}: {ax.get_title()}", fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
    return fig


def alpha_vs_gap_tables(summary):
    """alpha_vs_gap_draw's (and alpha_and_gap_by_setting_draw's) input: analyse_runs' summary, one row per run."""
    return {"summary": summary}


alpha_and_gap_by_setting_tables = alpha_vs_gap_tables  # the two figures share their table


def alpha_vs_gap_data(ctx):
    s = _nb09(ctx)
    return {**alpha_vs_gap_tables(s["summary"]), "_config": s["config"]}


def alpha_vs_gap_draw(d):
    summary = d["summary"]
    return plots.plot_alpha_vs_gap(summary[np.isfinite(summary["gen_gap"])]).figure


def alpha_and_gap_by_setting_draw(d):
    return plots.plot_alpha_and_gap_by_setting(d["summary"])[0].figure


# ---- the 28-pair sweep's table ----------------------------------------------------------------------

def sweep_table(ctx):
    """The sweep's table: fast mode runs configs/sweep_fast.yaml (resumable) into the runs folder; full
    mode reads the committed results/sweep/table.csv and never launches the full sweep (4.4 h). Prints a
    line when the table is partial (a variant with fewer seeds than the most complete one)."""
    if ctx.fast:
        cfg = sweep.SweepConfig.from_yaml(package_root() / "configs" / "sweep_fast.yaml", out=str(_runs_dir(ctx, "sweep_fast")),
                                          processes=ctx.processes)
        failed = sweep.execute(cfg, ctx.kdpo)
        if failed:
            raise RuntimeError(f"fast sweep: {len(failed)} jobs failed: {', '.join(failed)}")
        table = write_table(cfg.out)
    else:
        path = package_root() / "results" / "sweep" / "table.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path}: the full sweep's committed table is missing (run `kdpo sweep configs/sweep.yaml "
                                    "--table results/sweep/table.csv`; `kdpo figures` never launches it)")
        table = pd.read_csv(path)
    print(partial_note(table) or f"sweep table: {len(table)} rows, complete")
    return table


def partial_note(table):
    """A line naming the variants with fewer test seeds than the most complete one; "" when none."""
    seeds = table[table["split"] == "test"].groupby("variant")["seed"].nunique()
    short = seeds[seeds < seeds.max()] if len(seeds) else seeds
    if not len(short):
        return ""
    return (f"sweep table is partial: {len(short)} of {len(seeds)} variants have fewer than {seeds.max()} seeds "
            f"({', '.join(f'{v}: {n}' for v, n in short.items())})")
