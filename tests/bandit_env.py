"""A contextual bandit as a real toolkit env (``toolkit.envs.base.RobotEnv``), for online-RL tests: state only, no
camera, one reward for the right action. Used through ``env._target_=bandit_env.BanditEnv`` (tests/ is on the path).

Each episode shows one of ``num_contexts`` contexts, drawn from the reset seed: ``state`` is its one-hot followed
by the episode's elapsed fraction ``t / max_episode_steps`` (so states of one episode differ, and a value function
has something to tell apart). The right action for context ``c``:

- discrete (``Discrete(num_contexts)``): action ``c``;
- continuous (``Box(-1, 1, (action_dim,))``): every component on the context's side, ``+`` for even ``c``, ``-``
  for odd ``c``.

The right action gives reward 1 and ``success`` (which ends the episode when ``terminate_on_success``); a wrong one
gives 0. With ``max_episode_steps=1`` and ``terminal_time_limit=true`` every episode is one decision that ends
(terminated, never truncated): a plain bandit, no bootstrapping. With ``terminal_time_limit=false`` the time limit
truncates, as a simulator's does. ``instructions``: ``instruction()`` names the context (``"context 1"``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import gymnasium as gym
import numpy as np

from toolkit.envs.base import RobotEnv


class BanditEnv(RobotEnv):
    def __init__(self, discrete: bool = True, num_contexts: int = 2, action_dim: int = 1, max_episode_steps: int = 1,
                 terminate_on_success: bool = True, terminal_time_limit: bool = True, instructions: bool = False) -> None:
        super().__init__(max_episode_steps, terminate_on_success)
        self.discrete, self.num_contexts, self.terminal_time_limit = discrete, num_contexts, terminal_time_limit
        self.instructions = instructions
        self.action_space = gym.spaces.Discrete(num_contexts) if discrete else \
            gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.observation_space = gym.spaces.Dict(
            {"state": gym.spaces.Box(0.0, 1.0, (num_contexts + 1,), np.float32)})
        self.context = 0

    def _obs(self) -> dict[str, Any]:
        state = np.zeros(self.num_contexts + 1, np.float32)
        state[self.context] = 1.0
        state[-1] = self._t / self.max_episode_steps
        return {"state": state}

    def right(self, action: np.ndarray) -> bool:
        if self.discrete:
            return int(np.asarray(action).reshape(-1)[0]) == self.context
        sign = 1.0 if self.context % 2 == 0 else -1.0
        return bool((np.asarray(action) * sign > 0).all())

    def _reset(self, seed: int | None) -> dict[str, Any]:
        self.context = int(self.np_random.integers(self.num_contexts))
        return self._obs()

    def _step(self, action: np.ndarray):
        success = self.right(action)
        self._t += 1  # the base class counts the step after _step: the observation shows the step taken
        obs = self._obs()
        self._t -= 1
        return obs, float(success), success, {}

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if truncated and self.terminal_time_limit:  # the bandit's decision is over: a true end, not a time limit
            terminated, truncated = True, False
            self._last = (obs, reward, terminated, truncated, info)
        return obs, reward, terminated, truncated, info

    def instruction(self) -> str | None:
        """With ``instructions``: the episode's context in words (``"context 1"``)."""
        return f"context {self.context}" if self.instructions else None

    def env_args(self) -> dict[str, Any]:
        return {"env_name": type(self).__name__, "type": "toolkit",
                "env_kwargs": {"discrete": self.discrete, "num_contexts": self.num_contexts}}


class CrashingBanditEnv(BanditEnv):
    """The bandit whose simulator process dies (SIGKILL) in the episode reset with ``crash_at_seed``: when resetting
    (``crash_in="reset"``) or at its first step (``"step"``). Only inside a vector env's worker process."""

    def __init__(self, crash_at_seed: int, crash_in: str = "reset", **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at_seed, self.crash_in, self.seed_ = crash_at_seed, crash_in, None

    def _die_here(self) -> None:
        import multiprocessing

        if self.seed_ == self.crash_at_seed and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def _reset(self, seed: int | None) -> dict[str, Any]:
        self.seed_ = seed
        if self.crash_in == "reset":
            self._die_here()
        return super()._reset(seed)

    def _step(self, action: np.ndarray):
        if self.crash_in == "step":
            self._die_here()
        return super()._step(action)


def __getattr__(name: str):
    """``bandit_env.KillAtStep`` (a Lightning callback), built on first use: the env's worker processes import this
    module and should not pay for importing Lightning."""
    if name != "KillAtStep":
        raise AttributeError(name)
    import lightning as L

    class KillAtStep(L.Callback):
        """SIGKILLs its own process when the training step ``step`` is about to start: a machine dying mid-run,
        after the checkpoints of the steps before were written (checkpoint callbacks run at the end of a step)."""

        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    globals()["KillAtStep"] = KillAtStep
    return KillAtStep
