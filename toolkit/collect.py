"""Collect demonstrations with an env's expert into an episode file.

    python -m toolkit.collect env.task=door-open-v3 data.num_demos=100

Episodes are written one by one as they finish; an interrupted collection (Ctrl-C, kill) keeps every
finished episode, and running the same command again continues up to the requested count.
Episode ``i`` is reset with seed ``data.seed + attempt``: the same command collects the same episodes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError


@contextlib.contextmanager
def collection_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` while collecting into ``path``: parallel jobs of a sweep that need
    the same dataset wait for the first to collect it, then find it complete, instead of writing it twice."""
    import fcntl

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def existing_episodes(path: Path) -> tuple[int, int]:
    """(number of episodes, next unused seed offset) of an episode file; (0, 0) if it does not exist."""
    if not path.exists():
        return 0, 0
    from toolkit.datamodules.episode_file import episode_names, open_episode_file

    with open_episode_file(path) as f:
        names = episode_names(f)
        attempts = [int(f["data"][n].attrs.get("attempt", -1)) for n in names]
    return len(names), max(attempts, default=-1) + 1


def collect(
    env_cfg: Any,
    path: str | Path,
    num_episodes: int,
    num_envs: int = 2,
    seed: int = 0,
    only_success: bool = True,
    max_attempts: int | None = None,
    progress: bool = True,
    policy: str = "expert",
    action_noise: float = 0.0,
    epsilon: float = 0.0,
    video: dict[str, Any] | None = None,
) -> int:
    """Collect episodes until ``path`` holds ``num_episodes``; returns how many it holds.

    ``policy="expert"`` acts with the env's expert, perturbed by Gaussian ``action_noise`` (std, in action
    units) and replaced by a uniformly random action with probability ``epsilon``; ``policy="random"``
    acts uniformly at random. Each episode records what acted in its ``source`` attribute, and the env's
    ``instruction()`` (where it has one) in its ``instruction`` attribute, and the env's sub-skill
    ``segments()`` (BabyAI: the step each clause of the mission was completed) in ``segments`` and the
    mission's clauses (``sub_instructions()``) in ``sub_instructions`` (both JSON). ``video`` (``{"crf",
    "keyframe_interval", "lossless"}``) stores cameras as MP4 sidecars (see ``EpisodeWriter``).

    Discrete action spaces (``gym.spaces.Discrete``) are stored like continuous ones, as ``actions``
    ``[L, 1]`` float32 holding the index; random actions are uniform indices and ``action_noise`` is refused.
    Parallel calls on one ``path`` (jobs of a sweep) take turns (``collection_lock``).
    """
    if policy not in ("expert", "random"):
        raise ToolkitError(f"collect.policy={policy!r}: use expert or random")
    source = "random" if policy == "random" else (
        f"expert+noise(std={action_noise},epsilon={epsilon})" if action_noise or epsilon else "expert")
    path = Path(path)
    import gymnasium as gym
    from tqdm.auto import tqdm

    from gdict import GDict
    from toolkit.datamodules.episode_file import EpisodeWriter
    from toolkit.envs.vector import make_vector_env, reset_some

    with collection_lock(path):
        have, attempt = existing_episodes(path)
        if have >= num_episodes:
            return have
        max_attempts = max_attempts or 2 * num_episodes + 10
        envs = make_vector_env(env_cfg, num_envs)
        try:
            space = envs.single_action_space
            discrete = isinstance(space, gym.spaces.Discrete)
            if discrete and action_noise:
                raise ToolkitError(f"collect.action_noise={action_noise}: Gaussian noise needs continuous actions and "
                                   f"this env's actions are discrete ({space}); use collect.epsilon to explore")
            writer = EpisodeWriter(path, envs.call("env_args")[0], video=video)
            bar = tqdm(total=num_episodes, initial=have, desc=f"collecting {path.name}", unit="ep", disable=not progress)
            steps: list[list[dict]] = [[] for _ in range(num_envs)]
            env_attempt = np.full(num_envs, -1)
            env_instruction: list[str | None] = [None] * num_envs
            env_clauses: list[list[str] | None] = [None] * num_envs
            rejected = 0
            rng = np.random.default_rng(seed + attempt)

            def random_actions() -> np.ndarray:
                if discrete:
                    return (space.start + rng.integers(0, space.n, (num_envs, 1))).astype(np.float32)
                return rng.uniform(space.low, space.high, (num_envs, *space.shape)).astype(np.float32)

            def behaviour_actions() -> np.ndarray:
                random = random_actions()
                if policy == "random":
                    return random
                actions = np.stack(envs.call("expert_action")).astype(np.float32)
                actions = actions + rng.normal(0.0, action_noise, actions.shape) if action_noise else actions
                explore = rng.random(num_envs) < epsilon
                actions[explore] = random[explore]
                return actions if discrete else np.clip(actions, space.low, space.high).astype(np.float32)

            def start(mask: np.ndarray, obs: dict | None = None) -> dict:
                nonlocal attempt
                attempts = np.arange(attempt, attempt + mask.sum())
                env_attempt[mask] = attempts
                attempt += len(attempts)
                obs = reset_some(envs, mask, [seed + int(a) for a in attempts], obs)
                # Read now: sub-envs reset at different times, and the instruction is the new episode's.
                instructions, clauses = envs.call("instruction"), envs.call("sub_instructions")
                for i in np.flatnonzero(mask):
                    env_instruction[i], env_clauses[i] = instructions[i], clauses[i]
                return obs

            active = np.ones(num_envs, dtype=bool)
            obs = start(active)
            while active.any():
                actions = behaviour_actions()
                # A vector env of Discrete spaces takes one integer per env; the file keeps [1] float32.
                next_obs, rewards, terminated, truncated, info = envs.step(
                    actions[:, 0].astype(np.int64) if discrete else actions)
                for i in np.flatnonzero(active):
                    steps[i].append({"obs": {k: v[i] for k, v in obs.items()}, "actions": actions[i],
                                     "rewards": np.float32(rewards[i]), "dones": np.uint8(0)})
                ended = active & (terminated | truncated)
                segments = envs.call("segments") if ended.any() else None  # before the reset below
                for i in np.flatnonzero(ended):
                    success = bool(info["success"][i])
                    if success or not only_success:
                        if writer.num_episodes < num_episodes:
                            episode = GDict.stack(steps[i])
                            episode["dones"][-1] = 1
                            attrs = {"success": success, "seed": seed + int(env_attempt[i]),
                                     "attempt": int(env_attempt[i]), "source": source}
                            if env_instruction[i] is not None:
                                attrs["instruction"] = env_instruction[i]
                            if segments[i] is not None:
                                attrs["segments"] = json.dumps(segments[i])
                            if env_clauses[i] is not None:
                                attrs["sub_instructions"] = json.dumps(env_clauses[i])
                            writer.append(episode, attrs)
                            bar.update(1)
                    else:
                        rejected += 1
                    steps[i] = []
                # Reset the finished envs that still have an episode to collect; the others go idle.
                pending = writer.num_episodes + int((active & ~ended).sum())
                restart = np.zeros(num_envs, dtype=bool)
                for i in np.flatnonzero(ended):
                    if pending < num_episodes and attempt < max_attempts:
                        restart[i], pending = True, pending + 1
                    else:
                        active[i] = False
                obs = start(restart, next_obs) if restart.any() else next_obs
            bar.close()
        finally:
            envs.close()
        if writer.num_episodes < num_episodes:
            raise ToolkitError(f"the expert succeeded in only {writer.num_episodes} of {attempt} attempts "
                               f"({rejected} failed); {path} keeps the successful ones. Raise max_attempts "
                               f"or check the task.")
        return writer.num_episodes


def collect_from_config(cfg: Any) -> int:
    """``collect`` with the ``env``, ``data`` (path, num_demos) and ``collect`` groups of a config."""
    c = cfg.collect
    video = ({"crf": c.video_crf, "keyframe_interval": c.video_keyframe_interval, "lossless": c.video_lossless}
             if c.video else None)
    return collect(cfg.env, cfg.data.path, cfg.data.num_demos, num_envs=c.num_envs, seed=c.seed,
                   only_success=c.only_success, policy=c.policy, action_noise=c.action_noise, epsilon=c.epsilon,
                   video=video)


def _main() -> None:
    import hydra

    from toolkit.config import register_resolvers

    register_resolvers()  # the env configs name their files with ${suffix_if:...}

    @hydra.main(version_base="1.3", config_path="../conf", config_name="collect")
    def main(cfg) -> None:
        from toolkit.envs.vector import check_env
        from toolkit.errors import exit_on_user_error

        with exit_on_user_error():
            check_env(cfg.env)
            n = collect_from_config(cfg)
            print(f"{cfg.data.path}: {n} episodes")

    main()


if __name__ == "__main__":
    _main()
