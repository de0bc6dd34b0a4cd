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
# # 6. DistributedDataParallel: one process per GPU, on as many nodes as you like
#
# DDP runs **one process per GPU**. Each process holds a full copy of the model, reads its
# own share of every batch, computes gradients on it, and then all processes **average
# their gradients** (an all-reduce over NVLink, InfiniBand or Ethernet) before each takes
# the same optimizer step. The copies therefore stay identical, with no single GPU doing
# extra work and no Python GIL in the way: this is what scales to many nodes.
#
# What changes compared with `train.py` is small, and all of it is in this notebook:
#
# 1. **Who am I?** Read rank, local rank and world size from the launcher (`srun`,
#    `torchrun`, or plain `python` for one process), and join the process group.
# 2. **Wrap the model** in `DistributedDataParallel`.
# 3. **Split the data**: `DistributedSampler` gives each rank a disjoint share of every
#    epoch (and must be told the epoch, or every epoch repeats the first shuffle).
# 4. **Sum across ranks** what is measured: loss, correct answers, images.
#
# The training loop itself is `train.fit`, unchanged. Launch it with:
#
# ```bash
# torchrun --nproc-per-node 4 scripts/train_ddp.py --data ...            # one node, 4 GPUs
# srun python scripts/train_ddp.py --data ...                            # inside a Slurm job
# python scripts/train_ddp.py --data ...                                 # one process: same as train.py
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# image_size = 64
# epochs = 2
# batch_size = 16  # per process
# processes = 2
# out_dir = "../runs/notebook-ddp"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %%
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import hostlist
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data import UserError, run_cli
from train import Runtime, StopRequest, build_parser, check_gpu_kernels, fit, parse_args, summary_line

# %% [markdown]
# ## 1. Who am I? Three launchers, one answer
#
# | launcher | rank | local rank (GPU on this node) | world size | rendezvous |
# |---|---|---|---|---|
# | `srun` (Slurm starts every process) | `SLURM_PROCID` | `SLURM_LOCALID` | `SLURM_NTASKS` | first host of the step's nodes (`SLURM_STEP_NODELIST`), a port derived from the job id |
# | `torchrun` (one per node starts the local processes) | `RANK` | `LOCAL_RANK` | `WORLD_SIZE` | `MASTER_ADDR`, `MASTER_PORT` set by torchrun |
# | plain `python` | 0 | 0 | 1 | none |
#
# The port is derived from the job id so that two jobs sharing a node do not try to
# listen on the same port. `srun` is recognised by `SLURM_STEP_ID`, which only a job step
# has: a batch script that runs `python` directly, without `srun`, is one process even
# though its job asked for several tasks. Rank 0 runs on the first node of the *step*,
# which is not the job's first node when a step uses part of the job. Node lists come in
# Slurm's compressed form (`gpu[07-08,11]`, `nid[001-002]-ib`); `python-hostlist` reads
# them as `scontrol show hostnames` would.

# %%
@dataclass(frozen=True)
class Launch:
    launcher: str
    rank: int
    local_rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-08,11],cpu3' -> 'gpu07', 'nid[001-002]-ib' -> 'nid001-ib'."""
    try:
        hosts = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist:
        hosts = []
    if not hosts:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}")
    return hosts[0]


def port_for_job(job_id: str) -> int:
    """A port in 20000-39999 that differs between jobs."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def step_nodelist(env) -> str:
    """The nodes of this job step (rank 0 runs on the first), else of the whole job."""
    return env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"


def detect_launch(env=os.environ) -> Launch:
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any env:// launcher)
        return Launch("torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun job step
        return Launch("srun", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                      int(env.get("SLURM_NTASKS", 1)),
                      env.get("MASTER_ADDR") or first_host(step_nodelist(env)),
                      int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0"))))
    return Launch("python", 0, 0, 1)


# %% [markdown]
# ## Joining the process group
#
# `nccl` moves gradients GPU to GPU (NVLink, InfiniBand); `gloo` does the same on CPUs,
# which is how this notebook and the tests run DDP on a laptop. A process uses the GPU of
# its local rank when it sees several, or the only one it sees when Slurm gave each task
# its own (`--gpus-per-task=1`).
#
# Under `torchrun` or `srun` even a single process joins a process group (of one): that
# is DDP with its overhead, the first point of a scaling curve, and on one GPU the
# cheapest check that nccl works. Plain `python` skips it.
#
# Collectives get a **timeout**: if one rank dies, the others stop waiting after
# `--dist-timeout` seconds and exit with an error, instead of idling on their GPUs until
# the job's time limit. With nccl that takes NCCL's asynchronous error handling
# (`TORCH_NCCL_ASYNC_ERROR_HANDLING=1`: a watchdog thread ends the process when a collective
# fails or times out); torchrun sets it for its processes, and so does this script (and
# `slurm/env.sh`) for the ranks `srun` starts. To see *why* NCCL failed, run with
# `NCCL_DEBUG=WARN` (problems only) or `NCCL_DEBUG=INFO` (also the network and GPUs it chose).

# %%
def pick_rank_device(local_rank: int) -> torch.device:
    count = torch.cuda.device_count()
    if count == 0:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank if count > 1 else 0)
    check_gpu_kernels(device.index)
    return device


class DistributedRuntime(Runtime):
    """The Runtime of train.py, with DDP's wrapping, sums and barriers."""

    def wrap_model(self, model: nn.Module, cfg) -> nn.Module:
        if cfg.sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics over the global batch
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_distributed(launch: Launch, timeout_seconds: float) -> Runtime:
    """Join the process group, or return the single-process Runtime under plain python."""
    device = pick_rank_device(launch.local_rank)
    notices = [] if device.type == "cuda" else ["notice: no CUDA device found; DDP runs on the CPU with gloo"]
    if launch.launcher == "python":
        return Runtime(device=device, notices=notices)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail fast on an NCCL error or timeout
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=timeout_seconds))
    return DistributedRuntime(device=device, rank=launch.rank, local_rank=launch.local_rank,
                              world_size=launch.world_size, notices=notices)


# %% [markdown]
# ## The script
#
# Every rank prints one line saying who and where it is (host and process id), which is
# the first thing to look at when a multi-node job misbehaves. After that only rank 0
# prints. The process group is destroyed at the end **also after an error**. When a rank
# dies, the survivors' next collective fails (at once when the connection breaks, after
# `--dist-timeout` seconds when the peer hangs) and each says so in one line; `torchrun`
# and `srun --kill-on-bad-exit=1` end the remaining ranks even sooner. That is tested on
# CPUs with gloo (`tests/test_resilience.py`); with nccl the timeout and the watchdog above
# do the same job, but no test here has a GPU to show it.
#
# `--batch-size` is per process: the global batch is `batch size x world size`. The
# learning rate is used as given; with a larger global batch you may want to raise it
# (the "linear scaling rule"), which is your decision, printed at start.

# %%
def build_ddp_parser():
    parser = build_parser()
    parser.description = "Fine-tune a ResNet on the birds dataset with DistributedDataParallel."
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm: BatchNorm statistics over the global batch (GPUs only)")
    parser.add_argument("--dist-timeout", type=float, default=600,
                        help="seconds a collective waits for a missing rank before failing")
    return parser


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest().install()  # checkpoint and requeue before the time limit (train.py)
    cfg = parse_args(argv, build_ddp_parser())
    launch = detect_launch()
    rt = start_distributed(launch, cfg.dist_timeout)
    # One write per line: with several ranks on one terminal, print's two writes can interleave.
    # The cores this rank may run on: fewer than its job asked per task means the launcher lost
    # them (srun without SRUN_CPUS_PER_TASK on Slurm 22.05 and later, slurm/env.sh).
    sys.stdout.write(f"rank {rt.rank}/{rt.world_size} local_rank {rt.local_rank} host {socket.gethostname()} "
                     f"pid {os.getpid()} cpus {len(os.sched_getaffinity(0))} device {rt.device} "
                     f"launcher {launch.launcher} backend {dist.get_backend() if dist.is_initialized() else 'none'}\n")
    sys.stdout.flush()
    try:
        summary = fit(cfg, rt, stop)
        rt.log(summary_line(summary))
    except RuntimeError as error:
        if rt.world_size == 1 or not lost_contact(error):
            raise
        cause = str(error).strip().splitlines()[0][:300]
        print(f"error: rank {rt.rank} of {rt.world_size} lost contact with another rank ({cause}): "
              "the first error in the other ranks' logs is the cause", file=sys.stderr, flush=True)
        return 1
    finally:
        rt.close()
    return 0


def lost_contact(error: RuntimeError) -> bool:
    """A collective failed because a peer died or timed out (gloo and nccl say it differently)."""
    return isinstance(error, dist.DistError) or any(
        word in str(error) for word in ("gloo", "NCCL", "Connection", "Timed out", "timed out"))


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)

# %% [markdown]
# ## Try it: DDP with two processes on this machine
#
# The notebook's own kernel cannot be a DDP worker: DDP needs several *processes*, and
# worker processes cannot receive functions defined in a notebook cell (they do not
# pickle). So we launch the exported script, exactly as a batch job would, with
# `torchrun`. `--master-addr 127.0.0.1` keeps the rendezvous on this machine, even where
# the host's own name does not resolve.

# %% tags=["active-ipynb"]
# import subprocess
# from pathlib import Path
# from data import make_synthetic
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=10, per_class=(40, 10, 10), image_size=image_size)
# import socket
# with socket.socket() as probe:  # a free port, so two notebooks never collide
#     probe.bind(("127.0.0.1", 0))
#     port = probe.getsockname()[1]
# command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
#            "--master-addr", "127.0.0.1", "--master-port", str(port),
#            "../scripts/train_ddp.py", "--data", data_dir, "--arch", "resnet18", "--weights", "none",
#            "--image-size", str(image_size), "--epochs", str(epochs), "--batch-size", str(batch_size),
#            "--workers", "0", "--out", out_dir]
# result = subprocess.run(command, capture_output=True, text=True)
# print(result.stdout[-3000:], result.stderr[-2000:] if result.returncode else "")
# assert result.returncode == 0

# %% [markdown]
# Look at the output: one `rank … host …` line per process, then a single stream of log
# lines from rank 0, the global batch (`batch per process x processes`), and the same
# `val_samples` as the single-device run, because every validation image is counted
# exactly once.
#
# ## Why DDP gives the same result as one big batch
#
# With shuffling off, rank *r* of *W* takes images *r, r+W, r+2W, …*, so step *k* of all
# ranks together covers exactly the images of step *k* of a single process with a batch
# *W* times larger. Each rank averages its loss over its *B* images; DDP averages the
# gradients over the *W* ranks; the result is the average over all *W·B* images, the same
# gradient as the big batch. The tests check that the weights agree. One exception:
# BatchNorm in training mode normalises with each rank's own batch statistics, so
# fine-tuning with BatchNorm matches only with `--sync-bn` (GPUs).

# %% tags=["active-ipynb"]
# import json
# metrics = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
# print("val_samples per epoch:", [m["val_samples"] for m in metrics])
# print("config world size:", json.load(open(Path(out_dir) / "config.json"))["world_size"])

# %% [markdown]
# ## Exercises
#
# **1.** A job runs on 2 nodes with 4 GPUs each, one process per GPU, `--batch-size 32`.
# What is the global batch size, the number of images in one optimizer step?

# %% tags=["active-ipynb"]
# global_batch = None  # your answer

# %% tags=["active-ipynb"]
# print("Correct: 2 x 4 x 32 = 256." if global_batch == 2 * 4 * 32 else
#       "Not yet. Hint: every process takes --batch-size images per step; count the processes.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# global_batch = 2 * 4 * 32
# ```
# </details>
#
# **2.** What does `detect_launch` return inside `srun` on the third task of a job on
# nodes `gpu[07-08]`? Try it: `detect_launch({"SLURM_PROCID": "2", "SLURM_LOCALID": "0",
# "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
# "SLURM_JOB_ID": "4242"})`.
