"""The environment contract every simulator adapter follows.

Observations are dicts ``{"rgb_<camera>": HxWx3 uint8, "state": float32 [D], "instruction": str}``
(``instruction`` only where the task has one); ``info["success"]`` is a bool on every step.
Episodes end on success (when ``terminate_on_success``), in a terminal state that is no success (``_step``
returns ``info["terminal"] = True``: a death, a failed mission) or after ``max_episode_steps``.

``reset(seed=s)`` must make the episode a pure function of ``s`` (object positions, goals): the
collection uses seeds ``data.seed + i`` and evaluation uses ``env.eval_seed + k``, two disjoint ranges,
so evaluation never sees a training configuration.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from toolkit.errors import ToolkitError


def discrete_action_index(action: Any, n: int, env_name: str) -> int:
    """A discrete action as policies and episode files give it (an int, a numpy integer, or a [1] array holding
    the index as a float) -> the index; anything else (a vector, a fraction, out of range) a ToolkitError."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.size != 1 or not np.isfinite(a[0]) or a[0] != np.rint(a[0]) or not 0 <= a[0] < n:
        raise ToolkitError(f"{env_name} action {np.asarray(action).tolist()!r} is not an action index in [0, {n}): "
                           f"give one integer (an int, or a [1] array holding it as a float)")
    return int(a[0])


class RobotEnv(gym.Env):
    """Base class: subclasses implement ``_reset(seed)`` and ``_step(action)``; this class owns the
    episode bookkeeping (time limit, termination on success, holding still after the end)."""

    metadata = {"render_modes": ["rgb_array"]}
    cameras: tuple[str, ...] = ()

    def __init__(self, max_episode_steps: int, terminate_on_success: bool = True) -> None:
        self.max_episode_steps = max_episode_steps
        self.terminate_on_success = terminate_on_success
        self._t = 0
        self._done = True
        self._last: tuple | None = None

    # --- to implement ---------------------------------------------------------------------------
    def _reset(self, seed: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def _step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Returns (obs, reward, success, info); ``info["terminal"] = True`` ends the episode without success
        (the key is consumed: it is not in the info ``step`` returns)."""
        raise NotImplementedError

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state."""
        raise ToolkitError(f"{type(self).__name__} has no expert: collection and DAgger need one.")

    def instruction(self) -> str | None:
        """The current episode's language instruction (valid after ``reset``); None where the task has none.
        Collection stores it as the episode's ``instruction`` attribute."""
        return None

    def segments(self) -> list[dict[str, Any]] | None:
        """Sub-skill segments of the episode so far (``{"start", "end", "instruction"}``, ``end`` the step
        whose action completed the sub-instruction); None where the task has no sub-instructions.
        Collection stores them as the episode's ``segments`` attribute (used by relabeling)."""
        return None

    def sub_instructions(self) -> list[str] | None:
        """The current mission's sub-instructions, in the mission's order; None where it has none."""
        return None

    def env_args(self) -> dict[str, Any]:
        """What is needed to re-create this env, stored in the episode file (robomimic's env_args)."""
        return {"env_name": type(self).__name__, "type": "toolkit", "env_kwargs": {}}

    # --- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._done = False
        obs = self._reset(seed)
        return obs, {"success": False}

    def step(self, action):
        # A vector env without autoreset steps every sub-env until all are done: a finished
        # episode holds still (no simulation, no rendering) instead of running past its end.
        if self._done:
            obs, _, terminated, truncated, info = self._last
            return obs, 0.0, terminated, truncated, info
        obs, reward, success, info = self._step(np.asarray(action, dtype=np.float32))
        self._t += 1
        info["success"] = bool(success)
        terminated = bool(success and self.terminate_on_success) or bool(info.pop("terminal", False))
        truncated = self._t >= self.max_episode_steps and not terminated
        self._done = terminated or truncated
        self._last = (obs, reward, terminated, truncated, info)
        return obs, float(reward), terminated, truncated, info
