"""Policy rollouts in vector envs, and the Lightning callback that runs them at validation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig

from toolkit.envs.vector import reset_some, update_instructions


def run_rollouts(policy: Any, envs, num_episodes: int, seed: int | Sequence[int], video_episodes: int = 0) -> dict[str, Any]:
    """Run ``num_episodes`` episodes of ``policy`` (anything with ``reset(mask)``/``act(obs)``).

    Episode ``k`` is reset with seed ``seed + k`` (or ``seed[k]`` for a list of seeds), so every evaluation
    sees the same configurations.
    The policy sees each env's ``instruction()`` as ``obs["instruction"]``. Returns per-episode
    ``success``, ``return``, ``length``, ``instruction``, the frames of the first ``video_episodes``
    episodes, and the env steps/s.
    """
    n = envs.num_envs
    seed_of = (lambda k: seed + k) if isinstance(seed, int) else (lambda k: int(seed[k]))
    camera_key = next((k for k in envs.single_observation_space.spaces if k.startswith("rgb")), None)
    results = {"success": np.zeros(num_episodes, bool), "return": np.zeros(num_episodes), "length": np.zeros(num_episodes, int),
               "instruction": np.full(num_episodes, None, dtype=object)}
    instructions = np.full(n, None, dtype=object)
    frames: dict[int, list[np.ndarray]] = {k: [] for k in range(video_episodes)}
    episode_of = np.full(n, -1)
    next_episode, steps, t0 = 0, 0, time.perf_counter()

    def start(mask: np.ndarray, obs: dict | None):
        nonlocal next_episode
        episodes = np.arange(next_episode, next_episode + mask.sum())
        episode_of[mask] = episodes
        next_episode += len(episodes)
        policy.reset(mask)
        obs = reset_some(envs, mask, [seed_of(int(k)) for k in episodes], obs)
        update_instructions(envs, mask, instructions)
        results["instruction"][episodes] = instructions[mask]
        return obs

    first = np.arange(n) < min(n, num_episodes)
    policy.reset()
    obs = start(first, None)
    if not first.all():  # fewer episodes than envs: the spare envs run a discarded episode (a vector env steps all)
        obs = reset_some(envs, ~first, [seed_of(0)] * int((~first).sum()), obs)
    active = first.copy()
    while active.any():
        for i in np.flatnonzero(active):
            if episode_of[i] in frames and camera_key:
                frames[episode_of[i]].append(obs[camera_key][i])
        obs, reward, terminated, truncated, info = envs.step(policy.act({**obs, "instruction": instructions}))
        steps += int(active.sum())
        for i in np.flatnonzero(active):
            k = episode_of[i]
            results["return"][k] += reward[i]
            results["length"][k] += 1
            results["success"][k] |= bool(info["success"][i])
        ended = active & (terminated | truncated)
        for i in np.flatnonzero(ended):
            if episode_of[i] in frames and camera_key:
                frames[episode_of[i]].append(obs[camera_key][i])
        restart = ended & (np.cumsum(ended) <= num_episodes - next_episode)
        active &= ~(ended & ~restart)
        if restart.any():
            obs = start(restart, obs)
    results["frames"] = [np.stack(f) for f in frames.values() if f]
    results["steps_per_s"] = steps / (time.perf_counter() - t0)
    return results


class RolloutCallback(L.Callback):
    """At the end of each validation: roll out the policy, log ``rollout/*`` and write an MP4.

    ``seed`` starts the evaluation seed range; it must not overlap the collection's (``data.seed``).
    """

    def __init__(
        self,
        env: DictConfig | dict,
        num_episodes: int = 20,
        num_envs: int = 2,
        seed: int = 1_000_000,
        video_episodes: int = 4,
        video_dir: str | None = None,
    ) -> None:
        self.env_cfg, self.num_episodes, self.num_envs = env, num_episodes, num_envs
        self.seed, self.video_episodes, self.video_dir = seed, video_episodes, video_dir
        self._envs = None
        self.total_time_s = 0.0  # spent in rollouts, so train.py can report training speed alone
        self.last: dict[str, float] = {}
        self.last_video: Path | None = None

    def evaluate(self, policy: Any) -> dict[str, Any]:
        from toolkit.envs.vector import make_vector_env

        if self._envs is None:
            self._envs = make_vector_env(self.env_cfg, min(self.num_envs, self.num_episodes))
        return run_rollouts(policy, self._envs, self.num_episodes, self.seed, self.video_episodes)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        res = self.evaluate(pl_module)
        self.total_time_s += time.perf_counter() - start
        self.last = {
            "rollout/success_rate": float(res["success"].mean()),
            "rollout/return": float(res["return"].mean()),
            "rollout/episode_length": float(res["length"].mean()),
            "rollout/env_steps_per_s": float(res["steps_per_s"]),
        }
        pl_module.log_dict(self.last, sync_dist=True)
        if res["frames"] and self.video_dir and trainer.is_global_zero:
            from toolkit.envs.video import tile_episodes, write_mp4

            self.last_video = write_mp4(Path(self.video_dir) / f"rollout_step{trainer.global_step:06d}.mp4",
                                        tile_episodes(res["frames"]))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None
