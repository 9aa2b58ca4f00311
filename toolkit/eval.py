"""Evaluate checkpoints at unseen seeds: per-episode results, a summary with a 95% interval, optional video.

    python eval.py CKPT_OR_DIR... [--episodes 50] [--envs 2] [--seed 4000000] [--video K]
        [--env KEY=VALUE ...] [--which last|best] [--out DIR] [--threads N] [--trust-pickled-code]

Each argument is a checkpoint, a run dir or a sweep dir (every ``**/checkpoints/last.ckpt`` under it, or the
best checkpoint with ``--which best``). The policy is rebuilt from the checkpoint alone and rolled out in
the env its config names (``--env task=door-open-v3``, ``--env level=GoToRedBall``... change fields of it;
``--env +key=value`` adds one) in ``--envs`` vector envs. Episode k is reset with seed ``--seed + k``.

Seeds: collection uses 0, 1, ..., online training 500,000, ..., the validation rollouts during training
1,000,000, ..., DAgger's labelled episodes 2,000,000, ..., zero-shot missions 3,000,000, ...; evaluation
starts at 4,000,000 so that no evaluated configuration was seen in training (a warning names any overlap
with the checkpoint's own ranges).

Writes per checkpoint ``episodes.csv``/``episodes.json`` (seed, success, return, length; the instruction
where the env has one; Crafter's achievements), ``summary.json`` and ``video.mp4`` (``--video K``: the first
K episodes side by side) into ``--out`` (default ``<run dir>/eval/<checkpoint name>/``), and for all of them a
table and ``summary.csv`` (one row per run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from toolkit.errors import ToolkitError

DEFAULT_SEED = 4_000_000
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class Target:
    """One checkpoint to evaluate, and where it came from."""

    checkpoint: Path
    run_dir: Path | None
    name: str
    overrides: list[str] = field(default_factory=list)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a success rate (sound at 0% and 100%, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at 0 and n successes (the formula gives them up to rounding)
    return (0.0 if successes == 0 else max(0.0, center - half)), (1.0 if successes == n else min(1.0, center + half))


# --- checkpoints and their env ------------------------------------------------------------------------------
def parse_env_overrides(items: list[str]) -> dict[str, Any]:
    """``["task=door-open-v3", "+reward=sparse"]`` -> ``{"task": "door-open-v3", "+reward": "sparse"}``, values
    typed as YAML reads them (``64`` an int, ``null`` None)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.lstrip("+"):
            raise ToolkitError(f"--env {item}: expected KEY=VALUE (e.g. --env task=door-open-v3)")
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def apply_env_overrides(env_cfg: dict[str, Any], overrides: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's env config with ``overrides``; a key the env config does not have is refused (a typo
    would otherwise reach the env's constructor) unless written ``+key``. Another ``_target_`` starts from an
    empty config (the old env's fields mean nothing to the new one)."""
    env_cfg = dict(env_cfg or {})
    target = next((v for k, v in overrides.items() if k.lstrip("+") == "_target_"), None)
    if target is not None and target != env_cfg.get("_target_"):
        env_cfg = {}
        overrides = {k.lstrip("+"): v for k, v in overrides.items()}
        overrides = {"_target_": overrides.pop("_target_"), **{f"+{k}": v for k, v in overrides.items()}}
    for key, value in overrides.items():
        name = key.lstrip("+")
        if not key.startswith("+") and name not in env_cfg and name != "_target_":
            fields = ", ".join(k for k in env_cfg if k != "_target_") or "none"
            raise ToolkitError(f"--env {name}={value}: the env of {checkpoint} ({env_cfg.get('_target_')}) has no "
                               f"field {name!r} (its fields: {fields}); write --env +{name}=... to add one")
        env_cfg[name] = value
    return env_cfg


def check_env_fits(policy: Any, spec: Any, env_cfg: dict[str, Any], checkpoint: str | Path) -> None:
    """The env must give the cameras, state and actions the checkpoint was trained on (one error naming both)."""
    import gymnasium as gym

    from toolkit.data_env_checks import rollout_mismatches

    problems = rollout_mismatches(policy.hparams["shape_meta"], spec.observation_space, spec.action_space)
    discrete = bool(getattr(policy, "discrete", False))
    if not any(p.startswith("action") for p in problems):  # same size: the kind and number of actions too
        if discrete != isinstance(spec.action_space, gym.spaces.Discrete):
            kind = "discrete" if discrete else "continuous"
            problems.append(f"actions: checkpoint {kind}, env {spec.action_space}")
        elif discrete and int(policy.hparams.get("num_actions") or 0) != int(spec.action_space.n):
            n = policy.hparams.get("num_actions")
            problems.append(f"actions: checkpoint {n} discrete, env {spec.action_space}")
    if problems:
        env_text = ", ".join(f"{k}={v}" for k, v in env_cfg.items())
        raise ToolkitError(f"{checkpoint} was trained on other observations or actions than the env "
                           f"({env_text}) gives ({'; '.join(problems)}): choose an env that fits the checkpoint")


def load_for_eval(checkpoint: str | Path, env_overrides: dict[str, Any] | None = None,
                  trust_pickled_code: bool = False, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The policy of ``checkpoint`` and the env config to evaluate it in (the checkpoint's, with
    ``env_overrides``), checked to fit. Nothing in the file runs unless ``trust_pickled_code`` (see load_policy);
    without it the env config may only name toolkit classes either."""
    from toolkit.envs.vector import check_env
    from toolkit.policies.base import check_checkpoint_targets, load_policy

    path = Path(checkpoint)
    if not path.is_file():
        raise ToolkitError(f"{path}: no such checkpoint")
    policy = load_policy(path, device=device, trust_pickled_code=trust_pickled_code)
    stored = (policy.toolkit_cfg or {}).get("env") or {}
    env_cfg = apply_env_overrides(stored, env_overrides or {}, path)
    if not env_cfg.get("_target_"):
        raise ToolkitError(f"{path} was trained without an env (env=none): name one, e.g. "
                           f"--env _target_=toolkit.envs.metaworld.MetaWorldEnv task=drawer-open-v3")
    if not trust_pickled_code and env_cfg["_target_"] == stored.get("_target_"):  # the file's env, not the user's
        check_checkpoint_targets(env_cfg, "toolkit_cfg.env", path)
    try:
        spec = check_env(env_cfg)
    except ToolkitError:
        raise
    except Exception as e:  # noqa: BLE001: a constructor that refuses the fields (Hydra wraps its TypeError)
        if isinstance(e.__cause__, ToolkitError):
            raise e.__cause__ from None
        raise ToolkitError(f"the env {env_cfg} of {path} cannot be built: {e.__cause__ or e}") from None
    check_env_fits(policy, spec, env_cfg, path)
    return policy, env_cfg


@contextmanager
def vector_envs(env_cfg: dict[str, Any], num_envs: int) -> Iterator[Any]:
    """``num_envs`` vector envs of ``env_cfg`` (one process each), closed on leaving."""
    from toolkit.envs.vector import make_vector_env

    envs = make_vector_env(env_cfg, num_envs)
    try:
        yield envs
    except BaseException:
        _close_broken(envs)
        raise
    envs.close()


def _close_broken(envs: Any) -> None:
    """Close a vector env after an error, also when one of its processes died (gymnasium's close then waits on
    the dead process's pipe and raises)."""
    try:
        envs.close(terminate=True)
    except Exception:  # noqa: BLE001: deliberate, the error being handled is the caller's (re-raised there); tested
        for process in getattr(envs, "processes", None) or []:
            if process.is_alive():
                process.terminate()
        envs.closed = True  # else its __del__ tries (and fails) again


def seen_seed_ranges(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The reset seeds the checkpoint's run used, as ``(what, start, stop)``, where its config bounds them."""
    def get(*keys: str) -> Any:
        node: Any = cfg
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    ranges = []
    collect_seed, demos = get("collect", "seed"), get("data", "num_demos")
    if isinstance(collect_seed, int) and isinstance(demos, int):  # failed attempts take seeds too (as train.py)
        ranges.append(("collection", collect_seed, collect_seed + 10 * demos))
    for what, keys, count in (("validation rollout", ("callbacks", "rollout"), lambda c: c.get("num_episodes")),
                              ("DAgger", ("callbacks", "dagger"),
                               lambda c: (c.get("iterations") or 0) * (c.get("episodes_per_iteration") or 0))):
        node = get(*keys)
        if isinstance(node, dict) and isinstance(node.get("seed"), int) and isinstance(count(node), int):
            ranges.append((what, node["seed"], node["seed"] + count(node)))
    return ranges


# --- one checkpoint --------------------------------------------------------------------------------------------
def episode_rows(res: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """One dict per episode from run_rollouts' results."""
    import numpy as np

    with_instruction = any(i is not None for i in res["instruction"])
    rows = []
    for k, seed in enumerate(seeds):
        row: dict[str, Any] = {"episode": k, "seed": int(seed), "success": bool(res["success"][k]),
                               "return": float(res["return"][k]), "length": int(res["length"][k])}
        if with_instruction:
            row["instruction"] = res["instruction"][k]
        if res.get("achievements") is not None:
            names = np.asarray(res["achievements"])
            row["achievements"] = names[res["unlocked"][k]].tolist()
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], res: dict[str, Any]) -> dict[str, Any]:
    """Success rate with its 95% Wilson interval, mean return and length, env steps/s; Crafter's score and
    achievement rates when the env reports achievements."""
    from toolkit.envs.rollout import achievement_metrics

    n = len(rows)
    wins = sum(r["success"] for r in rows)
    low, high = wilson_interval(wins, n)
    summary = {"episodes": n, "successes": wins, "success_rate": wins / n if n else 0.0,
               "success_ci95": [low, high],
               "mean_return": sum(r["return"] for r in rows) / n if n else 0.0,
               "mean_length": sum(r["length"] for r in rows) / n if n else 0.0,
               "env_steps_per_s": float(res["steps_per_s"])}
    if res.get("achievements") is not None:
        summary.update(achievement_metrics(list(res["achievements"]), res["unlocked"], ""))
    return summary


def write_episodes(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``episodes.json`` as they are, ``episodes.csv`` with success as 0/1 and achievements joined by ``;``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "episodes.json").write_text(json.dumps(rows, indent=1))
    flat = [{**r, "success": int(r["success"]),
             **({"achievements": ";".join(r["achievements"]), "achievements_unlocked": len(r["achievements"])}
                if "achievements" in r else {})} for r in rows]
    write_csv(out_dir / "episodes.csv", flat)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, episodes: int = 50, num_envs: int = 2,
                        seed: int = DEFAULT_SEED, video: int = 0, env_overrides: dict[str, Any] | None = None,
                        trust_pickled_code: bool = False, device: str = "cpu", sample: bool = False) -> dict[str, Any]:
    """Roll out ``episodes`` episodes from seeds ``seed, seed + 1, ...``; writes ``episodes.csv``,
    ``episodes.json``, ``summary.json`` (and ``video.mp4``) into ``out_dir``; returns the summary. ``sample``:
    act with the policy's stochastic policy as in online training (``deterministic_eval=False``), not its mode."""
    from toolkit.envs.rollout import SimulatorCrash, run_rollouts
    from toolkit.exploration.terms import GoalInstructions, build_suggester, conditions_on_goals

    if episodes < 1 or num_envs < 1:
        raise ToolkitError(f"--episodes {episodes} --envs {num_envs}: both must be at least 1")
    start = time.perf_counter()
    policy, env_cfg = load_for_eval(checkpoint, env_overrides, trust_pickled_code, device)
    if sample:
        if not hasattr(policy, "deterministic_eval"):
            raise ToolkitError(f"--sample: {checkpoint} is a {type(policy).__name__}, which acts with one action per "
                               f"state; sampling is for the online policies (PPO, online IQL)")
        policy.deterministic_eval = False
    seeds = list(range(seed, seed + episodes))
    for what, low, high in seen_seed_ranges(policy.toolkit_cfg or {}):
        if low < seed + episodes and seed < high:
            print(f"warning: evaluation seeds {seed}..{seed + episodes - 1} overlap the {what} seeds {low}..{high - 1} "
                  f"of {checkpoint}: those configurations are not unseen", file=sys.stderr)
    goals = (policy.toolkit_cfg or {}).get("goals")  # a goal-conditioned policy acts on its suggester's goals
    try:
        with vector_envs(env_cfg, min(num_envs, episodes)) as envs:
            instructions = GoalInstructions(build_suggester(goals), envs.num_envs) if conditions_on_goals(goals) else None
            res = run_rollouts(policy, envs, episodes, seeds, min(video, episodes), instructions)
    except SimulatorCrash as crash:  # partial results would bias the rate: report, write nothing
        raise ToolkitError(f"evaluating {checkpoint}: {crash}; nothing written, run it again") from None
    out_dir = Path(out_dir)
    rows = episode_rows(res, seeds)
    write_episodes(out_dir, rows)
    summary = {"checkpoint": str(checkpoint), "policy": (policy.toolkit_cfg or {}).get("policy", {}).get("_target_"),
               "env": env_cfg, "env_overrides": env_overrides or {},
               "first_seed": seed, "last_seed": seed + episodes - 1, "sampled": sample,
               **summarize(rows, res), "wall_time_s": time.perf_counter() - start, "video": None,
               "out_dir": str(out_dir)}
    if video and res["frames"]:
        from toolkit.envs.video import tile_episodes, write_mp4

        summary["video"] = str(write_mp4(out_dir / "video.mp4", tile_episodes(res["frames"])))
    elif video:
        print(f"warning: --video {video}: the env of {checkpoint} has no camera, no video written", file=sys.stderr)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- many checkpoints ---------------------------------------------------------------------------------------
def _checkpoint_of(checkpoints_dir: Path, which: str) -> Path | None:
    if which == "best":
        best = sorted(checkpoints_dir.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            return best[-1]
        print(f"warning: no best*.ckpt in {checkpoints_dir}: evaluating last.ckpt", file=sys.stderr)
    last = checkpoints_dir / "last.ckpt"
    return last if last.is_file() else None


def _run_dir(checkpoint: Path) -> Path | None:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _overrides(run_dir: Path | None) -> list[str]:
    """The run's command-line overrides (Hydra's ``.hydra/overrides.yaml``), [] when it has none."""
    import yaml

    path = None if run_dir is None else run_dir / ".hydra" / "overrides.yaml"
    if path is None or not path.is_file():
        return []
    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return []
    return [str(o) for o in items] if isinstance(items, list) else []


def find_targets(paths: list[str | Path], which: str = "last") -> list[Target]:
    """The checkpoints named by ``paths`` (files, run dirs, sweep dirs), each with its run's name and overrides."""
    targets = []
    for arg in paths:
        path = Path(arg)
        if path.is_file():
            run_dir = _run_dir(path)
            targets.append(Target(path, run_dir, (run_dir or path.parent).name, _overrides(run_dir)))
            continue
        if not path.is_dir():
            raise ToolkitError(f"{path}: no such checkpoint or directory")
        dirs = sorted({p.parent for p in path.glob("**/checkpoints/*.ckpt")}, key=_natural_key)
        found = [(d, c) for d in dirs if (c := _checkpoint_of(d, which)) is not None]
        if not found:
            raise ToolkitError(f"{path}: no checkpoints/last.ckpt under it (a run dir, or a sweep dir of runs)")
        for ckpt_dir, ckpt in found:
            run_dir = ckpt_dir.parent
            rel = run_dir.relative_to(path).as_posix()
            targets.append(Target(ckpt, run_dir, run_dir.name if rel == "." else rel, _overrides(run_dir)))
    names = [t.name for t in targets]
    for t in targets:  # best and last of one run, or two runs named alike: tell them apart
        if names.count(t.name) > 1:
            t.name = f"{t.name}:{t.checkpoint.stem}"
    return targets


def _natural_key(path: Path) -> list:
    """Sweep job dirs 0, 1, ..., 10 in numeric order."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.as_posix())]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_") or "run"


def out_dirs(targets: list[Target], out: Path | None, env_tag: str) -> list[Path]:
    """Where each checkpoint's files go: ``--out`` itself for one checkpoint, ``--out/<run name>`` for several;
    by default ``<run dir>/eval/<checkpoint name>[_<env overrides>]``."""
    if out is not None:
        return [out] if len(targets) == 1 else [out / _slug(t.name) for t in targets]
    base = [(t.run_dir / "eval") if t.run_dir else (t.checkpoint.parent / "eval") for t in targets]
    return [b / _slug(t.checkpoint.stem + (f"_{env_tag}" if env_tag else "")) for b, t in zip(base, targets)]


def summary_dir(targets: list[Target], dirs: list[Path], out: Path | None, paths: list[str | Path]) -> Path:
    """Where ``summary.csv`` goes: ``--out``; one checkpoint's own dir; ``<dir>/eval`` for one sweep dir; else
    ``eval`` in the runs' common parent."""
    if out is not None:
        return out
    if len(targets) == 1:
        return dirs[0]
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / "eval"
    return Path(os.path.commonpath([str((t.run_dir or t.checkpoint.parent).resolve()) for t in targets])) / "eval"


def summary_row(target: Target, s: dict[str, Any]) -> dict[str, Any]:
    row = {"run": target.name, "overrides": " ".join(target.overrides), "checkpoint": str(target.checkpoint),
           "episodes": s["episodes"], "first_seed": s["first_seed"], "last_seed": s["last_seed"],
           "success_rate": s["success_rate"],
           "success_ci95_low": s["success_ci95"][0], "success_ci95_high": s["success_ci95"][1],
           "mean_return": s["mean_return"], "mean_length": s["mean_length"], "env_steps_per_s": s["env_steps_per_s"]}
    if "crafter_score" in s:
        row.update(crafter_score=s["crafter_score"], achievements_unlocked=s["achievements_unlocked"])
    return {**row, "out_dir": s["out_dir"]}


def print_table(rows: list[dict[str, Any]]) -> None:
    """One row per run; what every row shares (checkpoint name, episodes, seeds) goes into the title."""
    from rich.console import Console
    from rich.table import Table

    names = {Path(r["checkpoint"]).name for r in rows}
    episodes = {(r["episodes"], r["first_seed"]) for r in rows}
    title = "evaluation" + (f" of {names.pop()}" if len(names) == 1 else "")
    if len(episodes) == 1:
        n, first = episodes.pop()
        title += f", {n} episodes from seed {first:,}"
    crafter = any("crafter_score" in r for r in rows)
    # the overrides all runs share (debug=fast, paths...) say nothing about a row: only those that differ
    split = [r["overrides"].split() for r in rows]
    shared = set.intersection(*map(set, split)) if split else set()
    differing = [" ".join(o for o in s if o not in shared) for s in split]
    overrides = len(rows) > 1 and any(differing)
    table = Table(title=title)
    columns = ["run", *(["overrides"] if overrides else []), "success [95% CI]", "return", "length", "steps/s",
               *(["Crafter score"] if crafter else [])]
    for c in columns:  # names and overrides wrap; the numbers keep their width
        table.add_column(c, overflow="fold", no_wrap=c not in ("run", "overrides"))
    for r, diff in zip(rows, differing):
        run = r["run"] if len(names) <= 1 else f"{r['run']} ({Path(r['checkpoint']).name})"
        cells = [run, *([diff] if overrides else []),
                 f"{r['success_rate']:.0%} [{r['success_ci95_low']:.0%}, {r['success_ci95_high']:.0%}]",
                 f"{r['mean_return']:.2f}", f"{r['mean_length']:.1f}", f"{r['env_steps_per_s']:.0f}",
                 *([f"{r['crafter_score']:.2f}" if "crafter_score" in r else "-"] if crafter else [])]
        table.add_row(*cells)
    Console().print(table)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from toolkit.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="CKPT_OR_DIR", help="checkpoints, run dirs or sweep dirs")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per checkpoint (default 50)")
    parser.add_argument("--envs", type=int, default=2, help="vector envs, one process each (default 2)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the first episode; episode k uses seed + k (default 4,000,000: past "
                             "collection 0.., online training 500,000.., validation rollouts 1,000,000.., DAgger "
                             "2,000,000.. and zero-shot 3,000,000..)")
    parser.add_argument("--video", type=int, default=0, metavar="K", help="write an MP4 of the first K episodes")
    parser.add_argument("--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="change the checkpoint's env config (task=door-open-v3, level=GoToRedBall; "
                             "+key=value adds a field)")
    parser.add_argument("--which", choices=("last", "best"), default="last",
                        help="in run and sweep dirs: checkpoints/last.ckpt (default) or the best*.ckpt")
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default: <run dir>/eval/<checkpoint name>/ per checkpoint)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device of the policy (default cpu)")
    parser.add_argument("--sample", action="store_true",
                        help="online policies (PPO, online IQL): act with samples of the policy, as the training "
                             "envs do, instead of its mode (results go to an eval dir tagged 'sampled')")
    parser.add_argument("--trust-pickled-code", action="store_true",
                        help="load a checkpoint that pickles code (or names classes outside the toolkit): runs it")
    args = parser.parse_args(argv)
    rows = []
    with exit_on_user_error():
        overrides = parse_env_overrides(args.env)
        targets = find_targets(args.paths, args.which)
        env_tag = _slug("_".join(f"{k.lstrip('+')}={v}" for k, v in overrides.items()))[:80] if overrides else ""
        if args.sample:
            env_tag = f"{env_tag}_sampled" if env_tag else "sampled"
        dirs = out_dirs(targets, args.out, env_tag)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for target, out_dir in zip(targets, dirs):
            print(f"evaluating {target.checkpoint} ({args.episodes} episodes from seed {args.seed})")
            summary = evaluate_checkpoint(target.checkpoint, out_dir, args.episodes, args.envs, args.seed, args.video,
                                          overrides, args.trust_pickled_code, args.device, args.sample)
            rows.append(summary_row(target, summary))
    print_table(rows)
    where = summary_dir(targets, dirs, args.out, args.paths)
    where.mkdir(parents=True, exist_ok=True)
    write_csv(where / "summary.csv", rows)
    print(f"results in {', '.join(str(d) for d in dirs)}; summary: {where / 'summary.csv'}")
    return rows


if __name__ == "__main__":
    main()
