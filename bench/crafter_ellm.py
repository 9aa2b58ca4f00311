"""Crafter exploration (issue 15): PPO with Crafter's reward, + RND, + ELLM goals (oracle suggester), and ELLM
without Crafter's reward (reward-free pre-training, as ELLM), on the same number of env steps, several seeds.

Every run is ``python train.py experiment=crafter_ppo`` (8 envs x 128 steps per PPO cycle, the Nature CNN from
pixels + inventory) with ``trainer.max_steps`` set from ``--env-steps`` (16 updates per 1,024 env steps). The
final evaluation runs ``--episodes`` episodes at unseen worlds (seeds 1,000,000+); training worlds start at
500,000. Reported per setup (mean over seeds): the Crafter score and the distinct achievements unlocked in the
final evaluation, the distinct achievements unlocked by the last 100 training episodes, and per achievement the
fraction of evaluation episodes that unlocked it. Beside them, the published anchors.

Also measured here: Crafter env steps/s with 1 and 2 simulator processes (random actions, 64 px, captions on
and off), and the captioners' cost per step.

    python bench/crafter_ellm.py [--root DIR] [--seeds 0 1 2] [--env-steps 256000] [--episodes 20]
        [--setups crafter rnd ellm ellm_reward_free] [--speed-only | --no-speed] [--records-only]

Finished runs are reused (bench/online_finetune.py's ``run``), and each finished run's results are also kept in
the repository (``bench/results/crafter_ellm_runs/<run>.json``, ``--records``): the whole bench takes longer than
one machine lives, so a later session on a fresh machine reads the runs an earlier one finished and runs only
the rest. Prints markdown tables and writes them to ``bench/results/crafter_ellm.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_finetune import ROOT, fmt, run, write_table  # noqa: E402

SETUPS = {
    "crafter": ("PPO, Crafter's reward", []),
    "rnd": ("PPO + RND", ["intrinsic=rnd"]),
    "ellm": ("PPO + ELLM (oracle goals)", ["goals=oracle"]),
    "ellm_reward_free": ("ELLM (oracle goals), no Crafter reward", ["goals=oracle", "env.reward=none"]),
}
# the Crafter paper's scores at 1M env steps (Hafner, 2021, table 1), in percent
ANCHORS = "random 1.6, PPO 4.6, Rainbow 4.3, DreamerV2 10.0, human experts 50.5"
UPDATES_PER_1024_STEPS = 16  # experiment=crafter_ppo: 4 epochs x (8 envs x 128 steps / batch 256)


def env_speed(processes: int, captions: bool, steps: int = 2000) -> float:
    """Env steps/s of ``processes`` Crafter envs (one per process; 1: in this process) under random actions,
    world generation at each reset included."""
    from toolkit.envs.vector import make_vector_env

    cfg = {"_target_": "toolkit.envs.crafter.CrafterEnv", "captions": captions}
    envs = make_vector_env(cfg, processes, processes > 1)
    rng = np.random.default_rng(0)
    envs.reset(seed=list(range(processes)))
    start, done = time.perf_counter(), 0
    while done < steps:
        _, _, terminated, truncated, _ = envs.step(rng.integers(0, 17, processes))
        done += processes
        ended = terminated | truncated
        if ended.any():
            envs.reset(seed=[int(s) if e else None for s, e in zip(rng.integers(0, 10**6, processes), ended)],
                       options={"reset_mask": ended})
    rate = done / (time.perf_counter() - start)
    envs.close()
    return rate


def caption_cost(steps: int = 500) -> float:
    """Milliseconds per step the captioners add (captions on minus off, in one process, no resets)."""
    from toolkit.envs.crafter import CrafterEnv

    times = {}
    for captions in (False, True):
        env = CrafterEnv(captions=captions, max_episode_steps=10**6)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(steps):
            env.step(int(rng.integers(0, 5)))  # moves and noop: the agent stays alive
        times[captions] = (time.perf_counter() - start) / steps
        env.close()
    return 1000 * (times[True] - times[False])


# what a run's record keeps: its summary (every scalar) and these curves (the rest of metrics.csv stays in the run dir)
RECORDED_CURVES = ("rollout/crafter_score", "rollout/achievements_unlocked", "env/achievements_unlocked",
                   "env/steps_per_s")


def recorded_run(name: str, root: Path, overrides: list[str], threads: int, records: Path) -> dict:
    """``run`` (online_finetune's), unless ``records/<name>.json`` holds the run already (finished on an earlier
    machine); a run finished here is written there. A record made with other overrides is refused, not reused."""
    record = records / f"{name}.json"
    if record.exists():
        stored = json.loads(record.read_text())
        if stored["overrides"] != overrides:
            raise ValueError(f"{record}: recorded with overrides {stored['overrides']}, this bench asks for "
                             f"{overrides}; move the record away to run it again")
        print(f"reusing the record {record}", flush=True)
        return stored["summary"]
    summary = run(name, root, overrides, threads)
    summary["metrics"] = {k: v for k, v in summary["metrics"].items() if k in RECORDED_CURVES}
    records.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"overrides": overrides, "summary": summary}, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/crafter_ellm"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=256_000)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true", help="only the env speed and captioner cost")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the env speed (parts of the bench run side by side; a final run measures it alone)")
    parser.add_argument("--override", nargs="*", default=[], help="extra train.py overrides for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "crafter_ellm.md")
    parser.add_argument("--records-only", action="store_true",
                        help="train nothing: the tables from the runs that have a record, the others listed as not run")
    parser.add_argument("--records", type=Path, default=ROOT / "bench" / "results" / "crafter_ellm_runs",
                        help="finished runs' results, kept in the repository across machines")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)

    lines = []
    if not args.no_speed:
        speed = {(p, c): env_speed(p, c) for p in (1, 2) for c in (False, True)}
        lines += ["Crafter env steps/s, random actions, 64 px, world generation at resets included:", "",
                  "| processes | captions off | captions on |", "|---|---|---|"]
        lines += [f"| {p} | {speed[(p, False)]:.0f} | {speed[(p, True)]:.0f} |" for p in (1, 2)]
        lines += ["", f"Captioners (state caption, transition caption, goal context): {caption_cost():.2f} ms per step.",
                  ""]
    if args.speed_only:
        write_table(lines, args.out, args.root)
        return

    updates = max(1, round(args.env_steps / 1024 * UPDATES_PER_1024_STEPS))
    results: dict[str, dict[int, dict]] = {}  # setup -> seed -> the run's summary
    missing = []
    for key in args.setups:
        extra = SETUPS[key][1]
        for seed in args.seeds:
            name = f"crafter_{key}_{args.env_steps}_s{seed}"
            if args.records_only and not (args.records / f"{name}.json").exists():
                missing.append(name)
                continue
            results.setdefault(key, {})[seed] = recorded_run(
                name, args.root, ["experiment=crafter_ppo", f"trainer.max_steps={updates}",
                                  f"trainer.val_check_interval={max(1, updates // 4)}",
                                  f"callbacks.rollout.num_episodes={args.episodes}", f"seed={seed}", *extra,
                                  *args.override], args.threads, args.records)
    if not results:
        raise SystemExit(f"no records of these runs in {args.records}: {', '.join(missing)}")

    from toolkit.envs.crafter import ACHIEVEMENTS

    lines += [f"Crafter, {args.env_steps:,} env steps per run, final evaluation on {args.episodes} unseen worlds (mean "
              f"over seeds; sd in brackets). Published anchors at 1M steps (Crafter score, %): {ANCHORS}.", "",
              "| setup | seeds | Crafter score (%) | achievements unlocked (eval) | achievements unlocked (last 100 "
              "training episodes) | eval return | eval episode length | env steps/s | wall time per run (min) |",
              "|---|---|---|---|---|---|---|---|---|"]

    def mean_sd(values: list[float], spec: str) -> str:
        v = np.asarray(values, float)
        return f"{fmt(float(v.mean()), spec)} ({fmt(float(v.std(ddof=1)) if len(v) > 1 else float('nan'), spec)})"

    for key, by_seed in results.items():
        runs = list(by_seed.values())
        lines.append(f"| {SETUPS[key][0]} | {', '.join(map(str, by_seed))} | "
                     f"{mean_sd([r['rollout/crafter_score'] for r in runs], '.2f')} | "
                     f"{mean_sd([r['rollout/achievements_unlocked'] for r in runs], '.1f')} | "
                     f"{mean_sd([r.get('env/achievements_unlocked', float('nan')) for r in runs], '.1f')} | "
                     f"{mean_sd([r['rollout/return'] for r in runs], '.2f')} | "
                     f"{mean_sd([r['rollout/episode_length'] for r in runs], '.0f')} | "
                     f"{mean_sd([r.get('env/steps_per_s', float('nan')) for r in runs], '.0f')} | "
                     f"{np.mean([r['process_wall_s'] for r in runs]) / 60:.0f} |")
    lines += ["", "Per achievement, the fraction of evaluation episodes that unlocked it (mean over seeds):", "",
              "| achievement | " + " | ".join(SETUPS[k][0] for k in results) + " |",
              "|---|" + "---|" * len(results)]
    for achievement in ACHIEVEMENTS:
        cells = [np.mean([r[f"rollout/achievement/{achievement}"] for r in by_seed.values()])
                 for by_seed in results.values()]
        lines.append(f"| {achievement} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")

    # learning curves from the runs' recorded metrics: the Crafter score of each evaluation and the distinct
    # achievements of the last 100 training episodes (ELLM's measure of exploration), mean over seeds
    from toolkit.plot import Run, curve_rows, plot_groups

    groups = {SETUPS[key][0]: [Run(Path(name), name, seed, None, [], r["metrics"]) for seed, r in by_seed.items()
                               for name in [f"crafter_{key}_{args.env_steps}_s{seed}"]]
              for key, by_seed in results.items()}
    plots = args.out.parent / f"{args.out.stem}_plots"
    for metric in ("rollout/crafter_score", "env/achievements_unlocked"):
        plot_groups(groups, metric, plots)
    lines += ["", "Crafter score (%) by evaluation (PPO update: mean over seeds):", ""]
    mean = curve_rows(groups, "rollout/crafter_score")[1]  # per configuration and step, steps in order
    for label in groups:
        lines.append(f"- {label}: " + ", ".join(f"{row['step']}: {row['mean']:.2f}" for row in mean
                                                 if row["configuration"] == label))
    lines += ["", f"Curves (x: PPO updates, 16 per 1,024 env steps; band: min-max over seeds): "
              f"`{plots.relative_to(ROOT) if plots.is_relative_to(ROOT) else plots}/`"]
    if missing:
        lines += ["", f"Not run yet (no record in {args.records.name}/): {', '.join(missing)}"]
    write_table(lines, args.out, args.root)


if __name__ == "__main__":
    main()
