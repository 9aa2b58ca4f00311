"""`python train.py` end to end on the real simulator: collect, train, roll out, checkpoint, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, run_train


def summary_of(root: Path, task: str = "debug") -> dict:
    runs = sorted(Path(root, "logs", task, "runs").glob("*/summary.json"))
    return json.loads(runs[-1].read_text())


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    proc = run_train(root=root)
    return root, proc


def test_train_collects_trains_and_evaluates(debug_run):
    root, proc = debug_run
    assert Path(root, "data", "debug_drawer-open-v3_corner4_64px.hdf5").exists()
    s = summary_of(root)
    assert s["global_step"] == 4
    assert 0.0 <= s["rollout/success_rate"] <= 1.0 and s["rollout/episode_length"] == 20
    assert Path(s["last_checkpoint"]).exists() and Path(s["best_checkpoint"]).exists()
    video = Path(s["video"])
    assert video.suffix == ".mp4" and video.stat().st_size > 1000
    import av

    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 21  # first observation + 20 steps
    metrics = Path(s["logs"][0], "metrics.csv").read_text()
    assert "rollout/success_rate" in metrics and "train/loss" in metrics and "val/loss" in metrics
    assert "run summary" in proc.stdout and "rollout success rate" in proc.stdout


def test_the_console_prints_each_line_once_without_tips_and_counts_steps(debug_run):
    """The captured console of ``train.py debug=fast``: every log line once (Lightning's lines went through both
    its own handler and Hydra's), no advertising tip, no unactionable library warning, and a progress bar of
    steps out of trainer.max_steps instead of "Epoch 0/-2"."""
    import re
    from collections import Counter

    _, proc = debug_run
    console = proc.stdout + proc.stderr
    messages = [re.sub(r"^(\[[^]]*\]){3} - |^INFO: ", "", line).strip() for line in console.splitlines()]
    messages = [m for m in messages if m and not set(m) <= set("━─│┃┏┓┗┛┡┩└┘┌┐┳┻╇┬┴ ")
                and "━" not in m and "│" not in m and "┃" not in m]
    repeated = {m: n for m, n in Counter(messages).items() if n > 1}
    assert not repeated, repeated
    assert "Seed set to 0" in console and "GPU available" in console  # Lightning's lines are still there, once
    assert "Tip" not in console and "LeafSpec" not in console
    assert "/-2" not in console and "step 4/4" in console


def test_checkpoint_acts_without_the_dataset(debug_run, tmp_path):
    from toolkit.policies.base import load_policy

    root, _ = debug_run
    ckpt = Path(summary_of(root)["last_checkpoint"])
    moved = tmp_path / "policy.ckpt"
    moved.write_bytes(ckpt.read_bytes())
    data = Path(root, "data", "debug_drawer-open-v3_corner4_64px.hdf5")
    with h5py.File(data) as f:
        mean = f["data/demo_0/actions"][()].mean(0)
    policy = load_policy(moved)
    np.testing.assert_allclose(policy.action_norm.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    obs = {"rgb_corner4": np.zeros((3, 64, 64, 3), np.uint8), "state": np.zeros((3, 4), np.float32)}
    policy.reset()
    a1 = policy.act(obs)
    assert a1.shape == (3, 4) and np.isfinite(a1).all()
    assert (a1 <= policy.action_high.numpy() + 1e-6).all() and (a1 >= policy.action_low.numpy() - 1e-6).all()


def test_resume_continues_from_the_last_checkpoint(debug_run):
    root, _ = debug_run
    last = Path(summary_of(root)["last_checkpoint"])
    before = torch.load(last, weights_only=True)
    proc = run_train("resume=true", "trainer.max_steps=8", root=root)
    assert f"resuming from {last}" in proc.stdout + proc.stderr
    s = summary_of(root)
    assert s["global_step"] == 8 and s["trained_steps"] == 4  # samples/s counts only the steps this run trained
    after = torch.load(s["last_checkpoint"], weights_only=True)
    assert before["global_step"] == 4 and after["global_step"] == 8
    # the optimizer state came along: Adam's step count continued from 4
    assert next(iter(after["optimizer_states"][0]["state"].values()))["step"].item() == 8


def _steps(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_killed_training_resumes_with_the_same_step_schedule_and_data_order(tmp_path):
    """SIGKILL in the middle of training, then `resume=true`: the same global step, learning-rate schedule
    and batches (mid-epoch too) as a run that was never interrupted."""
    common = ["trainer.max_steps=60", "trainer.val_check_interval=60", "callbacks.last_checkpoint.every_n_train_steps=5",
              "+callbacks.batch_log._target_=ddp_probe.BatchLog"]
    reference = tmp_path / "reference"
    run_train(*common, f"+callbacks.batch_log.path={tmp_path}/reference.jsonl", root=reference)
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), "debug=fast", f"paths.root_dir={killed}", *common,
           f"+callbacks.batch_log.path={tmp_path}/killed.jsonl"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    ckpts = []
    while not ckpts and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        ckpts = list(Path(killed, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt"))
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpts, "no checkpoint was written before the kill"
    step = torch.load(ckpts[0], weights_only=True)["global_step"]
    assert 5 <= step < 60
    run_train(*common, "resume=true", f"+callbacks.batch_log.path={tmp_path}/resumed.jsonl", root=killed)
    assert summary_of(killed)["global_step"] == 60
    ref, resumed = _steps(tmp_path / "reference.jsonl"), _steps(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(step, 60))  # continued at the checkpoint's step
    for s in resumed:  # the same windows and learning rate at every step as the uninterrupted run
        assert resumed[s]["batch"] == pytest.approx(ref[s]["batch"]) and resumed[s]["lr"] == pytest.approx(ref[s]["lr"])


def test_multirun_sweep_runs_each_job(tmp_path):
    proc = run_train("-m", "policy.lr=1e-3,3e-4", "trainer.max_steps=2", root=tmp_path)
    assert "Launching 2 jobs locally" in proc.stdout + proc.stderr
    jobs = sorted(Path(tmp_path, "logs", "debug", "multiruns").glob("*/[0-9]*/summary.json"))
    assert len(jobs) == 2
    lrs = sorted(torch.load(json.loads(j.read_text())["last_checkpoint"], weights_only=True)
                 ["hyper_parameters"]["lr"] for j in jobs)
    assert lrs == [3e-4, 1e-3]


def test_collect_command(tmp_path):
    cmd = [sys.executable, "-m", "toolkit.collect", "env.task=reach-v3", "data.num_demos=2",
           "env.max_episode_steps=10", "collect.only_success=false", "collect.num_envs=1", f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "data" / "reach-v3_corner4_64px.hdf5"
    assert f"{path}: 2 episodes" in proc.stdout
    with h5py.File(path) as f:
        assert json.loads(f["data"].attrs["env_args"])["env_name"] == "reach-v3"
        assert len(f["data"]) == 2


def test_frozen_encoder_trains_on_cached_features(tmp_path):
    proc = run_train("encoder.freeze=true", root=tmp_path)
    assert "training on cached ImpalaEncoder features" in proc.stdout + proc.stderr
    caches = list(Path(tmp_path, "data").glob("*.features/ImpalaEncoder-*.hdf5"))
    assert len(caches) == 1
    s = summary_of(tmp_path)
    assert s["global_step"] == 4 and 0.0 <= s["rollout/success_rate"] <= 1.0
    # a second run reuses the cache
    run_train("encoder.freeze=true", root=tmp_path)
    assert list(Path(tmp_path, "data").glob("*.features/ImpalaEncoder-*.hdf5")) == caches


def test_iql_trains_end_to_end_on_transitions(tmp_path):
    run_train("policy=iql", root=tmp_path)
    s = summary_of(tmp_path)
    assert s["global_step"] == 4 and 0.0 <= s["rollout/success_rate"] <= 1.0
    metrics = Path(s["logs"][0], "metrics.csv").read_text().splitlines()[0]
    for key in ("train/value_loss", "train/q_loss", "train/actor_loss", "train/adv_mean", "val/loss"):
        assert key in metrics
