"""`kdpo figures`: every figure the notebooks and the README show, redrawn into one folder from saved tables.

A figure is a `Figure`: its name ("05_reward_vs_kl"), where it appears (a notebook or the README), a
`data(ctx)` function that returns the tables behind it, and a `draw(data)` function. Notebooks 01-09
draw every figure with that draw function themselves (figures_math: closed forms; figures_runs:
training runs), on tables a `NAME_tables` helper builds from the cell's variables; the data function
builds its tables with the same helper. Notebook 10 builds its tables with paper_figures' functions and
draws each with the one plots.* call its figure's draw function makes; `kdpo quickstart` draws the
README's pictures with quickstart.draw_*, which the README figures' draw functions call. For each
figure, `make` writes OUT/NAME.png, OUT/NAME.csv (its tables; several are stacked with a `table` column
first) and a row of OUT/manifest.csv: file, figure, source, config, commit, seed, mode, wall_s. A figure
whose PNG and CSV exist is skipped unless force; one that fails is reported in one line and the others
go on.

Missing runs are made through the sweep's run driver (sweep.Job, sweep.run_job) as `kdpo` command lines
and reused afterwards; notebooks are never executed. Fast mode (CI) makes small versions; full mode is
the reproduction (the notebooks' full sizes: hours of CPU for notebooks 05-09).
"""
import csv
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from kdpo_lab import figures_math as fm
from kdpo_lab import figures_runs as fr
from kdpo_lab import package_root, paper_claims, paper_figures, plots

MODES = ("fast", "full")
MANIFEST_COLUMNS = ["file", "figure", "source", "config", "commit", "seed", "mode", "wall_s"]


@dataclass(frozen=True)
class Context:
    """What every data function gets: mode (fast or full), the seed notebooks seed with 0, the output
    folder, the runs folder (runs are reused across calls), parallel `kdpo` processes for runs (0: in this
    process through `kdpo`, the command-line entry point cli.main, which the caller passes)."""
    mode: str = "fast"
    seed: int = 0
    out: Path = field(default=Path("figures"), compare=False)
    runs: Path = Path("runs/figures")
    processes: int = 2
    kdpo: Callable | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")

    @property
    def fast(self):
        return self.mode == "fast"


@dataclass(frozen=True)
class Figure:
    """One figure: name, where it appears, its data and draw functions, and what it is made from (the
    manifest's config, unless its data says "_config")."""
    name: str
    source: str
    data: Callable
    draw: Callable
    config: str = "the notebook's inputs"


def _nb(stem):
    return f"notebooks/{stem}.ipynb"


NB = {k: _nb(v) for k, v in {
    "01": "01_dpo_from_bradley_terry", "02": "02_kernels", "03": "03_divergences", "04": "04_hybrid_loss_and_hmk",
    "05": "05_train_a_small_model", "06": "06_select_kernel_and_divergence", "07": "07_hierarchical_mixture",
    "08": "08_scale_to_7b", "09": "09_heavy_tailed_self_regularization", "10": "10_reproduce_the_paper"}.items()}
README = "README.md"


# ---- notebook 10: the committed result tables, in both modes (it trains nothing) ---------------------

SWEEP_CONFIG = "results/sweep/table.csv, results/selection/scores.csv (configs/sweep.yaml)"


def _final(ctx):
    tables = paper_claims.read_tables()
    return tables, paper_claims.final_table(tables.sweep, paper_claims.Expected.from_sweep())


def differences_data(ctx):
    return {"differences": paper_figures.differences_to_dpo(_final(ctx)[1])}


def family_differences_data(ctx):
    return {"family_differences": paper_figures.family_differences(_final(ctx)[1])}


def selection_data(ctx):
    tables, final = _final(ctx)
    points, pickers, note = paper_figures.selection_scatter(final, tables.selection)
    return {"points": points, "pickers": pickers, "_note": note}


def differences_draw(data):
    plots.plot_differences(data["differences"])
    return _gcf()


def family_differences_draw(data):
    plots.plot_family_differences(data["family_differences"])
    return _gcf()


def selection_draw(data):
    plots.plot_selection_check(data["points"], data["pickers"], data["_note"])
    return _gcf()


def _gcf():
    import matplotlib.pyplot as plt
    return plt.gcf()


REGISTRY = {f.name: f for f in [
    Figure("01_bradley_terry_pairs", NB["01"], fm.bt_pairs_data, fm.bt_pairs_draw),
    Figure("01_closed_form_optimum", NB["01"], fm.closed_form_data, fm.closed_form_draw),
    Figure("01_loss_and_weight", NB["01"], fm.loss_and_weight_data, fm.loss_and_weight_draw),
    Figure("01_dpo_converges_to_optimum", NB["01"], fm.dpo_convergence_data, fm.dpo_convergence_draw),
    Figure("01_reward_kl_frontier", NB["01"], fm.frontier_01_data, fm.frontier_01_draw),
    Figure("02_kernel_profiles", NB["02"], fm.kernel_profiles_data, fm.kernel_profiles_draw),
    Figure("02_gram_matrices", NB["02"], fm.gram_matrices_data, fm.gram_matrices_draw),
    Figure("02_kernel_margins", NB["02"], fm.kernel_margins_data, fm.kernel_margins_draw),
    Figure("02_gradient_weight", NB["02"], fm.gradient_weight_data, fm.gradient_weight_draw),
    Figure("03_generators_and_links", NB["03"], fm.generators_links_data, fm.generators_links_draw),
    Figure("03_link_gradients", NB["03"], fm.link_gradients_data, fm.link_gradients_draw),
    Figure("03_penalties_under_drift", NB["03"], fm.penalties_drift_data, fm.penalties_drift_draw),
    Figure("03_renyi_bhattacharyya", NB["03"], fm.renyi_bhattacharyya_data, fm.renyi_bhattacharyya_draw),
    Figure("03_sinkhorn", NB["03"], fm.sinkhorn_data, fm.sinkhorn_draw),
    Figure("04_kernel_accuracy", NB["04"], fm.kernel_accuracy_data, fm.kernel_accuracy_draw),
    Figure("04_rbf_bandwidth", NB["04"], fm.rbf_bandwidth_data, fm.rbf_bandwidth_draw),
    Figure("04_hmk_weights_by_eta", NB["04"], fm.hmk_eta_data, fm.hmk_eta_draw),
    Figure("04_hmk_weights_strong_gamma", NB["04"], fm.hmk_strong_data, fm.hmk_strong_draw),
    Figure("04_accuracy_summary", NB["04"], fm.accuracy_summary_data, fm.accuracy_summary_draw),
    Figure("05_sft_loss", NB["05"], fr.sft_loss_data, fr.sft_loss_draw),
    Figure("05_training_curves", NB["05"], fr.dpo_curves_data, fr.dpo_curves_draw),
    Figure("05_reward_vs_kl", NB["05"], fr.eval_curves_data, fr.eval_curves_draw),
    Figure("05_by_family", NB["05"], fr.by_family_data, fr.by_family_draw),
    Figure("06_selection_heatmap", NB["06"], fr.selection_heatmap_data, fr.selection_heatmap_draw),
    Figure("06_selection_by_family", NB["06"], fr.selection_by_family_data, fr.selection_by_family_draw),
    Figure("06_pickers_vs_dpo", NB["06"], fr.pickers_data, fr.pickers_draw),
    Figure("07_hmk_weights_in_training", NB["07"], fr.hmk_training_data, fr.hmk_training_draw),
    Figure("07_hmk_vs_dpo", NB["07"], fr.hmk_vs_dpo_data, fr.hmk_vs_dpo_draw),
    Figure("07_step_cost", NB["07"], fr.step_cost_data, fr.step_cost_draw),
    Figure("07_kernel_share", NB["07"], fr.kernel_share_data, fr.kernel_share_draw),
    Figure("08_trainable_parameters", NB["08"], fm.param_counts_data, fm.param_counts_draw),
    Figure("08_lora_reference_stays", NB["08"], fm.lora_drift_data, fm.lora_drift_draw),
    Figure("08_bf16_logp_error", NB["08"], fm.bf16_error_data, fm.bf16_error_draw),
    Figure("08_memory_estimates", NB["08"], fm.memory_data, fm.memory_draw),
    Figure("08_rehearsal_memory", NB["08"], fr.rehearsal_data, fr.rehearsal_draw),
    Figure("09_alpha_reliability", NB["09"], fm.alpha_reliability_data, fm.alpha_reliability_draw),
    Figure("09_alpha_by_layer", NB["09"], fr.alpha_by_layer_data, fr.alpha_by_layer_draw),
    Figure("09_esd", NB["09"], fr.esd_data, fr.esd_draw),
    Figure("09_alpha_vs_gap", NB["09"], fr.alpha_vs_gap_data, fr.alpha_vs_gap_draw),
    Figure("09_alpha_and_gap_by_setting", NB["09"], fr.alpha_vs_gap_data, fr.alpha_and_gap_by_setting_draw),
    Figure("10_differences_to_dpo", NB["10"], differences_data, differences_draw, SWEEP_CONFIG),
    Figure("10_family_differences", NB["10"], family_differences_data, family_differences_draw, SWEEP_CONFIG),
    Figure("10_selection_check", NB["10"], selection_data, selection_draw, SWEEP_CONFIG),
    Figure("readme_training_curves", README, fr.qs_training_curves_data, fr.qs_training_curves_draw),
    Figure("readme_reward_vs_kl", README, fr.qs_reward_vs_kl_data, fr.qs_reward_vs_kl_draw),
    Figure("readme_winrate_by_family", README, fr.qs_winrate_data, fr.qs_winrate_draw),
    Figure("readme_pair_grid", README, fm.pair_grid_data, fm.pair_grid_draw, "selection.toy_batch()"),
]}


def select(only=None):
    """The figures named in `only` (names, or a comma-separated string), all of them when None."""
    if only is None:
        return list(REGISTRY.values())
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"--only: unknown figure {unknown[0]!r}; `kdpo figures --list` prints the {len(REGISTRY)} names")
    return [REGISTRY[n] for n in names]


def csv_table(data):
    """The CSV behind a figure: its one DataFrame, or all of them stacked with a `table` column first."""
    tables = {k: v for k, v in data.items() if isinstance(v, pd.DataFrame) and not k.startswith("_")}
    if len(tables) == 1:
        return next(iter(tables.values())).reset_index(drop=True)
    return pd.concat([t.assign(table=k)[["table", *t.columns]] for k, t in tables.items()], ignore_index=True)


def commit():
    """The checkout's commit (git rev-parse HEAD), "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_one(fig, ctx, rev):
    """Draw one figure into ctx.out; returns its manifest row."""
    import matplotlib.pyplot as plt
    t0 = time.perf_counter()
    data = fig.data(ctx)
    drawn = fig.draw(data)
    with warnings.catch_warnings():  # a colorbar's axes (Gram matrices) is not tight_layout's: harmless
        warnings.simplefilter("ignore", UserWarning)
        drawn.tight_layout()
    png, csv_path = Path(ctx.out) / f"{fig.name}.png", Path(ctx.out) / f"{fig.name}.csv"
    csv_table(data).to_csv(csv_path, index=False)
    drawn.savefig(png, dpi=110, bbox_inches="tight")
    plt.close("all")
    config = data.get("_config", f"{fig.config} ({ctx.mode} sizes)")
    return {"file": png.name, "figure": fig.name, "source": fig.source, "config": config, "commit": rev, "seed": ctx.seed,
            "mode": ctx.mode, "wall_s": round(time.perf_counter() - t0, 2)}


def read_manifest(out):
    path = Path(out) / "manifest.csv"
    return pd.read_csv(path, dtype=str).fillna("") if path.exists() else pd.DataFrame(columns=MANIFEST_COLUMNS)


def write_manifest(out, rows):
    """Merge rows into OUT/manifest.csv (one row per figure, the newest wins), in registry order."""
    old = {r["figure"]: r for r in read_manifest(out).to_dict("records")}
    old.update({r["figure"]: {k: str(v) for k, v in r.items()} for r in rows})
    order = list(REGISTRY) + sorted(set(old) - set(REGISTRY))
    with open(Path(out) / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(old[n] for n in order if n in old)


def _done(fig, ctx, row):
    """Both files are there, made in this mode with this seed (a fast figure never passes for a full one)."""
    there = all((Path(ctx.out) / f"{fig.name}{ext}").exists() for ext in (".png", ".csv"))
    return there and row is not None and row["mode"] == ctx.mode and row["seed"] == str(ctx.seed)


def make(ctx, only=None, force=False, progress=True):
    """Make the figures (all, or `only`) into ctx.out; returns {figure name: error line} of the failures.
    A figure whose PNG and CSV are there, made in the same mode and seed (manifest.csv), is skipped
    unless force."""
    import matplotlib
    import transformers
    from tqdm.auto import tqdm
    matplotlib.use("Agg")
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model load says nothing here
    figures = select(only)
    Path(ctx.out).mkdir(parents=True, exist_ok=True)
    rev, rows, failed, skipped = commit(), [], {}, 0
    made = {r["figure"]: r for r in read_manifest(ctx.out).to_dict("records")}
    bar = tqdm(figures, desc="figures", unit="fig", disable=not progress, dynamic_ncols=True)
    for fig in bar:
        bar.set_postfix_str(fig.name)
        if not force and _done(fig, ctx, made.get(fig.name)):
            skipped += 1
            continue
        try:
            rows.append(make_one(fig, ctx, rev))
        except Exception as e:  # noqa: BLE001  one figure's failure is reported, the others go on
            import matplotlib.pyplot as plt
            plt.close("all")
            failed[fig.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            tqdm.write(f"failed: {fig.name}: {failed[fig.name]}", file=sys.stderr)
        write_manifest(ctx.out, rows)
    bar.close()
    print(f"{len(rows)} figures made, {skipped} already there (--force remakes them), {len(failed)} failed; "
          f"manifest: {Path(ctx.out) / 'manifest.csv'}")
    return failed


# ---- the command ------------------------------------------------------------------------------------

def run(args, kdpo=None):
    """`kdpo figures` on parsed arguments; returns the exit status (1 if a figure failed)."""
    if args.list:
        for fig in REGISTRY.values():
            print(f"{fig.name:32s} {fig.source}")
        return 0
    if args.processes < 0:
        raise ValueError(f"--processes must be >= 0; got {args.processes}")
    ctx = Context(mode="fast" if args.fast else "full", seed=args.seed, out=Path(args.out), runs=Path(args.runs),
                  processes=args.processes, kdpo=kdpo)
    t0 = time.perf_counter()
    failed = make(ctx, args.only, args.force)
    print(f"wall time {time.perf_counter() - t0:.0f} s ({ctx.mode} mode)")
    return 1 if failed else 0
