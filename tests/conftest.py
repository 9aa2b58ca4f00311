"""Shared fixtures: a small real episode file collected from Meta-World, and a runner for train.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Loading triton (via lightning) after a MuJoCo/EGL context exists segfaults: load it before any test makes an env.
import lightning  # noqa: F401,E402

from toolkit.config import register_resolvers

register_resolvers()  # configs composed by the tests name converted files with ${source_name:...}

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOOLKIT_OFFLINE", "1")  # encoder.weights=auto never downloads in the tests (but the download tests)

COMPARE_PYTHON = ROOT / ".venv-compare" / "bin" / "python"


def compare_python(what: str) -> Path:
    """.venv-compare's python (``make compare-venv``: lerobot, robomimic and Stable-Baselines3 beside .venv), for
    tests that check against ``what`` in its own code: skip without it, fail without it on CI."""
    if not COMPARE_PYTHON.exists():
        message = (f"{COMPARE_PYTHON} is missing: these tests run {what} from .venv-compare; build it with "
                   f"`make compare-venv` (bench/compare_venv.sh)")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so {what} must be here: {message}")
        pytest.skip(message)
    return COMPARE_PYTHON


TINY_ENV = {"_target_": "toolkit.envs.metaworld.MetaWorldEnv", "task": "drawer-open-v3",
            "image_size": 32, "max_episode_steps": 12}


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Path:
    """3 real drawer-open episodes of 12 steps at 32 px (the expert does not finish in 12 steps)."""
    from toolkit.collect import collect

    path = tmp_path_factory.mktemp("data") / "tiny.hdf5"
    collect(TINY_ENV, path, num_episodes=3, num_envs=1, only_success=False, progress=False)
    return path


def run_train(*overrides: str, root: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python train.py debug=fast` in a subprocess, with data and logs under ``root``."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m etc. before the overrides
    cmd = [sys.executable, str(ROOT / "train.py"), *flags, "debug=fast", f"paths.root_dir={root}",
           *[o for o in overrides if not o.startswith("-")]]
    # tests/ on the path: configs may name test-only classes (e.g. self_killing_env.SelfKillingMetaWorldEnv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sample_twice(policy, states) -> "np.ndarray":
    """``policy.act`` on the same states in two evaluations (``reset()`` before each) with sampling on: the same
    draws both times, and torch's global RNG (training's) untouched. Returns the draws."""
    import numpy as np
    import torch

    def evaluate():
        policy.reset()
        return policy.act({"state": states})

    before = torch.get_rng_state()
    first, second = evaluate(), evaluate()
    assert torch.equal(torch.get_rng_state(), before)
    np.testing.assert_array_equal(first, second)
    return first

