"""The benchmark and the speed flags: each flag does what it claims, and the ladder reports every row."""
from __future__ import annotations

import json
import os
import re
import subprocess

import matplotlib
import pytest
import torch
import torchvision

import benchmark
import data
import resilience
import sweep
import speed
import train
from conftest import ROOT, one_line_exit_2, tiny_train_args

TINY_BENCH = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--images", "16", "--workers", "1",
              "--warmup", "1", "--steps", "1", "--repeats", "1", "--epochs", "1"]


def fit(tiny_data, out, *extra):
    return train.fit(train.parse_args([str(a) for a in tiny_train_args(tiny_data, out, *extra)]))


def test_the_ladder_reports_every_row_with_its_ratios(tiny_data, tmp_path, capsys):
    assert benchmark.main(["ladder", "--data", str(tiny_data), *TINY_BENCH, "--finetune", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ladder.json").read_text())
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == [step.name for step in benchmark.LADDER] + ["finetune original", "finetune best"]
    assert rows["original"]["x_original"] == 1.0 and rows["original"]["kept"]
    assert rows["original"]["options"] == "--optimizer adam --amp off --no-normalize --train-mode-backbone --original-loader"
    for row in rows.values():  # every measured figure with its spread: min <= median <= max
        for key, spread in row["spread"].items():
            assert spread is None or spread["min"] <= spread["median"] == row[f"{key}_ips"] <= spread["max"], row
    for name in ["original", "normalise+eval", "loader", "channels_last", "cache", "finetune original"]:
        row = rows[name]
        assert row["loader_ips"] > 0 and row["model_ips"] > 0 and row["train_ips"] > 0, row
        assert row["x_original"] == pytest.approx(row["train_ips"] / rows["original"]["train_ips"])
        assert row["of_ceiling"] == pytest.approx(row["train_ips"] / row["model_ips"])
    for name in ["cudnn-benchmark", "gpu-decode"]:
        assert rows[name]["note"] == "skipped: needs CUDA" and rows[name]["train_ips"] is None
    assert rows["compile"]["note"].startswith("skipped on CPU")
    assert rows["amp"]["options"].count("--amp bf16") == 1  # measured, or probed and shown slower
    assert result["machine"]["torch"] == torch.__version__ and result["settings"]["repeats"] == 1
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "x original" in table and "of ceiling" in table and "cache" in table


def test_a_bad_benchmark_option_is_one_line_and_exit_2(tiny_data, capsys):
    err = one_line_exit_2(benchmark.main, ["run", "--data", tiny_data, "--images", 4, "--batch-size", 8], capsys)
    assert "--images 4 (of 96 training images) is less than one batch" in err
    assert "choose a command: run, ladder, scaling" in one_line_exit_2(benchmark.main, ["bench"], capsys)


@pytest.fixture
def seen_by_model(monkeypatch):
    """What the model receives and produces in fit: memory formats and dtypes, per call."""
    calls = []

    def build_and_watch(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: calls.append({
            "input_channels_last": inputs[0].is_contiguous(memory_format=torch.channels_last),
            "weight_channels_last": module.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last),
            "output_dtype": output.dtype, "training": module.training}))
        return model

    build_model = train.build_model
    monkeypatch.setattr(train, "build_model", build_and_watch)
    return calls


def test_channels_last_and_bf16_reach_the_model(tiny_data, tmp_path, seen_by_model):
    fit(tiny_data, tmp_path / "fast", "--epochs", 1, "--max-steps", 2, "--channels-last", "--amp", "bf16")
    trained = [c for c in seen_by_model if c["training"]]
    assert len(trained) == 2 and all(c["input_channels_last"] and c["weight_channels_last"] for c in seen_by_model)
    assert all(c["output_dtype"] == torch.bfloat16 for c in seen_by_model)
    seen_by_model.clear()
    fit(tiny_data, tmp_path / "plain", "--epochs", 1, "--max-steps", 2)
    assert not any(c["input_channels_last"] or c["weight_channels_last"] for c in seen_by_model)
    assert all(c["output_dtype"] == torch.float32 for c in seen_by_model)


def test_cached_features_give_the_weights_of_the_uncached_frozen_run(tiny_data, standin_weights, tmp_path, capsys):
    common = ["--weights", standin_weights, "--epochs", 2, "--no-shuffle", "--lr", 0.01]
    plain = fit(tiny_data, tmp_path / "plain", *common)
    cached = fit(tiny_data, tmp_path / "cached", *common, "--cache-features")
    assert "cached the backbone features of 96 train and 30 valid images" in capsys.readouterr().out
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["model"]
    assert not torch.allclose(a["head.weight"], torch.zeros_like(a["head.weight"]))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert cached["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5) and cached["val_acc"] == plain["val_acc"]


def test_features_are_assembled_from_every_rank_share(tiny_data, standin_weights):
    """Each rank computes every world_size-th image; the sum across ranks is the whole table."""
    cfg = train.parse_args([str(a) for a in tiny_train_args(tiny_data, "unused", "--weights", standin_weights)])
    model = train.build_model("resnet18", 6, str(standin_weights), log=lambda *a: None)
    valid = data.load_splits(tiny_data, 32, splits=("valid",))["valid"]
    cpu = torch.device("cpu")
    whole = speed.backbone_features(model, valid, data.ShardSampler(len(valid)), cfg, cpu, None)
    shares = [speed.backbone_features(model, valid, data.ShardSampler(len(valid), r, 3), cfg, cpu, None)
              for r in range(3)]
    for i, tensor in enumerate(whole.tensors):
        assert torch.allclose(sum(share.tensors[i] for share in shares), tensor, atol=1e-5)
    assert whole.tensors[1].tolist() == [label for _, label in valid.samples]


@pytest.mark.parametrize("flags,message", [
    (["--cache-features", "--finetune"], "--cache-features needs a frozen backbone: drop --finetune"),
    (["--cache-features", "--augment"], "random augmentation cannot work: drop --augment"),
    (["--cache-features", "--weights", "none"], "--cache-features needs a frozen pretrained backbone"),
    (["--gpu-decode", "--augment"], "--gpu-decode does not augment"),
])
def test_invalid_combinations_are_refused(tiny_data, tmp_path, flags, message):
    with pytest.raises(data.UserError, match=message):
        train.parse_args([str(a) for a in tiny_train_args(tiny_data, tmp_path / "run")] + flags)


def test_cache_features_with_finetune_is_one_line_and_exit_2(tiny_data, tmp_path, capsys):
    err = one_line_exit_2(train.main, tiny_train_args(tiny_data, tmp_path / "run", "--cache-features", "--finetune"),
                          capsys)
    assert err == "error: --cache-features needs a frozen backbone: drop --finetune\n"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_profile_writes_a_chrome_trace_into_the_run_directory(tiny_data, tmp_path):
    fit(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 6, "--profile")
    trace = json.loads((tmp_path / "run" / "profile" / "trace-rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "ProfilerStep#2" in names and "ProfilerStep#4" in names and "ProfilerStep#1" not in names
    assert any(name.startswith("aten::") and "conv" in name for name in names if name)
    assert "Self CPU" in (tmp_path / "run" / "profile" / "top-ops-rank0.txt").read_text()


def test_gpu_decode_batches_equal_the_cpu_pipeline(tiny_data, tmp_path, capsys):
    plain = data.load_splits(tiny_data, 32, splits=("valid",))["valid"]
    encoded = data.load_splits(tiny_data, 32, splits=("valid",), gpu_decode=True)["valid"]
    (images, labels), (jpegs, same_labels) = next(iter(data.make_loader(plain, 8, 0))), next(iter(data.make_loader(encoded, 8, 1)))
    assert isinstance(jpegs, data.JpegBatch) and torch.equal(labels, same_labels)
    assert torch.allclose(jpegs.to("cpu"), images, atol=1e-5)  # the same libjpeg decoder and normalisation
    fit(tiny_data, tmp_path / "run", "--epochs", 1, "--max-steps", 1, "--gpu-decode")
    assert "notice: --gpu-decode needs a CUDA device; decoding the JPEGs on the CPU as usual" in capsys.readouterr().out


def test_cudnn_benchmark_is_switched_on_and_off_for_each_run(tiny_data, tmp_path):
    try:
        fit(tiny_data, tmp_path / "on", "--epochs", 1, "--max-steps", 1, "--cudnn-benchmark")
        assert torch.backends.cudnn.benchmark is True
        fit(tiny_data, tmp_path / "off", "--epochs", 1, "--max-steps", 1)
        assert torch.backends.cudnn.benchmark is False  # a process-wide switch: the next run resets it
    finally:
        torch.backends.cudnn.benchmark = False


def test_adam_is_the_original_optimizer(tiny_data, tmp_path):
    cfg = train.parse_args([str(a) for a in tiny_train_args(tiny_data, tmp_path, "--optimizer", "adam")])
    assert type(train.build_optimizer(cfg, torch.nn.Linear(2, 2))) is torch.optim.Adam


def test_gpu_monitor_records_while_the_job_runs_and_stops_at_exit(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\necho $$ > \"$FAKE_PID\"\nfor i in 1 2 3 4 5 6 7 8 9; do\n"
                    "  echo \"2026/01/01 12:00:0$i.000, 0, $((i * 10)) %, $((i * 1000)) MiB\"\n"
                    "  echo \"2026/01/01 12:00:0$i.000, 1, 5 %, 500 MiB\"; sleep 0.1\ndone\nexec sleep 60\n")
    fake.chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "FAKE_PID": str(tmp_path / "pid")}
    script = f"source slurm/gpu_monitor.sh && gpu_monitor_start {run} 1 && sleep 1.5"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "GPU use every 1s" in result.stdout, result.stderr
    lines = (run / "gpu.csv").read_text().splitlines()
    assert lines[0].startswith("timestamp, index, utilization.gpu") and len(lines) > 10
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()  # stopped at exit
    (run / "gpu.csv").write_text("\n".join(lines) + "\n2026/01/01 12:00:0")  # a line cut off by the kill
    assert sweep.plot_gpu_use(run).read_bytes()[:4] == b"\x89PNG"
    without = subprocess.run(["bash", "-c", f"source slurm/gpu_monitor.sh && gpu_monitor_start {tmp_path / 'cpu'}"],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert without.returncode == 0 and "no nvidia-smi" in without.stdout and not (tmp_path / "cpu").exists()


def write_run(path, world_size: int, rates: list[float], visible_gpus: int = 1, **options):
    path.mkdir(parents=True)
    options = {"arch": "resnet18", "image_size": 64, "batch_size": 16, "amp": "off", "finetune": False,
               "weights": "none", "data": "data/birds", **options}
    (path / "config.json").write_text(json.dumps({"world_size": world_size, "visible_gpus": visible_gpus,
                                                  "options": options}))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "images_per_sec": r}) + "\n"
                                                for i, r in enumerate(rates)))
    return path


def test_scaling_gives_speed_up_and_efficiency_against_one_device(tmp_path, capsys):
    single = write_run(tmp_path / "single", 1, [90, 100, 100])
    independent = [write_run(tmp_path / f"ind{i}", 1, [100, 100]) for i in range(2)]
    dp = write_run(tmp_path / "dp", 1, [150], visible_gpus=2, batch_size=32, data_parallel=True)  # 16 per GPU
    ddp = write_run(tmp_path / "ddp", 4, [300, 320, 320])
    assert benchmark.main(["scaling", "--single", str(single), "--independent", *map(str, independent),
                           "--dp", str(dp), "--ddp", str(ddp), "--plot", str(tmp_path / "scaling.png")]) == 0
    points = benchmark.scaling_points(single, independent, [dp], [ddp])
    assert [(p["kind"], p["devices"], p["speedup"]) for p in points] == [
        ("single", 1, 1.0), ("independent", 2, 2.0), ("dp", 2, 1.5), ("ddp", 4, 3.2)]
    assert points[3]["efficiency"] == pytest.approx(0.8)
    # The cost column: device-hours per million images; DDP is the fastest and dearer than one device by 1 / 0.8.
    assert [p["device_hours_per_m"] for p in points] == pytest.approx([1e6 / 100 / 3600, 2e6 / 200 / 3600,
                                                                       2e6 / 150 / 3600, 4e6 / 320 / 3600])
    assert [p["cost"] for p in points] == pytest.approx([1, 1, 4 / 3, 1.25])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[-3:] == ["device-h/M", "img", "cost"]
    assert out.splitlines()[4].split()[-2:] == [f"{4e6 / 320 / 3600:.3g}", "1.25x"]
    assert "V100" not in out and (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(data.UserError, match="is not a finished run directory"):
        benchmark.scaling_points(tmp_path / "nothing", [], [], [])


@pytest.mark.parametrize("difference,message", [
    ({"image_size": 32}, "runs differ in image size: .*single has 64, .*other has 32"),
    ({"arch": "resnet152"}, "runs differ in architecture: .*single has resnet18, .*other has resnet152"),
    ({"batch_size": 8}, "runs differ in batch per device: .*single has 16, .*other has 8"),
    ({"finetune": True}, "runs differ in fine-tuning"),
    ({"amp": "bf16"}, "runs differ in precision")])
def test_scaling_refuses_runs_that_did_different_work(tmp_path, capsys, difference, message):
    single = write_run(tmp_path / "single", 1, [100])
    other = write_run(tmp_path / "other", 2, [300], **difference)
    with pytest.raises(data.UserError, match=message):
        benchmark.scaling_points(single, [], [], [other])
    err = one_line_exit_2(benchmark.main, ["scaling", "--single", single, "--ddp", other], capsys)
    assert "scaling compares only runs that did the same work" in err


def spread(median: float, half: float) -> benchmark.Spread:
    return benchmark.Spread(median - half, median, median + half)


def test_a_row_is_kept_only_when_faster_beyond_the_noise(tiny_data, tmp_path, monkeypatch):
    """Stubbed measurements: end to end per row (median, +-), and a ceiling far above unless the row says."""
    measured = {"original": (50, 2), "normalise+eval": (60, 2), "loader": (61, 3), "channels_last": (90, 2),
                "amp": (95, 1), "cache": (400, 10)}
    ceiling_factor = {"amp": 0.9, "channels_last": 0.99}  # amp beyond both spreads, channels_last within them
    calls = iter(step.name for step in benchmark.LADDER if step.name in measured)

    def stub_measure(cfg, rt, ceilings=None):
        name = next(calls)
        median, half = measured[name]
        ceiling = spread(median * ceiling_factor.get(name, 2), 1)
        return {"loader": spread(500, 1), "model": ceiling, "train": spread(median, half)}
    monkeypatch.setattr(benchmark, "measure", stub_measure)
    monkeypatch.setattr(benchmark, "probe_step_rate", lambda cfg, rt: 1000.0)
    cfg = benchmark.parse_config("ladder", ["--data", str(tiny_data), *TINY_BENCH, "--out", str(tmp_path)])
    rows = {r["row"]: r for r in benchmark.ladder(cfg, benchmark.BenchmarkRuntime(torch.device("cpu")))}
    assert {name: (rows[name]["kept"], rows[name]["note"]) for name in measured} == {
        "original": (True, ""), "normalise+eval": (True, ""),
        "loader": (False, "within noise of normalise+eval"),           # 58-64 overlaps 58-62
        "channels_last": (True, "end to end at its ceiling (within the spreads)"),  # 89.1 +-1 against 90 +-2
        "amp": (False, "within noise: end to end above its own ceiling"),           # 94-96 against 84.5-86.5
        "cache": (True, "")}
    assert [name for name in measured if rows[name]["within_noise"]] == ["loader", "amp"]
    assert rows["cache"]["spread"]["train"] == {"min": 390, "median": 400, "max": 410}
    table = benchmark.format_table(list(rows.values()))
    assert "61.0 ±5%" in table and "within noise of normalise+eval" in table
    fig = benchmark.plot_ladder(list(rows.values()))
    colours = [tuple(bar.get_facecolor()[:3]) for bar in fig.axes[0].patches]
    orange = matplotlib.colors.to_rgb("tab:orange")
    assert colours.count(orange) == 2, "the two rows within noise are orange in the chart"


def test_the_original_row_loads_data_as_the_original_did(tiny_data, monkeypatch):
    """12 workers capped to the CPUs, no pinned memory, workers started every epoch, last batch dropped."""
    original = next(step for step in benchmark.LADDER if step.name == "original").changes
    assert original == {"normalize": False, "backbone_eval": False, "original_loader": True, "channels_last": False,
                        "amp": "off", "compile": False, "cache_features": False, "gpu_decode": False,
                        "optimizer": "adam", "cudnn_benchmark": False}
    monkeypatch.setattr(benchmark, "available_cpus", lambda: 3)
    cfg = benchmark.parse_config("run", ["--data", str(tiny_data), *TINY_BENCH, "--original-loader"])
    images = benchmark.benchmark_images(cfg, benchmark.BenchmarkRuntime(torch.device("cpu")))
    loader = benchmark.benchmark_loader(images, cfg)
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (3, False, False)
    assert loader.batch_sampler.drop_last and len(loader) == 16 // 8
    monkeypatch.setattr(benchmark, "available_cpus", lambda: 32)
    assert benchmark.benchmark_loader(images, cfg).num_workers == 12


# --- what DDP communicates (benchmark.py allreduce) ---------------------------------------------------

def test_allreduce_counts_the_bytes_and_buckets_of_frozen_and_finetuned_ddp(tmp_path, capsys):
    """2 gloo processes: exactly the trainable parameters' bytes, all of them in DDP's buckets of about the cap."""
    assert benchmark.main(["allreduce", "--arch", "resnet18", "--classes", "6", "--image-size", "16", "--batch-size",
                           "2", "--processes", "2", "--warmup", "2", "--steps", "1", "--repeats", "2",
                           "--bucket-cap-mb", "5", "--out", str(tmp_path)]) == 0
    rows = {r["case"]: r for r in json.loads((tmp_path / "allreduce.json").read_text())["rows"]}
    model = benchmark.BirdClassifier("resnet18", 6, freeze_backbone=False)
    expected = {"frozen": 512 * 6 + 6, "finetune": sum(p.numel() for p in model.parameters())}
    for case, row in rows.items():
        assert (row["processes"], row["backend"]) == (2, "gloo")
        assert (row["trainable_parameters"], row["allreduce_bytes"]) == (expected[case], 4 * expected[case])
        assert sum(row["bucket_bytes"]) == row["allreduce_bytes"]  # every gradient in exactly one bucket
        for key in ("seconds_no_sync", "seconds_ddp", "seconds_allreduce_alone"):
            assert 0 <= row[key]["min"] <= row[key]["median"] <= row[key]["max"], (key, row)
        assert row["added_seconds"] == pytest.approx(row["seconds_ddp"]["median"] - row["seconds_no_sync"]["median"])
    largest = max(p.numel() * 4 for p in model.parameters())  # a bucket closes after the tensor that passes the cap
    assert len(rows["frozen"]["bucket_bytes"]) == 1 and len(rows["finetune"]["bucket_bytes"]) >= 3
    assert max(rows["finetune"]["bucket_bytes"]) < 5 * 2**20 + largest
    out = capsys.readouterr().out
    assert "measuring 2 process(es): gloo" in out and "0.0123 MB" in out and "44.7 MB" in out


def test_communication_cost_is_claimed_only_beyond_the_noise(capsys):
    def row(ddp, local, alone):
        return {"processes": 2, "case": "finetune", "trainable_parameters": 10, "allreduce_bytes": 40,
                "bucket_bytes": [40], **{key: {"min": m - h, "median": m, "max": m + h} for key, (m, h) in
                                         zip(["seconds_ddp", "seconds_no_sync", "seconds_allreduce_alone"],
                                             [ddp, local, alone])}}
    beyond = benchmark.add_communication_cost(row((0.120, 0.005), (0.100, 0.005), (0.040, 0.001)))
    assert (beyond["added_seconds"], beyond["hidden"], beyond["note"]) == (pytest.approx(0.020), pytest.approx(0.5), "")
    overlapping = benchmark.add_communication_cost(row((0.108, 0.005), (0.100, 0.005), (0.040, 0.001)))
    assert overlapping["hidden"] is None and overlapping["note"].startswith("within noise")
    header, *lines = [re.split(r"\s{2,}", line) for line in benchmark.allreduce_table([beyond, overlapping]).splitlines()]
    hidden = header.index("hidden")
    assert (lines[0][hidden], lines[1][hidden]) == ("50%", "-") and lines[0][header.index("added ms")] == "20.0"
    err = one_line_exit_2(benchmark.main, ["allreduce", "--processes", "2", "--backend", "nccl"], capsys)
    assert "--backend nccl needs a GPU per process: 0 visible" in err
    assert "every count must be 1 or more" in one_line_exit_2(benchmark.main, ["allreduce", "--processes", "0"], capsys)


# --- whole runs, process start to exit (benchmark.py wholerun) ------------------------------------------

def test_the_original_switches_reach_what_train_prepares(tiny_data, standin_weights):
    """No normalisation, the original's loader in training only, the frozen backbone in training mode; then undone."""
    sampler_of = lambda split: resilience.ResumableSampler(split, num_replicas=1, rank=0, shuffle=True, seed=0)
    with benchmark.original_switches(normalize=False, backbone_eval=False, original_loader=True):
        split = train.load_splits(tiny_data, 32, splits=("train",))["train"]
        training = train.make_loader(split, 8, 1, sampler=sampler_of(split))
        validation = train.make_loader(split, 8, 1, sampler=data.ShardSampler(len(split)))
        model = train.build_model("resnet18", 6, str(standin_weights)).train()
    assert split[0][0].min() >= 0  # ToTensor() only: no pixel below the ImageNet mean turns negative
    assert (training.pin_memory, training.persistent_workers, training.prefetch_factor) == (False, False, 2)
    assert training.batch_sampler.drop_last and not validation.batch_sampler.drop_last
    assert model.freeze_backbone and model.backbone.training  # model.train() reached the frozen backbone
    assert train.make_loader is data.make_loader and train.load_splits is data.load_splits
    split = train.load_splits(tiny_data, 32, splits=("train",))["train"]
    assert split[0][0].min() < 0 and not train.build_model("resnet18", 6, str(standin_weights)).train().backbone.training


def test_the_random_backbone_has_batch_norm_statistics_of_the_training_images(tiny_data):
    """Its first batch norm, in evaluation mode, normalises the training images' first convolution to mean ~0,
    variance ~1 per channel (initial statistics leave ResNet-152's features at ~5e8 and the loss exploding)."""
    split = train.load_splits(tiny_data, 32, splits=("train",))["train"]
    backbone = torchvision.models.resnet18()
    benchmark.calibrate_batch_norm(backbone, split, seed=0, images=len(split), batch=4)
    assert not backbone.training and backbone.bn1.num_batches_tracked.item() == (len(split) + 2) // 4
    with torch.no_grad():
        normalised = backbone.bn1(backbone.conv1(torch.stack([image for image, _ in split])))
    channel_means, channel_vars = normalised.mean(dim=(0, 2, 3)), normalised.var(dim=(0, 2, 3))
    assert channel_means.abs().max() < 0.5 and 0.5 < channel_vars.median() < 2.0
    assert backbone.bn1.running_var.sub(1).abs().max() > 0.01  # measured, not the initial 1


def test_a_speedup_meets_its_goal_only_beyond_the_noise():
    met = benchmark.judge_speedup([10.0, 12.0], [2.0, 2.0], 5)
    assert met["speedup"] == {"min": 5.0, "median": 5.5, "max": 6.0} and met["verdict"] == "met beyond noise"
    assert benchmark.judge_speedup([10.0, 8.0], [2.0, 2.0], 5)["verdict"] == "within noise of the goal"
    assert benchmark.judge_speedup([8.0], [2.0], 5)["verdict"] == "not met"


def test_wholerun_times_both_configurations_from_start_to_exit(tiny_data, tmp_path, capsys):
    common = ["wholerun", "--data", str(tiny_data), "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
              "--epochs", "1", "--repeats", "1", "--out", str(tmp_path)]
    assert benchmark.main([*common, "--cache-features", "--workers", "0"]) == 0
    result = json.loads((tmp_path / "wholerun.json").read_text())
    original, given = (result["sides"][name]["runs"][0] for name in ("original", "given"))
    assert result["speedup"]["median"] == pytest.approx(original["seconds"] / given["seconds"])
    assert result["goal"] == 5 and result["verdict"] in ("met beyond noise", "not met", "within noise of the goal")
    options = {name: json.loads((tmp_path / f"{name}-1" / "config.json").read_text())["options"]
               for name in ("original", "given")}
    assert (options["original"]["optimizer"], options["original"]["amp"], options["original"]["cache_features"],
            options["original"]["workers"]) == ("adam", "off", False, min(12, data.available_cpus()))
    assert options["given"]["cache_features"] and options["given"]["workers"] == 0
    assert "--original-loader" in result["sides"]["original"]["command"]
    assert original["threads"] == given["threads"] == "threads 1 (OMP_NUM_THREADS)"  # the same thread rule
    metrics = train.read_metrics(tmp_path / "given-1")
    assert metrics[0]["wall_seconds"] >= metrics[0]["epoch_seconds"]  # from the start: the cached features too
    assert (tmp_path / "time-to-accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "speed-up" in capsys.readouterr().out


def test_wholerun_refuses_to_replace_earlier_runs_before_it_starts_any(tiny_data, tmp_path, capsys):
    (tmp_path / "given-2").mkdir()
    (tmp_path / "given-2" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    err = one_line_exit_2(benchmark.main, ["wholerun", "--data", tiny_data, "--repeats", 2, "--out", tmp_path], capsys)
    assert f"{tmp_path / 'given-2'} already holds a run" in err and not (tmp_path / "original-1").exists()
    err = one_line_exit_2(benchmark.main, ["wholerun", "--data", tiny_data, "--resume", "--out", tmp_path], capsys)
    assert "wholerun times whole runs from a fresh start" in err
