"""Vector envs built from an env config: one process per env, no autoreset (finished episodes hold
still until the caller resets them with ``options={"reset_mask": ...}``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig, OmegaConf


def make_env(env_cfg: dict[str, Any]) -> gym.Env:
    from hydra.utils import instantiate

    return instantiate(env_cfg)


@dataclass(frozen=True)
class EnvSpec:
    """What a run needs to know of its env before training: spaces, and ``env_args`` (what the env writes
    into episode files, to check that a data file holds this env's episodes)."""

    action_space: gym.Space
    observation_space: gym.Space
    env_args: dict[str, Any]


def check_env(env_cfg: DictConfig | dict) -> EnvSpec:
    """Build and close one env in this process, so a bad env config fails here with its message
    instead of inside a vector env's worker."""
    if isinstance(env_cfg, DictConfig):
        env_cfg = OmegaConf.to_container(env_cfg, resolve=True)
    env = make_env(env_cfg)
    try:
        env_args = env.env_args() if hasattr(env, "env_args") else {}
        return EnvSpec(env.action_space, env.observation_space, env_args)
    finally:
        env.close()


def make_vector_env(env_cfg: DictConfig | dict, num_envs: int, processes: bool = True) -> gym.vector.VectorEnv:
    """``num_envs`` copies of the env, one process each; in this process when there is one (no start-up cost)
    or ``processes=False`` (no round trip per step: faster for simulators that step in well under a ms)."""
    if isinstance(env_cfg, DictConfig):
        env_cfg = OmegaConf.to_container(env_cfg, resolve=True)
    fns = [partial(make_env, env_cfg) for _ in range(num_envs)]
    mode = gym.vector.AutoresetMode.DISABLED
    if num_envs == 1 or not processes:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    # forkserver: children never inherit the parent's torch threads or GL contexts, and start faster than spawn.
    return gym.vector.AsyncVectorEnv(fns, context="forkserver", autoreset_mode=mode)


def reset_some(envs: gym.vector.VectorEnv, mask: np.ndarray, seeds: list[int],
               obs: dict[str, np.ndarray] | None = None, infos: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Reset the envs selected by ``mask`` with ``seeds`` (one per selected env, in order); the other
    envs keep their entries of ``obs``. Returns the merged batch of observations; the reset's info (the vector
    env's dict of per-env arrays) goes into ``infos`` when given."""
    per_env: list[int | None] = [None] * envs.num_envs
    for i, s in zip(np.flatnonzero(mask), seeds):
        per_env[i] = s
    reset_obs, info = envs.reset(seed=per_env, options={"reset_mask": mask})
    if infos is not None:
        infos.update(info)
    if obs is None:
        return reset_obs
    return {k: np.where(mask.reshape(-1, *[1] * (v.ndim - 1)), reset_obs[k], v) for k, v in obs.items()}


def update_instructions(envs: gym.vector.VectorEnv, mask: np.ndarray, instructions: np.ndarray) -> None:
    """After resetting the envs in ``mask``: their new episodes' ``instruction()`` into ``instructions``
    (an object array, one entry per env; None where the env has no instructions)."""
    if mask.any():
        current = envs.call("instruction")
        for i in np.flatnonzero(mask):
            instructions[i] = current[i]
