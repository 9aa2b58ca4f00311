"""ELLM's intrinsic reward (Du et al. 2023, "Guiding Pretraining in Reinforcement Learning with Large Language
Models"): a step earns reward for each goal, suggested for the state before it, that the step achieved.

"Achieved" is semantic: the cosine similarity of the sentence embeddings of the step's transition caption
(e.g. "collect wood") and the goal is at least ``threshold``. ELLM rewards a goal at most once per episode
(their ``novelty_bonus``), so the agent is pushed on to new goals instead of repeating one; ``reset(env)`` at an
episode's start forgets what that env was rewarded for.

Two simplifications of the paper's ``R = max_i sim(caption, g_i) if > T else 0``: the reward is 1 per newly
achieved goal, not the similarity (at T = 0.99 the two differ by at most 1%), and several goals achieved in one
step add up (in Crafter a step unlocks at most one achievement, so this is rare and then counts each).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import numpy as np
import torch
from torch import nn

from toolkit.errors import ToolkitError


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> torch.Tensor: ...


class ELLMReward:
    """``embedder``: ``encode(list[str]) -> [N, D]`` (default: all-MiniLM-L6-v2, as ELLM's SentenceBERT); rows
    are L2-normalized here, so any sentence encoder works. ``threshold``: 0.99, ELLM's Crafter setting (their
    ``env_spec.threshold``): goals and transition captions are both short achievement phrases there, so only a
    (near-)exact match counts and paraphrases of other achievements ("eat cow" vs "eat plant") do not."""

    def __init__(self, embedder: Embedder | None = None, threshold: float = 0.99, num_envs: int = 1) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ToolkitError(f"goals.threshold={threshold}: a cosine similarity, in [-1, 1] (ELLM: 0.99)")
        if num_envs < 1:
            raise ToolkitError(f"num_envs={num_envs}: must be at least 1")
        if embedder is None:
            from toolkit.encoders.language import MiniLMEncoder

            embedder = MiniLMEncoder()
        self.embedder, self.threshold, self.num_envs = embedder, threshold, num_envs
        self._emb: dict[str, torch.Tensor] = {}  # each string embedded once
        self._rewarded: list[set[str]] = [set() for _ in range(num_envs)]  # this episode's, per env
        self.goals_suggested = 0  # (step, goal) pairs offered
        self.goals_achieved = 0  # goals rewarded
        self.achieved_counts: Counter[str] = Counter()  # per goal

    def _embed(self, texts: list[str]) -> None:
        """Embed the strings not embedded yet, in one batch."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._emb]
        if missing:
            emb = nn.functional.normalize(torch.as_tensor(self.embedder.encode(missing)).float().cpu(), dim=-1)
            self._emb.update(zip(missing, emb))

    def similarity(self, a: list[str], b: list[str]) -> torch.Tensor:
        """Cosine similarities ``[len(a), len(b)]``."""
        self._embed(a + b)
        if not a or not b:
            return torch.zeros(len(a), len(b))
        return torch.stack([self._emb[t] for t in a]) @ torch.stack([self._emb[t] for t in b]).T

    def reset(self, env: int) -> None:
        """``env`` starts an episode: its goals may be rewarded again."""
        self._rewarded[env].clear()

    def reward(self, env: int, achieved: list[str], goals: list[str]) -> tuple[float, list[str]]:
        """The step of ``env`` whose transition captions are ``achieved``, with ``goals`` suggested for the state
        before it: (reward, the goals rewarded), 1 per goal matched and not yet rewarded in this episode."""
        goals = list(dict.fromkeys(goals))
        self.goals_suggested += len(goals)
        open_goals = [g for g in goals if g not in self._rewarded[env]]
        if not achieved or not open_goals:  # most steps achieve nothing: no embedding, no matmul
            return 0.0, []
        best = self.similarity(open_goals, list(achieved)).max(dim=1).values
        hit = [g for g, s in zip(open_goals, best.tolist()) if s >= self.threshold]
        self._rewarded[env].update(hit)
        self.goals_achieved += len(hit)
        self.achieved_counts.update(hit)
        return float(len(hit)), hit

    def rewards(self, achieved: list[list[str]], goals: list[list[str]]) -> np.ndarray:
        """``reward`` for every env (one list per env, in env order) -> ``[num_envs]`` float32."""
        if len(achieved) != self.num_envs or len(goals) != self.num_envs:
            raise ValueError(f"rewards() takes one list per env ({self.num_envs}), got {len(achieved)} and {len(goals)}")
        # one batch for the envs whose step achieved something (the others need no embedding)
        self._embed([t for a, gs in zip(achieved, goals) if a for t in [*a, *gs]])
        return np.array([self.reward(e, a, g)[0] for e, (a, g) in enumerate(zip(achieved, goals))], np.float32)

    def stats(self) -> dict[str, float]:
        """Counters for logging: goals offered, goals rewarded, and how often each goal was rewarded."""
        return {"goals_suggested": float(self.goals_suggested), "goals_achieved": float(self.goals_achieved),
                **{f"achieved/{g}": float(n) for g, n in sorted(self.achieved_counts.items())}}
