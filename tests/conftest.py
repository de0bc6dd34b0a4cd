"""Shared fixtures: a tiny synthetic dataset and a way to run the course's scripts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One compute thread per test process, set before torch is imported, so that in-process tests
# get it too, and threads that sleep rather than spin while waiting: the suite runs several
# processes on 2 cores, where spinning OpenMP threads slow each other down up to ~30x (the
# slowest test took 119 s with the default threads and 23 s with one). Subprocesses inherit it.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
os.environ.update(ONE_THREAD)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # in case torch was imported (by a plugin) before the variables above


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the tests import the scripts as modules, as the notebooks do

import data  # noqa: E402

# Small enough for a 2-core CPU: 6 classes, 32 px images.
TINY = {"classes": 6, "per_class": (16, 5, 2), "image_size": 32}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic dataset of 6 classes x (16 train, 5 valid, 2 test) images of 32 px."""
    root = tmp_path_factory.mktemp("birds") / "birds-synthetic"
    return data.make_synthetic(root, TINY["classes"], TINY["per_class"], TINY["image_size"], seed=0)


def unavailable(reason: str) -> None:
    """Skip a test whose tool or service is missing here; in CI (CI=true) that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


def cpu_env(**extra: str) -> dict:
    """The environment for a script run: CPU only, no W&B network, quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "KAGGLE_"))}
    env.update({"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **ONE_THREAD})
    env.update(extra)
    return env


def run_script(script: str, *args, env: dict | None = None, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run scripts/<script> with the test's Python; capture output, never raise."""
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)],
                          capture_output=True, text=True, env=env or cpu_env(), timeout=timeout,
                          cwd=cwd or ROOT)


def tiny_train_args(data_dir: Path, out: Path, *extra) -> list[str]:
    """Options for a fast CPU run on the tiny dataset."""
    return ["--data", data_dir, "--arch", "resnet18", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--out", out, *extra]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(processes: int, script: str, *args, env: dict | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """torchrun on this machine; --master-addr 127.0.0.1 avoids lookups of the host's name."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env or cpu_env(), timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory) -> Path:
    """A local stand-in for the ImageNet file: a fixed random ResNet-18 state dict."""
    import torch
    from torchvision import models
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "resnet18-standin.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    return path
