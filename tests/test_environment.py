"""The two descriptions of the environment agree, and the README's two commands are what CI runs."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return sorted(project["dependencies"] + project["optional-dependencies"]["dev"])


def conda_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return sorted(next(d["pip"] for d in env["dependencies"] if isinstance(d, dict)))


def test_every_dependency_is_pinned_exactly():
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.]*", pin) for pin in pyproject_pins())


def test_environment_yml_pins_the_same_packages_as_pyproject():
    assert conda_pins() == pyproject_pins()


def test_ci_runs_the_test_command_the_readme_gives():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set "))]
    readme = (ROOT / "README.md").read_text()
    assert ci == ["make test"] and "make test" in readme and "make quickstart" in readme
