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

# %% [markdown] slideshow={"slide_type": "slide"}
# # 4. Time limits, checkpoints and exact resume
#
# Every job on a cluster ends: at its time limit, when it is preempted for a job of
# higher priority, when a node fails. Work since the last checkpoint is then lost, unless
# the job saw it coming. This lesson shows how `train.py` stops cleanly when Slurm warns
# it, writes a checkpoint, puts its own job back in the queue, and continues **exactly**
# where it stopped, to the same weights an uninterrupted run would have reached.
#
# **You will learn to:**
# - ask Slurm for a warning before the time limit (`--signal`, `--requeue`) and react to it;
# - see what a checkpoint must hold for an exact resume, and why only rank 0 writes it;
# - resume in the middle of an epoch without repeating or skipping an image;
# - check that an interrupted and resumed run equals an uninterrupted one.
#
# **Time:** about 30 minutes. Core path: all of it up to the exercises; the appendix is the
# bookkeeping (run directory lock, disk errors, option changes on resume, W&B).
#
# This notebook is also `scripts/resilience.py`, which `train.py` imports.

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# image_size = 32
# epochs = 2
# batch_size = 8
# out_dir = "../runs/notebook-resilience"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %% jupyter={"source_hidden": true}
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import DistributedSampler

from data import UserError, atomic_write, rank_indices
from model import build_model

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Try it: stop a run the way Slurm does
#
# Five minutes before a job's time limit, the Slurm files of this course have Slurm send
# the signal `SIGUSR1` to the training processes. Here we do the same by hand: start a
# short training run in the background and send it `SIGUSR1` while its first epoch runs.

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# import signal, subprocess
# from pathlib import Path
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic {data_dir} --classes 10 --image-size {image_size}
# args = [sys.executable, "../scripts/train.py", "--data", data_dir, "--arch", "resnet18", "--weights", "none",
#         "--image-size", str(image_size), "--batch-size", str(batch_size), "--epochs", str(epochs),
#         "--workers", "0", "--log-every", "5"]
# job = subprocess.Popen(args + ["--out", out_dir, "--overwrite"], stdout=subprocess.PIPE, text=True)
# for line in job.stdout:
#     print(line, end="")
#     if "epoch 1 step 5/" in line:
#         job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=USR1@300` does
# job.wait()

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at the last line: `stopped at epoch 1 step 10 on SIGUSR1; checkpoint …/last.pt`. The
# signal arrived after step 5, yet the run finished step 10 first: all processes of a
# DDP job must stop after the **same** step, so they agree on it every 10 steps. Outside a
# Slurm job there is nothing to requeue, so it says to resume by hand.
#
# ## Catching the signal
#
# A signal interrupts Python between two bytecodes, possibly in the middle of writing a
# file. So the handler only **remembers** that a stop was asked for; the training loop
# looks at it between steps, where stopping is safe. `SIGTERM` (preemption, `scancel`)
# is remembered the same way.

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


def agree_to_stop(stop: StopRequest | None, device: torch.device, diverged: torch.Tensor | None = None) -> str | None:
    """The same answer on every rank: "diverged" if the loss of any rank became NaN or infinite,
    else SIGUSR1 if any rank got it, else SIGTERM if any did, else None."""
    got = stop.received if stop is not None else None
    votes = torch.tensor([got == "SIGUSR1", got == "SIGTERM", bool(diverged is not None and diverged)],
                         dtype=torch.float32, device=device)
    sum_over_ranks(votes)  # one tiny all-reduce under DDP: everyone learns what anyone got
    return "diverged" if votes[2] > 0 else "SIGUSR1" if votes[0] > 0 else "SIGTERM" if votes[1] > 0 else None


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Resume, and compare with a run that was never stopped
#
# `--resume` continues from `last.pt`. The claim of this lesson is that the result is
# *exactly* what an uninterrupted run gives: same weights, same metrics. Check it.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# !{sys.executable} ../scripts/train.py {" ".join(args[2:])} --out {out_dir} --resume
# !{sys.executable} ../scripts/train.py {" ".join(args[2:])} --out {out_dir}-straight --overwrite
# import torch
# stopped = torch.load(Path(out_dir) / "last.pt", weights_only=True)["model"]
# straight = torch.load(Path(out_dir + "-straight") / "last.pt", weights_only=True)["model"]
# print("identical weights:", all(torch.equal(stopped[k], straight[k]) for k in straight))

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: `identical weights: True`, and `resumed from …/last.pt at epoch 1 step 10` in
# the resumed run's output. Not approximately equal: equal, bit for bit.
#
# ## What a checkpoint must hold
#
# Weights alone are not enough. An exact resume needs everything that decides the next
# step: the weights that train, the optimizer's state (Adam's moving averages), the
# epoch and the step within it, the random number generators, and the metrics so far.
# The learning rate need not be stored: it is a function of the epoch and the step (a
# cosine, in `train.py`). The frozen backbone is not stored either: it is the file the
# run started from, identified by a hash, which keeps a ResNet-152 checkpoint at 14 MB
# instead of 250 MB (measured in the appendix).

# %%
def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def trained_state(model: nn.Module) -> dict:
    """The model's state without its frozen parameters, which training never changes."""
    frozen = frozen_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


# %% [markdown]
# With `--fsdp` (lesson 7) each rank holds only a shard of every parameter and of its
# optimizer state (a `DTensor`). A checkpoint still holds whole tensors, the same file
# as DDP writes: gathering them is a collective, so every rank builds the checkpoint and
# rank 0 writes it; loading cuts each whole tensor back to this rank's shard.

# %% jupyter={"source_hidden": true}
def whole(obj):
    """`obj` (a state dict, an optimizer's, nested) with every FSDP shard gathered into its whole tensor, on the
    CPU of rank 0; other ranks get None in its place. A collective under FSDP (every rank calls it); without
    FSDP, the same tensors."""
    if isinstance(obj, DTensor):
        gathered = obj.full_tensor()
        return gathered.cpu() if is_rank0() else None
    if isinstance(obj, dict):
        return {key: whole(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [whole(value) for value in obj]
    return obj


def shard_like(value, reference):
    """`value` cut to this rank's shard when `reference` is an FSDP shard (a DTensor) of a tensor of its shape;
    every rank holds the whole checkpoint, so each takes its own part without communication."""
    if isinstance(reference, DTensor) and torch.is_tensor(value) and value.shape == reference.shape:
        return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)
    return value


def optimizer_shards(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer's whole state dict cut to the shards of its parameters (a no-op without FSDP)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's numbering
    return {**state, "state": {index: {key: shard_like(value, params[index]) for key, value in values.items()}
                               for index, values in state["state"].items()}}


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


# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# checkpoint = torch.load(Path(out_dir) / "last.pt", weights_only=True)
# print("stored:", ", ".join(checkpoint))
# print("model tensors:", len(checkpoint["model"]), "| epochs finished:", checkpoint["epoch"],
#       "| size on disk:", f'{(Path(out_dir) / "last.pt").stat().st_size / 1e6:.1f} MB')

# %% [markdown] slideshow={"slide_type": "slide"}
# A checkpoint is a pickle, and unpickling can run any code, so it is loaded with
# `weights_only=True`, which accepts tensors and plain containers only.
#
# **Written safely.** A job killed while writing must not leave a half-written
# `last.pt`, so every file is written to a temporary file, flushed to the disk, and
# renamed (`atomic_write`, in `data.py`): a rename is atomic. After each epoch the order
# is `last.pt` (which holds every finished epoch's metrics), then `best.pt`, then the new
# line of `metrics.jsonl`, so a kill between any two writes loses nothing: a resume
# rewrites the others from `last.pt`. Only rank 0 writes; under DDP the other ranks wait
# at a barrier until the file is on the disk.
#
# ## Resuming in the middle of an epoch
#
# An epoch of BIRDS on ResNet-152 takes many minutes, so the stop comes mid-epoch. To
# continue exactly, the rest of the epoch must see exactly the images it would have
# seen: the data order of epoch *e* is a function of the seed and *e* alone
# (`DistributedSampler.set_epoch`), so the sampler can regenerate it and skip what was
# done. With `--augment`, each image's random crop must not depend on which loader
# worker happens to load it: the sampler hands every image its own seed.

# %%
class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way through, after a mid-epoch resume.

    With `seed_draws` (--augment) it yields (index, seed) pairs: the random crop and flip of
    an image are then a function of the seed, the epoch and the image alone.
    """

    skip = 0  # indices of this rank to leave out at the start of the epoch
    seed_draws = False

    def __iter__(self):
        indices = itertools.islice(rank_indices(self), self.skip, None)  # DistributedSampler's (shards: data.py)
        if not self.seed_draws:
            return indices
        return ((i, ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63) for i in indices)

    def __len__(self) -> int:
        return super().__len__() - self.skip


# %% [markdown] slideshow={"slide_type": "slide"}
# ## On the cluster: warning, checkpoint, requeue
#
# Every Slurm file of the course asks for the warning and allows the job to be requeued:
#
# ```bash
# #SBATCH --time=01:00:00        # the limit
# #SBATCH --signal=USR1@300      # SIGUSR1 to the job's processes 300 s before it
# #SBATCH --requeue              # the job may be put back in the queue
# #SBATCH --open-mode=append     # a requeued job appends to its log
# ```
#
# After the checkpoint, rank 0 puts its own job back in the queue. The job keeps its id,
# so when it starts again it finds the same run directory (named after the job id), and
# the Slurm file's `--resume` continues from the checkpoint. In the course's Slurm files
# the script only leaves a request (`COURSE_REQUEUE_REQUEST`) and the batch script
# requeues once **every** step has stopped: a job may run several steps
# (`sweep_steps.sbatch`), and a requeue ends all of them at once, perhaps before the
# other has written its checkpoint. Where a site forbids requeueing, it submits the job
# again with the same run directory (`slurm/env.sh`).

# %%
def requeue_slurm_job(out: Path) -> str:
    """Ask for this Slurm job to go on from its checkpoint in `out`; return what will happen."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return f"not a Slurm job: resume by hand with --resume --out {out}"
    request = os.environ.get("COURSE_REQUEUE_REQUEST")
    if request:  # the course's Slurm files requeue once every step of the job has stopped
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
    return f"could not requeue Slurm job {job} ({reason}): continue with --resume --out {out}"


# %% [markdown] slideshow={"slide_type": "slide"}
# The tests of this course check this on a real Slurm cluster: a job whose time limit
# expires stops, requeues itself and ends with the weights and metrics of a run that
# was never interrupted (`tests/test_slurm.py`).
#
# ## Exercises
#
# **1.** The run above stopped at step 10 although the signal came after step 5. If the
# signal had come after step 23, after which step would it have stopped? (The check
# interval is `STOP_CHECK_EVERY`.)

# %% tags=["active-ipynb"]
# stopped_after_step = None  # your answer: a number

# %% tags=["active-ipynb"]
# if stopped_after_step == 30:
#     print("Correct: the ranks agree every 10 steps, so a signal after step 23 is acted on after step 30.")
# else:
#     print("Not yet. Hint: the processes only look at the signal when the step number is a multiple of "
#           "STOP_CHECK_EVERY.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# stopped_after_step = (23 // STOP_CHECK_EVERY + 1) * STOP_CHECK_EVERY
# ```
# </details>
#
# **2.** Resume the stopped run with another `--batch-size`. What happens, and why must it?
# Store the first line the script prints to stderr in `message`.

# %% tags=["active-ipynb"]
# message = None  # your answer: the error line, a string

# %% tags=["active-ipynb"]
# if isinstance(message, str) and "batch_size" in message and "middle of epoch" in message:
#     print("Correct: in the middle of an epoch, another batch size would change which images the rest of the "
#           "epoch holds, so the resume is refused; at an epoch's end it is allowed, with a notice.")
# else:
#     print("Not yet. Hint: stop a run mid-epoch again (the first code cell), then run train.py with --resume "
#           "and --batch-size 4, capture_output=True, and look at result.stderr.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# job = subprocess.Popen(args + ["--out", out_dir, "--overwrite"], stdout=subprocess.PIPE, text=True)
# for line in job.stdout:
#     if "epoch 1 step 5/" in line:
#         job.send_signal(signal.SIGUSR1)
# job.wait()
# other = list(args)
# other[other.index("--batch-size") + 1] = "4"
# result = subprocess.run(other + ["--out", out_dir, "--resume"], capture_output=True, text=True)
# message = result.stderr.strip().splitlines()[0]
# ```
# </details>
#
# ## Appendix: the bookkeeping behind a safe run
#
# The rest of this file is what `train.py` calls around the lesson above. None of it is
# needed to understand the lesson; all of it is tested (`tests/test_train.py`,
# `tests/test_resilience.py`).
#
# ### Processes
#
# Under DDP some decisions are taken once, by rank 0, and sent to the others (on a
# shared filesystem with attribute caching, ranks may disagree about whether a file
# exists). Outside DDP these helpers do nothing.

# %%
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(device: torch.device) -> None:
    if is_distributed():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def on_rank0(decide):
    """decide() on rank 0 only; every rank gets its result, or raises its UserError."""
    outcome = None
    if is_rank0():
        try:
            outcome = ("ok", decide())
        except UserError as error:
            outcome = ("error", str(error))
    kind, value = broadcast_from_rank0(outcome)
    if kind == "error":
        raise UserError(value)
    return value


# %% [markdown]
# ### The run directory
#
# A run directory holds **one** run. Running again with the same `--out` would replace
# it, so that needs `--resume` (continue it) or `--overwrite` (replace it, on purpose).
# While a run trains it holds a lock on its directory, so that a second run started into
# the same `--out` stops at once instead of both overwriting each other's files. The
# directory is created only when training is about to start, after the options, the data
# and the model have been checked: a run that fails before leaves nothing behind.

# %%
RESULT_FILES = ("metrics.jsonl", "last.pt", "best.pt")  # what a run leaves that is worth keeping
RUN_FILES = ("config.json", *RESULT_FILES, "summary.json")  # summary.json: a finished run's summary, test score too
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


# %% [markdown]
# ### Files that survive full disks and kills
#
# A full disk or quota stops the run with one line that says which disk and how much
# space a file needs, and the previous file stays. JSON has no NaN: a diverged run stops
# before a record with NaN is written. A torn last line of `metrics.jsonl` (a write cut
# short by a full disk) is left out with a notice; a resume rewrites it from the checkpoint.

# %%
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


def check_finite(record: dict, cfg) -> None:
    """Stop before a record with NaN or infinities reaches metrics.jsonl (JSON has no such numbers)."""
    bad = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise UserError(f"{', '.join(bad)} of epoch {record['epoch']} is NaN or infinite: the learning rate "
                        f"(--lr {cfg.lr:g}) is probably too high; lower it (last.pt and best.pt keep the last "
                        "finished epoch)")


def diverged(epoch: int, first_nonfinite: int, cfg) -> UserError:
    """The one-line error for a loss that became NaN or infinite; nothing of that epoch is written."""
    where = f"at step {first_nonfinite + 1}" if first_nonfinite >= 0 else "on another process"
    return UserError(f"the training loss became NaN or infinite in epoch {epoch + 1} {where}: the learning rate "
                     f"(--lr {cfg.lr:g}) is probably too high; lower it (last.pt and best.pt keep the last "
                     "finished epoch)")


# %% [markdown]
# ### Checkpoints that leave the frozen backbone out
#
# A checkpoint stores only what training changed: the parameters that train and the
# buffers (BatchNorm's running statistics, which move whenever a BatchNorm layer runs in
# training mode). The frozen weights are those the run started from (`--weights`),
# identified by a hash that a resume checks. `load_trained_model` rebuilds the whole
# model from `best.pt` (or `last.pt`) for inference. For a ResNet-152 with 525 classes
# and a frozen backbone, `last.pt` is 13.7 MB (head, BatchNorm statistics, the
# optimizer's moments of the head) and `best.pt` 5.1 MB, where the whole model alone is
# 238 MB; with `--finetune` everything trains, and `last.pt` is 0.71 GB (the weights and
# AdamW's two moments of each). Measured on a CPU with a saved random ResNet-152 state
# dict standing in for the ImageNet file:
#
# ```bash
# python -c "import torch, torchvision; torch.save(torchvision.models.resnet152().state_dict(), 'r152.pth')"
# python scripts/train.py --data <525 classes> --arch resnet152 --weights r152.pth --image-size 32 \
#     --epochs 1 --max-steps 1 --out runs/size [--finetune]; ls -l runs/size
# ```

# %%
def hash_classes(classes: list[str]) -> str:
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()[:16]


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


MODEL_KEYS = ("arch", "classes", "finetune", "weights", "frozen_weights_hash", "model")  # what rebuilds the model


def model_record(model: nn.Module, cfg, classes: list[str], frozen_weights_hash: str | None) -> dict:
    """What best.pt and last.pt hold to rebuild the model: its kind, its classes, and what training changed
    (whole tensors: under FSDP every rank calls this)."""
    weights = cfg.weights if cfg.weights in ("imagenet", "none") else str(Path(cfg.weights).resolve())
    return {"arch": cfg.arch, "classes": classes, "finetune": cfg.finetune, "weights": weights,
            "frozen_weights_hash": frozen_weights_hash, "model": whole(trained_state(model))}


def load_state_into(model: nn.Module, record: dict, path: Path) -> None:
    """Load the stored state; the parameters it leaves out must be exactly the frozen ones."""
    own = model.state_dict()
    result = model.load_state_dict({key: shard_like(value, own.get(key)) for key, value in record["model"].items()},
                                   strict=False)
    if result.unexpected_keys or set(result.missing_keys) != frozen_names(model):
        raise UserError(f"{path} does not fit this model ({len(result.missing_keys)} tensors missing, "
                        f"{len(result.unexpected_keys)} unexpected): use the --arch and --weights it was written with")


def load_trained_model(path: Path, weights: str | None = None) -> tuple[nn.Module, dict]:
    """The model of a best.pt or last.pt, for inference, and the file's contents (classes, epoch, ...).

    The frozen backbone comes from the weights the run started from, which the file names; pass
    `weights` when that file has moved (the hash must match).
    """
    path = Path(path)
    record = read_checkpoint_file(path, MODEL_KEYS)
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
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch.load's messages carry terminal colours
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
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


# %% [markdown]
# ### Resuming with other options
#
# What a resume may change, and what not. Always fixed: what the checkpoint cannot
# honour, the model and its classes, what trains and the weights it started from, the
# optimizer (its state has other entries) and the seed (the data order and every random
# draw derive from it). Fixed within an epoch: what decides which images the rest of the
# epoch holds, the data's order among them (`data_order`: folders, or which shards, see
# the `data` lesson's appendix); a run stopped at an epoch's end may change them. Any
# other option that changes the result applies from the resumed step on, with a notice: so do `--lr`,
# `--lr-scaling` and `--warmup-epochs`, since the learning rate of a step is a function
# of its epoch and step alone, and the resumed run follows the new schedule from there.

# %%
FIXED_ON_RESUME = ("arch", "num_classes", "classes_digest", "finetune", "weights", "frozen_weights_hash", "optimizer",
                   "seed")
FIXED_WITHIN_AN_EPOCH = ("batch_size", "processes", "augment", "no_shuffle", "data_order")
RESUMABLE_CHANGES = ("epochs", "lr", "lr_scaling", "warmup_epochs", "weight_decay", "image_size", "max_steps",
                     "precision")
SETTINGS_BEFORE = {"lr_scaling": "none", "warmup_epochs": 0.0,  # what checkpoints written before these settings had
                   "data_order": "files"}


def run_settings(cfg, world_size: int, classes: list[str], frozen_weights_hash: str | None, precision: str) -> dict:
    """The settings that decide a run's result, as a checkpoint records them."""
    return {"arch": cfg.arch, "num_classes": len(classes), "classes_digest": hash_classes(classes),
            "finetune": cfg.finetune, "weights": "none" if cfg.weights == "none" else "pretrained",
            "frozen_weights_hash": frozen_weights_hash, "optimizer": cfg.optimizer, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "processes": world_size, "augment": cfg.augment,
            "no_shuffle": cfg.no_shuffle, "data_order": getattr(cfg, "data_order", "files"), "epochs": cfg.epochs,
            "lr": cfg.lr, "lr_scaling": cfg.lr_scaling, "warmup_epochs": cfg.warmup_epochs,
            "weight_decay": cfg.weight_decay, "image_size": cfg.image_size, "max_steps": cfg.max_steps,
            "precision": precision}


CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "partial", "best_val_acc", "best_epoch", "rng",
                   "settings", "metrics")


def load_checkpoint(path: Path, settings: dict, log=print) -> dict:
    """Load last.pt; refuse one this run cannot continue, and say which changed settings it applies."""
    checkpoint = read_checkpoint_file(path, CHECKPOINT_KEYS)
    saved = {**SETTINGS_BEFORE, **checkpoint["settings"]}
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
# ### A run: claimed, resumed, written after every epoch
#
# `Run` is what `train.fit` talks to: it claims the run directory, resumes from
# `last.pt`, and after each epoch writes `last.pt`, `best.pt` and the metrics line, in
# that order (rank 0 only). `stop` writes a mid-epoch checkpoint and requeues the job.

# %%
@dataclass
class RunState:
    """Where a run stands: epochs finished, the best of them, every finished epoch's metrics, and the
    position within the next epoch when it stopped in the middle of one."""
    epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    partial: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    spent: dict | None = None  # the wall time and device-hours of the jobs before this one (train.CostMeter)


@dataclass
class Run:
    """One training run's directory and state; `train.fit` creates it with `Run.start`."""
    cfg: object
    out: Path
    model: nn.Module  # the model itself, not a DDP or compiled wrapper: its state_dict has plain names
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    classes: list[str]
    settings: dict
    frozen_weights_hash: str | None
    device: torch.device
    log: object
    state: RunState = field(default_factory=RunState)
    epoch_rng: dict | None = None
    wandb: object = None
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    cost_meter: object = None  # train.CostMeter: what the run used (cost in the summary, spent in last.pt)

    @classmethod
    def start(cls, cfg, out: Path, model, optimizer, scaler, classes, world_size: int, precision: str,
              device: torch.device, log, config: dict) -> "Run":
        """Claim and lock the run directory (rank 0), and resume from last.pt when asked."""
        frozen_hash = frozen_digest(model) if is_rank0() else None
        run = cls(cfg, out, model, optimizer, scaler, classes,
                  run_settings(cfg, world_size, classes, frozen_hash, precision), frozen_hash, device, log)
        on_rank0(lambda: run.lock.enter_context(contextlib.closing(claim_run_dir(out, cfg, log))))
        try:
            checkpoint = on_rank0(lambda: load_checkpoint(out / "last.pt", run.settings, log)
                                  if cfg.resume and (out / "last.pt").exists() else None)
            if checkpoint:
                run.restore(checkpoint)
            if is_rank0():
                write_json(out / "config.json", config)
                write_metrics(out, run.state.metrics)  # the lines a kill lost come back; those of epochs to redo go
                run.repair_best(checkpoint)
                if cfg.wandb != "off":
                    run.wandb = start_wandb(cfg, out, config)
            del checkpoint  # its tensors are in the model and the optimizer now
        except BaseException:
            run.finish()  # unlock the run directory
            raise
        return run

    def restore(self, checkpoint: dict) -> None:
        load_state_into(self.model, checkpoint, self.out / "last.pt")
        self.optimizer.load_state_dict(optimizer_shards(self.optimizer, checkpoint["optimizer"]))
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.cfg.weight_decay  # a new --weight-decay applies; the lr is set every epoch
        if self.scaler.is_enabled() and checkpoint["scaler"]:  # fp16 on both sides: bf16 and fp32 have no scaler state
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        self.state = RunState(checkpoint["epoch"], checkpoint["best_val_acc"], checkpoint["best_epoch"],
                              checkpoint["partial"], checkpoint["metrics"], checkpoint.get("spent"))  # older: none
        where = (f"epoch {self.state.epoch + 1} step {self.state.partial['step']}" if self.state.partial
                 else f"the end of epoch {self.state.epoch}")
        self.log(f"resumed from {self.out / 'last.pt'} at {where}")

    @property
    def last_epoch(self) -> int:
        """The epoch this job stops after (--stop-after: fewer than --epochs in this job)."""
        cfg = self.cfg
        return min(cfg.epochs, self.state.epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs

    def begin_epoch(self, sampler: ResumableSampler) -> dict | None:
        """The position within the epoch to continue from (None: its start); the sampler skips what was done."""
        partial, self.state.partial = self.state.partial, None
        self.epoch_rng = rng_state()  # a mid-epoch checkpoint restores the state of the epoch's start
        sampler.skip = partial["step"] * self.cfg.batch_size if partial else 0
        return partial

    def model_record(self) -> dict:
        return model_record(self.model, self.cfg, self.classes, self.frozen_weights_hash)

    def checkpoint(self, epochs_done: int, rng: dict, partial: dict | None = None) -> dict:
        s = self.state
        return {**self.model_record(), "optimizer": whole(self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict(), "epoch": epochs_done, "partial": partial,
                "best_val_acc": s.best_val_acc, "best_epoch": s.best_epoch,
                "rng": rng, "settings": self.settings, "metrics": s.metrics,
                "spent": self.cost_meter.spent() if self.cost_meter else s.spent}

    def end_epoch(self, record: dict) -> None:
        """After each epoch, rank 0 writes last.pt (with every finished epoch's metrics), then best.pt, then the
        metrics line: a kill between any two writes loses nothing. The other ranks wait until it is done."""
        check_finite(record, self.cfg)
        s = self.state
        is_best = record["val_acc"] >= s.best_val_acc
        if is_best:
            s.best_val_acc, s.best_epoch = record["val_acc"], record["epoch"]
        s.epoch, s.metrics = record["epoch"], [*s.metrics, record]
        last = self.checkpoint(s.epoch, rng_state())  # on every rank: under FSDP, gathering the shards is a collective
        if is_rank0():
            save_checkpoint(self.out / "last.pt", last)
            if is_best:
                self.save_best(last)
            append_metrics(self.out, record)
            if self.wandb:
                self.wandb.log(record, step=record["epoch"])
        barrier(self.device)

    def save_best(self, last: dict) -> None:
        """best.pt: the model of `last` (what last.pt holds), with the best epoch and its accuracy."""
        s = self.state
        save_checkpoint(self.out / "best.pt", {**{key: last[key] for key in MODEL_KEYS}, "epoch": s.best_epoch,
                                               "val_acc": s.best_val_acc})

    def repair_best(self, checkpoint: dict | None) -> None:
        """After a kill between writing last.pt and best.pt: the resumed model (`checkpoint`'s) is then the best one."""
        s = self.state
        if s.partial or s.epoch == 0 or s.best_epoch != s.epoch:
            return
        with contextlib.suppress(Exception):  # a missing or broken best.pt is rewritten
            if torch.load(self.out / "best.pt", map_location="cpu", weights_only=True).get("epoch") == s.best_epoch:
                return
        self.save_best(checkpoint)

    def stop(self, epoch: int, reason: str, position: dict | None = None) -> dict:
        """Checkpoint (rank 0; mid-epoch when `position` says where), wait until it is on disk, requeue on SIGUSR1."""
        last = self.checkpoint(epoch, self.epoch_rng, position) if position else None  # every rank: FSDP gathers
        if is_rank0() and last:
            save_checkpoint(self.out / "last.pt", last)
        barrier(self.device)
        cost = {"cost": self.cost_meter.measure()} if self.cost_meter else {}  # every rank: a collective under DDP
        where = f"epoch {epoch + 1} step {position['step'] if position else 0}"
        self.finish()  # W&B closed and the directory unlocked before the job is requeued (and killed)
        note = requeue_slurm_job(self.out) if is_rank0() and reason == "SIGUSR1" else "resume with --resume"
        return {**self.summary(), **cost,
                "stopped": f"stopped at {where} on {reason}; checkpoint {self.out / 'last.pt'}; {note}"}

    def summary(self) -> dict:
        final = self.state.metrics[-1] if self.state.metrics else {}
        return {"run_dir": str(self.out), "epochs": self.cfg.epochs, "best_val_acc": self.state.best_val_acc,
                "best_epoch": self.state.best_epoch, **final}

    def conclude(self, test: dict) -> dict:
        """The summary of a run that did all its epochs, with best.pt's test score; rank 0 writes it to summary.json."""
        summary = {**self.summary(), **test}
        if is_rank0():
            write_json(self.out / "summary.json", summary)
        return summary

    def finish(self) -> None:
        finish_wandb(self.wandb, self.cfg, self.out)
        self.wandb = None
        self.lock.close()


# %% [markdown]
# ### Weights & Biases, offline by default
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
