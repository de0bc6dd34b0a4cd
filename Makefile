# The course's commands. `make demo` and `make test` are all a learner needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.dev-installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
DEMO_DATA := data/birds-synthetic
NOTEBOOKS := $(wildcard notebooks/*.ipynb)

.PHONY: demo env test check sync drift cluster-up cluster-down gpu-check benchmark site slides cheatsheet preflight

# The environment: created on first use, reinstalled when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# The tests' tools on top (requirements-dev.txt): the course's environment stays what learners need.
$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.dev-installed-* && touch $@

# The environment with the tests' tools, nothing run (CI builds it before starting the cluster).
env: $(DEV_STAMP)

# Synthetic data and a ResNet-18 at 64 px: a CPU trains it to well above chance in about a minute.
demo: $(STAMP)
	test -d $(DEMO_DATA) || $(PY) scripts/data.py synthetic $(DEMO_DATA) --classes 10 --image-size 64
	$(PY) scripts/train.py --data $(DEMO_DATA) --arch resnet18 --weights none --image-size 64 \
		--epochs 5 --batch-size 32 --out runs/demo

# Every test, as CI does (.ci/run starts the Slurm cluster first; without one the Slurm tests are
# skipped and say why). pytest.ini prints the 15 slowest tests at the end.
# Two processes (pytest-xdist): the Slurm tests, which mostly wait for their jobs, in one, with the
# rest shared out (tests/conftest.py: GROUP_OF_TIER keeps the cluster's and the notebooks' tests together).
TEST_PROCESSES ?= 2
test: $(DEV_STAMP)
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadgroup $(PYTEST_ARGS)

# Day-to-day: all but the tiers slurm, browser, notebooks and slow (pytest.ini), ~2-3 min on 2 cores.
check: $(DEV_STAMP)
	$(PY) -m pytest -n $(TEST_PROCESSES) -m "not slurm and not browser and not notebooks and not slow" $(PYTEST_ARGS)

# Rewrite scripts/ from the notebooks (the notebooks are the source).
sync: $(STAMP)
	for nb in $(NOTEBOOKS); do \
		$(VENV)/bin/jupytext --quiet --to py:percent -o - $$nb > scripts/$$(basename $$nb .ipynb).py || exit 1; \
	done

# Fail when a notebook and its exported script differ.
drift: $(DEV_STAMP)
	$(PY) -m pytest -q tests/test_notebooks.py -k drift

# The local Slurm test cluster (root; see tests/slurm/README.md). The Slurm tests need it started
# first: without it they are skipped (in CI: failed), saying so.
# After `make env` (as yourself, not root): the cluster lets its job user reach the .venv's
# interpreter, which may link into a home directory (pyenv), only when the .venv exists.
cluster-up:
	bash tests/slurm/cluster.sh up

cluster-down:
	bash tests/slurm/cluster.sh down

# The course as a static site in site/: every notebook executed on the CPU and rendered with its
# outputs by Sphinx and MyST-NB, the documents and performance tables, each Slurm file beside its
# notebook (~3-5 min on 2 cores, the Sphinx build about 15 s of it).
site: $(DEV_STAMP)
	$(PY) docs/build_site.py --out site $(SITE_ARGS)

# The instructor's kit in kit/: a reveal.js deck per lesson from the cells the notebooks mark as
# slides, opening offline (reveal.js fetched once with npm into .cache/); the cheat sheet as one
# page of HTML and PDF (headless Chromium).
slides: $(STAMP)
	$(PY) docs/build_kit.py slides --out kit

cheatsheet: $(STAMP)
	$(PY) docs/build_kit.py cheatsheet --out kit

# On the centre's cluster, before the workshop: one line per check (slurm/preflight.py). It runs
# in the course's environment: .venv when there is one, else the Python on PATH (activate first).
preflight:
	$(if $(wildcard $(PY)),$(PY),python3) slurm/preflight.py $(PREFLIGHT_ARGS)

# The CPU ladder of docs/performance.md (~9 min on 2 cores; measured with OMP_NUM_THREADS=1):
# the original configuration, then one optimisation at a time.
# On a GPU: make benchmark BENCH_ARGS="--batch-size 64 --images 512 --finetune"
BENCH_DATA := data/birds-synthetic-224
$(BENCH_DATA): | $(STAMP)
	$(PY) scripts/data.py synthetic $@ --classes 10 --train 64 --valid 16 --test 4 --image-size 224

benchmark: $(STAMP) | $(BENCH_DATA)
	$(PY) scripts/benchmark.py ladder --data $(BENCH_DATA) --arch resnet152 --image-size 224 \
		--batch-size 8 --images 64 --warmup 2 --steps 3 --repeats 5 --epochs 4 \
		--json runs/benchmark/ladder.json $(BENCH_ARGS)

# On a machine with CUDA (about ten minutes): every GPU path of the course and how fast it is,
# in runs/<time>-gpu-check/ (slurm/gpu_check.sbatch; on a cluster: sbatch slurm/gpu_check.sbatch).
gpu-check: $(STAMP)
	bash slurm/gpu_check.sbatch
