"""Comparing run folders by their weight spectra: the `kdpo spectra RUN_DIR... --out OUT` report.

`analyse_runs` tables every run (spectra.layer_table), compares it with a baseline run, relates mean
alpha to the generalisation gap and to the learning rate and passes over the data (the two settings
HT-SR comparisons get confounded by), and writes CSVs and figures; `findings` answers notebook 09's
two questions in words, with their caveats, from its summary. `htsr_jobs` and `train_htsr_runs` make
the runs notebook 09 compares: `kdpo sft` and `kdpo train` command lines (configs/htsr_*.yaml) run by
the sweep's driver (sweep.run_job).
"""
import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from kdpo_lab import plots
from kdpo_lab.config import SFTConfig, TrainConfig
from kdpo_lab.loading import read_pairs
from kdpo_lab.sweep import Job, argv, check_same, run_job
from kdpo_lab.spectra import (esd_data, _TABLE_COLUMNS, MIN_RELIABLE_EVALS, SmallMatrixWarning, _blas_threads, compare,
                              layer_table, summarize, gap_relation)


FIGURES = ("alpha_by_layer.png", "delta_alpha.png", "esd.png", "alpha_vs_gap.png", "alpha_and_gap_by_setting.png")


def run_names(run_dirs):
    """Short unique names of run folders: the folder name ('runs/dpo' -> 'dpo'; a model folder
    'runs/dpo/model' -> 'dpo'); names that collide take their parent folders ('a/dpo', 'b/dpo')."""
    parts = [[p for p in os.path.normpath(os.path.abspath(os.fspath(d))).split(os.sep) if p] for d in run_dirs]
    parts = [p[:-1] if len(p) > 1 and p[-1] == "model" else p for p in parts]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    if len(set(names)) != len(names):
        raise ValueError(f"run folders repeat: {[os.fspath(d) for d in run_dirs]}")
    return names


def read_gap(run_dir):
    """The last held-out evaluation of a training run (OUT/eval.jsonl, written by training.train):
    {"gen_gap": pref/gap = train minus held-out preference accuracy, "train_accuracy",
    "heldout_accuracy", "eval_step"}; NaNs for an SFT run, a bare model folder, or an old eval.jsonl
    without pref/gap. A model folder OUT/model reads OUT/eval.jsonl."""
    path = os.fspath(run_dir)
    out = {"gen_gap": math.nan, "train_accuracy": math.nan, "heldout_accuracy": math.nan, "eval_step": math.nan}
    for folder in (path, os.path.dirname(os.path.normpath(path))):
        file = os.path.join(folder, "eval.jsonl")
        if os.path.isfile(file):
            rows = pd.read_json(file, lines=True)
            if len(rows) and "pref/gap" in rows:
                last = rows.iloc[-1]
                return {"gen_gap": float(last["pref/gap"]), "train_accuracy": float(last["pref/train_accuracy"]),
                        "heldout_accuracy": float(last["pref/accuracy"]), "eval_step": int(last["step"])}
            return out
    return out


def read_settings(run_dir):
    """The two training settings HT-SR comparisons get confounded by, from a run's OUT/config.yaml
    (written by training.train and training.sft): {"lr", "passes"}, passes = pairs seen (max_steps x
    per_device_train_batch_size x gradient_accumulation_steps) / training pairs used. NaNs without a config; passes counts against
    max_train_pairs when the data can no longer be read."""
    path = os.fspath(run_dir)
    for folder in (path, os.path.dirname(os.path.normpath(path))):
        file = os.path.join(folder, "config.yaml")
        if os.path.isfile(file):
            cfg = TrainConfig.from_yaml(file)
            try:
                n_pairs = len(read_pairs(cfg, "train", cfg.max_train_pairs)[0])
            except (OSError, ValueError):
                n_pairs = cfg.max_train_pairs
            seen = cfg.max_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
            return {"lr": float(cfg.learning_rate), "passes": seen / n_pairs if n_pairs else math.nan}
    return {"lr": math.nan, "passes": math.nan}


def esd_layer(table):
    """The layer whose ESD `analyse_runs` draws: the largest reliable layer (most eigenvalues, then
    the larger N; the first in model order on ties), else the largest layer."""
    pool = table[table["reliable"].astype(bool)]
    pool = pool if len(pool) else table
    order = pool.assign(_pos=range(len(pool))).sort_values(["n_evals", "N", "_pos"], ascending=[False, False, True])
    return order["name"].iloc[0]


def analyse_runs(run_dirs, out_dir, baseline=None, *, names=None, min_evals=MIN_RELIABLE_EVALS, lora="merge",
                 verbose=True):
    """HT-SR comparison of runs: the `kdpo spectra RUN_DIR... --out OUT` command.

    run_dirs: training runs (OUT/ with model/ and eval.jsonl), SFT runs, bare model or LoRA adapter
        folders; all of the same architecture for the per-layer comparison.
    baseline: the run the others are compared with (a name from `names`, or one of run_dirs); default
        the first run, typically the SFT reference or base model.
    names: run names (default `run_names(run_dirs)`).
    Writes to out_dir:
        layers.csv       layer_table of every run, long format (column `run` first)
        summary.csv      summarize(tables, gaps) + mean_delta_alpha (reliable layers, vs baseline) +
                         train_accuracy, heldout_accuracy, eval_step (see read_gap) + lr, passes
                         (see read_settings)
        delta_alpha.csv  compare(tables, baseline): per-layer alpha - alpha_baseline (when >= 2 runs)
        alpha_by_layer.png, delta_alpha.png (>= 2 runs), esd.png (layer `esd_layer`, one panel per
        run), alpha_vs_gap.png (when >= 2 runs have a gap), alpha_and_gap_by_setting.png (when >= 2
        runs have a gap and a config.yaml: plots.plot_alpha_and_gap_by_setting)
    Emits one SmallMatrixWarning if any layer is below min_evals eigenvalues (or failed to fit); the
    printed summary gives mean alpha over reliable layers only, and says so when there is none.
    Returns the summary DataFrame.
    """
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("analyse_runs needs at least one run folder")
    names = run_names(run_dirs) if names is None else list(names)
    if len(names) != len(run_dirs) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(run_dirs)} distinct strings, got {names!r}")
    if baseline is None:
        baseline = names[0]
    elif os.fspath(baseline) in run_dirs:
        baseline = names[run_dirs.index(os.fspath(baseline))]
    elif baseline not in names:
        raise ValueError(f"baseline {baseline!r} is neither a run name {names} nor one of the run folders")
    os.makedirs(out_dir, exist_ok=True)

    tables = {}
    for name, path in zip(names, run_dirs):
        tables[name] = layer_table(path, min_evals=min_evals, lora=lora, warn=False)
    layers = pd.concat([t.assign(run=name) for name, t in tables.items()], ignore_index=True)
    layers = layers[["run"] + _TABLE_COLUMNS]
    layers.to_csv(os.path.join(out_dir, "layers.csv"), index=False)
    _warn_runs(layers, min_evals)

    evals = {name: read_gap(path) for name, path in zip(names, run_dirs)}
    summary = summarize(tables, gaps={name: e["gen_gap"] for name, e in evals.items()})
    delta = _deltas(tables, baseline)
    if len(delta):
        delta.to_csv(os.path.join(out_dir, "delta_alpha.csv"), index=False)
    ok = delta[delta["reliable"]] if len(delta) else delta
    mean_delta = ok.groupby("run")["delta_alpha"].mean() if len(ok) else pd.Series(dtype=float)
    summary["mean_delta_alpha"] = summary["run"].map(mean_delta).astype(float)
    for key in ("train_accuracy", "heldout_accuracy", "eval_step"):
        summary[key] = summary["run"].map({name: e[key] for name, e in evals.items()})
    settings = {name: read_settings(path) for name, path in zip(names, run_dirs)}
    for key in ("lr", "passes"):
        summary[key] = summary["run"].map({name: st[key] for name, st in settings.items()})
    summary.insert(1, "baseline", summary["run"] == baseline)
    summary.to_csv(os.path.join(out_dir, "summary.csv"), index=False)

    written = ["layers.csv", "summary.csv"] + (["delta_alpha.csv"] if len(delta) else [])
    written += _figures(tables, dict(zip(names, run_dirs)), summary, delta, out_dir, lora)
    if verbose:
        print(format_summary(summary, layers, baseline, min_evals))
        print(f"wrote {', '.join(written)} to {out_dir}")
    return summary


def _deltas(tables, baseline):
    """compare() of each run with the baseline; runs with other layers are left out (with a note)."""
    parts = []
    for name, table in tables.items():
        if name == baseline:
            continue
        try:
            parts.append(compare({baseline: tables[baseline], name: table}, baseline))
        except ValueError as error:
            print(f"no delta alpha for {name!r}: {error}")
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["run", "name", "delta_alpha", "reliable"])


def _warn_runs(layers, min_evals):
    """One SmallMatrixWarning for all runs: how many layers are below min_evals eigenvalues, their sizes."""
    runs = layers.groupby("run", sort=False)
    small = layers["n_evals"] < min_evals
    failed = int((~layers["reliable"].astype(bool) & ~small).sum())
    if not small.any() and not failed:
        return
    parts = []
    if small.any():
        per_run = {(int((t["n_evals"] < min_evals).sum()), len(t)) for _, t in runs}
        if len(per_run) == 1:
            (k, n), = per_run
            count = f"{k} of {n} layers" + (f" in each of {runs.ngroups} runs" if runs.ngroups > 1 else "")
        else:
            count = f"{int(small.sum())} of {len(layers)} layers over {runs.ngroups} runs"
        sizes = ", ".join(map(str, sorted(set(layers.loc[small, "n_evals"]))))
        parts.append(f"{count} have fewer than {min_evals} eigenvalues (min(N, M) = {sizes}); below that size a "
                     f"power-law alpha is not distinguishable from noise (see kdpo_lab.spectra.MIN_RELIABLE_EVALS)")
    if failed:
        parts.append(f"{failed} power-law fits failed or were skipped by weightwatcher")
    warnings.warn("; ".join(parts) + ". They are marked reliable=False, drawn hollow, and left out of mean alpha "
                  "and the band fractions.", SmallMatrixWarning, stacklevel=3)


def format_summary(summary, layers, baseline, min_evals=MIN_RELIABLE_EVALS):
    """The text `analyse_runs` prints: per run, reliable layers, mean alpha and the fraction in [2, 6]
    over reliable layers only ("-" when there is none: no number from noise), mean delta alpha, gap."""
    fmt = lambda x, spec: "-" if not np.isfinite(x) else format(x, spec)
    rows = []
    for _, r in summary.iterrows():
        rows.append({"run": r["run"] + (" (baseline)" if r["run"] == baseline else ""),
                     "reliable layers": f"{r['n_reliable']} of {r['n_layers']}",
                     "mean alpha": fmt(r["mean_alpha"], ".2f"), "in [2, 6]": fmt(r["frac 2-6"], ".0%"),
                     "< 2": fmt(r["frac <2"], ".0%"), "> 6": fmt(r["frac >6"], ".0%"),
                     "mean d-alpha": fmt(r["mean_delta_alpha"], "+.2f"), "gap": fmt(r["gen_gap"], "+.3f")})
    n_max = int(layers["n_evals"].max())
    lines = [f"HT-SR: weightwatcher alpha of the linear layers in the transformer blocks, {len(summary)} run(s); "
             f"delta against {baseline!r}.",
             f"A layer is reliable with at least {min_evals} eigenvalues (min(N, M) of W); mean alpha, band "
             f"fractions and mean d-alpha use reliable layers only; gap = train - held-out preference accuracy.",
             pd.DataFrame(rows).to_string(index=False)]
    if int(summary["n_reliable"].sum()) == 0:
        lines.append(f"No layer is reliable: the largest matrix here has {n_max} eigenvalues, below {min_evals}. "
                     f"At this size a fitted alpha is not distinguishable from noise, so no mean alpha is "
                     f"reported; the per-layer values in layers.csv are for inspection only.")
    elif not layers["reliable"].astype(bool).all():
        lines.append(f"Layers with fewer than {min_evals} eigenvalues are left out (reliable=False in layers.csv).")
    return "\n".join(lines)


def _figures(tables, paths, summary, delta, out_dir, lora):
    """alpha_by_layer.png, delta_alpha.png, esd.png, alpha_vs_gap.png, alpha_and_gap_by_setting.png (the
    last two need at least two runs with a gap; the last also their config.yaml); returns the names written."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(next(iter(tables.values())))), 3.8))
    plots.plot_alpha_by_layer(tables, ax=ax)
    save(fig, "alpha_by_layer.png")
    if len(delta):
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * delta["name"].nunique()), 3.5))
        plots.plot_delta_alpha(delta, ax=ax)
        save(fig, "delta_alpha.png")
    layer = esd_layer(next(iter(tables.values())))
    cols = min(3, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    n_layer = int(next(iter(tables.values())).set_index("name").loc[layer, "n_evals"])
    for ax, (name, path) in zip(axes.ravel(), paths.items()):
        if layer in set(tables[name]["name"]):
            with _blas_threads(n_layer):
                plots.plot_esd(*esd_data(path, layer, lora=lora), ax=ax)
            ax.set_title(f"{name}: {ax.get_title()}", fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded labels when lambda spans < a decade
    for ax in axes.ravel()[len(paths):]:
        ax.axis("off")
    save(fig, "esd.png")
    if int(np.isfinite(summary["gen_gap"]).sum()) >= 2:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        plots.plot_alpha_vs_gap(summary[np.isfinite(summary["gen_gap"])], ax=ax)
        save(fig, "alpha_vs_gap.png")
    known = summary[np.isfinite(summary["gen_gap"]) & np.isfinite(summary["lr"]) & np.isfinite(summary["passes"])]
    if len(known) >= 2:  # runs trained by kdpo_lab (config.yaml): the confound check
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
        plots.plot_alpha_and_gap_by_setting(summary, axes=axes)
        save(fig, "alpha_and_gap_by_setting.png")
    return written


def findings(summary, n_eval=None, min_evals=MIN_RELIABLE_EVALS):
    """The paper's two HT-SR questions answered from `analyse_runs`' summary, as markdown bullets,
    every number read from the summary, each with the caveat that limits it:
      1. do the aligned variants keep their layers in the healthy band 2 <= alpha <= 6?
      2. does mean alpha track the generalisation gap (HT-SR: lower alpha, more over-fitting)?
    Only reliable layers count (at least min_evals eigenvalues); with none, both are declared
    unanswerable. n_eval: held-out pairs behind each gap, for its standard error."""
    base = summary.loc[summary["baseline"], "run"].iloc[0] if "baseline" in summary else summary["run"].iloc[0]
    if int(summary["n_reliable"].sum()) == 0:
        return (f"- **No layer of any run has {min_evals} eigenvalues or more**, so neither question can be "
                f"answered here: at this size a fitted alpha is not distinguishable from noise (see the reliability "
                f"plot). Every alpha of this analysis is shown hollow and no mean alpha is reported.")
    pct = lambda x: "-" if not np.isfinite(x) else f"{x:.0%}"
    lines = [f"- Reliable layers (at least {min_evals} eigenvalues): "
             + ", ".join(f"`{r['run']}` {r['n_reliable']} of {r['n_layers']}" for _, r in summary.iterrows()) + "."]
    ref = summary[summary["run"] == base].iloc[0]
    runs = summary[(summary["run"] != base) & (summary["n_reliable"] > 0)]
    lines.append(f"- Reference `{base}`: {pct(ref['frac 2-6'])} of reliable layers in [2, 6], {pct(ref['frac <2'])} "
                 f"below 2, {pct(ref['frac >6'])} above 6 (mean alpha {ref['mean_alpha']:.2f}).")
    for _, r in runs.iterrows():
        lines.append(f"- `{r['run']}`: {pct(r['frac 2-6'])} in [2, 6], {pct(r['frac <2'])} below 2, "
                     f"{pct(r['frac >6'])} above 6; mean alpha {r['mean_alpha']:.2f}, mean change "
                     f"{r['mean_delta_alpha']:+.2f} against the reference.")
    if len(runs):
        below, above = runs[runs["frac <2"] > 0], runs[runs["frac >6"] > 0]
        if below.empty and above.empty:
            verdict = "every aligned run keeps all its reliable layers in [2, 6]"
        else:
            verdict = ("no aligned run has a reliable layer below 2 (over-fit risk)" if below.empty else
                       f"{len(below)} of {len(runs)} aligned runs have layers below 2 (over-fit risk): "
                       f"{', '.join(below['run'])}")
            if len(above):
                verdict += (f"; {len(above)} of {len(runs)} have layers above 6 (under-trained): "
                            f"{', '.join(above['run'])}")
        lines.append(f"- **Healthy band:** {verdict}.")
        if np.isfinite(ref["frac >6"]) and ref["frac >6"] >= 0.5:
            lines.append("- Caveat: at least half of the reference's layers are above 6, where a random (untrained) "
                         "matrix of this size is fitted; staying out of the over-fit band says little about "
                         "alignment when the weights barely left their initialisation.")
        gapped = runs[np.isfinite(runs["gen_gap"])]
        if len(gapped) >= 2:
            worst = gapped.loc[gapped["gen_gap"].idxmax()]
            others = gapped.drop(index=worst.name)["frac 2-6"]
            rank = ("as many as or more than any other aligned run: being inside the band did not rule out "
                    "over-fitting here" if worst["frac 2-6"] >= others.max() else
                    "fewer than any other aligned run" if worst["frac 2-6"] < others.min() else
                    f"within the other runs' range of {pct(others.min())} to {pct(others.max())}")
            lines.append(f"- **The band and over-fitting:** the run with the largest gap, `{worst['run']}` "
                         f"({worst['gen_gap']:+.3f}), has {pct(worst['frac 2-6'])} of its reliable layers in [2, 6], "
                         f"{rank}.")
        moves = runs["mean_delta_alpha"].abs()
        if moves.notna().any():
            lines.append(f"- The largest mean change of alpha is {moves.max():.2f} (`{runs.loc[moves.idxmax(), 'run']}`). "
                         f"Single layers are noisier than means: even at {min_evals} eigenvalues a planted alpha is "
                         f"recovered within 0.5 in only 95-98% of draws, depending on the planted alpha (MIN_RELIABLE_EVALS docstring), and a layer's "
                         f"alpha can jump by several units when the fit's tail start (xmin, see n_tail) switches "
                         f"between candidates.")
    rel = gap_relation(summary)
    se = f" Each gap is a difference of two accuracies on {n_eval} pairs: standard error up to " \
         f"{math.sqrt(0.5 / n_eval):.3f}." if n_eval else ""
    if rel["n"] < 3:
        lines.append(f"- **Alpha and the gap:** only {rel['n']} run(s) have both a reliable mean alpha and a gap; "
                     f"a relation needs at least 3 (and means little below about 8).{se}")
    else:
        smallest = 2 / math.factorial(rel["n"]) if rel["n"] <= 8 else math.nan
        sign = ("negative, the direction HT-SR predicts (lower alpha, larger gap)" if rel["spearman"] < 0 else
                "not negative: not the direction HT-SR predicts" if rel["spearman"] > 0 else "zero")
        strength = "significant at 5%" if rel["p_spearman"] < 0.05 else "not significant at 5%"
        lines.append(f"- **Alpha and the gap:** Spearman {rel['spearman']:+.2f} over {rel['n']} runs, {sign}; exact "
                     f"p = {rel['p_spearman']:.2f}, {strength}"
                     + (f" (with {rel['n']} runs even a perfect ranking gives p = {smallest:.2g})" if smallest == smallest
                        else "") + f".{se}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- notebook 09's runs

HTSR_CONFIGS = ("configs/htsr_sft.yaml", "configs/htsr_dpo.yaml")
"""The reference's and the aligned runs' settings at full size (shipped with kdpo_lab, see config.resolve)."""

_OVER = {"max_steps": 800, "save_steps": 800, "max_train_pairs": 256}  # ~50 passes over 256 pairs
HTSR_VARIANTS = {
    "dpo": {},
    "hybrid_rbf": {"kernel": "rbf", "gamma": 0.5},
    "js": {"divergence": "js"},
    "hmk": {"kernel": "hmk", "gamma": 0.5, "eta": 0.01},
    "dpo_seed1": {"seed": 1},  # the same run, another seed: the noise floor
    "overtrained": {**_OVER, "learning_rate": 2e-3},
    "overtrained_lr5e-4": {**_OVER, "learning_rate": 5e-4},
    # control: the over-trained run's learning rate and steps on all the pairs (~3 passes, little memorising)
    "high_lr_all_pairs": {"max_steps": 800, "save_steps": 800, "learning_rate": 2e-3},
}
"""Notebook 09's aligned runs: fields of htsr_dpo.yaml each changes. Fast mode runs `dpo` only."""

HTSR_FAST = ({"d_model": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 512, "max_train_pairs": 256, "max_eval_pairs": 32,
              "learning_rate": 3e-3, "max_steps": 30, "warmup_steps": 2},
             {"max_train_pairs": 256, "max_eval_pairs": 32, "learning_rate": 1e-3, "max_steps": 10, "warmup_steps": 2,
              "save_steps": 10})
"""Fast mode's changes to the two configs (a smoke test: width 64, every alpha unreliable by construction)."""


def htsr_jobs(runs_dir, fast):
    """Notebook 09's trainings as `kdpo` jobs (sweep.Job), each one command line whatever is already done
    (`job.line()` prints the whole experiment): the reference `kdpo sft` first, then one `kdpo train` per
    variant from its model, in HTSR_VARIANTS order (fast: `dpo` only). Training runs with --resume true, so
    a killed run continues from its checkpoint (train_htsr_runs skips finished ones). A folder trained with
    other settings raises ValueError instead of being mixed in."""
    runs_dir = os.path.abspath(os.fspath(runs_dir))
    sft_fast, dpo_fast = HTSR_FAST if fast else ({}, {})
    reference = os.path.join(runs_dir, "sft")
    specs = [("sft", SFTConfig, HTSR_CONFIGS[0], {**sft_fast, "output_dir": reference})]
    for name, fields in HTSR_VARIANTS.items():
        if fast and name != "dpo":
            continue
        specs.append((name, TrainConfig, HTSR_CONFIGS[1], {**dpo_fast, **fields, "output_dir": os.path.join(runs_dir, name),
                                                           "model": os.path.join(reference, "model")}))
    jobs = []
    for name, cls, config, fields in specs:
        fields = {**fields, "resume": True, "progress": False}
        folder = Path(fields["output_dir"])
        check_same(folder, cls, config, fields, advice="use another runs folder (KDPO_RUNS) or delete that run")
        jobs.append(Job(name, folder, [argv("sft" if cls is SFTConfig else "train", config, fields)]))
    return jobs


def finished(folder):
    """True when a run folder holds its final model (training writes model/ once, at the end)."""
    return (Path(folder) / "model" / "config.json").exists()


def train_htsr_runs(runs_dir, fast, processes=2, in_process=None):
    """Train what `htsr_jobs` has left: the reference, then the aligned runs `processes` at a time, each a
    `kdpo` subprocess with one thread (sweep.run_job; its output in RUNS_DIR/NAME.log); processes=0 runs
    them one by one in this process through `in_process` (the `kdpo` entry point, cli.main). Returns the
    run folders, reference first. A failed run raises RuntimeError naming its log, after the others finish."""
    if not isinstance(processes, int) or processes < 0:
        raise ValueError(f"processes must be an integer >= 0 (0: in this process); got {processes!r}")
    jobs = htsr_jobs(runs_dir, fast)
    run = functools.partial(run_job, processes=processes, in_process=in_process)
    results = [] if finished(jobs[0].folder) else [run(jobs[0])]
    if not results or results[0][3] is None:
        with ThreadPoolExecutor(max(1, processes)) as pool:
            results += list(pool.map(run, [j for j in jobs[1:] if not finished(j.folder)]))
    failed = [f"{job.name} ({error})" for job, _, _, error in results if error]
    if failed:
        raise RuntimeError(f"notebook 09's runs failed: {'; '.join(failed)}")
    return [job.folder for job in jobs]
