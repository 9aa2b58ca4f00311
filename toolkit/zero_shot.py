"""Zero-shot evaluation of a language-conditioned policy on instruction compositions it did not train on.

    python -m toolkit.zero_shot CHECKPOINT [--episodes 20] [--seed 3000000] [--max-draws 5000] [--out FILE]
        [--trust-pickled-code]

The checkpoint records what training saw (missions, clauses, the longest mission in clauses; see
``EpisodeDataModule.instruction_summary``). Missions are drawn from the checkpoint's env by resetting it
with seeds from ``--seed`` on (disjoint from collection and rollout seeds) and sorted into:

- ``seen``: a mission of the training episodes;
- ``unseen combination``: a new mission made only of clauses seen in training, no longer than the longest
  training mission;
- ``longer chain``: a mission of more clauses than any in training, each clause seen in training;
missions with a clause never seen in training are skipped. Up to ``--episodes`` seeds are kept per
category and number of clauses, then the policy is rolled out on them. Prints a table of success rates by
category and number of clauses and writes it as JSON (``--out``, default next to the checkpoint).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from toolkit.errors import ToolkitError

CATEGORIES = ("seen", "unseen combination", "longer chain")


def categorize(mission: str, clauses: list[str], trained: dict) -> str | None:
    """The zero-shot category of a mission given what training saw (``trained``: missions, clauses,
    max_clauses); None when a clause is new."""
    if mission in set(trained["missions"]):
        return "seen"
    if not set(clauses) <= set(trained["clauses"]):
        return None
    return "longer chain" if len(clauses) > trained["max_clauses"] else "unseen combination"


def draw_missions(env, trained: dict, per_group: int, seed: int, max_draws: int) -> dict[tuple[str, int], list[int]]:
    """Seeds grouped by (category, number of clauses), up to ``per_group`` each."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for s in range(seed, seed + max_draws):
        env.reset(seed=s)
        clauses = env.sub_instructions()
        category = categorize(env.instruction(), clauses, trained)
        if category is not None and len(groups[(category, len(clauses))]) < per_group:
            groups[(category, len(clauses))].append(s)
    return dict(groups)


def evaluate(checkpoint: str | Path, episodes: int = 20, seed: int = 3_000_000, max_draws: int = 5000,
             num_envs: int = 2, trust_pickled_code: bool = False) -> list[dict]:
    """Success rate per (category, number of clauses): rows ``{category, clauses, episodes, success_rate}``.
    ``trust_pickled_code``: see load_policy (also lifts the check of the env class the checkpoint names)."""
    from toolkit.envs.rollout import run_rollouts
    from toolkit.envs.vector import make_env
    from toolkit.eval import load_for_eval, vector_envs

    policy, env_cfg = load_for_eval(checkpoint, trust_pickled_code=trust_pickled_code)  # shared with toolkit.eval
    trained = policy.trained_instructions
    if not policy.language_conditioned or not trained:
        raise ToolkitError(f"{checkpoint}: not a language-conditioned policy trained on episodes with instructions")
    probe = make_env(env_cfg)
    try:
        probe.reset(seed=seed)
        if probe.sub_instructions() is None:
            raise ToolkitError(f"env {env_cfg['_target_']} has no sub-instructions: zero-shot evaluation needs them")
        groups = draw_missions(probe, trained, episodes, seed, max_draws)
    finally:
        probe.close()
    rows = []
    with vector_envs(env_cfg, num_envs) as envs:
        for category in CATEGORIES:
            for (cat, n), seeds in sorted(groups.items()):
                if cat != category:
                    continue
                res = run_rollouts(policy, envs, len(seeds), seeds)
                rows.append({"category": category, "clauses": n, "episodes": len(seeds),
                             "success_rate": float(res["success"].mean())})
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zero-shot success")
    for column in ("instructions", "clauses", "episodes", "success rate"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["category"], str(r["clauses"]), str(r["episodes"]), f"{r['success_rate']:.0%}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    from toolkit.errors import exit_on_user_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per category and number of clauses")
    parser.add_argument("--seed", type=int, default=3_000_000, help="first seed of the missions drawn")
    parser.add_argument("--max-draws", type=int, default=5000)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trust-pickled-code", action="store_true",
                        help="load a checkpoint that pickles code (or names classes outside the toolkit): runs it")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if not Path(args.checkpoint).is_file():
            raise ToolkitError(f"{args.checkpoint}: no such checkpoint")
        rows = evaluate(args.checkpoint, args.episodes, args.seed, args.max_draws, args.num_envs,
                        args.trust_pickled_code)
    print_table(rows)
    out = args.out or Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "_zero_shot.json")
    out.write_text(json.dumps(rows, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
