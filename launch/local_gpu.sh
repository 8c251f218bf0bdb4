#!/usr/bin/env bash
# usage: launch/local_gpu.sh [options] CONFIG [key.sub=value ...]
#
# `jaxsd train` on this machine's GPUs: one process drives all of them (or those of --gpus); the
# mesh's axes (sharding.data / fsdp) spread the batch and the params over them. Runs:
#   env XLA_PYTHON_CLIENT_MEM_FRACTION=F [CUDA_VISIBLE_DEVICES=LIST] \
#     jaxsd train CONFIG sharding.distributed=off train.compilation_cache=DIR [key.sub=value ...]
# Your overrides come last, so they win. sharding.distributed=off: one process, even inside a SLURM
# allocation (whose environment would otherwise ask for jax.distributed).
#
# Install: pip install -e . "jax[cuda12]" (the wheels bring CUDA 12 and cuDNN; an NVIDIA driver >= 525).
#
# options:
#   --gpus LIST          GPUs to use, as CUDA_VISIBLE_DEVICES (e.g. 0,1; default: all)
#   --mem-fraction F     GPU memory JAX may reserve (default 0.90; JAX's own default: 0.75)
#   --cache-dir DIR      persistent XLA compilation cache: a second start loads the compiled step
#                        instead of compiling it (default ~/.cache/jaxsd/xla)
#   --jaxsd CMD          the jaxsd executable (default: $JAXSD, else `jaxsd` on PATH)
#   --dry-run            print the command, run nothing
#   -h, --help           this text
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

gpus="" fraction=0.90 cache_dir=$HOME/.cache/jaxsd/xla jaxsd=${JAXSD:-jaxsd}
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus) need_value "$@"; gpus=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; fraction=$2; shift 2 ;;
    --cache-dir) need_value "$@"; cache_dir=$2; shift 2 ;;
    --jaxsd) need_value "$@"; jaxsd=$2; shift 2 ;;
    *) standard_option "$1" || break; shift ;;
  esac
done
[[ $# -ge 1 ]] || die "expected CONFIG [key.sub=value ...] (see --help)"
[[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must look like 0,1,3, got '$gpus'"
config=$1
shift

vars=(XLA_PYTHON_CLIENT_MEM_FRACTION="$fraction")
[[ -z $gpus ]] || vars+=(CUDA_VISIBLE_DEVICES="$gpus")
run_exec env "${vars[@]}" "$jaxsd" train "$config" sharding.distributed=off "train.compilation_cache=$cache_dir" "$@"
