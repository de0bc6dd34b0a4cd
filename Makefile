# The course's commands. `make demo` and `make test` are all a learner needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
DEMO_DATA := data/birds-synthetic
NOTEBOOKS := $(wildcard notebooks/*.ipynb)

.PHONY: demo test sync drift cluster-up cluster-down gpu-check benchmark site

# The environment: created on first use, reinstalled when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# Synthetic data and a ResNet-18 at 64 px: a CPU trains it to well above chance in about a minute.
demo: $(STAMP)
	test -d $(DEMO_DATA) || $(PY) scripts/data.py synthetic $(DEMO_DATA) --classes 10 --image-size 64
	$(PY) scripts/train.py --data $(DEMO_DATA) --arch resnet18 --weights none --image-size 64 \
		--epochs 5 --batch-size 32 --out runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Rewrite scripts/ from the notebooks (the notebooks are the source).
sync: $(STAMP)
	for nb in $(NOTEBOOKS); do \
		$(VENV)/bin/jupytext --quiet --to py:percent -o - $$nb > scripts/$$(basename $$nb .ipynb).py || exit 1; \
	done

# Fail when a notebook and its exported script differ.
drift: $(STAMP)
	$(PY) -m pytest -q tests/test_notebooks.py -k drift

# A two-node Slurm cluster on this machine (root; see tests/slurm/README.md).
cluster-up:
	bash tests/slurm/cluster.sh up

cluster-down:
	bash tests/slurm/cluster.sh down

# The course as a static site in site/: every notebook executed on the CPU and rendered with its
# outputs, the performance tables, each Slurm file beside its notebook (~3-5 min on 2 cores).
site: $(STAMP)
	$(PY) docs/build_site.py --out site $(SITE_ARGS)
