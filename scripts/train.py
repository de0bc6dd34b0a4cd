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
# # 3. Training: the loop, validation, and a run you can trust
#
# The data of lesson 1 and the model of lesson 2 become a trained classifier: one
# training loop, one validation pass, and `fit`, which runs the epochs and records
# everything in a run directory. This notebook is `scripts/train.py`, the script every
# Slurm file of the course runs: on one device, on several GPUs of a node with
# DataParallel (lesson 6), and with DDP on many nodes under `srun` or `torchrun`
# (lesson 7). The few lines that only DDP needs say `if ddp:`; with one process, none
# of them runs.
#
# **You will learn to:**
# - write the training loop and a validation pass in eval mode, each on one screen;
# - read a run directory: `config.json`, `metrics.jsonl`, `last.pt`, `best.pt`, and the
#   test score of the best model in `summary.json`;
# - run the same training as a script, as a batch job will, and plot its curves;
# - find any option in `train.py --help`.
#
# **Time:** about 35 minutes. All of it is core; the appendix (options, launchers) is
# for reference.

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

# %% jupyter={"source_hidden": true}
from __future__ import annotations

import argparse
import glob
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import hostlist
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.resnet import BasicBlock, Bottleneck

from data import (ShardSampler, UserError, available_cpus, available_splits, data_order, default_num_workers, load_splits,
                  make_loader, run_cli, set_compute_threads)
from model import ARCHITECTURES, build_model, count_parameters
from resilience import (STOP_CHECK_EVERY, ResumableSampler, Run, StopRequest, agree_to_stop, broadcast_from_rank0,
                        check_run_dir_is_free, default_run_dir, diverged, hash_classes, is_rank0, load_state_into,
                        load_trained_model, on_rank0, read_checkpoint_file, read_metrics, save_checkpoint,
                        sum_over_ranks, trained_state)
from speed import (NsysWindow, ProfiledLoader, autocast, cached_feature_loaders, nvtx_available, pick_precision,
                   precision_name, set_cudnn_benchmark, step_phases, to_device, use_gpu_decode)

# %% [markdown] slideshow={"slide_type": "slide"}
# ## The pieces from lessons 1 and 2
#
# A loader of training batches, a model with a new head for our classes, an optimizer
# for the parameters that train.

# %% tags=["active-ipynb"]
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic {data_dir} --classes 10 --image-size {image_size}
# splits = load_splits(data_dir, image_size)
# loader = make_loader(splits["train"], batch_size, workers=0, shuffle=True)
# model = build_model(arch, len(splits["train"].classes), weights)
# optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
# print(f"{len(splits['train'])} training images in {len(loader)} batches of {batch_size}; "
#       f"{count_parameters(model)[1]:,} parameters train")

# %% [markdown] slideshow={"slide_type": "slide"}
# ## One epoch of training
#
# The textbook loop: forward, loss, backward, step. Three details matter for speed:
# `zero_grad(set_to_none=True)` skips a memset, `non_blocking=True` (in `to_device`) lets
# the CPU go on queueing work while a batch is copied from pinned memory to the GPU
# (the GPU itself still finishes the copy before the forward pass: lesson 8), and the
# loss is **summed on the device** and read once per epoch, because `loss.item()` in
# every step would make the CPU wait for the GPU. `steps` counts the steps, prints
# progress, and asks every few steps whether a time-limit warning arrived (lesson 4);
# it is collapsed just below. `phase(...)` names the parts of a step on a profiler's
# timeline when `--nvtx` is on (lesson 9); otherwise it does nothing.

# %% jupyter={"source_hidden": true}
class EpochSteps:
    """The bookkeeping of one epoch: where it starts (0, or a mid-epoch resume), progress lines,
    --max-steps, the running sums, and every STOP_CHECK_EVERY steps whether to stop (a signal, or a
    loss that became NaN on any rank)."""

    def __init__(self, epoch: int, loader_steps: int, device: torch.device, cfg=None, stop=None,
                 start: dict | None = None, log=print, bar: bool = True, schedule=None):
        start = start or {"step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0}
        self.epoch, self.first, self.device, self.cfg, self.stop, self.log = epoch, start["step"], device, cfg, stop, log
        self.schedule, self.lr = schedule, None  # schedule(epoch, step, steps of the epoch) sets the lr of a step
        max_steps = getattr(cfg, "max_steps", 0)
        self.last = self.first + loader_steps if not max_steps else min(max_steps, self.first + loader_steps)
        self.every = getattr(cfg, "log_every", 0) or max(1, self.last // 4)
        # The sums of the steps before a resume are global: only rank 0 carries them on.
        carried = (start["loss_sum"], start["seen"]) if is_rank0() else (0.0, 0)
        self.sums = torch.tensor(carried, dtype=torch.float64, device=device)  # loss x images, images
        self.first_nonfinite = torch.tensor(-1, device=device)  # on the device: no wait for the GPU
        self.started = time.perf_counter() - start["seconds"]
        self.stopped: str | None = None
        self.step = self.first
        self.bar = bar and is_rank0() and interactive()
        self.phase = step_phases(cfg)  # --nvtx: names the phases of each step for Nsight Systems (lesson 8)

    def enumerate(self, loader):
        bar = progress(loader, self.last - self.first, f"epoch {self.epoch + 1}", self.bar)
        self.phase("wait for data")
        try:
            for step, batch in enumerate(bar, start=self.first):
                if step >= self.last:
                    return
                if self.schedule:
                    self.lr = self.schedule(self.epoch, step, self.last)
                yield step, batch
                self.phase("wait for data")
        finally:
            self.phase(None)

    def add(self, step: int, loss: torch.Tensor, images: int) -> bool:
        """Count a step; True when every rank agreed to stop after it."""
        loss = loss.detach()
        self.sums += torch.stack([loss.double() * images, torch.tensor(float(images), device=self.device,
                                                                       dtype=torch.float64)])
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~torch.isfinite(loss), step,
                                           self.first_nonfinite)
        self.step = step + 1
        if not interactive() and self.step % self.every == 0:
            self.log(f"epoch {self.epoch + 1} step {self.step}/{self.last} loss {loss.item():.4f}")
        if self.step % STOP_CHECK_EVERY or self.step >= self.last:
            return False
        reason = agree_to_stop(self.stop, self.device, self.first_nonfinite >= 0)
        if reason == "diverged":
            raise diverged(self.epoch, int(self.first_nonfinite), self.cfg)
        self.stopped = reason
        return reason is not None

    def position(self) -> dict:
        """Where a stopped epoch stands, for the checkpoint (call after the sums were added over ranks)."""
        return {"step": self.step, "loss_sum": self.sums[0].item(), "seen": int(self.sums[1].item()),
                "seconds": time.perf_counter() - self.started}

    def stats(self) -> dict:
        """The finished epoch's training figures (call after the sums were added over ranks)."""
        loss_sum, seen = self.sums.tolist()
        if not math.isfinite(loss_sum):  # on some rank: the sums are global
            raise diverged(self.epoch, int(self.first_nonfinite), self.cfg)
        seconds = time.perf_counter() - self.started
        return {"train_loss": loss_sum / seen, "train_samples": int(seen), "images_per_sec": seen / seconds,
                "train_seconds": seconds}


def progress(iterable, total: int, description: str, enabled: bool):
    """tqdm bars on terminals and in notebooks; nothing in batch jobs (they log lines)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False)


def interactive() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


# %% slideshow={"slide_type": "subslide"}
def train_one_epoch(model, loader, optimizer, scaler, dtype, device, cfg, steps: EpochSteps) -> EpochSteps:
    """One epoch (or its rest, after a mid-epoch resume); `steps` holds this process's sums."""
    model.train()
    phase = steps.phase  # --nvtx: a named range per phase on a profiler's timeline; else it does nothing
    for step, (images, labels) in steps.enumerate(loader):  # phase "wait for data" while the loader works
        phase("copy to device")
        images, labels = to_device(images, labels, device, cfg.channels_last)
        phase("forward")
        with autocast(device, dtype):  # mixed precision: lesson 8 (here, fp32)
            loss = F.cross_entropy(model(images), labels)
        phase("backward")  # under DDP, the gradients' all-reduce overlaps it
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the gradient scaler acts with fp16 only
        phase("optimizer step")
        scaler.step(optimizer)
        scaler.update()
        phase("bookkeeping")
        if steps.add(step, loss, len(labels)):  # a time-limit warning: stop after this step
            break
    return steps


# %% [markdown]
# Run it once on the pieces above: one epoch, on the CPU, in fp32.

# %% tags=["active-ipynb"]
# cfg = argparse.Namespace(channels_last=False, max_steps=0, log_every=0)
# scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: no scaling
# steps = train_one_epoch(model, loader, optimizer, scaler, None, torch.device("cpu"), cfg,
#                         EpochSteps(0, len(loader), torch.device("cpu"), cfg))
# print(steps.stats())

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: `train_loss` (the mean over the epoch's images; chance level is
# ln(classes) = 2.3 for 10 classes), `train_samples` (every training image once, or one
# fewer: a last step of a single image is left out, lesson 1) and `images_per_sec`.
#
# ## Validation
#
# The original workshop validated in training mode with gradients on: BatchNorm then
# normalised with the validation batch's statistics, and autograd kept every activation.
# Here validation runs in `model.eval()` under `torch.inference_mode()`. The loss and
# the counts are **summed**, and divided only at the end: under DDP each process sees
# its share of the images, and sums add up across processes where means would not.

# %%
@torch.inference_mode()
def evaluate(model, loader, dtype, device, cfg, ddp: bool = False) -> dict:
    """Loss, top-1 and top-5 accuracy over the loader's images, every image counted once."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, images
    for images, labels in loader:
        images, labels = to_device(images, labels, device, cfg.channels_last)
        with autocast(device, dtype):
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([
            F.cross_entropy(logits.float(), labels, reduction="sum").double(),
            (top[:, 0] == labels).sum().double(),
            (top == labels[:, None]).any(dim=1).sum().double(),
            torch.tensor(float(len(labels)), device=device, dtype=torch.float64),
        ])
    if ddp:
        dist.all_reduce(sums)  # each process evaluated its share: add the shares up
    loss, top1, top5, count = sums.tolist()
    return {"val_loss": loss / count, "val_acc": top1 / count, "val_top5": top5 / count,
            "val_samples": int(count)}


# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# valid = make_loader(splits["valid"], batch_size, workers=0)
# print(evaluate(model, valid, None, torch.device("cpu"), cfg))

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: `val_acc` after one epoch, against chance (1 / number of classes), and
# `val_samples`: every validation image once.
#
# ## The learning rate
#
# A cosine schedule: the peak `--lr` in the first epoch, falling to 0 over `--epochs`.
# It is a function of the epoch alone, so a run resumed with more `--epochs` (lesson 4)
# follows the longer schedule instead of training at 0.

# %% slideshow={"slide_type": "fragment"}
def cosine_lr(peak: float, epoch: int, epochs: int) -> float:
    """The learning rate of epoch `epoch` (from 0) of `epochs`: a cosine from peak down towards 0."""
    return peak * (1 + math.cos(math.pi * epoch / epochs)) / 2


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# %% tags=["active-ipynb"]
# print([round(cosine_lr(1e-3, e, epochs), 6) for e in range(epochs)])

# %% [markdown]
# With several processes the global batch grows, and `--lr-scaling` (linear or sqrt) and
# `--warmup-epochs` adapt the learning rate to it (lesson 7); by default neither changes
# anything. `learning_rate` (collapsed) is the rate of every step, still closed-form:
# the scaled peak on the cosine, times a linear warm-up factor.

# %% jupyter={"source_hidden": true}
LR_SCALING = ("none", "linear", "sqrt")


def scaled_lr(lr: float, rule: str, processes: int) -> float:
    """--lr is the rate of one process's --batch-size; W processes take a W times larger global batch.
    linear: x W (the linear rule, for SGD); sqrt: x sqrt(W) (common with Adam-type optimizers); none: as given.
    DataParallel is one process: its --batch-size already is the global batch."""
    return lr * {"none": 1, "linear": processes, "sqrt": math.sqrt(processes)}[rule]


def learning_rate(cfg, processes: int, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The lr of step `step` (from 0) of epoch `epoch` (from 0): the scaled peak on the cosine of the epoch,
    times a linear warm-up over the first --warmup-epochs: (steps done + 1) / warm-up steps, from
    1/(warm-up steps) of it in the first step up to all of it in the warm-up's last step."""
    lr = cosine_lr(scaled_lr(cfg.lr, cfg.lr_scaling, processes), epoch, cfg.epochs)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps > 0:
        lr *= min(1.0, (epoch * steps_per_epoch + step + 1) / warmup_steps)
    return lr

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Putting it together: `fit`
#
# `fit` builds the data, the model and the run directory (`prepare`, below), then runs
# the epochs: reshuffle, train (`steps` sets the learning rate of every step), validate,
# write. Only rank 0 prints and writes files. `run` (lesson 4) resumes from `last.pt`
# when asked, writes `last.pt`, `best.pt` and the metrics after every epoch, and stops
# cleanly on a time-limit warning.
#
# The validation accuracy chose `best.pt`, so it flatters that model: the best of
# several draws. A run that finished all its epochs therefore scores `best.pt` once on
# the `test/` split, which nothing else looked at (`test_acc` in the summary line and in
# `summary.json`); with no `test/` split it says so and skips it.
#
# The summary also says what the run **cost** (`cost` in `summary.json`, appendix):
# its wall time, the devices it held (GPUs, or CPU cores), and their product,
# `device_hours`, which is what an allocation is charged in; the peak memory
# (`peak_mem_mb` in the summary line: the GPU's, or the host's on a CPU); how busy its CPU
# cores (and GPUs, where NVML is readable) were; and the energy in joules, only where a
# counter is readable (RAPL on CPUs, NVML on GPUs), else `None`.

# %%
def fit(cfg, device: torch.device | None = None, stop: StopRequest | None = None) -> dict:
    """Train as cfg says (this process's share under DDP); return the last epoch's summary."""
    ddp, rank, world_size = dist.is_initialized(), 0, 1
    if ddp:  # started by srun or torchrun (lesson 7)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else lambda *args: None  # one voice: rank 0's
    device = device or pick_device(cfg.device, log=log)
    with prepare(cfg, rank, world_size, device, log) as t:  # the run directory stays locked until the end
        model = wrap_model(t.model, cfg, ddp, device, log)
        for epoch in range(t.run.state.epoch, t.run.last_epoch):
            t.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
            start = t.run.begin_epoch(t.sampler)  # after a mid-epoch resume: skip what was done (lesson 4)
            steps = EpochSteps(epoch, len(t.train_loader), device, cfg, stop, start, log, schedule=t.set_lr)
            train_one_epoch(model, t.train_loader, t.optimizer, t.scaler, t.dtype, device, cfg, steps)
            if ddp:
                dist.all_reduce(steps.sums)  # the loss and the images of every process
            if steps.stopped:
                return t.run.stop(epoch, steps.stopped, steps.position())
            record = {"epoch": epoch + 1, **steps.stats(), "lr": steps.lr,
                      **evaluate(t.model, t.val_loader, t.dtype, device, cfg, ddp)}
            t.end_epoch(record, time.perf_counter() - steps.started)  # last.pt, best.pt, metrics.jsonl
            if epoch + 1 < t.run.last_epoch and (reason := agree_to_stop(stop, device)):  # during validation?
                return t.run.stop(epoch + 1, reason)
        return t.conclude()  # after the last epoch: best.pt scored once on test/


# %% [markdown]
# `prepare` builds what the epochs need: loaders, model, precision, optimizer, and the
# run directory (`Run.start`, lesson 4), which resumes from `last.pt` when asked.

# %%
def prepare(cfg, rank: int, world_size: int, device: torch.device, log) -> Training:
    """Data, model, optimizer and the run directory; everything that can fail is checked first."""
    cost = CostMeter(cfg, world_size, device)  # what the run uses from here on: time, memory, energy
    cfg.workers = capped_workers(cfg.workers, log)
    cfg.threads = set_compute_threads(cfg.workers)  # the cores the loader's workers leave (lesson 1)
    out = Path(broadcast_from_rank0(str(cfg.out or default_run_dir(cfg.arch))))
    on_rank0(lambda: check_run_dir_is_free(out, cfg))  # at once, not after reading the data (lesson 4)
    splits = load_splits(cfg.data, cfg.image_size, augment=cfg.augment, skip_bad=cfg.skip_bad_images,
                         gpu_decode=use_gpu_decode(cfg, device, log), splits=available_splits(cfg.data))
    cfg.data_order = data_order(splits["train"])  # folders or shards: a mid-epoch resume needs the same (lesson 4)
    check_sizes(cfg, world_size, len(splits["train"]), len(splits["valid"]))
    sampler, train_loader, val_loader = build_loaders(cfg, splits, rank, world_size)
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    random.seed(cfg.seed)
    model = build_model(cfg.arch, len(splits["train"].classes), cfg.weights, cfg.finetune, log=log)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if cfg.fsdp:  # shard before the optimizer is built: it must hold the shards, not the whole parameters
        shard_model(model, rank)
    dtype = pick_precision(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = build_optimizer(cfg, model)
    run = Run.start(cfg, out, model, optimizer, scaler, splits["train"].classes, world_size, precision_name(dtype),
                    device, log, run_config(cfg, world_size, device, splits["train"].classes))
    return Training(cfg, out, splits, sampler, train_loader, val_loader, model, optimizer, scaler, dtype, run,
                    rank, world_size, device, log, cost)


# %% [markdown]
# The loaders: the training sampler shuffles (a new order every epoch, the same on every
# rank) and gives each rank its share; the validation sampler gives every image to
# exactly one rank (lesson 7), and so does the test loader at the end of a run.

# %% slideshow={"slide_type": "subslide"}
def build_loaders(cfg, splits: dict, rank: int, world_size: int):
    """The training sampler, the training loader and the validation loader of this process."""
    sampler = ResumableSampler(splits["train"], num_replicas=world_size, rank=rank, shuffle=not cfg.no_shuffle,
                               seed=cfg.seed)
    sampler.seed_draws = cfg.augment  # each image's random crop from its own seed (lesson 4)
    train_loader = make_loader(splits["train"], cfg.batch_size, cfg.workers, sampler=sampler)
    return sampler, train_loader, eval_loader(cfg, splits["valid"], rank, world_size)


def eval_loader(cfg, dataset, rank: int, world_size: int):
    """Validation and test: every image on exactly one rank, in a fixed order."""
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, sampler=ShardSampler(len(dataset), rank, world_size))
    if cfg.fsdp:  # FSDP's forward is a collective: every rank must take as many steps as the others
        return EvenSteps(loader, math.ceil(math.ceil(len(dataset) / world_size) / cfg.batch_size))
    return loader


# %% jupyter={"source_hidden": true}
class EvenSteps:
    """A loader's batches, then empty ones up to `steps`: under FSDP a rank with fewer images still joins
    every forward pass of the others (it gathers its share of each layer's parameters for them)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        images, labels = None, None
        for images, labels in self.loader:
            yield images, labels
        for _ in range(self.steps - len(self.loader)):
            yield images[:0], labels[:0]


# %% [markdown]
# Around the model, the parallel lessons add one wrapper each: DDP (one process per GPU,
# gradients averaged across processes during the backward pass) or DataParallel (one
# process drives every GPU of a node). `--compile` compiles what the loop calls.

# %%
def wrap_model(model: nn.Module, cfg, ddp: bool, device: torch.device, log=print) -> nn.Module:
    """The model as the training loop calls it (with --fsdp, `prepare` sharded it already)."""
    if ddp and not cfg.fsdp:
        if cfg.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the global batch
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif cfg.data_parallel:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if gpus < 2:
            log(f"notice: DataParallel needs 2 or more GPUs, {gpus} visible: training on {device} alone")
        else:
            log(f"DataParallel over {gpus} GPUs: {cfg.batch_size // gpus} images per GPU per step")
            model = nn.DataParallel(model)
    return torch.compile(model) if cfg.compile else model


# %% jupyter={"source_hidden": true}
def shard_model(model: nn.Module, rank: int | None = None) -> None:
    """FSDP: every residual block a unit of its own, whose whole parameters exist only while it computes;
    the stem and the head in the root's unit. Each process keeps 1/W of every parameter (and says so,
    given its rank)."""
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            fully_shard(module)
    fully_shard(model)
    if rank is not None:  # one write per line: the ranks share a terminal
        sys.stdout.write(f"rank {rank} keeps {parameter_bytes(model, local=True):,} of {parameter_bytes(model):,} "
                         "parameter bytes (fsdp)\n")


def parameter_bytes(model: nn.Module, local: bool = False) -> int:
    """The bytes of the model's parameters: all of them, or (local, under FSDP) this process's shards."""
    tensors = [p.to_local() if local and hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Run it as the cluster will
#
# The same training as a script, the way a batch job runs it. Watch the per-epoch
# lines: the training loss falls, and the validation accuracy climbs far above chance.
# (`--overwrite`: this notebook may run twice; without it, the script refuses to replace
# an earlier run in the same `--out`, lesson 4.)

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# options = (f"--data {data_dir} --arch {arch} --weights {weights} --image-size {image_size} --epochs {epochs} "
#            f"--batch-size {batch_size} --workers {workers}")
# !{sys.executable} ../scripts/train.py {options} --out {out_dir} --overwrite

# %% [markdown] slideshow={"slide_type": "subslide"}
# ### The curves
#
# Everything is in `metrics.jsonl`, so plotting needs no running process: the same cell
# works on a run that finished as a batch job last night.

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# import matplotlib.pyplot as plt
# metrics = read_metrics(Path(out_dir))
# done = [m["epoch"] for m in metrics]
# fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
# left.plot(done, [m["train_loss"] for m in metrics], label="train")
# left.plot(done, [m["val_loss"] for m in metrics], label="valid")
# left.set_xlabel("epoch"); left.set_ylabel("loss"); left.legend()
# right.plot(done, [m["val_acc"] for m in metrics], label="top-1")
# right.plot(done, [m["val_top5"] for m in metrics], label="top-5")
# right.axhline(1 / len(splits["train"].classes), color="grey", linestyle=":", label="chance")
# right.set_xlabel("epoch"); right.set_ylabel("validation accuracy"); right.legend()
# plt.show()

# %% [markdown] slideshow={"slide_type": "subslide"}
# ### Predictions against the truth
#
# The best model on a few validation images: green titles are right, red ones wrong.
# `load_trained_model` rebuilds the whole model from `best.pt`.

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# from data import IMAGENET_MEAN, IMAGENET_STD
# best_model, best = load_trained_model(Path(out_dir) / "best.pt")
# picks = list(range(0, len(splits["valid"]), max(1, len(splits["valid"]) // 8)))[:8]
# images = torch.stack([splits["valid"][i][0] for i in picks])
# with torch.inference_mode():
#     predicted = best_model(images).argmax(1)
# fig, axes = plt.subplots(2, 4, figsize=(10, 5.5))
# for ax, i, image, guess in zip(axes.flat, picks, images, predicted):
#     shown = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
#     ax.imshow(shown.permute(1, 2, 0).clamp(0, 1))
#     truth = splits["valid"].samples[i][1]
#     ax.set_title(f"{best['classes'][guess]}\n(true: {best['classes'][truth]})", fontsize=8,
#                  color="green" if guess == truth else "red")
#     ax.axis("off")
# plt.show()

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: do the mistakes share a colour? The synthetic species differ in colour only.
#
# ## Exercises
#
# **1.** Continue the run for two more epochs: run the script again with `--epochs`
# raised by 2 and `--resume`. How many lines does `metrics.jsonl` have afterwards? Then
# look at its `lr` column: the two new epochs follow the cosine of the longer run,
# `cosine_lr(lr, e, epochs + 2)` for `e = epochs, epochs + 1`, not 0.

# %% tags=["active-ipynb"]
# resumed_lines = None  # your answer: a number

# %% tags=["active-ipynb"]
# new_lrs = [m["lr"] for m in read_metrics(Path(out_dir))[epochs:]]
# longer_schedule = [cosine_lr(1e-3, e, epochs + 2) for e in range(epochs, epochs + 2)]
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
# more = options.replace(f"--epochs {epochs}", f"--epochs {epochs + 2}")
# !{sys.executable} ../scripts/train.py {more} --out {out_dir} --resume
# resumed_lines = len(read_metrics(Path(out_dir)))
# ```
# </details>
#
# **2.** `python scripts/train.py --help` groups the options. Which option of the
# *speed* group would you use to train the real ResNet-152 with a frozen backbone many
# times faster after its first epoch? (Lesson 8 explains it.)

# %% tags=["active-ipynb"]
# speed_option = None  # your answer: the option, e.g. "--something"

# %% tags=["active-ipynb"]
# if speed_option == "--cache-features":
#     print("Correct: a frozen backbone gives the same features every epoch, so they are computed once.")
# else:
#     print("Not yet. Hint: run `!{sys.executable} ../scripts/train.py --help` and read the speed group; "
#           "which option avoids running the frozen backbone in every epoch?")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# speed_option = "--cache-features"
# ```
# </details>
#
# ## Appendix: what `fit` calls
#
# ### The pieces of a training run

# %%
@dataclass
class Training:
    """Everything `prepare` builds for the epochs."""
    cfg: argparse.Namespace
    out: Path
    splits: dict
    sampler: ResumableSampler
    train_loader: object
    val_loader: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    run: Run
    rank: int
    world_size: int
    device: torch.device
    log: object
    cost: CostMeter

    @property
    def classes(self) -> list[str]:
        return self.splits["train"].classes

    def __enter__(self) -> "Training":
        """Start the epochs: the speed switches of lesson 8, then the header lines."""
        self.run.cost_meter, self.cost.earlier = self.cost, self.run.state.spent  # a stop's summary, last.pt
        try:
            self.apply_speed_switches()
            self.log_header()
        except BaseException:
            self.run.finish()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cost.close()  # the meters' threads end, however fit ends
        self.run.finish()  # the W&B run is closed and the run directory unlocked, however fit ends

    def apply_speed_switches(self) -> None:
        """--cudnn-benchmark, --cache-features, --profile and --nvtx (--channels-last is set in prepare)."""
        cfg = self.cfg
        set_cudnn_benchmark(cfg.cudnn_benchmark)
        if cfg.cache_features:  # the backbone runs once, here; every epoch trains the head on its output
            self.train_loader, self.val_loader = cached_feature_loaders(
                self.model, self.splits, self.sampler, cfg, self.device, self.dtype, self.rank, self.world_size,
                self.log)
        if cfg.profile:
            self.train_loader = ProfiledLoader(self.train_loader, self.out / cfg.profile, self.device, self.rank,
                                               self.log)
        if cfg.nvtx and not nvtx_available():
            self.log("notice: --nvtx: this PyTorch is a CPU-only build, without NVTX: no ranges are recorded")
        if cfg.nvtx and self.device.type == "cuda":  # for nsys profile --capture-range=cudaProfilerApi
            self.train_loader = NsysWindow(self.train_loader)

    def log_header(self) -> None:
        cfg, world_size = self.cfg, self.world_size
        total, trainable = count_parameters(self.model)
        self.log(f"run directory {self.out}")
        self.log(f"{cfg.arch}: {trainable:,} of {total:,} parameters train | {len(self.classes)} classes | "
                 f"{len(self.splits['train'])} train, {len(self.splits['valid'])} valid images | device "
                 f"{self.device} | precision {precision_name(self.dtype)}")
        self.log(f"processes {world_size} | batch per process {cfg.batch_size} | global batch "
                 f"{cfg.batch_size * world_size} | {lr_text(cfg, world_size)} | workers {cfg.workers} | {cfg.threads}")

    def set_lr(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The learning rate of this step, set in the optimizer (EpochSteps calls it before every step)."""
        return set_learning_rate(self.optimizer, learning_rate(self.cfg, self.world_size, epoch, step, steps_per_epoch))

    def conclude(self) -> dict:
        """The summary after the last epoch of this job; a run that did all its epochs scores best.pt on test/
        and writes summary.json."""
        if self.run.state.epoch < self.cfg.epochs:  # --stop-after: epochs remain, and best.pt may still change
            return {**self.run.summary(), "cost": self.cost.measure()}
        if "test" not in self.splits:
            self.log(f"notice: {self.cfg.data} has no test/ split with images: no test score, only valid/")
            return self.run.conclude({"cost": self.cost.measure()})
        test = self.test_score()
        return self.run.conclude({**test, "cost": self.cost.measure()})

    def test_score(self) -> dict:
        """best.pt evaluated once on test/, by the validation path: every image once, on any number of processes.
        The score is kept in best.pt, so a resume reuses it until a better epoch replaces the file."""
        path = self.out / "best.pt"
        best = on_rank0(lambda: read_checkpoint_file(path, ("model", "epoch")))
        kept = "test" in best
        if not kept:
            last = {k: v.clone() for k, v in trained_state(self.model).items()}
            load_state_into(self.model, best, path)
            scores = evaluate(self.model, eval_loader(self.cfg, self.splits["test"], self.rank, self.world_size),
                              self.dtype, self.device, self.cfg, dist.is_initialized())
            self.model.load_state_dict(last, strict=False)  # the last epoch's weights again
            best["test"] = {key.replace("val_", "test_"): value for key, value in scores.items()}
            on_rank0(lambda: save_checkpoint(path, best))
        test = best["test"]
        self.log(f"test: best.pt (epoch {best['epoch']}) on {test['test_samples']} test images: test_loss "
                 f"{test['test_loss']:.4f} test_acc {test['test_acc']:.4f} test_top5 {test['test_top5']:.4f}"
                 + (" (scored before, kept in best.pt)" if kept else ""))
        return test

    def end_epoch(self, record: dict, seconds: float) -> None:
        """Record the epoch (lesson 4 writes it) and print its line."""
        record["epoch_seconds"] = seconds
        record["wall_seconds"] = self.cost.spent()["wall_seconds"]  # since the run began, earlier jobs included
        if self.cfg.skip_bad_images:
            record["skipped_images"] = count_skipped(self.splits, self.device)
            self.log(f"skipped {record['skipped_images']} unreadable image(s) in epoch {record['epoch']} "
                     "(--skip-bad-images)")
        self.run.end_epoch(record)
        self.log(f"epoch {record['epoch']}/{self.cfg.epochs} train_loss {record['train_loss']:.4f} "
                 f"val_loss {record['val_loss']:.4f} val_acc {record['val_acc']:.4f} "
                 f"val_top5 {record['val_top5']:.4f} {record['images_per_sec']:.1f} img/s "
                 f"{record['epoch_seconds']:.1f}s")


def lr_text(cfg, processes: int) -> str:
    """The header's learning rate: the peak of the run, and how it came from --lr."""
    text = f"lr {scaled_lr(cfg.lr, cfg.lr_scaling, processes):g}"
    if cfg.lr_scaling != "none":
        factor = scaled_lr(1, cfg.lr_scaling, processes)
        text += f" (--lr {cfg.lr:g} x {factor:.3g}: {cfg.lr_scaling} rule for {processes} processes)"
    if cfg.warmup_epochs:
        text += f" after {cfg.warmup_epochs:g} epoch(s) of warm-up"
    return text


def check_sizes(cfg, world_size: int, train_size: int, val_size: int) -> None:
    if cfg.batch_size * world_size > train_size:
        raise UserError(f"--batch-size {cfg.batch_size} x {world_size} process(es) is larger than the "
                        f"{train_size} training images: use --batch-size {max(1, train_size // world_size)} or less")
    if world_size > val_size:
        raise UserError(f"{world_size} processes but only {val_size} validation images: "
                        "use fewer processes or a larger validation split")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def count_skipped(splits: dict, device: torch.device) -> int:
    """Unreadable images left out since the last call, over all ranks (--skip-bad-images)."""
    local = 0
    for dataset in splits.values():
        with dataset.skipped.get_lock():
            local, dataset.skipped.value = local + dataset.skipped.value, 0
    return int(sum_over_ranks(torch.tensor([float(local)], device=device)).item())


def run_config(cfg, world_size: int, device: torch.device, classes: list[str]) -> dict:
    """What config.json records: options, sizes, versions and host (never secrets)."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    return {
        "options": options,
        "num_classes": len(classes),
        "classes_digest": hash_classes(classes),
        "world_size": world_size,
        "global_batch_size": cfg.batch_size * world_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "visible_gpus": torch.cuda.device_count(),  # DataParallel uses them all (benchmark.py scaling)
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "cuda": torch.version.cuda},
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def summary_line(summary: dict) -> str:
    if "stopped" in summary:
        return f"stopped: {summary['stopped']}"
    test = (f"test_acc={summary['test_acc']:.4f} test_top5={summary['test_top5']:.4f} " if "test_acc" in summary
            else "")
    cost = summary.get("cost")
    used = (f"device_hours={cost['device_hours']:.3g} peak_mem_mb={peak_memory_mb(cost):.0f} " if cost else "")
    return (f"summary: epochs={summary.get('epoch', 0)}/{summary['epochs']} val_acc={summary.get('val_acc', float('nan')):.4f} "
            f"val_top5={summary.get('val_top5', float('nan')):.4f} best_val_acc={summary['best_val_acc']:.4f} {test}"
            f"images_per_sec={summary.get('images_per_sec', float('nan')):.1f} {used}run_dir={summary['run_dir']}")


def pick_device(requested: str = "auto", local_rank: int = 0, log=print) -> torch.device:
    """The device to train on: under DDP, the GPU of this process's local rank."""
    if requested == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            log("notice: no CUDA device found; training on the CPU")
            return torch.device("cpu")
        device = torch.device("cuda", local_rank if count > 1 else 0)
    elif not re.fullmatch(r"cpu|cuda(:[0-9]+)?", requested):  # mps, meta, xpu...: the course runs on neither
        raise UserError(f"--device {requested!r} is not one the course trains on: use auto, cpu, cuda or cuda:N")
    elif requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is visible here; use --device cpu or auto")
    else:
        device = torch.device(requested)
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible here")
        check_gpu_kernels(device.index or 0)
        if torch.version.hip:  # a ROCm build on AMD GPUs works like CUDA in PyTorch; the course tests it nowhere
            log(f"notice: ROCm build of PyTorch (HIP {torch.version.hip}) on an AMD GPU: the course's AMD paths "
                "are untested")
    return device


# %% [markdown]
# ### What a run cost
#
# `CostMeter` starts with `prepare` and is read at the end of the run (and when it
# stops), on every rank: its figures go into the summary, under `cost`, and for a run
# that did all its epochs into `summary.json`. A run stopped by a time-limit warning has
# no `summary.json` (lesson 4); its cost is in the summary `fit` returns.
#
# - `wall_seconds`: from `prepare` to the summary, in **this job** only (a resumed run
#   took several). `last.pt` carries the wall time and device-hours of the jobs so far
#   (`spent`, written with every checkpoint), so `jobs`, `total_wall_seconds` and
#   `total_device_hours` are the whole run's; a job killed without warning adds its time
#   up to its last checkpoint only. The other figures are this job's.
# - `devices` and `device_kind`: `gpu`, the GPUs of all ranks (one per rank; every visible
#   GPU with DataParallel), or `cpu cores`, the cores this process may use
#   (`available_cpus()`, the job's share) times the number of processes: the rule of one
#   node, where each rank has its own cores.
# - `device_hours`: devices x wall hours, what an allocation is charged in.
# - `peak_host_memory_mb` (MiB): the largest resident memory of a rank's main process
#   (`getrusage(RUSAGE_SELF)`; the DataLoader workers are processes of their own and
#   not counted); `peak_device_memory_mb`: what PyTorch allocated on the GPU at most
#   (`torch.cuda.max_memory_allocated`), `None` on the CPU. Both the maximum over ranks.
# - `energy_joules`: on a CPU, from the RAPL package counters of the node's sockets, read
#   by a thread every few seconds so that a counter wrapping around is counted right; on
#   a GPU, its power draw (NVML, through `torch.cuda.power_draw`) integrated over time,
#   summed over ranks. Where neither can be read (RAPL is readable only by root on
#   Linux 5.10 and later; NVML needs `pynvml`), it is `None`, never a guess, and
#   `energy_source` says why. RAPL counts the whole socket, other jobs' work on a shared
#   node included, so DDP on CPUs (ranks sharing a node's counters) does not measure it.
# - `cpu_utilisation`: how busy the cores allotted were, 0 to 1: `cpu_seconds` (the CPU time
#   of every rank and its DataLoader workers, user and system) over wall time x `cpu_cores`
#   (`available_cpus()` x processes), on CPU and GPU runs alike: `seff`'s CPU efficiency.
# - `gpu_utilisation`: the mean of NVML's utilisation (`torch.cuda.utilization`, sampled with
#   the power draw), 0 to 1, over the GPUs and ranks; `None` on CPUs or without NVML. It says
#   only that *some* kernel ran (lesson 8): a low value is an alarm, a high one no proof.

# %%
RAPL_COUNTERS = "/sys/class/powercap/intel-rapl:*/energy_uj"  # one package (socket) each: intel-rapl:0, intel-rapl:1
NOT_MEASURABLE = "not measurable here (no readable RAPL counter or NVML)"
POLL_SECONDS = 5.0  # RAPL wraps after max_energy_range_uj: minutes at full power, so read it more often than that


def rapl_counters() -> list[tuple[int, int]] | None:
    """(energy in microjoules, the value where it wraps to 0) of every CPU package; None where unreadable."""
    paths = [Path(p) for p in sorted(glob.glob(RAPL_COUNTERS)) if re.fullmatch(r"intel-rapl:\d+", Path(p).parent.name)]
    try:
        return [(int(p.read_text()), int(p.with_name("max_energy_range_uj").read_text())) for p in paths] or None
    except (OSError, ValueError):
        return None


def gpu_power_watts(device: torch.device) -> float | None:
    try:
        return torch.cuda.power_draw(device) / 1000  # milliwatts, from NVML (needs pynvml)
    except Exception:  # no pynvml, a GPU without power readings, a ROCm build without amdsmi
        return None


class Polled:
    """A meter that a thread of its own polls every `every` seconds until `done` is set (0: only when polled)."""

    def start_polling(self, every: float) -> None:
        self.lock, self.done = threading.Lock(), threading.Event()
        if every:
            threading.Thread(target=self.keep_polling, args=(every,), daemon=True, name=type(self).__name__).start()

    def keep_polling(self, every: float) -> None:
        while not self.done.wait(every):
            self.poll()

    def poll(self) -> None:
        raise NotImplementedError


class EnergyMeter(Polled):
    """Joules used since it started: the RAPL counters' increase on a CPU, the power draw of `devices` integrated
    on GPUs (none: not measured); a thread reads them every `every` seconds (0: only when polled)."""

    def __init__(self, devices: list[torch.device], every: float = POLL_SECONDS):
        self.devices = devices
        self.gpu = bool(devices) and devices[0].type == "cuda"
        self.last = self.reading()
        self.joules = 0.0 if self.last is not None else None
        self.start_polling(every if self.last is not None else 0)

    def reading(self):
        if not self.devices:
            return None
        if self.gpu:
            watts = [gpu_power_watts(device) for device in self.devices]
            return None if None in watts else (time.perf_counter(), sum(watts))
        return rapl_counters()

    def poll(self) -> None:
        with self.lock:
            if self.joules is None:
                return
            now = self.reading()
            if now is None or not self.gpu and len(now) != len(self.last):
                self.joules = None  # unreadable now: a partial sum would be a guess
            elif self.gpu:
                (before, w0), (after, w1) = self.last, now
                self.joules += (w0 + w1) / 2 * (after - before)  # trapezoids
            else:
                self.joules += sum(uj - old + (wrap if uj < old else 0)
                                   for (uj, wrap), (old, _) in zip(now, self.last)) / 1e6
            self.last = now

    def stop(self) -> tuple[float | None, str]:
        """The joules so far (None where not measurable), and where they come from."""
        self.done.set()
        self.poll()
        if self.joules is None:
            return None, NOT_MEASURABLE
        if self.gpu:
            return self.joules, f"GPU power draw (NVML) sampled every {POLL_SECONDS:g} s, summed over ranks"
        return self.joules, "RAPL package counters (the whole CPU sockets, other processes on the node included)"


def gpu_utilisation_percent(device: torch.device) -> float | None:
    try:
        return float(torch.cuda.utilization(device))  # NVML's "GPU-Util", the share of time a kernel ran
    except Exception:  # no pynvml, or a GPU without the reading
        return None


class GpuUseMeter(Polled):
    """The mean utilisation (0 to 1) of `gpus`, sampled every `every` seconds; None where not readable."""

    def __init__(self, gpus: list[torch.device], every: float = POLL_SECONDS):
        self.gpus, self.samples = gpus, []
        self.readable = bool(gpus) and self.sample()
        self.start_polling(every if self.readable else 0)

    def sample(self) -> bool:
        percents = [gpu_utilisation_percent(gpu) for gpu in self.gpus]
        if None in percents:
            return False
        self.samples.append(sum(percents) / len(percents) / 100)
        return True

    def poll(self) -> None:
        with self.lock:
            self.readable = self.readable and self.sample()

    def stop(self) -> float | None:
        self.done.set()
        self.poll()
        return sum(self.samples) / len(self.samples) if self.readable else None


def process_cpu_seconds() -> float:
    """CPU time (user and system) of this process, of its children that ended, and of those still running (the
    DataLoader's persistent workers: read from Linux's /proc; elsewhere they count once they end)."""
    seconds = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            pass  # it just ended (counted with RUSAGE_CHILDREN once reaped), or no /proc here
    return seconds


class CostMeter:
    """What a run uses from its start: wall time, devices, peak memory and energy (the cost in the summary)."""

    def __init__(self, cfg, world_size: int, device: torch.device):
        self.started, self.world_size, self.device = time.perf_counter(), world_size, device
        visible = torch.cuda.device_count() if device.type == "cuda" else 0
        # This process's GPUs: every visible one with DataParallel (wrap_model), else its own.
        self.gpus = ([torch.device("cuda", i) for i in range(visible)] if cfg.data_parallel and world_size == 1
                     and visible > 1 else [device] if visible else [])
        if self.gpus:
            self.devices, self.kind = world_size * len(self.gpus), "gpu"
        else:
            self.devices, self.kind = available_cpus() * world_size, "cpu cores"
        # Under DDP on CPUs the ranks share a node's RAPL counters: not measured.
        self.energy = EnergyMeter(self.gpus or ([device] if world_size == 1 else []))
        self.gpu_use = GpuUseMeter(self.gpus)
        self.cores, self.cpu_started = available_cpus() * world_size, process_cpu_seconds()
        self.earlier: dict | None = None  # spent() of the jobs before this one, from last.pt (a resumed run)

    def close(self) -> None:
        self.energy.done.set()
        self.gpu_use.done.set()

    def spent(self, wall: float | None = None) -> dict:
        """Wall time and device-hours of this job so far plus the jobs before it: last.pt keeps it for the next."""
        wall = time.perf_counter() - self.started if wall is None else wall
        before = self.earlier or {"wall_seconds": 0.0, "device_hours": 0.0, "jobs": 0}
        return {"wall_seconds": before["wall_seconds"] + wall,
                "device_hours": before["device_hours"] + self.devices * wall / 3600, "jobs": before["jobs"] + 1}

    def measure(self) -> dict:
        """The cost so far; every rank calls it (two small all-reduces under DDP), rank 0's is the run's."""
        wall = time.perf_counter() - self.started
        joules, source = self.energy.stop()
        gpu_use = self.gpu_use.stop()
        cpu_seconds = process_cpu_seconds() - self.cpu_started
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        gpu = max((torch.cuda.max_memory_allocated(d) / 2**20 for d in self.gpus), default=None)
        if dist.is_initialized():
            peaks = torch.tensor([host, gpu or 0.0], dtype=torch.float64, device=self.device)
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            host, gpu = peaks[0].item(), (peaks[1].item() if gpu is not None else None)
            # Summed over ranks; a rank without a reading voids the energy (each rank measured its own GPU on
            # GPUs, none on CPUs) and the GPU utilisation (their mean).
            sums = torch.tensor([cpu_seconds, joules or 0.0, joules is None, gpu_use or 0.0, gpu_use is None],
                                dtype=torch.float64, device=self.device)
            sum_over_ranks(sums)
            cpu_seconds = sums[0].item()
            if self.device.type == "cuda":
                joules, source = (sums[1].item(), source) if sums[2] == 0 else (None, NOT_MEASURABLE)
            gpu_use = sums[3].item() / self.world_size if sums[4] == 0 else None
        total = self.spent(wall)
        return {"wall_seconds": wall, "devices": self.devices, "device_kind": self.kind,
                "device_hours": self.devices * wall / 3600, "peak_host_memory_mb": host, "peak_device_memory_mb": gpu,
                "energy_joules": joules, "energy_source": source, "cpu_cores": self.cores, "cpu_seconds": cpu_seconds,
                "cpu_utilisation": cpu_seconds / (wall * self.cores), "gpu_utilisation": gpu_use,
                "jobs": total["jobs"], "total_wall_seconds": total["wall_seconds"],
                "total_device_hours": total["device_hours"]}


def peak_memory_mb(cost: dict) -> float:
    """The summary line's peak_mem_mb: the GPU's on a GPU, the host's on CPUs."""
    gpu = cost.get("peak_device_memory_mb")
    return gpu if gpu is not None else cost["peak_host_memory_mb"]


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


# %% [markdown]
# ### Launchers: who am I?
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
# them as `scontrol show hostnames` would. Under `torchrun` even a single process joins a
# process group (of one): DDP with its overhead, and on one GPU the cheapest check that
# nccl works. A job step of one task (`srun python train.py`, `srun --ntasks=1` in a sweep)
# is a plain process: several such steps run side by side in one job, and as process
# groups they would all try to meet on the job's one port.

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


def step_nodelist(env) -> str:
    """The nodes of this job step (rank 0 runs on the first), else of the whole job."""
    return env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"


def port_for_job(job_id: str) -> int:
    """A port in 20000-39999 that differs between jobs."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def detect_launch(env=os.environ) -> Launch:
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any env:// launcher)
        return Launch("torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and step_tasks > 1:  # a task of an srun job step
        return Launch("srun", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                      step_tasks, env.get("MASTER_ADDR") or first_host(step_nodelist(env)),
                      int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0"))))
    return Launch("python", 0, 0, 1)


def lost_contact(error: RuntimeError) -> bool:
    """A collective failed because a peer died or timed out (gloo and nccl say it differently)."""
    return isinstance(error, dist.DistError) or any(
        word in str(error) for word in ("gloo", "NCCL", "Connection", "Timed out", "timed out"))


# %% [markdown]
# ### Joining the process group, and the script
#
# `nccl` moves gradients GPU to GPU (NVLink, InfiniBand); `gloo` does the same on CPUs,
# which is how the notebooks and the tests run DDP on a laptop. Collectives get a
# **timeout**: if one rank dies, the others stop waiting after `--dist-timeout` seconds
# and exit with an error, instead of idling on their GPUs until the job's time limit.
# With nccl that takes NCCL's asynchronous error handling
# (`TORCH_NCCL_ASYNC_ERROR_HANDLING=1`: a watchdog thread ends the process when a
# collective fails or times out); torchrun sets it for its processes, and so does this
# script (and `slurm/env.sh`) for the ranks `srun` starts. To see *why* NCCL failed, run
# with `NCCL_DEBUG=WARN` (problems only) or `NCCL_DEBUG=INFO` (also the network and GPUs
# it chose). Rank failures are tested on CPUs with gloo (`tests/test_resilience.py`); no
# test here has a GPU to show the nccl path.
#
# Every rank prints one line saying who and where it is (host, process id, and the CPUs
# it may use: fewer than its job asked per task means the launcher lost them, see
# `slurm/env.sh`), the first thing to look at when a multi-node job misbehaves.

# %%
def start_processes(cfg) -> tuple[bool, torch.device]:
    """Join the process group when srun or torchrun started this process; (ddp, device)."""
    launch = detect_launch()
    ddp = launch.launcher != "python"
    device = pick_device(cfg.device, launch.local_rank, log=print if launch.rank == 0 else lambda *a: None)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail fast on an NCCL error or timeout
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=cfg.dist_timeout))
        # One write per line: with several ranks on one terminal, print's two writes can interleave.
        sys.stdout.write(f"rank {launch.rank}/{launch.world_size} local_rank {launch.local_rank} host "
                         f"{socket.gethostname()} pid {os.getpid()} cpus {len(os.sched_getaffinity(0))} device "
                         f"{device} launcher {launch.launcher} backend {dist.get_backend()}\n")
        sys.stdout.flush()
    return ddp, device


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest().install()  # first: a time-limit warning may come at any moment (lesson 4)
    cfg = parse_args(argv)
    ddp, device = start_processes(cfg)
    try:
        summary = fit(cfg, device, stop)
        if is_rank0():
            print(summary_line(summary), flush=True)
    except RuntimeError as error:
        if ddp and lost_contact(error):  # a peer died: one line per surviving rank
            cause = str(error).strip().splitlines()[0][:300]
            print(f"error: rank {dist.get_rank()} of {dist.get_world_size()} lost contact with another rank "
                  f"({cause}): the first error in the other ranks' logs is the cause", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        if ddp:
            dist.destroy_process_group()
    return 0


# %% [markdown]
# ### The options
#
# One parser serves the script, the notebooks and `benchmark.py` (which adds its own
# options to it). `--help` shows them in groups, each with its default.

# %%
MAX_SEED = 2**32 - 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a ResNet on the birds dataset: on one device, with "
                                "DataParallel (--data-parallel), or with DDP when started by srun or torchrun.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=Path(os.environ.get("BIRDS_DATA", "data/birds")),
                   help="dataset directory with train/ and valid/ (env BIRDS_DATA)")
    g.add_argument("--image-size", type=int, default=224, help="images are resized to this square size")
    g.add_argument("--augment", action="store_true", help="random crops and flips for training")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes (default: SLURM_CPUS_PER_TASK in a job, else the CPUs available, at most 8)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out and count them (default: stop and name the file)")
    g.add_argument("--no-shuffle", action="store_true",
                   help="keep the data order fixed (to compare single-device and parallel runs)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet152", choices=list(ARCHITECTURES), help="ResNet depth")
    g.add_argument("--weights", default="imagenet", help="imagenet, none, or a local weights file")
    g.add_argument("--finetune", action="store_true", help="train every layer, not only the head")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--batch-size", type=int, default=64, help="images per step and per process")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (cosine schedule), for the --batch-size of one process")
    g.add_argument("--lr-scaling", default="none", metavar="{" + ",".join(LR_SCALING) + "}",
                   help="scale --lr to the global batch of W processes: linear x W (SGD), sqrt x sqrt(W) (Adam-type)")
    g.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="raise the lr linearly, step by step, over the first N epochs (0: none; at most --epochs)")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"],
                   help="adam is the original workshop's (weight decay added to the gradient)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}: the initial head, the data order, every random draw")
    g.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("parallel (lessons 6 and 7)")
    g.add_argument("--data-parallel", action="store_true",
                   help="nn.DataParallel over every visible GPU; --batch-size is then the global batch")
    g.add_argument("--sync-bn", action="store_true",
                   help="DDP: SyncBatchNorm, BatchNorm statistics over the global batch (GPUs only)")
    g.add_argument("--fsdp", action="store_true",
                   help="DDP's processes, but each keeps 1/W of the parameters, gradients and optimizer state "
                        "(fully sharded data parallel; needs every layer to train: --finetune)")
    g.add_argument("--dist-timeout", type=float, default=600,
                   help="DDP: seconds a collective waits for a missing rank before failing")
    g = p.add_argument_group("speed (lesson 8)")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 (or fp16) on CUDA, bf16 on CPUs with AMX, else off")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms once per input shape and keep the fastest (CUDA)")
    g.add_argument("--cache-features", action="store_true",
                   help="frozen backbone, no --augment: compute its features once, then train the head on them")
    g.add_argument("--gpu-decode", action="store_true", help="decode the JPEGs on the GPU (ignored without CUDA)")
    g.add_argument("--profile", nargs="?", const="profile", default=None, metavar="DIR",
                   help="write a torch.profiler trace of training steps 2-5 to DIR (relative: in the run directory)")
    g.add_argument("--nvtx", action="store_true",
                   help="NVTX ranges around the phases of every training step, and (CUDA) the --profile steps "
                        "marked for nsys profile --capture-range=cudaProfilerApi (slurm/env.sh: COURSE_NSYS=1)")
    g = p.add_argument_group("run directory and resilience (lesson 4)")
    g.add_argument("--out", type=Path, default=None, help="run directory (default runs/<job id or time>-<arch>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt when it exists; it may change --epochs, --lr, --lr-scaling, "
                        "--warmup-epochs, --weight-decay, --image-size, --max-steps and --amp (and, at an epoch's "
                        "end, --batch-size, --augment, --no-shuffle and the number of processes)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its config.json, metrics.jsonl, last.pt, best.pt, summary.json)")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs in this job; a later --resume continues (0: run all)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=0, help="log a line every N steps in batch jobs (0: 4 per epoch)")
    g.add_argument("--wandb", default="off", choices=["off", "offline", "online"], help="Weights & Biases logging")
    g.add_argument("--wandb-project", default="birds-hpc-course")
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    cfg = (parser or build_parser()).parse_args(argv)
    checks = {"--epochs": cfg.epochs >= 1, "--batch-size": cfg.batch_size >= 1,
              "--lr": math.isfinite(cfg.lr) and cfg.lr > 0,  # nan > 0 is False; inf would train to NaN
              "--weight-decay": math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
              "--seed": 0 <= cfg.seed <= MAX_SEED, "--image-size": cfg.image_size >= 16,
              "--workers": cfg.workers is None or cfg.workers >= 0,
              "--max-steps": cfg.max_steps >= 0, "--stop-after": cfg.stop_after >= 0,
              "--warmup-epochs": math.isfinite(cfg.warmup_epochs) and 0 <= cfg.warmup_epochs <= cfg.epochs,
              "--dist-timeout": math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0}
    for option, ok in checks.items():
        if not ok:
            value = getattr(cfg, option[2:].replace("-", "_"))
            raise UserError(f"{option} {f'{value:g}' if isinstance(value, float) else value} is out of range: "
                            "see --help")
    if cfg.lr_scaling not in LR_SCALING:
        raise UserError(f"--lr-scaling {cfg.lr_scaling!r} is not one of {', '.join(LR_SCALING)}: see --help")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    conflicts = {("cache_features", "finetune"): "--cache-features needs a frozen backbone: drop --finetune",
                 ("cache_features", "augment"): "--cache-features computes each image's features once, "
                                                "so random augmentation cannot work: drop --augment",
                 ("gpu_decode", "augment"): "--gpu-decode does not augment: drop --augment or --gpu-decode",
                 ("fsdp", "data_parallel"): "--fsdp and --data-parallel are two ways to use several GPUs: choose one"}
    for (option, other), message in conflicts.items():
        if getattr(cfg, option) and getattr(cfg, other):
            raise UserError(message)
    if cfg.fsdp and not cfg.finetune and cfg.weights != "none":
        raise UserError("--fsdp shards what trains, and a frozen backbone leaves only the head's gradients and "
                        "optimizer state, which DDP holds easily: add --finetune, or drop --fsdp")
    if cfg.fsdp and detect_launch().launcher == "python":
        raise UserError("--fsdp shares the model out between processes: start them with torchrun or srun (lesson 7)")
    if cfg.cache_features and cfg.weights == "none":
        raise UserError("--cache-features needs a frozen pretrained backbone, and with --weights none every layer trains")
    if cfg.workers is None:
        cfg.workers = default_num_workers()
    return cfg


def capped_workers(workers: int, log=print) -> int:
    """More loader processes than CPUs only make them queue for the CPUs (and can exhaust memory)."""
    cpus = available_cpus()
    if workers > cpus:
        log(f"notice: --workers {workers} is more than the {cpus} CPU(s) available: using {cpus}")
        return cpus
    return workers


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)
