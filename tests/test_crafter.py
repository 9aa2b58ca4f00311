"""The Crafter adapter and its ELLM text on the real crafter package: the observation/action contract,
seeded worlds, a scripted wood -> table -> pickaxe run with its captions, death and the time limit, the
oracle suggester and the Crafter score."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest
from crafter import constants

from toolkit.envs.crafter import ACHIEVEMENTS, CrafterEnv, crafter_score
from toolkit.envs.crafter_text import (OracleGoals, achievement_of, goal_text, nearby_names, state_caption,
                                       transition_caption)
from toolkit.envs.vector import check_env, make_vector_env
from toolkit.errors import ToolkitError

ACTION = {name: i for i, name in enumerate(constants.actions)}
DIRS = {(-1, 0): "move_left", (1, 0): "move_right", (0, -1): "move_up", (0, 1): "move_down"}
TABLE_WOOD = constants.place["table"]["uses"]["wood"]
SMALL = {"area": (32, 32), "image_size": 32}  # world generation ~0.25 s instead of ~1.3 s at 64x64


@pytest.fixture(scope="module")
def env():
    env = CrafterEnv(image_size=48)  # crafter's default world (64x64 tiles)
    yield env
    env.close()


@pytest.fixture(scope="module")
def small():
    env = CrafterEnv(**SMALL, max_episode_steps=80, reward="none")
    yield env
    env.close()


# --- scripted play (reads crafter's world to steer) ----------------------------------------------
def _route(env: CrafterEnv, material: str) -> list[str] | None:
    """The moves of a shortest walk to a tile next to ``material`` ([] when there; None: unreachable)."""
    world, start = env._env._world, tuple(env._env._player.pos)
    came, queue = {start: None}, deque([start])
    while queue:
        pos = queue.popleft()
        if any(world[(pos[0] + dx, pos[1] + dy)][0] == material for dx, dy in DIRS):
            moves = []
            while came[pos] is not None:
                pos, move = came[pos]
                moves.append(move)
            return moves[::-1]
        for d, move in DIRS.items():
            nxt = (pos[0] + d[0], pos[1] + d[1])
            mat, obj = world[nxt]
            if nxt not in came and mat in constants.walkable and obj is None:
                came[nxt] = (pos, move)
                queue.append(nxt)
    return None


def wood_action(env: CrafterEnv) -> str:
    """The next action of a walk to the nearest tree and a hit on it."""
    player = env._env._player
    pos = tuple(player.pos)
    faced = [d for d in DIRS if env._env._world[(pos[0] + d[0], pos[1] + d[1])][0] == "tree"]
    if faced:  # moving into a tree only turns toward it
        return "do" if tuple(player.facing) in faced else DIRS[faced[0]]
    route = _route(env, "tree")
    assert route, "no reachable tree"
    return route[0]


def collect_wood(env: CrafterEnv, wood: int, limit: int = 200) -> list[tuple]:
    """Walk to trees and hit them until the inventory holds ``wood``; every step's (action, step output)."""
    player, out = env._env._player, []
    while player.inventory["wood"] < wood and len(out) < limit:
        action = wood_action(env)
        out.append((action, env.step(ACTION[action])))
    assert player.inventory["wood"] >= wood
    return out


def world_with_tree(env: CrafterEnv, seeds=range(10)) -> int:
    for seed in seeds:
        env.reset(seed=seed)
        if _route(env, "tree") is not None:
            return seed
    raise AssertionError("no seed with a reachable tree")


# --- contract -------------------------------------------------------------------------------------
def test_observation_action_and_info_contract(env):
    obs, info = env.reset(seed=0)
    assert set(obs) == {"rgb_local", "state"} and env.observation_space.contains(obs)
    assert obs["rgb_local"].shape == (48, 48, 3) and obs["rgb_local"].dtype == np.uint8
    assert obs["state"].shape == (16,) and obs["state"].dtype == np.float32
    # crafter's item order from data.yaml: vitals start full, everything else empty
    assert list(obs["state"]) == [constants.items[k]["initial"] for k in constants.items]
    assert env.action_space.n == 17 and env.cameras == ("local",) and env.instruction() is None
    assert info["success"] is False and info["transition"] == ""
    assert info["achievements"] == {a: False for a in ACHIEVEMENTS} and len(ACHIEVEMENTS) == 22
    assert info["caption"].startswith("You see ") and "You have nothing." in info["caption"]
    context = json.loads(info["goal_context"])
    assert set(context) == {"inventory", "nearby", "achievements", "sleeping"} and context["achievements"] == []
    assert "player" not in context["nearby"] and "grass" in context["nearby"]
    for action in (ACTION["noop"], np.int64(ACTION["noop"]), np.array([0.0], np.float32)):
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs) and isinstance(reward, float)
        assert info["success"] is False and not terminated and not truncated and "terminal" not in info
    with pytest.raises(ToolkitError, match="not an action index"):
        env.step(np.array([0.5], np.float32))
    assert env.env_args() == {"env_name": "crafter", "type": "crafter", "env_kwargs": {
        "image_size": 48, "area": [64, 64], "view": [9, 9], "max_episode_steps": 10000, "reward": "crafter",
        "captions": True}}


def test_world_is_a_function_of_the_seed(small):
    def first(seed):
        obs, info = small.reset(seed=seed)
        actions = [ACTION["move_left"], ACTION["do"], ACTION["noop"], ACTION["move_up"]] * 3
        frames = [obs["rgb_local"]] + [small.step(a)[0]["rgb_local"] for a in actions]  # creatures move too
        return np.stack(frames), small._env._sem_view(), info["caption"]

    a, b, again = first(3), first(4), first(3)
    np.testing.assert_array_equal(a[0], again[0])
    np.testing.assert_array_equal(a[1], again[1])
    assert a[2] == again[2]
    assert not np.array_equal(a[1], b[1])
    small.reset()
    fresh = small._env._sem_view()
    small.reset()
    assert not np.array_equal(fresh, small._env._sem_view())  # unseeded resets: new worlds


# --- scripted play --------------------------------------------------------------------------------
def test_collect_wood_place_table_make_pickaxe(env):
    world_with_tree(env)
    steps = collect_wood(env, TABLE_WOOD + 1)
    transitions = [(a, out[4]["transition"]) for a, out in steps if out[4]["transition"]]
    # every hit that adds wood is a "collect wood" (counts rise), the first one also unlocks it (+1 reward)
    assert [t for _, t in transitions] == ["collect wood"] * (TABLE_WOOD + 1)
    assert all(a == "do" for a, _ in transitions)
    first = next(out for _, out in steps if out[4]["transition"])
    assert first[1] == pytest.approx(1.0) and first[4]["achievements"]["collect_wood"]
    assert "You have 1 wood." in first[4]["caption"]
    last = steps[-1][1][4]
    assert f"You have {TABLE_WOOD + 1} wood." in last["caption"]
    assert not last["achievements"]["place_table"]
    context = json.loads(last["goal_context"])
    assert context["inventory"]["wood"] == TABLE_WOOD + 1 and context["achievements"] == ["collect_wood"]
    assert "place table" in OracleGoals().suggest(last["caption"], context)

    # the hit tree left grass in front of the player: the table goes there
    obs, reward, _, _, info = env.step(ACTION["place_table"])
    assert info["transition"] == "place table" and info["achievements"]["place_table"]
    assert reward == pytest.approx(1.0) and obs["state"][list(constants.items).index("wood")] == 1
    context = json.loads(info["goal_context"])
    assert "table" in context["nearby"] and "table" in info["caption"].split(".")[0]
    assert "You have 1 wood." in info["caption"]
    suggested = OracleGoals().suggest(info["caption"], context)
    assert "make wood pickaxe" in suggested and "make wood sword" in suggested
    assert "place table" not in suggested and "collect wood" not in suggested  # unlocked already
    assert "place table" not in OracleGoals(exclude_unlocked=True).suggest("", context)
    assert "collect wood" in OracleGoals(exclude_unlocked=False).suggest("", context)

    _, _, _, _, info = env.step(ACTION["make_wood_pickaxe"])
    assert info["transition"] == "make wood pickaxe" and "You have 1 wood pickaxe." in info["caption"]
    assert [a for a, on in info["achievements"].items() if on] == ["collect_wood", "make_wood_pickaxe",
                                                                    "place_table"]


def test_reward_none_and_time_limit(small):
    world_with_tree(small, seeds=range(20))
    steps = collect_wood(small, 1, limit=small.max_episode_steps - 1)
    assert steps[-1][1][4]["transition"] == "collect wood" and steps[-1][1][1] == 0.0  # crafter's reward: +1
    assert all(out[1] == 0.0 for _, out in steps)
    out = steps[-1][1]
    while not (out[2] or out[3]):
        out = small.step(ACTION["noop"])
    assert out[3] and not out[2] and small._t == small.max_episode_steps


def test_death_terminates(small):
    small.reset(seed=0)
    player = small._env._player
    # starving and parched: crafter takes a health point every ~16 steps, the last one kills
    player.inventory.update(health=1, food=0, drink=0)
    for t in range(40):
        obs, reward, terminated, truncated, info = small.step(ACTION["noop"])
        if terminated:
            break
    assert terminated and not truncated and info["success"] is False and "terminal" not in info
    assert obs["state"][0] == 0  # health
    held = small.step(ACTION["noop"])
    assert held[2] and held[1] == 0.0


def test_vector_env_passes_text_through():
    cfg = {"_target_": "toolkit.envs.crafter.CrafterEnv", **SMALL, "area": [16, 16], "max_episode_steps": 2}
    spec = check_env(cfg)
    assert spec.action_space.n == 17 and spec.env_args["env_kwargs"]["area"] == [16, 16]
    envs = make_vector_env(cfg, 2, processes=False)
    try:
        _, info = envs.reset(seed=[0, 1])
        assert all(isinstance(c, str) and c.startswith("You see") for c in info["caption"])
        for _ in range(2):
            _, _, _, truncated, info = envs.step(np.array([0, 0]))
        assert truncated.all() and all(isinstance(json.loads(g), dict) for g in info["goal_context"])
        assert info["achievements"]["collect_wood"].dtype == bool
    finally:
        envs.close()


# --- text -----------------------------------------------------------------------------------------
def test_captions_are_deterministic_and_name_low_vitals():
    inventory = dict(health=9, food=2, drink=9, energy=3, sapling=1, wood=2, stone=0)
    caption = state_caption(["grass", "tree", "cow"], inventory)
    assert caption == "You see grass, tree, cow. You have 1 sapling, 2 wood. You feel hungry, sleepy."
    assert state_caption(["grass", "tree", "cow"], dict(inventory)) == caption
    assert state_caption([], {"health": 9}, sleeping=True) == "You see nothing. You have nothing. You are sleeping."
    assert transition_caption({"collect_wood": 1, "eat_cow": 0}, {"collect_wood": 2, "eat_cow": 1,
                                                                    "wake_up": 0}) == ["collect wood", "eat cow"]
    assert transition_caption({"collect_wood": 1}, {"collect_wood": 1}) == []


def test_nearby_is_the_local_view_without_the_player():
    names = [None, "water", "grass", "tree", "player", "cow"]
    semantic = np.full((20, 20), 2)
    semantic[10, 10] = 4  # the player
    semantic[14, 10] = 3  # 4 tiles right: in the 9x7 view
    semantic[10, 14] = 1  # 4 tiles down: outside (3 rows each way)
    semantic[5, 5] = 5
    assert nearby_names(semantic, (10, 10), (9, 7), names) == ["grass", "tree"]
    assert nearby_names(semantic, (1, 1), (9, 7), names) == ["grass"]  # clipped at the world's edge


def test_goal_strings_round_trip_and_name_unknown_ones():
    assert [achievement_of(goal_text(a)) for a in ACHIEVEMENTS] == list(ACHIEVEMENTS)
    assert goal_text("make_wood_pickaxe") == "make wood pickaxe" and achievement_of("wake up") == "wake_up"
    with pytest.raises(ToolkitError, match="'build house'.*collect wood"):
        achievement_of("build house")
    with pytest.raises(ToolkitError, match="'collect_gold'"):
        goal_text("collect_gold")
    with pytest.raises(ToolkitError, match="'chop tree'"):
        OracleGoals(goals=["collect wood", "chop tree"])


def _context(nearby=("grass",), unlocked=(), sleeping=False, **items):
    inventory = {k: v["initial"] for k, v in constants.items.items()} | items
    return {"inventory": inventory, "nearby": list(nearby), "achievements": list(unlocked), "sleeping": sleeping}


def test_oracle_follows_crafters_recipes():
    oracle = OracleGoals()
    oracle.check()
    assert oracle.suggest("", _context(["grass", "tree"])) == ["collect sapling", "collect wood"]
    short = _context(["grass", "tree"], wood=TABLE_WOOD - 1)
    assert "place table" not in oracle.suggest("", short) and "make wood pickaxe" not in oracle.suggest("", short)
    assert oracle.suggest("", _context(["grass"], wood=TABLE_WOOD)) == ["collect sapling", "place table"]
    at_table = oracle.suggest("", _context(["grass", "table"], wood=1))
    assert "make wood pickaxe" in at_table and "make stone pickaxe" not in at_table
    assert "collect stone" in oracle.suggest("", _context(["stone"], wood_pickaxe=1))
    assert "collect stone" not in oracle.suggest("", _context(["stone"]))
    assert oracle.suggest("", _context(["water", "cow", "zombie", "plant"])) == [
        "collect drink", "defeat zombie", "eat cow", "eat plant"]
    assert oracle.suggest("", _context(["grass"], sapling=1)) == ["collect sapling", "place plant"]
    assert oracle.suggest("", _context(["sand"], energy=2)) == ["wake up"]
    assert oracle.suggest("", _context(["sand"], sleeping=True)) == ["wake up"]
    rich = _context(["grass", "tree", "table", "furnace"], unlocked=["collect_wood"], wood=9, coal=9, iron=9)
    assert "collect wood" not in oracle.suggest("", rich) and "make iron pickaxe" in oracle.suggest("", rich)
    assert "collect wood" in OracleGoals(exclude_unlocked=False).suggest("", rich)
    # a restricted vocabulary only ever suggests its own goals
    assert OracleGoals(goals=["make iron sword", "eat cow"]).suggest("", rich) == ["make iron sword"]


def test_oracle_covers_every_achievement():
    everything = _context(list(constants.materials) + ["cow", "zombie", "skeleton", "plant"], sleeping=True,
                          **{k: 9 for k in constants.items})
    assert OracleGoals().suggest("", everything) == [goal_text(a) for a in ACHIEVEMENTS]


def test_crafter_score():
    assert crafter_score({}) == 0.0 and crafter_score({a: 0.0 for a in ACHIEVEMENTS}) == 0.0
    assert crafter_score({a: 100.0 for a in ACHIEVEMENTS}) == pytest.approx(100.0)
    assert crafter_score({"collect_wood": 100.0}) == pytest.approx(101 ** (1 / 22) - 1)  # 0.2334...
    assert crafter_score({"collect_wood": 100.0}) == pytest.approx(0.23340, abs=1e-5)
    by_hand = math.exp((math.log(51) + math.log(11) + 20 * math.log(1)) / 22) - 1
    assert crafter_score({"collect_wood": 50.0, "place_table": 10.0}) == pytest.approx(by_hand)
    with pytest.raises(ToolkitError, match="'collect_gold'"):
        crafter_score({"collect_gold": 1.0})
    with pytest.raises(ToolkitError, match="collect_wood.*percentage"):
        crafter_score({"collect_wood": 150.0})


def test_bad_config_names_the_field():
    with pytest.raises(ToolkitError, match="env.reward='sparse'"):
        CrafterEnv(reward="sparse", **SMALL)


def test_config_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import ROOT
    from toolkit.config import check_types

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["env=crafter", "env.image_size=32"])
    check_types(cfg.env, "env")
    assert cfg.dataset_name == "crafter_32px" and cfg.env.reward == "crafter"
