"""What a real cluster's hardware changes: GPU generations (native or emulated bf16, kernels
missing from the PyTorch build), AMD GPUs with ROCm, and the CPUs a task may really use.

The GPUs are stand-ins: torch.cuda's lowest-level queries (device properties, capability,
architecture list) are replaced, so that PyTorch's own functions above them, such as
is_bf16_supported(including_emulation=...), run as they would on that GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch

import data
import sweep
import speed
import train
import train_ddp
from conftest import ROOT, cpu_env, run_script, tiny_train_args

PINNED_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130 from PyPI


def pretend_gpu(monkeypatch, name: str, capability: tuple[int, int], arch_list=PINNED_ARCHS, hip=None):
    """One CUDA (or ROCm) GPU as PyTorch would see it; bf16 emulation works wherever it is tried."""
    major, minor = capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        name=name, major=major, minor=minor, gcnArchName="gfx90a" if hip else ""))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", None if hip else "13.0")


# --- precision ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,capability,expected", [
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16),   # native bf16
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16),
    ("Tesla T4", (7, 5), torch.float16),                 # bf16 only emulated: fp16 with a scaler
    ("Tesla V100-SXM2-32GB", (7, 0), torch.float16),
])
def test_auto_precision_uses_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, name, capability, expected):
    pretend_gpu(monkeypatch, name, capability, arch_list=["sm_70", *PINNED_ARCHS])
    assert torch.cuda.is_bf16_supported(), "PyTorch says yes on every one of them (emulation included)"
    assert train.pick_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("capability,reported", [((8, 0), "native"), ((7, 0), "emulated (slow: --amp auto uses fp16)")])
def test_the_gpu_check_reports_native_or_emulated_bf16(monkeypatch, capability, reported):
    pretend_gpu(monkeypatch, "a GPU", capability)
    assert speed.bf16_support() == reported


@pytest.mark.parametrize("device,amx,amp,expected", [
    ("cpu", True, "auto", torch.bfloat16),    # a CPU with AMX matrix units
    ("cpu", False, "auto", None),             # any other CPU: fp32
    ("cpu", False, "bf16", torch.bfloat16),   # asked for: given, measured in the ladder
    ("cuda", False, "off", None),
    ("cuda", False, "fp16", torch.float16),
])
def test_precision_on_cpus_and_when_asked_for(monkeypatch, device, amx, amp, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert train.pick_precision(amp, torch.device(device)) == expected


# --- kernels for the GPU ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,capability,runs", [
    ("sm_80", (8, 6), True),      # same major, older minor: binary compatible
    ("sm_86", (8, 0), False),     # a newer minor does not run on an older GPU
    ("sm_75", (7, 0), False),     # V100 with the pinned wheel
    ("sm_90a", (9, 0), True),
    ("compute_70", (7, 5), True),  # PTX: compiled for any later GPU when first used
    ("compute_80", (7, 0), False),
])
def test_which_build_architectures_run_on_which_gpu(arch, capability, runs):
    assert train.kernels_run_on(arch, *capability) is runs


def test_a_training_start_on_a_gpu_without_kernels_stops_in_one_line(monkeypatch, tiny_data, tmp_path, capsys):
    pretend_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    argv = [str(a) for a in tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1")]
    for main in (train.main, train_ddp.main):  # train_dp uses train's pick_device
        with pytest.raises(SystemExit) as stopped:
            data.run_cli(main, argv)
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and error.startswith("error: GPU 0 (Tesla V100-SXM2-32GB) is sm_70"), error
        assert "sm_75 sm_80" in error and "COURSE_ENV_ACTIVATE" in error and "CUDA 12.6" in error
    assert not (tmp_path / "run").exists()


def test_a_gpu_the_build_has_kernels_for_starts(monkeypatch):
    pretend_gpu(monkeypatch, "NVIDIA L40S", (8, 9))  # sm_89: the sm_86 kernels run on it
    assert train.pick_device("auto").type == "cuda"


# --- AMD GPUs (ROCm) ------------------------------------------------------------------------

def test_a_rocm_build_is_recognised_and_skips_gpu_jpeg_decoding(monkeypatch, capsys):
    pretend_gpu(monkeypatch, "AMD Instinct MI250X", (9, 0), arch_list=["gfx90a", "gfx942"], hip="6.2.41133")
    device = train.pick_device("auto")
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    assert device.type == "cuda" and len(notices) == 1
    assert notices[0].startswith("notice: ROCm build of PyTorch (HIP 6.2.41133)") and "untested" in notices[0]
    cfg = SimpleNamespace(gpu_decode=True)
    assert speed.use_gpu_decode(cfg, device) is False
    assert "nvJPEG, which ROCm builds lack" in capsys.readouterr().out
    assert train.pick_precision("auto", device) == torch.bfloat16


def test_gpu_use_is_recorded_with_rocm_smi_on_amd_nodes(tmp_path):
    """A stand-in rocm-smi prints what the real one prints for --showuse --showmeminfo vram --csv."""
    fake = tmp_path / "bin" / "rocm-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\n"
                    "echo 'device,GPU use (%),VRAM Total Memory (B),VRAM Total Used Memory (B)'\n"
                    "echo 'card0,97,68702699520,10737418240'\necho 'card1,5,68702699520,1073741824'\n")
    fake.chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{fake.parent}:/usr/bin:/bin"}  # no nvidia-smi
    script = f"source slurm/gpu_monitor.sh && gpu_monitor_start {run} 1 && sleep 1.5"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "(rocm-smi)" in result.stdout, result.stdout + result.stderr
    lines = (run / "gpu.csv").read_text().splitlines()
    assert lines[0].startswith("timestamp, index, utilization.gpu") and len(lines) >= 3
    assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.000, 0, 97 %, 10240 MiB", lines[1]), lines[1]
    assert lines[2].endswith(", 1, 5 %, 1024 MiB")
    assert sweep.plot_gpu_use(run).read_bytes()[:4] == b"\x89PNG"


# --- CPUs and threads -----------------------------------------------------------------------

@pytest.mark.parametrize("affinity,env,expected", [
    (64, {}, 64),                                              # a laptop or login node: all it may use
    (64, {"SLURM_CPUS_PER_TASK": "16"}, 16),                   # a cluster that does not bind tasks
    (1, {"SLURM_CPUS_PER_TASK": "8"}, 1),                      # bound to one core (srun without SRUN_CPUS_PER_TASK)
    (16, {"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun: 4 processes share the task
    (2, {"LOCAL_WORLD_SIZE": "4"}, 1),
])
def test_the_cpus_a_process_may_use(monkeypatch, affinity, env, expected):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda _: set(range(affinity)))
    for name in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert data.available_cpus() == expected


def test_workers_take_the_whole_allocation_in_a_job_and_at_most_8_elsewhere(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # e.g. train_dp.sbatch: 16 cores for two GPUs' images
    assert data.default_num_workers() == 16
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")  # a big shared login node
    assert data.default_num_workers() == 8


@pytest.mark.parametrize("env,workers,threads", [
    ({"SLURM_CPUS_PER_TASK": "2"}, 1, "threads 1 (2 CPUs - 1 workers)"),
    ({"SLURM_CPUS_PER_TASK": "2"}, 0, "threads 2 (2 CPUs - 0 workers)"),
    ({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "1"}, 0, "threads 1 (OMP_NUM_THREADS)"),
])
def test_the_header_line_says_how_many_compute_threads_the_allocation_gives(tiny_data, tmp_path, env, workers,
                                                                            threads):
    run_env = cpu_env(**env)
    if "OMP_NUM_THREADS" not in env:
        del run_env["OMP_NUM_THREADS"]
    args = tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--max-steps", "1")
    args[args.index("--workers") + 1] = str(workers)
    done = run_script("train.py", *args, env=run_env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("processes "))
    assert header.endswith(f"| workers {workers} | {threads}"), header
