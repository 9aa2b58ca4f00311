"""Our episode files in robomimic's own code (robomimic 0.3.0, installed in .venv-compare by
bench/compare_venv.sh, run in a subprocess): its SequenceDataset reads our values with its defaults
(next_obs included, through our virtual datasets), BC and IQL take a training step and a validation step
on mask/train and mask/valid, a file with MP4 sidecars fails with a KeyError naming the camera instead
of reading frames of zeros, and its env utilities understand our env_args.

Without .venv-compare these tests skip (build it with `make compare-venv`); on CI (``CI`` set) they fail."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from toolkit.collect import collect
from toolkit.convert import convert
from toolkit.datamodules.episode_file import SIDECAR_NOTE, VIDEOS
from toolkit.formats.hdf5 import HDF5Reader

from conftest import TINY_ENV, compare_python

# Runs in .venv-compare: python SCRIPT OUT_DIR INLINE_FILE SIDECAR_FILE ROBOMIMIC_FORMAT_FILE
SCRIPT = r'''
import json, sys, tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import robomimic.utils.env_utils as EnvUtils
import robomimic.utils.file_utils as FileUtils
import robomimic.utils.obs_utils as ObsUtils
import robomimic.utils.train_utils as TrainUtils
from robomimic.algo import algo_factory
from robomimic.config import config_factory
from robomimic.envs.env_base import EnvType
from robomimic.utils.dataset import SequenceDataset

out, inline, sidecar, converted = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.manual_seed(0)
result, arrays = {}, {}


def items(dataset):
    """Every sample of a SequenceDataset (seq_length 1), concatenated in its own order."""
    samples = [dataset[i] for i in range(len(dataset))]
    flat = {}
    for group in ("obs", "next_obs"):
        for key in samples[0][group]:
            flat[f"{group}/{key}"] = np.concatenate([s[group][key] for s in samples])
    for key in ("actions", "rewards", "dones"):
        if key in samples[0]:
            flat[key] = np.concatenate([s[key] for s in samples])
    return flat


# 1. SequenceDataset with its defaults (load_next_obs=True; hdf5_cache_mode None, and "all" as its configs use)
ObsUtils.initialize_obs_modality_mapping_from_dict({"low_dim": ["state"], "rgb": ["rgb_corner4"]})
for mode in (None, "all"):
    dataset = SequenceDataset(inline, obs_keys=("state", "rgb_corner4"),
                              dataset_keys=("actions", "rewards", "dones"), hdf5_cache_mode=mode)
    result[f"demos/{mode}"] = list(dataset.demos)
    arrays.update({f"{mode}/{k}": v for k, v in items(dataset).items()})
ObsUtils.initialize_obs_modality_mapping_from_dict({"low_dim": ["state"], "rgb": ["corner4_image"]})
dataset = SequenceDataset(converted, obs_keys=("state", "corner4_image"), dataset_keys=("actions", "rewards", "dones"))
arrays.update({f"converted/{k}": v for k, v in items(dataset).items()})

# 2. one training step and one validation step of BC and IQL, robomimic's default configs
for algo in ("bc", "iql"):
    config = config_factory(algo)
    with config.values_unlocked():
        config.train.data = inline
        config.train.output_dir = tempfile.mkdtemp()
        config.train.batch_size = 8  # the file has 36 steps; robomimic drops incomplete batches
        config.train.num_data_workers = 0
        config.experiment.rollout.enabled = False
        config.experiment.validate = True
        config.train.hdf5_filter_key, config.train.hdf5_validation_filter_key = "train", "valid"
        config.observation.modalities.obs.low_dim = ["state"]
        config.observation.modalities.obs.rgb = []
    ObsUtils.initialize_obs_utils_with_config(config)
    shape_meta = FileUtils.get_shape_metadata_from_dataset(config.train.data, all_obs_keys=config.all_obs_keys)
    model = algo_factory(algo, config, obs_key_shapes=shape_meta["all_shapes"], ac_dim=shape_meta["ac_dim"],
                         device=torch.device("cpu"))
    trainset, validset = TrainUtils.load_data_for_training(config, obs_keys=shape_meta["all_obs_keys"])
    loader = DataLoader(trainset, batch_size=config.train.batch_size, shuffle=True, drop_last=True)
    valid_loader = DataLoader(validset, batch_size=config.train.batch_size, drop_last=True)
    train_log = TrainUtils.run_epoch(model=model, data_loader=loader, epoch=1, num_steps=1)
    valid_log = TrainUtils.run_epoch(model=model, data_loader=valid_loader, epoch=1, validate=True, num_steps=1)
    losses = lambda log: {k: float(v) for k, v in log.items() if "loss" in k.lower()}
    result[algo] = {"train": losses(train_log), "valid": losses(valid_log),
                    "train_demos": list(trainset.demos), "valid_demos": list(validset.demos),
                    "shapes": {k: list(v) for k, v in shape_meta["all_shapes"].items()}, "ac_dim": shape_meta["ac_dim"]}

# 3. the file with MP4 sidecars: a camera read fails, whatever the cache mode; state still reads
ObsUtils.initialize_obs_modality_mapping_from_dict({"low_dim": ["state"], "rgb": ["rgb_corner4"]})
result["sidecar"] = {}
for mode in (None, "all", "low_dim"):
    try:
        dataset = SequenceDataset(sidecar, obs_keys=("state", "rgb_corner4"), dataset_keys=("actions",),
                                  hdf5_cache_mode=mode)
        frames = np.concatenate([dataset[i]["obs"]["rgb_corner4"] for i in range(len(dataset))])
        result["sidecar"][str(mode)] = f"read frames, max {int(frames.max())}"
    except Exception as e:
        result["sidecar"][str(mode)] = f"{type(e).__name__}: {e}"
try:
    FileUtils.get_shape_metadata_from_dataset(sidecar, all_obs_keys=["state", "rgb_corner4"])
    result["sidecar"]["shape_meta"] = "read"
except Exception as e:
    result["sidecar"]["shape_meta"] = f"{type(e).__name__}: {e}"
dataset = SequenceDataset(sidecar, obs_keys=("state",), dataset_keys=("actions",))
arrays["sidecar/obs/state"] = items(dataset)["obs/state"]

# 4. env utilities on our env_args
meta = FileUtils.get_env_metadata_from_dataset(inline)
result["env"] = {"meta": meta, "type": EnvUtils.get_env_type(env_meta=meta), "gym_type": EnvType.GYM_TYPE,
                 "is_robosuite": EnvUtils.is_robosuite_env(env_meta=meta)}
try:
    result["env"]["env_class"] = EnvUtils.get_env_class(env_meta=meta).__name__
except Exception as e:
    result["env"]["env_class"] = f"{type(e).__name__}: {e}"

np.savez(out / "arrays.npz", **arrays)
(out / "result.json").write_text(json.dumps(result))
'''


@pytest.fixture(scope="module")
def robomimic_python() -> Path:
    """.venv-compare's python, checked before anything is collected."""
    return compare_python("robomimic 0.3.0")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real Meta-World episodes: collected in two runs (the second appends to the file), the same
    episodes with MP4 sidecars, and written as a robomimic file by our converter."""
    root = tmp_path_factory.mktemp("robomimic_real")
    inline = root / "inline.hdf5"
    collect(TINY_ENV, inline, num_episodes=1, num_envs=1, only_success=False, progress=False)
    collect(TINY_ENV, inline, num_episodes=3, num_envs=1, only_success=False, progress=False)
    sidecar, converted = root / "sidecar.hdf5", root / "converted.hdf5"
    convert(inline, sidecar, "hdf5", "hdf5", video={"lossless": True}, progress=False)
    convert(inline, converted, "hdf5", "robomimic", progress=False)
    return {"inline": inline, "sidecar": sidecar, "converted": converted}


@pytest.fixture(scope="module")
def robomimic(robomimic_python, files, tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    """Runs SCRIPT once in .venv-compare; returns its results and arrays."""
    python = robomimic_python
    out = tmp_path_factory.mktemp("robomimic_out")
    script = out / "robomimic_on_our_files.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(python), str(script), str(out), *(str(files[k]) for k in ("inline", "sidecar", "converted"))],
                          cwd=out, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"robomimic failed on our files:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with np.load(out / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads((out / "result.json").read_text()), arrays


def ours(path: Path) -> dict[str, np.ndarray]:
    """Our reader's values in robomimic's sample order, next_obs = obs shifted with the last step repeated."""
    reader = HDF5Reader(path)
    episodes = [reader.read_episode(n) for n in reader.episode_names()]
    want: dict[str, list] = {}
    for ep in episodes:
        for key, value in ep.obs.items():
            want.setdefault(f"obs/{key}", []).append(value)
            want.setdefault(f"next_obs/{key}", []).append(np.concatenate([value[1:], value[-1:]]))
        for key in ("actions", "rewards", "dones"):
            want.setdefault(key, []).append(getattr(ep, key))
    return {k: np.concatenate(v) for k, v in want.items()}


def test_sequence_dataset_reads_our_values_with_its_defaults(files, robomimic):
    result, arrays = robomimic
    want = ours(files["inline"])
    assert len(want["actions"]) == 36
    for mode in ("None", "all"):
        assert result[f"demos/{mode}"] == ["demo_0", "demo_1", "demo_2"]
        for key, value in want.items():
            got = arrays[f"{mode}/{key}"]
            np.testing.assert_array_equal(got.reshape(value.shape), value, err_msg=f"{mode}/{key}")
    # the robomimic file our converter writes reads the same (cameras as <camera>_image)
    for key, value in want.items():
        np.testing.assert_array_equal(arrays[f"converted/{key.replace('rgb_corner4', 'corner4_image')}"]
                                      .reshape(value.shape), value, err_msg=f"converted/{key}")


def test_next_obs_is_virtual_and_costs_no_space(files):
    with h5py.File(files["inline"]) as f:
        g = f["data/demo_2"]
        for key in ("state", "rgb_corner4"):
            ds = g[f"next_obs/{key}"]
            assert ds.is_virtual and ds.id.get_storage_size() == 0
            assert {(m.file_name, m.dset_name) for m in ds.virtual_sources()} == {(".", f"/data/demo_2/obs/{key}")}


def test_bc_and_iql_train_and_validate_on_our_file(robomimic):
    result, _ = robomimic
    for algo in ("bc", "iql"):
        r = result[algo]
        assert r["shapes"] == {"state": [4]} and r["ac_dim"] == 4
        assert r["train_demos"] == ["demo_0", "demo_2"] and r["valid_demos"] == ["demo_1"]  # our mask/train, mask/valid
        assert r["train"] and r["valid"], r
        assert all(np.isfinite(v) for v in [*r["train"].values(), *r["valid"].values()]), r
    # IQL's value losses, whose targets read next_obs
    assert {"critic/critic1_loss", "vf/v_loss"} <= set(result["iql"]["train"]), result["iql"]["train"]


def test_sidecar_camera_fails_in_robomimic_instead_of_reading_zeros(files, robomimic):
    result, arrays = robomimic
    for mode in ("None", "all", "low_dim", "shape_meta"):
        outcome = result["sidecar"][mode]
        assert outcome.startswith("KeyError") and "rgb_corner4" in outcome, (mode, outcome)
    np.testing.assert_array_equal(arrays["sidecar/obs/state"].reshape(-1, 4), ours(files["inline"])["obs/state"])
    with h5py.File(files["sidecar"]) as f:
        g = f["data/demo_0"]
        assert "rgb_corner4" not in g["obs"] and "rgb_corner4" not in g["next_obs"]
        assert "sidecar_videos/demo_0/rgb_corner4.mp4" in g["obs"].attrs[SIDECAR_NOTE]
        assert g[f"{VIDEOS}/rgb_corner4"].attrs["video_path"] == "sidecar_videos/demo_0/rgb_corner4.mp4"
    # our reader still decodes the frames (lossless: equal to the inline file's)
    a, b = HDF5Reader(files["inline"]).read_episode("demo_1"), HDF5Reader(files["sidecar"]).read_episode("demo_1")
    np.testing.assert_array_equal(a.obs["rgb_corner4"], b.obs["rgb_corner4"])


def test_robomimic_env_utils_understand_our_env_args(robomimic):
    env = robomimic[0]["env"]
    assert env["type"] == env["gym_type"] == 2 and env["is_robosuite"] is False
    assert env["meta"]["env_name"] == "drawer-open-v3" and env["meta"]["toolkit"] == {"type": "metaworld"}
    assert env["meta"]["env_kwargs"] == {"camera": "corner4", "image_size": 32, "max_episode_steps": 12}
    # robomimic's gym wrapper imports the old `gym` package (not installed with it); never "code should never reach"
    assert env["env_class"] in ("EnvGym", "ModuleNotFoundError: No module named 'gym'"), env["env_class"]
