"""Training speed of the BabyAI FiLM recipe (``experiment=babyai_film``), one label per window against whole-episode
windows scored at every step (``data.label_every_step=true``).

Each row is ``python train.py experiment=babyai_film env.level=<level>`` for ``--steps`` updates of batch 64, no
validation and no rollouts, timed by train.py (``train_samples_per_s``: windows per second of training, start-up
and data collection left out). Labels per window come from the data file's training episodes: 1 by default; with
``label_every_step`` an episode of L <= 64 steps is one window of L labels (longer ones: one window of 64 labels,
then one per later step).

    python bench/babyai_update_speed.py [--root DIR] [--level GoToLocal] [--steps 150] [--threads 2]

Prints a markdown table (updates/s, windows/s, labels/s) and writes it to bench/results/babyai_update_speed.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from babyai_imitation import num_demos_for  # noqa: E402
from online_finetune import ROOT, run, write_table  # noqa: E402

HISTORY = 64  # experiment=babyai_film's window


def labels_per_window(data_file: Path, num_demos: int, history: int = HISTORY) -> float:
    """Mean scored steps per window with ``label_every_step``, over the file's first ``num_demos`` episodes' training
    split (``split_masks``: episodes 1, 11, 21, ... validate): every step is scored once, so the training steps over
    the number of windows the datamodule's ``WindowDataset`` makes of them."""
    from toolkit.datamodules.episode_file import episode_names, split_masks
    from toolkit.datamodules.windows import WindowDataset

    with h5py.File(data_file, "r") as f:
        train = split_masks(episode_names(f)[:num_demos])["train"]
    windows = WindowDataset(data_file, train, ["state"], history, 1, label_every_step=True)
    return sum(windows.lengths) / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/babyai_update_speed"))
    parser.add_argument("--level", default="GoToLocal")
    parser.add_argument("--train-demos", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "babyai_update_speed.md")
    args = parser.parse_args()

    num_demos = num_demos_for(args.train_demos)
    lines = [f"BabyAI {args.level}, `experiment=babyai_film`, {args.train_demos} training demos, {args.steps} updates "
             f"of batch 64, {args.threads} threads, no validation or rollouts.", "",
             "| windows | updates/s | windows/s | labels per window | labels/s |", "|---|---|---|---|---|"]
    for every_step in (False, True):
        summary = run(f"speed_{args.level}_every{int(every_step)}_k{args.steps}", args.root,
                      ["experiment=babyai_film", f"env.level={args.level}", f"data.num_demos={num_demos}",
                       f"data.label_every_step={str(every_step).lower()}", f"trainer.max_steps={args.steps}",
                       f"trainer.val_check_interval={args.steps + 1}", "callbacks.rollout=null",
                       "callbacks.best_checkpoint=null"], args.threads)
        data_file = next(Path(args.root, "data").glob(f"babyai_{args.level}_*symbolic.hdf5"))
        per_window = labels_per_window(data_file, num_demos) if every_step else 1.0
        windows_per_s = summary["train_samples_per_s"]
        name = "whole episodes, every step scored (`data.label_every_step=true`)" if every_step else \
            "one per label, its last step scored (default)"
        lines.append(f"| {name} | {windows_per_s / 64:.2f} | {windows_per_s:.0f} | {per_window:.2f} | "
                     f"{windows_per_s * per_window:.0f} |")
    write_table(lines, args.out, args.root)


if __name__ == "__main__":
    main()
