"""Episode files: robomimic-compatible HDF5.

    data/                       attrs: total (steps), env_args (JSON)
    data/demo_<i>/              attrs: num_samples, success, seed, source, [instruction]
        obs/<key>               [L, ...]   rgb_<camera> uint8 [L, H, W, 3] (chunk = one frame), state float32;
                                an MP4-stored camera keeps an empty placeholder of that shape with the
                                attribute video_path (toolkit.datamodules.video)
        actions                 [L, A] float32
        rewards                 [L] float32
        dones                   [L] uint8 (1 on the last step)
    mask/train, mask/valid      episode names (bytes), split by episode

Robomimic files read as they are; ours open in robomimic. Appends are atomic per episode: the file is
open only while one finished episode is written, with Ctrl-C/SIGTERM held back until it is closed.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from gdict import GDict
from toolkit.errors import ToolkitError

STEP_KEYS = ("actions", "rewards", "dones")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the file is being written, so an interrupt lands between episodes."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def open_episode_file(path: str | Path, mode: str = "r") -> h5py.File:
    """Open an episode file with an error that names the file and what to do."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise ToolkitError(f"dataset file {path} does not exist: collect it with `python -m toolkit.collect` "
                           f"or set data.path to an existing file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise ToolkitError(f"dataset file {path} is not a readable HDF5 file ({e}). "
                           f"Delete or move it and collect again.") from None


def episode_names(f: h5py.File) -> list[str]:
    """Episode group names under data/, in collection order (demo_2 before demo_10)."""
    if "data" not in f:
        raise ToolkitError(f"dataset file {f.filename} has no 'data' group: not an episode file")
    return sorted(f["data"].keys(), key=lambda n: (len(n), n))


def episode_length(f: h5py.File, name: str) -> int:
    """Checked length of one episode: every per-step array must have num_samples rows."""
    g = f["data"][name]
    lengths = {k: g[k].shape[0] for k in STEP_KEYS if k in g}
    if "obs" not in g or "actions" not in g:
        raise ToolkitError(f"{f.filename}: episode {name} has no 'obs' group or 'actions' dataset")
    lengths.update({f"obs/{k}": ds.shape[0] for k, ds in g["obs"].items()})
    n = int(g.attrs.get("num_samples", lengths["actions"]))
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ToolkitError(f"{f.filename}: episode {name} has mismatched lengths (num_samples={n}): "
                           + ", ".join(f"{k}={v}" for k, v in bad.items())
                           + ". Re-collect this episode or delete it from the file.")
    return n


def split_masks(names: list[str], valid_every: int = 10) -> dict[str, list[str]]:
    """Episodes 1, 1 + k, 1 + 2k, ... (k = ``valid_every``) go to validation: the split is stable as
    the file grows, and any file of two or more episodes has one to validate on."""
    valid = [n for i, n in enumerate(names) if valid_every and i % valid_every == 1]
    return {"train": [n for n in names if n not in valid], "valid": valid}


def read_split(f: h5py.File, split: str) -> list[str]:
    """Episode names of mask/<split>; all episodes if the file has no masks."""
    if "mask" in f and split in f["mask"]:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][split][()]]
    return episode_names(f) if split == "train" else []


class EpisodeWriter:
    """Appends finished episodes to an episode file, one atomic write each.

    ``video`` (``{"crf", "keyframe_interval", "lossless", "fps"}``, any subset) stores every ``rgb_*``
    camera as an MP4 sidecar in ``<file stem>_videos/<episode>/<camera>.mp4`` instead of inline frames.
    The choice is recorded in the file: later appends (more collection, DAgger) follow the file's.
    """

    def __init__(self, path: str | Path, env_args: dict[str, Any], valid_every: int = 10,
                 video: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.valid_every = valid_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _signals_deferred(), open_episode_file(self.path, "a") as f:
            data = f.require_group("data")
            if "env_args" not in data.attrs:
                data.attrs["env_args"] = json.dumps(env_args)
                data.attrs["total"] = 0
                data.attrs["video"] = json.dumps(dict(video) if video else None)
            elif json.loads(data.attrs["env_args"]) != env_args:
                raise ToolkitError(f"{self.path} holds episodes of another environment "
                                   f"({data.attrs['env_args']}); use another data.path")
            self.video = json.loads(data.attrs.get("video", "null"))
            self.num_episodes = len(episode_names(f))

    def append(self, episode: GDict, attrs: dict[str, Any]) -> str:
        """Write one episode (``obs/*``, ``actions``, ``rewards``, ``dones``) and update totals and masks."""
        n = len(episode)
        name = f"demo_{self.num_episodes}"
        videos: dict[str, tuple[str, np.ndarray]] = {}
        if self.video:
            from toolkit.datamodules.video import encode_video

            # MP4s first: a crash before the HDF5 write below leaves at most an unreferenced video
            obs = episode.memory["obs"]
            for key in [k for k in obs if k.startswith("rgb")]:
                videos[key] = (f"{self.path.stem}_videos/{name}/{key}.mp4", obs[key])
                encode_video(self.path.parent / videos[key][0], obs[key], **self.video)
            episode = GDict({**episode.memory, "obs": {k: v for k, v in obs.items() if k not in videos}})
        with _signals_deferred(), open_episode_file(self.path, "a") as f:
            g = f["data"].create_group(name)
            episode.to_hdf5(g, chunk_leading=True)
            if videos:
                from toolkit.datamodules.video import create_video_dataset

                for key, (rel, frames) in videos.items():
                    create_video_dataset(g["obs"], key, frames, rel)
            g.attrs["num_samples"] = n
            for k, v in attrs.items():
                g.attrs[k] = v
            f["data"].attrs["total"] = int(f["data"].attrs["total"]) + n
            masks = split_masks(episode_names(f), self.valid_every)
            for split, names in masks.items():
                key = f"mask/{split}"
                if key in f:
                    del f[key]
                f.create_dataset(key, data=np.array(names, dtype="S"))
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        self.num_episodes += 1
        return name
