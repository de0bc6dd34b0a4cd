"""Profiling beyond torch.profiler and what a run cost (issue 18): NVTX ranges around the phases of a
training step (--nvtx), nsys from the Slurm files (slurm/nsys), how busy the cores and GPUs were, and the
job-efficiency summary (sweep.py efficiency). No GPU and no nsys here: both are stand-ins."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import speed
import sweep
import train
from conftest import ROOT, one_line_exit_2, tiny_train_args

STEP_PHASES = ["copy to device", "forward", "backward", "optimizer step", "bookkeeping"]


@pytest.fixture(scope="module")
def recorded_run(tiny_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """One CPU run with --nvtx (2 steps): its directory, and the NVTX ranges it pushed and
    popped ("pop"), recorded by a stand-in for torch.cuda.nvtx."""
    ranges, out = [], tmp_path_factory.mktemp("recorded") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda.nvtx, "range_push", lambda name: ranges.append(name))
        patch.setattr(torch.cuda.nvtx, "range_pop", lambda: ranges.append("pop"))
        argv = tiny_train_args(tiny_data, out, "--epochs", 1, "--max-steps", 2, "--nvtx")
        train.fit(train.parse_args([str(a) for a in argv]))
    return out, ranges


def test_nvtx_names_every_phase_of_every_step_in_order_on_a_cpu(recorded_run):
    out, ranges = recorded_run
    assert (out / "summary.json").is_file()
    pushed = [r for r in ranges if r != "pop"]
    assert pushed == (["wait for data", *STEP_PHASES] * 2) + ["wait for data"]  # the 3rd batch ends the epoch
    assert ranges == [r for name in pushed for r in (name, "pop")]  # one open at a time, each closed


def test_without_nvtx_a_phase_mark_is_a_function_that_does_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pytest.fail("no range without --nvtx"))
    cfg = train.parse_args(["--data", "x"])
    assert speed.step_phases(cfg) is speed.no_phase and speed.no_phase("forward") is None
    cfg.nvtx = True
    assert isinstance(speed.step_phases(cfg), speed.NvtxPhases) == speed.nvtx_available()


def test_the_nsys_window_brackets_the_profiled_steps_of_the_first_pass_only():
    calls = []
    loader = speed.NsysWindow(range(8), start=lambda: calls.append("start"), stop=lambda: calls.append("stop"))
    iter(loader)  # tqdm's notebook bar calls iter() once without iterating: that is not the first pass
    for batch in loader:
        calls.append(batch)
    assert calls == [0, 1, "start", 2, 3, 4, "stop", 5, 6, 7]  # speed.PROFILED_STEPS: 2, 3, 4, as --profile
    calls.clear()
    assert list(loader) == list(range(8)) and calls == []  # later epochs: nothing
    short = speed.NsysWindow(range(4), start=lambda: calls.append("start"), stop=lambda: calls.append("stop"))
    assert list(short) == [0, 1, 2, 3] and calls == ["start", "stop"]  # an epoch that ends inside the window


# --- how busy the cores and the GPUs were -----------------------------------------------------

def busy_child(ready, release):
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    ready.set()
    release.wait(10)


def test_the_cpu_time_counts_dataloader_workers_while_they_still_run():
    """Persistent DataLoader workers are alive when the cost is measured: their CPU time comes from /proc."""
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    before = train.process_cpu_seconds()
    child = context.Process(target=busy_child, args=(ready, release))
    child.start()
    try:
        assert ready.wait(10)
        assert train.process_cpu_seconds() - before >= 0.25
    finally:
        release.set()
        child.join()


def test_gpu_utilisation_is_the_mean_of_its_samples_and_none_without_a_reading(monkeypatch):
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    readings = iter([80.0, 40.0, 100.0, 60.0])  # two samples of two GPUs: means 0.6 and 0.8
    monkeypatch.setattr(train, "gpu_utilisation_percent", lambda device: next(readings))
    meter = train.GpuUseMeter(gpus, every=0)
    assert meter.stop() == pytest.approx(0.7)
    monkeypatch.setattr(train, "gpu_utilisation_percent", lambda device: None if device.index else 50.0)
    assert train.GpuUseMeter(gpus, every=0).stop() is None  # no NVML for one GPU: no guess
    assert train.GpuUseMeter([], every=0).stop() is None  # a CPU run


# --- nsys from the Slurm files: slurm/env.sh (COURSE_NSYS=1) and slurm/nsys/run ------------------

NSYS_WRAPPERS = ROOT / "slurm" / "nsys" / "bin"
NSYS_DEFAULTS = ["--trace=cuda,nvtx,osrt", "--capture-range=cudaProfilerApi", "--capture-range-end=stop",
                 "--force-overwrite=true"]
PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"  # the inner command: it prints what it got


def standin_nsys(directory: Path) -> Path:
    """A stand-in for `nsys` in directory/bin (tests only): it appends its arguments as one JSON line to
    directory/nsys.jsonl, then runs the command after `profile --option=value ...`. Returns the log's path."""
    bin_dir, log = directory / "bin", directory / "nsys.jsonl"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nsys"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
command = [a for a in args[1:] if not a.startswith("--")]  # nsys takes --option=value forms here
os.execvp(command[0], args[args.index(command[0]):])
""")
    script.chmod(0o755)
    return log


def nsys_env(tmp_path: Path, with_nsys: bool, wrappers: bool = True, **extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the course's python, as after activation
    if with_nsys:
        standin_nsys(tmp_path)
        path = f"{tmp_path / 'bin'}:{path}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COURSE_", "RUN_DIR"))}
    return {**env, "PATH": f"{NSYS_WRAPPERS}:{path}" if wrappers else path, "OMP_NUM_THREADS": "1", **extra}


def run_wrapped(tmp_path: Path, *command: str, with_nsys: bool = True, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=nsys_env(tmp_path, with_nsys, **extra))


def test_a_training_command_runs_under_nsys_with_its_report_in_the_run_directory(tmp_path):
    out = tmp_path / "runs" / "42-train"
    done = run_wrapped(tmp_path, "python", "-c", PRINT_ARGV, "scripts/train.py", "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["scripts/train.py", "--epochs", "1", "--out", str(out), "--nvtx"]
    [argv] = [json.loads(line) for line in (tmp_path / "nsys.jsonl").read_text().splitlines()]
    assert argv == ["profile", *NSYS_DEFAULTS, f"--output={out}/nsys/%h-%p", "python", "-c", PRINT_ARGV,
                    "scripts/train.py", "--epochs", "1", "--out", str(out), "--nvtx"]
    assert (out / "nsys").is_dir() and done.stderr == f"nsys: profiling python on {socket.gethostname()} into {out}/nsys/\n"


def test_torchrun_and_sweep_rows_are_profiled_into_their_runs_and_other_commands_are_not(tmp_path):
    runs, torchrun = tmp_path / "sweep", tmp_path / "bin" / "torchrun"
    torchrun.parent.mkdir()
    torchrun.write_text(f"#!{sys.executable}\n{PRINT_ARGV}\n")  # a stand-in: the real one imports torch (seconds)
    torchrun.chmod(0o755)
    done = run_wrapped(tmp_path, "torchrun", "--nproc-per-node=2", "scripts/sweep.py", "run", "s.csv", "0",
                       "--runs-dir", str(runs), COURSE_NSYS_OPTIONS="--trace=nvtx,osrt")
    assert json.loads(done.stdout) == ["--nproc-per-node=2", "scripts/sweep.py", "run", "s.csv", "0", "--runs-dir",
                                       str(runs), "--nvtx"]
    argv = json.loads((tmp_path / "nsys.jsonl").read_text())
    assert argv[:5] == ["profile", "--trace=nvtx,osrt", "--force-overwrite=true", f"--output={runs}/nsys/%h-%p",
                        "torchrun"]
    for command in (["python", "-c", PRINT_ARGV, "scripts/data.py", "stage"],
                    ["python3", "-c", PRINT_ARGV, "scripts/sweep.py", "gather", "runs"]):
        done = run_wrapped(tmp_path, *command)
        assert json.loads(done.stdout) == command[3:] and done.stderr == ""  # as it is: no --nvtx, no nsys
    assert len((tmp_path / "nsys.jsonl").read_text().splitlines()) == 1


def test_without_nsys_the_wrapper_says_so_in_one_line_and_runs_the_command_unprofiled(tmp_path):
    done = run_wrapped(tmp_path, "python", "-c", PRINT_ARGV, "scripts/train.py", "--out", str(tmp_path / "run"),
                       with_nsys=False)
    assert done.returncode == 0 and json.loads(done.stdout) == ["scripts/train.py", "--out", str(tmp_path / "run")]
    assert done.stderr.startswith("notice: COURSE_NSYS=1, but there is no nsys command on ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("with_nsys", [True, False])
def test_env_sh_puts_the_nsys_wrappers_on_path_only_when_asked_and_nsys_exists(tmp_path, with_nsys):
    def python_after_env_sh(**settings):
        env = {**nsys_env(tmp_path, with_nsys, wrappers=False), "RUNS": str(tmp_path / "runs"),
               "TMPDIR": str(tmp_path), "COURSE_ENV_ACTIVATE": ":", **settings}
        return subprocess.run(["bash", "-c", "source slurm/env.sh; command -v python"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=60)

    off, on = python_after_env_sh(), python_after_env_sh(COURSE_NSYS="1")
    assert off.returncode == on.returncode == 0 and off.stderr == ""
    assert off.stdout.strip() == str(Path(sys.executable).parent / "python")  # the files run as they always did
    if with_nsys:
        assert on.stdout.strip() == str(NSYS_WRAPPERS / "python") and on.stderr == ""
    else:
        assert on.stdout == off.stdout and on.stderr == (
            "notice: COURSE_NSYS=1, but there is no nsys command here: the runs are not profiled (load the site's "
            "Nsight Systems or CUDA module in COURSE_ENV_ACTIVATE)\n")


def test_the_site_file_names_the_nsys_switch_empty():
    assert re.search(r"^COURSE_NSYS=\$\{COURSE_NSYS-\}$", (ROOT / "slurm/site.sh").read_text(), re.M)
    assert sorted(p.name for p in NSYS_WRAPPERS.iterdir()) == ["python", "python3", "torchrun"]
    assert all(os.readlink(p) == "../run" for p in NSYS_WRAPPERS.iterdir())


# --- the job-efficiency summary: sweep.py efficiency ----------------------------------------------

# sacct -j 1234 -P -n -o JobID,State,Elapsed,TotalCPU,AllocCPUS,NNodes,ReqMem,MaxRSS, in sacct's formats (written
# by hand: the local test cluster keeps no accounting). 8 cores for 12:35, 1:02:03 of CPU time: 61.6 %; the
# largest step's MaxRSS 3456789K = 3375.8 MiB of 32G asked: 10.3 %.
SACCT_LINES = """1234|COMPLETED|00:12:35|01:02:03|8|1|32G|
1234.batch|COMPLETED|00:12:35|00:01.512|8|1||204800K
1234.extern|COMPLETED|00:12:35|00:00:00|8|1||0
1234.0|COMPLETED|00:12:30|01:02:01|8|1||3456789K
"""


def standin_sacct(directory: Path, lines: str = SACCT_LINES, status: int = 0, said: str = "") -> Path:
    """A stand-in `sacct` in directory/bin: it records its arguments in directory/sacct.args and prints `lines`
    for job 1234 (nothing for any other job, as sacct does), or `said` on stderr with exit `status`."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "sacct"
    script.write_text(f"""#!/bin/bash
echo "$*" >{directory / "sacct.args"}
[[ -n {shlex.quote(said)} ]] && {{ echo {shlex.quote(said)} >&2; exit {status}; }}
[[ $2 == 1234 ]] && printf '%s' {shlex.quote(lines)}
exit 0
""")
    script.chmod(0o755)
    return bin_dir


def test_the_efficiency_of_a_recorded_cpu_run_comes_from_its_cost_and_says_what_is_not_measurable(
        recorded_run, monkeypatch):
    out, _ = recorded_run
    monkeypatch.setenv("PATH", "/nonexistent")  # no sacct
    found = sweep.efficiency(out)
    cost = json.loads((out / "summary.json").read_text())["cost"]
    assert found["cost"] == cost and found["job"] is None and found["gpu_csv_utilisation"] is None
    assert cost["cpu_cores"] == data.available_cpus() and cost["cpu_seconds"] > 0
    assert 0 < cost["cpu_utilisation"] <= 1 and cost["gpu_utilisation"] is None and cost["energy_joules"] is None
    lines = sweep.efficiency_report(found).splitlines()
    assert lines[0] == f"run {out} (job -)"
    assert lines[2] == (f"  CPU utilisation    {cost['cpu_utilisation']:.0%} of {cost['cpu_cores']} cores "
                        f"({sweep.duration(cost['cpu_seconds'])} of CPU time: the processes and their DataLoader workers)")
    assert lines[4:] == ["  GPU utilisation    - (a CPU run)", "  energy             not measurable here",
                         "Slurm's accounting: none (no job id: not run in a Slurm job; --job names one)"]
    assert sweep.efficiency(out, "1234")["sacct"] == "no sacct command here"


def test_the_efficiency_adds_slurms_accounting_as_seff_computes_it(recorded_run, tmp_path, monkeypatch):
    out, _ = recorded_run
    monkeypatch.setenv("PATH", f"{standin_sacct(tmp_path)}:{os.environ['PATH']}")
    found = sweep.efficiency(out, "1234")
    assert (tmp_path / "sacct.args").read_text().split() == [
        "-j", "1234", "-P", "-n", "-o", "JobID,State,Elapsed,TotalCPU,AllocCPUS,NNodes,ReqMem,MaxRSS"]
    assert found["sacct"] == pytest.approx({
        "state": "COMPLETED", "elapsed_seconds": 755, "cores": 8, "nodes": 1, "total_cpu_seconds": 3723,
        "cpu_efficiency": 3723 / (755 * 8), "memory_asked_mb": 32768, "max_rss_mb": 3456789 / 1024,
        "memory_efficiency": 3456789 / 1024 / 32768})
    assert sweep.efficiency_report(found).splitlines()[-3:] == [
        "Slurm's accounting (sacct -j 1234): COMPLETED, 12.6 min on 1 node(s)",
        "  CPU efficiency     62% of 8 cores (TotalCPU 62.0 min of 8 x 12.6 min)",
        "  memory efficiency  10% (MaxRSS 3376 MB of 32768 MB asked)"]
    assert sweep.efficiency(out, "999")["sacct"] == "sacct -j 999: no such job"


def test_sacct_before_slurm_21_08_asks_memory_per_core_and_a_site_without_accounting_says_so(tmp_path, monkeypatch):
    old = SACCT_LINES.replace("|32G|", "|4000Mc|").replace("01:02:03", "1-00:00:00")
    monkeypatch.setenv("PATH", f"{standin_sacct(tmp_path, old)}:{os.environ['PATH']}")
    usage = sweep.sacct_job("1234")
    assert usage["memory_asked_mb"] == 8 * 4000 and usage["total_cpu_seconds"] == 24 * 3600
    monkeypatch.setenv("PATH", f"{standin_sacct(tmp_path, said='Slurm accounting storage is disabled', status=1)}:"
                               f"{os.environ['PATH']}")
    assert sweep.sacct_job("1234") == "sacct -j 1234: Slurm accounting storage is disabled"  # as this cluster says


def test_efficiency_of_a_run_without_a_summary_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = one_line_exit_2(sweep.main, ["efficiency", tmp_path / "run"], capsys)
    assert err == (f"error: {tmp_path / 'run'} has no summary.json with a cost: efficiency reads a finished run (a "
                   "stopped run's cost is in the summary line of its log)\n")
