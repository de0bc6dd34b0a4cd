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
# # 5. DataParallel: several GPUs from one process
#
# `nn.DataParallel` is the one-line way to use every GPU of one node:
#
# ```python
# model = nn.DataParallel(model)   # that's it
# ```
#
# What it does in **every step**:
#
# 1. copies (*replicates*) the model's weights from GPU 0 to every other GPU;
# 2. splits (*scatters*) the batch into one slice per GPU;
# 3. runs the slices in parallel, one Python thread per GPU;
# 4. collects (*gathers*) all outputs on GPU 0, where the loss is computed, and the
#    gradients flow back and are summed on GPU 0, which alone runs the optimizer.
#
# So GPU 0 does more work than the others, the weights are re-sent every step, and the
# threads share one Python interpreter (the GIL). That is why the original workshop saw
# 2 GPUs bring ~30 min down only to ~20 min, and why PyTorch recommends
# DistributedDataParallel (next notebook) even on a single node. DataParallel is still
# worth a look: it is the simplest picture of data parallelism.
#
# Here `--batch-size` is the **global** batch: DataParallel splits it between the GPUs.
#
# ```bash
# python scripts/train_dp.py --data data/birds --arch resnet152 --batch-size 128   # all visible GPUs
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# image_size = 64
# epochs = 2
# batch_size = 32
# workers = 2
# out_dir = "../runs/notebook-dp"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %%
from __future__ import annotations

import torch
from torch import nn

from data import run_cli
from train import Runtime, StopRequest, fit, parse_args, pick_device, summary_line

# %% [markdown]
# ## The only change: how the model is wrapped
#
# The training loop is `train.fit`; DataParallel changes only `Runtime.wrap_model`. The
# optimizer, the checkpoints and validation keep using the unwrapped model, so a
# checkpoint written here loads into `train.py` and back.
#
# With fewer than two GPUs there is nothing to split, and the script says so and trains
# on the one device.

# %%
class DataParallelRuntime(Runtime):
    def wrap_model(self, model: nn.Module, cfg) -> nn.Module:
        gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        if gpus < 2:
            self.log(f"notice: DataParallel needs 2 or more GPUs, {gpus} visible: training on {self.device} alone")
            return model
        self.log(f"DataParallel over {gpus} GPUs: {cfg.batch_size // gpus} images per GPU per step")
        return nn.DataParallel(model)


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest().install()  # checkpoint and requeue before the time limit (train.py)
    cfg = parse_args(argv)
    device, notices = pick_device(cfg.device)
    print(summary_line(fit(cfg, DataParallelRuntime(device=device, notices=notices), stop)), flush=True)
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)

# %% [markdown]
# ## Try it
#
# On a CPU, or with one GPU, this is single-device training with one extra notice line.
# On a node with several GPUs, watch `nvidia-smi` in a terminal while it runs: GPU 0's
# memory is higher than the others', because the outputs and the optimizer live there.

# %% tags=["active-ipynb"]
# from pathlib import Path
# from data import make_synthetic
# if not Path(data_dir).exists():
#     make_synthetic(data_dir, classes=10, per_class=(40, 10, 10), image_size=image_size)
# cfg = parse_args(["--data", data_dir, "--arch", "resnet18", "--weights", "none", "--image-size", str(image_size),
#                   "--epochs", str(epochs), "--batch-size", str(batch_size), "--workers", str(workers),
#                   "--out", out_dir, "--overwrite"])  # --overwrite: running the notebook again replaces the run
# device, notices = pick_device(cfg.device)
# print(summary_line(fit(cfg, DataParallelRuntime(device=device, notices=notices))))

# %% [markdown]
# ## Exercises
#
# **1.** With `--batch-size 96` on a node with 4 GPUs, how many images does each GPU
# process per step?

# %% tags=["active-ipynb"]
# images_per_gpu = None  # your answer

# %% tags=["active-ipynb"]
# print("Correct: DataParallel scatters the 96 images into 4 slices of 24." if images_per_gpu == 96 // 4 else
#       "Not yet. Hint: --batch-size is the global batch here; it is split between the GPUs.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# images_per_gpu = 96 // 4
# ```
# </details>
#
# **2.** Name two things DataParallel does in every step that DistributedDataParallel
# does only once, or never. (Replicating the weights; gathering outputs on one GPU.)
