"""Windows over episodes: an observation history of T steps ending at t and an action chunk of H steps
starting at t. Indices are clamped to the episode's edges (the edge frame repeats) and flagged in
``*_is_pad``, so a window never reads another episode."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from gdict import GDict
from toolkit.datamodules.episode_file import episode_length, open_episode_file
from toolkit.datamodules.video import DecoderCache, read_images, video_path
from toolkit.errors import ToolkitError


def window_indices(t: int, length: int, history: int, horizon: int):
    """Step indices of the window at step ``t`` of an episode of ``length`` steps.

    Returns ``(obs_idx [history], obs_is_pad [history], act_idx [horizon], act_is_pad [horizon])``.
    """
    obs_raw = np.arange(t - history + 1, t + 1)
    act_raw = np.arange(t, t + horizon)
    obs_idx = np.clip(obs_raw, 0, length - 1)
    act_idx = np.clip(act_raw, 0, length - 1)
    return obs_idx, obs_raw != obs_idx, act_idx, act_raw != act_idx


class WindowDataset(Dataset):
    """Samples ``{"obs": {key: [T, ...]}, "obs_is_pad": [T], "action": [H, A], "action_is_pad": [H]}``.

    Images come out channels-first (``[T, 3, H, W]`` uint8). With a ``feature_path`` (a feature cache
    of a frozen encoder, see ``toolkit.encoders.cache``) every ``rgb_<camera>`` is replaced by
    ``rgb_<camera>_features`` ``[T, N, D]`` float32 read from that file. With ``transitions`` (offline RL)
    a sample also has ``reward`` and ``done`` of step t and ``next_obs`` / ``next_obs_is_pad``, the window
    ending at t + 1 (at an episode's last step, the same window; ``done`` is 1 there), read from the
    same span of the file, so nothing is stored twice. One HDF5 handle per file and
    process (each DataLoader worker opens its own, on first use). Cameras stored as MP4 sidecars are
    decoded frame-exactly for the window's span (``video_backend``: decord, pyav or torchcodec), with a
    per-process cache of open decoders; with ``decoded_episodes > 0`` whole episodes are decoded at once
    (in order, at the decoder's full speed) and the last ``decoded_episodes`` are kept, so that windows
    drawn a few episodes at a time (``EpisodeChunkSampler``) cost no decoding of their own.
    """

    def __init__(self, path: str | Path, episodes: list[str], obs_keys: list[str], history: int, horizon: int,
                 feature_path: str | Path | None = None, transitions: bool = False,
                 video_backend: str = "decord", decoded_episodes: int = 0) -> None:
        self.path, self.obs_keys = Path(path), list(obs_keys)
        self.history, self.horizon = history, horizon
        self.feature_path = Path(feature_path) if feature_path else None
        self.transitions = transitions
        self.image_keys = [k for k in self.obs_keys if k.startswith("rgb")]
        self.file_keys = [k for k in self.obs_keys if not (self.feature_path and k in self.image_keys)]
        self.decoders = DecoderCache(video_backend)
        self.decoded_episodes = decoded_episodes
        self._decoded: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        with open_episode_file(self.path) as f:
            self.lengths = [episode_length(f, name) for name in episodes]
            for name in episodes:
                missing = [k for k in self.obs_keys if k not in f["data"][name]["obs"]]
                if missing:
                    raise ToolkitError(f"{self.path}: episode {name} has no obs key(s) {missing} "
                                   f"(it has {sorted(f['data'][name]['obs'])}); check data.obs_keys")
        self.episodes = list(episodes)
        # (episode, step) of every sample, as two flat arrays.
        self.ep_of = np.repeat(np.arange(len(episodes)), self.lengths)
        self.t_of = np.concatenate([np.arange(n) for n in self.lengths]) if episodes else np.zeros(0, int)
        self._file = self._features = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.t_of)

    def _open(self) -> None:
        if self._pid != os.getpid():  # a forked worker must not share its parent's handles
            self._file, self._pid = open_episode_file(self.path), os.getpid()
            self._decoded = OrderedDict()
            self._features = open_episode_file(self.feature_path) if self.feature_path else None

    def __getitem__(self, i: int) -> dict:
        e, t = int(self.ep_of[i]), int(self.t_of[i])
        self._open()
        g = self._file["data"][self.episodes[e]]
        length = self.lengths[e]
        obs_idx, obs_pad, act_idx, act_pad = window_indices(t, length, self.history, self.horizon)
        next_idx, next_pad, _, _ = window_indices(min(t + 1, length - 1), length, self.history, 1)
        # Read the contiguous span once, then expand the clamped (repeated) edge indices.
        span = slice(obs_idx[0], (next_idx if self.transitions else obs_idx)[-1] + 1)
        obs = GDict.from_hdf5(g["obs"], keys=[k for k in self.file_keys if k not in self.image_keys], index=span)
        for k in self.file_keys:
            if k in self.image_keys:  # inline frames or the MP4's
                obs[k] = self._images(e, k, g["obs"][k], span)
        if self._features is not None:
            feats = GDict.from_hdf5(self._features["data"][self.episodes[e]]["obs"],
                                    keys=[f"{k}_features" for k in self.image_keys], index=span)
            obs = GDict({**obs.memory, **feats.memory})
        action = g["actions"][act_idx[0]: act_idx[-1] + 1][act_idx - act_idx[0]]
        sample = {
            "obs": self._to_torch(obs[obs_idx - obs_idx[0]]),
            "obs_is_pad": torch.from_numpy(obs_pad),
            "action": torch.from_numpy(action.astype(np.float32)),
            "action_is_pad": torch.from_numpy(act_pad),
        }
        if self.transitions:
            sample["next_obs"] = self._to_torch(obs[next_idx - obs_idx[0]])
            sample["next_obs_is_pad"] = torch.from_numpy(next_pad)
            sample["reward"] = torch.tensor(float(g["rewards"][t]))
            sample["done"] = torch.tensor(float(g["dones"][t]))
        return sample

    def _images(self, e: int, key: str, dataset, span: slice) -> np.ndarray:
        if not self.decoded_episodes or video_path(dataset) is None:
            return read_images(dataset, span, self.decoders)
        frames = self._decoded.pop((e, key), None)
        if frames is None:
            frames = read_images(dataset, slice(None), self.decoders)
        self._decoded[(e, key)] = frames  # most recently used last
        while len(self._decoded) > self.decoded_episodes * len(self.image_keys):
            self._decoded.popitem(last=False)
        return frames[span]

    def _to_torch(self, obs: GDict) -> dict[str, torch.Tensor]:
        """Images channels-first uint8, everything else float32."""
        return {k: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, 1) if k in self.image_keys else v.astype(np.float32)))
                for k, v in obs.items_flat()}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_features"], state["_pid"] = None, None, None  # h5py handles do not pickle
        state["_decoded"] = OrderedDict()
        return state


class EpisodeChunkSampler(Sampler[int]):
    """Every window once per epoch, in random order, drawn ``episodes_per_chunk`` episodes at a time: the
    episodes are shuffled and cut into chunks, and each chunk's windows are shuffled together. With MP4
    sidecars each episode is then decoded once per epoch (``WindowDataset.decoded_episodes``) instead of
    once per window; a batch mixes windows of about ``episodes_per_chunk`` episodes."""

    def __init__(self, ep_of: np.ndarray, episodes_per_chunk: int, seed: int = 0) -> None:
        self.episodes_per_chunk, self.seed, self.epoch = episodes_per_chunk, seed, 0
        order = np.argsort(ep_of, kind="stable")
        self.windows_of = np.split(order, np.flatnonzero(np.diff(ep_of[order])) + 1) if len(ep_of) else []

    def __len__(self) -> int:
        return sum(len(w) for w in self.windows_of)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        episodes = rng.permutation(len(self.windows_of))
        for start in range(0, len(episodes), self.episodes_per_chunk):
            chunk = np.concatenate([self.windows_of[e] for e in episodes[start:start + self.episodes_per_chunk]])
            yield from rng.permutation(chunk).tolist()
