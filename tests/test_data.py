"""The dataset tool: synthetic data, verify, download, stage, and the loading rules."""
from __future__ import annotations

import csv
import hashlib
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
from conftest import TINY, cpu_env, run_script


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run data.py's main as the command line does; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        data.run_cli(data.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_of(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "birds"))


# --- synthetic ---------------------------------------------------------------------------

def test_synthetic_is_deterministic_per_seed(tmp_path, capsys):
    args = ["--classes", 3, "--train", 2, "--valid", 1, "--test", 1, "--image-size", 32]
    assert cli(capsys, "synthetic", tmp_path / "a", *args, "--seed", 7)[0] == 0
    assert cli(capsys, "synthetic", tmp_path / "b", *args, "--seed", 7)[0] == 0
    assert cli(capsys, "synthetic", tmp_path / "c", *args, "--seed", 8)[0] == 0
    a, b, c = (digest(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_synthetic_has_the_kaggle_layout_and_csv(tiny_data):
    classes = data.find_classes(tiny_data)
    assert len(classes) == TINY["classes"]
    assert all(name == name.upper() and " " in name for name in classes)
    for split, count in zip(data.SPLITS, TINY["per_class"]):
        folders = sorted(p.name for p in (tiny_data / split).iterdir())
        assert folders == classes
        for folder in folders:
            files = sorted(p.name for p in (tiny_data / split / folder).iterdir())
            assert files == [f"{i:03d}.jpg" for i in range(1, count + 1)]
    with open(tiny_data / "birds.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class id", "filepaths", "labels", "data set", "scientific name"]
    assert len(rows) == TINY["classes"] * sum(TINY["per_class"])
    assert all((tiny_data / row["filepaths"]).is_file() for row in rows)
    assert {row["data set"] for row in rows} == set(data.SPLITS)
    image = Image.open(tiny_data / rows[0]["filepaths"])
    assert image.size == (32, 32) and image.mode == "RGB"


def test_synthetic_refuses_a_non_empty_directory(tiny_data, capsys):
    code, out, err = cli(capsys, "synthetic", tiny_data)
    assert code == 2 and "exists and is not empty" in err and err.count("\n") == 1


# --- loading rules -------------------------------------------------------------------------

def test_labels_align_by_class_name_across_splits(tiny_data, tmp_path):
    root = copy_of(tiny_data, tmp_path)
    classes = data.find_classes(root)
    shutil.rmtree(root / "valid" / classes[0])  # valid lacks the first class...
    second = root / "valid" / classes[1]
    second.rename(root / "valid" / classes[1].replace(" ", "  "))  # ...and spells one with two spaces
    splits = data.load_splits(root, image_size=32)
    assert splits["valid"].classes == classes
    labels = {label for _, label in splits["valid"].samples}
    assert labels == set(range(1, len(classes)))  # not renumbered from 0
    for path, label in splits["valid"].samples:
        assert data.class_key(path.parent.name) == classes[label]


def test_a_class_missing_from_train_is_a_clear_error(tiny_data, tmp_path):
    root = copy_of(tiny_data, tmp_path)
    shutil.copytree(root / "valid" / data.find_classes(root)[0], root / "valid" / "NEW SPECIES")
    with pytest.raises(data.DataError, match="class 'NEW SPECIES' in valid/ does not exist in train/"):
        data.load_splits(root, image_size=32)


def test_hidden_folders_and_non_images_are_ignored(tiny_data, tmp_path):
    root = copy_of(tiny_data, tmp_path)
    first = data.find_classes(root)[0]
    checkpoints = root / "train" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    shutil.copy(root / "train" / first / "001.jpg", checkpoints / "001.jpg")
    (root / "train" / first / "README.txt").write_text("not an image")
    (root / "train" / first / ".001-checkpoint.jpg").write_bytes(b"")
    splits = data.load_splits(root, image_size=32)
    assert splits["train"].classes == data.find_classes(tiny_data)
    assert len(splits["train"]) == TINY["classes"] * TINY["per_class"][0]
    counts, problems = data.verify_dataset(root)
    assert problems == []


@pytest.mark.parametrize("mode,size", [("L", (32, 32)), ("RGBA", (32, 32)), ("CMYK", (32, 32)), ("RGB", (50, 40))])
def test_any_mode_and_size_becomes_an_rgb_tensor_of_the_right_size(tmp_path, tiny_data, mode, size):
    root = copy_of(tiny_data, tmp_path)
    first = data.find_classes(root)[0]
    path = root / "train" / first / "001.jpg"
    image = Image.new(mode, size)
    image.save(path.with_suffix(".png") if mode == "RGBA" else path, format="PNG" if mode == "RGBA" else "JPEG")
    if mode == "RGBA":
        path.unlink()
    dataset = data.load_splits(root, image_size=32)["train"]
    batch = torch.stack([dataset[i][0] for i in range(3)])
    assert batch.shape == (3, 3, 32, 32)


def test_a_broken_image_names_the_file(tiny_data, tmp_path):
    root = copy_of(tiny_data, tmp_path)
    path = root / "train" / data.find_classes(root)[0] / "001.jpg"
    path.write_bytes(path.read_bytes()[:100])
    dataset = data.load_splits(root, image_size=32)["train"]
    with pytest.raises(data.DataError, match="cannot read image .*001.jpg"):
        dataset[0]


# --- verify --------------------------------------------------------------------------------

def test_verify_passes_a_good_dataset(tiny_data, capsys):
    code, out, _ = cli(capsys, "verify", tiny_data)
    assert code == 0
    assert f"train:     96 images in    6 classes (16-16 per class)" in out
    assert out.strip().endswith("ok")


def test_verify_reports_each_problem_and_exits_1(tiny_data, tmp_path, capsys):
    root = copy_of(tiny_data, tmp_path)
    classes = data.find_classes(root)
    shutil.rmtree(root / "train" / classes[0])  # valid and test now hold a class train lacks
    broken = root / "train" / classes[1] / "002.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    shutil.rmtree(root / "test")  # a split is missing
    (root / "valid" / classes[2] / "001.jpg").unlink()
    code, out, _ = cli(capsys, "verify", root)
    assert code == 1
    assert f"class '{classes[0]}' in valid/ does not exist in train/" in out
    assert f"unreadable image {broken}" in out
    assert "missing split folder test/" in out
    assert "valid:     29 images" in out
    assert "3 problem(s) found" in out


def test_a_missing_or_empty_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = cli(capsys, "verify", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err and "synthetic" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "verify", tmp_path / "empty")
    assert code == 2 and "has no train/ folder" in err
    (tmp_path / "empty" / "train").mkdir()
    code, _, err = cli(capsys, "verify", tmp_path / "empty")
    assert code == 2 and "has no class folders" in err


# --- download and safe extraction ------------------------------------------------------------

def zip_of(tiny_data: Path, path: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(tiny_data.rglob("*")):
            if file.is_file():
                zf.write(file, Path("100-bird-species") / file.relative_to(tiny_data))
        for name, content in (extra or {}).items():
            zf.writestr(name, content)
    return path


def test_download_without_credentials_says_how_to_get_the_data(tmp_path):
    env = cpu_env(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "none"))
    result = run_script("data.py", "download", tmp_path / "birds", env=env)
    assert result.returncode == 2
    assert "no Kaggle credentials found" in result.stderr and "kaggle.json" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_download_offline_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "learner")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key-123")
    code, _, err = cli(capsys, "download", tmp_path / "birds", "--url", "http://127.0.0.1:9/none.zip")
    assert code == 2 and "cannot download the dataset" in err and "login node" in err
    assert "secret-key-123" not in err
    assert list((tmp_path / "birds").iterdir()) == []  # no partial archive left behind


def test_download_extracts_a_local_archive(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "learner")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key-123")
    archive = zip_of(tiny_data, tmp_path / "archive.zip")
    code, out, _ = cli(capsys, "download", tmp_path / "birds", "--url", archive.as_uri())
    assert code == 0
    root = tmp_path / "birds" / "100-bird-species"
    assert str(root) in out
    assert data.find_classes(root) == data.find_classes(tiny_data)
    assert not list((tmp_path / "birds").glob("*.part"))


def test_kaggle_file_readable_by_others_gets_a_warning(tmp_path, monkeypatch, capsys):
    config = tmp_path / "kaggle"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "learner", "key": "secret-key-123"}')
    (config / "kaggle.json").chmod(0o644)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    assert data.kaggle_credentials() == ("learner", "secret-key-123")
    err = capsys.readouterr().err
    assert "readable by others" in err and "chmod 600" in err and "secret-key-123" not in err


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_zip_members_that_escape_are_refused(tiny_data, tmp_path, member, capsys):
    archive = zip_of(tiny_data, tmp_path / "bad.zip", {member: b"pwned"})
    code, _, err = cli(capsys, "stage", archive, "--to", tmp_path / "out")
    assert code == 2 and "refusing to extract" in err and member in err
    assert not (tmp_path / "evil.txt").exists()
    assert not list((tmp_path / "out").rglob("*.jpg"))  # nothing half-extracted


def test_tar_links_are_refused(tmp_path, capsys):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        link = tarfile.TarInfo("birds/train/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    code, _, err = cli(capsys, "stage", archive, "--to", tmp_path / "out")
    assert code == 2 and "member 'birds/train/link' is a link" in err


# --- stage ---------------------------------------------------------------------------------

def test_stage_copies_once_and_prints_the_path(tiny_data, tmp_path, capsys):
    code, out, err = cli(capsys, "stage", tiny_data, "--to", tmp_path / "local")
    staged = Path(out.strip())
    assert code == 0 and staged == tmp_path / "local" / tiny_data.name
    assert digest(staged).keys() - {".staged"} == digest(tiny_data).keys()
    assert "staged on" in err
    marker = (staged / ".staged").stat().st_mtime_ns
    code, out, _ = cli(capsys, "stage", tiny_data, "--to", tmp_path / "local")
    assert code == 0 and Path(out.strip()) == staged
    assert (staged / ".staged").stat().st_mtime_ns == marker  # reused, not copied again


def test_stage_extracts_an_archive_to_tmpdir(tiny_data, tmp_path, capsys, monkeypatch):
    archive = zip_of(tiny_data, tmp_path / "birds.zip")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-local"))
    code, out, _ = cli(capsys, "stage", archive)
    staged = Path(out.strip())
    assert code == 0 and staged.is_relative_to(tmp_path / "node-local")
    assert data.find_classes(staged) == data.find_classes(tiny_data)


# --- loader knobs --------------------------------------------------------------------------

def test_images_are_normalised_with_imagenet_statistics(tiny_data):
    image, _ = data.load_splits(tiny_data, image_size=32)["train"][0]
    raw, _ = data.load_splits(tiny_data, image_size=32, normalize=False)["train"][0]
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    assert torch.allclose(image, (raw - mean) / std, atol=1e-5)
    assert raw.min() >= 0 and raw.max() <= 1
