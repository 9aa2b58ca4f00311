"""Instruction relabeling as in SPRINT (Zhang et al., 2023): more training samples from the same episodes.

An episode of a composite mission ("go to the red ball, then open the door") records its sub-skill
segments in its ``segments`` attribute: a JSON list of ``{"start", "end", "instruction"}``, where
``end`` is the step whose action completed that sub-instruction (inclusive) and the next segment starts
at ``end + 1``. A training span is a run of steps ``[start, stop)`` of one episode with one instruction:

- ``original``: the whole episode with its own mission, rewards and dones as recorded;
- ``primitive``: every segment with its own sub-instruction;
- ``aggregate``: every run of 2..``max_segments`` consecutive segments, with the sub-instructions joined
  into one (``JoinInstructions`` by default; any ``Summarizer``, e.g. a language model, can replace it);
- ``chain`` (cross-trajectory chaining, for offline RL): a segment A of one episode is chained to a segment
  B of another episode whose first state matches the state A ends in; the span is A's steps with the
  joined instruction "A, then B", and the reward of A's last step is not 1 but the critic's value of B's
  instruction at the state A ends in (``bootstrap``; IQL computes it with its value network).

Relabeled spans are rewarded 1 on their last step and 0 elsewhere, and are done on their last step.
Windows never cross a span's edges (they are clamped and padded there, as at an episode's edges).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from toolkit.errors import ToolkitError

RELABEL_MODES = ("primitive", "aggregate", "chain")


class Summarizer(Protocol):
    """Turns consecutive sub-instructions into one instruction (a rule, or a language model)."""

    def __call__(self, instructions: list[str]) -> str: ...


class JoinInstructions:
    """Rule-based aggregation in BabyAI's own grammar: ``"a, then b, then c"``."""

    def __init__(self, separator: str = ", then ") -> None:
        self.separator = separator

    def __call__(self, instructions: list[str]) -> str:
        return self.separator.join(instructions)


@dataclass(frozen=True)
class Span:
    episode: int  # index into the dataset's episode list
    start: int
    stop: int  # exclusive
    instruction: str | None
    relabeled: bool  # reward 1 / done on the last step instead of the recorded ones
    bootstrap: str | None = None  # chained: the last step's reward is the critic's value of this instruction


def episode_clauses(attrs) -> list[str]:
    """An episode's mission clauses: its ``sub_instructions`` attribute, else its segments' instructions,
    else its instruction alone."""
    if "sub_instructions" in attrs:
        return list(json.loads(attrs["sub_instructions"]))
    if "segments" in attrs:
        return [s["instruction"] for s in json.loads(attrs["segments"])]
    return [str(attrs["instruction"])] if "instruction" in attrs else []


def instruction_summary(f, episodes: list[str]) -> dict | None:
    """Missions, clauses and the longest chain (in clauses) among ``episodes``; None without instructions."""
    missions, clauses, longest = set(), set(), 0
    for name in episodes:
        attrs = f["data"][name].attrs
        if "instruction" not in attrs:
            return None
        missions.add(str(attrs["instruction"]))
        parts = episode_clauses(attrs)
        clauses.update(parts)
        longest = max(longest, len(parts))
    return {"missions": sorted(missions), "clauses": sorted(clauses), "max_clauses": longest} if episodes else None


def read_segments(attrs, where: str) -> list[dict]:
    """An episode's ``segments`` attribute, checked: consecutive, inside the episode, with instructions."""
    if "segments" not in attrs:
        return []
    try:
        segments = json.loads(attrs["segments"])
    except (TypeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"{where}: attribute 'segments' is not JSON ({e})") from None
    length, start = int(attrs["num_samples"]), 0
    for s in segments:
        if s.get("start") != start or not start <= s.get("end", -1) < length or not s.get("instruction"):
            raise ToolkitError(f"{where}: bad segment {s} (segments must be consecutive, inside the episode's "
                               f"{length} steps, each with an instruction)")
        start = s["end"] + 1
    return segments


def episode_spans(episode: int, length: int, instruction: str | None, segments: list[dict], modes: list[str],
                  keep_original: bool = True, max_segments: int = 3, summarize: Summarizer | None = None) -> list[Span]:
    """The training spans of one episode for the relabel ``modes`` (see the module docstring; the
    datamodule checks the modes against ``RELABEL_MODES``)."""
    summarize = summarize or JoinInstructions()
    spans = [Span(episode, 0, length, instruction, False)] if keep_original else []
    if "primitive" in modes:
        spans += [Span(episode, s["start"], s["end"] + 1, s["instruction"], True) for s in segments]
    if "aggregate" in modes:
        for n in range(2, max_segments + 1):
            for i in range(len(segments) - n + 1):
                run = segments[i:i + n]
                if n == len(segments) and keep_original and run[-1]["end"] == length - 1:
                    continue  # the whole mission: the original span already covers it
                spans.append(Span(episode, run[0]["start"], run[-1]["end"] + 1,
                                  summarize([s["instruction"] for s in run]), True))
    return spans


def chain_spans(segments: list[tuple[int, dict]], first_states: np.ndarray, end_states: np.ndarray,
                rng: np.random.Generator, per_segment: int = 1, tolerance: float | None = 0.0,
                summarize: Summarizer | None = None) -> list[Span]:
    """Cross-trajectory chains: ``segments`` are ``(episode, segment)`` pairs, ``first_states[k]`` the state
    at segment k's first step and ``end_states[k]`` the state segment k ends in (after its last action).
    Segment A is chained to up to ``per_segment`` segments B of *other* episodes, drawn at random among
    those whose first state is within ``tolerance`` (max abs difference) of A's end state
    (``tolerance=None``: any segment, as SPRINT chains)."""
    summarize = summarize or JoinInstructions()
    episode = np.array([e for e, _ in segments])
    spans = []
    for a, (ep_a, seg_a) in enumerate(segments):
        ok = episode != ep_a
        if tolerance is not None:
            ok &= np.abs(first_states - end_states[a]).max(axis=1) <= tolerance
        candidates = np.flatnonzero(ok)
        for b in rng.choice(candidates, size=min(per_segment, len(candidates)), replace=False):
            seg_b = segments[b][1]
            spans.append(Span(ep_a, seg_a["start"], seg_a["end"] + 1,
                              summarize([seg_a["instruction"], seg_b["instruction"]]), True,
                              bootstrap=seg_b["instruction"]))
    return spans


def spans_array(spans: list[Span], instructions: list[str]) -> np.ndarray:
    """``[S, 6]`` int64: episode, start, stop, instruction index in ``instructions`` (-1: none), relabeled,
    bootstrap instruction index (-1: none)."""
    index = {text: i for i, text in enumerate(instructions)}
    rows = [(s.episode, s.start, s.stop, index[s.instruction] if s.instruction else -1, int(s.relabeled),
             index[s.bootstrap] if s.bootstrap else -1) for s in spans]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 6)
