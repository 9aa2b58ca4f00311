"""Why a BabyAI imitation policy fails (issue 16): its episodes replayed beside the bot, the failures described.

The policy acts alone (its most likely action) on the validation rollouts' episodes (seeds 1,000,000..). At every
step the bot is asked what it would do from the state the policy reached (``expert_action``, replanned from the
executed action, as DAgger labels states), without acting. For each checkpoint it prints how often the policy's
action differs from the bot's, in successful and in failed episodes, and for each failed episode: its first
disagreement (step, the policy's action, the bot's), whether the target was in the 7x7 view then, the longest run
of steps in which the agent neither moved nor turned, and the actions it took most. ``--sample`` acts with
samples of the policy's categorical instead (seeded per episode): whether randomness alone gets it out of its loops.
``--teacher-forced`` lets the bot act instead and scores the policy on the bot's own episodes, step by step: its
cross-entropy on the bot's action and how often its most likely action is the bot's, by step of the episode, by
whether the target is in view, by how many objects the mission can mean and by the bot's action (where the
validation loss comes from); and how often the bot's action and the policy's most likely one start a shortest path
to facing a target, the whole grid known (a disagreement between two shortest paths is a tie, not an error); and
whether its moves off the target's shortest paths head for another object (the wrong object) more than chance.

    python bench/babyai_failures.py CKPT [CKPT ...] [--episodes 200] [--seed 1000000] [--sample | --teacher-forced]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigrid.core.actions import Actions  # noqa: E402
from minigrid.core.constants import DIR_TO_VEC  # noqa: E402

from toolkit.envs.babyai import BabyAIEnv  # noqa: E402
from toolkit.envs.vector import make_env  # noqa: E402
from toolkit.eval import load_for_eval  # noqa: E402

MOVES = (Actions.left, Actions.right, Actions.forward)


def mission_targets(env: BabyAIEnv) -> list:
    """The cells of the objects the mission can mean ("a red ball" may fit two): empty where the level's
    instruction names none."""
    desc = getattr(env._env.instrs, "desc", None)  # the level's instruction: the objects it names, where they are
    return [] if desc is None else [(int(x), int(y)) for x, y in desc.obj_poss]


def target_in_view(env: BabyAIEnv) -> bool:
    """Whether an object the mission names is in the agent's 7x7 egocentric view now."""
    return any(env._env.in_view(x, y) for x, y in mission_targets(env))


def other_objects(env: BabyAIEnv) -> list:
    """The cells of the objects (not walls or doors) the mission cannot mean."""
    grid, targets = env._env.grid, set(mission_targets(env))
    return [(x, y) for y in range(grid.height) for x in range(grid.width)
            if (o := grid.get(x, y)) is not None and o.type not in ("wall", "door") and (x, y) not in targets]


def shortest_path_actions(env: BabyAIEnv, cells: list | None = None) -> set[int] | None:
    """Which of left, right and forward start a shortest path to facing a mission target (or one of ``cells``), the
    whole grid known (objects block, as in minigrid): a step where the bot and the policy differ may still have them
    both on one. None where no target can be reached by turning and moving alone (the bot then moves an object)."""
    grid = env._env.grid
    targets = set(mission_targets(env) if cells is None else cells)

    def front(x: int, y: int, d: int) -> tuple:
        return x + int(DIR_TO_VEC[d][0]), y + int(DIR_TO_VEC[d][1])

    def successor(state: tuple, action: int) -> tuple | None:
        x, y, d = state
        if action != Actions.forward:
            return x, y, (d + (1 if action == Actions.right else -1)) % 4
        fx, fy = front(x, y, d)
        cell = grid.get(fx, fy)
        return (fx, fy, d) if cell is None or cell.can_overlap() else None

    def distance(start: tuple) -> float:
        frontier, seen = [start], {start}
        for depth in range(grid.width * grid.height * 4):
            if any(front(*state) in targets for state in frontier):
                return depth
            frontier = [n for st in frontier for a in MOVES if (n := successor(st, a)) is not None and n not in seen]
            seen.update(frontier)
            if not frontier:
                break
        return float("inf")

    (x, y), d = env._env.agent_pos, env._env.agent_dir
    after = {a: distance(n) if (n := successor((int(x), int(y), int(d)), a)) is not None else float("inf")
             for a in MOVES}
    best = min(after.values())
    return None if best == float("inf") else {int(a) for a, v in after.items() if v == best}


def pose(env: BabyAIEnv) -> tuple:
    """The agent's cell and direction."""
    return tuple(int(v) for v in env._env.agent_pos), int(env._env.agent_dir)


def policy_batch(env: BabyAIEnv, obs: dict) -> dict:
    """One env's observation as the batch of one that the policy reads, with its mission."""
    return {k: v[None] for k, v in obs.items()} | {"instruction": [env.instruction()]}


def action_logits(policy, obs: dict) -> torch.Tensor:
    """The BC transformer's action logits ``[num_actions]`` (its first step) for one observation, as ``act`` sees it:
    the observation joins the policy's history window."""
    hist, is_pad = policy.observe(obs)
    lang = policy._instruction_embedding(obs)
    with torch.no_grad():
        return policy.eval().acting_head(hist if lang is None else {**hist, "lang": lang}, is_pad)[0, 0]


def sampled_action(policy, obs: dict, generator: torch.Generator) -> int:
    """An action drawn from the BC transformer's categorical, not its most likely one."""
    return int(torch.multinomial(action_logits(policy, obs).softmax(-1), 1, generator=generator))


def teacher_forced(policy, env: BabyAIEnv, seed: int) -> list[dict]:
    """One episode in which the bot acts; per step the policy's cross-entropy on the bot's action (``ce``), whether
    its most likely action is the bot's (``agrees``), the step, whether the target is in view, how many objects the
    mission can mean (``targets``), the bot's action, the actions that start a shortest path (``shortest``) and
    whether the policy's most likely action is one of them (``policy_shortest``); where it is not, whether it starts a
    shortest path to another object (``off_toward_other``) and the chance level of that (``chance_toward_other``)."""
    obs, _ = env.reset(seed=seed)
    policy.reset()
    rows = []
    while True:
        expert = int(env.expert_action()[0])
        logp = action_logits(policy, policy_batch(env, obs)).log_softmax(-1)
        shortest, policy_action = shortest_path_actions(env), int(logp.argmax())
        # where the policy's move is off every shortest path to the target: whether it starts one to another object,
        # and the share of all such off-path moves that do (the chance level: a room holds up to 8 objects)
        off = None if shortest is None else [int(a) for a in MOVES if int(a) not in shortest]
        scored = bool(off) and policy_action in off  # only then is the chance level needed: 3 BFS per other object
        others = [shortest_path_actions(env, [cell]) or set() for cell in other_objects(env)] if scored else []
        toward = [a for a in off if any(a in actions for actions in others)] if scored else []
        rows.append({"ce": -float(logp[expert]), "agrees": policy_action == expert, "step": len(rows),
                     "in_view": target_in_view(env), "targets": len(mission_targets(env)), "bot": Actions(expert).name,
                     "shortest": shortest, "policy_shortest": shortest is not None and policy_action in shortest,
                     "off_toward_other": policy_action in toward if scored else None,
                     "chance_toward_other": len(toward) / len(off) if scored else None})
        obs, _, terminated, truncated, _ = env.step(np.array([expert]))
        if terminated or truncated:
            return rows


def describe_teacher_forced(checkpoint: str, episodes: int, seed: int) -> list[str]:
    """Where the policy's cross-entropy on the bot's episodes comes from, as a table."""
    policy, env_cfg = load_for_eval(checkpoint)
    env = make_env(env_cfg)
    rows = [row for k in range(episodes) for row in teacher_forced(policy, env, seed + k)]
    env.close()
    groups: dict[str, list[dict]] = {"all steps": rows}
    for row in rows:
        for name in (f"step {row['step']}" if row["step"] < 6 else "step 6+", f"target in view: {row['in_view']}",
                     f"objects the mission can mean: {min(row['targets'], 2)}{'+' * (row['targets'] >= 2)}",
                     f"bot: {row['bot']}"):
            groups.setdefault(name, []).append(row)
    lines = [f"### {checkpoint} (teacher-forced: the bot acts, {episodes} episodes)", "",
             "| steps | count | cross-entropy on the bot's action | most likely action = the bot's | "
             "on a shortest path: the bot's action / the most likely (steps with one) |",
             "|---|---|---|---|---|"]
    for name, members in sorted(groups.items(), key=lambda g: (g[0].split(":")[0] != "all steps", g[0])):
        ce, agrees = np.mean([r["ce"] for r in members]), np.mean([r["agrees"] for r in members])
        paths = [r for r in members if r["shortest"] is not None]
        on_path = "-" if not paths else (f"{np.mean([Actions[r['bot']] in r['shortest'] for r in paths]):.1%} / "
                                         f"{np.mean([r['policy_shortest'] for r in paths]):.1%} ({len(paths)})")
        lines.append(f"| {name} | {len(members)} | {ce:.3f} | {agrees:.1%} | {on_path} |")
    off = [r for r in rows if r["in_view"] and r["off_toward_other"] is not None]
    if off:
        lines += ["", f"With a target in view, the most likely action is off every shortest path to it at {len(off)} "
                  f"steps; at {np.mean([r['off_toward_other'] for r in off]):.1%} of them it starts a shortest path to "
                  f"another object (a move off the target's paths at random: "
                  f"{np.mean([r['chance_toward_other'] for r in off]):.1%})."]
    return lines + [""]


def replay(policy, env: BabyAIEnv, seed: int, sample: bool = False) -> dict:
    """One episode of ``policy`` in ``env`` with the bot's advice recorded beside each action."""
    obs, _ = env.reset(seed=seed)
    policy.reset()
    generator = torch.Generator().manual_seed(seed)
    rows, success = [], False
    while True:
        before = pose(env)
        expert = int(env.expert_action()[0])
        in_view = target_in_view(env)
        batch = policy_batch(env, obs)
        action = sampled_action(policy, batch, generator) if sample else int(policy.act(batch)[0, 0])
        obs, _, terminated, truncated, info = env.step(np.array([action]))
        rows.append((action, expert, in_view, pose(env) != before))
        success |= bool(info["success"])
        if terminated or truncated:
            return {"seed": seed, "success": success, "steps": rows}


def longest_still_run(steps: list[tuple]) -> int:
    best = run = 0
    for *_, moved in steps:
        run = 0 if moved else run + 1
        best = max(best, run)
    return best


def describe(checkpoint: str, episodes: int, seed: int, sample: bool = False) -> list[str]:
    policy, env_cfg = load_for_eval(checkpoint)
    env = make_env(env_cfg)
    results = [replay(policy, env, seed + k, sample) for k in range(episodes)]
    env.close()
    failed = [r for r in results if not r["success"]]

    def disagreement(rs: list[dict]) -> str:
        steps = [s for r in rs for s in r["steps"]]
        return f"{np.mean([a != e for a, e, *_ in steps]):.1%} of {len(steps)} steps" if steps else "-"

    lines = [f"### {checkpoint}" + (" (actions sampled)" if sample else ""), "",
             f"success {len(results) - len(failed)}/{len(results)}; actions that differ from the bot's: "
             f"{disagreement([r for r in results if r['success']])} in successful episodes, "
             f"{disagreement(failed)} in failed ones", ""]
    if failed:
        lines += ["| seed | steps | first disagreement: step, policy / bot | target in view then | longest still run | "
                  "actions taken |", "|---|---|---|---|---|---|"]
        for r in failed:
            steps = r["steps"]
            first = next((t for t, (a, e, *_) in enumerate(steps) if a != e), None)
            where = "none" if first is None else f"{first}, {Actions(steps[first][0]).name} / {Actions(steps[first][1]).name}"
            seen = "-" if first is None else ("yes" if steps[first][2] else "no")
            taken = ", ".join(f"{Actions(a).name} {n}" for a, n in Counter(a for a, *_ in steps).most_common(3))
            lines.append(f"| {r['seed']} | {len(steps)} | {where} | {seen} | {longest_still_run(steps)} | {taken} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1_000_000, help="the validation rollouts' first seed")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sample", action="store_true", help="act with samples of the policy's categorical")
    mode.add_argument("--teacher-forced", action="store_true", help="the bot acts; score the policy on its actions")
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        lines = (describe_teacher_forced(checkpoint, args.episodes, args.seed) if args.teacher_forced
                 else describe(checkpoint, args.episodes, args.seed, args.sample))
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
