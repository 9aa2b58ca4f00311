"""Episode files: robomimic-compatible HDF5.

    data/                       attrs: total (steps), env_args (JSON, see below), video (JSON or null)
    data/demo_<i>/              attrs: num_samples, success, seed, source, [instruction]
        obs/<key>               [L, ...]   rgb_<camera> uint8 [L, H, W, 3] (chunk = one frame), state float32
        next_obs/<key>          [L, ...]   virtual: next_obs[t] = obs[t + 1], the last step's = obs[L - 1]
        actions                 [L, A] float32
        rewards                 [L] float32
        dones                   [L] uint8 (1 on the last step)
        videos/rgb_<camera>     only for a camera stored as an MP4 sidecar (see below)
    mask/train, mask/valid      episode names (bytes), split by episode

Robomimic files read as they are; ours open in robomimic (its ``SequenceDataset`` with its defaults, BC,
IQL; tests/test_robomimic_real.py runs robomimic 0.3.0 itself on them).

``next_obs`` costs no space: each key is an HDF5 virtual dataset mapping the episode's own ``obs/<key>``
(source file ``"."``, this file, wherever it is moved) shifted by one step. We do not record the
observation after the last action, so the last step's next_obs repeats the last observation, as
robomimic's own D4RL conversion does; ``dones`` is 1 there, so value targets never use it. A virtual
dataset follows its source by path: copying a demo group to another name (``h5py`` ``copy``,
``h5copy``) leaves its next_obs pointing at the old name; merge or rename episodes with
``toolkit.convert``, which rewrites them. Float keys read NaN, never zeros, should the source be gone.

An MP4-stored camera has no dataset under ``obs/`` (a reader unaware of the sidecars gets a KeyError
naming ``rgb_<camera>``, never frames of zeros; the obs group's ``sidecar_videos`` attribute says where
the frames are). Its marker ``videos/rgb_<camera>`` holds the MP4's path relative to the file's folder,
with attributes ``video_path`` (the same) and ``shape`` ``[L, H, W, 3]``. ``obs_group(episode)`` shows
both kinds as one mapping (a sidecar camera as a ``SidecarCamera``, shaped like a dataset, decoding on
indexing); every reader of the toolkit goes through it. Files written before this layout keep an
unallocated ``obs/rgb_<camera>`` placeholder with a ``video_path`` attribute: they read the same.

``env_args`` is robomimic's environment metadata: ``type`` 2 (robomimic's ``EnvType.GYM_TYPE``; our
envs are not robosuite) with our ``env_name`` and ``env_kwargs``, and under ``toolkit`` our own fields
(``type``: ``metaworld``, ``babyai`` ...). ``toolkit_env_args`` gives our form back (readers and the
writer's same-env check use it; files that stored our form directly read the same). robomimic's env
utilities (``get_env_type``, ``is_robosuite_env``) work on it, but robomimic cannot build our envs for
rollouts: its ``EnvGym`` calls the old ``gym.make(env_name)``, and our env names are not gym ids.

Appends are atomic per episode: the file is open only while one finished episode is written, with
Ctrl-C/SIGTERM held back until it is closed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from gdict import GDict
from toolkit.datamodules.video import VIDEO_ATTR, DecoderCache, read_images
from toolkit.errors import ToolkitError

STEP_KEYS = ("actions", "rewards", "dones")
VIDEOS = "videos"  # data/demo_<i>/videos/rgb_<camera>: the marker of a camera stored as an MP4 sidecar
SIDECAR_NOTE = "sidecar_videos"  # attribute of obs/ explaining where its MP4-stored cameras are
GYM_TYPE = 2  # robomimic.envs.env_base.EnvType.GYM_TYPE (ROBOSUITE_TYPE = 1, IG_MOMART_TYPE = 3)


# --- env_args ------------------------------------------------------------------------------------------

def robomimic_env_args(env_args: dict[str, Any]) -> dict[str, Any]:
    """``env_args`` as stored in the file: robomimic's integer env type (GYM_TYPE for ours), our own
    fields under ``toolkit``. Env metadata that already has an integer type (robomimic's) is kept."""
    if isinstance(env_args.get("type"), int) or "toolkit" in env_args:
        return dict(env_args)
    ours = {k: v for k, v in env_args.items() if k not in ("env_name", "env_kwargs")}
    return {"env_name": env_args.get("env_name"), "type": GYM_TYPE, "env_kwargs": env_args.get("env_kwargs", {}),
            "toolkit": ours}


def toolkit_env_args(env_args: dict[str, Any]) -> dict[str, Any]:
    """Our form of stored ``env_args`` (``type`` a name such as ``metaworld``); others' are kept."""
    if not isinstance(env_args.get("toolkit"), dict):
        return dict(env_args)
    return {**{k: v for k, v in env_args.items() if k not in ("toolkit", "type")}, **env_args["toolkit"]}


# --- observations: obs/ datasets and MP4-stored cameras ------------------------------------------------

class SidecarCamera:
    """A camera stored as an MP4 sidecar, shaped like the dataset it replaces: ``shape``, ``dtype``,
    ``attrs`` (``video_path``), ``name`` (``.../obs/rgb_<camera>``), ``file``; indexing the first axis
    decodes frames (``read_images`` takes it as it takes an ``h5py.Dataset``)."""

    def __init__(self, marker: h5py.Dataset, name: str) -> None:
        self.marker, self.name, self.file = marker, name, marker.file
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in marker.attrs.items()}
        self.shape = tuple(int(x) for x in marker.attrs["shape"])
        self.dtype, self.ndim, self.chunks = np.dtype(np.uint8), len(self.shape), None
        self._decoders: DecoderCache | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(index, tuple) and index not in ((), (Ellipsis,)):
            index, rest = index[0], index[1:]
        if isinstance(index, tuple) or index is Ellipsis:
            index = slice(None)
        self._decoders = self._decoders or DecoderCache()
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.shape[0] if index < 0 else 0)
            return read_images(self, [i], self._decoders)[0][rest]
        return read_images(self, index, self._decoders)[(slice(None), *rest)]

    def __repr__(self) -> str:
        return f"<SidecarCamera {self.name} {self.shape} uint8 from {self.attrs.get(VIDEO_ATTR)}>"


class ObsGroup(Mapping):
    """One episode's observations: the datasets of ``obs/`` and the cameras stored as MP4 sidecars
    (``SidecarCamera``), keys in name order like an ``h5py.Group``."""

    def __init__(self, episode: h5py.Group) -> None:
        self._obs = episode["obs"]
        self._videos = episode[VIDEOS] if VIDEOS in episode else None
        self.name, self.file, self.attrs = self._obs.name, self._obs.file, self._obs.attrs

    def __getitem__(self, key: str):
        if key in self._obs:
            return self._obs[key]
        if self._videos is not None and key in self._videos:
            return SidecarCamera(self._videos[key], f"{self._obs.name}/{key}")
        raise KeyError(f"{self.file.filename}: {self._obs.name} has no obs key {key!r} (has: {', '.join(self)})")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._obs or (self._videos is not None and key in self._videos))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._obs.keys(), *(self._videos.keys() if self._videos is not None else ())}))

    def __len__(self) -> int:
        return len(list(iter(self)))


def obs_group(episode: h5py.Group) -> ObsGroup:
    """The observations of ``data/demo_<i>`` (any file with that layout: ours, robomimic's, feature caches)."""
    return ObsGroup(episode)


def write_next_obs(episode: h5py.Group) -> None:
    """``next_obs/<key>`` for every dataset of ``obs/``: a virtual dataset over ``obs/<key>`` of this same
    file, shifted by one step, the last step repeated (no copy of the data)."""
    nxt = episode.require_group("next_obs")
    for key, ds in episode["obs"].items():
        if key in nxt:
            del nxt[key]
        n = ds.shape[0]
        layout = h5py.VirtualLayout(shape=ds.shape, dtype=ds.dtype)
        source = h5py.VirtualSource(".", ds.name, shape=ds.shape, dtype=ds.dtype)
        if n > 1:
            layout[: n - 1] = source[1:]
        if n:
            layout[n - 1] = source[n - 1]
        nxt.create_virtual_dataset(key, layout, fillvalue=np.nan if ds.dtype.kind == "f" else None)


def check_next_obs(f: h5py.File, name: str) -> None:
    """Raise if ``next_obs`` of an episode does not map its own ``obs`` (e.g. a demo group copied to
    another name, whose virtual next_obs still reads the old episode)."""
    g = f["data"][name]
    if "next_obs" not in g:
        return
    for key, ds in g["next_obs"].items():
        if not ds.is_virtual:
            continue
        want = f"{g.name}/obs/{key}"
        got = sorted({(m.file_name, m.dset_name) for m in ds.virtual_sources()})
        if got != [(".", want)] or key not in g["obs"]:
            raise ToolkitError(f"{f.filename}: episode {name}: next_obs/{key} reads {got} instead of {want} "
                               f"(was the episode copied or renamed?). Rewrite the file with toolkit.convert.")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the file is being written, so an interrupt lands between episodes."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


LOCK_WAIT_S = 120.0


def open_episode_file(path: str | Path, mode: str = "r", lock_wait_s: float = LOCK_WAIT_S) -> h5py.File:
    """Open an episode file with an error that names the file and what to do.

    HDF5 locks a file while a process has it open, and an open fails at once if another process holds it
    (a collector appending, or someone validating the file while collection runs). Both sides hold the file
    only for a moment, so the open is retried for up to ``lock_wait_s`` seconds before giving up.
    """
    path = Path(path)
    if mode == "r" and not path.exists():
        raise ToolkitError(f"dataset file {path} does not exist: collect it with `python -m toolkit.collect` "
                           f"or set data.path to an existing file")
    deadline = time.monotonic() + lock_wait_s
    while True:
        try:
            return h5py.File(path, mode)
        except OSError as e:
            if "unable to lock file" not in str(e):
                raise ToolkitError(f"dataset file {path} is not a readable HDF5 file ({e}). "
                                   f"Delete or move it and collect again.") from None
            if time.monotonic() >= deadline:
                raise ToolkitError(f"dataset file {path} stayed locked by another process for {lock_wait_s:.0f} s "
                                   f"({e}); the file is left as it is. Stop the process that holds it open "
                                   f"(e.g. a collector, or an h5py session) and try again.") from None
            time.sleep(0.005)  # short: the other side's hold is short, and a long pause can miss each gap


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
    lengths.update({f"obs/{k}": ds.shape[0] for k, ds in obs_group(g).items()})
    n = int(g.attrs.get("num_samples", lengths["actions"]))
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ToolkitError(f"{f.filename}: episode {name} has mismatched lengths (num_samples={n}): "
                           + ", ".join(f"{k}={v}" for k, v in bad.items())
                           + ". Re-collect this episode or delete it from the file.")
    return n


def split_of(index: int, valid_every: int = 10) -> str:
    """The split of the file's episode number ``index``: 1, 1 + k, 1 + 2k, ... (k = ``valid_every``) go to
    validation, so the split is stable as the file grows, and any file of two or more episodes has one to
    validate on."""
    return "valid" if valid_every and index % valid_every == 1 else "train"


def split_masks(names: list[str], valid_every: int = 10) -> dict[str, list[str]]:
    """``names`` (in file order) split by ``split_of``."""
    masks: dict[str, list[str]] = {"train": [], "valid": []}
    for i, n in enumerate(names):
        masks[split_of(i, valid_every)].append(n)
    return masks


def add_to_masks(f: h5py.File, name: str, index: int, valid_every: int = 10) -> None:
    """Put the file's episode number ``index`` (``name``, the last) in its split's mask.

    The masks are extended in place, so collecting N episodes costs O(N). Rewriting them whole at each append
    cost O(N^2) (collecting BabyAI demos had slowed to ~230 a minute at 7,000) and leaked the old masks' space,
    which HDF5 does not reuse once the file is closed: about N^2 / 2 name bytes, 2.5 GB at 22,000 episodes. A
    file whose masks are not extendable (robomimic's, older ones) or do not hold every earlier episode gets them
    rewritten once."""
    masks = [f.get(f"mask/{split}") for split in ("train", "valid")]
    if (all(m is not None and m.maxshape == (None,) and m.dtype.kind == "S" and m.dtype.itemsize >= len(name)
            for m in masks) and sum(len(m) for m in masks) == index):
        mask = f[f"mask/{split_of(index, valid_every)}"]
        mask.resize((len(mask) + 1,))
        mask[-1] = name.encode()
        return
    names = episode_names(f)
    width = max(32, *(len(n) for n in names))
    for split, members in split_masks(names, valid_every).items():
        if f"mask/{split}" in f:
            del f[f"mask/{split}"]
        f.create_dataset(f"mask/{split}", data=np.array(members, dtype=f"S{width}"), maxshape=(None,), chunks=(1024,))


def read_split(f: h5py.File, split: str) -> list[str]:
    """Episode names of mask/<split>; all episodes if the file has no masks."""
    if "mask" in f and split in f["mask"]:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][split][()]]
    return episode_names(f) if split == "train" else []


class EpisodeWriter:
    """Appends finished episodes to an episode file, one atomic write each.

    ``env_args`` in our form (``type`` a name) or as stored (robomimic's); the file stores robomimic's
    form (``robomimic_env_args``). ``video`` (``{"crf", "keyframe_interval", "lossless", "fps"}``, any
    subset) stores every ``rgb_*`` camera as an MP4 sidecar in ``<file stem>_videos/<episode>/<camera>.mp4``
    instead of inline frames. The choice is recorded in the file: later appends (more collection, DAgger)
    follow the file's. An episode's ``next_obs``, if given, is not written: the file's is always ``obs``
    shifted by one step (``write_next_obs``).
    """

    def __init__(self, path: str | Path, env_args: dict[str, Any], valid_every: int = 10,
                 video: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.valid_every = valid_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _signals_deferred(), open_episode_file(self.path, "a") as f:
            data = f.require_group("data")
            if "env_args" not in data.attrs:
                data.attrs["env_args"] = json.dumps(robomimic_env_args(env_args))
                data.attrs["total"] = 0
                data.attrs["video"] = json.dumps(dict(video) if video else None)
            elif toolkit_env_args(json.loads(data.attrs["env_args"])) != toolkit_env_args(env_args):
                raise ToolkitError(f"{self.path} holds episodes of another environment "
                                   f"({data.attrs['env_args']}); use another data.path")
            self.video = json.loads(data.attrs.get("video", "null"))
            self.num_episodes = len(episode_names(f))

    def append(self, episode: GDict, attrs: dict[str, Any]) -> str:
        """Write one episode (``obs/*``, ``actions``, ``rewards``, ``dones``) and update totals and masks."""
        n = len(episode)
        name = f"demo_{self.num_episodes}"
        memory = {k: v for k, v in episode.memory.items() if k not in ("next_obs", VIDEOS)}
        videos: dict[str, tuple[str, tuple[int, ...]]] = {}
        if self.video:
            from toolkit.datamodules.video import encode_video

            # MP4s first: a crash before the HDF5 write below leaves at most an unreferenced video
            obs = memory["obs"]
            for key in [k for k in obs if k.startswith("rgb")]:
                rel = f"{self.path.stem}_videos/{name}/{key}.mp4"
                frames = np.asarray(obs[key])
                encode_video(self.path.parent / rel, frames, **self.video)
                videos[key] = (rel, frames.shape)
            memory["obs"] = {k: v for k, v in obs.items() if k not in videos}
        with _signals_deferred(), open_episode_file(self.path, "a") as f:
            g = f["data"].create_group(name)
            GDict(memory).to_hdf5(g, chunk_leading=True)
            obs_g = g.require_group("obs")
            write_next_obs(g)
            for key, (rel, shape) in videos.items():
                marker = g.require_group(VIDEOS).create_dataset(key, data=rel)
                marker.attrs[VIDEO_ATTR] = rel
                marker.attrs["shape"] = np.asarray(shape, np.int64)
            if videos:
                obs_g.attrs[SIDECAR_NOTE] = "; ".join(
                    f"{key} is not stored here: its frames are the MP4 {rel} (path relative to this file's "
                    f"folder, named by {g.name}/{VIDEOS}/{key}); read them with toolkit.datamodules.episode_file."
                    f"obs_group, or write a copy with inline frames: python -m toolkit.convert {self.path.name} "
                    f"inline.hdf5 --from hdf5 --to hdf5" for key, (rel, _) in videos.items())
            g.attrs["num_samples"] = n
            for k, v in attrs.items():
                g.attrs[k] = v
            f["data"].attrs["total"] = int(f["data"].attrs["total"]) + n
            add_to_masks(f, name, self.num_episodes, self.valid_every)
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        self.num_episodes += 1
        return name
