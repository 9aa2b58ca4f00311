"""DAgger (toolkit/policies/dagger.py) on the real simulator: a debug run of `train.py policy=dagger`
appends expert-labelled episodes and keeps training on them; the beta mixture; envs without an expert."""

from __future__ import annotations

import csv
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from conftest import TINY_ENV, run_train
from toolkit.envs.base import RobotEnv
from toolkit.errors import ToolkitError
# torch/lightning (and triton) must be imported before the first MuJoCo env is made in this process
from toolkit.policies.dagger import DAggerCallback, check_expert, mixture_rollouts

DEBUG_ENV = {"_target_": "toolkit.envs.metaworld.MetaWorldEnv", "task": "drawer-open-v3", "image_size": 32,
             "max_episode_steps": 12}


@pytest.fixture(scope="module")
def dagger_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagger")
    proc = run_train("policy=dagger", "env.image_size=32", "env.max_episode_steps=12",
                     "callbacks.dagger.steps_per_iteration=2", "callbacks.dagger.iterations=2",
                     "callbacks.dagger.episodes_per_iteration=1", "callbacks.dagger.num_envs=1",
                     "~callbacks.progress_bar", root=root)
    return root, proc


def _episodes(path: Path) -> list[dict]:
    from toolkit.datamodules.episode_file import episode_names

    with h5py.File(path) as f:
        return [{"name": n, **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["data"][n].attrs.items()},
                 "actions": f["data"][n]["actions"][()], "state": f["data"][n]["obs/state"][()]}
                for n in episode_names(f)]


def test_dagger_run_appends_expert_labelled_episodes(dagger_run):
    from toolkit.envs.vector import make_env

    root, proc = dagger_run
    episodes = _episodes(Path(root, "data", "debug_drawer-open-v3_corner4_32px.hdf5"))
    # debug=fast: 2 collected demonstrations, then one episode per DAgger iteration
    assert [e["source"] for e in episodes] == ["expert", "expert", "dagger_iter0", "dagger_iter1"]
    dagger = episodes[2:]
    assert [int(e["seed"]) for e in dagger] == [2_000_000, 2_000_001]
    assert all(len(e["actions"]) == 12 for e in dagger)
    env = make_env(DEBUG_ENV)
    try:
        for e in dagger:  # the recorded action is the expert's label at the episode's reset state
            env.reset(seed=int(e["seed"]))
            np.testing.assert_allclose(e["actions"][0], env.expert_action(), atol=1e-6)
        # iteration 0 runs with beta=1: the expert acted, so replaying its labels revisits the recorded states
        e = dagger[0]
        obs, _ = env.reset(seed=int(e["seed"]))
        for t in range(len(e["actions"])):
            np.testing.assert_allclose(obs["state"], e["state"][t], atol=1e-5)
            np.testing.assert_allclose(e["actions"][t], env.expert_action(), atol=1e-6)
            obs, *_ = env.step(e["actions"][t])
    finally:
        env.close()

    out = proc.stdout + proc.stderr
    assert "DAgger iteration 1/2 at step 2: beta=1.000" in out and "DAgger iteration 2/2 at step 4: beta=0.500" in out
    metrics_csv = next(Path(root, "logs", "debug", "runs").glob("*/csv/*/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("dagger/beta")]
    assert [float(r["dagger/beta"]) for r in rows] == [1.0, 0.5]
    assert [float(r["dagger/dataset_episodes"]) for r in rows] == [3.0, 4.0]
    assert [float(r["dagger/dataset_steps"]) for r in rows] == [36.0, 48.0]
    assert [float(r["dagger/expert_labels"]) for r in rows] == [12.0, 12.0]
    assert all(0.0 <= float(r["dagger/rollout_success"]) <= 1.0 for r in rows)
    # training continued on a loader over the aggregate's training split (demo_1 is validation)
    assert [float(r["dagger/train_windows"]) for r in rows] == [24.0, 36.0]


def test_the_learner_may_act_with_every_action_the_expert_labelled(dagger_run):
    """The learner's action clipping range starts as the initial demos' (here demo_0's: demo_1 is validation) and
    widens to every label in the file after each iteration; a learner capped below the expert's labels could not
    follow them (pick-place-v3's 3 demos reach x = 0.67 where the expert goes to 1.0)."""
    import torch

    root, _ = dagger_run
    episodes = _episodes(Path(root, "data", "debug_drawer-open-v3_corner4_32px.hdf5"))
    labels = np.concatenate([e["actions"] for e in episodes])
    initial = episodes[0]["actions"]
    assert (labels.max(0) > initial.max(0)).any() or (labels.min(0) < initial.min(0)).any()  # the labels go beyond
    (ckpt,) = Path(root, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    np.testing.assert_allclose(state["action_low"].numpy(), labels.min(0), atol=1e-6)
    np.testing.assert_allclose(state["action_high"].numpy(), labels.max(0), atol=1e-6)


class ZeroPolicy:
    """A learner that never moves (Meta-World actions are position deltas)."""

    def reset(self, mask=None):
        pass

    def act(self, obs):
        return np.zeros((len(obs["state"]), 4), np.float32)


def _mixture(beta: float, seeds: list[int]):
    from toolkit.envs.vector import make_vector_env

    envs = make_vector_env(TINY_ENV, 1)
    try:
        return list(mixture_rollouts(ZeroPolicy(), envs, seeds, beta, np.random.default_rng(0)))
    finally:
        envs.close()


def _expert_states(seed: int) -> np.ndarray:
    from toolkit.envs.vector import make_env

    env = make_env(TINY_ENV)
    try:
        obs, _ = env.reset(seed=seed)
        states, done = [obs["state"]], False
        while not done:
            obs, _, terminated, truncated, _ = env.step(env.expert_action())
            states.append(obs["state"])
            done = terminated or truncated
        return np.stack(states[:-1])
    finally:
        env.close()


def test_beta_one_executes_the_expert_and_beta_zero_the_learner():
    seeds = [2_000_010, 2_000_011]
    expert = [_expert_states(s) for s in seeds]
    with_expert = _mixture(1.0, seeds)
    assert [r[2] for r in with_expert] == seeds
    for (episode, _, seed, n_expert, instruction, _), states in zip(with_expert, expert):
        assert n_expert == len(episode) == 12 and instruction is None  # Meta-World has no instructions
        np.testing.assert_allclose(episode["obs"]["state"], states, atol=1e-5)
    with_learner = _mixture(0.0, seeds)
    for (episode, _, seed, n_expert, _, _), states in zip(with_learner, expert):
        assert n_expert == 0
        # the learner does not move: the hand stays put while the expert's moves
        assert np.abs(episode["obs"]["state"][:, :3] - episode["obs"]["state"][0, :3]).max() < 0.02
        assert np.abs(states[:, :3] - states[0, :3]).max() > 0.02
        # ...but the labels are still the expert's actions at the visited states (not the zeros executed)
        assert np.abs(episode["actions"]).max() > 0.1


class NoExpertEnv(RobotEnv):
    """A tiny real task (a point on a line) without a scripted expert."""

    def __init__(self, max_episode_steps: int = 5) -> None:
        super().__init__(max_episode_steps)
        self.observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-10, 10, (1,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        self.x = 0.0

    def _reset(self, seed):
        self.x = float(np.random.default_rng(seed).uniform(-1, 1))
        return {"state": np.array([self.x], np.float32)}

    def _step(self, action):
        self.x += float(action[0])
        return {"state": np.array([self.x], np.float32)}, -abs(self.x), abs(self.x) < 0.1, {}


def test_env_without_expert_fails_clearly():
    from types import SimpleNamespace


    env_cfg = {"_target_": f"{__name__}.NoExpertEnv", "max_episode_steps": 5}
    with pytest.raises(ToolkitError, match="DAgger needs an expert.*NoExpertEnv"):
        check_expert(env_cfg)
    cb = DAggerCallback(env_cfg)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(refresh=lambda: None, feature_path=None))
    with pytest.raises(ToolkitError, match="NoExpertEnv has none"):
        cb.setup(trainer, None, "fit")


def test_overlapping_seeds_are_refused():

    cb = DAggerCallback(TINY_ENV, seed=1_000_005, eval_seed=1_000_000, eval_episodes=20)
    from types import SimpleNamespace

    trainer = SimpleNamespace(datamodule=SimpleNamespace(refresh=None, feature_path=None))
    with pytest.raises(ToolkitError, match="overlap the evaluation"):
        cb.setup(trainer, None, "fit")


def test_dagger_killed_between_episodes_keeps_them_and_resumes(tmp_path):
    """SIGKILL after the first DAgger episode of an iteration (the env kills its process at the second one's
    reset): the file stays readable and keeps that episode; `resume=true` restarts from the last checkpoint
    and rolls out only the episode the iteration still missed."""
    common = ["policy=dagger", "task_name=dagger_kill", "env.image_size=32", "env.max_episode_steps=12",
              "callbacks.dagger.steps_per_iteration=3", "callbacks.dagger.iterations=1",
              "callbacks.dagger.episodes_per_iteration=2", "callbacks.dagger.num_envs=1", "~callbacks.progress_bar"]
    killed = run_train(*common, "env._target_=self_killing_env.SelfKillingMetaWorldEnv",
                       "+env.kill_at_seed=2000001", root=tmp_path, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (path,) = (tmp_path / "data").glob("*.hdf5")
    before = _episodes(path)
    assert [(e["source"], e.get("seed")) for e in before[2:]] == [("dagger_iter0", 2_000_000)]

    resumed = run_train(*common, "resume=true", root=tmp_path)
    assert "resuming from" in resumed.stdout + resumed.stderr
    after = _episodes(path)
    assert [(e["source"], e.get("seed")) for e in after[2:]] == [("dagger_iter0", 2_000_000), ("dagger_iter0", 2_000_001)]
    for old, new in zip(before, after):  # nothing finished before the kill was rewritten
        np.testing.assert_array_equal(old["actions"], new["actions"])
        np.testing.assert_array_equal(old["state"], new["state"])
