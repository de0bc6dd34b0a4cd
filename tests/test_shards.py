"""The dataset in shards (data.py pack): deterministic and safe to write, the same labels and validation
counts as the folders, every validation image once for any world size, exact mid-epoch resume, and
one-line errors for broken shards."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import data
import resilience
import train
from conftest import TINY, one_line_exit_2, run_torchrun, tiny_train_args

SHARD_SIZE = "20KB"  # the tiny images are ~1.2 KB: 3 images per shard, 32 training shards


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("shards") / "birds-shards"
    data.pack_dataset(tiny_data, destination, data.parse_size(SHARD_SIZE))
    return destination


def copy_of(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def digests(dataset) -> list[tuple[str, int]]:
    """Every image of a split as (digest of its bytes, label), in a fixed order."""
    return sorted((hashlib.sha256(path.read_bytes()).hexdigest(), label) for path, label in dataset.samples)


# --- pack ------------------------------------------------------------------------------------

def test_pack_is_deterministic_and_lists_what_it_left_out(tiny_data, tmp_path, capsys):
    source = Path(shutil.copytree(tiny_data, tmp_path / "birds"))
    (source / "train" / data.find_classes(source)[0] / "notes.txt").write_text("not an image")
    (source / "valid" / ".ipynb_checkpoints").mkdir()
    for name in ("a", "b"):
        assert data.main(["pack", str(source), str(tmp_path / name), "--shard-size", SHARD_SIZE]) == 0
    files = {name: {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in ("a", "b")}
    assert files["a"] == files["b"] and len(files["a"]) > 3
    index = json.loads(files["a"]["index.json"])
    first = data.find_classes(source)[0]
    assert index["skipped"] == ["birds.csv", f"train/{first}/notes.txt", "valid/.ipynb_checkpoints"]
    out = capsys.readouterr().out
    assert "skipped 3 entries that are not images of a split's class folders: birds.csv" in out
    assert {split: entry["samples"] for split, entry in index["splits"].items()} == {
        split: TINY["classes"] * count for split, count in zip(data.SPLITS, TINY["per_class"])}
    assert index["splits"]["train"]["per_class"] == [TINY["per_class"][0]] * TINY["classes"]
    assert all(shard["bytes"] <= data.parse_size(SHARD_SIZE) for shard in index["splits"]["train"]["shards"])


def test_shards_hold_the_images_and_labels_of_the_folders(tiny_data, shards):
    folders, packed = (data.load_splits(root, 32, splits=data.SPLITS) for root in (tiny_data, shards))
    for split in data.SPLITS:
        assert packed[split].classes == folders[split].classes
        assert digests(packed[split]) == digests(folders[split])
    image, label = packed["valid"][0]
    assert image.shape == (3, 32, 32) and 0 <= label < TINY["classes"]
    assert data.available_splits(shards) == data.available_splits(tiny_data) == data.SPLITS


def test_verify_counts_shards_as_it_counts_folders(tiny_data, shards, capsys):
    for root in (tiny_data, shards):
        assert data.main(["verify", str(root)]) == 0
    folders, packed = capsys.readouterr().out.split("ok\n")[:2]
    assert packed == folders and "train:     96 images in    6 classes (16-16 per class)" in packed


@pytest.mark.parametrize("problem", ["link out", "control character"])
def test_pack_refuses_unsafe_names_and_writes_nothing(tiny_data, tmp_path, capsys, problem):
    source = Path(shutil.copytree(tiny_data, tmp_path / "birds"))
    folder = source / "train" / data.find_classes(source)[0]
    if problem == "link out":
        (tmp_path / "secret.jpg").write_bytes((folder / "001.jpg").read_bytes())
        (folder / "999.jpg").symlink_to(tmp_path / "secret.jpg")
        expected = "999.jpg is a link to"
    else:
        (folder / "001.jpg").rename(folder / "0\n1.jpg")
        expected = "refusing to pack 'train/"
    err = one_line_exit_2(data.main, ["pack", source, tmp_path / "shards"], capsys)
    assert expected in err
    assert not (tmp_path / "shards").exists() and not list(tmp_path.glob(".shards*"))


# --- training from shards --------------------------------------------------------------------

def test_the_training_order_reads_shard_by_shard_and_reshuffles_every_epoch(shards):
    dataset = data.load_splits(shards, 32, splits=("train",))["train"]
    first, again, second = dataset.shuffled_order(0, 0), dataset.shuffled_order(0, 0), dataset.shuffled_order(0, 1)
    assert first == again and first != second and sorted(first) == sorted(second) == list(range(len(dataset)))
    shard_of = {i: n for n, shard in enumerate(dataset.shard_ranges) for i in shard}
    runs = [shard_of[i] for k, i in enumerate(first) if k == 0 or shard_of[i] != shard_of[first[k - 1]]]
    assert sorted(runs) == list(range(len(dataset.shard_ranges)))  # each shard read in one go


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_validation_image_counts_once_and_ddp_batches_are_the_single_process_batches(shards, world):
    splits = data.load_splits(shards, 32)
    cfg = train.parse_args(["--batch-size", "4", "--workers", "0"])
    seen = [label for rank in range(world)
            for _, labels in train.eval_loader(cfg, splits["valid"], rank, world) for label in labels.tolist()]
    assert sorted(seen) == sorted(label for _, label in splits["valid"].samples)  # 30 images, each once

    def steps(replicas: int, rank: int, batch: int) -> list[list[int]]:
        sampler = resilience.ResumableSampler(splits["train"], replicas, rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        return list(data.make_loader(splits["train"], batch, 0, sampler=sampler).batch_sampler)

    single = steps(1, 0, 12)  # 96 images: 8 steps of the global batch 12
    per_rank = [steps(world, rank, 12 // world) for rank in range(world)]
    assert all(len(batches) == len(single) for batches in per_rank)
    for step, batch in enumerate(single):
        assert sorted(sum((batches[step] for batches in per_rank), [])) == sorted(batch)


class SignalledAtStart:
    """A StopRequest that heard SIGUSR1 before the first step: the run stops at step STOP_CHECK_EVERY."""
    received = "SIGUSR1"


def run_args(root: Path, out: Path, *extra) -> list[str]:
    return list(map(str, tiny_train_args(root, out, "--epochs", 1, *extra)))  # 12 steps of 8 images


def test_resume_mid_epoch_from_shards_is_exact_and_on_other_data_refused(tiny_data, shards, tmp_path):
    stopped = train.fit(train.parse_args(run_args(shards, tmp_path / "run")), stop=SignalledAtStart())
    assert stopped["stopped"].startswith(f"stopped at epoch 1 step {resilience.STOP_CHECK_EVERY} on SIGUSR1")
    shutil.copytree(tmp_path / "run", tmp_path / "on-folders")
    train.fit(train.parse_args(run_args(shards, tmp_path / "run", "--resume")))
    summary = train.fit(train.parse_args(run_args(shards, tmp_path / "straight")))
    assert summary["val_samples"] == TINY["classes"] * TINY["per_class"][1] and summary["train_samples"] == 96
    assert summary["test_samples"] == TINY["classes"] * TINY["per_class"][2]
    resumed, straight = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
                         for name in ("run", "straight"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    for x, y in zip(train.read_metrics(tmp_path / "run"), train.read_metrics(tmp_path / "straight"), strict=True):
        assert (x["val_acc"], x["val_samples"], x["train_samples"]) == (y["val_acc"], y["val_samples"], y["train_samples"])
    with pytest.raises(data.UserError) as error:
        train.fit(train.parse_args(run_args(tiny_data, tmp_path / "on-folders", "--resume")))
    message = str(error.value)
    assert "it was written with data_order='shards " in message and "this run has data_order='files'" in message
    assert "stopped in the middle of epoch 1" in message and "\n" not in message


# --- broken shards ---------------------------------------------------------------------------

def first_train_shard(root: Path) -> Path:
    return root / json.loads((root / "index.json").read_text())["splits"]["train"]["shards"][0]["name"]


def test_a_truncated_shard_is_one_line(shards, tmp_path, capsys):
    root = copy_of(shards, tmp_path)
    shard = first_train_shard(root)
    os.truncate(shard, shard.stat().st_size - 4096)
    err = one_line_exit_2(train.main, tiny_train_args(root, tmp_path / "run", "--epochs", 1), capsys)
    assert f"error: shard {shard} is truncated or changed (" in err and "pack the dataset again" in err
    assert not (tmp_path / "run").exists()


def replace_shard(root: Path, shard: Path, members: list[tuple[str, bytes]]) -> None:
    """A shard with these members, its size written into the index so that only its content is wrong."""
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    index = json.loads((root / "index.json").read_text())
    index["splits"]["train"]["shards"][0].update(bytes=shard.stat().st_size, samples=1)
    (root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name,reason", [("../00000000.jpg", "climbs out with '..'"),
                                         ("/tmp/00000000.jpg", "has an absolute path"),
                                         ("sub/00000000.jpg", "is not <key>.jpg, <key>.png or <key>.cls")])
def test_a_shard_with_an_unsafe_member_is_one_line(shards, tmp_path, capsys, name, reason):
    root = copy_of(shards, tmp_path)
    shard = first_train_shard(root)
    replace_shard(root, shard, [(name, b"\xff\xd8 not read"), ("00000000.cls", b"0")])
    err = one_line_exit_2(train.main, tiny_train_args(root, tmp_path / "run", "--epochs", 1), capsys)
    assert f"error: refusing to read shard {shard}: member '{name}' {reason}: pack the dataset again" in err


def test_stage_copies_a_shard_directory_and_training_reads_the_copy(shards, tmp_path, capsys):
    data.main(["stage", str(shards), "--to", str(tmp_path / "node")])
    staged = Path(capsys.readouterr().out.strip())
    assert staged == tmp_path / "node" / shards.name and data.is_shard_dir(staged)
    assert data.staged_copy_matches(shards, staged)
    copied = data.load_splits(staged, 32, splits=("valid",))["valid"]
    assert digests(copied) == digests(data.load_splits(shards, 32, splits=("valid",))["valid"])


def test_ddp_on_shards_equals_one_process_with_the_global_batch(shards, standin_weights, tmp_path):
    """The training order of shards, split over 2 gloo processes, trains what one process does. A frozen backbone
    (BatchNorm in eval mode): trained BatchNorm would normalise each process's half batch on its own."""
    def args(name: str, batch: int) -> list:
        return tiny_train_args(shards, tmp_path / name, "--weights", standin_weights, "--epochs", 1,
                               "--batch-size", batch, "--lr", 0.01)

    single = run_torchrun(1, "train.py", *args("single", 12))
    double = run_torchrun(2, "train.py", *args("ddp2", 6))
    assert single.returncode == 0 and double.returncode == 0, (single.stderr + double.stderr)[-3000:]
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"] for name in ("single", "ddp2"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    metrics = [train.read_metrics(tmp_path / name)[-1] for name in ("single", "ddp2")]
    assert [m["val_samples"] for m in metrics] == [30, 30] and metrics[0]["val_acc"] == metrics[1]["val_acc"]
