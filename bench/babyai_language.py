"""Language-conditioned policies on BabyAI with SPRINT relabeling, evaluated zero-shot.

    python bench/babyai_language.py [--root DIR] [--level GoToSeqS5R2] [--demos 1000] [--steps 5000] [--seeds 0 1 2]

One file of bot demonstrations of a level with composite missions ("go to the red ball, then go to a key",
"... and ...", "... after you ..."; 1 to 4 clauses), 64 px frames. Missions of more than 2 clauses are held
out of training (``data.max_sub_instructions=2``). Four setups, each trained with every seed:

1. BC transformer on the original missions only (``bc``);
2. BC transformer with relabeling (a) primitive + (b) aggregate (``bc_relabel``);
3. IQL on the original missions only (``iql_enc_all``);
4. IQL with (a) + (b) + (c) cross-trajectory chaining (``iql_relabel_chain_enc_all``);

both IQL setups with the encoder trained by all of IQL's losses (BabyAI's default). ``--setups iql_relabel_chain`` is 4.
with the encoder trained by the critic's loss only (IQL's default on the other envs), the first measurement's IQL row.

Each trained policy is evaluated by ``python -m toolkit.zero_shot`` (seen missions, unseen combinations of
seen clauses, chains longer than any in training; by number of clauses). Prints a table of mean success
(and per seed) with a last column pooling every unseen chain of 2+ clauses (SPRINT's claim), and writes it to
<root>/babyai_language.md (other --setups: babyai_language_<setups>.md).
A run whose zero-shot results are already under --root is not run again, so an interrupted bench
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drawer_open import ROOT, run  # noqa: E402

SETUPS = [  # (run name, label, overrides)
    ("bc", "BC, original missions", ["policy=bc_transformer"]),
    ("bc_relabel", "BC + relabel (a) primitive + (b) aggregate",
     ["policy=bc_transformer", "data.relabel=[primitive,aggregate]"]),
    ("iql_enc_all", "IQL, original missions, encoder trained by all losses", ["policy=iql", "policy.encoder_updated_by=all"]),
    ("iql_relabel_chain_enc_all", "IQL + relabel (a) + (b) + (c), encoder trained by all losses",
     ["policy=iql", "data.relabel=[primitive,aggregate,chain]", "policy.encoder_updated_by=all"]),
    # not run by default: IQL's routing elsewhere, whose image encoder and trunk learn from the critic's TD loss
    # only while the actor reads those features detached (the first measurement's IQL row)
    ("iql_relabel_chain", "IQL + relabel (a) + (b) + (c) chain, encoder trained by the critic's loss",
     ["policy=iql", "data.relabel=[primitive,aggregate,chain]", "policy.encoder_updated_by=critic"]),
]
DEFAULT_SETUPS = ["bc", "bc_relabel", "iql_enc_all", "iql_relabel_chain_enc_all"]


def common_overrides(level: str, demos: int, steps: int, symbolic: bool, threads: int) -> list[str]:
    """Every run's train.py overrides: the level, its demo count, missions of more than 2 clauses held out."""
    return ["env=babyai", f"env.level={level}", "env.image_size=64", "env.max_episode_steps=64",
            f"env.symbolic={str(symbolic).lower()}", f"num_threads={threads}", f"data.num_demos={demos}",
            "data.max_sub_instructions=2", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={max(1, steps // 3)}", "callbacks.rollout.video_episodes=0"]


def unseen_chain_success(rows: dict) -> float:
    """Success over every episode of an unseen chain, a mission of 2 or more clauses not seen in training (unseen
    combinations of 2 clauses and longer chains): the quantity SPRINT's claim is about."""
    unseen = [r for (category, clauses), r in rows.items() if category != "seen" and clauses >= 2]
    return sum(r["success_rate"] * r["episodes"] for r in unseen) / sum(r["episodes"] for r in unseen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--level", default="GoToSeqS5R2")
    parser.add_argument("--demos", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=20, help="zero-shot episodes per category and clause count")
    parser.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, choices=[key for key, _, _ in SETUPS])
    parser.add_argument("--pixels-only", action="store_true",
                        help="leave out the egocentric symbolic view (env.symbolic=false), as the first measurement did")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (num_threads)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_babyai_"))
    common = common_overrides(args.level, args.demos, args.steps, not args.pixels_only, args.threads)
    results: dict[str, list[dict]] = {}
    for key, label, overrides in [setup for setup in SETUPS if setup[0] in args.setups]:
        for seed in args.seeds:
            name = f"{key}_s{seed}"
            out = root / f"{name}_zero_shot.json"
            if out.exists():
                print(f"{name}: reusing {out}", flush=True)
            else:
                summary = run(name, root, [*common, *overrides, f"seed={seed}"])
                subprocess.run([sys.executable, "-m", "toolkit.zero_shot", summary["last_checkpoint"], "--episodes",
                                str(args.episodes), "--out", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            rows = {(r["category"], r["clauses"]): r for r in json.loads(out.read_text())}
            results.setdefault(label, []).append(rows)
            print(label, seed, {f"{c}/{n}": f"{r['success_rate']:.2f}" for (c, n), r in rows.items()}, flush=True)

    columns = sorted({key for runs in results.values() for rows in runs for key in rows},
                     key=lambda k: (["seen", "unseen combination", "longer chain"].index(k[0]), k[1]))
    header = ["policy"] + [f"{c}, {n} clause{'s' * (n > 1)}" for c, n in columns] + ["all unseen chains"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in results.items():
        cells = []
        for key in columns:
            per_seed = [rows[key]["success_rate"] for rows in runs if key in rows]
            cells.append(f"{np.mean(per_seed):.0%} ({', '.join(f'{x:.0%}' for x in per_seed)})" if per_seed else "-")
        pooled = [unseen_chain_success(rows) for rows in runs]
        cells.append(f"{np.mean(pooled):.0%} ({', '.join(f'{x:.0%}' for x in pooled)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))[0]  # every run draws the same missions (same training data)
    table = "\n".join(lines) + "\n\nepisodes per cell and seed: " + ", ".join(
        f"{c} {n}: {first[(c, n)]['episodes']}" for c, n in columns if (c, n) in first)
    print(table)
    name = "babyai_language" if args.setups == DEFAULT_SETUPS else "babyai_language_" + "_".join(args.setups)
    (root / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
