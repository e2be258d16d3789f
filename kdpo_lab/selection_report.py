"""`kdpo select CONFIG`: rank the paper's 28 kernel-divergence pairs for a reference model, before training.

One pass of the reference (`cfg.model`: a run folder's model/, a hub name, or a config-built model)
over the validation split gives `selection.reference_features`; `selection.select_pairs` turns them
into the ranked 4 x 7 table for the whole suite and for each family, and `selection.rule_of_thumb`
gives the paper's rule as recalled from secondary summaries (unverified). The metrics are kdpo_lab's
own design (the paper's are not recoverable); `selection.validate` checks them against trained runs.

Writes to out_dir:
  selection.csv        one row per (group, pair): group ("all" or a family), rank, kernel, divergence,
                       score, both halves' scores and the reason
  rule_of_thumb.csv    one row per group: the recalled rule's kernel and divergence, its reason and label
  features.csv         one row per group: the divergence-side features (overlap, coverage, kurtosis, drift)
  heatmap.png          the 4 x 7 scores of the whole suite (rows kernels.PAPER_FOUR, columns
                       divergences.PAPER_SEVEN), recommended pair and recalled pick outlined
  heatmap_by_family.png  the same, one panel per family
"""
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kdpo_lab import batching, divergences, kernels, selection
from kdpo_lab.config import CONFIG_MODELS
from kdpo_lab.loading import build_or_load, encode, read_pairs


@dataclass
class Report:
    """What `select` found: the Selection (ranked tables, recommended pairs, features, per group), the
    recalled rule's pick per group, the reference's features, and the tidy table written to selection.csv."""
    selection: selection.Selection
    rules: dict
    reference: selection.ReferenceFeatures
    table: pd.DataFrame


def score_grid(table):
    """The 4 x 7 score grid of a ranked table: rows kernels.PAPER_FOUR, columns divergences.PAPER_SEVEN."""
    grid = table.pivot(index="kernel", columns="divergence", values="score")
    return grid.reindex(index=list(kernels.PAPER_FOUR), columns=list(divergences.PAPER_SEVEN))


def reference_of(cfg):
    """(model, tokenizer, validation features) of cfg's reference; a config-built model gets its tokenizer
    from the training split, as `kdpo sft` builds it."""
    pairs, report = read_pairs(cfg, "validation", cfg.max_eval_pairs)
    texts = batching.sft_texts(read_pairs(cfg, "train", cfg.max_train_pairs)[0]) if cfg.model in CONFIG_MODELS else None
    model, tokenizer = build_or_load(cfg, texts)
    return model, tokenizer, encode(cfg, tokenizer, pairs, report, "validation")


def select(cfg, out_dir, top=5):
    """Rank the 28 pairs for cfg's reference on its validation split (at most cfg.max_eval_pairs pairs),
    write the tables and heatmaps to out_dir, print the top `top` rows of each group with their reasons,
    and return a Report."""
    if not (isinstance(top, int) and top >= 1):
        raise ValueError(f"top must be an integer >= 1; got {top!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, feats = reference_of(cfg)
    ref = selection.reference_features(model, feats, tokenizer.pad_token_id)
    sel = selection.select_pairs(ref)
    rules = {}
    for group in sel.tables:
        sub = ref if group == "all" else ref.subset([i for i, f in enumerate(ref.families) if f == group])
        rules[group] = selection.rule_of_thumb(sel.features[group], selection.kernel_table(sub))
    table = pd.concat([t.assign(group=g, rank=range(1, len(t) + 1)) for g, t in sel.tables.items()])
    table = table[["group", "rank", "kernel", "divergence", "score", "kernel_score", "divergence_score", "reason"]]
    table.to_csv(out / "selection.csv", index=False)
    pd.DataFrame([{"group": g, **r} for g, r in rules.items()]).to_csv(out / "rule_of_thumb.csv", index=False)
    pd.DataFrame([{"group": g, **f} for g, f in sel.features.items()]).to_csv(out / "features.csv", index=False)
    _heatmaps(sel, rules, out)
    _print(sel, rules, top, len(feats))
    return Report(sel, rules, ref, table.reset_index(drop=True))


def marks(sel, rules, group):
    """The cells to outline on a group's heatmap: {label: (kernel, divergence)}."""
    return {"recommended (our score)": sel.recommended[group],
            "rule of thumb (recalled)": (rules[group]["kernel"], rules[group]["divergence"])}


def _heatmaps(sel, rules, out):
    import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg; in a notebook, figures are closed

    from kdpo_lab import plots

    plots.plot_selection_heatmap(score_grid(sel.tables["all"]), marks=marks(sel, rules, "all"),
                                 title="selection score, whole suite")
    plt.tight_layout()
    plt.savefig(out / "heatmap.png", dpi=110)
    plt.close("all")
    families = [g for g in sel.tables if g != "all"]
    if families:
        _, axes = plt.subplots(len(families), 1, figsize=(8, 3.2 * len(families)), squeeze=False)
        for ax, family in zip(axes[:, 0], families):
            plots.plot_selection_heatmap(score_grid(sel.tables[family]), ax=ax, marks=marks(sel, rules, family),
                                         title=f"selection score, {family}")
        plt.tight_layout()
        plt.savefig(out / "heatmap_by_family.png", dpi=110)
        plt.close("all")


def _print(sel, rules, top, n):
    print(f"selection on {n} validation pairs (metrics: kdpo_lab's own design, see kdpo_lab/selection.py)")
    for group, table in sel.tables.items():
        print(f"\n== {group}: recommended {'+'.join(sel.recommended[group])}; rule of thumb "
              f"({rules[group]['label']}): {rules[group]['kernel']}+{rules[group]['divergence']} "
              f"[{rules[group]['reason']}]")
        for i, row in table.head(top).iterrows():
            print(f"{i + 1:2d}. {row.kernel:>11} + {row.divergence:<13} {row.score:.3f}  {row.reason}")
