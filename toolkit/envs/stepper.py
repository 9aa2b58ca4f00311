"""The simulator stepped by the current policy, for online training: one vector env, each finished episode
reset at once from the next training seed, episode statistics, and restarts when a simulator process dies.

Online algorithms (PPO's rollout buffer, online IQL's replay buffer) call ``step(action_fn)`` and get one
transition per env; evaluation rollouts (``toolkit.envs.rollout``) keep their own loop over fixed seeds.

Reward terms (``reward_terms``: ELLM's goal reward, RND; ``toolkit.exploration``) add an intrinsic reward to the
env's: each has ``on_reset(mask, info)`` (episodes started, with the reset's info), ``on_step(transition) ->
[E]`` rewards, ``metrics()``, ``state_dict()`` / ``load_state_dict()``. The algorithms see the sum; the episode
statistics keep the env's return and the intrinsic return apart.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from toolkit.envs.rollout import WORKER_DIED, achievement_flags, achievement_metrics
from toolkit.errors import ToolkitError
from toolkit.envs.vector import make_vector_env, reset_some, update_instructions

log = logging.getLogger(__name__)


class EnvStepper:
    """``num_envs`` copies of ``env_cfg``; episode ``k`` of training is reset with seed ``seed + k``.

    ``step(action_fn)``: ``action_fn(obs, fresh)`` gets the current observations (with ``instruction``) and
    the mask of envs whose episode just started, returns actions ``[E, ...]``; the envs step; finished
    episodes are recorded and reset. Returns the transition: ``obs`` (what the actions saw), ``action``,
    ``reward``, ``terminated``, ``truncated``, ``next_obs`` (the step's true next observation, before any
    reset), ``success``.
    """

    def __init__(self, env_cfg: Any, num_envs: int, seed: int, stats_window: int = 100, processes: bool = True,
                 reward_terms: Sequence[Any] = ()) -> None:
        """``processes``: one simulator process per env (``make_vector_env``, for more than one env); False: every
        env in this process, stepped one after the other (no inter-process round trip per step: faster for
        simulators that step in well under a millisecond, e.g. grid worlds without rendering)."""
        self.env_cfg, self.num_envs, self.seed, self.processes = env_cfg, num_envs, seed, processes
        self.rank, self.world_size = 0, 1  # set by the datamodule under DDP
        self.env_steps = 0  # transitions taken, over all envs (restored on resume)
        self.episodes_started = 0  # the next episode's seed is seed + episodes_started
        self.episodes_done = 0
        self.recent: deque[dict[str, float]] = deque(maxlen=stats_window)  # finished episodes' stats
        # the achievements each recent episode unlocked (envs whose info has ``achievements``: Crafter)
        self.recent_unlocked: deque[list[str]] = deque(maxlen=stats_window)
        self.achievement_names: list[str] | None = None
        self.reward_terms = list(reward_terms)
        self.dropped_episodes = 0  # lost to simulator crashes
        self.restarts = 0
        self._envs = None
        self._obs: dict[str, np.ndarray] | None = None
        self._fresh = np.ones(num_envs, bool)
        self._instructions = np.full(num_envs, None, dtype=object)
        self._gives_instructions: bool | None = None  # known after the first reset; False: never asked again
        self._return = np.zeros(num_envs)
        self._intrinsic_return = np.zeros(num_envs)
        self._succeeded = np.zeros(num_envs, bool)  # at any step (an env may go on after success)
        self._length = np.zeros(num_envs, int)

    # --- episodes ------------------------------------------------------------------------------
    def _start(self, mask: np.ndarray) -> None:
        # several processes (DDP) interleave their episodes: process r of w runs seeds seed + k * w + r
        seeds = [self.seed + (self.episodes_started + i) * self.world_size + self.rank for i in range(int(mask.sum()))]
        self.episodes_started += len(seeds)
        info: dict[str, Any] = {}
        self._obs = reset_some(self._envs, mask, seeds, self._obs, info)
        for term in self.reward_terms:
            term.on_reset(mask, info)
        if self._gives_instructions is not False:  # each call is a round trip to every simulator process
            update_instructions(self._envs, mask, self._instructions)
            if self._gives_instructions is None:
                self._gives_instructions = any(i is not None for i in self._instructions)
        self._fresh |= mask
        self._return[mask], self._intrinsic_return[mask], self._length[mask] = 0.0, 0.0, 0
        self._succeeded[mask] = False

    def _open(self) -> None:
        self._envs = make_vector_env(self.env_cfg, self.num_envs, self.processes)
        self._obs = None
        self._start(np.ones(self.num_envs, bool))

    @property
    def fresh(self) -> np.ndarray:
        """Envs whose current observation is the first of an episode (no action taken yet)."""
        return self._fresh.copy()

    def observation(self) -> dict[str, Any]:
        """The current observations of every env (``instruction`` included)."""
        if self._envs is None:
            self._open()
        instructions = self._instructions.copy()
        for term in self.reward_terms:  # goals.condition: the goals suggested for each env's state
            if getattr(term, "condition", False):
                instructions = term.current.texts()
        return {**self._obs, "instruction": instructions}

    # --- stepping ------------------------------------------------------------------------------
    def step(self, action_fn: Callable[[dict[str, Any], np.ndarray], np.ndarray]) -> dict[str, Any]:
        while True:
            obs = self.observation()
            fresh = self._fresh.copy()
            try:
                action = np.asarray(action_fn(obs, fresh))
                self._fresh[:] = False
                next_obs, reward, terminated, truncated, info = self._envs.step(action)
                break
            except WORKER_DIED:
                self._restart()
        reward = np.asarray(reward, np.float64)
        self.env_steps += self.num_envs
        self._return += reward
        self._length += 1
        ended = terminated | truncated
        success = np.asarray(info["success"], bool)
        self._succeeded |= success
        transition = {"obs": obs, "action": action, "reward": reward, "terminated": np.asarray(terminated, bool),
                      "truncated": np.asarray(truncated, bool), "next_obs": next_obs, "success": success,
                      "info": info, "env_reward": reward}
        if self.reward_terms:
            intrinsic = sum(np.asarray(term.on_step(transition), np.float64) for term in self.reward_terms)
            self._intrinsic_return += intrinsic
            transition["reward"] = reward + intrinsic
        unlocked = None
        if ended.any() and "achievements" in info:
            self.achievement_names, unlocked = achievement_flags(info["achievements"])
        for i in np.flatnonzero(ended):
            self.recent.append({"return": float(self._return[i]), "length": float(self._length[i]),
                                "success": float(self._succeeded[i]), "intrinsic_return": float(self._intrinsic_return[i])})
            if unlocked is not None:
                self.recent_unlocked.append([n for n, u in zip(self.achievement_names, unlocked[i]) if u])
            self.episodes_done += 1
        self._obs = next_obs
        if ended.any():
            try:
                self._start(ended)
            except WORKER_DIED:  # died while resetting: the unfinished episodes end at this transition (a cut, as a
                transition["truncated"] = transition["truncated"] | ~ended  # time limit is: not the task's end)
                self._restart(dropped=int((~ended).sum()))
        return transition

    def _restart(self, dropped: int | None = None) -> None:
        """A simulator process died: the partial episodes (``dropped``, by default every env's, since a vector env
        steps together) are dropped from the statistics, the envs restart and fresh episodes begin."""
        dropped = self.num_envs if dropped is None else dropped
        self.dropped_episodes += dropped
        self.restarts += 1
        log.warning(f"a simulator process died during online training: {dropped} partial episode(s) dropped, "
                    f"restarting the envs")
        try:
            self._envs.close(terminate=True)
        except Exception:  # noqa: BLE001: already broken
            pass
        self._envs = None
        self._open()

    def episode_stats(self) -> dict[str, float]:
        """Mean success / return / length of the last ``stats_window`` finished episodes ({} before the first);
        with reward terms also their intrinsic return and the terms' own metrics; with achievements (Crafter)
        the Crafter score, the distinct achievements unlocked and their mean number per episode."""
        stats = {}
        if self.recent:
            keys = ("success", "return", "length") + (("intrinsic_return",) if self.reward_terms else ())
            stats = {k: float(np.mean([e.get(k, 0.0) for e in self.recent])) for k in keys}
        if self.recent_unlocked:
            names = self.achievement_names or sorted({n for e in self.recent_unlocked for n in e})
            flags = np.array([[n in e for n in names] for e in self.recent_unlocked], bool)
            stats.update({k: v for k, v in achievement_metrics(names, flags, "").items() if "/" not in k})
        for term in self.reward_terms:
            stats.update(term.metrics())
        return stats

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps, "episodes_started": self.episodes_started,
                "episodes_done": self.episodes_done, "recent": list(self.recent),
                "recent_unlocked": list(self.recent_unlocked), "achievement_names": self.achievement_names,
                "dropped_episodes": self.dropped_episodes,
                "reward_terms": [term.state_dict() for term in self.reward_terms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters and statistics continue; episodes that were running when the checkpoint was written are
        not restored (simulator state is not saved): fresh ones start from the next seeds."""
        self.env_steps, self.episodes_started = int(state["env_steps"]), int(state["episodes_started"])
        self.episodes_done, self.dropped_episodes = int(state["episodes_done"]), int(state["dropped_episodes"])
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.recent_unlocked.clear()
        self.recent_unlocked.extend(state.get("recent_unlocked", []))
        self.achievement_names = state.get("achievement_names")
        saved = state.get("reward_terms", [])
        if len(saved) != len(self.reward_terms):
            raise ToolkitError(f"the checkpoint has {len(saved)} intrinsic reward term(s), this run {len(self.reward_terms)}: "
                               f"resume with the same goals= and intrinsic= settings")
        for term, term_state in zip(self.reward_terms, saved):
            term.load_state_dict(term_state)
        if self._envs is not None:
            self._envs.close()
            self._envs = None

    def close(self) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None
