"""Crafter adapter (Hafner 2021): the local top-down view, the inventory as state, 17 discrete actions,
22 achievements, and worlds that are a pure function of the seed. With ``captions`` the info carries the
text ELLM needs (toolkit.envs.crafter_text): the state caption, the goals the step achieved, and a JSON
context for goal suggesters.

Seeding: crafter's ``reset()`` takes no seed; it increments ``env._episode`` and generates the world from
``hash((env._seed, env._episode)) % (2**31 - 1)`` (integer tuples hash the same in every process, whatever
PYTHONHASHSEED). ``reset(seed=s)`` sets ``_seed = s`` and ``_episode = 0`` first, so the world (and its
creatures' random moves, drawn from the same generator) depends on ``s`` alone; ``reset()`` with no seed
draws ``_seed`` from the env's ``np_random`` (fresh worlds; after a seeded reset the following unseeded ones
continue that seed's stream, as gymnasium envs do).

Speed: crafter's world generation calls opensimplex's noise per tile; opensimplex compiles it with numba when
numba is installed (the ``crafter`` extra installs it): the same worlds, ~0.1 s per reset instead of ~1.4 s.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Any, Mapping

import crafter
import gymnasium as gym
import numpy as np

from toolkit.envs.base import RobotEnv, discrete_action_index
from toolkit.envs.crafter_text import (ACHIEVEMENTS, ITEMS, goal_context, nearby_names, semantic_names,
                                       state_caption, transition_caption)
from toolkit.errors import ToolkitError

if importlib.util.find_spec("numba") is None:
    warnings.warn("numba is not installed, so crafter's world generation takes ~1.4 s per reset instead of ~0.1 s "
                  "(the same worlds): pip install numba, or the toolkit's crafter extra", stacklevel=2)

CAMERA = "local"  # crafter's egocentric view (with its inventory strip); obs key rgb_local
REWARDS = ("crafter", "none")

__all__ = ["ACHIEVEMENTS", "CrafterEnv", "crafter_score"]


def crafter_score(success_rates: Mapping[str, float]) -> float:
    """The Crafter paper's score: ``exp(mean_i ln(1 + s_i)) - 1`` over all 22 achievements, ``s_i`` the
    success rate in percent (0..100; an achievement not given counts as 0). Returned in percent."""
    unknown = sorted(set(success_rates) - set(ACHIEVEMENTS))
    if unknown:
        raise ToolkitError(f"crafter_score: unknown achievement(s) {', '.join(map(repr, unknown))}; "
                           f"valid: {', '.join(ACHIEVEMENTS)}")
    for name, rate in success_rates.items():
        if not 0.0 <= float(rate) <= 100.0:
            raise ToolkitError(f"crafter_score: success rate of {name} is {rate}, expected a percentage in [0, 100]")
    logs = [math.log1p(float(success_rates.get(a, 0.0))) for a in ACHIEVEMENTS]
    return math.exp(sum(logs) / len(logs)) - 1.0


class CrafterEnv(RobotEnv):
    """Crafter through the toolkit's env contract.

    Observation: ``rgb_local`` (image_size x image_size x 3 uint8, crafter's own frame: the local view and
    the inventory strip), ``state`` = the inventory counts (float32 [16], crafter's item order ``ITEMS``).
    Actions: ``Discrete(17)`` in crafter's order; ``step`` takes an int, a numpy integer, or a [1] array
    holding the index as a float. Episodes end on death (terminated) or after ``max_episode_steps``
    (truncated); there is no success (``info["success"]`` is always False).

    Info on every step: ``achievements`` (name -> unlocked this episode, all 22); with ``captions`` also
    ``caption`` (str), ``transition`` (goal strings the step achieved, joined with ", "; "" if none) and
    ``goal_context`` (JSON: inventory, nearby, achievements unlocked, sleeping). The reset info has them too.
    """

    def __init__(
        self,
        image_size: int = 64,
        area: tuple[int, int] = (64, 64),
        view: tuple[int, int] = (9, 9),
        max_episode_steps: int = 10000,
        reward: str = "crafter",
        captions: bool = True,
    ) -> None:
        if reward not in REWARDS:
            raise ToolkitError(f"env.reward={reward!r} is not a Crafter reward: use one of {', '.join(REWARDS)} "
                               f"(crafter: +1 per first unlock and +-0.1 per health point; none: always 0)")
        super().__init__(int(max_episode_steps), terminate_on_success=False)
        self.image_size, self.reward, self.captions = int(image_size), reward, captions
        self.area, self.view = tuple(int(a) for a in area), tuple(int(v) for v in view)
        self.cameras = (CAMERA,)
        # seed=0: replaced before every reset (see the module docstring)
        self._env = crafter.Env(area=self.area, view=self.view, size=(self.image_size, self.image_size),
                                length=self.max_episode_steps, seed=0)
        self._names = semantic_names(self._env)
        self._counts: dict[str, int] = {}
        self.action_space = gym.spaces.Discrete(len(crafter.constants.actions))
        self.observation_space = gym.spaces.Dict({
            f"rgb_{CAMERA}": gym.spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8),
            "state": gym.spaces.Box(0.0, np.array([crafter.constants.items[k]["max"] for k in ITEMS], np.float32),
                                    (len(ITEMS),), np.float32),
        })

    # --- helpers --------------------------------------------------------------------------------
    def _obs(self, frame: np.ndarray) -> dict[str, Any]:
        inventory = self._env._player.inventory
        state = np.array([inventory[k] for k in ITEMS], np.float32)
        return {f"rgb_{CAMERA}": np.ascontiguousarray(frame, dtype=np.uint8), "state": state}

    def _info(self, counts: Mapping[str, int], semantic: np.ndarray | None = None) -> dict[str, Any]:
        """Achievement flags and, with captions, the text fields for the current state (``semantic``:
        crafter's semantic map of it, when the step already made one)."""
        info: dict[str, Any] = {"achievements": {a: counts[a] > 0 for a in ACHIEVEMENTS}}
        if self.captions:
            player = self._env._player
            semantic = self._env._sem_view() if semantic is None else semantic
            nearby = nearby_names(semantic, player.pos, self._env._local_view._grid, self._names)
            info["caption"] = state_caption(nearby, player.inventory, player.sleeping)
            info["transition"] = ", ".join(transition_caption(self._counts, counts))
            info["goal_context"] = goal_context(player.inventory, nearby,
                                                [a for a in ACHIEVEMENTS if counts[a] > 0], player.sleeping)
        return info

    def _action_index(self, action: Any) -> int:
        return discrete_action_index(action, int(self.action_space.n), "Crafter")

    # --- RobotEnv -------------------------------------------------------------------------------
    def _reset(self, seed: int | None) -> dict[str, Any]:
        self._env._seed = int(self.np_random.integers(2**31 - 1)) if seed is None else int(seed)
        self._env._episode = 0
        frame = self._env.reset()
        self._counts = dict(self._env._player.achievements)
        return self._obs(frame)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        info.update(self._info(self._counts))
        return obs, info

    def _step(self, action: np.ndarray):
        frame, reward, _, raw = self._env.step(self._action_index(action))
        counts = raw["achievements"]
        info = self._info(counts, raw["semantic"])
        self._counts = dict(counts)
        # crafter's done also covers its own length limit (ours, truncation): death is discount 0
        info["terminal"] = raw["discount"] == 0
        return self._obs(frame), float(reward) if self.reward == "crafter" else 0.0, False, info

    def env_args(self) -> dict[str, Any]:
        return {
            "env_name": "crafter",
            "type": "crafter",
            "env_kwargs": {"image_size": self.image_size, "area": list(self.area), "view": list(self.view),
                           "max_episode_steps": self.max_episode_steps, "reward": self.reward,
                           "captions": self.captions},
        }

    def instruction(self) -> str | None:
        return None
