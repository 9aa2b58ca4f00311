"""LeRobot's and robomimic's own data loaders on the episodes that bench/loading.py measures ours on.

Runs in the environment that has the real `lerobot` and `robomimic` packages (`make compare-venv` builds
`.venv-compare`; bench/loading.py calls this script with its python). Prints one JSON line per
measurement, as bench/loading.py's `loader_rate` reports ours:

    .venv-compare/bin/python bench/loading_others.py --lerobot DIR --robomimic FILE [--batches 100]

Same sampling as ours: a 2-frame observation window and a 4-step action chunk, batch 64, shuffled windows.
LeRobot: `LeRobotDataset(delta_timestamps=...)` on the LeRobot v3 dataset written by our converter from
the same episodes (MP4, decoded by torchcodec, its default). robomimic:
`SequenceDataset(frame_stack=2, seq_length=4)` on our inline HDF5 file (robomimic's layout), without a
cache and with its `low_dim` cache. Before measuring, the first window of each loader is checked against
the same window read with h5py, so the numbers are for loaders that return the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loading import rss_mb  # noqa: E402

CAMERA, HISTORY, HORIZON, BATCH = "rgb_corner4", 2, 4, 64


def measure(dataset, workers: int, batches: int) -> dict[str, float]:
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers)
    it = iter(loader)
    for _ in range(3):  # warm-up: workers started, files and decoders opened
        next(it)
    pids = [os.getpid(), *[w.pid for w in getattr(it, "_workers", [])]]
    rss = [rss_mb(pids)]
    start, n = time.perf_counter(), 0
    for i in range(batches):
        batch = next(it)
        n += len(batch["action"] if "action" in batch else batch["actions"])
        if i % 10 == 9:
            rss.append(rss_mb(pids))
    elapsed = time.perf_counter() - start
    del it, loader
    return {"windows_per_s": n / elapsed, "frames_per_s": HISTORY * n / elapsed, "rss_peak_mb": max(rss)}


def reference_window(hdf5: Path, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames [t-1, t] (clamped) and actions [t, t+4) (clamped) of demo_0, read with h5py."""
    with h5py.File(hdf5) as f:
        g = f["data/demo_0"]
        n = len(g["actions"])
        frames = g[f"obs/{CAMERA}"][np.clip(np.arange(t - HISTORY + 1, t + 1), 0, n - 1)]
        actions = g["actions"][np.clip(np.arange(t, t + HORIZON), 0, n - 1)]
    return frames, actions


def lerobot_dataset(root: Path, hdf5: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    info = json.loads((root / "meta/info.json").read_text())
    fps, key = info["fps"], f"observation.images.{CAMERA.removeprefix('rgb_')}"
    dataset = LeRobotDataset("local/bench", root=root, video_backend="torchcodec", delta_timestamps={
        key: [-k / fps for k in range(HISTORY - 1, -1, -1)], "action": [k / fps for k in range(HORIZON)]})
    sample = dataset[5]  # frame 5 of episode 0
    frames, actions = reference_window(hdf5, 5)
    got = (sample[key].numpy() * 255).round().transpose(0, 2, 3, 1)  # float [T, C, H, W] in [0, 1]
    error = float(np.abs(got - frames).mean())
    if not np.allclose(sample["action"].numpy(), actions, atol=1e-6) or error > 8:
        raise SystemExit(f"LeRobotDataset disagrees with the HDF5 file (mean frame error {error:.1f}/255)")
    return dataset, error


def robomimic_dataset(hdf5: Path, cache: str | None):
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    ObsUtils.initialize_obs_modality_mapping_from_dict({"rgb": [CAMERA], "low_dim": ["state"]})
    dataset = SequenceDataset(str(hdf5), obs_keys=(CAMERA, "state"), dataset_keys=("actions",),
                              frame_stack=HISTORY, seq_length=HORIZON, pad_frame_stack=True, pad_seq_length=True,
                              hdf5_cache_mode=cache, load_next_obs=False)
    sample = dataset[5]
    frames, actions = reference_window(hdf5, 5)
    # robomimic returns frame_stack - 1 + seq_length steps of everything, from t - (frame_stack - 1): the
    # window's frames come first, its action chunk starts at t.
    chunk = sample["actions"][HISTORY - 1: HISTORY - 1 + HORIZON]
    if not (np.array_equal(sample["obs"][CAMERA][:HISTORY], frames) and np.allclose(chunk, actions)):
        raise SystemExit("robomimic's SequenceDataset disagrees with the HDF5 file")
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lerobot", type=Path, required=True, help="LeRobot v3 dataset dir (the same episodes)")
    parser.add_argument("--robomimic", type=Path, required=True, help="our inline HDF5 file (robomimic layout)")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import lerobot
    import robomimic

    from lerobot.datasets.video_utils import _default_decoder_cache

    dataset, error = lerobot_dataset(args.lerobot, args.robomimic)
    for workers in args.workers:
        # A DataLoader worker forked with the parent's open decoders fails to decode ("Invalid data found
        # when processing input"), as ours would: start every measurement with LeRobot's cache empty.
        _default_decoder_cache.clear()
        r = measure(dataset, workers, args.batches)
        print(json.dumps({"loader": f"LeRobot {lerobot.__version__} LeRobotDataset, MP4 (torchcodec)", "workers": workers,
                          "frame_error": error, **r}), flush=True)
    del dataset
    for cache in (None, "low_dim"):
        dataset = robomimic_dataset(args.robomimic, cache)
        for workers in args.workers:
            r = measure(dataset, workers, args.batches)
            label = f"robomimic {robomimic.__version__} SequenceDataset, inline HDF5, cache {cache or 'none'}"
            print(json.dumps({"loader": label, "workers": workers, **r}), flush=True)
        del dataset


if __name__ == "__main__":
    main()
