"""Where IQL and DAgger should beat BC, over several training seeds (20 unseen positions per run):

1. mixed-quality data (drawer-open): 10 expert + 40 noisy-expert episodes (action noise, epsilon-random
   actions) in one file; the BC transformer and IQL are trained on it;
2. equal budget of expert labels (a task where BC with few demos fails often, pick-place by default):
   DAgger starts from 3 demos and adds 4 iterations x 4 expert-labelled episodes; BC then gets as many
   expert demonstrations as it takes to reach at least the same number of expert-labelled states.

    python bench/policies.py [--root DIR] [--steps 1000] [--seeds 0 1 2] [--parts mixed dagger]

Each run is a `python train.py` (see drawer_open.py). Prints a table and writes it to <root>/policies.md.
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


def dagger(root: Path, seeds: list[int], common: list[str], task: str, steps: int) -> list[tuple]:
    env = [f"env.task={task}"]
    expert = root / "data" / f"{task}_expert.hdf5"
    collect(expert, root, 100, *env)
    lengths = np.cumsum(episode_lengths(expert))
    dagger_runs, bc_runs, budgets = [], [], []
    for s in seeds:
        path = root / "data" / f"{task}_dagger_s{s}.hdf5"
        dagger_runs.append(run(f"dagger_{task}_s{s}", root, [
            "policy=dagger", f"data.path={path}", "data.num_demos=3", f"seed={s}", *env, *common,
            "callbacks.dagger.iterations=4", "callbacks.dagger.episodes_per_iteration=4",
            f"callbacks.dagger.steps_per_iteration={steps // 5}"]))
        labels = sum(episode_lengths(path))
        n = int(np.searchsorted(lengths, labels)) + 1  # demos whose steps first reach the DAgger file's labels
        budgets.append((labels, n, int(lengths[n - 1])))
        bc_runs.append(run(f"bc_{task}_s{s}", root, [f"data.path={expert}", f"data.num_demos={n}", f"seed={s}",
                                                      *env, *common]))
    d = ", ".join(f"{labels}" for labels, _, _ in budgets)
    b = ", ".join(f"{n} demos = {steps_}" for _, n, steps_ in budgets)
    return [(f"equal expert labels ({task})", "DAgger: 3 demos + 4 x 4 labelled episodes", d, dagger_runs),
            (f"equal expert labels ({task})", "BC transformer on expert demos", b, bc_runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["mixed", "dagger"], choices=["mixed", "dagger"])
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--dagger-task", default="pick-place-v3")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_policies_"))
    common = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]

    rows = []
    if "mixed" in args.parts:
        rows += mixed(root, args.seeds, common, args.noise, args.epsilon)
    if "dagger" in args.parts:
        rows += dagger(root, args.seeds, common, args.dagger_task, args.steps)
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"| data | policy | expert-labelled states | success per seed ({seeds}) | mean success | "
             f"mean ep. length |", "|---|---|---|---|---|---|"]
    for data, policy, labels, runs in rows:
        success = [r["rollout/success_rate"] for r in runs]
        length = np.mean([r["rollout/episode_length"] for r in runs])
        lines.append(f"| {data} | {policy} | {labels} | {', '.join(f'{x:.0%}' for x in success)} | "
                     f"{np.mean(success):.0%} | {length:.1f} |")
    table = "\n".join(lines)
    print(table)
    (root / "policies.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
