#!/usr/bin/env python3
"""Pre-flight for the workshop, on the centre's cluster: is everything the learners need there?

    make preflight                                # on a login node, in the course's environment
    python slurm/preflight.py --only gpu          # the GPU check, on a GPU node, e.g. under srun
    python slurm/preflight.py --data /project/birds --weights /project/torch/hub/checkpoints/resnet152-f82ba261.pth

One line per check, `ok|FAIL|skip NAME: detail`, and exit status 1 when a check FAILs:

  partition  slurm/site.sh's SITE_PARTITION (else the default) exists, is up and has GPUs (sinfo)
  sbatch     every slurm/*.sbatch as slurm/submit sends it, site settings and GPU request
             included, is accepted by `sbatch --test-only` (one line per file)
  gpu        torch sees GPUs here and has kernels for their architecture (a login node has
             none: skip, naming the srun line that runs this check on a GPU node)
  weights    the ImageNet weights file exists and the learners can read it (others: r on the
             file, x on every folder above it)
  data       the dataset's splits exist and the learners can read them (r and x on every folder,
             r on one file of each folder)
  ondemand   the OnDemand app's templates render with the form's defaults (Ruby's ERB, as the
             dashboard does) and Slurm accepts what its submit.yml asks for (sbatch --test-only)

Readable by "others" because the learners' accounts are the others of whoever staged the
files; a centre that shares through a project group checks with its own eyes (`ls -l`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from data import SPLITS, UserError, run_cli  # noqa: E402  (data imports no torch: fast on a login node)

CHECKS = ("partition", "sbatch", "gpu", "weights", "data", "ondemand")
SITE_VARIABLES = ("SITE_PARTITION", "SITE_ACCOUNT", "SITE_RESERVATION", "SITE_TIME", "SITE_GPUS_PER_NODE")
APP_TEMPLATES = ("submit.yml.erb", "view.html.erb", "template/before.sh.erb", "template/script.sh.erb")

# Renders the app as the dashboard does (ERB, trim_mode "-"): submit.yml.erb sees the form
# attributes as bare methods, template/*.erb as `context.<attr>`, view.html.erb sees the
# connection's host/port/password. A Struct makes a misspelt attribute an error.
RENDER_RB = r"""
require "erb"; require "json"
req = JSON.parse($stdin.read)
attrs = req["attrs"]
context = Struct.new(*attrs.keys.map(&:to_sym), keyword_init: true).new(**attrs.transform_keys(&:to_sym))
session = Struct.new(:id, :staged_root).new("test-session", req["work_dir"])
render = ->(name, b) { ERB.new(File.read(File.join(req["app"], name)), trim_mode: "-").result(b) }
out = {}
req["files"].each do |name|
  b = case name
      when "submit.yml.erb" then context.instance_eval { binding }
      when "view.html.erb"
        host, port, password = req["conn"].values_at("host", "port", "password"); binding
      else binding
      end
  out[name] = render.(name, b)
end
puts JSON.generate(out)
"""


class Check(Exception):
    """The end of a check: its status (ok, FAIL, skip) and one line of detail."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def ok(detail: str):
    raise Check("ok", detail)


def fail(detail: str):
    raise Check("FAIL", detail)


def skip(detail: str):
    raise Check("skip", detail)


def run(command: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def site_settings(site: Path) -> dict[str, str]:
    """slurm/site.sh's values (with the shell's own SITE_* overrides), as slurm/submit reads them."""
    script = 'source "$1" >/dev/null && printf "%s\\0" ' + " ".join(f'"${{{v}-}}"' for v in SITE_VARIABLES)
    done = run(["bash", "-c", script, "site", str(site)], timeout=30)
    if done.returncode:
        raise UserError(f"{site} did not load in bash: {last_line(done.stderr)}")
    return dict(zip(SITE_VARIABLES, done.stdout.split("\0")))


# --- the checks -------------------------------------------------------------------------------

def check_partition(site: dict) -> None:
    if not shutil.which("sinfo"):
        skip("no sinfo here: run the preflight on the cluster's login node")
    wanted = site["SITE_PARTITION"]
    rows: dict[str, tuple[str, int, set]] = {}  # partition -> (available, nodes, gres); sinfo may split one in rows
    for line in run(["sinfo", "-h", "-o", "%P|%a|%D|%G"]).stdout.split():
        partition, available, nodes, gres = line.split("|")
        _, counted, kinds = rows.get(partition, (available, 0, set()))
        rows[partition] = (available, counted + int(nodes), kinds | {gres})
    name = wanted or next((p for p in rows if p.endswith("*")), "")
    row = rows.get(name) or rows.get(name + "*")
    if not row:
        names = ", ".join(sorted(p.rstrip("*") for p in rows)) or "none"
        fail(f"no partition '{wanted or '(default)'}' (sinfo lists: {names}): set SITE_PARTITION in slurm/site.sh")
    available, nodes, kinds = row
    gres = ",".join(sorted(kinds))
    label = name.rstrip("*") + ("" if wanted else " (the default)")
    if available != "up":
        fail(f"partition {label} is {available}: ask the centre to open it, or choose another")
    if "gpu" not in gres:
        fail(f"partition {label} has no GPUs (gres {gres}): set SITE_PARTITION to a GPU partition")
    ok(f"{label}: up, {nodes} nodes, gres {gres}")


def check_sbatch(file: Path, site_file: Path) -> None:
    if not shutil.which("sbatch"):
        skip("no sbatch here: run the preflight on the cluster's login node")
    done = run([str(ROOT / "slurm" / "submit"), "--test-only", str(file.relative_to(ROOT))], cwd=ROOT,
               env={**os.environ, "COURSE_SITE": str(site_file)})
    said = [line for line in done.stderr.splitlines() if not line.startswith("slurm/submit:")]
    if done.returncode:
        fail(f"refused: {last_line(chr(10).join(said))} (slurm/site.sh's settings, or the file's #SBATCH lines)")
    ok(last_line("\n".join(said)).removeprefix("sbatch: "))


def check_gpu(site: dict) -> None:
    try:
        import torch
    except ImportError:
        fail(f"no torch in {sys.executable}: activate the course's environment first (COURSE_ENV_ACTIVATE in slurm/site.sh)")
    count = torch.cuda.device_count()
    if not count:
        request = " ".join(f"--{o}={v}" for o, v in (("partition", site["SITE_PARTITION"]), ("account", site["SITE_ACCOUNT"]),
                                                     ("reservation", site["SITE_RESERVATION"])) if v)
        skip(f"no GPU visible on {socket.gethostname()} (a login node?): on a GPU node run "
             f"srun {request + ' ' if request else ''}--gpus-per-node=1 --time=00:10:00 python slurm/preflight.py --only gpu")
    if torch.version.hip:
        ok(f"{count} GPU(s), {torch.cuda.get_device_name(0)}; a ROCm build ({torch.version.hip}): architectures not checked")
    import train  # its kernel check: the one every training start runs
    for index in range(count):
        try:
            train.check_gpu_kernels(index)
        except UserError as error:
            fail(str(error))
    major, minor = torch.cuda.get_device_capability(0)
    ok(f"{count} x {torch.cuda.get_device_name(0)} (sm_{major}{minor}); torch {torch.__version__} has kernels for "
       f"{' '.join(torch.cuda.get_arch_list())}")


def others_can(path: Path, bits: int) -> bool:
    return path.stat().st_mode & bits == bits


def blocked_folder_above(path: Path) -> Path | None:
    """The first folder above `path` that others cannot enter (no o+x), if any."""
    for folder in reversed(path.resolve().parents):
        if not others_can(folder, stat.S_IXOTH):
            return folder
    return None


def check_weights(weights: Path) -> None:
    if not weights.is_file():
        fail(f"no file {weights}: on the login node run python scripts/model.py fetch-weights --arch resnet152 "
             "with the TORCH_HOME the jobs use")
    if blocked := blocked_folder_above(weights):
        fail(f"learners cannot reach {weights}: chmod o+x {blocked}")
    if not others_can(weights, stat.S_IROTH):
        fail(f"learners cannot read {weights}: chmod o+r {weights}")
    ok(f"{weights} ({weights.stat().st_size / 1e6:.0f} MB), readable by others")


def check_data(root: Path) -> None:
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        fail(f"{root} has no {', '.join(missing)}/: download and verify it on the login node "
             f"(python scripts/data.py download {root}; python scripts/data.py verify {root})")
    if blocked := blocked_folder_above(root):
        fail(f"learners cannot reach {root}: chmod o+x {blocked}")
    folders = files = 0
    for folder, subfolders, names in os.walk(root):
        folder = Path(folder)
        if not others_can(folder, stat.S_IROTH | stat.S_IXOTH):
            fail(f"learners cannot list {folder}: chmod -R o+rX {root}")
        folders += 1
        if names:  # one file per folder: a full walk of 90 000 images is slow on a parallel filesystem
            files += 1
            if not others_can(folder / names[0], stat.S_IROTH):
                fail(f"learners cannot read {folder / names[0]}: chmod -R o+rX {root}")
    ok(f"{root}: {', '.join(SPLITS)} present; {folders} folders and one file of each of {files} readable by others")


def form_defaults(app: Path) -> dict[str, str]:
    """form.yml's values: a field's `value`, or a select's first option."""
    import yaml
    form = yaml.safe_load((app / "form.yml").read_text())
    return {name: str(spec["value"] if "value" in spec else spec["options"][0][1])
            for name, spec in ((n, form["attributes"][n]) for n in form["form"])}


def render_app(app: Path, attrs: dict, work_dir: Path, conn: dict | None = None) -> dict[str, str]:
    """Every template of the OnDemand app rendered by Ruby's ERB; raises UserError when one fails."""
    request = {"app": str(app), "attrs": attrs, "files": list(APP_TEMPLATES), "work_dir": str(work_dir),
               "conn": conn or {"host": "node1", "port": 8888, "password": "secret"}}
    done = run(["ruby", "-e", RENDER_RB], input=json.dumps(request), timeout=30)
    if done.returncode:
        raise UserError(f"the app in {app} does not render: {last_line(done.stderr)}")
    return json.loads(done.stdout)


def submit_options(rendered: dict) -> dict[str, str]:
    """The sbatch options submit.yml.erb asks for (script.native), as {option: value}."""
    import yaml
    submit = yaml.safe_load(rendered["submit.yml.erb"])
    return dict(option.split("=", 1) for option in submit["script"]["native"])


def check_ondemand(app: Path) -> None:
    if not (app / "form.yml").is_file():
        fail(f"no OnDemand app in {app} (form.yml): copy ondemand/ there, as ondemand/README.md says")
    if not shutil.which("ruby"):
        skip("no ruby here to render the app's ERB templates as OnDemand does (apt-get install ruby)")
    with tempfile.TemporaryDirectory() as work:
        try:
            options = submit_options(render_app(app, form_defaults(app), Path(work)))
        except UserError as error:
            fail(str(error))
    asked = " ".join(f"{k}={v}" for k, v in options.items())
    if shutil.which("sbatch"):
        done = run(["sbatch", "--test-only", *(f"{k}={v}" for k, v in options.items()), "--wrap=true"])
        if done.returncode:
            fail(f"renders, but Slurm refuses {asked}: {last_line(done.stderr)} (edit the app's form.yml)")
    ok(f"{app} renders with the form's defaults; Slurm {'accepts' if shutil.which('sbatch') else 'not asked about'} {asked}")


# --- running them ----------------------------------------------------------------------------

def checks(args, site: dict) -> list[tuple[str, object]]:
    """(name, the check) in order; sbatch has one per Slurm file."""
    site_file = Path(os.environ.get("COURSE_SITE", ROOT / "slurm" / "site.sh")).resolve()
    planned = {
        "partition": [("partition", lambda: check_partition(site))],
        "sbatch": [(f"sbatch {f.name}", lambda f=f: check_sbatch(f, site_file)) for f in sorted((ROOT / "slurm").glob("*.sbatch"))],
        "gpu": [("gpu", lambda: check_gpu(site))],
        "weights": [("weights", lambda: check_weights(args.weights or default_weights()))],
        "data": [("data", lambda: check_data(args.data))],
        "ondemand": [("ondemand", lambda: check_ondemand(args.ondemand))],
    }
    return [pair for name in CHECKS if name in (args.only or CHECKS) for pair in planned[name]]


def default_weights() -> Path:
    from model import cached_weights_path
    return cached_weights_path("resnet152")


def run_checks(planned: list, out=print) -> int:
    """Run each check, print its line; 1 when any FAILed."""
    failed = False
    for name, check in planned:
        try:
            check()
            status, detail = "FAIL", "the check ended without a verdict"
        except Check as verdict:
            status, detail = verdict.status, verdict.detail
        except Exception as error:  # a check that breaks is a FAIL, and the others still run
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        failed |= status == "FAIL"
        out(f"{status} {name}: {' '.join(detail.split())}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="these checks only (default: all)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BIRDS_DATA", "data/birds")),
                        help="the dataset the jobs read (default: $BIRDS_DATA, else data/birds, as slurm/env.sh)")
    parser.add_argument("--weights", type=Path, help="the ImageNet weights file (default: resnet152's in $TORCH_HOME)")
    parser.add_argument("--ondemand", type=Path, default=ROOT / "ondemand",
                        help="the OnDemand app's folder, e.g. /var/www/ood/apps/sys/hpc-dl-course (default: ondemand/)")
    args = parser.parse_args(argv)
    site = site_settings(Path(os.environ.get("COURSE_SITE", ROOT / "slurm" / "site.sh")))
    return run_checks(checks(args, site))


if __name__ == "__main__":
    run_cli(main)
