"""Where IQL and DAgger should beat BC, measured on drawer-open (20 unseen positions each):

1. mixed-quality data: 10 expert + 40 noisy-expert episodes (action noise, epsilon-random actions),
   BC transformer vs IQL trained on the same file;
2. few demonstrations: BC on 5 expert demos vs DAgger starting from the same 5 demos.

    python bench/policies.py [--root DIR] [--steps 1000]

Prints a table and writes it to <root>/policies.md. Each run is a `python train.py` (see drawer_open.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drawer_open import ROOT, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=0.3)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_policies_"))
    import subprocess

    mixed = root / "data" / "drawer_mixed.hdf5"
    for n, extra in [(10, []), (50, [f"collect.action_noise={args.noise}", f"collect.epsilon={args.epsilon}",
                                     "collect.only_success=false"])]:
        subprocess.run([sys.executable, "-m", "toolkit.collect", f"data.path={mixed}", f"data.num_demos={n}",
                        f"paths.root_dir={root}", *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    common = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    runs = [
        ("mixed: 10 expert + 40 noisy", "BC transformer", run("bc_mixed", root, [f"data.path={mixed}", *common])),
        ("mixed: 10 expert + 40 noisy", "IQL", run("iql_mixed", root, [f"data.path={mixed}", "policy=iql", *common])),
        ("5 expert demos", "BC transformer", run("bc_5demos", root, ["data.num_demos=5", *common])),
        ("5 expert demos", "DAgger (+4 x 10 labelled episodes)",
         run("dagger_5demos", root, ["policy=dagger", f"callbacks.dagger.steps_per_iteration={args.steps // 5}", *common])),
    ]
    lines = ["| data | policy | success (20 unseen) | mean ep. length | wall time (s) |", "|---|---|---|---|---|"]
    for data, policy, s in runs:
        lines.append(f"| {data} | {policy} | {s['rollout/success_rate']:.0%} | {s['rollout/episode_length']:.1f} | "
                     f"{s['process_wall_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (root / "policies.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
