# Sourced by every Slurm file in slurm/ (submit them from the course's root directory).
# This is the ONE place to adapt to your cluster: how the Python environment is activated,
# and the defaults of what to train. Every default can be overridden from the submitting
# shell, e.g.  EPOCHS=1 ARCH=resnet18 sbatch slurm/train.sbatch

# --- 1. The Python environment ---------------------------------------------------------
# Default: the course's .venv when it exists (`make demo` creates it), else the conda
# environment of environment.yml, else the Python on PATH. Or set COURSE_ENV_ACTIVATE, e.g.
#   export COURSE_ENV_ACTIVATE="module load Anaconda3 && conda activate hpc-dl-course"
#   export COURSE_ENV_ACTIVATE=":"      # the Python on PATH, e.g. from a module loaded before
if [[ -n "${COURSE_ENV_ACTIVATE:-}" ]]; then
    eval "$COURSE_ENV_ACTIVATE"
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
else
    # module load Anaconda3    # <- uncomment (your site's name) if conda is not on PATH
    if command -v conda >/dev/null 2>&1; then
        source "$(conda info --base)/etc/profile.d/conda.sh"
        conda activate hpc-dl-course
    else
        echo "notice: no .venv, no conda, no COURSE_ENV_ACTIVATE: using the Python on PATH" >&2
    fi
fi
set -euo pipefail  # after activation: some activation scripts use unset variables

# --- 2. What to train ------------------------------------------------------------------
BIRDS_DATA=${BIRDS_DATA:-data/birds}          # the dataset on the shared filesystem
RUNS=${RUNS:-runs}                            # run directories go under here
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"         # any other train.py options, e.g. "--amp bf16"
TRAIN_ARGS=(--arch "${ARCH:-resnet152}" --weights "${WEIGHTS:-imagenet}" --epochs "${EPOCHS:-5}"
            --image-size "${IMAGE_SIZE:-224}" --batch-size "${BATCH_SIZE:-64}" "${EXTRA[@]}")
# One OpenMP thread pool per task, as large as the CPUs Slurm gave it.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# --- 3. Helpers ------------------------------------------------------------------------
# Copy the dataset to node-local disk once on every node of the job: reading thousands of
# small JPEGs from a parallel filesystem is slow. Sets DATA to the copy's path.
stage_data() {
    local to=${STAGE_DIR:-${TMPDIR:-/tmp}/${USER:-$(id -un)}}
    DATA=$(srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        python scripts/data.py stage "$BIRDS_DATA" --to "$to" | sort -u)
    if [[ $(wc -l <<<"$DATA") != 1 ]]; then
        echo "error: staging gave different paths on different nodes: $DATA" >&2
        return 1
    fi
    echo "data staged on $SLURM_JOB_NUM_NODES node(s) at $DATA"
}

# Run commands in the background and wait for all of them; fail if any failed.
wait_all() {
    local pid failed=0
    for pid in "$@"; do wait "$pid" || failed=1; done
    return "$failed"
}
