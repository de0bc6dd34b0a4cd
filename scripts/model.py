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
# # 2. The model: a pretrained ResNet with a new head
#
# Training a ResNet-152 from scratch on 85 000 bird photos would take days. Instead we
# take a network that already learned general visual features on ImageNet's 1.2 million
# images and **replace only its last layer**, the classification head, with one sized for
# our species.
#
# **You will learn to:**
# - take a pretrained ResNet apart into a backbone and a new head for our classes
# - choose between a frozen backbone and fine-tuning, and count what trains in each
# - explain why a frozen backbone stays in evaluation mode while the head trains
# - fetch the ImageNet weights on a login node, because compute nodes must not download
#
# **Time:** about 15 minutes, all of it core. The appendix holds the code that fetches and
# loads the weights, and the command-line tool `scripts/model.py` (this notebook's export).

# %% tags=["parameters", "active-ipynb"]
# num_classes = 10
# image_size = 64
# arch = "resnet18"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %%
from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from data import UserError, run_cli

# %% [markdown] slideshow={"slide_type": "slide"}
# ## The layer we replace
#
# A torchvision ResNet ends in `fc`, a linear layer from the backbone's features to
# ImageNet's 1000 classes. (Built here with `weights=None`: the layers are the same, and
# nothing is downloaded.)

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# resnet = getattr(models, arch)(weights=None)
# print("last layer:", resnet.fc)

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: `in_features`, the number of features the backbone gives (512 for ResNet-18,
# 2048 for ResNet-50 and ResNet-152); our head maps them to our classes instead of 1000.
#
# ## Architectures and their ImageNet weights
#
# `--arch` picks the depth: ResNet-18 (11 M parameters) trains on a laptop CPU in
# seconds at small image sizes; ResNet-152 (60 M) is the workshop's model on GPUs.

# %% slideshow={"slide_type": "fragment"}
ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet152": (models.resnet152, models.ResNet152_Weights.IMAGENET1K_V2),
}


# %% [markdown]
# Support, collapsed: `check_arch` and `check_num_classes` turn an unknown `--arch` or
# fewer than 2 classes into a one-line error.

# %% jupyter={"source_hidden": true}
def check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def check_num_classes(num_classes: int, what: str) -> None:
    if num_classes < 2:
        raise UserError(f"{what} {num_classes} is out of range: a classifier needs at least 2 classes")


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Compute nodes must not download
#
# torchvision downloads weights on first use. On most clusters only **login nodes** reach
# the internet, so a job that tries to download hangs or fails deep inside a stack trace.
# We never download during training: fetch once on the login node, into `TORCH_HOME`
# (a shared directory every node sees), and training finds the file there.
#
# ```bash
# export TORCH_HOME=$HOME/.cache/torch     # or a project directory shared by the group
# python scripts/model.py fetch-weights --arch resnet152
# ```
#
# When the file is missing, `build_model(..., weights="imagenet")` below stops with one
# line that gives this command. The file's name carries the start of its SHA-256
# (`resnet152-f82ba261.pth`): both commands check it, so a truncated or foreign file under
# that name is refused, with its path. The code that fetches and loads the weights
# (`fetch_weights`, `load_backbone_weights`) is collapsed here:

# %% jupyter={"source_hidden": true}
# Where the weights live (cached_weights_path), fetch_weights (login node), load_backbone_weights (jobs).
import hashlib
import os
import sys
import urllib.error
from pathlib import Path


def weights_url(arch: str) -> str:
    check_arch(arch)
    return ARCHITECTURES[arch][1].url


def cached_weights_path(arch: str) -> Path:
    """Where torch.hub keeps the file: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_url(arch))


def official_hash_prefix(arch: str) -> str:
    """The start of the official file's sha256, which torchvision writes into its name
    (resnet152-f82ba261.pth); read as torch.hub's own check_hash reads it."""
    return torch.hub.HASH_REGEX.search(os.path.basename(weights_url(arch))).group(1)


def check_official_weights(path: Path, arch: str) -> None:
    """Refuse a file under the official name that is not the official file (a stand-in, a
    truncated copy): its sha256 must start as its name says."""
    expected = official_hash_prefix(arch)
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if not digest.startswith(expected):
        raise UserError(f"{path} is not the official {arch} weights (its sha256 starts {digest[:len(expected)]}, "
                        f"its name says {expected}): delete it and run "
                        f"`python scripts/model.py fetch-weights --arch {arch}` on a login node")


def fetch_weights(arch: str, url: str | None = None) -> Path:
    """Download the ImageNet weights of `arch` into the torch.hub cache, checking their hash."""
    target = cached_weights_path(arch)
    if target.is_file():
        check_official_weights(target, arch)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = url or weights_url(arch)
    expected = official_hash_prefix(arch)
    try:  # torch.hub writes a .partial file and moves it into place only when the hash matches
        torch.hub.download_url_to_file(url, str(target), hash_prefix=expected, progress=sys.stderr.isatty())
    except (urllib.error.URLError, OSError) as error:
        raise UserError(
            f"cannot download {url} ({getattr(error, 'reason', error)}): run this on a node with "
            f"internet (a login node), or copy the file to {target}"
        ) from None
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        raise UserError(f"{url} is not the official {arch} weights (its sha256 does not start with {expected}): "
                        f"nothing was saved to {target}; the official file is {weights_url(arch)}") from None
    return target


def load_backbone_weights(backbone: nn.Module, arch: str, weights: str) -> None:
    """Load ImageNet weights (from the cache) or a local file into the backbone."""
    if weights == "imagenet":
        path = cached_weights_path(arch)
        if not path.is_file():
            raise UserError(
                f"ImageNet weights for {arch} are not in {path.parent} (compute nodes usually have no "
                f"internet): run `python scripts/model.py fetch-weights --arch {arch}` on a login node, "
                "with the same TORCH_HOME, or use --weights none"
            )
        check_official_weights(path, arch)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--weights {weights}: no such file; give imagenet, none or a weights file")
    fix = "give a file saved with torch.save(model.state_dict()), imagenet or none"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, and what torch says (run_cli keeps it all)
        raise UserError(f"cannot load weights from {path} ({type(error).__name__}: {error}): {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"cannot load weights from {path} (it holds a {type(state).__name__}, not a state dict "
                        f"of tensors): {fix}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the old 1000-class head
    expected = backbone.state_dict()
    mismatched = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    mismatched += [k for k in state if k not in expected]
    if mismatched:
        raise UserError(f"{path} does not hold {arch} weights ({len(mismatched)} tensors missing or of "
                        f"another shape, e.g. {mismatched[0]}): check --arch")
    backbone.load_state_dict(state)


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Backbone plus head
#
# The head's size comes from the dataset (the original workshop hard-coded 400 classes,
# which broke as soon as the dataset grew to 525). Two ways to train:
#
# * **frozen backbone** (default with ImageNet weights): only the head learns. Fast; and
#   `train()` is overridden so that the frozen backbone stays in evaluation mode even while
#   the head trains: otherwise every batch would nudge BatchNorm's running means, and the
#   "frozen" network would change.
# * **fine-tuning** (`--finetune`): every layer learns. Slower, usually more accurate.
#
# A randomly initialised ResNet (`--weights none`) is built with
# `zero_init_residual=True`: each residual block starts as the identity, which keeps
# activations, and so the loss, finite in a deep network.

# %%
class BirdClassifier(nn.Module):
    """A torchvision ResNet without its last layer (backbone) and a linear head."""

    def __init__(self, arch: str, num_classes: int, freeze_backbone: bool):
        super().__init__()
        check_arch(arch)
        backbone = ARCHITECTURES[arch][0](weights=None, zero_init_residual=True)
        self.num_features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(self.num_features, num_classes)
        self.freeze_backbone = freeze_backbone
        self.backbone.requires_grad_(not freeze_backbone)
        self.backbone_eval_when_frozen = True  # the benchmark's baseline switches this off

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone and self.backbone_eval_when_frozen:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 2:  # cached backbone features (train.py --cache-features): only the head runs
            return self.head(images)
        return self.head(self.backbone(images))


# %%
def build_model(arch: str, num_classes: int, weights: str = "imagenet", finetune: bool = False,
                log=print) -> BirdClassifier:
    """The course's model; `weights` is imagenet, none, or a path to a weights file."""
    check_num_classes(num_classes, "the dataset's class count")
    pretrained = weights != "none"
    if not pretrained and not finetune:
        log("notice: --weights none: a random frozen backbone cannot learn, so all layers train")
    model = BirdClassifier(arch, num_classes, freeze_backbone=pretrained and not finetune)
    if pretrained:
        load_backbone_weights(model.backbone, arch, weights)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


# %% [markdown]
# Build the model for our dataset and count what trains. (`weights="none"` here so the
# notebook runs without the download; on the cluster use `"imagenet"`.)

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# frozen = BirdClassifier(arch, num_classes, freeze_backbone=True)
# total, trainable = count_parameters(frozen)
# print(f"{arch}, frozen backbone: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f} %)")
# print("head:", frozen.head)
# full = build_model(arch, num_classes, weights="none")
# print(f"{arch}, everything trains: {count_parameters(full)[1]:,} trainable")

# %% [markdown]
# Look at: with a frozen backbone only the head's parameters train, a tiny fraction.
# (`build_model` with `weights="none"` trains every layer, as its notice says.)
#
# Now the modes: after `model.train()` the head trains, but the frozen backbone is still
# in evaluation mode, so its BatchNorm statistics cannot drift.

# %% tags=["active-ipynb"]
# frozen.train()
# print("head training:", frozen.head.training, "| backbone training:", frozen.backbone.training)
# logits = frozen(torch.randn(4, 3, image_size, image_size))
# print("logits", tuple(logits.shape), "= (batch, classes)")

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Exercises
#
# **1.** How many parameters does the head of a frozen ResNet-152 have for the real
# dataset's 525 classes? (The backbone gives 2048 features; a linear layer has a weight
# per input-output pair and a bias per output.)

# %% tags=["active-ipynb"]
# head_parameters = None  # your answer, a number

# %% tags=["active-ipynb"]
# expected = count_parameters(BirdClassifier("resnet152", 525, freeze_backbone=True))[1]
# print(f"Correct: {expected:,}." if head_parameters == expected else
#       "Not yet. Hint: weights are 2048 x 525, and each of the 525 outputs has a bias.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# head_parameters = 2048 * 525 + 525
# ```
# </details>
#
# **Discuss:** Why would DDP with a frozen backbone exchange far less data per step than
# DDP with `--finetune`? (Only parameters that have gradients are synchronised.)
#
# <details><summary>Model answer</summary>
#
# After each backward pass DDP averages, over all processes, the gradient of every
# parameter that requires one. With a frozen backbone that is only the head: for
# ResNet-152 and 525 classes 1,075,725 numbers per step (exercise 1), against 59,219,533
# with `--finetune` (`python scripts/model.py summary --arch resnet152 --classes 525
# --finetune` counts them): about 55 times more data on the network every step.
# </details>

# %% [markdown]
# ## Appendix: the command-line tool
#
# ```bash
# python scripts/model.py fetch-weights --arch resnet152   # on a login node
# python scripts/model.py summary --arch resnet152 --classes 525 [--finetune]
# ```

# %%
import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model.py", description="Fetch weights and inspect the course's model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch-weights", help="download ImageNet weights into $TORCH_HOME (run on a login node)")
    p.add_argument("--arch", default="resnet152", help="resnet18, resnet50 or resnet152 (default resnet152)")
    p.add_argument("--url", default=None, help="download from here instead (file:// works)")
    p = sub.add_parser("summary", help="print parameter counts")
    p.add_argument("--arch", default="resnet152")
    p.add_argument("--classes", type=int, default=525)
    p.add_argument("--finetune", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arch(args.arch)
    if args.command == "fetch-weights":
        print(f"weights for {args.arch} in {fetch_weights(args.arch, args.url)}")
    else:
        check_num_classes(args.classes, "--classes")
        model = BirdClassifier(args.arch, args.classes, freeze_backbone=not args.finetune)
        total, trainable = count_parameters(model)
        print(f"{args.arch}: {total:,} parameters, {trainable:,} trainable")
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)
