"""Every Slurm file in slurm/ runs for real, unchanged, on the course's local Slurm cluster.

The cluster is tests/slurm/cluster.sh (`sudo make cluster-up`; .ci/run starts it): nodes of 2
cores that bind tasks to them, partitions named unlike the course's defaults, a partition
without GPUs. The jobs go through slurm/submit with a site file that differs from
slurm/site.sh only in its values, as a centre would adapt it, and are submitted by an
ordinary user. What must shrink for a test (data, model, epochs, image size) is passed the way
a user would: through the environment variables that slurm/env.sh reads, and sbatch options.

The jobs run at the same time: the first test that needs the cluster submits every job that
the selected tests need (JobPool), each in its own thread, and each test waits for its own.
The time-limit warning is Slurm's own in one job (sweep_steps.sbatch, a real expiring limit);
elsewhere `scancel --signal=USR1` sends the same signal to the same processes at a chosen
moment, so that the jobs need not wait minutes for a limit.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import data
from cluster_tools import (CPU_PARTITION, GPU_PARTITION, JOB_USER, Workspace, as_job_user, job_env, job_field,
                           require_cluster, site_file, slurm, wait_until_gone)
from conftest import ROOT, cpu_env
from test_container import binds, inner, records, standin_apptainer

SLURM = ROOT / "slurm"
EPOCHS = 2
CLASSES, TRAIN, VALID = 4, 40, 10  # measured: 0.62-0.65 validation accuracy after 1 epoch, 0.85-1.0 after 2
CHANCE = 1 / CLASSES
TINY = dict(ARCH="resnet18", WEIGHTS="none", EPOCHS=str(EPOCHS), IMAGE_SIZE="32", BATCH_SIZE="4",
            EXTRA_ARGS="--workers 0 --lr 0.003")
SHORT = "--time=10"  # short jobs (above their warning, USR1@300) fit before longer waiting ones (backfill)
TRACEBACK = re.compile(r"Traceback|SignalException|ChildFailedError|srun: error|Exited with exit code")


# --- jobs on the cluster --------------------------------------------------------------------

@dataclass
class Job:
    id: str
    returncode: int
    output: str
    runs: Path

    def rank_lines(self) -> list[dict]:
        pattern = r"^rank (\d+)/\d+ .*host (\S+) pid \d+ cpus (\d+) .*launcher (\S+)"
        return [{"rank": int(r), "host": h, "cpus": int(c), "launcher": la}
                for r, h, c, la in re.findall(pattern, self.output, re.M)]


class Submission:
    """One `slurm/submit --wait` as the cluster's user, in the background."""

    def __init__(self, ws: Path, file: str, env: dict, options: tuple[str, ...], log: str):
        self.ws, self.file = ws, file
        command = ["slurm/submit", "--wait", "--parsable", f"--output={ws}/{log}", *options, f"slurm/{file}"]
        self.process = subprocess.Popen(as_job_user(command, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=ROOT)
        self.id = self.process.stdout.readline().strip().split(";")[0]  # sbatch prints it, then waits
        assert self.id.isdigit(), f"{file} was not submitted: {self.process.communicate(timeout=30)[1][-2000:]}"

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.ws.glob("*.out")))

    def wait_for_line(self, pattern: str, timeout: float = 1500) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log(), re.M)
            if found:
                return found.group(0)
            assert self.process.poll() is None, f"{self.file} ended before '{pattern}':\n{self.log()[-3000:]}"
            time.sleep(0.3)
        raise AssertionError(f"no '{pattern}' in {self.file}'s log after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def jump_the_queue(self) -> None:
        """A job submitted while the others wait (a follow-up) goes before them (root may reorder)."""
        slurm("scontrol", "top", self.id)

    def signal(self, name: str = "USR1") -> None:
        """What Slurm does at the time-limit warning (--signal=USR1@N): signal every process of every step."""
        done = slurm("scancel", f"--signal={name}", self.id)
        assert done.returncode == 0, done.stderr

    def finish(self, timeout: float = 1500) -> Job:
        _, stderr = self.process.communicate(timeout=timeout)
        return Job(self.id, self.process.returncode, self.log() + stderr, self.ws / "runs")


@dataclass
class JobPool:
    """The scenarios (below) that the selected tests need, each running in its own thread, their
    first jobs submitted in the order of SCENARIOS: Slurm starts jobs in the order they came."""
    data: Path
    workspaces: list[Workspace] = field(default_factory=list)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    results: dict[str, object] = field(default_factory=dict)
    submitted: threading.Event = field(default_factory=threading.Event)

    def workspace(self, name: str) -> Path:
        self.workspaces.append(Workspace(name))
        return self.workspaces[-1].path

    def submit(self, name: str, file: str, *options: str, site: dict | None = None, log: str = "%x-%j.out",
               ws: Path | None = None, **env: str) -> Submission:
        ws = ws or self.workspace(name)
        settings = dict(BIRDS_DATA=str(self.data), RUNS=str(ws / "runs"), **TINY)
        settings["COURSE_SITE"] = str(site_file(ws, **(site or {})))
        try:
            return Submission(ws, file, job_env(**{**settings, **env}), options, log)
        finally:
            self.submitted.set()

    def start(self, names: list[str]) -> None:
        for name in names:
            self.submitted.clear()
            thread = threading.Thread(target=self.run, args=(name,), name=name, daemon=True)
            self.threads[name] = thread
            thread.start()
            self.submitted.wait(timeout=120)

    def run(self, name: str) -> None:
        try:
            self.results[name] = SCENARIOS[name](self)
        except BaseException as error:  # handed to the test that asks for it
            self.results[name] = error
        finally:
            self.submitted.set()

    def result(self, name: str):
        assert name in self.threads, f"scenario {name} was not started: name it in the test's @uses"
        self.threads[name].join(timeout=1500)
        result = self.results.get(name, AssertionError(f"scenario {name} still running after 25 min"))
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        for name, thread in self.threads.items():
            thread.join(timeout=1 if name not in self.results else 0)
        for ws in self.workspaces:
            ws.close()


SCENARIOS = {}


def sitecustomize(ws: Path, code: str) -> str:
    """A directory for PYTHONPATH whose sitecustomize runs `code` in every Python of the job."""
    (ws / "site").mkdir()
    (ws / "site" / "sitecustomize.py").write_text(code)
    (ws / "site").chmod(0o755)
    return str(ws / "site")


def in_container(ws: Path) -> tuple[dict, dict]:
    """Container mode (docs/containers.md): the site and environment settings of a job that runs
    its python inside an image, COURSE_CONTAINER in the site file, with a stand-in `apptainer`
    first on PATH that records each call in ws/apptainer.jsonl (tests/test_container.py)."""
    standin_apptainer(ws)
    image = ws / "course.sif"
    image.write_bytes(b"stand-in image")
    image.chmod(0o644)
    return {"COURSE_CONTAINER": str(image)}, {"PATH": f"{ws / 'bin'}:{job_env()['PATH']}"}


def scenario(function):
    SCENARIOS[function.__name__] = function
    return function


def uses(*names: str):
    """The scenarios a test reads (JobPool starts those of every selected test at once)."""
    def mark(test):
        test.slurm_scenarios = names
        return test
    return mark


def synthetic_data(directory: Path, train: int, valid: int) -> Path:
    """The synthetic dataset, made by the job user as a learner makes it (so the user owns it)."""
    made = subprocess.run(as_job_user([sys.executable, "scripts/data.py", "synthetic", str(directory), "--classes",
                                       str(CLASSES), "--train", str(train), "--valid", str(valid), "--test", "2",
                                       "--image-size", "32"], job_env(TMPDIR=str(directory.parent))),
                          capture_output=True, text=True, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    return directory


@pytest.fixture(scope="module")
def slurm_data() -> Path:
    """Enough images per class for 4 ranks to learn in 3 short epochs."""
    require_cluster()
    ws = Workspace("data")
    yield synthetic_data(ws.path / "birds", TRAIN, VALID)
    ws.close()


@pytest.fixture(scope="module")
def pool(request, slurm_data):
    require_cluster()
    wanted = {name for item in request.session.items if item.module is request.module
              for name in getattr(item.function, "slurm_scenarios", ())}
    jobs = JobPool(slurm_data)
    jobs.start([name for name in SCENARIOS if name in wanted])  # in the order below: the longest first
    yield jobs
    jobs.close()


# --- the scenarios, in the order they are submitted: jobs of one node first (the longest first),
# then those that need every core of both GPU nodes -----------------------------------------------------------

@scenario
def sweep_steps_at_time_limit(pool: JobPool) -> Job:
    """sweep_steps.sbatch with a real 3-minute limit: Slurm checks limits every 30 s, so its
    warning (--signal=USR1@60) comes 90 to 120 s after the start. Each loss computation sleeps
    0.1 s per image (a sitecustomize), so that both runs, cheap in CPU, last past it (7 epochs
    of at least 20 s): the fast row checks for the warning every 10 steps (8 s), the slow one
    (batch 40) only after each epoch (20 s), longer than Slurm gives a step to end once another
    has requeued the job (KillWait=5)."""
    ws = pool.workspace("sweep-steps")
    (ws / "sweep.csv").write_text("name,lr,batch-size,epochs\nfast,0.003,8,7\nslow,0.003,40,7\n")
    slow_steps = sitecustomize(ws, "import sys\n"
                                   "if sys.argv[0].endswith('sweep.py') and sys.argv[1:2] == ['run']:\n"
                                   "    import time, torch.nn.functional as F\n"
                                   "    loss = F.cross_entropy\n"
                                   "    def slow(logits, *args, **kwargs):\n"
                                   "        time.sleep(0.1 * len(logits))\n"
                                   "        return loss(logits, *args, **kwargs)\n"
                                   "    F.cross_entropy = slow\n")
    return pool.submit("sweep_steps", "sweep_steps.sbatch", "--time=3", "--signal=USR1@60", ws=ws,
                       SWEEP=str(ws / "sweep.csv"), PYTHONPATH=slow_steps).finish()


@scenario
def train_warned(pool: JobPool) -> Job:
    """train.sbatch warned mid-epoch: it checkpoints, the job is requeued and resumes."""
    job = pool.submit("train", "train.sbatch", SHORT)
    job.wait_for_line(r"^epoch 1 step 10/")
    job.signal()
    return job.finish()


@scenario
def train_resubmitted(pool: JobPool) -> tuple[Job, Job, str]:
    """A site that forbids --requeue (SITE_REQUEUE=resubmit): warned, the job submits itself again."""
    job = pool.submit("resubmit", "train.sbatch", SHORT, site={"SITE_REQUEUE": "resubmit"})
    job.wait_for_line(r"^epoch 1 step 10/")
    requeue_flag = job_field(job.id, "Requeue")
    job.signal()
    first = job.finish()
    follow_up = re.search(r"^resubmit: job (\d+) continues", first.output, re.M)
    assert follow_up, first.output[-3000:]
    slurm("scontrol", "top", follow_up.group(1))  # before the jobs submitted since
    wait_until_gone(follow_up.group(1), timeout=1500)
    second = Job(follow_up.group(1), 0, (job.ws / f"train-{follow_up.group(1)}.out").read_text(), job.ws / "runs")
    return first, second, requeue_flag


@scenario
def node_cache(pool: JobPool) -> list[tuple[Job, dict]]:
    """Three short jobs with a node cache (SITE_NODE_CACHE): the first copies, the second reuses,
    the third copies again because the source changed in between."""
    ws = pool.workspace("cache")
    source, cache = ws / "birds", ws / "cache"
    synthetic_data(source, 8, 2)
    container, path = in_container(ws)  # and inside the course's image (a stand-in apptainer)
    done = []
    for attempt in range(3):
        if attempt == 2:
            (source / "train" / data.find_classes(source)[0] / "added.jpg").write_bytes(
                next((source / "train").glob("*/*.jpg")).read_bytes())
        job = pool.submit("cache", "train.sbatch", SHORT, ws=ws, site={"SITE_NODE_CACHE": str(cache), **container},
                          BIRDS_DATA=str(source), **path,
                          EPOCHS="1", EXTRA_ARGS="--workers 0 --max-steps 1",
                          RUN_DIR=str(ws / "runs" / f"attempt-{attempt}"))
        if attempt:
            job.jump_the_queue()
        job = job.finish()
        marker = cache / "birds" / ".staged"
        done.append((job, {"staged": marker.stat().st_mtime_ns if marker.exists() else None,
                           "images": len(list((cache / "birds" / "train").glob("*/*.jpg")))}))
    return done


@scenario
def ddp_srun_1node(pool: JobPool) -> Job:
    """2 ranks of 2 cores each: on the test nodes' 2 cores only overcommitted (--overcommit), which
    keeps Slurm's per-task binding: without SRUN_CPUS_PER_TASK each rank got one core."""
    return pool.submit("ddp-1node", "ddp_srun_1node.sbatch", "--overcommit", "--cpus-per-task=2").finish()


@scenario
def train_dp(pool: JobPool) -> Job:
    return pool.submit("train-dp", "train_dp.sbatch").finish()


@scenario
def sweep_array(pool: JobPool) -> Job:
    ws = pool.workspace("sweep-array")
    return pool.submit("sweep-array", "sweep_array.sbatch", ws=ws, log="%x-%A_%a.out", SWEEP=tiny_sweep(ws)).finish()


@scenario
def gpu_check(pool: JobPool) -> Job:
    """One core per node (not the site's 2), so that the other core of each node runs other jobs."""
    return pool.submit("gpu-check", "gpu_check.sbatch", "--cpus-per-task=1", **TINY_GPU_CHECK).finish()


@scenario
def ddp_srun_multinode(pool: JobPool) -> Job:
    """Inside the course's image: every rank's python through slurm/container/bin (a stand-in apptainer)."""
    ws = pool.workspace("ddp-srun")
    container, path = in_container(ws)
    return pool.submit("ddp-srun", "ddp_srun_multinode.sbatch", ws=ws, site=container, **path).finish()


@scenario
def torchrun_warned_twice(pool: JobPool) -> Job:
    """ddp_torchrun_multinode.sbatch, warned mid-training (checkpoint, requeue, resume) and again
    after its training has finished: the processes linger 8 s after the end (a sitecustomize on
    PYTHONPATH), so the second warning reliably finds torchrun still running."""
    ws = pool.workspace("torchrun")
    linger = sitecustomize(ws, "import atexit, os, time\n"
                               "if 'LOCAL_RANK' in os.environ and os.environ.get('TORCHELASTIC_RUN_ID'):\n"
                               "    atexit.register(time.sleep, 8)\n")
    job = pool.submit("torchrun", "ddp_torchrun_multinode.sbatch", ws=ws, EPOCHS="3", EXTRA_ARGS="--lr 0.003",
                      PYTHONPATH=linger)
    job.wait_for_line(r"^epoch 1 step \d+/")
    job.signal()
    job.wait_for_line(r"^summary: ")
    job.signal()
    return job.finish()


# --- helpers for the checks -------------------------------------------------------------------

def assert_trained(run: Path, epochs: int = EPOCHS) -> dict:
    metrics = train_metrics(run)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), run
    best = max(m["val_acc"] for m in metrics)
    assert best > CHANCE, f"{run}: best val_acc {best} is not above chance {CHANCE:.3f}"
    assert all(m["val_samples"] == CLASSES * VALID for m in metrics)
    return json.loads((run / "config.json").read_text())


def train_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# After a run that succeeded, torchrun's agent on another node may fail to close the rendezvous
# because the agent that hosts its store has already exited, and say so with a warning and the
# store's tracebacks (pytorch/pytorch#69197; wenet-e2e/wespeaker#171 shows the same lines):
# harmless, and out of the course's hands. What comes after the last summary line up to the
# last such warning is cut.
RENDEZVOUS_SHUTDOWN = re.compile(r"has failed to shutdown the rendezvous '[^']+' due to an error of type "
                                 r"RendezvousConnectionError\.\n")


def without_harmless_warnings(output: str) -> str:
    warnings = list(RENDEZVOUS_SHUTDOWN.finditer(output))
    summary = output.rfind("\nsummary: ")
    if not warnings or summary < 0 or warnings[-1].start() < summary:
        return output
    end_of_summary = output.index("\n", summary + 1) + 1
    return output[:end_of_summary] + output[warnings[-1].end():]


def assert_quiet(job: Job) -> None:
    assert job.returncode == 0 and not TRACEBACK.search(without_harmless_warnings(job.output)), job.output[-4000:]


def assert_scratch_removed(job: Job) -> None:
    """Nothing of the job's left in the nodes' /tmp (the same directory for every test node): not
    its scratch directory, nor what PyTorch or staging would put there without one."""
    left = [p for p in Path("/tmp").iterdir() if p.name == f"course-job-{job.id}" or (
            p.name.startswith(("torchelastic_", "torchinductor_", JOB_USER)) and p.owner() == JOB_USER)]
    assert left == [], left


def tiny_sweep(ws: Path) -> str:
    """Two learning rates with a batch small enough for the tiny dataset (160 images)."""
    (ws / "sweep.csv").write_text("name,lr,batch-size\nlr-1e-3,0.001,8\nlr-3e-3,0.003,8\n")
    return str(ws / "sweep.csv")


def assert_ddp(job: Job, world_size: int, nodes: int, launcher: str, cpus: int, epochs: int = EPOCHS) -> None:
    """The last run of the job (a requeued job may run elsewhere the second time)."""
    assert_quiet(job)
    every_run = job.rank_lines()
    # Every rank runs on the cores its job asked for per task (defect: srun gave each task one).
    assert {line["cpus"] for line in every_run} == {cpus} and {line["launcher"] for line in every_run} == {launcher}
    last = every_run[-world_size:]
    assert sorted(line["rank"] for line in last) == list(range(world_size)), job.output[-3000:]
    hosts = {line["host"] for line in last}
    assert len(hosts) == nodes
    config = assert_trained(job.runs / f"{job.id}-ddp", epochs)
    assert config["world_size"] == world_size and config["global_batch_size"] == 4 * world_size
    assert hosts <= set(re.findall(r"^staged on (\S+) in", job.output, re.M)), job.output[-2000:]


# --- the tests --------------------------------------------------------------------------------

def test_every_slurm_file_has_a_test():
    tested = {name for name in globals() if name.startswith("test_sbatch_")}
    expected = {"test_sbatch_" + p.stem for p in SLURM.glob("*.sbatch")}
    assert tested == expected, f"Slurm files without a test: {sorted(expected - tested)}"


@pytest.mark.parametrize("path", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_every_sbatch_line_is_commented(path):
    bare = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH") and " # " not in line]
    assert bare == []


@uses("train_warned")
def test_sbatch_train(pool, tmp_path):
    """Warned mid-epoch, checkpointed, requeued quietly, resumed: the same result as a run never
    interrupted (run here meanwhile, without Slurm)."""
    reference = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), "--data", str(pool.data), "--arch", "resnet18",
         "--weights", "none", "--epochs", str(EPOCHS), "--image-size", "32", "--batch-size", "4", "--workers", "0",
         "--lr", "0.003", "--out", str(tmp_path / "reference")], env=cpu_env(), capture_output=True, text=True,
        timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    job = pool.result("train_warned")
    assert_quiet(job)
    assert re.search(r"^stopped: stopped at epoch 1 step 20 on SIGUSR1; .*the batch script requeues Slurm job "
                     + job.id, job.output, re.M), job.output[-3000:]
    assert job.output.count(f"requeue: asking Slurm to requeue job {job.id}") == 1
    assert re.search(r"^resumed from .* at epoch 1 step 20$", job.output, re.M)
    run = job.runs / f"{job.id}-train"
    config = assert_trained(run)
    assert config["world_size"] == 1 and config["slurm_job_id"] == job.id
    assert f"summary: epochs={EPOCHS}/{EPOCHS}" in job.output
    assert len(re.findall(r"^staged on (\S+) in", job.output, re.M)) == 2, "each run staged on its node"
    final, expected = train_metrics(run)[-1], train_metrics(tmp_path / "reference")[-1]
    assert final["val_acc"] == expected["val_acc"]
    assert final["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    # One task with the job's one core, and no DataLoader workers: one compute thread.
    assert re.search(r"\| workers 0 \| threads 1 \(1 CPUs - 0 workers\)$", job.output, re.M)
    assert_scratch_removed(job)


@uses("train_dp")
def test_sbatch_train_dp(pool):
    job = pool.result("train_dp")
    assert_quiet(job)
    assert_trained(job.runs / f"{job.id}-dp")
    assert "notice: DataParallel needs 2 or more GPUs, 0 visible" in job.output


@uses("sweep_steps_at_time_limit")
def test_sbatch_sweep_steps(pool):
    """Both steps get Slurm's warning; the job goes back to the queue only when both have
    checkpointed, and both runs resume from their own checkpoint and finish."""
    job = pool.result("sweep_steps_at_time_limit")
    assert_quiet(job)
    sweep = job.runs / f"{job.id}-sweep"
    requeues = job.output.count(f"requeue: asking Slurm to requeue job {job.id}")
    assert requeues >= 1, job.output[-4000:]
    # No step was ended before its checkpoint (assert_quiet: no killed task); both runs were still
    # training at the first warning and checkpointed; every requeued run resumed from its checkpoint.
    for run in ("fast", "slow"):
        stops = re.findall(rf"^stopped: stopped at epoch \d+ step \d+ on SIGUSR1; checkpoint {sweep}/{run}/last.pt",
                           job.output, re.M)
        resumes = re.findall(rf"^resumed from {sweep}/{run}/last.pt at ", job.output, re.M)
        assert 1 <= len(stops) <= requeues == len(resumes), f"{run}:\n{job.output[-4000:]}"
        assert_trained(sweep / run, 7)
    # Side by side: the first warning stopped both steps, before the job's first requeue. (The
    # run directories' times say only when each run last started, which after a requeue is not
    # when the other ran.)
    first_requeue = job.output.index(f"requeue: asking Slurm to requeue job {job.id}")
    for run in ("fast", "slow"):
        assert 0 <= job.output.find(f"checkpoint {sweep}/{run}/last.pt") < first_requeue, (
            f"the {run} step was not training when the first warning came: the two steps did not run at the same time")
    assert re.search(r"^run\s+arch\s+lr", job.output, re.M) and "best: " in job.output
    assert (sweep / "sweep.png").is_file()


@uses("sweep_array")
def test_sbatch_sweep_array(pool):
    job = pool.result("sweep_array")
    assert_quiet(job)
    logs = sorted(p.name for p in job.runs.parent.glob("*.out"))
    assert logs == [f"sweep-array-{job.id}_0.out", f"sweep-array-{job.id}_1.out"]
    runs = sorted(p.parent.name for p in (job.runs / f"{job.id}-sweep").glob("*/metrics.jsonl"))
    assert runs == ["lr-1e-3", "lr-3e-3"]
    for run in runs:
        assert_trained(job.runs / f"{job.id}-sweep" / run)


@uses("ddp_srun_1node")
def test_sbatch_ddp_srun_1node(pool):
    job = pool.result("ddp_srun_1node")
    assert_ddp(job, 2, 1, "srun", cpus=2)


def container_calls(ws: Path, *bound: Path) -> tuple[list[dict], list[dict]]:
    """Every python of the jobs in ws ran inside the image (ws/course.sif, COURSE_CONTAINER)
    through the stand-in apptainer, without --nv (no GPUs here), with the course, the node-local
    scratch (/tmp) and `bound` (data, runs, node cache) visible at the same paths: bound, or
    through a parent where one did not exist yet. Returns the calls of train.py and of staging."""
    calls = records(ws / "apptainer.jsonl")
    assert calls and all(c["argv"][0] == "exec" and inner(c["argv"])[:2] == [str(ws / "course.sif"), "python"]
                         for c in calls), calls
    assert not any({"--nv", "--rocm"} & set(c["argv"]) for c in calls), "no GPU driver on the test nodes"
    for call in calls:
        bind = [Path(b) for b in binds(call["argv"])]
        assert {ROOT, Path("/tmp")} <= set(bind), call["argv"]
        hidden = [p for p in bound if not any(p == b or b in p.parents for b in bind)]
        assert hidden == [], call["argv"]
        assert str(SLURM / "container" / "bin") not in call["path"].split(":"), "inside: python, not the wrapper"
    return ([c for c in calls if inner(c["argv"])[2:3] == ["scripts/train.py"]],
            [c for c in calls if inner(c["argv"])[2:4] == ["scripts/data.py", "stage"]])


@uses("ddp_srun_multinode")
def test_sbatch_ddp_srun_multinode(pool):
    """In container mode (COURSE_CONTAINER): srun's ranks on both nodes run inside the image."""
    job = pool.result("ddp_srun_multinode")
    assert_ddp(job, 4, 2, "srun", cpus=1)
    runs, stages = container_calls(job.runs.parent, pool.data, job.runs)
    assert sorted(int(c["rank"]) for c in runs) == [0, 1, 2, 3] and len({c["host"] for c in runs}) == 2
    assert len(stages) == 2 and len({c["host"] for c in stages}) == 2, "staged on each node, in the image"


@uses("torchrun_warned_twice")
def test_sbatch_ddp_torchrun_multinode(pool):
    """4 ranks on 2 nodes; each node's torchrun keeps the job's 2 cores per task and shares them
    between its 2 processes; a warning mid-training requeues quietly; one after the training
    has finished leaves the job COMPLETED (exit 0), not FAILED."""
    job = pool.result("torchrun_warned_twice")
    assert_ddp(job, 4, 2, "torchrun", cpus=2, epochs=3)
    assert len(job.rank_lines()) == 8, "two runs of 4 ranks: before and after the requeue"
    assert len(re.findall(r"^stopped: ", job.output, re.M)) == 1, "one line for the stop, from rank 0"
    assert job.output.count(f"requeue: asking Slurm to requeue job {job.id}") == 1
    assert re.search(r"^resumed from .* at (epoch \d+ step \d+|the end of epoch \d+)", job.output, re.M)
    assert re.search(r"\| workers 1 \| threads 1 \(", job.output), "workers: the process's share of 2 cores"


GPU_CHECK_STEPS = ["environment", "single", "fp16", "compile", "gpu-decode", "dp", "ddp", "ddp-syncbn", "ddp-2nodes",
                   "scaling", "gather", "ladder"]
TINY_GPU_CHECK = dict(GPU_CHECK_ALLOW_CPU="1", ARCH="resnet18", IMAGE_SIZE="32", BATCH_SIZE="4", STEPS="2",
                      LADDER_ARGS="--warmup 1 --steps 1 --repeats 1 --epochs 1")


def summary_lines(check_dir: Path) -> list[list[str]]:
    return [line.split(maxsplit=2) for line in (check_dir / "summary.txt").read_text().splitlines()]


@uses("gpu_check")
def test_sbatch_gpu_check(pool):
    """Every step of the GPU check, on the CPUs of the test cluster: the plumbing, not the GPU."""
    job = pool.result("gpu_check")
    assert job.returncode == 0, job.output[-3000:]
    check_dir = job.runs / f"{job.id}-gpu-check"
    lines = summary_lines(check_dir)
    skipped = {"compile": "torch.compile on CPUs compiles C++ for minutes and checks no GPU path",
               "gpu-decode": "GPU JPEG decoding needs a GPU",
               "ddp-syncbn": "SyncBatchNorm needs 2 or more GPUs (0 here)"}
    assert [(result, step) for result, step, _ in lines] == [("skipped" if s in skipped else "ok", s)
                                                             for s in GPU_CHECK_STEPS]
    for step, why in skipped.items():
        assert lines[GPU_CHECK_STEPS.index(step)][2].endswith(why)
    for step in ["single", "fp16", "dp", "ddp", "ddp-2nodes"]:  # 3 epochs of 2 steps
        metrics = train_metrics(check_dir / step)
        assert [(m["epoch"], m["train_samples"]) for m in metrics] == [(e, 16 if step.startswith(("dp", "ddp")) else 8)
                                                                       for e in (1, 2, 3)], step
    assert not list(check_dir.glob("**/*.pt")), "checkpoints are deleted after each step"
    ddp_log = (check_dir / "ddp.log").read_text()
    assert sorted(re.findall(r"^rank (\d/2) .* backend gloo$", ddp_log, re.M)) == ["0/2", "1/2"]
    # Inter-node: one rank on each node, with the core per task the job asked for.
    two_nodes = (check_dir / "ddp-2nodes.log").read_text()
    ranks = re.findall(r"^rank (\d)/2 .* host (\S+) pid \d+ cpus (\d+) .* launcher srun backend gloo$", two_nodes, re.M)
    assert [(rank, cpus) for rank, _, cpus in sorted(ranks)] == [("0", "1"), ("1", "1")], two_nodes[-2000:]
    assert len({host for _, host, _ in ranks}) == 2, "one rank on each of the job's nodes"
    # The same CPU cores per device for every run: the job's one core, at least one worker each.
    workers = {run: json.loads((check_dir / run / "config.json").read_text())["options"]["workers"]
               for run in ["single", "dp", "ddp"]}
    assert workers == {"single": 1, "dp": 1, "ddp": 1}, "dp asks for 2 workers: capped to the job's one core"
    assert "notice: --workers 2 is more than the 1 CPU(s) available: using 1" in (check_dir / "dp.log").read_text()
    rows = [row["row"] for row in json.loads((check_dir / "ladder.json").read_text())["rows"]]
    assert rows[0] == "original" and rows[-1] == "finetune best" and len(rows) == 11
    assert (check_dir / "scaling.png").stat().st_size > 0 and "9 ok, 0 failed, 3 skipped" in job.output
    assert re.search(r"^row +loader img/s", job.output, re.M), "the ladder's table is in the job's log"


@uses("train_resubmitted")
def test_a_site_without_requeue_gets_the_job_submitted_again_with_the_same_run_directory(pool):
    first, second, requeue_flag = pool.result("train_resubmitted")
    assert requeue_flag == "0", "slurm/submit passes --no-requeue for SITE_REQUEUE=resubmit"
    assert_quiet(first)
    run = first.runs / f"{first.id}-train"
    assert re.search(rf"^resubmit: job {second.id} continues from the checkpoint in {run} once job {first.id} has "
                     "ended$", first.output, re.M), first.output[-3000:]
    assert re.search(rf"^resumed from {run}/last.pt at epoch 1 step 20$", second.output, re.M), second.output[-3000:]
    assert f"summary: epochs={EPOCHS}/{EPOCHS}" in second.output and not TRACEBACK.search(second.output)
    assert_trained(run)
    assert not (first.runs / f"{second.id}-train").exists(), "the second job used the first one's run directory"


@uses("node_cache")
def test_a_node_cache_is_reused_only_for_the_same_source(pool):
    (first, one), (second, two), (third, three) = pool.result("node_cache")
    for job in (first, second, third):
        assert_quiet(job)
        assert_scratch_removed(job)
    # In container mode (COURSE_CONTAINER): the three jobs' staging and training in the image,
    # with the node cache bound too.
    ws = first.runs.parent
    runs, stages = container_calls(ws, ws / "birds", ws / "runs", ws / "cache")
    assert [c["rank"] for c in runs] == ["0"] * 3 and len(stages) == 3, "each job: staging and training"
    assert one["staged"] is not None and one["images"] == CLASSES * 8, "the cache keeps the copy after the job"
    assert two["staged"] == one["staged"], "the same source: reused"
    assert three["staged"] != two["staged"] and three["images"] == CLASSES * 8 + 1, "a changed source: copied again"


# --- the site settings, on the cluster --------------------------------------------------------

def test_every_file_is_accepted_with_only_the_site_file_changed_and_refused_without(tmp_path):
    """The test cluster's nodes have 2 cores and its GPU partition another name: every file
    passes `sbatch --test-only` with the site file, none without it."""
    require_cluster()
    ws = Workspace("site")
    try:
        site = site_file(ws.path)
        for path in sorted(SLURM.glob("*.sbatch")):
            env = job_env(COURSE_SITE=str(site))
            accepted = subprocess.run(as_job_user(["slurm/submit", "--test-only", f"slurm/{path.name}"], env),
                                      capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert accepted.returncode == 0 and "to start at" in accepted.stderr, f"{path.name}: {accepted.stderr}"
            refused = subprocess.run(as_job_user(["sbatch", "--test-only", f"slurm/{path.name}"], env),
                                     capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert refused.returncode != 0, f"{path.name} runs here without the site settings"
        # A command-line option wins over the site's: 3 cores per task fit no node here.
        more = subprocess.run(as_job_user(["slurm/submit", "--test-only", "--cpus-per-task=3", "slurm/train.sbatch"],
                                          job_env(COURSE_SITE=str(site))), capture_output=True, text=True, cwd=ROOT)
        assert more.returncode != 0 and re.search(r"--cpus-per-task=1 .*--cpus-per-task=3", more.stderr), more.stderr
    finally:
        ws.close()


def test_gpus_are_refused_on_the_partition_without_them():
    require_cluster()
    refused = slurm("sbatch", "--test-only", f"--partition={CPU_PARTITION}", "--gpus-per-node=1", "--wrap=true")
    accepted = slurm("sbatch", "--test-only", f"--partition={GPU_PARTITION}", "--gpus-per-node=1", "--wrap=true")
    assert refused.returncode != 0 and accepted.returncode == 0, (refused.stderr, accepted.stderr)


# --- without a cluster ------------------------------------------------------------------------

def test_gpu_check_goes_on_after_a_failed_step_and_fails_at_the_end(tmp_path):
    env = cpu_env(**{**TINY_GPU_CHECK, "STEPS": "-1", "GPU_CHECK_STEPS": "single ddp ddp-2nodes scaling",
                     "GPU_CHECK_DIR": str(tmp_path / "check")})
    result = subprocess.run(["bash", "slurm/gpu_check.sbatch"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = summary_lines(tmp_path / "check")
    assert [(result, step) for result, step, _ in lines] == [("FAILED", "single"), ("FAILED", "ddp"),
                                                             ("skipped", "ddp-2nodes"), ("FAILED", "scaling")]
    assert lines[0][2].endswith("error: --max-steps -1 is out of range: see --help")
    assert lines[1][2].endswith("is out of range: see --help")
    assert lines[2][2].endswith("needs a Slurm job of 2 nodes (this one has none)")
    assert "is not a finished run directory" in lines[3][2]
    assert "0 ok, 3 failed, 1 skipped" in result.stdout


@pytest.mark.parametrize("settings,message", [
    ({}, "error: no CUDA device is visible here: run it on a GPU node (slurm/submit slurm/gpu_check.sbatch), "
         "or set GPU_CHECK_ALLOW_CPU=1 to check only the plumbing"),
    ({"GPU_CHECK_STEPS": "single warp-drive"}, "error: GPU_CHECK_STEPS: no step 'warp-drive'; the steps are: "
                                               + " ".join(GPU_CHECK_STEPS))])
def test_gpu_check_refuses_in_one_line(tmp_path, settings, message):
    env = cpu_env(RUNS=str(tmp_path / "runs"), **settings)
    result = subprocess.run(["bash", "slurm/gpu_check.sbatch"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert (result.returncode, result.stderr.strip()) == (2, message)
    assert not (tmp_path / "runs").exists()


def fake_command(tmp: Path, name: str, script: str) -> dict[str, str]:
    """An environment in which `name` is this bash script."""
    fake = tmp / "bin" / name
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/bash\n" + script)
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}


@pytest.mark.parametrize("scontrol,expected", [
    ("exit 0", "requeued Slurm job 32: it resumes from its checkpoint when it starts again"),
    # Slurm ends the job's processes as soon as it accepts the requeue: scontrol among them.
    ("kill -TERM $$", "requeued Slurm job 32: it resumes from its checkpoint when it starts again"),
    ("echo 'scontrol: error: Requested operation is presently disabled for job 32' >&2; exit 1",
     "could not requeue Slurm job 32 (scontrol: error: Requested operation is presently disabled for job 32): "
     "continue with --resume --out {out}"),
])
def test_a_script_that_requeues_its_own_job_says_what_happened(tmp_path, monkeypatch, scontrol, expected):
    import resilience
    monkeypatch.setattr(os, "environ", {**fake_command(tmp_path, "scontrol", scontrol), "SLURM_JOB_ID": "32"})
    assert resilience.requeue_slurm_job(tmp_path / "run") == expected.format(out=tmp_path / "run")


def test_in_the_course_files_the_batch_script_requeues_after_every_step(tmp_path, monkeypatch):
    import resilience
    request = tmp_path / ".requeue-32"
    monkeypatch.setattr(os, "environ", {**fake_command(tmp_path, "scontrol", "exit 1"), "SLURM_JOB_ID": "32",
                                        "COURSE_REQUEUE_REQUEST": str(request)})
    note = resilience.requeue_slurm_job(tmp_path / "run")
    assert note == "the batch script requeues Slurm job 32 once every step has stopped"
    assert request.read_text() == f"{tmp_path / 'run'}\n"


# --- site settings: slurm/site.sh -> sbatch options (slurm/submit) -------------------------------

def fake_sbatch(tmp: Path) -> dict[str, str]:
    """An environment whose sbatch prints its arguments, one per line, and the file it submits."""
    return fake_command(tmp, "sbatch", 'printf "%s\\n" "$@"\necho "COURSE_SUBMIT_FILE=$COURSE_SUBMIT_FILE"\n')


def submitted_options(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["slurm/submit", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)


A_SITE = dict(SITE_PARTITION="gpu-a100", SITE_ACCOUNT="project_123", SITE_RESERVATION="workshop",
              SITE_TIME="00:30:00", SITE_MEM_PER_CPU="2G", SITE_CPUS_PER_GPU="6", SITE_GPUS_PER_NODE="4",
              SITE_SBATCH_OPTIONS="--qos=normal")
COMMON = ["--partition=gpu-a100", "--account=project_123", "--reservation=workshop", "--time=00:30:00",
          "--mem-per-cpu=2G"]


@pytest.mark.parametrize("name,shape", [
    ("train.sbatch", ["--cpus-per-task=6"]),                                    # 1 GPU per task
    ("sweep_steps.sbatch", ["--cpus-per-task=6"]),
    ("sweep_array.sbatch", ["--cpus-per-task=6"]),
    ("train_dp.sbatch", ["--gpus-per-task=4", "--cpus-per-task=24"]),           # all GPUs of a node, one task
    ("gpu_check.sbatch", ["--gpus-per-task=4", "--cpus-per-task=24"]),
    ("ddp_srun_1node.sbatch", ["--ntasks=4", "--gpus-per-node=4", "--cpus-per-task=6"]),  # a task per GPU
    ("ddp_srun_multinode.sbatch", ["--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6"]),
    ("ddp_torchrun_multinode.sbatch", ["--gpus-per-node=4", "--cpus-per-task=24"]),  # one torchrun per node
])
def test_site_settings_reach_every_file_and_the_command_line_wins(tmp_path, name, shape):
    done = submitted_options({**fake_sbatch(tmp_path), **A_SITE}, "--time=2:00:00", f"slurm/{name}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [*COMMON, *shape, "--qos=normal", "--time=2:00:00", f"slurm/{name}",
                                        f"COURSE_SUBMIT_FILE=slurm/{name}"]  # sbatch takes the last --time


def test_an_empty_site_file_leaves_every_file_as_it_is(tmp_path):
    env = {k: v for k, v in fake_sbatch(tmp_path).items() if not k.startswith("SITE_")}
    assert submitted_options(env, "slurm/train.sbatch").stdout.splitlines()[:-1] == ["slurm/train.sbatch"]


def test_a_site_that_forbids_requeue_submits_with_no_requeue(tmp_path):
    env = {**fake_sbatch(tmp_path), "SITE_REQUEUE": "resubmit"}
    assert "--no-requeue" in submitted_options(env, "slurm/train.sbatch").stdout.splitlines()


@pytest.mark.parametrize("args,settings,message", [
    (["slurm/train.sbatch"], {"SITE_REQUEUE": "sometimes"},
     "error: SITE_REQUEUE='sometimes' in {site}: use requeue or resubmit"),
    (["slurm/sweep.csv"], {}, "error: 'slurm/sweep.csv' is not a Slurm file of the course; "
                              "usage: slurm/submit [sbatch options] slurm/FILE.sbatch"),
    ([], {}, "usage: slurm/submit [sbatch options] slurm/FILE.sbatch"),
])
def test_submit_refuses_in_one_line(tmp_path, args, settings, message):
    done = submitted_options({**fake_sbatch(tmp_path), **settings}, *args)
    assert (done.returncode, done.stderr.strip()) == (2, message.format(site=ROOT / "slurm/site.sh"))
    assert done.stdout == ""


def test_only_torchruns_harmless_shutdown_warning_is_cut_from_a_jobs_output():
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: Broken pipe\nframe #7: c10d::TCPStore::doGet\n"
    warning = ("W1202 17:27:43.787000 25237 torch/distributed/elastic/rendezvous/dynamic_rendezvous.py:1298] The node "
               "'node3_25237_0' has failed to shutdown the rendezvous '116' due to an error of type "
               "RendezvousConnectionError.\n")
    after = "slurm/submit: sbatch --wait slurm/ddp_torchrun_multinode.sbatch\n"
    done = "epoch 3/3 ...\nsummary: epochs=3/3\n"
    assert without_harmless_warnings(f"{done}{trace}{warning}{after}") == f"{done}{after}"
    assert TRACEBACK.search(without_harmless_warnings(f"{trace}{done}{warning}{after}"))  # before the end: kept
    assert TRACEBACK.search(without_harmless_warnings(f"{done}{trace}{after}"))  # without the warning: kept
