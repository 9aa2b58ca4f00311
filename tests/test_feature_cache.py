"""The feature cache of frozen encoders: same features as the encoder, rebuilt when anything changes."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import torch

from gdict import GDict
from toolkit.datamodules.episode_file import EpisodeWriter, episode_names
from toolkit.datamodules.windows import WindowDataset
from toolkit.encoders.cache import build_feature_cache, cache_path
from toolkit.encoders.impala import ImpalaEncoder

CFG = {"_target_": "toolkit.encoders.impala.ImpalaEncoder", "image_size": 32}


def frozen(seed: int = 0, image_size: int = 32) -> ImpalaEncoder:
    torch.manual_seed(seed)
    return ImpalaEncoder(image_size=image_size, channels=(8, 16, 16), out_dim=32, freeze=True)


def test_cached_features_equal_the_encoder(tiny_file, tmp_path):
    data = tmp_path / "d.hdf5"
    shutil.copy(tiny_file, data)
    enc = frozen()
    path = build_feature_cache(enc, CFG, data, ["rgb_corner4"], batch_size=5, progress=False)
    assert path.parent == tmp_path / "d.features" and path.exists()
    with h5py.File(data) as f, h5py.File(path) as c:
        for name in episode_names(f):
            frames = torch.from_numpy(f["data"][name]["obs/rgb_corner4"][()]).permute(0, 3, 1, 2)
            cached = torch.from_numpy(c["data"][name]["obs/rgb_corner4_features"][()]).float()
            torch.testing.assert_close(cached, enc(frames), rtol=2e-3, atol=2e-3)
    # the dataset reads features instead of pixels
    ds = WindowDataset(data, ["demo_0"], ["rgb_corner4", "state"], history=2, horizon=1, feature_path=path)
    item = ds[3]
    assert "rgb_corner4" not in item["obs"] and item["obs"]["rgb_corner4_features"].shape == (2, 1, 32)
    with h5py.File(data) as f:
        frames = torch.from_numpy(f["data/demo_0/obs/rgb_corner4"][2:4]).permute(0, 3, 1, 2)
    torch.testing.assert_close(item["obs"]["rgb_corner4_features"], enc(frames), rtol=2e-3, atol=2e-3)


def test_cache_is_reused_and_invalidated(tiny_file, tmp_path):
    data = tmp_path / "d.hdf5"
    shutil.copy(tiny_file, data)
    path = build_feature_cache(frozen(), CFG, data, ["rgb_corner4"], progress=False)
    mtime = path.stat().st_mtime_ns
    assert build_feature_cache(frozen(), CFG, data, ["rgb_corner4"], progress=False) == path
    assert path.stat().st_mtime_ns == mtime  # not rebuilt
    # other weights, another input size, another encoder config: other files
    assert cache_path(frozen(seed=1), CFG, data, ["rgb_corner4"]) != path
    assert cache_path(frozen(image_size=48), CFG | {"image_size": 48}, data, ["rgb_corner4"]) != path
    assert cache_path(frozen(), CFG | {"out_dim": 33}, data, ["rgb_corner4"]) != path
    # the dataset grows: rebuilt, covering the new episode
    with h5py.File(data) as f:
        ep = GDict.from_hdf5(f["data/demo_0"], keys=["obs", "actions", "rewards", "dones"])
        env_args = __import__("json").loads(f["data"].attrs["env_args"])
    EpisodeWriter(data, env_args).append(ep, {"success": False})
    new = build_feature_cache(frozen(), CFG, data, ["rgb_corner4"], progress=False)
    assert new != path
    with h5py.File(new) as c:
        assert "demo_3" in c["data"]
        np.testing.assert_array_equal(c["data/demo_3/obs/rgb_corner4_features"][()], c["data/demo_0/obs/rgb_corner4_features"][()])
