"""launch/local_processes.sh, local_gpu.sh, slurm_gpu.sh and slurm_gpu.sbatch through --dry-run: the
commands they would run, with the config and overrides passed through unchanged and the environment
jax.distributed reads. (local_processes.sh's real runs: tests/train/test_multihost_cli.py.)"""

import os
import shutil
import subprocess
import sys

import pytest

from jaxsd.config import load_config
from tests.helpers import REPO
from tests.launch.dry_run import CONFIG, LAUNCH, OVERRIDES, dry_run, script


def test_local_processes_start_n_processes_joined_over_loopback():
    commands = dry_run("local_processes.sh", "--devices", "2", "--port", "4321", "3", CONFIG, *OVERRIDES,
                       env={"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false --xla_force_host_platform_device_count=8"})
    assert len(commands) == 3
    for i, argv in enumerate(commands):
        ours = ["sharding.distributed=on", "sharding.coordinator_address=127.0.0.1:4321", "sharding.num_processes=3",
                f"sharding.process_id={i}"]
        # the caller's other XLA flags stay; the device count is the script's
        assert argv == ["env", "JAX_PLATFORMS=cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo",
                        "XLA_FLAGS=--xla_cpu_use_thunk_runtime=false --xla_force_host_platform_device_count=2",
                        "jaxsd", "train", CONFIG, *OVERRIDES, *ours]
        # the keys are the ones jaxsd reads (ShardingConfig → jax.distributed.initialize's arguments)
        sharding = load_config("tiny", ours).sharding
        assert (sharding.distributed, sharding.coordinator_address, sharding.num_processes, sharding.process_id) == (
            "on", "127.0.0.1:4321", 3, i)


def test_jax_reads_the_collectives_variable_local_processes_sets():
    # gloo is JAX's default today; this checks the variable's name, so the setting survives a default change
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.config.jax_cpu_collectives_implementation)"],
                         capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "mpi"})
    assert out.stdout.strip() == "mpi"


def test_local_processes_refuses_bad_input():
    for args, message in ((["0", "cfg.yaml"], "N must be a positive number"), (["2"], "expected N CONFIG"),
                          (["--devices", "x", "2", "cfg"], "--devices must be a positive number"),
                          (["--port"], "--port needs a value"), (["--bogus", "2", "cfg"], "unknown option --bogus")):
        proc = script("local_processes.sh", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert "usage: launch/local_processes.sh [options] N CONFIG" in script("local_processes.sh", "--help").stdout


def test_local_gpu_sets_the_memory_fraction_the_compilation_cache_and_one_process():
    [argv] = dry_run("local_gpu.sh", "--gpus", "0,2", "--cache-dir", "/cache dir", CONFIG, *OVERRIDES)
    assert argv == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", "CUDA_VISIBLE_DEVICES=0,2", "jaxsd", "train", CONFIG,
                    "sharding.distributed=off", "train.compilation_cache=/cache dir", *OVERRIDES]
    [argv] = dry_run("local_gpu.sh", "--mem-fraction", "0.5", "--jaxsd", "/venv/bin/jaxsd", "sd15",
                     env={"HOME": "/home/me"})
    assert argv == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5", "/venv/bin/jaxsd", "train", "sd15",
                    "sharding.distributed=off", "train.compilation_cache=/home/me/.cache/jaxsd/xla"]
    proc = script("local_gpu.sh", "--dry-run", "--gpus", "all", "sd15", check=False)
    assert proc.returncode == 2 and "--gpus must look like 0,1,3" in proc.stderr


def test_slurm_wrapper_submits_the_batch_script_with_the_config_unchanged():
    [argv] = dry_run("slurm_gpu.sh", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100", "--time", "2:00:00",
                     "--sbatch-arg=--exclusive", CONFIG, *OVERRIDES)
    assert argv == ["env", "JAXSD_PROCESS_PER=gpu", f"JAXSD_LAUNCH_DIR={LAUNCH}", "sbatch", "--job-name=jaxsd",
                    "--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--time=2:00:00", "--partition=a100",
                    "--exclusive", str(LAUNCH / "slurm_gpu.sbatch"), CONFIG, *OVERRIDES]
    [argv] = dry_run("slurm_gpu.sh", "--per", "node", "--jaxsd", "/shared/venv/bin/jaxsd", "sd15")
    assert argv[:4] == ["env", "JAXSD_PROCESS_PER=node", f"JAXSD_LAUNCH_DIR={LAUNCH}", "JAXSD=/shared/venv/bin/jaxsd"]
    assert "--ntasks-per-node=1" in argv


def test_slurm_batch_script_runs_one_process_per_gpu_or_per_node(tmp_path):
    job = {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(REPO)}
    [argv] = dry_run("slurm_gpu.sbatch", CONFIG, *OVERRIDES, env=job)
    assert argv == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=4", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
                    "jaxsd", "train", CONFIG, "sharding.distributed=on", *OVERRIDES]
    [argv] = dry_run("slurm_gpu.sbatch", "sd15", env={**job, "JAXSD_PROCESS_PER": "node", "JAXSD": "/v/bin/jaxsd"})
    assert argv == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
                    "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "/v/bin/jaxsd", "train", "sd15", "sharding.distributed=on"]
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --signal=TERM@300" in header  # time limit → SIGTERM → every process saves and stops

    # sbatch runs a copy from its spool directory: lib.sh is found through the submit directory
    spool = tmp_path / "slurmd" / "job77"
    spool.mkdir(parents=True)
    shutil.copy(LAUNCH / "slurm_gpu.sbatch", spool / "slurm_script")
    proc = subprocess.run([str(spool / "slurm_script"), "--dry-run", "sd15"], capture_output=True, text=True,
                          check=False, timeout=60, env={**os.environ, **job}, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("srun "), proc.stderr
    proc = subprocess.run([str(spool / "slurm_script"), "--dry-run", "sd15"], capture_output=True, text=True,
                          check=False, timeout=60, env={**os.environ, **job, "SLURM_SUBMIT_DIR": str(tmp_path)},
                          cwd=tmp_path)
    assert proc.returncode == 2 and "launch/lib.sh not found" in proc.stderr

    proc = script("slurm_gpu.sbatch", "--dry-run", "sd15", env={"SLURM_GPUS_ON_NODE": ""}, check=False)
    assert proc.returncode == 2 and "submit with --gpus-per-node" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_the_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    proc = subprocess.run(["shellcheck", "-x", "-s", "bash", *scripts], capture_output=True, text=True, check=False,
                          timeout=120, cwd=LAUNCH)
    assert proc.returncode == 0, proc.stdout
