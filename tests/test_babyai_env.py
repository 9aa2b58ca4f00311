"""The BabyAI adapter on real levels: observation/action contract, seeded layouts and missions, the bot as
expert (also after a learner's actions), quiet level generation, and collection of discrete actions."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from toolkit.collect import collect
from toolkit.envs.babyai import BabyAIEnv
from toolkit.envs.rollout import run_rollouts
from toolkit.envs.vector import make_vector_env
from toolkit.errors import ToolkitError

ENV_CFG = {"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToLocal", "image_size": 32}
REJECTING_SEED = 8  # GoToLocal's generator rejects a layout at this seed and prints "Sampling rejected"


@pytest.fixture(scope="module")
def env():
    env = BabyAIEnv(image_size=48)
    yield env
    env.close()


def run_expert(env: BabyAIEnv, seed: int) -> tuple[int, tuple]:
    """(steps, last step's output) of the bot's episode from ``seed``."""
    env.reset(seed=seed)
    for t in range(1, env.max_episode_steps + 1):
        out = env.step(env.expert_action())
        if out[2] or out[3]:
            return t, out


def test_observation_and_action_contract(env):
    obs, info = env.reset(seed=0)
    assert set(obs) == {"rgb_top", "state"} and info["success"] is False
    assert obs["rgb_top"].shape == (48, 48, 3) and obs["rgb_top"].dtype == np.uint8
    assert obs["state"].dtype == np.float32 and obs["state"].sum() == 1.0 and obs["state"].shape == (4,)
    assert env.observation_space.contains(obs)
    assert env.action_space.n == 7 and env.max_episode_steps == 64  # GoToLocal's own limit: one 8x8 room
    assert env.instruction().startswith("go to ")
    assert env.env_args() == {"env_name": "BabyAI-GoToLocal-v0", "type": "babyai",
                              "env_kwargs": {"image_size": 48, "max_episode_steps": None, "symbolic": False}}


def test_symbolic_grid_and_fixed_time_limit():
    env = BabyAIEnv("BabyAI-GoToLocal-v0", image_size=16, symbolic=True, max_episode_steps=5)
    obs, _ = env.reset(seed=0)
    assert obs["grid"].shape == (7, 7, 3) and obs["grid"].dtype == np.uint8 and env.observation_space.contains(obs)
    for t in range(5):
        _, _, terminated, truncated, _ = env.step(0)  # turning left never finishes a GoTo
    assert truncated and not terminated and env.max_episode_steps == 5


def test_layout_and_mission_are_a_function_of_the_seed(env):
    first = env.reset(seed=3)[0]["rgb_top"], env.instruction()
    env.reset(seed=4)
    again = env.reset(seed=3)[0]["rgb_top"], env.instruction()
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1]
    others = [(env.reset(seed=s)[0]["rgb_top"], env.instruction()) for s in range(5, 10)]
    assert all(not np.array_equal(first[0], frame) for frame, _ in others)
    assert len({m for _, m in others}) > 1


def test_bot_solves_and_episode_ends_on_success(env):
    for seed in range(6):
        steps, (obs, reward, terminated, truncated, info) = run_expert(env, seed)
        assert terminated and info["success"] and not truncated and reward > 0
        assert steps < env.max_episode_steps
    held = env.step(2)  # a finished episode holds still
    np.testing.assert_array_equal(held[0]["rgb_top"], obs["rgb_top"])
    assert held[2] is True and held[1] == 0.0


def test_expert_action_is_idempotent_within_a_step():
    """The bot replans once per step however often it is asked (replanning twice in a step derails it
    on PickupLoc)."""
    env = BabyAIEnv("PickupLoc", image_size=16)
    for seed in range(6):
        env.reset(seed=seed)
        while True:
            a = env.expert_action()
            a[0] = 99  # callers get a copy, not the cache
            b, c = env.expert_action(), env.expert_action()
            assert b[0] == c[0] != 99 and b.dtype == np.float32 and b.shape == (1,)
            out = env.step(b)
            if out[2] or out[3]:
                break
        assert out[4]["success"], seed


@pytest.mark.parametrize("consult_every_step", [True, False])
def test_bot_is_told_each_executed_action(consult_every_step):
    """DAgger: a learner acts and the bot's ``replan`` sees every state once, told the action really
    executed before it; also when nobody asked the bot during the learner's steps."""
    env = BabyAIEnv("PickupLoc", image_size=16)
    rng = np.random.default_rng(0)
    for seed in range(4):
        env.reset(seed=seed)
        told, replan = [], env._bot.replan

        def recording_replan(action_taken=None):
            told.append(None if action_taken is None else int(action_taken))
            return replan(action_taken)

        env._bot.replan = recording_replan
        executed = [int(a) for a in rng.integers(0, 3, 6)]  # turns and forward: never end a Pickup mission
        env.expert_action()
        for a in executed:
            if consult_every_step:
                env.expert_action()
            out = env.step(a)
        while not (out[2] or out[3]):
            executed.append(int(env.expert_action()[0]))
            out = env.step(executed[-1])
        assert out[4]["success"], seed
        assert told == [None, *executed[:-1]]


def test_bot_recovers_when_a_learner_refuses_to_pick_up():
    """Told that it turned instead, the bot plans to face the object again (told nothing, it would
    believe it carries the object and fail an assertion)."""
    env = BabyAIEnv("PickupLoc", image_size=16)
    for seed in range(6):
        env.reset(seed=seed)
        refused = 0
        while True:
            a = int(env.expert_action()[0])
            if a == env._env.actions.pickup and refused < 2:
                a, refused = int(env._env.actions.left), refused + 1
            out = env.step(a)
            if out[2] or out[3]:
                break
        assert out[4]["success"] and refused == 2, seed


def test_bot_gives_up_after_a_box_is_opened():
    """The bot raises when a box was opened (the mission may be gone with it); the env's expert then
    labels the rest of the episode `done` (a no-op) instead of crashing a DAgger run."""
    env = BabyAIEnv(image_size=16, terminate_on_success=False)
    env.reset(seed=1)
    assert env.instruction() == "go to the purple box"
    while not env.step(env.expert_action())[4]["success"]:
        pass
    env.step(int(env._env.actions.toggle))  # facing the box: opening it removes it
    assert env._env.grid.get(*env._env.front_pos) is None
    for _ in range(2):
        assert env.expert_action()[0] == env._env.actions.done
        env.step(2)


def test_discrete_action_forms(env):
    results = []
    for action in (2, np.int64(2), np.array([2.0], np.float32)):
        env.reset(seed=1)
        results.append(env.step(action)[0]["rgb_top"])
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    for bad in (7, -1, np.array([1.5], np.float32), np.array([1.0, 2.0], np.float32)):
        env.reset(seed=1)
        with pytest.raises(ToolkitError, match=r"action index in \[0, 7\)"):
            env.step(bad)


def test_level_failure_ends_the_episode():
    """PickupDistDebug is strict: picking up a wrong object fails the mission, which ends the episode."""
    env = BabyAIEnv("PickupDistDebug", image_size=16)
    rng = np.random.default_rng(0)
    failures = 0
    for seed in range(8):
        env.reset(seed=seed)
        out = (None, 0.0, False, False, {})
        while not (out[2] or out[3]):
            out = env.step(int(rng.integers(0, 4)))  # turns, forward, pickup
        if out[2] and not out[4]["success"]:
            failures += 1
            assert env._t < env.max_episode_steps and env.step(0)[2] is True
    assert failures > 0


def test_level_generation_prints_nothing(env, capfd):
    import gymnasium as gym

    raw = gym.make("BabyAI-GoToLocal-v0")
    raw.reset(seed=REJECTING_SEED)
    assert "Sampling rejected" in capfd.readouterr().out  # the seed does reject
    env.reset(seed=REJECTING_SEED)
    assert "Sampling rejected" not in capfd.readouterr().out


def test_unknown_level_suggests_names():
    with pytest.raises(ToolkitError, match=r"env.level='GoToLocl'.*GoToLocal"):
        BabyAIEnv(level="GoToLocl")


class TurnLeft:
    def reset(self, mask=None):
        pass

    def act(self, obs):
        return np.zeros((len(obs["state"]), 1), np.float32)  # a discrete policy's [B, 1] float index


def test_rollouts_with_discrete_float_actions():
    envs = make_vector_env({**ENV_CFG, "max_episode_steps": 4}, num_envs=1)
    try:
        res = run_rollouts(TurnLeft(), envs, num_episodes=2, seed=1_000_000, video_episodes=1)
    finally:
        envs.close()
    assert (res["length"] == 4).all() and not res["success"].any()
    assert [f.shape for f in res["frames"]] == [(5, 32, 32, 3)]


def test_collect_writes_discrete_actions_and_instructions(tmp_path):
    path = tmp_path / "babyai.hdf5"
    assert collect(ENV_CFG, path, num_episodes=4, num_envs=2, seed=10, progress=False) == 4
    env = BabyAIEnv(image_size=32)
    with h5py.File(path) as f:
        assert '"type": "babyai"' in f["data"].attrs["env_args"]
        for name in ("demo_0", "demo_1", "demo_2", "demo_3"):
            g = f["data"][name]
            actions = g["actions"][()]
            assert actions.dtype == np.float32 and actions.shape == (g.attrs["num_samples"], 1)
            assert (actions == np.rint(actions)).all() and actions.min() >= 0 and actions.max() < 7
            assert g["obs/rgb_top"].shape[1:] == (32, 32, 3) and g["dones"][-1] == 1
            assert bool(g.attrs["success"]) and g.attrs["source"] == "expert"
            env.reset(seed=int(g.attrs["seed"]))
            assert g.attrs["instruction"] == env.instruction()
            np.testing.assert_array_equal(g["obs/rgb_top"][0], env.reset(seed=int(g.attrs["seed"]))[0]["rgb_top"])


def test_epsilon_collection_takes_non_bot_actions(tmp_path):
    path = tmp_path / "eps.hdf5"
    collect(ENV_CFG, path, num_episodes=3, num_envs=1, seed=20, epsilon=0.5, only_success=False, progress=False)
    env = BabyAIEnv(image_size=32)
    differ = 0
    with h5py.File(path) as f:
        for name in f["data"]:
            g = f["data"][name]
            assert "epsilon=0.5" in g.attrs["source"]
            # Replaying the executed actions reproduces the bot's view of the episode: count disagreements.
            env.reset(seed=int(g.attrs["seed"]))
            for a in g["actions"][()]:
                differ += int(env.expert_action()[0] != a[0])
                out = env.step(a)
            assert out[4]["success"] == bool(g.attrs["success"])
    assert differ > 0


def test_action_noise_with_discrete_actions_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match="collect.action_noise"):
        collect(ENV_CFG, tmp_path / "noise.hdf5", num_episodes=1, num_envs=1, action_noise=0.1, progress=False)
    assert not (tmp_path / "noise.hdf5").exists()


def test_symbolic_view_reaches_the_policy_as_state_and_names_its_own_file():
    """env.symbolic=true: the one-hot grid is part of ``state`` (what every policy's state token reads), it
    decodes back to minigrid's grid, and the dataset file name follows the setting (a symbolic run never reuses
    a file collected without the grid)."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from toolkit.envs.babyai import SYMBOLIC_DIM, symbolic_one_hot

    env = BabyAIEnv("BabyAI-GoToLocal-v0", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (4 + SYMBOLIC_DIM,) and env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs["state"][4:], symbolic_one_hot(obs["grid"]))
    cells = obs["state"][4:].reshape(7, 7, -1)
    assert (cells.sum(-1) == 3).all()  # one object, one colour, one state per cell
    decoded = np.stack([cells[..., :11].argmax(-1), cells[..., 11:17].argmax(-1), cells[..., 17:].argmax(-1)], -1)
    np.testing.assert_array_equal(decoded, obs["grid"])
    plain = BabyAIEnv("BabyAI-GoToLocal-v0", image_size=16).reset(seed=0)[0]["state"]
    np.testing.assert_array_equal(obs["state"][:4], plain)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        names = [compose("train", overrides=["env=babyai", f"env.symbolic={s}"]).dataset_name for s in (False, True)]
    assert names == ["babyai_GoToLocal_64px", "babyai_GoToLocal_64px_symbolic"]  # data.path = <data_dir>/<name>.hdf5


def test_a_symbolic_file_trains_policies_on_the_grid(tmp_path):
    """Collected with env.symbolic=true, the file's state and the datamodule's batches carry the one-hot grid."""
    from toolkit.collect import collect
    from toolkit.datamodules.episode_datamodule import EpisodeDataModule
    from toolkit.envs.babyai import SYMBOLIC_DIM, symbolic_one_hot

    env_cfg = {"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToRedBall", "image_size": 16, "symbolic": True}
    path = tmp_path / "symbolic.hdf5"
    collect(env_cfg, path, num_episodes=3, num_envs=1, progress=False)
    dm = EpisodeDataModule(str(path), history=1, horizon=1, batch_size=4)
    dm.setup("fit")
    assert dm.shape_meta["state_dim"] == 4 + SYMBOLIC_DIM
    batch = next(iter(dm.train_dataloader()))
    cells = batch["obs"]["state"][..., 4:].reshape(-1, 49, SYMBOLIC_DIM // 49)
    assert (cells.sum(-1) == 3).all()  # every cell of every window: object, colour and state one-hot
    with h5py.File(path) as f:  # and it is the grid the env saw, step by step
        demo = f["data"]["demo_0"]
        np.testing.assert_array_equal(demo["obs"]["state"][:, 4:],
                                      np.stack([symbolic_one_hot(g) for g in demo["obs"]["grid"][:]]))


def test_babyai_has_its_own_imitation_defaults_and_the_command_line_wins():
    """env=babyai trains one action per step without random shift (bench/babyai_imitation.py) and IQL's encoder by
    all its losses (bench/babyai_language.py); other envs keep an action chunk of 4, a 4 px shift and the critic's
    routing; a value given on the command line overrides the env's."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    def settings(*overrides: str) -> tuple[int, int, int]:
        cfg = compose("train", overrides=list(overrides))
        return cfg.data.horizon, cfg.policy.horizon, cfg.policy.augment_shift

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        assert settings("env=babyai") == (1, 1, 0)
        assert settings("env=babyai", "policy=iql") == (1, 1, 0)
        assert settings("env=babyai", "policy=dagger") == (1, 1, 0)
        assert settings() == (4, 4, 4)  # Meta-World
        assert settings("env=babyai", "data.horizon=4", "policy.augment_shift=2") == (4, 4, 2)
        assert compose("train", overrides=["env=babyai"]).env.symbolic is True  # the papers' view, +6-7 points
        # IQL's features trained by all its losses on BabyAI (5% -> 33% on unseen chains), by the critic's elsewhere
        routing = [compose("train", overrides=overrides).policy.encoder_updated_by
                   for overrides in (["env=babyai", "policy=iql"], ["policy=iql"], ["env=crafter", "policy=iql"],
                                     ["env=babyai", "policy=iql", "policy.encoder_updated_by=critic"])]
        assert routing == ["all", "critic", "critic", "critic"]
