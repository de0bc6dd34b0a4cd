"""No lost work, data side: `stage` deletes nothing it did not create and never reuses a stale
copy; broken archives, full disks, huge images and bad counts are one-line errors; a last
training batch of one image cannot crash BatchNorm."""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
import signal
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

import benchmark
import data
import sweep
import train
from conftest import tiny_train_args
from test_data import cli, copy_of, zip_of


def one_line_error(capsys, *argv) -> str:
    """stderr of `data.py ARGV`, checked to be one line and exit status 2."""
    code, _, err = cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err[:3000]
    return err


def others_files(destination: Path) -> dict[str, str]:
    """Files of other jobs in the staging directory, which nothing may touch."""
    (destination / "other-job").mkdir(parents=True)
    (destination / "other-job" / "results.txt").write_text("another job's results")
    (destination / "notes.txt").write_text("mine")
    return {"other-job/results.txt": "another job's results", "notes.txt": "mine"}


def assert_intact(destination: Path, files: dict[str, str]) -> None:
    assert {name: (destination / name).read_text() for name in files} == files


def leftovers(destination: Path, files: dict[str, str]) -> list[str]:
    """What the command left in destination besides the others' files and its (empty) lock file."""
    return sorted(str(p.relative_to(destination)) for p in destination.rglob("*")
                  if not p.name.endswith(".lock") and p.is_file() and str(p.relative_to(destination)) not in files)


# --- item 1: stage never deletes its destination ----------------------------------------------

# `stage .` from inside the dataset and `stage ..` from one of its splits name the dataset: the
# path is resolved first, so they stage it under its real name, as `stage /abs/path/birds` would.
# A hidden archive `.birds.zip` stages as `birds`. Only a name that is empty after that is refused.
@pytest.mark.parametrize("where,source", [("dataset", "."), ("split", "..")])
def test_stage_dot_and_dotdot_stage_the_dataset_under_its_name(tiny_data, tmp_path, capsys, monkeypatch, where, source):
    root = copy_of(tiny_data, tmp_path)
    destination = tmp_path / "node-local"
    files = others_files(destination)
    monkeypatch.chdir(root if where == "dataset" else root / "train")
    code, out, err = cli(capsys, "stage", source, "--to", destination)
    assert code == 0, err
    assert Path(out.strip()) == destination / "birds"
    assert data.find_classes(destination / "birds") == data.find_classes(tiny_data)
    assert_intact(destination, files)


def test_a_hidden_archive_stages_under_its_name_without_the_dot(tiny_data, tmp_path, capsys):
    archive = zip_of(tiny_data, tmp_path / ".birds.zip")
    destination = tmp_path / "node-local"
    files = others_files(destination)
    code, out, err = cli(capsys, "stage", archive, "--to", destination)
    assert code == 0, err
    assert Path(out.strip()) == destination / "birds" / "100-bird-species"
    assert_intact(destination, files)


@pytest.mark.parametrize("name", [".zip", "..tar.gz"])
def test_a_source_without_a_name_is_refused_and_nothing_is_deleted(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    destination = tmp_path / "node-local"
    files = others_files(destination)
    err = one_line_error(capsys, "stage", tmp_path / name, "--to", destination)
    assert f"cannot name the staged copy of {tmp_path / name}" in err and "rename it" in err
    assert_intact(destination, files)
    assert sorted(p.name for p in destination.iterdir()) == ["notes.txt", "other-job"]


def test_stage_never_replaces_a_folder_it_did_not_make(tiny_data, tmp_path, capsys):
    destination = tmp_path / "node-local"
    files = others_files(destination)
    (destination / tiny_data.name).mkdir()  # another user's folder of the same name, not a staged copy
    (destination / tiny_data.name / "thesis.tex").write_text("years of work")
    err = one_line_error(capsys, "stage", tiny_data, "--to", destination)
    assert f"{destination / tiny_data.name} exists and is not a copy made by stage" in err and "--to" in err
    assert (destination / tiny_data.name / "thesis.tex").read_text() == "years of work"
    assert_intact(destination, files)


@pytest.mark.parametrize("to", ["parent", "inside"])
def test_stage_refuses_to_copy_a_dataset_onto_or_into_itself(tiny_data, tmp_path, capsys, to):
    root = copy_of(tiny_data, tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    destination = tmp_path if to == "parent" else root / "staged"
    err = one_line_error(capsys, "stage", root, "--to", destination)
    assert f"staging {root} to {destination / 'birds'} would copy it onto or into itself" in err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


# --- item 8: a stale copy is staged again -------------------------------------------------------

def test_a_changed_source_or_another_dataset_of_the_same_name_is_staged_again(tiny_data, tmp_path, capsys):
    root = copy_of(tiny_data, tmp_path)
    destination = tmp_path / "node-local"
    staged = Path(cli(capsys, "stage", root, "--to", destination)[1].strip())
    assert data.staged_copy_matches(root, staged)
    first = data.find_classes(root)[0]
    image = root / "train" / first / "001.jpg"
    image.write_bytes((root / "train" / first / "002.jpg").read_bytes())  # a corrected image
    assert not data.staged_copy_matches(root, staged)
    assert cli(capsys, "stage", root, "--to", destination)[0] == 0
    assert (staged / "train" / first / "001.jpg").read_bytes() == image.read_bytes()
    assert data.staged_copy_matches(root, staged)

    other = data.make_synthetic(tmp_path / "other" / "birds", 3, (2, 1, 1), 32, seed=5)  # same folder name
    code, out, _ = cli(capsys, "stage", other, "--to", destination)
    assert code == 0 and Path(out.strip()) == staged
    assert data.find_classes(staged) == data.find_classes(other) and data.staged_copy_matches(other, staged)


def test_a_marker_of_an_older_version_is_a_stale_copy(tiny_data, tmp_path, capsys):
    destination = tmp_path / "node-local"
    staged = Path(cli(capsys, "stage", tiny_data, "--to", destination)[1].strip())
    (staged / ".staged").write_text(f"{tiny_data}\n")  # what earlier versions wrote
    assert not data.staged_copy_matches(tiny_data, staged)
    assert cli(capsys, "stage", tiny_data, "--to", destination)[0] == 0
    assert data.staged_copy_matches(tiny_data, staged)


# --- links are copied as links, never followed out of the dataset --------------------------------

def test_a_link_loop_inside_the_dataset_is_copied_as_a_link(tiny_data, tmp_path, capsys):
    root = copy_of(tiny_data, tmp_path)
    (root / "train" / "loop").symlink_to("..")  # followed, this nests 40 levels deep
    code, out, err = cli(capsys, "stage", root, "--to", tmp_path / "node-local")
    assert code == 0, err[:3000]
    staged = Path(out.strip())
    assert os.readlink(staged / "train" / "loop") == ".."
    assert len(list(staged.rglob("*.jpg"))) == len(list(root.rglob("*.jpg")))


@pytest.mark.parametrize("target", ["/etc/hostname", "../../../outside.txt"])
def test_a_link_out_of_the_dataset_is_refused(tiny_data, tmp_path, capsys, target):
    root = copy_of(tiny_data, tmp_path)
    (tmp_path / "outside.txt").write_text("not part of the dataset")
    link = root / "train" / data.find_classes(root)[0] / "999.jpg"
    link.symlink_to(target)
    err = one_line_error(capsys, "stage", root, "--to", tmp_path / "node-local")
    assert f"{link} is a link to {target}" in err and "cp -rL" in err
    assert not (tmp_path / "node-local" / "birds").exists()


# --- full or read-only disks ----------------------------------------------------------------------

@pytest.fixture
def little_free_space(monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: real(path)._replace(free=50_000))


@pytest.mark.parametrize("kind", ["directory", "archive"])
def test_stage_checks_free_space_before_copying(tiny_data, tmp_path, capsys, little_free_space, kind):
    source = tiny_data if kind == "directory" else zip_of(tiny_data, tmp_path / "birds.zip")
    destination = tmp_path / "node-local"
    files = others_files(destination)
    err = one_line_error(capsys, "stage", source, "--to", destination)
    assert re.search(rf"not enough space on {destination} for .* \(needs 0\.[5-9] MB, 0\.1 MB free\): "
                     "free space there or stage elsewhere with --to DIR", err), err
    assert leftovers(destination, files) == [] and not (destination / "birds").exists()


@pytest.mark.parametrize("problem", [errno.ENOSPC, errno.EDQUOT])
def test_a_disk_that_fills_up_while_copying_is_one_short_line(tiny_data, tmp_path, capsys, monkeypatch, problem):
    """Writing a file's data fails as on a full disk or quota: shutil copies with sendfile on
    Linux, and falls back to read and write (copyfileobj) when sendfile fails at once."""
    def full(*args):
        raise OSError(problem, os.strerror(problem))
    monkeypatch.setattr(os, "sendfile", full)
    monkeypatch.setattr(shutil, "copyfileobj", full)
    destination = tmp_path / "node-local"
    files = others_files(destination)
    err = one_line_error(capsys, "stage", tiny_data, "--to", destination)
    assert len(err) < 400 and f"{destination} is full" in err and os.strerror(problem) in err
    assert re.search(r"the copy needs 0\.[5-9] MB, [\d.]+ MB free\): free space there or stage elsewhere with --to DIR",
                     err), err
    assert leftovers(destination, files) == []


def test_a_read_only_destination_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    destination = tmp_path / "node-local"
    destination.mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).is_relative_to(destination):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", read_only)
    err = one_line_error(capsys, "stage", tiny_data, "--to", destination)
    assert f"cannot write to {destination}" in err and "Read-only file system" in err and "--to DIR" in err


def test_a_destination_under_a_file_is_one_line(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, "stage", tiny_data, "--to", tmp_path / "file" / "sub")
    assert "cannot write to" in err and "Not a directory" in err


# --- corrupt archives -----------------------------------------------------------------------------

def damaged_zip(tiny_data: Path, path: Path) -> Path:
    content = bytearray(zip_of(tiny_data, path).read_bytes())
    for i in range(len(content) // 3, len(content) // 3 + 50):  # the members' data; the index stays intact
        content[i] ^= 0xFF
    path.write_bytes(bytes(content))
    return path


def truncated_tar(tiny_data: Path, path: Path, mode: str) -> Path:
    with tarfile.open(path, mode) as tf:
        tf.add(tiny_data, arcname="birds")
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2 + 100])
    return path


def clashing_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("birds/train/AZURE FINCH/001.jpg", b"...")
        zf.writestr("birds/train", b"a file where the folder is")
    return path


def names_besides(destination: Path, files: dict[str, str]) -> list[str]:
    """What the command left at the top of destination besides the others' files and its lock file:
    a half-extracted member or a temporary folder would show here."""
    others = {name.split("/")[0] for name in files}
    return sorted(p.name for p in destination.iterdir() if p.name not in others and not p.name.endswith(".lock"))


def into(command: str, archive: Path, destination: Path) -> list:
    """The command line that extracts archive: `stage` into a copy under destination, or `download`
    (from a file:// URL, which needs no credentials) into destination itself."""
    if command == "stage":
        return ["stage", archive, "--to", destination]
    return ["download", destination, "--url", archive.as_uri()]


@pytest.mark.parametrize("command", ["stage", "download"])
@pytest.mark.parametrize("make,message", [
    (lambda tiny, tmp: damaged_zip(tiny, tmp / "birds.zip"), "is damaged (BadZipFile: Bad CRC-32"),
    (lambda tiny, tmp: truncated_tar(tiny, tmp / "birds.tar.gz", "w:gz"), "is damaged (EOFError"),
    (lambda tiny, tmp: truncated_tar(tiny, tmp / "birds.tar", "w"), "is damaged (ReadError"),
    (lambda tiny, tmp: clashing_zip(tmp / "birds.zip"), "member 'birds/train' is both a file and a folder"),
], ids=["bad-crc", "truncated-tar-gz", "truncated-tar", "file-folder-clash"])
def test_a_corrupt_archive_is_one_line_and_leaves_nothing(tiny_data, tmp_path, capsys, make, message, command):
    archive = make(tiny_data, tmp_path)
    destination = tmp_path / "node-local"
    files = others_files(destination)
    err = one_line_error(capsys, *into(command, archive, destination))
    assert message in err and "download it again" in err, err
    assert command == "download" or f"{archive}" in err
    assert names_besides(destination, files) == []
    assert_intact(destination, files)


def tar_with(path: Path, tiny_data: Path, member: tarfile.TarInfo) -> Path:
    """A tar archive of the dataset with one more member at its end, after the images."""
    with tarfile.open(path, "w") as tf:
        tf.add(tiny_data, arcname="birds")
        tf.addfile(member, io.BytesIO(b"pwned") if member.isfile() else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.size = kind, linkname, 5 if kind == tarfile.REGTYPE else 0
    return member


# tarfile's "data" filter refuses these as it reaches them, after the images: what it had
# written by then goes with the temporary folder.
@pytest.mark.parametrize("command", ["stage", "download"])
@pytest.mark.parametrize("member,message", [
    (tar_member("birds/../../evil.txt"), "member 'birds/../../evil.txt' would be extracted to "),
    (tar_member("birds/up", tarfile.SYMTYPE, "../../.."), "member 'birds/up' would link to "),
    (tar_member("birds/passwd", tarfile.SYMTYPE, "/etc/passwd"), "member 'birds/passwd' is a link to an absolute path"),
    (tar_member("birds/null", tarfile.CHRTYPE), "member 'birds/null' is a special file"),
], ids=["escape", "link-out", "absolute-link", "device"])
def test_tar_members_refused_by_the_data_filter_leave_nothing(tiny_data, tmp_path, capsys, member, message, command):
    archive = tar_with(tmp_path / "birds.tar", tiny_data, member)
    destination = tmp_path / "node-local" / "deep"
    files = others_files(destination)
    err = one_line_error(capsys, *into(command, archive, destination))
    assert "refusing to extract" in err and message in err, err
    assert names_besides(destination, files) == [] and not (tmp_path / "node-local" / "evil.txt").exists()


def test_a_tar_member_with_an_absolute_path_lands_inside(tiny_data, tmp_path, capsys):
    """The "data" filter strips the leading slash, as tar itself does."""
    archive = tar_with(tmp_path / "birds.tar", tiny_data, tar_member(f"{tmp_path}/evil.txt"))
    code, out, err = cli(capsys, "stage", archive, "--to", tmp_path / "node-local")
    assert code == 0, err
    assert not (tmp_path / "evil.txt").exists()
    assert (tmp_path / "node-local" / "birds" / str(tmp_path).lstrip("/") / "evil.txt").read_bytes() == b"pwned"


def test_download_never_replaces_what_is_there(tiny_data, tmp_path, capsys):
    archive = zip_of(tiny_data, tmp_path / "birds.zip")
    (tmp_path / "birds" / "100-bird-species").mkdir(parents=True)
    (tmp_path / "birds" / "100-bird-species" / "notes.txt").write_text("mine")
    err = one_line_error(capsys, "download", tmp_path / "birds", "--url", archive.as_uri())
    assert f"{tmp_path / 'birds' / '100-bird-species'} exists, and {tmp_path / 'birds'}" in err
    assert "move it away or download to another directory" in err
    assert sorted(p.name for p in (tmp_path / "birds").iterdir()) == ["100-bird-species"]
    assert [p.name for p in (tmp_path / "birds" / "100-bird-species").iterdir()] == ["notes.txt"]


# --- decompression bombs ---------------------------------------------------------------------------

def png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that claims width x height pixels: opening it reads only the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


# 9000 x 9000 is over the course's limit (64 Mi pixels) but under Pillow's default error
# threshold; 20000 x 20000 is over both (PIL raises DecompressionBombError, not OSError).
@pytest.mark.parametrize("side", [9000, 20000])
def test_a_decompression_bomb_is_a_bad_image(tiny_data, tmp_path, capsys, side):
    root = copy_of(tiny_data, tmp_path)
    folder = root / "train" / data.find_classes(root)[0]
    (folder / "001.jpg").unlink()
    bomb = png_header(folder / "001.png", side, side)
    code, out, _ = cli(capsys, "verify", root)
    assert code == 1 and f"unreadable image {bomb}" in out and f"{side * side} pixels" in out and "1 problem(s)" in out
    with pytest.raises(data.DataError, match=f"cannot read image {bomb} .*{side * side} pixels.* exceeds limit"):
        data.load_splits(root, image_size=32)["train"][0]
    skipping = data.load_splits(root, image_size=32, skip_bad=True)["train"]
    assert skipping[0] is None and skipping.skipped.value == 1


# --- load errors keep the file's name ---------------------------------------------------------------

def test_an_error_from_a_dataloader_worker_is_its_own_message(tiny_data, tmp_path, capsys):
    root = copy_of(tiny_data, tmp_path)
    broken = root / "train" / data.find_classes(root)[0] / "001.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = data.load_splits(root, image_size=32)["train"]

    def main(argv):
        for _ in data.make_loader(dataset, 4, 1, persistent_workers=False):
            pass
    with pytest.raises(SystemExit):
        data.run_cli(main, [])
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image {broken} (") and err.count("\n") == 1, err


def test_a_multi_line_error_keeps_its_first_line_with_the_path():
    error = data.UserError("cannot load weights from /x/w.pth (Weights only load failed.\n\t(1) detail\n\nsee docs)")
    assert data.one_line(error) == "cannot load weights from /x/w.pth (Weights only load failed. (1) detail see docs)"


# --- counts checked before they become tracebacks ------------------------------------------------------

@pytest.mark.parametrize("option,value", [("--warmup", -1), ("--steps", 0), ("--repeats", 0), ("--images", 0),
                                          ("--epochs", 0)])
def test_benchmark_counts_out_of_range_are_one_line(tiny_data, capsys, option, value):
    with pytest.raises(SystemExit) as exited:
        data.run_cli(benchmark.main, ["run", "--data", str(tiny_data), option, str(value)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {option} {value} is out of range")


@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE", "", ".", "a/../.."])
def test_a_sweep_row_name_must_stay_inside_the_runs_directory(tmp_path, capsys, name):
    name = name.replace("ABSOLUTE", str(tmp_path / "escaped"))
    (tmp_path / "sweep.csv").write_text(f"name,lr\n{name},0.1\n")
    runs = tmp_path / "deep" / "runs"
    with pytest.raises(SystemExit) as exited:
        data.run_cli(sweep.main, ["run", str(tmp_path / "sweep.csv"), "0", "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert f"row 0's name {name!r} is not a folder inside --runs-dir {runs}: " in err
    assert not (tmp_path / "escaped").exists()


# --- a last training batch of one image -------------------------------------------------------------

def test_a_last_training_batch_of_one_image_is_left_out(tmp_path):
    """10 training images in batches of 3: 3 full batches and one image, which BatchNorm cannot
    train on at 32 px (every layer trains with --weights none)."""
    ten = data.make_synthetic(tmp_path / "ten", 2, (5, 1, 1), 32)
    summary = train.fit(train.parse_args([str(a) for a in tiny_train_args(
        ten, tmp_path / "run", "--batch-size", 3, "--epochs", 1)]))
    assert summary["train_samples"] == 9
    assert train.read_metrics(tmp_path / "run")[0]["train_samples"] == 9


def batches(loader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_lone_image_is_left_out_on_every_rank_at_the_same_step(world):
    """The global batch of 12 over 25 images ends in one image; on 2 or 3 ranks that last step
    holds one image per rank (one real, the others DistributedSampler's padding). Every rank
    leaves the step out, so the ranks agree on the steps and together train what one process does."""
    images = TensorDataset(torch.zeros(25, 1), torch.arange(25))
    single = batches(data.make_loader(images, 12, 0, sampler=DistributedSampler(images, 1, 0, shuffle=False)))
    assert single == [list(range(12)), list(range(12, 24))]
    loaders = [data.make_loader(images, 12 // world, 0, sampler=DistributedSampler(images, world, rank, shuffle=False))
               for rank in range(world)]
    per_rank = [batches(loader) for loader in loaders]
    assert [len(loader) for loader in loaders] == [len(b) for b in per_rank] == [2] * world
    for step, batch in enumerate(single):
        assert sorted(sum((b[step] for b in per_rank), [])) == batch


def test_a_resumed_epoch_leaves_out_the_same_lone_image():
    images = TensorDataset(torch.zeros(25, 1), torch.arange(25))
    sampler = train.ResumableSampler(images, 1, 0, shuffle=False)
    loader = data.make_loader(images, 4, 0, sampler=sampler)
    assert len(loader) == 6 and batches(loader)[-1] == [20, 21, 22, 23]
    sampler.skip = 2 * 4  # resumed after step 2
    assert len(loader) == 4 and sum(batches(loader), []) == list(range(8, 24))


def test_validation_and_plain_loaders_keep_every_image():
    images = TensorDataset(torch.zeros(25, 1), torch.arange(25))
    assert sum(batches(data.make_loader(images, 4, 0, sampler=train.ShardSampler(25, 0, 1))), []) == list(range(25))
    assert len(data.make_loader(images, 4, 0)) == 7 and batches(data.make_loader(images, 4, 0))[-1] == [24]


def test_a_warning_after_the_work_is_done_is_ignored_not_fatal():
    """Python resets its handlers to the default while it shuts down: a late SIGUSR1 (Slurm's
    time-limit warning after training finished) must not kill the process and fail its job step."""
    import resilience
    stop = resilience.StopRequest()

    def main(argv):
        stop.install()  # as training does
        return 0
    with pytest.raises(SystemExit) as exit_:
        data.run_cli(main, [])
    assert exit_.value.code == 0 and signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
