"""Check a dataset and summarize it: every episode is read in full (MP4 frames decoded), and every
problem is listed at once instead of stopping at the first.

    python -m toolkit.validate data/drawer-open-v3_corner4_64px.hdf5
    python -m toolkit.validate /data/spoc --format spoc --option split=val
    python -m toolkit.validate /data/so100_pick --format lerobot [--video-backend pyav]

Videos are decoded by ``--video-backend`` (default ``auto``: a decoder chosen per file from its codec).

Exit status 0 when no problem was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError


def validate(reader: Any) -> tuple[dict[str, Any], list[str]]:
    """``(summary, problems)`` of every episode of a reader."""
    problems: list[str] = []
    names = reader.episode_names()
    steps, good, successes, instructions, sources = 0, 0, [], Counter(), Counter()
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    action_shape = None
    for name in names:
        try:
            episode = reader.read_episode(name)
        except ToolkitError as e:
            problems.append(str(e))
            continue
        good += 1
        steps += len(episode)
        for key, value in episode.obs.items():
            shape = (tuple(value.shape[1:]), str(value.dtype))
            if shapes.setdefault(key, shape) != shape:
                problems.append(f"episode {name}: obs/{key} is {shape[1]} {shape[0]}, other episodes "
                                f"{shapes[key][1]} {shapes[key][0]}")
        if action_shape is None:
            action_shape = tuple(episode.actions.shape[1:])
        elif tuple(episode.actions.shape[1:]) != action_shape:
            problems.append(f"episode {name}: actions {tuple(episode.actions.shape[1:])}, other episodes {action_shape}")
        if not np.isfinite(episode.actions).all():
            problems.append(f"episode {name}: actions hold NaN or inf")
        if "success" in episode.attrs:
            successes.append(bool(episode.attrs["success"]))
        if episode.attrs.get("instruction"):
            instructions[str(episode.attrs["instruction"])] += 1
        if episode.attrs.get("source"):
            sources[str(episode.attrs["source"])] += 1
    if not names:
        problems.append("no episodes")
    summary = {
        "episodes": f"{len(names)} ({good} readable)",
        "steps": steps,
        "mean episode length": f"{steps / good:.1f}" if good else "-",
        "cameras": ", ".join(k for k in shapes if k.startswith("rgb")) or "none",
        **{f"obs/{k}": f"{dtype} {list(shape)}" for k, (shape, dtype) in shapes.items()},
        "actions": str(list(action_shape)) if action_shape is not None else "-",
        "success rate": f"{np.mean(successes):.0%} of {len(successes)}" if successes else "not recorded",
        "instructions": (f"{len(instructions)} distinct, e.g. " + "; ".join(repr(i) for i, _ in instructions.most_common(3))
                         if instructions else "none"),
        "sources": ", ".join(f"{s} ({n})" for s, n in sources.most_common()) or "not recorded",
        "env_args": str(getattr(reader, "env_args", {})),
    }
    return summary, problems


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from toolkit.convert import (FORMATS, _log_to_stderr, _parse_options, add_video_backend, merge_video_backend,
                                 open_reader)
    from toolkit.errors import exit_on_user_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--format", default="hdf5", choices=list(FORMATS))
    parser.add_argument("--option", action="append", default=[], help="reader option key=value (repeatable)")
    add_video_backend(parser)
    args = parser.parse_args(argv)
    _log_to_stderr()
    console = Console()
    with exit_on_user_error():
        reader = open_reader(args.format, Path(args.path),
                             **merge_video_backend(_parse_options(args.option), args.video_backend))
        summary, problems = validate(reader)
    table = Table(title=f"{args.path} ({args.format})", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    if problems:
        console.print(f"[red]{len(problems)} problem(s):[/red]")
        for p in problems:
            print(f"  - {p}")  # not rich: paths must not be wrapped
        return 1
    console.print("[green]no problems found[/green]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
