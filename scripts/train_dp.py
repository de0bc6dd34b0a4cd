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
# # 6. DataParallel: several GPUs from one process (optional)
#
# `nn.DataParallel` is the one-line way to use every GPU of one node. What it does in
# **every step**:
#
# 1. copies (*replicates*) the model's weights from GPU 0 to every other GPU;
# 2. splits (*scatters*) the batch into one slice per GPU;
# 3. runs the slices in parallel, one Python thread per GPU;
# 4. collects (*gathers*) all outputs on GPU 0, where the loss is computed, and the
#    gradients flow back and are summed on GPU 0, which alone runs the optimizer.
#
# So GPU 0 does more work than the others, the weights are sent again every step, and
# the threads share one Python interpreter (the GIL). PyTorch recommends
# DistributedDataParallel (next lesson) even on a single node; DataParallel is the
# simplest picture of data parallelism, which is why it is here.
#
# **You will learn to:**
# - switch on DataParallel in `train.py` and read how it splits a batch;
# - name what it repeats in every step that DDP does once or never.
#
# **Time:** about 10 minutes. Optional: lesson 7 (DDP) does not need it.

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

# %% [markdown] slideshow={"slide_type": "slide"}
# ## The lines in `train.py`
#
# DataParallel is one wrapper around the model, in `wrap_model`. The optimizer, the
# checkpoints and validation keep using the unwrapped model, so a checkpoint written
# with DataParallel loads into a single-device run and back. Here `--batch-size` is the
# **global** batch: DataParallel splits it between the GPUs.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# import inspect
# import train
# source = inspect.getsource(train.wrap_model)
# print(source[source.index("    elif cfg.data_parallel"):source.index("    return torch.compile")])

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Try it
#
# On a CPU, or with one GPU, this is single-device training with one notice line. On a
# node with several GPUs, watch `nvidia-smi` in a terminal while it runs: GPU 0's memory
# is higher than the others', because the outputs and the optimizer live there.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# from pathlib import Path
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic {data_dir} --classes 10 --image-size {image_size}
# !{sys.executable} ../scripts/train.py --data-parallel --data {data_dir} --arch resnet18 --weights none \
#     --image-size {image_size} --epochs {epochs} --batch-size {batch_size} --workers {workers} \
#     --out {out_dir} --overwrite

# %% [markdown] slideshow={"slide_type": "slide"}
# Look at: the `notice: DataParallel needs 2 or more GPUs` line on a machine without
# them, and `processes 1`: one process, whatever the number of GPUs.
#
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
# **Discuss:** name two things DataParallel does in every step that
# DistributedDataParallel does once, or never.
#
# <details><summary>Model answer</summary>
#
# It copies the weights from GPU 0 to every GPU in every step (DDP copies them once, at
# the start, and then keeps the replicas identical by averaging gradients); and it
# gathers every output on GPU 0 to compute the loss there (DDP computes each process's
# loss on its own GPU and never gathers outputs). A third: its threads share one Python
# interpreter, where DDP has one process per GPU.
# </details>
#
# ## Appendix: the old command
#
# `python scripts/train_dp.py` still works: it is `train.py --data-parallel`.

# %%
def main(argv: list[str] | None = None) -> int:
    import sys
    import train  # train.py imports nothing from here
    return train.main(["--data-parallel", *(sys.argv[1:] if argv is None else argv)])


# %% tags=["active-py"]
if __name__ == "__main__":
    from data import run_cli
    run_cli(main)
