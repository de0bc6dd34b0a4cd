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
# # 8. Speed switches: one flag each
#
# `train.py` learns the same thing however it is switched; these options change only
# how fast. Each is one flag, and each has a reason to help and a case where it does not.
# The next lesson, `benchmark`, measures them one at a time on your hardware.
#
# **You will learn to:**
# - use mixed precision (bf16, or fp16 with a gradient scaler) and know when a CPU makes it slower;
# - switch on `channels_last`, cuDNN autotuning and `torch.compile`;
# - skip the frozen backbone's work after the first epoch (cached features);
# - move JPEG decoding to the GPU, and record a profile of training steps.
#
# **Time:** about 20 minutes. Core path: mixed precision and cached features; the others
# are optional.
#
# | flag | what it changes | why it can help | when it does not |
# |---|---|---|---|
# | `--amp bf16\|fp16` | matrix products in 16 bits | tensor cores, half the bytes | CPUs without bf16 hardware emulate it |
# | `--channels-last` | NHWC memory layout | convolution kernels prefer it | layers without support convert back and forth |
# | `--cudnn-benchmark` | cuDNN times its algorithms once | the default is not always fastest | needs CUDA; changing shapes re-time |
# | `--compile` | `torch.compile` fuses operations | fewer kernel launches, less memory traffic | compiles first (seconds to minutes) |
# | `--cache-features` | the frozen backbone runs once | it is nearly all the work | not with `--finetune` or `--augment` |
# | `--gpu-decode` | JPEGs decoded by the GPU | frees the CPUs | needs CUDA |
# | `--profile DIR` | a `torch.profiler` trace of steps 2–5 | shows where time goes | |
#
# This notebook is also `scripts/speed.py`, which `train.py` imports.

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# image_size = 64
# batch_size = 16
# out_dir = "../runs/notebook-speed"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %% jupyter={"source_hidden": true}
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from data import ShardSampler, make_loader
from resilience import sum_over_ranks

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Try it: the same run, one switch
#
# One epoch of the small model, first as it is, then with the `channels_last` memory
# layout. Compare the `img/s` of the two summary lines, and their accuracy.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# from pathlib import Path
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic {data_dir} --classes 10 --image-size {image_size}
# common = f"--data {data_dir} --arch resnet18 --weights none --image-size {image_size} --epochs 1 " \
#          f"--batch-size {batch_size} --workers 1 --overwrite"
# !{sys.executable} ../scripts/train.py {common} --out {out_dir}-plain | tail -n 1
# !{sys.executable} ../scripts/train.py {common} --out {out_dir}-fast --channels-last | tail -n 1

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: the two `images_per_sec`. On a GPU, `channels_last` usually helps; on a CPU
# it may help or not, and a small difference may be noise: run the cell again and see
# how much the figures move. A switch is worth keeping only where it is measured to help,
# beyond the noise, which is what the `benchmark` lesson does row by row.
#
# ## Mixed precision
#
# On GPUs, bf16 autocast roughly doubles the speed of the convolutions (tensor cores) at
# no cost in accuracy; it is native from compute capability 8.0 on (A100 and later).
# Older GPUs (a V100 is 7.0) only emulate bf16 (`torch.cuda.is_bf16_supported()` alone
# says yes to emulation too), so `auto` gives them fp16 with a gradient scaler, which
# keeps small gradients from rounding to zero. On a CPU it depends on the chip, so
# measure: emulated on AVX2-only CPUs bf16 is about 30x slower than fp32; with AVX512-BF16
# instructions it measured 0.8x on an Intel Xeon but about 2x on an AMD EPYC
# (`docs/performance.md`); CPUs with AMX matrix units (Intel Xeon 4th generation and
# later) are built for it. So `auto` uses bf16 only with AMX, and the `benchmark`
# lesson's `amp` row measures `--amp bf16` on your CPU.
#
# **fp32 is not always fp32 on a GPU.** From Ampere (A100, compute capability 8.0) on,
# tensor cores compute in TF32 (fp32's range, 10 mantissa bits). PyTorch lets cuDNN use it
# for **convolutions by default** (`torch.backends.cudnn.allow_tf32` is `True`), so the
# ResNet's convolutions in an `--amp off` run already use it; **matrix products** use it
# only when asked, `torch.backends.cuda.matmul.allow_tf32 = True` (default `False`) or
# `torch.set_float32_matmul_precision("high")`, which here would speed up only the
# head's small `Linear`. See
# https://docs.pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-and-later-devices
# and https://docs.pytorch.org/docs/stable/generated/torch.set_float32_matmul_precision.html.

# %% slideshow={"slide_type": "subslide"}
def pick_precision(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if amp == "auto":
        if device.type == "cuda":  # native bf16 only: a V100 (7.0) merely emulates it, slower than fp16
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Matrix products in dtype inside this block; nothing changes with dtype None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# %% jupyter={"source_hidden": true}
def cpu_has_amx() -> bool:
    """Intel AMX tiles: the CPU matrix units that make bf16 fast (a private PyTorch probe)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def bf16_support() -> str:
    """How the current CUDA GPU runs bf16 (the GPU check reports it): native, emulated or no."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "native"
    return "emulated (slow: --amp auto uses fp16)" if torch.cuda.is_bf16_supported() else "no"


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Memory layout, cuDNN autotuning, compilation
#
# `--channels-last` stores images and weights as NHWC (the channels of a pixel next to
# each other), the layout that GPU tensor-core kernels and oneDNN on CPUs prefer.
# `--cudnn-benchmark` lets cuDNN time its convolution algorithms once per input shape and
# keep the fastest; our images always have the same size, so that search happens in the
# first steps only. `--compile` hands the model to `torch.compile`, which fuses
# element-wise operations into fewer kernels; it compiles during the first steps.
#
# `to_device` copies each batch with `non_blocking=True`. From pinned (page-locked)
# memory, which the loader provides on CUDA, the copy is asynchronous for the **CPU**: it
# queues the copy and goes on queueing the forward pass. On the GPU the copy and the
# kernels run on the same CUDA stream, in order, so the copy does **not** overlap the
# compute; only a copy on a side stream does, as a prefetcher that copies batch *k + 1*
# during step *k* does. See https://docs.pytorch.org/tutorials/intermediate/pinmem_nonblock.html
# and https://docs.pytorch.org/docs/stable/notes/cuda.html#cuda-streams.

# %% slideshow={"slide_type": "subslide"}
def to_device(images, labels, device: torch.device, channels_last: bool):
    """A batch on the training device; non_blocking (from pinned memory) lets the CPU go on while the copy runs,
    but on the GPU it runs on the same stream as the compute, before it, not overlapping it."""
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:  # not for cached features (--cache-features)
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def set_cudnn_benchmark(on: bool) -> None:
    torch.backends.cudnn.benchmark = on  # a process-wide switch: set it for every run, on or off


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Cached features: the frozen backbone's work, once
#
# A frozen backbone in evaluation mode gives the same features for an image in every
# epoch. Without random augmentation they can be computed **once** (each process its
# share; a sum across processes gives everyone all of them), and every epoch then trains
# only the head on them, in the same order, to the same weights. Not with `--finetune`
# (the backbone changes every step) nor with `--augment` (every epoch sees other pixels).

# %%
@torch.no_grad()  # not inference_mode: the head trains on these tensors later
def backbone_features(model, dataset, sampler, cfg, device: torch.device, dtype) -> TensorDataset:
    """The frozen backbone's features of every image of dataset, in its order, on every rank.

    `sampler` gives this rank's share (every image on exactly one rank)."""
    model.eval()
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, persistent_workers=False, sampler=sampler)
    rows = torch.tensor(list(sampler), dtype=torch.long, device=device)
    features = torch.zeros(len(dataset), model.num_features, device=device)
    labels = torch.zeros(len(dataset), dtype=torch.long, device=device)
    done = 0
    for images, batch_labels in loader:
        images, batch_labels = to_device(images, batch_labels, device, cfg.channels_last)
        batch_rows = rows[done:done + len(batch_labels)]
        with autocast(device, dtype):
            features[batch_rows] = model.backbone(images).float()
        labels[batch_rows] = batch_labels
        done += len(batch_labels)
    return TensorDataset(sum_over_ranks(features).cpu(), sum_over_ranks(labels).cpu())


# %% jupyter={"source_hidden": true}
def cached_feature_loaders(model, splits, train_sampler, cfg, device, dtype, rank=0, world_size=1, log=print):
    """Loaders of backbone features instead of images; the same training sampler gives the same order."""
    started = time.perf_counter()
    train, valid = (backbone_features(model, splits[split], ShardSampler(len(splits[split]), rank, world_size),
                                      cfg, device, dtype) for split in ("train", "valid"))
    log(f"cached the backbone features of {len(train)} train and {len(valid)} valid images "
        f"in {time.perf_counter() - started:.1f}s")
    return (make_loader(train, cfg.batch_size, 0, sampler=train_sampler),
            make_loader(valid, cfg.batch_size, 0, sampler=ShardSampler(len(valid), rank, world_size)))


# %% [markdown] slideshow={"slide_type": "slide"}
# ## JPEG decoding on the GPU (`--gpu-decode`)
#
# With many GPUs per node, the CPUs may not decode JPEGs fast enough. With
# `--gpu-decode` the loader's workers only read each file's bytes, and the training
# process decodes a whole batch on the GPU with nvJPEG (the classes are in the `data`
# lesson's appendix). It needs CUDA; elsewhere the option is ignored with a notice.

# %% slideshow={"slide_type": "fragment"}
def use_gpu_decode(cfg, device: torch.device, log=print) -> bool:
    if cfg.gpu_decode and device.type != "cuda":
        log("notice: --gpu-decode needs a CUDA device; decoding the JPEGs on the CPU as usual")
    elif cfg.gpu_decode and torch.version.hip:
        log("notice: --gpu-decode uses NVIDIA's nvJPEG, which ROCm builds lack; decoding the JPEGs on the CPU")
        return False
    return cfg.gpu_decode and device.type == "cuda"


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Where does the time go? `--profile`
#
# `torch.profiler` records training steps 2 to 5 of the first epoch and writes a trace
# that https://ui.perfetto.dev (or `chrome://tracing`) opens, and a table of the most
# expensive operations (`top-ops-rank0.txt`).

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# !{sys.executable} ../scripts/train.py {common} --out {out_dir}-profile --profile > /dev/null
# print((Path(out_dir + "-profile") / "profile" / "top-ops-rank0.txt").read_text()[:1500])

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: the operations at the top of the table. On a CPU, the convolutions
# (`aten::mkldnn_convolution` and their backward) take most of the time: the model, not
# the input pipeline, is the limit here.
#
# On a GPU, do not judge by `nvidia-smi`'s utilisation. "GPU-Util" is the share of time in
# which *some* kernel was running, on any number of the GPU's cores: a small kernel that
# keeps one of 100+ multiprocessors busy counts as 100 %. It is a good alarm when it is
# low (the GPU waited for data), but near 100 % does not mean efficient use. The power
# draw against the card's limit (`nvidia-smi --query-gpu=power.draw,power.limit
# --format=csv`) and the images/s achieved, against what the benchmark lesson measures,
# say more; the profiler's trace shows which kernels ran.
#
# ## Exercise
#
# **1.** `--cache-features` runs the backbone once instead of once per epoch. In a
# 4-epoch run where the backbone is 95 % of every step's time (the head 5 %), about how
# many times faster is training with cached features? Round to one decimal.

# %% tags=["active-ipynb"]
# speedup = None  # your answer: a number

# %% tags=["active-ipynb"]
# expected = 4 * 1.0 / (0.95 + 4 * 0.05)
# if speedup is not None and abs(speedup - expected) < 0.1:
#     print(f"Correct: 4 epochs of full steps (4 x 1.0) against one backbone pass and 4 of the head "
#           f"(0.95 + 4 x 0.05): {expected:.1f}x.")
# else:
#     print("Not yet. Hint: without caching, each epoch costs 1.0 (backbone 0.95 + head 0.05); with caching, "
#           "the backbone runs once and the head every epoch.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# speedup = round(4 * 1.0 / (0.95 + 4 * 0.05), 1)
# ```
# </details>
#
# ## Appendix: the profiler's loader

# %%
PROFILED_STEPS = range(2, 5)  # the steps (from 0) of the first epoch that are recorded: after start-up and a warm-up


class FirstPassLoader:
    """The training loader, with something done around its first pass (`first_pass`); later passes are plain."""

    def __init__(self, loader):
        self.loader, self.done = loader, False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # a generator: the first pass starts at the first batch, not at iter() (tqdm calls it twice)
        if self.done:
            yield from self.loader
            return
        self.done = True
        yield from self.first_pass()

    def first_pass(self):
        raise NotImplementedError


class ProfiledLoader(FirstPassLoader):
    """The training loader, with torch.profiler recording the PROFILED_STEPS of its first pass."""

    def __init__(self, loader, directory: Path, device: torch.device, rank: int, log=print):
        super().__init__(loader)
        self.directory, self.device, self.rank, self.log = Path(directory), device, rank, log

    def first_pass(self):
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities, schedule=schedule(wait=1, warmup=PROFILED_STEPS.start - 1,
                                                                   active=len(PROFILED_STEPS), repeat=1),
                     on_trace_ready=self.save) as profiler:
            for batch in self.loader:
                yield batch
                profiler.step()

    def save(self, profiler) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / f"trace-rank{self.rank}.json"
        profiler.export_chrome_trace(str(trace))
        order = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.directory / f"top-ops-rank{self.rank}.txt").write_text(
            profiler.key_averages().table(sort_by=order, row_limit=15) + "\n")
        self.log(f"profiler trace written to {trace}: open it in https://ui.perfetto.dev")


# %% [markdown]
# ## Appendix: named phases for Nsight Systems (`--nvtx`)
#
# `torch.profiler` sees PyTorch's operations; NVIDIA's Nsight Systems (`nsys`) sees the whole
# process: CPU threads, CUDA kernels and copies, NCCL, the DataLoader's waits. With `--nvtx`
# the training loop names its phases with NVTX ranges (`torch.cuda.nvtx`), one after the
# other: `wait for data`, `copy to device`, `forward`, `backward` (under DDP the gradients'
# all-reduce runs during it, as NCCL kernels on a stream of their own), `optimizer step` and
# `bookkeeping` (the running sums, a progress line, and every few steps the stop check, an
# all-reduce under DDP). On CUDA it also calls `cudaProfilerStart` before the steps
# `--profile` records and `cudaProfilerStop` after them, so that
# `nsys profile --capture-range=cudaProfilerApi` keeps those few steps only (`slurm/env.sh`:
# `COURSE_NSYS=1`). Without `nsys` watching, both cost next to nothing; without `--nvtx`,
# a phase mark is a call to a function that returns at once.

# %%
def no_phase(name: str | None) -> None:
    """A phase mark without --nvtx: nothing to do."""


class NvtxPhases:
    """One NVTX range per phase: a mark ends the open range and opens the next (None: ends the last)."""

    def __init__(self, push=None, pop=None):
        self.push = push or torch.cuda.nvtx.range_push
        self.pop = pop or torch.cuda.nvtx.range_pop
        self.open = False

    def __call__(self, name: str | None) -> None:
        if self.open:
            self.pop()
        self.open = name is not None
        if self.open:
            self.push(name)


def nvtx_available() -> bool:
    """Whether this PyTorch has NVTX: CUDA builds do, even on a machine without a GPU; CPU-only builds do not."""
    return hasattr(torch._C, "_nvtx")


def step_phases(cfg):
    """What the training loop calls at each phase: NVTX ranges with --nvtx, else nothing."""
    return NvtxPhases() if getattr(cfg, "nvtx", False) and nvtx_available() else no_phase


class NsysWindow(FirstPassLoader):
    """The training loader, with cudaProfilerStart before the PROFILED_STEPS of its first pass and cudaProfilerStop
    after them: `nsys profile --capture-range=cudaProfilerApi` records those steps (CUDA only)."""

    def __init__(self, loader, start=None, stop=None):
        super().__init__(loader)
        self.start = start or torch.cuda.profiler.start
        self.stop = stop or torch.cuda.profiler.stop

    def first_pass(self):
        recording = False
        try:
            for step, batch in enumerate(self.loader):
                if step == PROFILED_STEPS.start:
                    self.start()
                    recording = True
                yield batch
                if step == PROFILED_STEPS[-1]:
                    self.stop()
                    recording = False
        finally:
            if recording:  # the epoch (or the run) ended inside the window
                self.stop()
