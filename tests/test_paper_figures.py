"""Facts about notebook 10's figure tables (kdpo_lab.paper_figures): paired by seed, per family, the
selection scatter marks its picks, and each is an empty table (a "pending" panel) without runs."""
import matplotlib
import numpy as np
import pandas as pd
import pytest

from kdpo_lab import paper_figures, plots, selection
from kdpo_lab import paper_claims as P
from test_paper_claims import FAMILIES, pair_sweep

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def sweep():
    table, tables = pair_sweep()
    return P.final_table(table, P.Expected((1, 2, 3))), tables


def test_each_pair_is_its_offset_above_dpo_on_every_seed_so_its_interval_has_no_width(sweep):
    final, _ = sweep
    d = paper_figures.differences_to_dpo(final).set_index("variant")
    for i, (k, dv) in enumerate(selection.PAIRS):
        assert d.loc[f"{k}+{dv}", "mean"] == pytest.approx(0.01 * i, abs=1e-12)
        assert d.loc[f"{k}+{dv}", "high"] - d.loc[f"{k}+{dv}", "low"] == pytest.approx(0, abs=1e-9)
    assert (d["n_seeds"] == 3).all() and list(d["mean"]) == sorted(d["mean"])  # sorted for the figure


def test_family_differences_show_the_kl_hybrids_in_every_family(sweep):
    final, _ = sweep
    table = paper_figures.family_differences(final)
    assert set(table["family"]) == set(FAMILIES)
    assert set(table["variant"]) == set(paper_figures.SHOWN) - {"hmk"}  # the toy sweep has no HMK run


def test_the_scatter_marks_the_recommended_pair_and_the_recalled_rules_pick(sweep):
    final, tables = sweep
    points, pickers, note = paper_figures.selection_scatter(final, tables)
    assert len(points) == 28 and np.isclose(np.corrcoef(points["score"], points["value"])[0, 1], 1)
    marked = points.set_index("mark").drop("", errors="ignore")
    k27, d27 = selection.PAIRS[27]
    k3, d3 = selection.PAIRS[3]
    assert (marked.loc["recommended", "kernel"], marked.loc["recommended", "divergence"]) == (k27, d27)
    assert (marked.loc["rule of thumb (recalled)", "kernel"], marked.loc["rule of thumb (recalled)", "divergence"]) == (k3, d3)
    assert len(pickers) == 3 and note.startswith("Spearman +1.00")


def test_without_runs_every_table_is_empty_and_draws_a_pending_panel(sweep):
    _, tables = sweep
    empty = pd.DataFrame(columns=["variant", "seed", "kernel", "divergence"])
    assert not len(paper_figures.differences_to_dpo(empty)) and not len(paper_figures.family_differences(empty))
    points, pickers, note = paper_figures.selection_scatter(empty, tables)
    assert not len(points) and note == ""
    ax = plots.plot_differences(paper_figures.differences_to_dpo(empty))
    assert "pending" in ax.texts[0].get_text()
