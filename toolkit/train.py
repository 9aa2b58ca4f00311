"""What `python train.py` does: collect demos if missing, build data/encoder/policy/trainer from the
config, fit with rollouts at validation, and print a summary."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from toolkit.errors import ToolkitError, exit_on_user_error

log = logging.getLogger(__name__)


def find_last_checkpoint(log_dir: str | Path, task_name: str) -> Path | None:
    """The newest ``last.ckpt`` among this task's runs (run dirs are timestamped)."""
    found = sorted(Path(log_dir, task_name, "runs").glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def ensure_demos(cfg: DictConfig, env_args: dict | None) -> None:
    """Collect into ``data.path`` until it holds ``data.num_demos`` episodes (a no-op when it does).
    ``env_args``: what the run's env writes into episode files (None: ``env=none``, nothing to collect
    from); a file holding another env's or another dataset's episodes is refused."""
    from toolkit.collect import collect_from_config, collection_lock, existing_episodes
    from toolkit.data_env_checks import check_collected_file

    path = Path(cfg.data.path)
    source = cfg.data.get("source")
    if source is not None:  # data=robomimic|spoc|spawnnet|lerobot: converted into data.path once
        from toolkit.convert import convert_source

        convert_source(source, path)
        return
    # a parallel job of the same sweep may be collecting it right now (no lock file when nothing collects)
    with collection_lock(path) if cfg.collect.enabled else contextlib.nullcontext():
        have, _ = existing_episodes(path)
    if env_args is not None:
        check_collected_file(path, env_args)
    if have >= (cfg.data.num_demos or 1):
        return
    if env_args is None:
        raise ToolkitError(f"env=none: nothing to collect from, and data.path={path} holds {have} episodes "
                           f"(data.num_demos={cfg.data.num_demos}); point data.path at a file, or choose an env")
    if not cfg.collect.enabled:
        raise ToolkitError(f"data.path={path} holds {have} episodes, data.num_demos={cfg.data.num_demos} are "
                           f"needed; collect them (`python -m toolkit.collect`) or set collect.enabled=true")
    rollout = cfg.callbacks.get("rollout")
    if rollout is not None and cfg.collect.seed <= rollout.seed < cfg.collect.seed + 10 * cfg.data.num_demos:
        raise ToolkitError(f"collect.seed={cfg.collect.seed} and callbacks.rollout.seed={rollout.seed} overlap: "
                           f"evaluation would replay training configurations")
    log.info(f"collecting {cfg.data.num_demos - have} demonstrations into {path}")
    collect_from_config(cfg)


def adapt_policy_config(cfg: DictConfig, action_space, datamodule) -> None:
    """What the env and data decide about the policy, written into ``cfg.policy`` (so checkpoints rebuild it):
    discrete actions from a ``Discrete`` action space; an instruction embedding (``lang_dim``) when the
    episodes have instructions and ``language`` is set (``language=null`` turns it off)."""
    import gymnasium as gym
    from hydra.utils import instantiate
    from omegaconf import open_dict

    if isinstance(action_space, gym.spaces.Discrete):
        if "action_type" not in cfg.policy:
            raise ToolkitError(f"policy {cfg.policy._target_} has no discrete actions, which this env needs ({action_space})")
        with open_dict(cfg):
            cfg.policy.action_type, cfg.policy.num_actions = "discrete", int(action_space.n)
    if cfg.get("language") is None or "lang_dim" not in cfg.policy or not datamodule.has_instructions():
        return
    datamodule.language = instantiate(cfg.language)
    with open_dict(cfg):
        cfg.policy.lang_dim = datamodule.language.out_dim


def train(cfg: DictConfig) -> dict:
    """Run the whole job; returns the summary (also written to ``<output_dir>/summary.json``)."""
    import lightning as L
    import torch
    from hydra.utils import get_class, instantiate

    from toolkit.config import check_types
    from toolkit.data_env_checks import plan_rollouts
    from toolkit.encoders.weights import load_pickled, set_trust_pickled_code, trust_pickled_code
    from toolkit.envs.vector import check_env

    from toolkit.console import quiet_console

    quiet_console()  # Hydra has configured logging: each Lightning line once, no tips, no unactionable warnings
    start = time.perf_counter()
    for group in ("env", "data", "encoder", "policy", "trainer"):
        check_types(cfg[group], group)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            check_types(node, f"{group}.{name}")

    L.seed_everything(cfg.seed, workers=True)
    # before anything reads a checkpoint (encoder weights, resume): pickled code runs only with this opt-in
    set_trust_pickled_code(cfg.get("trust_pickled_code", False))
    torch.set_num_threads(cfg.num_threads)
    # fail fast on a bad env config (unknown task...) before collecting; env=none: no env (no rollouts)
    # (debug configs may leave env fields without a _target_ behind env=none)
    spec = check_env(cfg.env) if cfg.get("env") and cfg.env.get("_target_") else None
    datamodule = instantiate(cfg.data)  # likewise a bad data config (the file is opened in setup)
    online = getattr(datamodule, "online", False)  # policy=ppo...: the simulator is the data source
    if not online and (cfg.get("goals") or cfg.get("intrinsic")):
        raise ToolkitError("goals= and intrinsic= reward the policy's own experience: they need online training "
                           f"(policy=ppo, ppo_flare or iql_online), not a dataset ({cfg.data._target_})")
    init = None
    if cfg.get("init_from"):  # online fine-tuning of a checkpoint: its encoder, actor and normalization
        from toolkit.policies.init_from import adopt_checkpoint_config, read_init_checkpoint

        init = read_init_checkpoint(cfg.init_from)
        adopt_checkpoint_config(cfg, init, spec, cfg.init_from)
    collect_start = time.perf_counter()
    if not online:
        ensure_demos(cfg, None if spec is None else spec.env_args)
    collect_time = time.perf_counter() - collect_start

    adapt_policy_config(cfg, None if spec is None else spec.action_space, datamodule)
    encoder = instantiate(cfg.encoder)
    if datamodule.feature_cache and encoder.frozen and not cfg.policy.get("blank_images"):
        from toolkit.encoders.cache import build_feature_cache

        image_keys = datamodule.image_keys()
        datamodule.feature_path = build_feature_cache(encoder, OmegaConf.to_container(cfg.encoder, resolve=True),
                                                      datamodule.path, image_keys)
        log.info(f"training on cached {type(encoder).__name__} features: {datamodule.feature_path}")
    datamodule.transitions = getattr(get_class(cfg.policy._target_), "needs_transitions", False)
    datamodule.setup("fit")
    plan_rollouts(cfg, spec, datamodule.shape_meta)  # env=none, or a dataset from elsewhere: no rollouts
    # _convert_="all": the policy's hyperparameters (saved in checkpoints) stay plain Python containers
    shape_meta, stats = (datamodule.shape_meta, datamodule.stats) if init is None else \
        (init["hyper_parameters"]["shape_meta"], init["hyper_parameters"]["stats"])
    policy = instantiate(cfg.policy, encoder=encoder, shape_meta=shape_meta, stats=stats, _convert_="all")
    if init is not None:
        from toolkit.policies.init_from import load_actor_weights

        load_actor_weights(policy, init, cfg.init_from)
        log.info(f"initialized from {cfg.init_from}")
    policy.toolkit_cfg = OmegaConf.to_container(cfg, resolve=True)
    policy.language = datamodule.language
    policy.trained_instructions = datamodule.instruction_summary if datamodule.language is not None else None
    callbacks = {name: instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=list(callbacks.values()), logger=loggers or False)

    ckpt_path = cfg.ckpt_path
    own = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    if ckpt_path is None and own.exists():  # a requeued job (SLURM pre-emption, time-out) reuses its output dir
        ckpt_path = own
    if ckpt_path is None and cfg.resume:
        ckpt_path = find_last_checkpoint(cfg.paths.log_dir, cfg.task_name)
        if ckpt_path is None:
            raise ToolkitError(f"resume=true: no last.ckpt under {cfg.paths.log_dir}/{cfg.task_name}/runs/*/checkpoints")
    if ckpt_path is not None:
        if not Path(ckpt_path).exists():
            raise ToolkitError(f"ckpt_path={ckpt_path} does not exist")
        log.info(f"resuming from {ckpt_path}")
    # the step training starts from: fit restores it from the checkpoint (mmap: nothing else is read). Both read
    # it with weights_only=True: a checkpoint that would run code is refused here, by name (unless trusted)
    step_start = 0 if ckpt_path is None else load_pickled(ckpt_path, mmap=True)["global_step"]
    fit_start = time.perf_counter()
    trainer.fit(policy, datamodule, ckpt_path=ckpt_path, weights_only=not trust_pickled_code())
    fit_time = time.perf_counter() - fit_start
    trained_steps = trainer.global_step - step_start  # by this process (a resumed run: since its checkpoint)

    rollout = callbacks.get("rollout")
    best, last = callbacks.get("best_checkpoint"), callbacks.get("last_checkpoint")
    # time spent rolling out (evaluation, DAgger) is not training time
    train_time = fit_time - sum(getattr(c, "total_time_s", 0.0) for c in callbacks.values())
    summary = {
        **(rollout.last if rollout else {}),
        **({k.replace("rollout/", "rollout_at_start/"): v for k, v in rollout.start.items()} if rollout else {}),
        "global_step": trainer.global_step,
        "wall_time_s": time.perf_counter() - start,
        "collect_time_s": collect_time,
        "trained_steps": trained_steps,
        "train_samples_per_s": trained_steps * cfg.data.batch_size / max(train_time, 1e-9),
        **(datamodule.env_metrics() if online else {}),
        "best_checkpoint": getattr(best, "best_model_path", None) or None,
        "last_checkpoint": getattr(last, "last_model_path", None) or None,
        "logs": [str(lg.log_dir or lg.save_dir) for lg in loggers],
        "video": str(rollout.last_video) if rollout and rollout.last_video else None,
        "output_dir": cfg.paths.output_dir,
    }
    if trainer.is_global_zero:  # DDP: one summary, from rank 0
        from toolkit.plot import try_plot_run

        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        summary["plot"] = try_plot_run(cfg.paths.output_dir)  # curves.png; None without CSV logs, a warning if it fails
        Path(cfg.paths.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are long: wrap them, never cut them
    rows = [
        ("rollout success rate", summary.get("rollout/success_rate")),
        *([("rollout Crafter score (%)", summary["rollout/crafter_score"]),
           ("achievements unlocked", summary.get("rollout/achievements_unlocked"))]
          if "rollout/crafter_score" in summary else []),
        ("mean episode length", summary.get("rollout/episode_length")),
        ("training steps", summary.get("global_step")),
        ("wall time", f"{summary['wall_time_s']:.0f} s"),
        ("best checkpoint", summary.get("best_checkpoint")),
        ("last checkpoint", summary.get("last_checkpoint")),
        ("logs", ", ".join(summary.get("logs") or [])),
        ("rollout video", summary.get("video")),
        ("curves", summary.get("plot")),
    ]
    for name, value in rows:
        if isinstance(value, float):
            value = f"{value:.2f}"
        table.add_row(name, "-" if value is None else str(value))
    Console().print(table)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _close_loggers() -> None:
    """A failed run must not leave its W&B run open (the next job of a sweep would log into it)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)


def run(cfg: DictConfig) -> float | None:
    """Hydra task function: returns the optimized metric. A single run exits on a ToolkitError with its
    message; inside a multirun (sweeps, Optuna) a failing job is logged, leaves ``failed.txt`` in its
    output dir, closes its loggers and returns NaN, and the sweep goes on with the other jobs."""
    if not _in_multirun():
        with exit_on_user_error():
            return train(cfg).get(cfg.optimized_metric)
    try:
        return train(cfg).get(cfg.optimized_metric)
    except Exception as e:  # noqa: BLE001: one job's failure must not end the sweep
        import traceback

        cause = e if isinstance(e, ToolkitError) else (e.__cause__ if isinstance(e.__cause__, ToolkitError) else None)
        text = f"error: {cause}" if cause is not None else traceback.format_exc()
        log.error(f"job failed, the sweep goes on: {text}")
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        Path(cfg.paths.output_dir, "failed.txt").write_text(text + "\n")
        _close_loggers()
        return float("nan")
