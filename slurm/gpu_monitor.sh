# Record GPU utilisation and memory in the background while a job runs. Source it in a
# GPU batch file (after slurm/env.sh) and start it with the run directory:
#
#   source slurm/gpu_monitor.sh
#   gpu_monitor_start "$RUNS/$SLURM_JOB_ID-train"      # every 5 s; a 2nd argument changes it
#
# Every few seconds nvidia-smi appends one line per GPU of this node to <run dir>/gpu.csv;
# `python scripts/sweep.py gather <run dir>` plots it into gpu.png. Recording stops when
# the batch script exits (an EXIT trap; it replaces an EXIT trap set before), or earlier
# with gpu_monitor_stop. Without nvidia-smi (a CPU node) it says so and records nothing.
# Only the GPUs of the node running the batch script are recorded.

gpu_monitor_start() {
    local dir=${1:?usage: gpu_monitor_start RUN_DIR [SECONDS]} every=${2:-5}
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu monitor: no nvidia-smi here, GPU use is not recorded"
        return 0
    fi
    mkdir -p "$dir"
    # A requeued job appends to the same file: one header only.
    [[ -s $dir/gpu.csv ]] || echo "timestamp, index, utilization.gpu [%], memory.used [MiB]" >"$dir/gpu.csv"
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader \
        -l "$every" >>"$dir/gpu.csv" &
    GPU_MONITOR_PID=$!
    trap gpu_monitor_stop EXIT
    echo "gpu monitor: GPU use every ${every}s into $dir/gpu.csv"
}

gpu_monitor_stop() {
    if [[ -n ${GPU_MONITOR_PID:-} ]]; then
        kill "$GPU_MONITOR_PID" 2>/dev/null || true
        wait "$GPU_MONITOR_PID" 2>/dev/null || true
        GPU_MONITOR_PID=
    fi
}
