#!/usr/bin/env bash
# usage: launch/tpu_pod.sh COMMAND [options] [CONFIG [key.sub=value ...]]   (options may also come first)
#
# A jaxsd run on a Cloud TPU VM pod slice (v5litepod-32, v5p-128, ...): one `jaxsd train` process
# per TPU VM host ("worker"), all started at once with `gcloud compute tpus tpu-vm ssh --worker=all`.
# The processes find each other through jax.distributed, which reads the pod's layout from the TPU
# VM metadata (`sharding.distributed=on` is passed before your overrides). Walk-through: docs/launch.md.
#
# commands:
#   create                   create the pod slice (--queued: as a queued resource, which waits for
#                            capacity; --spot: spot capacity)
#   install                  copy this checkout (tracked and untracked files, not git-ignored ones) to
#                            ~/jaxsd on every worker and install it with jax[tpu] and the gcs extra
#                            (run dirs in gs://) into ~/jaxsd/.venv (Python 3.12 through uv)
#   start CONFIG [k=v ...]   start `jaxsd train CONFIG [k=v ...]` on every worker, in the background
#                            (in ~/jaxsd: CONFIG is a preset name or a path in the checkout; output
#                            appended to ~/jaxsd_train.log). With --bucket, the run dir is
#                            gs://BUCKET/runs/NAME unless your overrides set train.run_dir
#   logs                     follow the train log of worker 0 (--worker all: of every worker)
#   stop                     SIGTERM to jaxsd train on every worker: all save the same step and stop
#                            (running `start` again resumes from that checkpoint)
#   run [--] COMMAND...      run a shell command on the workers (default all), in ~/jaxsd
#   delete                   delete the pod slice (and its queued resource with --queued)
#
# options (default from the environment variable in brackets, else the value shown):
#   --name NAME              pod name [TPU_NAME; jaxsd]
#   --zone ZONE              [ZONE; europe-west4-b]
#   --accelerator-type TYPE  [ACCELERATOR_TYPE; v5litepod-32]
#   --version VERSION        TPU VM runtime version [RUNTIME_VERSION; v2-alpha-tpuv5-lite]
#   --project PROJECT        [PROJECT; gcloud's configured project]
#   --bucket gs://BUCKET     where runs go [BUCKET]
#   --spot                   create: spot capacity (preemptible; jaxsd saves on the SIGTERM)
#   --queued                 create / delete: through a queued resource
#   --worker W               logs, run: all | 0 | 1,3 ... [logs: 0, run: all]
#   --dry-run                print the commands, run nothing
#   -h, --help               this text
# shellcheck disable=SC2016  # the remote command lines in single quotes expand on the workers, not here
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name=${TPU_NAME:-jaxsd} zone=${ZONE:-europe-west4-b} accelerator=${ACCELERATOR_TYPE:-v5litepod-32}
version=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite} project=${PROJECT:-} bucket=${BUCKET:-}
spot=0 queued=0 worker="" command=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator=$2; shift 2 ;;
    --version) need_value "$@"; version=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --bucket) need_value "$@"; bucket=${2%/}; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --) shift; break ;;
    *)
      if standard_option "$1"; then shift
      elif [[ -z $command ]]; then command=$1; shift
      else break
      fi ;;
  esac
done
case $command in
  create | install | start | logs | stop | run | delete) ;;
  "") die "expected a command: create, install, start, logs, stop, run or delete (see --help)" ;;
  *) die "unknown command '$command': create, install, start, logs, stop, run or delete (see --help)" ;;
esac
case $command in
  create | install | logs | stop | delete) [[ $# -eq 0 ]] || die "$command takes no arguments, got: $*" ;;
esac
[[ -z $bucket || $bucket == gs://* ]] || die "--bucket must be a gs:// URL, got '$bucket'"

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

# joined LINE...: shell lines as one "; "-separated line (remote commands print as one line in --dry-run)
joined() {
  local out="" line
  for line in "$@"; do out+="${out:+; }$line"; done
  printf '%s' "$out"
}

# on_workers WORKERS REMOTE_COMMAND: run one shell command line on the pod's workers
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

case $command in
  create)
    extra=()
    [[ $spot == 0 ]] || extra+=(--spot)
    if [[ $queued == 1 ]]; then
      run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
        --accelerator-type="$accelerator" --runtime-version="$version" "${extra[@]+"${extra[@]}"}"
      echo "# the pod exists once 'gcloud compute tpus queued-resources describe $name --zone=$zone' says ACTIVE" >&2
    else
      run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
        --version="$version" "${extra[@]+"${extra[@]}"}"
    fi
    ;;
  install)
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tarball=${TMPDIR:-/tmp}/jaxsd-$name.tar.gz
    # the checkout as git sees it: tracked files and new ones, never .venv, runs/ or other ignored files
    run bash -c 'cd "$1" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$2" -T -' \
      pack "$repo" "$tarball"
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:jaxsd.tar.gz" "${where[@]}" --worker=all
    on_workers all "$(joined \
      'set -e' \
      'mkdir -p ~/jaxsd && tar -xzf ~/jaxsd.tar.gz -C ~/jaxsd && rm ~/jaxsd.tar.gz' \
      'export PATH="$HOME/.local/bin:$PATH"' \
      'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh' \
      'cd ~/jaxsd && { [ -x .venv/bin/python ] || uv venv --python 3.12 .venv; }' \
      'uv pip install --python .venv/bin/python -e ".[gcs]" "jax[tpu]"' \
      '.venv/bin/jaxsd --help >/dev/null && echo "$(hostname): jaxsd installed in ~/jaxsd/.venv"')"
    ;;
  start)
    [[ $# -ge 1 ]] || die "start needs CONFIG [key.sub=value ...]"
    config=$1
    shift
    ours=(sharding.distributed=on)
    [[ -z $bucket ]] || ours+=("train.run_dir=$bucket/runs/$name")
    train=$(quoted .venv/bin/jaxsd train "$config" "${ours[@]}" "$@")
    on_workers all "$(joined \
      'cd ~/jaxsd || exit 1' \
      'if [ -f ~/jaxsd_train.pid ] && kill -0 "$(cat ~/jaxsd_train.pid)" 2>/dev/null; then echo "$(hostname): jaxsd train is already running (pid $(cat ~/jaxsd_train.pid)); stop it first" >&2; exit 1; fi' \
      "nohup $train >>~/jaxsd_train.log 2>&1 </dev/null & echo \$! >~/jaxsd_train.pid" \
      'echo "$(hostname): jaxsd train started, pid $(cat ~/jaxsd_train.pid)"')"
    ;;
  logs)
    on_workers "${worker:-0}" 'tail -n 100 -F ~/jaxsd_train.log'
    ;;
  stop)
    on_workers all "$(joined \
      'if kill -TERM "$(cat ~/jaxsd_train.pid 2>/dev/null)" 2>/dev/null' \
      'then echo "$(hostname): SIGTERM sent to jaxsd train"' \
      'else echo "$(hostname): no jaxsd train running"' \
      'fi')"
    ;;
  run)
    [[ $# -ge 1 ]] || die "run needs a COMMAND"
    on_workers "${worker:-all}" "cd ~/jaxsd && export PATH=\"\$HOME/jaxsd/.venv/bin:\$PATH\" && $*"
    ;;
  delete)
    if [[ $queued == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    fi
    ;;
esac
