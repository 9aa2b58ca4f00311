"""Meta-World (MuJoCo) adapter: one camera's RGB + proprioception, a scripted expert, and object
positions that are a pure function of the reset seed (so training and evaluation never share one)."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

# MuJoCo picks its GL backend at import time; there is no display here, so EGL (software llvmpipe).
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


import gymnasium as gym
import numpy as np

from toolkit.console import filter_unactionable_warnings
from toolkit.envs.base import RobotEnv
from toolkit.errors import ToolkitError

filter_unactionable_warnings()  # in simulator processes too (the scripted experts' gain warnings)
logging.getLogger("OpenGL").setLevel(logging.WARNING)  # "No OpenGL_accelerate module loaded"

CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")


def task_names() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def lift_first_action(raw_obs: np.ndarray, action: np.ndarray, clearance: float = 0.08) -> np.ndarray:
    """``env.expert=lift_first``: Meta-World's scripted action, except when the hand is not over the object (more
    than 2 cm away in x-y, the scripted policies' own tolerance) and lower than ``clearance`` above it: then it
    rises straight up to the policies' approach height (the object + 10 cm), gripper open, with their gain of 10.

    Why: the scripted policies move in a straight line to a point above the object, so from a hand low beside it
    (where a learner often leaves it: DAgger labels such states) they sweep the object over. Measured on
    pick-place-v3 (README, DAgger): after 25 steps of a BC policy, Meta-World's expert brought 9 of 20 episodes
    to success, this one 19 of 20. From the reset pose (hand high) both give the same actions."""
    hand, obj = raw_obs[0:3], raw_obs[4:7]
    if np.linalg.norm(hand[:2] - obj[:2]) <= 0.02 or hand[2] >= obj[2] + clearance:
        return action
    target = np.array([hand[0], hand[1], obj[2] + 0.1])
    return np.append(np.clip(10.0 * (target - hand), -1.0, 1.0), -1.0).astype(np.float32)


class MetaWorldEnv(RobotEnv):
    """A Meta-World v3 task seen through one camera.

    Observation: ``rgb_<camera>`` (image_size x image_size x 3, upright) and ``state`` =
    end-effector position (3) + gripper opening (1). The object/goal positions are not observed:
    the policy has to find them in the image.
    """

    def __init__(
        self,
        task: str = "drawer-open-v3",
        camera: str = "corner4",
        image_size: int = 64,
        max_episode_steps: int = 150,
        terminate_on_success: bool = True,
        reward: str = "dense",
        expert: str = "metaworld",
    ) -> None:
        super().__init__(max_episode_steps, terminate_on_success)
        if reward not in ("dense", "sparse"):
            raise ToolkitError(f"env.reward={reward!r}: choose dense (Meta-World's shaped reward) or sparse (1 on success)")
        if expert not in ("metaworld", "lift_first"):
            raise ToolkitError(f"env.expert={expert!r}: choose metaworld (Meta-World's scripted policy) or lift_first "
                               f"(the same, rising above the object first when the hand is low beside it)")
        self.reward, self.expert = reward, expert
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ALL_V3_ENVIRONMENTS:
            close = difflib.get_close_matches(task, ALL_V3_ENVIRONMENTS, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ToolkitError(
                f"env.task={task!r} is not a Meta-World v3 task.{hint} "
                f"Available: {', '.join(sorted(ALL_V3_ENVIRONMENTS))}"
            )
        if camera not in CAMERAS:
            raise ToolkitError(f"env.camera={camera!r} is not a Meta-World camera; use one of {CAMERAS}")
        self.task, self.camera, self.image_size = task, camera, image_size
        self.cameras = (camera,)
        self._env = ALL_V3_ENVIRONMENTS[task](
            render_mode="rgb_array", camera_name=camera, width=image_size, height=image_size
        )
        # What MT1's set_task does, minus its 50 pre-drawn positions: we set the position per reset.
        self._env._partially_observable = False
        del self._env.sawyer_observation_space  # cached_property, recomputed for the new observability
        self._env._set_task_called = True
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True  # draw from self._env.np_random, which _reset seeds
        self._env.max_path_length = 10**9  # our base class owns the time limit
        # Fast software rendering: no shadow map, no multisampling (set before the first render).
        self._env.model.vis.quality.shadowsize = 0
        self._env.model.vis.quality.offsamples = 0
        self._renderer_tuned = False
        self._expert = ENV_POLICY_MAP[task]()
        self._raw_obs: np.ndarray | None = None
        self._rng = np.random.default_rng()

        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.observation_space = gym.spaces.Dict(
            {
                f"rgb_{camera}": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
                "state": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
            }
        )

    def _render(self) -> np.ndarray:
        if not self._renderer_tuned:
            import mujoco

            viewer = self._env.mujoco_renderer._get_viewer("rgb_array")
            for flag in (mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX, mujoco.mjtRndFlag.mjRND_SHADOW):
                viewer.scn.flags[flag] = 0
            self._renderer_tuned = True
        # MuJoCo's offscreen buffer is bottom-up.
        return np.ascontiguousarray(self._env.render()[::-1])

    def _obs(self) -> dict[str, Any]:
        return {
            f"rgb_{self.camera}": self._render(),
            "state": self._raw_obs[:4].astype(np.float32),
        }

    def _reset(self, seed: int | None) -> dict[str, Any]:
        if seed is None:
            seed = int(self._rng.integers(2**31))
        # The task draws its object/goal vector from this generator, and draws again when it rejects one
        # (pick-place rejects an object within 0.15 of the goal): a frozen vector would loop there forever.
        self._env.np_random = np.random.default_rng(seed)
        self._raw_obs, _ = self._env.reset()
        return self._obs()

    def _step(self, action: np.ndarray):
        self._raw_obs, reward, _, _, info = self._env.step(action)
        success = bool(info["success"])
        return self._obs(), float(success) if self.reward == "sparse" else float(reward), success, {}

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action at the current state (``env.expert``, see ``lift_first_action``)."""
        action = np.clip(self._expert.get_action(self._raw_obs), -1.0, 1.0).astype(np.float32)
        if self.expert == "lift_first":
            return lift_first_action(self._raw_obs, action)
        return action

    def env_args(self) -> dict[str, Any]:
        return {
            "env_name": self.task,
            "type": "metaworld",
            "env_kwargs": {"camera": self.camera, "image_size": self.image_size,
                           "max_episode_steps": self.max_episode_steps,
                           # only when not the default, so files collected before the option stay valid
                           **({"reward": self.reward} if self.reward != "dense" else {}),
                           **({"expert": self.expert} if self.expert != "metaworld" else {})},
        }

    def close(self) -> None:
        self._env.close()
