"""DAgger (Ross et al., 2011) as run in SpawnNet: train a learner on a few expert demonstrations, then
every ``steps_per_iteration`` training steps roll out a beta-mixture of expert and learner, label every
visited state with the expert's action, append those episodes to the dataset file and keep training on
the aggregate.

    python train.py policy=dagger

Mixture: at each step and per env, the expert's action is executed with probability
``beta = beta0 * decay ** iteration`` (defaults 1.0 and 0.5: iteration 0 follows the expert, then
0.5, 0.25, ...), the learner's otherwise. The recorded ``actions`` are always the expert's labels, never
the executed actions. Episodes are appended one by one (atomic per episode: an interrupted run keeps every
finished episode) with attrs ``source="dagger_iter<k>"``, ``success`` (of the mixture rollout) and
``seed``. Seeds start at ``seed`` (2,000,000 by default, disjoint from collection and evaluation) and
continue after the DAgger seeds already in the file, so a second run on the same file never repeats one.

The learner's action clipping range (``action_low``/``action_high``, the initial demos' min and max) widens
to every label in the file after each iteration (``widen_action_range``): with 3 initial demos it would
otherwise cap the learner below actions the expert labels (pick-place-v3: x at most 0.67 where the expert
goes to 1.0). The normalization statistics stay those of the initial demos.

Iteration ``k`` runs when ``trainer.global_step == (k + 1) * steps_per_iteration`` (so a resumed run
does not repeat finished iterations). The learning rate follows a cosine over each iteration's steps, restarted
when its episodes join the data (``CosinePerIteration``, ``policy=dagger``'s scheduler), so every iteration's
policy is trained on its aggregate as Ross et al. train it; ``trainer.max_steps = (iterations + 1) *
steps_per_iteration`` gives the last aggregate a whole cycle. After writing, the datamodule re-reads the file
(``EpisodeDataModule.refresh``: all episodes, normalization unchanged) and the running training epoch
continues on a new train dataloader over the aggregate (see ``_reload_dataloaders``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

SOURCE_PREFIX = "dagger_iter"


def _env_name(env_cfg: dict) -> str:
    target = str(env_cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    task = env_cfg.get("task")
    return f"{target}(task={task})" if task else target


def check_expert(env_cfg: DictConfig | dict, seed: int = 0) -> None:
    """Build one env, reset it and ask for one expert action; a ToolkitError naming the env if it has none."""
    from toolkit.envs.vector import make_env

    if isinstance(env_cfg, DictConfig):
        env_cfg = OmegaConf.to_container(env_cfg, resolve=True)
    env = make_env(env_cfg)
    try:
        env.reset(seed=seed)
        expert = getattr(env, "expert_action", None)
        if expert is None:
            raise ToolkitError("no expert_action()")
        expert()
    except (ToolkitError, NotImplementedError, AttributeError) as e:
        raise ToolkitError(f"DAgger needs an expert to label states, but env {_env_name(env_cfg)} has none "
                           f"({e}). Use an env with a scripted expert (e.g. Meta-World) or another policy.") from None
    finally:
        env.close()


def dagger_episodes_in_file(path) -> list[tuple[int, str]]:
    """``(seed, source)`` of the DAgger episodes already in an episode file (none if it does not exist)."""
    from pathlib import Path

    from toolkit.datamodules.episode_file import episode_names, open_episode_file

    if not Path(path).exists():
        return []
    with open_episode_file(path) as f:
        groups = [f["data"][n] for n in episode_names(f)]
        sources = [(g.attrs.get("seed"), str(g.attrs.get("source", ""))) for g in groups]
        return [(int(seed), source) for seed, source in sources if source.startswith(SOURCE_PREFIX) and seed is not None]


def widen_action_range(policy: Any, path) -> tuple[np.ndarray, np.ndarray]:
    """Let the learner act with every action the expert labelled: its action clipping range
    (``action_low``/``action_high``: the initial demos' min and max) widened to the labels of every episode in
    the file. The normalizers stay fixed (the trained network's outputs keep their meaning). Returns the range."""
    from toolkit.datamodules.episode_file import episode_names, open_episode_file

    with open_episode_file(path) as f:
        actions = np.concatenate([f["data"][n]["actions"][()] for n in episode_names(f)]).astype(np.float32)
    low = torch.as_tensor(actions.min(0), device=policy.action_low.device).reshape(policy.action_low.shape)
    high = torch.as_tensor(actions.max(0), device=policy.action_high.device).reshape(policy.action_high.shape)
    policy.action_low.copy_(torch.minimum(policy.action_low, low))
    policy.action_high.copy_(torch.maximum(policy.action_high, high))
    return policy.action_low.cpu().numpy(), policy.action_high.cpu().numpy()


class CosinePerIteration(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts):
    """DAgger's learning-rate schedule: a cosine from ``lr`` to 0 over ``T_max`` steps (one iteration), restarted
    at every multiple of ``T_max``, i.e. when an iteration's episodes join the training data.

    Why (measured on pick-place-v3, 4 iterations of 200 steps): with one cosine over the whole run the last two
    aggregates trained at a learning rate below 3e-5; the training loss jumped from 0.19 to 0.43 when the last
    iteration's episodes arrived and was still 0.35 at the end (BC on expert demos: 0.05); restarted, 0.21. The
    aggregate still needs more steps per iteration than BC needs in all (README: "Measured after the fixes")."""

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int) -> None:
        super().__init__(optimizer, T_0=T_max)


def mixture_rollouts(policy: Any, envs, seeds: list[int], beta: float, rng: np.random.Generator):
    """One episode per seed: per step and env, execute the expert's action with probability ``beta``, the
    policy's otherwise; record every visited state with the expert's action as its label.

    Yields ``(episode: GDict, success: bool, seed: int, expert_steps: int, instruction: str | None,
    segments: list | None)`` as
    episodes finish (so the caller can write each at once). ``policy`` has ``reset(mask)``/``act(obs)``.
    """
    from gdict import GDict
    from toolkit.envs.vector import reset_some, update_instructions

    n = envs.num_envs
    steps: list[list[dict]] = [[] for _ in range(n)]
    seed_of = np.full(n, -1)
    expert_steps = np.zeros(n, int)
    success = np.zeros(n, bool)
    instructions = np.full(n, None, dtype=object)
    next_k = 0

    def start(mask: np.ndarray, obs: dict | None) -> dict:
        nonlocal next_k
        chosen = seeds[next_k: next_k + int(mask.sum())]
        next_k += len(chosen)
        seed_of[mask] = chosen
        expert_steps[mask] = 0
        success[mask] = False
        policy.reset(mask)
        obs = reset_some(envs, mask, chosen, obs)
        update_instructions(envs, mask, instructions)
        return obs

    active = np.arange(n) < min(n, len(seeds))
    policy.reset()
    obs = start(active, None)
    while active.any():
        labels = np.stack(envs.call("expert_action")).astype(np.float32)
        learner = np.asarray(policy.act({**obs, "instruction": instructions}), dtype=np.float32)
        use_expert = rng.random(n) < beta
        executed = np.where(use_expert[:, None], labels, learner)
        next_obs, rewards, terminated, truncated, info = envs.step(executed)
        for i in np.flatnonzero(active):
            steps[i].append({"obs": {k: v[i] for k, v in obs.items()}, "actions": labels[i],
                             "rewards": np.float32(rewards[i]), "dones": np.uint8(0)})
            expert_steps[i] += int(use_expert[i])
            success[i] |= bool(info["success"][i])
        ended = active & (terminated | truncated)
        segments = envs.call("segments") if ended.any() else None
        for i in np.flatnonzero(ended):
            episode = GDict.stack(steps[i])
            episode["dones"][-1] = 1
            steps[i] = []
            yield episode, bool(success[i]), int(seed_of[i]), int(expert_steps[i]), instructions[i], segments[i]
        restart = ended & (np.cumsum(ended) <= len(seeds) - next_k)
        active &= ~(ended & ~restart)
        obs = start(restart, next_obs) if restart.any() else next_obs


class DAggerCallback(L.Callback):
    """DAgger iterations during training (see the module docstring).

    ``collect_seed``/``num_demos`` and ``eval_seed``/``eval_episodes`` describe the collection and evaluation
    seed ranges; the DAgger range must not overlap them.
    """

    def __init__(
        self,
        env: DictConfig | dict,
        iterations: int = 4,
        steps_per_iteration: int = 300,
        episodes_per_iteration: int = 10,
        num_envs: int = 2,
        beta0: float = 1.0,
        decay: float = 0.5,
        seed: int = 2_000_000,
        collect_seed: int | None = 0,
        num_demos: int | None = None,
        eval_seed: int | None = 1_000_000,
        eval_episodes: int | None = None,
    ) -> None:
        if steps_per_iteration < 1 or iterations < 0 or episodes_per_iteration < 1 or num_envs < 1:
            raise ToolkitError(f"callbacks.dagger: steps_per_iteration={steps_per_iteration}, iterations={iterations}, "
                               f"episodes_per_iteration={episodes_per_iteration}, num_envs={num_envs}: "
                               f"need steps_per_iteration, episodes_per_iteration, num_envs >= 1 and iterations >= 0")
        if not 0.0 <= beta0 <= 1.0 or not 0.0 <= decay <= 1.0:
            raise ToolkitError(f"callbacks.dagger: beta0={beta0} and decay={decay} must lie in [0, 1]")
        self.env_cfg = env
        self.iterations, self.steps_per_iteration = iterations, steps_per_iteration
        self.episodes_per_iteration, self.num_envs = episodes_per_iteration, num_envs
        self.beta0, self.decay, self.seed = beta0, decay, seed
        self.collect_seed, self.num_demos = collect_seed, num_demos
        self.eval_seed, self.eval_episodes = eval_seed, eval_episodes
        self._envs = None
        self._checked = False
        self.history: list[dict[str, float]] = []  # the logged metrics of each iteration
        self.total_time_s = 0.0

    def beta(self, iteration: int) -> float:
        return float(self.beta0 * self.decay ** iteration)

    # --- checks -----------------------------------------------------------------------------------
    def _check_seed_ranges(self, first: int) -> None:
        span = (first, first + self.iterations * self.episodes_per_iteration)
        others = []
        if self.collect_seed is not None:
            n = self.num_demos or 0
            others.append(("collection (collect.seed)", self.collect_seed, self.collect_seed + 10 * n + 10))
        if self.eval_seed is not None:
            others.append(("evaluation (callbacks.rollout.seed)", self.eval_seed,
                           self.eval_seed + (self.eval_episodes or 1)))
        for name, lo, hi in others:
            if span[0] < hi and lo < span[1]:
                raise ToolkitError(f"callbacks.dagger.seed={self.seed}: DAgger seeds {span[0]}..{span[1] - 1} overlap "
                                   f"the {name} seeds {lo}..{hi - 1}; choose a disjoint seed")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._checked:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "refresh"):
            raise ToolkitError("DAgger needs an EpisodeDataModule (data=hdf5) to append episodes to")
        if getattr(dm, "feature_path", None):
            raise ToolkitError("DAgger appends episodes to the dataset, which a feature cache of a frozen encoder "
                               "does not cover: set data.feature_cache=false (or encoder.freeze=false)")
        self._check_seed_ranges(self.seed)
        check_expert(self.env_cfg, self.seed)
        self._checked = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed after iteration 0 trains on the aggregate at once, not on the initial demos alone.
        if trainer.global_step >= self.steps_per_iteration and dagger_episodes_in_file(trainer.datamodule.path):
            release_data_files(trainer)
            trainer.datamodule.refresh()
            _reload_dataloaders(trainer)
            # (labels appended after the checkpoint was written are not in its range yet)
            widen_action_range(pl_module, trainer.datamodule.path)
            log.info(f"DAgger: resumed at step {trainer.global_step}, training on all "
                     f"{_train_windows(trainer)} training windows of {trainer.datamodule.path}")

    # --- iterations -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.steps_per_iteration:
            return
        iteration = step // self.steps_per_iteration - 1
        if iteration >= self.iterations:
            return
        self.run_iteration(trainer, pl_module, iteration)

    def run_iteration(self, trainer: L.Trainer, pl_module: L.LightningModule, iteration: int) -> dict[str, float]:
        from toolkit.datamodules.episode_file import EpisodeWriter
        from toolkit.envs.vector import make_vector_env

        start = time.perf_counter()
        dm = trainer.datamodule
        beta = self.beta(iteration)
        used = dagger_episodes_in_file(dm.path)
        first = max(self.seed, max((seed for seed, _ in used), default=self.seed - 1) + 1)
        # an iteration interrupted (and resumed) after some episodes only rolls out the missing ones
        done_before = sum(source == f"{SOURCE_PREFIX}{iteration}" for _, source in used)
        seeds = list(range(first, first + max(self.episodes_per_iteration - done_before, 0)))
        if self._envs is None:
            self._envs = make_vector_env(self.env_cfg, min(self.num_envs, self.episodes_per_iteration))
        rng = np.random.default_rng([self.seed, iteration, first])

        # Nothing may hold the file open while it is appended to (HDF5 refuses a second, writable handle in
        # one process, and a reader in another process would see a changing file).
        release_data_files(trainer)
        writer = EpisodeWriter(dm.path, self._envs.call("env_args")[0])
        labels = expert_steps = 0
        successes = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for episode, success, seed, n_expert, instruction, segments in (
                    mixture_rollouts(pl_module, self._envs, seeds, beta, rng) if seeds else []):
                attrs = {"success": success, "seed": seed, "source": f"{SOURCE_PREFIX}{iteration}"}
                if instruction is not None:
                    attrs["instruction"] = instruction
                if segments is not None:
                    attrs["segments"] = json.dumps(segments)
                writer.append(episode, attrs)
                labels += len(episode)
                expert_steps += n_expert
                successes.append(success)
        finally:
            pl_module.train(was_training)
        dm.refresh()
        _reload_dataloaders(trainer)
        widen_action_range(pl_module, dm.path)

        metrics = {
            "dagger/iteration": float(iteration),
            "dagger/dataset_episodes": float(len(dm.train_set.episodes) + (len(dm.valid_set.episodes) if dm.valid_set else 0)),
            "dagger/dataset_steps": float(len(dm.train_set) + (len(dm.valid_set) if dm.valid_set else 0)),
            "dagger/expert_labels": float(labels),
            "dagger/beta": beta,
            "dagger/expert_action_fraction": expert_steps / max(labels, 1),
            "dagger/rollout_success": float(np.mean(successes)) if successes else 0.0,
            # windows of the train dataloader training continues on (the aggregate's training split)
            "dagger/train_windows": float(_train_windows(trainer)),
        }
        self.history.append(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.total_time_s += time.perf_counter() - start
        log.info(f"DAgger iteration {iteration + 1}/{self.iterations} at step {trainer.global_step}: beta={beta:.3f}, "
                 f"{len(successes)} episodes (success {metrics['dagger/rollout_success']:.2f}), {labels} expert labels, "
                 f"dataset now {int(metrics['dagger/dataset_episodes'])} episodes / "
                 f"{int(metrics['dagger/dataset_steps'])} steps ({time.perf_counter() - start:.1f} s)")
        return metrics

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None


# --- dataloader plumbing (Lightning 2.6 internals, kept in one place) -----------------------------------

def _close_dataset(dataset: Any) -> None:
    """Close a WindowDataset's HDF5 handles in this process (it reopens them on next use)."""
    for attr in ("_file", "_features"):
        handle = getattr(dataset, attr, None)
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass
            setattr(dataset, attr, None)
    if hasattr(dataset, "_pid"):
        dataset._pid = None


def _loaders(trainer: L.Trainer) -> list:
    loops = [trainer.fit_loop, trainer.fit_loop.epoch_loop.val_loop]
    found = []
    for loop in loops:
        combined = getattr(loop, "_combined_loader", None)
        if combined is not None:
            found.extend(combined.flattened)
    return found


def release_data_files(trainer: L.Trainer) -> None:
    """Stop the (persistent) DataLoader workers and close this process's handles on the dataset file."""
    for dl in _loaders(trainer):
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            dl._iterator = None
        _close_dataset(getattr(dl, "dataset", None))
    dm = trainer.datamodule
    for ds in (getattr(dm, "train_set", None), getattr(dm, "valid_set", None)):
        _close_dataset(ds)


def _train_windows(trainer: L.Trainer) -> int:
    combined = trainer.fit_loop._combined_loader
    return sum(len(dl.dataset) for dl in combined.flattened) if combined is not None else 0


def _reload_dataloaders(trainer: L.Trainer) -> None:
    """Make training continue at once on the datamodule's new datasets.

    ``fit_loop.setup_data()`` with no combined loader requests ``train_dataloader()`` again (as
    ``reload_dataloaders_every_n_epochs`` would at the next epoch); the running epoch loop holds the old
    data fetcher object, so that object is pointed at the new loader and put back. The validation loop
    re-requests ``val_dataloader()`` at its next run.
    """
    fit_loop = trainer.fit_loop
    fetcher = fit_loop._data_fetcher
    fit_loop._combined_loader = None
    fit_loop.setup_data()
    new_fetcher = fit_loop._data_fetcher
    if fetcher is not None and new_fetcher is not fetcher:
        new_fetcher.reset()
        new_fetcher.iterator = None
        fetcher.setup(fit_loop._combined_loader)
        iter(fetcher)
        fit_loop._data_fetcher = fetcher
    trainer.fit_loop.epoch_loop.val_loop._combined_loader = None
