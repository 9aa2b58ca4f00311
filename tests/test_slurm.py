"""Sweeps on a real SLURM scheduler: a single-node cluster on localhost started by .ci/slurm_up.sh (Debian's
slurm-wlm + munge). Skipped, with the script's message, where it cannot be installed or started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=20",
         "num_threads=1", "debug=fast"]


@pytest.fixture(scope="module")
def slurm():
    proc = subprocess.run([str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True, text=True, timeout=300)
    if "SLURM unavailable" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr


def sweep(root: Path, *overrides: str, wait: bool = True):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SLURM, f"paths.root_dir={root}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return proc


def test_a_two_job_sweep_runs_through_sbatch_to_completion(slurm, tmp_path):
    sweep(tmp_path, "policy.lr=1e-3,3e-4", "trainer.max_steps=2")
    jobs = sorted(tmp_path.glob("logs/debug/multiruns/*/[0-9]/summary.json"))
    assert len(jobs) == 2 and all(json.loads(j.read_text())["global_step"] == 2 for j in jobs)
    submitted = list(tmp_path.glob("logs/debug/multiruns/*/.submitit/*/*_submitted.pkl"))
    assert submitted  # went through submitit's sbatch submission, not a local launcher


@pytest.mark.slow  # ~3 min (the longest test): CI's fast run took 29.7 min of tests on session 21's machine
def test_a_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    proc = sweep(tmp_path, "trainer.max_steps=40", "trainer.val_check_interval=40",
                 "callbacks.last_checkpoint.every_n_train_steps=5", "hydra.launcher.signal_delay_s=30", wait=False)
    deadline = time.time() + 300
    while not list(tmp_path.glob("logs/debug/multiruns/*/0/checkpoints/last.ckpt")):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before the signal"
        time.sleep(1)
    job = subprocess.run(["squeue", "-h", "-o", "%i", "-u", "root"], capture_output=True, text=True).stdout.split()
    assert job, "the job is not in the queue"
    # what SLURM sends before pre-emption / the time limit (submitit's --signal=USR2@signal_delay_s)
    subprocess.run(["scancel", "--signal=USR2", job[0]], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    run_dir = next(tmp_path.glob("logs/debug/multiruns/*/0"))
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 40
    log = (run_dir / "train.log").read_text()
    assert f"resuming from {run_dir}/checkpoints/last.ckpt" in log  # the requeued job continued the checkpoint
