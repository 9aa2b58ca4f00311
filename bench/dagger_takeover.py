"""Can the expert still succeed from where a learner has taken the episode? (issue 16, DAgger)

DAgger labels the states its learners visit with the expert's action. Those labels teach recovery only if the
expert recovers from those states. For each checkpoint, the policy acts alone for the first ``k`` steps of an
episode (its most likely action, as in evaluation), then the env's scripted expert acts until the episode ends;
printed: success per handover step ``k`` (``k`` = 0: the expert alone; ``k`` = the episode limit: the policy
alone), over the evaluation's unseen seeds (1,000,000..), how many of the policy's episodes had already
succeeded before the handover, and how many of the others the expert still brought to success.

    python bench/dagger_takeover.py CKPT [CKPT ...] [--episodes 20] [--handover 0 25 50 75 100 150]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.envs.vector import make_env  # noqa: E402
from toolkit.eval import load_for_eval  # noqa: E402


def takeover_episode(policy, env, seed: int, handover: int) -> tuple[bool, bool]:
    """One episode: ``policy`` for the first ``handover`` steps, the expert after. Returns (success, whether it
    had succeeded before the handover)."""
    obs, _ = env.reset(seed=seed)
    policy.reset()
    success = before = False
    for t in itertools.count():
        if t < handover:
            action = np.asarray(policy.act({k: v[None] for k, v in obs.items()}))[0]
        else:
            action = env.expert_action()
        obs, _, terminated, truncated, info = env.step(action)
        success |= bool(info["success"])
        before |= success and t < handover
        if terminated or truncated:
            return success, before


def table(checkpoint: str, episodes: int, handovers: list[int], seed: int) -> list[str]:
    policy, env_cfg = load_for_eval(checkpoint)
    env = make_env(env_cfg)
    lines = [f"### {checkpoint}", "", "| policy's steps before the expert takes over | success | "
             "already succeeded at the handover | the expert's success in the others |", "|---|---|---|---|"]
    for k in handovers:
        runs = [takeover_episode(policy, env, seed + e, k) for e in range(episodes)]
        rest = [s for s, b in runs if not b]
        recovered = f"{sum(rest)}/{len(rest)}" if rest and k < env_cfg.get("max_episode_steps", np.inf) else "-"
        lines.append(f"| {k} | {np.mean([s for s, _ in runs]):.0%} | {sum(b for _, b in runs)}/{episodes} | "
                     f"{recovered} |")
    env.close()
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--handover", type=int, nargs="+", default=[0, 25, 50, 75, 100, 150])
    parser.add_argument("--seed", type=int, default=1_000_000, help="the evaluation rollouts' first seed")
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        print("\n".join(table(checkpoint, args.episodes, args.handover, args.seed)), flush=True)


if __name__ == "__main__":
    main()
