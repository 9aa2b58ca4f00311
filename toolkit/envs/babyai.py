"""BabyAI (minigrid) adapter: a full-view RGB frame of the grid, discrete actions, the mission string as
the instruction, the BabyAI bot as the expert, and layouts/missions that are a pure function of the seed."""

from __future__ import annotations

import contextlib
import difflib
import io
import math
import sys
from typing import Any

import gymnasium as gym
import numpy as np

from toolkit.envs.base import RobotEnv, discrete_action_index
from toolkit.errors import ToolkitError

CAMERA = "top"  # the whole grid seen from above; the obs key is rgb_top like every rgb_<camera>


def level_ids() -> list[str]:
    """Gymnasium ids of every registered BabyAI level (``BabyAI-GoToLocal-v0``, ...)."""
    import minigrid  # noqa: F401  (registers the BabyAI-* ids)

    return sorted(k for k in gym.registry if k.startswith("BabyAI-"))


def level_id(level: str) -> str:
    """``GoToLocal`` or ``BabyAI-GoToLocal-v0`` -> ``BabyAI-GoToLocal-v0``; unknown -> ToolkitError."""
    ids = level_ids()
    short = {k.removeprefix("BabyAI-").rsplit("-v", 1)[0]: k for k in ids}
    if level in ids:
        return level
    if level in short:
        return short[level]
    close = difflib.get_close_matches(level.removeprefix("BabyAI-").rsplit("-v", 1)[0], list(short), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ToolkitError(f"env.level={level!r} is not a BabyAI level.{hint} Available: {', '.join(sorted(short))}")


def _leaves(instr, flag=None) -> list[tuple[Any, Any]]:
    """The action clauses of a mission's instruction tree, each with a function telling whether it is done.

    minigrid's verifier keeps the state in the sequencing nodes (``BeforeInstr``/``AfterInstr``/``AndInstr``:
    ``a_done``/``b_done`` become "success" when that side is done); a lone clause is done when the
    mission is. Returned in the mission's textual order."""
    from minigrid.envs.babyai.core.verifier import SeqInstr

    if isinstance(instr, SeqInstr):
        return (_leaves(instr.instr_a, lambda: instr.a_done == "success")
                + _leaves(instr.instr_b, lambda: instr.b_done == "success"))
    return [(instr, flag)]


def _symbolic_sizes() -> tuple[int, int, int]:
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

    return len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX)


VIEW = 7  # minigrid's egocentric view: 7x7 cells
SYMBOLIC_DIM = VIEW * VIEW * sum(_symbolic_sizes())  # 7 x 7 x (11 objects + 6 colours + 3 door states) = 980


def symbolic_one_hot(grid: np.ndarray) -> np.ndarray:
    """minigrid's symbolic view ``[7, 7, 3]`` (object, colour, state indices) as one float32 vector of one-hots,
    cell by cell (each cell: object one-hot, colour one-hot, state one-hot). A linear layer on it is a learned
    embedding per cell and value summed over the view: BabyAI's bag-of-words input, with positions."""
    sizes = _symbolic_sizes()
    parts = [np.eye(n, dtype=np.float32)[np.asarray(grid[..., c], np.int64)] for c, n in enumerate(sizes)]
    return np.concatenate(parts, axis=-1).reshape(-1)


@contextlib.contextmanager
def _quiet_level_generation():
    """Level generation prints one "Sampling rejected: ..." line per rejected layout; drop those and
    pass any other printed line on, also when generation raises."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        other = [line for line in captured.getvalue().splitlines() if not line.startswith("Sampling rejected")]
        if other:
            print("\n".join(other), file=sys.stdout)


class BabyAIEnv(RobotEnv):
    """A BabyAI level with the full grid rendered from above.

    Observation: ``rgb_top`` (image_size x image_size x 3 uint8, the whole grid), ``state`` = one-hot of
    the agent's direction (4, float32); with ``symbolic`` also minigrid's 7x7x3 egocentric symbolic view,
    as ``grid`` (uint8, as minigrid gives it) and one-hot in ``state`` (``symbolic_one_hot``: every cell's
    object, colour and door state, 980 more entries), so every policy sees it through its state token. The instruction is ``instruction()`` (the mission string), not an obs key:
    vector envs batch only arrays.

    Actions: ``Discrete(7)`` (left, right, forward, pickup, drop, toggle, done). ``step`` takes an int,
    a numpy integer, or a [1] array holding the index as a float (how policies and episode files
    store discrete actions).
    """

    def __init__(
        self,
        level: str = "GoToLocal",
        image_size: int = 64,
        max_episode_steps: int | None = None,
        symbolic: bool = False,
        terminate_on_success: bool = True,
    ) -> None:
        # 0 until the first reset when the level sets its own limit (it depends on the generated maze).
        super().__init__(max_episode_steps or 0, terminate_on_success)
        self.level = level_id(level)
        self.image_size, self.symbolic = image_size, symbolic
        self._max_steps_arg = max_episode_steps
        self.cameras = (CAMERA,)
        # The level's own limit is passed in too, so its reward (1 - 0.9 t / max_steps) uses our limit.
        kwargs = {} if max_episode_steps is None else {"max_steps": int(max_episode_steps)}
        self._env = gym.make(self.level, **kwargs).unwrapped  # no wrappers: we own the episode bookkeeping
        self._bot = None
        self._expert_cache: np.ndarray | None = None
        self._expert_used = False
        self._bot_gave_up = False
        self._last_action: int | None = None
        self._mission: str | None = None
        self._raw_obs: dict[str, Any] | None = None
        self._clauses: list[tuple[Any, Any]] = []
        self._segments: list[dict[str, Any]] = []
        self._clause_done: list[bool] = []
        self._clause_text: list[str] = []

        self.action_space = gym.spaces.Discrete(self._env.action_space.n)
        spaces = {
            f"rgb_{CAMERA}": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": gym.spaces.Box(0.0, 1.0, (4 + (SYMBOLIC_DIM if symbolic else 0),), np.float32),
        }
        if symbolic:
            view = self._env.observation_space["image"]
            spaces["grid"] = gym.spaces.Box(0, 255, view.shape, np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    # --- observation ----------------------------------------------------------------------------
    def _render(self) -> np.ndarray:
        # The smallest tile that covers image_size, then a box-filter downscale when the grid is larger.
        tile = max(1, math.ceil(self.image_size / max(self._env.width, self._env.height)))
        frame = self._env.get_frame(highlight=True, tile_size=tile)
        if frame.shape[:2] != (self.image_size, self.image_size):
            from PIL import Image

            frame = np.asarray(Image.fromarray(frame).resize((self.image_size, self.image_size), Image.Resampling.BOX))
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _obs(self) -> dict[str, Any]:
        state = np.zeros(4, np.float32)
        state[int(self._env.agent_dir)] = 1.0
        obs = {f"rgb_{CAMERA}": self._render(), "state": state}
        if self.symbolic:
            obs["grid"] = np.asarray(self._raw_obs["image"], dtype=np.uint8)
            obs["state"] = np.concatenate([state, symbolic_one_hot(obs["grid"])])
        return obs

    def _action_index(self, action: Any) -> int:
        return discrete_action_index(action, int(self.action_space.n), "BabyAI")

    # --- RobotEnv -------------------------------------------------------------------------------
    def _reset(self, seed: int | None) -> dict[str, Any]:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        with _quiet_level_generation():
            self._raw_obs, _ = self._env.reset(seed=seed)
        if self._max_steps_arg is None:
            self.max_episode_steps = int(self._env.max_steps)  # set by the level at each reset
        self._mission = str(self._env.mission)
        self._bot = BabyAIBot(self._env)  # parses the freshly generated mission
        self._expert_cache, self._expert_used, self._bot_gave_up = None, False, False
        self._last_action = None
        self._clauses = _leaves(self._env.instrs)
        # read now: surface() matches objects against the current grid, and a picked-up object is not on it
        self._clause_text = [clause.surface(self._env) for clause, _ in self._clauses]
        self._clause_done, self._segments = [False] * len(self._clauses), []
        return self._obs()

    def _step(self, action: np.ndarray):
        a = self._action_index(action)
        # The bot must see every state once it is in use: replan here if nobody asked it this step.
        if self._expert_used and self._expert_cache is None:
            self.expert_action()
        self._raw_obs, reward, terminated, _, _ = self._env.step(a)
        self._last_action, self._expert_cache = a, None
        # The level's verifier ends the episode: with a reward on success, with 0 on failure (the strict
        # *Debug levels: a wrong object picked up, a wrong door opened).
        success = bool(terminated and reward > 0)
        self._record_segments(success)
        return self._obs(), float(reward), success, {"terminal": bool(terminated and not success)}

    def _record_segments(self, success: bool) -> None:
        """Close a segment at this step for every clause the verifier now counts as done."""
        done_now = [i for i, (_, flag) in enumerate(self._clauses)
                    if not self._clause_done[i] and (success if flag is None else flag())]
        if not done_now:
            return
        for i in done_now:
            self._clause_done[i] = True
        # clauses completed by the same action share one segment ("a and b")
        text = " and ".join(self._clause_text[i] for i in done_now)
        start = self._segments[-1]["end"] + 1 if self._segments else 0
        self._segments.append({"start": start, "end": self._t, "instruction": text})

    def segments(self) -> list[dict[str, Any]]:
        """Segments of the episode so far: one per completed clause of the mission, in completion order
        (``end``: the step whose action completed it, by the level's own verifier)."""
        return [dict(s) for s in self._segments]

    def sub_instructions(self) -> list[str]:
        """The mission's clauses in textual order, e.g. ["go to the red ball", "open the door"]."""
        return list(self._clause_text)

    def expert_action(self) -> np.ndarray:
        """The bot's action ``[index]`` float32; the same until the next step or reset."""
        if self._bot is None:
            raise ToolkitError("BabyAIEnv.expert_action() before reset(): reset the env first")
        if self._expert_cache is None:
            from minigrid.utils.baby_ai_bot import DisappearedBoxError

            self._expert_used = True
            action = self._env.actions.done
            if not self._bot_gave_up:
                # replan is told what was really executed (a learner's action in DAgger), not what it suggested.
                taken = None if self._last_action is None else self._env.actions(self._last_action)
                try:
                    action = self._bot.replan(taken)
                except DisappearedBoxError:
                    # Someone (a learner) opened a box: the bot deems the mission unsolvable and gives no more
                    # advice this episode. `done` is a no-op in these levels, the bot's own "nothing to do".
                    self._bot_gave_up = True
            self._expert_cache = np.array([int(action)], np.float32)
        return self._expert_cache.copy()

    def instruction(self) -> str | None:
        """The mission of the current episode, e.g. "go to the red ball"."""
        return self._mission

    def env_args(self) -> dict[str, Any]:
        return {
            "env_name": self.level,
            "type": "babyai",
            "env_kwargs": {"image_size": self.image_size, "max_episode_steps": self._max_steps_arg,
                           "symbolic": self.symbolic},
        }

    def close(self) -> None:
        self._env.close()
