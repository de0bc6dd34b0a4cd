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
# # 7. DistributedDataParallel: one process per GPU, on as many nodes as you like
#
# DDP runs **one process per GPU**. Each process holds a full copy of the model, reads its
# own share of every batch, computes gradients on it, and then all processes **average
# their gradients** (an all-reduce over NVLink, InfiniBand or Ethernet) before each takes
# the same optimizer step. The copies stay identical, no GPU does extra work, and there
# is no Python GIL in the way: this is what scales to many nodes.
#
# **You will learn to:**
# - read exactly what DDP adds to a training script, line by line;
# - start DDP with `torchrun` or `srun`, and read what each rank prints;
# - explain why DDP gives the same weights as one process with a batch *W* times larger;
# - scale the learning rate to the global batch (linear or square-root rule, warm-up);
# - count each validation image exactly once across processes;
# - measure what DDP communicates per step, frozen and fine-tuned, and how much of it hides.
# - (optional) choose between DDP and fully sharded data parallel by memory.
#
# **Time:** about 20 minutes of core, and about 10 more for the optional FSDP section;
# the appendix is how this lesson finds the DDP lines.
#
# ```bash
# torchrun --nproc-per-node 4 scripts/train.py --data ...     # one node, 4 GPUs
# srun python scripts/train.py --data ...                     # inside a Slurm job: one task per GPU
# python scripts/train.py --data ...                          # one process
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# image_size = 64
# epochs = 2
# batch_size = 16  # per process
# processes = 2
# out_dir = "../runs/notebook-ddp"
# memory_image_size = 224  # the FSDP section measures activations of one image this large

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %% jupyter={"source_hidden": true}
from __future__ import annotations

import ast
import ctypes
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from model import build_model, count_parameters

SCRIPTS = Path(__file__).resolve().parent if "__file__" in globals() else Path("../scripts").resolve()


# How this lesson finds the DDP lines (also used by tests/test_lessons.py): every `if ddp:` block of a
# script, with the function it is in (and the FSDP section's `if cfg.fsdp:` blocks).
def ddp_blocks(script: Path, flag: str = "ddp") -> list[tuple[str, int, str]]:
    """(function, first line, source) of every `if ddp` block of a script (`if flag`, `if cfg.flag`)."""
    source = Path(script).read_text()
    lines = source.splitlines()
    found = []

    def visit(node, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.If) and tests_flag(child.test, flag):
                end = child.body[-1].end_lineno  # the block itself, not an `else` after it
                found.append((name, child.lineno, "\n".join(lines[child.lineno - 1:end])))
                continue
            visit(child, name)

    visit(ast.parse(source), "<module>")
    return found


def tests_flag(test: ast.expr, flag: str) -> bool:
    """`flag`, `something.flag`, or either `and ...`."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        test = test.values[0]
    return (isinstance(test, ast.Name) and test.id == flag) or (isinstance(test, ast.Attribute) and test.attr == flag)


# %% [markdown] slideshow={"slide_type": "slide"}
# ## What DDP adds to `train.py`
#
# `train.py` is one script for one process and for many (the choice of
# [nanoGPT](https://github.com/karpathy/nanoGPT/blob/master/train.py): one file, `if
# ddp:` where it matters). So the lesson of DDP is a short list: every line of
# `train.py` that runs only under DDP. With one process, none of them runs; this is the
# whole difference between the single-device script and the distributed one.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# blocks = ddp_blocks(SCRIPTS / "train.py")
# for function, first, text in blocks:
#     print(f"--- {function}, line {first}")
#     print(text)
# print(f"{sum(len(text.splitlines()) for _, _, text in blocks)} lines of train.py run only under DDP")

# %% [markdown]
# Look at the list, in the order a process meets it:
#
# 1. **Join the process group** (`start_processes`): rank, local rank and world size come
#    from the launcher (`srun` or `torchrun`, see below), and `init_process_group` connects
#    the processes: `nccl` between GPUs, `gloo` between CPUs (how this notebook runs).
# 2. **Who am I** (`fit`): rank 0 is the one voice: only it prints and writes files.
# 3. **Wrap the model** (`wrap_model`): `DistributedDataParallel` averages the gradients
#    across processes during the backward pass, bucket by bucket, while the backward
#    pass goes on.
# 4. **Add up what was measured** (`fit`, `evaluate`): the training loss and the
#    validation counts are sums, so one `all_reduce` adds the shares of all processes.
# 5. **Leave the group** (`main`), also after an error.
#
# Two more pieces were there from the start, in lines shared by both paths. The
# training sampler is a `DistributedSampler(num_replicas=world_size, rank=rank)`: with
# one process it is a plain shuffle; with *W* it gives each rank a disjoint share, and
# `set_epoch(epoch)` makes each epoch's order new and the same on every rank. The
# validation sampler gives every image to exactly one rank:

# %% tags=["active-ipynb"]
# from data import ShardSampler
# print([list(ShardSampler(10, rank, 3)) for rank in range(3)])

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: 10 images over 3 ranks, each image once. A `DistributedSampler` would pad to
# 4 + 4 + 4 by repeating two images, and count them twice. (In `resilience.py`, rank 0
# alone decides whether to resume and writes the checkpoints; the others receive its
# decision and wait at a barrier: see lesson 4.)
#
# ## Try it: DDP with two processes on this machine
#
# The notebook's own kernel cannot be a DDP worker: DDP needs several *processes*. So we
# launch the script, exactly as a batch job would, with `torchrun`; `--master-addr
# 127.0.0.1` keeps the rendezvous on this machine.

# %% tags=["active-ipynb"]
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic {data_dir} --classes 10 --image-size {image_size}
# import socket
# with socket.socket() as probe:  # a free port, so two notebooks never collide
#     probe.bind(("127.0.0.1", 0))
#     port = probe.getsockname()[1]
# !{sys.executable} -m torch.distributed.run --nnodes 1 --nproc-per-node {processes} --master-addr 127.0.0.1 \
#     --master-port {port} ../scripts/train.py --data {data_dir} --arch resnet18 --weights none \
#     --image-size {image_size} --epochs {epochs} --batch-size {batch_size} --workers 0 --out {out_dir} --overwrite

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: one `rank … host … pid …` line per process (the first thing to read when a
# multi-node job misbehaves), then one stream of lines from rank 0; the global batch
# (`batch per process x processes`); and `val_samples`, every validation image once.
#
# ## Why DDP gives the same result as one big batch
#
# With shuffling off, rank *r* of *W* takes images *r, r+W, r+2W, …*, so step *k* of all
# ranks together covers exactly the images of step *k* of a single process with a batch
# *W* times larger. Each rank averages its loss over its *B* images; DDP averages the
# gradients over the *W* ranks; the result is the average over all *W·B* images, the same
# gradient as the big batch. `tests/test_parallel.py` checks that the weights agree, on
# CPUs with gloo, for 2 and 3 processes. One exception: BatchNorm in training mode
# normalises with each rank's own batch statistics, so fine-tuning with BatchNorm
# matches only with `--sync-bn` (GPUs).

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# import json
# metrics = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
# print("val_samples per epoch:", [m["val_samples"] for m in metrics])
# print("world size:", json.load(open(Path(out_dir) / "config.json"))["world_size"])

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Large batches: the learning rate must change too
#
# *W* processes with `--batch-size B` take steps of *W·B* images. At a fixed number of
# epochs that is **W times fewer steps**: with the learning rate of one process, the
# weights take W times fewer steps of about the same length, and the run ends less
# trained than the one it was meant to speed up. So the rate grows with the global batch:
#
# - the **linear rule**, for SGD (Goyal et al., 2017, *Accurate, Large Minibatch SGD*):
#   W times the batch, W times the rate, so one step of *W·B* images goes about as far
#   as *W* steps of *B* did;
# - the **square-root rule**, commonly used with Adam-type optimizers (this course's
#   AdamW): √W times the rate, since Adam already scales each step by the gradient's
#   size, and a W times larger batch makes the gradient's noise √W times smaller;
# - a **warm-up**: early in training a large rate can throw the weights far off, so the
#   rate rises linearly over the first epochs, step by step, before the cosine takes over.
#
# In `train.py`, `--lr` stays the rate of one process's `--batch-size`; `--lr-scaling
# linear` or `sqrt` multiplies it by W or √W (DataParallel is one process: its
# `--batch-size` is already the global batch), and `--warmup-epochs N` ramps it from
# 1/S of its value in the first step to all of it after the S steps of N epochs. The
# header line prints the rate used. Both are off by default: the rules are starting
# points to check against the validation accuracy, not laws, and beyond some batch size
# no rate recovers the accuracy of smaller batches.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# import train
# for rule in train.LR_SCALING:  # 4 processes, 4 steps per epoch, 1 warm-up epoch, 3 epochs
#     cfg = train.parse_args(["--lr", "1e-3", "--lr-scaling", rule, "--warmup-epochs", "1", "--epochs", "3"])
#     print(f"{rule:6s}", " ".join(f"{train.learning_rate(cfg, 4, e, s, 4):.1e}" for e in range(3) for s in range(4)))

# %% [markdown]
# Look at: the first four steps climb to the scaled rate (1e-3, 4e-3 or 2e-3), then the
# cosine falls, one value per epoch.

# %% [markdown]
# ## What DDP sends in every step, and when
#
# Every step, each process all-reduces the gradients of the parameters that train (4
# bytes each in fp32): with a frozen backbone the head's alone, with `--finetune` every
# layer's. DDP packs them into **buckets** of about 25 MB (`bucket_cap_mb`) and
# all-reduces each bucket as soon as its gradients are ready, while the backward pass goes
# on: communication can hide behind computation. Measured here, ResNet-18 with gloo:

# %% tags=["active-ipynb"]
# !{sys.executable} ../scripts/benchmark.py allreduce --arch resnet18 --classes 10 --image-size {image_size} \
#     --batch-size 4 --processes {processes} --warmup 2 --steps 2 --repeats 3 --out {out_dir}-allreduce

# %% [markdown]
# Look at: `all-reduced` (bytes per step, exact) and `buckets`, frozen against
# fine-tuned; `no_sync ms` (forward and backward without communication) against `DDP ms`;
# their difference `added` against `all-reduce alone`: `hidden` is the share the overlap
# hid, unless the repeats are `within noise`. Try `--bucket-cap-mb` and
# `--gradient-as-bucket-view` (gradients kept in the buckets: one copy fewer). On CPUs
# gloo reduces on the cores that also compute the backward pass; `docs/performance.md`
# has ResNet-152's figures (on CPUs with gloo; GPUs with nccl are not measured yet).

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Launchers: `srun` or `torchrun`
#
# | | `srun python train.py` | `srun torchrun … train.py` |
# |---|---|---|
# | who starts the processes | Slurm: one task per GPU | one `torchrun` per node starts one process per GPU |
# | rank, world size | `SLURM_PROCID`, `SLURM_NTASKS` | `RANK`, `WORLD_SIZE` |
# | where they meet | the first node of the job, a port from the job id | `--rdzv-endpoint` of `torchrun` |
# | a rank dies | `srun --kill-on-bad-exit=1` ends the others | `torchrun` ends the others |
# | Slurm files | `ddp_srun_*.sbatch` | `ddp_torchrun_multinode.sbatch` |
#
# `train.py` reads either (`detect_launch`, in its appendix). If a rank dies without a
# launcher watching, the others stop after `--dist-timeout` seconds with one line each
# instead of idling until the time limit; this is tested on CPUs with gloo.
#
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
# **2.** Inside `srun`, the third task of a job on nodes `gpu[07-08]` has `SLURM_PROCID=2`.
# Which rank is it, and on which host do all ranks meet? Ask `train.detect_launch`.

# %% tags=["active-ipynb"]
# meeting_host = None  # your answer: a host name, e.g. from train.detect_launch({...}).master_addr

# %% tags=["active-ipynb"]
# if meeting_host == "gpu07":
#     print("Correct: every rank meets rank 0 on the first node of the job, gpu07.")
# else:
#     print('Not yet. Hint: import train; train.detect_launch({"SLURM_PROCID": "2", "SLURM_LOCALID": "0", '
#           '"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})')

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# import train
# launch = train.detect_launch({"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
#                               "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
# meeting_host = launch.master_addr
# ```
# </details>
#
# **3.** The course's model is a ResNet-152 (2048 features) with a head for 525 classes.
# How many megabytes (10**6 bytes) does each DDP process all-reduce per step in fp32,
# with the backbone frozen and with `--finetune`?

# %% tags=["active-ipynb"]
# allreduce_mb = None  # your answer: (frozen, fine-tuned), in MB

# %% tags=["active-ipynb"]
# from model import BirdClassifier, count_parameters
# expected = [count_parameters(BirdClassifier("resnet152", 525, freeze))[1] * 4 / 1e6 for freeze in (True, False)]
# answers = list(allreduce_mb) if isinstance(allreduce_mb, (tuple, list)) and len(allreduce_mb) == 2 else [None] * 2
# if all(isinstance(a, (int, float)) and abs(a - e) <= 0.01 * e for a, e in zip(answers, expected)):
#     print(f"Correct: {expected[0]:.2f} MB and {expected[1]:.0f} MB, {expected[1] / expected[0]:.0f} times as much.")
# else:
#     print("Not yet. Hint: the head is nn.Linear(2048, 525) with a bias; count_parameters(model) in model.py "
#           "counts every parameter of BirdClassifier('resnet152', 525, freeze_backbone=False); 4 bytes each.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# from model import BirdClassifier, count_parameters
# frozen_mb = (2048 * 525 + 525) * 4 / 1e6  # the head's weights and biases
# allreduce_mb = (frozen_mb, count_parameters(BirdClassifier("resnet152", 525, freeze_backbone=False))[0] * 4 / 1e6)
# ```
# </details>
#
# ## When the model does not fit: fully sharded data parallel (optional)
#
# DDP keeps the weights, gradients and optimizer state whole in every process. **Fully
# sharded data parallel** (FSDP: PyTorch's `fully_shard`, ZeRO stage 3 of Rajbhandari et
# al., 2020) keeps 1/W of each: the processes all-gather a block's weights before it
# computes and reduce-scatter its gradients after. DDP's result, at 1.5 times its
# communication (ZeRO, section 7). Per process, for our fine-tuning:

# %% jupyter={"source_hidden": true}
ADAM_STATES = 2  # Adam keeps two numbers per trained parameter: moving averages of the gradient and of its square


def memory_per_process(model: nn.Module, processes: int, sharded: bool) -> dict[str, float]:
    """Bytes one of `processes` processes holds for training `model` with Adam, from numel x element size.
    DDP (not sharded) holds all of it, plus its all-reduce buckets: a second copy of the gradients (unless
    gradient_as_bucket_view=True); FSDP holds 1/W, plus the largest residual block's whole weights and
    gradient while it computes (about: the next block's weights may be on their way already)."""
    total, trained = count_parameters(model)
    size = next(model.parameters()).element_size()
    share = processes if sharded else 1
    largest_block = max((sum(p.numel() for p in block.parameters()) for block in model.modules()
                         if isinstance(block, (BasicBlock, Bottleneck))), default=0)
    return {"weights": total * size / share, "gradients": trained * size / share,
            "Adam state": ADAM_STATES * trained * size / share, "DDP buckets": 0 if sharded else trained * size,
            "block in use": 2 * largest_block * size if sharded else 0}


def print_memory_table(model: nn.Module, processes: tuple[int, ...], image_size: int) -> None:
    """memory_per_process in MB, for DDP and for FSDP on each number of processes; then the activations of
    images of image_size, measured."""
    columns = {"DDP": memory_per_process(model, 1, sharded=False)}
    columns.update({f"FSDP W={w}": memory_per_process(model, w, sharded=True) for w in processes})
    print(f"{'MB per process':16s}" + "".join(f"{name:>11s}" for name in columns))
    for row in columns["DDP"]:
        print(f"{row:16s}" + "".join(f"{column[row] / 1e6:11.0f}" for column in columns.values()))
    print(f"{'total':16s}" + "".join(f"{sum(column.values()) / 1e6:11.0f}" for column in columns.values()))
    per_image = activation_bytes(model, torch.randn(1, 3, image_size, image_size))
    print(f"activations, measured: {per_image / 1e6:.0f} MB per {image_size} px image, "
          f"{64 * per_image / 1e9:.1f} GB for --batch-size 64, with DDP and FSDP alike")


def activation_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """The bytes one training forward pass keeps for the backward pass (each storage once, the weights not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.train()(images)
    return sum(kept.values())


# %% tags=["active-ipynb"]
# r152 = build_model("resnet152", 525, "none", finetune=True, log=lambda *a: None)
# print_memory_table(r152, processes=(2, 4, 8), image_size=memory_image_size)

# %% [markdown]
# Look at: the training state shrinks as 1/W; the activations do not, and at batch 64
# they are ten times the training state. So for ResNet-152 choose DDP: it fits any GPU
# and communicates less. Choose FSDP when the training state (16 bytes per parameter
# with fp32 Adam) does not fit. The appendix measures it on CPUs.
#
# **What changes in `train.py`**, the lines that run only with `--fsdp`:

# %% tags=["active-ipynb"]
# for function, first, text in ddp_blocks(SCRIPTS / "train.py", "fsdp"):
#     print(f"--- {function}, line {first}")
#     print(text)

# %% [markdown]
# Look at: the model is sharded **before** the optimizer is built, which must hold the
# shards; every rank takes as many validation steps, as each forward pass gathers
# weights from all ranks. Checkpoints gather the shards (`whole`, in `resilience.py`).
# `tests/test_parallel.py` checks on CPUs with gloo that FSDP, stopped and resumed, ends
# with DDP's weights. With `--fsdp`, this notebook's `torchrun` command prints:
#
# ```text
# rank 0 keeps 22,363,284 of 44,726,568 parameter bytes (fsdp)
# rank 1 keeps 22,363,284 of 44,726,568 parameter bytes (fsdp)
# ```
#
# **4.** On how many FSDP processes does each hold less than 200 MB of training state
# (the table's total) for ResNet-152 fine-tuning? Ask `memory_per_process`.

# %% tags=["active-ipynb"]
# fsdp_processes = None  # your answer: a number

# %% tags=["active-ipynb"]
# fewest = min(w for w in range(1, 65) if sum(memory_per_process(r152, w, True).values()) < 200e6)
# print(f"Correct: {fewest} processes; DDP holds 1,184 MB in each, however many." if fsdp_processes == fewest
#       else "Not yet. Hint: add up the values of memory_per_process(r152, w, sharded=True) for w = 2, 3, 4, ...")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# fsdp_processes = next(w for w in range(1, 65) if sum(memory_per_process(r152, w, True).values()) < 200e6)
# ```
# </details>
#
# ## Appendix: the old command, and measuring memory
#
# `python scripts/train_ddp.py` still works: it is `train.py`, which detects DDP from its
# launcher. `scripts/train_ddp.py memory` under `torchrun` trains the course's model,
# fine-tuned, for a few steps on random images with DDP or (`--fsdp`) FSDP, and each rank
# prints its peak resident memory: its training state and activations, without data
# loading, validation or checkpoints. Measured on CPUs with gloo, 2 processes:
#
# ```text
# $ torchrun --nproc-per-node 2 scripts/train_ddp.py memory --arch resnet152 --image-size 64 --batch-size 2
# rank 0 ddp: peak resident memory 2027 MiB, 801 MiB before the model
# rank 1 ddp: peak resident memory 2028 MiB, 801 MiB before the model
# $ torchrun --nproc-per-node 2 scripts/train_ddp.py memory --arch resnet152 --image-size 64 --batch-size 2 --fsdp
# rank 1 fsdp: peak resident memory 1363 MiB, 801 MiB before the model
# rank 0 fsdp: peak resident memory 1361 MiB, 801 MiB before the model
# ```
#
# Above PyTorch's own 801 MiB, that is 1,226 MiB per process with DDP and 560 MiB with
# FSDP, close to what the table predicts: 1,130 and 498 MiB of training state (1,184 and
# 522 MB), plus 29 MiB of activations (`activation_bytes` of 2 images of 64 px). The
# command sets glibc's mmap threshold so that freed blocks leave the process at once:
# without it the FSDP processes peaked at 1,799 and 1,922 MiB, memory freed but kept for
# reuse. No GPU was available: GPU memory (`torch.cuda.max_memory_allocated`, in
# `peak_device_memory_mb` of a run's summary) was not measured.

# %%
BIRD_CLASSES = 525


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:
        return measure_memory(argv[1:])
    import train  # train.py imports nothing from here
    return train.main(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def return_freed_memory_at_once() -> None:
    """glibc keeps large freed blocks for reuse once it has seen some freed: resident memory would then count
    FSDP's gathered blocks long after they are gone. A fixed mmap threshold gives them back at once."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: measured as it is
        pass


def measure_memory(argv: list[str]) -> int:
    """Each rank trains --max-steps steps (0: 3) of --arch, every layer, on random images of --image-size,
    --batch-size per process, as DDP or (--fsdp) FSDP does, and prints its peak resident memory."""
    import train
    cfg = train.parse_args(["--weights", "none", "--finetune", "--workers", "0", *argv])
    ddp, device = train.start_processes(cfg)
    return_freed_memory_at_once()
    before = peak_rss_mib()
    model = build_model(cfg.arch, BIRD_CLASSES, "none", finetune=True, log=lambda *a: None).to(device)
    if cfg.fsdp:  # parse_args made sure a launcher started this process
        train.shard_model(model)
    else:
        model = train.wrap_model(model, cfg, ddp, device)
    optimizer = train.build_optimizer(cfg, model)
    for _ in range(cfg.max_steps or 3):
        images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
        labels = torch.randint(0, BIRD_CLASSES, (cfg.batch_size,), device=device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    mode = "fsdp" if cfg.fsdp else "ddp" if ddp else "one process"
    sys.stdout.write(f"rank {dist.get_rank() if ddp else 0} {mode}: peak resident memory {peak_rss_mib():.0f} MiB, "
                     f"{before:.0f} MiB before the model\n")
    if ddp:
        dist.destroy_process_group()
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    from data import run_cli
    run_cli(main)
