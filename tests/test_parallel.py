"""Parallel training gives the single-device result: DDP (1, 2, 3 processes), DataParallel, sweeps."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import data
import model
import sweep
import train
import train_ddp
from conftest import TINY, cpu_env, run_script, run_torchrun, tiny_train_args

GLOBAL_BATCH = 12  # 96 training images: 8 steps per epoch for 1, 2 and 3 processes
VALID_IMAGES = TINY["classes"] * TINY["per_class"][1] - 1  # 29: neither 2 nor 3 divides it


@pytest.fixture(scope="module")
def odd_data(tiny_data, tmp_path_factory) -> Path:
    root = Path(shutil.copytree(tiny_data, tmp_path_factory.mktemp("odd") / "birds"))
    next((root / "valid").glob("*/001.jpg")).unlink()
    return root


@pytest.fixture(scope="module")
def runs(odd_data, standin_weights, tmp_path_factory) -> dict[str, Path]:
    """One epoch with a frozen pretrained-style backbone and a fixed data order, four ways."""
    out = tmp_path_factory.mktemp("parallel")

    def args(name: str, batch: int) -> list:
        return ["--data", odd_data, "--arch", "resnet18", "--weights", standin_weights, "--image-size", 32,
                "--batch-size", batch, "--workers", 0, "--epochs", 1, "--no-shuffle", "--lr", 0.01,
                "--out", out / name]

    results = {
        "single": run_script("train.py", *args("single", GLOBAL_BATCH)),
        "dp": run_script("train_dp.py", *args("dp", GLOBAL_BATCH)),
        "ddp1": run_torchrun(1, "train.py", *args("ddp1", GLOBAL_BATCH)),
        "ddp2": run_torchrun(2, "train.py", *args("ddp2", GLOBAL_BATCH // 2)),
        "ddp3": run_torchrun(3, "train.py", *args("ddp3", GLOBAL_BATCH // 3)),
    }
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        (out / name / "stdout.txt").write_text(result.stdout)
    return {name: out / name for name in results}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("name", ["ddp1", "ddp2", "ddp3"])
def test_ddp_ends_with_the_weights_of_one_process_with_the_global_batch(runs, standin_weights, name):
    single, parallel = weights(runs["single"]), weights(runs[name])
    assert single.keys() == parallel.keys()
    torch.manual_seed(0)  # the head train.fit starts from (--seed 0)
    initial = model.build_model("resnet18", TINY["classes"], str(standin_weights), log=lambda *a: None).state_dict()
    assert not torch.equal(single["head.weight"], initial["head.weight"]), "the head did not train"
    for key in single:
        assert torch.allclose(single[key], parallel[key], atol=1e-5), key


def test_fsdp_gives_ddps_weights_across_a_resume_and_keeps_half_the_parameters_per_rank(odd_data, tmp_path):
    """--fsdp with 2 processes, every layer training, stopped after epoch 1 and resumed: DDP's weights and Adam
    state (its checkpoints hold whole tensors; the resume cuts them into shards again), and each rank keeps half
    the parameter bytes. Batch 7 of 29 validation images: rank 0 takes 3 validation steps, rank 1 2 and an empty
    one (without it, rank 0 would wait for rank 1's share of the weights until --dist-timeout)."""
    def args(name: str, *extra) -> list:
        return ["--data", odd_data, "--arch", "resnet18", "--weights", "none", "--image-size", 32, "--batch-size", 7,
                "--workers", 0, "--epochs", 2, "--max-steps", 1, "--no-shuffle", "--amp", "off", "--dist-timeout", 60,
                "--out", tmp_path / name, *extra]

    runs = {"ddp": run_torchrun(2, "train.py", *args("ddp")),
            "fsdp epoch 1": run_torchrun(2, "train.py", *args("fsdp", "--fsdp", "--stop-after", 1)),
            "fsdp resumed": run_torchrun(2, "train.py", *args("fsdp", "--fsdp", "--resume"))}
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    assert "resumed from" in runs["fsdp resumed"].stdout
    kept = re.findall(r"^rank (\d) keeps ([\d,]+) of ([\d,]+) parameter bytes \(fsdp\)$", runs["fsdp epoch 1"].stdout,
                      re.M)
    total = model.count_parameters(model.build_model("resnet18", TINY["classes"], "none", log=lambda *a: None))[0] * 4
    assert sorted(rank for rank, _, _ in kept) == ["0", "1"]
    assert {int(whole.replace(",", "")) for _, _, whole in kept} == {total}
    local = [int(part.replace(",", "")) for _, part, _ in kept]
    assert sum(local) == total and all(abs(part - total / 2) <= total / 100 for part in local), local
    ddp, fsdp = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("ddp", "fsdp"))
    assert ddp["model"].keys() == fsdp["model"].keys()
    for key in ddp["model"]:
        assert torch.allclose(ddp["model"][key].float(), fsdp["model"][key].float(), atol=1e-5), key
    for index, state in ddp["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.allclose(value, fsdp["optimizer"]["state"][index][key], atol=1e-5), (index, key)
    assert [m["val_samples"] for m in train.read_metrics(tmp_path / "fsdp")] == [VALID_IMAGES, VALID_IMAGES]


def test_under_fsdp_every_rank_takes_as_many_validation_steps_as_rank_0():
    """29 images, 2 ranks, batch 7: rank 0 has 15 images (3 batches), rank 1 14 (2 batches and an empty one)."""
    cfg = argparse.Namespace(batch_size=7, workers=0, fsdp=True)
    dataset = torch.utils.data.TensorDataset(torch.arange(29.0), torch.arange(29))
    shares = [list(train.eval_loader(cfg, dataset, rank, 2)) for rank in (0, 1)]
    assert [[len(labels) for _, labels in share] for share in shares] == [[7, 7, 1], [7, 7, 0]]
    assert sorted(torch.cat([labels for share in shares for _, labels in share]).tolist()) == list(range(29))
    assert len(train.eval_loader(cfg, dataset, 1, 2)) == 3


def test_memory_per_process_counts_4_bytes_per_parameter_and_shards_all_but_the_block_in_use():
    net = model.build_model("resnet18", TINY["classes"], "none", log=lambda *a: None)
    total = model.count_parameters(net)[0]
    block = max(sum(p.numel() for p in b.parameters()) for b in net.modules() if type(b).__name__ == "BasicBlock")
    ddp, fsdp = train_ddp.memory_per_process(net, 1, sharded=False), train_ddp.memory_per_process(net, 4, sharded=True)
    assert ddp == {"weights": 4 * total, "gradients": 4 * total, "Adam state": 8 * total, "DDP buckets": 4 * total,
                   "block in use": 0}
    assert fsdp == {"weights": total, "gradients": total, "Adam state": 2 * total, "DDP buckets": 0,
                    "block in use": 8 * block}


def test_activation_bytes_are_what_autograd_keeps_for_the_backward_pass():
    """A linear layer keeps its input (2 x 3 floats), ReLU its output (2 x 5 floats); the weights are not counted."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
    assert train_ddp.activation_bytes(net, torch.randn(2, 3)) == 4 * (2 * 3 + 2 * 5)


def test_dataparallel_without_gpus_says_so_and_trains_as_train_py_does(runs):
    """Without 2 GPUs, train.py --data-parallel (here through train_dp.py) builds no nn.DataParallel
    (it needs CUDA to scatter): it says so and trains on one device. nn.DataParallel itself runs only on 2 or more GPUs, in
    slurm/gpu_check.sbatch; its weights are compared with one device's nowhere on CPUs."""
    single, dp = weights(runs["single"]), weights(runs["dp"])
    assert all(torch.equal(single[k], dp[k]) for k in single)
    assert "notice: DataParallel needs 2 or more GPUs, 0 visible" in (runs["dp"] / "stdout.txt").read_text()


@pytest.mark.parametrize("gpus,wrapped", [(0, False), (1, False), (2, True), (4, True)])
def test_dataparallel_wraps_the_model_only_with_two_or_more_gpus(monkeypatch, capsys, gpus, wrapped):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    net = torch.nn.Linear(2, 2)
    cfg = argparse.Namespace(batch_size=32, data_parallel=True, compile=False)
    got = train.wrap_model(net, cfg, ddp=False, device=torch.device("cuda"))
    assert isinstance(got, torch.nn.DataParallel) == wrapped and (got.module if wrapped else got) is net
    expected = f"DataParallel over {gpus} GPUs: {32 // gpus} images per GPU" if wrapped else \
        f"notice: DataParallel needs 2 or more GPUs, {gpus} visible: training on cuda alone"
    assert expected in capsys.readouterr().out


def test_validation_counts_every_image_once_for_any_world_size(runs):
    results = {name: train.read_metrics(runs[name])[-1] for name in ["single", "ddp2", "ddp3"]}
    assert {name: m["val_samples"] for name, m in results.items()} == {n: VALID_IMAGES for n in results}
    assert results["ddp2"]["val_acc"] == results["single"]["val_acc"] == results["ddp3"]["val_acc"]
    for name in ["ddp2", "ddp3"]:
        assert results[name]["val_loss"] == pytest.approx(results["single"]["val_loss"], rel=1e-5)
        assert results[name]["train_samples"] == 96


def test_one_process_under_torchrun_still_joins_a_process_group(runs):
    ranks = [line for line in (runs["ddp1"] / "stdout.txt").read_text().splitlines() if line.startswith("rank ")]
    assert len(ranks) == 1 and ranks[0].startswith("rank 0/1 ")
    assert ranks[0].endswith("launcher torchrun backend gloo")


def test_only_rank_0_reports_but_every_rank_says_where_it_runs(runs):
    stdout = (runs["ddp3"] / "stdout.txt").read_text()
    assert sorted(line.split()[1] for line in stdout.splitlines() if line.startswith("rank ")) == ["0/3", "1/3", "2/3"]
    assert stdout.count("summary: ") == 1 and stdout.count("run directory") == 1
    assert "processes 3 | batch per process 4 | global batch 12 | lr 0.01" in stdout
    config = json.loads((runs["ddp3"] / "config.json").read_text())
    assert config["world_size"] == 3 and config["global_batch_size"] == 12


# --- launcher detection --------------------------------------------------------------------

def test_srun_is_detected_from_slurm_variables():
    launch = train.detect_launch({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
                                      "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu3",
                                      "SLURM_JOB_ID": "123456"})
    assert launch == train.Launch("srun", 5, 1, 8, "gpu07", 20000 + 123456 % 20000)


def test_two_jobs_get_different_ports():
    assert train.port_for_job("1001") != train.port_for_job("1002")
    assert 20000 <= train.port_for_job("99999999") < 40000


def test_torchrun_is_detected_from_its_variables():
    launch = train.detect_launch({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node1",
                                      "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    assert launch == train.Launch("torchrun", 3, 1, 4, "node1", 29400)


def test_plain_python_and_a_batch_script_without_srun_are_one_process():
    assert train.detect_launch({}) == train.Launch("python", 0, 0, 1)
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "node[1-2]"}  # no step id
    assert train.detect_launch(batch_step).world_size == 1


def test_a_job_step_of_one_task_is_one_process_not_ddp():
    """Sweep steps (`srun --ntasks=1 ... &`) run side by side: as process groups they would share one port."""
    one_task = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "2", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1",
                "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1"}
    assert train.detect_launch(one_task) == train.Launch("python", 0, 0, 1)
    job_of_four_step_of_one = dict(one_task, SLURM_NTASKS="4")  # the step's count wins over the job's
    assert train.detect_launch(job_of_four_step_of_one).launcher == "python"
    two_tasks = dict(one_task, SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2")
    assert train.detect_launch(two_tasks) == train.Launch("srun", 0, 0, 2, "node1", train.port_for_job("77"))


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("a01,a02", "a01"), ("gpu-[003-004]", "gpu-003"),
    ("nid[001-002]-ib", "nid001-ib"),                       # a suffix after the brackets (HPE Cray)
    ("gpu[07-08,11],cpu3", "gpu07"), ("r[1-2]n[01-04]", "r1n01"),  # several ranges, several brackets
    ("x1000c0s0b0n[0-1],x1000c0s1b0n0", "x1000c0s0b0n0"), ("n[5,1-3]", "n5")])
def test_first_host_of_a_node_list(nodelist, first):
    assert train.first_host(nodelist) == first


def test_a_node_list_that_is_not_one_is_a_one_line_error():
    with pytest.raises(data.UserError, match=r"cannot read the Slurm node list 'gpu\[07-'"):
        train.first_host("gpu[07-")


def test_srun_ranks_meet_on_the_first_node_of_their_step_not_of_the_job():
    step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "3", "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    assert train.detect_launch(step).master_addr == "gpu03"


# --- independent runs ------------------------------------------------------------------------

def test_sweep_rows_become_separate_runs_and_gather_tables_them(tiny_data, tmp_path, capsys):
    sweep_file = tmp_path / "sweep.csv"
    sweep_file.write_text("name,lr,batch-size\nslow,0.0003,8\nfast,0.003,16\n")
    common = ["--data", str(tiny_data), "--arch", "resnet18", "--weights", "none", "--image-size", "32",
              "--workers", "0", "--epochs", "1"]
    for row in (0, 1):
        assert sweep.main(["run", str(sweep_file), str(row), "--runs-dir", str(tmp_path / "runs"), *common]) == 0
    capsys.readouterr()
    summaries = sweep.gather([tmp_path / "runs"], plot=tmp_path / "sweep.png")
    table = capsys.readouterr().out
    assert [(s["run"], s["lr"], s["global_batch"]) for s in summaries] == [("fast", 0.003, 16), ("slow", 0.0003, 8)]
    assert table.splitlines()[0].split()[:4] == ["run", "arch", "lr", "global_batch"]
    rows = [line.split()[:4] for line in table.splitlines()[1:3]]
    assert rows == [["fast", "resnet18", "0.003", "16"], ["slow", "resnet18", "0.0003", "8"]]
    best = max(summaries, key=lambda s: s["best_val_acc"])
    assert f"best: {best['run']} (best_val_acc={best['best_val_acc']:.4f})" in table
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_row_that_does_not_exist_is_one_line(tmp_path):
    (tmp_path / "sweep.csv").write_text("name,lr\na,0.1\n")
    result = run_script("sweep.py", "run", tmp_path / "sweep.csv", 3, env=cpu_env())
    assert result.returncode == 2 and "row 3 does not exist" in result.stderr and result.stderr.count("\n") == 1


def test_a_dist_timeout_that_is_not_positive_is_one_line(tiny_data, tmp_path):
    result = run_script("train_ddp.py", *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 1),
                        "--dist-timeout", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--dist-timeout 0 is out of range" in result.stderr
    for timeout in ("-5", "nan", "inf"):
        with pytest.raises(data.UserError, match=f"--dist-timeout {timeout} is out of range"):
            train.parse_args(["--dist-timeout", timeout])


HIDE_LAST_PT_FROM_RANK_1 = """
import os, pathlib, sys
sys.path.insert(0, {scripts!r})
import torch, train_ddp
from data import run_cli
if os.environ["RANK"] == "1":  # a filesystem whose attribute cache has not seen last.pt yet
    exists, load = pathlib.Path.exists, torch.load
    pathlib.Path.exists = lambda self, *a, **k: self.name != "last.pt" and exists(self, *a, **k)
    def no_last_pt(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and pathlib.Path(path).name == "last.pt":
            raise FileNotFoundError(path)
        return load(path, *args, **kwargs)
    torch.load = no_last_pt
run_cli(train_ddp.main)
"""


def test_rank_0_decides_whether_to_resume_for_every_rank(tiny_data, tmp_path):
    from conftest import free_port
    import subprocess
    import sys
    wrapper = tmp_path / "rank1_cannot_see_last_pt.py"
    wrapper.write_text(HIDE_LAST_PT_FROM_RANK_1.format(scripts=str(train_ddp.__file__).rsplit("/", 1)[0]))
    args = ["--data", tiny_data, "--arch", "resnet18", "--weights", "none", "--image-size", 32, "--batch-size", 4,
            "--workers", 0, "--max-steps", 2, "--epochs", 2, "--out", tmp_path / "run", "--dist-timeout", 30]
    train.fit(train.parse_args([str(a) for a in args[:-2]] + ["--stop-after", "1"]))  # one process: 8 images
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(wrapper), *map(str, args), "--resume"]
    resumed = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at the end of epoch 1" in resumed.stdout
    assert [(m["epoch"], m["train_samples"]) for m in train.read_metrics(tmp_path / "run")] == [(1, 8), (2, 16)]


# --- numbers you can trust (issue 15) ----------------------------------------------------------

def test_ddp_scores_the_test_split_as_one_process_does_with_the_lr_of_its_global_batch(tiny_data, tmp_path):
    """One run of 2 gloo processes, --lr-scaling linear: the lr of the global batch, and best.pt scored on an
    odd number of test images (6 on one rank, 5 on the other), each once: what one process gives for best.pt."""
    import argparse
    root = Path(shutil.copytree(tiny_data, tmp_path / "birds"))
    sorted((root / "test").glob("*/*.jpg"))[0].unlink()  # 11 test images
    ddp = run_torchrun(2, "train.py", *tiny_train_args(root, tmp_path / "ddp", "--epochs", 1, "--max-steps", 4,
                                                       "--batch-size", 6, "--lr", 0.005, "--lr-scaling", "linear"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "global batch 12 | lr 0.01 (--lr 0.005 x 2: linear rule for 2 processes) |" in ddp.stdout
    assert [m["lr"] for m in train.read_metrics(tmp_path / "ddp")] == [0.01]
    score = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    model, _ = train.load_trained_model(tmp_path / "ddp" / "best.pt")
    test = data.load_splits(root, 32, splits=("test",))["test"]
    one_process = train.evaluate(model, data.make_loader(test, 4, 0), None, torch.device("cpu"),
                                 argparse.Namespace(channels_last=False))
    assert score["test_samples"] == one_process["val_samples"] == 11
    assert score["test_acc"] == one_process["val_acc"] and score["test_top5"] == one_process["val_top5"]
    assert score["test_loss"] == pytest.approx(one_process["val_loss"], rel=1e-5)
    assert f"test_acc={one_process['val_acc']:.4f}" in ddp.stdout.strip().splitlines()[-1]
    cost = score["cost"]  # rank 0's record: the cores of both processes, the larger peak, no RAPL shared by ranks
    assert cost["device_kind"] == "cpu cores" and cost["devices"] == 2 * max(1, len(os.sched_getaffinity(0)) // 2)
    assert cost["peak_host_memory_mb"] > 50 and cost["energy_joules"] is None
    assert f"device_hours={cost['device_hours']:.3g} peak_mem_mb=" in ddp.stdout.strip().splitlines()[-1]


def test_gather_shows_the_test_score_of_finished_runs(tiny_data, tmp_path, capsys):
    def fit(name, *extra):
        return train.fit(train.parse_args([str(a) for a in tiny_train_args(tiny_data, tmp_path / "runs" / name,
                                                                          "--epochs", 2, "--max-steps", 1, *extra)]))
    finished, stopped = fit("finished"), fit("stopped", "--stop-after", 1)
    assert "test_acc" in finished and "test_acc" not in stopped
    capsys.readouterr()
    summaries = sweep.gather([tmp_path / "runs"])
    header, *rows = capsys.readouterr().out.splitlines()[:3]
    column = header.split().index("test_acc")
    assert header.split()[column - 1] == "best_val_acc"
    assert {row.split()[0]: row.split()[column] for row in rows} == {"finished": f"{finished['test_acc']:.4g}",
                                                                     "stopped": "nan"}
    assert {row.split()[0]: row.split()[-2] for row in rows} == {"finished": f"{finished['cost']['device_hours']:.4g}",
                                                                 "stopped": "-"}  # device_h: a finished run's
    assert [s["run"] for s in summaries] == ["finished", "stopped"]
