"""robomimic HDF5 datasets: reader and writer.

Layout (robomimic docs, https://robomimic.github.io/docs/datasets/overview.html, "Dataset Structure";
``robomimic/utils/file_utils.py`` for ``env_args`` and masks)::

    data/                    attrs: total (steps in the file), env_args (JSON: env_name, type, env_kwargs;
                             type is robomimic's EnvType: 1 robosuite, 2 gym, 3 iGibson MoMaRT)
    data/demo_<i>/           attrs: num_samples (steps), model_file (robosuite only)
        obs/<key>            [N, ...]  images uint8 [N, H, W, 3] channel-last, named <camera>_image
        next_obs/<key>       [N, ...]  the observation after each step
        actions              [N, A]    (robomimic expects them in [-1, 1])
        rewards              [N]
        dones                [N]       1 where the action terminates the episode
        states               [N, D]    raw simulator states (empty or dummy for other simulators)
    mask/<filter key>        demo names as bytes (dtype 'S'); train/valid as written by split_train_val.py

Reader (``RobomimicReader``). Cameras: ``obs/<camera>_image`` becomes ``rgb_<camera>`` (``agentview_image`` ->
``rgb_agentview``, ``robot0_eye_in_hand_image`` -> ``rgb_robot0_eye_in_hand``); our own files'
``obs/rgb_<camera>`` are taken as they are, frames stored as MP4 sidecars included
(toolkit.datamodules.video); any other uint8 ``[N, H, W, 3]`` key is a camera under its own name. Depth and
segmentation maps (``*_depth``, ``depth*``, ``*segmentation*``) are not images and not state: they are left
out. ``state`` float32 ``[N, D]`` is the concatenation, in the given order, of the obs keys ``state_keys``
each flattened per step; by default every remaining (low-dimensional) obs key, sorted by name (e.g.
``object``, ``robot0_eef_pos``, ``robot0_eef_quat``, ``robot0_gripper_qpos``; for our own files just
``state``; their MP4-stored cameras through ``episode_file.obs_group``). ``actions`` float32 ``[N, A]``;
``rewards`` float32 (zeros if absent); ``dones`` uint8: the stored ``dones`` (robomimic marks
successes/terminations there) with the last step set to 1. ``attrs``: the demo group's attributes except
``num_samples`` and ``model_file`` (our files keep ``success``, ``seed``, ``instruction`` ... there).
``next_obs`` and ``states`` are not read. ``env_args`` in our form where the file keeps ours under ``toolkit``
(``toolkit_env_args``), else as stored. Options: ``state_keys``, ``split`` (a mask/filter key such as
``train`` or ``valid``: only its demos, in its order; default every demo under ``data/``, demo_2 before
demo_10), ``video_backend``.

Writer (``write_robomimic``): the layout above from our episodes: ``rgb_<camera>`` back to ``<camera>_image``,
``state`` (and any other obs key) as a low-dimensional key of that name, ``next_obs`` = obs shifted by one
step with the last step repeated (as robomimic's D4RL conversion does; virtual datasets over ``obs``, no copy:
``episode_file.write_next_obs``), ``states`` an empty ``[N, 0]`` placeholder (no simulator states), the
episode's attrs as the demo's attributes (non-scalars as JSON), ``mask/train`` and ``mask/valid`` split like
our own files (every ``valid_every``-th episode, starting at the second, to validation), ``total`` and
``env_args`` (robomimic's integer type, ours kept under ``toolkit``: ``episode_file.robomimic_env_args``). The
file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode

_NOT_IMAGE_NOT_STATE = re.compile(r"(_depth$|^depth|segmentation)")


def _natural_key(name: str) -> list[Any]:
    """demo_2 before demo_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _attr_value(v: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [_attr_value(x) for x in v.tolist()] if v.dtype.kind in "SO" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def camera_of(key: str, ds: h5py.Dataset | np.ndarray) -> str | None:
    """The camera name of an image obs key (``agentview_image`` -> ``agentview``, ``rgb_wrist`` ->
    ``wrist``), None for other keys."""
    if key.endswith("_image"):
        return key[: -len("_image")]
    if key.startswith("rgb_"):
        return key[len("rgb_"):]
    if ds.dtype == np.uint8 and ds.ndim == 4 and ds.shape[-1] == 3:
        return key
    return None


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


class RobomimicReader:
    """Episodes of a robomimic HDF5 file (or of one of ours, which share the layout)."""

    def __init__(self, path: str | Path, state_keys: str | list[str] | None = None, split: str | None = None,
                 video_backend: str = "decord") -> None:
        from toolkit.datamodules.episode_file import toolkit_env_args
        from toolkit.datamodules.video import DecoderCache

        self.path = Path(path)
        self.state_keys = _as_list(state_keys)
        self.decoders = DecoderCache(video_backend)
        with self._open() as f:
            if "data" not in f:
                raise ToolkitError(f"{self.path} has no 'data' group: not a robomimic dataset")
            raw = f["data"].attrs.get("env_args")
            try:
                self.env_args = toolkit_env_args(json.loads(raw)) if raw is not None else {
                    "env_name": self.path.stem, "type": "robomimic", "env_kwargs": {}}
            except json.JSONDecodeError as e:
                raise ToolkitError(f"{self.path}: data.attrs['env_args'] is not JSON ({e})") from None
            names = sorted(f["data"].keys(), key=_natural_key)
            if split is not None:
                if "mask" not in f or split not in f["mask"]:
                    have = sorted(f["mask"].keys()) if "mask" in f else []
                    raise ToolkitError(f"{self.path} has no mask/{split} (filter keys: {', '.join(have) or 'none'})")
                masked = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][split][()]]
                missing = [n for n in masked if n not in f["data"]]
                if missing:
                    raise ToolkitError(f"{self.path}: mask/{split} names episodes that are not under data/: "
                                       f"{', '.join(missing[:5])}")
                names = masked
        self._names = names

    def _open(self) -> h5py.File:
        if not self.path.exists():
            raise ToolkitError(f"robomimic dataset {self.path} does not exist")
        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            raise ToolkitError(f"robomimic dataset {self.path} is not a readable HDF5 file ({e})") from None

    def episode_names(self) -> list[str]:
        return list(self._names)

    def read_episode(self, name: str) -> Episode:
        where = f"{self.path}: episode {name}"
        with self._open() as f:
            if name not in f["data"]:
                raise ToolkitError(f"{where} does not exist (episodes: {', '.join(self._names[:5])}...)")
            try:
                episode = self._read(f["data"][name], where)
            except ToolkitError as e:
                if str(e).startswith(where):
                    raise
                raise ToolkitError(f"{where}: {e}") from None  # e.g. a missing or short MP4 sidecar
            except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise ToolkitError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
        episode.check(where)
        return episode

    def _read(self, g: h5py.Group, where: str) -> Episode:
        from toolkit.datamodules.episode_file import obs_group
        from toolkit.datamodules.video import read_images, video_path

        for key in ("obs", "actions"):
            if key not in g:
                raise ToolkitError(f"{where} has no '{key}' (has: {', '.join(sorted(g.keys()))})")
        obs_g = obs_group(g)
        actions = np.asarray(g["actions"][()], dtype=np.float32)
        n = len(actions)
        num_samples = int(g.attrs.get("num_samples", n))
        lengths = {"actions": n, **{k: g[k].shape[0] for k in ("rewards", "dones") if k in g},
                   **{f"obs/{k}": ds.shape[0] for k, ds in obs_g.items()}}
        bad = {k: v for k, v in lengths.items() if v != num_samples}
        if bad:
            raise ToolkitError(f"{where} has mismatched lengths (num_samples={num_samples}): "
                               + ", ".join(f"{k}={v}" for k, v in bad.items()))
        obs: dict[str, np.ndarray] = {}
        low_dim: list[str] = []
        for key, ds in obs_g.items():
            camera = camera_of(key, ds)
            if camera is not None:
                if video_path(ds) is None:
                    frames = ds[()]
                else:
                    try:
                        frames = read_images(ds, slice(None), self.decoders)
                    except ToolkitError:
                        raise
                    except Exception as e:  # each decoder backend has its own error types
                        raise ToolkitError(f"{where}: video {video_path(ds)} cannot be decoded "
                                           f"({type(e).__name__}: {e})") from None
                if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                    raise ToolkitError(f"{where}: obs/{key} is {frames.dtype} {list(frames.shape)}, "
                                       f"not uint8 [N, H, W, 3] images")
                obs[f"rgb_{camera}"] = frames
            elif not _NOT_IMAGE_NOT_STATE.search(key):
                low_dim.append(key)
        keys = self.state_keys if self.state_keys is not None else sorted(low_dim)
        missing = [k for k in keys if k not in obs_g]
        if missing:
            raise ToolkitError(f"{where}: state_keys {missing} not in obs (has: {', '.join(obs_g)})")
        parts = [np.asarray(obs_g[k][()], dtype=np.float32).reshape(n, -1) for k in keys]
        obs["state"] = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)
        rewards = np.asarray(g["rewards"][()], np.float32).reshape(n) if "rewards" in g else np.zeros(n, np.float32)
        dones = (np.asarray(g["dones"][()]).reshape(n) != 0).astype(np.uint8) if "dones" in g else np.zeros(n, np.uint8)
        if n:
            dones[-1] = 1
        attrs = {k: _attr_value(v) for k, v in g.attrs.items() if k not in ("num_samples", "model_file")}
        return Episode(obs=obs, actions=actions.reshape(n, -1), rewards=rewards, dones=dones, attrs=attrs)


def _attr(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, np.generic)) else json.dumps(v, default=str)


def write_robomimic(episodes: Iterable[Episode], path: str | Path, env_args: dict[str, Any],
                    valid_every: int = 10) -> list[str]:
    """Write ``episodes`` as a robomimic dataset at ``path`` (replacing it); returns the demo names."""
    from toolkit.datamodules.episode_file import robomimic_env_args, split_masks, write_next_obs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    names: list[str] = []
    total = 0
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            data.attrs["env_args"] = json.dumps(robomimic_env_args(env_args))
            for i, episode in enumerate(episodes):
                name = f"demo_{i}"
                episode.check(f"write_robomimic: episode {i}")
                n = len(episode)
                g = data.create_group(name)
                obs = {}
                for key, value in episode.obs.items():
                    out = f"{key[len('rgb_'):]}_image" if key.startswith("rgb_") else key
                    if out in obs:
                        raise ToolkitError(f"write_robomimic: episode {i}: obs key {key!r} and another both "
                                           f"map to {out!r}")
                    obs[out] = np.asarray(value)
                og = g.create_group("obs")
                for key, value in obs.items():
                    chunks = (1, *value.shape[1:]) if value.ndim >= 3 and n else None
                    og.create_dataset(key, data=value, chunks=chunks)
                write_next_obs(g)
                g.create_dataset("actions", data=np.asarray(episode.actions, np.float32).reshape(n, -1))
                g.create_dataset("rewards", data=np.asarray(episode.rewards, np.float32).reshape(n))
                g.create_dataset("dones", data=np.asarray(episode.dones, np.uint8).reshape(n))
                g.create_dataset("states", data=np.zeros((n, 0), np.float32))
                for k, v in episode.attrs.items():
                    g.attrs[k] = _attr(v)
                g.attrs["num_samples"] = n
                names.append(name)
                total += n
            data.attrs["total"] = total
            for split, members in split_masks(names, valid_every).items():
                f.create_dataset(f"mask/{split}", data=np.array(members, dtype="S"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return names
