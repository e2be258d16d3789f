"""Facts about `kdpo select` (kdpo_lab.selection_report), on a tiny config-built reference."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from kdpo_lab import divergences, kernels, selection
from kdpo_lab import selection_report as R
from kdpo_lab.config import TrainConfig

N_EVAL = 64


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("select")
    cfg = TrainConfig(model="tiny-llama", d_model=32, n_layers=1, n_heads=2, vocab_size=300, max_train_pairs=64,
                      max_eval_pairs=N_EVAL, data="data/suite", seed=0)
    try:
        yield R.select(cfg, out, top=3), out
    finally:
        torch.set_num_threads(threads)


def test_score_grid_puts_the_papers_four_kernels_in_rows_and_seven_divergences_in_columns_in_order():
    pairs = list(selection.PAIRS)[::-1]  # a table in another order
    table = pd.DataFrame({"kernel": [k for k, _ in pairs], "divergence": [d for _, d in pairs],
                          "score": np.arange(28) / 28})
    grid = R.score_grid(table)
    assert list(grid.index) == list(kernels.PAPER_FOUR) and list(grid.columns) == list(divergences.PAPER_SEVEN)
    for k, d, s in table.itertuples(index=False):
        assert grid.loc[k, d] == s


def test_select_ranks_all_28_pairs_for_the_suite_and_each_of_its_four_families(report):
    rep, out = report
    written = pd.read_csv(out / "selection.csv")
    assert set(written.group) == {"all", "factuality", "instruction", "reasoning", "safety"}
    for group, rows in written.groupby("group"):
        assert len(rows) == 28 and set(zip(rows.kernel, rows.divergence)) == set(selection.PAIRS)
        assert rows["rank"].tolist() == list(range(1, 29)) and rows.score.is_monotonic_decreasing
        assert rep.selection.recommended[group] == (rows.kernel.iloc[0], rows.divergence.iloc[0])
    assert len(rep.table) == len(written) and (rep.table.score.to_numpy() == pytest.approx(written.score.to_numpy()))


def test_select_reads_the_validation_split_of_the_configured_reference(report):
    rep, _ = report
    families = [json.loads(line)["family"] for line in open("data/suite/validation.jsonl")][:N_EVAL]
    assert rep.reference.families == families and len(rep.reference.e_x) == N_EVAL


def test_select_writes_the_recalled_rule_labelled_features_and_both_heatmaps(report):
    rep, out = report
    rules = pd.read_csv(out / "rule_of_thumb.csv")
    assert set(rules.group) == set(rep.selection.tables)
    assert (rules.label == selection.RULE_LABEL).all()
    assert set(rules.kernel) <= set(kernels.PAPER_FOUR) and set(rules.divergence) <= set(divergences.PAPER_SEVEN)
    features = pd.read_csv(out / "features.csv")
    assert {"overlap", "coverage", "kurtosis", "drift"} <= set(features.columns)
    assert features.overlap.between(0, 1).all() and features.coverage.between(0, 1).all()
    for name in ("heatmap.png", "heatmap_by_family.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_heatmap_outlines_the_recommended_pair_and_the_recalled_pick(report):
    rep, _ = report
    marked = R.marks(rep.selection, rep.rules, "safety")
    assert marked["recommended (our score)"] == rep.selection.recommended["safety"]
    assert marked["rule of thumb (recalled)"] == (rep.rules["safety"]["kernel"], rep.rules["safety"]["divergence"])


def test_select_refuses_a_top_count_below_one(tmp_path):
    with pytest.raises(ValueError, match="top must be"):
        R.select(TrainConfig(), tmp_path, top=0)


def test_kdpo_select_ranks_the_pairs_from_the_command_line(tmp_path, capsys):
    from kdpo_lab import cli
    from kdpo_lab.suite import SUITE_DIR
    code = cli.main(["select", "--out", str(tmp_path / "sel"), "--model", "tiny-llama", "--d-model", "32",
                     "--n-layers", "1", "--n-heads", "2", "--vocab-size", "300", "--data", str(SUITE_DIR),
                     "--max-train-pairs", "64", "--max-eval-pairs", "24", "--max-length", "64",
                     "--max-prompt-length", "40"])
    assert code == 0 and (tmp_path / "sel" / "selection.csv").exists() and (tmp_path / "sel" / "heatmap.png").exists()
    assert "wrote the ranked tables" in capsys.readouterr().out
