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
from hypothesis import given, settings
from hypothesis import strategies as st

from gdict import GDict
from toolkit.collect import collect, existing_episodes
from toolkit.datamodules.episode_file import (EpisodeWriter, check_next_obs, episode_length, episode_names, obs_group,
                                               open_episode_file, split_masks, toolkit_env_args)
from toolkit.datamodules.video import create_video_dataset, encode_video
from toolkit.formats.hdf5 import HDF5Reader
from toolkit.datamodules.windows import WindowDataset
from toolkit.errors import ToolkitError

from conftest import ROOT, TINY_ENV


def test_collected_file_has_the_robomimic_layout(tiny_file):
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
        assert names == ["demo_0", "demo_1", "demo_2"]
        env_args = json.loads(f["data"].attrs["env_args"])  # robomimic's env metadata: GYM_TYPE, ours under toolkit
        assert env_args == {"env_name": "drawer-open-v3", "type": 2, "toolkit": {"type": "metaworld"},
                            "env_kwargs": {"camera": "corner4", "image_size": 32, "max_episode_steps": 12}}
        assert toolkit_env_args(env_args)["type"] == "metaworld"
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
            for key in ("rgb_corner4", "state"):  # next_obs: obs shifted by one step, the last repeated, no copy
                nxt, obs = g[f"next_obs/{key}"], g[f"obs/{key}"][()]
                assert nxt.is_virtual and nxt.id.get_storage_size() == 0
                np.testing.assert_array_equal(nxt[()], np.concatenate([obs[1:], obs[-1:]]))
                np.testing.assert_array_equal(nxt[3:5], obs[4:6])
        assert int(f["data"].attrs["total"]) == total
        assert [m.decode() for m in f["mask/valid"][()]] == ["demo_1"]
        assert [m.decode() for m in f["mask/train"][()]] == ["demo_0", "demo_2"]


def test_split_is_stable_as_the_file_grows():
    names = [f"demo_{i}" for i in range(35)]
    for n in range(2, 35):
        small = split_masks(names[:n])
        assert set(small["valid"]) <= set(split_masks(names)["valid"])
        assert small["valid"] and not set(small["valid"]) & set(small["train"])


@settings(max_examples=15, deadline=None)
@given(reopen_at=st.lists(st.integers(0, 23), max_size=4), old_style_masks=st.booleans())
def test_appended_masks_equal_the_split_of_the_whole_file(tmp_path_factory, reopen_at, old_style_masks):
    """Masks extended one episode at a time, across writers (resumed collection) and from masks written whole
    (robomimic's split_train_val, files of earlier versions), are the split of the file's episodes."""
    path = tmp_path_factory.mktemp("masks") / "f.hdf5"
    args = {"env_name": "x", "type": "t", "env_kwargs": {}}
    writer, rng = EpisodeWriter(path, args), np.random.default_rng(0)
    for i in range(24):
        if i in reopen_at:
            writer = EpisodeWriter(path, args)
        if old_style_masks and i == 5:
            with h5py.File(path, "a") as f:
                for split, names in split_masks(episode_names(f)).items():
                    del f[f"mask/{split}"]
                    f.create_dataset(f"mask/{split}", data=np.array(names, dtype="S"))
        writer.append(small_episode(2, rng), {})
        with h5py.File(path) as f:
            assert {s: [n.decode() for n in f[f"mask/{s}"][()]] for s in ("train", "valid")} == split_masks(
                episode_names(f))


def test_the_masks_do_not_grow_the_file_quadratically(tmp_path):
    """Collecting N episodes grows the file by N times one episode's size: rewriting the masks at every append
    left their old copies behind (HDF5 does not reuse freed space across opens), about N^2 / 2 name bytes."""
    path = tmp_path / "f.hdf5"
    writer = EpisodeWriter(path, {"env_name": "x", "type": "t", "env_kwargs": {}})
    rng, sizes = np.random.default_rng(0), []
    for _ in range(3):
        for _ in range(200):
            writer.append(small_episode(2, rng), {})
        sizes.append(path.stat().st_size)
    first, second = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert second < 1.02 * first, f"episodes 400-599 grew the file by {second} bytes, episodes 200-399 by {first}"


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
    with h5py.File(path) as f:
        stored = json.loads(f["data"].attrs["env_args"])
    EpisodeWriter(path, toolkit_env_args(stored))  # the same env, in our form or as stored
    EpisodeWriter(path, stored)


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


def start_collector(path: Path, num_episodes: int, max_episode_steps: int, **kwargs) -> subprocess.Popen:
    """``collect`` on the tiny env into ``path`` in another process (stderr piped, for the failure message)."""
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    # Ctrl-C as in a terminal: a test run started in the background (`cmd &`, as CI scripts do) has SIGINT ignored, and
    # its children inherit that, so Python would not install its KeyboardInterrupt handler in the collector
    script = (f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"from toolkit.collect import collect; import conftest; "
              f"collect(conftest.TINY_ENV | {{'max_episode_steps': {max_episode_steps}}}, {str(path)!r}, {num_episodes}, "
              f"num_envs=1, only_success=False{extra})")
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT / "tests", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_collection_leaves_a_readable_file(tmp_path, sig):
    path = tmp_path / "interrupted.hdf5"
    proc = start_collector(path, 500, max_episode_steps=40)
    deadline = time.time() + 120
    while existing_episodes_safe(path) < 3 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=120)  # a loaded machine (CI beside benches) took over 30 s to finish the episode and exit
    assert proc.returncode != 0
    count, _ = existing_episodes(path)
    assert count >= 3
    with h5py.File(path) as f:
        for n in episode_names(f):
            episode_length(f, n)
            assert f["data"][n]["obs/rgb_corner4"][()].shape[0] == f["data"][n].attrs["num_samples"]
            state = f["data"][n]["obs/state"][()]  # next_obs, as robomimic reads it, maps each finished episode
            np.testing.assert_array_equal(f["data"][n]["next_obs/state"][()], np.concatenate([state[1:], state[-1:]]))
    with h5py.File(path, "r", swmr=True, libver="latest") as f:  # how robomimic's SequenceDataset opens it
        assert f["data/demo_0/next_obs/rgb_corner4"].shape == f["data/demo_0/obs/rgb_corner4"].shape


def test_collection_goes_on_while_another_process_reads_the_file(tmp_path):
    """HDF5 refuses to open a file another process holds; someone inspecting the file while the collector
    appends must not kill the collection (it used to die with 'unable to lock file')."""
    path = tmp_path / "watched.hdf5"
    proc = start_collector(path, 8, max_episode_steps=5, progress=False)
    reads = 0
    while proc.poll() is None:
        try:
            with h5py.File(path, "r"):  # a plain h5py reader, as a user's notebook would open it
                time.sleep(0.05)
                reads += 1
        except OSError:
            pass  # not created yet, or the collector holds it this moment
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    assert reads > 0
    assert existing_episodes(path)[0] == 8


def test_a_file_held_open_elsewhere_is_named_and_kept(tmp_path, tiny_file):
    """If the other process never lets go, the open gives up with a message saying so, not 'delete it'."""
    path = tmp_path / "held.hdf5"
    shutil.copy(tiny_file, path)
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, sys, time; f = h5py.File({str(path)!r}, 'r'); "
                               f"print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ToolkitError, match="locked by another process for 1 s.*left as it is") as err:
            open_episode_file(path, "a", lock_wait_s=1.0)
        assert "Delete" not in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    assert existing_episodes(path)[0] == 3


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


def small_episode(n: int, rng: np.random.Generator) -> GDict:
    return GDict({"obs": {"rgb_wrist": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                          "state": rng.normal(size=(n, 3)).astype(np.float32)},
                  "actions": rng.normal(size=(n, 2)).astype(np.float32), "rewards": np.zeros(n, np.float32),
                  "dones": np.eye(1, n, n - 1, dtype=np.uint8)[0]})


def test_sidecar_cameras_leave_no_dataset_that_reads_as_frames(tmp_path):
    """An MP4-stored camera is absent from obs/ (a KeyError for tools unaware of the sidecars), named by
    a marker; our readers see it as a camera and decode it."""
    rng = np.random.default_rng(0)
    episodes = [small_episode(n, rng) for n in (4, 6)]
    path = tmp_path / "side.hdf5"
    writer = EpisodeWriter(path, {"env_name": "x", "type": "t", "env_kwargs": {}}, video={"lossless": True})
    for ep in episodes:
        writer.append(ep, {"success": False})
    with h5py.File(path) as f:
        g = f["data/demo_1"]
        assert sorted(g["obs"]) == ["state"] and sorted(g["next_obs"]) == ["state"]
        with pytest.raises(KeyError, match="rgb_wrist"):
            g["obs/rgb_wrist"]
        assert "side_videos/demo_1/rgb_wrist.mp4" in g["obs"].attrs["sidecar_videos"]
        assert g["videos/rgb_wrist"][()].decode() == "side_videos/demo_1/rgb_wrist.mp4"
        obs = obs_group(g)
        assert list(obs) == ["rgb_wrist", "state"] and "rgb_wrist" in obs and "depth" not in obs
        cam = obs["rgb_wrist"]
        assert cam.shape == (6, 16, 16, 3) and cam.dtype == np.uint8 and len(cam) == 6
        assert cam.name == "/data/demo_1/obs/rgb_wrist"
        frames = episodes[1]["obs"]["rgb_wrist"]
        np.testing.assert_array_equal(cam[()], frames)
        np.testing.assert_array_equal(cam[2:4], frames[2:4])
        np.testing.assert_array_equal(cam[-1], frames[-1])
        np.testing.assert_array_equal(cam[[0, 5], 3], frames[[0, 5], 3])
        assert episode_length(f, "demo_1") == 6
        with pytest.raises(KeyError, match="no obs key 'rgb_top'"):
            obs["rgb_top"]
    window = WindowDataset(path, ["demo_0", "demo_1"], ["rgb_wrist", "state"], 2, 1)[5]
    np.testing.assert_array_equal(window["obs"]["rgb_wrist"][-1].numpy(), frames[1].transpose(2, 0, 1))
    np.testing.assert_array_equal(HDF5Reader(path).read_episode("demo_0").obs["rgb_wrist"], episodes[0]["obs"]["rgb_wrist"])


def test_files_of_the_earlier_layout_still_read_and_grow(tmp_path):
    """Files written before next_obs, sidecar markers and robomimic's env type: a placeholder dataset per
    MP4 camera, env_args with our type name. They read as before; appends add episodes of the new layout."""
    rng = np.random.default_rng(1)
    old_args = {"env_name": "x", "type": "metaworld", "env_kwargs": {"k": 1}}
    path = tmp_path / "old.hdf5"
    episodes = [small_episode(n, rng) for n in (5, 3)]
    with h5py.File(path, "w") as f:  # the old writer's output, by hand
        data = f.create_group("data")
        data.attrs.update({"env_args": json.dumps(old_args), "total": 5, "video": json.dumps({"lossless": True})})
        g = data.create_group("demo_0")
        frames = episodes[0]["obs"]["rgb_wrist"]
        encode_video(tmp_path / "old_videos/demo_0/rgb_wrist.mp4", frames, lossless=True)
        GDict({k: v for k, v in episodes[0].memory.items() if k != "obs"}).to_hdf5(g)
        g["obs/state"] = episodes[0]["obs"]["state"]
        create_video_dataset(g["obs"], "rgb_wrist", frames, "old_videos/demo_0/rgb_wrist.mp4")
        g.attrs["num_samples"] = 5
    reader = HDF5Reader(path)
    assert reader.env_args == old_args
    np.testing.assert_array_equal(reader.read_episode("demo_0").obs["rgb_wrist"], frames)
    EpisodeWriter(path, old_args).append(episodes[1], {"success": True})  # the same env: appends
    with h5py.File(path) as f:
        assert "rgb_wrist" in f["data/demo_0/obs"] and "rgb_wrist" not in f["data/demo_1/obs"]
        assert "next_obs" not in f["data/demo_0"] and "next_obs/state" in f["data/demo_1"]
    reader = HDF5Reader(path)
    for name, ep in zip(["demo_0", "demo_1"], episodes):
        np.testing.assert_array_equal(reader.read_episode(name).obs["rgb_wrist"], ep["obs"]["rgb_wrist"])
    windows = WindowDataset(path, ["demo_0", "demo_1"], ["rgb_wrist", "state"], 2, 1)
    assert len(windows) == 8 and windows[7]["obs"]["rgb_wrist"].shape == (2, 3, 16, 16)


def test_a_copied_episode_whose_next_obs_reads_another_is_named(tmp_path):
    path = tmp_path / "f.hdf5"
    writer = EpisodeWriter(path, {"env_name": "x", "type": "t", "env_kwargs": {}})
    rng = np.random.default_rng(2)
    for n in (3, 4):
        writer.append(small_episode(n, rng), {})
    with h5py.File(path, "a") as f:
        f.copy(f["data/demo_0"], "data/demo_2")  # h5py's copy keeps next_obs mapping /data/demo_0/obs
        check_next_obs(f, "demo_0")
        with pytest.raises(ToolkitError, match=r"demo_2: next_obs/\w+ reads .*/data/demo_0/obs"):
            check_next_obs(f, "demo_2")
    with pytest.raises(ToolkitError, match="demo_2: next_obs"):
        HDF5Reader(path).read_episode("demo_2")
