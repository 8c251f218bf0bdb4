#!/usr/bin/env bash
# usage: launch/slurm_gpu.sh [options] CONFIG [key.sub=value ...]
#
# Submit a multi-node `jaxsd train` to SLURM: sbatch launch/slurm_gpu.sbatch (read it for what runs
# on the nodes) with the job's size and limits from the flags below. CONFIG and the overrides are
# passed through unchanged.
#
# options:
#   --nodes N            nodes (default 1)
#   --gpus-per-node G    GPUs per node (default 8)
#   --per gpu|node       one process per GPU (default) or one per node
#   --time T             time limit (default 24:00:00); SIGTERM comes 300 s before it
#   --partition P        SLURM partition
#   --account A          SLURM account
#   --job-name NAME      (default jaxsd)
#   --jaxsd CMD          the jaxsd executable on the nodes (default: jaxsd on PATH there)
#   --sbatch-arg ARG     one more sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)
#   --dry-run            print the sbatch command, submit nothing
#   -h, --help           this text
set -euo pipefail
launch=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$launch/lib.sh"

nodes=1 gpus=8 per=gpu time=24:00:00 partition="" account="" job=jaxsd jaxsd="" extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
    --per) need_value "$@"; per=$2; shift 2 ;;
    --time) need_value "$@"; time=$2; shift 2 ;;
    --partition) need_value "$@"; partition=$2; shift 2 ;;
    --account) need_value "$@"; account=$2; shift 2 ;;
    --job-name) need_value "$@"; job=$2; shift 2 ;;
    --jaxsd) need_value "$@"; jaxsd=$2; shift 2 ;;
    --sbatch-arg=*) extra+=("${1#--sbatch-arg=}"); shift ;;
    --sbatch-arg) need_value "$@"; extra+=("$2"); shift 2 ;;
    *) standard_option "$1" || break; shift ;;
  esac
done
[[ $# -ge 1 ]] || die "expected CONFIG [key.sub=value ...] (see --help)"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, got '$nodes'"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive number, got '$gpus'"
case $per in
  gpu) tasks=$gpus ;;
  node) tasks=1 ;;
  *) die "--per must be gpu or node, got '$per'" ;;
esac

vars=(JAXSD_PROCESS_PER="$per" JAXSD_LAUNCH_DIR="$launch")
[[ -z $jaxsd ]] || vars+=(JAXSD="$jaxsd")
options=(--job-name="$job" --nodes="$nodes" --gpus-per-node="$gpus" --ntasks-per-node="$tasks" --time="$time")
[[ -z $partition ]] || options+=(--partition="$partition")
[[ -z $account ]] || options+=(--account="$account")
# sbatch passes this environment on to the job (--export=ALL, its default)
run_exec env "${vars[@]}" sbatch "${options[@]}" "${extra[@]+"${extra[@]}"}" "$launch/slurm_gpu.sbatch" "$@"
