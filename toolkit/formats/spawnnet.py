"""SpawnNet trajectories (Lin, So et al., 2023, github.com/johnrso/spawnnet): reader.

What the published sources fix, and what this reader follows:

* SpawnNet stores demonstrations as HDF5 files written with its ``gdict`` package, which its README says is
  "extracted from ManiSkill2-Learn"; its BC loader (``simple_bc/dataset/replay_dataset.py``,
  ``ReplayDataset(dataset_dir=...)``) takes a *directory* of such files. That loader's source is not in the
  published snapshot we could consult, so the file layout below is ManiSkill2-Learn's (github.com/haosulab/
  ManiSkill2-Learn, README "Demonstration Format" and ``maniskill2_learn/utils/file/hdf5_utils.py``):
  one group per trajectory, ``traj_<i>``, holding ``obs/<key>``, ``actions`` ``[L, A]`` float32,
  ``rewards`` ``[L, 1]``, ``dones`` ``[L, 1]`` bool (task success/termination at that step; ManiSkill2-Learn's
  ``convert_state.py`` fills it from ``success``), ``episode_dones`` ``[L, 1]`` bool (the trajectory's last
  step), ``is_truncated`` and ``worker_indices`` ``[L, 1]``.
* GDict's HDF5 writer (``dump_hdf5``) mangles names: a dict key ``k`` is stored as ``dict_<type>_<k>``
  (``dict_str_obs``), a list item as ``list_<type>_<i>``, a bare array as ``GDict``; older files use plain
  names and an ``int__`` prefix for integer keys. Both are read, like ManiSkill2-Learn's ``load_hdf5``.
* Observations as SpawnNet feeds them (``conf/xarm_train_spawnnet.yaml``: ``obs_shapes`` rgb [3, 224, 224],
  depth [1, 224, 224], state [7], ``num_views: 2``; ``RLAfford/dagger/train.py``, ``isaacgym_obs_wrapper``:
  ``rgb`` 'b v h w c -> b v c h w', ``depth`` the same, ``state`` = proprioception): per step ``rgb``
  ``[V, 3, H, W]`` (views, channel-first; SpawnNet's evaluation notes "float32 in [0, 255]"),
  ``depth`` ``[V, 1, H, W]``, ``state`` ``[D]``.

Accepted input: a directory (every ``*.h5``/``*.hdf5`` below it, in natural order) or one file. Each
``traj_<i>`` group is an episode; a file whose root itself holds ``obs`` and ``actions`` is one episode.
Episode names: ``<file path relative to the directory, without suffix>/<traj group>`` (a single file:
``<traj group>``; a root-level trajectory: the file's name alone). A file that cannot be opened is
listed as one episode under its name, whose reading raises the error (so validation lists it).

Mapping to our episodes:

* Colour images: obs keys ``rgb``, ``rgb_<name>``, ``<name>_rgb``, ``<name>_image`` or ``.../<name>/rgb``,
  with per-step shape ``[H, W, 3]``, ``[3, H, W]``, ``[V, 3, H, W]``, ``[V, H, W, 3]`` or channel-stacked
  cameras ``[H, W, 3k]`` / ``[3k, H, W]`` (ManiSkill2-Learn's rgbd mode): every view becomes
  ``rgb_<camera>`` uint8 ``[L, H, W, 3]``. Channel-first vs -last is inferred from which axis has 3 (or a
  multiple of 3 up to 24) channels; option ``image_layout`` ("hwc"/"chw") settles ambiguous shapes. Views
  of an unnamed ``rgb`` are named by option ``cameras`` (a list, in view order), default ``view0``,
  ``view1`` ...; views of a named key are ``<name>`` (one view) or ``<name>_<i>``. Float images are
  taken as [0, 255], or as [0, 1] when their maximum is at most 1, rounded and clipped to uint8.
* Depth (``depth``, ``depth_<name>``, ``<name>_depth``; one channel per view) only with option
  ``depth=True``: ``depth_<camera>`` float32 ``[L, H, W, 1]``, as stored, views named as the colour ones.
* ``state`` float32 ``[L, D]``: the obs keys ``state_keys`` (paths like ``state`` or ``agent/qpos``)
  flattened per step and concatenated; default ``["state"]`` when the trajectory has ``obs/state``
  (SpawnNet's and ManiSkill2-Learn's proprioception), else every other non-image obs key, sorted, except
  point clouds (``xyz``, ``*seg*``).
* ``actions`` float32 ``[L, A]``; ``rewards`` float32 ``[L]`` (zeros if absent); ``dones`` uint8: 1 where
  the stored ``dones`` or ``episode_dones`` is set, and on the last step. ``attrs``: ``source``
  ("spawnnet"), ``file``, the trajectory group's scalar attributes, and ``success``: the last
  ``info(s)/success`` if recorded, else — when both ``dones`` and ``episode_dones`` are stored
  (ManiSkill2-Learn's meaning of ``dones``) — whether any step is done.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np

from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode

Tree = dict[str, Union["Tree", h5py.Dataset]]
_POINT_CLOUD = re.compile(r"(^|/)(xyz|points?|pointcloud)$|seg")
_MANGLED = re.compile(r"^(dict|list)_[A-Za-z]+_(.*)$")


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _unmangle(name: str) -> str:
    """ManiSkill2-Learn's HDF5 key names: ``dict_str_obs`` -> ``obs``, ``list_int_0`` -> ``0``, ``int__3`` -> ``3``."""
    m = _MANGLED.match(name)
    if m:
        return m.group(2)
    return name[len("int__"):] if name.startswith("int__") else name


def tree(node: h5py.Group) -> Tree:
    """The groups and datasets below ``node`` under their unmangled names (datasets not read)."""
    keys = list(node.keys())
    if keys == ["GDict"] and isinstance(node["GDict"], h5py.Group):
        return tree(node["GDict"])
    out: Tree = {}
    for key in keys:
        child = node[key]
        out[_unmangle(key)] = tree(child) if isinstance(child, h5py.Group) else child
    return out


def _leaves(t: Tree, prefix: str = "") -> dict[str, h5py.Dataset]:
    out: dict[str, h5py.Dataset] = {}
    for key, value in t.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, path + "/"))
        else:
            out[path] = value
    return out


def _image_kind(path: str) -> tuple[str, str] | None:
    """``(kind, name)`` of an image obs key: kind ``rgb`` or ``depth``, name the camera ('' if unnamed)."""
    parts = path.split("/")
    leaf, parents = parts[-1], [p for p in parts[:-1] if p not in ("image", "images", "camera", "cameras")]
    for kind, suffixes in (("rgb", ("_rgb", "_image")), ("depth", ("_depth",))):
        if leaf == kind:
            return kind, "_".join(parents)
        if leaf.startswith(kind + "_"):
            return kind, "_".join([*parents, leaf[len(kind) + 1:]])
        for suffix in suffixes:
            if leaf.endswith(suffix):
                return kind, "_".join([*parents, leaf[: -len(suffix)]])
    return None


def split_views(arr: np.ndarray, channels: int, layout: str = "auto") -> list[np.ndarray]:
    """Per-view channel-last images ``[L, H, W, channels]`` of an image array ``[L, ...]``."""
    def small(c: int) -> bool:
        return c == channels if channels == 1 else (c % channels == 0 and 0 < c <= 8 * channels)

    shape = arr.shape
    if arr.ndim == 3 and channels == 1:  # [L, H, W] depth
        return [arr[..., None]]
    if arr.ndim == 4:
        hwc, chw = small(shape[-1]), small(shape[1])
        if layout == "hwc" or (layout == "auto" and hwc and not chw):
            stacked = arr
        elif layout == "chw" or (layout == "auto" and chw and not hwc):
            stacked = np.moveaxis(arr, 1, -1)
        else:
            raise ValueError(f"cannot tell channel-first from channel-last in {list(shape)}: "
                             f"set image_layout=hwc or chw")
        if stacked.shape[-1] % channels:
            raise ValueError(f"{stacked.shape[-1]} channels are not a multiple of {channels}")
        return [stacked[..., i:i + channels] for i in range(0, stacked.shape[-1], channels)]
    if arr.ndim == 5:  # [L, V, ...]
        hwc, chw = shape[-1] == channels, shape[2] == channels
        if layout == "hwc" or (layout == "auto" and hwc and not chw):
            return [arr[:, v] for v in range(shape[1])]
        if layout == "chw" or (layout == "auto" and chw and not hwc):
            return [np.moveaxis(arr[:, v], 1, -1) for v in range(shape[1])]
        raise ValueError(f"cannot tell channel-first from channel-last in {list(shape)}: "
                         f"set image_layout=hwc or chw")
    raise ValueError(f"image array of shape {list(shape)}: expected [L, H, W, C], [L, C, H, W] or [L, V, ...]")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if frames.dtype.kind == "f":
        scale = 255.0 if frames.size and np.nanmax(frames) <= 1.0 else 1.0
        frames = np.rint(np.nan_to_num(frames) * scale)
    return np.ascontiguousarray(np.clip(frames, 0, 255).astype(np.uint8))


class SpawnNetReader:
    """Episodes of a directory (or file) of SpawnNet / ManiSkill2-Learn GDict trajectory files."""

    def __init__(self, path: str | Path, state_keys: str | list[str] | None = None, cameras: list[str] | None = None,
                 depth: bool = False, image_layout: str = "auto", env_name: str | None = None) -> None:
        self.path = Path(path)
        if image_layout not in ("auto", "hwc", "chw"):
            raise ToolkitError(f"image_layout={image_layout!r}: use auto, hwc or chw")
        self.state_keys = [state_keys] if isinstance(state_keys, str) else (list(state_keys) if state_keys else None)
        self.cameras = [cameras] if isinstance(cameras, str) else list(cameras or [])
        self.depth, self.image_layout = depth, image_layout
        if self.path.is_dir():
            files = sorted((p for p in self.path.rglob("*") if p.suffix in (".h5", ".hdf5") and p.is_file()),
                           key=lambda p: _natural_key(p.relative_to(self.path).as_posix()))
            if not files:
                raise ToolkitError(f"SpawnNet dataset {self.path} holds no .h5/.hdf5 trajectory files")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise ToolkitError(f"SpawnNet dataset {self.path} does not exist")
        self.env_args = {"env_name": env_name or (self.path.name if self.path.is_dir() else self.path.stem),
                         "type": "spawnnet", "env_kwargs": {}}
        # name -> (file, trajectory group path or None for the root, error to raise when read)
        self._index: dict[str, tuple[Path, str | None, str | None]] = {}
        for file in files:
            key = file.relative_to(self.path).with_suffix("").as_posix() if self.path.is_dir() else ""
            try:
                with h5py.File(file, "r") as f:
                    trajs = self._trajectories(f)
            except OSError as e:
                self._index[key or file.stem] = (file, None, f"{file} is not a readable HDF5 file ({e})")
                continue
            except ToolkitError as e:
                self._index[key or file.stem] = (file, None, str(e))
                continue
            for unmangled, raw in trajs:
                name = "/".join(p for p in (key, unmangled) if p) or file.stem
                self._index[name] = (file, raw, None)

    @staticmethod
    def _trajectories(f: h5py.File) -> list[tuple[str, str]]:
        """``(name, HDF5 path)`` of every trajectory group of a file; ``(\"\", \"/\")`` for a root-level one."""
        found = []
        for raw in f.keys():
            name = _unmangle(raw)
            if re.fullmatch(r"traj_?\d+", name) and isinstance(f[raw], h5py.Group):
                found.append((name, raw))
        if found:
            return sorted(found, key=lambda t: _natural_key(t[0]))
        root = tree(f)
        if "obs" in root and "actions" in root:
            return [("", "/")]
        raise ToolkitError(f"{f.filename} has no trajectory groups (traj_<i>) and no root-level obs/actions "
                           f"(top-level keys: {', '.join(sorted(f.keys())[:8])})")

    def episode_names(self) -> list[str]:
        return list(self._index)

    def read_episode(self, name: str) -> Episode:
        if name not in self._index:
            raise ToolkitError(f"{self.path}: no episode {name!r}")
        file, group, error = self._index[name]
        where = f"{file}: episode {name}"
        if error is not None:
            raise ToolkitError(f"{where}: {error}")
        try:
            with h5py.File(file, "r") as f:
                episode = self._read(tree(f[group]), where)
                for k, v in f[group].attrs.items():
                    v = v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
                    if isinstance(v, (str, int, float, bool)):
                        episode.attrs.setdefault(k, v)
        except ToolkitError:
            raise
        except OSError as e:
            raise ToolkitError(f"{where} cannot be read ({e})") from None
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise ToolkitError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
        episode.attrs.setdefault("file", file.relative_to(self.path).as_posix() if self.path.is_dir() else file.name)
        episode.check(where)
        return episode

    def _read(self, traj: Tree, where: str) -> Episode:
        for key in ("obs", "actions"):
            if key not in traj:
                raise ToolkitError(f"{where} has no '{key}' (has: {', '.join(sorted(traj))})")
        if not isinstance(traj["obs"], dict) or isinstance(traj["actions"], dict):
            raise ToolkitError(f"{where}: 'obs' must be a group and 'actions' a dataset")
        actions = np.asarray(traj["actions"][()], dtype=np.float32)
        n = len(actions)
        actions = actions.reshape(n, -1)
        lengths: dict[str, int] = {}
        obs: dict[str, np.ndarray] = {}
        leaves = _leaves(traj["obs"])
        low_dim = []
        for path, ds in leaves.items():
            kind = _image_kind(path)
            if kind is None:
                if not _POINT_CLOUD.search(path):
                    low_dim.append(path)
                continue
            if kind[0] == "depth" and not self.depth:
                continue
            lengths[f"obs/{path}"] = ds.shape[0]
            try:
                views = split_views(ds[()], 3 if kind[0] == "rgb" else 1, self.image_layout)
            except ValueError as e:
                raise ToolkitError(f"{where}: obs/{path}: {e}") from None
            for i, view in enumerate(views):
                if kind[1]:
                    camera = kind[1] if len(views) == 1 else f"{kind[1]}_{i}"
                else:
                    camera = self.cameras[i] if i < len(self.cameras) else f"view{i}"
                key = f"{kind[0]}_{camera}"
                if key in obs:
                    raise ToolkitError(f"{where}: two image keys map to {key} (name them with option cameras)")
                obs[key] = to_uint8(view) if kind[0] == "rgb" else np.asarray(view, np.float32)
        if self.state_keys is not None:
            keys = self.state_keys
        else:
            keys = ["state"] if "state" in leaves else sorted(low_dim, key=_natural_key)
        missing = [k for k in keys if k not in leaves]
        if missing:
            raise ToolkitError(f"{where}: state_keys {missing} not in obs (has: {', '.join(sorted(leaves))})")
        parts = []
        for k in keys:
            lengths[f"obs/{k}"] = leaves[k].shape[0] if leaves[k].ndim else 0
            parts.append(np.asarray(leaves[k][()], dtype=np.float32))
        steps = {k: traj[k] for k in ("rewards", "dones", "episode_dones")
                 if k in traj and not isinstance(traj[k], dict)}
        lengths.update({k: ds.shape[0] if ds.ndim else 0 for k, ds in steps.items()})
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ToolkitError(f"{where} has mismatched lengths: {n} actions but "
                               + ", ".join(f"{k} has {v} steps" for k, v in bad.items()))
        obs["state"] = (np.concatenate([p.reshape(n, -1) for p in parts], axis=1) if parts
                        else np.zeros((n, 0), np.float32))
        rewards = (np.asarray(steps["rewards"][()], np.float32).reshape(n) if "rewards" in steps
                   else np.zeros(n, np.float32))
        flags = {k: np.asarray(steps[k][()]).reshape(n) != 0 for k in ("dones", "episode_dones") if k in steps}
        dones = np.zeros(n, np.uint8)
        for flag in flags.values():
            dones |= flag.astype(np.uint8)
        if n:
            dones[-1] = 1
        attrs: dict[str, Any] = {"source": "spawnnet"}
        info = traj.get("infos", traj.get("info"))
        if isinstance(info, dict) and "success" in info and not isinstance(info["success"], dict):
            success = np.asarray(info["success"][()]).reshape(-1)
            if len(success):
                attrs["success"] = bool(success[-1])
        elif "dones" in flags and "episode_dones" in flags:
            attrs["success"] = bool(flags["dones"].any())
        return Episode(obs=obs, actions=actions, rewards=rewards, dones=dones, attrs=attrs)
