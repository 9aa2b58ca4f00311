"""The simulator as a LightningDataModule, for policies that learn online (``policy=ppo``).

The training "dataset" is an endless iterable: the policy's ``online_batches(stepper)`` steps the vector
envs (``toolkit.envs.stepper.EnvStepper``) with the current weights and yields the minibatches of one
update cycle, then the next cycle begins. Validation is the rollout callback's evaluation at unseen seeds
(one empty validation batch makes Lightning run it). The env step count, episode statistics and RNG
states are part of Lightning's checkpoints (``state_dict``), so a resumed run continues from the same env
step with the next training seeds.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from toolkit.envs.stepper import EnvStepper
from toolkit.envs.vector import check_env, make_env
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


class _NextBatch:
    """What the data loader yields: a claim on the policy's next minibatch, made real only when the training
    loop is about to train on it (``OnlineDataModule.on_before_batch_transfer``). Lightning fetches one batch
    ahead of the step it trains; were the minibatches themselves yielded, the fetch that follows a cycle's last
    minibatch would step the envs for the next cycle before that minibatch's update (acting with weights one
    update old, and counting env steps that a checkpoint written at that step never trained on)."""

    __slots__ = ("batches",)

    def __init__(self, batches) -> None:
        self.batches = batches

    def __call__(self) -> dict[str, Any]:
        return next(self.batches)


class _OnlineBatches(IterableDataset):
    def __init__(self, datamodule: "OnlineDataModule") -> None:
        self.datamodule = datamodule

    def _batches(self):
        policy = self.datamodule.trainer.lightning_module
        while True:
            yield from policy.online_batches(self.datamodule.stepper)

    def __iter__(self):
        batches = self._batches()
        while True:
            yield _NextBatch(batches)


def training_env(env: Any, terminate_on_success: bool | None) -> Any:
    """The env config of the training envs. With a dense reward, an episode that ends at success loses the reward
    it would have earned by staying there: a shaped reward pays every step on the way (Meta-World: ~4-9 per
    step before success), so an agent that bootstraps at the time limit learns that hovering next to the goal
    is worth more than reaching it (online IQL on drawer-open lost its offline policy this way:
    bench/results/online_iql.md). ``None``: the env's own setting, except that a dense-reward env's training
    episodes go on after success to the time limit (success then counts at any step); True/False: forced."""
    from omegaconf import OmegaConf

    if env is None or "terminate_on_success" not in env:
        return env
    cfg = OmegaConf.to_container(env, resolve=True) if OmegaConf.is_config(env) else dict(env)
    if terminate_on_success is None:
        terminate_on_success = bool(cfg["terminate_on_success"]) and cfg.get("reward") != "dense"
        if terminate_on_success != bool(cfg["terminate_on_success"]):
            log.info("training episodes go on after success (env.reward=dense: ending them there would make success "
                     "cost the reward of the steps left); data.terminate_on_success=true to end them")
    cfg["terminate_on_success"] = bool(terminate_on_success)
    return cfg


class OnlineDataModule(L.LightningDataModule):
    """``num_envs`` envs stepped by the policy; training episode ``k`` starts from seed ``seed + k`` (keep the
    range apart from the rollout callback's evaluation seeds)."""

    online = True
    feature_cache = False  # features are cached per rollout step by the policy itself

    def __init__(self, env: dict[str, Any], num_envs: int = 4, seed: int = 500_000, batch_size: int = 64,
                 history: int = 2, horizon: int = 1, stats_window: int = 100, name: str | None = None,
                 path: str | None = None, num_demos: int | None = None, num_workers: int = 0,
                 replay_size: int = 50_000, env_processes: bool = True, goals: dict[str, Any] | None = None,
                 intrinsic: dict[str, Any] | None = None, terminate_on_success: bool | None = None,
                 obs_keys: list[str] | None = None) -> None:
        """``name``, ``path``, ``num_demos``, ``num_workers``: the offline data fields, unused by on-policy
        training (accepted so that ``debug=fast`` and experiment configs compose with ``data=online``).
        Off-policy training (``policy=iql_online``) seeds its replay buffer with the first ``num_demos``
        episodes of ``path`` and bounds it at ``replay_size`` transitions (offline and online together).
        ``env_processes``: one simulator process per env; False: all envs stepped in this process (faster for
        simulators cheaper than an inter-process round trip per step, e.g. grid worlds without rendering).
        ``goals``: ELLM's goal reward (the ``goals=`` config: a suggester plus the reward rule's fields),
        ``intrinsic``: a novelty reward (``intrinsic=rnd``); both added to the env's reward
        (``toolkit.exploration.terms``). ``terminate_on_success``: whether the training episodes end at success
        (``training_env``); evaluation rollouts keep the env config's setting. ``obs_keys``: the observations a
        policy trained from scratch sees, as the offline ``data.obs_keys`` (null: every camera and state; ``[state]``:
        no pixels); a policy started ``init_from`` a checkpoint sees what that checkpoint was trained on."""
        super().__init__()
        self.env_cfg, self.num_envs, self.seed, self.batch_size = env, num_envs, seed, batch_size
        self.path, self.num_demos, self.replay_size = path, num_demos, replay_size
        self.history, self.horizon = history, horizon
        self.obs_keys = None if obs_keys is None else list(obs_keys)
        from toolkit.exploration.terms import build_reward_terms

        self.reward_terms = build_reward_terms(goals, intrinsic, num_envs)
        self.stepper = EnvStepper(training_env(env, terminate_on_success), num_envs, seed, stats_window,
                                  processes=env_processes,
                                  reward_terms=self.reward_terms)
        self.shape_meta, self.stats = self._from_env()
        self.language = None  # set by train.py when the env gives instructions
        self.instruction_summary = None
        self._started = time.perf_counter()
        self._steps_at_start = 0

    def _from_env(self) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
        """What the policy is built from, read off the env's spaces: a policy trained from scratch sees states
        as they are and actions scaled from the action space's bounds to [-1, 1]."""
        spec = check_env(self.env_cfg)
        spaces = spec.observation_space.spaces
        rgb = [k for k in spaces if k.startswith("rgb")]
        if self.obs_keys is not None:
            unknown = [k for k in self.obs_keys if k not in rgb and k != "state"]
            if unknown:
                raise ToolkitError(f"data.obs_keys={self.obs_keys}: the env gives no {unknown} (it gives {[*rgb, 'state']})")
            if "state" not in self.obs_keys:  # as offline, where episodes without obs/state are refused
                raise ToolkitError(f"data.obs_keys={self.obs_keys}: the policies always read 'state'; list it")
            rgb = [k for k in rgb if k in self.obs_keys]
        state_dim = int(spaces["state"].shape[-1])
        act = spec.action_space
        if isinstance(act, gym.spaces.Discrete):
            action_dim, low, high, mean, std = 1, [0.0], [float(act.n - 1)], [0.0], [1.0]
        else:
            low, high = act.low.astype(float), act.high.astype(float)
            # Python floats (tolist), not numpy scalars: checkpoints keep these and load with weights_only=True
            action_dim, mean, std = len(low), ((high + low) / 2).tolist(), ((high - low) / 2).tolist()
            low, high = low.tolist(), high.tolist()
        shape_meta = {"rgb_keys": rgb, "image_shape": {k: list(spaces[k].shape) for k in rgb},
                      "state_dim": state_dim, "action_dim": action_dim}
        stats = {"obs/state": {"mean": [0.0] * state_dim, "std": [1.0] * state_dim},
                 "actions": {"mean": mean, "std": std, "min": low, "max": high}}
        return shape_meta, stats

    def has_instructions(self) -> bool:
        if any(getattr(term, "condition", False) for term in self.reward_terms):  # goals.condition
            return True
        env = make_env(self.env_cfg)
        try:
            env.reset(seed=self.seed)
            return getattr(env, "instruction", lambda: None)() is not None
        finally:
            env.close()

    def image_keys(self) -> list[str]:
        return list(self.shape_meta["rgb_keys"])

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # DDP: each process steps its own envs on its own training seeds
            self.stepper.rank, self.stepper.world_size = trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        self._started, self._steps_at_start = time.perf_counter(), self.stepper.env_steps
        # the main process steps the envs with the module's current weights: no workers
        return DataLoader(_OnlineBatches(self), batch_size=None, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the training loop is about to train on this batch: step the envs now if its cycle needs them
        return batch() if isinstance(batch, _NextBatch) else batch

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{}], batch_size=None)

    def env_metrics(self) -> dict[str, float]:
        """For the logs and progress bar: env steps, env steps/s (this process, since training started), and the
        recent training episodes' success, return and length."""
        rate = (self.stepper.env_steps - self._steps_at_start) / max(time.perf_counter() - self._started, 1e-9)
        # the reward terms' own metrics keep their names (goals/..., rnd/...)
        stats = {k if "/" in k else f"env/{k}": v for k, v in self.stepper.episode_stats().items()}
        return {"env/steps": float(self.stepper.env_steps), "env/steps_per_s": rate, **stats,
                "env/episodes": float(self.stepper.episodes_done)}

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types only: checkpoints load with torch.load(weights_only=True)
        return {"stepper": self.stepper.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                        "python": random.getstate()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stepper.load_state_dict(state["stepper"])
        torch.set_rng_state(state["rng"]["torch"])
        name, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        random.setstate(state["rng"]["python"])

    def teardown(self, stage: str | None = None) -> None:
        self.stepper.close()
