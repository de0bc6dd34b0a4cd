"""The course's image (container/course.def, container/Dockerfile) and the one switch that runs
the Slurm files inside it (COURSE_CONTAINER: slurm/env.sh, slurm/container/run).

Apptainer is not installable on the test machines, so no image is built here: the definition
files are parsed (spython, the Singularity Python API's recipe parsers) and checked against
requirements.txt, and the wrapper runs with a stand-in `apptainer` (standin_apptainer) that
records its arguments and runs the inner command in the course's .venv, as the image would.
tests/test_slurm.py runs two of its jobs (train.sbatch with a node cache, the multi-node DDP
file) that way on the local Slurm cluster.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from spython.main.parse.parsers import DockerParser, SingularityParser

from conftest import ROOT

WRAPPERS = ROOT / "slurm" / "container" / "bin"
INSTALL = re.compile(r"\b(pip3?|python3? -m pip|conda|mamba|micromamba|apt-get|apt|uv)\b.*\binstall\b")


def recipe(parser, path: Path):
    """The one stage of a definition file, as spython reads it."""
    stages = parser(str(path)).recipe
    assert len(stages) == 1, f"{path.name}: one stage expected, got {list(stages)}"
    return next(iter(stages.values()))


def install_commands(lines: list[str]) -> list[str]:
    """The build's commands that install software, continuation lines joined, comments left out."""
    joined = "\n".join(line.strip() for line in lines if not line.strip().startswith("#")).replace("\\\n", " ")
    return [c.strip() for c in re.split(r"&&|;|\n", joined) if INSTALL.search(c)]


def test_the_definition_file_installs_exactly_the_pinned_requirements():
    """requirements.txt, copied in and installed, is the only thing installed (its pins are exact:
    tests/test_environment.py)."""
    stage = recipe(SingularityParser, ROOT / "container" / "course.def")
    assert re.match(r"^python:3\.11(\.\d+)?-slim$", stage.fromHeader), stage.fromHeader
    text = (ROOT / "container" / "course.def").read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.M)
    for section in ("%labels", "%help", "%files", "%post", "%environment", "%runscript"):
        assert re.search(rf"^{section}$", text, re.M), f"course.def has no {section}"
    # The course's requirements.txt, and only it, copied in and installed; nothing else.
    assert stage.files == ["requirements.txt /opt/course/requirements.txt"]
    assert install_commands(stage.install) == ["pip install --no-cache-dir -r /opt/course/requirements.txt"]
    assert any(re.match(r"python -m ipykernel install --prefix /usr/local --name hpc-dl-course ", line)
               for line in stage.install), "the course's kernel, for JupyterLab and the OnDemand app"
    assert stage.cmd == 'exec python "$@"'
    assert "PYTHONUNBUFFERED=1" in stage.environ


def test_the_dockerfile_installs_the_same_as_the_definition_file():
    docker = recipe(DockerParser, ROOT / "container" / "Dockerfile")
    apptainer = recipe(SingularityParser, ROOT / "container" / "course.def")
    assert docker.fromHeader == apptainer.fromHeader
    assert docker.files == [["requirements.txt", "/opt/course/requirements.txt"]]
    assert install_commands(docker.install) == install_commands(apptainer.install)
    assert "PYTHONUNBUFFERED=1" in docker.environ


# --- the wrapper, with a stand-in apptainer ---------------------------------------------------

def standin_apptainer(directory: Path, inside: Path = Path(sys.executable).parent) -> Path:
    """A stand-in for `apptainer` in directory/bin (tests only, never shipped): it appends its
    arguments, host, Slurm rank and PATH as one JSON line to directory/apptainer.jsonl, then
    runs the command after `exec [options] IMAGE` with the same environment, `inside` first on
    PATH: what the image holds (the course's .venv). Returns the log's path."""
    bin_dir, log = directory / "bin", directory / "apptainer.jsonl"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "apptainer"
    script.write_text(f"""#!{sys.executable}
import json, os, socket, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as log:
    log.write(json.dumps({{"argv": args, "host": socket.gethostname(), "rank": os.environ.get("SLURM_PROCID"),
                          "path": os.environ["PATH"]}}) + "\\n")
if args[:1] != ["exec"]:
    sys.exit("stand-in apptainer: only `exec` is known here")
i = 1
while args[i].startswith("-"):
    i += 2 if args[i] in ("--bind", "-B") else 1
os.environ["PATH"] = {str(inside)!r} + ":" + os.environ["PATH"]
os.execvp(args[i + 1], args[i + 1:])
""")
    script.chmod(0o755)
    bin_dir.chmod(0o755)
    return log


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def binds(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--bind"]


def inner(argv: list[str]) -> list[str]:
    """The command after `exec [options] IMAGE`, and the image first."""
    i = 1
    while argv[i].startswith("-"):
        i += 2 if argv[i] == "--bind" else 1
    return argv[i:]


def wrapper_env(tmp_path: Path, with_apptainer: bool = True, **extra: str) -> dict[str, str]:
    path = os.environ["PATH"]
    if with_apptainer:
        standin_apptainer(tmp_path)
        path = f"{tmp_path / 'bin'}:{path}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COURSE_", "APPTAINER"))}
    return {**env, "PATH": f"{WRAPPERS}:{path}", "OMP_NUM_THREADS": "1", **extra}


def image(tmp_path: Path) -> Path:
    path = tmp_path / "course.sif"
    path.write_bytes(b"not a real image: the stand-in apptainer never reads it")
    return path


def test_python_runs_inside_the_image_with_the_binds_and_without_the_wrapper_on_path(tmp_path):
    sif, data = image(tmp_path), tmp_path / "data"
    data.mkdir()
    env = wrapper_env(tmp_path, COURSE_CONTAINER=str(sif),
                      COURSE_CONTAINER_BINDS=f"{ROOT}:{data}:not-made-{tmp_path.name}:{tmp_path}/cache/new:{data}")
    done = subprocess.run(["python", "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent == Path(sys.executable).parent, "the stand-in's 'image': the .venv"
    [record] = records(tmp_path / "apptainer.jsonl")
    assert record["argv"][0] == "exec" and inner(record["argv"]) == [str(sif), "python", "-c",
                                                                      "import sys; print(sys.executable)"]
    # Relative binds are made absolute, duplicates dropped, and a directory that does not exist
    # yet is bound through its nearest existing parent, not made here (not-made-…: the course's root).
    assert binds(record["argv"]) == [str(ROOT), str(data), str(tmp_path)]
    assert not (tmp_path / "cache").exists()
    assert "--nv" not in record["argv"] and "--rocm" not in record["argv"], "no GPU driver on this machine"
    assert str(WRAPPERS) not in record["path"].split(":"), "inside, python must not be the wrapper again"


def test_the_gpu_option_can_be_chosen(tmp_path):
    sif = image(tmp_path)
    # Every link is the same script (test_the_site_file_names_the_switch_empty): cheap commands,
    # not `torchrun --help`, which imports torch (5 to 15 s on 2 busy cores).
    commands = {"nv": ["python", "-c", "pass"], "rocm": ["python3", "-c", "pass"], "none": ["jupyter", "--paths"]}
    for choice, command in commands.items():
        env = wrapper_env(tmp_path, COURSE_CONTAINER=str(sif), COURSE_CONTAINER_GPU=choice)
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
    found = [(r["argv"][1], inner(r["argv"])[1]) for r in records(tmp_path / "apptainer.jsonl")]
    assert found == [("--nv", "python"), ("--rocm", "python3"), ("--bind", "jupyter")]


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip()


def test_the_wrapper_refuses_in_one_line_before_anything_runs(tmp_path):
    sif, missing = image(tmp_path), tmp_path / "missing.sif"
    cases = [
        (dict(COURSE_CONTAINER=str(missing)), True,
         f"error: COURSE_CONTAINER: no image file '{missing}' (docs/containers.md says how to build it)"),
        (dict(COURSE_CONTAINER=""), True,
         "error: COURSE_CONTAINER is empty: slurm/container/bin/python runs python inside the course's image, "
         "which COURSE_CONTAINER names (slurm/site.sh)"),
        (dict(COURSE_CONTAINER=str(sif), COURSE_CONTAINER_GPU="cuda"), True,
         "error: COURSE_CONTAINER_GPU='cuda': use auto, nv, rocm or none"),
    ]
    for settings, with_apptainer, message in cases:
        env = wrapper_env(tmp_path, with_apptainer, **settings)
        done = subprocess.run(["python", "-c", "print('ran')"], capture_output=True, text=True, env=env, timeout=60)
        assert (one_line_error(done), done.stdout) == (message, "")
    assert records(tmp_path / "apptainer.jsonl") == []


def test_without_apptainer_the_wrapper_says_so(tmp_path):
    env = wrapper_env(tmp_path, False, COURSE_CONTAINER=str(image(tmp_path)))
    env["PATH"] = f"{WRAPPERS}:/usr/bin:/bin"  # no apptainer or singularity there
    if any(Path(d, name).exists() for d in ("/usr/bin", "/bin") for name in ("apptainer", "singularity")):
        return  # a machine that has it: nothing to check here
    done = subprocess.run(["python", "-c", "print('ran')"], capture_output=True, text=True, env=env, timeout=60)
    assert one_line_error(done) == ("error: COURSE_CONTAINER is set, but there is no apptainer (or singularity) "
                                    "command here: load its module first (docs/containers.md)")


# --- the switch: slurm/site.sh -> slurm/env.sh, slurm/submit ------------------------------------

def env_sh(tmp_path: Path, script: str, **settings: str) -> subprocess.CompletedProcess:
    env = wrapper_env(tmp_path, **settings)
    env["PATH"] = env["PATH"].split(":", 1)[1]  # the wrappers are on PATH only through env.sh
    return subprocess.run(["bash", "-c", f"source slurm/env.sh; {script}"], capture_output=True, text=True,
                          env={**env, "RUNS": str(tmp_path / "runs")}, cwd=ROOT, timeout=60)


def test_env_sh_puts_the_wrappers_first_on_path_and_names_what_to_bind(tmp_path):
    done = env_sh(tmp_path, 'command -v python; command -v torchrun; echo "$COURSE_CONTAINER_BINDS"',
                  COURSE_CONTAINER=str(image(tmp_path)), BIRDS_DATA=str(tmp_path / "birds"),
                  SITE_NODE_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(WRAPPERS / "python"), str(WRAPPERS / "torchrun"),
                                        f"{ROOT}:{tmp_path / 'birds'}:{tmp_path / 'runs'}:{tmp_path}:"
                                        f"{tmp_path / 'cache'}"]


def test_env_sh_refuses_a_missing_image_before_anything_runs(tmp_path):
    missing = tmp_path / "course.sif"
    done = env_sh(tmp_path, "echo ran", COURSE_CONTAINER=str(missing))
    assert (one_line_error(done), done.stdout) == (
        f"error: COURSE_CONTAINER: no image file '{missing}' (docs/containers.md says how to build it)", "")
    assert not (tmp_path / "runs").exists()


def test_submit_refuses_a_missing_image_before_sbatch(tmp_path):
    fake = tmp_path / "fake" / "sbatch"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\necho submitted\n")
    fake.chmod(0o755)
    missing = tmp_path / "course.sif"
    env = {**wrapper_env(tmp_path), "COURSE_CONTAINER": str(missing), "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    done = subprocess.run(["slurm/submit", "slurm/train.sbatch"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=30)
    assert (one_line_error(done), done.stdout) == (
        f"error: COURSE_CONTAINER: no image file '{missing}' (docs/containers.md says how to build it)", "")
    image(tmp_path)
    assert subprocess.run(["slurm/submit", "slurm/train.sbatch"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=30).stdout == "submitted\n"


def test_the_site_file_names_the_switch_empty():
    assert re.search(r"^COURSE_CONTAINER=\$\{COURSE_CONTAINER-\}$", (ROOT / "slurm/site.sh").read_text(), re.M)
    assert sorted(p.name for p in WRAPPERS.iterdir()) == ["jupyter", "python", "python3", "torchrun"]
    assert all(os.readlink(p) == "../run" for p in WRAPPERS.iterdir())
