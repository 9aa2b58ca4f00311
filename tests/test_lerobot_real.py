"""LeRobot datasets as LeRobot 0.4.4 itself writes them (``LeRobotDataset.create`` / ``add_frame`` /
``save_episode`` / ``finalize``: AV1 video, libsvtav1 crf 30 yuv420p), read by our tools with their default
settings, and ours read back by LeRobot's own ``LeRobotDataset``.

LeRobot runs in ``.venv-compare`` (``make compare-venv``: lerobot and robomimic on top of ``.venv``), in a
subprocess; these tests run in ``.venv``, which has no lerobot. Without ``.venv-compare`` they are skipped,
except under CI (``CI`` set), where they fail: CI builds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import COMPARE_PYTHON, ROOT, compare_python
from toolkit.errors import ToolkitError

FPS, ROBOT, LENGTH, SIZE = 10, "so100", 15, 64
TASKS = ["pick the cube", "place the cube"]

# Runs in .venv-compare. `read ROOT OUT`: every item as LeRobotDataset returns it (frames decoded by its default
# decoder, torchcodec) into OUT.npz, and the dataset's fps / robot type / codec into OUT.json. `write ROOT OUT
# FPS ROBOT LENGTH SIZE TASKS`: first a dataset made by LeRobot's own recording API (default codec: AV1), then
# `read` (one process: lerobot takes seconds to import).
LEROBOT_SCRIPT = r'''
import json, sys
import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

mode, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "write":
    fps, robot, length, size, tasks = int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), json.loads(sys.argv[8])
    features = {
        "observation.images.top": {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["a", "b"]},
    }
    ds = LeRobotDataset.create(repo_id="local/so100_test", fps=fps, features=features, root=root, robot_type=robot)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for e, task in enumerate(tasks):
        for i in range(length):  # smooth frames that move 8 px a step: a frame off by one shows
            img = np.stack([(xx * 4 + 8 * i) % 256, (yy * 4 + 60 * e) % 256, ((xx + yy) * 2 + 5 * i) % 256], -1)
            ds.add_frame({"observation.images.top": img.astype(np.uint8),
                          "observation.state": rng.normal(size=3).astype(np.float32),
                          "action": rng.normal(size=2).astype(np.float32), "task": task})
        ds.save_episode()
    ds.finalize()
# read
ds = LeRobotDataset("local/so100_test", root=root)
items = [ds[i] for i in range(len(ds))]
np.savez(out + ".npz",
         frames=np.stack([(it["observation.images.top"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
                          for it in items]),
         state=np.stack([it["observation.state"].numpy() for it in items]),
         action=np.stack([it["action"].numpy() for it in items]),
         timestamp=np.array([float(it["timestamp"]) for it in items]),
         episode_index=np.array([int(it["episode_index"]) for it in items]),
         task=np.array([it["task"] for it in items]))
video = ds.meta.features["observation.images.top"].get("info") or {}
json.dump({"fps": ds.fps, "robot_type": ds.meta.robot_type, "num_episodes": ds.num_episodes,
           "codec": video.get("video.codec"), "video_backend": ds.video_backend}, open(out + ".json", "w"))
'''


def run_lerobot(*args: str, tmp: Path) -> None:
    script = tmp / "lerobot_script.py"
    script.write_text(LEROBOT_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(tmp / "hf_lerobot_home")}
    proc = subprocess.run([str(COMPARE_PYTHON), str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"LeRobot ({' '.join(map(str, args[:2]))}) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def read_with_lerobot(root: Path, tmp: Path, *write: object) -> tuple[dict[str, np.ndarray], dict]:
    """LeRobot's items and metadata of the dataset at ``root`` (written first by LeRobot, given ``write`` args)."""
    out = tmp / f"read_{root.name}"
    run_lerobot("write" if write else "read", root, out, *write, tmp=tmp)
    with np.load(str(out) + ".npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(Path(str(out) + ".json").read_text())


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def lerobot_dataset(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], dict]:
    """(dataset dir written by LeRobot, LeRobot's own decoded items, its metadata)."""
    compare_python("lerobot 0.4.4")
    tmp = tmp_path_factory.mktemp("lerobot_real")
    root = tmp / "so100_test"
    items, meta = read_with_lerobot(root, tmp, FPS, ROBOT, LENGTH, SIZE, json.dumps(TASKS))
    assert meta["codec"] == "av1" and (meta["fps"], meta["robot_type"], meta["num_episodes"]) == (FPS, ROBOT, 2)
    return root, items, meta


@pytest.fixture(scope="module")
def converted(lerobot_dataset, tmp_path_factory) -> Path:
    """`python -m toolkit.convert DIR out.hdf5 --from lerobot`, default settings."""
    root, _, _ = lerobot_dataset
    out = tmp_path_factory.mktemp("converted") / "out.hdf5"
    proc = cli("toolkit.convert", root, out, "--from", "lerobot")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _episode_rows(items: dict[str, np.ndarray], episode: int) -> np.ndarray:
    return np.flatnonzero(items["episode_index"] == episode)


def test_convert_with_defaults_decodes_the_frames_lerobot_decodes(lerobot_dataset, converted):
    """Both sides decode the same AV1 stream (our PyAV/libdav1d, LeRobot's torchcodec): the same frames."""
    from toolkit.formats.hdf5 import HDF5Reader
    from toolkit.formats.lerobot import recorded_rate

    _, items, _ = lerobot_dataset
    reader = HDF5Reader(converted)
    names = reader.episode_names()
    assert len(names) == 2
    assert recorded_rate(reader.env_args) == (FPS, ROBOT)
    for e, name in enumerate(names):
        ep, rows = reader.read_episode(name), _episode_rows(items, e)
        assert len(ep) == LENGTH == len(rows)
        assert ep.obs["rgb_top"].shape == (LENGTH, SIZE, SIZE, 3) and ep.obs["rgb_top"].dtype == np.uint8
        diff = np.abs(ep.obs["rgb_top"].astype(int) - items["frames"][rows])
        assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())  # measured here: 0 and 0.0
        np.testing.assert_array_equal(ep.obs["state"], items["state"][rows])
        np.testing.assert_array_equal(ep.actions, items["action"][rows])
        assert ep.attrs["instruction"] == TASKS[e] == items["task"][rows[0]]


def test_validate_with_defaults_and_decord_named_on_av1(lerobot_dataset, tmp_path):
    from toolkit.convert import convert

    root, _, _ = lerobot_dataset
    proc = cli("toolkit.validate", root, "--format", "lerobot")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no problems found" in proc.stdout and "'fps': 10" in proc.stdout
    with pytest.raises(ToolkitError, match=r"observation\.images\.top/chunk-000/file-000\.mp4 is av1, which decord "
                                           r"cannot decode .*video_backend=auto"):
        convert(root, tmp_path / "x.hdf5", "lerobot", "hdf5", video_backend="decord", progress=False)


def test_fps_and_robot_type_survive_the_round_trip_and_lerobot_loads_ours(lerobot_dataset, converted, tmp_path):
    """LeRobot (10 fps, so100) -> ours -> `--to lerobot` -> LeRobotDataset: 10 fps, so100, 0.1 s steps."""
    _, items, _ = lerobot_dataset
    back = tmp_path / "so100_back"
    proc = cli("toolkit.convert", converted, back, "--from", "hdf5", "--to", "lerobot")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr  # the source's fps is used: nothing to override or default
    got, meta = read_with_lerobot(back, tmp_path)
    assert (meta["fps"], meta["robot_type"], meta["num_episodes"]) == (FPS, ROBOT, 2)
    np.testing.assert_allclose(got["timestamp"], np.tile(np.arange(LENGTH) / FPS, 2), atol=1e-5)
    np.testing.assert_array_equal(got["episode_index"], items["episode_index"])
    np.testing.assert_array_equal(got["state"], items["state"])
    np.testing.assert_array_equal(got["action"], items["action"])
    assert list(got["task"]) == list(items["task"])
    diff = np.abs(got["frames"].astype(int) - items["frames"])  # re-encoded (h264 yuv444p crf 18): close
    assert diff.mean() < 3, diff.mean()
    info = json.loads((back / "meta/info.json").read_text())
    assert (info["fps"], info["robot_type"]) == (FPS, ROBOT)


def test_datamodule_reads_the_dataset_as_data_lerobot_converts_it(lerobot_dataset, tmp_path):
    """What `train.py data=lerobot data.source.path=DIR` does before training: convert data.source (default
    settings: video_backend auto, MP4 sidecars) into data.path, then the datamodule's windows."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from toolkit.convert import convert_source

    root, items, _ = lerobot_dataset
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=lerobot", f"data.source.path={root}", f"data.path={tmp_path / 'ds.hdf5'}",
                                          "data.num_workers=0", "data.batch_size=4", "data.history=2", "data.horizon=3"])
    assert cfg.data.source.options.video_backend == "auto"
    convert_source(cfg.data.source, cfg.data.path, progress=False)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.video and dm.shape_meta["image_shape"]["rgb_top"] == [SIZE, SIZE, 3]
    assert (dm.shape_meta["state_dim"], dm.shape_meta["action_dim"]) == (3, 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["obs"]["rgb_top"].shape == (4, 2, 3, SIZE, SIZE) and str(batch["obs"]["rgb_top"].dtype) == "torch.uint8"
    assert batch["obs"]["state"].shape == (4, 2, 3) and batch["action"].shape == (4, 3, 2)
    window = dm.train_set[0]  # the first window of the first training episode: its first steps
    rows = _episode_rows(items, 0)
    np.testing.assert_array_equal(window["obs"]["state"][-1].numpy(), items["state"][rows[0]])
    frame = window["obs"]["rgb_top"][-1].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(frame - items["frames"][rows[0]]).mean() < 3  # the sidecar MP4 (h264 crf 18) of LeRobot's frame


def test_train_py_on_the_dataset_as_lerobot_wrote_it(lerobot_dataset, tmp_path):
    """`python train.py data=lerobot data.source.path=DIR` with defaults otherwise: the dataset (a 64 px `top`
    camera, 3-d state, 2-d actions) does not fit the default Meta-World env, so rollouts turn off with a
    warning naming both sides and the best checkpoint follows val/loss (env=none: tests/test_data_env.py)."""
    from conftest import run_train

    root, _, _ = lerobot_dataset
    proc = run_train("data=lerobot", f"data.source.path={root}", root=tmp_path)
    out = proc.stdout + proc.stderr
    assert "does not fit env" in out and "rgb_top" in out and "rgb_corner4" in out
    summary = json.loads(next(tmp_path.glob("logs/debug/runs/*/summary.json")).read_text())
    assert summary["global_step"] == 4 and "rollout/success_rate" not in summary
    assert "valloss" in Path(summary["best_checkpoint"]).name
