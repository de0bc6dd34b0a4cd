"""The model: head sized from the data, what trains, and weights that never download in a job."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import model
from conftest import one_line_exit_2


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # stderr is what the tests read
        pass


@contextlib.contextmanager
def serving(directory: Path, scheme: str):
    """The base URL of `directory`: a file:// URL, or a local HTTP server on a free port."""
    if scheme == "file":
        yield directory.as_uri()
        return
    handler = functools.partial(QuietHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()


def trainable_names(net) -> set[str]:
    return {name for name, p in net.named_parameters() if p.requires_grad}


def test_head_is_sized_from_the_classes_and_only_it_trains_when_frozen():
    net = model.BirdClassifier("resnet18", 7, freeze_backbone=True)
    assert net.head.out_features == 7 and net.head.in_features == 512
    assert trainable_names(net) == {"head.weight", "head.bias"}
    assert model.count_parameters(net)[1] == 512 * 7 + 7


def test_frozen_backbone_stays_in_eval_mode_so_batchnorm_cannot_drift():
    net = model.BirdClassifier("resnet18", 3, freeze_backbone=True).train()
    assert net.training and net.head.training and not net.backbone.training
    before = net.backbone.bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(net.backbone.bn1.running_mean, before)


def test_finetune_and_random_weights_train_every_layer():
    notices = []
    net = model.build_model("resnet18", 4, weights="none", log=notices.append)
    assert trainable_names(net) == {name for name, _ in net.named_parameters()}
    assert notices == ["notice: --weights none: a random frozen backbone cannot learn, so all layers train"]


def test_random_resnet152_gives_a_finite_moderate_loss_in_eval_mode():
    net = model.build_model("resnet152", 10, weights="none", log=lambda *a: None).eval()
    with torch.inference_mode():
        loss = F.cross_entropy(net(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    assert torch.isfinite(loss) and loss.item() < 10


def test_missing_imagenet_weights_say_to_run_fetch_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(data.UserError, match=r"run `python scripts/model.py fetch-weights --arch resnet18` on a login node"):
        model.build_model("resnet18", 5, weights="imagenet")


def test_fetch_weights_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    err = one_line_exit_2(model.main, ["fetch-weights", "--arch", "resnet18", "--url", "http://127.0.0.1:9/w.pth"], capsys)
    assert err.startswith("error: cannot download http://127.0.0.1:9/w.pth") and "login node" in err


def save_standin(path: Path):
    """Random resnet18 weights: a stand-in for the ImageNet file, which is not downloaded here."""
    source = model.ARCHITECTURES["resnet18"][0](weights=None)
    torch.save(source.state_dict(), path)
    return source


def test_fetched_weights_are_used_by_imagenet_runs(tmp_path, monkeypatch):
    """A stand-in fetched into TORCH_HOME, then loaded. Its hash is made official by naming it
    as torchvision names its files: <arch>-<first hex digits of the sha256>.pth."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = save_standin(tmp_path / "standin.pth")
    digest = hashlib.sha256((tmp_path / "standin.pth").read_bytes()).hexdigest()
    monkeypatch.setattr(model, "weights_url", lambda arch: f"https://download.pytorch.org/models/resnet18-{digest[:8]}.pth")
    assert model.main(["fetch-weights", "--arch", "resnet18", "--url", (tmp_path / "standin.pth").as_uri()]) == 0
    assert model.cached_weights_path("resnet18") == tmp_path / "torch" / "hub" / "checkpoints" / f"resnet18-{digest[:8]}.pth"
    assert model.cached_weights_path("resnet18").is_file()
    net = model.build_model("resnet18", 5, weights="imagenet")
    assert torch.equal(net.backbone.conv1.weight, source.conv1.weight)
    assert trainable_names(net) == {"head.weight", "head.bias"}
    finetuned = model.build_model("resnet18", 5, weights="imagenet", finetune=True)
    assert "backbone.conv1.weight" in trainable_names(finetuned)


@pytest.mark.parametrize("server", ["file", "http"])
def test_fetching_a_file_that_is_not_the_official_one_is_refused_and_caches_nothing(tmp_path, monkeypatch, capsys, server):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    save_standin(tmp_path / "standin.pth")
    with serving(tmp_path, server) as base:
        url = f"{base}/standin.pth"
        err = one_line_exit_2(model.main, ["fetch-weights", "--arch", "resnet18", "--url", url], capsys)
    target = model.cached_weights_path("resnet18")
    assert err.startswith(f"error: {url} is not the official resnet18 weights (its sha256 does not start with "
                          f"{model.official_hash_prefix('resnet18')}): nothing was saved to {target};"), err
    assert list(target.parent.iterdir()) == []  # neither the file nor torch.hub's .partial


@pytest.mark.parametrize("how", ["training", "fetch-weights"])
def test_a_cached_file_under_the_official_name_whose_hash_differs_is_refused_naming_it(tmp_path, monkeypatch, capsys, how):
    """What `fetch-weights --url` used to leave: any file, cached under the official name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = model.cached_weights_path("resnet18")
    target.parent.mkdir(parents=True)
    save_standin(target)
    run = (lambda argv: model.build_model("resnet18", 5, weights="imagenet")) if how == "training" else model.main
    err = one_line_exit_2(run, ["fetch-weights", "--arch", "resnet18"], capsys)
    assert err.startswith(f"error: {target} is not the official resnet18 weights (its sha256 starts "), err
    assert err.rstrip().endswith("delete it and run `python scripts/model.py fetch-weights --arch resnet18` on a login node")
    assert target.is_file()  # the course never deletes what it did not create


def test_the_official_hash_prefix_is_read_from_torchvisions_file_name():
    assert model.official_hash_prefix("resnet152") == "f82ba261"
    assert model.official_hash_prefix("resnet18") == "f37072fd"


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(model.ARCHITECTURES["resnet50"][0](weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(data.UserError, match="does not hold resnet18 weights .* check --arch"):
        model.build_model("resnet18", 5, weights=str(tmp_path / "r50.pth"))
    with pytest.raises(data.UserError, match="no such file"):
        model.build_model("resnet18", 5, weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("classes", [-1, 0, 1])
def test_summary_refuses_fewer_than_two_classes(classes, capsys):
    with pytest.raises(SystemExit) as exited:
        data.run_cli(model.main, ["summary", "--arch", "resnet18", "--classes", str(classes)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --classes {classes} is out of range: a classifier needs at least 2 classes")


@pytest.mark.parametrize("content", ["foreign object", "not a dict", "text"])
def test_a_weights_file_that_cannot_be_loaded_is_one_line_naming_it(tmp_path, capsys, content):
    import argparse
    path = tmp_path / "weights.pth"
    if content == "foreign object":  # torch.load's error for it is 8 lines long
        torch.save({"conv1.weight": argparse.Namespace()}, path)
    elif content == "not a dict":
        torch.save([1, 2, 3], path)
    else:
        path.write_text("not weights")
    with pytest.raises(SystemExit) as exited:
        data.run_cli(lambda argv: model.build_model("resnet18", 5, weights=str(path)), [])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot load weights from {path} (")
    assert err.rstrip().endswith("give a file saved with torch.save(model.state_dict()), imagenet or none")
