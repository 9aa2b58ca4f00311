"""Dataset statistics for states and actions, kept as module buffers so a checkpoint carries them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.datamodules.episode_file import open_episode_file


def compute_stats(path: str | Path, episodes: list[str], keys: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per-dimension mean/std/min/max of low-dimensional keys (``actions``, ``obs/state``) over episodes."""
    stats = {}
    with open_episode_file(path) as f:
        for key in keys:
            x = np.concatenate([f["data"][name][key][()] for name in episodes]).astype(np.float64)
            x = x.reshape(len(x), -1)
            stats[key] = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                          "min": x.min(0).tolist(), "max": x.max(0).tolist()}
    return stats


class Normalizer(nn.Module):
    """z-scores one quantity; dimensions that barely vary (a gripper held open) are left unscaled."""

    def __init__(self, mean: list[float], std: list[float], min_std: float = 1e-2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        std_t = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("std", torch.where(std_t < min_std, torch.ones_like(std_t), std_t))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean
