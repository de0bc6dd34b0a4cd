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
import itertools
import json
import os
import platform
import random
import re
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

from data import (UserError, atomic_write, default_num_workers, load_splits, make_loader, run_cli,
                  set_compute_threads)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<job id or time>-<arch>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt when it exists")
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


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    cfg = (parser or build_parser()).parse_args(argv)
    checks = {"--epochs": cfg.epochs >= 1, "--batch-size": cfg.batch_size >= 1, "--lr": cfg.lr > 0,
              "--image-size": cfg.image_size >= 16, "--workers": cfg.workers is None or cfg.workers >= 0,
              "--max-steps": cfg.max_steps >= 0, "--stop-after": cfg.stop_after >= 0}
    for option, ok in checks.items():
        if not ok:
            raise UserError(f"{option} {getattr(cfg, option[2:].replace('-', '_'))} is out of range: see --help")
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
            check_gpu_kernels(0)
            return torch.device("cuda"), gpu_notices()
        return torch.device("cpu"), ["notice: no CUDA device found; training on the CPU"]
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is visible here; use --device cpu or auto")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        check_gpu_kernels(device.index or 0)
        return device, gpu_notices()
    return device, []


# %% [markdown]
# ### Does this PyTorch have kernels for this GPU?
#
# A PyTorch wheel carries compiled kernels for a list of GPU architectures
# (`torch.cuda.get_arch_list()`, e.g. `sm_75 … sm_120`), and each new release drops the
# oldest. The course's pinned wheel has none for a V100 (`sm_70`, Volta): there the first
# convolution would fail with an obscure "no kernel image" error. So every training start
# checks, and stops with one line naming the way out: the site's own PyTorch module, or a
# build whose list includes the GPU. A kernel for `sm_XY` runs on GPUs of the same major
# version XY and later (`sm_80` on an `sm_86`); a `compute_XY` entry (PTX) is compiled for
# any GPU from XY on when first used. ROCm builds (AMD GPUs) name architectures differently
# and are not checked.

# %%
def kernels_run_on(arch: str, major: int, minor: int) -> bool:
    """Whether an entry of torch.cuda.get_arch_list() runs on a GPU of compute capability major.minor."""
    match = re.fullmatch(r"(sm|compute)_(\d+)[a-z]?", arch)
    if not match:
        return False
    code = int(match.group(2))
    if match.group(1) == "compute":
        return code <= major * 10 + minor
    return code // 10 == major and code % 10 <= minor


def check_gpu_kernels(index: int = 0) -> None:
    """Stop with one line when this PyTorch build has no kernels for CUDA GPU `index`."""
    if torch.version.cuda is None:  # ROCm or a CPU-only build: nothing to check
        return
    arch_list = torch.cuda.get_arch_list()
    major, minor = torch.cuda.get_device_capability(index)
    if not arch_list or any(kernels_run_on(arch, major, minor) for arch in arch_list):
        return
    volta = " (for Volta, sm_70: CUDA 12.6 builds kept it longest)" if (major, minor) < (7, 5) else ""
    raise UserError(f"GPU {index} ({torch.cuda.get_device_name(index)}) is sm_{major}{minor}, but this PyTorch "
                    f"({torch.__version__}) has kernels only for {' '.join(arch_list)}: use your site's PyTorch "
                    "(COURSE_ENV_ACTIVATE=\"module load ...\" in slurm/site.sh) or install a PyTorch build whose "
                    f"architecture list includes sm_{major}{minor}{volta}")


def gpu_notices() -> list[str]:
    """A ROCm build on AMD GPUs works like CUDA in PyTorch; the course tests it nowhere."""
    if torch.version.hip:
        return [f"notice: ROCm build of PyTorch (HIP {torch.version.hip}) on an AMD GPU: the course's AMD paths "
                "are untested"]
    return []


# %% [markdown]
# ## Mixed precision
#
# On GPUs, bf16 autocast roughly doubles the speed of the convolutions (tensor cores) at
# no cost in accuracy; it is native from compute capability 8.0 on (A100 and later).
# Older GPUs (a V100 is 7.0) only emulate bf16, so `auto` gives them fp16 with a gradient
# scaler, which keeps small gradients from rounding to zero. On most CPUs bf16 is *slower* than fp32:
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
            # Native bf16 only: is_bf16_supported() alone also says True where PyTorch merely emulates
            # it (compute capability 7.x, e.g. V100), slower than fp16 with a gradient scaler.
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native_bf16 else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def bf16_support() -> str:
    """How the current CUDA GPU runs bf16 (the GPU check reports it): native, emulated or no."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "native"
    return "emulated (slow: --amp auto uses fp16)" if torch.cuda.is_bf16_supported() else "no"


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
# | `last.pt` | model, optimizer, scheduler, epoch and RNG states: enough to resume |
# | `best.pt` | the model with the best validation accuracy so far |
#
# Checkpoints are written to a temporary file and renamed, so a job killed while writing
# leaves the previous checkpoint intact.

# %%
def default_run_dir(arch: str) -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return Path("runs") / f"{job or datetime.now().strftime('%Y%m%d-%H%M%S')}-{arch}"


def prepare_run_dir(out: Path) -> Path:
    """Create the run directory and prove it is writable before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to run directory {out} ({error.strerror}): choose another --out") from None
    return out


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
    import hashlib
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# %% [markdown]
# ## Resuming
#
# A resumed run must end exactly where an uninterrupted one would. Besides the weights
# that needs the optimizer's moments, the learning-rate schedule, the epoch, and the
# random number generators. The data order of epoch *e* is a function of the seed and *e*
# alone (the sampler's `set_epoch`), so it needs no state of its own; with `--augment`,
# so is each image's random crop and flip (the sampler hands every image its own seed).
#
# A checkpoint is a pickle, and unpickling can run arbitrary code, so it is loaded with
# `weights_only=True`, which accepts tensors and plain containers only.

# %%
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


def load_checkpoint(path: Path, expected: dict) -> dict:
    """Load last.pt; refuse one written for a different model or dataset."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot load checkpoint {path} ({error}): delete it to start afresh") from None
    for key, value in expected.items():
        if checkpoint.get("identity", {}).get(key) != value:
            raise UserError(f"cannot resume from {path}: it was written with {key}="
                            f"{checkpoint.get('identity', {}).get(key)!r}, this run has {key}={value!r}; "
                            "use another --out or the original settings")
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
# In the course's Slurm files the script does not requeue by itself: a job may run several
# steps (`sweep_steps.sbatch`), and a requeue ends all of them at once, perhaps before the
# other has written its checkpoint. There the script leaves a request
# (`COURSE_REQUEUE_REQUEST`) and the batch script requeues the job when every step has
# ended, or submits it again where a site forbids requeueing (`slurm/env.sh`).
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


def agree_to_stop(stop: StopRequest | None, rt: Runtime) -> str | None:
    """The same answer on every rank: SIGUSR1 if any rank got it, else SIGTERM if any did, else None."""
    got = stop.received if stop is not None else None
    votes = rt.all_reduce_sum(torch.tensor([float(got == "SIGUSR1"), float(got == "SIGTERM")], device=rt.device))
    return "SIGUSR1" if votes[0] > 0 else "SIGTERM" if votes[1] > 0 else None


def requeue_slurm_job(out: Path) -> str:
    """Ask for this Slurm job to go on from its checkpoint in `out`; return what will happen."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return f"not a Slurm job: resume by hand with --resume --out {out}"
    request = os.environ.get("COURSE_REQUEUE_REQUEST")
    if request:  # the course's Slurm files requeue once EVERY step of the job has stopped (slurm/env.sh)
        Path(request).write_text(f"{out}\n")
        return f"the batch script requeues Slurm job {job} once every step has stopped"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"no scontrol here to requeue Slurm job {job}: continue with --resume --out {out}"
    # Slurm ends the job's processes as soon as it accepts the requeue, scontrol among them.
    if result.returncode in (0, -signal.SIGTERM, -signal.SIGKILL):
        return f"requeued Slurm job {job}: it resumes from its checkpoint when it starts again"
    reason = result.stderr.strip() or f"scontrol exit code {result.returncode}"
    # A job submitted again gets a new id, and so a new run directory unless told this one.
    return f"could not requeue Slurm job {job} ({reason}): continue with --resume --out {out}"


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
        return ((i, (self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) for i in indices)

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
        if not interactive() and (step + 1) % log_every == 0:
            rt.log(f"epoch {epoch + 1} step {step + 1}/{steps} loss {loss.item():.4f}")
        reason = agree_to_stop(stop, rt) if (step + 1) % STOP_CHECK_EVERY == 0 and step + 1 < steps else None
        if reason:
            totals = rt.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device,
                                                                            dtype=torch.float64)]))
            return {"stopped_at_step": step + 1, "reason": reason, "loss_sum": totals[0].item(), "seen": int(totals[1].item()),
                    "seconds": time.perf_counter() - started}
    totals = rt.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device,
                                                                    dtype=torch.float64)]))
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
    elif cfg.gpu_decode and torch.version.hip:
        rt.log("notice: --gpu-decode uses NVIDIA's nvJPEG, which ROCm builds lack; decoding the JPEGs on the CPU")
        return False
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


def fit(cfg, rt: Runtime | None = None, stop: StopRequest | None = None) -> dict:
    """Train according to cfg; return the summary of the last epoch (or of the stop)."""
    if rt is None:
        device, notices = pick_device(cfg.device)
        rt = Runtime(device=device, notices=notices)
    for notice in rt.notices:
        rt.log(notice)
    threads = set_compute_threads(cfg.workers)  # before any computation: the loader's workers need cores too
    out = Path(rt.broadcast_object(str(cfg.out or default_run_dir(cfg.arch))))
    if rt.is_main:
        prepare_run_dir(out)
    splits = load_splits(cfg.data, cfg.image_size, augment=cfg.augment, gpu_decode=use_gpu_decode(cfg, rt),
                         skip_bad=cfg.skip_bad_images)
    classes = splits["train"].classes
    check_sizes(cfg, rt, len(splits["train"]), len(splits["valid"]))
    sampler = ResumableSampler(splits["train"], num_replicas=rt.world_size, rank=rt.rank,
                               shuffle=not cfg.no_shuffle, seed=cfg.seed)
    sampler.seed_draws = cfg.augment
    train_loader = make_loader(splits["train"], cfg.batch_size, cfg.workers, sampler=sampler)
    val_loader = make_loader(splits["valid"], cfg.batch_size, cfg.workers,
                             sampler=ShardSampler(len(splits["valid"]), rt.rank, rt.world_size))

    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    random.seed(cfg.seed)
    model = build_model(cfg.arch, len(classes), cfg.weights, cfg.finetune, log=rt.log).to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    dtype = pick_precision(cfg.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)
    set_cudnn_benchmark(cfg.cudnn_benchmark)

    identity = {"arch": cfg.arch, "num_classes": len(classes), "classes_digest": hash_classes(classes),
                "finetune": cfg.finetune, "weights": "none" if cfg.weights == "none" else "pretrained"}
    start_epoch, best_acc, partial = 0, -1.0, None
    if cfg.resume and (out / "last.pt").exists():
        checkpoint = load_checkpoint(out / "last.pt", identity)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scheduler.T_max = cfg.epochs  # more --epochs than before stretches the schedule
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start_epoch, best_acc, partial = checkpoint["epoch"], checkpoint["best_val_acc"], checkpoint.get("partial")
        where = f"epoch {start_epoch + 1} step {partial['step']}" if partial else f"the end of epoch {start_epoch}"
        rt.log(f"resumed from {out / 'last.pt'} at {where}")
    if rt.is_main:
        kept = [m for m in read_metrics(out) if m["epoch"] <= start_epoch]  # drop epochs redone
        atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in kept)))
        write_json(out / "config.json", run_config(cfg, rt, classes))
    if cfg.cache_features:  # the backbone runs once, here; every epoch trains the head on its output
        train_loader, val_loader = cached_feature_loaders(model, splits, sampler, cfg, rt, dtype)
    if cfg.profile:
        train_loader = ProfiledLoader(train_loader, out / cfg.profile, rt)
    train_model = rt.wrap_model(model, cfg)
    if cfg.compile:
        train_model = torch.compile(train_model)

    total, trainable = count_parameters(model)
    rt.log(f"run directory {out}")
    rt.log(f"{cfg.arch}: {trainable:,} of {total:,} parameters train | {len(classes)} classes | "
           f"{len(splits['train'])} train, {len(splits['valid'])} valid images | device {rt.device} | "
           f"precision {dtype or 'fp32'}")
    rt.log(f"processes {rt.world_size} | batch per process {cfg.batch_size} | global batch "
           f"{cfg.batch_size * rt.world_size} | lr {cfg.lr:g} | workers {cfg.workers} | {threads}")
    wandb_run = start_wandb(cfg, out, run_config(cfg, rt, classes)) if rt.is_main and cfg.wandb != "off" else None

    def checkpoint(epochs_done: int, rng: dict, partial_state: dict | None = None) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epochs_done,
                "partial": partial_state, "best_val_acc": best_acc, "rng": rng, "identity": identity}

    record = {}
    last_epoch = min(cfg.epochs, start_epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter() - (partial["seconds"] if partial else 0.0)
        epoch_rng = rng_state()  # a mid-epoch checkpoint restores the state of the epoch's start
        sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        sampler.skip = partial["step"] * cfg.batch_size if partial else 0
        train_stats = train_one_epoch(train_model, train_loader, optimizer, scaler, cfg, rt, epoch, dtype,
                                      stop, partial)
        sampler.skip, partial = 0, None
        if "stopped_at_step" in train_stats:
            finish_wandb(wandb_run, cfg, out)
            return stop_run(rt, out, epoch, train_stats, cfg, best_acc,
                            lambda: save_checkpoint(out / "last.pt", checkpoint(epoch, epoch_rng, {
                                "step": train_stats["stopped_at_step"], **{k: train_stats[k] for k in
                                                                           ("loss_sum", "seen", "seconds")}})))
        val_stats = evaluate(model, val_loader, cfg, rt, dtype)
        record = {"epoch": epoch + 1, **train_stats, **val_stats, "lr": scheduler.get_last_lr()[0],
                  "epoch_seconds": time.perf_counter() - started}
        if cfg.skip_bad_images:
            record["skipped_images"] = count_skipped(splits, rt)
            rt.log(f"skipped {record['skipped_images']} unreadable image(s) in epoch {epoch + 1} (--skip-bad-images)")
        scheduler.step()
        best_acc = max(best_acc, record["val_acc"])
        if rt.is_main:
            save_checkpoint(out / "last.pt", checkpoint(epoch + 1, rng_state()))
            if record["val_acc"] >= best_acc:
                save_checkpoint(out / "best.pt", {"model": model.state_dict(), "classes": classes,
                                                  "arch": cfg.arch, "epoch": epoch + 1, "val_acc": best_acc})
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
            return stop_run(rt, out, epoch + 1, {"stopped_at_step": 0, "reason": reason}, cfg, best_acc, lambda: None)
    finish_wandb(wandb_run, cfg, out)
    final = record or (read_metrics(out)[-1] if rt.is_main and read_metrics(out) else {})
    return {"run_dir": str(out), "epochs": cfg.epochs, "best_val_acc": best_acc, **final}


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
    note = requeue_slurm_job(out) if rt.is_main and stats["reason"] == "SIGUSR1" else "resume with --resume"
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

# %%
def start_wandb(cfg, out: Path, config: dict):
    os.environ["WANDB_MODE"] = cfg.wandb
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    return wandb.init(project=cfg.wandb_project, name=out.name, dir=str(out), config=config,
                      resume="allow" if cfg.resume else None, id=None)


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

# %% tags=["active-ipynb"]
# from data import make_synthetic
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=10, per_class=(40, 10, 10), image_size=image_size)
# cfg = parse_args(["--data", data_dir, "--arch", arch, "--weights", weights, "--image-size", str(image_size),
#                   "--epochs", str(epochs), "--batch-size", str(batch_size), "--workers", str(workers),
#                   "--out", out_dir])
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
# the mistakes share a colour?

# %% tags=["active-ipynb"]
# from data import IMAGENET_MEAN, IMAGENET_STD
# best = torch.load(Path(out_dir) / "best.pt", weights_only=True)
# model = build_model(arch, len(best["classes"]), weights="none", log=lambda *a: None)
# model.load_state_dict(best["model"])
# model.eval()
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
# and `--resume`. How many lines does `metrics.jsonl` have afterwards?

# %% tags=["active-ipynb"]
# resumed_lines = None  # your answer: a number

# %% tags=["active-ipynb"]
# if resumed_lines == epochs + 2:
#     print("Correct: resuming continues after the last finished epoch and appends one line per new epoch.")
# else:
#     print("Not yet. Hint: the checkpoint remembers the last finished epoch; only new epochs add lines.")

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
