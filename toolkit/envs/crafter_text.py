"""Text for ELLM-style goal suggestion on Crafter (Du et al. 2023, "Guiding Pretraining in RL with LLMs"):
state captions, transition captions (the goals a step achieved), goal strings and the oracle suggester.

A goal string is a Crafter achievement name with spaces ("collect wood", "place table", "wake up"). Names,
item order and recipes are read from crafter's own data.yaml (``crafter.constants``), never restated here.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from crafter import constants

from toolkit.errors import ToolkitError

ACHIEVEMENTS: tuple[str, ...] = tuple(constants.achievements)  # crafter's order: collect_coal ... wake_up
ITEMS: tuple[str, ...] = tuple(constants.items)  # inventory order: health, food, drink, energy, sapling, ...
VITALS: dict[str, str] = {"health": "hurt", "food": "hungry", "drink": "thirsty", "energy": "sleepy"}
# A vital at or below this (of crafter's max 9) is reported ("You feel thirsty") and, for energy, makes the
# oracle suggest "wake up": at 0 the player starts losing health, so a third of the max leaves time to act.
LOW_VITAL = 3
# Achievements crafter codes in objects.Player (not data.yaml): the object that must be in view.
_TARGET_OBJECT = {"eat_cow": "cow", "defeat_zombie": "zombie", "defeat_skeleton": "skeleton",
                  # The semantic map does not tell a ripe plant from a sapling: any plant in view counts.
                  "eat_plant": "plant"}


# --- goal strings ---------------------------------------------------------------------------------
def goal_text(achievement: str) -> str:
    """``collect_wood`` -> ``collect wood``; an unknown achievement -> ToolkitError listing the valid ones."""
    if achievement not in ACHIEVEMENTS:
        raise ToolkitError(f"{achievement!r} is not a Crafter achievement; valid: {', '.join(ACHIEVEMENTS)}")
    return achievement.replace("_", " ")


def achievement_of(goal: str) -> str:
    """``collect wood`` -> ``collect_wood`` (the inverse of goal_text); an unknown goal -> ToolkitError."""
    name = goal.strip().replace(" ", "_")
    if name not in ACHIEVEMENTS:
        valid = ", ".join(goal_text(a) for a in ACHIEVEMENTS)
        raise ToolkitError(f"goal {goal!r} is not a Crafter goal string; valid: {valid}")
    return name


# --- captions -------------------------------------------------------------------------------------
def semantic_names(env: Any) -> list[str | None]:
    """Name of every id of a ``crafter.Env``'s semantic map (``info["semantic"]``), indexed by id: its
    materials (id 0: None, outside the world) then its object classes, lower-cased (player, cow, ...)."""
    view = env._sem_view  # crafter builds the id table here; reading it keeps us in step with the package
    names: list[str | None] = [None] * (max(view._obj_ids.values()) + 1)
    for material, i in view._mat_ids.items():
        names[i] = material
    for cls, i in view._obj_ids.items():
        names[i] = cls.__name__.lower()
    return names


def nearby_names(semantic: np.ndarray, player_pos: Sequence[int], grid: Sequence[int],
                 names: Sequence[str | None]) -> list[str]:
    """Distinct material and object names in the local view (``grid`` = crafter's local view size in
    tiles, x by y, centred on the player the way crafter draws it), the player excluded, in id order."""
    grid = np.asarray(grid)
    lo = np.asarray(player_pos) - grid // 2
    hi = lo + grid
    clip_lo, clip_hi = np.maximum(lo, 0), np.minimum(hi, semantic.shape)  # tiles outside the world: none
    window = semantic[clip_lo[0]:clip_hi[0], clip_lo[1]:clip_hi[1]]
    return [names[i] for i in np.unique(window).tolist() if names[i] not in (None, "player")]


def _items_text(inventory: Mapping[str, int]) -> str:
    have = [f"{int(inventory[k])} {k.replace('_', ' ')}" for k in ITEMS
            if k not in VITALS and inventory.get(k, 0) > 0]
    return ", ".join(have) if have else "nothing"


def state_caption(nearby: Sequence[str], inventory: Mapping[str, int], sleeping: bool = False) -> str:
    """E.g. "You see grass, tree, cow. You have 2 wood, 1 sapling. You feel thirsty." The same state
    always gives the same string (``nearby`` in id order, items in crafter's order): it is a cache key."""
    parts = [f"You see {', '.join(nearby) if nearby else 'nothing'}.", f"You have {_items_text(inventory)}."]
    low = [feeling for vital, feeling in VITALS.items() if vital in inventory and inventory[vital] <= LOW_VITAL]
    if low:
        parts.append(f"You feel {', '.join(low)}.")
    if sleeping:
        parts.append("You are sleeping.")
    return " ".join(parts)


def transition_caption(prev_achievement_counts: Mapping[str, int],
                       achievement_counts: Mapping[str, int]) -> list[str]:
    """Goal strings of the achievements whose count rose this step (crafter's ``info["achievements"]``
    holds counts), in crafter's order, e.g. ["collect wood"]."""
    return [goal_text(a) for a in ACHIEVEMENTS
            if achievement_counts.get(a, 0) > prev_achievement_counts.get(a, 0)]


def goal_context(inventory: Mapping[str, int], nearby: Sequence[str], unlocked: Iterable[str],
                 sleeping: bool = False) -> str:
    """The JSON string the env writes into ``info["goal_context"]`` (what suggesters read)."""
    return json.dumps({"inventory": {k: int(inventory[k]) for k in ITEMS}, "nearby": list(nearby),
                       "achievements": [a for a in ACHIEVEMENTS if a in set(unlocked)], "sleeping": bool(sleeping)})


# --- oracle ---------------------------------------------------------------------------------------
def _has(inventory: Mapping[str, int], needs: Mapping[str, int]) -> bool:
    return all(inventory.get(k, 0) >= v for k, v in needs.items())


def _achievable(achievement: str, inventory: Mapping[str, int], nearby: set[str], sleeping: bool) -> bool:
    """Whether ``achievement``'s prerequisites hold, from crafter's data.yaml recipes. "Nearby" is the
    local view, looser than crafter's own checks (the faced tile; make: the 3x3 around the player)."""
    verb, _, what = achievement.partition("_")
    if verb == "collect":
        return any(what in rule["receive"] and material in nearby and _has(inventory, rule["require"])
                   for material, rule in constants.collect.items())
    if verb == "place":
        rule = constants.place[what]
        return _has(inventory, rule["uses"]) and bool(nearby & set(rule["where"]))
    if verb == "make":
        rule = constants.make[what]
        return _has(inventory, rule["uses"]) and set(rule["nearby"]) <= nearby
    if achievement == "wake_up":
        return sleeping or ("energy" in inventory and inventory["energy"] <= LOW_VITAL)
    return _TARGET_OBJECT[achievement] in nearby


class OracleGoals:
    """ELLM's oracle suggester: the goals whose prerequisites the current inventory and view satisfy.

    ``exclude_unlocked``: drop achievements already unlocked this episode (ELLM's oracle suggests new
    ones only). ``goals``: restrict the vocabulary to these goal strings (None: all 22)."""

    def __init__(self, exclude_unlocked: bool = True, goals: list[str] | None = None) -> None:
        self.exclude_unlocked = exclude_unlocked
        allowed = set(ACHIEVEMENTS) if goals is None else {achievement_of(g) for g in goals}
        self.achievements = [a for a in ACHIEVEMENTS if a in allowed]

    def check(self) -> None:
        """Nothing to start (the LLM suggester checks its server here)."""

    def suggest(self, caption: str, context: Mapping[str, Any]) -> list[str]:
        """Goal strings for the state ``context`` (the parsed ``info["goal_context"]``), in crafter's
        order; ``caption`` is unused (the oracle reads the structured context)."""
        inventory = context.get("inventory", {})
        nearby = set(context.get("nearby", ()))
        unlocked = set(context.get("achievements", ())) if self.exclude_unlocked else set()
        sleeping = bool(context.get("sleeping", False))
        return [goal_text(a) for a in self.achievements
                if a not in unlocked and _achievable(a, inventory, nearby, sleeping)]
