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

# On a machine with CUDA (a few minutes): one GPU, DataParallel on all GPUs, DDP with one
# process per GPU (torchrun, nccl), a few steps each on synthetic data; their scaling; the
# ladder with the fine-tuning rows. Copy what it prints, with the GPU's name, into docs/performance.md.
GPU_RUNS := runs/gpu-check
GPU_TRAIN := --data $(BENCH_DATA) --arch resnet152 --weights none --image-size 224 --epochs 1 --max-steps 20
gpu-check: $(STAMP) | $(BENCH_DATA)
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device')"
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
	$(PY) scripts/train.py $(GPU_TRAIN) --batch-size 64 --out $(GPU_RUNS)/single
	gpus=$$(nvidia-smi -L | wc -l); \
	$(PY) scripts/train_dp.py $(GPU_TRAIN) --batch-size $$((64 * gpus)) --out $(GPU_RUNS)/dp && \
	$(PY) -m torch.distributed.run --nnodes 1 --nproc-per-node $$gpus --master-addr 127.0.0.1 --master-port 29512 \
		scripts/train_ddp.py $(GPU_TRAIN) --batch-size 64 --out $(GPU_RUNS)/ddp
	$(PY) scripts/benchmark.py scaling --single $(GPU_RUNS)/single --dp $(GPU_RUNS)/dp --ddp $(GPU_RUNS)/ddp \
		--plot $(GPU_RUNS)/scaling.png
	$(PY) scripts/benchmark.py ladder --data $(BENCH_DATA) --arch resnet152 --image-size 224 --batch-size 64 \
		--images 512 --finetune --json $(GPU_RUNS)/ladder.json
