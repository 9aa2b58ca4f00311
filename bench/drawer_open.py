"""The default job, measured: `python train.py` from an empty data dir (collection included), and the
same policy trained and evaluated with every image blanked, which shows whether it uses vision.

    python bench/drawer_open.py [--root DIR] [extra train.py overrides...]

Prints a table (success rate on 20 unseen drawer positions, episode length, wall time, speeds, peak
memory) and writes it to <root>/drawer_open.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, root: Path, overrides: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train.py"), f"task_name={name}", f"paths.root_dir={root}", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    summary = json.loads(sorted((root / "logs" / name / "runs").glob("*/summary.json"))[-1].read_text())
    summary["process_wall_s"] = elapsed
    # ru_maxrss of children: the largest process's peak (KiB on Linux); 0 if not above an earlier run
    summary["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="data + logs dir (default: a fresh temp dir)")
    args, overrides = parser.parse_known_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_drawer_open_"))
    rows = [("pixels + state", run("bench_vision", root, overrides)),
            ("blank images + state", run("bench_blind", root, ["policy.blank_images=true", *overrides]))]

    header = ["policy input", "success (20 unseen)", "mean ep. length", "wall time (s)", "collect (s)",
              "train samples/s", "rollout env steps/s", "peak RSS (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, s in rows:
        lines.append("| " + " | ".join([
            label, f"{s['rollout/success_rate']:.0%}", f"{s['rollout/episode_length']:.1f}",
            f"{s['process_wall_s']:.0f}", f"{s['collect_time_s']:.0f}", f"{s['train_samples_per_s']:.0f}",
            f"{s['rollout/env_steps_per_s']:.0f}", f"{s['peak_rss_mb']:.0f}"]) + " |")
    table = "\n".join(lines)
    print(table)
    (root / "drawer_open.md").write_text(table + "\n")
    print(f"\nruns, videos and checkpoints under {root}/logs")


if __name__ == "__main__":
    main()
