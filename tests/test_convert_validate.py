"""`python -m toolkit.convert` and `python -m toolkit.validate` on real collected episodes: conversion into
MP4 sidecars is exact when lossless and resumable, and validate reports every broken episode at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT
from toolkit.convert import convert
from toolkit.datamodules.video import encode_video
from toolkit.errors import ToolkitError
from toolkit.formats.hdf5 import HDF5Reader
from toolkit.validate import validate


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_convert_inline_to_mp4_sidecars_is_exact_and_resumable(tiny_file, tmp_path):
    dst = tmp_path / "video.hdf5"
    proc = cli("toolkit.convert", tiny_file, dst, "--from", "hdf5", "--to", "hdf5", "--video", "--lossless")
    assert proc.returncode == 0, proc.stderr
    src, out = HDF5Reader(tiny_file), HDF5Reader(dst)
    assert out.episode_names() == src.episode_names() and out.env_args == src.env_args
    for name in src.episode_names():
        a, b = src.read_episode(name), out.read_episode(name)
        for key in a.obs:
            np.testing.assert_array_equal(a.obs[key], b.obs[key])
        np.testing.assert_array_equal(a.actions, b.actions)
        assert b.attrs["source_episode"] == name
    with h5py.File(dst) as f:
        assert "video_path" in f["data/demo_0/videos/rgb_corner4"].attrs and "rgb_corner4" not in f["data/demo_0/obs"]
    convert(tiny_file, dst, "hdf5", "hdf5", video={"lossless": True}, progress=False)  # again: nothing appended
    assert len(HDF5Reader(dst).episode_names()) == len(src.episode_names())


def test_validate_summarizes_a_good_file(tiny_file):
    summary, problems = validate(HDF5Reader(tiny_file))
    assert problems == []
    assert summary["episodes"] == "3 (3 readable)" and summary["steps"] == 36
    assert summary["cameras"] == "rgb_corner4" and summary["obs/rgb_corner4"] == "uint8 [32, 32, 3]"
    proc = cli("toolkit.validate", tiny_file)
    assert proc.returncode == 0 and "no problems found" in proc.stdout and "rgb_corner4" in proc.stdout


def test_validate_lists_every_broken_episode(tiny_file, tmp_path):
    dst = tmp_path / "broken.hdf5"
    convert(tiny_file, dst, "hdf5", "hdf5", video={"lossless": True}, progress=False)
    os.remove(tmp_path / "broken_videos/demo_0/rgb_corner4.mp4")  # a missing MP4
    encode_video(tmp_path / "broken_videos/demo_1/rgb_corner4.mp4", np.zeros((5, 32, 32, 3), np.uint8))  # too short
    with h5py.File(dst, "a") as f:  # low-dimensional data that does not match the frames
        del f["data/demo_2/actions"]
        f["data/demo_2/actions"] = np.zeros((7, 4), np.float32)
    proc = cli("toolkit.validate", dst)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "3 problem(s)" in out
    assert "episode demo_0: video " in out and "broken_videos/demo_0/rgb_corner4.mp4 does not exist" in out
    assert "has 5 frames but /data/demo_1/obs/rgb_corner4 declares 12" in out
    assert "episode demo_2 has mismatched lengths" in out and "actions=7" in out


def test_truncated_and_unknown_inputs_fail_clearly(tiny_file, tmp_path):
    truncated = tmp_path / "truncated.hdf5"
    shutil.copy(tiny_file, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    proc = cli("toolkit.validate", truncated)
    assert proc.returncode == 2 and "truncated.hdf5 is not a readable HDF5 file" in proc.stderr
    with pytest.raises(ToolkitError, match="cannot write format 'spoc'"):
        convert(tiny_file, tmp_path / "x", "hdf5", "spoc")
    proc = cli("toolkit.convert", tiny_file, tmp_path / "y", "--from", "nonsense")
    assert proc.returncode == 2 and "invalid choice: 'nonsense'" in proc.stderr


def test_unknown_camera_key_is_named(tiny_file):
    from toolkit.datamodules.windows import WindowDataset

    with pytest.raises(ToolkitError, match=r"episode demo_0 has no obs key\(s\) \['rgb_wrist'\].*data.obs_keys"):
        WindowDataset(tiny_file, ["demo_0"], ["rgb_wrist", "state"], 2, 1)


def test_train_on_a_lerobot_dataset_converts_it_once(tiny_file, tmp_path):
    """`python train.py data=lerobot data.source.path=...`: the LeRobot v3 directory (written from real
    Meta-World episodes) is converted into our file with MP4 sidecars on first use, then trained on."""
    from conftest import run_train
    from toolkit.formats.lerobot import write_lerobot
    from toolkit.convert import episodes

    lerobot = tmp_path / "drawer_lerobot"
    write_lerobot(episodes(HDF5Reader(tiny_file)), lerobot, fps=20, lossless=True)
    args = ["data=lerobot", f"data.source.path={lerobot}", "env.image_size=32", "~callbacks.progress_bar"]
    run_train(*args, root=tmp_path)
    (converted,) = (tmp_path / "data").glob("*.hdf5")
    reader = HDF5Reader(converted)
    assert len(reader.episode_names()) == 3
    frames = reader.read_episode("demo_1").obs["rgb_corner4"].astype(int)  # MP4 sidecars at crf 18
    assert np.abs(frames - HDF5Reader(tiny_file).read_episode("demo_1").obs["rgb_corner4"]).mean() < 5
    mtime = converted.stat().st_mtime_ns
    run_train(*args, root=tmp_path)  # second run: nothing converted again
    assert converted.stat().st_mtime_ns == mtime
