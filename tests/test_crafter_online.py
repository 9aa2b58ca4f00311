"""ELLM's goal reward and RND inside online training on real Crafter: the stepper rewards a suggested goal when
the step achieves it, short train.py runs with goals=oracle / goals=llm (a local chat server) and intrinsic=rnd
end to end with rollouts, and the bad inputs (an unreachable model server, goals without online training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chat_server import ChatServer, chat_server  # noqa: F401 (fixture)
from conftest import run_train
from test_crafter import ACTION, wood_action
from toolkit.envs.crafter_text import OracleGoals
from toolkit.envs.stepper import EnvStepper
from toolkit.exploration.terms import GoalReward

SMALL_CRAFTER = {"_target_": "toolkit.envs.crafter.CrafterEnv", "area": [32, 32], "image_size": 32,
                 "max_episode_steps": 60, "reward": "none"}
# the env of CRAFTER_PPO (its episodes' first states, for checking an evaluation)
SMALL_CRAFTER_40 = {"_target_": "toolkit.envs.crafter.CrafterEnv", "area": [32, 32], "image_size": 40,
                    "max_episode_steps": 30}
# a few PPO updates on Crafter in a small world (fast world generation) at 40 px (RND's CNN needs 36) with short
# episodes, two evaluation episodes
CRAFTER_PPO = ["experiment=crafter_ppo", "env.area=[32,32]", "env.image_size=40", "env.max_episode_steps=30",
               "data.num_envs=2", "policy.n_steps=8", "data.batch_size=8", "policy.n_epochs=1",
               "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.rollout.num_episodes=2",
               "callbacks.rollout.num_envs=1", "num_threads=1", "data.env_processes=false"]


def summary_of(root: Path) -> dict:
    return json.loads(sorted(Path(root, "logs", "debug", "runs").glob("*/summary.json"))[-1].read_text())


def test_a_suggested_goal_is_rewarded_on_the_step_that_achieves_it():
    """The oracle suggests "collect wood" next to a tree; the step that collects the first wood gets the goal
    reward (1), the env's own reward stays apart (env.reward=none: 0), later wood is not a suggested goal any more."""
    term = GoalReward(OracleGoals(), num_envs=1, threshold=0.99, coef=1.0)
    stepper = EnvStepper(SMALL_CRAFTER, num_envs=1, seed=1, processes=False, reward_terms=[term])
    stepper.observation()
    env = stepper._envs.envs[0]
    rewards, wood = [], []
    for _ in range(120):
        before = env._env._player.inventory["wood"]
        tr = stepper.step(lambda obs, fresh: np.array([ACTION[wood_action(env)]]))
        rewards.append(float(tr["reward"][0]))
        assert tr["env_reward"][0] == 0.0
        wood.append(env._env._player.inventory["wood"] > before)
        if sum(wood) == 2:
            break
    assert sum(wood) == 2, "the scripted walk did not collect 2 wood"
    first = wood.index(True)
    assert rewards[first] == 1.0 and sum(rewards) == 1.0
    assert term.metrics()["goals/achieved/collect_wood"] == 1.0
    stepper.close()


def test_crafter_ppo_with_oracle_goals_and_rnd_end_to_end(tmp_path):
    """train.py env=crafter policy=ppo goals=oracle goals.condition=true intrinsic=rnd: trains, evaluates with
    rollouts (the Crafter score and per-achievement rates), logs the goal and RND metrics and keeps them in the
    summary; the policy is conditioned on the goals (an instruction embedding), and its checkpoint evaluates
    with eval.py, acting on the oracle's goals for each state."""
    from toolkit.eval import evaluate_checkpoint
    from toolkit.policies.base import load_policy

    run_train(*CRAFTER_PPO, "goals=oracle", "goals.condition=true", "intrinsic=rnd", root=tmp_path)
    summary = summary_of(tmp_path)
    assert summary["global_step"] == 4 and summary["env/steps"] == 32  # 2 cycles of 2 envs x 8 steps, 2 updates each
    assert {f"rollout/achievement/{a}" for a in ("collect_wood", "place_table", "eat_cow")} <= set(summary)
    assert 0.0 <= summary["rollout/crafter_score"] <= 100.0
    assert summary["goals/suggested_per_step"] > 0  # the oracle suggested goals at every step
    assert np.isfinite(summary["rnd/reward"]) and np.isfinite(summary["rnd/predictor_loss"])
    assert load_policy(summary["last_checkpoint"]).language_conditioned  # it has an instruction token
    out = evaluate_checkpoint(summary["last_checkpoint"], tmp_path / "eval", episodes=1, num_envs=1)
    rows = json.loads(Path(out["out_dir"], "episodes.json").read_text())
    assert rows[0]["instruction"] == ", ".join(OracleGoals().suggest(*first_state_text(SMALL_CRAFTER_40, out["first_seed"])))


def first_state_text(env_cfg: dict, seed: int) -> tuple[str, dict]:
    """The caption and goal context of an episode's first state (what a suggester reads)."""
    from hydra.utils import instantiate

    env = instantiate(env_cfg)
    _, info = env.reset(seed=seed)
    env.close()
    return info["caption"], json.loads(info["goal_context"])


def test_a_goal_conditioned_policy_reads_the_goals_of_each_state_in_training_and_evaluation():
    """goals.condition: the training envs' instruction, and the evaluation rollouts', is the oracle's goals for
    the state the policy acts in (joined with ", "; "no goal" when there are none), step after step."""
    from toolkit.envs.rollout import run_rollouts
    from toolkit.envs.vector import make_vector_env
    from toolkit.exploration.terms import NO_GOALS, GoalInstructions

    term = GoalReward(OracleGoals(), num_envs=1, condition=True)
    stepper = EnvStepper(SMALL_CRAFTER, num_envs=1, seed=1, processes=False, reward_terms=[term])
    stepper.observation()
    env = stepper._envs.envs[0]
    seen = set()
    for _ in range(40):
        info = env._info(env._counts)  # the current state's captions, read from the env itself
        expected = ", ".join(OracleGoals().suggest(info["caption"], json.loads(info["goal_context"]))) or NO_GOALS
        assert stepper.observation()["instruction"][0] == expected
        seen.add(expected)
        stepper.step(lambda obs, fresh: np.array([ACTION[wood_action(env)]]))
    assert len(seen) > 1  # the goals changed on the way (collecting wood makes a table placeable)
    stepper.close()

    class Recorder:  # a policy that walks to trees and records what it was told
        def __init__(self, env) -> None:
            self.env, self.told = env, []

        def reset(self, mask=None) -> None:
            pass

        def act(self, obs: dict) -> np.ndarray:
            info = self.env._info(self.env._counts)
            expected = ", ".join(OracleGoals().suggest(info["caption"], json.loads(info["goal_context"]))) or NO_GOALS
            self.told.append((obs["instruction"][0], expected))
            return np.array([ACTION[wood_action(self.env)]])

    envs = make_vector_env({**SMALL_CRAFTER, "max_episode_steps": 25}, 1, processes=False)
    recorder = Recorder(envs.envs[0])
    run_rollouts(recorder, envs, num_episodes=2, seed=5, goals=GoalInstructions(OracleGoals(), 1))
    envs.close()
    assert len(recorder.told) == 50 and all(told == expected for told, expected in recorder.told)


def test_crafter_ppo_with_language_model_goals_from_a_local_server(tmp_path, chat_server):  # noqa: F811
    """goals=llm against an OpenAI-compatible server on 127.0.0.1: suggestions come from it, each caption is
    asked once (the cache), and the calls are logged."""
    chat_server.reply = "- collect wood\n- place table\n- drink water"
    run_train(*CRAFTER_PPO, "goals=llm", f"goals.base_url={chat_server.url}", "goals.model=test-model", root=tmp_path)
    summary = summary_of(tmp_path)
    asked = chat_server.count()
    assert asked == summary["goals/llm_calls"] > 0
    assert summary["goals/llm_cache_hits"] > 0  # captions repeat: the same caption never costs a second call
    captions = [r["body"]["messages"][-1]["content"] for r in chat_server.requests
                if r["path"] == "/v1/chat/completions"]
    assert len(set(captions)) == len(captions)


def test_unreachable_model_server_fails_at_start_up(tmp_path):
    with ChatServer() as server:
        url = server.url  # a port that was just free, closed again below
    proc = run_train(*CRAFTER_PPO, "goals=llm", f"goals.base_url={url}", "goals.model=m", root=tmp_path, check=False)
    assert proc.returncode != 0
    assert "goals.base_url" in proc.stderr + proc.stdout and not list(Path(tmp_path).glob("logs/debug/runs/*/checkpoints"))


def test_goals_need_online_training(tmp_path, tiny_file):
    proc = run_train(f"data.path={tiny_file}", "goals=oracle", root=tmp_path, check=False)
    assert proc.returncode != 0 and "need online training" in proc.stderr + proc.stdout


def test_reward_terms_are_checkpointed_with_the_stepper():
    """A resumed run continues the goal counters and RND's predictor and statistics; a run resumed with other
    goals=/intrinsic= settings is refused."""
    import torch

    from toolkit.errors import ToolkitError
    from toolkit.exploration.rnd import RND
    from toolkit.exploration.terms import RNDReward

    def stepper() -> EnvStepper:
        terms = [GoalReward(OracleGoals(), num_envs=1), RNDReward(RND(obs_shape=(3, 40, 40), out_dim=16))]
        return EnvStepper({**SMALL_CRAFTER, "image_size": 40}, num_envs=1, seed=1, processes=False, reward_terms=terms)

    first = stepper()
    for _ in range(6):
        first.step(lambda obs, fresh: np.array([ACTION["do"]]))
    state = first.state_dict()
    second = stepper()
    second.load_state_dict(state)
    assert second.reward_terms[0].metrics() == first.reward_terms[0].metrics()
    frames = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    a, b = first.reward_terms[1].rnd, second.reward_terms[1].rnd
    torch.testing.assert_close(a.reward(frames, update_stats=False), b.reward(frames, update_stats=False))
    third = EnvStepper(SMALL_CRAFTER, num_envs=1, seed=1, processes=False)
    with pytest.raises(ToolkitError, match="intrinsic reward term"):
        third.load_state_dict(state)
    first.close()
