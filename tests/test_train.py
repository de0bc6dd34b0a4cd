"""Single-device training: it learns, it records, it resumes, and it fails politely."""
from __future__ import annotations

import json
import os

import pytest
import torch

import data
import train
from conftest import TINY, cpu_env, run_script, tiny_train_args

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "val_top5", "val_samples",
               "images_per_sec", "epoch_seconds"}
VALID_IMAGES = TINY["classes"] * TINY["per_class"][1]


def fit(tiny_data, out, *extra):
    return train.fit(train.parse_args([str(a) for a in tiny_train_args(tiny_data, out, *extra)]))


def test_cpu_training_reaches_three_times_chance(tiny_data, tmp_path):
    """6 classes: chance is 1/6, so at least 0.5 validation accuracy (measured: 0.9-1.0)."""
    out = tmp_path / "run"
    result = run_script("train.py", *tiny_train_args(tiny_data, out, "--epochs", 6, "--lr", 0.003))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: ") and f"run_dir={out}" in last
    val_acc = float(last.split("val_acc=")[1].split()[0])
    assert val_acc >= 3 / TINY["classes"], last
    assert "notice: no CUDA device found; training on the CPU" in result.stdout

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(METRIC_KEYS <= m.keys() for m in metrics)
    assert all(m["val_samples"] == VALID_IMAGES for m in metrics)
    assert metrics[-1]["val_acc"] == pytest.approx(val_acc, abs=1e-4)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]

    config = json.loads((out / "config.json").read_text())
    assert config["options"]["lr"] == 0.003 and config["options"]["arch"] == "resnet18"
    assert config["num_classes"] == TINY["classes"] and config["world_size"] == 1
    assert config["versions"]["torch"] == torch.__version__ and config["host"]
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 6 and {"model", "optimizer", "scheduler", "rng"} <= checkpoint.keys()
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["classes"] == data.find_classes(tiny_data) and best["val_acc"] == max(m["val_acc"] for m in metrics)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_continues_to_the_same_result(tiny_data, tmp_path):
    straight = fit(tiny_data, tmp_path / "straight", "--epochs", 3)
    fit(tiny_data, tmp_path / "resumed", "--epochs", 3, "--stop-after", 2)  # as if the job ended
    assert [m["epoch"] for m in train.read_metrics(tmp_path / "resumed")] == [1, 2]
    resumed = fit(tiny_data, tmp_path / "resumed", "--epochs", 3, "--resume")
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == straight["val_loss"] and resumed["val_acc"] == straight["val_acc"]
    lines = train.read_metrics(tmp_path / "resumed")
    assert [m["epoch"] for m in lines] == [1, 2, 3]


def test_resume_refuses_a_checkpoint_of_another_architecture(tiny_data, tmp_path):
    fit(tiny_data, tmp_path / "run", "--epochs", 1)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    args = [str(a) for a in tiny_train_args(tiny_data, tmp_path / "run", "--epochs", 2, "--resume")]
    args[args.index("resnet18")] = "resnet50"
    with pytest.raises(data.UserError, match="written with arch='resnet18', this run has arch='resnet50'"):
        train.fit(train.parse_args(args))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # nothing lost


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--batch-size", "500"], "--batch-size 500 x 1 process(es) is larger than the 96 training images"),
    (["--device", "cuda"], "--device cuda: no CUDA device is visible here"),
])
def test_bad_arguments_are_one_line_and_exit_2(tiny_data, tmp_path, args, message):
    result = run_script("train.py", *tiny_train_args(tiny_data, tmp_path / "run"), *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_missing_dataset_is_one_line_and_exit_2(tmp_path):
    result = run_script("train.py", *tiny_train_args(tmp_path / "no-such-data", tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: dataset directory") and "does not exist" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_run_directory_is_one_line(tiny_data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(data.UserError, match="cannot write to run directory"):
        fit(tiny_data, locked / "run", "--epochs", 1)


def test_a_run_directory_under_a_file_is_one_line(tiny_data, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(data.UserError, match="cannot write to run directory .*choose another --out"):
        fit(tiny_data, tmp_path / "file" / "run", "--epochs", 1)


def test_help_documents_every_option():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for option in ["--data", "--arch", "--weights", "--finetune", "--epochs", "--batch-size", "--lr", "--workers",
                   "--image-size", "--seed", "--out", "--resume", "--device", "--amp", "--wandb"]:
        assert option in result.stdout


def test_wandb_offline_logs_the_config_without_network(tiny_data, tmp_path):
    out = tmp_path / "run"
    env = cpu_env(WANDB_API_KEY="fake-wandb-key-0123456789", HOME=str(tmp_path))
    result = run_script("train.py", *tiny_train_args(tiny_data, out, "--epochs", 1, "--wandb", "offline"), env=env)
    assert result.returncode == 0, result.stderr
    assert "wandb sync" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("summary: ")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # what `wandb sync` will upload
    assert b'"batch_size":8' in record and b'"arch":"resnet18"' in record
    leaked = [p for p in out.rglob("*") if p.is_file() and b"fake-wandb-key" in p.read_bytes()]
    assert leaked == [] and "fake-wandb-key" not in result.stdout + result.stderr


def test_the_gradient_scaler_runs_only_with_fp16(tiny_data, tmp_path):
    for amp, scaled in [("off", False), ("fp16", True)]:
        fit(tiny_data, tmp_path / amp, "--epochs", 1, "--max-steps", 2, "--amp", amp)
        scaler = torch.load(tmp_path / amp / "last.pt", weights_only=True)["scaler"]
        assert bool(scaler) == scaled, (amp, scaler)
    # Two optimizer steps went through the scaler: either both kept the scale (the tracker counts
    # them), or an overflow halved it and the step was skipped.
    assert (scaler["_growth_tracker"], scaler["scale"]) == (2, 65536.0) or scaler["scale"] < 65536.0, scaler
