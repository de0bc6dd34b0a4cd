#!/usr/bin/env bash
# Local two-node Slurm 22.05 cluster on this one machine, for the tests and CI.
#
#   tests/slurm/cluster.sh up      install (if needed), configure and start; waits until usable
#   tests/slurm/cluster.sh down    stop exactly the daemons (and job processes) that `up` started
#   tests/slurm/cluster.sh status  exit 0 and print sinfo if up, non-zero otherwise
#
# Must run as root. State (generated config, spool, logs, pids) lives in
# $SLURM_STATE_DIR (default /tmp/course-slurm). The generated slurm.conf and
# gres.conf are symlinked into /etc/slurm/, where Debian's clients (sinfo, sbatch,
# srun, ...) look by default, so no environment variable is needed afterwards.
#
# Layout: munged (shared, real), one slurmctld, and four slurmd (node1 to node3 on
# 127.0.0.1 to 127.0.0.3 with fake GPUs; node4 on 127.0.0.4, without), each slurmd in
# its own UTS namespace so that `hostname` inside a task prints node1 ... node4 like
# on a real cluster. Each node advertises 2 cores and
# Slurm binds tasks to them (task/affinity). Jobs are submitted as an ordinary
# user, $JOB_USER, which `up` creates.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SLURM_STATE_DIR:-/tmp/course-slurm}"
CTLD_PORT=6817
NODE1_PORT=6818
NODE2_PORT=6819
NODE3_PORT=6820
NODE4_PORT=6821
NODES=(node1 node2 node3 node4)
CPUS=2             # cores each node advertises: real ones (0 and 1), bound with task/affinity
JOB_USER=${COURSE_SLURM_USER:-learner}   # the ordinary user the tests submit as
UP_TIMEOUT=60      # seconds to wait for both nodes to become usable
STOP_TIMEOUT=10    # seconds between SIGTERM and SIGKILL in `down`
PKGS=(slurmctld slurmd slurm-client munge)
ETC_SLURM=/etc/slurm
MARKER=COURSE-SLURM-TEST-CLUSTER   # appears in our slurm.conf and /etc/hosts lines

log() { echo "[cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# ---------------------------------------------------------------- pid helpers
pidfile() { echo "$STATE/pids/$1.pid"; }

# Is the recorded process for <name> alive and still the program we started?
# (Comparing /proc/PID/comm guards against a recycled pid.)
# Note: pid 1 on these machines reaps orphans only now and then, so a stopped
# daemon may linger as a zombie ("<defunct>") for a while; it counts as dead.
alive() {
    local name=$1 comm=$2 f pid
    f=$(pidfile "$name")
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    running "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# Start a long-running foreground command detached from this shell (own session,
# stdin closed, output to a log), and record its pid. setsid/setpriv/unshare all
# exec, so $! is the pid of the daemon itself.
spawn() {
    local name=$1; shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$(pidfile "$name")"
}

# Exists and is not a zombie (an orphan's zombie may linger until init reaps it).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }   # state is the first field after "(comm) "
    [[ ${stat%% *} != Z ]]
}

# SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL whatever is left of the given pids.
terminate() {
    local pids=("$@") left i p
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        left=()
        for p in "${pids[@]}"; do running "$p" && left+=("$p"); done
        ((${#left[@]})) || return 0
        sleep 0.1
    done
    log "sending SIGKILL to ${left[*]} (ignored SIGTERM for ${STOP_TIMEOUT}s)"
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.2
}

# ---------------------------------------------------------------- setup steps
install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Generate config from the templates into the state dir, then point /etc/slurm at
# it. If the config changed while our daemons run (template edited, hostname
# changed), restart them: most settings are only read at daemon start.
write_config() {
    mkdir -p "$STATE"/{etc,ctld,spool,run,log,pids,dev}
    local host f changed=0
    host=$(hostname -s)
    for f in slurm.conf gres.conf; do
        sed -e "s|@STATE@|$STATE|g" -e "s|@CTLD_HOST@|$host|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
            -e "s|@NODE1_PORT@|$NODE1_PORT|g" -e "s|@NODE2_PORT@|$NODE2_PORT|g" -e "s|@NODE3_PORT@|$NODE3_PORT|g" -e "s|@NODE4_PORT@|$NODE4_PORT|g" \
            -e "s|@CPUS@|$CPUS|g" -e "s|@JOB_USER@|$JOB_USER|g" \
            "$HERE/$f.in" >"$STATE/etc/$f.new"
        cmp -s "$STATE/etc/$f.new" "$STATE/etc/$f" || changed=1
    done
    if ((changed)) && any_daemon_alive; then
        log "configuration changed: restarting the cluster"
        cmd_down
    fi
    for f in slurm.conf gres.conf; do
        mv -f "$STATE/etc/$f.new" "$STATE/etc/$f"
        link_into_etc "$f"
    done
}

any_daemon_alive() {
    local node
    alive slurmctld slurmctld && return 0
    for node in "${NODES[@]}"; do alive "slurmd-$node" slurmd && return 0; done
    return 1
}

# /etc/slurm/<f> -> state dir. A foreign regular file is kept as <f>.orig once.
link_into_etc() {
    local f=$1 target=$ETC_SLURM/$1
    mkdir -p "$ETC_SLURM"
    if [[ -f $target && ! -L $target ]] && ! grep -q "$MARKER\|generated by tests/slurm/cluster.sh" "$target"; then
        log "keeping existing $target as $target.orig"
        mv -f "$target" "$target.orig"
    fi
    ln -sfn "$STATE/etc/$f" "$target"
}

# Jobs read MASTER_ADDR etc. from the node list, so the node names must resolve.
# Append-only: /etc/hosts may be a bind mount that sed -i cannot replace.
ensure_hosts() {
    local name addr
    for name in "${NODES[@]}"; do
        addr=127.0.0.${name#node}
        if ! grep -Eq "^[[:space:]]*[^#[:space:]]+[[:space:]]+(.*[[:space:]])?$name([[:space:]]|\$)" /etc/hosts; then
            echo "$addr $name # $MARKER" >>/etc/hosts
        fi
        [[ $(getent hosts "$name" | awk '{print $1}') == "$addr" ]] ||
            log "warning: $name resolves to '$(getent hosts "$name" | awk '{print $1}')', expected $addr"
    done
}

# Fake GPUs: gres.conf File= must be character devices (plain files drain the
# node). Same numbers as /dev/null, so opening one is harmless.
make_fake_gpus() {
    local i d
    for i in 0 1 2 3; do
        d=$STATE/dev/nvidia$i
        [[ -c $d ]] && continue
        rm -f "$d"
        mknod -m 666 "$d" c 1 3
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# Reuse a working munged (e.g. one a package script started); otherwise start
# our own as the munge user. On a fresh machine /run/munge does not exist
# (no systemd-tmpfiles), and munged insists on strict ownership/permissions.
start_munged() {
    munge_works && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
    # --force: a stale socket left by a killed munged must not block the start.
    spawn munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --force
    local i
    for ((i = 0; i < 100; i++)); do munge_works && return 0; sleep 0.1; done
    die "munged did not come up; see $STATE/log/munged.out and /var/log/munge/munged.log"
}

start_slurmctld() {
    alive slurmctld slurmctld && return 0
    local clear=()
    # Fresh start (no slurmd of ours running): clear saved jobs so that jobs of
    # a previous session are not resurrected. If only slurmctld died, keep them.
    alive slurmd-node1 slurmd && clear=() || clear=(-c)
    SLURM_CONF=$STATE/etc/slurm.conf spawn slurmctld /usr/sbin/slurmctld -D "${clear[@]}" -f "$STATE/etc/slurm.conf"
}

# Each slurmd runs in its own UTS namespace with the node's hostname; job steps
# inherit it. unshare and sh both exec, so the recorded pid is slurmd's.
start_slurmd() {
    local node=$1
    alive "slurmd-$node" slurmd && return 0
    mkdir -p "$STATE/spool/$node"
    # shellcheck disable=SC2016  # $1/$2 are expanded by the inner sh
    SLURM_CONF=$STATE/etc/slurm.conf spawn "slurmd-$node" unshare --uts \
        sh -c 'hostname "$1" && exec /usr/sbin/slurmd -D -N "$1" -f "$2"' sh "$node" "$STATE/etc/slurm.conf"
}

# Remember each slurmd's UTS namespace: `down` uses it to find leftover job
# processes (slurmstepd and tasks) that this slurmd started.
record_namespaces() {
    local node pid
    for node in "${NODES[@]}"; do
        alive "slurmd-$node" slurmd || continue
        pid=$(<"$(pidfile "slurmd-$node")")
        readlink "/proc/$pid/ns/uts" >"$STATE/pids/slurmd-$node.uts" 2>/dev/null || true
    done
}

# Node states in which the node responds and can run jobs.
nodes_usable() {
    local states node
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
    for node in "${NODES[@]}"; do
        grep -Eq "^$node (idle|mixed|allocated|completing)\$" <<<"$states" || return 1
    done
}

wait_until_usable() {
    local i d
    for ((i = 0; i < UP_TIMEOUT * 5; i++)); do
        # Record namespaces as soon as each slurmd has exec'd, so that `down`
        # can clean up even if this wait fails.
        record_namespaces
        nodes_usable && return 0
        for d in slurmctld "${NODES[@]/#/slurmd-}"; do
            running "$(<"$(pidfile "$d")")" || die "$d exited; see $STATE/log/$d.log"
        done
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    sinfo -R >&2 || true
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "nodes not usable after ${UP_TIMEOUT}s"
}

summary() {
    echo "Slurm test cluster up: state $STATE, config /etc/slurm/slurm.conf -> $STATE/etc/slurm.conf"
    echo "  submit jobs as $JOB_USER (e.g. runuser -u $JOB_USER -- sbatch ...); site settings: tests/slurm/README.md"
    local n
    for n in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        if [[ -s $(pidfile "$n") ]]; then
            printf '  %-13s pid %s\n' "$n" "$(<"$(pidfile "$n")")"
        else
            printf '  %-13s (not started by this script)\n' "$n"
        fi
    done
    sinfo
}

# ---------------------------------------------------------------- commands
# The ordinary user the tests submit jobs as: staging, run directories, TORCH_HOME and
# requeueing then meet the permissions a learner meets.
ensure_job_user() {
    id -u "$JOB_USER" >/dev/null 2>&1 && return 0
    log "creating the user $JOB_USER for jobs"
    useradd --create-home --shell /bin/bash "$JOB_USER"
}

# Jobs run the course's .venv as $JOB_USER. Its python links to the interpreter it was made
# from, which may sit in root's home (pyenv): let the user traverse (not list) every directory
# above it. Traversal is all that o+x gives.
let_job_user_reach_python() {
    local python dir
    python=$(readlink -f "$HERE/../../.venv/bin/python" 2>/dev/null) || python=""
    if [[ ! -x $python ]]; then
        log "notice: no .venv yet: run \`make env\` first, or jobs may not reach its interpreter"
        return 0
    fi
    dir=$(dirname "$python")
    while [[ $dir != / ]]; do
        if [[ $(stat -c %A "$dir") != *x ]]; then
            log "letting $JOB_USER traverse $dir (o+x) to run $python"
            chmod o+x "$dir"
        fi
        dir=$(dirname "$dir")
    done
}

# The nodes advertise cores 0..CPUS-1 of this machine; they must exist for the binding.
check_cores() {
    (($(nproc --all) >= CPUS)) || die "this machine has $(nproc --all) CPU(s); the test nodes need $CPUS"
}

cmd_up() {
    need_root
    check_cores
    install_packages
    ensure_job_user
    let_job_user_reach_python
    mkdir -p "$STATE"
    write_config
    ensure_hosts
    make_fake_gpus
    start_munged
    start_slurmctld
    local node
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    wait_until_usable
    summary
}

# Cancel jobs first so their steps end cleanly, then stop daemons by recorded
# pid, then kill anything still inside a slurmd's namespace (orphaned steps).
cmd_down() {
    need_root
    [[ -d $STATE/pids ]] || { log "nothing to stop ($STATE/pids missing)"; return 0; }
    if alive slurmctld slurmctld && command -v scancel >/dev/null; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    # All Slurm daemons at once: stopped one after the other, each spends
    # seconds retrying to reach the ones already gone.
    local node pids=()
    alive slurmctld slurmctld && pids+=("$(<"$(pidfile slurmctld)")")
    for node in "${NODES[@]}"; do
        alive "slurmd-$node" slurmd && pids+=("$(<"$(pidfile "slurmd-$node")")")
    done
    terminate "${pids[@]}"
    kill_namespace_leftovers
    pids=()
    alive munged munged && pids+=("$(<"$(pidfile munged)")")
    terminate "${pids[@]}"
    rm -f "$STATE"/pids/*.pid "$STATE"/pids/*.uts
    log "down"
}

kill_namespace_leftovers() {
    local own ns f pids=()
    own=$(readlink /proc/self/ns/uts)   # e.g. uts:[4026531838]
    for f in "$STATE"/pids/slurmd-*.uts; do
        [[ -s $f ]] || continue
        ns=$(<"$f")
        [[ -n $ns && $ns != "$own" ]] || continue   # never touch the host's namespace
        ns=${ns//[^0-9]/}
        mapfile -t -O "${#pids[@]}" pids < <(ps -eo pid=,utsns= | awk -v ns="$ns" '$2 == ns {print $1}')
    done
    ((${#pids[@]})) && log "stopping leftover job processes: ${pids[*]}"
    terminate "${pids[@]}"
}

cmd_status() {
    if nodes_usable; then
        sinfo
        return 0
    fi
    echo "Slurm test cluster is not up (state dir $STATE)" >&2
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
