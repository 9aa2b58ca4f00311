"""A run's data and env belong together: files of another env or dataset are refused in every order of
commands, and datasets without a matching simulator train without rollouts (env=none) or fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from conftest import TINY_ENV, run_train
from toolkit.config import source_name
from toolkit.data_env_checks import check_collected_file, rollout_mismatches
from toolkit.envs.vector import check_env
from toolkit.errors import ToolkitError


def summary_of(root: Path, task: str = "debug") -> dict:
    return json.loads(sorted(Path(root, "logs", task, "runs").glob("*/summary.json"))[-1].read_text())


@pytest.fixture(scope="module")
def lerobot_dir(tiny_file, tmp_path_factory) -> Path:
    """The tiny Meta-World episodes (32 px) as a LeRobot dataset: not the default env's 64 px camera."""
    from toolkit.formats.hdf5 import HDF5Reader
    from toolkit.formats.lerobot import write_lerobot

    reader = HDF5Reader(tiny_file)
    episodes = (reader.read_episode(n) for n in reader.episode_names())
    return write_lerobot(episodes, tmp_path_factory.mktemp("lerobot") / "tiny_ds", fps=10, robot_type="sim")


def test_a_file_of_another_env_is_refused(tiny_file):
    ours = check_env(TINY_ENV).env_args
    check_collected_file(tiny_file, ours)  # its own env: fine
    check_collected_file(tiny_file, {**ours, "env_kwargs": {**ours["env_kwargs"], "max_episode_steps": 99}})
    for other in ({**ours, "env_name": "door-open-v3"}, {**ours, "env_kwargs": {**ours["env_kwargs"], "image_size": 64}}):
        with pytest.raises(ToolkitError, match="holds episodes of another env") as e:
            check_collected_file(tiny_file, other)
        assert str(tiny_file) in str(e.value) and str(other) in str(e.value)


def test_a_converted_file_is_refused_where_collected_data_is_expected(lerobot_dir, tmp_path):
    from toolkit.convert import convert_source

    converted = tmp_path / "debug_drawer-open-v3_corner4_64px.hdf5"
    convert_source({"format": "lerobot", "path": str(lerobot_dir), "options": {}, "video": False}, converted, progress=False)
    with pytest.raises(ToolkitError, match=f"converted from {lerobot_dir}"):
        check_collected_file(converted, check_env(TINY_ENV).env_args)


def test_a_collected_file_is_never_stamped_as_converted(tiny_file, lerobot_dir, tmp_path):
    from toolkit.convert import convert_source

    collected = tmp_path / "collected.hdf5"
    shutil.copy(tiny_file, collected)
    before = collected.read_bytes()
    with pytest.raises(ToolkitError, match="not converted from a source"):
        convert_source({"format": "lerobot", "path": str(lerobot_dir), "options": {}, "video": False}, collected,
                       progress=False)
    assert collected.read_bytes() == before


def test_converted_file_names_are_unique_to_source_and_options(tmp_path):
    a = {"format": "lerobot", "path": str(tmp_path / "a" / "ds"), "options": {}, "video": True}
    names = {source_name(a), source_name({**a, "path": str(tmp_path / "b" / "ds")}),
             source_name({**a, "video": False}), source_name({**a, "options": {"state_key": "x"}}),
             source_name({**a, "format": "robomimic"})}
    assert len(names) == 5
    assert source_name(a).startswith("lerobot_ds_") and source_name(a) == source_name(dict(a))
    assert source_name(a) == source_name({**a, "options": {"video_backend": "pyav"}})  # same frames


def test_rollout_mismatches_name_both_sides():
    obs = gym.spaces.Dict({"rgb_corner4": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                           "state": gym.spaces.Box(-1, 1, (4,), np.float32)})
    act = gym.spaces.Box(-1, 1, (4,), np.float32)
    meta = {"rgb_keys": ["rgb_corner4"], "image_shape": {"rgb_corner4": [64, 64, 3]}, "state_dim": 4, "action_dim": 4}
    assert rollout_mismatches(meta, obs, act) == []
    other = {"rgb_keys": ["rgb_front"], "image_shape": {"rgb_front": [96, 96, 3]}, "state_dim": 6, "action_dim": 6}
    problems = rollout_mismatches(other, obs, act)
    assert len(problems) == 3
    assert "rgb_front" in problems[0] and "rgb_corner4" in problems[0]
    assert "dataset 6-d, env 4-d" in problems[1] and "dataset 6-d" in problems[2]


@pytest.mark.slow  # the unit tests above cover the names and the refusals; this is the command sequence
def test_debug_runs_on_different_data_never_share_a_file(lerobot_dir, tmp_path):
    """`debug=fast data=lerobot` then plain `debug=fast` in the same folder: each trains on its own data."""
    run_train("env=none", "data=lerobot", f"data.source.path={lerobot_dir}", root=tmp_path)
    converted = list((tmp_path / "data").glob("debug_lerobot_tiny_ds_*.hdf5"))
    assert len(converted) == 1
    assert not (tmp_path / "data" / "debug_drawer-open-v3_corner4_64px.hdf5").exists()


@pytest.mark.parametrize("switch", ["env=none", pytest.param("~callbacks.rollout", marks=pytest.mark.slow)])
def test_without_rollouts_checkpoints_follow_val_loss(switch, lerobot_dir, tmp_path):
    proc = run_train(switch, "data=lerobot", f"data.source.path={lerobot_dir}", root=tmp_path)
    s = summary_of(tmp_path)
    assert "rollout/success_rate" not in s and s["global_step"] == 4
    assert "valloss" in Path(s["best_checkpoint"]).name and Path(s["last_checkpoint"]).exists()
    assert "training without rollouts" in proc.stdout + proc.stderr


def test_dataset_that_does_not_fit_the_default_env_turns_rollouts_off(lerobot_dir, tmp_path):
    proc = run_train("data=lerobot", f"data.source.path={lerobot_dir}", root=tmp_path)
    out = proc.stdout + proc.stderr
    assert "does not fit env" in out and "(32, 32, 3)" in out and "(64, 64, 3)" in out
    s = summary_of(tmp_path)
    assert "rollout/success_rate" not in s and "valloss" in Path(s["best_checkpoint"]).name


def test_an_explicit_env_that_does_not_fit_is_an_error(lerobot_dir, tmp_path):
    proc = run_train("data=lerobot", f"data.source.path={lerobot_dir}", "env.image_size=48", root=tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "does not fit env" in err and "dataset (32, 32, 3), env (48, 48, 3)" in err and "env=none" in err
    assert "Traceback" not in err
