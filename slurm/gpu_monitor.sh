# Record GPU utilisation and memory in the background while a job runs. Source it in a
# GPU batch file (after slurm/env.sh) and start it with the run directory:
#
#   source slurm/gpu_monitor.sh
#   gpu_monitor_start "$RUN_DIR"      # every 5 s; a 2nd argument changes it
#
# Every few seconds one line per GPU of this node goes to <run dir>/gpu.csv, from nvidia-smi
# (NVIDIA) or rocm-smi (AMD; untested here but for a stand-in); `python scripts/sweep.py
# gather <run dir>` plots it into gpu.png. Recording stops when the batch script exits, or
# earlier with gpu_monitor_stop. Without either tool (a CPU node) it says so and records
# nothing. Only the GPUs of the node running the batch script are recorded.

GPU_CSV_HEADER="timestamp, index, utilization.gpu [%], memory.used [MiB]"

gpu_monitor_start() {
    local dir=${1:?usage: gpu_monitor_start RUN_DIR [SECONDS]} every=${2:-5} tool
    if command -v nvidia-smi >/dev/null 2>&1; then
        tool=nvidia-smi
    elif command -v rocm-smi >/dev/null 2>&1; then
        tool=rocm-smi
    else
        echo "gpu monitor: no nvidia-smi or rocm-smi here, GPU use is not recorded"
        return 0
    fi
    mkdir -p "$dir"
    # A requeued job appends to the same file: one header only.
    [[ -s $dir/gpu.csv ]] || echo "$GPU_CSV_HEADER" >"$dir/gpu.csv"
    if [[ $tool == nvidia-smi ]]; then
        nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader \
            -l "$every" >>"$dir/gpu.csv" &
    else
        rocm_smi_loop "$every" >>"$dir/gpu.csv" &
    fi
    GPU_MONITOR_PID=$!
    if declare -F at_exit >/dev/null; then at_exit gpu_monitor_stop; else trap gpu_monitor_stop EXIT; fi
    echo "gpu monitor: GPU use every ${every}s into $dir/gpu.csv ($tool)"
}

# rocm-smi has no loop option, and its CSV has one row per card and the columns by name:
#   device,GPU use (%),VRAM Total Memory (B),VRAM Total Used Memory (B)
#   card0,97,68702699520,10960896000
# Written out in nvidia-smi's format, so that gather reads both.
rocm_smi_loop() {
    local every=$1
    while true; do
        rocm-smi --showuse --showmeminfo vram --csv 2>/dev/null | awk -F, -v now="$(date '+%Y/%m/%d %H:%M:%S.000')" '
            NR == 1 { for (i = 1; i <= NF; i++) column[$i] = i; next }
            /^card/ { sub(/^card/, "", $1)
                      printf "%s, %s, %d %%, %d MiB\n", now, $1, $column["GPU use (%)"],
                             $column["VRAM Total Used Memory (B)"] / 1048576 }'
        sleep "$every"
    done
}

gpu_monitor_stop() {
    if [[ -n ${GPU_MONITOR_PID:-} ]]; then
        kill "$GPU_MONITOR_PID" 2>/dev/null || true
        wait "$GPU_MONITOR_PID" 2>/dev/null || true
        GPU_MONITOR_PID=
    fi
}
