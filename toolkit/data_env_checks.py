"""Checks that a run's data file and env belong together, before anything trains.

- A collected file must hold episodes of the run's env (``env_args`` written by the env at collection),
  not episodes converted from another tool's dataset and not another task's.
- Rollouts need an env whose cameras, state and actions are the dataset's; a dataset from elsewhere
  (``data=lerobot``...) trains without rollouts, checkpoints monitored on ``val/loss``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gymnasium as gym
from omegaconf import DictConfig, open_dict

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

# env_kwargs that do not change what an episode's observations and actions mean (evaluation may differ)
_IGNORED_KWARGS = ("max_episode_steps",)


def _comparable(env_args: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in (env_args.get("env_kwargs") or {}).items() if k not in _IGNORED_KWARGS}
    return {**env_args, "env_kwargs": kwargs}


def check_collected_file(path: Path, env_args: dict[str, Any]) -> None:
    """Refuse a data file that was converted from another dataset or collected in another env than
    ``env_args`` (a file with no episodes yet is fine: collection will fill it)."""
    import h5py

    from toolkit.collect import existing_episodes

    if existing_episodes(path)[0] == 0:
        return
    with h5py.File(path, "r") as f:
        attrs = f["data"].attrs
        origin = attrs.get("converted_from")
        stored = attrs.get("env_args")
    if origin is not None:
        raise ToolkitError(f"data.path={path} holds episodes converted from {origin}, not collected in this run's "
                           f"env ({env_args.get('env_name')}); set another data.path, or train on it with "
                           f"data=<its format> data.source.path={origin}")
    try:
        theirs = json.loads(stored) if stored is not None else None
    except (TypeError, ValueError):
        theirs = stored
    if isinstance(theirs, dict):  # stored in robomimic's form (integer env type, ours under "toolkit")
        from toolkit.datamodules.episode_file import toolkit_env_args

        theirs = toolkit_env_args(theirs)
    if not isinstance(theirs, dict) or _comparable(theirs) != _comparable(env_args):
        raise ToolkitError(f"data.path={path} holds episodes of another env: the file's env_args are {theirs}, "
                           f"this run's env gives {env_args}; set another data.path (or the env the file was "
                           f"collected in)")


def rollout_mismatches(shape_meta: dict[str, Any], observation_space: gym.Space, action_space: gym.Space) -> list[str]:
    """What differs between the dataset (``shape_meta``) and the env a policy would be rolled out in;
    [] when the policy trained on the dataset can act in the env."""
    spaces = getattr(observation_space, "spaces", {})
    problems = []
    for key in shape_meta["rgb_keys"]:
        want = tuple(shape_meta["image_shape"][key])
        if key not in spaces:
            problems.append(f"camera {key}: dataset {want}, env has none (its cameras: {[k for k in spaces if k.startswith('rgb')]})")
        elif tuple(spaces[key].shape) != want:
            problems.append(f"camera {key}: dataset {want}, env {tuple(spaces[key].shape)}")
    state = spaces.get("state")
    state_dim = int(state.shape[-1]) if state is not None and state.shape else None
    if state_dim != shape_meta["state_dim"]:
        problems.append(f"state: dataset {shape_meta['state_dim']}-d, env {state_dim}-d")
    action_dim = 1 if isinstance(action_space, gym.spaces.Discrete) else int(action_space.shape[-1])
    if action_dim != shape_meta["action_dim"]:
        problems.append(f"action: dataset {shape_meta['action_dim']}-d, env {action_space}")
    return problems


def env_chosen_explicitly() -> bool:
    """Whether the command line picked the env or the rollouts (``env=...``, ``env.task=...``,
    ``callbacks.rollout...``); outside a Hydra run, True."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    overrides = HydraConfig.get().overrides.task
    return any(o.lstrip("+~").startswith(("env=", "env.", "callbacks.rollout")) for o in overrides)


def train_without_rollouts(cfg: DictConfig, why: str) -> None:
    """No rollout callback; the best checkpoint (and a sweep's metric) follow ``val/loss`` instead of success."""
    log.warning(f"{why}: training without rollouts, checkpoints monitored on val/loss")
    with open_dict(cfg):
        callbacks = cfg.get("callbacks") or {}
        if "rollout" in callbacks:
            callbacks.rollout = None
        best = callbacks.get("best_checkpoint")
        if best is not None and str(best.get("monitor", "")).startswith("rollout/"):
            best.monitor, best.mode = "val/loss", "min"
            best.filename = "best_step{step:06d}_valloss{val/loss:.4f}"
        if str(cfg.get("optimized_metric", "")).startswith("rollout/"):
            cfg.optimized_metric = "val/loss"


def plan_rollouts(cfg: DictConfig, spec, shape_meta: dict[str, Any]) -> None:
    """Turn rollouts off when there is no env (``env=none``) or, unless the env was asked for explicitly,
    when the dataset does not fit it (without a rollout callback, checkpoints follow ``val/loss`` too); an explicitly chosen env that does not fit is an error naming both."""
    if spec is None:
        train_without_rollouts(cfg, "env=none")
        return
    if not (cfg.get("callbacks") or {}).get("rollout"):  # removed: ~callbacks.rollout
        train_without_rollouts(cfg, "no rollout callback")
        return
    problems = rollout_mismatches(shape_meta, spec.observation_space, spec.action_space)
    if not problems:
        return
    what = f"the dataset {cfg.data.path} does not fit env {cfg.env._target_} ({'; '.join(problems)})"
    if env_chosen_explicitly():
        raise ToolkitError(f"{what}: rollouts cannot run. Choose the env the data was recorded in, or env=none "
                           f"to train without rollouts")
    train_without_rollouts(cfg, f"{what}; pass env=none to say so, or an env that fits to evaluate")
