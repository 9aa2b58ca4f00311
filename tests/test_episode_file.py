"""Episode files: layout, clear errors on bad files, atomic appends, interrupted collection."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from gdict import GDict
from toolkit.collect import collect, existing_episodes
from toolkit.datamodules.episode_file import EpisodeWriter, episode_length, episode_names, open_episode_file, split_masks
from toolkit.datamodules.windows import WindowDataset
from toolkit.errors import ToolkitError

from conftest import ROOT, TINY_ENV


def test_collected_file_has_the_robomimic_layout(tiny_file):
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
        assert names == ["demo_0", "demo_1", "demo_2"]
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_name"] == "drawer-open-v3" and env_args["type"] == "metaworld"
        total = 0
        for n in names:
            g = f["data"][n]
            length = int(g.attrs["num_samples"])
            total += length
            assert g["obs/rgb_corner4"].shape == (length, 32, 32, 3) and g["obs/rgb_corner4"].dtype == np.uint8
            assert g["obs/rgb_corner4"].chunks == (1, 32, 32, 3)
            assert g["obs/state"].shape == (length, 4) and g["actions"].shape == (length, 4)
            assert g["dones"][-1] == 1 and g["dones"][:-1].sum() == 0
            assert g["rewards"].shape == (length,)
            assert g.attrs["source"] == "expert"
        assert int(f["data"].attrs["total"]) == total
        assert [m.decode() for m in f["mask/valid"][()]] == ["demo_1"]
        assert [m.decode() for m in f["mask/train"][()]] == ["demo_0", "demo_2"]


def test_split_is_stable_as_the_file_grows():
    names = [f"demo_{i}" for i in range(35)]
    for n in range(2, 35):
        small = split_masks(names[:n])
        assert set(small["valid"]) <= set(split_masks(names)["valid"])
        assert small["valid"] and not set(small["valid"]) & set(small["train"])


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ToolkitError, match="nothere.hdf5 does not exist"):
        open_episode_file(tmp_path / "nothere.hdf5")
    bad = tmp_path / "corrupt.hdf5"
    bad.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(ToolkitError, match="corrupt.hdf5 is not a readable HDF5 file"):
        open_episode_file(bad)


def test_mismatched_episode_lengths_are_named(tiny_file, tmp_path):
    path = tmp_path / "broken.hdf5"
    shutil.copy(tiny_file, path)
    with h5py.File(path, "a") as f:
        actions = f["data/demo_2/actions"][()]
        del f["data/demo_2/actions"]
        f["data/demo_2/actions"] = actions[:-3]
    with h5py.File(path) as f:
        episode_length(f, "demo_0")
        with pytest.raises(ToolkitError, match=r"episode demo_2 has mismatched lengths.*actions=9"):
            episode_length(f, "demo_2")
    with pytest.raises(ToolkitError, match="broken.hdf5: episode demo_2"):
        WindowDataset(path, ["demo_0", "demo_2"], ["state"], 2, 1)


def test_writer_refuses_episodes_of_another_env(tiny_file, tmp_path):
    path = tmp_path / "f.hdf5"
    shutil.copy(tiny_file, path)
    with pytest.raises(ToolkitError, match="another environment"):
        EpisodeWriter(path, {"env_name": "door-open-v3", "type": "metaworld", "env_kwargs": {}})


def test_append_keeps_earlier_episodes(tmp_path):
    path = tmp_path / "f.hdf5"
    writer = EpisodeWriter(path, {"env_name": "x", "type": "t", "env_kwargs": {}})
    for n in (3, 5):
        ep = GDict({"obs": {"state": np.ones((n, 2), np.float32)}, "actions": np.zeros((n, 1), np.float32),
                    "rewards": np.zeros(n, np.float32), "dones": np.eye(1, n, n - 1, dtype=np.uint8)[0]})
        writer.append(ep, {"success": True})
    assert existing_episodes(path)[0] == 2
    with h5py.File(path) as f:
        assert [episode_length(f, n) for n in episode_names(f)] == [3, 5] and f["data"].attrs["total"] == 8


def test_collection_resumes_up_to_the_requested_count(tmp_path):
    path = tmp_path / "grow.hdf5"
    collect(TINY_ENV, path, num_episodes=1, num_envs=1, only_success=False, progress=False)
    with h5py.File(path) as f:
        first = f["data/demo_0/obs/rgb_corner4"][()]
    collect(TINY_ENV, path, num_episodes=3, num_envs=1, only_success=False, progress=False)
    with h5py.File(path) as f:
        assert episode_names(f) == ["demo_0", "demo_1", "demo_2"]
        np.testing.assert_array_equal(f["data/demo_0/obs/rgb_corner4"][()], first)
        assert [int(f["data"][n].attrs["seed"]) for n in episode_names(f)] == [0, 1, 2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_collection_leaves_a_readable_file(tmp_path, sig):
    path = tmp_path / "interrupted.hdf5"
    script = (f"from toolkit.collect import collect; import conftest; "
              f"collect(conftest.TINY_ENV | {{'max_episode_steps': 40}}, {str(path)!r}, 500, num_envs=1, only_success=False)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT / "tests", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while existing_episodes_safe(path) < 3 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    count, _ = existing_episodes(path)
    assert count >= 3
    with h5py.File(path) as f:
        for n in episode_names(f):
            episode_length(f, n)
            assert f["data"][n]["obs/rgb_corner4"][()].shape[0] == f["data"][n].attrs["num_samples"]


def existing_episodes_safe(path: Path) -> int:
    """Episode count while another process may be writing (it holds the file only briefly)."""
    try:
        return existing_episodes(path)[0]
    except (ToolkitError, OSError, KeyError):
        return 0


def test_mixed_quality_file_records_each_source(tmp_path):
    """The recipe of the README: expert episodes, then noisy ones, in one file."""
    path = tmp_path / "mixed.hdf5"
    collect(TINY_ENV, path, num_episodes=1, num_envs=1, only_success=False, progress=False)
    collect(TINY_ENV, path, num_episodes=3, num_envs=1, only_success=False, progress=False,
            action_noise=0.5, epsilon=0.3)
    collect(TINY_ENV, path, num_episodes=4, num_envs=1, only_success=False, progress=False, policy="random")
    with h5py.File(path) as f:
        sources = [f["data"][n].attrs["source"] for n in episode_names(f)]
        noisy = f["data/demo_1/actions"][()]
        seeds = [int(f["data"][n].attrs["seed"]) for n in episode_names(f)]
    assert sources == ["expert", "expert+noise(std=0.5,epsilon=0.3)", "expert+noise(std=0.5,epsilon=0.3)", "random"]
    assert len(set(seeds)) == 4  # every episode at a fresh position
    assert (np.abs(noisy) <= 1.0).all() and len(np.unique(noisy[:, 3])) > 1  # the expert's gripper is constant
    with pytest.raises(ToolkitError, match="collect.policy='scripted'"):
        collect(TINY_ENV, path, num_episodes=5, policy="scripted")
