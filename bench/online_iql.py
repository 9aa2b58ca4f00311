"""Online fine-tuning of an offline IQL checkpoint (issue 14): does the IQL paper's / SPRINT's online phase raise success?

On Meta-World drawer-open-v3 with the mixed-quality file of ``bench/policies.py`` (10 expert + 40 noisy-expert
episodes: action noise and epsilon-random actions, failures kept), for each seed:

1. offline: ``policy=iql data.path=<mixed file>``, ``--offline-steps`` updates; success = its final evaluation
   (the "before");
2. online: ``policy=iql_online init_from=<its last.ckpt> data.path=<mixed file>``, ``--online-steps`` more updates
   from a replay buffer that starts with the file's transitions and receives the policy's own (half of each
   minibatch from each, ``policy.offline_ratio=0.5``); success = its final evaluation (the "after").

Every evaluation uses the same 20 unseen positions (seeds 1,000,000+); training episodes start at seed 500,000.

    python bench/online_iql.py [--root DIR] [--seeds 0 1 2] [--offline-steps 1000] [--online-steps 2000]
        [--updates-per-cycle 8] [--episodes 20] [--evals 2] [--override k=v ... --tag _name]
        [--offline-override k=v ... --offline-tag _name]

Finished runs are reused (see bench/online_finetune.py). Prints a markdown table and writes it to
``bench/results/online_iql.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_finetune import ROOT, first, fmt, last, run, write_table  # noqa: E402
from policies import collect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/online_iql"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="drawer-open-v3")
    parser.add_argument("--offline-steps", type=int, default=1000)
    parser.add_argument("--online-steps", type=int, default=2000)
    parser.add_argument("--updates-per-cycle", type=int, default=8,
                        help="policy.updates_per_cycle: with 8 env steps x 4 envs per cycle, 8 gives 4 env steps per update")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evals", type=int, default=2, help="evaluations during the online run (the last at the end)")
    parser.add_argument("--override", nargs="*", default=[], help="extra train.py overrides of the online runs")
    parser.add_argument("--offline-override", nargs="*", default=[],
                        help="extra train.py overrides of the offline runs (their names then get --tag too)")
    parser.add_argument("--tag", default="", help="appended to the online runs' names (a variant's own runs)")
    parser.add_argument("--offline-tag", default=None,
                        help="appended to the offline runs' names (default: --tag if --offline-override is given): "
                             "online variants that share an offline variant name the same --offline-tag")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "online_iql.md")
    args = parser.parse_args()
    if not 1 <= args.evals <= args.online_steps:
        parser.error(f"--evals {args.evals}: needs 1 <= evals <= --online-steps ({args.online_steps})")
    args.root.mkdir(parents=True, exist_ok=True)

    data = args.root / "data" / f"{args.task}_mixed.hdf5"
    if not data.exists():  # the mixed-quality file of bench/policies.py
        collect(data, args.root, 10, f"env.task={args.task}")
        collect(data, args.root, 50, f"env.task={args.task}", f"collect.action_noise={args.noise}",
                f"collect.epsilon={args.epsilon}", "collect.only_success=false")
    common = [f"env.task={args.task}", f"data.path={data}", f"callbacks.rollout.num_episodes={args.episodes}"]
    rows = []
    for seed in args.seeds:
        offline_tag = args.offline_tag if args.offline_tag is not None else (args.tag if args.offline_override else "")
        offline = run(f"iql_offline_{args.task}_k{args.offline_steps}{offline_tag}_s{seed}", args.root,
                      [*common, "policy=iql", f"trainer.max_steps={args.offline_steps}",
                       f"trainer.val_check_interval={args.offline_steps}", f"seed={seed}", *args.offline_override],
                      args.threads)
        online = run(f"iql_online_{args.task}_k{args.offline_steps}_u{args.online_steps}{args.tag}_s{seed}", args.root,
                     [*common, "policy=iql_online", f"init_from={offline['last_checkpoint']}",
                      f"policy.updates_per_cycle={args.updates_per_cycle}", f"trainer.max_steps={args.online_steps}",
                      f"trainer.val_check_interval={max(1, args.online_steps // args.evals)}", f"seed={seed}", *args.override],
                     args.threads)
        rows.append((seed, offline, online))

    lines = [f"Meta-World {args.task}, mixed-quality file (10 expert + 40 noisy episodes); offline IQL "
             f"{args.offline_steps} updates, then online IQL {args.online_steps} updates "
             f"(policy.updates_per_cycle={args.updates_per_cycle}); success on {args.episodes} unseen positions; "
             f"one CPU thread per run.", "",
             "| seed | offline IQL (before) | online IQL (after) | change (points) | env steps online | "
             "eval success by update | train-episode success first -> last | wall time offline / online (s) |",
             "|---|---|---|---|---|---|---|---|"]
    changes = []
    for seed, offline, online in rows:
        before, after = offline["rollout/success_rate"], online["rollout/success_rate"]
        changes.append(100 * (after - before))
        evals = ", ".join(f"{step}: {v:.0%}" for step, v in online["metrics"].get("rollout/success_rate", []))
        lines.append(f"| {seed} | {before:.0%} | {after:.0%} | {changes[-1]:+.0f} | {int(online.get('env/steps', 0))} | "
                     f"{evals} | {fmt(first(online, 'env/success'), '.0%')} -> {fmt(last(online, 'env/success'), '.0%')} | "
                     f"{offline['process_wall_s']:.0f} / {online['process_wall_s']:.0f} |")
    if len(rows) > 1:
        mean = sum(changes) / len(changes)
        sd = math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1))
        lines += ["", f"Mean change over {len(rows)} seeds: {mean:+.1f} points (sd {sd:.1f})."]
    write_table(lines, args.out, args.root)


if __name__ == "__main__":
    main()
