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

from toolkit.datamodules.episode_file import episode_length, obs_group, open_episode_file
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

    ``dataset[i]`` is one window; ``dataset[list_of_indices]`` is a whole batch of them (every array with a
    leading batch dim), read in one vectorized pass: the fast path, used by ``EpisodeDataModule`` with a
    ``BatchSampler`` and ``batch_size=None`` (PyTorch's "batched loading"). Images come out channels-first
    (``[T, 3, H, W]`` uint8), everything else float32. Low-dimensional arrays (``state``, other non-image
    obs keys, actions, rewards, dones) are read into memory once per process (as robomimic's ``low_dim``
    cache); frames stay on disk and are read per window, only the span the window covers.

    With a ``feature_path`` (a feature cache of a frozen encoder, see ``toolkit.encoders.cache``) every
    ``rgb_<camera>`` is replaced by ``rgb_<camera>_features`` ``[T, N, D]`` float32 read from that file.
    With ``transitions`` (offline RL) a sample also has ``reward`` and ``done`` of step t and ``next_obs`` /
    ``next_obs_is_pad``, the window ending at t + 1 (at an episode's last step, the same window; ``done`` is
    1 there), read from the same span of the file, so nothing is stored twice. One HDF5 handle per file and
    process (each DataLoader worker opens its own, on first use). Cameras stored as MP4 sidecars are
    decoded frame-exactly for the window's span (``video_backend``: decord, pyav or torchcodec), with a
    per-process cache of open decoders; with ``decoded_episodes > 0`` whole episodes are decoded at once
    (in order, at the decoder's full speed) and the last ``decoded_episodes`` are kept, so that windows
    drawn a few episodes at a time (``EpisodeChunkSampler``) cost no decoding of their own.

    ``spans`` (``[S, 6]``: episode index, start, stop, instruction index, relabeled, bootstrap instruction
    index; see ``toolkit.datamodules.relabel``) makes samples of parts of episodes instead of whole ones:
    windows are clamped and padded at a span's edges, and a relabeled span is rewarded 1 and done on its
    last step. With ``lang`` (``[U, Dl]``, one embedding per instruction index) a sample has its span's
    ``lang``; with transitions, a chained span's last step also has ``bootstrap`` = 1 and
    ``bootstrap_lang``, the instruction whose value replaces its reward (other samples: 0 and zeros).

    With ``label_every_step`` (behaviour cloning of a recurrent policy, ``policy.label_every_step``) a sample is
    labelled at every step: ``step_action`` ``[T, A]``, the action of each step of the window, and ``step_scored``
    ``[T]``, the steps to score, each step of a span exactly once per epoch. A span of at most T steps is one window
    (ending at its last step) scored at all of its steps; a longer one gives a window ending at its T-th step,
    scored at all T, then one window per later step, scored at its last step only (a step is scored only where its
    window holds all the history the policy's rollout window holds).
    """

    def __init__(self, path: str | Path, episodes: list[str], obs_keys: list[str], history: int, horizon: int,
                 feature_path: str | Path | None = None, transitions: bool = False,
                 video_backend: str = "decord", decoded_episodes: int = 0, spans: np.ndarray | None = None,
                 lang: np.ndarray | None = None, label_every_step: bool = False) -> None:
        if label_every_step and (horizon != 1 or transitions):
            raise ToolkitError(f"data.label_every_step labels each step with its own action: it needs data.horizon=1 "
                               f"and behaviour cloning (got horizon={horizon}, transitions={transitions})")
        self.label_every_step = label_every_step
        self.path, self.obs_keys = Path(path), list(obs_keys)
        self.history, self.horizon = history, horizon
        self.feature_path = Path(feature_path) if feature_path else None
        self.transitions = transitions
        self.image_keys = [k for k in self.obs_keys if k.startswith("rgb")]
        self.low_dim_keys = [k for k in self.obs_keys if k not in self.image_keys]
        self.decoders = DecoderCache(video_backend)
        self.decoded_episodes = decoded_episodes
        self._decoded: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        with open_episode_file(self.path) as f:
            self.lengths = [episode_length(f, name) for name in episodes]
            for name in episodes:
                missing = [k for k in self.obs_keys if k not in obs_group(f["data"][name])]
                if missing:
                    raise ToolkitError(f"{self.path}: episode {name} has no obs key(s) {missing} "
                                   f"(it has {sorted(obs_group(f['data'][name]))}); check data.obs_keys")
        self.episodes = list(episodes)
        self._length = np.asarray(self.lengths, dtype=np.int64)
        self._offset = np.concatenate([[0], np.cumsum(self._length)[:-1]]).astype(np.int64)  # in the low-dim arrays
        if spans is None:  # one span per whole episode
            none = np.full(len(episodes), -1)
            spans = np.stack([np.arange(len(episodes)), 0 * self._length, self._length, none, 0 * self._length, none],
                             1) if episodes else np.zeros((0, 6), int)
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 6)
        bad = (self.spans[:, 1] < 0) | (self.spans[:, 2] > self._length[self.spans[:, 0]]) | (self.spans[:, 1] >= self.spans[:, 2])
        if bad.any():
            raise ToolkitError(f"{self.path}: span {self.spans[bad][0].tolist()} is not inside its episode")
        self.lang = None if lang is None else np.asarray(lang, dtype=np.float32)
        if self.lang is not None and (self.spans[:, 3] < 0).any():
            e = self.episodes[int(self.spans[self.spans[:, 3] < 0][0, 0])]
            raise ToolkitError(f"{self.path}: episode {e} has no instruction, but the policy is language-conditioned")
        # span, episode and step of every sample, as flat arrays
        sizes = self.spans[:, 2] - self.spans[:, 1]
        self.span_of = np.repeat(np.arange(len(self.spans)), sizes)
        self.ep_of = self.spans[self.span_of, 0]
        self.t_of = (np.concatenate([np.arange(a, b) for a, b in self.spans[:, 1:3]]) if len(self.spans)
                     else np.zeros(0, np.int64))
        if label_every_step:  # the windows that end at a span's last step or hold T steps of it
            first, stop = self.spans[self.span_of, 1], self.spans[self.span_of, 2]
            keep = (self.t_of - first >= history - 1) | (self.t_of == stop - 1)
            self.span_of, self.ep_of, self.t_of = self.span_of[keep], self.ep_of[keep], self.t_of[keep]
        self._file = self._features = None
        self._low: dict[str, np.ndarray] | None = None
        self._frames: dict[tuple[int, str], object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.t_of)

    def _open(self) -> None:
        if self._pid != os.getpid():  # a forked worker must not share its parent's handles
            self._file, self._pid = open_episode_file(self.path), os.getpid()
            self._decoded, self._frames, self._low = OrderedDict(), {}, None
            self._features = open_episode_file(self.feature_path) if self.feature_path else None
        if self._low is None:
            self._low = self._read_low_dim()

    def _read_low_dim(self) -> dict[str, np.ndarray]:
        """Every episode's low-dimensional arrays, concatenated in episode order (float32)."""
        groups = [self._file["data"][name] for name in self.episodes]
        keys = [*(f"obs/{k}" for k in self.low_dim_keys), "actions", *(["rewards", "dones"] if self.transitions else [])]
        return {k: np.concatenate([np.asarray(g[k][()], dtype=np.float32) for g in groups]) for k in keys}

    def __getitem__(self, i):
        if np.ndim(i) == 0:
            return _tree_map(lambda x: x[0], self.get_batch(np.array([int(i)])))
        return self.get_batch(np.asarray(i, dtype=np.int64))

    def get_batch(self, indices: np.ndarray) -> dict:
        """The windows at ``indices`` as one batch (every array with leading dim ``len(indices)``)."""
        self._open()
        span = self.spans[self.span_of[indices]]
        e, t = span[:, 0], self.t_of[indices]
        first, last, offset = span[:, 1:2], span[:, 2:3] - 1, self._offset[e][:, None]
        back = np.arange(1 - self.history, 1)
        obs_raw, act_raw = t[:, None] + back, t[:, None] + np.arange(self.horizon)
        obs_idx, act_idx = np.clip(obs_raw, first, last), np.minimum(act_raw, last)
        next_raw = np.minimum(t + 1, last[:, 0])[:, None] + back
        next_idx = np.clip(next_raw, first, last)
        # Frames: one contiguous span per window (and its next window), read once.
        start, stop = obs_idx[:, 0], (next_idx if self.transitions else obs_idx)[:, -1] + 1
        frames = {k: [self._frames_of(int(ep), k, int(a), int(b)) for ep, a, b in zip(e, start, stop)]
                  for k in self.image_keys}
        low = self._low
        batch = {
            "obs": self._obs(offset, obs_idx, frames, start),
            "obs_is_pad": torch.from_numpy(obs_raw != obs_idx),
            "action": torch.from_numpy(low["actions"][offset + act_idx]),
            "action_is_pad": torch.from_numpy(act_raw != act_idx),
        }
        if self.label_every_step:
            batch["step_action"] = torch.from_numpy(low["actions"][offset + obs_idx])
            holds_start = obs_raw[:, :1] <= first  # every step's history back to the span's first step
            last_step = np.arange(self.history) == self.history - 1
            batch["step_scored"] = torch.from_numpy((obs_raw == obs_idx) & (holds_start | last_step))
        if self.lang is not None:
            batch["lang"] = torch.from_numpy(self.lang[span[:, 3]])
        if self.transitions:
            batch["next_obs"] = self._obs(offset, next_idx, frames, start)
            batch["next_obs_is_pad"] = torch.from_numpy(next_raw != next_idx)
            relabeled, at_end = span[:, 4].astype(bool), (t == last[:, 0]).astype(np.float32)
            batch["reward"] = torch.from_numpy(np.where(relabeled, at_end, low["rewards"][offset[:, 0] + t]))
            batch["done"] = torch.from_numpy(np.where(relabeled, at_end, low["dones"][offset[:, 0] + t]))
            if self.lang is not None and (self.spans[:, 5] >= 0).any():
                chained = span[:, 5] >= 0
                batch["bootstrap"] = torch.from_numpy(chained & (at_end > 0))
                batch["bootstrap_lang"] = torch.from_numpy(np.where(chained[:, None], self.lang[span[:, 5]], 0.0)
                                                           .astype(np.float32))
        return batch

    def _obs(self, offset: np.ndarray, idx: np.ndarray, frames: dict[str, list[np.ndarray]], start: np.ndarray) -> dict:
        """Observations at step indices ``idx`` [B, T]; ``frames[key][b]`` holds window b's frames from ``start[b]``."""
        obs = {k: torch.from_numpy(self._low[f"obs/{k}"][offset + idx]) for k in self.low_dim_keys}
        features = self._features is not None
        for k, per_window in frames.items():
            first = per_window[0]
            shape = first.shape[1:] if features else (first.shape[3], *first.shape[1:3])  # HWC -> CHW
            out = np.empty((*idx.shape, *shape), dtype=np.float32 if features else np.uint8)
            for b, (read, a) in enumerate(zip(per_window, start)):
                window = read[idx[b] - a]
                out[b] = window if features else window.transpose(0, 3, 1, 2)
            obs[f"{k}_features" if features else k] = torch.from_numpy(out)
        return obs

    def _frames_of(self, e: int, key: str, start: int, stop: int) -> np.ndarray:
        """Frames (or, with a feature cache, features) ``start:stop`` of episode ``e``'s camera ``key``."""
        dataset = self._frames.get((e, key))  # h5py lookups by name cost more than the read itself
        if dataset is None:
            source = self._features if self._features is not None else self._file
            name = f"{key}_features" if self._features is not None else key
            dataset = self._frames[(e, key)] = obs_group(source["data"][self.episodes[e]])[name]
        if self._features is not None:
            return dataset[start:stop]
        return self._images(e, key, dataset, slice(start, stop))

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

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_features"], state["_pid"] = None, None, None  # h5py handles do not pickle
        state["_decoded"], state["_frames"], state["_low"] = OrderedDict(), {}, None
        return state


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


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


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of window indices in an order fixed by ``(seed, epoch)``: every window once per epoch, shuffled
    (``chunks``: an ``EpisodeChunkSampler``, a few episodes at a time) or in order. ``set_epoch`` (Lightning
    calls it) picks the epoch, and ``skip = (epoch, n)`` leaves out that epoch's first n batches once: a run resumed mid-epoch
    sees exactly the batches an uninterrupted run would have seen next."""

    def __init__(self, num_windows: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 chunks: EpisodeChunkSampler | None = None) -> None:
        self.num_windows, self.batch_size, self.shuffle, self.drop_last = num_windows, batch_size, shuffle, drop_last
        self.seed, self.chunks, self.epoch = seed, chunks, 0
        self.skip: tuple[int, int] | None = None  # (epoch, batches) already trained on, to leave out once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if self.chunks is not None:
            self.chunks.epoch = self.epoch
            return np.fromiter(iter(self.chunks), dtype=np.int64)
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
        return np.arange(self.num_windows)

    def __len__(self) -> int:
        full, rest = divmod(self.num_windows, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        # a resumed epoch that had finished is not skipped into: Lightning goes on with the next epoch
        order, skip = self._order(), self.skip[1] if self.skip and self.skip[0] == self.epoch else 0
        self.skip = None
        for b in range(skip, len(self)):
            yield order[b * self.batch_size: (b + 1) * self.batch_size].tolist()
