"""One set of pins: requirements.txt, environment.yml and the installed environment agree."""
from __future__ import annotations

import re
from importlib.metadata import version

from conftest import ROOT

REQUIRED = {"torch", "torchvision", "wandb", "jupyterlab", "ipywidgets", "papermill", "nbclient",
            "jupytext", "ipykernel", "tqdm", "matplotlib", "pytest", "playwright"}


def pins(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*(?:-\s+)?([A-Za-z0-9_.-]+)==([^\s#]+)\s*(?:#.*)?", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def requirements() -> dict[str, str]:
    return pins((ROOT / "requirements.txt").read_text().splitlines())


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


def test_requirements_pin_every_course_package_exactly():
    assert REQUIRED <= requirements().keys()
    assert requirements()["torch"] == "2.14.1" and requirements()["torchvision"] == "0.29.1"
    unpinned = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#") and "==" not in line]
    assert unpinned == []


def test_environment_yml_installs_the_same_pins_through_pip():
    assert environment_pip_section() == requirements()
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_the_installed_environment_matches_the_pins():
    mismatched = {name: (pin, version(name)) for name, pin in requirements().items()
                  if version(name).split("+")[0] != pin}
    assert mismatched == {}
