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
# # 5. Independent runs: the parallelism that needs no communication
#
# Before splitting **one** training over several GPUs, ask whether you need one training
# at all. Choosing a learning rate or a batch size means training several models; each
# can run on its own GPU, and they never talk to each other. Two GPUs then do twice the
# work in the same time, exactly: no gradients to exchange, no waiting for the slowest
# process. For a hyperparameter search this beats any data parallelism.
#
# Data parallelism is the right tool when **one** run is too slow for you to wait for,
# or too large for one GPU's memory.
#
# Slurm offers two ways to run independent trainings:
#
# * **several job steps in one allocation** (`slurm/sweep_steps.sbatch`): the job asks
#   for 2 GPUs; two `srun --exact -n1 --gpus-per-task=1 … &` lines start one training on
#   each, and `wait` waits for both. One queue wait, a fixed number of runs.
# * **a job array** (`slurm/sweep_array.sbatch`, `#SBATCH --array=0-1`): Slurm queues
#   one small job per setting, each with its own `SLURM_ARRAY_TASK_ID`. Each runs as soon
#   as one GPU is free anywhere: the friendliest to a busy cluster, and it scales to
#   hundreds of settings.
#
# Both read the settings from a **sweep file**, one row per run, so the settings are
# written once (`slurm/sweep.csv`).
#
# **You will learn to:**
# - write a sweep file and turn each row into a training run;
# - run independent trainings as job steps or as a job array, and know when to choose which;
# - gather finished runs into one table and one plot.
#
# **Time:** about 20 minutes. All of it is core.
#
# This notebook is also `scripts/sweep.py`:
#
# ```bash
# python scripts/sweep.py run slurm/sweep.csv 1 --data ... --epochs 5   # train with row 1's settings
# python scripts/sweep.py gather runs/sweep                             # compare the runs
# ```

# %% tags=["parameters", "active-ipynb"]
# data_dir = "../data/birds-synthetic"
# image_size = 32
# epochs = 3
# sweep_file = "../slurm/sweep.csv"
# runs_dir = "../runs/notebook-sweep"

# %% tags=["active-ipynb"]
# # The notebooks import each other's code from their exports in ../scripts.
# import sys
# sys.path.insert(0, "../scripts")

# %% jupyter={"source_hidden": true}
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path, PurePosixPath

from data import UserError, atomic_write, run_cli
import train

# %% [markdown] slideshow={"slide_type": "slide"}
# ## The sweep file
#
# A CSV file: a `name` column for the run directory, and one column per `train.py`
# option to set, named as on the command line without the dashes:
#
# ```
# name,lr,batch-size
# lr-1e-3,0.001,64
# lr-1e-2,0.01,64
# ```

# %%
def read_sweep(path: Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    with open(path, newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows or "name" not in rows[0]:
        raise UserError(f"{path} needs a header with a 'name' column and at least one row")
    return rows


def sweep_arguments(row: dict[str, str], runs_dir: Path) -> list[str]:
    """train.py options for one row: --<column> <value> ..., and --out <runs_dir>/<name>."""
    args = []
    for column, value in row.items():
        if column != "name":
            args += [f"--{column}", value] if value.lower() != "true" else [f"--{column}"]
    return args + ["--out", str(Path(runs_dir) / row["name"])]


# %% [markdown]
# `sweep.py run` turns a row into `train.py` options: here are both rows of the course's
# sweep file as the command lines they become.

# %% slideshow={"slide_type": "fragment"} tags=["active-ipynb"]
# for row in read_sweep(sweep_file):
#     print("train.py", " ".join(sweep_arguments(row, runs_dir)))

# %% [markdown]
# `run_row` is what a job step or an array task runs: one row, by its number. A row's
# name becomes a folder under `--runs-dir`, so a name that would climb out of it is refused.

# %%
def check_run_name(name: str, index: int, runs_dir: Path) -> None:
    """A row's name is a folder inside runs_dir: not empty, not absolute, never climbing out with '..'."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise UserError(f"row {index}'s name {name!r} is not a folder inside --runs-dir {runs_dir}: "
                        "give each row a plain name, such as lr-1e-3")


def run_row(sweep_file: Path, index: int, runs_dir: Path, train_args: list[str]) -> int:
    rows = read_sweep(sweep_file)
    if not 0 <= index < len(rows):
        raise UserError(f"row {index} does not exist: {sweep_file} has rows 0 to {len(rows) - 1}")
    check_run_name(rows[index]["name"], index, runs_dir)
    return train.main(train_args + sweep_arguments(rows[index], runs_dir))


# %% [markdown] slideshow={"slide_type": "slide"}
# ## Try it: two runs at once
#
# We start both rows of the sweep file at the same time, as the two job steps of
# `slurm/sweep_steps.sbatch` would, each restricted to one CPU thread (on the cluster:
# one GPU each). Then we gather them.

# %% slideshow={"slide_type": "subslide"} tags=["active-ipynb"]
# import os
# import subprocess
# if not Path(data_dir).exists():
#     !{sys.executable} ../scripts/data.py synthetic {data_dir} --classes 10 --image-size {image_size}
# common = ["--data", data_dir, "--arch", "resnet18", "--weights", "none", "--image-size", str(image_size),
#           "--epochs", str(epochs), "--workers", "0", "--overwrite"]  # --overwrite: running again replaces the runs
# env = {**os.environ, "OMP_NUM_THREADS": "1"}
# jobs = [subprocess.Popen([sys.executable, "../scripts/sweep.py", "run", sweep_file, str(row), "--runs-dir", runs_dir,
#                           *common], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
#         for row in range(len(read_sweep(sweep_file)))]
# for job in jobs:
#     print(job.communicate()[0].strip().splitlines()[-1])
#     assert job.returncode == 0

# %% [markdown] slideshow={"slide_type": "slide"}
# ## Gathering the results
#
# Every run directory holds `config.json` and `metrics.jsonl`, so comparing runs needs no
# database and no network: read them, print one row per run, and plot the validation
# accuracy of each run per epoch and against wall-clock time: **time to accuracy**, what
# a faster configuration must improve (images/s that do not reach the accuracy sooner
# gain nothing); `min_to_best` is the minutes until a run first reached its best
# validation accuracy. Choose between runs by `best_val_acc`; `test_acc` (from
# `summary.json`: the best model scored once on `test/` when the run finished) is the
# figure to report, and choosing by it would make it as flattering as the validation
# accuracy. When a run directory also holds `gpu.csv` (recorded by
# `slurm/gpu_monitor.sh` in a GPU job), `gather` plots its GPU utilisation and memory
# into `gpu.png`. A utilisation well below 100 % means the GPU waited; one near 100 %
# means only that some kernel was running in every sample, not that the GPU was used
# well: the power draw and the images/s achieved say more. `device_h` and `energy_kj` are
# what the run cost (`cost` in `summary.json`, lesson 3): device-hours, what your
# allocation is charged, and the energy where a counter could be read in a run of one
# job, else `-`. `sweep.py efficiency RUN_DIR` says what one run's job used of what it
# asked for, like Slurm's `seff` (appendix).
#
# The helpers that read and plot the runs are collapsed below; `gather` puts them together.

# %% jupyter={"source_hidden": true}
def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among paths and their sub-directories (those with metrics.jsonl)."""
    runs = []
    for path in map(Path, paths):
        candidates = [path] if (path / "metrics.jsonl").is_file() else sorted(path.glob("**/metrics.jsonl"))
        runs += [c if c.is_dir() else c.parent for c in candidates]
    return sorted(set(runs))


def run_summary(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    metrics = train.read_metrics(run)
    options = config["options"]
    last = metrics[-1] if metrics else {}
    final = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    if final.get("epoch") != last.get("epoch"):  # the summary of an earlier end, before a resume with more epochs
        final = {}
    return {"run": run.name, "arch": options["arch"], "lr": options["lr"],
            "global_batch": config.get("global_batch_size", options["batch_size"]),
            "processes": config.get("world_size", 1), "epochs": len(metrics),
            "val_acc": last.get("val_acc", float("nan")),
            "best_val_acc": max((m["val_acc"] for m in metrics), default=float("nan")),
            "test_acc": final.get("test_acc", float("nan")),  # best.pt on test/, once the run finished
            "images_per_sec": last.get("images_per_sec", float("nan")),
            "minutes": sum(m["epoch_seconds"] for m in metrics) / 60, "min_to_best": minutes_to_best(metrics),
            **cost_columns(final.get("cost")),
            "metrics": metrics}


def accuracy_over_time(metrics: list[dict]) -> list[tuple[float, float]]:
    """(seconds since the run began, val_acc) after each epoch: time to accuracy. `wall_seconds` counts from the
    start of the run's preparation (data, model, cached features), earlier jobs included; records without it
    (runs from before it was recorded) add up their epochs' `epoch_seconds`, which leave the preparation out."""
    points, total = [], 0.0
    for m in metrics:
        total += m["epoch_seconds"]
        points.append((m.get("wall_seconds", total), m["val_acc"]))
    return points


def minutes_to_best(metrics: list[dict]) -> float:
    """Minutes until the run first reached its best validation accuracy."""
    points = accuracy_over_time(metrics)
    best = max((acc for _, acc in points), default=float("nan"))
    return next((seconds / 60 for seconds, acc in points if acc == best), float("nan"))


def cost_columns(cost: dict | None) -> dict:
    """device_h (of every job of the run) and energy_kj (measured in the job that finished it: shown for a run
    of one job) from summary.json's cost; - where unknown."""
    cost = cost or {}
    joules = cost.get("energy_joules") if cost.get("jobs", 1) == 1 else None
    return {"device_h": cost.get("total_device_hours", cost.get("device_hours", "-")),
            "energy_kj": "-" if joules is None else joules / 1000}


def format_table(summaries: list[dict]) -> str:
    columns = ["run", "arch", "lr", "global_batch", "processes", "epochs", "val_acc", "best_val_acc", "test_acc",
               "images_per_sec", "minutes", "min_to_best", "device_h", "energy_kj"]
    cells = [[f"{s[c]:.4g}" if isinstance(s[c], float) else str(s[c]) for c in columns] for s in summaries]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_runs(summaries: list[dict], path: Path | None = None):
    import matplotlib
    if path is not None:
        matplotlib.use("Agg")  # a batch job has no display
    import matplotlib.pyplot as plt
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
    for s in summaries:
        label = f"{s['run']} (lr {s['lr']:g}, batch {s['global_batch']})"
        by_epoch.plot([m["epoch"] for m in s["metrics"]], [m["val_acc"] for m in s["metrics"]], marker="o", label=label)
        points = accuracy_over_time(s["metrics"])
        by_time.plot([t / 60 for t, _ in points], [acc for _, acc in points], marker="o", label=label)
    by_epoch.set_xlabel("epoch"); by_epoch.set_ylabel("validation accuracy"); by_epoch.legend(fontsize=8)
    by_time.set_xlabel("wall-clock minutes since the run began (time to accuracy)"); by_time.set_xlim(left=0)
    fig.tight_layout()
    if path is not None:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
    return fig


def read_gpu_csv(run: Path) -> dict[str, list[tuple[float, float, float]]]:
    """GPU index -> (time, utilisation %, memory MiB) of every sample in the gpu.csv of slurm/gpu_monitor.sh."""
    from datetime import datetime
    samples: dict[str, list[tuple[float, float, float]]] = {}
    with open(run / "gpu.csv", newline="") as f:
        for row in csv.reader(f, skipinitialspace=True):
            if len(row) < 4 or not row[2].split()[0].isdigit():  # the header, a cut-off last line
                continue
            when = datetime.strptime(row[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.setdefault(row[1], []).append((when, float(row[2].split()[0]), float(row[3].split()[0])))
    return samples


def plot_gpu_use(run: Path) -> Path:
    """<run>/gpu.png from the gpu.csv that slurm/gpu_monitor.sh recorded: utilisation and memory per GPU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = read_gpu_csv(run)
    start = min((s[0][0] for s in samples.values()), default=0.0)
    fig, (util, memory) = plt.subplots(1, 2, figsize=(10, 3))
    for gpu, values in sorted(samples.items()):
        minutes = [(t - start) / 60 for t, _, _ in values]
        util.plot(minutes, [u for _, u, _ in values], label=f"GPU {gpu}")
        memory.plot(minutes, [m / 1024 for _, _, m in values], label=f"GPU {gpu}")
        print(f"{run.name}: GPU {gpu} mean utilisation {statistics.mean(u for _, u, _ in values):.0f} %, "
              f"peak memory {max(m for _, _, m in values) / 1024:.1f} GiB")
    util.set_ylabel("utilisation %"); memory.set_ylabel("memory used (GiB)")
    for ax in (util, memory):
        ax.set_xlabel("minutes"); ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(run / "gpu.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return run / "gpu.png"


# %% slideshow={"slide_type": "subslide"}
def gather(paths: list[Path], plot: Path | None = None) -> list[dict]:
    runs = find_runs(paths)
    if not runs:
        raise UserError(f"no run directories (with metrics.jsonl) in {', '.join(map(str, paths))}")
    summaries = [run_summary(run) for run in runs]
    print(format_table(summaries))
    best = max(summaries, key=lambda s: s["best_val_acc"])
    print(f"best: {best['run']} (best_val_acc={best['best_val_acc']:.4f})")
    if plot:
        plot_runs(summaries, plot)
        print(f"plot written to {plot}")
    for run in (r for r in runs if (r / "gpu.csv").is_file()):  # recorded by slurm/gpu_monitor.sh
        print(f"GPU use plotted in {plot_gpu_use(run)}")
    return summaries


# %% tags=["active-ipynb"]
# summaries = gather([runs_dir])
# fig = plot_runs(summaries)

# %% [markdown] slideshow={"slide_type": "slide"}
# Read the table: which learning rate won, and did both runs take about the same time?
# They did not wait for each other, so two runs cost one run's wall time on two devices.
#
# ## Exercises
#
# **1.** A sweep of 12 settings, each needing 1 GPU for 30 minutes, on a cluster where
# you may use 4 GPUs at once. How many minutes until all results are in, at best?

# %% tags=["active-ipynb"]
# minutes = None  # your answer

# %% tags=["active-ipynb"]
# print("Correct: 12 runs / 4 GPUs = 3 rounds of 30 minutes." if minutes == 12 // 4 * 30 else
#       "Not yet. Hint: independent runs do not slow each other down; count rounds of 4 runs.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# minutes = 12 // 4 * 30
# ```
# </details>
#
# **2.** You add a third row to `slurm/sweep.csv`. `slurm/sweep_array.sbatch` has
# `#SBATCH --array=0-1`: what must that line say to run all three rows?

# %% tags=["active-ipynb"]
# array_line = None  # your answer: the whole line, a string

# %% tags=["active-ipynb"]
# if isinstance(array_line, str) and array_line.replace("#SBATCH", "").split("#")[0].strip() == "--array=0-2":
#     print("Correct: array task ids are the row numbers, 0 to 2 for three rows.")
# else:
#     print("Not yet. Hint: the task ids count from 0 and name rows of the sweep file; `#SBATCH --array=FIRST-LAST`.")

# %% [markdown]
# <details><summary>Solution</summary>
#
# ```python
# array_line = "#SBATCH --array=0-2"
# ```
# </details>


# %% [markdown]
# ## Appendix: what a job used (`sweep.py efficiency`)
#
# In the spirit of Slurm's `seff`: did the job use what it asked for? From the run directory
# (`summary.json`'s `cost`, lesson 3): the wall time, the device-hours, how busy the CPU cores
# were (`cpu_utilisation`: the CPU time of the processes and their DataLoader workers over
# wall time x cores), the peak memory, and the GPUs' utilisation and energy where NVML could be
# read; and the mean utilisation in `gpu.csv` where `slurm/gpu_monitor.sh` recorded one. Where
# `sacct` exists and the site keeps accounting, also Slurm's view of the whole job (`--job`,
# else the job id in `config.json`): CPU efficiency = `TotalCPU` / (`Elapsed` x `AllocCPUS`), as
# `seff` computes it, and memory efficiency = the largest step's `MaxRSS` / the memory asked
# (`ReqMem`). Low CPU efficiency with idle GPUs: more DataLoader workers; low with busy GPUs:
# ask for fewer cores. Memory far below what was asked: ask for less, and the job starts sooner.
#
# ```bash
# python scripts/sweep.py efficiency runs/1234-train          # the job id from config.json
# python scripts/sweep.py efficiency runs/1234-train --job 1234
# ```

# %%
SACCT_FIELDS = ("JobID", "State", "Elapsed", "TotalCPU", "AllocCPUS", "NNodes", "ReqMem", "MaxRSS")
SIZE_UNITS = {"": 1 / 2**20, "K": 1 / 2**10, "M": 1.0, "G": 2**10, "T": 2**20}  # to MiB


def slurm_seconds(text: str) -> float:
    """[D-][HH:]MM:SS[.mmm] (Elapsed, TotalCPU) in seconds."""
    days, _, clock = text.rpartition("-")
    parts = [float(part) for part in clock.split(":")]
    return int(days or 0) * 24 * 3600 + sum(value * 60**i for i, value in enumerate(reversed(parts)))


def slurm_mib(text: str) -> float | None:
    """A size of sacct (1234K, 3.50G, 4000M; no unit: bytes) in MiB; None when empty."""
    match = re.fullmatch(r"([\d.]+)([KMGT]?)", text.strip())
    return float(match.group(1)) * SIZE_UNITS[match.group(2)] if match else None


def sacct_job(job: str) -> dict | str:
    """Slurm's accounting of a job: its figures, or the one-line reason why there are none."""
    if not shutil.which("sacct"):
        return "no sacct command here"
    done = subprocess.run(["sacct", "-j", job, "-P", "-n", "-o", ",".join(SACCT_FIELDS)], capture_output=True,
                          text=True, timeout=60)
    rows = [dict(zip(SACCT_FIELDS, line.split("|"))) for line in done.stdout.splitlines() if "|" in line]
    whole = next((row for row in rows if row["JobID"] == job), None)
    if done.returncode or whole is None:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"sacct -j {job}: " + (said[0] if said else "no such job")
    return job_usage(whole, rows)


def job_usage(whole: dict, rows: list[dict]) -> dict:
    """seff's figures from sacct's lines: the job's own and its steps' (MaxRSS is a step's largest task)."""
    cores, nodes, elapsed = int(whole["AllocCPUS"]), int(whole["NNodes"] or 1), slurm_seconds(whole["Elapsed"])
    asked = re.fullmatch(r"([\d.]+[KMGT]?)([cn]?)", whole["ReqMem"])  # before Slurm 21.08: 4000Mc per core, Mn per node
    asked_mib = slurm_mib(asked.group(1)) * {"c": cores, "n": nodes, "": 1}[asked.group(2)] if asked else None
    peak = max((slurm_mib(row["MaxRSS"]) or 0.0 for row in rows), default=0.0)
    cpu = slurm_seconds(whole["TotalCPU"])
    return {"state": whole["State"], "elapsed_seconds": elapsed, "cores": cores, "nodes": nodes,
            "total_cpu_seconds": cpu, "cpu_efficiency": cpu / (elapsed * cores) if elapsed else None,
            "memory_asked_mb": asked_mib, "max_rss_mb": peak,
            "memory_efficiency": peak / asked_mib if asked_mib else None}


def efficiency(run: Path, job: str | None = None) -> dict:
    """What a finished run used, from its directory, and from Slurm's accounting where there is one."""
    run = Path(run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    if not summary.get("cost"):
        raise UserError(f"{run} has no summary.json with a cost: efficiency reads a finished run (a stopped run's "
                        "cost is in the summary line of its log)")
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    job = job or config.get("slurm_job_id")
    monitored = [u for samples in (read_gpu_csv(run) if (run / "gpu.csv").is_file() else {}).values()
                 for _, u, _ in samples]
    return {"run": str(run), "job": job, "cost": summary["cost"],
            "gpu_csv_utilisation": statistics.mean(monitored) / 100 if monitored else None,
            "sacct": sacct_job(job) if job else "no job id: not run in a Slurm job; --job names one"}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def efficiency_report(found: dict) -> str:
    """The efficiency summary as seff-like lines: the run's own figures, then Slurm's."""
    cost, sacct = found["cost"], found["sacct"]
    gpus = cost["device_kind"] == "gpu"
    energy = "not measurable here" if cost["energy_joules"] is None else f"{cost['energy_joules'] / 1000:.1f} kJ"
    lines = [f"run {found['run']} (job {found['job'] or '-'})",
             f"  wall time          {duration(cost['wall_seconds'])} in this job; {cost['total_device_hours']:.3g} "
             f"device-hours of {cost['devices']} {cost['device_kind']} in {cost['jobs']} job(s)",
             f"  CPU utilisation    {percent(cost.get('cpu_utilisation'))} of {cost.get('cpu_cores', '-')} cores "
             f"({duration(cost.get('cpu_seconds', 0))} of CPU time: the processes and their DataLoader workers)",
             f"  peak memory        host {cost['peak_host_memory_mb']:.0f} MB (the largest process)"
             + (f", GPU {cost['peak_device_memory_mb']:.0f} MB" if gpus else ""),
             (f"  GPU utilisation    {percent(cost.get('gpu_utilisation'))} (NVML), "
              f"{percent(found['gpu_csv_utilisation'])} (gpu.csv)") if gpus else "  GPU utilisation    - (a CPU run)",
             f"  energy             {energy}"]
    if isinstance(sacct, str):
        return "\n".join(lines + [f"Slurm's accounting: none ({sacct})"])
    asked = "-" if sacct["memory_asked_mb"] is None else f"{sacct['memory_asked_mb']:.0f}"
    return "\n".join(lines + [
        f"Slurm's accounting (sacct -j {found['job']}): {sacct['state']}, {duration(sacct['elapsed_seconds'])} "
        f"on {sacct['nodes']} node(s)",
        f"  CPU efficiency     {percent(sacct['cpu_efficiency'])} of {sacct['cores']} cores (TotalCPU "
        f"{duration(sacct['total_cpu_seconds'])} of {sacct['cores']} x {duration(sacct['elapsed_seconds'])})",
        f"  memory efficiency  {percent(sacct['memory_efficiency'])} (MaxRSS {sacct['max_rss_mb']:.0f} MB of {asked} "
        "MB asked)"])


# %% [markdown]
# ## Appendix: the command-line tool

# %%
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description="Run one row of a sweep; gather runs; what a run's job used.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train with the settings of one row of a sweep file",
                       epilog="Options after ROW go to train.py, e.g. --data DIR --epochs 5.")
    p.add_argument("sweep_file", type=Path)
    p.add_argument("row", type=int, help="row number from 0 (in a job array: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/sweep"), help="parent of the run directories")
    p = sub.add_parser("gather", help="table and plot of finished runs")
    p.add_argument("paths", type=Path, nargs="+", help="run directories or directories holding them")
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy plot to this PNG")
    p = sub.add_parser("efficiency", help="what a finished run's job used of what it asked for (like seff)")
    p.add_argument("run", type=Path, help="the run directory")
    p.add_argument("--job", default=None, help="the Slurm job id for sacct (default: the one in config.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "run":
        return run_row(args.sweep_file, args.row, args.runs_dir, rest)
    if rest:
        raise UserError(f"unknown options for {args.command}: {' '.join(rest)}")
    if args.command == "efficiency":
        print(efficiency_report(efficiency(args.run, args.job)))
        return 0
    gather(args.paths, args.plot)
    return 0


# %% tags=["active-py"]
if __name__ == "__main__":
    run_cli(main)
