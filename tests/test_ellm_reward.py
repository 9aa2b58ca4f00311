"""ELLM's reward rule with the real all-MiniLM-L6-v2 (offline): semantic matching at a threshold, once per goal
per episode, envs independent."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from toolkit.encoders.language import MiniLMEncoder
from toolkit.errors import ToolkitError
from toolkit.exploration.ellm import ELLMReward

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def test_exact_match_rewarded_unrelated_not(minilm):
    r = ELLMReward(minilm, num_envs=1)
    assert r.reward(0, ["eat cow"], ["collect wood", "place table"]) == (0.0, [])
    assert r.reward(0, ["collect wood"], ["collect wood", "place table"]) == (1.0, ["collect wood"])
    assert r.reward(0, [], ["place table"]) == (0.0, [])  # nothing achieved this step
    assert r.reward(0, ["place table"], []) == (0.0, [])  # achieved, but not suggested: ELLM rewards suggestions only


def test_once_per_goal_per_episode(minilm):
    r = ELLMReward(minilm, num_envs=1)
    goals = ["collect wood", "place table"]
    assert r.reward(0, ["collect wood"], goals) == (1.0, ["collect wood"])
    assert r.reward(0, ["collect wood"], goals) == (0.0, [])  # already rewarded this episode
    assert r.reward(0, ["collect wood", "place table"], goals) == (1.0, ["place table"])
    r.reset(0)
    assert r.reward(0, ["collect wood"], goals) == (1.0, ["collect wood"])
    stats = r.stats()
    assert stats["goals_suggested"] == 8 and stats["goals_achieved"] == 3
    assert stats["achieved/collect wood"] == 2 and stats["achieved/place table"] == 1


def test_decision_matches_hand_computed_similarity(minilm):
    goal, caption = "place table", "place a table"  # a near-paraphrase
    a, b = minilm.encode([goal, caption])
    sim = float(a @ b / (a.norm() * b.norm()))
    assert 0.9 < sim < 0.99  # MiniLM: close, not identical
    for threshold, expected in [(0.99, False), (0.9, True), (sim - 1e-4, True), (sim + 1e-4, False)]:
        r = ELLMReward(minilm, threshold=threshold)
        assert r.reward(0, [caption], [goal]) == ((1.0, [goal]) if expected else (0.0, [])), threshold
    torch.testing.assert_close(ELLMReward(minilm).similarity([goal], [caption]), torch.tensor([[sim]]))


def test_envs_are_independent_and_vectorized(minilm):
    r = ELLMReward(minilm, num_envs=3)
    goals = [["collect wood"], ["collect wood"], ["eat cow"]]
    np.testing.assert_array_equal(r.rewards([["collect wood"], [], ["collect wood"]], goals), [1.0, 0.0, 0.0])
    # env 0 was rewarded for "collect wood" this episode; env 1 was not, and gets it now
    np.testing.assert_array_equal(r.rewards([["collect wood"], ["collect wood"], ["eat cow"]], goals), [0.0, 1.0, 1.0])
    r.reset(1)  # only env 1's episode restarts
    np.testing.assert_array_equal(r.rewards([["collect wood"]] * 3, [["collect wood"]] * 3), [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="one list per env"):
        r.rewards([[]], [[]])


def test_each_string_embedded_once(minilm):
    calls: list[list[str]] = []

    class Counting:
        def encode(self, texts):
            calls.append(list(texts))
            return minilm.encode(texts) * 3.0  # not unit norm: the reward normalizes

    r = ELLMReward(Counting(), num_envs=2)
    r.rewards([["collect wood"], ["collect wood"]], [["collect wood", "eat cow"], ["collect wood"]])
    r.reset(0)
    r.reset(1)
    assert r.rewards([["collect wood"], ["eat cow"]], [["collect wood"], ["eat cow"]]).tolist() == [1.0, 1.0]
    assert calls == [["collect wood", "eat cow"]]


def test_threshold_outside_cosine_range_is_a_user_error(minilm):
    with pytest.raises(ToolkitError, match="goals.threshold"):
        ELLMReward(minilm, threshold=1.5)
