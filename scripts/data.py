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
# # 1. The data: from JPEG files to batches of tensors
#
# A GPU can only train as fast as it is fed. Before any model, we look at the dataset on
# disk, turn an image into the tensor a pretrained network expects, and measure how fast
# the `DataLoader` delivers batches.
#
# **You will learn to:**
# - read the dataset's layout and count its images per split and class
# - browse the images of one species
# - label images by class name, not by folder order
# - turn a JPEG into a tensor normalised as the ImageNet weights expect
# - set the `DataLoader`'s knobs, and choose `num_workers` from a measurement
#
# **Time:** about 30 minutes. The core path is everything up to the exercises; the section
# on staging is optional, and the appendix holds the support code behind the commands.
#
# **The dataset.** Kaggle's *BIRDS 525 SPECIES* has one folder per split and one folder
# per class, each holding 224×224 JPEGs, plus a `birds.csv` index:
#
# ```
# birds/
#   birds.csv                 class id, filepaths, labels, data set, scientific name
#   train/ABBOTTS BABBLER/001.jpg ...
#   valid/ABBOTTS BABBLER/1.jpg ...
#   test/ ...
# ```
#
# The real dataset needs a Kaggle account and 2 GB of download, so the course ships a
# **synthetic stand-in with exactly the same layout**: coloured bird shapes on textured
# backgrounds, one colour scheme per species. Everything below works on both. This
# notebook is also the command-line tool `scripts/data.py` (its commands: see the appendix).

# %% tags=["parameters", "active-ipynb"]
# # Papermill and the tests shrink these.
# data_dir = "../data/birds-synthetic"  # or the real dataset, e.g. "../data/birds"
# num_classes = 10  # only used when the synthetic data has to be made
# images_per_class = 40
# image_size = 224
# batch_size = 32
# max_workers = 4  # the largest num_workers tried in the measurement below
# batches_to_time = 20

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %% [markdown]
# Support code, collapsed (click the cell to open it): the imports, and the errors every
# script of the course reports in one line. A mistyped path raises `UserError` (or
# `DataError`), and `run_cli` prints its one-line message and exits with status 2 instead of
# a 40-line traceback; `atomic_write` writes a file so that a killed job never leaves half of it.

# %% jupyter={"source_hidden": true}
# The imports; UserError, DataError and run_cli (one-line errors); atomic_write.
from __future__ import annotations

import argparse
import csv
import errno
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler,
                              Sampler, SequentialSampler, default_collate)
from torchvision.transforms import v2 as T


class UserError(Exception):
    """A mistake the user can fix: bad path, bad option, missing download."""


class DataError(UserError):
    """The dataset on disk is missing, incomplete or broken."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run `main`; turn a UserError into one line on stderr and exit status 2."""
    # Slurm's time-limit warning (SIGUSR1, slurm/*.sbatch) reaches every process of a job; it
    # would kill a command that has nothing to save, such as staging or gathering. Training
    # installs its own handler (resilience.py: StopRequest).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # The work is done: a warning that comes now has nothing to save. Python resets its own
        # handlers to the default (which kills) while it shuts down; an ignored signal stays ignored.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.exit(status if isinstance(status, int) else 0)


def one_line(error: BaseException) -> str:
    """The error's message on one line, with nothing left out: the path at its start stays.

    A DataLoader worker re-raises an error with the worker's traceback before the message;
    then only the message after the traceback is kept, without its `module.Type: `.
    """
    text = str(error).strip()
    if "Traceback (most recent call last):" in text:
        lines = text.splitlines()
        after_frames = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1) + 1
        text = re.sub(r"^[\w.]+: ", "", "\n".join(lines[after_frames:]))
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # terminal colours (torch.load's errors have some)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename.

    A job killed half-way (time limit, preemption) leaves the old file intact, never a
    truncated one: a rename within one filesystem is atomic. The file is on the disk
    before the rename and the rename before this returns (fsync of both), so a crash of
    the node cannot leave an empty file under the new name. The file gets the permissions
    of any new file (the umask's), not mkstemp's private 0600, so that colleagues sharing
    a project directory can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)

    def fsync(target) -> None:  # a file's or a directory's contents to the disk
        descriptor = os.open(target, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    try:
        write(Path(tmp))
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def current_umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return umask


# %% [markdown] slideshow={"slide_type": "slide"}
# ## The dataset on disk
#
# The cell makes the synthetic stand-in when `data_dir` does not exist yet (for the real
# data, download it on a login node and set `data_dir` in the first cell), then counts the
# images with the command you would also run on the cluster before spending GPU hours:

# %% tags=["active-ipynb"]
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic "{data_dir}" --classes {num_classes} --train {images_per_class} --image-size {image_size}
# !{sys.executable} ../scripts/data.py verify "{data_dir}" --quick

# %% [markdown]
# Look at: three splits, the same number of classes in each, and the fewest and most
# images per class. `verify` without `--quick` also opens every image (appendix).
#
# The same count in Python, per class. `class_folders` and `image_files` (collapsed) list a
# split's class folders and a class's images. Not every folder is a class (JupyterLab
# creates `.ipynb_checkpoints` when you browse the data) and not every file is an image (a
# stray `README.txt`), so they leave out hidden entries and other suffixes.

# %% jupyter={"source_hidden": true}
SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_folders(split_dir: Path) -> list[Path]:
    """The class folders of one split, hidden folders left out."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    """The image files of one class folder, in a stable order."""
    return sorted(
        p for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# for split in SPLITS:
#     per_class = {folder.name: len(image_files(folder)) for folder in class_folders(Path(data_dir) / split)}
#     print(f"{split:5s}: {sum(per_class.values()):5d} images in {len(per_class)} classes:", dict(list(per_class.items())[:3]), "...")

# %% [markdown] slideshow={"slide_type": "subslide"}
# ### A browser for the images
#
# Choose a species: the grid shows its first training images. Look for what tells the
# species apart (colours of body, head and wing) and what does not (background, pose).

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# import ipywidgets as widgets
# from IPython.display import display
#
# folders = {folder.name: folder for folder in class_folders(Path(data_dir) / "train")}
# chooser = widgets.Dropdown(options=list(folders), description="species")
# grid = widgets.GridBox(layout=widgets.Layout(grid_template_columns="repeat(4, 120px)"))
#
#
# def show_class(name):
#     grid.children = [widgets.Image(value=path.read_bytes(), format="jpeg", width=112, height=112)
#                      for path in image_files(folders[name])[:8]]
#
#
# chooser.observe(lambda change: show_class(change["new"]), names="value")
# show_class(chooser.value)
# display(widgets.VBox([chooser, grid]))

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Labels come from class names, not folder order
#
# If each split numbered its own folders, one class missing from `valid/` would shift
# every label after it, and the validation accuracy would be nonsense. We number the
# classes of `train/` and look every other split up *by name*. In the real dataset a few
# folder names differ between splits only in white space (`"PARAKETT  AUKLET"` vs
# `"PARAKETT AUKLET"`), so names are compared after collapsing white space.

# %%
def class_key(folder_name: str) -> str:
    """The name that identifies a class: white space collapsed."""
    return " ".join(folder_name.split())


def find_classes(root: Path) -> list[str]:
    """Class names of the training split, sorted: index in this list = label."""
    return sorted({class_key(d.name) for d in class_folders(Path(root) / "train")})


def list_samples(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """(image path, label) pairs of one split, labels looked up by class name."""
    label_of = {name: i for i, name in enumerate(classes)}
    samples = []
    for folder in class_folders(Path(root) / split):
        key = class_key(folder.name)
        if key not in label_of:
            raise DataError(
                f"class '{key}' in {split}/ does not exist in train/: "
                f"remove {folder} or add its training images"
            )
        samples += [(path, label_of[key]) for path in image_files(folder)]
    return samples


# %% [markdown]
# The trap, shown: a `valid/` split that lacks the first class and spells every name with
# two spaces.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# classes = find_classes(data_dir)
# valid_folders = sorted(name.replace(" ", "  ") for name in classes[1:])
# for folder in valid_folders[:3]:
#     print(f"{folder!r:22} by folder order: {valid_folders.index(folder)}   by name: {classes.index(class_key(folder))}")

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: numbered by folder order, every label is one too small, so a model that is
# always right would score 0 %; looked up by name, each folder gets its class's label.
#
# ## From a JPEG to a tensor
#
# A pretrained ResNet was trained on ImageNet images that were scaled to [0, 1] and then
# **normalised with ImageNet's channel means and standard deviations**. The original
# workshop used `ToTensor()` alone, so the pretrained network saw inputs from a
# distribution it had never seen. We keep the normalisation; `augment` (random crops and
# flips, for training) is used later in the course.

# %% slideshow={"slide_type": "subslide"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(image_size: int = 224, augment: bool = False, normalize: bool = True) -> T.Compose:
    """PIL image -> float tensor of shape (3, image_size, image_size)."""
    steps: list = [T.PILToTensor()]  # uint8, no scaling yet
    if augment:
        steps += [T.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True), T.RandomHorizontalFlip()]
    steps.append(T.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


# %% [markdown]
# Support, collapsed: `load_rgb` opens an image with Pillow as RGB (the real dataset has a
# few greyscale and CMYK JPEGs) at the expected size (so that every batch stacks), and
# turns a broken or absurdly large file into a one-line error that names it.

# %% jupyter={"source_hidden": true}
# A file that claims a huge size is refused before it is decoded (a *decompression bomb*: a few
# kilobytes of PNG can claim 20000 x 20000 pixels, 1.2 GB once decoded, in every loader worker).
# The limit is 64 Mi pixels (8192 x 8192): photos from full-frame cameras fit (the largest have
# about 61 megapixels), and one image at the limit decodes to 192 MiB of RGB, so 16 workers
# decoding one each stay within about 3 GB. Pillow's default limit (89 million) only warns, and
# raises DecompressionBombError above twice that; here the limit itself is an error, and such a
# file counts as a broken image (`verify` lists it, `--skip-bad-images` skips it).
MAX_IMAGE_PIXELS = 64 * 2**20
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow raises DecompressionBombError above twice this, warns above it
# What reading a broken image raises: DecompressionBombError is neither an OSError nor a ValueError.
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_image(path: Path) -> Image.Image:
    """Image.open, which reads only the header; more than MAX_IMAGE_PIXELS is an error, not a warning.
    A member of a shard (appendix) is not a path: its bytes are read from the shard."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path if isinstance(path, (str, os.PathLike)) else io.BytesIO(path.read_bytes()))


def load_rgb(path: Path, image_size: int) -> Image.Image:
    """Open an image as RGB at image_size x image_size; a broken file names itself."""
    try:
        with open_image(path) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return image
    except BAD_IMAGE_ERRORS as error:
        raise DataError(
            f"cannot read image {path} ({error}): delete or replace it, run `python scripts/data.py "
            "verify` to list every broken file, or train with --skip-bad-images"
        ) from None


# %% tags=["active-ipynb"]
# image = load_rgb(list_samples(data_dir, "train", classes)[0][0], image_size)  # the first training image
# for normalize in (False, True):
#     tensor = build_transform(image_size, normalize=normalize)(image)
#     print(f"normalize={normalize!s:5}: {tuple(tensor.shape)} {tensor.dtype}, per-channel mean",
#           tensor.mean(dim=(1, 2)).numpy().round(2), "std", tensor.std(dim=(1, 2)).numpy().round(2))

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: the shape is (channels, height, width). Without normalisation every value lies
# in [0, 1]; with it, each value `x` of channel `c` becomes
# `(x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]`: check one channel's mean and std by hand.
# Over ImageNet's photos this gives every channel mean 0 and standard deviation 1; one
# image, and a synthetic one at that, can lie well away from it.
#
# ## The Dataset: an index, and item *i* on demand
#
# A `Dataset` needs `__len__` and `__getitem__`. Ours lists the `(path, label)` pairs once
# and opens an image only when an item is asked for, so that the images are decoded where
# the `DataLoader` asks for them: in its worker processes, in parallel.
#
# Support, collapsed: `check_dataset_root` and `split_samples` stop early, with the fix,
# when the directory or a split is missing or empty; the rest serves options taught later
# (`--augment`'s random draws after a resume, and `--skip-bad-images`, which counts
# unreadable images and leaves them out of their batch).

# %% jupyter={"source_hidden": true}
def check_dataset_root(root: Path) -> Path:
    """Fail early, with the fix, when the dataset directory is not usable."""
    root = Path(root).expanduser()
    hint = "make one with `python scripts/data.py synthetic DIR` or download it with `python scripts/data.py download DIR`"
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist: {hint}")
    if not (root / "train").is_dir():
        raise DataError(f"dataset directory {root} has no train/ folder: {hint}")
    if not class_folders(root / "train"):
        raise DataError(f"{root / 'train'} has no class folders: {hint}")
    return root


def split_samples(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """list_samples of a split that exists and holds images; otherwise a one-line error."""
    if not (root / split).is_dir():
        raise DataError(f"dataset directory {root} has no {split}/ folder")
    samples = list_samples(root, split, classes)
    if not samples:
        raise DataError(f"{root / split} holds no images (.jpg, .jpeg or .png)")
    return samples


def transform_with_seed(transform: Callable, image: Image.Image, draw_seed: int | None) -> torch.Tensor:
    """The transform; its random draws (--augment) from draw_seed when one is given."""
    if draw_seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):  # leaves this process's random stream as it was
        torch.manual_seed(draw_seed)
        return transform(image)


def skipping_options(decode_on_device: DecodeOnDevice | None, skip_bad: bool):
    """(counter of skipped images, collate function) of a split.

    --skip-bad-images: unreadable files are left out of their batch and counted, in a
    counter shared with the DataLoader's worker processes. --gpu-decode collates bytes.
    """
    skipped = multiprocessing.Value("i", 0) if skip_bad else None
    collate_fn = decode_on_device
    if skip_bad and decode_on_device is None:
        collate_fn = collate_readable
    return skipped, collate_fn


def count_skipped(skipped) -> None:
    """Count one unreadable image (--skip-bad-images); its item is None."""
    with skipped.get_lock():
        skipped.value += 1


def collate_readable(batch: list):
    """default_collate, leaving out the items of unreadable images (None)."""
    return default_collate([item for item in batch if item is not None])


# %%
class BirdImages(Dataset):
    """One split of the dataset: returns (image tensor, label)."""

    def __init__(self, root: Path, split: str, classes: list[str] | None = None,
                 image_size: int = 224, transform: Callable | None = None,
                 decode_on_device: DecodeOnDevice | None = None, skip_bad: bool = False):
        self.root = check_dataset_root(root)
        self.classes = classes if classes is not None else find_classes(self.root)
        self.samples = split_samples(self.root, split, self.classes)  # [(path, label), ...]
        self.image_size = image_size
        self.transform = transform or build_transform(image_size)
        self.decode_on_device = decode_on_device  # --gpu-decode (appendix): items are the files' bytes
        self.skipped, self.collate_fn = skipping_options(decode_on_device, skip_bad)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, draw_seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        if self.decode_on_device is not None:
            return path.read_bytes(), label  # bytes, not a tensor: cheap to pass between processes
        try:
            return transform_with_seed(self.transform, load_rgb(path, self.image_size), draw_seed), label
        except DataError:
            if self.skipped is None:
                raise
            return count_skipped(self.skipped)


# %% [markdown]
# `load_splits` (collapsed) makes the named splits at once, all labelled by the classes of
# `train/`, with augmentation for the training split only when asked for.

# %% jupyter={"source_hidden": true}
SHARD_INDEX = "index.json"  # what makes a directory a dataset in shards (appendix: `pack`)


def is_shard_dir(root: Path) -> bool:
    return (Path(root).expanduser() / SHARD_INDEX).is_file()


def load_splits(root: Path, image_size: int = 224, augment: bool = False,
                normalize: bool = True, splits=("train", "valid"),
                gpu_decode: bool = False, skip_bad: bool = False) -> dict[str, BirdImages]:
    """The named splits, all labelled by the training split's classes; from folders, or from shards."""
    if is_shard_dir(root):
        kind, classes = ShardedImages, read_shard_index(root)["classes"]
    else:
        kind, classes = BirdImages, find_classes(check_dataset_root(root))
    decode = DecodeOnDevice(image_size, normalize) if gpu_decode else None
    return {
        split: kind(root, split, classes, image_size,
                    build_transform(image_size, augment and split == "train", normalize), decode, skip_bad)
        for split in splits
    }


def available_splits(root: Path) -> tuple[str, ...]:
    """train and valid, and test when the dataset has a test split with images (it is optional)."""
    if is_shard_dir(root):
        has_test = read_shard_index(root)["splits"].get("test", {}).get("samples", 0) > 0
    else:
        test = Path(root).expanduser() / "test"
        has_test = test.is_dir() and any(image_files(folder) for folder in class_folders(test))
    return ("train", "valid", "test") if has_test else ("train", "valid")


# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# splits = load_splits(data_dir, image_size=image_size)
# image, label = splits["train"][0]
# print(f"{len(splits['train'])} training images; item 0:", tuple(image.shape), "label", label, "=", splits["train"].classes[label])

# %% [markdown] slideshow={"slide_type": "slide"}
# ## The DataLoader and its knobs
#
# The `DataLoader` decodes JPEGs in `num_workers` background processes while the GPU
# computes, and stacks the items into batches. Its knobs:
#
# | knob | what it does | our choice |
# |---|---|---|
# | `num_workers` | processes decoding images | in a job, every CPU the task may use; elsewhere (a laptop, a shared login node) the CPUs this process may use, at most 8 |
# | `pin_memory` | page-locked host memory: faster, asynchronous copies to the GPU | on with CUDA |
# | `persistent_workers` | keep workers alive between epochs instead of restarting them | on when there are workers |
# | `prefetch_factor` | batches each worker prepares ahead | 4 |
# | `drop_last` | leave out the epoch's last, smaller batch | no; but a training loader leaves out a last step of one image |
#
# **How many CPUs?** The ones this process may run on (`os.sched_getaffinity`): a cluster
# that binds tasks to cores shows there what Slurm really gave the task, which can be fewer
# than `SLURM_CPUS_PER_TASK` claims (since Slurm 22.05, `srun` gives each task of a step
# one core unless told otherwise; `slurm/env.sh` sets `SRUN_CPUS_PER_TASK`). PyTorch's
# compute threads need cores too: by default it starts one per core, and they fight the
# workers for them. `set_compute_threads` gives them what the workers leave, at least one,
# and every script prints the choice in its header line (`workers 2 | threads 1 (...)`).
#
# Support, collapsed: the `num_workers` and threads rules (`default_num_workers`,
# `set_compute_threads`), and
# `TrainingBatches`, which leaves out a training step of a single image (BatchNorm cannot
# normalise one image once a ResNet's feature maps are 1 x 1; validation never leaves out
# an image).

# %% jupyter={"source_hidden": true}
# A last batch of one image: when the training images do not fill the last batch and one image
# is left over, that step would train on one image. BatchNorm in training mode cannot normalise it
# once a ResNet's feature maps are 1 x 1 (images of 32 pixels or fewer:
# `models.resnet18().train()(torch.randn(1, 3, 32, 32))` fails with "Expected more than 1 value
# per channel when training"), and one image is a poor step anyway. A training loader (shuffled,
# or ordered by a DistributedSampler) leaves that step out; validation never leaves out an image.
# The step is counted over all processes: with DDP, each process holds its share of the global
# batch, and a DistributedSampler pads the epoch's end with repeats, so on several processes the
# same image is left out, by every process at the same step, as on one process with the global
# batch. DDP still equals one big batch, and `train_samples` counts the images that trained.
# A DistributedSampler repeats images to pad the epoch, so the course never validates with one.
def available_cpus() -> int:
    """CPUs this process may use: the cores it may run on (os.sched_getaffinity: Slurm's task
    binding, taskset, cgroups), at most what Slurm gave its task, and of those its share when
    torchrun started several processes in the task (LOCAL_WORLD_SIZE)."""
    cpus = len(os.sched_getaffinity(0))
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if allocated.isdigit():  # a cluster that does not bind tasks shows every core of the node
        cpus = min(cpus, int(allocated))
    sharing = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, cpus // int(sharing)) if sharing.isdigit() and int(sharing) > 0 else cpus


def default_num_workers() -> int:
    """The allocation is ours in a job: use it all. Elsewhere, leave cores to the others."""
    in_job = os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit()
    return available_cpus() if in_job else min(8, available_cpus())


def set_compute_threads(workers: int) -> str:
    """PyTorch's compute threads: the CPUs this process may use minus its DataLoader workers, at
    least 1 (OMP_NUM_THREADS, when set, wins). Returns the choice for the header line."""
    cpus, forced = available_cpus(), os.environ.get("OMP_NUM_THREADS", "")
    if forced.isdigit() and int(forced) > 0:
        threads, why = int(forced), "OMP_NUM_THREADS"
    else:
        threads, why = max(1, cpus - workers), f"{cpus} CPUs - {workers} workers"
    torch.set_num_threads(threads)
    return f"threads {threads} ({why})"


class TrainingBatches(BatchSampler):
    """The batches of a training order, without an epoch's last step of one image.

    The step is counted over all processes (a DistributedSampler's `num_replicas`), so
    every rank leaves it out or none does, and the ranks together leave out the image that
    one process with the global batch leaves out.
    """

    def __init__(self, sampler, batch_size: int, dataset_size: int):
        super().__init__(sampler, batch_size, drop_last=False)
        global_batch = batch_size * getattr(sampler, "num_replicas", 1)
        self.lone_last = batch_size > 1 and dataset_size % global_batch == 1

    def __iter__(self):
        for batch in super().__iter__():
            if not (self.lone_last and len(batch) == 1):  # only the last batch can be smaller
                yield batch

    def __len__(self) -> int:  # the sampler's length now: after a mid-epoch resume, the rest of the epoch
        return super().__len__() - int(self.lone_last and len(self.sampler) % self.batch_size == 1)


class ShardSampler(Sampler):
    """Indices rank, rank + world, rank + 2*world, ...: each index on exactly one rank.

    For validation under DDP: a DistributedSampler pads the epoch with repeats so that every
    rank gets as many images, which would count some validation images twice."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# %% slideshow={"slide_type": "subslide"}
def make_loader(dataset: Dataset, batch_size: int, workers: int, *, shuffle: bool = False,
                sampler=None, drop_last: bool = False, pin_memory: bool | None = None,
                prefetch_factor: int = 4, persistent_workers: bool = True, collate_fn=None) -> DataLoader:
    """A DataLoader with the knobs above; a shuffled or distributed order is a training order (TrainingBatches)."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    order = sampler if sampler is not None else RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    if isinstance(order, (RandomSampler, DistributedSampler)) and not drop_last:
        batches = TrainingBatches(order, batch_size, len(dataset))
    else:
        batches = BatchSampler(order, batch_size, drop_last)
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers} if workers > 0 else {}
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=collate_fn or getattr(dataset, "collate_fn", None), **extra)


# %% tags=["active-ipynb"]
# loader = make_loader(splits["train"], batch_size, workers=0, shuffle=True)
# images, labels = next(iter(loader))
# print("one batch: images", tuple(images.shape), images.dtype, "| labels", tuple(labels.shape), labels[:8].tolist())

# %% [markdown] slideshow={"slide_type": "subslide"}
# Look at: a batch is one tensor of shape (batch, channels, height, width) and one tensor of
# labels; shuffled, the labels of a batch are mixed.
#
# ### How many workers? Measured
#
# We time the loader alone for several `num_workers`. With 0 the training process
# decodes every JPEG itself; each worker adds a decoder until the CPUs run out.

# %% tags=["active-ipynb"]
# import matplotlib.pyplot as plt
#
#
# def loader_images_per_second(workers, batches):
#     set_compute_threads(workers)  # the main process's threads get the cores the workers leave
#     loader = make_loader(splits["train"], batch_size, workers, shuffle=True, persistent_workers=False)
#     it = iter(loader)
#     next(it)  # start-up (worker processes) is not what we measure
#     started, seen = time.perf_counter(), 0
#     for _, (images, _) in zip(range(batches), it):
#         seen += len(images)
#     return seen / (time.perf_counter() - started)
#
#
# worker_counts = sorted({0, 1, 2, min(max_workers, available_cpus())})
# rates = [loader_images_per_second(w, batches_to_time) for w in worker_counts]
# plt.bar([str(w) for w in worker_counts], rates)
# plt.xlabel("num_workers"); plt.ylabel("images/s"); plt.title(f"input pipeline, {available_cpus()} CPUs")
# plt.show()

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: whether images/s grows with the workers, and where it stops. It need not grow:
# each batch a worker makes is handed to the training process, and with small images (the
# tests use 32 pixels) on a few shared CPUs that hand-over costs more than the decoding it
# spreads out. Measure on the cluster's nodes, at the real image size.
#
# ## Staging the data to node-local disk (optional)
#
# A parallel filesystem (Lustre, GPFS) is fast for big files and slow for many small
# ones: every JPEG costs a metadata lookup on a server shared by the whole cluster, and
# the real dataset has about 90 000 of them (`verify --quick` counts them). So every job
# of this course first copies the dataset once to the node's local disk (`$TMPDIR`, or
# `/tmp`) and trains from there:
#
# ```bash
# DATA=$(python scripts/data.py stage data/birds)   # copies (or extracts an archive), prints the new path
# python scripts/train.py --data "$DATA" ...
# ```
#
# A second task on the same node reuses the copy, and a stale copy is staged again.
# Because the staging directory is shared with other jobs, `stage` never deletes what it
# did not make; its rules and code are in the appendix.
#
# ### A few large files instead of many small ones: shards (optional)
#
# Copying 90 000 files still costs 90 000 lookups on the shared filesystem, in every job.
# `pack` writes each split once as a few large tar files, *shards* (the WebDataset layout:
# `<key>.jpg` and `<key>.cls` per image, and an `index.json` with the classes and counts).
# A shard directory is a dataset like any other: `stage` copies it, and every script
# trains from it with `--data`, with the same labels, the same validation counts, and
# exact resume (appendix).

# %% tags=["active-ipynb"]
# shards_dir = f"{data_dir}-shards"
# if not Path(shards_dir).exists():
#     !{sys.executable} ../scripts/data.py pack "{data_dir}" "{shards_dir}" --shard-size 1MB
# index = json.loads((Path(shards_dir) / "index.json").read_text())
# for split, entry in index["splits"].items():
#     print(f"{split:5s}: {entry['samples']:5d} images in {len(entry['shards'])} shard(s):",
#           ", ".join(shard["name"] for shard in entry["shards"][:3]), "...")

# %% [markdown]
# Look at: a handful of files per split instead of one per image, and the same image
# counts as `verify` printed at the start. What it buys, measured on the course's test
# machine with `python scripts/data.py measure-io --files 20000` (seconds, medians of 3,
# cold page cache; one local disk, so no metadata server: on Lustre or GPFS the gap is
# larger; `docs/performance.md` has the whole table, the method and the citations):
#
# | layout | stage | open and read one epoch's bytes |
# |---|---|---|
# | 20,000 files | 32.3 | 5.5 |
# | 1 shard of the same images | 0.10 | 1.7 |
#
# ## Exercises
#
# **1.** With `batch_size` images per batch and `drop_last=False`, how many batches does one
# epoch over the training split take? Compute it from the dataset size, without the loader.

# %% tags=["active-ipynb"]
# batches_per_epoch = None  # your answer: an expression using len(splits["train"]) and batch_size

# %% tags=["active-ipynb"]
# expected = len(make_loader(splits["train"], batch_size, 0))
# if batches_per_epoch == expected:
#     print(f"Correct: {expected} batches.")
# else:
#     print("Not yet. Hint: the last batch may be smaller than the others; think of rounding up.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# batches_per_epoch = -(-len(splits["train"]) // batch_size)  # ceil division
# ```
# </details>
#
# **2.** After normalisation, what value does the red channel of a pure white pixel have?
# Write it as an expression using `IMAGENET_MEAN` and `IMAGENET_STD`.

# %% tags=["active-ipynb"]
# white_red = None  # your answer: an expression using IMAGENET_MEAN[0] and IMAGENET_STD[0]

# %% tags=["active-ipynb"]
# white = build_transform(image_size)(Image.new("RGB", (image_size, image_size), (255, 255, 255)))
# if isinstance(white_red, (int, float)) and abs(white_red - white[0, 0, 0].item()) < 1e-4:
#     print(f"Correct: {white_red:.3f}, far above anything a [0, 1] input would give.")
# else:
#     print("Not yet. Hint: the pixel is 1.0 after scaling; Normalize computes (x - mean) / std per channel.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# white_red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
# ```
# </details>
#
# **Discuss:** Look at the plot: which `num_workers` would you ask Slurm for with
# `--cpus-per-task`, and why does adding more stop helping?
#
# <details><summary>Model answer</summary>
#
# Ask for about as many CPUs as the workers that still raise images/s in the plot,
# measured on the cluster's nodes at the real image size, not on a laptop. Each worker is a
# process that decodes JPEGs on one CPU, so the rate grows with the workers until the CPUs
# are all busy; more workers than CPUs only take turns on the same CPUs (and the training
# process needs one too). Before that, the disk, or a GPU that cannot take batches any
# faster, can be the limit; and with tiny images, handing batches between processes costs
# more than decoding them. In a job, `default_num_workers()` uses every CPU of
# `--cpus-per-task`.
# </details>

# %% [markdown]
# ## Appendix: the synthetic stand-in
#
# Each species gets a body colour, a head colour and a wing pattern; each image puts one
# bird, at a random place, size and orientation, on a random textured background
# (foliage, sky or bark). A model must look at the bird, not the background, to tell the
# classes apart. The images are deterministic: the same seed gives the same bytes.

# %%
COLOUR_WORDS = ["AZURE", "CRIMSON", "GOLDEN", "OLIVE", "SCARLET", "COBALT", "AMBER", "JADE",
                "RUSSET", "VIOLET", "IVORY", "EMERALD", "SAFFRON", "SLATE", "CORAL", "TAWNY",
                "INDIGO", "LIME", "MAROON", "TEAL"]
BIRD_WORDS = ["FINCH", "WARBLER", "TANAGER", "BABBLER", "SHRIKE", "THRUSH", "KINGFISHER",
              "ORIOLE", "SPARROW", "PITTA", "SUNBIRD", "FLYCATCHER", "BUNTING", "ROBIN",
              "WREN", "JAY", "LARK", "PIPIT", "VIREO", "MANAKIN"]


def synthetic_class_names(n: int) -> list[str]:
    if not 2 <= n <= len(COLOUR_WORDS) * len(BIRD_WORDS):
        raise UserError(f"--classes must be between 2 and {len(COLOUR_WORDS) * len(BIRD_WORDS)}, got {n}")
    return [f"{COLOUR_WORDS[i % 20]} {BIRD_WORDS[(i // 20 + i) % 20]}" for i in range(n)]


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def species_colours(label: int) -> dict:
    """Body, head and wing colours of one species: hues spread by the golden ratio."""
    hue = (label * 0.618034) % 1.0
    return {"body": hsv(hue, 0.85, 0.95), "head": hsv(hue + 0.5 * (label % 3) / 3 + 0.33, 0.8, 0.9),
            "wing": hsv(hue, 0.9, 0.45 + 0.25 * (label % 2)), "striped": label % 4 >= 2}


def draw_background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choice(["foliage", "sky", "bark"])
    base = {"foliage": hsv(0.28 + rng.uniform(-0.05, 0.05), 0.5, 0.45),
            "sky": hsv(0.58 + rng.uniform(-0.04, 0.04), 0.35, 0.85),
            "bark": hsv(0.08 + rng.uniform(-0.03, 0.03), 0.45, 0.35)}[kind]
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    for _ in range(25):  # texture: leaves, clouds or grain
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 40, size / 8)
        shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
        draw.ellipse([x - r, y - r / 2, x + r, y + r / 2], fill=shade)
    branch_y = rng.uniform(0.55, 0.9) * size  # a branch for the bird to sit on
    draw.line([(0, branch_y), (size, branch_y + rng.uniform(-0.1, 0.1) * size)],
              fill=hsv(0.07, 0.6, 0.25), width=max(1, size // 30))
    return image.filter(ImageFilter.GaussianBlur(radius=size / 200))


def draw_bird(image: Image.Image, rng: random.Random, label: int) -> None:
    size = image.size[0]
    colours = species_colours(label)
    scale = rng.uniform(0.17, 0.24) * size  # head and tail reach 2 x scale out: stays in frame
    facing = rng.choice([-1, 1])
    cx, cy = (0.5 - facing * rng.uniform(0.0, 0.06)) * size, rng.uniform(0.35, 0.6) * size
    draw = ImageDraw.Draw(image)
    draw.ellipse([cx - scale, cy - scale * 0.55, cx + scale, cy + scale * 0.55], fill=colours["body"])
    draw.ellipse([cx - scale * 0.6, cy - scale * 0.35, cx + scale * 0.4, cy + scale * 0.3], fill=colours["wing"])
    if colours["striped"]:
        for k in range(3):
            x = cx - scale * 0.4 + k * scale * 0.25
            draw.line([(x, cy - scale * 0.3), (x, cy + scale * 0.25)], fill=colours["body"], width=max(1, size // 60))
    hx, hy, hr = cx + facing * scale * 0.95, cy - scale * 0.45, scale * 0.38
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=colours["head"])
    draw.polygon([(hx + facing * hr * 0.8, hy - hr * 0.25), (hx + facing * hr * 1.7, hy),
                  (hx + facing * hr * 0.8, hy + hr * 0.25)], fill=(240, 200, 40))
    draw.ellipse([hx + facing * hr * 0.3 - hr * 0.15, hy - hr * 0.35, hx + facing * hr * 0.3 + hr * 0.15,
                  hy - hr * 0.05], fill=(10, 10, 10))
    tail = [(cx - facing * scale * 0.9, cy), (cx - facing * scale * 1.5, cy - scale * 0.2),
            (cx - facing * scale * 1.5, cy + scale * 0.35)]
    draw.polygon(tail, fill=colours["wing"])


def synthetic_image(label: int, index: int, split: str, size: int, seed: int) -> Image.Image:
    """One deterministic image: its own RNG, so the order of generation does not matter."""
    key = f"{seed}/{split}/{label}/{index}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    image = draw_background(rng, size)
    draw_bird(image, rng, label)
    return image


def make_synthetic(root: Path, classes: int = 10, per_class: tuple[int, int, int] = (40, 10, 10),
                   image_size: int = 224, seed: int = 0) -> Path:
    """Write the Kaggle layout: train/ valid/ test/ of class folders, and birds.csv."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not empty: choose a new directory or delete it")
    names = synthetic_class_names(classes)
    rows = []
    for split, count in zip(SPLITS, per_class):
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                relative = f"{split}/{name}/{index + 1:03d}.jpg"
                synthetic_image(label, index, split, image_size, seed).save(root / relative, quality=90)
                rows.append([label, relative, name, split, f"Avis {name.split()[1].lower()} {name.split()[0].lower()}"])
    atomic_write(root / "birds.csv", lambda tmp: write_csv(tmp, rows))
    return root


def write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class id", "filepaths", "labels", "data set", "scientific name"])
        writer.writerows(rows)


# %% [markdown]
# ## Appendix: checking a dataset before spending GPU hours on it (`verify`)
#
# `verify` counts the images of every split and class, checks that every class of
# `valid/` and `test/` exists in `train/`, and opens every image. It exits non-zero when
# anything is wrong, so a job script can run it first.

# %%
def verify_dataset(root: Path, open_images: bool = True) -> tuple[dict, list[str]]:
    """Counts per split and class, and a list of problems (empty when all is well)."""
    root = check_dataset_root(root)
    train_classes = set(find_classes(root))
    counts: dict[str, Counter] = {}
    problems = []
    for split in SPLITS:
        if not (root / split).is_dir():
            problems.append(f"missing split folder {split}/")
            continue
        counts[split] = Counter()
        for folder in class_folders(root / split):
            key = class_key(folder.name)
            if key not in train_classes:
                problems.append(f"class '{key}' in {split}/ does not exist in train/")
            files = image_files(folder)
            counts[split][key] += len(files)
            if not files:
                problems.append(f"{split}/{folder.name}/ holds no images")
            problems += [problem for path in (files if open_images else []) if (problem := image_problem(path))]
    return counts, problems


def image_problem(path: Path) -> str | None:
    """Why an image cannot be read, or None."""
    try:
        with open_image(path) as image:
            image.load()
    except BAD_IMAGE_ERRORS as error:
        return f"unreadable image {path}: {error}"
    return None


# %% [markdown]
# ## Appendix: getting the real data, safely (`download`)
#
# `download` uses Kaggle's public API with your credentials (`~/.kaggle/kaggle.json`, or
# `KAGGLE_USERNAME` and `KAGGLE_KEY`). Run it on a **login node**: compute nodes usually
# have no internet. A malicious archive must not overwrite your `~/.bashrc`: a tar archive
# is extracted with tarfile's `filter="data"`, which refuses members that would land
# outside the target (`../` paths, links pointing out, device files); a zip archive is
# refused when a member climbs out with `..`, has an absolute path or is a link (zipfile
# itself would only rename such a member quietly). An archive is also refused when a member
# is both a file and a folder, when it is damaged (a bad CRC, a truncated download), and
# when it would not fit on the disk once extracted. Either way it is extracted into a hidden
# temporary folder and moved into place only when complete: a refused or damaged archive
# leaves nothing behind.

# %%
KAGGLE_DATASET_URL = "https://www.kaggle.com/api/v1/datasets/download/gpiosenka/100-bird-species"


def kaggle_credentials() -> tuple[str, str] | None:
    """(username, key) from the environment or ~/.kaggle/kaggle.json, else None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"]
    path = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    if not path.is_file():
        return None
    if path.stat().st_mode & 0o077:
        print(f"warning: {path} is readable by others: run `chmod 600 {path}`", file=sys.stderr)
    try:
        data = json.loads(path.read_text())
        return data["username"], data["key"]
    except (ValueError, KeyError):
        raise UserError(f"{path} is not a Kaggle credentials file with 'username' and 'key'") from None


def unsafe_member(name: str, is_link: bool = False) -> str | None:
    """Why a zip member must not be extracted, or a shard's member read, or None when it is safe.
    (A tar archive's members are checked by tarfile's "data" filter as they are extracted:
    extract_archive.)"""
    if is_link:
        return "is a link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "climbs out with '..'"
    return None


class Member(NamedTuple):
    name: str
    is_dir: bool
    size: int  # bytes once extracted


# What reading a damaged archive raises (gzip.BadGzipFile is an OSError, so it comes first).
DAMAGED_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                          gzip.BadGzipFile)


@contextmanager
def damaged_archive_errors(archive: Path, fix: str = "download it again"):
    """Turn the errors of a truncated or corrupt archive into one line."""
    try:
        yield
    except DAMAGED_ARCHIVE_ERRORS as error:
        raise DataError(f"{archive} is damaged ({type(error).__name__}: {error}): {fix}") from None


def archive_members(archive: Path) -> list[Member]:
    """The members of a .zip or .tar(.gz), checked: no zip member escapes, none is both file and folder."""
    with damaged_archive_errors(archive):
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    reason = unsafe_member(info.filename, (info.external_attr >> 16) & 0o170000 == 0o120000)
                    if reason:
                        raise UserError(f"refusing to extract {archive}: member '{info.filename}' {reason}")
                members = [Member(m.filename, m.is_dir(), m.file_size) for m in zf.infolist()]
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = [Member(m.name, m.isdir(), m.size) for m in tf.getmembers()]
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive, or it is damaged: "
                            "give the dataset directory or its .zip or .tar.gz archive, or download it again")
    check_no_clash(archive, members)
    return members


def check_no_clash(archive: Path, members: list[Member]) -> None:
    paths = [PurePosixPath(m.name.replace("\\", "/")) for m in members]
    files = {path for path, member in zip(paths, members) if not member.is_dir}
    folders = {path for path, member in zip(paths, members) if member.is_dir}
    folders.update(parent for path in paths for parent in path.parents if parent != PurePosixPath("."))
    clashes = sorted(files & folders)
    if clashes:
        raise DataError(f"refusing to extract {archive}: member '{clashes[0]}' is both a file and a folder "
                        "(a damaged archive): download it again")


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a checked archive (see archive_members) into target, a temporary folder (see
    partial_folder): a tar member that the "data" filter refuses stops it half-way."""
    with damaged_archive_errors(archive):
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(target)
        else:
            with tarfile.open(archive) as tf:
                try:
                    tf.extractall(target, filter="data")
                except tarfile.FilterError as error:  # a TarError too: not "damaged"
                    raise UserError(f"refusing to extract {archive}: member {error}") from None


@contextmanager
def partial_folder(parent: Path, name: str):
    """A new hidden folder in parent to fill; if the block fails, it (and only it) is removed."""
    partial = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .zip or .tar(.gz) into target, all or nothing: nothing in target is replaced."""
    archive, target = Path(archive), Path(target)
    needed = space_needed(m.size for m in archive_members(archive))
    check_free_space(target, needed, f"extracting {archive}", "free space there or download to another directory")
    with partial_folder(target, "extracting") as partial:
        extract_archive(archive, partial)
        extracted = sorted(partial.iterdir())
        taken = [target / item.name for item in extracted if (target / item.name).exists()]
        if taken:
            raise DataError(f"{taken[0]} exists, and {archive} holds another: move it away or download to "
                            "another directory")
        for item in extracted:
            os.replace(item, target / item.name)
    partial.rmdir()


def space_needed(sizes: Iterable[int]) -> int:
    """Bytes on disk for files of these sizes: each takes whole 4 KiB blocks."""
    return sum(-(-size // 4096) * 4096 for size in sizes)


def free_space(directory: Path) -> int:
    """Free bytes on the disk that holds directory, or would hold it once created."""
    directory = Path(directory).absolute()
    while not directory.exists():
        directory = directory.parent
    return shutil.disk_usage(directory).free


def in_megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def check_free_space(directory: Path, needed: int, what: str, fix: str) -> None:
    free = free_space(directory)
    if needed > free:
        raise DataError(f"not enough space on {directory} for {what} (needs {in_megabytes(needed)}, "
                        f"{in_megabytes(free)} free): {fix}")


def find_dataset_root(directory: Path) -> Path:
    """The folder holding train/ (or shards): the archive may wrap everything in one more folder."""
    candidates = [directory] + sorted(p.parent for p in directory.glob("*/train") if p.is_dir())
    candidates += sorted(p.parent for p in directory.glob(f"*/{SHARD_INDEX}"))
    for candidate in candidates:
        if (candidate / "train").is_dir() or is_shard_dir(candidate):
            return candidate
    raise DataError(f"no train/ folder or {SHARD_INDEX} of shards found in {directory} after extraction")


def download_dataset(target: Path, url: str = KAGGLE_DATASET_URL, timeout: float = 30) -> Path:
    """Download the Kaggle archive and extract it into target."""
    credentials = kaggle_credentials()
    how = ("get a token at kaggle.com > Settings > API, save it as ~/.kaggle/kaggle.json "
           "(or set KAGGLE_USERNAME and KAGGLE_KEY), run this on a login node, "
           f"or download {url} by hand and run `python scripts/data.py stage ARCHIVE --to DIR`")
    if credentials is None and url.startswith("http"):
        raise UserError(f"no Kaggle credentials found: {how}")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url)
    if credentials:
        import base64
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    archive = target / "birds-download.zip.part"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError) as error:
        archive.unlink(missing_ok=True)
        raise UserError(f"cannot download the dataset ({getattr(error, 'reason', error)}): {how}") from None
    try:
        safe_extract(archive, target)
    finally:
        archive.unlink(missing_ok=True)
    return find_dataset_root(target)


# %% [markdown]
# ## Appendix: staging to node-local disk (`stage`)
#
# A parallel filesystem (Lustre, GPFS) is fast for big files and slow for many small
# ones: every JPEG costs a metadata lookup on a server shared by the whole cluster. A job
# copies the dataset once to the node's local disk (`$TMPDIR`, or `/tmp`) and reads from
# there. `stage` copies a directory or extracts an archive, and prints the new path.
#
# The staging directory is shared with other jobs, so `stage` must never cost data:
#
# * **The copy's name comes from the resolved source**: `stage .` inside `data/birds` and
#   `stage data/birds` both make `$TMPDIR/birds`; a hidden archive `.birds.zip` makes
#   `birds`. A source that leaves no name (`.zip`) is refused.
# * **It removes only what it made**: the copy grows in a hidden temporary folder and is
#   renamed into place when complete, so a half copy is never used; a failed copy removes
#   only that folder. An earlier copy is replaced only when it carries stage's `.staged`
#   marker; a folder of the same name without one is left alone and reported.
# * **A stale copy is staged again**: the marker records the source's path, its number of
#   files and bytes, and a digest of every file's name, size and modification time. That
#   costs one `stat` per file, no file content is read (hashing the contents would read
#   the whole dataset, as slow as copying it), and it sees a file changed, added,
#   removed or renamed, and another dataset with the same folder name.
#   `staged_copy_matches(source, staged)` answers the same question for a cache of copies.
# * **Links are copied as links and never followed**: a link loop cannot nest the copy 40
#   levels deep. A link must be relative and stay inside the dataset (so it works in the
#   copy); any other link is refused, since the copy would read through it from the
#   shared filesystem, or from outside the dataset.
# * **Disks fill up**: the space needed (or an archive's size once extracted) is checked
#   before copying, and a disk that is full, read-only or over quota is one line naming
#   it, with the space needed and free.

# %%
STAGE_ELSEWHERE = "free space there or stage elsewhere with --to DIR"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


class Entry(NamedTuple):
    relative: str  # path inside the source (an archive: its name)
    kind: str  # "dir", "file" or "link"
    size: int
    mtime_ns: int
    target: str = ""  # a link's target


def default_stage_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")


def staged_name(source: Path) -> str:
    """The staged copy's folder name: the resolved source's name without archive suffixes or leading dots."""
    name = source.name
    if source.is_file():
        name = next((name[:-len(s)] for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)), name)
    name = name.lstrip(".")
    if not name:
        raise DataError(f"cannot name the staged copy of {source} (its name is empty without dots and archive "
                        "suffixes): rename it, e.g. to birds.zip or birds/")
    return name


def list_source(source: Path) -> list[Entry]:
    """Everything stage copies, folders before what they hold; links are listed, not followed."""
    if source.is_file():
        info = source.stat()
        return [Entry(source.name, "file", info.st_size, info.st_mtime_ns)]
    entries, folders = [], [source]
    while folders:
        for item in sorted(os.scandir(folders.pop()), key=lambda item: item.name):
            path, info = Path(item.path), item.stat(follow_symlinks=False)
            relative = str(path.relative_to(source))
            if item.is_symlink():
                entries.append(Entry(relative, "link", 0, info.st_mtime_ns, link_inside(source, path)))
            elif item.is_dir(follow_symlinks=False):
                entries.append(Entry(relative, "dir", 0, 0))
                folders.append(path)
            elif item.is_file(follow_symlinks=False):
                entries.append(Entry(relative, "file", info.st_size, info.st_mtime_ns))
            else:
                raise DataError(f"{path} is not a file, folder or link: remove it from the dataset")
    return entries


def link_inside(root: Path, link: Path) -> str:
    """The target of a link that is relative and stays inside root (so it works in the copy)."""
    target = os.readlink(link)
    if os.path.isabs(target) or not Path(os.path.realpath(link)).is_relative_to(root):
        raise DataError(f"{link} is a link to {target}, outside the dataset or absolute, which a staged copy cannot "
                        "hold: replace links by the files, e.g. `cp -rL DATASET COPY`, and stage the copy")
    return target


def source_identity(source: Path, entries: list[Entry]) -> dict:
    """What the .staged marker records about the source: see the list above."""
    manifest = "".join(f"{e.relative}\0{e.kind}\0{e.size}\0{e.mtime_ns}\0{e.target}\n" for e in entries)
    return {"source": str(source), "files": sum(e.kind == "file" for e in entries),
            "bytes": sum(e.size for e in entries),
            "manifest_sha256": hashlib.sha256(manifest.encode("utf-8", "surrogateescape")).hexdigest()}


def read_marker(staged: Path) -> dict | None:
    """The source identity recorded in a staged copy, or None."""
    try:
        return json.loads((staged / ".staged").read_text())
    except (OSError, ValueError):  # no copy, or the marker of an older version of this course
        return None


def staged_copy_matches(source: Path, staged: Path) -> bool:
    """Whether staged is a finished copy of source as source is now (one stat per file of source)."""
    source = Path(source).expanduser().resolve()
    return read_marker(staged) == source_identity(source, list_source(source))


def stage_dataset(source: Path, destination: Path | None = None) -> Path:
    """Copy or extract the dataset under destination; reuse an earlier copy of the source as it is now."""
    source = Path(source).expanduser().resolve()  # `.` and `..` get their real names
    if not source.exists():
        raise DataError(f"{source} does not exist: give the dataset directory or its archive")
    destination = Path(destination or default_stage_dir()).expanduser().resolve()
    staged = destination / staged_name(source)
    if source.is_relative_to(staged) or staged.is_relative_to(source):
        raise DataError(f"staging {source} to {staged} would copy it onto or into itself: "
                        "stage to another directory with --to DIR")
    entries = list_source(check_stage_source(source) if source.is_dir() else source)
    identity, needed = source_identity(source, entries), None
    try:
        destination.mkdir(parents=True, exist_ok=True)
        # Several tasks on one node may stage at once: the first copies, the others wait for it.
        with open(destination / f".{staged.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if read_marker(staged) != identity:  # else: a copy of this source from an earlier task or step
                discard_stale_copy(staged)
                if source.is_dir():
                    needed = space_needed(e.size for e in entries)
                    check_free_space(destination, needed, f"a copy of {source}", STAGE_ELSEWHERE)
                    fill_atomically(staged, identity, lambda partial: copy_entries(source, entries, partial))
                else:
                    needed = space_needed(m.size for m in archive_members(source))
                    check_free_space(destination, needed, f"extracting {source}", STAGE_ELSEWHERE)
                    fill_atomically(staged, identity, lambda partial: extract_archive(source, partial))
    except OSError as error:
        raise staging_error(error, destination, needed) from None
    return find_dataset_root(staged)


def discard_stale_copy(staged: Path) -> None:
    """Remove an earlier copy made by stage; refuse to touch anything else."""
    if not (staged.exists() or staged.is_symlink()):
        return
    if staged.is_symlink() or not (staged / ".staged").is_file():
        raise DataError(f"{staged} exists and is not a copy made by stage: move it away or stage elsewhere with --to DIR")
    # Renamed first: a kill half-way through the removal leaves a hidden folder, never a copy
    # that looks finished.
    aside = Path(tempfile.mkdtemp(dir=staged.parent, prefix=f".{staged.name}.stale."))
    os.replace(staged, aside)
    shutil.rmtree(aside)


def fill_atomically(staged: Path, identity: dict, fill: Callable[[Path], None]) -> None:
    """fill() a hidden temporary folder, mark it, rename it to staged; on any failure remove only that folder."""
    def fill_and_mark(partial: Path) -> None:
        fill(partial)
        (partial / ".staged").write_text(json.dumps(identity) + "\n")

    fill_new_folder(staged, fill_and_mark)


def fill_new_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """fill() a hidden temporary folder next to target, then rename it to target (absent or empty): all or
    nothing, a half copy is never used; on any failure only that temporary folder is removed."""
    with partial_folder(target.parent, target.name) as partial:
        fill(partial)
        os.replace(partial, target)


def check_stage_source(source: Path) -> Path:
    """A dataset directory stage may copy: the Kaggle layout, or shards (their index must be readable)."""
    if is_shard_dir(source):
        read_shard_index(source)
        return source
    return check_dataset_root(source)


def copy_entries(source: Path, entries: list[Entry], target: Path) -> None:
    """Copy what list_source listed. The first error stops the copy (shutil.copytree would try
    every other file too, and report every failure in one enormous message)."""
    for entry in entries:
        path = target / entry.relative
        if entry.kind == "dir":
            path.mkdir()
        elif entry.kind == "link":
            os.symlink(entry.target, path)
        else:
            shutil.copy2(source / entry.relative, path)


def staging_error(error: OSError, destination: Path, needed: int | None) -> DataError:
    """One line for a failed copy: which disk or path, the space needed and free, and what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"the copy needs {in_megabytes(needed)}, " if needed is not None else ""
        return DataError(f"{destination} is full ({error.strerror}; {need}{in_megabytes(free_space(destination))} "
                         f"free): {STAGE_ELSEWHERE}")
    path = Path(os.fsdecode(error.filename2 or error.filename or destination))
    if path.is_relative_to(destination) or destination.is_relative_to(path):
        return DataError(f"cannot write to {path} ({error.strerror}): stage to a writable directory with --to DIR")
    return DataError(f"cannot read {path} ({error.strerror}): check that you may read the whole dataset")


# %% [markdown]
# ## Appendix: the dataset in a few large files (`pack`, shards)
#
# A parallel filesystem serves a few large files far better than ~90 000 small ones: each
# small file costs its metadata server a lookup and an open, for every job and every
# epoch. `pack` writes each split as a few large tar files, *shards*, in the WebDataset
# layout: each image is a member `<key>.jpg` (or `.png`), followed by `<key>.cls`, its
# label as a decimal number. A small `index.json` holds the class names (label = position),
# each split's shards with their sizes and image counts, the images per class, and what was
# left out:
#
# ```
# birds-shards/
#   index.json            format, classes, splits: shards (name, samples, bytes), per_class; skipped
#   train-00000.tar ...   00000000.jpg 00000000.cls 00000001.jpg 00000001.cls ...
#   valid-00000.tar
#   test-00000.tar
# ```
#
# * **Deterministic**: the images are shuffled with `--seed` before they are cut into
#   shards (the Kaggle layout is sorted by class, and a shard of one class would make
#   poor batches); keys are their positions; every tar header has the same owner, mode and
#   time; so the same input gives the same bytes.
# * **Safe**: a link out of the dataset, or a class or file name with control characters
#   or invalid UTF-8, is refused; everything that is not an image of a class folder of a
#   split (`birds.csv`, notes, hidden files) is left out and listed. Reading refuses a shard
#   whose size differs from the index's (truncated), a member that is not a plain file
#   `<key>.<jpg|png|cls>` (`../`, links, folders), and a shard whose images and labels do
#   not pair up: each one line naming the shard.
# * **Written with the standard library's `tarfile`**, not `webdataset`: the format is
#   plain tar (`tar tf` lists it; the layout is the one WebDataset's readers expect, not
#   tested here since `webdataset` is not installed). `webdataset`'s pipeline streams
#   shards in order; its indexed reader `wids` gives random access, with a JSON list of
#   the shards much like `index.json`, and caches shards it downloads. What the course
#   needs, deterministic tars, each member read by its offset and every member checked,
#   is a few dozen lines of `tarfile`: one dependency and one pin in `requirements.txt`
#   and `environment.yml` less.
#
# **How training reads them.** `ShardedImages` scans each shard's tar headers once
# (a 512-byte header per member, no image is read) and keeps every image's offset and
# size; an item is then one `os.pread` from a shard opened once per process. So it is the
# same map-style dataset as `BirdImages`, and everything built on it stays as it is: the
# `DataLoader`'s workers, `--augment`'s seeds, `--skip-bad-images`, `--gpu-decode`, the
# cached features, and the validation sampler that gives every image to exactly one rank.
# What changes is the **training order**: instead of a random permutation of all images
# (a random read anywhere in the dataset for every image), `shuffled_order` takes the
# shards in a random order and each shard's images in a random order, both drawn from the
# seed and the epoch. Each rank takes every `world_size`-th image of that order, as
# `DistributedSampler` does, so a global batch comes from one or two shards, and
# the reads of every rank and worker stay within the same large file at a time.
#
# Why not an `IterableDataset` that gives whole shards to ranks and workers (WebDataset's
# way): then a rank's images, and so its batches, depend on the number of ranks and of
# loader workers, the ranks' shares differ by up to a shard (DDP needs the same number of
# steps on every rank), and a mid-epoch resume must replay each worker's stream. With the
# order above, as with folders, DDP equals one process with the global batch, the order
# does not depend on `--workers`, every validation image counts once for any world size,
# and a mid-epoch resume is exact (the sampler skips the steps done). A checkpoint records
# which order it was written with (`data_order`: `files`, or the shards' index digest), so
# a mid-epoch resume on other data (folders instead of shards, or another pack) is refused
# in one line; at an epoch's end it may change.

# %%
SHARD_FORMAT = "birds-shards/1"
DEFAULT_SHARD_SIZE = "256MB"
PACK_AGAIN = "pack the dataset again with `python scripts/data.py pack SRC DEST`"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
MEMBER = re.compile(r"([0-9A-Za-z_-]+)\.(jpg|png|cls)")  # <key>.<ext>, no folder


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '500000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = SIZE_UNITS.get(match.group(2).upper()) if match else None
    if not unit or float(match.group(1)) * unit < 1:
        raise UserError(f"--shard-size {text!r} is not a size: give e.g. 256MB, 1GB or 500000 (bytes)")
    return int(float(match.group(1)) * unit)


def tar_bytes(size: int) -> int:
    """A tar member's bytes: a 512-byte header and its data in whole 512-byte blocks."""
    return 512 + -(-size // 512) * 512


def tar_file_bytes(members: int) -> int:
    """A tar file's size: its members, two zero blocks at the end, padded to whole 10240-byte records."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def pack_dataset(source: Path, destination: Path, shard_size: int, seed: int = 0) -> dict:
    """Write every split of source as shards into destination (new or empty); return the index."""
    source = check_dataset_root(Path(source).expanduser().resolve())
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"{destination} exists and is not empty: choose a new directory or delete it")
    if destination.is_relative_to(source):
        raise UserError(f"{destination} is inside the dataset {source}: pack to a directory outside it")
    classes = find_classes(source)
    splits = {split: samples_to_pack(source, split, classes, seed) for split in SPLITS if (source / split).is_dir()}
    needed = sum(space_needed([tar_bytes(p.stat().st_size) + 1024]) for samples in splits.values() for p, _ in samples)
    check_free_space(destination.parent, needed, f"the shards of {source}", "free space there or pack elsewhere")
    index = {"format": SHARD_FORMAT, "classes": classes, "seed": seed, "shard_size": shard_size,
             "splits": {}, "skipped": skipped_entries(source)}

    def fill(folder: Path) -> None:
        os.chmod(folder, 0o777 & ~current_umask())  # mkdtemp's folder is private; colleagues may read shards
        for split, samples in splits.items():
            index["splits"][split] = write_split(folder, split, samples, len(classes), shard_size)
        (folder / SHARD_INDEX).write_text(json.dumps(index, indent=1) + "\n")

    destination.parent.mkdir(parents=True, exist_ok=True)
    fill_new_folder(destination, fill)
    return index


def samples_to_pack(root: Path, split: str, classes: list[str], seed: int) -> list[tuple[Path, int]]:
    """A split's (image, label) pairs, checked, in a random order drawn from the seed."""
    samples = list_samples(root, split, classes)
    for path, _ in samples:
        check_packable(root, path)
    random.Random(f"pack {seed} {split}").shuffle(samples)
    return samples


def check_packable(root: Path, path: Path) -> None:
    """Refuse a link out of the dataset, and a name that is not printable UTF-8 (it would reach the index and logs)."""
    for item in (path.parent, path):
        if item.is_symlink():
            link_inside(root, item)
    relative = str(path.relative_to(root))
    if any(ord(c) < 32 or 0xDC80 <= ord(c) <= 0xDCFF for c in relative):  # control characters; undecodable bytes
        raise DataError(f"refusing to pack {relative!r}: its name holds control characters or bytes that are not "
                        "UTF-8; rename it")


def skipped_entries(root: Path) -> list[str]:
    """What pack leaves out: everything but the images in the class folders of the splits."""
    skipped = [p.name for p in sorted(root.iterdir()) if p.name not in SPLITS or not p.is_dir()]
    for split in (s for s in SPLITS if (root / s).is_dir()):
        folders = class_folders(root / split)
        skipped += [f"{split}/{p.name}" for p in sorted((root / split).iterdir()) if p not in folders]
        for folder in folders:
            images = set(image_files(folder))
            skipped += [f"{split}/{folder.name}/{p.name}" for p in sorted(folder.iterdir()) if p not in images]
    return skipped


def write_split(folder: Path, split: str, samples: list[tuple[Path, int]], num_classes: int, shard_size: int) -> dict:
    """The shards of one split, each up to shard_size bytes (at least one image); the split's entry of the index."""
    shards, per_class, current, size = [], [0] * num_classes, [], 0
    for key, (path, label) in enumerate(samples):
        member = tar_bytes(path.stat().st_size) + tar_bytes(len(str(label)))
        if current and tar_file_bytes(size + member) > shard_size:
            shards.append(write_shard(folder / f"{split}-{len(shards):05d}.tar", current))
            current, size = [], 0
        current.append((f"{key:08d}", path, label))
        size += member
        per_class[label] += 1
    shards.append(write_shard(folder / f"{split}-{len(shards):05d}.tar", current))
    return {"samples": len(samples), "per_class": per_class, "shards": shards}


def write_shard(path: Path, samples: list[tuple[str, Path, int]]) -> dict:
    """One tar file: <key>.jpg (or .png) and <key>.cls per image; every header with owner 0, mode 644, time 0."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in samples:
            suffix = "png" if image.suffix.lower() == ".png" else "jpg"
            for name, content in ((f"{key}.{suffix}", image.read_bytes()), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)  # owner, group, mode and time have fixed defaults
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return {"name": path.name, "samples": len(samples), "bytes": path.stat().st_size}


# %% [markdown]
# Reading: the index, then each shard's headers, checked against it.

# %%
def read_shard_index(root: Path) -> dict:
    path = Path(root).expanduser() / SHARD_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} ({error}): {PACK_AGAIN}") from None
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise DataError(f"{path} is not an index of this course's shards (format {SHARD_FORMAT}): {PACK_AGAIN}")
    return index


class ShardMember(NamedTuple):
    """An image inside a shard: where its bytes are. It prints as shard:member, so errors name it."""
    shard: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    def read_bytes(self) -> bytes:
        content = os.pread(open_shard(self.shard), self.size, self.offset)
        if len(content) != self.size:
            raise DataError(f"shard {self.shard} was truncated while it was read ({self.name}): stage it again")
        return content


OPEN_SHARDS: dict[str, int] = {}  # shard -> file descriptor: each process opens a shard once, not once per image


def open_shard(path: str) -> int:
    if path not in OPEN_SHARDS:  # pread has no file position: a descriptor inherited by a worker is safe to share
        OPEN_SHARDS[path] = os.open(path, os.O_RDONLY)
    return OPEN_SHARDS[path]


def shard_samples(root: Path, index: dict, split: str) -> list[tuple[ShardMember, int]]:
    """(member, label) pairs of one split, shard by shard in the index's order."""
    entry = index["splits"].get(split) or {"shards": [], "samples": 0}
    if not entry["samples"]:
        raise DataError(f"the shards in {root} hold no {split} split: {PACK_AGAIN} from a dataset with {split}/")
    samples = []
    for shard in entry["shards"]:
        if Path(shard["name"]).name != shard["name"] or shard["name"].startswith("."):
            raise DataError(f"refusing to read {root / SHARD_INDEX}: shard name {shard['name']!r} is not a file name "
                            f"in {root}: {PACK_AGAIN}")
        samples += scan_shard(root / shard["name"], shard, len(index["classes"]))
    return samples


def scan_shard(path: Path, expected: dict, num_classes: int) -> list[tuple[ShardMember, int]]:
    """The images and labels of one shard, in its order; anything but what pack writes is refused."""
    if not path.is_file():
        raise DataError(f"shard {path} is missing: stage the whole shard directory again, or {PACK_AGAIN}")
    if path.stat().st_size != expected["bytes"]:
        raise DataError(f"shard {path} is truncated or changed ({path.stat().st_size} bytes, the index says "
                        f"{expected['bytes']}): copy or stage it again, or {PACK_AGAIN}")
    images, labels = {}, {}
    with damaged_archive_errors(path, f"copy or stage it again, or {PACK_AGAIN}"), tarfile.open(path, "r:") as tar:
        for member in tar:
            match = MEMBER.fullmatch(member.name)
            reason = unsafe_member(member.name, not member.isfile()) or (
                None if match else "is not <key>.jpg, <key>.png or <key>.cls")
            key = match and match.group(1)
            found = labels if match and match.group(2) == "cls" else images
            reason = reason or (f"repeats key {key}" if key in found else None)
            if reason:
                raise DataError(f"refusing to read shard {path}: member '{member.name}' {reason}: {PACK_AGAIN}")
            found[key] = (read_label(tar, member, num_classes, path) if found is labels else
                          ShardMember(str(path), member.name, member.offset_data, member.size))
    if images.keys() != labels.keys() or len(images) != expected["samples"]:
        raise DataError(f"shard {path} holds {len(images)} images and {len(labels)} labels that pair up as "
                        f"{len(images.keys() & labels.keys())}, the index says {expected['samples']}: {PACK_AGAIN}")
    return [(member, labels[key]) for key, member in images.items()]


def read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, num_classes: int, path: Path) -> int:
    text = tar.extractfile(member).read(32).decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) >= num_classes:
        raise DataError(f"refusing to read shard {path}: member '{member.name}' holds {text!r}, not a label from 0 "
                        f"to {num_classes - 1}: {PACK_AGAIN}")
    return int(text)


# %%
class ShardedImages(BirdImages):
    """One split read from shards: the items of BirdImages, each image's bytes read from its shard."""

    def __init__(self, root: Path, split: str, classes: list[str] | None = None, image_size: int = 224,
                 transform: Callable | None = None, decode_on_device: DecodeOnDevice | None = None,
                 skip_bad: bool = False):
        index = read_shard_index(root)
        self.root, self.classes = Path(root).expanduser(), index["classes"]
        self.samples = shard_samples(self.root, index, split)  # [(ShardMember, label), ...]
        self.image_size, self.transform = image_size, transform or build_transform(image_size)
        self.decode_on_device = decode_on_device
        self.skipped, self.collate_fn = skipping_options(decode_on_device, skip_bad)
        counts = [shard["samples"] for shard in index["splits"][split]["shards"]]
        ends = list(itertools.accumulate(counts))
        self.shard_ranges = [range(end - count, end) for count, end in zip(counts, ends)]
        digest = hashlib.sha256((self.root / SHARD_INDEX).read_bytes()).hexdigest()[:16]
        self.order_name = f"shards {digest}"  # what a checkpoint records: resume mid-epoch only on these shards

    def shuffled_order(self, seed: int, epoch: int) -> list[int]:
        """The epoch's order: the shards in a random order, each shard's images in a random order."""
        rng = random.Random(f"shards {seed} {epoch}")
        order = []
        for shard in rng.sample(self.shard_ranges, len(self.shard_ranges)):
            order += rng.sample(shard, len(shard))
        return order


def rank_indices(sampler: DistributedSampler):
    """A DistributedSampler's indices of its rank. A dataset with a shuffled order of its own (shards) gives the
    epoch's order instead of a permutation of all, and the rank takes its share as DistributedSampler does:
    the order padded with its first indices to a multiple of the ranks, then every num_replicas-th."""
    shuffled_order = getattr(sampler.dataset, "shuffled_order", None)
    if not (sampler.shuffle and shuffled_order):
        return DistributedSampler.__iter__(sampler)
    order = shuffled_order(sampler.seed, sampler.epoch)
    order += order[:sampler.total_size - len(order)]
    return iter(order[sampler.rank:sampler.total_size:sampler.num_replicas])


def verify_shards(root: Path, open_images: bool = True) -> tuple[dict, list[str]]:
    """verify for shards: every shard checked against the index (reading stops at the first bad one, naming it),
    the images per split and class, and the images that cannot be read."""
    index, root = read_shard_index(root), Path(root).expanduser()
    counts, problems = {}, []
    for split in index["splits"]:
        samples = shard_samples(root, index, split)
        counts[split] = Counter(index["classes"][label] for _, label in samples)
        problems += [problem for member, _ in (samples if open_images else []) if (problem := image_problem(member))]
    return counts, problems


def data_order(dataset) -> str:
    """Which order a training sampler gives this dataset: 'files' (a permutation of all), or shards by digest."""
    return getattr(dataset, "order_name", "files")


# %% [markdown]
# ### Measured: staging and reading small files against shards (`measure-io`)
#
# `measure-io` makes a dataset of `--files` small JPEGs (copies of 200 synthetic 224-pixel
# images, in 100 class folders), packs it, and for each layout times, `--repeats` times:
# `stage` (the copy to "node-local" disk, here another folder of the same disk), opening
# the staged split (listing the files, or scanning the shards' headers), and reading every
# image's bytes once in the training order, first with a cold page cache (dropped through
# `/proc/sys/vm/drop_caches`, which needs root; otherwise each file's cached pages are
# dropped with `posix_fadvise`, which leaves the directory entries cached), then warm. It
# reads in one process and decodes nothing: the figures are the filesystem's part of an
# epoch. Everything is written under a new folder of `--to`, removed at the end.

# %%
def measure_io(files: int, to: Path, shard_size: int, repeats: int) -> dict:
    """Seconds to stage, open and read one epoch of `files` images as files and as shards (see above)."""
    work = Path(tempfile.mkdtemp(dir=Path(to).expanduser(), prefix="measure-io-"))
    try:
        source = work / "source" / "birds"
        image_bytes = write_copies(source, files)
        started = time.perf_counter()
        pack_dataset(source, work / "source" / "birds-shards", shard_size)
        result = {"files": files, "image_bytes": image_bytes, "pack_seconds": time.perf_counter() - started,
                  "shards": len(read_shard_index(work / "source" / "birds-shards")["splits"]["train"]["shards"])}
        for layout in ("birds", "birds-shards"):
            runs = [timed_stage_and_epoch(work / "source" / layout, work / f"node-{r}") for r in range(repeats)]
            result[layout] = {key: [run[key] for run in runs] for key in runs[0]}
        return result
    finally:
        shutil.rmtree(work)


def write_copies(root: Path, files: int, classes: int = 100, distinct: int = 200) -> int:
    """A train/ split of `files` JPEGs, copies of `distinct` synthetic images; their bytes in all."""
    images = []
    for n in range(distinct):
        buffer = io.BytesIO()
        synthetic_image(n % classes, n, "train", 224, 0).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    names = synthetic_class_names(classes)
    for name in names:
        (root / "train" / name).mkdir(parents=True)
    for n in range(files):
        (root / "train" / names[n % classes] / f"{n:06d}.jpg").write_bytes(images[n % distinct])
    return sum(len(images[n % distinct]) for n in range(files))


def timed_stage_and_epoch(source: Path, node: Path) -> dict:
    how = drop_page_cache(source)
    started = time.perf_counter()
    staged = stage_dataset(source, node)
    stage_seconds = time.perf_counter() - started
    drop_page_cache(staged)
    started = time.perf_counter()
    split = load_splits(staged, splits=("train",), gpu_decode=True)["train"]  # items are the images' bytes
    open_seconds = time.perf_counter() - started
    cold, warm = epoch_read_seconds(split), epoch_read_seconds(split)
    for descriptor in OPEN_SHARDS.values():
        os.close(descriptor)
    OPEN_SHARDS.clear()
    shutil.rmtree(node)
    return {"stage": stage_seconds, "open_cold": open_seconds, "read_cold": cold, "read_warm": warm,
            "cold_cache": how}


def epoch_read_seconds(split: BirdImages) -> float:
    from resilience import ResumableSampler  # the training order: a permutation of all files, shard by shard for shards
    started = time.perf_counter()
    for index in ResumableSampler(split, 1, 0, shuffle=True, seed=0):
        split[index]
    return time.perf_counter() - started


def drop_page_cache(folder: Path) -> str:
    """Empty the page cache (root), or at least drop the cached pages of every file under folder."""
    os.sync()  # only clean pages can be dropped
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in (p for p in Path(folder).rglob("*") if p.is_file()):
            descriptor = os.open(path, os.O_RDONLY)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)
        return "fadvise"


def print_io_report(result: dict) -> None:
    print(f"{result['files']} files of {result['image_bytes'] / result['files'] / 1e3:.1f} kB on average "
          f"({result['image_bytes'] / 1e6:.0f} MB) against {result['shards']} shard(s); pack took "
          f"{result['pack_seconds']:.1f} s; cold cache by {result['birds']['cold_cache'][0]}")
    print(f"{'layout':8s} {'stage s':>22s} {'open s (cold)':>22s} {'read s (cold)':>22s} {'read s (warm)':>22s}")
    for layout, name in (("birds", "files"), ("birds-shards", "shards")):
        figures = [result[layout][key] for key in ("stage", "open_cold", "read_cold", "read_warm")]
        print(f"{name:8s} " + " ".join(f"{statistics.median(f):8.2f} ({min(f):5.2f}-{max(f):5.2f})" for f in figures))


# %% [markdown]
# ## Appendix: decoding JPEGs on the GPU (--gpu-decode; taught in the performance lessons)
#
# With many GPUs per node, the CPUs may not decode JPEGs fast enough. With
# `--gpu-decode` the loader's workers only read each file's bytes; the training process
# decodes a whole batch at once on the GPU (`torchvision.io.decode_jpeg(...,
# device="cuda")`, nvJPEG), then resizes and normalises it there. It cannot be combined
# with `--augment` (the random crops run on the CPU). A PNG or CMYK file, which nvJPEG
# cannot read, is decoded on the CPU instead. (torchvision 0.29 marks its decoders as
# deprecated in favour of TorchCodec; they work in the version the course pins, and
# `JpegBatch.to` is the one place to change when they are removed.)

# %%
class JpegBatch:
    """The encoded images of one batch; `.to(device)` decodes them there into a float batch."""

    def __init__(self, data: list[bytes], image_size: int, normalize: bool):
        self.data, self.image_size, self.normalize = data, image_size, normalize

    def __len__(self) -> int:
        return len(self.data)

    def pin_memory(self, *_) -> "JpegBatch":  # the DataLoader pins batches; bytes need not be
        return self

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        device = torch.device(device)
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in self.data]
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a PNG or a CMYK JPEG in the batch
            images = [decode_image(d, mode=ImageReadMode.RGB).to(device) for d in encoded]
        size = [self.image_size, self.image_size]
        batch = torch.stack([i if list(i.shape[-2:]) == size else T.functional.resize(i, size, antialias=True)
                             for i in images])
        batch = T.functional.to_dtype(batch, torch.float32, scale=True)
        return T.functional.normalize(batch, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else batch


class DecodeOnDevice:
    """The collate function of --gpu-decode: a JpegBatch and a tensor of labels."""

    def __init__(self, image_size: int, normalize: bool):
        self.image_size, self.normalize = image_size, normalize

    def __call__(self, items: list[tuple[bytes, int]]):
        return JpegBatch([d for d, _ in items], self.image_size, self.normalize), torch.tensor([label for _, label in items])


# %% [markdown]
# ## Appendix: the command-line tool
#
# ```bash
# python scripts/data.py synthetic data/birds-synthetic   # make the stand-in
# python scripts/data.py download data/birds              # the real data (Kaggle credentials; a login node)
# python scripts/data.py verify data/birds                # count and check every image
# python scripts/data.py stage data/birds                 # copy to node-local disk in a job
# python scripts/data.py pack data/birds data/birds-shards # the same as a few large tar shards
# python scripts/data.py measure-io --files 20000          # time stage and reads: files against shards
# ```

# %%
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data.py", description="Make, fetch, check and stage the birds dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synthetic", help="write a deterministic synthetic dataset in the Kaggle layout")
    p.add_argument("directory", type=Path)
    p.add_argument("--classes", type=int, default=10, help="number of species (default 10)")
    p.add_argument("--train", type=int, default=40, help="training images per class (default 40)")
    p.add_argument("--valid", type=int, default=10, help="validation images per class (default 10)")
    p.add_argument("--test", type=int, default=10, help="test images per class (default 10)")
    p.add_argument("--image-size", type=int, default=224, help="side of the square images in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("download", help="download the real dataset from Kaggle and extract it")
    p.add_argument("directory", type=Path)
    p.add_argument("--url", default=KAGGLE_DATASET_URL, help="archive URL (file:// works for a local copy)")
    p = sub.add_parser("verify", help="count images per split and class; exit 1 on any problem")
    p.add_argument("directory", type=Path, help="dataset directory (folders or shards)")
    p.add_argument("--quick", action="store_true", help="count only; do not open every image")
    p = sub.add_parser("stage", help="copy or extract the dataset to node-local disk; print its path")
    p.add_argument("source", type=Path, help="dataset directory (folders or shards) or archive")
    p.add_argument("--to", type=Path, default=None, help="destination (default $TMPDIR, else /tmp)")
    p = sub.add_parser("pack", help="write the dataset as a few large tar shards per split (WebDataset layout)")
    p.add_argument("source", type=Path, help="dataset directory in the Kaggle layout")
    p.add_argument("destination", type=Path, help="new (or empty) directory for the shards and index.json")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"largest shard, e.g. 256MB or 1GiB (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="the order of the images in the shards (default 0)")
    p = sub.add_parser("measure-io", help="time stage and one epoch's reads: small files against shards")
    p.add_argument("--files", type=int, default=20000, help="images in the measured dataset (default 20000)")
    p.add_argument("--to", type=Path, default=None,
                   help="where to write it, removed after (default $TMPDIR, else /tmp)")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help=f"as for pack (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--repeats", type=int, default=3, help="each figure: median, min and max of this many (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synthetic":
        for option in ("train", "valid", "test", "image_size"):
            if getattr(args, option) < 1:
                raise UserError(f"--{option.replace('_', '-')} must be at least 1")
        root = make_synthetic(args.directory, args.classes, (args.train, args.valid, args.test),
                              args.image_size, args.seed)
        print(f"wrote {args.classes} classes x ({args.train} train, {args.valid} valid, {args.test} test) "
              f"images of {args.image_size}px to {root}")
    elif args.command == "download":
        print(f"downloaded the dataset to {download_dataset(args.directory, args.url)}")
    elif args.command == "verify":
        verify = verify_shards if is_shard_dir(args.directory) else verify_dataset
        counts, problems = verify(args.directory, open_images=not args.quick)
        for split, per_class in counts.items():
            sizes = sorted(per_class.values()) or [0]
            print(f"{split:5s}: {sum(per_class.values()):6d} images in {len(per_class):4d} classes "
                  f"({sizes[0]}-{sizes[-1]} per class)")
        for problem in problems:
            print(f"problem: {problem}")
        print(f"{len(problems)} problem(s) found" if problems else "ok")
        return 1 if problems else 0
    elif args.command == "stage":
        started = time.perf_counter()
        staged = stage_dataset(args.source, args.to)
        print(f"staged on {os.uname().nodename} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        print(staged)
    elif args.command == "pack":
        index = pack_dataset(args.source, args.destination, parse_size(args.shard_size), args.seed)
        print_pack_report(index, args.destination)
    elif args.command == "measure-io":
        if args.files < 1 or args.repeats < 1:
            raise UserError("--files and --repeats must be at least 1")
        print_io_report(measure_io(args.files, args.to or default_stage_dir(), parse_size(args.shard_size),
                                   args.repeats))
    return 0


def print_pack_report(index: dict, destination: Path) -> None:
    for split, entry in index["splits"].items():
        megabytes = sum(shard["bytes"] for shard in entry["shards"]) / 1e6
        print(f"{split:5s}: {entry['samples']:6d} images of {len(index['classes'])} classes in "
              f"{len(entry['shards'])} shard(s), {megabytes:.1f} MB")
    skipped = index["skipped"]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not images of a split's "
              f"class folders: {shown} (all listed in {SHARD_INDEX})")
    print(f"packed to {destination}")


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)
