"""Single-device training: it learns, it records, it resumes, and it fails politely."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import data
import resilience
import train
from conftest import TINY, cpu_env, one_line_exit_2, run_script, tiny_train_args

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
    assert config["versions"]["torch"] == torch.__version__ and config["host"] == socket.gethostname()
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 6 and {"model", "optimizer", "rng", "settings", "metrics"} <= checkpoint.keys()
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
    walls, epochs = [m["wall_seconds"] for m in lines], [m["epoch_seconds"] for m in lines]
    assert walls[0] > epochs[0] and walls[2] - walls[1] > epochs[2]  # the preparation too, the first job's also


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
    assert not (tmp_path / "run").exists()  # a run that cannot start leaves no directory behind


@pytest.mark.parametrize("args,message", [
    (["--device", "mps"], "--device 'mps' is not one the course trains on: use auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta' is not one the course trains on"),
    (["--weight-decay", "-1"], "--weight-decay -1 is out of range"),
    (["--weight-decay", "nan"], "--weight-decay nan is out of range"),
    (["--lr", "inf"], "--lr inf is out of range"),
    (["--seed", str(10**20)], f"--seed {10**20} is out of range"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it: choose one"),
    (["--fsdp", "--weights", "imagenet"], "--fsdp shards what trains, and a frozen backbone leaves only the head's"),
    (["--fsdp", "--data-parallel"], "--fsdp and --data-parallel are two ways to use several GPUs: choose one"),
    (["--fsdp"], "--fsdp shares the model out between processes: start them with torchrun or srun"),
])
def test_values_that_used_to_end_in_tracebacks_are_user_errors(tiny_data, tmp_path, args, message):
    """As UserError, run_cli prints them as one line with exit 2 (the test above)."""
    with pytest.raises(data.UserError) as error:
        fit(tiny_data, tmp_path / "run", "--epochs", 1, *args)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


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
    result = run_script("train.py", *tiny_train_args(tiny_data, out, "--epochs", 2, "--stop-after", 1,
                                                     "--wandb", "offline"), env=env)
    assert result.returncode == 0, result.stderr
    assert "wandb sync" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("summary: ")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # what `wandb sync` will upload
    assert b'"batch_size":8' in record and b'"arch":"resnet18"' in record
    leaked = [p for p in out.rglob("*") if p.is_file() and b"fake-wandb-key" in p.read_bytes()]
    assert leaked == [] and "fake-wandb-key" not in result.stdout + result.stderr

    # A requeued or resumed job continues the same W&B run: one id for both starts.
    resumed = run_script("train.py", *tiny_train_args(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--resume",
                                                      "--wandb", "offline"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    starts = sorted((out / "wandb").glob("offline-run-*"))  # offline-run-<date>_<time>-<id>
    ids = {p.name.split("-", 3)[3] for p in starts}
    assert len(starts) == 2 and len(ids) == 1 and ids == {resilience.wandb_run_id(out)}


def test_the_gradient_scaler_runs_only_with_fp16(tiny_data, tmp_path):
    for amp, scaled in [("off", False), ("fp16", True)]:
        fit(tiny_data, tmp_path / amp, "--epochs", 1, "--max-steps", 2, "--amp", amp)
        scaler = torch.load(tmp_path / amp / "last.pt", weights_only=True)["scaler"]
        assert bool(scaler) == scaled, (amp, scaler)
    # Two optimizer steps went through the scaler, which starts at (scale 65536, tracker 0): each
    # either counted a good step (tracker + 1) or, on an overflow, halved the scale and reset the tracker.
    two_updates = {(65536.0, 2), (32768.0, 1), (32768.0, 0), (16384.0, 0)}
    assert (scaler["scale"], scaler["_growth_tracker"]) in two_updates, scaler


# --- no lost work: schedule, refusals, resumes with other options (issue 11) ------------------

def load(path):
    return torch.load(path, weights_only=True)


def test_resume_with_more_epochs_follows_the_longer_cosine(tiny_data, tmp_path):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 2)
    before = load(out / "last.pt")["model"]
    fit(tiny_data, out, "--epochs", 4, "--max-steps", 2, "--resume")
    after = load(out / "last.pt")["model"]
    weights = [k for k in before if "running_" not in k and "num_batches" not in k]  # BatchNorm statistics move anyway
    assert not all(torch.equal(before[k], after[k]) for k in weights)
    lrs = [m["lr"] for m in train.read_metrics(out)]
    assert lrs[:2] == pytest.approx([1e-3, 5e-4])  # the 2-epoch cosine, as trained
    assert lrs[2:] == pytest.approx([train.cosine_lr(1e-3, e, 4) for e in (2, 3)]) and min(lrs) > 0


def test_a_second_run_into_the_same_out_is_refused_unless_overwrite(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1)
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(data.UserError) as refused:
        fit(tiny_data, out, "--epochs", 1, "--max-steps", 1)
    assert str(refused.value) == (f"{out} already holds a run (metrics.jsonl, last.pt, best.pt): continue it with "
                                  "--resume, start a new one with a fresh --out, or replace it with --overwrite")
    assert {name: (out / name).read_bytes() for name in kept} == kept
    capsys.readouterr()
    fit(tiny_data, out, "--epochs", 1, "--max-steps", 1, "--overwrite")
    assert "notice: --overwrite: replaced the earlier run" in capsys.readouterr().out
    assert [m["epoch"] for m in train.read_metrics(out)] == [1]


def stop_mid_epoch(tiny_data, out, *extra) -> dict:
    """One epoch stopped at step 10 of 12, as SIGTERM would (the loop checks every 10 steps)."""
    stop = train.StopRequest()
    stop.received = "SIGTERM"
    return train.fit(train.parse_args([str(a) for a in tiny_train_args(tiny_data, out, "--epochs", 1, *extra)]),
                     stop=stop)


def test_resume_refuses_what_it_cannot_honour_in_one_line(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert "stopped" in stop_mid_epoch(tiny_data, out)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(data.UserError) as refused:
        fit(tiny_data, out, "--epochs", 1, "--resume", "--optimizer", "sgd", "--seed", 1, "--batch-size", 4)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot resume from {out / 'last.pt'}")
    for old, new in [("optimizer='adamw'", "optimizer='sgd'"), ("seed=0", "seed=1"), ("batch_size=8", "batch_size=4")]:
        assert f"it was written with {old}, this run has {new}" in message
    assert "it stopped in the middle of epoch 1" in message
    assert (out / "last.pt").read_bytes() == before


def test_resume_applies_a_new_lr_and_weight_decay_with_a_notice(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--stop-after", 1)
    capsys.readouterr()
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--resume", "--lr", 0.01, "--weight-decay", 0.5)
    printed = capsys.readouterr().out
    assert "notice: resuming with lr 0.01 instead of 0.001" in printed
    assert "notice: resuming with weight_decay 0.5 instead of 0.0001" in printed
    assert train.read_metrics(out)[1]["lr"] == pytest.approx(train.cosine_lr(0.01, 1, 2))
    assert {g["weight_decay"] for g in load(out / "last.pt")["optimizer"]["param_groups"]} == {0.5}


def test_resume_at_an_epoch_end_may_change_the_batch_size(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--stop-after", 1)
    fit(tiny_data, out, "--epochs", 2, "--resume", "--batch-size", 16)
    assert "notice: resuming with batch_size 16 instead of 8" in capsys.readouterr().out
    assert [m["train_samples"] for m in train.read_metrics(out)] == [8, 96]


def test_resume_across_precisions(tiny_data, tmp_path, capsys):
    """A checkpoint of an fp32 (or bf16) run has no gradient-scaler state; an fp16 resume starts a fresh scaler."""
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--stop-after", 1, "--amp", "off")
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--resume", "--amp", "fp16")
    assert "notice: resuming with precision fp16 instead of fp32" in capsys.readouterr().out
    assert load(out / "last.pt")["scaler"]["scale"] > 0
    fit(tiny_data, out, "--epochs", 3, "--max-steps", 1, "--resume", "--amp", "off")  # and back
    assert [m["epoch"] for m in train.read_metrics(out)] == [1, 2, 3]


# --- kills between the writes at the end of an epoch -----------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (a BaseException passes every `except Exception`)."""


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--lr", 0.003)
    return out


@pytest.mark.parametrize("kill_before", ["best.pt", "metrics line"])
def test_a_kill_between_the_writes_of_an_epoch_loses_nothing(tiny_data, tmp_path, monkeypatch, uninterrupted,
                                                              kill_before):
    """Killed after last.pt of the last epoch; a resume restores its metrics line and best.pt."""
    expected = train.read_metrics(uninterrupted)
    assert max(m["val_acc"] for m in expected) == expected[1]["val_acc"]  # epoch 2 is the best: best.pt changes
    save, append = resilience.save_checkpoint, resilience.append_metrics

    def save_or_die(path, state):
        if path.name == "best.pt" and state["epoch"] == 2 and kill_before == "best.pt":
            raise Killed
        save(path, state)

    def append_or_die(out, record):
        if record["epoch"] == 2 and kill_before == "metrics line":
            raise Killed
        append(out, record)

    monkeypatch.setattr(resilience, "save_checkpoint", save_or_die)
    monkeypatch.setattr(resilience, "append_metrics", append_or_die)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--lr", 0.003)
    assert [m["epoch"] for m in train.read_metrics(out)] == [1]  # the kill cost the line...
    monkeypatch.undo()
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--lr", 0.003, "--resume")  # ...the resume brings it back
    assert [(m["epoch"], m["val_acc"]) for m in train.read_metrics(out)] == [(m["epoch"], m["val_acc"]) for m in expected]
    best, straight_best = load(out / "best.pt"), load(uninterrupted / "best.pt")
    assert best["epoch"] == straight_best["epoch"] == 2
    assert all(torch.equal(best["model"][k], straight_best["model"][k]) for k in straight_best["model"])


# --- the run directory: permissions, temporary files, durable writes -----------------------

def test_run_files_get_the_umask_permissions_not_private_ones(tiny_data, tmp_path):
    old = os.umask(0o027)
    try:
        fit(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 1)
    finally:
        os.umask(old)
    names = ["config.json", "metrics.jsonl", "last.pt", "best.pt"]
    modes = {name: oct((tmp_path / "run" / name).stat().st_mode & 0o777) for name in names}
    assert modes == {name: "0o640" for name in names}


def test_a_start_removes_only_the_temporary_files_a_kill_left(tiny_data, tmp_path):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--stop-after", 1)
    left = [out / ".last.pt.k1ll3d_x.tmp", out / ".metrics.jsonl.abcdefgh.tmp"]  # as atomic_write names them
    foreign = [out / ".notes.txt.abcdefgh.tmp", out / ".last.pt.tmp", out / "mine.tmp"]
    for path in left + foreign:
        path.write_bytes(b"half")
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--resume")
    assert [p.exists() for p in left] == [False, False] and all(p.exists() for p in foreign)


def test_atomic_write_flushes_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    data.atomic_write(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)


# --- clear errors instead of tracebacks ---------------------------------------------------

def test_a_torn_last_metrics_line_neither_blocks_resume_nor_gather(tiny_data, tmp_path, capsys):
    import sweep
    out = tmp_path / "runs" / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--stop-after", 1)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_loss": 1.7')  # a quota hit mid-write
    assert [s["epochs"] for s in sweep.gather([tmp_path / "runs"])] == [1]
    assert f"notice: {out / 'metrics.jsonl'} line 2 is torn" in capsys.readouterr().out
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--resume")
    assert [m["epoch"] for m in train.read_metrics(out)] == [1, 2]


def test_a_diverging_loss_stops_in_one_line_and_keeps_the_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--stop-after", 1)
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(data.UserError) as error:
        fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--resume", "--lr", "1e12")
    message = str(error.value)
    assert message.startswith("the training loss became NaN or infinite in epoch 2 at step ") and "\n" not in message
    assert "--lr 1e+12" in message and "too high" in message
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert not any(token in (out / name).read_text() for name in ("metrics.jsonl", "config.json")
                   for token in ("NaN", "Infinity"))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_data, tmp_path):
    """RLIMIT_FSIZE makes writes fail as a full disk does: PyTorch says `unexpected pos`, nothing more."""
    import resource
    import signal

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 2, "--max-steps", 1, "--stop-after", 1)
    before = (out / "last.pt").read_bytes()
    args = [sys.executable, train.__file__, *map(str, tiny_train_args(tiny_data, out, "--epochs", 2, "--max-steps", 1,
                                                                      "--resume"))]
    result = subprocess.run(args, capture_output=True, text=True, env=cpu_env(), preexec_fn=small_disk, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot write {out / 'last.pt'} (the write failed): the disk at ")
    assert " free and this file needs about 134" in result.stderr and "the previous last.pt is kept" in result.stderr
    assert (out / "last.pt").read_bytes() == before and resilience.stale_temp_files(out) == []


@pytest.mark.parametrize("content", ["garbage", "state dict", "pickle"])
def test_a_last_pt_that_is_not_a_checkpoint_is_one_line_naming_it(tiny_data, tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    if content == "garbage":
        (out / "last.pt").write_bytes(b"not a checkpoint at all")
    elif content == "state dict":
        torch.save({"weight": torch.zeros(2)}, out / "last.pt")
    else:
        torch.save({"options": train.parse_args([])}, out / "last.pt")  # not loadable with weights_only
    with pytest.raises(data.UserError) as error:
        fit(tiny_data, out, "--epochs", 1, "--resume")
    assert str(error.value).count(str(out / "last.pt")) == 1 and "\n" not in str(error.value)
    assert data.one_line(error.value) == str(error.value)  # what run_cli prints keeps the path


def test_more_workers_than_cpus_are_capped_with_a_notice(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "available_cpus", lambda: 1)
    fit(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 1, "--workers", 1000)
    assert "notice: --workers 1000 is more than the 1 CPU(s) available: using 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["options"]["workers"] == 1


# --- checkpoints hold what training changed (issue 12) ----------------------------------------

@pytest.fixture
def train_mode_backbone(monkeypatch):
    """The benchmark's original configuration: the frozen backbone's BatchNorm layers train (statistics move)."""
    build_model = train.build_model

    def build_original(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.backbone_eval_when_frozen = False
        return model

    monkeypatch.setattr(train, "build_model", build_original)


def full_state(run):
    return train.load_trained_model(run / "last.pt")[0].state_dict()


@pytest.mark.parametrize("config", ["frozen", "finetune", "original"])
def test_resume_is_exact_in_every_configuration(tiny_data, standin_weights, tmp_path, request, config):
    """--weights none is test_resume_continues_to_the_same_result."""
    if config == "original":
        request.getfixturevalue("train_mode_backbone")
    extra = ["--weights", standin_weights, "--epochs", 2, "--max-steps", 2, *(["--finetune"] if config == "finetune" else [])]
    fit(tiny_data, tmp_path / "straight", *extra)
    fit(tiny_data, tmp_path / "resumed", *extra, "--stop-after", 1)
    fit(tiny_data, tmp_path / "resumed", *extra, "--resume")
    straight, resumed = full_state(tmp_path / "straight"), full_state(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    start = torch.load(standin_weights, weights_only=True)
    moved = not torch.equal(straight["backbone.bn1.running_mean"], start["bn1.running_mean"])
    assert moved == (config != "frozen")  # BatchNorm statistics move unless the backbone is frozen in eval mode


def test_a_frozen_backbone_checkpoint_leaves_the_backbone_out(tiny_data, standin_weights, tmp_path):
    out = tmp_path / "run"
    fit(tiny_data, out, "--weights", standin_weights, "--epochs", 1, "--max-steps", 1)
    checkpoint = load(out / "last.pt")
    assert "backbone.conv1.weight" not in checkpoint["model"] and "head.weight" in checkpoint["model"]
    assert (out / "last.pt").stat().st_size < 1e6 and (out / "best.pt").stat().st_size < 1e6  # whole model: 45 MB
    model, best = train.load_trained_model(out / "best.pt")
    start = torch.load(standin_weights, weights_only=True)
    assert torch.equal(model.backbone.conv1.weight, start["conv1.weight"])
    assert torch.equal(model.head.weight, best["model"]["head.weight"]) and not model.training


def test_resume_refuses_other_starting_weights(tiny_data, standin_weights, tmp_path):
    out = tmp_path / "run"
    fit(tiny_data, out, "--weights", standin_weights, "--epochs", 2, "--max-steps", 1, "--stop-after", 1)
    other = tmp_path / "other.pth"
    state = torch.load(standin_weights, weights_only=True)
    state["conv1.weight"] += 1
    torch.save(state, other)
    with pytest.raises(data.UserError, match=r"it was written with frozen_weights_hash='\w+', this run has "
                                             r"frozen_weights_hash='\w+'; use the original settings"):
        fit(tiny_data, out, "--weights", other, "--epochs", 2, "--max-steps", 1, "--resume")
    with pytest.raises(data.UserError, match="was trained from other starting weights"):
        train.load_trained_model(out / "best.pt", weights=str(other))


def test_a_training_notebook_runs_a_second_time_into_the_same_folder(tiny_data, tmp_path, monkeypatch):
    """"Run all" again: the lesson replaces its earlier run visibly (--overwrite) instead of failing."""
    import papermill
    import notebook_tools
    from test_notebooks import NOTEBOOKS, small_parameters
    env = cpu_env()  # the kernel inherits this environment: CPU only, no Slurm or W&B variables
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parameters = small_parameters("train_dp", tiny_data, tmp_path)
    executed = []
    for n in (1, 2):
        target = tmp_path / f"train_dp-{n}.ipynb"
        papermill.execute_notebook(str(NOTEBOOKS / "train_dp.ipynb"), str(target), parameters=parameters,
                                   cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False, execution_timeout=600)
        executed.append(notebook_tools.nbformat.read(target, as_version=4))
    printed = ["".join(notebook_tools.output_text(cell) for cell in nb.cells) for nb in executed]
    assert "replaced the earlier run" not in printed[0]
    assert f"notice: --overwrite: replaced the earlier run in {parameters['out_dir']}" in printed[1]
    assert [m["epoch"] for m in train.read_metrics(parameters["out_dir"])] == [1]


# --- numbers you can trust: a test-set score, large batches (issue 15) ------------------------

TEST_IMAGES = TINY["classes"] * TINY["per_class"][2]


def by_hand_on_test(run, data_dir) -> dict:
    """best.pt evaluated on test/ the plain way: one process, every image once, in order."""
    import argparse
    model, _ = train.load_trained_model(run / "best.pt")
    test = data.load_splits(data_dir, TINY["image_size"], splits=("test",))["test"]
    cfg = argparse.Namespace(channels_last=False)
    return train.evaluate(model, data.make_loader(test, 5, 0), None, torch.device("cpu"), cfg)


def test_a_finished_run_scores_best_pt_once_on_the_test_split(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    summary = fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--lr", 0.003)
    printed = capsys.readouterr().out
    expected = by_hand_on_test(out, tiny_data)
    assert expected["val_samples"] == TEST_IMAGES and summary["test_samples"] == TEST_IMAGES
    assert summary["test_acc"] == expected["val_acc"] and summary["test_top5"] == expected["val_top5"]
    assert summary["test_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    best = load(out / "best.pt")
    assert best["test"]["test_acc"] == summary["test_acc"] and summary["best_epoch"] == best["epoch"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert f"test: best.pt (epoch {best['epoch']}) on {TEST_IMAGES} test images" in printed
    line = train.summary_line(summary)
    assert f"best_val_acc={summary['best_val_acc']:.4f} test_acc={summary['test_acc']:.4f} test_top5=" in line

    # A resume of the finished run loses nothing and evaluates nothing again.
    again = fit(tiny_data, out, "--epochs", 2, "--max-steps", 3, "--lr", 0.003, "--resume")
    assert again["test_acc"] == summary["test_acc"] and "(scored before, kept in best.pt)" in capsys.readouterr().out


def test_a_stopped_run_has_no_test_score_until_it_finishes(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    stopped = fit(tiny_data, out, "--epochs", 2, "--max-steps", 2, "--stop-after", 1)
    assert "test_acc" not in stopped and not (out / "summary.json").exists() and "test" not in load(out / "best.pt")
    assert "test:" not in capsys.readouterr().out
    midway = stop_mid_epoch(tiny_data, tmp_path / "mid")
    assert "stopped" in midway and "test_acc" not in midway and not (tmp_path / "mid" / "summary.json").exists()
    assert set(stopped["cost"]) == set(midway["cost"]) == COST_KEYS  # a stop says what it cost, too
    spent = load(out / "last.pt")["spent"]  # the first job's, up to its checkpoint
    assert spent["jobs"] == 1 and 0 < spent["wall_seconds"] <= stopped["cost"]["wall_seconds"]
    finished = fit(tiny_data, out, "--epochs", 2, "--max-steps", 2, "--resume")
    assert finished["test_acc"] == by_hand_on_test(out, tiny_data)["val_acc"]
    cost = finished["cost"]  # this job's, and the run's: both jobs
    assert cost["jobs"] == 2 and cost["total_wall_seconds"] == pytest.approx(spent["wall_seconds"] + cost["wall_seconds"])
    assert cost["total_device_hours"] == pytest.approx(spent["device_hours"] + cost["device_hours"])
    assert json.loads((out / "summary.json").read_text())["test_acc"] == finished["test_acc"]


def test_data_without_a_test_split_says_so_in_one_notice_and_skips_it(tiny_data, tmp_path, capsys):
    import shutil
    root = shutil.copytree(tiny_data, tmp_path / "birds", ignore=shutil.ignore_patterns("test"))
    summary = fit(root, tmp_path / "run", "--epochs", 1, "--max-steps", 1)
    notices = [line for line in capsys.readouterr().out.splitlines() if "test/" in line or line.startswith("test:")]
    assert notices == [f"notice: {root} has no test/ split with images: no test score, only valid/"]
    assert "test_acc" not in summary and "test_acc=" not in train.summary_line(summary)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epoch"] == 1


def lr_cfg(*extra):
    return train.parse_args(["--lr", "0.001", "--epochs", "4", *map(str, extra)])


@pytest.mark.parametrize("processes", [1, 4])
@pytest.mark.parametrize("rule,factor", [("none", lambda w: 1), ("linear", lambda w: w), ("sqrt", lambda w: w ** 0.5)])
def test_lr_scaling_multiplies_the_lr_of_every_step_by_the_rule(processes, rule, factor):
    cfg = lr_cfg("--lr-scaling", rule)
    peak = 0.001 * factor(processes)
    assert train.scaled_lr(0.001, rule, processes) == pytest.approx(peak)
    for epoch, step in [(0, 0), (0, 7), (1, 3), (3, 9)]:
        assert train.learning_rate(cfg, processes, epoch, step, 10) == pytest.approx(train.cosine_lr(peak, epoch, 4))
    assert train.learning_rate(cfg, processes, 2, 5, 10) == pytest.approx(peak / 2)  # cos(pi / 2) = 0: half the peak
    if rule == "none":  # today's schedule, bit for bit
        assert [train.learning_rate(cfg, processes, e, 3, 10) for e in range(4)] == [train.cosine_lr(0.001, e, 4)
                                                                                     for e in range(4)]


def test_the_warm_up_rises_linearly_per_step_then_the_cosine_continues():
    cfg = lr_cfg("--lr-scaling", "linear", "--warmup-epochs", 1.5)  # 10 steps per epoch: 15 warm-up steps
    peak = 0.004
    lrs = [train.learning_rate(cfg, 4, epoch, step, 10) for epoch in range(4) for step in range(10)]
    assert lrs[0] == pytest.approx(peak / 15) and lrs[4] == pytest.approx(peak * 5 / 15)
    assert lrs[:10] == pytest.approx([peak * (i + 1) / 15 for i in range(10)])  # epoch 0: the cosine is at its peak
    assert lrs[10:15] == pytest.approx([train.cosine_lr(peak, 1, 4) * (i + 11) / 15 for i in range(5)])
    assert lrs[14:20] == pytest.approx([train.cosine_lr(peak, 1, 4)] * 6)  # step 15 of 15: the warm-up is over
    assert lrs[20:] == pytest.approx([train.cosine_lr(peak, e, 4) for e in (2, 3) for _ in range(10)])
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))


def test_after_a_mid_epoch_resume_the_schedule_counts_the_steps_of_the_whole_epoch():
    """The warm-up is a function of the step within the whole epoch: a resume at step 10 of 12 sets the lr of
    steps 10 and 11 of 12, not of steps 0 and 1 of 2."""
    calls = []
    start = {"step": 10, "loss_sum": 0.0, "seen": 0, "seconds": 0.0}
    steps = train.EpochSteps(3, 2, torch.device("cpu"), None, start=start, log=lambda *a: None, bar=False,
                             schedule=lambda *call: calls.append(call) or 0.5)
    assert [step for step, _ in steps.enumerate(["batch 10", "batch 11"])] == [10, 11]
    assert calls == [(3, 10, 12), (3, 11, 12)] and steps.lr == 0.5


def test_the_header_prints_the_scaled_lr():
    assert train.lr_text(lr_cfg(), 4) == "lr 0.001"
    assert train.lr_text(lr_cfg("--lr-scaling", "linear", "--warmup-epochs", 1), 4) == \
        "lr 0.004 (--lr 0.001 x 4: linear rule for 4 processes) after 1 epoch(s) of warm-up"
    assert train.lr_text(lr_cfg("--lr-scaling", "sqrt"), 2) == "lr 0.00141421 (--lr 0.001 x 1.41: sqrt rule for 2 processes)"


@pytest.mark.parametrize("args,message", [
    (["--lr-scaling", "cubic"], "--lr-scaling 'cubic' is not one of none, linear, sqrt: see --help"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1 is out of range"),
    (["--warmup-epochs", "nan"], "--warmup-epochs nan is out of range"),
    (["--warmup-epochs", "6", "--epochs", "5"], "--warmup-epochs 6 is out of range"),
])
def test_a_bad_lr_scaling_or_warm_up_is_one_line_and_exit_2(tiny_data, tmp_path, capsys, args, message):
    err = one_line_exit_2(train.main, tiny_train_args(tiny_data, tmp_path / "run", *args), capsys)
    assert message in err and not (tmp_path / "run").exists()


def test_a_resume_may_change_lr_scaling_and_warm_up_with_a_notice(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    fit(tiny_data, out, "--epochs", 3, "--max-steps", 2, "--stop-after", 1)
    checkpoint = load(out / "last.pt")  # as written before these options existed: the resume must not mind
    for key in ("lr_scaling", "warmup_epochs"):
        del checkpoint["settings"][key]
    torch.save(checkpoint, out / "last.pt")
    capsys.readouterr()
    new = ["--lr-scaling", "sqrt", "--warmup-epochs", 2.5]
    fit(tiny_data, out, "--epochs", 3, "--max-steps", 2, "--stop-after", 1, "--resume", *new)
    printed = capsys.readouterr().out
    assert "notice: resuming with lr_scaling sqrt instead of none" in printed
    assert "notice: resuming with warmup_epochs 2.5 instead of 0.0" in printed
    lrs = [m["lr"] for m in train.read_metrics(out)]
    cfg = lr_cfg("--epochs", 3, *new)
    assert lrs == pytest.approx([train.cosine_lr(1e-3, 0, 3), train.learning_rate(cfg, 1, 1, 1, 2)])
    assert lrs[1] == pytest.approx(train.cosine_lr(1e-3, 1, 3) * 4 / 5)  # the last step of epoch 2: 4 of 5 warm-up steps
    fit(tiny_data, out, "--epochs", 3, "--max-steps", 2, "--stop-after", 1, "--resume", *new)
    assert "notice: resuming with" not in capsys.readouterr().out  # unchanged: nothing to say


# --- what a run cost: summary.json's cost, the summary line, gather's columns ---------------

COST_KEYS = {"wall_seconds", "devices", "device_kind", "device_hours", "peak_host_memory_mb", "peak_device_memory_mb",
             "energy_joules", "energy_source", "cpu_cores", "cpu_seconds", "cpu_utilisation", "gpu_utilisation",
             "jobs", "total_wall_seconds", "total_device_hours"}


def rapl_file(tmp_path, microjoules: int, wrap: int = 10**9):
    """A stand-in for /sys/class/powercap/intel-rapl:0/: energy_uj and max_energy_range_uj."""
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(f"{microjoules}\n")
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    return zone / "energy_uj"


def test_a_finished_cpu_run_records_what_it_cost(tiny_data, tmp_path, monkeypatch, capsys):
    import time
    monkeypatch.setattr(train, "RAPL_COUNTERS", str(tmp_path / "none" / "intel-rapl:*" / "energy_uj"))  # unreadable
    started = time.perf_counter()
    summary = fit(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 2)
    measured = time.perf_counter() - started
    cost = json.loads((tmp_path / "run" / "summary.json").read_text())["cost"]
    assert cost == summary["cost"] and set(cost) == COST_KEYS
    assert 0 < cost["wall_seconds"] < measured
    assert cost["device_kind"] == "cpu cores" and cost["devices"] == data.available_cpus()
    assert cost["device_hours"] == pytest.approx(cost["devices"] * cost["wall_seconds"] / 3600)
    assert cost["jobs"] == 1 and (cost["total_wall_seconds"], cost["total_device_hours"]) == (
        cost["wall_seconds"], cost["device_hours"])
    assert cost["peak_host_memory_mb"] > 50 and cost["peak_device_memory_mb"] is None  # a Python with torch; no GPU
    assert cost["energy_joules"] is None and cost["energy_source"].startswith("not measurable here")
    # How busy the cores were: the process's CPU time over the cores' wall time (one thread: at most one core).
    assert cost["cpu_cores"] == data.available_cpus() and 0 < cost["cpu_seconds"] <= measured
    assert cost["cpu_utilisation"] == pytest.approx(cost["cpu_seconds"] / (cost["wall_seconds"] * cost["cpu_cores"]))
    assert 0 < cost["cpu_utilisation"] <= 1 / cost["cpu_cores"] + 0.05 and cost["gpu_utilisation"] is None
    line = train.summary_line(summary)
    assert f"device_hours={cost['device_hours']:.3g} peak_mem_mb={cost['peak_host_memory_mb']:.0f} run_dir=" in line
    assert line.startswith("summary: epochs=1/1 val_acc=") and line.endswith(f"run_dir={tmp_path / 'run'}")

    # gather: the device-hours of each run, and its energy where known
    import sweep
    capsys.readouterr()
    rows = sweep.gather([tmp_path / "run"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-2:] == ["device_h", "energy_kj"]
    assert rows[0]["device_h"] == cost["device_hours"] and rows[0]["energy_kj"] == "-"
    assert table[1].split()[-2:] == [f"{cost['device_hours']:.4g}", "-"]


def test_energy_comes_from_the_rapl_counter_where_it_is_readable(tiny_data, tmp_path, monkeypatch):
    counter = rapl_file(tmp_path, 5_000_000)
    monkeypatch.setattr(train, "RAPL_COUNTERS", str(tmp_path / "intel-rapl:*" / "energy_uj"))
    evaluate, passes = train.evaluate, []

    def evaluate_using_2_joules(*args, **kwargs):  # the stand-in counter grows by 2 J in each evaluation
        passes.append(1)
        counter.write_text(f"{5_000_000 + 2_000_000 * len(passes)}\n")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate_using_2_joules)
    summary = fit(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 1)
    cost = json.loads((tmp_path / "run" / "summary.json").read_text())["cost"]
    assert len(passes) == 2 and cost["energy_joules"] == pytest.approx(4.0)  # valid/ and test/
    assert cost["energy_source"].startswith("RAPL") and summary["cost"] == cost


def test_the_energy_meter_counts_a_growing_counter_one_that_wraps_and_none_it_cannot_read(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "RAPL_COUNTERS", str(tmp_path / "intel-rapl:*" / "energy_uj"))
    counter = rapl_file(tmp_path, 1_000_000, wrap=10_000_000)
    meter = train.EnergyMeter([cpu], every=0)  # no thread: the test polls
    counter.write_text("3500000\n")
    meter.poll()
    assert meter.joules == pytest.approx(2.5)
    counter.write_text("9000000\n")
    meter.poll()
    counter.write_text("500000\n")  # past max_energy_range_uj: it wrapped around to 0 and went on
    joules, source = meter.stop()
    assert joules == pytest.approx(8.0 + 1.5) and "RAPL" in source

    unreadable = train.EnergyMeter([cpu], every=0)
    counter.chmod(0)  # as on Linux since 5.10 for anyone but root
    if os.access(counter, os.R_OK):  # root reads it anyway: take it away instead
        counter.unlink()
    assert train.EnergyMeter([cpu], every=0).stop() == (None, train.NOT_MEASURABLE)
    assert unreadable.stop() == (None, train.NOT_MEASURABLE)  # readable at the start, not at the end: no guess
    assert train.NOT_MEASURABLE == "not measurable here (no readable RAPL counter or NVML)"


def test_gather_shows_the_device_hours_of_every_job_and_energy_only_for_a_run_of_one_job():
    import sweep
    one = {"device_hours": 0.5, "total_device_hours": 0.5, "jobs": 1, "energy_joules": 7200.0}
    assert sweep.cost_columns(one) == {"device_h": 0.5, "energy_kj": 7.2}
    resumed = {**one, "total_device_hours": 1.25, "jobs": 3}  # the last job's energy is not the run's
    assert sweep.cost_columns(resumed) == {"device_h": 1.25, "energy_kj": "-"}
    assert sweep.cost_columns(None) == sweep.cost_columns({}) == {"device_h": "-", "energy_kj": "-"}


def test_time_to_accuracy_is_plotted_from_the_recorded_epochs():
    """Recorded runs: wall_seconds where train.py records it (test_resume_continues_to_the_same_result checks that
    it does), the epochs' seconds added up in older runs."""
    import sweep
    recorded = [{"epoch": 1, "epoch_seconds": 50.0, "wall_seconds": 80.0, "val_acc": 0.5},
                {"epoch": 2, "epoch_seconds": 50.0, "wall_seconds": 130.0, "val_acc": 0.75},
                {"epoch": 3, "epoch_seconds": 50.0, "wall_seconds": 180.0, "val_acc": 0.75}]
    older = [{k: v for k, v in m.items() if k != "wall_seconds"} for m in recorded]  # before wall_seconds existed
    assert sweep.accuracy_over_time(recorded) == [(80.0, 0.5), (130.0, 0.75), (180.0, 0.75)]
    assert sweep.accuracy_over_time(older) == [(50.0, 0.5), (100.0, 0.75), (150.0, 0.75)]
    assert sweep.minutes_to_best(recorded) == 130 / 60  # the first epoch at the best accuracy
    runs = [{"run": name, "lr": 1e-3, "global_batch": 8, "metrics": metrics}
            for name, metrics in [("new", recorded), ("old", older)]]
    by_time = sweep.plot_runs(runs).axes[1]
    assert [list(line.get_xdata()) for line in by_time.get_lines()] == [[80 / 60, 130 / 60, 3.0], [50 / 60, 100 / 60, 2.5]]
    assert [list(line.get_ydata()) for line in by_time.get_lines()] == [[0.5, 0.75, 0.75]] * 2


def test_gpu_energy_integrates_the_power_draw_of_every_gpu_and_is_none_without_a_reading(monkeypatch):
    import time
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]  # DataParallel: both GPUs of the process
    monkeypatch.setattr(train, "gpu_power_watts", lambda device: 100.0 + 50 * device.index)  # 100 W and 150 W
    before = time.perf_counter()
    meter = train.EnergyMeter(gpus, every=0)
    time.sleep(0.05)
    joules, source = meter.stop()
    assert 250 * 0.05 <= joules <= 250 * (time.perf_counter() - before)  # 250 W for the time between the readings
    assert source.startswith("GPU power draw (NVML)")
    monkeypatch.setattr(train, "gpu_power_watts", lambda device: None if device.index else 100.0)  # no NVML on one
    assert train.EnergyMeter(gpus, every=0).stop() == (None, train.NOT_MEASURABLE)
