# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Training on one device
#
# One complete, correct training run: the loop, validation, metrics, checkpoints and a
# run directory that records everything needed to reproduce or resume it. The parallel
# versions in the next notebooks (`train_dp`, `train_ddp`) **reuse this loop unchanged**;
# they only change how the model is wrapped, how the data is split between processes and
# how numbers are summed across them. That is why the loop talks to a small `Runtime`
# object for those three things.
#
# This notebook is also `scripts/train.py`:
#
# ```bash
# python scripts/train.py --data data/birds-synthetic --arch resnet18 --weights none \
#     --image-size 64 --epochs 5 --out runs/first
# python scripts/train.py --help      # every option
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# arch = "resnet18"
# weights = "none"  # "imagenet" on the cluster, after `python scripts/model.py fetch-weights`
# image_size = 64
# epochs = 4
# batch_size = 32
# workers = 2
# out_dir = "../runs/notebook-train"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %%
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from data import (UserError, atomic_write, available_cpus, default_num_workers, load_splits, make_loader,
                  run_cli)
from model import ARCHITECTURES, build_model, count_parameters

# %% [markdown]
# ## Every option on the command line
#
# One parser serves the script, the notebooks and the parallel scripts (which add their
# own options to it). In a notebook we call `parse_args([...])` with a list of strings, so
# the notebook and the batch job run exactly the same configuration.

# %%
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a ResNet on the birds dataset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BIRDS_DATA", "data/birds")),
                   help="dataset directory with train/ and valid/ (env BIRDS_DATA)")
    p.add_argument("--arch", default="resnet152", choices=list(ARCHITECTURES), help="ResNet depth")
    p.add_argument("--weights", default="imagenet", help="imagenet, none, or a local weights file")
    p.add_argument("--finetune", action="store_true", help="train every layer, not only the head")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="images per step and per process")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"],
                   help="adam is the original workshop's (weight decay added to the gradient)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes (default: SLURM_CPUS_PER_TASK in a job, else the CPUs available, at most 8)")
    p.add_argument("--image-size", type=int, default=224, help="images are resized to this square size")
    p.add_argument("--augment", action="store_true", help="random crops and flips for training")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out and count them (default: stop and name the file)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep the data order fixed (to compare single-device and parallel runs)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"0 to {MAX_SEED}: the initial head, the data order, every random draw")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<job id or time>-<arch>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt when it exists; it may change --epochs, --lr, --weight-decay, "
                        "--image-size, --max-steps and --amp (and, at an epoch's end, --batch-size, --augment, "
                        "--no-shuffle and the number of processes)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its config.json, metrics.jsonl, last.pt and best.pt)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs in this job; a later --resume continues (0: run all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 (or fp16) on CUDA, bf16 on CPUs with AMX, else off")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms once per input shape and keep the fastest (CUDA)")
    p.add_argument("--cache-features", action="store_true",
                   help="frozen backbone, no --augment: compute its features once, then train the head on them")
    p.add_argument("--gpu-decode", action="store_true", help="decode the JPEGs on the GPU (ignored without CUDA)")
    p.add_argument("--profile", nargs="?", const="profile", default=None, metavar="DIR",
                   help="write a torch.profiler trace of training steps 2-5 to DIR (relative: in the run directory)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    p.add_argument("--log-every", type=int, default=0, help="log a line every N steps in batch jobs (0: 4 per epoch)")
    p.add_argument("--wandb", default="off", choices=["off", "offline", "online"], help="Weights & Biases logging")
    p.add_argument("--wandb-project", default="birds-hpc-course")
    return p


MAX_SEED = 2**32 - 1


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    cfg = (parser or build_parser()).parse_args(argv)
    checks = {"--epochs": cfg.epochs >= 1, "--batch-size": cfg.batch_size >= 1,
              "--lr": math.isfinite(cfg.lr) and cfg.lr > 0,  # nan > 0 is False; inf would train to NaN
              "--weight-decay": math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
              "--seed": 0 <= cfg.seed <= MAX_SEED, "--image-size": cfg.image_size >= 16,
              "--workers": cfg.workers is None or cfg.workers >= 0,
              "--max-steps": cfg.max_steps >= 0, "--stop-after": cfg.stop_after >= 0}
    for option, ok in checks.items():
        if not ok:
            raise UserError(f"{option} {getattr(cfg, option[2:].replace('-', '_'))} is out of range: see --help")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    conflicts = {("cache_features", "finetune"): "--cache-features needs a frozen backbone: drop --finetune",
                 ("cache_features", "augment"): "--cache-features computes each image's features once, "
                                                "so random augmentation cannot work: drop --augment",
                 ("gpu_decode", "augment"): "--gpu-decode does not augment: drop --augment or --gpu-decode"}
    for (option, other), message in conflicts.items():
        if getattr(cfg, option) and getattr(cfg, other):
            raise UserError(message)
    if cfg.cache_features and cfg.weights == "none":
        raise UserError("--cache-features needs a frozen pretrained backbone, and with --weights none every layer trains")
    if cfg.workers is None:
        cfg.workers = default_num_workers()
    return cfg


# %% [markdown]
# ## The runtime: what changes between one device and many
#
# For a single device the runtime is trivial: rank 0 of a world of size 1, the model is
# used as is, and summing a number "across processes" returns it unchanged. `train_dp`
# and `train_ddp` replace these methods; the loop below never asks how many processes
# there are.

# %%
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    notices: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def wrap_model(self, model: nn.Module, cfg) -> nn.Module:
        return model

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def pick_device(requested: str = "auto") -> tuple[torch.device, list[str]]:
    """The device to train on, and a notice when CUDA was wanted but is missing."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), []
        return torch.device("cpu"), ["notice: no CUDA device found; training on the CPU"]
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", requested):  # mps, meta, xpu...: the course runs on neither
        raise UserError(f"--device {requested!r} is not one the course trains on: use auto, cpu, cuda or cuda:N")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is visible here; use --device cpu or auto")
    device = torch.device(requested)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible here")
    return device, []


# %% [markdown]
# ## Mixed precision
#
# On GPUs, bf16 autocast roughly doubles the speed of the convolutions (tensor cores) at
# no cost in accuracy; older GPUs without fast bf16 use fp16 with a gradient scaler, which
# keeps small gradients from rounding to zero. On most CPUs bf16 is *slower* than fp32:
# emulated on AVX2-only CPUs (about 30x slower), and still 0.8x with AVX512-BF16 on the
# test machine (`docs/performance.md`). Only CPUs with AMX matrix units (Intel Xeon 4th
# generation and later) have bf16 hardware built for it, so `auto` uses bf16 on those
# and leaves it off on every other CPU. Measure before you trust either: `benchmark.py`
# has a row for it.

# %%
def cpu_has_amx() -> bool:
    """Intel AMX tiles: the CPU matrix units that make bf16 fast (a private PyTorch probe)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def pick_precision(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# %% [markdown]
# ## cuDNN autotuning
#
# cuDNN can compute a convolution with several algorithms, and which is fastest depends
# on the GPU, the shapes and the memory layout. With `--cudnn-benchmark` the first step
# with a new input shape times them and keeps the fastest. Our images always have the
# same size, so that search happens once, in the first steps; with shapes that keep
# changing it would search again and again. It changes nothing on a CPU.

# %%
def set_cudnn_benchmark(on: bool) -> None:
    torch.backends.cudnn.benchmark = on  # a process-wide switch: set it for every run, on or off


# %% [markdown]
# ## The run directory
#
# Everything a run produces goes into one directory:
#
# | file | what |
# |---|---|
# | `config.json` | every option, the package versions, the host and the world size |
# | `metrics.jsonl` | one JSON object per epoch |
# | `last.pt` | what training changed (see below), optimizer, epoch, metrics and RNG states: enough to resume |
# | `best.pt` | the model with the best validation accuracy so far |
#
# A run directory holds **one** run. Running again with the same `--out` would replace
# it, so that needs `--resume` (continue it) or `--overwrite` (replace it, on purpose).
# While a run trains it holds a lock on its directory, so that a second run started into
# the same `--out` stops at once instead of both overwriting each other's files. The
# directory is created only when training is about to start, after the options, the data
# and the model have been checked: a run that fails before leaves nothing behind.
#
# Files are written to a temporary file, flushed to the disk and renamed, so a job killed
# while writing leaves the previous file intact; the next start removes the temporary
# file such a kill leaves. A full disk stops the run with one line that says which disk
# and how much space a checkpoint needs, and the previous checkpoint stays.

# %%
RESULT_FILES = ("metrics.jsonl", "last.pt", "best.pt")  # what a run leaves that is worth keeping
RUN_FILES = ("config.json", *RESULT_FILES)
LOCK_FILE = ".run.lock"


def default_run_dir(arch: str) -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return Path("runs") / f"{job or datetime.now().strftime('%Y%m%d-%H%M%S')}-{arch}"


def check_run_dir_is_free(out: Path, cfg) -> None:
    """Refuse to start a new run over an earlier one, unless --resume or --overwrite says what to do.

    A run that stopped before it finished an epoch (a bad image, a typo in an option) left
    nothing worth keeping, and may be started again as it is.
    """
    earlier = [name for name in RESULT_FILES if (out / name).exists() and (out / name).stat().st_size > 0]
    if earlier and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a run ({', '.join(earlier)}): continue it with --resume, "
                        "start a new one with a fresh --out, or replace it with --overwrite")


class RunLock:
    """An advisory lock on a run directory, held while the run trains (flock: released when the process ends)."""

    def __init__(self, out: Path, log=print):
        self.path, self.fd = out / LOCK_FILE, None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            raise UserError(f"{out} is in use by another run ({holder}): wait for it to end, "
                            "or give this run another --out") from None
        except OSError as error:  # a filesystem without locks (Lustre mounted without -o flock)
            log(f"notice: cannot lock {out} ({error.strerror}): make sure no other run uses this --out")
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def stale_temp_files(out: Path) -> list[Path]:
    """The temporary files of atomic_write (.<name>.<random>.tmp) that a kill left next to the run's files."""
    pattern = re.compile(r"\.(%s)\.[a-z0-9_]{8}\.tmp" % "|".join(map(re.escape, RUN_FILES)))
    return sorted(p for p in out.glob(".*.tmp") if pattern.fullmatch(p.name))


def claim_run_dir(out: Path, cfg, log=print) -> RunLock:
    """Create the run directory and lock it; check it is free, clear what --overwrite replaces and what
    an earlier kill left half-written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, log)
    except OSError as error:
        raise UserError(f"cannot write to run directory {out} ({error.strerror}): choose another --out") from None
    try:
        check_run_dir_is_free(out, cfg)  # again, now under the lock: another run may have finished meanwhile
        replaced = [out / name for name in RUN_FILES if cfg.overwrite and (out / name).exists()]
        for path in replaced + stale_temp_files(out):
            path.unlink()
    except BaseException:
        lock.close()
        raise
    if replaced:
        log(f"notice: --overwrite: replaced the earlier run in {out} ({', '.join(p.name for p in replaced)})")
    return lock


def run_config(cfg, rt: Runtime, classes: list[str]) -> dict:
    """What config.json records: options, sizes, versions and host (never secrets)."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    return {
        "options": options,
        "num_classes": len(classes),
        "classes_digest": hash_classes(classes),
        "world_size": rt.world_size,
        "global_batch_size": cfg.batch_size * rt.world_size,
        "device": str(rt.device) if rt.device.type == "cpu" else torch.cuda.get_device_name(rt.device),
        "visible_gpus": torch.cuda.device_count(),  # DataParallel uses them all (benchmark.py scaling)
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "cuda": torch.version.cuda},
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def hash_classes(classes: list[str]) -> str:
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()[:16]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


@contextlib.contextmanager
def disk_errors_named(path: Path, needed_bytes: int):
    """Turn a failed write (full disk, quota, read-only) into one line: the file, the disk, the space needed.

    PyTorch reports a full disk as `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
    pos`, which names none of them.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "the write failed"
        disk = mount_point(path.parent)
        free = shutil.disk_usage(disk).free
        raise UserError(f"cannot write {path} ({reason}): the disk at {disk} has {human_bytes(free)} free and this "
                        f"file needs about {human_bytes(needed_bytes)} (a full disk or quota?): free space there "
                        f"or use an --out on a larger disk; the previous {path.name} is kept") from None


def finite_json(obj):
    """obj with NaN and infinities as null: JSON has no such numbers (json.dumps would write NaN tokens)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n"
    with disk_errors_named(path, len(text)):
        atomic_write(path, lambda tmp: tmp.write_text(text))


def metrics_line(record: dict) -> str:
    return json.dumps(record, allow_nan=False) + "\n"  # fit() stops before a record with NaN gets here


def read_metrics(out: Path) -> list[dict]:
    """The records of metrics.jsonl. A torn last line (a write cut short by a full disk or quota) is
    left out with a notice; a resume rewrites it from the checkpoint."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif n == lines[-1][0]:
            print(f"notice: {path} line {n} is torn (a write cut short, e.g. by a full disk): left out")
        else:
            raise UserError(f"{path} line {n} is not a metrics record: repair or delete that line")
    return records


def append_metrics(out: Path, record: dict) -> None:
    line = metrics_line(record)
    with disk_errors_named(out / "metrics.jsonl", len(line)), open(out / "metrics.jsonl", "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_metrics(out: Path, records: list[dict]) -> None:
    """metrics.jsonl with exactly these records (at start: those of the checkpoint's finished epochs)."""
    text = "".join(map(metrics_line, records))
    with disk_errors_named(out / "metrics.jsonl", len(text)):
        atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text(text))


def save_checkpoint(path: Path, state: dict) -> None:
    needed = sum(t.numel() * t.element_size() for t in tensors_in(state))
    with disk_errors_named(path, needed):
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


# %% [markdown]
# ## Resuming
#
# A resumed run must end exactly where an uninterrupted one would. Besides the weights
# that needs the optimizer's moments, the epoch, and the random number generators. The
# learning rate is a function of the epoch alone (a cosine from `--lr` down to 0 over
# `--epochs`, computed afresh every epoch), so a resume with more `--epochs` stretches
# the rest of the schedule instead of training at learning rate 0. The data order of
# epoch *e* is a function of the seed and *e* alone (the sampler's `set_epoch`), so it
# needs no state of its own; with `--augment`, so is each image's random crop and flip
# (the sampler hands every image its own seed).
#
# **What a checkpoint stores.** Only what training changed: the parameters that train
# and the buffers (BatchNorm's running statistics, which move whenever a BatchNorm layer
# runs in training mode), not the frozen backbone. The frozen weights are those the run
# started from (`--weights`), identified by a hash that a resume checks.
# `load_trained_model` rebuilds the whole model from `best.pt` (or `last.pt`) for
# inference. For a ResNet-152 with 525 classes and a frozen backbone, `last.pt` is 13.7 MB
# (head, BatchNorm statistics, the optimizer's moments of the head) and `best.pt` 5.1 MB,
# where the whole model alone is 238 MB; with `--finetune` everything trains, and
# `last.pt` is 0.71 GB (the weights and AdamW's two moments of each). Measured on a CPU
# with a saved random ResNet-152 state dict standing in for the ImageNet file:
#
# ```bash
# python -c "import torch, torchvision; torch.save(torchvision.models.resnet152().state_dict(), 'r152.pth')"
# python scripts/train.py --data <525 classes> --arch resnet152 --weights r152.pth --image-size 32 \
#     --epochs 1 --max-steps 1 --out runs/size [--finetune]; ls -l runs/size
# ```
#
# **Every finished epoch is in the checkpoint.** At the end of an epoch the script
# writes `last.pt` (with every epoch's metrics inside), then `best.pt`, then the new line
# of `metrics.jsonl`. A job killed between those writes loses nothing: a resume rewrites
# `metrics.jsonl` and, when needed, `best.pt` from `last.pt`.
#
# **A resume with other options** applies what it can honour, with a notice, and refuses
# the rest in one line (`RESUMABLE_CHANGES` below). Only rank 0 reads the checkpoint; it
# sends it to the other ranks, so all of them resume from the same state even where a
# filesystem shows them different views of the run directory.
#
# A checkpoint is a pickle, and unpickling can run arbitrary code, so it is loaded with
# `weights_only=True`, which accepts tensors and plain containers only.

# %%
def cosine_lr(peak: float, epoch: int, epochs: int) -> float:
    """The learning rate of epoch `epoch` (from 0) of `epochs`: a cosine from peak down towards 0."""
    return peak * (1 + math.cos(math.pi * epoch / epochs)) / 2


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def trained_state(model: nn.Module) -> dict:
    """The model's state without its frozen parameters, which training never changes."""
    frozen = frozen_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def frozen_digest(model: nn.Module) -> str | None:
    """A hash of the frozen parameters' values: the starting weights a checkpoint leaves out."""
    frozen = frozen_names(model)
    if not frozen:
        return None
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name in frozen:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def model_record(model: nn.Module, cfg, classes: list[str], frozen_weights_hash: str | None) -> dict:
    """What best.pt and last.pt hold to rebuild the model: its kind, its classes, and what training changed."""
    weights = cfg.weights if cfg.weights in ("imagenet", "none") else str(Path(cfg.weights).resolve())
    return {"arch": cfg.arch, "classes": classes, "finetune": cfg.finetune, "weights": weights,
            "frozen_weights_hash": frozen_weights_hash, "model": trained_state(model)}


def load_state_into(model: nn.Module, record: dict, path: Path) -> None:
    """Load the stored state; the parameters it leaves out must be exactly the frozen ones."""
    result = model.load_state_dict(record["model"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) != frozen_names(model):
        raise UserError(f"{path} does not fit this model ({len(result.missing_keys)} tensors missing, "
                        f"{len(result.unexpected_keys)} unexpected): use the --arch and --weights it was written with")


def load_trained_model(path: Path, weights: str | None = None) -> tuple[nn.Module, dict]:
    """The model of a best.pt or last.pt, for inference, and the file's contents (classes, epoch, ...).

    The frozen backbone comes from the weights the run started from, which the file names; pass
    `weights` when that file has moved (the hash must match).
    """
    path = Path(path)
    record = read_checkpoint_file(path, ("arch", "classes", "finetune", "weights", "frozen_weights_hash", "model"))
    source = (weights or record["weights"]) if record["frozen_weights_hash"] else "none"  # all stored: none frozen
    model = build_model(record["arch"], len(record["classes"]), source, record["finetune"], log=lambda *a: None)
    if frozen_digest(model) != record["frozen_weights_hash"]:
        raise UserError(f"{path} was trained from other starting weights than {weights or record['weights']}: "
                        "pass the weights file the run used")
    load_state_into(model, record, path)
    return model.eval(), record


def read_checkpoint_file(path: Path, required: tuple[str, ...]) -> dict:
    """torch.load with weights_only, and every load error as one line that names the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UserError(f"cannot load checkpoint {path} ({type(error).__name__}: {reason[:200]}): "
                        "delete it, or use another --out, to start afresh") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing and isinstance(checkpoint, dict) and "identity" in checkpoint:  # the format before "settings"
        raise UserError(f"{path} was written by an earlier version of train.py: finish that run with it, "
                        "or start a new one with another --out")
    if missing:
        raise UserError(f"{path} is not a checkpoint of this course's train.py (no {', '.join(missing)}): "
                        "use another --out, or delete it to start afresh")
    return checkpoint


# What a resume may change, and what not. Always fixed: what the checkpoint cannot honour,
# the model and its classes, what trains and the weights it started from, the optimizer
# (its state has other entries) and the seed (the data order and every random draw derive
# from it). Fixed within an epoch: what decides which images the rest of the epoch holds;
# a run stopped at an epoch's end may change them. Any other option that changes the
# result applies from the resumed step on, with a notice.
FIXED_ON_RESUME = ("arch", "num_classes", "classes_digest", "finetune", "weights", "frozen_weights_hash", "optimizer",
                   "seed")
FIXED_WITHIN_AN_EPOCH = ("batch_size", "processes", "augment", "no_shuffle")
RESUMABLE_CHANGES = ("epochs", "lr", "weight_decay", "image_size", "max_steps", "precision")


def run_settings(cfg, rt: Runtime, classes: list[str], frozen_weights_hash: str | None, dtype) -> dict:
    """The settings that decide a run's result, as a checkpoint records them."""
    return {"arch": cfg.arch, "num_classes": len(classes), "classes_digest": hash_classes(classes),
            "finetune": cfg.finetune, "weights": "none" if cfg.weights == "none" else "pretrained",
            "frozen_weights_hash": frozen_weights_hash, "optimizer": cfg.optimizer, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "processes": rt.world_size, "augment": cfg.augment,
            "no_shuffle": cfg.no_shuffle, "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "image_size": cfg.image_size, "max_steps": cfg.max_steps, "precision": precision_name(dtype)}


CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "partial", "best_val_acc", "best_epoch", "rng",
                   "settings", "metrics")


def load_checkpoint(path: Path, settings: dict, log=print) -> dict:
    """Load last.pt; refuse one this run cannot continue, and say which changed settings it applies."""
    checkpoint = read_checkpoint_file(path, CHECKPOINT_KEYS)
    saved = checkpoint["settings"]
    fixed = FIXED_ON_RESUME + (FIXED_WITHIN_AN_EPOCH if checkpoint["partial"] else ())
    changed = [key for key in fixed if saved.get(key) != settings[key]]
    if changed:
        differences = "; ".join(f"it was written with {key}={saved.get(key)!r}, this run has {key}={settings[key]!r}"
                                for key in changed)
        within = (f" (it stopped in the middle of epoch {checkpoint['epoch'] + 1}; these may change only "
                  "when it stops at an epoch's end)" if set(changed) & set(FIXED_WITHIN_AN_EPOCH) else "")
        raise UserError(f"cannot resume from {path}: {differences}{within}; "
                        "use the original settings, or another --out for a new run")
    for key in RESUMABLE_CHANGES + FIXED_WITHIN_AN_EPOCH:
        if saved.get(key) != settings[key]:
            log(f"notice: resuming with {key} {settings[key]} instead of {saved.get(key)}")
    return checkpoint


# %% [markdown]
# ## Time limits and preemption: stop cleanly, resume by itself
#
# A job that reaches its time limit is killed, and everything since the last checkpoint is
# lost. The Slurm files ask for a warning instead:
#
# ```bash
# #SBATCH --time=01:00:00        # the limit
# #SBATCH --signal=USR1@300      # send SIGUSR1 to the job's processes 300 s before it
# #SBATCH --requeue              # allow the job to be put back in the queue
# ```
#
# On SIGUSR1 the script finishes the current step, writes a checkpoint that includes the
# position within the epoch, and requeues its own job (`scontrol requeue $SLURM_JOB_ID`).
# The job keeps its id, so when it starts again it finds the same run directory and
# `--resume` continues from the checkpoint. SIGTERM (preemption, `scancel`) also stops the
# run cleanly, without requeueing: Slurm decides about preempted jobs.
#
# All ranks must stop after the **same** step, or one would wait for ever in a collective
# the others never join: every few steps they agree, with one tiny all-reduce, whether
# any of them was signalled.

# %%
class StopRequest:
    """Remembers the first SIGUSR1 or SIGTERM; the training loop checks it between steps."""

    def __init__(self):
        self.received: str | None = None

    def install(self) -> "StopRequest":
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self.remember)
        return self

    def remember(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name


STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on stopping


def agree_to_stop(stop: StopRequest | None, rt: Runtime, diverged: torch.Tensor | None = None) -> str | None:
    """The same answer on every rank: "diverged" if the loss of any rank became NaN or infinite, else
    SIGUSR1 if any rank got it, else SIGTERM if any did, else None."""
    got = stop.received if stop is not None else None
    votes = rt.all_reduce_sum(torch.stack([torch.tensor(float(got == "SIGUSR1"), device=rt.device),
                                           torch.tensor(float(got == "SIGTERM"), device=rt.device),
                                           (diverged if diverged is not None else torch.tensor(False)).to(
                                               rt.device, torch.float32)]))
    return "diverged" if votes[2] > 0 else "SIGUSR1" if votes[0] > 0 else "SIGTERM" if votes[1] > 0 else None


def diverged(epoch: int, first_nonfinite: int, cfg) -> UserError:
    """The one-line error for a loss that became NaN or infinite; nothing of that epoch is written."""
    where = f"at step {first_nonfinite + 1}" if first_nonfinite >= 0 else "on another process"
    return UserError(f"the training loss became NaN or infinite in epoch {epoch + 1} {where}: the learning rate "
                     f"(--lr {cfg.lr:g}) is probably too high; lower it (last.pt and best.pt keep the last "
                     "finished epoch)")


def requeue_slurm_job(rt: Runtime) -> str:
    """Put this Slurm job back in the queue; it will resume from the same run directory."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job: resume by hand with --resume"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        return f"could not requeue job {job} ({result.stderr.strip()}): resubmit it with --resume"
    return f"requeued Slurm job {job}: it resumes from its checkpoint when it starts again"


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way through, after a mid-epoch resume.

    With `seed_draws` (--augment) it yields (index, seed) pairs: the random crop and flip of
    an image are then a function of the seed, the epoch and the image alone, not of which
    DataLoader worker happened to load it, so a resumed epoch draws them exactly as an
    uninterrupted one would.
    """

    skip = 0  # indices of this rank to leave out at the start of the epoch
    seed_draws = False

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.skip, None)
        if not self.seed_draws:
            return indices
        return ((i, ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63) for i in indices)

    def __len__(self) -> int:
        return super().__len__() - self.skip


# %% [markdown]
# ## One epoch of training
#
# The loop is the textbook one, with three details that matter for speed:
# `zero_grad(set_to_none=True)` skips a memset, `non_blocking=True` overlaps the copy to
# the GPU with compute (with pinned memory), and the loss is accumulated on the device and
# read once per epoch, because `loss.item()` in every step makes the CPU wait for the GPU.

# %%
def to_device(images, labels, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:  # not for cached features (--cache-features)
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def progress(iterable, total: int, description: str, enabled: bool):
    """tqdm bars on terminals and in notebooks; nothing in batch jobs (they log lines)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False)


def interactive() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def train_one_epoch(model, loader, optimizer, scaler, cfg, rt: Runtime, epoch: int, dtype,
                    stop: StopRequest | None = None, partial: dict | None = None) -> dict:
    """One epoch, or its rest after a mid-epoch resume (`partial`: what was done before).

    Returns the epoch's statistics; when asked to stop, returns `stopped_at_step` and the
    sums so far instead, for the checkpoint.
    """
    model.train()
    partial = partial or {"step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0}
    first = partial["step"]
    steps = first + len(loader) if not cfg.max_steps else min(cfg.max_steps, first + len(loader))
    log_every = cfg.log_every or max(1, steps // 4)
    # The sums of the steps before a resume are global; only rank 0 carries them on.
    loss_sum = torch.tensor(partial["loss_sum"] if rt.is_main else 0.0, device=rt.device, dtype=torch.float64)
    seen = partial["seen"] if rt.is_main else 0
    started = time.perf_counter() - partial["seconds"]
    first_nonfinite = torch.tensor(-1, device=rt.device)  # on the device: no wait for the GPU in every step
    bar = progress(loader, steps - first, f"epoch {epoch + 1}", rt.is_main and interactive())
    for step, (images, labels) in enumerate(bar, start=first):
        if step >= steps:
            break
        images, labels = to_device(images, labels, rt.device, cfg.channels_last)
        with autocast(rt.device, dtype):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(loss.detach()), step, first_nonfinite)
        if not interactive() and (step + 1) % log_every == 0:
            rt.log(f"epoch {epoch + 1} step {step + 1}/{steps} loss {loss.item():.4f}")
        reason = (agree_to_stop(stop, rt, first_nonfinite >= 0) if (step + 1) % STOP_CHECK_EVERY == 0
                  and step + 1 < steps else None)
        if reason == "diverged":
            raise diverged(epoch, int(first_nonfinite), cfg)
        if reason:
            totals = rt.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device,
                                                                            dtype=torch.float64)]))
            return {"stopped_at_step": step + 1, "reason": reason, "loss_sum": totals[0].item(), "seen": int(totals[1].item()),
                    "seconds": time.perf_counter() - started}
    totals = rt.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device,
                                                                    dtype=torch.float64)]))
    if not torch.isfinite(totals[0]):  # on some rank: the sums are global
        raise diverged(epoch, int(first_nonfinite), cfg)
    seconds = time.perf_counter() - started
    return {"train_loss": (totals[0] / totals[1]).item(), "train_samples": int(totals[1].item()),
            "images_per_sec": totals[1].item() / seconds, "train_seconds": seconds}


# %% [markdown]
# ## Validation
#
# The original workshop validated in training mode with gradients on: BatchNorm then
# normalised with the validation batch's statistics, and autograd kept every activation.
# Here validation runs in `model.eval()` under `torch.inference_mode()`.
#
# Each process evaluates its own slice of the validation set, **every image exactly
# once** (a padded `DistributedSampler` would count some images twice), and the sums of
# loss, correct answers and images are added up across processes before dividing.

# %%
class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, rank + 2*world, ...: each index on exactly one rank."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.inference_mode()
def evaluate(model, loader, cfg, rt: Runtime, dtype) -> dict:
    model.eval()
    sums = torch.zeros(4, device=rt.device, dtype=torch.float64)  # loss, top-1, top-5, images
    for images, labels in loader:
        images, labels = to_device(images, labels, rt.device, cfg.channels_last)
        with autocast(rt.device, dtype):
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([
            F.cross_entropy(logits.float(), labels, reduction="sum").double(),
            (top[:, 0] == labels).sum().double(),
            (top == labels[:, None]).any(dim=1).sum().double(),
            torch.tensor(float(len(labels)), device=rt.device, dtype=torch.float64),
        ])
    loss, top1, top5, count = rt.all_reduce_sum(sums).tolist()
    return {"val_loss": loss / count, "val_acc": top1 / count, "val_top5": top5 / count,
            "val_samples": int(count)}


# %% [markdown]
# ## Speed switches
#
# Three options change how the work is done, not what is learned; the `benchmark`
# notebook measures each of them:
#
# * `--cache-features`: a frozen backbone in evaluation mode gives the same features for
#   an image in every epoch, so, without random augmentation, they are computed **once**
#   (each process computes its share; a sum across processes gives everyone all of them)
#   and every epoch trains only the head on them, in the same order, to the same
#   weights. Not with `--finetune` (the backbone changes every step) nor with `--augment`
#   (every epoch sees other pixels).
# * `--gpu-decode`: the JPEGs are decoded on the GPU (see the `data` notebook).
# * `--profile`: `torch.profiler` records training steps 2 to 5 of the first epoch and
#   writes a trace that https://ui.perfetto.dev (or `chrome://tracing`) opens, and a
#   table of the most expensive operations.

# %%
def use_gpu_decode(cfg, rt: Runtime) -> bool:
    if cfg.gpu_decode and rt.device.type != "cuda":
        rt.log("notice: --gpu-decode needs a CUDA device; decoding the JPEGs on the CPU as usual")
    return cfg.gpu_decode and rt.device.type == "cuda"


@torch.no_grad()  # not inference_mode: the head trains on these tensors later
def backbone_features(model, dataset, cfg, rt: Runtime, dtype) -> TensorDataset:
    """The frozen backbone's features of every image of dataset, in its order, on every rank."""
    model.eval()
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, persistent_workers=False,
                         sampler=ShardSampler(len(dataset), rt.rank, rt.world_size))
    rows = torch.arange(rt.rank, len(dataset), rt.world_size, device=rt.device)
    features = torch.zeros(len(dataset), model.num_features, device=rt.device)
    labels = torch.zeros(len(dataset), dtype=torch.long, device=rt.device)
    done = 0
    for images, batch_labels in loader:
        images, batch_labels = to_device(images, batch_labels, rt.device, cfg.channels_last)
        batch_rows = rows[done:done + len(batch_labels)]
        with autocast(rt.device, dtype):
            features[batch_rows] = model.backbone(images).float()
        labels[batch_rows] = batch_labels
        done += len(batch_labels)
    return TensorDataset(rt.all_reduce_sum(features).cpu(), rt.all_reduce_sum(labels).cpu())


def cached_feature_loaders(model, splits, sampler, cfg, rt: Runtime, dtype):
    """Loaders of backbone features instead of images; the same sampler gives the same order."""
    started = time.perf_counter()
    train, valid = (backbone_features(model, splits[split], cfg, rt, dtype) for split in ("train", "valid"))
    rt.log(f"cached the backbone features of {len(train)} train and {len(valid)} valid images "
           f"in {time.perf_counter() - started:.1f}s")
    return (make_loader(train, cfg.batch_size, 0, sampler=sampler),
            make_loader(valid, cfg.batch_size, 0, sampler=ShardSampler(len(valid), rt.rank, rt.world_size)))


class ProfiledLoader:
    """The training loader, with torch.profiler recording steps 2 to 5 of its first pass."""

    def __init__(self, loader, directory: Path, rt: Runtime):
        self.loader, self.directory, self.rt, self.done = loader, Path(directory), rt, False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.done:
            yield from self.loader
            return
        self.done = True
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.rt.device.type == "cuda" else [])
        with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                     on_trace_ready=self.save) as profiler:
            for batch in self.loader:
                yield batch
                profiler.step()

    def save(self, profiler) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / f"trace-rank{self.rt.rank}.json"
        profiler.export_chrome_trace(str(trace))
        order = "self_device_time_total" if self.rt.device.type == "cuda" else "self_cpu_time_total"
        (self.directory / f"top-ops-rank{self.rt.rank}.txt").write_text(
            profiler.key_averages().table(sort_by=order, row_limit=15) + "\n")
        self.rt.log(f"profiler trace written to {trace}: open it in https://ui.perfetto.dev")


# %% [markdown]
# ## Putting it together: `fit`
#
# `fit` builds data, model and optimizer, resumes when asked, and runs the epochs. Only
# rank 0 writes files and prints; the other ranks wait for it at a barrier, so nobody
# starts the next epoch (or exits) while a checkpoint is half written.

# %%
def check_sizes(cfg, rt: Runtime, train_size: int, val_size: int) -> None:
    if cfg.batch_size * rt.world_size > train_size:
        raise UserError(f"--batch-size {cfg.batch_size} x {rt.world_size} process(es) is larger than the "
                        f"{train_size} training images: use --batch-size {max(1, train_size // rt.world_size)} or less")
    if rt.world_size > val_size:
        raise UserError(f"{rt.world_size} processes but only {val_size} validation images: "
                        "use fewer processes or a larger validation split")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def on_rank0(rt: Runtime, decide):
    """decide() on rank 0 only; every rank gets its result, or raises its UserError."""
    outcome = None
    if rt.is_main:
        try:
            outcome = ("ok", decide())
        except UserError as error:
            outcome = ("error", str(error))
    kind, value = rt.broadcast_object(outcome)
    if kind == "error":
        raise UserError(value)
    return value


def capped_workers(workers: int, rt: Runtime) -> int:
    """More loader processes than CPUs only make them queue for the CPUs (and can exhaust memory)."""
    cpus = available_cpus()
    if workers > cpus:
        rt.log(f"notice: --workers {workers} is more than the {cpus} CPU(s) available: using {cpus}")
        return cpus
    return workers


@dataclass
class RunState:
    """Where a run stands: epochs finished, the best of them, every finished epoch's metrics, and the
    position within the next epoch when it stopped in the middle of one."""
    epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    partial: dict | None = None
    metrics: list[dict] = field(default_factory=list)


def resume_checkpoint(out: Path, cfg, settings: dict, log=print) -> dict | None:
    """last.pt when resuming and it exists (rank 0 decides: ranks may see a shared directory differently)."""
    path = out / "last.pt"
    return load_checkpoint(path, settings, log) if cfg.resume and path.exists() else None


def restore(checkpoint: dict, model, optimizer, scaler, cfg, path: Path) -> RunState:
    load_state_into(model, checkpoint, path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay  # a new --weight-decay applies; the lr is set every epoch
    if scaler.is_enabled() and checkpoint["scaler"]:  # fp16 on both sides: bf16 and fp32 runs have no scaler state
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return RunState(checkpoint["epoch"], checkpoint["best_val_acc"], checkpoint["best_epoch"],
                    checkpoint["partial"], checkpoint["metrics"])


def save_best(out: Path, record: dict, state: RunState) -> None:
    save_checkpoint(out / "best.pt", {**record, "epoch": state.best_epoch, "val_acc": state.best_val_acc})


def repair_best(out: Path, state: RunState, record: dict) -> None:
    """After a kill between writing last.pt and best.pt: the resumed model is then the best one."""
    if state.partial or state.epoch == 0 or state.best_epoch != state.epoch:
        return
    with contextlib.suppress(Exception):  # a missing or broken best.pt is rewritten
        if torch.load(out / "best.pt", map_location="cpu", weights_only=True).get("epoch") == state.best_epoch:
            return
    save_best(out, record, state)


def check_finite(record: dict, cfg) -> None:
    """Stop before a record with NaN or infinities reaches metrics.jsonl (JSON has no such numbers)."""
    bad = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise UserError(f"{', '.join(bad)} of epoch {record['epoch']} is NaN or infinite: the learning rate "
                        f"(--lr {cfg.lr:g}) is probably too high; lower it (last.pt and best.pt keep the last "
                        "finished epoch)")


@dataclass
class Training:
    """Everything fit builds before the first epoch."""
    cfg: argparse.Namespace
    rt: Runtime
    out: Path
    splits: dict
    sampler: ResumableSampler
    train_loader: object
    val_loader: object
    model: nn.Module
    frozen_weights_hash: str | None  # the hash of the frozen starting weights (rank 0), None when all train
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None

    @property
    def classes(self) -> list[str]:
        return self.splits["train"].classes

    def model_record(self) -> dict:
        return model_record(self.model, self.cfg, self.classes, self.frozen_weights_hash)

    def settings(self) -> dict:
        return run_settings(self.cfg, self.rt, self.classes, self.frozen_weights_hash, self.dtype)

    def checkpoint(self, state: RunState, epochs_done: int, rng: dict, partial: dict | None = None) -> dict:
        return {**self.model_record(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epochs_done, "partial": partial, "best_val_acc": state.best_val_acc,
                "best_epoch": state.best_epoch, "rng": rng, "settings": self.settings(), "metrics": state.metrics}


def prepare(cfg, rt: Runtime) -> Training:
    """Data, model, optimizer and precision; the checks that can fail all come before the run directory."""
    cfg.workers = capped_workers(cfg.workers, rt)
    out = Path(rt.broadcast_object(str(cfg.out or default_run_dir(cfg.arch))))
    on_rank0(rt, lambda: check_run_dir_is_free(out, cfg))  # at once, not after reading the data
    splits = load_splits(cfg.data, cfg.image_size, augment=cfg.augment, gpu_decode=use_gpu_decode(cfg, rt),
                         skip_bad=cfg.skip_bad_images)
    check_sizes(cfg, rt, len(splits["train"]), len(splits["valid"]))
    sampler = ResumableSampler(splits["train"], num_replicas=rt.world_size, rank=rt.rank,
                               shuffle=not cfg.no_shuffle, seed=cfg.seed)
    sampler.seed_draws = cfg.augment
    train_loader = make_loader(splits["train"], cfg.batch_size, cfg.workers, sampler=sampler)
    val_loader = make_loader(splits["valid"], cfg.batch_size, cfg.workers,
                             sampler=ShardSampler(len(splits["valid"]), rt.rank, rt.world_size))

    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    random.seed(cfg.seed)
    model = build_model(cfg.arch, len(splits["train"].classes), cfg.weights, cfg.finetune, log=rt.log)
    frozen_hash = frozen_digest(model) if rt.is_main else None  # still on the CPU
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = pick_precision(cfg.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)
    set_cudnn_benchmark(cfg.cudnn_benchmark)
    return Training(cfg, rt, out, splits, sampler, train_loader, val_loader, model, frozen_hash,
                    build_optimizer(cfg, model), scaler, dtype)


def fit(cfg, rt: Runtime | None = None, stop: StopRequest | None = None) -> dict:
    """Train according to cfg; return the summary of the last epoch (or of the stop)."""
    if rt is None:
        device, notices = pick_device(cfg.device)
        rt = Runtime(device=device, notices=notices)
    for notice in rt.notices:
        rt.log(notice)
    t = prepare(cfg, rt)
    with contextlib.ExitStack() as held:
        def claim() -> None:
            held.enter_context(contextlib.closing(claim_run_dir(t.out, cfg, rt.log)))  # released when fit ends
        on_rank0(rt, claim)  # only rank 0 creates, locks and writes the run directory
        checkpoint = on_rank0(rt, lambda: resume_checkpoint(t.out, cfg, t.settings(), rt.log))
        state = RunState()
        if checkpoint:
            state = restore(checkpoint, t.model, t.optimizer, t.scaler, cfg, t.out / "last.pt")
            where = (f"epoch {state.epoch + 1} step {state.partial['step']}" if state.partial
                     else f"the end of epoch {state.epoch}")
            rt.log(f"resumed from {t.out / 'last.pt'} at {where}")
        del checkpoint  # its tensors are in the model and the optimizer now
        if rt.is_main:
            write_json(t.out / "config.json", run_config(cfg, rt, t.classes))
            write_metrics(t.out, state.metrics)  # the lines a kill lost come back; those of epochs to redo go
            repair_best(t.out, state, t.model_record())
        return train_epochs(t, state, stop)


def train_epochs(t: Training, state: RunState, stop: StopRequest | None) -> dict:
    """The epochs from state on; after each: last.pt, then best.pt, then the metrics line (rank 0)."""
    cfg, rt, out = t.cfg, t.rt, t.out
    train_loader, val_loader = t.train_loader, t.val_loader
    if cfg.cache_features:  # the backbone runs once, here; every epoch trains the head on its output
        train_loader, val_loader = cached_feature_loaders(t.model, t.splits, t.sampler, cfg, rt, t.dtype)
    if cfg.profile:
        train_loader = ProfiledLoader(train_loader, out / cfg.profile, rt)
    train_model = rt.wrap_model(t.model, cfg)
    if cfg.compile:
        train_model = torch.compile(train_model)

    total, trainable = count_parameters(t.model)
    rt.log(f"run directory {out}")
    rt.log(f"{cfg.arch}: {trainable:,} of {total:,} parameters train | {len(t.classes)} classes | "
           f"{len(t.splits['train'])} train, {len(t.splits['valid'])} valid images | device {rt.device} | "
           f"precision {precision_name(t.dtype)}")
    rt.log(f"processes {rt.world_size} | batch per process {cfg.batch_size} | global batch "
           f"{cfg.batch_size * rt.world_size} | lr {cfg.lr:g} | workers {cfg.workers}")
    wandb_run = start_wandb(cfg, out, run_config(cfg, rt, t.classes)) if rt.is_main and cfg.wandb != "off" else None

    record = {}
    last_epoch = min(cfg.epochs, state.epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs
    for epoch in range(state.epoch, last_epoch):
        partial, state.partial = state.partial, None
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs)  # from the epoch alone: --epochs may change on resume
        set_learning_rate(t.optimizer, lr)
        started = time.perf_counter() - (partial["seconds"] if partial else 0.0)
        epoch_rng = rng_state()  # a mid-epoch checkpoint restores the state of the epoch's start
        t.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        t.sampler.skip = partial["step"] * cfg.batch_size if partial else 0
        train_stats = train_one_epoch(train_model, train_loader, t.optimizer, t.scaler, cfg, rt, epoch, t.dtype,
                                      stop, partial)
        t.sampler.skip = 0
        if "stopped_at_step" in train_stats:
            finish_wandb(wandb_run, cfg, out)
            position = {"step": train_stats["stopped_at_step"],
                        **{k: train_stats[k] for k in ("loss_sum", "seen", "seconds")}}
            return stop_run(rt, out, epoch, train_stats, cfg, state.best_val_acc,
                            lambda: save_checkpoint(out / "last.pt", t.checkpoint(state, epoch, epoch_rng, position)))
        val_stats = evaluate(t.model, val_loader, cfg, rt, t.dtype)
        record = {"epoch": epoch + 1, **train_stats, **val_stats, "lr": lr,
                  "epoch_seconds": time.perf_counter() - started}
        if cfg.skip_bad_images:
            record["skipped_images"] = count_skipped(t.splits, rt)
            rt.log(f"skipped {record['skipped_images']} unreadable image(s) in epoch {epoch + 1} (--skip-bad-images)")
        check_finite(record, cfg)
        is_best = record["val_acc"] >= state.best_val_acc
        if is_best:
            state.best_val_acc, state.best_epoch = record["val_acc"], epoch + 1
        state.epoch, state.metrics = epoch + 1, [*state.metrics, record]
        if rt.is_main:  # in this order: last.pt holds every finished epoch's metrics, so a resume repairs the rest
            save_checkpoint(out / "last.pt", t.checkpoint(state, epoch + 1, rng_state()))
            if is_best:
                save_best(out, t.model_record(), state)
            append_metrics(out, record)
            if wandb_run:
                wandb_run.log(record, step=epoch + 1)
        rt.log(f"epoch {epoch + 1}/{cfg.epochs} train_loss {record['train_loss']:.4f} "
               f"val_loss {record['val_loss']:.4f} val_acc {record['val_acc']:.4f} "
               f"val_top5 {record['val_top5']:.4f} {record['images_per_sec']:.1f} img/s "
               f"{record['epoch_seconds']:.1f}s")
        rt.barrier()
        reason = agree_to_stop(stop, rt) if epoch + 1 < last_epoch else None  # signalled during validation?
        if reason:
            finish_wandb(wandb_run, cfg, out)
            return stop_run(rt, out, epoch + 1, {"stopped_at_step": 0, "reason": reason}, cfg, state.best_val_acc,
                            lambda: None)
    finish_wandb(wandb_run, cfg, out)
    final = record or (state.metrics[-1] if state.metrics else {})
    return {"run_dir": str(out), "epochs": cfg.epochs, "best_val_acc": state.best_val_acc, **final}


def count_skipped(splits: dict, rt: Runtime) -> int:
    """Unreadable images left out since the last call, over all ranks (--skip-bad-images)."""
    local = 0
    for dataset in splits.values():
        with dataset.skipped.get_lock():
            local, dataset.skipped.value = local + dataset.skipped.value, 0
    return int(rt.all_reduce_sum(torch.tensor([float(local)], device=rt.device)).item())


def stop_run(rt: Runtime, out: Path, epoch: int, stats: dict, cfg, best_acc: float, save) -> dict:
    """Checkpoint (rank 0), wait until it is on disk (all ranks), then requeue on SIGUSR1."""
    if rt.is_main:
        save()
    rt.barrier()
    where = f"epoch {epoch + 1} step {stats['stopped_at_step']}"
    note = requeue_slurm_job(rt) if rt.is_main and stats["reason"] == "SIGUSR1" else "resume with --resume"
    return {"run_dir": str(out), "epochs": cfg.epochs, "best_val_acc": best_acc,
            "stopped": f"stopped at {where} on {stats['reason']}; checkpoint {out / 'last.pt'}; {note}"}


def summary_line(summary: dict) -> str:
    if "stopped" in summary:
        return f"stopped: {summary['stopped']}"
    return (f"summary: epochs={summary.get('epoch', 0)}/{summary['epochs']} val_acc={summary.get('val_acc', float('nan')):.4f} "
            f"val_top5={summary.get('val_top5', float('nan')):.4f} best_val_acc={summary['best_val_acc']:.4f} "
            f"images_per_sec={summary.get('images_per_sec', float('nan')):.1f} run_dir={summary['run_dir']}")


# %% [markdown]
# ## Weights & Biases, offline by default
#
# Compute nodes have no internet, so W&B runs in **offline** mode and the run is uploaded
# later from a login node with `wandb sync`. The mode is set in the environment before
# `wandb` is imported: `wandb.init(mode="offline")` alone still makes a network lookup at
# exit that stalls on nodes without DNS. The whole config is passed to `wandb.init`, so
# every hyperparameter reaches W&B (the original overwrote `wandb.config` afterwards).
#
# The W&B run's id comes from the run directory, so a requeued or resumed job continues
# the same W&B run instead of starting a new one each time it starts.

# %%
def wandb_run_id(out: Path) -> str:
    """The same id for every start of the run in `out` (W&B ids: letters, digits, - and _)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", out.name)[:40]
    return f"{name}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]}"


def start_wandb(cfg, out: Path, config: dict):
    os.environ["WANDB_MODE"] = cfg.wandb
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    return wandb.init(project=cfg.wandb_project, name=out.name, dir=str(out), config=config,
                      id=wandb_run_id(out), resume="allow")


def finish_wandb(run, cfg, out: Path) -> None:
    if run is None:
        return
    run.finish()
    if cfg.wandb == "offline":
        print(f"W&B run saved offline; upload it from a login node with: wandb sync {out / 'wandb'}/offline-run-*")


# %%
def main(argv: list[str] | None = None) -> int:
    stop = StopRequest().install()  # first: a time-limit warning may come at any moment
    cfg = parse_args(argv)
    print(summary_line(fit(cfg, stop=stop)), flush=True)
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)

# %% [markdown]
# ## Try it
#
# A short run on the synthetic data. Watch the per-epoch lines: the training loss falls,
# and the validation accuracy climbs far above chance (1 / number of classes).
#
# The run directory already holds a run when you run this notebook a second time, and
# `fit` refuses to destroy a run silently: `--overwrite` says that replacing it is
# intended. Without it, you would choose a fresh `--out` or continue with `--resume`.

# %% tags=["active-ipynb"]
# from data import make_synthetic
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=10, per_class=(40, 10, 10), image_size=image_size)
# cfg = parse_args(["--data", data_dir, "--arch", arch, "--weights", weights, "--image-size", str(image_size),
#                   "--epochs", str(epochs), "--batch-size", str(batch_size), "--workers", str(workers),
#                   "--out", out_dir, "--overwrite"])
# summary = fit(cfg)
# print(summary_line(summary))

# %% [markdown]
# ### The curves
#
# Everything is in `metrics.jsonl`, so plotting needs no running process: the same cell
# works on a run that finished as a batch job last night.

# %% tags=["active-ipynb"]
# import matplotlib.pyplot as plt
# metrics = read_metrics(Path(out_dir))
# epochs_done = [m["epoch"] for m in metrics]
# fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
# left.plot(epochs_done, [m["train_loss"] for m in metrics], label="train")
# left.plot(epochs_done, [m["val_loss"] for m in metrics], label="valid")
# left.set_xlabel("epoch"); left.set_ylabel("loss"); left.legend()
# right.plot(epochs_done, [m["val_acc"] for m in metrics], label="top-1")
# right.plot(epochs_done, [m["val_top5"] for m in metrics], label="top-5")
# right.axhline(1 / 10, color="grey", linestyle=":", label="chance")
# right.set_xlabel("epoch"); right.set_ylabel("validation accuracy"); right.legend()
# plt.show()

# %% [markdown]
# ### Predictions against the truth
#
# The best model on a few validation images: green titles are right, red ones wrong. Do
# the mistakes share a colour? `load_trained_model` rebuilds the whole model from
# `best.pt`, which holds only what training changed.

# %% tags=["active-ipynb"]
# from data import IMAGENET_MEAN, IMAGENET_STD
# model, best = load_trained_model(Path(out_dir) / "best.pt")
# valid = load_splits(data_dir, image_size, splits=("valid",))["valid"]
# picks = list(range(0, len(valid), max(1, len(valid) // 8)))[:8]
# images = torch.stack([valid[i][0] for i in picks])
# with torch.inference_mode():
#     predicted = model(images).argmax(1)
# fig, axes = plt.subplots(2, 4, figsize=(10, 5.5))
# for ax, i, image, guess in zip(axes.flat, picks, images, predicted):
#     shown = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
#     ax.imshow(shown.permute(1, 2, 0).clamp(0, 1))
#     truth = valid.samples[i][1]
#     ax.set_title(f"{best['classes'][guess]}\n(true: {best['classes'][truth]})", fontsize=8,
#                  color="green" if guess == truth else "red")
#     ax.axis("off")
# plt.show()

# %% [markdown]
# ## Exercises
#
# **1.** Resume the run for two more epochs: call `fit` again with `--epochs` raised by 2
# and `--resume`. How many lines does `metrics.jsonl` have afterwards? Then look at its
# `lr` column: the two new epochs continue the cosine schedule of the longer run, so
# they train at `cosine_lr(cfg.lr, e, epochs + 2)` for epochs `e = epochs, epochs + 1`
# (counted from 0), not at 0.

# %% tags=["active-ipynb"]
# resumed_lines = None  # your answer: a number

# %% tags=["active-ipynb"]
# new_lrs = [m["lr"] for m in read_metrics(Path(out_dir))[epochs:]]
# longer_schedule = [cosine_lr(cfg.lr, e, epochs + 2) for e in range(epochs, epochs + 2)]
# if resumed_lines == epochs + 2 and len(new_lrs) == 2 and all(
#         lr > 0 and math.isclose(lr, want) for lr, want in zip(new_lrs, longer_schedule)):
#     print(f"Correct: resuming continues after the last finished epoch, appends one line per new epoch, "
#           f"and the new epochs follow the longer schedule (lr {new_lrs[0]:.2g}, {new_lrs[1]:.2g}).")
# else:
#     print("Not yet. Hint: resume first (the solution shows how); the checkpoint remembers the last finished "
#           "epoch, only new epochs add lines, and their lr column must follow the longer schedule.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# more = parse_args(["--data", data_dir, "--arch", arch, "--weights", weights, "--image-size", str(image_size),
#                    "--epochs", str(epochs + 2), "--batch-size", str(batch_size), "--workers", str(workers),
#                    "--out", out_dir, "--resume"])
# fit(more)
# resumed_lines = len(read_metrics(Path(out_dir)))
# ```
# </details>
#
# **2.** Run `python scripts/train.py --help` in a terminal. Which option would you change
# first to make the real ResNet-152 run fit in a 40-minute workshop slot?
