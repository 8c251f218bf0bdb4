#!/usr/bin/env bash
# usage: launch/local_processes.sh [options] N CONFIG [key.sub=value ...]
#
# Rehearse a multi-host run on this machine: `jaxsd train CONFIG [overrides]` as N processes
# joined by jax.distributed over loopback, each with its own fake CPU devices — the code paths
# of a TPU pod or a GPU cluster (per-process data shards, collectives, checkpoints written by
# every process, a signal seen by one process stopping all), without one.
#
# Process i (0..N-1) runs, in this order:
#   env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
#       XLA_FLAGS="... --xla_force_host_platform_device_count=K" \
#     jaxsd train CONFIG [overrides] sharding.distributed=on \
#       sharding.coordinator_address=127.0.0.1:PORT sharding.num_processes=N sharding.process_id=i
# CONFIG and the overrides are passed through unchanged; the four sharding overrides come last,
# so they win. The mesh spans all N*K devices (e.g. sharding.data=2 sharding.fsdp=2 for 2x2).
#
# options (before N):
#   --devices K     fake CPU devices per process (default 1)
#   --port P        coordinator port on 127.0.0.1 (default: a free port)
#   --log-dir DIR   process i writes its output to DIR/process_<i>.log
#                   (default: the terminal, each line prefixed with [i])
#   --jaxsd CMD     the jaxsd executable (default: $JAXSD, else `jaxsd` on PATH)
#   --grace S       when a process fails, the others get S seconds to end on their own before
#                   they are killed (default 60; a process left alone would wait for the dead
#                   one in its next collective)
#   --dry-run       print the N commands, run nothing
#   -h, --help      this text
#
# Prints "process <i>: pid <pid>" for each process (stderr). SIGTERM or SIGINT (Ctrl-C) to this script
# is passed to every process as SIGTERM (each saves a checkpoint and stops at the same step). Exits with the
# first non-zero status of a process, else 0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

devices=1 port="" log_dir="" jaxsd=${JAXSD:-jaxsd} grace=60
while [[ $# -gt 0 ]]; do
  case $1 in
    --devices) need_value "$@"; devices=$2; shift 2 ;;
    --port) need_value "$@"; port=$2; shift 2 ;;
    --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
    --jaxsd) need_value "$@"; jaxsd=$2; shift 2 ;;
    --grace) need_value "$@"; grace=$2; shift 2 ;;
    *) standard_option "$1" || break; shift ;;
  esac
done
[[ $# -ge 2 ]] || die "expected N CONFIG [key.sub=value ...] (see --help)"
n=$1 config=$2
shift 2
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of processes, got '$n'"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive number, got '$devices'"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '$grace'"
if [[ -z $port ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
    die "could not pick a free port with python3; pass --port"
fi

# XLA_FLAGS: the caller's flags, with this script's device count instead of any other
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

command_of() {  # command_of I: the argv of process I, into the array `cmd`
  cmd=(env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo "XLA_FLAGS=$xla_flags"
       "$jaxsd" train "$config" "$@" sharding.distributed=on
       "sharding.coordinator_address=127.0.0.1:$port" "sharding.num_processes=$n" "sharding.process_id=$i")
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    command_of "$@"
    run "${cmd[@]}"
  done
  exit 0
fi

# wait -n -p (which process ended) needs bash 5.1
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || die "needs bash >= 5.1, this is $BASH_VERSION"
[[ -z $log_dir ]] || mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  command_of "$@"
  if [[ -n $log_dir ]]; then
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=("$!")
  echo "process $i: pid $!" >&2
done

# as SIGTERM: background processes of a script start with SIGINT ignored, until jaxsd installs its handler
# shellcheck disable=SC2317  # called by the trap
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM INT

# after a failure, the others get --grace seconds before a watchdog kills those still ours
watchdog() {
  sleep "$grace"
  local pid
  for pid in "$@"; do  # only a pid still our child: a pid already reaped may be another process now
    if [[ -r /proc/$pid/stat ]] && [[ $(cut -d' ' -f4 "/proc/$pid/stat") == "$$" ]]; then
      echo "killing process pid $pid: still running ${grace}s after another one failed" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

status=0 alive=("${pids[@]}") watchdog_pid=""
while [[ ${#alive[@]} -gt 0 ]]; do
  done_pid="" rc=0
  wait -n -p done_pid "${alive[@]}" || rc=$?
  [[ -n $done_pid ]] || continue  # interrupted by a signal (forwarded by the trap): wait again
  for ((i = 0; i < n; i++)); do [[ ${pids[i]} == "$done_pid" ]] && break; done
  echo "process $i (pid $done_pid) exited with status $rc" >&2
  still=()
  for pid in "${alive[@]}"; do [[ $pid == "$done_pid" ]] || still+=("$pid"); done
  alive=("${still[@]+"${still[@]}"}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    if [[ ${#alive[@]} -gt 0 ]]; then
      watchdog "${alive[@]}" &
      watchdog_pid=$!
    fi
  fi
done
[[ -z $watchdog_pid ]] || kill "$watchdog_pid" 2>/dev/null || true
exit "$status"
