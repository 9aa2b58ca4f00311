"""The format-neutral episode that readers return and writers take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gdict import GDict


@dataclass
class Episode:
    """One episode, fully in memory.

    ``obs``: ``rgb_<camera>`` uint8 ``[L, H, W, 3]`` per camera, ``state`` float32 ``[L, D]``, other keys
    allowed; ``actions`` float32 ``[L, A]`` (discrete actions: ``[L, 1]`` indices); ``rewards`` float32
    ``[L]``; ``dones`` uint8 ``[L]`` (1 on the last step); ``attrs``: JSON-able scalars and strings such
    as ``success``, ``instruction``, ``source``, ``seed``.
    """

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    def to_gdict(self) -> GDict:
        """The layout ``EpisodeWriter.append`` takes."""
        return GDict({"obs": dict(self.obs), "actions": self.actions.astype(np.float32),
                      "rewards": self.rewards.astype(np.float32), "dones": self.dones.astype(np.uint8)})

    def check(self, where: str) -> None:
        """Raise ``ToolkitError`` naming ``where`` if the arrays disagree on the episode's length."""
        from toolkit.errors import ToolkitError

        n = len(self.actions)
        lengths = {"rewards": len(self.rewards), "dones": len(self.dones), **{f"obs/{k}": len(v) for k, v in self.obs.items()}}
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ToolkitError(f"{where}: {n} actions but " + ", ".join(f"{k} has {v} steps" for k, v in bad.items()))
