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
# # 9. Performance: how close to the hardware's limit?
#
# The previous lessons made training correct, parallel and fast by one flag each. This one
# measures them, one at a time, on your hardware, with numbers that know their own noise.
#
# **You will learn to:**
# - time a training step honestly: warm-up, synchronise, repeat, and read the spread;
# - tell an input-bound run from a compute-bound one (the model-only **ceiling**);
# - read the **ladder**: the original workshop's configuration, then one optimisation per row;
# - compare scaling runs only when they did the same work, and weigh speed-up against device-hours;
# - read a profiler's timeline: a data-starved step, a synchronisation, communication overlapping backward.
#
# **Time:** about 30 minutes. Core: everything up to the exercises but the sections
# marked optional (the profiler, the timeline, scaling).
#
# For any configuration we measure three numbers, in images per second: **the input
# pipeline alone** (the `DataLoader` and the copy to the device, no model); **the model
# alone**, fed one batch already on the device, over and over: nothing can be faster, it
# is the **ceiling**; and **end to end**, the real training loop of `train.py` fed by the
# real loader. End to end far below the ceiling: the device waits for data, fix the input
# pipeline. Close to it: the model step itself must get cheaper.
#
# This notebook is also `scripts/benchmark.py`:
#
# ```bash
# python scripts/benchmark.py ladder --data data/birds --arch resnet152      # the whole ladder
# python scripts/benchmark.py run --data data/birds --channels-last --amp bf16   # one configuration
# python scripts/benchmark.py scaling --single runs/1 --ddp runs/ddp4 --plot scaling.png
# python scripts/benchmark.py allreduce --arch resnet152 --processes 1 2 3     # what DDP sends per step
# python scripts/benchmark.py wholerun --data data/birds --cache-features --amp bf16   # whole runs vs the original
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# arch = "resnet18"
# image_size = 64
# batch_size = 16
# images = 64  # training images every row uses
# warmup = 1  # untimed steps before each measurement
# steps = 3  # timed steps per repeat
# repeats = 3  # each figure: the median of this many repeats, with their min and max
# out_dir = "../runs/notebook-benchmark"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %% jupyter={"source_hidden": true}
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import RandomSampler, Subset

import speed
import sweep
import train
from data import (ShardSampler, UserError, atomic_write, available_cpus, load_splits, make_loader, run_cli,
                  set_compute_threads)
from model import ARCHITECTURES, BirdClassifier, build_model, load_backbone_weights
from resilience import ResumableSampler, check_run_dir_is_free, write_json

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Measuring honestly
#
# Three rules make a number mean something: **warm-up steps are not timed** (the first
# steps start worker processes, choose convolution algorithms, allocate memory, compile);
# **the device is synchronised before the clock is read** (CUDA runs asynchronously:
# without `torch.cuda.synchronize()` we would time how fast Python *queues* work); and
# **every figure is repeated**: we keep the median, and the min and max show the noise.

# %%
@dataclass(frozen=True)
class Spread:
    """One figure over the repeats of a measurement (images/s unless it says otherwise): min, median, max."""
    min: float
    median: float
    max: float

    def __str__(self) -> str:
        return self.text("img/s")

    def text(self, unit: str, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} {unit} (min {self.min:.{digits}f}, max {self.max:.{digits}f})"

    def overlaps(self, other: "Spread") -> bool:
        """Whether the two ranges share a value: this measurement cannot tell them apart."""
        return self.min <= other.max and other.min <= self.max

    @classmethod
    def of(cls, rates: list[float]) -> "Spread":
        return cls(min(rates), statistics.median(rates), max(rates))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread_of(measure, cfg) -> Spread:
    """`measure(steps)` returns images/s: once untimed (warm-up), then `cfg.repeats` times."""
    if cfg.warmup:
        measure(cfg.warmup)
    return Spread.of([measure(cfg.steps) for _ in range(cfg.repeats)])

# %% [markdown]
# Try the rules on the smallest thing there is: a ResNet-18 forward pass on one random batch.

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# probe_model = torchvision.models.resnet18(num_classes=10).eval()
# probe_batch = torch.randn(8, 3, 64, 64)
#
#
# def forward_rate(steps: int) -> float:
#     started = time.perf_counter()
#     with torch.inference_mode():
#         for _ in range(steps):
#             probe_model(probe_batch)
#     return steps * len(probe_batch) / (time.perf_counter() - started)
#
#
# print("forward pass:", spread_of(forward_rate, argparse.Namespace(warmup=1, steps=3, repeats=5)))

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at the min and the max: the same work, timed five times, on a machine that also
# runs other programs. Two configurations whose ranges overlap cannot be told apart by
# this measurement, however different their medians look: the benchmark marks them
# **within noise** instead of calling one faster. Run the cell again: the numbers move.
#
# ## Three numbers per configuration
#
# The end-to-end and model-only figures both run `train.train_one_epoch`, the training
# loop of `train.py`, on a "loader" of a few steps: the benchmark has no loop of its own
# to drift away from the real one. Only the source of the batches differs.

# %%
def loader_rate(stream, cfg, rt) -> Spread:
    """The input pipeline alone: batches from the loader, moved to the device."""
    def measure(steps: int) -> float:
        started, seen = time.perf_counter(), 0
        for images, labels in itertools.islice(stream, steps):
            train.to_device(images, labels, rt.device, cfg.channels_last)
            seen += len(labels)
        synchronize(rt.device)
        return seen / (time.perf_counter() - started)
    return spread_of(measure, cfg)


def train_rate(setup, stream, cfg, rt) -> Spread:
    """Training steps of train.train_one_epoch on batches from the stream (end to end)."""
    return spread_of(lambda steps: timed_epoch(setup, Window(stream, steps), cfg, rt), cfg)


def on_device(stream, cfg, rt):
    """One batch from the stream, already on the device, for ever: fed to train_rate, the ceiling."""
    return itertools.repeat(train.to_device(*next(stream), rt.device, cfg.channels_last))

# %% jupyter={"source_hidden": true}
@dataclass
class BenchmarkRuntime:
    """Where the benchmark runs: one process on one device."""
    device: torch.device


class Window:
    """The next `steps` batches of a stream: what train_one_epoch sees as a short epoch."""

    def __init__(self, stream, steps: int):
        self.stream, self.steps = stream, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(self.stream, self.steps)


def endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def timed_epoch(setup, loader, cfg, rt, epoch: int = 0) -> float:
    """Images/s of train.train_one_epoch over the loader, without progress bar or log lines."""
    steps = train.EpochSteps(epoch, len(loader), rt.device, cfg, log=lambda *args: None, bar=False)
    train.train_one_epoch(setup.train_model, loader, setup.optimizer, setup.scaler, setup.dtype, rt.device, cfg,
                          steps)
    return steps.stats()["images_per_sec"]

# %% [markdown] slideshow={"slide_type": "subslide"}
# ### One configuration (collapsed: the options and the set-up)
#
# A configuration is every option of `train.py` plus three switches that bring back what
# the original did: `--no-normalize`, `--train-mode-backbone` and `--original-loader`.
# The weights are random: the speed does not depend on their values.

# %% jupyter={"source_hidden": true}
COMMANDS = {
    "run": "Measure one configuration: input pipeline, model-only ceiling and end-to-end training.",
    "ladder": "Measure the original configuration, then each optimisation added one at a time.",
    "scaling": "Throughput, speed-up and efficiency of single-device, independent, DP and DDP runs.",
    "allreduce": "What DDP all-reduces per step (frozen and fine-tuned), its buckets, and what that costs a step.",
    "wholerun": "Whole train.py runs, process start to exit: the original configuration against the options given.",
    "train": "train.py with the original's switches (--no-normalize, --train-mode-backbone, --original-loader).",
}
ORIGINAL_WORKERS = 12  # per GPU in the original's batch files (8 with pinned memory under DDP)
ORIGINAL_LOADER = {"pin_memory": False, "prefetch_factor": 2, "persistent_workers": False}  # and drop_last in training


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = train.build_parser()
    parser.prog = f"benchmark.py {command}"
    parser.description = COMMANDS[command]
    parser.set_defaults(weights="random", epochs=4, out=None)
    for action in parser._actions:  # the speed does not depend on the weights' values
        if action.dest == "weights":
            action.help = "random (frozen unless --finetune), imagenet, none (every layer trains) or a weights file"
    group = parser.add_argument_group("benchmark")
    group.add_argument("--images", type=int, default=256, help="training images used, the same for every row")
    group.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    group.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    group.add_argument("--repeats", type=int, default=5, help="each figure: the median of this many repeats, with min and max")
    group.add_argument("--no-normalize", dest="normalize", action="store_false", help="ToTensor() only (original)%(default).0s")
    group.add_argument("--train-mode-backbone", dest="backbone_eval", action="store_false",
                       help="model.train() also on the frozen backbone (original)%(default).0s")
    group.add_argument("--original-loader", action="store_true",
                       help=f"the original's DataLoader: {ORIGINAL_WORKERS} workers (capped to the CPUs), no pinning, "
                            "drop_last%(default).0s")
    group.add_argument("--skip", nargs="+", default=[], metavar="ROW", help="ladder rows to leave out")
    group.add_argument("--json", type=Path, default=None, help="where to write the results (default <out>/<command>.json)%(default).0s")
    return parser


def parse_config(command: str, argv: list[str]) -> argparse.Namespace:
    cfg = train.parse_args(argv, build_parser(command))
    for option, least in {"images": 1, "steps": 1, "repeats": 1, "warmup": 0}.items():
        if getattr(cfg, option) < least:
            raise UserError(f"--{option} {getattr(cfg, option)} is out of range: give {least} or more")
    if cfg.profile:
        raise UserError("benchmark.py does not profile: run train.py --profile with the same options")
    cfg.out = cfg.out or Path("runs/benchmark")
    cfg.log_every, cfg.max_steps = 10**9, 0  # the timed loops print nothing and run the whole window
    return cfg


def benchmark_images(cfg, rt) -> Subset:
    """The same `--images` training images, picked at random with the seed, for every row."""
    gpu_decode = cfg.gpu_decode and rt.device.type == "cuda"
    split = load_splits(cfg.data, cfg.image_size, augment=cfg.augment, normalize=cfg.normalize,
                        splits=("train",), gpu_decode=gpu_decode)["train"]
    if min(cfg.images, len(split)) < cfg.batch_size:
        raise UserError(f"--images {cfg.images} (of {len(split)} training images) is less than one batch "
                        f"of --batch-size {cfg.batch_size}")
    picked = torch.randperm(len(split), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.images]
    images = Subset(split, picked.tolist())
    images.collate_fn = split.collate_fn  # make_loader looks for it: JPEG bytes decoded on the device
    return images


def benchmark_loader(images: Subset, cfg):
    order = RandomSampler(images, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.original_loader:  # DataLoader(dataset, batch_size, shuffle=True, num_workers=12, drop_last=True)
        return make_loader(images, cfg.batch_size, min(ORIGINAL_WORKERS, available_cpus()), sampler=order,
                           drop_last=True, **ORIGINAL_LOADER)
    return make_loader(images, cfg.batch_size, cfg.workers, sampler=order, drop_last=True)


@dataclass
class Setup:
    model: BirdClassifier
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None


def build_setup(cfg, rt, num_classes: int) -> Setup:
    """Model, optimizer and precision as train.fit builds them, with the original's switches."""
    torch.manual_seed(cfg.seed)
    model = BirdClassifier(cfg.arch, num_classes, freeze_backbone=not cfg.finetune and cfg.weights != "none")
    if cfg.weights not in ("random", "none"):
        load_backbone_weights(model.backbone, cfg.arch, cfg.weights)
    model.backbone_eval_when_frozen = cfg.backbone_eval
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = train.pick_precision(cfg.amp, rt.device)
    train.set_cudnn_benchmark(cfg.cudnn_benchmark)
    return Setup(model, torch.compile(model) if cfg.compile else model, train.build_optimizer(cfg, model),
                 torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16), dtype)

# %% jupyter={"source_hidden": true}
def cached_rates(setup, images, stream, cfg, rt) -> tuple[Spread, Spread]:
    """(end-to-end, ceiling) images/s of a whole --epochs run with cached features.

    The work is not the same in every step (one pass of the backbone over the images, then
    the head for every epoch), so this row times the whole run: the training images of all
    epochs divided by the total time. Its ceiling is the same run with the images on the device.
    """
    model, batch = setup.model, next(on_device(stream, cfg, rt))[0]

    def backbone(steps: int) -> float:
        model.eval()
        started = time.perf_counter()
        with torch.no_grad(), train.autocast(rt.device, setup.dtype):
            for _ in range(steps):
                model.backbone(batch)
        synchronize(rt.device)
        return steps * len(batch) / (time.perf_counter() - started)

    with torch.no_grad(), train.autocast(rt.device, setup.dtype):
        features = model.backbone(batch).float()
    head = train_rate(setup, itertools.repeat((features, next(stream)[1])), cfg, rt)
    body = spread_of(backbone, cfg)
    total = cfg.epochs * len(images)
    ceiling = Spread(*(total / (len(images) / b + total / h)
                       for b, h in [(body.min, head.min), (body.median, head.median), (body.max, head.max)]))

    one_pass = copy.copy(cfg)  # the pass over the images uses the row's loader settings
    one_pass.workers = min(ORIGINAL_WORKERS, available_cpus()) if cfg.original_loader else cfg.workers

    def whole_run(_steps: int) -> float:
        started = time.perf_counter()
        cached = speed.backbone_features(model, images, ShardSampler(len(images)), one_pass, rt.device, setup.dtype)
        loader = make_loader(cached, cfg.batch_size, 0, drop_last=True,
                             sampler=RandomSampler(cached, generator=torch.Generator().manual_seed(cfg.seed)))
        for epoch in range(cfg.epochs):
            timed_epoch(setup, loader, cfg, rt, epoch)
        synchronize(rt.device)
        return total / (time.perf_counter() - started)
    return Spread.of([whole_run(0) for _ in range(cfg.repeats)]), ceiling


def measure(cfg, rt, ceilings: dict | None = None) -> dict[str, Spread]:
    """The three figures of one configuration; `ceilings` reuses a model-only figure."""
    ceilings = {} if ceilings is None else ceilings
    images = benchmark_images(cfg, rt)
    setup = build_setup(cfg, rt, len(images.dataset.classes))
    loader = benchmark_loader(images, cfg)
    stream = endless(loader)
    try:
        result = {"loader": loader_rate(stream, cfg, rt)}
        if cfg.cache_features:
            result["train"], result["model"] = cached_rates(setup, images, stream, cfg, rt)
            return result
        key = tuple(getattr(cfg, k) for k in ("arch", "image_size", "batch_size", "finetune", "backbone_eval",
                                               "channels_last", "amp", "compile", "cudnn_benchmark"))
        if key not in ceilings:
            ceilings[key] = train_rate(setup, on_device(stream, cfg, rt), cfg, rt)
        result["model"] = ceilings[key]
        result["train"] = train_rate(setup, stream, cfg, rt)
        return result
    finally:
        stream.close()  # stops the loader's worker processes
        del stream, loader, setup
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def probe_step_rate(cfg, rt) -> float:
    """Model-only images/s from one timed step after one warm-up step: a quick look."""
    quick = copy.copy(cfg)
    quick.warmup, quick.steps, quick.repeats = 1, 1, 1
    images = benchmark_images(quick, rt)
    setup = build_setup(quick, rt, len(images.dataset.classes))
    stream = endless(benchmark_loader(images, quick))
    try:
        return train_rate(setup, on_device(stream, quick, rt), quick, rt).median
    finally:
        stream.close()

# %% [markdown] slideshow={"slide_type": "slide"}
# ## The ladder
#
# The ladder starts from the original workshop's configuration, as its batch files ran it
# (fp32, `ToTensor()` only, `model.train()` on the frozen backbone, Adam, 12 loader
# workers capped to the CPUs, no pinned memory), then adds one change per row, on the same
# images, in one process: `normalise+eval` (correctness first), `loader` (the course's
# loader), then the switches of lesson 8, whose table says why each can help and when it
# does not. Each row changes the last row that was **kept**. With `--finetune` two rows
# follow with every layer training. Every row times training steps only: the original's
# validation (with autograd on) is not part of the ladder.

# %%
ORIGINAL = {"normalize": False, "backbone_eval": False, "original_loader": True, "channels_last": False,
            "amp": "off", "compile": False, "cache_features": False, "gpu_decode": False, "optimizer": "adam",
            "cudnn_benchmark": False}


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    changes: dict


LADDER = [
    Step("original", "fp32, ToTensor only, model.train() on the frozen backbone, Adam, 12 workers", ORIGINAL),
    Step("normalise+eval", "ImageNet normalisation; frozen backbone in eval mode", {"normalize": True, "backbone_eval": True}),
    Step("loader", "workers from the allocation, pinned memory, persistent workers, prefetch", {"original_loader": False}),
    Step("cudnn-benchmark", "cuDNN times its convolution algorithms and keeps the fastest", {"cudnn_benchmark": True}),
    Step("channels_last", "NHWC memory format", {"channels_last": True}),
    Step("amp", "mixed precision (bf16; fp16 and a gradient scaler on GPUs without bf16)", {"amp": "auto"}),
    Step("compile", "torch.compile", {"compile": True}),
    Step("cache", "backbone features computed once, the head trained on them", {"cache_features": True}),
    Step("gpu-decode", "JPEGs decoded on the GPU", {"gpu_decode": True}),
]

# %% [markdown]
# A row is **kept** only when it is faster beyond the noise: its slowest repeat beats the
# kept row's fastest. End to end cannot beat its own ceiling: a row whose end to end is
# above its ceiling beyond both spreads shows a measurement noisier than its differences,
# and is not kept; above it by less than the spreads, the loader costs nothing measurable
# (end to end *at* its ceiling), and the row is judged against the kept row as usual.

# %% slideshow={"slide_type": "subslide"}
def judge(row: dict, kept: dict | None) -> tuple[bool, str]:
    """(kept, note) for a measured row against the last kept row."""
    train_ips, ceiling = Spread(**row["spread"]["train"]), Spread(**row["spread"]["model"])
    if train_ips.min > ceiling.max:
        return False, "within noise: end to end above its own ceiling"
    at_ceiling = "end to end at its ceiling (within the spreads)" if train_ips.median > ceiling.median else ""
    if kept is None:
        return True, at_ceiling
    before = Spread(**kept["spread"]["train"])
    if train_ips.overlaps(before):
        return False, f"within noise of {kept['row']}"
    if train_ips.median < before.median:
        return False, "slower end to end: not kept"
    return True, at_ceiling

# %% jupyter={"source_hidden": true}
ALWAYS_KEPT = {"original", "normalise+eval"}  # the baseline, and correctness
SLOW = 3.0  # a change whose quick probe is this many times slower is not measured further


def why_skipped(step: Step, cfg, rt, base) -> str | None:
    cuda = rt.device.type == "cuda"
    if step.name in cfg.skip:
        return "skipped (--skip)"
    if step.name in ("cudnn-benchmark", "gpu-decode") and not cuda:
        return "skipped: needs CUDA"
    if step.name == "compile" and not cuda and not cfg.compile:
        return "skipped on CPU unless asked (compiling costs 20 s to minutes there): add --compile"
    if step.name == "cache" and base.augment:
        return "skipped: invalid with --augment"
    if step.name == "gpu-decode" and base.augment:
        return "skipped: --gpu-decode does not augment"
    return None


def row_config(base, changes: dict, rt) -> argparse.Namespace:
    cfg = copy.copy(base)
    for key, value in changes.items():
        setattr(cfg, key, value)
    if cfg.amp == "auto" and rt.device.type == "cpu":
        cfg.amp = "bf16"  # train.py's auto is off on most CPUs; the ladder measures whether bf16 pays here
    return cfg


def reproduce(cfg) -> str:
    """The `benchmark.py run` options that measure this row again."""
    flags = [f"--optimizer {cfg.optimizer}", f"--amp {cfg.amp}"]
    flags += [flag for flag, on in [("--no-normalize", not cfg.normalize), ("--train-mode-backbone", not cfg.backbone_eval),
                                    ("--original-loader", cfg.original_loader), ("--channels-last", cfg.channels_last),
                                    ("--compile", cfg.compile), ("--cudnn-benchmark", cfg.cudnn_benchmark),
                                    ("--cache-features", cfg.cache_features),
                                    ("--gpu-decode", cfg.gpu_decode), ("--finetune", cfg.finetune)] if on]
    return " ".join(flags)


def make_row(name: str, what: str, cfg, rates: dict | None, note: str = "") -> dict:
    rates = rates or {}
    spread = {key: asdict(rates[key]) if key in rates else None for key in ("loader", "model", "train")}
    return {"row": name, "what": what, "options": reproduce(cfg), "note": note,
            "loader_ips": rates["loader"].median if "loader" in rates else None,
            "model_ips": rates["model"].median if "model" in rates else None,
            "train_ips": rates["train"].median if "train" in rates else None,
            "spread": spread, "kept": False, "within_noise": False}


def add_ratios(rows: list[dict]) -> None:
    original = rows[0]["train_ips"]
    for row in rows:
        measured = row["train_ips"] is not None
        row["x_original"] = row["train_ips"] / original if measured else None
        row["of_ceiling"] = row["train_ips"] / row["model_ips"] if measured and row["model_ips"] else None


def ladder(cfg, rt) -> list[dict]:
    """Every row of the ladder, measured in this process on the same images."""
    frozen = copy.copy(cfg)
    frozen.finetune = False  # --finetune adds rows after the ladder
    rows, ceilings, kept_cfg, kept_row = [], {}, frozen, None
    for step in LADDER:
        row_cfg = row_config(kept_cfg, step.changes, rt)
        reason = why_skipped(step, cfg, rt, kept_cfg)
        if reason:
            rows.append(make_row(step.name, step.what, row_cfg, None, reason))
            continue
        print(f"measuring {step.name}: {step.what}", flush=True)
        started = time.perf_counter()
        if step.name == "amp":  # bf16 on a CPU without native support can be many times slower
            probe, before = probe_step_rate(row_cfg, rt), kept_row["model_ips"]
            if probe * SLOW < before:
                rows.append(make_row(step.name, step.what, row_cfg, {"model": Spread(probe, probe, probe)},
                                     f"{before / probe:.0f}x slower (one step): not measured further, not kept"))
                continue
        row = make_row(step.name, step.what, row_cfg, measure(row_cfg, rt, ceilings))
        row["seconds"] = round(time.perf_counter() - started, 1)  # how long measuring it took
        row["kept"], row["note"] = judge(row, kept_row)
        row["within_noise"] = row["note"].startswith("within noise")
        if step.name in ALWAYS_KEPT:
            row["kept"] = True  # the baseline, and correctness, whatever their speed
        if row["kept"]:
            kept_cfg, kept_row = row_cfg, row
        rows.append(row)
    if cfg.finetune:
        for name, base in [("finetune original", frozen), ("finetune best", kept_cfg)]:
            row_cfg = row_config(base, {**(ORIGINAL if name == "finetune original" else {}),
                                        "finetune": True, "cache_features": False}, rt)
            print(f"measuring {name}: every layer trains", flush=True)
            row = make_row(name, "every layer trains (--finetune)", row_cfg, measure(row_cfg, rt, ceilings),
                           "x original: against the frozen original")
            row["kept"] = None  # not a step of the ladder
            rows.append(row)
    add_ratios(rows)
    return rows

# %% [markdown] slideshow={"slide_type": "subslide"}
# ### The report (collapsed)
#
# A table, the same rows as JSON (machine, versions, every figure's min, median and max,
# the command) and a chart. `x original`: end to end over the original row's; `of
# ceiling`: end to end over the same row's model-only figure; `±`: half the range of the
# repeats, relative to the median.

# %% jupyter={"source_hidden": true}
def format_table(rows: list[dict]) -> str:
    def number(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    def figure(row, key):
        spread = row["spread"].get(key)
        if row[f"{key}_ips"] is None or not spread:
            return number(row[f"{key}_ips"])
        return f"{spread['median']:.1f} ±{(spread['max'] - spread['min']) / 2 / spread['median']:.0%}"
    header = ["row", "loader img/s", "model-only img/s", "end-to-end img/s", "x original", "of ceiling", "kept", "note"]
    cells = [[r["row"], figure(r, "loader"), figure(r, "model"), figure(r, "train"),
              number(r.get("x_original"), "{:.2f}x"), number(r.get("of_ceiling"), "{:.0%}"),
              {True: "yes", False: "no", None: "-"}[r["kept"]], r["note"]] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [header, *cells])


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine(rt) -> dict:
    info = {"cpu": cpu_name(), "cpus": available_cpus(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),  # set_compute_threads
            "load_average": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews timings
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "device": str(rt.device)}
    if rt.device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(rt.device), gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported(including_emulation=False), cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    return info


def settings(cfg) -> dict:
    keys = ["data", "arch", "weights", "image_size", "batch_size", "images", "epochs", "workers", "warmup",
            "steps", "repeats", "seed"]
    return {k: str(getattr(cfg, k)) if isinstance(getattr(cfg, k), Path) else getattr(cfg, k) for k in keys}


def pyplot(to_file: bool):
    import matplotlib
    if to_file and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")  # a batch job has no display; a notebook keeps its own
    import matplotlib.pyplot as plt
    return plt


def finish_figure(fig, path: Path | None):
    fig.tight_layout()
    if path is not None:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        pyplot(True).close(fig)
    return fig


def bar_colour(row: dict) -> str:
    return "tab:orange" if row.get("within_noise") else "tab:grey" if row["kept"] is False else "tab:blue"


def plot_ladder(rows: list[dict], path: Path | None = None, title: str = ""):
    plt = pyplot(path is not None)
    measured = [r for r in rows if r["train_ips"] is not None][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(measured) + 1.2))
    names = [r["row"] for r in measured]
    spreads = [r["spread"]["train"] for r in measured]
    ax.barh(names, [r["train_ips"] for r in measured], color=[bar_colour(r) for r in measured], label="end to end",
            xerr=[[s["median"] - s["min"] for s in spreads], [s["max"] - s["median"] for s in spreads]], capsize=3)
    ax.scatter([r["model_ips"] for r in measured], names, color="black", marker="|", s=300, label="model-only ceiling")
    for i, r in enumerate(measured):
        ax.text(r["train_ips"], i, f" {r['x_original']:.1f}x", va="center", fontsize=8)
    ax.set_xlabel("images/s, min to max of the repeats (grey: not kept; orange: within noise)")
    ax.set_title(title, fontsize=9); ax.legend(fontsize=8, loc="lower right")
    return finish_figure(fig, path)


def report(command: str, cfg, rt, rows: list[dict], argv: list[str]) -> dict:
    result = {"command": "python scripts/benchmark.py " + " ".join(map(shlex.quote, [command, *argv])),
              "machine": machine(rt), "settings": settings(cfg), "rows": rows}
    print(format_table(rows))
    path = cfg.json or cfg.out / f"{command}.json"
    write_json(path, result)
    print(f"results written to {path}")
    if command == "ladder":
        plot_ladder(rows, path.with_suffix(".png"), f"{cfg.arch}, {cfg.image_size} px, batch {cfg.batch_size}, "
                                                    f"{result['machine'].get('gpu', result['machine']['cpu'])}")
    return result

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Try it: the ladder on this machine
#
# The sizes in the first cell are small so that the notebook runs in a minute or two on a
# laptop. On a GPU node, set `arch = "resnet152"`, `image_size = 224`, `batch_size = 64`
# and `images = 1024`.

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# from data import make_synthetic
#
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=10, per_class=(40, 10, 10), image_size=image_size)
# options = ["--data", data_dir, "--arch", arch, "--image-size", str(image_size), "--batch-size", str(batch_size),
#            "--images", str(images), "--warmup", str(warmup), "--steps", str(steps), "--repeats", str(repeats),
#            "--out", out_dir]
# cfg = parse_config("ladder", options)
# rt = BenchmarkRuntime(device=train.pick_device("auto"))
# print(f"workers {cfg.workers} | {set_compute_threads(cfg.workers)}")  # the thread rule of train.py
# rows = ladder(cfg, rt)
# result = report("ladder", cfg, rt, rows, options)

# %% tags=["active-ipynb"]
# fig = plot_ladder(rows, title=f"{arch}, {image_size} px, {rt.device}")

# %% [markdown] slideshow={"slide_type": "subslide"}
# ### Reading the ladder
#
# * **The spread first.** A `±` as large as the gap between two rows means this run cannot
#   tell them apart: such rows say *within noise*, are orange in the chart, and are never
#   kept. More `--steps` and `--repeats`, and a quiet machine, shrink the spread.
# * **`original` → `loader`**: on a GPU the original's workers, started again every epoch
#   without pinned memory, can leave the GPU waiting; on a CPU the workers decode on the
#   cores that compute the model.
# * **`amp` on a CPU** is fast only on CPUs built for bf16 (AMX); elsewhere it is emulated,
#   many times slower, and the ladder's quick probe stops measuring it.
# * **`cache`** gains close to the number of epochs when the backbone is frozen.
# * **`of ceiling` near 100 %**: the input pipeline keeps up; what is left is the model's
#   own cost.

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Optional: where does the time go? The profiler
#
# `train.py --profile` records training steps 2 to 5 with `torch.profiler` and writes a
# trace (`profile/trace-rank0.json` in the run directory, for https://ui.perfetto.dev)
# and a table of the operations that took the most time. Here we print the table.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# profile_run = Path(out_dir) / "profiled"
# train.fit(train.parse_args(["--data", data_dir, "--arch", arch, "--weights", "none", "--image-size", str(image_size),
#                             "--batch-size", str(batch_size), "--epochs", "1", "--max-steps", "6", "--workers", "0",
#                             "--profile", "--out", str(profile_run), "--overwrite"]))  # replaces an earlier run
# print((profile_run / "profile" / "top-ops-rank0.txt").read_text())

# %% [markdown] slideshow={"slide_type": "slide"}
# Read the `Self CPU` column: on a CPU, convolutions (`mkldnn_convolution` and their
# backward) should dominate. If `aten::copy_`, `to` or data loading ranked high, the
# step would spend its time moving data rather than computing.

# %% [markdown]
# ## Optional: reading a timeline (Nsight Systems)
#
# The profiler's table says which operations took the time; a **timeline** says *when*, and
# what waited for what. NVIDIA's Nsight Systems (`nsys`) draws one per process: rows for the
# CPU threads, carrying the NVTX ranges that `train.py --nvtx` names (`wait for data`,
# `copy to device`, `forward`, `backward`, `optimizer step`, `bookkeeping`), and rows for
# each GPU's kernels, copies and NCCL's communication. On the cluster,
# `COURSE_NSYS=1 slurm/submit slurm/train.sbatch` records steps 3 to 5 into
# `nsys/<host>-<pid>.nsys-rep` in the run directory (the same for `slurm/gpu_check.sbatch`);
# open it in the Nsight Systems GUI on your laptop, or print tables with `nsys stats`.
#
# Without a GPU we draw the CPU's rows ourselves: a stand-in for NVTX notes when each range
# opens and closes, during six steps of a real run on this machine.

# %% tags=["active-ipynb"]
# from unittest import mock
# phases, opened = [], []  # (name, start, end) of every range; the ranges still open
# def push(name):
#     opened.append((name, time.perf_counter()))
# def pop():
#     name, start = opened.pop()
#     phases.append((name, start, time.perf_counter()))
# with mock.patch.object(torch.cuda.nvtx, "range_push", push), mock.patch.object(torch.cuda.nvtx, "range_pop", pop):
#     train.fit(train.parse_args(["--data", data_dir, "--arch", arch, "--weights", "none", "--image-size",
#                                 str(image_size), "--batch-size", str(batch_size), "--epochs", "1", "--max-steps", "6",
#                                 "--workers", "0", "--nvtx", "--out", str(Path(out_dir) / "timeline"), "--overwrite"]))

# %% tags=["active-ipynb"]
# import matplotlib.pyplot as plt
# names = ["wait for data", "copy to device", "forward", "backward", "optimizer step", "bookkeeping"]
# fig, ax = plt.subplots(figsize=(10, 2.5))
# for name, start, end in phases:
#     row = names.index(name)
#     ax.barh(row, (end - start) * 1000, left=(start - phases[0][1]) * 1000, color=f"C{row}")
# ax.set_yticks(range(len(names)), names); ax.invert_yaxis(); ax.set_xlabel("ms from the first range")
# plt.show()
# for name in names:
#     print(f"{name:15s} {sum(end - start for n, start, end in phases if n == name) * 1000:8.1f} ms")

# %% [markdown]
# Look at: each step begins with its `wait for data` (with `--workers 0` the training process
# decodes the batch itself). Short next to `forward` and `backward`, as on a laptop with these
# small images, the run is compute-bound; as long as they, it is data-starved. The first
# `optimizer step` is the longest: the optimizer creates its state then.
#
# Three pictures to recognise on a GPU's timeline. They are **described here, not measured**:
# no GPU ran this course's tests, so no real `nsys` report is shown.
#
# - **A data-starved step**: on the CPU row, a long `wait for data`; on the GPU rows under it,
#   no kernels at all. The fix is in the input pipeline (lesson 1, `--workers`), not the model.
# - **A synchronisation**: a CPU range that lasts until the GPU has finished everything queued
#   before it, for instance `bookkeeping` on a step that prints the loss (`loss.item()` copies
#   it to the CPU). The CUDA API row shows the copy or `cudaStreamSynchronize` waiting, and
#   after it the GPU idles until the CPU has queued the next step's work. Once per log line
#   is harmless; once per step would starve the GPU.
# - **Communication overlapping backward** (DDP): NCCL's all-reduce kernels on a stream of
#   their own start *during* `backward`, bucket by bucket, while the gradients of earlier
#   layers are still computed. Without overlap, they would follow the last backward kernel
#   and `optimizer step` would wait for them.
#
# An NVTX range marks CPU time, when the CPU *queued* the work; the GPU runs it later, on its
# own rows. A `forward` range much shorter than the kernels under it means the CPU runs ahead,
# which is what you want.

# %% [markdown]
# ## Optional: scaling to more devices
#
# `benchmark.py scaling` reads run directories of `train.py` on one device, of runs that
# trained side by side (`sweep.py`), of `--data-parallel` and of DDP runs, and prints and
# plots throughput (images/s of all devices together), speed-up (against the one-device
# run) and parallel efficiency (speed-up per device; 1 is perfect). It compares only runs
# that did the same work: same architecture, image size, batch per device, precision,
# frozen or fine-tuned, and data. Anything else is a one-line error naming the difference.
#
# **What it costs.** The last columns say what your allocation is charged: device-hours per
# million training images (devices / images per second), and that against one device,
# `cost` = 1 / efficiency. The fastest configuration is rarely the cheapest: DDP on 4 GPUs at
# 80 % efficiency finishes 3.2 times sooner, and every image costs 1.25 times the
# device-hours. Worth it when waiting is what costs you; for a sweep of many runs, runs side
# by side (efficiency 1, lesson 5) finish the whole sweep sooner on the same allocation.
# The fourth plot shows speed-up against device-hours.
#
# The original workshop's minutes (two independent runs ~30, DataParallel ~20, DDP on 2×2
# GPUs ~10) are **not** a scaling result: its batch files ran 4, 10 and 10 epochs, with
# different batches and workers. No efficiency can be derived from them, and the course
# derives none; `slurm/gpu_check.sbatch` measures single, DP and DDP on identical settings.

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Exercises
#
# **1.** Which row of your ladder was kept last, the configuration every later row builds
# on? Give its name.

# %% tags=["active-ipynb"]
# last_kept = None  # your answer: a row name, e.g. "loader"

# %% tags=["active-ipynb"]
# expected = [r for r in rows if r["kept"]][-1]["row"]
# print(f"Correct: {expected}." if last_kept == expected else
#       "Not yet. Hint: the kept column, read from the bottom of the ladder's table.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# last_kept = [r for r in rows if r["kept"]][-1]["row"]
# ```
# </details>
#
# **2.** Two rows measured 50.0 img/s (min 46, max 55) and 53.0 img/s (min 51, max 56).
# Is the second faster, as far as this measurement can tell? Answer `True` or `False`.

# %% tags=["active-ipynb"]
# second_is_faster = None  # your answer: True or False

# %% tags=["active-ipynb"]
# print("Correct: 51 to 56 overlaps 46 to 55: within noise." if second_is_faster is False else
#       "Not yet. Hint: does the slowest repeat of the second beat the fastest of the first?")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# second_is_faster = False  # the ranges overlap: measure longer, or on a quieter machine
# ```
# </details>
#
# **3.** (optional: scaling) Your DDP run on 4 GPUs reaches a speed-up of 3.2 over one GPU.
# How many times the device-hours of the one-GPU run does it cost per image?

# %% tags=["active-ipynb"]
# cost_ratio = None  # your answer: a number

# %% tags=["active-ipynb"]
# if cost_ratio is not None and abs(cost_ratio - 4 / 3.2) < 0.01:
#     print("Correct: 4 GPUs for 1/3.2 of the time: 4 / 3.2 = 1.25 times, 1 / efficiency (80 %).")
# else:
#     print("Not yet. Hint: device-hours = devices x hours; the run holds 4 devices for 1/3.2 of the time.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# cost_ratio = 4 / 3.2  # devices / speed-up = 1 / parallel efficiency
# ```
# </details>

# %% [markdown]
# ## Appendix: scaling and the command-line tool

# %%
SAME_WORK = {"arch": "architecture", "image_size": "image size", "per_device_batch": "batch per device",
             "amp": "precision", "finetune": "fine-tuning", "weights": "weights", "data": "data"}


def run_throughput(run: Path) -> tuple[dict, float]:
    """config.json and the median training images/s over the epochs of one run directory."""
    if not (run / "config.json").is_file() or not train.read_metrics(run):
        raise UserError(f"{run} is not a finished run directory (config.json and metrics.jsonl)")
    config = json.loads((run / "config.json").read_text())
    return config, statistics.median(m["images_per_sec"] for m in train.read_metrics(run))


def work_of(config: dict) -> dict:
    """What makes two runs' images/s comparable: the work per image and per device."""
    options = config.get("options", {})
    devices = max(1, config.get("visible_gpus", 1)) if options.get("data_parallel") else 1
    work = {key: options.get(key) for key in SAME_WORK if key != "per_device_batch"}
    work["per_device_batch"] = None if options.get("batch_size") is None else options["batch_size"] // devices
    return work


def check_same_work(runs: list[tuple[Path, dict]]) -> None:
    """A one-line error naming the first setting in which a run differs from the first run."""
    first, reference = runs[0][0], work_of(runs[0][1])
    for run, config in runs[1:]:
        for key, value in work_of(config).items():
            if value != reference[key]:
                raise UserError(f"runs differ in {SAME_WORK[key]}: {first} has {reference[key]}, {run} has {value}; "
                                "scaling compares only runs that did the same work")


def scaling_points(single: Path, independent: list[Path], dp: list[Path], ddp: list[Path]) -> list[dict]:
    measured = {run: run_throughput(run) for run in [single, *independent, *dp, *ddp]}
    check_same_work([(run, config) for run, (config, _) in measured.items()])
    points = [{"kind": "single", "runs": [str(single)], "devices": 1, "images_per_sec": measured[single][1]}]
    if independent:
        points.append({"kind": "independent", "runs": list(map(str, independent)), "devices": len(independent),
                       "images_per_sec": sum(measured[r][1] for r in independent)})
    for run in dp:
        config, rate = measured[run]
        points.append({"kind": "dp", "runs": [str(run)], "devices": max(1, config.get("visible_gpus", 1)),
                       "images_per_sec": rate})
    for run in ddp:
        config, rate = measured[run]
        points.append({"kind": "ddp", "runs": [str(run)], "devices": config["world_size"], "images_per_sec": rate})
    for point in points:
        point["speedup"] = point["images_per_sec"] / points[0]["images_per_sec"]
        point["efficiency"] = point["speedup"] / point["devices"]
        # What the allocation is charged for a million training images, and that against one device: 1 / efficiency.
        point["device_hours_per_m"] = point["devices"] * 1e6 / point["images_per_sec"] / 3600
        point["cost"] = point["device_hours_per_m"] / points[0]["device_hours_per_m"]
    return points


def plot_scaling(points: list[dict], path: Path | None = None):
    plt = pyplot(path is not None)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    colours = {"single": "black", "independent": "tab:green", "dp": "tab:orange", "ddp": "tab:blue"}
    for kind, colour in colours.items():
        mine = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["devices"])
        for ax, key in zip(axes, ["images_per_sec", "speedup", "efficiency"]):
            if mine:
                ax.plot([p["devices"] for p in mine], [p[key] for p in mine], marker="o", color=colour, label=kind)
        for p in mine:  # speed-up against cost: the fastest point is not the cheapest
            axes[3].scatter(p["device_hours_per_m"], p["speedup"], color=colour)
            axes[3].annotate(f"{p['kind']} x{p['devices']}", (p["device_hours_per_m"], p["speedup"]), fontsize=7)
    axes[3].set_xlabel("device-hours per million images"); axes[3].set_ylabel("speed-up"); axes[3].margins(x=0.3)
    top = max([4] + [p["devices"] for p in points])
    axes[1].plot([1, top], [1, top], linestyle=":", color="grey", label="ideal")
    axes[2].axhline(1, linestyle=":", color="grey")
    for ax, label in zip(axes, ["images/s (all devices)", "speed-up", "parallel efficiency"]):
        ax.set_xlabel("devices"); ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    return finish_figure(fig, path)


def scaling_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py scaling", description=COMMANDS["scaling"])
    parser.add_argument("--single", type=Path, required=True, help="run directory of train.py on one device")
    parser.add_argument("--independent", type=Path, nargs="+", default=[], help="runs that trained side by side")
    parser.add_argument("--dp", type=Path, nargs="+", default=[], help="train.py --data-parallel runs (all visible GPUs)")
    parser.add_argument("--ddp", type=Path, nargs="+", default=[], help="DDP runs of train.py (any number of processes)")
    parser.add_argument("--plot", type=Path, default=None, help="write the three plots to this PNG")
    args = parser.parse_args(argv)
    points = scaling_points(args.single, args.independent, args.dp, args.ddp)
    print(f"{'kind':12s} {'devices':>7s} {'images/s':>9s} {'speed-up':>8s} {'efficiency':>10s} "
          f"{'device-h/M img':>14s} {'cost':>6s}")
    for p in points:
        print(f"{p['kind']:12s} {p['devices']:7d} {p['images_per_sec']:9.1f} {p['speedup']:8.2f} {p['efficiency']:10.0%} "
              f"{p['device_hours_per_m']:14.3g} {p['cost']:5.2f}x")
    if args.plot:
        plot_scaling(points, args.plot)
        print(f"plot written to {args.plot}")
    return 0


# %% [markdown]
# ## Appendix: what DDP communicates (`benchmark.py allreduce`)
#
# In every step each DDP process all-reduces the gradients of the parameters that train:
# with a frozen backbone only the head's, with `--finetune` every layer's. DDP does not
# wait for the end of the backward pass: it groups the gradients into **buckets** of about
# `bucket_cap_mb` megabytes (25 by default; after the first step, in the order that step
# produced them) and all-reduces each bucket as soon as its gradients are ready, while the
# backward pass goes on through the earlier layers. `gradient_as_bucket_view=True` makes
# the gradients views into the buckets: one copy and one gradient's memory fewer.
#
# `allreduce` measures this per step of rank 0, for 1, 2 and 3 processes on this machine
# (gloo on CPUs, nccl with a GPU per process), on random images and random weights: the
# bytes all-reduced (exact: the trainable parameters times 4 bytes in fp32), DDP's
# buckets, the forward and backward pass without communication (under `no_sync()`) and
# with it, and the all-reduce of the same buckets alone. `added` is with minus without:
# what communication costs a step; of the all-reduce alone, what `added` does not show
# was hidden behind the backward pass. The two passes alternate, repeat after repeat, so
# that other work on the machine weighs on both alike.

# %%
ALLREDUCE_CASES = {"frozen": "frozen backbone: the head's gradients", "finetune": "--finetune: every layer's"}


def allreduce_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark.py allreduce", description=COMMANDS["allreduce"],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="resnet152", choices=list(ARCHITECTURES))
    parser.add_argument("--classes", type=int, default=525, help="classes of the head (the birds: 525)")
    parser.add_argument("--image-size", type=int, default=64, help="random images; the gradients do not depend on it")
    parser.add_argument("--batch-size", type=int, default=4, help="images per process and step")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3], help="process counts, one group each")
    parser.add_argument("--cases", nargs="+", choices=list(ALLREDUCE_CASES), default=list(ALLREDUCE_CASES),
                        help="; ".join(f"{name}: {what}" for name, what in ALLREDUCE_CASES.items()))
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="auto: nccl when there is a GPU for every process, else gloo")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket size")
    parser.add_argument("--gradient-as-bucket-view", action="store_true", help="gradients as views into the buckets")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (DDP rebuilds its buckets after the first)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="each figure: the median of this many repeats, with min and max")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default <out>/allreduce.json)")
    return parser


def allreduce_config(argv: list[str]) -> argparse.Namespace:
    args = allreduce_parser().parse_args(argv)
    least = {"classes": 1, "image_size": 16, "batch_size": 1, "warmup": 1, "steps": 1, "repeats": 1, "bucket_cap_mb": 0.001}
    for option, smallest in least.items():
        if getattr(args, option) < smallest:
            raise UserError(f"--{option.replace('_', '-')} {getattr(args, option)} is out of range: give {smallest} or more")
    if min(args.processes) < 1:
        raise UserError(f"--processes {' '.join(map(str, args.processes))}: every count must be 1 or more")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.backend == "auto":
        args.backend = "nccl" if gpus >= max(args.processes) else "gloo"
    if args.backend == "nccl" and gpus < max(args.processes):
        raise UserError(f"--backend nccl needs a GPU per process: {gpus} visible for --processes {max(args.processes)}; "
                        "use fewer processes or --backend gloo")
    return args


def compute_threads(processes: int) -> int:
    """Per process: OMP_NUM_THREADS when set, else the CPUs shared out (processes on one machine share them)."""
    forced = os.environ.get("OMP_NUM_THREADS", "")
    return int(forced) if forced.isdigit() and int(forced) > 0 else max(1, available_cpus() // processes)


def allreduce_group(args, processes: int) -> list[dict]:
    """Start `processes` DDP processes on this machine; rank 0's rows, one per case."""
    with tempfile.TemporaryDirectory() as scratch:  # the processes meet in a file there: no port to pick
        result = Path(scratch) / "rows.json"
        torch.multiprocessing.spawn(allreduce_worker, args=(processes, args, scratch), nprocs=processes)
        return json.loads(result.read_text())


def allreduce_worker(rank: int, processes: int, args, scratch: str) -> None:
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(compute_threads(processes))
    dist.init_process_group(args.backend, init_method=f"file://{scratch}/rendezvous", rank=rank, world_size=processes)
    try:
        rows = [communication(case, args, device) for case in args.cases]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        write_json(Path(scratch) / "rows.json", rows)


def communication(case: str, args, device: torch.device) -> dict:
    """One case in this process: what DDP all-reduces per step, and what it costs the step."""
    torch.manual_seed(0)
    model = BirdClassifier(args.arch, args.classes, freeze_backbone=case == "frozen").to(device).train()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  bucket_cap_mb=args.bucket_cap_mb, gradient_as_bucket_view=args.gradient_as_bucket_view)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(args.classes, (args.batch_size,), device=device)

    def seconds_per_step(steps: int, communicate: bool) -> float:
        dist.barrier()  # every rank starts the repeat together
        started = time.perf_counter()
        for _ in range(steps):
            ddp.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if communicate else ddp.no_sync():  # no_sync: gradients stay local
                F.cross_entropy(ddp(images), labels).backward()
            if not communicate:
                dist.barrier()  # in step with the other ranks, as DDP's all-reduce keeps them: only the bytes differ
        synchronize(device)
        return (time.perf_counter() - started) / steps

    seconds_per_step(args.warmup, True)
    seconds_per_step(1, False)
    timed = [(seconds_per_step(args.steps, True), seconds_per_step(args.steps, False)) for _ in range(args.repeats)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    sent = sum(p.numel() * p.element_size() for p in trainable)
    buckets = bucket_bytes(ddp) or [sent]
    return {"case": case, "processes": dist.get_world_size(), "backend": dist.get_backend(),
            "threads": torch.get_num_threads(), "trainable_parameters": sum(p.numel() for p in trainable),
            "allreduce_bytes": sent, "bucket_bytes": buckets,
            "seconds_no_sync": asdict(Spread.of([local for _, local in timed])),
            "seconds_ddp": asdict(Spread.of([both for both, _ in timed])),
            "seconds_allreduce_alone": asdict(allreduce_alone(buckets, args, device))}


def bucket_bytes(ddp: DistributedDataParallel) -> list[int]:
    """DDP's buckets in bytes, from its logging data (no public API reports them; [] where it is missing)."""
    try:
        logged = ddp._get_ddp_logging_data()
    except (AttributeError, RuntimeError):
        return []
    sizes = logged.get("rebuilt_bucket_sizes") or logged.get("bucket_sizes") or ""
    return [int(size) for size in str(sizes).split(",") if size.strip()]


def allreduce_alone(buckets: list[int], args, device: torch.device) -> Spread:
    """Seconds to all-reduce fp32 tensors of the buckets' sizes, one after another, with nothing to overlap."""
    tensors = [torch.zeros(size // 4, device=device) for size in buckets]

    def seconds(steps: int) -> float:
        dist.barrier()
        started = time.perf_counter()
        for _ in range(steps):
            for tensor in tensors:
                dist.all_reduce(tensor)
        synchronize(device)
        return (time.perf_counter() - started) / steps

    seconds(1)
    return Spread.of([seconds(args.steps) for _ in range(args.repeats)])


def add_communication_cost(row: dict) -> dict:
    """added: seconds communication adds to a step; hidden: the share of the all-reduce alone that it does not add
    (None where the measurement cannot tell)."""
    ddp, local, alone = (Spread(**row[key]) for key in ("seconds_ddp", "seconds_no_sync", "seconds_allreduce_alone"))
    row["added_seconds"] = ddp.median - local.median
    within_noise = ddp.overlaps(local)
    row["note"] = "within noise: DDP's and no_sync's repeats overlap" if within_noise else ""
    measurable = alone.median > 0 and not within_noise
    row["hidden"] = min(1.0, max(0.0, 1 - row["added_seconds"] / alone.median)) if measurable else None
    return row


def allreduce_table(rows: list[dict]) -> str:
    def ms(key, row):
        spread = Spread(**row[key])
        return f"{spread.median * 1e3:.1f} ±{(spread.max - spread.min) / 2 / spread.median:.0%}"
    header = ["processes", "case", "trainable", "all-reduced", "buckets", "no_sync ms", "DDP ms", "added ms",
              "all-reduce alone ms", "hidden", "note"]
    cells = [[str(r["processes"]), r["case"], f"{r['trainable_parameters']:,}", f"{r['allreduce_bytes'] / 1e6:.3g} MB",
              str(len(r["bucket_bytes"])), ms("seconds_no_sync", r), ms("seconds_ddp", r), f"{r['added_seconds'] * 1e3:.1f}",
              ms("seconds_allreduce_alone", r), "-" if r["hidden"] is None else f"{r['hidden']:.0%}", r["note"]]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [header, *cells])


def allreduce_main(argv: list[str]) -> int:
    args = allreduce_config(argv)
    rows = []
    for processes in args.processes:
        print(f"measuring {processes} process(es): {args.backend}, {compute_threads(processes)} compute thread(s) each, "
              f"{args.arch}, {args.image_size} px, batch {args.batch_size} per process", flush=True)
        rows += [add_communication_cost(row) for row in allreduce_group(args, processes)]
    print(allreduce_table(rows))
    rt = BenchmarkRuntime(torch.device("cuda" if args.backend == "nccl" else "cpu"))
    path = args.json or args.out / "allreduce.json"
    write_json(path, {"command": "python scripts/benchmark.py " + " ".join(map(shlex.quote, ["allreduce", *argv])),
                      "machine": machine(rt), "settings": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()}, "rows": rows})
    print(f"results written to {path}")
    return 0


# %% [markdown]
# ## Appendix: whole runs, process start to exit (`benchmark.py wholerun`)
#
# The ladder times training steps inside one process. `wholerun` times what a user waits
# for: `train.py` from the start of its process to its exit (imports, reading the data,
# loading the weights, every epoch with its validation, the checkpoints, the test score),
# for the original configuration and for the options given, one after the other, repeated,
# on the same data and machine. The original runs as `benchmark.py train` (train.py with the
# ladder's three switches that bring back the original: no normalisation, the frozen
# backbone in training mode, and its own loader: 12 workers capped to the CPUs, no pinned
# memory, workers started again every epoch, the last partial batch dropped), with the
# ladder's `original` options (fp32, Adam). Its validation runs without autograd, as
# train.py's does; the original's ran with it, so if anything the original side is timed
# faster than the original was. Both sides follow train.py's thread rule: compute threads =
# the CPUs available minus the loader's workers, at least 1, unless `OMP_NUM_THREADS` is
# set, which then holds for both; each side's header line (in its `.log`) says what it got.
# `--weights random` (the default) saves a random backbone to a file once, its batch-norm
# statistics measured on 32 training images, and both sides load it as they would ImageNet's.

# %%
RUN_OPTIONS = ["data", "arch", "image_size", "batch_size", "epochs", "lr", "lr_scaling", "warmup_epochs",
               "weight_decay", "seed", "max_steps", "device", "workers"]


@contextlib.contextmanager
def original_switches(normalize: bool, backbone_eval: bool, original_loader: bool):
    """train.py with the ladder's switches that bring back the original, where train.prepare reads the data, builds
    the loaders and the model. train.py itself has no such options: the course does not teach them."""
    def splits(*args, **kwargs):
        return load_splits(*args, normalize=normalize, **kwargs)

    def loader(dataset, batch_size, workers, **options):
        if original_loader:  # DataLoader(dataset, batch_size, shuffle=True, num_workers=12, drop_last=True) in training
            options = {**options, **ORIGINAL_LOADER, "drop_last": isinstance(options.get("sampler"), ResumableSampler)}
        return make_loader(dataset, batch_size, workers, **options)

    def model(*args, **kwargs):
        built = build_model(*args, **kwargs)
        built.backbone_eval_when_frozen = backbone_eval
        return built

    with mock.patch.multiple(train, load_splits=splits, make_loader=loader, build_model=model):
        yield


def original_train_main(argv: list[str]) -> int:
    """`benchmark.py train`: train.py's main with the original's switches (what wholerun starts)."""
    parser = argparse.ArgumentParser(prog="benchmark.py train", add_help=False)
    parser.add_argument("--no-normalize", dest="normalize", action="store_false")
    parser.add_argument("--train-mode-backbone", dest="backbone_eval", action="store_false")
    parser.add_argument("--original-loader", action="store_true")
    switches, rest = parser.parse_known_args(argv)
    with original_switches(switches.normalize, switches.backbone_eval, switches.original_loader):
        return train.main(rest)


def wholerun_config(argv: list[str]) -> argparse.Namespace:
    parser = train.build_parser()
    parser.prog, parser.description = "benchmark.py wholerun", COMMANDS["wholerun"]
    parser.set_defaults(weights="random", epochs=4, out=Path("runs/benchmark/wholerun"),
                        normalize=True, backbone_eval=True, original_loader=False)  # the side given: train.py's own
    group = parser.add_argument_group("whole runs")
    group.add_argument("--repeats", type=int, default=3, help="pairs of runs: the original, then the options given")
    group.add_argument("--goal", type=float, default=5.0, help="the speed-up to check (the issue's CPU goal)")
    group.add_argument("--json", type=Path, default=None, help="where to write the results (default <out>/wholerun.json)")
    cfg = train.parse_args(argv, parser)
    if cfg.repeats < 1 or not cfg.goal > 0:
        raise UserError(f"--repeats {cfg.repeats} and --goal {cfg.goal:g} must be 1 or more and above 0")
    if cfg.resume or cfg.stop_after or cfg.profile:
        raise UserError("wholerun times whole runs from a fresh start: drop --resume, --stop-after and --profile")
    for side in wholerun_sides(cfg, cfg.weights):  # at once, not after the first runs
        for repeat in range(1, cfg.repeats + 1):
            check_run_dir_is_free(side.out(cfg, repeat), cfg)
    return cfg


@dataclass
class Side:
    """One side of the comparison: its name, the script that runs it and its options."""
    name: str
    script: str
    options: list[str]

    def out(self, cfg, repeat: int) -> Path:
        return cfg.out / f"{self.name}-{repeat}"

    def command(self, cfg, repeat: int) -> list[str]:
        extra = ["--overwrite"] if cfg.overwrite else []
        return [sys.executable, str(Path(__file__).with_name(self.script)), *self.options,
                "--out", str(self.out(cfg, repeat)), *extra]


def run_options(cfg, weights: str) -> list[str]:
    """The train.py options of a configuration (as benchmark.py train reads them)."""
    values = [f"--{key.replace('_', '-')}={getattr(cfg, key)}" for key in RUN_OPTIONS]
    flags = [flag for flag, on in [("--augment", cfg.augment), ("--no-shuffle", cfg.no_shuffle)] if on]
    return [*values, f"--weights={weights}", *shlex.split(reproduce(cfg)), *flags]


def wholerun_sides(cfg, weights: str) -> list[Side]:
    original = row_config(cfg, {**ORIGINAL, "finetune": cfg.finetune}, BenchmarkRuntime(torch.device("cpu")))
    original.workers = ORIGINAL_WORKERS  # train.py caps them to the CPUs, and its thread rule counts them
    return [Side("original", "benchmark.py", ["train", *run_options(original, weights)]),
            Side("given", "train.py", run_options(cfg, weights))]


def random_weights(cfg) -> str:
    """A random backbone saved once to a file in --out (the seed's), loaded by both sides as ImageNet's would be."""
    path = cfg.out / f"random-{cfg.arch}-{cfg.image_size}px-seed{cfg.seed}.pth"
    if not path.is_file():
        torch.manual_seed(cfg.seed)
        backbone = ARCHITECTURES[cfg.arch][0](weights=None)
        calibrate_batch_norm(backbone, load_splits(cfg.data, cfg.image_size, splits=("train",))["train"], cfg.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(backbone.state_dict(), tmp))
    return str(path)


@torch.no_grad()
def calibrate_batch_norm(backbone: torch.nn.Module, split, seed: int, images: int = 32, batch: int = 8) -> None:
    """Batch-norm statistics measured on training images, as a pretrained backbone has them. A random one keeps
    its initial ones (mean 0, variance 1), and in evaluation mode its features then grow layer by layer (to
    ~5e8 for ResNet-152 at 224 px): the head's loss explodes and no accuracy means anything."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below
    picked = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    backbone.train()
    for start in range(0, len(picked) - 1, batch):  # every batch of 2 or more: a variance needs two images
        backbone(torch.stack([split[i][0] for i in picked[start:start + batch]]))
    backbone.eval()


def timed_run(side: Side, cfg, repeat: int) -> dict:
    """One whole run in a new process: seconds from its start to its exit, and its header's thread line."""
    command, log = side.command(cfg, repeat), cfg.out / f"{side.name}-{repeat}.log"
    print(f"{side.name} {repeat}/{cfg.repeats}: {shlex.join(command[1:])} (output: {log})", flush=True)
    with open(log, "w") as output:
        started = time.perf_counter()
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
    lines = log.read_text(errors="replace").splitlines()
    if done.returncode != 0:
        last = lines[-1] if lines else "no output"
        raise UserError(f"the {side.name} run failed (exit {done.returncode}: {last}); its output is in {log}")
    threads = next((part.strip() for line in lines if line.startswith("processes ")
                    for part in line.split("|") if part.strip().startswith("threads")), "unknown")
    print(f"  {seconds:.1f} s, {threads}", flush=True)
    return {"seconds": seconds, "threads": threads, "run": str(side.out(cfg, repeat)), "log": str(log)}


def judge_speedup(original: list[float], given: list[float], goal: float) -> dict:
    """The speed-up of each pair of runs (original seconds over given seconds), its spread, and the goal's verdict."""
    ratios = Spread.of([o / g for o, g in zip(original, given)])
    verdict = ("met beyond noise" if ratios.min >= goal else "not met" if ratios.max < goal
               else "within noise of the goal")
    return {"speedup": asdict(ratios), "goal": goal, "verdict": verdict,
            "original_seconds": asdict(Spread.of(original)), "given_seconds": asdict(Spread.of(given))}


def wholerun_main(argv: list[str]) -> int:
    cfg = wholerun_config(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg) if cfg.weights == "random" else cfg.weights
    sides = wholerun_sides(cfg, weights)
    runs = {side.name: [] for side in sides}
    for repeat in range(1, cfg.repeats + 1):  # alternating, so that the machine's other work weighs on both alike
        for side in sides:
            runs[side.name].append(timed_run(side, cfg, repeat))
    result = judge_speedup([r["seconds"] for r in runs["original"]], [r["seconds"] for r in runs["given"]], cfg.goal)
    for side in sides:
        print(f"{side.name:8s} {Spread.of([r['seconds'] for r in runs[side.name]]).text('s')}, "
              f"{runs[side.name][0]['threads']}: {shlex.join(side.options)}")
    print(f"speed-up {Spread(**result['speedup']).text('x', 2)}: the goal of {cfg.goal:g}x is {result['verdict']}")
    path = cfg.json or cfg.out / "wholerun.json"
    write_json(path, {"command": "python scripts/benchmark.py " + " ".join(map(shlex.quote, ["wholerun", *argv])),
                      "machine": machine(BenchmarkRuntime(train.pick_device(cfg.device, log=lambda *a: None))),
                      "sides": {side.name: {"command": side.options, "runs": runs[side.name]} for side in sides},
                      **result})
    print(f"results written to {path}")
    sweep.gather([Path(r["run"]) for side in runs.values() for r in side], cfg.out / "time-to-accuracy.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: benchmark.py {{{','.join(COMMANDS)}}} [options]\n")
        print("\n".join(f"  {name:8s} {text}" for name, text in COMMANDS.items()))
        return 0
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"choose a command: {', '.join(COMMANDS)} (for example: benchmark.py ladder --help)")
    command, options = argv[0], argv[1:]
    if command == "scaling":
        return scaling_main(options)
    if command == "allreduce":
        return allreduce_main(options)
    if command == "wholerun":
        return wholerun_main(options)
    if command == "train":
        return original_train_main(options)
    cfg = parse_config(command, options)
    rt = BenchmarkRuntime(device=train.pick_device(cfg.device))
    print(f"workers {cfg.workers} | {set_compute_threads(cfg.workers)}")  # the same rule as train.py
    if command == "run":
        speed.use_gpu_decode(cfg, rt.device)
        rows = [make_row("this configuration", "given by the options", cfg, measure(cfg, rt))]
        add_ratios(rows)
    else:
        rows = ladder(cfg, rt)
    report(command, cfg, rt, rows, options)
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)
