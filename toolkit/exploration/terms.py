"""Intrinsic rewards as terms of the online training envs' reward (``toolkit.envs.stepper.EnvStepper``).

``goals=`` (ELLM, Du et al., 2023): before each step a suggester proposes goals from the caption of the env's
current state; the step is rewarded for each suggested goal that its transition caption achieves
(``toolkit.exploration.ellm.ELLMReward``: MiniLM cosine similarity above ``threshold``, each goal once per
episode). ``intrinsic=rnd`` (Burda et al., 2018): the prediction error of a distilled random network on the
next observation, its predictor trained on every step's observations. Both add ``coef * reward`` to the env's
reward; ``env.reward=none`` leaves only the intrinsic part (ELLM's reward-free pre-training).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import torch

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

# fields of the goals= config that belong to the reward rule and conditioning, not to the suggester it instantiates
GOAL_REWARD_FIELDS = ("threshold", "coef", "condition")
# the instruction of a goal-conditioned policy in a state with no suggested goal
NO_GOALS = "no goal"


def build_reward_terms(goals: Any, intrinsic: Any, num_envs: int) -> list[Any]:
    """The terms named by the ``goals=`` and ``intrinsic=`` configs (none when both are null). The suggester
    is checked here (an unreachable model server fails at start-up, not mid-run)."""
    from hydra.utils import instantiate

    terms: list[Any] = []
    if goals:
        rule = {k: v for k, v in _plain(goals).items() if k in GOAL_REWARD_FIELDS}
        terms.append(GoalReward(build_suggester(goals), num_envs, **rule))
    if intrinsic:
        terms.append(RNDReward(instantiate(_plain(intrinsic))))
    return terms


def _plain(node: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def build_suggester(goals: Any) -> Any:
    """The suggester of a ``goals=`` config (its reward-rule fields left out), checked: an unreachable model
    server fails here, at start-up."""
    from hydra.utils import instantiate

    suggester = instantiate({k: v for k, v in _plain(goals).items() if k not in GOAL_REWARD_FIELDS})
    suggester.check()
    return suggester


def conditions_on_goals(goals: Any) -> bool:
    """Whether a ``goals=`` config (or None) asks for a goal-conditioned policy (``goals.condition``)."""
    return bool(goals) and bool(_plain(goals).get("condition", False))


def _texts(info: dict[str, Any], key: str, i: int) -> str:
    values = info.get(key)
    if values is None:
        raise ToolkitError(f"goals= needs an env that captions its states (info['{key}']): env=crafter; this env's "
                           f"info has {sorted(k for k in info if not k.startswith('_'))}")
    return str(values[i] or "")


class GoalInstructions:
    """The goals suggested for each of ``num_envs`` envs' current state, kept up to date from the envs' infos
    (their state captions); as text they are a goal-conditioned policy's instruction (ELLM's goal conditioning,
    ``goals.condition``): the goals joined with ", " in the suggester's order, ``NO_GOALS`` when there are none."""

    def __init__(self, suggester: Any, num_envs: int) -> None:
        self.suggester = suggester
        self.goals: list[list[str]] = [[] for _ in range(num_envs)]

    def update(self, mask: np.ndarray, info: dict[str, Any]) -> None:
        """New suggestions for the envs in ``mask``, from ``info`` (a vector env's, of a reset or a step)."""
        for i in np.flatnonzero(mask):
            context = json.loads(_texts(info, "goal_context", int(i)) or "{}")
            self.goals[i] = self.suggester.suggest(_texts(info, "caption", int(i)), context)

    def texts(self) -> np.ndarray:
        """One instruction per env (an object array, as ``obs["instruction"]``)."""
        out = np.empty(len(self.goals), dtype=object)
        out[:] = [", ".join(g) if g else NO_GOALS for g in self.goals]
        return out


class GoalReward:
    """ELLM's goal reward for ``num_envs`` envs: goals suggested for each env's current state, rewarded when a
    step's transition caption matches one (each goal at most once per episode). ``condition``: the training
    envs' instructions are those goals (``GoalInstructions``), for a policy conditioned on them."""

    def __init__(self, suggester: Any, num_envs: int, threshold: float = 0.99, coef: float = 1.0,
                 condition: bool = False, embedder: Any = None) -> None:
        from toolkit.exploration.ellm import ELLMReward

        self.suggester, self.coef, self.condition = suggester, coef, condition
        self.rule = ELLMReward(embedder=embedder, threshold=threshold, num_envs=num_envs)  # and its counters
        self.current = GoalInstructions(suggester, num_envs)
        self.steps = 0

    @property
    def goals(self) -> list[list[str]]:
        return self.current.goals

    def on_reset(self, mask: np.ndarray, info: dict[str, Any]) -> None:
        for i in np.flatnonzero(mask):
            self.rule.reset(int(i))
        self.current.update(mask, info)

    def on_step(self, transition: dict[str, Any]) -> np.ndarray:
        info = transition["info"]
        ended = transition["terminated"] | transition["truncated"]
        achieved = [[g for g in _texts(info, "transition", i).split(", ") if g] for i in range(len(ended))]
        reward = self.rule.rewards(achieved, self.goals)  # goals suggested for the states before the step
        self.current.update(~ended, info)  # an ended env's next goals come with its next episode's first state (on_reset)
        self.steps += len(ended)
        return self.coef * reward

    def metrics(self) -> dict[str, float]:
        rule = self.rule
        out = {"goals/suggested_per_step": rule.goals_suggested / max(self.steps, 1),
               "goals/achieved": float(rule.goals_achieved)}
        out.update({f"goals/achieved/{g.replace(' ', '_')}": float(n) for g, n in rule.achieved_counts.items()})
        stats = getattr(self.suggester, "stats", None)
        if stats is not None:
            out.update({f"goals/llm_{k}": float(v) for k, v in stats().items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {"steps": self.steps, "suggested": rule.goals_suggested, "achieved": rule.goals_achieved,
                "achieved_counts": dict(rule.achieved_counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.rule.goals_suggested = int(state["steps"]), int(state["suggested"])
        self.rule.goals_achieved, self.rule.achieved_counts = int(state["achieved"]), Counter(state["achieved_counts"])


class RNDReward:
    """RND's novelty of each step's next observation, its predictor trained on those observations as they come."""

    def __init__(self, rnd: Any) -> None:
        self.rnd = rnd
        self.last_loss = float("nan")
        self.last_reward = float("nan")

    def on_reset(self, mask: np.ndarray, info: dict[str, Any]) -> None:
        pass

    def on_step(self, transition: dict[str, Any]) -> np.ndarray:
        key = self.rnd.obs_key
        if key not in transition["next_obs"]:
            raise ToolkitError(f"intrinsic.obs_key={key!r}: the env's observations are {sorted(transition['next_obs'])}")
        obs = torch.as_tensor(np.asarray(transition["next_obs"][key]))
        if obs.dim() == 4 and obs.shape[-1] in (1, 3):  # HWC frames -> CHW
            obs = obs.permute(0, 3, 1, 2)
        reward = self.rnd.reward(obs).cpu().numpy().astype(np.float64)
        self.last_loss = float(self.rnd.update(obs))
        self.last_reward = float(reward.mean())
        return self.rnd.coef * reward

    def metrics(self) -> dict[str, float]:
        return {"rnd/reward": self.last_reward, "rnd/predictor_loss": self.last_loss}

    def state_dict(self) -> dict[str, Any]:
        return self.rnd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rnd.load_state_dict(state)
