"""The sweep's tidy table, read back from run folders alone, however the runs were run (`kdpo sweep`,
a Slurm array of its `--list`, by hand): one row per evaluation of a run.

A run folder OUT/runs/VARIANT/lrRATE_sSEED holds config.yaml, eval.jsonl (the validation evaluations
during training, one per line) and, once `kdpo eval RUN --split test` ran, eval_test.json. Each
becomes a row: identity (variant, kernel, divergence, loss_type, learning_rate, seed, run), split
("validation" or "test"), step, the metrics of `evaluation.evaluate`, and the run's cost (median
time/step_s, peak memory/peak_mb of its training). A learning-rate run scored again on more validation
prompts (eval_validation.json, the sweep's `select_generate`) has that evaluation as its last step's
validation row instead.
"""
import json
import os
from pathlib import Path

import pandas as pd
import yaml

ID = ["variant", "kernel", "divergence", "loss_type", "learning_rate", "seed"]


def read_run(folder, variant):
    """Rows of one run folder: each validation evaluation (eval.jsonl), and the test one (eval_test.json)."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    ident = {"variant": variant, "kernel": cfg.get("kernel") or "none", "divergence": cfg["divergence"],
             "loss_type": cfg["loss_type"], "learning_rate": float(cfg["learning_rate"]), "seed": cfg["seed"],
             "run": f"{variant}/{folder.name}", **_cost(folder)}
    rows = []
    if (folder / "eval.jsonl").exists():
        for line in (folder / "eval.jsonl").read_text().splitlines():
            if line:
                rows.append({**ident, "split": "validation", **_metrics(json.loads(line))})
    for split in ("validation", "test"):  # `kdpo eval` of the last checkpoint; a validation one replaces that step's row
        if (folder / f"eval_{split}.json").exists():
            rows.append({**ident, "split": split, **_metrics(json.loads((folder / f"eval_{split}.json").read_text())),
                         "step": cfg["max_steps"]})
    return rows


def _cost(folder):
    """The run's median seconds per training step and peak memory (from metrics.jsonl), for compute comparisons."""
    if not (folder / "metrics.jsonl").exists():
        return {}
    m = pd.read_json(folder / "metrics.jsonl", lines=True)
    return {k: agg(m[k]) for k, agg in (("time/step_s", pd.Series.median), ("memory/peak_mb", pd.Series.max)) if k in m}


def _metrics(result):
    return {k: v for k, v in result.items() if k != "samples"}


def collect(out):
    """The tidy table of a sweep folder, however its runs were run: one row per evaluation."""
    rows = []
    for folder in sorted(Path(out).glob("runs/*/*")):
        if folder.is_dir() and (folder / "config.yaml").exists():
            rows += read_run(folder, folder.parent.name)
    table = pd.DataFrame(rows, columns=None if rows else [*ID, "run", "split", "step"])
    return table.drop_duplicates(["run", "split", "step"], keep="last").reset_index(drop=True)


def write_table(out, copy=""):
    """Write OUT/table.csv (atomically) and the same table at `copy` (a committed path), if set."""
    table = collect(out)
    lead = [*ID, "split", "step"]
    table = table[lead + [c for c in table.columns if c not in lead]]
    for path in [Path(out) / "table.csv"] + ([Path(copy)] if copy else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path.with_suffix(".tmp"), index=False)
        os.replace(path.with_suffix(".tmp"), path)
    return table
