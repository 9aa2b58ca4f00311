"""LeRobot v3.0 datasets: a directory built by hand from the published layout (not by our writer) reads back
exactly, episode boundaries inside concatenated videos hold, our writer round-trips, and broken datasets are
named (file and episode)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from toolkit.datamodules.video import Decoder, encode_video
from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode
from toolkit.formats.lerobot import LeRobotReader, write_lerobot

FPS = 10
LENGTHS = [12, 10, 15]
TASKS = ["open the drawer", "close the drawer"]
EPISODE_TASK = [0, 1, 0]
CAMERAS = {"top": [32, 32, 3], "wrist": [3, 32, 32]}  # both conventions seen in published info.json files
DATA_FILES = [[0, 1], [2]]  # episodes per data file (chunk-000/file-00i)
VIDEO_FILES = {"top": [[0], [1, 2]], "wrist": [[0, 1], [2]]}  # episodes per video file, per camera


def _pandas_tasks(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as lerobot's ``pd.DataFrame({"task_index": ...}, index=tasks).to_parquet()`` writes it."""
    meta = {"index_columns": ["__index_level_0__"],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                                "metadata": {"encoding": "UTF-8"}}],
            "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                         "numpy_type": "int64", "metadata": None},
                        {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                         "numpy_type": "object", "metadata": None}],
            "attributes": {}, "creator": {"library": "pyarrow", "version": "21.0.0"}, "pandas_version": "2.3.1"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "__index_level_0__": tasks})
    return table.replace_schema_metadata({b"pandas": json.dumps(meta)})


def _make_episodes(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i, n in enumerate(LENGTHS):
        episodes.append({
            "state": rng.normal(size=(n, 3)).astype(np.float32),
            "action": rng.normal(size=(n, 2)).astype(np.float32),
            "reward": rng.random(n).astype(np.float32),
            "success": i == 0,
            "frames": {cam: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for cam in CAMERAS},
        })
    return episodes


def build_fixture(root: Path, episodes: list[dict]) -> None:
    """A LeRobot v3.0 directory following lerobot's ``LeRobotDataset``/``LeRobotDatasetMetadata`` layout."""
    starts = np.concatenate([[0], np.cumsum(LENGTHS)])
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [2], "names": {"motors": ["a", "b"]}},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None},
        "next.success": {"dtype": "bool", "shape": [1], "names": None},
        **{f"observation.images.{cam}": {
            "dtype": "video", "shape": shape,
            "names": ["height", "width", "channels"] if shape[-1] == 3 else ["channels", "height", "width"],
            "info": {"video.height": 32, "video.width": 32, "video.codec": "h264", "video.pix_fmt": "gbrp",
                     "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False}}
           for cam, shape in CAMERAS.items()},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v3.0", "robot_type": "so100", "total_episodes": 3, "total_frames": int(starts[-1]),
            "total_tasks": len(TASKS), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": FPS, "splits": {"train": "0:3"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features}
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    pq.write_table(_pandas_tasks(TASKS), root / "meta/tasks.parquet")
    (root / "meta/stats.json").write_text(json.dumps({"action": {"min": [0, 0], "max": [1, 1], "mean": [0, 0],
                                                                 "std": [1, 1], "count": [37]}}))

    rows = [dict(episode_index=i, tasks=[TASKS[EPISODE_TASK[i]]], length=n, dataset_from_index=int(starts[i]),
                 dataset_to_index=int(starts[i] + n)) for i, n in enumerate(LENGTHS)]
    for f, eps in enumerate(DATA_FILES):  # data: many episodes per parquet
        parts = []
        for i in eps:
            e, n = episodes[i], LENGTHS[i]
            rows[i].update({"data/chunk_index": 0, "data/file_index": f})
            parts.append(pa.table({
                "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(e["state"].ravel()), 3),
                "action": pa.FixedSizeListArray.from_arrays(pa.array(e["action"].ravel()), 2),
                "next.reward": pa.array(e["reward"]),
                "next.done": pa.array(np.arange(n) == n - 1),
                "next.success": pa.array((np.arange(n) == n - 1) & e["success"]),
                "timestamp": pa.array((np.arange(n) / FPS).astype(np.float32)),
                "frame_index": pa.array(np.arange(n, dtype=np.int64)),
                "episode_index": pa.array(np.full(n, i, np.int64)),
                "index": pa.array(np.arange(starts[i], starts[i] + n, dtype=np.int64)),
                "task_index": pa.array(np.full(n, EPISODE_TASK[i], np.int64)),
            }))
        path = root / f"data/chunk-000/file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(parts), path)
    for cam, files in VIDEO_FILES.items():  # videos: an episode's frames follow the previous episode's
        key = f"observation.images.{cam}"
        for f, eps in enumerate(files):
            t = 0.0
            for i in eps:
                rows[i].update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": f,
                                f"videos/{key}/from_timestamp": t, f"videos/{key}/to_timestamp": t + LENGTHS[i] / FPS})
                t += LENGTHS[i] / FPS
            encode_video(root / f"videos/{key}/chunk-000/file-{f:03d}.mp4",
                         np.concatenate([episodes[i]["frames"][cam] for i in eps]), fps=FPS, lossless=True,
                         keyframe_interval=4)
    for i, row in enumerate(rows):  # per-episode stats columns, which the reader skips
        row["stats/action/mean"] = episodes[i]["action"].mean(0).tolist()
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0 if i < 2 else 1
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), root / "meta/episodes/chunk-000/file-001.parquet")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "ds"
    episodes = _make_episodes()
    build_fixture(root, episodes)
    return root, episodes


@pytest.fixture
def broken(fixture, tmp_path):
    """A copy of the fixture to break."""
    root = tmp_path / "ds"
    shutil.copytree(fixture[0], root)
    return root


def _edit_parquet(path: Path, column: str, values) -> None:
    table = pq.read_table(path)
    i = table.column_names.index(column)
    pq.write_table(table.set_column(i, column, pa.array(values, table.schema.field(column).type)), path)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_reader_values_equal_fixture(fixture, backend):
    root, episodes = fixture
    reader = LeRobotReader(root, video_backend=backend)
    assert reader.episode_names() == ["episode_000000", "episode_000001", "episode_000002"]
    assert reader.env_args == {"env_name": "so100", "type": "lerobot",
                               "env_kwargs": {"fps": FPS, "robot_type": "so100", "codebase_version": "v3.0"}}
    for name, e, n in zip(reader.episode_names(), episodes, LENGTHS):
        ep = reader.read_episode(name)
        assert len(ep) == n and set(ep.obs) == {"state", "rgb_top", "rgb_wrist"}
        np.testing.assert_array_equal(ep.obs["state"], e["state"])
        np.testing.assert_array_equal(ep.actions, e["action"])
        np.testing.assert_array_equal(ep.rewards, e["reward"])
        assert ep.dones.dtype == np.uint8 and ep.dones.tolist() == [0] * (n - 1) + [1]
        for cam in CAMERAS:  # lossless fixture videos: frames exact
            assert ep.obs[f"rgb_{cam}"].shape == (n, 32, 32, 3) and ep.obs[f"rgb_{cam}"].dtype == np.uint8
            np.testing.assert_array_equal(ep.obs[f"rgb_{cam}"], e["frames"][cam])
        assert ep.attrs["success"] is e["success"]


def test_tasks_and_instructions(fixture):
    root, _ = fixture
    reader = LeRobotReader(root)
    assert reader.tasks == {0: TASKS[0], 1: TASKS[1]}
    assert [reader.read_episode(n).attrs["instruction"] for n in reader.episode_names()] == [TASKS[t] for t in EPISODE_TASK]


def test_episode_boundaries_inside_concatenated_videos(fixture):
    """Episode 2 starts 10 frames into top/file-001 and at frame 0 of wrist/file-001; read out of order."""
    root, episodes = fixture
    reader = LeRobotReader(root, video_backend="pyav")
    ep2, ep1 = reader.read_episode("episode_000002"), reader.read_episode("episode_000001")
    top = Decoder(root / "videos/observation.images.top/chunk-000/file-001.mp4", "pyav")
    assert top.num_frames == LENGTHS[1] + LENGTHS[2]
    np.testing.assert_array_equal(top.frames([LENGTHS[1] - 1, LENGTHS[1]]), np.stack([ep1.obs["rgb_top"][-1], ep2.obs["rgb_top"][0]]))
    top.close()
    wrist = Decoder(root / "videos/observation.images.wrist/chunk-000/file-000.mp4", "pyav")
    np.testing.assert_array_equal(wrist.frames([LENGTHS[0]]), ep1.obs["rgb_wrist"][:1])  # ep1 follows ep0 there
    wrist.close()
    np.testing.assert_array_equal(ep2.obs["rgb_top"], episodes[2]["frames"]["top"])
    np.testing.assert_array_equal(ep1.obs["rgb_wrist"], episodes[1]["frames"]["wrist"])


def _our_episodes(seed: int = 1, success: bool = True) -> list[Episode]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate([11, 14, 10]):
        attrs = {"instruction": ["pick", "place"][i % 2]}
        if success:
            attrs["success"] = i != 1
        out.append(Episode(obs={"rgb_front": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                "rgb_side": np.repeat(np.linspace(0, 255, n, dtype=np.uint8)[:, None, None, None],
                                                      32 * 32 * 3).reshape(n, 32, 32, 3),
                                "state": rng.normal(size=(n, 4)).astype(np.float32)},
                           actions=rng.integers(0, 7, (n, 1)).astype(np.float32),  # discrete: [L, 1]
                           rewards=rng.random(n).astype(np.float32),
                           dones=(np.arange(n) == n - 1).astype(np.uint8), attrs=attrs))
    return out


def _assert_round_trip(path: Path, episodes: list[Episode], frames_atol: float | None = None) -> None:
    reader = LeRobotReader(path)
    assert reader.episode_names() == [f"episode_{i:06d}" for i in range(len(episodes))]
    for name, e in zip(reader.episode_names(), episodes):
        got = reader.read_episode(name)
        assert set(got.obs) == set(e.obs)
        for k in ("state",):
            np.testing.assert_array_equal(got.obs[k], e.obs[k])
        for k in (k for k in e.obs if k.startswith("rgb_")):
            if frames_atol is None:
                np.testing.assert_array_equal(got.obs[k], e.obs[k])
            else:
                assert np.abs(got.obs[k].astype(int) - e.obs[k]).mean() < frames_atol
        np.testing.assert_array_equal(got.actions, e.actions)
        np.testing.assert_array_equal(got.rewards, e.rewards)
        np.testing.assert_array_equal(got.dones, e.dones)
        assert {k: got.attrs[k] for k in e.attrs} == e.attrs


def test_writer_round_trip_lossless_and_layout(tmp_path):
    episodes = _our_episodes()
    path = write_lerobot(iter(episodes), tmp_path / "out", fps=FPS, robot_type="sim", lossless=True, episodes_per_file=2)
    _assert_round_trip(path, episodes)

    info = json.loads((path / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS and info["robot_type"] == "sim"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 35, 2)
    assert info["splits"] == {"train": "0:3"} and info["chunks_size"] == 1000
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    ft = info["features"]
    assert ft["observation.images.front"]["dtype"] == "video" and ft["observation.images.front"]["shape"] == [32, 32, 3]
    assert ft["observation.images.front"]["info"]["video.codec"] == "h264"
    assert ft["action"] == {"dtype": "float32", "shape": [1], "names": ["action_0"]}
    assert list(ft)[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    for f in ("data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
              "videos/observation.images.side/chunk-000/file-001.mp4", "meta/episodes/chunk-000/file-000.parquet"):
        assert (path / f).is_file(), f

    data = pq.read_table(path / "data/chunk-000/file-000.parquet")
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 4)
    assert data.schema.field("action").type == pa.float32()  # shape [1]: a scalar column, as datasets.Value
    assert data.column("index").to_pylist() == list(range(25))
    assert data.column("timestamp").to_pylist()[:2] == pytest.approx([0.0, 0.1])

    eps = pq.read_table(path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["tasks"] for e in eps] == [["pick"], ["place"], ["pick"]]
    assert [(e["dataset_from_index"], e["dataset_to_index"], e["data/file_index"]) for e in eps] == [(0, 11, 0), (11, 25, 0), (25, 35, 1)]
    key = "videos/observation.images.front"
    assert [(e[f"{key}/file_index"], e[f"{key}/from_timestamp"], e[f"{key}/to_timestamp"]) for e in eps] == \
        [(0, 0.0, 1.1), (0, 1.1, 2.5), (1, 0.0, 1.0)]
    assert eps[0]["stats/observation.state/mean"] == pytest.approx(episodes[0].obs["state"].mean(0).tolist(), rel=1e-5)

    tasks = pq.read_table(path / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["__index_level_0__"]
    assert tasks.column("__index_level_0__").to_pylist() == ["pick", "place"]

    stats = json.loads((path / "meta/stats.json").read_text())
    state = np.concatenate([e.obs["state"] for e in episodes])
    for name, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
        np.testing.assert_allclose(stats["observation.state"][name], fn(state, 0), rtol=1e-5, atol=1e-6)
    assert stats["observation.state"]["count"] == [35]
    side = np.concatenate([e.obs["rgb_side"] for e in episodes]) / 255.0
    np.testing.assert_allclose(np.array(stats["observation.images.side"]["mean"]).ravel(), side.mean((0, 1, 2)), rtol=1e-6)
    assert np.array(stats["observation.images.side"]["std"]).shape == (3, 1, 1)


def test_writer_round_trip_lossy_and_inline_images(tmp_path):
    episodes = _our_episodes(seed=2, success=False)
    for e in episodes:  # smooth frames: what h264 at crf 18 keeps well
        e.obs["rgb_front"] = np.repeat(np.repeat(e.obs["rgb_front"][:, :4, :4], 8, 1), 8, 2)
    path = write_lerobot(episodes, tmp_path / "lossy", fps=FPS)
    _assert_round_trip(path, episodes, frames_atol=4.0)
    assert "next.success" not in json.loads((path / "meta/info.json").read_text())["features"]

    path = write_lerobot(episodes, tmp_path / "images", fps=FPS, video=False)  # PNG frames inside the parquet
    info = json.loads((path / "meta/info.json").read_text())
    assert info["video_path"] is None and info["features"]["observation.images.front"]["dtype"] == "image"
    assert not (path / "videos").exists()
    _assert_round_trip(path, episodes)


def test_writer_refuses_bad_input(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(ToolkitError, match="not an empty directory"):
        write_lerobot(_our_episodes(), tmp_path / "full")
    episodes = _our_episodes()
    episodes[2].obs["state"] = episodes[2].obs["state"][:, :2]
    with pytest.raises(ToolkitError, match="episode 2 .*differ from the first episode"):
        write_lerobot(episodes, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "mixed.tmp").exists()


def test_missing_info_and_wrong_version(broken):
    (broken / "meta/info.json").rename(broken / "meta/info.bak")
    with pytest.raises(ToolkitError, match=r"meta/info\.json does not exist"):
        LeRobotReader(broken)
    info = json.loads((broken / "meta/info.bak").read_text())
    (broken / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(ToolkitError, match=r"info\.json: codebase_version 'v2.1'.*convert_dataset_v21_to_v30"):
        LeRobotReader(broken)


def test_missing_data_and_video_files(broken):
    (broken / "data/chunk-000/file-001.parquet").unlink()
    (broken / "videos/observation.images.top/chunk-000/file-000.mp4").unlink()
    reader = LeRobotReader(broken)
    with pytest.raises(ToolkitError, match=r"episode episode_000002: its data file .*data/chunk-000/file-001\.parquet does not exist"):
        reader.read_episode("episode_000002")
    with pytest.raises(ToolkitError, match=r"episode episode_000000: its video .*observation\.images\.top/chunk-000/file-000\.mp4"):
        reader.read_episode("episode_000000")
    reader.read_episode("episode_000001")  # the others still read
    with pytest.raises(ToolkitError, match="no episode 'episode_000007'"):
        reader.read_episode("episode_000007")


def test_video_shorter_than_episode(broken, fixture):
    _, episodes = fixture
    frames = np.concatenate([episodes[1]["frames"]["wrist"], episodes[2]["frames"]["wrist"]])
    path = broken / "videos/observation.images.wrist/chunk-000/file-000.mp4"
    encode_video(path, frames[:15], fps=FPS, lossless=True)  # 15 frames where episodes 0 and 1 need 22
    reader = LeRobotReader(broken)
    reader.read_episode("episode_000000")
    with pytest.raises(ToolkitError, match=r"episode episode_000001: video .*wrist/chunk-000/file-000\.mp4 has 15 frames.*shorter"):
        reader.read_episode("episode_000001")


def test_mismatched_lengths_and_missing_metadata(broken):
    meta = broken / "meta/episodes/chunk-000/file-000.parquet"
    _edit_parquet(meta, "length", [12, 9])
    reader = LeRobotReader(broken)
    reader.read_episode("episode_000000")
    with pytest.raises(ToolkitError, match=r"episode episode_000001: mismatched lengths: length=9 in .*file-000\.parquet"):
        reader.read_episode("episode_000001")
    (broken / "meta/tasks.parquet").unlink()
    with pytest.raises(ToolkitError, match=r"meta/tasks\.parquet does not exist"):
        LeRobotReader(broken)


# --- LeRobot's default codec (AV1), decoder choice, fps and robot type through conversion -------------------

def _encode_av1(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """A video as LeRobot 0.4 encodes it by default: libsvtav1, yuv420p, crf 30, a keyframe every 2 frames."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libsvtav1", rate=fps, options={"crf": "30", "g": "2"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def av1_fixture(fixture, tmp_path_factory):
    """The fixture with every video re-encoded as LeRobot's default AV1."""
    src, episodes = fixture
    root = tmp_path_factory.mktemp("av1") / "ds"
    shutil.copytree(src, root)
    for cam, files in VIDEO_FILES.items():
        for f, eps in enumerate(files):
            _encode_av1(root / f"videos/observation.images.{cam}/chunk-000/file-{f:03d}.mp4",
                        np.concatenate([episodes[i]["frames"][cam] for i in eps]))
    return root, episodes


def test_av1_dataset_reads_by_default_and_decord_fails_clearly(av1_fixture):
    root, episodes = av1_fixture
    reader = LeRobotReader(root)  # default video_backend: auto
    for name, i in (("episode_000002", 2), ("episode_000000", 0)):  # episode 2 starts inside top/file-001
        ep = reader.read_episode(name)
        path = root / f"videos/observation.images.top/chunk-000/file-{0 if i == 0 else 1:03d}.mp4"
        start = 0 if i == 0 else LENGTHS[1]
        decoder = Decoder(path, "pyav")
        np.testing.assert_array_equal(ep.obs["rgb_top"], decoder.frames(np.arange(start, start + LENGTHS[i])))
        decoder.close()
        np.testing.assert_array_equal(ep.obs["state"], episodes[i]["state"])
    with pytest.raises(ToolkitError, match=r"observation\.images\.top/chunk-000/file-000\.mp4 is av1, which decord "
                                           r"cannot decode.*video_backend=auto"):
        LeRobotReader(root, video_backend="decord").read_episode("episode_000000")


def _info(path: Path) -> dict:
    return json.loads((path / "meta/info.json").read_text())


def test_fps_and_robot_type_survive_conversion_to_ours_and_back(fixture, tmp_path):
    """10 fps 'so100' -> our file (env_args) -> LeRobot again: 10 fps 'so100', timestamps 0.1 s apart."""
    import h5py

    from toolkit.convert import convert
    from toolkit.formats.hdf5 import HDF5Reader
    from toolkit.formats.lerobot import recorded_rate

    root, episodes = fixture
    ours = tmp_path / "ours.hdf5"
    convert(root, ours, "lerobot", "hdf5", video={"crf": 18}, progress=False)
    assert recorded_rate(HDF5Reader(ours).env_args) == (FPS, "so100")
    with h5py.File(ours) as f:  # the MP4 sidecars are encoded at the dataset's rate too
        assert json.loads(f["data"].attrs["video"])["fps"] == FPS

    back = tmp_path / "back"
    convert(ours, back, "hdf5", "lerobot", progress=False)
    info = _info(back)
    assert (info["fps"], info["robot_type"]) == (FPS, "so100")
    data = pq.read_table(back / "data/chunk-000/file-000.parquet")
    first = data.filter(pc.equal(data.column("episode_index"), 1))
    np.testing.assert_allclose(first.column("timestamp").to_numpy(), np.arange(LENGTHS[1]) / FPS, atol=1e-6)
    eps = pq.read_table(back / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert eps[1]["videos/observation.images.top/from_timestamp"] == pytest.approx(LENGTHS[0] / FPS)
    reader = LeRobotReader(back)
    for name, e in zip(reader.episode_names(), episodes):
        ep = reader.read_episode(name)
        np.testing.assert_array_equal(ep.obs["state"], e["state"])
        assert np.abs(ep.obs["rgb_top"].astype(int) - e["frames"]["top"]).mean() < 40  # twice lossy h264 of noise


def _no_rate_file(path: Path) -> Path:
    """One of our files whose env_args record no frame rate (as collected from a simulator)."""
    from toolkit.datamodules.episode_file import EpisodeWriter

    writer = EpisodeWriter(path, {"env_name": "sim", "type": "toolkit", "env_kwargs": {}})
    for e in _our_episodes():
        writer.append(e.to_gdict(), {"success": bool(e.attrs["success"])})
    return path


def test_fps_and_robot_type_flags(fixture, tmp_path, caplog):
    from toolkit.convert import convert

    root, _ = fixture
    ours = tmp_path / "ours.hdf5"
    convert(root, ours, "lerobot", "hdf5", progress=False)
    caplog.set_level("WARNING", logger="toolkit")
    convert(ours, tmp_path / "same", "hdf5", "lerobot", fps=FPS, robot_type="so100", progress=False)
    assert not caplog.records  # the source's own values: nothing to say
    convert(ours, tmp_path / "fast", "hdf5", "lerobot", fps=30, robot_type="koch", progress=False)
    assert (_info(tmp_path / "fast")["fps"], _info(tmp_path / "fast")["robot_type"]) == (30, "koch")
    assert "--fps 30 overrides the source's 10 fps: its timestamps will run 3x as fast" in caplog.text
    assert "--robot-type koch overrides the source's robot type so100" in caplog.text

    caplog.clear()
    sim = _no_rate_file(tmp_path / "sim.hdf5")
    convert(sim, tmp_path / "default", "hdf5", "lerobot", progress=False)
    assert (_info(tmp_path / "default")["fps"], _info(tmp_path / "default")["robot_type"]) == (20, None)
    assert "records no frame rate: writing 20 fps (pass --fps to set it)" in caplog.text
    caplog.clear()
    convert(sim, tmp_path / "given", "hdf5", "lerobot", fps=15, robot_type="sawyer", progress=False)
    assert (_info(tmp_path / "given")["fps"], _info(tmp_path / "given")["robot_type"]) == (15, "sawyer")
    assert not caplog.records
    data = pq.read_table(tmp_path / "given/data/chunk-000/file-000.parquet")
    assert data.column("timestamp").to_pylist()[:3] == pytest.approx([0, 1 / 15, 2 / 15])

    with pytest.raises(ToolkitError, match="--fps/--robot-type .* --to hdf5 has neither"):
        convert(ours, tmp_path / "x.hdf5", "lerobot", "hdf5", fps=10)
    with pytest.raises(ToolkitError, match="--fps 0: must be a positive"):
        convert(ours, tmp_path / "zero", "hdf5", "lerobot", fps=0)


def test_cli_video_backend_flag(av1_fixture, tmp_path, capsys):
    """`--video-backend` reaches the reader; decord on AV1 fails naming the file, leaving no output file."""
    import subprocess
    import sys

    from toolkit.convert import merge_video_backend
    from toolkit.validate import main as validate_main

    root, _ = av1_fixture
    out = tmp_path / "out.hdf5"
    proc = subprocess.run([sys.executable, "-m", "toolkit.convert", str(root), str(out), "--from", "lerobot",
                           "--video-backend", "decord"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "file-000.mp4 is av1, which decord cannot decode" in proc.stderr and "--video-backend auto" in proc.stderr
    assert not out.exists()
    assert validate_main([str(root), "--format", "lerobot", "--video-backend", "pyav"]) == 0
    assert "no problems found" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: not a backend
        validate_main([str(root), "--format", "lerobot", "--video-backend", "opencv"])
    with pytest.raises(ToolkitError, match="disagree"):
        merge_video_backend({"video_backend": "pyav"}, "decord")


def test_data_lerobot_config_passes_the_video_backend_to_the_source():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides, want in (([], "auto"), (["data.video_backend=pyav"], "pyav")):
            cfg = compose("train", overrides=["data=lerobot", "data.source.path=/x/ds", *overrides])
            assert cfg.data.video_backend == cfg.data.source.options.video_backend == want
