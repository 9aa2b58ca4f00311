"""Where IQL and DAgger should beat BC, over several training seeds (20 unseen positions per run):

1. mixed-quality data (drawer-open): 10 expert + 40 noisy-expert episodes (action noise, epsilon-random
   actions) in one file; the BC transformer and IQL are trained on it;
2. DAgger against BC (a task where BC with few demos fails often, pick-place by default): DAgger starts from
   3 demos and adds ``--dagger-iterations`` x ``--dagger-episodes`` expert-labelled episodes (a beta-mixture of
   expert and learner: beta = ``--dagger-decay`` ** k, 1, 0.5, 0.25, ... by default), ``--dagger-steps`` training
   steps per iteration (by default ``--steps`` split evenly: iterations + 1 cycles, each on the aggregate of its
   time, the learning rate's cosine restarted at every iteration), the last cycle on the whole aggregate.
   BC (the same BC transformer, ``--steps`` training steps) gets expert demonstrations:
   - equal expert labels: as many demos as it takes to reach the DAgger file's number of labelled states;
   - equal episodes: as many demos as the DAgger file has episodes (as many initial configurations);
   - DAgger's aggregate: the DAgger file itself (3 demos + the labelled mixture episodes), BC trained on it from
     scratch for ``--steps`` steps. Ross et al. train each policy on the aggregate; this row also separates what
     the data brings (against the two BC rows, at the same training) from DAgger's warm-started schedule.

    python bench/policies.py [--root DIR] [--steps 1000] [--seeds 0 1 2] [--parts mixed dagger]
        [--dagger-iterations 4] [--dagger-episodes 4] [--dagger-steps N] [--horizon H] [--expert lift_first]
        [--dagger-decay 0.5]

Each run is a ``python train.py``; a run whose summary.json exists under ``--root`` is reused and one
interrupted after a checkpoint continues from it (a DAgger run with its file), so the bench can be re-run after
an interruption or with more seeds. Prints a table and writes it to <root>/policies.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drawer_open import ROOT, run  # noqa: E402
from online_finetune import find_summary, train_command  # noqa: E402
from online_finetune import run as run_once  # noqa: E402

# conf/policy/dagger.yaml's callbacks.dagger.decay; runs at this decay keep names without a decay tag
DEFAULT_DECAY = 0.5


def collect(path: Path, root: Path, n: int, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "toolkit.collect", f"data.path={path}", f"data.num_demos={n}",
                    f"paths.root_dir={root}", *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def episode_lengths(path: Path) -> list[int]:
    from toolkit.datamodules.episode_file import episode_names

    with h5py.File(path) as f:
        return [int(f["data"][n].attrs["num_samples"]) for n in episode_names(f)]


def mixed(root: Path, seeds: list[int], common: list[str], noise: float, epsilon: float) -> list[tuple]:
    path = root / "data" / "drawer_mixed.hdf5"
    collect(path, root, 10)
    collect(path, root, 50, f"collect.action_noise={noise}", f"collect.epsilon={epsilon}", "collect.only_success=false")
    rows = []
    for name, extra in [("BC transformer", []), ("IQL", ["policy=iql"])]:
        runs = [run(f"{name.split()[0].lower()}_mixed_s{s}", root, [f"data.path={path}", f"seed={s}", *extra, *common])
                for s in seeds]
        rows.append(("mixed: 10 expert + 40 noisy (drawer-open)", name, "same file", runs))
    return rows


def steps_overrides(steps: int) -> list[str]:
    return [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]


def demos_for_labels(lengths: list[int], labels: int) -> int:
    """The fewest leading episodes (of the given lengths) whose steps reach ``labels``."""
    total = np.cumsum(lengths)
    if total[-1] < labels:
        raise ValueError(f"{len(lengths)} episodes hold {total[-1]} steps, fewer than {labels}")
    return int(np.searchsorted(total, labels)) + 1


def dagger_overrides(path: Path, seed: int, per_iteration: int, iterations: int, episodes: int,
                     decay: float = DEFAULT_DECAY) -> list[str]:
    """DAgger from 3 demos, ``iterations`` x ``episodes`` labelled episodes, iteration k after (k + 1) *
    ``per_iteration`` steps (each a cosine cycle of the learning rate), and a last cycle on the whole aggregate;
    the expert acts with probability ``decay ** k`` at iteration k."""
    total = (iterations + 1) * per_iteration
    return ["policy=dagger", f"data.path={path}", "data.num_demos=3", f"seed={seed}",
            f"callbacks.dagger.iterations={iterations}", f"callbacks.dagger.episodes_per_iteration={episodes}",
            f"callbacks.dagger.steps_per_iteration={per_iteration}", f"callbacks.dagger.decay={decay}",
            f"trainer.max_steps={total}", f"trainer.val_check_interval={total}"]


def aggregate_overrides(path: Path, episodes: int, seed: int, steps: int) -> list[str]:
    """BC from scratch on every episode of a DAgger file (its expert labels), ``steps`` training steps."""
    return [f"data.path={path}", f"data.num_demos={episodes}", f"seed={seed}", *steps_overrides(steps)]


def dagger(root: Path, seeds: list[int], common: list[str], task: str, steps: int, iterations: int,
           episodes: int, per_iteration: int, threads: int, tag: str = "", labeller: str = "metaworld",
           decay: float = DEFAULT_DECAY) -> list[tuple]:
    """The DAgger rows (BC trained ``steps`` steps, DAgger ``per_iteration`` per iteration, beta ``decay ** k``);
    ``tag`` (e.g. ``_h1``) names runs whose ``common`` overrides differ from the defaults. ``labeller``
    (``env.expert``) labels DAgger's states; the BC rows' demos come from Meta-World's expert, which gives the
    same demos from the reset pose."""
    env = [f"env.task={task}"]
    labelled = [*env, f"env.expert={labeller}"] if labeller != "metaworld" else env
    # the BC rows' runs stay shared between labellers and schedules
    dagger_tag = (tag + (f"_{labeller}" if labeller != "metaworld" else "")
                  + (f"_decay{decay:g}" if decay != DEFAULT_DECAY else ""))
    expert = root / "data" / f"{task}_expert.hdf5"
    collect(expert, root, 100, *env)
    runs: dict[str, list] = {"dagger": [], "labels": [], "episodes": [], "aggregate": []}
    budgets: dict[str, list[str]] = {"dagger": [], "labels": [], "episodes": [], "aggregate": []}
    for s in seeds:
        name = f"dagger_{task}_i{iterations}x{episodes}_p{per_iteration}{dagger_tag}_s{s}"
        path = root / "data" / f"{name}.hdf5"
        overrides = [*dagger_overrides(path, s, per_iteration, iterations, episodes, decay), *labelled, *common]
        if find_summary(root, name) is None and not train_command(name, root, overrides, threads)[1]:
            path.unlink(missing_ok=True)  # a run killed before its first checkpoint starts again from 3 demos
        # (one killed later continues from its checkpoint and the file, rolling out only the missing episodes)
        runs["dagger"].append(run_once(name, root, overrides, threads))
        lengths = episode_lengths(path)
        labels, n_episodes = sum(lengths), len(lengths)
        while sum(episode_lengths(expert)) < labels or len(episode_lengths(expert)) < n_episodes:
            collect(expert, root, len(episode_lengths(expert)) + 50, *env)  # tops the expert file up
        n_labels = demos_for_labels(episode_lengths(expert), labels)
        budgets["dagger"].append(f"{labels} ({n_episodes} ep.)")
        runs["aggregate"].append(run_once(f"bc_on_{name}_k{steps}", root, aggregate_overrides(path, n_episodes, s, steps)
                                          + [*labelled, *common], threads))
        budgets["aggregate"].append(f"{labels} ({n_episodes} ep.)")
        for key, n in (("labels", n_labels), ("episodes", n_episodes)):
            runs[key].append(run_once(f"bc_{task}_d{n}_k{steps}{tag}_s{s}", root,
                                      [f"data.path={expert}", f"data.num_demos={n}", f"seed={s}", *env,
                                       *steps_overrides(steps), *common], threads))
            n_steps = int(np.sum(episode_lengths(expert)[:n]))
            budgets[key].append(f"{n} demos = {n_steps}")
    data = f"({task}, BC {steps} training steps)"
    return [(f"DAgger {data}", f"DAgger: 3 demos + {iterations} x {episodes} labelled episodes, "
                               f"{per_iteration} steps per iteration, beta {decay:g}^k, "
                               f"labels by env.expert={labeller}",
             ", ".join(budgets["dagger"]), runs["dagger"]),
            (f"equal expert labels {data}", "BC transformer on expert demos", ", ".join(budgets["labels"]),
             runs["labels"]),
            (f"equal episodes {data}", "BC transformer on expert demos", ", ".join(budgets["episodes"]),
             runs["episodes"]),
            (f"DAgger's aggregate {data}", "BC transformer on the DAgger file, trained from scratch",
             ", ".join(budgets["aggregate"]), runs["aggregate"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["mixed", "dagger"], choices=["mixed", "dagger"])
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--dagger-task", default="pick-place-v3")
    parser.add_argument("--dagger-iterations", type=int, default=4)
    parser.add_argument("--dagger-episodes", type=int, default=4, help="labelled episodes per DAgger iteration")
    parser.add_argument("--dagger-steps", type=int, default=None,
                        help="DAgger's training steps per iteration (default: --steps // (iterations + 1))")
    parser.add_argument("--horizon", type=int, default=None, help="data.horizon (action chunk) of every run")
    parser.add_argument("--expert", default="metaworld", choices=["metaworld", "lift_first"],
                        help="env.expert of the DAgger runs (the scripted policy that labels the learner's states)")
    parser.add_argument("--dagger-decay", type=float, default=DEFAULT_DECAY,
                        help="beta = decay ** k, the probability that the expert acts at iteration k (Ross et al.'s p)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (num_threads)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_policies_"))
    common = [f"data.horizon={args.horizon}"] if args.horizon is not None else []

    rows = []
    if "mixed" in args.parts:
        rows += mixed(root, args.seeds, [*steps_overrides(args.steps), *common], args.noise, args.epsilon)
    if "dagger" in args.parts:
        per_iteration = args.dagger_steps or args.steps // (args.dagger_iterations + 1)
        rows += dagger(root, args.seeds, common, args.dagger_task, args.steps, args.dagger_iterations,
                       args.dagger_episodes, per_iteration, args.threads,
                       "" if args.horizon is None else f"_h{args.horizon}", args.expert, args.dagger_decay)
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"| data | policy | expert-labelled states | success per seed ({seeds}) | mean success | "
             f"mean ep. length |", "|---|---|---|---|---|---|"]
    for data, policy, labels, runs in rows:
        success = [r["rollout/success_rate"] for r in runs]
        length = np.mean([r["rollout/episode_length"] for r in runs])
        lines.append(f"| {data} | {policy} | {labels} | {', '.join(f'{x:.0%}' for x in success)} | "
                     f"{np.mean(success):.0%} | {length:.1f} |")
    dagger_runs = [(seed, r) for _, policy, _, runs in rows if policy.startswith("DAgger")
                   for seed, r in zip(args.seeds, runs)]
    if dagger_runs:
        lines += ["", "DAgger's iterations (from each run's metrics.csv): the mixture's success and the fraction of "
                  "executed actions that were the expert's, per iteration:", ""]
        for seed, r in dagger_runs:
            m = r["metrics"]
            per_iteration = zip(m.get("dagger/beta", []), m.get("dagger/rollout_success", []),
                                m.get("dagger/expert_action_fraction", []))
            lines.append(f"- seed {seed}: " + ", ".join(
                f"beta {b:.3g}: success {s_:.0%}, expert {e:.0%}" for (_, b), (_, s_), (_, e) in per_iteration))
    table = "\n".join(lines)
    print(table)
    (root / "policies.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
