"""Facts about the committed notebooks as a reader on a code host sees them (saved outputs only; nothing
is executed here: nbval runs them). Every cell that draws a figure carries its picture, no output holds
a machine path, and every course notebook links the notation page, asserts what it teaches and ends
with exercises."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(p.relative_to(NOTEBOOKS).as_posix() for p in NOTEBOOKS.rglob("*.ipynb")
             if ".ipynb_checkpoints" not in p.parts)
COURSE = [p for p in ALL if "/" not in p]  # the course itself; solutions/ holds the answers

# Saved from a fast-mode or stale run, waiting for their full-size re-save once the configuration names
# and modules of the other open issues have settled (issue 11). Empty this set as each is re-saved; the
# image and path checks below then hold for them too. Never weaken the checks instead.
PENDING_RESAVE = set()

# A cell plots when it calls pyplot, a kdpo_lab.plots function, a figures_math or figures_runs draw function,
# or pandas' / an Axes' plot methods.
PLOTS = re.compile(r"\bplt\.|\bplots\.plot_|\bfigures_(?:math|runs)\.\w+_draw\(|\.plot\(|\.plot\.|\.imshow\(|\.hist\(")
MACHINE_PATHS = ("/tmp/", "/work/", "/home/", "/Users/")


def cells(name, kind="code"):
    return [c for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if c["cell_type"] == kind]


def source(cell):
    return "".join(cell["source"])


def output_text(output):
    """Every text an output shows (stream, text/plain, html, markdown, tracebacks); never image data."""
    parts = [output.get("text", "")] + output.get("traceback", [])
    data = output.get("data", {})
    parts += [data.get(kind, "") for kind in ("text/plain", "text/html", "text/markdown", "text/latex")]
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def gpu_only_and_says_so(cell):
    """The one exception: a cell that can only plot on a GPU, whose saved output says it had none."""
    return "if GPU" in source(cell) and any("GPU" in output_text(o) for o in cell.get("outputs", []))


def saved(name):
    if name in PENDING_RESAVE:
        pytest.skip(f"{name} waits for its full-size re-save (PENDING_RESAVE)")


@pytest.mark.parametrize("name", ALL)
def test_every_plotting_cell_carries_its_image(name):
    saved(name)
    missing = [i for i, c in enumerate(cells(name)) if PLOTS.search(source(c)) and not gpu_only_and_says_so(c)
               and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not missing, f"{name}: code cells {missing} (counting code cells from 0) plot but carry no image"


@pytest.mark.parametrize("name", ALL)
def test_no_output_holds_a_machine_path(name):
    saved(name)
    leaks = [(i, path) for i, c in enumerate(cells(name)) for o in c.get("outputs", [])
             for path in MACHINE_PATHS if path in output_text(o)]
    assert not leaks, f"{name}: code cells with machine paths in their outputs: {leaks}"


@pytest.mark.parametrize("name", ALL)
def test_every_saved_notebook_was_run_top_to_bottom_without_error(name):
    saved(name)
    errors = [i for i, c in enumerate(cells(name)) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: code cells {errors} saved with an error"


# ---- the course's shape (checked on the sources, so it holds before any re-save) ------------------

COURSE_NOTEBOOKS = COURSE


@pytest.mark.parametrize("name", COURSE_NOTEBOOKS)
def test_course_notebook_links_the_notation_page_in_its_first_cell(name):
    first = source(json.loads((NOTEBOOKS / name).read_text())["cells"][0])
    assert "../docs/notation.md" in first


@pytest.mark.parametrize("name", COURSE_NOTEBOOKS)
def test_course_notebook_records_its_run_first_and_its_wall_time_last(name):
    code = cells(name)
    assert "run_record(" in source(code[0]) and "wall_time()" in source(code[-1])


@pytest.mark.parametrize("name", COURSE_NOTEBOOKS)
def test_course_notebook_asserts_at_least_five_facts(name):
    n = sum(len(re.findall(r"^\s*assert\b", source(c), flags=re.M)) for c in cells(name))
    assert n >= 5, f"{name}: {n} asserts"


@pytest.mark.parametrize("name", COURSE_NOTEBOOKS)
def test_course_notebook_has_two_or_three_checked_exercises_and_a_solutions_notebook(name):
    checks = [c for c in cells(name) if re.search(r"exercises\.check_\w+\(", source(c))]
    assert 2 <= len(checks) <= 3
    solutions = f"solutions/{name.removesuffix('.ipynb')}_solutions.ipynb"
    assert solutions in ALL
    solved = "".join(source(c) for c in cells(solutions))
    assert all(re.search(r"exercises\.(check_\w+)\(", source(c)).group(1) in solved for c in checks)




def test_no_notebook_cites_notes_a_reader_does_not_have():
    cited = [n for n in ALL if re.search(r"paper[- ]notes", (NOTEBOOKS / n).read_text(), flags=re.I)]
    assert not cited, f"cite the paper's own sections instead: {cited}"
