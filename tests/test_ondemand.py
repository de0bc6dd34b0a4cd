"""The Open OnDemand app in ondemand/: its templates render, ask Slurm for what the form
asked for, and start the course's JupyterLab as a real job on the local Slurm cluster.

OnDemand itself is not needed: Ruby's ERB renders the templates with stand-ins for the
dashboard's context, and a wrapper does what OnDemand's "basic" batch-connect script does
(helpers, `host`, source before.sh, fork script.sh, write connection.yml).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from cluster_tools import (CPU_PARTITION, GPU_PARTITION, JOB_USER, Workspace, as_job_user, cluster_problem, job_env,
                           job_state, slurm)
from conftest import ROOT, unavailable

sys.path.insert(0, str(ROOT / "slurm"))
import preflight  # noqa: E402  (renders the app as the pre-flight check does)

APP = ROOT / "ondemand"
APT_RUBY = "apt-get update && apt-get install -y --no-install-recommends ruby"

# Form choices as the browser sends them (strings); unset fields keep form.yml's defaults.
CHOICES = {
    "defaults": {},
    "gpu-4x8": {"partition": "gpu", "num_gpus": "4", "cpus_per_gpu": "8", "num_hours": "12", "account": "proj_42"},
    "cpu-only": {"partition": "cpu", "num_gpus": "0", "cpus_per_gpu": "3", "num_hours": "1", "account": " "},
    "container": {"course_container": "/project/hpc-dl-course/course.sif"},
}

# Stand-ins for the bash helpers OnDemand defines in its job script (ood_core's
# batch_connect template), with /dev/tcp instead of nc, which the nodes may lack.
OOD_WRAPPER = r"""#!/usr/bin/env bash
port_used() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
find_port() {
  local port
  while port=$(shuf -i "${2:-2000}-${3:-65535}" -n 1) && port_used "${1:-localhost}" "$port"; do :; done
  echo "$port"
}
create_passwd() { tr -cd '[:alnum:]' </dev/urandom | head -c "${1:-32}"; }
export -f port_used find_port create_passwd
cd "@WORK_DIR@"  # OnDemand cds into the session directory it staged
host=$(hostname)
[[ -e before.sh ]] && source before.sh
./script.sh &
SCRIPT_PID=$!
(umask 077; printf 'host: %s\nport: %s\npassword: %s\n' "$host" "$port" "$password" >connection.yml)
wait "$SCRIPT_PID"
"""


def form_attrs(choice: dict) -> dict[str, str]:
    """form.yml's values (a select's first option by default) overlaid with the choice."""
    attrs = preflight.form_defaults(APP)
    assert set(choice) <= set(attrs), "a choice names a field the form lacks"
    return {**attrs, **choice}


def render(choice: dict, work_dir: Path, conn: dict | None = None) -> dict[str, str]:
    """The app's templates as the dashboard renders them (slurm/preflight.py renders them too)."""
    if not shutil.which("ruby"):
        unavailable(f"no Ruby to render the ERB templates ({APT_RUBY})")
    return preflight.render_app(APP, form_attrs(choice), work_dir, conn)


def native(rendered: dict) -> dict[str, str]:
    submit = yaml.safe_load(rendered["submit.yml.erb"])
    assert submit["batch_connect"]["template"] == "basic"
    return preflight.submit_options(rendered)


def test_manifest_and_form_follow_ondemand_conventions():
    manifest = yaml.safe_load((APP / "manifest.yml").read_text())
    form = yaml.safe_load((APP / "form.yml").read_text())
    assert manifest["role"] == "batch_connect" and manifest["name"]
    assert form["cluster"] and set(form["form"]) == set(form["attributes"])
    assert os.access(APP / "template/script.sh.erb", os.X_OK), "OnDemand runs ./script.sh"


@pytest.mark.parametrize("name", CHOICES)
def test_every_template_renders(name, tmp_path):
    rendered = render(CHOICES[name], tmp_path)
    for sh in ("template/before.sh.erb", "template/script.sh.erb"):
        check = subprocess.run(["bash", "-n"], input=rendered[sh], capture_output=True, text=True)
        assert check.returncode == 0, f"{sh}: {check.stderr}"
    attrs, script = form_attrs(CHOICES[name]), rendered["template/script.sh.erb"]
    if attrs["course_container"]:  # the image instead of the activation line
        assert f'\nexport COURSE_CONTAINER="{attrs["course_container"]}"\n' in script
        assert f"\n{attrs['env_activate']}\n" not in script
    else:
        assert f"\n{attrs['env_activate']}\n" in script and "COURSE_CONTAINER" not in script
    assert "/node/node1/8888/lab/tree/notebooks?token=secret" in rendered["view.html.erb"]


@pytest.mark.parametrize("name", CHOICES)
def test_submission_asks_slurm_for_what_the_form_asked(name, tmp_path):
    attrs = form_attrs(CHOICES[name])
    gpus, per_gpu, hours = int(attrs["num_gpus"]), int(attrs["cpus_per_gpu"]), int(attrs["num_hours"])
    expected = {"--nodes": "1", "--ntasks": "1", "--cpus-per-task": str(max(gpus, 1) * per_gpu),
                "--time": f"{hours:02d}:00:00", "--partition": attrs["partition"]}
    if attrs["account"].strip():
        expected["--account"] = attrs["account"]
    if gpus:
        expected["--gpus-per-node"] = str(gpus)
    assert native(render(CHOICES[name], tmp_path)) == expected


def test_cpu_only_choice_requests_no_gpu(tmp_path):
    opts = native(render(CHOICES["cpu-only"], tmp_path))
    assert opts["--partition"] == "cpu" and opts["--cpus-per-task"] == "3"
    assert not any(opt.startswith("--gpu") for opt in opts)


def partition_limits() -> dict[str, dict[str, object]]:
    """Each partition option of form.yml -> its dynamic-form directives, e.g. {'data-max-num-gpus': 4}."""
    options = yaml.safe_load((APP / "form.yml").read_text())["attributes"]["partition"]["options"]
    return {option[1]: {k: v for pair in option[2:] for k, v in pair.items()} for option in options}


def test_the_form_limits_gpus_per_partition_with_ondemands_directives():
    """data-max-<field> caps a number field for the chosen option, data-set-<field> sets it,
    data-hide-<field> hides it (OnDemand's dynamic forms; field names with dashes)."""
    form = yaml.safe_load((APP / "form.yml").read_text())
    fields = {name.replace("_", "-") for name in form["form"]}
    limits = partition_limits()
    for partition, directives in limits.items():
        assert "data-max-num-gpus" in directives, f"{partition}: no GPU limit"
        for key in directives:
            assert re.fullmatch(r"data-(min|max|set|hide)-(.+)", key) and key.split("-", 2)[2] in fields, key
    no_gpus = [p for p, d in limits.items() if d["data-max-num-gpus"] == 0]
    assert no_gpus and all(limits[p].get("data-set-num-gpus") == 0 and limits[p].get("data-hide-num-gpus")
                           for p in no_gpus)
    assert max(d["data-max-num-gpus"] for d in limits.values()) == form["attributes"]["num_gpus"]["max"]


def test_what_the_form_allows_the_cluster_accepts_and_what_it_forbids_the_cluster_refuses(tmp_path):
    """form.yml's partitions with the test cluster's names, as a centre edits them; sbatch
    --test-only as the cluster's user. 1 CPU per GPU: the test nodes have 2 cores."""
    problem = cluster_problem()
    if problem:
        unavailable(problem)
    names = {"gpu": GPU_PARTITION, "cpu": CPU_PARTITION}
    for partition, directives in partition_limits().items():
        lowest = directives.get("data-min-num-gpus", directives.get("data-set-num-gpus", 0))
        allowed = native(render({"partition": names[partition], "num_gpus": str(lowest), "cpus_per_gpu": "1"},
                                tmp_path))
        done = slurm(*as_job_user(["sbatch", "--test-only", *(f"{k}={v}" for k, v in allowed.items()),
                                   "--wrap=true"], job_env()))
        assert done.returncode == 0, f"{partition} with {lowest} GPUs: {done.stderr}"
        if directives["data-max-num-gpus"] == 0:  # what the form forbids there
            forbidden = native(render({"partition": names[partition], "num_gpus": "1", "cpus_per_gpu": "1"},
                                      tmp_path))
            done = slurm(*as_job_user(["sbatch", "--test-only", *(f"{k}={v}" for k, v in forbidden.items()),
                                       "--wrap=true"], job_env()))
            assert done.returncode != 0, f"the cluster accepts GPUs on {partition}"


def get(url: str, token: str | None, data: dict | None = None, timeout: float = 5):
    """GET (POST with data) without any proxy from the environment: traffic stays on 127.0.0.x."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Authorization": f"token {token}"} if token else {}
    body = json.dumps(data).encode() if data is not None else None
    with opener.open(urllib.request.Request(url, body, headers), timeout=timeout) as response:
        return response.status, response.read().decode()


async def run_cell(url: str, code: str, timeout: float = 20) -> str:
    """Execute code over the kernel's websocket (Jupyter's JSON protocol); return its stdout."""
    from tornado.websocket import websocket_connect

    ws = await asyncio.wait_for(websocket_connect(url), timeout)
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex,
              "username": "test", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {},
               "allow_stdin": False}
    ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                                 "content": content, "channel": "shell", "buffers": []}))
    out = ""
    try:
        while True:
            raw = await asyncio.wait_for(ws.read_message(), timeout)
            assert raw is not None, "the kernel's websocket closed"
            msg = json.loads(raw)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
    finally:
        ws.close()


def pids_with(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def job_log(job: str, log: Path) -> str:
    return log.read_text() if log.exists() else f"(no output yet; job {job} is {job_state(job)})"


@pytest.fixture
def session_dir():
    """OnDemand's session directory, owned by the user the job runs as."""
    ws = Workspace("ondemand")
    yield ws.path
    ws.close()


def test_jupyterlab_runs_as_a_slurm_job_with_the_course_kernel(session_dir):
    problem = cluster_problem()
    if problem:
        unavailable(problem)
    tmp_path, venv = session_dir, ROOT / ".venv"
    choice = {"partition": GPU_PARTITION, "num_gpus": "1", "cpus_per_gpu": "2", "num_hours": "1",
              "course_dir": str(ROOT), "env_activate": f"source {venv}/bin/activate"}
    rendered = render(choice, tmp_path)
    for name in ("before.sh", "script.sh"):
        (tmp_path / name).write_text(rendered[f"template/{name}.erb"])
    (tmp_path / "script.sh").chmod(0o755)
    (tmp_path / "job.sh").write_text(OOD_WRAPPER.replace("@WORK_DIR@", str(tmp_path)))
    options = [f"{k}={v}" for k, v in native(rendered).items()]
    submitted = slurm(*as_job_user(["sbatch", "--parsable", "--job-name=ondemand-test", f"--chdir={tmp_path}",
                                    f"--output={tmp_path}/output.log", *options, str(tmp_path / "job.sh")],
                                   job_env()))
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    log = tmp_path / "output.log"
    try:
        deadline = time.monotonic() + 45
        conn_file = tmp_path / "connection.yml"
        status = None
        while time.monotonic() < deadline and status is None:
            time.sleep(0.5)
            assert job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), job_log(job, log)
            if not conn_file.exists():
                continue
            conn = yaml.safe_load(conn_file.read_text())
            addr = socket.gethostbyname(conn["host"])
            base = f"http://{addr}:{conn['port']}/node/{conn['host']}/{conn['port']}"
            try:
                status, _ = get(f"{base}/api/status", conn["password"])
            except OSError:
                pass
        assert status == 200, f"JupyterLab did not answer in 45 s:\n{job_log(job, log)}"
        assert addr.startswith("127.0.0.") and conn["host"] in ("node1", "node2", "node3")
        assert conn_file.owner() == JOB_USER, "the session runs as the user who asked for it"

        _, body = get(f"{base}/api/kernelspecs", conn["password"])
        specs = json.loads(body)
        course = specs["kernelspecs"]["hpc-dl-course"]["spec"]
        kernel_bin = Path(course["argv"][0]).parent.resolve()
        assert kernel_bin == (venv / "bin").resolve(), "the kernel must run the course's env"
        assert specs["default"] == "hpc-dl-course" and "python3" in specs["kernelspecs"]
        # A cell runs in the course kernel, through the websocket a browser would use.
        new = {"name": "hpc-dl-course", "path": "notebooks"}
        kernel = json.loads(get(f"{base}/api/kernels", conn["password"], new)[1])["id"]
        ws = f"ws{base[4:]}/api/kernels/{kernel}/channels?token={conn['password']}"
        code = "import os, sys; print(sys.prefix, os.getcwd(), os.environ['CUDA_VISIBLE_DEVICES'])"
        output = asyncio.run(run_cell(ws, code))
        # The kernel is the course's env, starts in notebooks/ and sees the job's one GPU
        # (a fake one: its index depends on what other jobs hold).
        prefix, cwd, gpu = output.split()
        assert (Path(prefix).resolve(), cwd) == (venv.resolve(), str(ROOT / "notebooks")) and gpu in "0 1 2 3".split()
        _, body = get(f"{base}/api/contents/notebooks", conn["password"])
        assert "train.ipynb" in {item["name"] for item in json.loads(body)["content"]}
        # The view's "Connect" link, as the proxy forwards it (same path), logs in by its token.
        link = render(choice, tmp_path, conn)["view.html.erb"].split('href="')[1].split('"')[0]
        status, page = get(f"http://{addr}:{conn['port']}{link}", None)
        assert status == 200 and "JupyterLab" in page
        assert f"CUDA_VISIBLE_DEVICES={gpu}," in log.read_text(), "the job's and kernel's GPU differ"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    deadline, ended = time.monotonic() + 20, ("CANCELLED", "COMPLETED", "FAILED", "GONE")
    while job_state(job) not in ended and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_state(job) in ended
    while time.monotonic() < deadline:  # JupyterLab goes with the job
        try:
            socket.create_connection((addr, conn["port"]), timeout=1).close()
        except OSError:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"JupyterLab still answers on {addr}:{conn['port']} after scancel")
    while pids_with(f"kernel-{kernel}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pids_with(f"kernel-{kernel}"), "the kernel outlived its job"


def test_default_conda_activation_works_in_a_batch_shell(tmp_path):
    """`conda activate` fails in a batch shell without conda's hook; the script loads it."""
    script = render({}, tmp_path)["template/script.sh.erb"]
    block = script.split("# >>> course environment")[1].split("\n", 1)[1].split("# <<< course")[0]
    fake = tmp_path / "bin" / "conda"  # a conda whose hook defines the `conda` function
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho \'conda() { echo "hooked conda $*"; }\'\n')
    fake.chmod(0o755)
    done = subprocess.run(["bash", "-c", block], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert done.stdout == "hooked conda activate hpc-dl-course\n", done.stderr


def test_with_a_container_image_jupyterlab_and_its_kernel_run_inside_it(tmp_path):
    """The form's 'Container image': script.sh runs python and jupyter through the course's
    wrappers (slurm/container/bin), here with a stand-in apptainer whose image holds the
    course's .venv and a `jupyter` that only says how it was called; without the image file,
    one line and exit 1 before anything runs."""
    from test_container import binds, inner, records, standin_apptainer
    inside = tmp_path / "image-bin"  # the image: the .venv's python, and a jupyter that says how it ran
    inside.mkdir()
    (inside / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a venv's python: not a link
    (inside / "python").chmod(0o755)
    (inside / "jupyter").write_text('#!/bin/sh\necho "jupyter $*"\n')
    (inside / "jupyter").chmod(0o755)
    log, sif, session = standin_apptainer(tmp_path, inside), tmp_path / "course.sif", tmp_path / "session"
    session.mkdir()
    script = session / "script.sh"
    script.write_text(render({"course_container": str(sif)}, session)["template/script.sh.erb"])
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "COURSE_DIR": str(ROOT),
           "CONFIG_FILE": str(session / "jupyter_config.py")}
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=session, timeout=60)
    assert (missing.returncode, missing.stderr) == (1, f"ERROR: no image file {sif}: check the form's 'Container "
                                                       "image'.\n") and records(log) == []
    sif.write_bytes(b"stand-in image")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=session, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"jupyter lab --config={session / 'jupyter_config.py'}"
    calls = records(log)
    assert [inner(c["argv"])[1:3] for c in calls] == [["python", "-c"], ["python", "-m"], ["jupyter", "lab"]]
    assert all(inner(c["argv"])[0] == str(sif) and binds(c["argv"]) == [str(ROOT), str(session)] for c in calls)
    kernel = json.loads((session / "jupyter/share/jupyter/kernels/hpc-dl-course/kernel.json").read_text())
    assert kernel["display_name"] == "HPC DL course" and kernel["argv"][0] == sys.executable
