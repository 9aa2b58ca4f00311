"""Evaluation speed of a BabyAI FiLM checkpoint (``state_encoder=babyai_film``): rollouts that keep each step's
view-model features against rollouts that re-encode the policy's whole window at every step.

Within ``run_rollouts`` the weights do not change, so the policy keeps each step's state-encoder features in its
history (``PolicyModule.fixed_weight_rollouts``): an env step encodes one state. Re-encoding the window costs up to
``data.history`` (64) encodings per step once an episode is that long, which a failed PutNextLocal episode (128 steps)
is for half its steps. Both rows run the same episodes (seeds 1,000,000+, the validation rollouts' seeds); the
table says whether their results are identical.

    python bench/babyai_rollout_speed.py CHECKPOINT [--episodes 20] [--envs 2] [--threads 2]

Prints a markdown table (env steps/s, wall time, success) and writes it to bench/results/babyai_rollout_speed.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--envs", type=int, default=2, help="callbacks.rollout.num_envs's default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "babyai_rollout_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from toolkit.envs.rollout import run_rollouts
    from toolkit.eval import load_for_eval, vector_envs

    policy, env_cfg = load_for_eval(args.checkpoint)
    seeds = list(range(1_000_000, 1_000_000 + args.episodes))
    results = {}
    with vector_envs(env_cfg, args.envs) as envs:
        # without fixed_weight_rollouts (an object with reset/act only), the policy encodes its whole window
        for name, rolling in (("cached step features", policy),
                              ("whole window re-encoded", SimpleNamespace(reset=policy.reset, act=policy.act))):
            start = time.perf_counter()
            res = run_rollouts(rolling, envs, args.episodes, seeds)
            results[name] = (res, time.perf_counter() - start)
    same = all(np.array_equal(results["cached step features"][0][k], results["whole window re-encoded"][0][k])
               for k in ("success", "length", "return"))
    level = env_cfg.get("level", "?")
    lines = [f"BabyAI {level}, `{args.checkpoint.name}` (history {policy.history}), {args.episodes} episodes on "
             f"{args.envs} envs, {args.threads} threads; episodes identical in both rows: {'yes' if same else 'NO'}.",
             "", "| rollouts | env steps | env steps/s | wall time (s) | success |", "|---|---|---|---|---|"]
    for name, (res, wall) in results.items():
        steps = int(res["length"].sum())
        lines.append(f"| {name} | {steps} | {steps / wall:.1f} | {wall:.1f} | {res['success'].mean():.1%} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
