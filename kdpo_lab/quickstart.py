"""The main job (`make quickstart`): from the bundled data to figures, on 2 CPU cores in a few minutes.

1. SFT a tiny Llama (built from a config, tokenizer built from the data) on chosen and rejected
   responses of the synthetic suite: the reference pi_ref.
2. Align it four ways: plain DPO (KL), Jensen-Shannon link, the hybrid loss with an RBF kernel, and
   the hierarchical mixture of kernels (HMK) with its entropy term; evaluations along the way.
3. Evaluate on held-out pairs and sampled generations (exact rewards, win-rate, KL to the reference).
4. Write results.csv / results.md and figures: training curves, reward vs KL, win-rate per family,
   and the toy-batch grid of all 28 kernel-divergence pairs.
KDPO_FAST=1 (or --fast) shrinks every size: a smoke test of the same path.
"""
import json
from pathlib import Path

import matplotlib
import pandas as pd

from kdpo_lab import fast_mode, plots, selection
from kdpo_lab.config import SFTConfig, TrainConfig
from kdpo_lab.training import sft, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS = {
    "DPO (KL)": dict(divergence="kl"),
    "JS link": dict(divergence="js"),
    "hybrid RBF": dict(kernel="rbf", gamma=0.5),
    "HMK": dict(kernel="hmk", gamma=0.5, eta=0.01),
}


def sizes(fast):
    if fast:
        return dict(sft_steps=20, dpo_steps=8, eval_every=4, n_generate=8, max_train_pairs=256, max_eval_pairs=32)
    return dict(sft_steps=400, dpo_steps=150, eval_every=50, n_generate=96, max_train_pairs=0, max_eval_pairs=256)


def run(out, fast=None):
    """Run the whole pipeline into `out`; returns the results table."""
    fast = fast_mode() if fast is None else fast
    s = sizes(fast)
    out = Path(out)
    base = dict(max_train_pairs=s["max_train_pairs"], max_eval_pairs=s["max_eval_pairs"], seed=0)
    ref_cfg = SFTConfig(output_dir=str(out / "sft"), model="tiny-llama", learning_rate=2e-3,
                        per_device_train_batch_size=32, max_steps=s["sft_steps"], warmup_steps=min(20, s["sft_steps"] // 5), **base)
    sft(ref_cfg)
    runs = {}
    for name, loss in VARIANTS.items():
        cfg = TrainConfig(output_dir=str(out / _slug(name)), model=str(out / "sft" / "model"), learning_rate=5e-5,
                          max_steps=s["dpo_steps"], eval_steps=s["eval_every"], eval_generate=s["n_generate"],
                          save_steps=s["dpo_steps"], **base, **loss)
        runs[name] = train(cfg)
    table = write_report(runs, out)
    math_demo(out)
    print(table.to_string(index=False))
    print(f"\nfigures and tables in {out}/")
    return table


def _slug(name):
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _read(path):
    return pd.read_json(path, lines=True) if path.exists() else pd.DataFrame()


def write_report(runs, out):
    """results.csv/.md and the figures, from the runs' metrics.jsonl and eval.jsonl."""
    metrics = {name: _read(run / "metrics.jsonl") for name, run in runs.items()}
    evals = {name: _read(run / "eval.jsonl") for name, run in runs.items()}
    rows = []
    for name, df in evals.items():
        last = df.iloc[-1].to_dict()
        rows.append({"variant": name, **{k: v for k, v in last.items() if k not in ("samples", "step")},
                     "time/step_s": metrics[name]["time/step_s"].median(),
                     "memory/peak_mb": metrics[name]["memory/peak_mb"].max()})
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    main_cols = [c for c in ("variant", "pref/accuracy", "pref/train_accuracy", "kl", "reward/policy", "reward/reference",
                             "winrate", "time/step_s", "memory/peak_mb") if c in table]
    (out / "results.md").write_text(markdown_table(table[main_cols]))

    draw_training_curves(metrics)
    _save(out / "training_curves.png")
    draw_reward_vs_kl(evals)
    _save(out / "reward_vs_kl.png")
    if "winrate" in table:
        draw_winrate(table.set_index("variant"))
        _save(out / "winrate_by_family.png")
    (out / "samples.json").write_text(json.dumps({n: e.iloc[-1].get("samples", []) for n, e in evals.items()}, indent=1))
    return table[main_cols]


# The README's three quickstart figures; `kdpo figures` draws them with these functions too.

def draw_training_curves(metrics):
    """Training curves of every variant, {variant: its metrics.jsonl as read}."""
    return plots.plot_training_curves(metrics)[0].figure


def draw_reward_vs_kl(evals):
    """Held-out reward against KL along training, {variant: its eval.jsonl as read}, with the reference's reward."""
    last = pd.DataFrame([e.iloc[-1] for e in evals.values()])
    ref_reward = last["reward/reference"].mean() if "reward/reference" in last else None
    return plots.plot_reward_vs_kl(evals, reference_reward=ref_reward).figure


def draw_winrate(final):
    """Win rate against the reference per task family, from each variant's last evaluation (index: variant)."""
    return plots.plot_by_family(final, "winrate/").figure


def math_demo(out):
    """Every kernel x divergence pair on a toy batch: pair_grid.csv and pair_grid.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = selection.pair_grid(selection.toy_batch())
    grid.to_csv(out / "pair_grid.csv", index=False)
    _, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    plots.plot_pair_grid(grid, "loss", ax=axes[0], title="mean loss on a toy batch")
    plots.plot_pair_grid(grid, "grad_weight", ax=axes[1], title=r"mean |d loss / d $\rho_w$|", fmt=".3f")
    _save(out / "pair_grid.png")
    return grid


def _save(path):
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")


def markdown_table(df):
    """A DataFrame as a markdown table, numbers to 3 decimals."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]) + "\n"

