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
# # 1. The data: from JPEG files to batches of tensors
#
# A GPU can only train as fast as it is fed. Before any model, we need to know what the
# dataset looks like on disk, how an image becomes a tensor the network understands, and
# how the `DataLoader` keeps the GPU busy.
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
# The real dataset needs a Kaggle account and 2 GB of download, so this course ships a
# **synthetic stand-in with exactly the same layout**: coloured bird shapes on textured
# backgrounds, one colour scheme per species. Everything below works on both.
#
# This notebook is also the command-line tool `scripts/data.py` (its jupytext export):
#
# ```bash
# python scripts/data.py synthetic data/birds-synthetic   # make the stand-in
# python scripts/data.py download data/birds              # the real data (Kaggle credentials)
# python scripts/data.py verify data/birds                # count and check every image
# python scripts/data.py stage data/birds                 # copy to node-local disk in a job
# ```

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

# %%
from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2 as T

# %% [markdown]
# ## Errors a user can fix
#
# A learner who mistypes a path should see one line that says what is wrong and how to
# fix it, not a 40-line traceback. Every script in this course raises `UserError` for
# such mistakes and runs its `main` through `run_cli`, which prints the message and exits
# with status 2. Real bugs still show their traceback.


# %%
class UserError(Exception):
    """A mistake the user can fix: bad path, bad option, missing download."""


class DataError(UserError):
    """The dataset on disk is missing, incomplete or broken."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run `main`; turn a UserError into one line on stderr and exit status 2."""
    # Slurm's time-limit warning (SIGUSR1, slurm/*.sbatch) reaches every process of a job; it
    # would kill a command that has nothing to save, such as staging or gathering. Training
    # installs its own handler (train.py: StopRequest).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)


def one_line(error: BaseException) -> str:
    """The last line of an error message: a DataLoader worker wraps errors in a traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    for prefix in ("DataError: ", "UserError: "):
        last = last.removeprefix(prefix)
    return last


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename.

    A job killed half-way (time limit, preemption) leaves the old file intact, never a
    truncated one: a rename within one filesystem is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# %% [markdown]
# ## Finding the images, and naming the classes
#
# Two traps in the real dataset:
#
# 1. **Labels must come from class names, not folder order.** If each split numbered its
#    own folders, one missing class in `valid/` would shift every label after it and the
#    validation accuracy would be nonsense. We number the classes of `train/` and look
#    every other split up *by name*. In the real dataset a few folder names differ between
#    splits only in white space (`"PARAKETT  AUKLET"` vs `"PARAKETT AUKLET"`), so names are
#    compared after collapsing white space.
# 2. **Not every folder is a class.** JupyterLab creates `.ipynb_checkpoints` when you
#    browse the data; a stray `README.txt` is not an image. Both are ignored.

# %%
SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_key(folder_name: str) -> str:
    """The name that identifies a class: white space collapsed."""
    return " ".join(folder_name.split())


def class_folders(split_dir: Path) -> list[Path]:
    """The class folders of one split, hidden folders left out."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    """The image files of one class folder, in a stable order."""
    return sorted(
        p for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


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
# ## From a JPEG to a tensor
#
# A pretrained ResNet was trained on ImageNet images that were scaled to [0, 1] and then
# **normalised with ImageNet's channel means and standard deviations**. The original
# workshop used `ToTensor()` alone, so the pretrained network saw inputs from a
# distribution it had never seen. We keep the normalisation.
#
# Images are opened with Pillow and converted to RGB, because the real dataset contains a
# few greyscale and CMYK JPEGs, and resized when they are not of the expected size, so
# that every batch stacks.

# %%
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


def load_rgb(path: Path, image_size: int) -> Image.Image:
    """Open an image as RGB at image_size x image_size; a broken file names itself."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return image
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"cannot read image {path} ({error}): delete or replace it, run `python scripts/data.py "
            "verify` to list every broken file, or train with --skip-bad-images"
        ) from None


class BirdImages(Dataset):
    """One split of the dataset: returns (image tensor, label)."""

    def __init__(self, root: Path, split: str, classes: list[str] | None = None,
                 image_size: int = 224, transform: Callable | None = None,
                 decode_on_device: DecodeOnDevice | None = None, skip_bad: bool = False):
        self.root = check_dataset_root(root)
        if not (self.root / split).is_dir():
            raise DataError(f"dataset directory {self.root} has no {split}/ folder")
        self.classes = classes if classes is not None else find_classes(self.root)
        self.samples = list_samples(self.root, split, self.classes)
        if not self.samples:
            raise DataError(f"{self.root / split} holds no images (.jpg, .jpeg or .png)")
        self.image_size = image_size
        self.transform = transform or build_transform(image_size)
        self.decode_on_device = decode_on_device  # --gpu-decode: items are the files' bytes
        self.collate_fn = decode_on_device
        # --skip-bad-images: unreadable files are left out of their batch and counted, in a
        # counter shared with the DataLoader's worker processes.
        self.skipped = multiprocessing.Value("i", 0) if skip_bad else None
        if skip_bad and decode_on_device is None:
            self.collate_fn = collate_readable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, draw_seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        if self.decode_on_device is not None:
            return path.read_bytes(), label  # bytes, not a tensor: cheap to pass between processes
        try:
            return self.transform_with_seed(load_rgb(path, self.image_size), draw_seed), label
        except DataError:
            if self.skipped is None:
                raise
            with self.skipped.get_lock():
                self.skipped.value += 1
            return None


    def transform_with_seed(self, image: Image.Image, draw_seed: int | None) -> torch.Tensor:
        """The transform; its random draws (--augment) from draw_seed when one is given."""
        if draw_seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # leaves this process's random stream as it was
            torch.manual_seed(draw_seed)
            return self.transform(image)


def collate_readable(batch: list):
    """default_collate, leaving out the items of unreadable images (None)."""
    return default_collate([item for item in batch if item is not None])


def load_splits(root: Path, image_size: int = 224, augment: bool = False,
                normalize: bool = True, splits=("train", "valid"),
                gpu_decode: bool = False, skip_bad: bool = False) -> dict[str, BirdImages]:
    """The named splits, all labelled by the training split's classes."""
    classes = find_classes(check_dataset_root(root))
    decode = DecodeOnDevice(image_size, normalize) if gpu_decode else None
    return {
        split: BirdImages(root, split, classes, image_size,
                          build_transform(image_size, augment and split == "train", normalize), decode, skip_bad)
        for split in splits
    }


# %% [markdown]
# ### Decoding on the GPU (`--gpu-decode`)
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
# ## The DataLoader and its knobs
#
# The `DataLoader` decodes JPEGs in `num_workers` background processes while the GPU
# computes. Its knobs:
#
# | knob | what it does | our choice |
# |---|---|---|
# | `num_workers` | processes decoding images | in a job, every CPU the task may use; elsewhere (a laptop, a shared login node) the CPUs this process may use, at most 8 |
# | `pin_memory` | page-locked host memory: faster, asynchronous copies to the GPU | on with CUDA |
# | `persistent_workers` | keep workers alive between epochs instead of restarting them | on when there are workers |
# | `prefetch_factor` | batches each worker prepares ahead | 4 |
#
# **How many CPUs?** The ones this process may run on (`os.sched_getaffinity`): a cluster
# that binds tasks to cores shows there what Slurm really gave the task, which can be fewer
# than `SLURM_CPUS_PER_TASK` claims (since Slurm 22.05, `srun` gives each task of a step
# one core unless told otherwise; `slurm/env.sh` sets `SRUN_CPUS_PER_TASK`). PyTorch's
# compute threads need cores too: by default it starts one per core, and they fight the
# workers for them. `set_compute_threads` gives them what the workers leave, at least one,
# and every script prints the choice in its header line (`workers 2 | threads 1 (...)`).

# %%
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


def make_loader(dataset: Dataset, batch_size: int, workers: int, *, shuffle: bool = False,
                sampler=None, drop_last: bool = False, pin_memory: bool | None = None,
                prefetch_factor: int = 4, persistent_workers: bool = True, collate_fn=None) -> DataLoader:
    """A DataLoader with the knobs above set sensibly for CPU and GPU."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers} if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, collate_fn=collate_fn or getattr(dataset, "collate_fn", None), **extra)


# %% [markdown]
# ## The synthetic stand-in
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
# ## Checking a dataset before spending GPU hours on it
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
            for path in files if open_images else []:
                try:
                    with Image.open(path) as image:
                        image.load()
                except (OSError, SyntaxError, ValueError) as error:
                    problems.append(f"unreadable image {path}: {error}")
    return counts, problems


# %% [markdown]
# ## Getting the real data, safely
#
# `download` uses Kaggle's public API with your credentials (`~/.kaggle/kaggle.json`, or
# `KAGGLE_USERNAME` and `KAGGLE_KEY`). Run it on a **login node**: compute nodes usually
# have no internet. An archive is extracted only if no member would land outside the
# target directory (`../` paths, absolute paths, links): a malicious archive must not
# overwrite your `~/.bashrc`.

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
    """Why an archive member must not be extracted, or None when it is safe."""
    if is_link:
        return "is a link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "climbs out with '..'"
    return None


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .zip or .tar(.gz) into target, refusing members that would escape it."""
    archive, target = Path(archive), Path(target)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [(m.filename, (m.external_attr >> 16) & 0o170000 == 0o120000) for m in zf.infolist()]
            check_members(archive, members)
            zf.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            check_members(archive, [(m.name, m.issym() or m.islnk() or not (m.isfile() or m.isdir()))
                                    for m in tf.getmembers()])
            tf.extractall(target, filter="data")
    else:
        raise UserError(f"{archive} is neither a zip nor a tar archive")


def check_members(archive: Path, members: list[tuple[str, bool]]) -> None:
    for name, is_link in members:
        reason = unsafe_member(name, is_link)
        if reason:
            raise UserError(f"refusing to extract {archive}: member '{name}' {reason}")


def find_dataset_root(directory: Path) -> Path:
    """The folder holding train/: the archive may wrap everything in one more folder."""
    candidates = [directory] + sorted(p.parent for p in directory.glob("*/train") if p.is_dir())
    for candidate in candidates:
        if (candidate / "train").is_dir():
            return candidate
    raise DataError(f"no train/ folder found in {directory} after extraction")


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
# ## Staging to node-local disk
#
# A parallel filesystem (Lustre, GPFS) is fast for big files and slow for many small
# ones: every JPEG costs a metadata lookup on a server shared by the whole cluster. A job
# copies the dataset once to the node's local disk (`$TMPDIR`, or `/tmp`) and reads from
# there. `stage` copies a directory or extracts an archive, and prints the new path.

# %%
def default_stage_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")


def stage_dataset(source: Path, destination: Path | None = None) -> Path:
    """Copy or extract the dataset under destination; reuse a complete earlier copy."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source} does not exist: give the dataset directory or its archive")
    destination = Path(destination or default_stage_dir()).expanduser()
    name = source.name.split(".")[0] if source.is_file() else source.name
    staged = destination / name
    destination.mkdir(parents=True, exist_ok=True)
    # Several tasks on one node may stage at once: the first copies, the others wait for it.
    with open(destination / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not staged_copy_is_current(source, staged):  # else: a finished copy from an earlier task or job
            copy_or_extract(source, destination, staged)
    return find_dataset_root(staged)


def source_identity(source: Path) -> str:
    """What a staged copy was made from: the resolved path, and the number, total size and newest
    modification time of its files (a node cache keeps copies across jobs; the source may change)."""
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return json.dumps({"source": str(source.resolve()), "files": len(stats), "bytes": sum(s.st_size for s in stats),
                       "newest": max((s.st_mtime_ns for s in stats), default=0)}) + "\n"


def staged_copy_is_current(source: Path, staged: Path) -> bool:
    """A complete copy of this very source: reuse it. Anything else is copied again."""
    marker = staged / ".staged"
    return marker.is_file() and marker.read_text() == source_identity(source)


def copy_or_extract(source: Path, destination: Path, staged: Path) -> None:
    partial = Path(tempfile.mkdtemp(dir=destination, prefix=f".{staged.name}."))
    try:
        if source.is_dir():
            shutil.copytree(check_dataset_root(source), partial, dirs_exist_ok=True)
        else:
            safe_extract(source, partial)
        (partial / ".staged").write_text(source_identity(source))
        shutil.rmtree(staged, ignore_errors=True)
        os.replace(partial, staged)  # all or nothing: a half copy is never used
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# %% [markdown]
# ## The command-line tool

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
    p.add_argument("directory", type=Path)
    p.add_argument("--quick", action="store_true", help="count only; do not open every image")
    p = sub.add_parser("stage", help="copy or extract the dataset to node-local disk; print its path")
    p.add_argument("source", type=Path, help="dataset directory or archive")
    p.add_argument("--to", type=Path, default=None, help="destination (default $TMPDIR, else /tmp)")
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
        counts, problems = verify_dataset(args.directory, open_images=not args.quick)
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
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)

# %% [markdown]
# ## Try it: make the data and look at it
#
# The cell below makes the synthetic dataset when `data_dir` does not exist yet. To use
# the real one, download it on a login node and set `data_dir` in the first cell.

# %% tags=["active-ipynb"]
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=num_classes, per_class=(images_per_class, 10, 10), image_size=image_size)
# counts, problems = verify_dataset(data_dir)
# for split, per_class in counts.items():
#     print(f"{split}: {sum(per_class.values())} images in {len(per_class)} classes")
# print("problems:", problems or "none")

# %% [markdown]
# `birds.csv` indexes every image; the folders alone are enough for training.

# %% tags=["active-ipynb"]
# with open(Path(data_dir) / "birds.csv") as f:
#     for line in list(f)[:4]:
#         print(line.rstrip())

# %% [markdown]
# ### A browser for the images
#
# Choose a species: the grid shows its first training images. Look for what tells the
# species apart (colours of body, head and wing) and what does not (background, pose).

# %% tags=["active-ipynb"]
# import ipywidgets as widgets
# from IPython.display import display
#
# classes = find_classes(data_dir)
# chooser = widgets.Dropdown(options=classes, description="species")
# grid = widgets.GridBox(layout=widgets.Layout(grid_template_columns="repeat(4, 120px)"))
#
#
# def show_class(name):
#     folder = next(d for d in class_folders(Path(data_dir) / "train") if class_key(d.name) == name)
#     grid.children = [widgets.Image(value=p.read_bytes(), format="jpeg", width=112, height=112)
#                      for p in image_files(folder)[:8]]
#
#
# chooser.observe(lambda change: show_class(change["new"]), names="value")
# show_class(chooser.value)
# display(widgets.VBox([chooser, grid]))

# %% [markdown]
# ### What the network sees
#
# After normalisation the values are centred near 0 with a standard deviation near 1 per
# channel, which is the input distribution the ImageNet weights were trained on.

# %% tags=["active-ipynb"]
# splits = load_splits(data_dir, image_size=image_size)
# image, label = splits["train"][0]
# print("tensor", tuple(image.shape), image.dtype, "label", label, splits["train"].classes[label])
# print("per-channel mean", image.mean(dim=(1, 2)).numpy().round(2), "std", image.std(dim=(1, 2)).numpy().round(2))

# %% [markdown]
# ### How many workers?
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

# %% [markdown]
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
# **2.** Look at the plot: which `num_workers` would you ask Slurm for with
# `--cpus-per-task`, and why does adding more stop helping?
