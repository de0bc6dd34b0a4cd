"""slurm/preflight.py (`make preflight`): one line per check, `ok|FAIL|skip NAME: detail`, and
exit status 1 on a FAIL. In this process, with stand-ins: sinfo and sbatch are small scripts
on PATH (slurm/submit runs unchanged and calls the stand-in sbatch), the GPUs are
tests/test_hardware.py's pretend_gpu, and the staged files live in a folder under /tmp that
others may enter, with the permission bits each test gives them."""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from cluster_tools import site_file
from conftest import ROOT, unavailable
from test_hardware import pretend_gpu

sys.path.insert(0, str(ROOT / "slurm"))
import preflight  # noqa: E402

LINE = re.compile(r"^(ok|FAIL|skip) [a-z]+( [\w.]+)?: \S.*$")
SINFO = """#!/bin/bash
printf 'small*|up|1|(null)\\naccel|up|1|gpu:4\\naccel|up|2|gpu:4\\n'
"""
# Accepts a GPU request on `accel`, refuses anything else as Slurm would, and records its options.
SBATCH = """#!/bin/bash
echo "$*" >>"$(dirname "$0")/sbatch.log"
for option; do
  case $option in --partition=accel) ok=1 ;; --partition=*) ok= ;; esac
done
[[ -n $ok ]] || { echo "sbatch: error: invalid partition specified" >&2; exit 1; }
echo "sbatch: Job 7 to start at 2026-05-04T09:00:00 using 2 processors on nodes gpu01 in partition accel" >&2
"""


def verdict(check, *args) -> tuple[str, str]:
    with pytest.raises(preflight.Check) as ended:
        check(*args)
    return ended.value.status, ended.value.detail


@pytest.fixture
def standins(tmp_path, monkeypatch) -> Path:
    """sinfo and sbatch stand-ins first on PATH; sbatch.log beside them gets sbatch's options."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sinfo", SINFO), ("sbatch", SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.fixture
def shared_dir():
    """A folder others may enter (pytest's own tmp folders are private), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="preflight-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def site(**settings) -> dict:
    return {name: settings.get(name, "") for name in preflight.SITE_VARIABLES}


# --- Slurm: the partition and the course's GPU requests ---------------------------------------

def test_the_partition_must_exist_be_up_and_have_gpus(standins):
    assert verdict(preflight.check_partition, site(SITE_PARTITION="accel")) == ("ok", "accel: up, 3 nodes, gres gpu:4")
    status, detail = verdict(preflight.check_partition, site())
    assert status == "FAIL" and "small (the default) has no GPUs" in detail and "SITE_PARTITION" in detail
    assert verdict(preflight.check_partition, site(SITE_PARTITION="gpu")) == (
        "FAIL", "no partition 'gpu' (sinfo lists: accel, small): set SITE_PARTITION in slurm/site.sh")


def test_without_slurm_the_slurm_checks_are_skipped_saying_where_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither sinfo nor sbatch
    assert verdict(preflight.check_partition, site())[0] == "skip"
    status, detail = verdict(preflight.check_sbatch, ROOT / "slurm" / "train.sbatch", ROOT / "slurm" / "site.sh")
    assert (status, detail) == ("skip", "no sbatch here: run the preflight on the cluster's login node")


def test_every_slurm_file_is_tested_with_the_sites_gpu_request(standins, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_SITE", str(site_file(tmp_path, SITE_PARTITION="accel", SITE_GPUS_PER_NODE="4")))
    files = sorted((ROOT / "slurm").glob("*.sbatch"))
    assert preflight.run_checks(preflight.checks(Namespace(only=["sbatch"]), site())) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"ok sbatch {f.name}" for f in files]
    assert all(line.endswith("on nodes gpu01 in partition accel") for line in lines)
    sent = (standins / "sbatch.log").read_text().splitlines()
    assert len(sent) == len(files) and all(s.startswith("--partition=accel ") and "--test-only" in s for s in sent)
    ddp = next(s for s in sent if s.endswith("slurm/ddp_srun_1node.sbatch"))
    assert "--gpus-per-node=4" in ddp and "--ntasks=4" in ddp  # slurm/submit's own GPU request, not a copy of it


def test_a_refused_request_is_a_fail_with_sbatchs_reason(standins, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_SITE", str(site_file(tmp_path, SITE_PARTITION="gpu")))
    assert preflight.run_checks(preflight.checks(Namespace(only=["sbatch"]), site())) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("FAIL sbatch ddp_srun_1node.sbatch: refused: sbatch: error: invalid partition specified")


# --- the GPUs and the installed PyTorch --------------------------------------------------------

def test_a_v100_fails_with_the_default_wheels_and_the_line_names_the_build_to_install(monkeypatch):
    pretend_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    status, detail = verdict(preflight.check_gpu, site())
    assert status == "FAIL" and "sm_70" in detail and "CUDA 12.6 builds" in detail and "COURSE_ENV_ACTIVATE" in detail


def test_a_gpu_whose_architecture_the_build_has_passes(monkeypatch):
    pretend_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    status, detail = verdict(preflight.check_gpu, site())
    assert status == "ok" and detail.startswith("1 x NVIDIA A100-SXM4-40GB (sm_80); torch ")
    assert detail.endswith("has kernels for sm_75 sm_80 sm_86 sm_90 sm_100 sm_120")


def test_without_gpus_the_check_is_skipped_with_the_srun_line_for_a_gpu_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    status, detail = verdict(preflight.check_gpu, site(SITE_PARTITION="accel", SITE_RESERVATION="course"))
    assert status == "skip" and detail.endswith(
        "run srun --partition=accel --reservation=course --gpus-per-node=1 --time=00:10:00 "
        "python slurm/preflight.py --only gpu")


# --- weights and data, readable by the learners -------------------------------------------------

def test_the_weights_must_be_there_and_readable_by_others(shared_dir):
    weights = shared_dir / "hub" / "resnet152.pth"
    assert verdict(preflight.check_weights, weights)[0] == "FAIL"  # not fetched yet
    weights.parent.mkdir()
    weights.write_bytes(b"w" * 2_000_000)
    weights.chmod(0o600)
    assert verdict(preflight.check_weights, weights) == ("FAIL", f"learners cannot read {weights}: chmod o+r {weights}")
    weights.chmod(0o644)
    weights.parent.chmod(0o700)
    assert verdict(preflight.check_weights, weights) == (
        "FAIL", f"learners cannot reach {weights}: chmod o+x {weights.parent}")
    weights.parent.chmod(0o755)
    assert verdict(preflight.check_weights, weights) == ("ok", f"{weights} (2 MB), readable by others")


def staged(root: Path) -> Path:
    for split in ("train", "valid", "test"):
        for name in ("ALBATROSS", "BLUE JAY"):
            (root / split / name).mkdir(parents=True)
            for i in (1, 2):
                (root / split / name / f"{i}.jpg").write_bytes(b"jpeg")
                (root / split / name / f"{i}.jpg").chmod(0o644)
            (root / split / name).chmod(0o755)
    return root


def test_the_data_must_have_its_splits_and_be_readable_by_others(shared_dir):
    root = staged(shared_dir / "birds")
    assert verdict(preflight.check_data, root) == (
        "ok", f"{root}: train, valid, test present; 10 folders and one file of each of 6 readable by others")
    jpegs = list((root / "valid" / "BLUE JAY").iterdir())
    for jpg in jpegs:  # all of them: which one the walk reads first is the file system's order
        jpg.chmod(0o600)
    status, detail = verdict(preflight.check_data, root)
    assert status == "FAIL" and detail.startswith(f"learners cannot read {root}/valid/BLUE JAY/") and detail.endswith(
        f"chmod -R o+rX {root}")
    for jpg in jpegs:
        jpg.chmod(0o644)
    (root / "train" / "ALBATROSS").chmod(0o750)
    assert verdict(preflight.check_data, root) == (
        "FAIL", f"learners cannot list {root / 'train' / 'ALBATROSS'}: chmod -R o+rX {root}")
    shutil.rmtree(root / "test")
    assert verdict(preflight.check_data, root)[1].startswith(f"{root} has no test/: download and verify it")


# --- the OnDemand app ---------------------------------------------------------------------------

def app_copy(tmp_path) -> Path:
    app = tmp_path / "app"
    shutil.copytree(ROOT / "ondemand", app)
    form = app / "form.yml"
    form.write_text(form.read_text().replace('["gpu", "gpu",', '["gpu", "accel",'))  # as a centre edits it
    return app


def test_the_ondemand_app_renders_and_slurm_accepts_what_it_asks_for(standins, tmp_path):
    if not shutil.which("ruby"):
        unavailable("no Ruby to render the OnDemand app (apt-get install ruby)")
    app = app_copy(tmp_path)
    status, detail = verdict(preflight.check_ondemand, app)
    assert status == "ok" and "--partition=accel --gpus-per-node=1" in detail, detail
    assert verdict(preflight.check_ondemand, ROOT / "ondemand")[1].startswith(
        "renders, but Slurm refuses")  # the shipped form names a partition `gpu` this cluster lacks
    submit = app / "submit.yml.erb"
    submit.write_text(submit.read_text() + "\n<%= no_such_field %>\n")
    status, detail = verdict(preflight.check_ondemand, app)
    assert status == "FAIL" and detail.startswith(f"the app in {app} does not render:")


# --- the command --------------------------------------------------------------------------------

def test_one_line_per_check_and_exit_1_on_a_fail(shared_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    weights = shared_dir / "w.pth"
    weights.write_bytes(b"w")
    weights.chmod(0o644)
    argv = ["--only", "gpu", "weights", "data", "--weights", str(weights), "--data", str(staged(shared_dir / "b"))]
    assert preflight.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["skip gpu", "ok weights", "ok data"]
    assert all(LINE.match(line) for line in lines), lines
    weights.chmod(0o600)
    assert preflight.main(argv) == 1
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["skip gpu", "FAIL weights", "ok data"]


def test_a_check_that_breaks_is_a_fail_and_the_others_still_run(capsys):
    def broken():
        raise OSError("disk gone")
    assert preflight.run_checks([("data", broken), ("weights", lambda: preflight.ok("fine"))]) == 1
    assert capsys.readouterr().out.splitlines() == ["FAIL data: OSError: disk gone", "ok weights: fine"]


def test_the_centre_checklist_names_every_check_and_the_command():
    guide = (ROOT / "docs" / "instructor.md").read_text()
    checklist = guide[guide.index("## Centre checklist"):guide.index("\n## ", guide.index("## Centre checklist") + 1)]
    assert "make preflight" in checklist
    assert [name for name in preflight.CHECKS if f"| `{name}" not in checklist] == []
