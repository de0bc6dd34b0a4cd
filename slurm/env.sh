# Sourced by every Slurm file in slurm/ (submit them from the course's root directory).
# Your centre's settings (partition, account, GPUs, CPUs, memory, time, requeue, node cache, the
# Python environment) are in slurm/site.sh, the one file to adapt; this file reads it and does
# what every job needs. What to train can be overridden from the submitting shell, e.g.
#   EPOCHS=1 ARCH=resnet18 slurm/submit slurm/train.sbatch

# shellcheck source=slurm/site.sh
source "${COURSE_SITE:-slurm/site.sh}"

# --- 1. The Python environment ---------------------------------------------------------
# COURSE_CONTAINER (slurm/site.sh), else COURSE_ENV_ACTIVATE, else the course's .venv, else
# conda, else PATH.
if [[ -n "${COURSE_CONTAINER:-}" ]]; then
    # The course's image is the environment (docs/containers.md): `python` and `torchrun` are
    # the wrappers in slurm/container/bin, which run them inside it. On PATH, not as shell
    # functions, so that they reach every srun task on every node.
    if [[ ! -f $COURSE_CONTAINER ]]; then
        echo "error: COURSE_CONTAINER: no image file '$COURSE_CONTAINER' (docs/containers.md says how to build it)" >&2
        exit 2
    fi
    export COURSE_CONTAINER PATH="$PWD/slurm/container/bin:$PATH"
elif [[ -n "${COURSE_ENV_ACTIVATE:-}" ]]; then
    eval "$COURSE_ENV_ACTIVATE"
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
else
    if command -v conda >/dev/null 2>&1; then
        source "$(conda info --base)/etc/profile.d/conda.sh"
        conda activate hpc-dl-course
    else
        echo "notice: no .venv, no conda, no COURSE_ENV_ACTIVATE: using the Python on PATH" >&2
    fi
fi
set -euo pipefail  # after activation: some activation scripts use unset variables

# COURSE_NSYS=1 (slurm/site.sh): the training runs under Nsight Systems, a report of a few steps
# per process in <run dir>/nsys/ (slurm/nsys/run). After the activation, which may load nsys.
if [[ ${COURSE_NSYS:-} == 1 ]]; then
    if command -v nsys >/dev/null 2>&1; then
        export PATH="$PWD/slurm/nsys/bin:$PATH"
    else
        echo "notice: COURSE_NSYS=1, but there is no nsys command here: the runs are not profiled (load the site's Nsight Systems or CUDA module in COURSE_ENV_ACTIVATE)" >&2
    fi
fi

# --- 2. What to train ------------------------------------------------------------------
BIRDS_DATA=${BIRDS_DATA:-data/birds}          # the dataset on the shared filesystem
RUNS=${RUNS:-runs}                            # run directories go under here (RUN_DIR: one of them)
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"         # any other train.py options, e.g. "--amp bf16"
TRAIN_ARGS=(--arch "${ARCH:-resnet152}" --weights "${WEIGHTS:-imagenet}" --epochs "${EPOCHS:-5}"
            --image-size "${IMAGE_SIZE:-224}" --batch-size "${BATCH_SIZE:-64}" "${EXTRA[@]}")

# --- 3. CPUs ---------------------------------------------------------------------------
# Every srun step gets the CPUs per task that the job asked for. Since Slurm 22.05, srun no
# longer reads SLURM_CPUS_PER_TASK: on a cluster that binds tasks to cores, a step of several
# tasks on a node (the DDP ranks srun starts) gives each task ONE core, for its process and
# all its DataLoader workers. SRUN_CPUS_PER_TASK restores it. (A step of one task per node,
# such as torchrun or staging, gets every core the job has on the node either way.)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# The scripts count the cores they may run on (os.sched_getaffinity, at most SLURM_CPUS_PER_TASK,
# shared between torchrun's processes), give the DataLoader workers their share and PyTorch's
# compute threads the rest, and print both in their header line: look there first when a job is
# slow. OMP_NUM_THREADS, when set, wins over that choice.

# --- 4. Multi-GPU jobs -----------------------------------------------------------------
# A failed or hung NCCL collective stops its process after the process group's timeout
# (train.py --dist-timeout) instead of hanging until the time limit: torchrun sets this for
# its processes; srun-started ranks need it too. For diagnosis, NCCL_DEBUG=INFO (or WARN)
# before submitting prints NCCL's view: the network it chose, its rings and the failing peer.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# --- 5. The job's own scratch on every node, removed at its end ------------------------
# The staged dataset (unless SITE_NODE_CACHE), torch.compile's cache and torchrun's temporary
# files all go here instead of piling up in /tmp across jobs.
COURSE_NODE_TMPDIR=${COURSE_NODE_TMPDIR:-${TMPDIR:-/tmp}}   # before this job changed TMPDIR
JOB_TMP="$COURSE_NODE_TMPDIR/course-job-${SLURM_JOB_ID:-$$}"
mkdir -p "$JOB_TMP"
export COURSE_NODE_TMPDIR TMPDIR=$JOB_TMP TORCHINDUCTOR_CACHE_DIR=$JOB_TMP/torchinductor
# In the course's image, the processes see of the host what is bound (slurm/container/run): the
# course, the data, the runs, this scratch and the node cache, at the same paths.
if [[ -n ${COURSE_CONTAINER:-} ]]; then
    export COURSE_CONTAINER_BINDS="$PWD:$BIRDS_DATA:$RUNS:$COURSE_NODE_TMPDIR${SITE_NODE_CACHE:+:$SITE_NODE_CACHE}"
fi

# Run a command once on every node of the job (one task per node, the job's CPUs per task),
# after making the job's scratch directory there.
on_every_node() {
    srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c 'mkdir -p "$TMPDIR" && exec "$@"' on_every_node "$@"
}

# Commands run when the batch script ends (or just before the job is requeued).
EXIT_HOOKS=()
at_exit() { EXIT_HOOKS+=("$*"); }
run_exit_hooks() {
    local hook
    for hook in "${EXIT_HOOKS[@]}"; do eval "$hook" || true; done
    EXIT_HOOKS=()
}
trap run_exit_hooks EXIT
trap 'exit 143' TERM   # scancel, preemption: run the hooks, then end
remove_job_tmp() {
    if [[ -n ${SLURM_JOB_ID:-} && ${SLURM_JOB_NUM_NODES:-1} -gt 1 ]]; then
        on_every_node rm -rf "$JOB_TMP" 2>/dev/null
    fi
    rm -rf "$JOB_TMP"
}
at_exit remove_job_tmp

# Copy the dataset to node-local disk once on every node of the job: reading thousands of
# small JPEGs from a parallel filesystem is slow. Sets DATA to the copy's path.
stage_data() {
    local to=${SITE_NODE_CACHE:-$JOB_TMP}
    DATA=$(on_every_node python scripts/data.py stage "$BIRDS_DATA" --to "$to" | sort -u)
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

# --- 6. Time limits --------------------------------------------------------------------
# On the warning (--signal=USR1@300 in the files; Slurm sends it to every process of every
# step) each run checkpoints and ends, and its rank 0 leaves a request in this file. Only when
# every step has ended does the batch script act on it (continue_if_stopped): a step that
# requeued the job itself would kill the other steps before they had checkpointed.
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    mkdir -p "$RUNS"
    COURSE_REQUEUE_REQUEST="$(realpath "$RUNS")/.requeue-$SLURM_JOB_ID"
    rm -f "$COURSE_REQUEUE_REQUEST"
    export COURSE_REQUEUE_REQUEST
fi

# Call after the last step: when a run stopped at the warning, put the job back in the queue
# (SITE_REQUEUE=requeue) or submit the file again (resubmit), to go on from the checkpoints in
# RUN_DIR.
continue_if_stopped() {
    [[ -e ${COURSE_REQUEUE_REQUEST:-} ]] || return 0
    rm -f "$COURSE_REQUEUE_REQUEST"
    run_exit_hooks  # a requeued job does not get to its end
    if [[ $SITE_REQUEUE == resubmit ]]; then resubmit_job; else requeue_job; fi
}

requeue_job() {
    local error status=0
    echo "requeue: asking Slurm to requeue job $SLURM_JOB_ID; it continues from its checkpoint in $RUN_DIR"
    trap 'exit 0' TERM  # Slurm ends this script as soon as it has accepted the requeue
    error=$(scontrol requeue "$SLURM_JOB_ID" 2>&1) || status=$?
    if ((status == 0 || status > 128)); then exit 0; fi
    echo "error: could not requeue job $SLURM_JOB_ID ($error): submit it again with the same run" \
         "directory: RUN_DIR=$RUN_DIR slurm/submit $(submitted_file)" >&2
    exit 1
}

# The job's file, as slurm/submit or plain sbatch submitted it.
submitted_file() {
    if [[ -n ${COURSE_SUBMIT_FILE:-} ]]; then echo "$COURSE_SUBMIT_FILE"; return; fi
    scontrol show job "$SLURM_JOB_ID" | sed -nE 's/^ *Command=([^ ]+).*/\1/p'
}

resubmit_job() {
    local options=() kept=() option new
    eval "options=(${COURSE_SUBMIT_OPTIONS:-})"
    for option in "${options[@]}"; do  # the new job must not wait for itself
        [[ $option == --wait || $option == -W || $option == --parsable ]] || kept+=("$option")
    done
    if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then kept+=(--array="$SLURM_ARRAY_TASK_ID"); fi
    # The new job gets the environment of the submission, not this job's scratch.
    if ! new=$(TMPDIR=$COURSE_NODE_TMPDIR COURSE_NODE_TMPDIR='' RUN_DIR=$RUN_DIR slurm/submit "${kept[@]}" \
               --parsable --dependency=afterany:"$SLURM_JOB_ID" "$(submitted_file)" 2>&1); then
        echo "error: could not submit the job again (${new##*$'\n'}): submit it with RUN_DIR=$RUN_DIR" \
             "slurm/submit $(submitted_file)" >&2
        exit 1
    fi
    new=${new##*$'\n'}  # the last line is sbatch's: <job id>[;cluster]
    echo "resubmit: job ${new%%;*} continues from the checkpoint in $RUN_DIR once job $SLURM_JOB_ID has ended"
}
