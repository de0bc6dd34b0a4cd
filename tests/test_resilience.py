"""No lost work: signals stop a run cleanly mid-epoch, resuming gives the uninterrupted result,
a dead rank ends the others, and broken input gets a one-line error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import train
from conftest import ROOT, SCRIPTS, cpu_env, free_port, run_script, run_torchrun, tiny_train_args


def start(command: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or cpu_env(), cwd=ROOT)


def read_until(process: subprocess.Popen, marker: str, lines: list[str], timeout: float = 300) -> None:
    """Collect output lines until one contains marker."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return
        assert time.monotonic() < deadline, f"no '{marker}' within {timeout}s"
    raise AssertionError(f"process ended before '{marker}':\n{''.join(lines[-30:])}")


def finish(process: subprocess.Popen, lines: list[str], timeout: float = 300) -> int:
    rest, _ = process.communicate(timeout=timeout)
    lines.append(rest)
    return process.returncode


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ma, mb = train.read_metrics(a), train.read_metrics(b)
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["val_acc"] == y["val_acc"] and x["val_samples"] == y["val_samples"]
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


# --- a signal mid-epoch, then --resume --------------------------------------------------------

@pytest.mark.parametrize("augment", [[], ["--augment"]], ids=["plain", "augment"])
def test_sigusr1_mid_epoch_then_resume_ends_as_if_never_interrupted(tiny_data, tmp_path, augment):
    args = [sys.executable, SCRIPTS / "train.py", *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 3, *augment)]
    lines: list[str] = []
    process = start(args)
    read_until(process, "epoch 2 step 3/12", lines)
    process.send_signal(signal.SIGUSR1)
    assert finish(process, lines) == 0
    output = "".join(lines)
    assert output.strip().splitlines()[-1].startswith("stopped: stopped at epoch 2 step 10 on SIGUSR1")
    assert "not a Slurm job: resume by hand with --resume" in output
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["partial"]["step"] == 10 and checkpoint["partial"]["seen"] == 80
    assert [m["epoch"] for m in train.read_metrics(tmp_path / "run")] == [1]

    resumed = run_script("train.py", *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 3, "--resume", *augment))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at epoch 2 step 10" in resumed.stdout
    straight = run_script("train.py", *tiny_train_args(tiny_data, tmp_path / "straight", "--epochs", 3, *augment))
    assert straight.returncode == 0
    assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_ddp_stops_on_every_rank_when_one_rank_is_signalled_and_resumes_exactly(tiny_data, tmp_path):
    def ddp_args(out: Path, *extra) -> list:
        return [*tiny_train_args(tiny_data, out, "--epochs", 2, *extra), "--batch-size", 4]  # 12 steps per rank

    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), SCRIPTS / "train.py",
               *ddp_args(tmp_path / "run")]
    lines: list[str] = []
    process = start(command)
    read_until(process, "epoch 1 step 3/12", lines)
    pids = {line.split()[1]: int(line.split(" pid ")[1].split()[0]) for line in lines if line.startswith("rank ")}
    os.kill(pids["1/2"], signal.SIGUSR1)  # only rank 1 hears it; both must stop after the same step
    assert finish(process, lines) == 0, "".join(lines)[-3000:]
    assert "stopped: stopped at epoch 1 step 10 on SIGUSR1" in "".join(lines)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["partial"]["step"] == 10

    resumed = run_torchrun(2, "train.py", *ddp_args(tmp_path / "run", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_torchrun(2, "train.py", *ddp_args(tmp_path / "straight"))
    assert straight.returncode == 0
    assert_same_run(tmp_path / "run", tmp_path / "straight")


# --- a rank dies ------------------------------------------------------------------------------

def wait_for_training(process: subprocess.Popen, lines: list[str]) -> dict[str, int]:
    read_until(process, "epoch 1 step", lines)
    return {line.split()[1]: int(line.split(" pid ")[1].split()[0]) for line in lines if line.startswith("rank ")}


def test_torchrun_ends_the_other_ranks_and_names_the_dead_one(tiny_data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), SCRIPTS / "train.py",
               *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 50)]
    lines: list[str] = []
    process = start(command)
    pids = wait_for_training(process, lines)
    killed_at = time.monotonic()
    os.kill(pids["1/2"], signal.SIGKILL)
    code = finish(process, lines, timeout=120)
    output = "".join(lines)
    assert code != 0 and time.monotonic() - killed_at < 60
    assert "rank: 1" in output and "SIGKILL" in output


def test_without_a_watching_launcher_the_survivor_fails_within_the_timeout(tiny_data, tmp_path):
    """Ranks started by hand (as a broken srun step could leave them): the collective times out."""
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(start([sys.executable, SCRIPTS / "train.py", "--dist-timeout", "20",
                                *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 50)], env=env))
    lines: list[str] = []
    wait_for_training(processes[0], lines)
    killed_at = time.monotonic()
    processes[1].kill()
    code = finish(processes[0], lines, timeout=120)
    processes[1].wait()
    output = "".join(lines)
    assert code == 1 and time.monotonic() - killed_at < 60, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2 lost contact with another rank") and "Traceback" not in output


# --- broken input -----------------------------------------------------------------------------

def test_more_ranks_than_validation_images_is_a_clear_error():
    cfg = train.parse_args(["--batch-size", "1", "--workers", "0"])
    with pytest.raises(data.UserError, match="8 processes but only 5 validation images: use fewer processes"):
        train.check_sizes(cfg, 8, train_size=100, val_size=5)


def test_resume_refuses_a_checkpoint_with_another_class_count(tiny_data, tmp_path):
    train.fit(train.parse_args([str(a) for a in tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 1)]))
    fewer = data.make_synthetic(tmp_path / "fewer", 3, (8, 2, 1), 32)
    with pytest.raises(data.UserError, match="written with num_classes=6, this run has num_classes=3"):
        train.fit(train.parse_args([str(a) for a in tiny_train_args(fewer, tmp_path / "run", "--epochs", 2, "--resume")]))


# --- secrets ----------------------------------------------------------------------------------

def test_credentials_never_reach_the_run_directory_or_the_logs(tiny_data, tmp_path):
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "learner", "key": "kaggle-secret-4242"}')
    env = cpu_env(HOME=str(home), KAGGLE_USERNAME="learner", KAGGLE_KEY="kaggle-secret-4242",
                  WANDB_API_KEY="wandb-secret-4242abcdef0123456789abcdef012345")
    result = run_script("train.py", *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 1, "--wandb", "offline"),
                        env=env)
    assert result.returncode == 0, result.stderr
    secrets = [b"kaggle-secret-4242", b"wandb-secret-4242"]
    leaked = [str(p) for p in (tmp_path / "run").rglob("*") if p.is_file()
              and any(s in p.read_bytes() for s in secrets)]
    assert leaked == []
    assert not any(s.decode() in result.stdout + result.stderr for s in secrets)


@pytest.mark.parametrize("path", ["kaggle.json", "notebooks/kaggle.json", ".kaggle/kaggle.json", ".netrc", ".env"])
def test_credential_files_are_ignored_by_git(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def test_a_corrupt_jpeg_stops_by_default_and_is_skipped_and_counted_with_the_flag(tiny_data, tmp_path):
    import shutil
    root = Path(shutil.copytree(tiny_data, tmp_path / "birds"))
    broken = sorted((root / "train").glob("*/003.jpg"))[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:200])  # truncated, as an interrupted copy leaves it
    stopped = run_script("train.py", *tiny_train_args(root, tmp_path / "run", "--epochs", 1))
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1
    assert stopped.stderr.startswith("error: cannot read image") and "--skip-bad-images" in stopped.stderr
    skipped = run_script("train.py", *tiny_train_args(root, tmp_path / "run", "--epochs", 2, "--skip-bad-images"))
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 2 unreadable image(s) in epoch 1" in skipped.stdout
    metrics = train.read_metrics(tmp_path / "run")
    assert [m["skipped_images"] for m in metrics] == [2, 2] and metrics[-1]["train_samples"] == 94


# --- one run per run directory ------------------------------------------------------------------

def test_a_second_run_into_a_directory_in_use_stops_and_names_the_first(tiny_data, tmp_path):
    import socket
    out = tmp_path / "run"
    first = start([sys.executable, SCRIPTS / "train.py", *tiny_train_args(tiny_data, out, "--epochs", 50)])
    lines: list[str] = []
    try:
        read_until(first, "run directory", lines)  # it holds the lock from here to its end
        with pytest.raises(data.UserError) as second:
            train.fit(train.parse_args([str(a) for a in tiny_train_args(tiny_data, out, "--epochs", 1, "--resume")]))
    finally:
        first.kill()
        finish(first, lines)
    assert str(second.value) == (f"{out} is in use by another run (host {socket.gethostname()} pid {first.pid}): "
                                 "wait for it to end, or give this run another --out")
