"""The environment's three descriptions agree (ranges in pyproject.toml, exact pins in constraints.txt and
environment.yml), the package carries its data and configs, and the README's two commands are what CI runs."""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements():
    """Every third-party requirement of pyproject.toml: dependencies and every extra (not kdpo_lab itself)."""
    project = pyproject()["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in reqs if not r.startswith("kdpo_lab")]


def constraint_pins():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return sorted(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def conda_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return sorted(next(d["pip"] for d in env["dependencies"] if isinstance(d, dict)))


def _name(text):
    return re.split(r"[=<>!~\[ ;]", text, maxsplit=1)[0].lower().replace("_", "-")


def test_every_constraint_is_an_exact_pin():
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.]*", pin) for pin in constraint_pins())


def test_pyproject_declares_ranges_not_pins_so_kdpo_lab_installs_beside_other_tools():
    assert all(r.specifier and not any(s.operator == "==" for s in r.specifier) for r in requirements())


def test_every_pinned_version_satisfies_pyprojects_range_and_every_requirement_is_pinned():
    pins = {_name(p): p.split("==")[1] for p in constraint_pins()}
    for req in requirements():
        assert _name(req.name) in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[_name(req.name)]), f"{req.name}=={pins[_name(req.name)]} not in {req}"
    assert set(pins) == {_name(r.name) for r in requirements()}


def test_environment_yml_pins_the_same_packages_as_constraints():
    assert conda_pins() == constraint_pins()


def test_the_trl_drop_in_has_its_own_extra():
    extras = pyproject()["project"]["optional-dependencies"]
    assert [_name(r) for r in extras["trl"]] == ["trl"] and "kdpo_lab[trl]" in extras["dev"]


def test_make_installs_torch_first_then_the_package_under_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    torch_line = makefile.index("pip install --quiet torch==")
    assert torch_line < makefile.index('pip install --quiet -c constraints.txt -e ".[dev]"')


def test_data_and_configs_ship_inside_the_package():
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"kdpo_lab._assets.configs": "configs", "kdpo_lab._assets.data": "data"}
    data = setuptools["package-data"]["kdpo_lab._assets.data"]
    shipped = {p.relative_to(ROOT / "data").as_posix() for p in (ROOT / "data").rglob("*") if p.is_file()}
    assert {f for f in shipped if any(Path(f).match(pattern) for pattern in data)} == shipped


def test_ci_runs_the_test_command_the_readme_gives():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set "))]
    readme = (ROOT / "README.md").read_text()
    assert ci == ["make test"] and "make test" in readme and "make quickstart" in readme
