"""Two sets of pins: requirements.txt (what a learner needs; environment.yml installs exactly
these) and requirements-dev.txt (the tests' tools, on top); the installed environment has both."""
from __future__ import annotations

import re
from importlib.metadata import version

from conftest import ROOT

COURSE = {"torch", "torchvision", "wandb", "jupyterlab", "ipywidgets", "jupytext", "ipykernel", "tqdm", "matplotlib"}
TESTS_ONLY = {"pytest", "pytest-xdist", "papermill", "nbclient", "playwright", "spython", "sphinx", "myst-nb"}
EXACT_VERSION = re.compile(r"\d+(\.\d+)*((a|b|rc|\.post|\.dev)\d+)?")


def pins(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*(?:-\s+)?([A-Za-z0-9_.-]+)==([^\s#]+)\s*(?:#.*)?", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def requirement_lines(name: str) -> list[str]:
    """The requirement lines of a requirements file: no comments, blanks or `-r` includes."""
    return [line for line in (ROOT / name).read_text().splitlines() if line.strip() and not line.startswith(("#", "-r "))]


def requirements(name: str = "requirements.txt") -> dict[str, str]:
    return pins(requirement_lines(name))


def environment_pip_section() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    section = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        section.append(line)
    return pins(section)


def test_requirements_pin_every_package_exactly_and_learners_get_no_test_tool():
    assert COURSE <= requirements().keys() and requirements().keys().isdisjoint(TESTS_ONLY)
    assert TESTS_ONLY <= requirements("requirements-dev.txt").keys()
    for name in ("requirements.txt", "requirements-dev.txt"):
        loose = [line for line in requirement_lines(name) if not re.fullmatch(
            rf"[A-Za-z0-9_.-]+=={EXACT_VERSION.pattern}", line.split("#")[0].strip())]
        assert loose == [], f"{name}: pin each package to one version (name==1.2.3)"


def test_the_tests_requirements_add_their_tools_to_the_course_requirements():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in lines  # `pip install -r requirements-dev.txt` installs both
    assert requirements().keys().isdisjoint(requirements("requirements-dev.txt"))  # one pin per package


def test_environment_yml_installs_the_course_pins_and_no_test_tool():
    assert environment_pip_section() == requirements()
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_the_installed_environment_matches_both_sets_of_pins():
    wanted = {**requirements(), **requirements("requirements-dev.txt")}
    mismatched = {name: (pin, version(name)) for name, pin in wanted.items() if version(name).split("+")[0] != pin}
    assert mismatched == {}
