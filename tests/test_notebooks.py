"""The notebooks are the source: each runs under papermill, and each matches its exported script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPTS

NOTEBOOKS = ROOT / "notebooks"
JUPYTEXT = Path(sys.executable).with_name("jupytext")


def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def small_parameters(name: str, data_dir: Path, tmp: Path) -> dict:
    """Each notebook's parameters shrunk for a 2-core CPU. A new notebook must be added here."""
    common = {"data_dir": str(data_dir), "image_size": 32}
    return {
        "data": {**common, "batch_size": 8, "max_workers": 2, "batches_to_time": 3},
        "model": {"num_classes": 6, "image_size": 32, "arch": "resnet18"},
        "train": {**common, "epochs": 2, "batch_size": 8, "workers": 0, "out_dir": str(tmp / "run")},
        "resilience": {**common, "epochs": 2, "batch_size": 8, "out_dir": str(tmp / "run")},
        "speed": {**common, "batch_size": 8, "out_dir": str(tmp / "run")},
        "sweep": {**common, "epochs": 1, "sweep_file": str(ROOT / "slurm" / "sweep.csv"), "runs_dir": str(tmp / "runs")},
        "train_dp": {**common, "epochs": 1, "batch_size": 8, "workers": 0, "out_dir": str(tmp / "run")},
        "train_ddp": {**common, "epochs": 1, "batch_size": 8, "processes": 2, "out_dir": str(tmp / "run"),
                      "memory_image_size": 64},
        "benchmark": {**common, "arch": "resnet18", "batch_size": 8, "images": 16, "warmup": 1, "steps": 1,
                      "repeats": 1, "out_dir": str(tmp / "bench")},
    }[name]


def test_every_notebook_has_its_script_and_every_script_its_notebook():
    scripts = sorted(p.stem for p in SCRIPTS.glob("*.py"))
    assert notebook_names() == scripts


def export(name: str) -> str:
    """scripts/<name>.py as `make sync` writes it: jupytext with the repository's jupytext.toml,
    here in this process (the command costs seconds to start, each time)."""
    import jupytext
    from jupytext.config import load_jupytext_config
    config = load_jupytext_config(str(NOTEBOOKS))
    return jupytext.writes(jupytext.read(NOTEBOOKS / f"{name}.ipynb"), fmt="py:percent", config=config)


@pytest.mark.parametrize("name", notebook_names())
def test_no_drift_between_notebook_and_script(name):
    assert export(name) == (SCRIPTS / f"{name}.py").read_text(), (
        f"notebooks/{name}.ipynb and scripts/{name}.py differ: edit the notebook, then run `make sync`")


def test_the_drift_test_exports_as_make_sync_does():
    name = min(notebook_names(), key=lambda n: (NOTEBOOKS / f"{n}.ipynb").stat().st_size)
    command = subprocess.run([str(JUPYTEXT), "--to", "py:percent", "-o", "-", str(NOTEBOOKS / f"{name}.ipynb")],
                             capture_output=True, text=True, check=True, cwd=ROOT)  # as the Makefile's sync
    assert command.stdout == export(name)


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_is_committed_without_outputs_and_has_parameters(name):
    notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code)
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    assert any("Exercise" in "".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown")


# Every notebook is executed with these parameters once per test run, as shipped and with the
# exercises' solutions (the executed_notebooks fixture, tests/notebook_tools.py): in a real
# JupyterLab when the browser tests (tests/test_jupyterlab.py) are selected, else under papermill;
# the exercise checks (tests/test_exercises.py), the lessons' measures (tests/test_lessons.py) and
# the course site (tests/test_site.py) read those copies.
