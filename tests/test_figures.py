"""Facts about `kdpo figures`: every registered figure draws in fast mode from its tables, the manifest
records each, --only and skipping work, and every plotting cell of the notebooks has a figure."""
import inspect
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from kdpo_lab import cli, figures, figures_math, figures_runs, package_root
from kdpo_lab.figures import Context, Figure

pytestmark = pytest.mark.usefixtures("one_thread")

NOTEBOOKS = sorted((package_root() / "notebooks").glob("[01][0-9]_*.ipynb"))


@pytest.fixture(scope="session")
def fast(tmp_path_factory):
    """Every figure made once in fast mode, runs trained in this process: (context, failures)."""
    root = tmp_path_factory.mktemp("figures")
    ctx = Context(mode="fast", out=root / "figures", runs=root / "runs", processes=0, kdpo=cli.main)
    return ctx, figures.make(ctx, progress=False)


def test_every_registered_figure_draws_in_fast_mode(fast):
    ctx, failed = fast
    assert not failed, failed
    for name in figures.REGISTRY:
        png = ctx.out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name  # an image, not a blank


def test_the_manifest_has_a_row_per_figure_with_commit_seed_and_wall_time(fast):
    ctx, failed = fast
    manifest = pd.read_csv(ctx.out / "manifest.csv", dtype=str)
    assert list(manifest.columns) == figures.MANIFEST_COLUMNS
    assert set(manifest["figure"]) == set(figures.REGISTRY) - set(failed)
    assert (manifest["file"] == manifest["figure"] + ".png").all()
    assert manifest["commit"].str.fullmatch(r"[0-9a-f]{40}|unknown").all()
    assert (manifest["seed"] == "0").all() and (manifest["mode"] == "fast").all()
    assert (manifest["wall_s"].astype(float) > 0).all() and (manifest["config"].str.len() > 0).all()
    sources = {f.name: f.source for f in figures.REGISTRY.values()}
    assert all(sources[f] == s for f, s in zip(manifest["figure"], manifest["source"]))


@pytest.mark.parametrize("name", ["01_closed_form_optimum", "03_sinkhorn", "05_reward_vs_kl", "07_hmk_vs_dpo"])
def test_a_figures_csv_reads_back_as_the_tables_it_was_drawn_from(fast, name):
    ctx, _ = fast
    table = figures.csv_table(figures.REGISTRY[name].data(ctx))  # the data functions cache: no retraining
    back = pd.read_csv(ctx.out / f"{name}.csv")
    pd.testing.assert_frame_equal(back, table.reset_index(drop=True), check_dtype=False, atol=1e-9)


def test_every_csv_can_draw_its_figure_again(fast):
    # the CSV is the figure's data: a draw from it (plus the '_' objects) gives the same figure
    ctx, _ = fast
    name = "05_training_curves"
    data = figures.REGISTRY[name].data(ctx)
    back = pd.read_csv(ctx.out / f"{name}.csv")
    fig = figures.REGISTRY[name].draw({**data, "metrics": back})
    lines = [len(ax.get_lines()) for ax in fig.axes]
    assert lines == [len(figures_runs.VARIANTS_05)] * 4


def test_several_tables_are_stacked_with_a_table_column_first():
    a, b = pd.DataFrame({"x": [1, 2]}), pd.DataFrame({"y": [3.0]})
    table = figures.csv_table({"a": a, "b": b, "_kernels": object(), "_config": "c"})
    assert list(table.columns) == ["table", "x", "y"] and list(table["table"]) == ["a", "a", "b"]
    assert figures.csv_table({"a": a}).equals(a)


def test_a_second_call_skips_existing_figures_and_force_remakes_them(fast):
    ctx, _ = fast
    png = ctx.out / "01_loss_and_weight.png"
    before = png.stat().st_mtime_ns
    assert figures.make(ctx, only="01_loss_and_weight", progress=False) == {}
    assert png.stat().st_mtime_ns == before
    assert figures.make(ctx, only="01_loss_and_weight", force=True, progress=False) == {}
    assert png.stat().st_mtime_ns > before
    manifest = pd.read_csv(ctx.out / "manifest.csv")
    assert (manifest["figure"] == "01_loss_and_weight").sum() == 1  # remade, not appended


def test_only_makes_just_the_named_figures(tmp_path):
    ctx = Context(mode="fast", out=tmp_path, runs=tmp_path / "runs", processes=0, kdpo=cli.main)
    assert figures.make(ctx, only="01_loss_and_weight,readme_pair_grid", progress=False) == {}
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["01_loss_and_weight.png", "readme_pair_grid.png"]
    assert list(pd.read_csv(tmp_path / "manifest.csv")["figure"]) == ["01_loss_and_weight", "readme_pair_grid"]


def test_an_unknown_figure_name_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["figures", "--fast", "--out", str(tmp_path), "--only", "05_reward_vs_kl,no_such_figure"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--only" in err and "no_such_figure" in err


def test_a_failing_figure_is_reported_in_one_line_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("no table here\nsecond line")

    registry = {"broken": Figure("broken", "README.md", broken, None), "01_loss_and_weight": figures.REGISTRY["01_loss_and_weight"]}
    monkeypatch.setattr(figures, "REGISTRY", registry)
    assert cli.main(["figures", "--fast", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 1
    assert (tmp_path / "01_loss_and_weight.png").exists() and not (tmp_path / "broken.png").exists()
    assert "failed: broken: RuntimeError: no table here\n" in capsys.readouterr().err


def test_a_mode_other_than_fast_or_full_is_refused():
    with pytest.raises(ValueError, match="mode must be one of fast, full"):
        Context(mode="quick")


# ---- every plotting cell of the notebooks has a figure --------------------------------------------

def plotting_cells(notebook):
    """Sources of the code cells that draw: a plots.* or figures_math/figures_runs.*_draw call, or a stored
    image output."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and (
        re.search(r"\bplots\.\w+\(|\bfigures_(?:math|runs)\.\w+_draw\(", "".join(c["source"])) or
        any("image/png" in o.get("data", {}) for o in c.get("outputs", [])))]


def plots_called(fn, seen=None):
    """plots.* functions a draw function calls, directly or through its module's helpers."""
    seen = set() if seen is None else seen
    module = inspect.getmodule(fn)
    source = inspect.getsource(fn)
    names = set(re.findall(r"\bplots\.(\w+)\(", source))
    for helper in set(re.findall(r"\b(_\w+)\(", source)) - seen:
        seen.add(helper)
        if callable(getattr(module, helper, None)):
            names |= plots_called(getattr(module, helper), seen)
    return names


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_every_plotting_cell_of_a_notebook_has_a_registered_figure(notebook):
    cells = plotting_cells(notebook)
    registered = [f for f in figures.REGISTRY.values() if f.source == f"notebooks/{notebook.name}"]
    assert len(registered) == len(cells), f"{notebook.name}: {len(cells)} plotting cells, {len(registered)} figures"
    used = {name for source in cells for name in re.findall(r"\bplots\.(\w+)\(", source)}
    drawn = set().union(*(plots_called(f.draw) for f in registered)) if registered else set()
    assert used <= drawn, f"{notebook.name}: plots.{sorted(used - drawn)} in a cell but in no figure's draw"


# notebooks 01-09 draw every figure with the library's draw function, called by its module's name:
# figures_math (closed forms) or figures_runs (training runs); notebook 10 draws the committed tables
LIBRARY_DRAWN = [f"{n:02d}" for n in range(1, 10)]
DRAW_MODULES = {figures_math.__name__: "figures_math", figures_runs.__name__: "figures_runs"}


@pytest.mark.parametrize("stem", LIBRARY_DRAWN)
def test_a_notebook_draws_each_of_its_figures_with_the_library_draw_function(stem):
    notebook = figures.NB[stem]
    code = ["".join(c["source"]) for c in json.loads((package_root() / notebook).read_text())["cells"] if c["cell_type"] == "code"]
    registered = [f for f in figures.REGISTRY.values() if f.source == notebook]
    assert registered and all(f.draw.__module__ in DRAW_MODULES for f in registered), notebook
    calls = {f.name: f"{DRAW_MODULES[f.draw.__module__]}.{f.draw.__name__}(" for f in registered}
    missing = [f"{name}: {call}" for name, call in calls.items() if not any(call in source for source in code)]
    assert not missing, f"{notebook}: no code cell calls {missing}"


def test_the_readmes_four_quickstart_figures_are_registered():
    readme = (package_root() / "README.md").read_text()
    for png in ("training_curves.png", "reward_vs_kl.png", "winrate_by_family.png", "pair_grid.png"):
        assert png in readme and f"readme_{png.removesuffix('.png')}" in figures.REGISTRY


def test_kdpo_quickstart_draws_the_readmes_figures_with_the_functions_kdpo_figures_uses():
    import inspect

    from kdpo_lab import quickstart
    report = inspect.getsource(quickstart.write_report)
    for name, fn in (("readme_training_curves", "draw_training_curves"), ("readme_reward_vs_kl", "draw_reward_vs_kl"),
                     ("readme_winrate_by_family", "draw_winrate")):
        assert f"quickstart.{fn}(" in inspect.getsource(figures.REGISTRY[name].draw) and f"{fn}(" in report


def test_the_readme_counts_the_figures_the_registry_holds():
    counts = {int(n) for n in re.findall(r"the (\d+) figures", (package_root() / "README.md").read_text())}
    assert counts == {len(figures.REGISTRY)}, f"README says {sorted(counts)} figures; the registry holds {len(figures.REGISTRY)}"


def test_plots_called_follows_helpers():
    # the coverage test's own tool: a draw that calls a helper is credited with the helper's plots
    assert "plot_grouped_bars" in plots_called(figures_math.kernel_accuracy_draw)
    assert "plot_hmk_weights" in plots_called(figures_math.hmk_strong_draw)


# ---- the sweep's table ------------------------------------------------------------------------------

def test_a_sweep_table_with_a_variant_short_of_seeds_is_called_partial():
    rows = [{"variant": v, "seed": s, "split": "test"} for v, seeds in {"dpo": [1, 2, 3], "rbf+kl": [1, 2]}.items() for s in seeds]
    note = figures_runs.partial_note(pd.DataFrame(rows + [{"variant": "rbf+kl", "seed": 3, "split": "validation"}]))
    assert note.startswith("sweep table is partial: 1 of 2 variants") and "rbf+kl: 2" in note
    assert figures_runs.partial_note(pd.DataFrame([r for r in rows if r["variant"] == "dpo"])) == ""


def test_full_mode_reads_the_committed_sweep_table_and_never_launches_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(figures_runs, "package_root", lambda: tmp_path)
    monkeypatch.setattr(figures_runs.sweep, "execute", lambda *a, **k: pytest.fail("full mode launched a sweep"))
    with pytest.raises(FileNotFoundError, match="never launches"):
        figures_runs.sweep_table(Context(mode="full", runs=tmp_path))
    (tmp_path / "results" / "sweep").mkdir(parents=True)
    pd.DataFrame([{"variant": "dpo", "seed": 1, "split": "test"}]).to_csv(tmp_path / "results" / "sweep" / "table.csv", index=False)
    assert len(figures_runs.sweep_table(Context(mode="full", runs=tmp_path))) == 1


def test_a_fast_figure_is_not_taken_for_a_full_one(tmp_path):
    fast = Context(mode="fast", out=tmp_path, runs=tmp_path / "runs")
    assert figures.make(fast, only="01_loss_and_weight", progress=False) == {}
    figures.make(Context(mode="full", out=tmp_path, runs=tmp_path / "runs"), only="01_loss_and_weight", progress=False)
    assert list(pd.read_csv(tmp_path / "manifest.csv")["mode"]) == ["full"]  # remade, not skipped


def test_ensure_runs_only_missing_runs_and_names_a_failed_one(tmp_path):
    from kdpo_lab.sweep import Job
    calls = []

    def kdpo(argv):  # a stand-in for cli.main: "trains" by writing model/ unless told to fail
        calls.append(argv[1])
        if argv[0] == "ok":
            (Path(argv[1]) / "model").mkdir(parents=True)

    ctx = Context(runs=tmp_path, processes=0, kdpo=kdpo)
    (tmp_path / "done" / "model").mkdir(parents=True)
    jobs = [Job(f"r/{n}", tmp_path / n, [["ok", str(tmp_path / n)]]) for n in ("done", "new")]
    assert figures_runs.ensure(ctx, jobs) == [tmp_path / "done", tmp_path / "new"]
    assert calls == [str(tmp_path / "new")]  # the finished run is not run again
    with pytest.raises(RuntimeError, match="run r/bad failed: no model"):
        figures_runs.ensure(ctx, [Job("r/bad", tmp_path / "bad", [["fail", str(tmp_path / "bad")]])])
