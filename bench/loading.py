"""Data loading speed and memory: inline HDF5 frames against MP4 sidecars, beside the raw decoder.

    python bench/loading.py [--root DIR] [--episodes 50] [--steps 100] [--batches 100]

Data: real Meta-World drawer-open frames (84 px, one camera), `--episodes` episodes of `--steps` frames,
collected once with `python -m toolkit.collect`, then converted to MP4 sidecars (h264 crf 18, keyframe
every 8 frames) with `python -m toolkit.convert`. Loading: our WindowDataset (2-frame observation window,
4-step action chunk), a shuffled DataLoader with batch 64 and 0, 1, 2 workers, batches read whole
(`BatchSampler`, `batch_size=None`), as EpisodeDataModule does. The raw decoder row
decodes every frame of the same MP4s in order with decord (the limit for MP4 loading). Memory: the
loading process's RSS (and its workers') sampled over a long run, and its open file count.

Beside ours, the loaders of LeRobot and robomimic run on the same episodes (bench/loading_others.py,
in `.venv-compare`, which `make compare-venv` builds; skipped with a message without it): LeRobot's
`LeRobotDataset` on the LeRobot v3 copy that our converter writes, robomimic's `SequenceDataset` on the
inline file. Prints the tables and writes them to <root>/loading.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def make_data(root: Path, episodes: int, steps: int) -> tuple[Path, Path]:
    from toolkit.convert import convert

    inline = root / "inline.hdf5"
    subprocess.run([sys.executable, "-m", "toolkit.collect", f"data.path={inline}", f"data.num_demos={episodes}",
                    "env.image_size=84", f"env.max_episode_steps={steps}", "env.terminate_on_success=false",
                    "collect.only_success=false", f"paths.root_dir={root}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    video = root / "mp4.hdf5"
    convert(inline, video, "hdf5", "hdf5", video={"crf": 18, "keyframe_interval": 8}, progress=False)
    return inline, video


def loader_rate(path: Path, workers: int, batches: int, backend: str = "decord", chunk: int = 0) -> dict[str, float]:
    import torch
    from torch.utils.data import BatchSampler, DataLoader

    from toolkit.datamodules.episode_file import episode_names, open_episode_file
    from toolkit.datamodules.windows import WindowDataset

    with open_episode_file(path) as f:
        names = episode_names(f)
    dataset = WindowDataset(path, names, ["rgb_corner4", "state"], history=2, horizon=4, video_backend=backend,
                            decoded_episodes=2 * chunk)
    if chunk:  # what the datamodule does for MP4 sidecars: windows drawn `chunk` episodes at a time
        sampler = ChunkEpochs(dataset.ep_of, chunk)
    else:  # uniform random windows, as a shuffled epoch draws them, for as many batches as asked
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                                 generator=torch.Generator().manual_seed(0))
    # as EpisodeDataModule loads: whole batches per dataset call
    loader = DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, 64, drop_last=True), num_workers=workers)
    it = iter(loader)
    for _ in range(5):  # warm-up: workers started, decoders opened
        next(it)
    pids = [os.getpid(), *[w.pid for w in getattr(it, "_workers", [])]]
    fds_before, rss = len(os.listdir("/proc/self/fd")), [rss_mb(pids)]
    start, n = time.perf_counter(), 0
    for i in range(batches):
        n += len(next(it)["action"])
        if i % 10 == 9:
            rss.append(rss_mb(pids))
    elapsed = time.perf_counter() - start
    result = {"windows_per_s": n / elapsed, "frames_per_s": 2 * n / elapsed, "rss_start_mb": rss[0],
              "rss_peak_mb": max(rss), "rss_end_mb": rss[-1], "fd_growth": len(os.listdir("/proc/self/fd")) - fds_before}
    del it, loader
    return result


class ChunkEpochs:
    """EpisodeChunkSampler epochs back to back (one DataLoader iterator for the whole measurement)."""

    def __init__(self, ep_of, chunk: int) -> None:
        from toolkit.datamodules.windows import EpisodeChunkSampler

        self.sampler = EpisodeChunkSampler(ep_of, chunk)

    def __iter__(self):
        while True:
            yield from self.sampler


def raw_decoder_fps(video_root: Path) -> float:
    import decord

    files = sorted(video_root.rglob("*.mp4"))
    start, frames = time.perf_counter(), 0
    for f in files:
        reader = decord.VideoReader(str(f), num_threads=1)
        frames += len(reader.get_batch(list(range(len(reader)))).asnumpy())
        del reader
    return frames / (time.perf_counter() - start)


def others(python: Path, inline: Path, root: Path, batches: int) -> list[dict]:
    """LeRobot's and robomimic's loaders on the same episodes, in the environment that has them."""
    from toolkit.convert import convert

    if not python.exists():
        print(f"{python} not found: LeRobot and robomimic are not measured (make compare-venv builds it)")
        return []
    lerobot = root / "lerobot"
    if not lerobot.exists():
        convert(inline, lerobot, "hdf5", "lerobot", progress=False)
    out = subprocess.run([str(python), str(ROOT / "bench" / "loading_others.py"), "--lerobot", str(lerobot),
                          "--robomimic", str(inline), "--batches", str(batches)],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--long", type=int, default=600, help="batches of the memory run (0 workers, MP4)")
    parser.add_argument("--others-python", type=Path, default=ROOT / ".venv-compare" / "bin" / "python",
                        help="python of the environment with lerobot and robomimic")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_loading_"))
    inline, video = make_data(root, args.episodes, args.steps)
    size = lambda p: p.stat().st_size / 2**20  # noqa: E731
    video_mb = size(video) + sum(size(f) for f in (root / "mp4_videos").rglob("*.mp4"))
    rows = []
    runs = [("inline HDF5", inline, "decord", 0), ("MP4, uniform windows (decord)", video, "decord", 0),
            ("MP4, 8-episode chunks (decord, the default)", video, "decord", 8),
            ("MP4, 8-episode chunks (PyAV)", video, "pyav", 8)]
    for label, path, backend, chunk in runs:
        for workers in (0, 1, 2):
            r = loader_rate(path, workers, args.batches, backend, chunk)
            rows.append((label, workers, r))
            print(label, workers, {k: round(v, 1) for k, v in r.items()}, flush=True)
    raw = raw_decoder_fps(root / "mp4_videos")
    long = loader_rate(video, 0, args.long, chunk=8)
    theirs = others(args.others_python, inline, root, args.batches)

    lines = [f"| data ({args.episodes} episodes x {args.steps} frames, 84 px, size on disk) | workers | windows/s | "
             "frames/s | vs raw decoder | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for label, workers, r in rows:
        lines.append(f"| {label}, {size(inline) if label.startswith('inline') else video_mb:.0f} MB | {workers} | {r['windows_per_s']:.0f} | {r['frames_per_s']:.0f} | "
                     f"{r['frames_per_s'] / raw:.0%} | {r['rss_peak_mb']:.0f} |")
    lines.append(f"| raw decord decode of the same MP4s, in order | - | - | {raw:.0f} | 100% | - |")
    table = "\n".join(lines)
    memory = (f"Long run, MP4 in 8-episode chunks, 0 workers, {args.long} batches: RSS {long['rss_start_mb']:.0f} MB after warm-up, "
              f"peak {long['rss_peak_mb']:.0f} MB, end {long['rss_end_mb']:.0f} MB; open files grew by "
              f"{long['fd_growth']}.")
    if theirs:
        ours = {("mp4", w): r for label, w, r in rows if label.startswith("MP4, 8-episode chunks (decord")}
        ours.update({("inline", w): r for label, w, r in rows if label.startswith("inline")})
        lines = ["", "| loader (same episodes) | workers | windows/s | peak RSS (MB) | ours, same data and workers | ours / theirs |",
                 "|---|---|---|---|---|---|"]
        for r in theirs:
            mine = ours[("mp4" if r["loader"].startswith("LeRobot") else "inline", r["workers"])]
            lines.append(f"| {r['loader']} | {r['workers']} | {r['windows_per_s']:.0f} | {r['rss_peak_mb']:.0f} | "
                         f"{mine['windows_per_s']:.0f} | {mine['windows_per_s'] / r['windows_per_s']:.1f}x |")
        table += "\n" + "\n".join(lines)
    print(table + "\n\n" + memory)
    (root / "loading.md").write_text(table + "\n\n" + memory + "\n")


if __name__ == "__main__":
    main()
