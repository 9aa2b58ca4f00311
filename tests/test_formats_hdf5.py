"""Readers of three foreign HDF5 layouts (robomimic, SpawnNet/ManiSkill2-Learn GDict trajectories, SPOC/CHORES)
and the robomimic writer, on small fixtures built on disk with the published field names and dtypes:
values read equal what was written, actions and instructions map as documented, a written robomimic file
reads back equal, and broken inputs raise ToolkitError naming the file and the episode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from gdict import GDict
from toolkit.datamodules.episode_file import EpisodeWriter
from toolkit.datamodules.video import encode_video
from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode
from toolkit.formats.robomimic import RobomimicReader, write_robomimic
from toolkit.formats.spawnnet import SpawnNetReader, split_views
from toolkit.formats.spoc import ACTION_INDEX, ACTIONS, SpocReader, instruction_from_spec

RNG = np.random.default_rng(0)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a real file's bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def frames(n: int, size: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# robomimic: https://robomimic.github.io/docs/datasets/overview.html (Dataset Structure, Filter Keys)
# ---------------------------------------------------------------------------------------------------------------

ROBOMIMIC_ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {"has_renderer": False, "control_freq": 20}}
ROBOMIMIC_LENGTHS = {"demo_1": 10, "demo_2": 12, "demo_10": 15}  # robomimic v0.1 files count from demo_1


def build_robomimic(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """A robomimic image dataset as robomimic's dataset_states_to_obs.py writes one (robosuite Lift keys)."""
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, n in ROBOMIMIC_LENGTHS.items():
            obs = {"agentview_image": frames(n), "robot0_eye_in_hand_image": frames(n),
                   "agentview_depth": RNG.random((n, 32, 32, 1)).astype(np.float32),
                   "object": RNG.normal(size=(n, 10)), "robot0_eef_pos": RNG.normal(size=(n, 3)),
                   "robot0_gripper_qpos": RNG.normal(size=(n, 2))}
            dones = np.zeros(n, np.int64)
            dones[n - 3] = 1  # done_mode 2: 1 on success and at the end
            dones[-1] = 1
            d = {"obs": obs, "actions": RNG.uniform(-1, 1, (n, 7)), "rewards": (dones > 0).astype(np.float64),
                 "dones": dones, "states": RNG.normal(size=(n, 32))}
            g = data.create_group(name)
            for key, value in obs.items():
                g.create_dataset(f"obs/{key}", data=value)
                g.create_dataset(f"next_obs/{key}", data=np.concatenate([value[1:], value[-1:]]))
            for key in ("actions", "rewards", "dones", "states"):
                g.create_dataset(key, data=d[key])
            g.attrs["num_samples"] = n
            g.attrs["model_file"] = "<mujoco model='lift'/>"
            demos[name] = d
        data.attrs["total"] = sum(ROBOMIMIC_LENGTHS.values())
        data.attrs["env_args"] = json.dumps(ROBOMIMIC_ENV_ARGS)
        f.create_dataset("mask/train", data=np.array(["demo_1", "demo_10"], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(["demo_2"], dtype="S"))
    return demos


@pytest.fixture(scope="module")
def robomimic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("robomimic") / "lift_image.hdf5"
    return path, build_robomimic(path)


def test_robomimic_reader_maps_cameras_state_and_steps(robomimic_file):
    path, demos = robomimic_file
    reader = RobomimicReader(path)
    assert reader.env_args == ROBOMIMIC_ENV_ARGS
    assert reader.episode_names() == ["demo_1", "demo_2", "demo_10"]
    assert RobomimicReader(path, split="train").episode_names() == ["demo_1", "demo_10"]
    assert RobomimicReader(path, split="valid").episode_names() == ["demo_2"]
    for name, d in demos.items():
        ep = reader.read_episode(name)
        n = ROBOMIMIC_LENGTHS[name]
        assert set(ep.obs) == {"rgb_agentview", "rgb_robot0_eye_in_hand", "state"}  # depth left out
        np.testing.assert_array_equal(ep.obs["rgb_agentview"], d["obs"]["agentview_image"])
        np.testing.assert_array_equal(ep.obs["rgb_robot0_eye_in_hand"], d["obs"]["robot0_eye_in_hand_image"])
        assert ep.obs["rgb_agentview"].dtype == np.uint8 and ep.obs["rgb_agentview"].shape == (n, 32, 32, 3)
        expected_state = np.concatenate([d["obs"][k] for k in ("object", "robot0_eef_pos", "robot0_gripper_qpos")], 1)
        assert ep.obs["state"].dtype == np.float32 and ep.obs["state"].shape == (n, 15)
        np.testing.assert_allclose(ep.obs["state"], expected_state.astype(np.float32))
        assert ep.actions.dtype == np.float32 and ep.actions.shape == (n, 7)
        np.testing.assert_allclose(ep.actions, d["actions"].astype(np.float32))
        np.testing.assert_array_equal(ep.rewards, d["rewards"].astype(np.float32))
        assert ep.dones.dtype == np.uint8 and ep.dones[-1] == 1 and ep.dones[n - 3] == 1 and ep.dones.sum() == 2
        assert "model_file" not in ep.attrs and "num_samples" not in ep.attrs
    ep = RobomimicReader(path, state_keys=["robot0_gripper_qpos", "robot0_eef_pos"]).read_episode("demo_2")
    d2 = demos["demo_2"]["obs"]
    np.testing.assert_allclose(ep.obs["state"], np.concatenate([d2["robot0_gripper_qpos"], d2["robot0_eef_pos"]], 1)
                               .astype(np.float32))


def make_episode(n: int, attrs: dict) -> Episode:
    dones = np.zeros(n, np.uint8)
    dones[-1] = 1
    return Episode(obs={"rgb_agentview": frames(n), "rgb_wrist": frames(n, 40),
                        "state": RNG.normal(size=(n, 9)).astype(np.float32)},
                   actions=RNG.uniform(-1, 1, (n, 4)).astype(np.float32),
                   rewards=RNG.normal(size=n).astype(np.float32), dones=dones, attrs=attrs)


def test_write_robomimic_layout_and_round_trip(tmp_path):
    env_args = {"env_name": "drawer-open-v3", "type": "metaworld", "env_kwargs": {"camera": "corner4"}}
    episodes = [make_episode(n, {"success": i % 2 == 0, "seed": i, "instruction": f"open drawer {i}",
                                 "source": "expert"}) for i, n in enumerate([11, 13, 10, 12])]
    path = tmp_path / "out" / "written.hdf5"
    names = write_robomimic(iter(episodes), path, env_args=env_args)
    assert names == ["demo_0", "demo_1", "demo_2", "demo_3"]
    with h5py.File(path) as f:
        # robomimic's env metadata: its integer env type (GYM_TYPE), our own type kept under "toolkit"
        assert json.loads(f["data"].attrs["env_args"]) == {"env_name": "drawer-open-v3", "type": 2,
                                                           "env_kwargs": {"camera": "corner4"},
                                                           "toolkit": {"type": "metaworld"}}
        assert f["data"].attrs["total"] == 46
        assert [n.decode() for n in f["mask/train"][()]] == ["demo_0", "demo_2", "demo_3"]
        assert [n.decode() for n in f["mask/valid"][()]] == ["demo_1"]  # as split_masks: the 2nd, then every 10th
        g = f["data/demo_1"]
        assert g.attrs["num_samples"] == 13 and sorted(g["obs"]) == ["agentview_image", "state", "wrist_image"]
        assert sorted(g["next_obs"]) == sorted(g["obs"]) and g["states"].shape == (13, 0)
        np.testing.assert_array_equal(g["next_obs/agentview_image"][:-1], episodes[1].obs["rgb_agentview"][1:])
        np.testing.assert_array_equal(g["next_obs/state"][-1], episodes[1].obs["state"][-1])  # last step repeated
        assert g["next_obs/agentview_image"].is_virtual  # over obs/, no second copy of the frames
        assert g["actions"].dtype == np.float32 and g["dones"].dtype == np.uint8 and g["rewards"].shape == (13,)
    reader = RobomimicReader(path)
    assert reader.env_args == env_args and reader.episode_names() == names
    for name, original in zip(names, episodes):
        back = reader.read_episode(name)
        assert set(back.obs) == set(original.obs)
        for key in original.obs:
            assert back.obs[key].dtype == original.obs[key].dtype
            np.testing.assert_array_equal(back.obs[key], original.obs[key])
        for key in ("actions", "rewards", "dones"):
            np.testing.assert_array_equal(getattr(back, key), getattr(original, key))
        assert back.attrs == original.attrs
    assert RobomimicReader(path, split="valid").episode_names() == ["demo_1"]


def test_robomimic_reader_reads_our_episode_files_inline_and_mp4(tmp_path):
    episodes = [make_episode(n, {"success": True, "seed": 7}) for n in (9, 12)]
    for video in (None, {"lossless": True, "keyframe_interval": 4}):
        path = tmp_path / f"ours_{'mp4' if video else 'inline'}.hdf5"
        writer = EpisodeWriter(path, {"env_name": "x", "type": "metaworld", "env_kwargs": {}}, video=video)
        for ep in episodes:
            writer.append(ep.to_gdict(), ep.attrs)
        reader = RobomimicReader(path)
        assert reader.episode_names() == ["demo_0", "demo_1"]
        for name, original in zip(reader.episode_names(), episodes):
            back = reader.read_episode(name)
            assert set(back.obs) == {"rgb_agentview", "rgb_wrist", "state"}
            for key in original.obs:
                np.testing.assert_array_equal(back.obs[key], original.obs[key])
            np.testing.assert_array_equal(back.actions, original.actions)
            assert back.attrs == {"success": True, "seed": 7}
        assert reader.env_args == {"env_name": "x", "type": "metaworld", "env_kwargs": {}}


def test_write_robomimic_keeps_robomimic_env_args_and_names_our_sidecar_cameras(robomimic_file, tmp_path):
    """A robosuite file converted back keeps robomimic's env metadata as it was; our file with MP4
    sidecars converts with its frames decoded (inline in the robomimic file)."""
    reader = RobomimicReader(robomimic_file[0])
    path = tmp_path / "again.hdf5"
    write_robomimic((reader.read_episode(n) for n in reader.episode_names()), path, env_args=reader.env_args)
    with h5py.File(path) as f:
        assert json.loads(f["data"].attrs["env_args"]) == ROBOMIMIC_ENV_ARGS
    episode = make_episode(6, {})
    ours = tmp_path / "ours.hdf5"
    writer = EpisodeWriter(ours, {"env_name": "x", "type": "metaworld", "env_kwargs": {}}, video={"lossless": True})
    writer.append(episode.to_gdict(), {})
    back = RobomimicReader(ours)
    write_robomimic((back.read_episode(n) for n in back.episode_names()), path, env_args=back.env_args)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["data/demo_0/obs/agentview_image"][()], episode.obs["rgb_agentview"])
        np.testing.assert_array_equal(f["data/demo_0/next_obs/wrist_image"][0], episode.obs["rgb_wrist"][1])


def copy_robomimic(robomimic_file, tmp_path) -> Path:
    dst = tmp_path / "broken.hdf5"
    shutil.copy(robomimic_file[0], dst)
    return dst


def test_robomimic_bad_inputs_name_file_and_episode(robomimic_file, tmp_path):
    with pytest.raises(ToolkitError, match="does not exist"):
        RobomimicReader(tmp_path / "nope.hdf5")
    path = copy_robomimic(robomimic_file, tmp_path)
    with h5py.File(path, "a") as f:
        del f["data/demo_2/actions"]
        rewards = f["data/demo_10/rewards"][()]
        del f["data/demo_10/rewards"]
        f["data/demo_10/rewards"] = rewards[:-2]
    reader = RobomimicReader(path)
    with pytest.raises(ToolkitError, match=rf"{path}: episode demo_2 has no 'actions'"):
        reader.read_episode("demo_2")
    with pytest.raises(ToolkitError, match=rf"{path}: episode demo_10 has mismatched lengths.*rewards=13"):
        reader.read_episode("demo_10")
    with pytest.raises(ToolkitError, match=rf"{path}: episode demo_1: state_keys \['joint_pos'\] not in obs"):
        RobomimicReader(path, state_keys="joint_pos").read_episode("demo_1")
    with pytest.raises(ToolkitError, match="no mask/test"):
        RobomimicReader(path, split="test")
    truncate(path)
    with pytest.raises(ToolkitError, match=rf"{path} is not a readable HDF5 file"):
        RobomimicReader(path)
    path.write_bytes(b"not an HDF5 file" * 100)
    with pytest.raises(ToolkitError, match=rf"{path} is not a readable HDF5 file"):
        RobomimicReader(path)


def test_robomimic_short_mp4_sidecar_names_episode(tmp_path):
    path = tmp_path / "ours.hdf5"
    writer = EpisodeWriter(path, {"env_name": "x", "type": "t", "env_kwargs": {}}, video={"lossless": True})
    writer.append(make_episode(10, {}).to_gdict(), {})
    encode_video(tmp_path / "ours_videos/demo_0/rgb_wrist.mp4", frames(6, 40), lossless=True)
    with pytest.raises(ToolkitError, match=rf"{path}: episode demo_0: video .*rgb_wrist.mp4 has 6 frames"):
        RobomimicReader(path).read_episode("demo_0")


# ---------------------------------------------------------------------------------------------------------------
# SpawnNet / ManiSkill2-Learn GDict trajectories (ManiSkill2-Learn README "Demonstration Format",
# maniskill2_learn/utils/file/hdf5_utils.py; SpawnNet conf/xarm_train_spawnnet.yaml obs_shapes)
# ---------------------------------------------------------------------------------------------------------------


def dump_mangled(group: h5py.Group, tree: dict) -> None:
    """ManiSkill2-Learn's dump_hdf5 naming: a dict key k is stored as dict_<type of k>_<k>."""
    for key, value in tree.items():
        name = f"dict_{type(key).__name__}_{key}"
        if isinstance(value, dict):
            dump_mangled(group.create_group(name), value)
        else:
            group.create_dataset(name, data=value, compression="gzip", compression_opts=5)


def spawnnet_traj(n: int, chw_views: bool) -> dict:
    """A trajectory as ManiSkill2-Learn's ReplayMemory stores it, with SpawnNet's observations."""
    episode_dones = np.zeros((n, 1), bool)
    episode_dones[-1] = True
    if chw_views:  # SpawnNet: 2 views, channel-first, float32 in [0, 255]; depth [V, 1, H, W]
        obs = {"rgb": RNG.integers(0, 256, (n, 2, 3, 32, 32)).astype(np.float32),
               "depth": RNG.random((n, 2, 1, 32, 32)).astype(np.float32),
               "state": RNG.normal(size=(n, 7)).astype(np.float32)}
    else:
        obs = {"rgb": frames(n), "state": RNG.normal(size=(n, 7)).astype(np.float32)}
    return {"obs": obs, "actions": RNG.uniform(-1, 1, (n, 8)).astype(np.float32),
            "rewards": RNG.normal(size=(n, 1)).astype(np.float32), "dones": episode_dones.copy(),
            "episode_dones": episode_dones, "is_truncated": np.zeros((n, 1), bool),
            "worker_indices": np.zeros((n, 1), np.int32)}


def build_spawnnet(root: Path) -> dict[str, dict]:
    root.mkdir(parents=True, exist_ok=True)
    trajs = {"demo_000/traj_0": spawnnet_traj(12, True), "demo_000/traj_1": spawnnet_traj(10, True),
             "demo_001/traj_0": spawnnet_traj(14, False)}
    trajs["demo_000/traj_1"]["dones"][:] = False  # not successful: dones (success) never set
    with h5py.File(root / "demo_000.h5", "w") as f:  # ManiSkill2-Learn's mangled names (convert_state.py)
        for t in ("traj_0", "traj_1"):
            dump_mangled(f.create_group(t), trajs[f"demo_000/{t}"])
    with h5py.File(root / "demo_001.h5", "w") as f:  # plain names, as our gdict writes them
        GDict({"traj_0": trajs["demo_001/traj_0"]}).to_hdf5(f)
    return trajs


@pytest.fixture(scope="module")
def spawnnet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("spawnnet") / "place_bag"
    return root, build_spawnnet(root)


def test_spawnnet_reader_views_state_and_steps(spawnnet_dir):
    root, trajs = spawnnet_dir
    reader = SpawnNetReader(root)
    assert reader.episode_names() == list(trajs) and reader.env_args["type"] == "spawnnet"
    for name, t in trajs.items():
        ep = reader.read_episode(name)
        n = len(t["actions"])
        if t["obs"]["rgb"].ndim == 5:
            assert set(ep.obs) == {"rgb_view0", "rgb_view1", "state"}  # depth only with depth=True
            for v in range(2):
                expected = np.moveaxis(t["obs"]["rgb"][:, v], 1, -1).astype(np.uint8)
                np.testing.assert_array_equal(ep.obs[f"rgb_view{v}"], expected)
        else:
            assert set(ep.obs) == {"rgb_view0", "state"}
            np.testing.assert_array_equal(ep.obs["rgb_view0"], t["obs"]["rgb"])
        assert ep.obs["rgb_view0"].dtype == np.uint8 and ep.obs["rgb_view0"].shape == (n, 32, 32, 3)
        np.testing.assert_array_equal(ep.obs["state"], t["obs"]["state"])
        np.testing.assert_array_equal(ep.actions, t["actions"])
        np.testing.assert_array_equal(ep.rewards, t["rewards"][:, 0])
        assert ep.dones.dtype == np.uint8 and ep.dones.tolist() == [0] * (n - 1) + [1]
        assert ep.attrs["source"] == "spawnnet" and ep.attrs["file"] == name.split("/")[0] + ".h5"
    assert reader.read_episode("demo_000/traj_0").attrs["success"] is True
    assert reader.read_episode("demo_000/traj_1").attrs["success"] is False

    named = SpawnNetReader(root, cameras=["front", "wrist"], depth=True).read_episode("demo_000/traj_1")
    assert set(named.obs) == {"rgb_front", "rgb_wrist", "depth_front", "depth_wrist", "state"}
    depth = trajs["demo_000/traj_1"]["obs"]["depth"]
    np.testing.assert_array_equal(named.obs["depth_wrist"], np.moveaxis(depth[:, 1], 1, -1))
    single = SpawnNetReader(root / "demo_000.h5")
    assert single.episode_names() == ["traj_0", "traj_1"]
    np.testing.assert_array_equal(single.read_episode("traj_1").actions, trajs["demo_000/traj_1"]["actions"])


def test_spawnnet_image_layouts_and_scaling():
    hwc = frames(4)
    for arr, layout in ((hwc, "auto"), (np.moveaxis(hwc, -1, 1), "auto"), (hwc[:, None], "auto")):
        np.testing.assert_array_equal(split_views(arr, 3, layout)[0], hwc)
    stacked = np.concatenate([hwc, hwc[..., ::-1]], -1)  # ManiSkill2-Learn rgbd: cameras stacked on channels
    views = split_views(stacked, 3)
    assert len(views) == 2 and (views[1] == hwc[..., ::-1]).all()
    tiny = np.zeros((2, 3, 4, 3))  # 3 channels either way
    with pytest.raises(ValueError, match="image_layout"):
        split_views(tiny, 3)
    assert split_views(tiny, 3, "chw")[0].shape == (2, 4, 3, 3)
    from toolkit.formats.spawnnet import to_uint8

    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]


def test_spawnnet_bad_inputs_name_file_and_episode(spawnnet_dir, tmp_path):
    with pytest.raises(ToolkitError, match="does not exist"):
        SpawnNetReader(tmp_path / "nope")
    root = tmp_path / "copy"
    shutil.copytree(spawnnet_dir[0], root)
    with h5py.File(root / "demo_000.h5", "a") as f:
        del f["traj_0/dict_str_actions"]
        rewards = f["traj_1/dict_str_rewards"][()]
        del f["traj_1/dict_str_rewards"]
        f["traj_1/dict_str_rewards"] = rewards[:7]
    truncate(root / "demo_001.h5")
    reader = SpawnNetReader(root)  # the unreadable file is listed, its reading fails
    assert reader.episode_names() == ["demo_000/traj_0", "demo_000/traj_1", "demo_001"]
    with pytest.raises(ToolkitError, match=rf"{root / 'demo_000.h5'}: episode demo_000/traj_0 has no 'actions'"):
        reader.read_episode("demo_000/traj_0")
    with pytest.raises(ToolkitError, match=r"demo_000.h5: episode demo_000/traj_1 has mismatched lengths: 10 actions "
                                           r"but rewards has 7 steps"):
        reader.read_episode("demo_000/traj_1")
    with pytest.raises(ToolkitError, match=rf"{root / 'demo_001.h5'}: episode demo_001: .* is not a readable HDF5"):
        reader.read_episode("demo_001")
    with pytest.raises(ToolkitError, match=r"state_keys \['qpos'\] not in obs"):
        SpawnNetReader(root, state_keys=["qpos"]).read_episode("demo_000/traj_1")


# ---------------------------------------------------------------------------------------------------------------
# SPOC / CHORES (github.com/allenai/spoc-robot-training: training/offline/chores_dataset.py,
# environment/navigation_sensors.py, utils/string_utils.py, utils/constants/stretch_initialization_utils.py)
# ---------------------------------------------------------------------------------------------------------------


def string_rows(strings: list[str], max_len: int) -> np.ndarray:
    """SPOC's convert_string_to_byte per step: NUL-padded uint8 rows."""
    return np.stack([np.array([s], dtype=f"S{max_len}").view("uint8") for s in strings])


SPOC_EPISODES = {  # (house, episode): (rows T, templated task spec, expected instruction)
    ("000001", "0"): (10, {"synsets": ["apple.n.01"], "synset_to_object_ids": {"apple.n.01": ["Apple|1"]},
                           "broad_synset_to_object_ids": {"apple.n.01": ["Apple|1"]}, "task_type": "ObjectNavType",
                           "extras": {}}, "go to an apple"),
    ("000001", "1"): (13, {"synsets": ["mug.n.04"], "synset_to_object_ids": {"mug.n.04": ["Mug|2"]},
                           "broad_synset_to_object_ids": {"mug.n.04": ["Mug|2"]}, "task_type": "FetchType",
                           "extras": {}}, "go to a mug and pick up that mug"),
    ("000002", "0"): (8, {"num_rooms_in_house": 3, "task_type": "RoomVisit", "extras": {}},
                      "go to all 3 rooms in the house. indicate when you have seen a new room and when you are done"),
}


def build_spoc(root: Path, split: str = "train") -> dict:
    """A CHORES-style split: per house, hdf5_sensors.hdf5 (one group per episode) and the two cameras' MP4s."""
    truth = {}
    index: dict[str, list[str]] = {}
    for (house, episode), (rows, spec, _) in SPOC_EPISODES.items():
        house_dir = root / split / house
        house_dir.mkdir(parents=True, exist_ok=True)
        index.setdefault(house, []).append(episode)
        actions = [""] + [ACTIONS[(3 * t + len(house)) % len(ACTIONS)] for t in range(rows - 1)]  # row 0: null action
        location = np.column_stack([RNG.uniform(0, 10, rows), np.full(rows, 0.9), RNG.uniform(0, 10, rows),
                                    np.zeros(rows), RNG.choice([0.0, 30.0, 60.0, 270.0], rows), np.zeros(rows)])
        in_hand = (np.arange(rows) >= rows // 2).astype(bool).reshape(rows, 1)
        spec_json = json.dumps(spec)
        with h5py.File(house_dir / "hdf5_sensors.hdf5", "a") as f:
            g = f.create_group(episode)
            g["last_action_str"] = string_rows(actions, 200)
            g["last_agent_location"] = location  # float64 [T, 6]: x, y, z, rot x, rot y, rot z
            if episode == "1":  # navigation-only episodes may lack it
                g["an_object_is_in_hand"] = in_hand
            g["templated_task_spec"] = np.tile(np.frombuffer(spec_json.encode(), np.uint8), (rows, 1))
            g["house_index"] = np.full(rows, int(house), np.int64)
            g["last_action_success"] = np.ones((rows, 1), np.int64)
        nav, manip = frames(rows), frames(rows)
        encode_video(house_dir / f"raw_navigation_camera__{episode}.mp4", nav, lossless=True)
        encode_video(house_dir / f"raw_manipulation_camera__{episode}.mp4", manip, lossless=True)
        truth[f"{house}/{episode}"] = {"actions": actions, "location": location, "nav": nav, "manip": manip,
                                       "in_hand": in_hand[:, 0] if episode == "1" else np.zeros(rows)}
    (root / f"house_id_to_sub_house_id_{split}.json").write_text(json.dumps(index))
    return truth


@pytest.fixture(scope="module")
def spoc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("spoc") / "fifteen_type"
    return root, build_spoc(root)


def test_spoc_reader_aligns_frames_actions_state_and_instructions(spoc_root):
    root, truth = spoc_root
    reader = SpocReader(root, split="train")
    assert reader.episode_names() == ["000001/0", "000001/1", "000002/0"]
    assert reader.env_args["type"] == "spoc"
    for (house, episode), (rows, spec, instruction) in SPOC_EPISODES.items():
        name = f"{house}/{episode}"
        t = truth[name]
        ep = reader.read_episode(name)
        n = rows - 1  # the last row has no action
        assert len(ep) == n and set(ep.obs) == {"rgb_navigation", "rgb_manipulation", "state"}
        np.testing.assert_array_equal(ep.obs["rgb_navigation"], t["nav"][:-1])
        np.testing.assert_array_equal(ep.obs["rgb_manipulation"], t["manip"][:-1])
        # actions[t] is the action taken at step t: last_action_str of the next row
        assert ep.actions.shape == (n, 1) and ep.actions.dtype == np.float32
        assert [ACTIONS[int(a)] for a in ep.actions[:, 0]] == t["actions"][1:]
        assert ep.actions[0, 0] == ACTION_INDEX[t["actions"][1]]
        loc = t["location"]
        expected_state = np.column_stack([loc[:, 0], loc[:, 2], loc[:, 4], t["in_hand"]])[:-1]  # x, z, yaw, in hand
        np.testing.assert_allclose(ep.obs["state"], expected_state.astype(np.float32))
        assert ep.rewards.tolist() == [0.0] * n and ep.dones.tolist() == [0] * (n - 1) + [1]
        assert ep.attrs["instruction"] == instruction and ep.attrs["task_type"] == spec["task_type"]
        assert json.loads(ep.attrs["task_spec"]) == spec
        assert ep.attrs["house_id"] == house and ep.attrs["episode"] == episode and "success" not in ep.attrs
    reader = SpocReader(root, cameras=["navigation"], state_keys=["y", "in_hand", "last_action_success"])
    ep = reader.read_episode("000001/1")
    assert set(ep.obs) == {"rgb_navigation", "state"} and ep.obs["state"].shape == (12, 3)
    np.testing.assert_allclose(ep.obs["state"][:, 0], 0.9)
    assert ep.obs["state"][:, 1].tolist() == truth["000001/1"]["in_hand"][:-1].tolist()


def test_spoc_action_vocabulary_and_instruction_sources(spoc_root, tmp_path):
    assert ACTIONS[:5] == ("m", "r", "l", "b", "end") and ACTIONS[-1] == "d" and len(ACTIONS) == 20
    assert instruction_from_spec({"task_type": "PickupType", "synsets": ["egg.n.02"]}) == "pick up an egg"
    assert instruction_from_spec({"task_type": "RoomNav", "room_types": ["LivingRoom"]}) == "go to a livingroom"
    assert instruction_from_spec({"task_type": "ObjectNavDescription", "synsets": ["x.n.01"], "uid": "u"}) is None
    root = tmp_path / "spoc"
    shutil.copytree(spoc_root[0], root)
    (root / "house_id_to_sub_house_id_train.json").unlink()  # without the index: houses and groups found on disk
    assert SpocReader(root).episode_names() == ["000001/0", "000001/1", "000002/0"]
    with h5py.File(root / "train/000001/hdf5_sensors.hdf5", "a") as f:
        f["0/task_natural_language_spec"] = string_rows(["find the red apple"] * 10, 1000)
        spec = dict(SPOC_EPISODES[("000001", "1")][1], natural_language_spec="fetch my mug")
        del f["1/templated_task_spec"]
        f["1/templated_task_spec"] = np.tile(np.frombuffer(json.dumps(spec).encode(), np.uint8), (13, 1))
    reader = SpocReader(root)
    assert reader.read_episode("000001/0").attrs["instruction"] == "find the red apple"
    assert reader.read_episode("000001/1").attrs["instruction"] == "fetch my mug"


def test_spoc_bad_inputs_name_file_and_episode(spoc_root, tmp_path):
    with pytest.raises(ToolkitError, match="no split folder val/"):
        SpocReader(spoc_root[0], split="val")
    with pytest.raises(ToolkitError, match="cameras"):
        SpocReader(spoc_root[0], cameras=["wrist"])
    root = tmp_path / "spoc"
    shutil.copytree(spoc_root[0], root)
    house1, house2 = root / "train/000001", root / "train/000002"
    sensors1 = house1 / "hdf5_sensors.hdf5"
    (house1 / "raw_manipulation_camera__0.mp4").unlink()
    encode_video(house1 / "raw_navigation_camera__1.mp4", frames(11), lossless=True)  # 11 frames for 13 rows
    truncate(house2 / "hdf5_sensors.hdf5")
    reader = SpocReader(root)
    with pytest.raises(ToolkitError, match=rf"{sensors1}: episode 000001/0: video .*raw_manipulation_camera__0.mp4 "
                                           r"does not exist"):
        reader.read_episode("000001/0")
    with pytest.raises(ToolkitError, match=rf"{sensors1}: episode 000001/1: video .*raw_navigation_camera__1.mp4 "
                                           r"has 11 frames but the sensors have 13 rows"):
        reader.read_episode("000001/1")
    sensors2 = house2 / "hdf5_sensors.hdf5"
    with pytest.raises(ToolkitError, match=rf"{sensors2} \(episode 000002/0\) is not a readable HDF5"):
        reader.read_episode("000002/0")
    with h5py.File(sensors1, "a") as f:
        location = f["0/last_agent_location"][()]
        del f["0/last_agent_location"]
        f["0/last_agent_location"] = location[:-1]
        del f["1/templated_task_spec"]
    with pytest.raises(ToolkitError, match=rf"{sensors1}: episode 000001/0: sensors of mismatched lengths: "
                                           r"last_action_str has 10 rows, last_agent_location 9"):
        reader.read_episode("000001/0")
    with pytest.raises(ToolkitError, match=rf"{sensors1}: episode 000001/1 has no sensor 'templated_task_spec'"):
        reader.read_episode("000001/1")
    with h5py.File(sensors1, "a") as f:
        del f["0/last_agent_location"]
        f["0/last_agent_location"] = location
        del f["0/last_action_str"]
        f["0/last_action_str"] = string_rows([""] + ["m"] * 4 + ["jump"] + ["m"] * 4, 200)
    with pytest.raises(ToolkitError, match=rf"{sensors1}: episode 000001/0: unknown action 'jump' at row 5"):
        reader.read_episode("000001/0")


def test_readers_plug_into_convert_and_validate(spoc_root, spawnnet_dir, tmp_path):
    """python -m toolkit.convert / validate find the readers by name; SPOC -> robomimic -> read back is exact."""
    from toolkit.convert import convert, open_reader
    from toolkit.validate import validate

    summary, problems = validate(open_reader("spoc", spoc_root[0]))
    assert problems == [] and summary["steps"] == sum(rows - 1 for rows, _, _ in SPOC_EPISODES.values())
    assert validate(open_reader("spawnnet", spawnnet_dir[0]))[1] == []
    dst = tmp_path / "spoc_as_robomimic.hdf5"
    convert(spoc_root[0], dst, "spoc", "robomimic", progress=False)
    spoc, back = SpocReader(spoc_root[0]), RobomimicReader(dst)
    assert back.env_args == spoc.env_args and len(back.episode_names()) == 3
    for a_name, b_name in zip(spoc.episode_names(), back.episode_names()):
        a, b = spoc.read_episode(a_name), back.read_episode(b_name)
        for key in a.obs:
            np.testing.assert_array_equal(a.obs[key], b.obs[key])
        np.testing.assert_array_equal(a.actions, b.actions)
        assert b.attrs == a.attrs
