"""Every Slurm file in slurm/ runs for real, unchanged, on a two-node Slurm cluster.

The cluster is tests/slurm/cluster.sh (started here when possible, or by .ci/run). What must
shrink for a test (data, model, epochs, image size) is passed the way a user would: through
the environment variables that slurm/env.sh reads, and sbatch options on the command line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

import data
from conftest import ROOT, cpu_env, unavailable

SLURM = ROOT / "slurm"
EPOCHS = 3
CLASSES, TRAIN, VALID = 4, 40, 10  # measured: 0.75-1.0 validation accuracy after 3 epochs
CHANCE = 1 / CLASSES


def cluster_answers() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def slurm_data(tmp_path_factory) -> Path:
    """Enough images per class for 4 ranks to learn in 3 short epochs."""
    return data.make_synthetic(tmp_path_factory.mktemp("slurm") / "birds", CLASSES, (TRAIN, VALID, 2), 32)


@pytest.fixture(scope="module")
def cluster():
    if cluster_answers():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable("no Slurm cluster answers and none can be started here (needs root and apt-get)")
    started = subprocess.run(["bash", str(ROOT / "tests/slurm/cluster.sh"), "up"], capture_output=True, text=True)
    if started.returncode != 0 or not cluster_answers():
        unavailable(f"could not start the local Slurm cluster: {started.stderr[-500:]}")


class Job:
    def __init__(self, job_id: str, returncode: int, output: str, runs: Path):
        self.id, self.returncode, self.output, self.runs = job_id, returncode, output, runs

    def rank_hosts(self) -> dict[int, str]:
        return {int(m[0]): m[1] for m in re.findall(r"^rank (\d+)/\d+ .*host (\S+)", self.output, re.M)}


def submit(name: str, slurm_data: Path, tmp: Path, *sbatch_options: str, log: str = "%x-%j.out", **env_extra) -> Job:
    """sbatch --wait the unchanged file, with a tiny configuration; return what it did."""
    tiny = dict(BIRDS_DATA=str(slurm_data), RUNS=str(tmp / "runs"), STAGE_DIR=str(tmp / "node-local"),
                ARCH="resnet18", WEIGHTS="none", EPOCHS=str(EPOCHS), IMAGE_SIZE="32", BATCH_SIZE="4",
                EXTRA_ARGS="--workers 0 --lr 0.003")
    env = cpu_env(**{**tiny, **env_extra})
    tmp.mkdir(parents=True, exist_ok=True)
    env.pop("CUDA_VISIBLE_DEVICES")  # Slurm sets it from the (fake) GPUs, as on a real cluster
    result = subprocess.run(["sbatch", "--wait", "--parsable", "--cpus-per-task=1", f"--output={tmp}/{log}",
                             *sbatch_options, str(SLURM / name)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    job_id = result.stdout.strip().split(";")[0]
    output = "".join(p.read_text() for p in sorted(tmp.glob("*.out")))
    return Job(job_id, result.returncode, output + result.stderr, tmp / "runs")


def assert_trained(run: Path, epochs: int = EPOCHS) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), run
    best = max(m["val_acc"] for m in metrics)
    assert best > CHANCE, f"{run}: best val_acc {best} is not above chance {CHANCE:.3f}"
    assert all(m["val_samples"] == CLASSES * VALID for m in metrics)
    return json.loads((run / "config.json").read_text())


def assert_staged_on(job: Job, hosts: set[str]) -> None:
    assert set(re.findall(r"^staged on (\S+) in", job.output, re.M)) == hosts, job.output[-2000:]


def test_every_slurm_file_has_a_test():
    tested = {name for name in globals() if name.startswith("test_sbatch_")}
    expected = {"test_sbatch_" + p.stem for p in SLURM.glob("*.sbatch")}
    assert tested == expected, f"Slurm files without a test: {sorted(expected - tested)}"


@pytest.mark.parametrize("path", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_every_sbatch_line_is_commented(path):
    bare = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH") and " # " not in line]
    assert bare == []


def test_sbatch_train(cluster, slurm_data, tmp_path):
    job = submit("train.sbatch", slurm_data, tmp_path)
    assert job.returncode == 0, job.output[-3000:]
    config = assert_trained(job.runs / f"{job.id}-train")
    assert config["world_size"] == 1 and config["slurm_job_id"] == job.id
    assert len(job.rank_hosts()) == 0 and "summary: epochs=3/3" in job.output
    assert_staged_on(job, {config["host"]})


def test_sbatch_train_dp(cluster, slurm_data, tmp_path):
    job = submit("train_dp.sbatch", slurm_data, tmp_path)
    assert job.returncode == 0, job.output[-3000:]
    assert_trained(job.runs / f"{job.id}-dp")
    assert "notice: DataParallel needs 2 or more GPUs, 0 visible" in job.output


def run_times(run: Path) -> tuple[float, float]:
    started = datetime.fromisoformat(json.loads((run / "config.json").read_text())["started"]).timestamp()
    return started, (run / "metrics.jsonl").stat().st_mtime


def tiny_sweep(tmp: Path) -> str:
    """Two learning rates with a batch small enough for the tiny dataset (96 images)."""
    (tmp / "sweep.csv").write_text("name,lr,batch-size\nlr-1e-3,0.001,8\nlr-3e-3,0.003,8\n")
    return str(tmp / "sweep.csv")


def test_sbatch_sweep_steps(cluster, slurm_data, tmp_path):
    job = submit("sweep_steps.sbatch", slurm_data, tmp_path, SWEEP=tiny_sweep(tmp_path))
    assert job.returncode == 0, job.output[-3000:]
    sweep = job.runs / f"{job.id}-sweep"
    configs = {run: assert_trained(sweep / run) for run in ("lr-1e-3", "lr-3e-3")}
    assert configs["lr-1e-3"]["options"]["lr"] == 0.001 and configs["lr-3e-3"]["options"]["lr"] == 0.003
    (start_a, end_a), (start_b, end_b) = run_times(sweep / "lr-1e-3"), run_times(sweep / "lr-3e-3")
    assert start_a < end_b and start_b < end_a, "the two job steps did not run at the same time"
    assert re.search(r"^run\s+arch\s+lr", job.output, re.M) and "best: lr-" in job.output
    assert (sweep / "sweep.png").is_file()


def test_sbatch_sweep_array(cluster, slurm_data, tmp_path):
    job = submit("sweep_array.sbatch", slurm_data, tmp_path, log="%x-%A_%a.out", SWEEP=tiny_sweep(tmp_path))
    assert job.returncode == 0, job.output[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.out")) == [f"sweep-array-{job.id}_0.out", f"sweep-array-{job.id}_1.out"]
    runs = sorted(p.parent.name for p in (job.runs / f"{job.id}-sweep").glob("*/metrics.jsonl"))
    assert runs == ["lr-1e-3", "lr-3e-3"]
    for run in runs:
        assert_trained(job.runs / f"{job.id}-sweep" / run)


def assert_ddp(job: Job, world_size: int, hosts: set[str], launcher: str) -> None:
    assert job.returncode == 0, job.output[-3000:]
    assert set(job.rank_hosts()) == set(range(world_size)), job.output[-3000:]
    assert set(job.rank_hosts().values()) == hosts
    assert job.output.count(f"launcher {launcher}") == world_size
    config = assert_trained(job.runs / f"{job.id}-ddp")
    assert config["world_size"] == world_size and config["global_batch_size"] == 4 * world_size
    assert_staged_on(job, hosts)


def test_sbatch_ddp_srun_1node(cluster, slurm_data, tmp_path):
    job = submit("ddp_srun_1node.sbatch", slurm_data, tmp_path)
    assert_ddp(job, 2, {next(iter(job.rank_hosts().values()), "?")}, "srun")


def test_sbatch_ddp_srun_multinode(cluster, slurm_data, tmp_path):
    assert_ddp(submit("ddp_srun_multinode.sbatch", slurm_data, tmp_path), 4, {"node1", "node2"}, "srun")


def test_sbatch_ddp_torchrun_multinode(cluster, slurm_data, tmp_path):
    assert_ddp(submit("ddp_torchrun_multinode.sbatch", slurm_data, tmp_path), 4, {"node1", "node2"}, "torchrun")


GPU_CHECK_STEPS = ["environment", "single", "fp16", "compile", "gpu-decode", "dp", "ddp", "ddp-syncbn", "scaling",
                   "gather", "ladder"]
TINY_GPU_CHECK = dict(GPU_CHECK_ALLOW_CPU="1", ARCH="resnet18", IMAGE_SIZE="32", BATCH_SIZE="4", STEPS="2",
                      LADDER_ARGS="--warmup 1 --steps 1 --repeats 1 --epochs 1")


def summary_lines(check_dir: Path) -> list[list[str]]:
    return [line.split(maxsplit=2) for line in (check_dir / "summary.txt").read_text().splitlines()]


def test_sbatch_gpu_check(cluster, tmp_path):
    """Every step of the GPU check, on the CPUs of the test cluster: the plumbing, not the GPU."""
    job = submit("gpu_check.sbatch", tmp_path / "unused", tmp_path, **TINY_GPU_CHECK)
    assert job.returncode == 0, job.output[-3000:]
    check_dir = job.runs / f"{job.id}-gpu-check"
    lines = summary_lines(check_dir)
    assert [(result, step) for result, step, _ in lines] == [("skipped" if s == "ddp-syncbn" else "ok", s)
                                                             for s in GPU_CHECK_STEPS]
    assert lines[GPU_CHECK_STEPS.index("ddp-syncbn")][2].endswith("SyncBatchNorm needs 2 or more GPUs (0 here)")
    for step in ["single", "fp16", "compile", "gpu-decode", "dp", "ddp"]:  # 3 epochs of 2 steps of 4 images per device
        metrics = train_metrics(check_dir / step)
        assert [(m["epoch"], m["train_samples"]) for m in metrics] == [(e, 16 if step in ("dp", "ddp") else 8)
                                                                       for e in (1, 2, 3)], step
    assert not list(check_dir.glob("**/*.pt")), "checkpoints are deleted after each step"
    ddp_log = (check_dir / "ddp.log").read_text()
    assert sorted(re.findall(r"^rank (\d/2) .* backend gloo$", ddp_log, re.M)) == ["0/2", "1/2"]
    # The same CPU cores per device for every run: here the job's one core.
    workers = {run: json.loads((check_dir / run / "config.json").read_text())["options"]["workers"]
               for run in ["single", "dp", "ddp"]}
    assert workers == {"single": 1, "dp": 2, "ddp": 1}
    rows = [row["row"] for row in json.loads((check_dir / "ladder.json").read_text())["rows"]]
    assert rows[0] == "original" and rows[-1] == "finetune best" and len(rows) == 11
    assert (check_dir / "scaling.png").stat().st_size > 0 and "10 ok, 0 failed, 1 skipped" in job.output
    assert re.search(r"^row +loader img/s", job.output, re.M), "the ladder's table is in the job's log"


def test_gpu_check_goes_on_after_a_failed_step_and_fails_at_the_end(tmp_path):
    env = cpu_env(**{**TINY_GPU_CHECK, "STEPS": "-1", "GPU_CHECK_STEPS": "single ddp scaling",
                     "GPU_CHECK_DIR": str(tmp_path / "check")})
    result = subprocess.run(["bash", "slurm/gpu_check.sbatch"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = summary_lines(tmp_path / "check")
    assert [(result, step) for result, step, _ in lines] == [("FAILED", "single"), ("FAILED", "ddp"), ("FAILED", "scaling")]
    assert lines[0][2].endswith("error: --max-steps -1 is out of range: see --help")
    assert lines[1][2].endswith("is out of range: see --help")
    assert "is not a finished run directory" in lines[2][2]
    assert "0 ok, 3 failed, 0 skipped" in result.stdout


@pytest.mark.parametrize("settings,message", [
    ({}, "error: no CUDA device is visible here: run it on a GPU node (sbatch slurm/gpu_check.sbatch), "
         "or set GPU_CHECK_ALLOW_CPU=1 to check only the plumbing"),
    ({"GPU_CHECK_STEPS": "single warp-drive"}, "error: GPU_CHECK_STEPS: no step 'warp-drive'; the steps are: "
                                               + " ".join(GPU_CHECK_STEPS))])
def test_gpu_check_refuses_in_one_line(tmp_path, settings, message):
    env = cpu_env(RUNS=str(tmp_path / "runs"), **settings)
    result = subprocess.run(["bash", "slurm/gpu_check.sbatch"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert (result.returncode, result.stderr.strip()) == (2, message)
    assert not (tmp_path / "runs").exists()


def test_a_job_that_reaches_its_time_limit_is_requeued_and_ends_as_if_never_interrupted(cluster, slurm_data, tmp_path):
    """train.sbatch unchanged; a 3-minute limit and an early warning given on the command line.

    Slurm sends SIGUSR1 about 100 s before the limit (its checks run every ~30 s, so some
    seconds earlier or later); the run checkpoints mid-epoch and requeues itself; the
    requeued job resumes. An uninterrupted run of the same configuration runs meanwhile.
    """
    epochs = 14  # about 75 s of training on one core: longer than the time to the warning
    reference = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/train.py"), "--data", str(slurm_data), "--arch", "resnet18",
         "--weights", "none", "--epochs", str(epochs), "--image-size", "32", "--batch-size", "4", "--workers", "0",
         "--lr", "0.003", "--out", str(tmp_path / "reference")],
        env=cpu_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    job = submit("train.sbatch", slurm_data, tmp_path / "job", "--time=3", "--signal=USR1@100", EPOCHS=str(epochs))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    assert job.returncode == 0, job.output[-3000:]
    assert re.search(r"^stopped: stopped at epoch \d+ step \d+ on SIGUSR1; .*requeued Slurm job " + job.id, job.output, re.M)
    assert re.search(r"^resumed from .* at (epoch \d+ step \d+|the end of epoch \d+)", job.output, re.M)
    run = job.runs / f"{job.id}-train"
    assert_trained(run, epochs)
    final, expected = train_metrics(run)[-1], train_metrics(tmp_path / "reference")[-1]
    assert final["val_acc"] == expected["val_acc"]
    assert final["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


def train_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_multinode_torchrun_job_at_its_time_limit_requeues_itself_and_finishes(cluster, slurm_data, tmp_path):
    """ddp_torchrun_multinode.sbatch unchanged, with a 3-minute limit and an early warning.

    Slurm signals each node's torchrun; torchrun passes SIGUSR1 on to its processes
    (--signals-to-handle); the ranks agree to stop, rank 0 checkpoints and requeues the
    job, and the requeued job resumes on both nodes. (That the resumed weights equal an
    uninterrupted run's is checked for DDP in test_resilience.py.)
    """
    epochs = 24  # about 5.5 s each with 4 ranks on the test machine: longer than the time to the warning
    job = submit("ddp_torchrun_multinode.sbatch", slurm_data, tmp_path, "--time=3", "--signal=USR1@100",
                 EPOCHS=str(epochs))
    assert job.returncode == 0, job.output[-3000:]
    assert re.search(r"^stopped: stopped at epoch \d+ step \d+ on SIGUSR1; .*requeued Slurm job " + job.id,
                     job.output, re.M), job.output[-3000:]
    assert re.search(r"^resumed from .* at (epoch \d+ step \d+|the end of epoch \d+)", job.output, re.M)
    config = assert_trained(job.runs / f"{job.id}-ddp", epochs)
    assert config["world_size"] == 4 and set(job.rank_hosts().values()) == {"node1", "node2"}
