"""LightningDataModule over one episode file: windows for training and validation, dataset statistics
and the shapes a policy needs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.datamodules.episode_file import episode_length, episode_names, obs_group, open_episode_file, read_split
from toolkit.datamodules.relabel import (RELABEL_MODES, Summarizer, chain_spans, episode_clauses, episode_spans,
                                         instruction_summary, read_segments, spans_array)
from toolkit.datamodules.video import VIDEO_ATTR
from toolkit.datamodules.windows import EpisodeChunkSampler, EpochBatchSampler, WindowDataset
from toolkit.errors import ToolkitError
from toolkit.normalization import compute_stats


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is saved in checkpoints (Lightning calls ``state_dict`` of stateful loaders):
    the epoch and how many of its batches were trained on, so a resumed run continues the same data order."""

    def __init__(self, *args, datamodule: L.LightningDataModule | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict:
        trainer = getattr(self.datamodule, "trainer", None)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches": int(done)}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.sampler, EpochBatchSampler):  # not when Lightning swapped in a distributed sampler
            self.sampler.epoch, self.sampler.skip = state["epoch"], (state["epoch"], state["batches"])


class EpisodeDataModule(L.LightningDataModule):
    """Uses the first ``num_demos`` episodes of ``path`` (all if None), split by the file's masks.
    ``name`` only names the file in the config (``data.path`` is built from it)."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        num_demos: int | None = None,
        history: int = 2,
        horizon: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        obs_keys: list[str] | None = None,
        feature_cache: bool = True,
        video_backend: str = "decord",
        video_chunk_episodes: int = 8,
        source: dict | None = None,
        relabel: list[str] | None = None,
        relabel_keep_original: bool = True,
        relabel_max_segments: int = 3,
        summarizer: Summarizer | None = None,
        chain_per_segment: int = 1,
        chain_tolerance: float | None = 0.0,
        chain_seed: int = 0,
        holdout_instructions: list[str] | None = None,
        max_sub_instructions: int | None = None,
        label_every_step: bool = False,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.num_demos, self.history, self.horizon = num_demos, history, horizon
        self.batch_size, self.num_workers = batch_size, num_workers
        self.obs_keys = obs_keys
        # windows labelled at every step, for policy.label_every_step (see WindowDataset)
        self.label_every_step = label_every_step
        # read a frozen encoder's cached features instead of pixels (train.py builds the cache)
        self.feature_cache = feature_cache
        # decoder of cameras stored as MP4 sidecars: decord | pyav | torchcodec
        self.video_backend = video_backend
        # MP4 sidecars: shuffle windows this many episodes at a time, so each episode is decoded once per
        # epoch (0: uniformly shuffled windows, each decoded on its own; see EpisodeChunkSampler)
        self.video_chunk_episodes = video_chunk_episodes
        self.video = False
        # another tool's dataset that data.path was converted from (train.py converts it before training)
        self.source = source
        self.feature_path: Path | None = None
        # offline RL policies need reward, done and next_obs (set by train.py from the policy class)
        self.transitions = False
        # SPRINT-style instruction relabeling from the episodes' sub-skill segments (toolkit.datamodules.relabel)
        self.relabel = list(relabel or [])
        unknown = set(self.relabel) - set(RELABEL_MODES)
        if unknown:
            raise ToolkitError(f"data.relabel={self.relabel}: unknown mode(s) {sorted(unknown)}; "
                               f"use {list(RELABEL_MODES)}")
        self.relabel_keep_original, self.relabel_max_segments = relabel_keep_original, relabel_max_segments
        self.summarizer = summarizer
        self.chain_per_segment, self.chain_tolerance, self.chain_seed = chain_per_segment, chain_tolerance, chain_seed
        # a LanguageEncoder: batches carry `lang`, each span's instruction embedded once (set by train.py)
        self.language = None
        # zero-shot protocol: episodes of these missions, or of more clauses, are left out of training
        self.holdout_instructions = set(holdout_instructions or [])
        self.max_sub_instructions = max_sub_instructions
        # what training saw (missions, clauses, longest chain), for toolkit.zero_shot; None without instructions
        self.instruction_summary: dict | None = None
        self.train_set: WindowDataset | None = None

    def _keys(self, f) -> list[str]:
        first_obs = obs_group(f["data"][episode_names(f)[0]])
        return self.obs_keys or sorted(k for k in first_obs if k.startswith("rgb") or k == "state")

    def image_keys(self) -> list[str]:
        """The camera keys (``rgb_*``) the policy sees."""
        with open_episode_file(self.path) as f:
            return [k for k in self._keys(f) if k.startswith("rgb")]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        with open_episode_file(self.path) as f:
            names = episode_names(f)
            if not names:
                raise ToolkitError(f"{self.path} holds no episodes")
            used = set(names[: self.num_demos])
            train = [n for n in read_split(f, "train") if n in used and self._kept(f, n)]
            valid = [n for n in read_split(f, "valid") if n in used and self._kept(f, n)]
            self.instruction_summary = instruction_summary(f, train)
            first_obs = obs_group(f["data"][names[0]])
            keys = self._keys(f)
            self.video = any(VIDEO_ATTR in first_obs[k].attrs for k in keys if k.startswith("rgb"))
            if "state" not in keys:
                raise ToolkitError(f"{self.path}: episodes have no obs/state (keys: {list(first_obs)})")
            self.shape_meta = {
                "rgb_keys": [k for k in keys if k.startswith("rgb")],
                "image_shape": {k: list(first_obs[k].shape[1:]) for k in keys if k.startswith("rgb")},
                "state_dim": int(first_obs["state"].shape[-1]),
                "action_dim": int(f["data"][names[0]]["actions"].shape[-1]),
            }
        if not train:
            raise ToolkitError(f"{self.path}: no training episodes among the first {self.num_demos}")
        self.stats = compute_stats(self.path, train, ["obs/state", "actions"])
        self.train_set = self._windows(train, keys)
        self.valid_set = self._windows(valid, keys) if valid else None

    def _kept(self, f, name: str) -> bool:
        """False for episodes held out of training (``holdout_instructions``, ``max_sub_instructions``)."""
        if not self.holdout_instructions and self.max_sub_instructions is None:
            return True
        attrs = f["data"][name].attrs
        if str(attrs.get("instruction")) in self.holdout_instructions:
            return False
        return self.max_sub_instructions is None or len(episode_clauses(attrs)) <= self.max_sub_instructions

    def has_instructions(self) -> bool:
        """Whether the file's first episode has an ``instruction`` attribute."""
        with open_episode_file(self.path) as f:
            names = episode_names(f)
            return bool(names) and "instruction" in f["data"][names[0]].attrs

    def _spans(self, episodes: list[str]) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
        """The training spans (whole episodes, plus relabeled ones), their distinct instructions and, with a
        language encoder, the embedding of each."""
        if not self.relabel and self.language is None:
            return None, None, []
        if "chain" in self.relabel and not self.transitions:
            raise ToolkitError("data.relabel=[chain] bootstraps rewards from a critic: it needs an offline RL policy "
                               "(policy=iql); use primitive/aggregate for behaviour cloning")
        spans, chainable, first_states, end_states = [], [], [], []
        with open_episode_file(self.path) as f:
            for i, name in enumerate(episodes):
                attrs = f["data"][name].attrs
                where = f"{self.path}: episode {name}"
                segments = read_segments(attrs, where) if self.relabel else []
                instruction = attrs.get("instruction")
                spans += episode_spans(i, episode_length(f, name), None if instruction is None else str(instruction),
                                       segments, [m for m in self.relabel if m != "chain"], self.relabel_keep_original,
                                       self.relabel_max_segments, self.summarizer)
                if "chain" in self.relabel and segments:
                    state = f["data"][name]["obs/state"][()]
                    for s in segments:
                        chainable.append((i, s))
                        first_states.append(state[s["start"]])
                        end_states.append(state[min(s["end"] + 1, len(state) - 1)])  # the state its last action led to
        if chainable:
            spans += chain_spans(chainable, np.stack(first_states), np.stack(end_states),
                                 np.random.default_rng(self.chain_seed), self.chain_per_segment, self.chain_tolerance,
                                 self.summarizer)
        instructions = list(dict.fromkeys([*(s.instruction for s in spans if s.instruction),
                                           *(s.bootstrap for s in spans if s.bootstrap)]))
        lang = self.language.encode(instructions).numpy() if self.language is not None and instructions else None
        return spans_array(spans, instructions), lang, instructions

    def _windows(self, episodes: list[str], keys: list[str]) -> WindowDataset:
        chunked = self.video and self.video_chunk_episodes > 0 and not self.feature_path
        spans, lang, instructions = self._spans(episodes)
        if self.language is not None and lang is None:
            raise ToolkitError(f"{self.path}: the policy is language-conditioned but the episodes have no instructions")
        dataset = WindowDataset(self.path, episodes, keys, self.history, self.horizon, self.feature_path,
                                self.transitions, self.video_backend,
                                decoded_episodes=2 * self.video_chunk_episodes if chunked else 0, spans=spans, lang=lang,
                                label_every_step=self.label_every_step)
        dataset.instructions = instructions  # index i: the instruction of spans with instruction index i
        return dataset

    def refresh(self) -> None:
        """Re-read the file's episode list after episodes were appended (DAgger): from now on every
        episode in the file is used (``num_demos`` becomes None), split by the file's masks. The
        normalization ``stats`` stay those of the initial data (the policy's normalizers are fixed)."""
        if self.train_set is None:
            self.setup("fit")
        self.num_demos = None
        with open_episode_file(self.path) as f:
            names = set(episode_names(f))
            train = [n for n in read_split(f, "train") if n in names and self._kept(f, n)]
            valid = [n for n in read_split(f, "valid") if n in names and self._kept(f, n)]
        keys = self.train_set.obs_keys
        self.train_set = self._windows(train, keys)
        self.valid_set = self._windows(valid, keys) if valid else None

    def _loader(self, dataset: WindowDataset, shuffle: bool) -> DataLoader:
        seed = torch.initial_seed() % 2**32  # seed_everything(cfg.seed) fixes it: the same order on every run
        chunks = EpisodeChunkSampler(dataset.ep_of, self.video_chunk_episodes, seed) if shuffle and dataset.decoded_episodes else None
        # Batched loading: the dataset reads a whole batch of windows per call (WindowDataset.get_batch),
        # about 12x faster than collating windows read one by one (bench/loading.py).
        batches = EpochBatchSampler(len(dataset), self.batch_size, shuffle, drop_last=shuffle and len(dataset) > self.batch_size,
                                    seed=seed, chunks=chunks)
        return ResumableDataLoader(dataset, batch_size=None, sampler=batches, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, datamodule=self)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # Any file of 2+ episodes has validation episodes (split_masks); with none, validation and rollouts are skipped.
        return self._loader(self.valid_set, shuffle=False) if self.valid_set else []
