"""Online fine-tuning of a few-demo BC policy with PPO (issue 14): does FLaRe's recipe raise success?

For each seed, on Meta-World (pick-place-v3 by default) or a BabyAI level (``--env babyai``, GoToLocal by default:
language-conditioned, BabyAI's bot as the expert), all evaluated at the same 20 unseen positions
(``callbacks.rollout.seed`` 1,000,000, ...; training episodes start at seed 500,000, demos at 0):

1. BC: the BC transformer on ``--demos`` expert demos, ``--bc-steps`` updates; success = its run's final
   ``rollout/success_rate`` (the "before" of every fine-tuning row of that seed);
2. ``policy=ppo_flare init_from=<BC last.ckpt> env.reward=sparse``: FLaRe's stabilizers (separate critic, no
   entropy bonus, a small lr (3e-6), frozen encoder);
3. ``policy=ppo env.reward=sparse`` from scratch (same IMPALA encoder config, random weights), same budget;
4. stabilizers off: ``policy=ppo_flare init_from=<BC ckpt> policy.lr=3e-5 policy.ent_coef=0.01
   policy.separate_critic=false policy.freeze_encoder=false`` (shared actor-critic, entropy bonus, 10x lr; the rest,
   e.g. the exploration noise, as ppo_flare).

The fine-tuning budget is ``--ppo-steps`` minibatch updates (``trainer.max_steps``); one update cycle is
``policy.n_steps`` x ``data.num_envs`` env steps followed by ``policy.n_epochs`` passes of minibatches of
``data.batch_size``, so env steps = ppo_steps / (n_epochs * n_steps * num_envs / batch_size) * n_steps * num_envs.

    python bench/online_finetune.py [--env metaworld|babyai] [--task T] [--root DIR] [--seeds 0 1 2] [--demos 35] [--bc-steps 1000]
        [--ppo-steps 480] [--episodes 20] [--rows bc flare scratch no_stabilizers] [--override k=v ...]
        [--ppo-override k=v ...]

Every run is a ``python train.py`` (one CPU thread each, ``num_threads``); a run whose ``summary.json``
exists is reused and one interrupted after a checkpoint continues from it (``train_command``), so the script can
be re-run after an interruption (a session's end, a kill) or with more rows/seeds. Prints a
markdown table (success before/after, env steps, wall time) and a diagnostics table read from each run's
metrics.csv (training-episode success, approx_kl, clipfrac, value loss, entropy), and writes both to
``bench/results/online_finetune.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from toolkit.plot import read_metrics  # noqa: E402

# the code a run used (other work may change it between runs): md5 of each file, stored in the run dir
CODE = ["toolkit/policies/ppo.py", "toolkit/datamodules/online.py", "toolkit/envs/stepper.py",
        "conf/policy/ppo.yaml", "conf/policy/ppo_flare.yaml", "conf/data/online.yaml"]


def code_fingerprint() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [f"HEAD {head.strip()}"]
    lines += [f"{hashlib.md5((ROOT / f).read_bytes()).hexdigest()[:10]} {f}" for f in CODE if (ROOT / f).exists()]
    return "\n".join(lines) + "\n"

ROWS = {
    "flare": ("PPO + FLaRe stabilizers, from BC", ["policy=ppo_flare"], True),
    "scratch": ("PPO from scratch (same encoder config)", ["policy=ppo"], False),
    # ppo_flare with its three stabilizers switched off (everything else, e.g. the exploration noise, as ppo_flare)
    "no_stabilizers": ("PPO from BC, stabilizers off (shared critic, ent 0.01, 10x lr, encoder trained)",
                       ["policy=ppo_flare", "policy.lr=3e-5", "policy.ent_coef=0.01",
                        "policy.separate_critic=false", "policy.freeze_encoder=false"], True),
}


# per env: the overrides that select it, the field naming its task, and what makes its reward the sparse success
# reward (BabyAI's own reward already is: 1 - 0.9 t / T on success, else 0)
ENVS = {
    "metaworld": ([], "env.task", "pick-place-v3", ["env.reward=sparse"]),
    "babyai": (["env=babyai"], "env.level", "GoToLocal", []),
}


def find_summary(root: Path, name: str) -> Path | None:
    found = sorted((root / "logs" / name / "runs").glob("*/summary.json"))
    return found[-1] if found else None


def train_command(name: str, root: Path, overrides: list[str], threads: int) -> tuple[list[str], bool]:
    """The ``python train.py`` command of run ``name``, and whether it continues an interrupted attempt: the
    newest run dir of ``name``, if it holds ``checkpoints/last.ckpt`` but no summary.json, is run again in that
    dir, where train.py continues its last.ckpt (as a requeued SLURM job does) and its CSV logs go on in the same
    place. Only the newest attempt is continued (an older one was given up)."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"task_name={name}", f"paths.root_dir={root}",
           f"num_threads={threads}", *overrides]
    attempts = sorted((root / "logs" / name / "runs").glob("*"))
    newest = attempts[-1] if attempts else None
    if newest and (newest / "checkpoints" / "last.ckpt").exists() and not (newest / "summary.json").exists():
        return [*cmd, f"hydra.run.dir={newest}"], True
    return cmd, False


def run(name: str, root: Path, overrides: list[str], threads: int) -> dict:
    """``python train.py`` as run ``name`` (reused if its summary.json exists, continued from its last.ckpt if an
    earlier attempt was interrupted); the summary plus the process's wall time (``process_wall_s``, stored next to
    the summary so a reused run reports it too; NaN for a continued run, whose earlier attempts were not timed)."""
    done = find_summary(root, name)
    if done is None:
        cmd, resumed = train_command(name, root, overrides, threads)
        print("$", " ".join(cmd), flush=True)
        log = root / "stdout" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        code = code_fingerprint()
        start = time.perf_counter()
        with open(log, "a" if resumed else "w") as out:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=out, stderr=subprocess.STDOUT)
        elapsed = time.perf_counter() - start
        done = find_summary(root, name)
        if done is None:
            raise RuntimeError(f"{name}: train.py finished without a summary.json (see {log})")
        (done.parent / "process_wall_s.txt").write_text(f"{math.nan if resumed else elapsed:.1f}\n")
        (done.parent / "code.txt").write_text(code)
    else:
        print(f"reusing {done}", flush=True)
    summary = json.loads(done.read_text())
    wall = done.parent / "process_wall_s.txt"
    summary["process_wall_s"] = float(wall.read_text()) if wall.exists() else summary.get("wall_time_s", math.nan)
    summary["metrics"] = read_metrics(done.parent)  # toolkit.plot's: every metric as sorted (step, value) pairs
    return summary


def last(s: dict, key: str, n: int = 1) -> float:
    """Mean of the last ``n`` logged values of ``key`` (NaN if never logged)."""
    values = [v for _, v in s["metrics"].get(key, [])][-n:]
    return sum(values) / len(values) if values else math.nan


def first(s: dict, key: str, n: int = 1) -> float:
    values = [v for _, v in s["metrics"].get(key, [])][:n]
    return sum(values) / len(values) if values else math.nan


def fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/online_finetune"), help="data + logs dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--env", choices=list(ENVS), default="metaworld")
    parser.add_argument("--task", default=None, help="Meta-World task or BabyAI level (default: pick-place-v3 / GoToLocal)")
    parser.add_argument("--demos", type=int, default=35)
    parser.add_argument("--bc-steps", type=int, default=1000)
    parser.add_argument("--ppo-steps", type=int, default=480, help="minibatch updates (trainer.max_steps)")
    parser.add_argument("--episodes", type=int, default=20, help="unseen positions per evaluation")
    parser.add_argument("--evals", type=int, default=1, help="evaluations during fine-tuning (the last at the end)")
    parser.add_argument("--rows", nargs="+", default=["bc", *ROWS], choices=["bc", *ROWS])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (num_threads)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra train.py overrides of every run, BC and PPO (e.g. data.obs_keys=[state])")
    parser.add_argument("--ppo-override", nargs="*", default=[], help="extra train.py overrides of every PPO run")
    parser.add_argument("--flare-lr", type=float, default=None,
                        help="ppo_flare's policy.lr (default: the preset's 3e-6); the stabilizers-off row gets 10x it")
    parser.add_argument("--sample-eval", action="store_true",
                        help="evaluate the PPO runs' sampled policy (policy.deterministic_eval=false), before and after")
    parser.add_argument("--tag", default="", help="appended to the PPO run names (a tuned variant's own runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "online_finetune.md")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)

    select, task_field, default_task, sparse = ENVS[args.env]
    args.task = args.task or default_task
    env = [*select, f"{task_field}={args.task}", f"callbacks.rollout.num_episodes={args.episodes}", *args.override]
    results: list[tuple[int, str, str, dict | None, dict]] = []  # seed, row key, label, BC summary, run summary
    for seed in args.seeds:
        bc, ckpt = None, None
        if "bc" in args.rows or any(ROWS[r][2] for r in args.rows if r != "bc"):  # --rows scratch needs no BC run
            bc_name = f"bc_{args.task}_d{args.demos}_k{args.bc_steps}_s{seed}"
            bc = run(bc_name, args.root, [*env, f"data.num_demos={args.demos}", f"trainer.max_steps={args.bc_steps}",
                                          f"trainer.val_check_interval={args.bc_steps}", f"seed={seed}"], args.threads)
            ckpt = bc["last_checkpoint"]
        if "bc" in args.rows:
            results.append((seed, "bc", f"BC, {args.demos} demos, {args.bc_steps} steps", None, bc))
        # --sample-eval: evaluate the policy as it acts in training (sampled), before the first update and after
        sampled = ["policy.deterministic_eval=false", "callbacks.rollout.at_start=true"] if args.sample_eval else []
        every = max(1, args.ppo_steps // max(1, args.evals))
        for key in [r for r in args.rows if r != "bc"]:
            label, overrides, from_bc = ROWS[key]
            if args.flare_lr is not None and key != "scratch":  # ppo_flare's lr, and 10x it with the stabilizers off
                overrides = [*overrides, f"policy.lr={args.flare_lr * (10 if key == 'no_stabilizers' else 1):g}"]
            # a run from BC names the BC run it starts from: a reused run must have started from this one
            start = f"_k{args.bc_steps}" if from_bc else ""
            name = f"{key}_{args.task}_d{args.demos}{start}_u{args.ppo_steps}{args.tag}_s{seed}"
            s = run(name, args.root, [*env, *overrides, *sparse, *([f"init_from={ckpt}"] if from_bc else []),
                                      f"trainer.max_steps={args.ppo_steps}", f"trainer.val_check_interval={every}",
                                      f"seed={seed}", *sampled, *args.ppo_override], args.threads)
            results.append((seed, key, label, bc if from_bc else None, s))

    lines = [f"Task {args.task}; BC on {args.demos} expert demos ({args.bc_steps} steps); fine-tuning budget "
             f"{args.ppo_steps} PPO minibatch updates; success on {args.episodes} unseen positions; one CPU "
             f"thread per run on a shared 2-core machine.", "",
             "| seed | run | success before | success after | change (points) | env steps | updates | "
             "wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for seed, key, label, bc, s in results:
        after = s["rollout/success_rate"]
        before = before_of(s, bc, key)
        change = fmt(100 * (after - before), "+.0f") if before is not None and key != "bc" else ""
        lines.append(f"| {seed} | {label} | {fmt(before, '.0%') if before is not None and key != 'bc' else ''} | "
                     f"{after:.0%} | {change} | {int(s.get('env/steps', 0)) if key != 'bc' else ''} | "
                     f"{s.get('global_step')} | {s['process_wall_s']:.0f} |")
    means = {}
    for seed, key, label, bc, s in results:
        if key != "bc" and bc is not None:
            means.setdefault(label, []).append(100 * (s["rollout/success_rate"] - before_of(s, bc, key)))
    if len(args.seeds) > 1:
        lines += ["", "| run | mean change (points) over seeds |", "|---|---|"]
        lines += [f"| {label} | {sum(v) / len(v):+.1f} ({len(v)} seeds) |" for label, v in means.items()]

    lines += ["", "Diagnostics (from each run's metrics.csv; `first`/`last` = the first/last logged values; "
              "training episodes are stochastic, the evaluation uses the Gaussian's mean or the most likely discrete action "
              "unless --sample-eval):", "",
              "| seed | run | eval success by update | train-episode success first -> last | eval episode length | approx_kl (last 5) | "
              "clipfrac (last 5) | value loss first -> last | entropy first -> last |",
              "|---|---|---|---|---|---|---|---|---|"]
    for seed, key, label, bc, s in results:
        if key == "bc":
            continue
        evals = ", ".join(f"{step}: {v:.0%}" for step, v in s["metrics"].get("rollout/success_rate", []))
        lines.append(
            f"| {seed} | {key} | {evals} | {fmt(first(s, 'env/success'), '.0%')} -> {fmt(last(s, 'env/success'), '.0%')} | "
            f"{fmt(s.get('rollout/episode_length', math.nan), '.0f')} | {fmt(last(s, 'train/approx_kl', 5), '.4f')} | "
            f"{fmt(last(s, 'train/clipfrac', 5), '.3f')} | {fmt(first(s, 'train/value_loss'), '.3g')} -> "
            f"{fmt(last(s, 'train/value_loss', 5), '.3g')} | {fmt(first(s, 'train/entropy'), '.2f')} -> "
            f"{fmt(last(s, 'train/entropy', 5), '.2f')} |")
    lines += ["", "Code each run used (md5 of toolkit/policies/ppo.py, from its run dir's code.txt):", ""]
    for seed, key, label, bc, s in results:
        code = Path(s["output_dir"]) / "code.txt"
        ppo = [l.split()[0] for l in code.read_text().splitlines() if l.endswith("ppo.py")] if code.exists() else []
        lines.append(f"- `{Path(s['output_dir']).parent.parent.name}`: {ppo[0] if ppo else 'not recorded'}")
    write_table(lines, args.out, args.root)


def before_of(s: dict, bc: dict | None, key: str) -> float | None:
    """Success before fine-tuning: the run's own evaluation before its first update when it made one
    (``--sample-eval``), else its BC checkpoint's final evaluation (the same policy and seeds), 0 from scratch."""
    if "rollout_at_start/success_rate" in s:
        return s["rollout_at_start/success_rate"]
    return bc["rollout/success_rate"] if bc is not None else (0.0 if key == "scratch" else None)


def write_table(lines: list[str], out: Path, root: Path) -> None:
    """Print the markdown lines and write them to ``out``."""
    table = "\n".join(lines)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwritten to {out}; runs under {root}/logs")


if __name__ == "__main__":
    main()
