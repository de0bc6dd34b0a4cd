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
# # 9. Performance: how close to the hardware's limit?
#
# The previous notebooks made training correct and then parallel. This one makes it
# fast, one measured step at a time. For any configuration we measure three numbers, in
# images per second:
#
# 1. **the input pipeline alone**: the `DataLoader` reading and decoding JPEGs, and
#    the copy to the device, with no model at all;
# 2. **the model alone**: the same training step, fed one batch that is already on the
#    device, over and over. Nothing can be faster than this: it is the **ceiling** of
#    that configuration;
# 3. **end to end**: the real training loop (`train.train_one_epoch`, the loop of
#    `train.py`), fed by the real loader.
#
# End to end far below the ceiling means the device waits for data: fix the input
# pipeline. End to end close to the ceiling means the model step itself must get
# cheaper: less precision, a better memory layout, a compiler, or less work.
#
# The **ladder** starts from the original workshop's configuration and adds one
# optimisation per row, on the same images, in one process, so every row is comparable.
# This notebook is also `scripts/benchmark.py`:
#
# ```bash
# python scripts/benchmark.py ladder --data data/birds --arch resnet152      # the whole ladder
# python scripts/benchmark.py run --data data/birds --channels-last --amp bf16   # one configuration
# python scripts/benchmark.py scaling --single runs/1 --dp runs/dp --ddp runs/ddp4 --plot scaling.png
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# arch = "resnet18"
# image_size = 64
# batch_size = 16
# images = 64  # training images every row uses
# warmup = 1  # untimed steps before each measurement
# steps = 3  # timed steps per repeat
# repeats = 3  # each figure is the median of this many repeats
# out_dir = "../runs/notebook-benchmark"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %%
from __future__ import annotations

import argparse
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import RandomSampler, Subset

import speed
import train
from data import (ShardSampler, UserError, atomic_write, available_cpus, load_splits, make_loader, run_cli,
                  set_compute_threads)
from model import BirdClassifier, load_backbone_weights
from resilience import write_json

# %% [markdown]
# ## Measuring honestly
#
# Three rules make the numbers mean something:
#
# * **warm-up steps are not timed**: the first steps start worker processes, choose
#   convolution algorithms, allocate memory and, with `torch.compile`, compile;
# * **the device is synchronised before the clock is read**: CUDA runs asynchronously,
#   so without `torch.cuda.synchronize()` we would time how fast Python *queues* work;
# * **each figure is the median of several repeats**, so one slow repeat (another
#   process, a page fault) does not decide the result.
#
# The end-to-end and model-only figures both run `train.train_one_epoch`, the training
# loop of `train.py`, on a "loader" of a few steps: the benchmark has no loop of its own
# to drift away from the real one.

# %%
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(measure, cfg) -> float:
    """Images/s: `measure(steps)` once untimed (warm-up), then the median of the repeats."""
    if cfg.warmup:
        measure(cfg.warmup)
    return statistics.median(measure(cfg.steps) for _ in range(cfg.repeats))


def loader_rate(stream, cfg, rt) -> float:
    """The input pipeline alone: batches from the loader, moved to the device."""
    def measure(steps: int) -> float:
        started, seen = time.perf_counter(), 0
        for images, labels in itertools.islice(stream, steps):
            train.to_device(images, labels, rt.device, cfg.channels_last)
            seen += len(labels)
        synchronize(rt.device)
        return seen / (time.perf_counter() - started)
    return median_rate(measure, cfg)


def train_rate(setup, stream, cfg, rt) -> float:
    """Training steps of train.train_one_epoch on batches from stream."""
    def measure(steps: int) -> float:
        return timed_epoch(setup, Window(stream, steps), cfg, rt)
    return median_rate(measure, cfg)


def timed_epoch(setup, loader, cfg, rt, epoch: int = 0) -> float:
    """Images/s of train.train_one_epoch over the loader, without progress bar or log lines."""
    steps = train.EpochSteps(epoch, len(loader), rt.device, cfg, log=lambda *args: None, bar=False)
    train.train_one_epoch(setup.train_model, loader, setup.optimizer, setup.scaler, setup.dtype, rt.device, cfg,
                          steps)
    return steps.stats()["images_per_sec"]


def on_device(stream, cfg, rt):
    """One batch from the stream, already on the device, for ever: the model-only ceiling."""
    return itertools.repeat(train.to_device(*next(stream), rt.device, cfg.channels_last))


# %% [markdown]
# ## One configuration
#
# A configuration is every option of `train.py` (the benchmark uses its parser) plus
# three switches that bring back what the original workshop did and the course does not:
# `--no-normalize` (`ToTensor()` only), `--train-mode-backbone` (`model.train()` puts the
# frozen backbone's BatchNorm layers in training mode) and `--default-loader`
# (`DataLoader(dataset, batch_size, shuffle=True)`: no worker processes, no pinned
# memory). The weights are random unless you ask for others: the speed does not depend
# on their values, and the backbone stays frozen unless `--finetune`.

# %%
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
    group.add_argument("--repeats", type=int, default=3, help="each figure is the median of this many repeats")
    group.add_argument("--no-normalize", dest="normalize", action="store_false", help="ToTensor() only (original)%(default).0s")
    group.add_argument("--train-mode-backbone", dest="backbone_eval", action="store_false",
                       help="model.train() also on the frozen backbone (original)%(default).0s")
    group.add_argument("--default-loader", action="store_true", help="DataLoader defaults: no workers, no pinning (original)%(default).0s")
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
    if cfg.default_loader:  # the original: DataLoader(dataset, batch_size, shuffle=True)
        return make_loader(images, cfg.batch_size, 0, sampler=order, pin_memory=False, drop_last=True)
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


# %% [markdown]
# ### Cached features: timing a whole run
#
# With `--cache-features` the work is not the same in every step: one pass computes the
# backbone's features of every image, then each of the `--epochs` epochs trains only the
# head. So this row times the whole run, `train.backbone_features` and then
# `train_one_epoch` over the cached features for `--epochs` epochs, and reports the
# training images of all epochs divided by the total time. Its ceiling is the same run
# with the images already on the device.

# %%
def cached_rates(setup, images, stream, cfg, rt) -> tuple[float, float]:
    """(end-to-end, ceiling) images/s of a whole --epochs run with cached features."""
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
    total = cfg.epochs * len(images)
    ceiling = total / (len(images) / median_rate(backbone, cfg) + total / head)

    one_pass = copy.copy(cfg)  # the pass over the images uses the row's loader settings
    one_pass.workers = 0 if cfg.default_loader else cfg.workers

    def whole_run(_steps: int) -> float:
        started = time.perf_counter()
        cached = speed.backbone_features(model, images, ShardSampler(len(images)), one_pass, rt.device, setup.dtype)
        loader = make_loader(cached, cfg.batch_size, 0, drop_last=True,
                             sampler=RandomSampler(cached, generator=torch.Generator().manual_seed(cfg.seed)))
        for epoch in range(cfg.epochs):
            timed_epoch(setup, loader, cfg, rt, epoch)
        synchronize(rt.device)
        return total / (time.perf_counter() - started)
    return statistics.median(whole_run(0) for _ in range(cfg.repeats)), ceiling


def measure(cfg, rt, ceilings: dict | None = None) -> dict:
    """The three images/s of one configuration; `ceilings` reuses a model-only figure."""
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
        return train_rate(setup, on_device(stream, quick, rt), quick, rt)
    finally:
        stream.close()


# %% [markdown]
# ## The ladder
#
# Each row adds one change to the last row that was **kept**. A change is kept when it
# makes end-to-end training faster on this machine (the correctness row always is); a
# change that makes it slower is measured, shown, and then left out of the rows below.
#
# | row | what changes | why it can help | when it does not |
# |---|---|---|---|
# | `original` | the workshop's setup: fp32, `ToTensor()` only, `model.train()` on the frozen backbone, Adam, DataLoader defaults | | |
# | `normalise+eval` | ImageNet normalisation; the frozen backbone in eval mode | correctness first: the inputs the weights expect, BatchNorm statistics that do not drift; eval-mode BatchNorm is also cheaper | |
# | `loader` | worker processes from the allocation, pinned memory, persistent workers, prefetching | JPEG decoding runs in parallel with the training step | when the CPUs are busy computing the model (a CPU-only run): the workers take cores from it |
# | `cudnn-benchmark` | cuDNN times its convolution algorithms for these shapes and keeps the fastest | the default algorithm is not always the fastest for a given GPU and shape | needs CUDA; shapes that keep changing make it search again |
# | `channels_last` | NHWC memory layout of weights and images | convolution kernels (cuDNN tensor cores, oneDNN) prefer it; no layout conversions | layers that do not support it convert back and forth |
# | `amp` | bf16 autocast (fp16 and a gradient scaler on GPUs without bf16) | half the bytes, tensor cores | CPUs without native bf16 instructions emulate it, many times slower |
# | `compile` | `torch.compile` | fuses element-wise operations, fewer kernel launches | the first steps compile for minutes; small gain when convolutions dominate |
# | `cache` | the frozen backbone's features computed once, the head trained on them every epoch | the backbone, nearly all the work, runs once instead of every epoch | invalid with `--finetune` (the backbone changes) or `--augment` (the pixels change) |
# | `gpu-decode` | JPEGs decoded on the GPU | frees the CPUs when they cannot decode fast enough | needs CUDA; the GPU does the decoding work instead |
#
# With `--finetune` two more rows follow: the original and the best configuration with
# every layer training, so you see the cost of all ~60 M parameters of a ResNet-152 (and,
# with DDP, of synchronising their gradients in every step) against a head of 1 M.

# %%
COMMANDS = {
    "run": "Measure one configuration: input pipeline, model-only ceiling and end-to-end training.",
    "ladder": "Measure the original configuration, then each optimisation added one at a time.",
    "scaling": "Throughput, speed-up and efficiency of single-device, independent, DP and DDP runs.",
}

ORIGINAL = {"normalize": False, "backbone_eval": False, "default_loader": True, "channels_last": False,
            "amp": "off", "compile": False, "cache_features": False, "gpu_decode": False, "optimizer": "adam",
            "cudnn_benchmark": False}


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    changes: dict


LADDER = [
    Step("original", "fp32, ToTensor only, model.train() on the frozen backbone, Adam, DataLoader defaults", ORIGINAL),
    Step("normalise+eval", "ImageNet normalisation; frozen backbone in eval mode", {"normalize": True, "backbone_eval": True}),
    Step("loader", "workers from the allocation, pinned memory, persistent workers, prefetch", {"default_loader": False}),
    Step("cudnn-benchmark", "cuDNN times its convolution algorithms and keeps the fastest", {"cudnn_benchmark": True}),
    Step("channels_last", "NHWC memory format", {"channels_last": True}),
    Step("amp", "mixed precision (bf16; fp16 and a gradient scaler on GPUs without bf16)", {"amp": "auto"}),
    Step("compile", "torch.compile", {"compile": True}),
    Step("cache", "backbone features computed once, the head trained on them", {"cache_features": True}),
    Step("gpu-decode", "JPEGs decoded on the GPU", {"gpu_decode": True}),
]
ALWAYS_KEPT = {"original", "normalise+eval"}  # the baseline, and correctness
SLOW = 3.0  # a change whose quick probe is this many times slower is not measured further


def why_skipped(step: Step, cfg, rt, base) -> str | None:
    cuda = rt.device.type == "cuda"
    if step.name in cfg.skip:
        return "skipped (--skip)"
    if step.name in ("cudnn-benchmark", "gpu-decode") and not cuda:
        return "skipped: needs CUDA"
    if step.name == "compile" and not cuda and not cfg.compile:
        return "skipped on CPU (compiling takes minutes): add --compile"
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
                                    ("--default-loader", cfg.default_loader), ("--channels-last", cfg.channels_last),
                                    ("--compile", cfg.compile), ("--cudnn-benchmark", cfg.cudnn_benchmark),
                                    ("--cache-features", cfg.cache_features),
                                    ("--gpu-decode", cfg.gpu_decode), ("--finetune", cfg.finetune)] if on]
    return " ".join(flags)


def make_row(name: str, what: str, cfg, rates: dict | None, note: str = "") -> dict:
    return {"row": name, "what": what, "options": reproduce(cfg), "note": note,
            "loader_ips": rates and rates.get("loader"), "model_ips": rates and rates.get("model"),
            "train_ips": rates and rates.get("train"), "kept": False}


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
                rows.append(make_row(step.name, step.what, row_cfg, {"model": probe},
                                     f"{before / probe:.0f}x slower (one step): not measured further, not kept"))
                continue
        rates = measure(row_cfg, rt, ceilings)
        row = make_row(step.name, step.what, row_cfg, rates)
        row["seconds"] = round(time.perf_counter() - started, 1)  # how long measuring it took
        row["kept"] = step.name in ALWAYS_KEPT or rates["train"] > kept_row["train_ips"]
        if row["kept"]:
            kept_cfg, kept_row = row_cfg, row
        else:
            row["note"] = "slower end to end: not kept"
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


# %% [markdown]
# ## The report
#
# A table on the terminal, the same rows as JSON (with the machine, the versions and the
# command that produced them) and a bar chart. `x original` is end-to-end images/s
# divided by the original row's; `of ceiling` is end to end divided by the same row's
# model-only figure.

# %%
def format_table(rows: list[dict]) -> str:
    def number(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)
    header = ["row", "loader img/s", "model-only img/s", "end-to-end img/s", "x original", "of ceiling", "kept", "note"]
    cells = [[r["row"], number(r["loader_ips"]), number(r["model_ips"]), number(r["train_ips"]),
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
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
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


def plot_ladder(rows: list[dict], path: Path | None = None, title: str = ""):
    plt = pyplot(path is not None)
    measured = [r for r in rows if r["train_ips"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(measured) + 1.2))
    names = [r["row"] for r in measured][::-1]
    ax.barh(names, [r["train_ips"] for r in measured][::-1], color=["tab:grey" if r["kept"] is False else "tab:blue"
                                                                     for r in measured][::-1], label="end to end")
    ax.scatter([r["model_ips"] for r in measured][::-1], names, color="black", marker="|", s=300, label="model-only ceiling")
    for i, r in enumerate(measured[::-1]):
        ax.text(r["train_ips"], i, f" {r['x_original']:.1f}x", va="center", fontsize=8)
    ax.set_xlabel("images/s (grey: not kept)"); ax.set_title(title, fontsize=9); ax.legend(fontsize=8, loc="lower right")
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


# %% [markdown]
# ## Scaling: more devices, how much faster?
#
# `scaling` reads run directories written by `train.py` (one device), `sweep.py`
# (independent runs side by side), `train_dp.py` and `train_ddp.py`, and plots, against
# the number of devices:
#
# * **throughput**: training images per second, of all devices together (for
#   independent runs, the sum of the runs: they train at the same time);
# * **speed-up**: throughput divided by the single-device run's;
# * **parallel efficiency**: speed-up divided by the number of devices (1 is perfect).
#
# For reference it draws the original workshop's V100 timings: two independent runs
# in about 30 minutes (the time of one run on one GPU), DataParallel on 2 GPUs in about
# 20, DDP on 2 nodes x 2 GPUs in about 10.

# %%
V100_REFERENCE = [  # (label, devices, minutes, trainings done): from the original workshop
    ("single", 1, 30, 1), ("independent", 2, 30, 2), ("dp", 2, 20, 1), ("ddp", 4, 10, 1)]


def run_throughput(run: Path) -> tuple[dict, float]:
    """config.json and the median training images/s over the epochs of one run directory."""
    if not (run / "config.json").is_file() or not train.read_metrics(run):
        raise UserError(f"{run} is not a finished run directory (config.json and metrics.jsonl)")
    config = json.loads((run / "config.json").read_text())
    return config, statistics.median(m["images_per_sec"] for m in train.read_metrics(run))


def scaling_points(single: Path, independent: list[Path], dp: list[Path], ddp: list[Path]) -> list[dict]:
    points = [{"kind": "single", "runs": [str(single)], "devices": 1, "images_per_sec": run_throughput(single)[1]}]
    if independent:
        points.append({"kind": "independent", "runs": list(map(str, independent)), "devices": len(independent),
                       "images_per_sec": sum(run_throughput(r)[1] for r in independent)})
    for run in dp:
        config, rate = run_throughput(run)
        points.append({"kind": "dp", "runs": [str(run)], "devices": max(1, config.get("visible_gpus", 1)),
                       "images_per_sec": rate})
    for run in ddp:
        config, rate = run_throughput(run)
        points.append({"kind": "ddp", "runs": [str(run)], "devices": config["world_size"], "images_per_sec": rate})
    for point in points:
        point["speedup"] = point["images_per_sec"] / points[0]["images_per_sec"]
        point["efficiency"] = point["speedup"] / point["devices"]
    return points


def plot_scaling(points: list[dict], path: Path | None = None):
    plt = pyplot(path is not None)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    colours = {"single": "black", "independent": "tab:green", "dp": "tab:orange", "ddp": "tab:blue"}
    for kind, colour in colours.items():
        mine = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["devices"])
        reference = [(devices, 30 * done / minutes) for label, devices, minutes, done in V100_REFERENCE if label == kind]
        for ax, key in zip(axes, ["images_per_sec", "speedup", "efficiency"]):
            if mine:
                ax.plot([p["devices"] for p in mine], [p[key] for p in mine], marker="o", color=colour, label=kind)
            if reference and key != "images_per_sec":
                ax.scatter([d for d, _ in reference], [s if key == "speedup" else s / d for d, s in reference],
                           marker="x", color=colour, label=f"{kind}, V100 workshop")
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
    parser.add_argument("--dp", type=Path, nargs="+", default=[], help="train_dp.py runs (all visible GPUs)")
    parser.add_argument("--ddp", type=Path, nargs="+", default=[], help="train_ddp.py runs (any number of processes)")
    parser.add_argument("--plot", type=Path, default=None, help="write the three plots to this PNG")
    args = parser.parse_args(argv)
    points = scaling_points(args.single, args.independent, args.dp, args.ddp)
    print(f"{'kind':12s} {'devices':>7s} {'images/s':>9s} {'speed-up':>8s} {'efficiency':>10s}")
    for p in points:
        print(f"{p['kind']:12s} {p['devices']:7d} {p['images_per_sec']:9.1f} {p['speedup']:8.2f} {p['efficiency']:10.0%}")
    print("V100 workshop: 2 independent runs ~30 min, DataParallel on 2 GPUs ~20 min, DDP on 2x2 GPUs ~10 min")
    if args.plot:
        plot_scaling(points, args.plot)
        print(f"plot written to {args.plot}")
    return 0


# %% [markdown]
# ## The command-line tool

# %%
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: benchmark.py {run,ladder,scaling} [options]\n")
        print("\n".join(f"  {name:8s} {text}" for name, text in COMMANDS.items()))
        return 0
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"choose a command: {', '.join(COMMANDS)} (for example: benchmark.py ladder --help)")
    command, options = argv[0], argv[1:]
    if command == "scaling":
        return scaling_main(options)
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

# %% [markdown]
# ## Try it: the ladder on this machine
#
# The sizes in the first cell are small so that the notebook runs in about a minute on
# a laptop. On a GPU node, set `arch = "resnet152"`, `image_size = 224`,
# `batch_size = 64` and `images = 1024`.

# %% tags=["active-ipynb"]
# from data import make_synthetic
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=10, per_class=(40, 10, 10), image_size=image_size)
# options = ["--data", data_dir, "--arch", arch, "--image-size", str(image_size), "--batch-size", str(batch_size),
#            "--images", str(images), "--warmup", str(warmup), "--steps", str(steps), "--repeats", str(repeats),
#            "--out", out_dir]
# cfg = parse_config("ladder", options)
# device = train.pick_device("auto")
# rt = BenchmarkRuntime(device=device)
# rows = ladder(cfg, rt)
# result = report("ladder", cfg, rt, rows, options)

# %% tags=["active-ipynb"]
# fig = plot_ladder(rows, title=f"{arch}, {image_size} px, {device}")

# %% [markdown]
# ### Reading the ladder
#
# * **The original row's `of ceiling`**: on a GPU, a loader with no workers decodes
#   every JPEG in the training process while the GPU waits, and end to end is a
#   fraction of the ceiling. On a CPU the model takes so long per image that decoding
#   hardly shows.
# * **`loader`**: on a GPU this is usually the biggest single step towards the ceiling.
#   On a CPU-only run it often does *not* help: worker processes decode on the same
#   cores that compute the model.
# * **`amp` on a CPU**: bf16 is fast only on CPUs built for it (AMX matrix units). On an
#   AVX2-only CPU it is emulated, and bf16 convolutions were measured about 30x slower
#   than fp32; the ladder's quick probe catches that before wasting minutes. Even with
#   AVX512-BF16 instructions, the test machine ran 0.8x slower than fp32.
#   Never switch on mixed precision without measuring it on the machine you will use.
# * **`cache`**: the largest gain whenever the backbone is frozen, because the
#   expensive part runs once instead of once per epoch: for `E` epochs the ideal gain is
#   close to `E`. It is valid only while the backbone's output for an image never
#   changes: frozen weights, BatchNorm in eval mode, no random augmentation.
# * **The GPU-only rows** (`cudnn-benchmark`, `compile`, `gpu-decode`) are skipped on a
#   CPU. On a GPU, `cudnn-benchmark` and `compile` make the model step itself cheaper, so
#   they raise the ceiling; `gpu-decode` helps only when `loader img/s` is below the
#   ceiling, that is when the CPUs cannot decode as fast as the GPU trains. The warm-up
#   steps absorb their one-off costs (the algorithm search, minutes of compiling), which
#   a short job would pay in full.
# * **`of ceiling` near 100 %** means the input pipeline keeps up; what is left is the
#   model's own cost, which only less precision, a better layout, a compiler or less
#   work (cached features, a smaller model) can reduce.
# * **Threads**: PyTorch runs one compute thread per core it sees. When other processes
#   share those cores, every parallel operation waits for its slowest thread: on a
#   2-core machine shared with other jobs we measured 2 threads about 3x *slower* than
#   1. So every script gives PyTorch the cores its DataLoader workers leave, at least one
#   (`set_compute_threads` in the `data` notebook; `OMP_NUM_THREADS`, when set, wins) and
#   prints the choice.

# %% [markdown]
# ## Where does the time go? The profiler
#
# `train.py --profile` records training steps 2 to 5 with `torch.profiler` and writes a
# trace (`profile/trace-rank0.json` in the run directory) and a table of the operations
# that took the most time. Open the trace in https://ui.perfetto.dev: each training step
# is a row of coloured blocks; gaps on the GPU rows are time the GPU waited (for data,
# or for Python). Here we print the table.

# %% tags=["active-ipynb"]
# profile_run = Path(out_dir) / "profiled"
# train.fit(train.parse_args(["--data", data_dir, "--arch", arch, "--weights", "none", "--image-size", str(image_size),
#                             "--batch-size", str(batch_size), "--epochs", "1", "--max-steps", "6", "--workers", "0",
#                             "--profile", "--out", str(profile_run), "--overwrite"]))  # replaces an earlier run
# print((profile_run / "profile" / "top-ops-rank0.txt").read_text())

# %% [markdown]
# Read the `Self CPU` column: on a CPU, convolutions (`mkldnn_convolution` and their
# backward) should dominate. If `aten::copy_`, `to` or data loading ranked high, the
# step would spend its time moving data rather than computing.
#
# ## Scaling to more devices
#
# Without runs of your own, the plot shows only the original workshop's V100 timings:
# DataParallel reached 75 % efficiency on 2 GPUs, DDP 75 % on 4, and the independent
# runs 100 %, because they never wait for each other. Run
# `benchmark.py scaling --single ... --dp ... --ddp ...` on your runs to add yours.

# %% tags=["active-ipynb"]
# fig = plot_scaling([])

# %% [markdown]
# ## Exercises
#
# **1.** Which kept row of your ladder trains fastest end to end? Give its name.

# %% tags=["active-ipynb"]
# fastest = None  # your answer: a row name, e.g. "loader"

# %% tags=["active-ipynb"]
# expected = max((r for r in rows if r["kept"]), key=lambda r: r["train_ips"])["row"]
# print(f"Correct: {expected}." if fastest == expected else
#       "Not yet. Hint: compare the end-to-end img/s column of the rows marked kept.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# fastest = max((r for r in rows if r["kept"]), key=lambda r: r["train_ips"])["row"]
# ```
# </details>
#
# **2.** A frozen ResNet-152 spends nearly all its time in the backbone. Training for
# 10 epochs, about how many times faster can cached features make the run, at best?

# %% tags=["active-ipynb"]
# best_gain = None  # your answer: a number

# %% tags=["active-ipynb"]
# print("Correct: the backbone runs once instead of 10 times." if best_gain == 10 else
#       "Not yet. Hint: count how often the backbone sees each image without and with the cache.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# best_gain = 10  # slightly less in practice: the head still trains every epoch
# ```
# </details>
#
# **3.** Which `train.py` option makes `--cache-features` invalid, besides `--finetune`?
# Give it with its dashes.

# %% tags=["active-ipynb"]
# invalid_with_cache = None  # your answer: a string

# %% tags=["active-ipynb"]
# print("Correct: random augmentation changes the pixels, and so the features, every epoch."
#       if invalid_with_cache == "--augment" else
#       "Not yet. Hint: which option makes an image look different in every epoch?")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# invalid_with_cache = "--augment"
# ```
# </details>
