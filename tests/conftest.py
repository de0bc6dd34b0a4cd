"""Shared fixtures: a tiny synthetic dataset, a way to run the course's scripts, the notebooks
executed once per run, and the tiers (pytest.ini's markers) of every test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One compute thread per test process, set before torch is imported, so that in-process tests
# get it too, and threads that sleep rather than spin while waiting: the suite runs several
# processes on 2 cores, where spinning OpenMP threads slow each other down up to ~30x (the
# slowest test took 119 s with the default threads and 23 s with one). Subprocesses inherit it.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
os.environ.update(ONE_THREAD)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # in case torch was imported (by a plugin) before the variables above

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the tests import the scripts as modules, as the notebooks do

import data  # noqa: E402

# Small enough for a 2-core CPU: 6 classes, 32 px images.
TINY = {"classes": 6, "per_class": (16, 5, 2), "image_size": 32}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic dataset of 6 classes x (16 train, 5 valid, 2 test) images of 32 px."""
    root = tmp_path_factory.mktemp("birds") / "birds-synthetic"
    return data.make_synthetic(root, TINY["classes"], TINY["per_class"], TINY["image_size"], seed=0)


def unavailable(reason: str) -> None:
    """Skip a test whose tool or service is missing here; in CI (CI=true) that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


def cpu_env(**extra: str) -> dict:
    """The environment for a script run: CPU only, no W&B network, quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "KAGGLE_"))}
    env.update({"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **ONE_THREAD})
    env.update(extra)
    return env


def run_script(script: str, *args, env: dict | None = None, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run scripts/<script> with the test's Python; capture output, never raise."""
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)],
                          capture_output=True, text=True, env=env or cpu_env(), timeout=timeout,
                          cwd=cwd or ROOT)


def one_line_exit_2(main, argv: list, capsys) -> str:
    """What a script's main prints on stderr when run_cli turns a UserError into exit status 2,
    run in this process: starting the script costs seconds (importing torch), each time."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        data.run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tiny_train_args(data_dir: Path, out: Path, *extra) -> list[str]:
    """Options for a fast CPU run on the tiny dataset."""
    return ["--data", data_dir, "--arch", "resnet18", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--out", out, *extra]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(processes: int, script: str, *args, env: dict | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """torchrun on this machine; --master-addr 127.0.0.1 avoids lookups of the host's name."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env or cpu_env(), timeout=timeout, cwd=ROOT)


def load_build_site():
    """docs/build_site.py (a script, not a package) as the module `build_site`, loaded once."""
    import importlib.util
    if "build_site" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_site", ROOT / "docs" / "build_site.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["build_site"]


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory) -> Path:
    """A local stand-in for the ImageNet file: a fixed random ResNet-18 state dict."""
    import torch
    from torchvision import models
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "resnet18-standin.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def executed_notebooks(request, tiny_data, tmp_path_factory):
    """name -> the path of notebooks/<name>.ipynb executed once in this run, with the exercises'
    solutions run after their checks (tests/notebook_tools.py: ExecutedNotebooks says who reads
    these copies and which tests execute on their own). The notebooks that the selected tests
    read run together on first use."""
    import notebook_tools
    return notebook_tools.ExecutedNotebooks(tiny_data, tmp_path_factory.mktemp("notebooks"),
                                            notebooks_read_by(request.session.items), lab=lab_for(request))


def lab_for(request):
    """A JupyterLab and a headless Chromium (tests/jupyterlab_tools.py: Lab) to execute the notebooks
    in when the browser tests are selected and can run here; None (papermill) otherwise."""
    import jupyterlab_tools
    if not any("browser" in tiers_of(item) for item in request.session.items) or jupyterlab_tools.missing():
        return None
    lab = jupyterlab_tools.Lab(request.getfixturevalue("tmp_path_factory").mktemp("lab"),
                               request.getfixturevalue("offline_chromium"))
    request.addfinalizer(lab.close)
    return lab


@pytest.fixture(scope="session")
def offline_chromium():
    """Headless Chromium through playwright, with no network beyond this machine; one per test
    process (playwright's sync API runs one at a time): the notebooks' JupyterLab and the slides."""
    import jupyterlab_tools
    if reason := jupyterlab_tools.missing():
        unavailable(reason)
    with jupyterlab_tools.launch_chromium() as browser:
        yield browser


def notebooks_read_by(items) -> list[str]:
    """The notebooks that these tests read: the one a test is parametrised with (`name`), or all."""
    from test_notebooks import notebook_names
    names = notebook_names()
    wanted = set()
    for item in items:
        if "executed_notebooks" in getattr(item, "fixturenames", ()):
            name = getattr(item, "callspec", None) and item.callspec.params.get("name")
            wanted |= {name} if name in names else set(names)
    return [n for n in names if n in wanted]


# --- tiers (markers registered in pytest.ini; `make check` leaves out all four) -------------------

# Whole files by what they need; their owners add tests there without marking each one.
TIER_OF_FILE = {
    "test_slurm.py": "slurm",  # sbatch on the local cluster (`make cluster-up`); CI starts it
    "test_ondemand.py": "slurm",  # the OnDemand app's job on that cluster (and Ruby)
    "test_jupyterlab.py": "browser",  # every notebook in JupyterLab in headless Chromium
}
SLURM_DIR = ROOT / "tests" / "slurm"

# Tests of a few training runs or more (over ~10 s on 2 cores), by node id without parameters,
# and module fixtures that cost that much once for every test that uses them. A new test that
# trains that long goes here, or gets @pytest.mark.slow; `make check` must stay within 3 minutes.
SLOW = {
    "tests/test_train.py::test_cpu_training_reaches_three_times_chance",
    "tests/test_train.py::test_resume_continues_to_the_same_result",
    "tests/test_train.py::test_wandb_offline_logs_the_config_without_network",
    "tests/test_resilience.py::test_sigusr1_mid_epoch_then_resume_ends_as_if_never_interrupted",
    "tests/test_resilience.py::test_ddp_stops_on_every_rank_when_one_rank_is_signalled_and_resumes_exactly",
    "tests/test_resilience.py::test_a_corrupt_jpeg_stops_by_default_and_is_skipped_and_counted_with_the_flag",
    "tests/test_resilience.py::test_credentials_never_reach_the_run_directory_or_the_logs",
    "tests/test_resilience.py::test_without_a_watching_launcher_the_survivor_fails_within_the_timeout",
    "tests/test_resilience.py::test_torchrun_ends_the_other_ranks_and_names_the_dead_one",
    "tests/test_resilience.py::test_resume_refuses_a_checkpoint_with_another_class_count",
    "tests/test_parallel.py::test_ddp_scores_the_test_split_as_one_process_does_with_the_lr_of_its_global_batch",
    "tests/test_train.py::test_a_training_notebook_runs_a_second_time_into_the_same_folder",  # two notebook runs
    "tests/test_parallel.py::test_rank_0_decides_whether_to_resume_for_every_rank",  # DDP runs of 2 processes
    "tests/test_parallel.py::test_fsdp_gives_ddps_weights_across_a_resume_and_keeps_half_the_parameters_per_rank",
    "tests/test_benchmark.py::test_the_ladder_reports_every_row_with_its_ratios",  # every row, fine-tuning too
    "tests/test_benchmark.py::test_allreduce_counts_the_bytes_and_buckets_of_frozen_and_finetuned_ddp",  # 2 gloo processes
    "tests/test_benchmark.py::test_wholerun_times_both_configurations_from_start_to_exit",  # two train.py processes
    # 7-12 s each on 2 cores: several training runs, or scripts started in new processes
    "tests/test_train.py::test_the_gradient_scaler_runs_only_with_fp16",
    "tests/test_train.py::test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one",
    "tests/test_train.py::test_resume_across_precisions",
    "tests/test_train.py::test_resume_is_exact_in_every_configuration",
    "tests/test_train.py::test_a_stopped_run_has_no_test_score_until_it_finishes",
    "tests/test_hardware.py::test_the_header_line_says_how_many_compute_threads_the_allocation_gives",
    "tests/test_parallel.py::test_sweep_rows_become_separate_runs_and_gather_tables_them",
    "tests/test_shards.py::test_resume_mid_epoch_from_shards_is_exact_and_on_other_data_refused",  # three runs
    "tests/test_shards.py::test_ddp_on_shards_equals_one_process_with_the_global_batch",  # torchrun, 1 and 2 processes
}
SLOW_FIXTURES = {("test_parallel.py", "runs")}  # single, DataParallel and DDP with 1, 2 and 3 processes


# `make test` runs the suite in two processes (pytest-xdist): the Slurm tests wait for jobs most of
# the time, so the other process runs the rest meanwhile. The tests that share one costly thing run
# in one process, one after another (pytest_xdist_make_scheduler): those of the local Slurm cluster
# (its jobs need every core of both nodes, and the tests time requeues), and those that read the
# notebooks executed once per run (a session fixture exists once per process). By file: xdist's
# own groups (xdist_group marks) do not reach its scheduler under pytest 9.
GROUP_OF_FILE = {**{name: "slurm" for name, tier in TIER_OF_FILE.items() if tier == "slurm"},
                 "test_jupyterlab.py": "notebooks", "test_exercises.py": "notebooks",
                 "test_lessons.py": "notebooks", "test_site.py": "notebooks"}


def group_of(nodeid: str) -> str | None:
    path = Path(nodeid.split("::")[0])
    return "slurm" if path.parts[:2] == ("tests", "slurm") else GROUP_OF_FILE.get(path.name)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup with the groups above; the largest group is handed out first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ByGroup(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    return ByGroup(config, log)


def tiers_of(item) -> list[str]:
    path, fixtures = Path(item.path), getattr(item, "fixturenames", ())
    tiers = [TIER_OF_FILE.get(path.name) or ("slurm" if path.is_relative_to(SLURM_DIR) else None)]
    if "executed_notebooks" in fixtures:
        tiers.append("notebooks")  # reads (and on first use executes) the notebooks
    if item.nodeid.split("[")[0] in SLOW or any((path.name, f) in SLOW_FIXTURES for f in fixtures):
        tiers.append("slow")
    return [tier for tier in tiers if tier]


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = tiers_of(item)
        for tier in tiers:
            item.add_marker(tier)
        if "notebooks" in tiers and group_of(item.nodeid) != "notebooks":
            raise pytest.UsageError(f"{item.nodeid} reads the executed notebooks: add its file to GROUP_OF_FILE "
                                    "(tests/conftest.py), or a second process of `make test` executes them again")
