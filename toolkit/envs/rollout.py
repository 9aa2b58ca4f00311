"""Policy rollouts in vector envs, and the Lightning callback that runs them at validation."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig

from toolkit.envs.vector import reset_some, update_instructions

log = logging.getLogger(__name__)

# what a vector env raises when one of its simulator processes died
WORKER_DIED = (EOFError, BrokenPipeError, ConnectionResetError)


class SimulatorCrash(RuntimeError):
    """A simulator process died during rollouts; ``results`` holds the episodes that finished (``finished``
    mask) among the first ``started``; the others had not started."""

    def __init__(self, results: dict[str, Any], finished: np.ndarray, started: int, episode_of: np.ndarray) -> None:
        super().__init__(f"a simulator process died; {int(finished.sum())} of {started} started episodes had finished")
        self.results, self.finished, self.started = results, finished, started
        self.episode_of = episode_of  # the episode each env was running (-1: none)


def run_rollouts(policy: Any, envs, num_episodes: int, seed: int | Sequence[int], video_episodes: int = 0,
                 goals: Any = None) -> dict[str, Any]:
    """Run ``num_episodes`` episodes of ``policy`` (anything with ``reset(mask)``/``act(obs)``).

    Episode ``k`` is reset with seed ``seed + k`` (or ``seed[k]`` for a list of seeds), so every evaluation
    sees the same configurations.
    The policy sees each env's ``instruction()`` as ``obs["instruction"]``, or with ``goals``
    (``toolkit.exploration.terms.GoalInstructions``, a goal-conditioned policy) the goals suggested for each
    env's current state, updated every step. Returns per-episode
    ``success``, ``return``, ``length``, ``instruction``, the frames of the first ``video_episodes``
    episodes, and the env steps/s; envs whose info has ``achievements`` (Crafter) add ``achievements`` (the
    names) and ``unlocked`` (``[episodes, names]``, what each episode unlocked). A dead simulator process raises
    ``SimulatorCrash`` with the episodes that finished before it.
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
        info: dict[str, Any] = {}
        obs = reset_some(envs, mask, [seed_of(int(k)) for k in episodes], obs, info)
        update_instructions(envs, mask, instructions)
        if goals is not None:
            goals.update(mask, info)
            instructions[:] = goals.texts()
        results["instruction"][episodes] = instructions[mask]
        return obs

    finished = np.zeros(num_episodes, bool)
    # the weights stay fixed for the whole run: a policy may keep its per-step features (fixed_weight_rollouts)
    with getattr(policy, "fixed_weight_rollouts", nullcontext)():
        try:
            first = np.arange(n) < min(n, num_episodes)
            policy.reset()
            obs = start(first, None)
            # fewer episodes than envs: the spare envs run a discarded episode (a vector env steps all)
            if not first.all():
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
                finished[episode_of[ended]] = True
                if goals is not None:  # the goals of the states reached (an ended env's come with its reset)
                    goals.update(~(terminated | truncated), info)
                    instructions[:] = goals.texts()
                for i in np.flatnonzero(ended):
                    if episode_of[i] in frames and camera_key:
                        frames[episode_of[i]].append(obs[camera_key][i])
                if ended.any() and "achievements" in info:  # Crafter: what each finished episode unlocked
                    names, unlocked = achievement_flags(info["achievements"])
                    if results.get("achievements") is None:
                        results["achievements"] = names
                        results["unlocked"] = np.zeros((num_episodes, len(names)), bool)
                    results["unlocked"][episode_of[ended]] = unlocked[ended]
                restart = ended & (np.cumsum(ended) <= num_episodes - next_episode)
                active &= ~(ended & ~restart)
                if restart.any():
                    obs = start(restart, obs)
        except WORKER_DIED:
            raise SimulatorCrash(results, finished, next_episode, episode_of.copy()) from None
    results["frames"] = [np.stack(f) for f in frames.values() if f]
    results["steps_per_s"] = steps / (time.perf_counter() - t0)
    return results


def achievement_flags(achievements: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """A vector env's ``info["achievements"]`` (one bool array per name, with gymnasium's ``_name`` masks) as
    the sorted names and a bool matrix ``[envs, names]``."""
    names = sorted(k for k in achievements if not k.startswith("_"))
    return names, np.stack([np.asarray(achievements[k], bool) for k in names], axis=1)


def achievement_metrics(names: list[str], unlocked: np.ndarray, prefix: str) -> dict[str, float]:
    """Per achievement the fraction of episodes that unlocked it, the distinct achievements unlocked in any
    episode, the mean per episode, and the Crafter score (Hafner, 2021: the geometric mean of the success rates
    in percent, ``exp(mean ln(1 + s)) - 1``), over the rows of ``unlocked`` ``[episodes, names]``."""
    from toolkit.envs.crafter import crafter_score

    rates = unlocked.mean(0) if len(unlocked) else np.zeros(len(names))
    metrics = {f"{prefix}achievement/{name}": float(r) for name, r in zip(names, rates)}
    metrics[f"{prefix}achievements_unlocked"] = float(unlocked.any(0).sum()) if len(unlocked) else 0.0
    metrics[f"{prefix}achievements_per_episode"] = float(unlocked.sum(1).mean()) if len(unlocked) else 0.0
    metrics[f"{prefix}crafter_score"] = crafter_score({n: 100 * float(r) for n, r in zip(names, rates)})
    return metrics


def _gather_episodes(pl_module: L.LightningModule, res: dict[str, Any], n: int) -> dict[str, Any]:
    """Every process's episodes, merged (each process filled only its own, ``res["mine"]``)."""
    import torch

    keys = ("success", "return", "length", "failed")
    local = torch.stack([torch.as_tensor(np.where(res["mine"], res[k], 0), dtype=torch.float64) for k in keys])
    total = pl_module.all_gather(local).sum(0).cpu().numpy()  # [world, 4, n] -> [4, n]
    rate = pl_module.all_gather(torch.tensor(float(res["steps_per_s"]), dtype=torch.float64)).sum().item()
    merged = {k: total[i].astype(res[k].dtype) for i, k in enumerate(keys)}
    if res.get("achievements") is not None:
        mine = np.where(res["mine"][:, None], res["unlocked"], False)
        merged["unlocked"] = pl_module.all_gather(torch.as_tensor(mine)).any(0).cpu().numpy()
        merged["achievements"] = res["achievements"]
    return {**merged, "frames": res["frames"], "steps_per_s": rate, "mine": np.ones(n, bool)}


def _dead_workers(envs, wait_s: float = 2.0) -> list[int]:
    """Indices of an AsyncVectorEnv's dead worker processes (the pipe breaks a moment before the process is
    seen dead, so wait for it); [] if none is seen dead or the env has no processes."""
    processes = getattr(envs, "processes", None) or []
    deadline = time.perf_counter() + wait_s
    while processes:
        dead = [i for i, p in enumerate(processes) if not p.is_alive()]
        if dead or time.perf_counter() > deadline:
            return dead
        time.sleep(0.02)
    return []


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
        at_start: bool = False,
        goals: Any = None,
    ) -> None:
        """``at_start``: also evaluate the policy before its first update (the "before" of a fine-tuning run,
        ``init_from``), logged at step 0 and kept in ``start`` (the run summary's ``rollout_at_start/*``).
        ``goals``: a ``goals=`` config with ``condition: true`` (a goal-conditioned policy): the policy acts on
        the goals its suggester proposes for each state (conf/callbacks/default.yaml passes the run's goals=);
        otherwise unused."""
        self.env_cfg, self.num_episodes, self.num_envs = env, num_episodes, num_envs
        self.seed, self.video_episodes, self.video_dir = seed, video_episodes, video_dir
        self.at_start = at_start
        self.goals = goals
        self._suggester = None  # built at the first evaluation (an LLM's cache then lasts the whole run)
        self._envs = None
        self.total_time_s = 0.0  # spent in rollouts, so train.py can report training speed alone
        self.start: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.last_video: Path | None = None

    def evaluate(self, policy: Any, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """All ``num_episodes`` episodes, as ``run_rollouts`` returns them, plus a ``failed`` mask: when a
        simulator process dies, the episode it was running is recorded as failed, the vector env is
        restarted, and the episodes that were interrupted in the other processes or not yet started run
        on it (from their own seeds, so they are the same episodes)."""
        from toolkit.envs.vector import make_vector_env

        n = self.num_episodes
        out = {"success": np.zeros(n, bool), "return": np.zeros(n), "length": np.zeros(n, int),
               "failed": np.zeros(n, bool), "frames": [], "steps_per_s": 0.0,
               "mine": np.arange(n) % world_size == rank}  # the episodes this process runs
        todo = np.flatnonzero(out["mine"])
        while len(todo):
            if self._envs is None:
                self._envs = make_vector_env(self.env_cfg, min(self.num_envs, len(todo)))
            try:
                res = run_rollouts(policy, self._envs, len(todo), [self.seed + int(k) for k in todo],
                                   self.video_episodes if len(todo) == out["mine"].sum() else 0,
                                   self._goal_instructions(self._envs.num_envs))
                finished = np.ones(len(todo), bool)
                out["frames"], out["steps_per_s"] = res["frames"], res["steps_per_s"]
            except SimulatorCrash as crash:
                res, finished = crash.results, crash.finished
                dead = _dead_workers(self._envs)
                lost = sorted({int(crash.episode_of[i]) for i in (dead or range(len(crash.episode_of)))
                               if crash.episode_of[i] >= 0 and not finished[crash.episode_of[i]]})
                out["failed"][todo[lost]] = True
                finished = finished.copy()
                finished[lost] = True  # not to be run again
                log.warning(f"a simulator process died during rollouts: episode(s) {todo[lost].tolist()} recorded as "
                            f"failed; restarting the envs for the {int((~finished).sum())} episode(s) left")
                self._envs.close(terminate=True)
                self._envs = None
            done = finished & ~np.isin(todo, out["failed"].nonzero()[0])
            for key in ("success", "return", "length"):
                out[key][todo[done]] = res[key][done]
            if res.get("achievements") is not None:
                if out.get("achievements") is None:
                    out["achievements"], out["unlocked"] = res["achievements"], np.zeros((n, len(res["achievements"])), bool)
                out["unlocked"][todo[done]] = res["unlocked"][done]
            todo = todo[~finished]
        return out

    def _goal_instructions(self, num_envs: int) -> Any:
        from toolkit.exploration.terms import GoalInstructions, build_suggester, conditions_on_goals

        if not conditions_on_goals(self.goals):
            return None
        if self._suggester is None:
            self._suggester = build_suggester(self.goals)
        return GoalInstructions(self._suggester, num_envs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:  # not again when a run resumes
            self.start = self._evaluate_and_record(trainer, pl_module)
            for logger in trainer.loggers:  # Lightning's self.log has no step-0 value outside the loops
                logger.log_metrics(self.start, step=0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last = self._evaluate_and_record(trainer, pl_module)
        pl_module.log_dict(self.last)  # the same values on every process (gathered in _evaluate_and_record)

    def _evaluate_and_record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate, gather the episodes of every DDP process, write the video; the ``rollout/*`` metrics."""
        start = time.perf_counter()
        res = self.evaluate(pl_module, trainer.global_rank, trainer.world_size)
        if trainer.world_size > 1:  # each process ran every world_size-th episode: gather them all
            res = _gather_episodes(pl_module, res, self.num_episodes)
        self.total_time_s += time.perf_counter() - start
        ok = ~res["failed"]  # a crashed simulator says nothing about the policy: those episodes are left out
        mean = (lambda x: float(x[ok].mean())) if ok.any() else (lambda x: 0.0)  # noqa: E731
        metrics = {
            "rollout/success_rate": mean(res["success"]),
            "rollout/return": mean(res["return"]),
            "rollout/episode_length": mean(res["length"]),
            "rollout/env_steps_per_s": float(res["steps_per_s"]),
            "rollout/failed_episodes": float(res["failed"].sum()),
        }
        if res.get("achievements") is not None:  # Crafter
            metrics.update(achievement_metrics(res["achievements"], res["unlocked"][ok], "rollout/"))
        if res["frames"] and self.video_dir and trainer.is_global_zero:
            from toolkit.envs.video import tile_episodes, write_mp4

            self.last_video = write_mp4(Path(self.video_dir) / f"rollout_step{trainer.global_step:06d}.mp4",
                                        tile_episodes(res["frames"]))
        return metrics

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None
