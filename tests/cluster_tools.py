"""The course's local Slurm test cluster, as the tests use it (tests/slurm/cluster.sh starts it).

Jobs are submitted as the cluster's ordinary user (JOB_USER), never as root, into working
directories that user owns, with a site file made from slurm/site.sh by changing only its
values: what a centre does to adapt the course.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import ROOT, unavailable

JOB_USER = os.environ.get("COURSE_SLURM_USER", "learner")
GPU_PARTITION, CPU_PARTITION = "accel", "small"  # tests/slurm/slurm.conf.in
START_IT = "start it with `sudo make cluster-up` (tests/slurm/README.md)"
# What the test cluster's nodes need from every file: the GPU partition, and 1 core per GPU
# (its nodes have 2 cores and the files ask for 8 per GPU).
TEST_SITE = {"SITE_PARTITION": GPU_PARTITION, "SITE_CPUS_PER_GPU": "1", "SITE_MEM_PER_CPU": "1G",
             "SITE_TIME": "00:20:00"}


def cluster_problem() -> str | None:
    """Why the course's test cluster cannot run jobs here, or None."""
    if shutil.which("sinfo") is None:
        return f"no Slurm client here: {START_IT}"
    try:
        partitions = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 30 s: {START_IT}"
    if partitions.returncode != 0:
        return f"no Slurm cluster answers sinfo: {START_IT}"
    if {GPU_PARTITION, CPU_PARTITION} - set(partitions.stdout.split()):
        return f"the Slurm cluster here is not the course's test cluster (no partitions {GPU_PARTITION}, " \
               f"{CPU_PARTITION}): {START_IT}"
    try:
        pwd.getpwnam(JOB_USER)
    except KeyError:
        return f"no user {JOB_USER} to submit jobs as: {START_IT}"
    return None


def require_cluster() -> None:
    problem = cluster_problem()
    if problem:
        unavailable(problem)


def as_job_user(command: list[str], env: dict[str, str]) -> list[str]:
    """The command run as JOB_USER with exactly this environment (runuser when we are root)."""
    user = pwd.getpwnam(JOB_USER)
    env = {**env, "HOME": user.pw_dir, "USER": JOB_USER, "LOGNAME": JOB_USER}
    prefix = ["runuser", "-u", JOB_USER, "--"] if os.geteuid() == 0 else []
    return [*prefix, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]


class Workspace:
    """A directory JOB_USER owns (pytest's tmp_path is private to root), removed by close()."""

    def __init__(self, name: str):
        base = Path(tempfile.gettempdir()) / "course-slurm-tests"
        base.mkdir(mode=0o755, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
        self.path.chmod(0o755)
        if os.geteuid() == 0:
            user = pwd.getpwnam(JOB_USER)
            os.chown(self.path, user.pw_uid, user.pw_gid)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def site_file(directory: Path, **settings: str) -> Path:
    """slurm/site.sh with some values changed, as a centre edits it: SITE_X=${SITE_X-value}."""
    text = (ROOT / "slurm/site.sh").read_text()
    for name, value in {**TEST_SITE, **settings}.items():
        text, found = re.subn(rf"^{name}=\$\{{{name}-[^}}]*\}}", f"{name}=${{{name}-{value}}}", text, flags=re.M)
        assert found == 1, f"slurm/site.sh has no setting {name}"
    path = directory / "site.sh"
    path.write_text(text)
    path.chmod(0o644)
    return path


def job_env(**extra: str) -> dict[str, str]:
    """The submitting shell's environment: PATH and the course's variables, no SLURM_*, no CUDA."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    env.update(extra)
    return env


def slurm(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def job_state(job: str) -> str:
    done = slurm("scontrol", "show", "job", job)
    return next((w.split("=", 1)[1] for w in done.stdout.split() if w.startswith("JobState=")), "GONE")


def job_field(job: str, field: str) -> str | None:
    done = slurm("scontrol", "show", "job", job)
    return next((w.split("=", 1)[1] for w in done.stdout.split() if w.startswith(f"{field}=")), None)


def wait_until_gone(job: str, timeout: float) -> None:
    """Until Slurm forgets the job (MinJobAge=2 s after it ended)."""
    deadline = time.monotonic() + timeout
    while job_state(job) != "GONE":
        assert time.monotonic() < deadline, f"job {job} still {job_state(job)} after {timeout:.0f} s"
        time.sleep(1)
