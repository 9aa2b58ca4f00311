"""LeRobot datasets, codebase version v3.0 (Hugging Face ``lerobot``): read, and write.

A v3.0 dataset is a directory (names from ``lerobot/datasets/utils.py`` and ``lerobot_dataset.py``)::

    meta/info.json                      codebase_version "v3.0", fps, features {key: {dtype, shape, names[, info]}},
                                        total_episodes, total_frames, total_tasks, chunks_size,
                                        data_files_size_in_mb, video_files_size_in_mb, splits,
                                        data_path  "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                                        video_path "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    meta/stats.json                     {feature: {min, max, mean, std, count}} over the whole dataset
    meta/tasks.parquet                  pandas frame: index = task string, column task_index
    meta/episodes/chunk-*/file-*.parquet  one row per episode: episode_index, tasks (list of strings), length,
                                        data/chunk_index, data/file_index, dataset_from_index, dataset_to_index,
                                        videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp},
                                        stats/<feature>/<stat>, meta/episodes/{chunk_index, file_index}
    data/chunk-*/file-*.parquet         one row per frame, many episodes per file: every non-video feature
                                        (shape [1] as a scalar column, [D] as a fixed-size list), timestamp
                                        (seconds from the episode's start), frame_index, episode_index, index
                                        (global frame number), task_index
    videos/<key>/chunk-*/file-*.mp4     one camera, many episodes one after another; an episode's frame at
                                        ``timestamp`` is the file's frame at ``from_timestamp + timestamp``

Keys map to our episodes as ``observation.state`` -> ``obs/state``, ``action`` -> ``actions``,
``observation.images.<camera>`` -> ``obs/rgb_<camera>``, other ``observation.<key>`` -> ``obs/<key>``,
``next.reward`` -> ``rewards`` (zeros if absent), ``next.success`` -> attribute ``success``, the episode's
task -> attribute ``instruction``; ``dones`` is 1 on the last step.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk folder
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200  # lerobot's current default (500 in early v3.0 releases)

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"

DEFAULT_FEATURES = {  # lerobot adds these to every dataset, after the user's features
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
IMAGES_PREFIX = "observation.images."
REWARD_KEY, DONE_KEY, SUCCESS_KEY = "next.reward", "next.done", "next.success"


def episode_name(index: int) -> str:
    return f"episode_{index:06d}"


def _camera(key: str) -> str:
    """``observation.images.top`` -> ``top`` (other camera keys: dots become underscores)."""
    return key[len(IMAGES_PREFIX):] if key.startswith(IMAGES_PREFIX) else key.replace(".", "_")


def _column_array(table: pa.Table, key: str, where: str) -> np.ndarray:
    """A per-frame column as ``[n, ...]``: scalar columns (shape [1] features) as ``[n, 1]``, lists as ``[n, D]``."""
    arr = table.column(key).combine_chunks()
    n = len(arr)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if pa.types.is_nested(arr.type.value_type):
            raise ToolkitError(f"{where}: feature {key!r} has nested per-frame arrays ({arr.type}); "
                               f"only scalar and 1-D features are read")
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        if n and len(flat) % n:
            raise ToolkitError(f"{where}: feature {key!r} has rows of different lengths")
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    if pa.types.is_boolean(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        return arr.to_numpy(zero_copy_only=False).reshape(n, 1)
    raise ToolkitError(f"{where}: feature {key!r} has column type {arr.type}, not a number or a list of numbers")


class LeRobotReader:
    """Episodes of a LeRobot v3.0 dataset directory.

    ``state_key``/``action_key`` choose the features read as ``obs/state`` and ``actions``;
    ``video_backend`` is one of ``toolkit.datamodules.video.BACKENDS``: ``auto`` (default) decodes the
    AV1 videos LeRobot writes by default with PyAV and h264/hevc ones with decord; ``decord`` on AV1 fails
    with a message naming the file and the codec. ``env_args`` carries the dataset's ``fps`` and
    ``robot_type`` (under ``env_kwargs``) into our episode file, and from it back into ``write_lerobot``.
    """

    def __init__(self, path: str | Path, state_key: str = "observation.state", action_key: str = "action",
                 video_backend: str = "auto") -> None:
        from toolkit.datamodules.video import DecoderCache

        self.root = Path(path)
        self.state_key, self.action_key = state_key, action_key
        self.info = self._load_info()
        self.fps = self.info["fps"]
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        for key in (state_key, action_key):
            if key not in self.features:
                raise ToolkitError(f"{self.root / INFO_PATH}: no feature {key!r} (features: "
                                   f"{', '.join(self.features)}); pass state_key/action_key to choose others")
        self.video_keys = [k for k, ft in self.features.items() if ft.get("dtype") == "video"]
        self.image_keys = [k for k, ft in self.features.items() if ft.get("dtype") == "image"]
        if self.video_keys and not self.info.get("video_path"):
            raise ToolkitError(f"{self.root / INFO_PATH}: video features {self.video_keys} but no video_path")
        self.tasks = self._load_tasks()
        self.episodes = self._load_episodes()
        robot = self.info.get("robot_type")
        self.env_args = {"env_name": robot or self.root.name, "type": "lerobot",
                         "env_kwargs": {"fps": self.fps, "robot_type": robot,
                                        "codebase_version": self.info.get("codebase_version")}}
        self._decoders = DecoderCache(video_backend)
        self._table: tuple[Path, pa.Table] | None = None  # the last data file read: episodes come in order

    # --- metadata -----------------------------------------------------------------------------
    def _load_info(self) -> dict[str, Any]:
        path = self.root / INFO_PATH
        if not path.is_file():
            raise ToolkitError(f"{path} does not exist: {self.root} is not a LeRobot dataset directory "
                               f"(a v3.0 dataset keeps its metadata in meta/info.json)")
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ToolkitError(f"{path} is not readable JSON ({e})") from None
        version = str(info.get("codebase_version"))
        if not version.startswith("v3."):
            hint = (" Convert it with lerobot's `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30`."
                    if version.startswith("v2.") else "")
            raise ToolkitError(f"{path}: codebase_version {version!r}; this reader reads LeRobot {CODEBASE_VERSION} "
                               f"datasets (data/chunk-*/file-*.parquet).{hint}")
        missing = [k for k in ("fps", "features", "data_path") if k not in info]
        if missing:
            raise ToolkitError(f"{path} lacks {', '.join(missing)}: not a complete LeRobot {CODEBASE_VERSION} info.json")
        return info

    def _load_tasks(self) -> dict[int, str]:
        """task_index -> task. lerobot writes a pandas frame indexed by the task string (stored as the column
        ``__index_level_0__``, or ``task`` where the index is named); a plain ``task`` column reads too."""
        path = self.root / TASKS_PATH
        if not path.is_file():
            raise ToolkitError(f"{path} does not exist: the dataset's tasks (instructions) are missing")
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ToolkitError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        names = table.column_names
        task_col = None
        meta = (table.schema.metadata or {}).get(b"pandas")
        if meta:
            index_cols = [c for c in json.loads(meta).get("index_columns", []) if isinstance(c, str)]
            task_col = next((c for c in index_cols if c in names), None)
        task_col = task_col or next((c for c in ("task", "__index_level_0__") if c in names), None)
        if task_col is None or "task_index" not in names:
            raise ToolkitError(f"{path}: expected a task string column (the pandas index) and task_index, "
                               f"found columns {names}")
        return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(task_col).to_pylist())}

    def _load_episodes(self) -> dict[int, dict[str, Any]]:
        files = sorted((self.root / EPISODES_DIR).glob("*/*.parquet"))
        if not files:
            raise ToolkitError(f"{self.root / EPISODES_DIR} holds no chunk-*/file-*.parquet: the episode metadata "
                               f"of this LeRobot dataset is missing")
        required = ["episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                    "dataset_to_index"]
        for key in self.video_keys:
            required += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
        episodes: dict[int, dict[str, Any]] = {}
        for path in files:
            try:
                schema = pq.read_schema(path)
                table = pq.read_table(path, columns=[c for c in schema.names if not c.startswith("stats/")])
            except Exception as e:
                raise ToolkitError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
            missing = [c for c in required if c not in table.column_names]
            if missing:
                raise ToolkitError(f"{path} lacks the episode columns {', '.join(missing)}")
            for row in table.to_pylist():
                row["_file"] = path
                episodes[int(row["episode_index"])] = row
        return dict(sorted(episodes.items()))

    def episode_names(self) -> list[str]:
        return [episode_name(i) for i in self.episodes]

    # --- episodes -----------------------------------------------------------------------------
    def _data_table(self, path: Path, where: str) -> pa.Table:
        if self._table is not None and self._table[0] == path:
            return self._table[1]
        if not path.is_file():
            raise ToolkitError(f"{where}: its data file {path} does not exist")
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ToolkitError(f"{where}: its data file {path} is not readable parquet ({type(e).__name__}: {e})") from None
        if "episode_index" not in table.column_names:
            raise ToolkitError(f"{where}: data file {path} has no episode_index column")
        self._table = (path, table)
        return table

    def read_episode(self, name: str) -> Episode:
        try:
            index = int(name.rsplit("_", 1)[-1]) if name.startswith("episode_") else -1
        except ValueError:
            index = -1
        if index not in self.episodes:
            raise ToolkitError(f"{self.root}: no episode {name!r} (episodes are named like {episode_name(0)!r})")
        ep = self.episodes[index]
        where = f"{self.root}: episode {name}"
        data_path = self.root / self.info["data_path"].format(chunk_index=int(ep["data/chunk_index"]),
                                                               file_index=int(ep["data/file_index"]))
        table = self._data_table(data_path, where)
        rows = table.filter(pc.equal(table.column("episode_index"), index))
        if "frame_index" in rows.column_names:
            rows = rows.sort_by("frame_index")
        n = int(ep["length"])
        span = int(ep["dataset_to_index"]) - int(ep["dataset_from_index"])
        if rows.num_rows != n or span != n:
            raise ToolkitError(f"{where}: mismatched lengths: length={n} in {ep['_file']}, dataset_to_index - "
                               f"dataset_from_index = {span}, {rows.num_rows} rows in {data_path}")
        where_data = f"{where} ({data_path})"
        for key in (self.state_key, self.action_key):
            if key not in rows.column_names:
                raise ToolkitError(f"{where_data}: no column {key!r}")

        obs: dict[str, np.ndarray] = {"state": _column_array(rows, self.state_key, where_data).astype(np.float32)}
        actions = _column_array(rows, self.action_key, where_data).astype(np.float32)
        skip = {self.state_key, self.action_key, *self.video_keys, *self.image_keys}
        for key, ft in self.features.items():  # other observations, e.g. observation.environment_state
            if key.startswith("observation.") and key not in skip and key in rows.column_names \
                    and ft.get("dtype") not in ("string", "audio"):
                obs[key[len("observation."):]] = _column_array(rows, key, where_data)
        rewards = (_column_array(rows, REWARD_KEY, where_data)[:, 0].astype(np.float32)
                   if REWARD_KEY in rows.column_names else np.zeros(n, np.float32))
        dones = np.zeros(n, np.uint8)
        dones[-1:] = 1
        attrs: dict[str, Any] = {"source": "lerobot"}
        if SUCCESS_KEY in rows.column_names:
            attrs["success"] = bool(_column_array(rows, SUCCESS_KEY, where_data).any())
        task = self._task(ep, rows)
        if task:
            attrs["instruction"] = task

        if self.video_keys:
            if "timestamp" in rows.column_names:
                ts = rows.column("timestamp").to_numpy().astype(np.float64)
            else:
                ts = np.arange(n, dtype=np.float64) / self.fps
            for key in self.video_keys:
                obs[f"rgb_{_camera(key)}"] = self._video_frames(key, ep, ts, where)
        for key in self.image_keys:
            obs[f"rgb_{_camera(key)}"] = self._inline_images(rows, key, where_data)

        episode = Episode(obs=obs, actions=actions, rewards=rewards, dones=dones, attrs=attrs)
        episode.check(where)
        return episode

    def _task(self, ep: dict[str, Any], rows: pa.Table) -> str | None:
        """The task of the episode's first frame (its task_index), else the first of the episode's tasks."""
        if "task_index" in rows.column_names and rows.num_rows:
            task = self.tasks.get(int(rows.column("task_index")[0].as_py()))
            if task is not None:
                return task
        tasks = ep.get("tasks") or []
        return str(tasks[0]) if len(tasks) else None

    def _video_frames(self, key: str, ep: dict[str, Any], ts: np.ndarray, where: str) -> np.ndarray:
        path = self.root / self.info["video_path"].format(video_key=key, chunk_index=int(ep[f"videos/{key}/chunk_index"]),
                                                          file_index=int(ep[f"videos/{key}/file_index"]))
        if not path.is_file():
            raise ToolkitError(f"{where}: its video {path} ({key}) does not exist")
        decoder = self._decoders.get(path)
        start = float(ep[f"videos/{key}/from_timestamp"])
        indices = np.round((start + ts) * self.fps).astype(np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= decoder.num_frames):
            raise ToolkitError(f"{where}: video {path} has {decoder.num_frames} frames but the episode needs frames "
                               f"{int(indices.min())}..{int(indices.max())} (from_timestamp={start}, {len(ts)} steps): "
                               f"the video is shorter than the episode")
        frames = decoder.frames(indices)
        shape = [int(s) for s in self.features[key].get("shape", [])]
        if len(shape) == 3:
            allowed = {tuple(shape), (shape[1], shape[2], shape[0])}  # [H, W, C] or [C, H, W]
            if tuple(frames.shape[1:]) not in allowed:
                raise ToolkitError(f"{where}: video {path} has frames of shape {frames.shape[1:]} but info.json "
                                   f"declares {key} with shape {shape}")
        return frames

    def _inline_images(self, rows: pa.Table, key: str, where: str) -> np.ndarray:
        """Image features: Hugging Face ``Image`` structs {bytes, path} in the data parquet (PNG/JPEG bytes)."""
        from PIL import Image

        frames = []
        for i, item in enumerate(rows.column(key).to_pylist()):
            data = item.get("bytes") if isinstance(item, dict) else item
            if data is None and isinstance(item, dict) and item.get("path"):
                p = Path(item["path"])
                p = p if p.is_absolute() else self.root / p
                data = p.read_bytes() if p.is_file() else None
            if data is None:
                raise ToolkitError(f"{where}: frame {i} of image feature {key!r} has no bytes")
            frames.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        return np.stack(frames).astype(np.uint8) if frames else np.zeros((0, 0, 0, 3), np.uint8)


# --- writing -------------------------------------------------------------------------------------

def recorded_rate(env_args: dict[str, Any] | None) -> tuple[int | None, str | None]:
    """``(fps, robot_type)`` a dataset recorded, from its ``env_args`` (``env_kwargs``), as ``LeRobotReader``
    stores them and our episode file keeps them; ``None`` where absent."""
    kwargs = (env_args or {}).get("env_kwargs") or {}
    fps, robot = kwargs.get("fps"), kwargs.get("robot_type")
    return (int(round(float(fps))) if fps is not None else None), (str(robot) if robot else None)


def _feature_stats(array: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """lerobot's ``compute_episode_stats`` for one feature: images as channel stats ``[3, 1, 1]`` in [0, 1]."""
    if image:  # [n, H, W, 3] uint8 -> channel-first reductions over (frames, H, W)
        x = array.astype(np.float64) / 255.0
        axes: Any = (0, 1, 2)
        stats = {"min": x.min(axes), "max": x.max(axes), "mean": x.mean(axes), "std": x.std(axes)}
        stats = {k: v.reshape(3, 1, 1) for k, v in stats.items()}
    else:
        keep = array.ndim == 1
        stats = {"min": array.min(0, keepdims=keep), "max": array.max(0, keepdims=keep),
                 "mean": array.mean(0, keepdims=keep), "std": array.std(0, keepdims=keep)}
    stats["count"] = np.array([len(array)])
    return stats


def _aggregate_stats(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """lerobot's ``aggregate_feature_stats``: count-weighted mean, parallel-algorithm variance."""
    means = np.stack([s["mean"] for s in stats])
    variances = np.stack([s["std"] ** 2 for s in stats])
    counts = np.stack([s["count"] for s in stats])
    total = counts.sum(0)
    while counts.ndim < means.ndim:
        counts = np.expand_dims(counts, -1)
    mean = (means * counts).sum(0) / total
    var = ((variances + (means - mean) ** 2) * counts).sum(0) / total
    return {"min": np.min(np.stack([s["min"] for s in stats]), 0), "max": np.max(np.stack([s["max"] for s in stats]), 0),
            "mean": mean, "std": np.sqrt(var), "count": total}


def _tolist(stats: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: v.tolist() for k, v in stats.items()}


def _frame_column(values: np.ndarray, dtype: str) -> pa.Array:
    """One feature's column as lerobot's Hugging Face features store it: shape [1] -> ``Value`` (a scalar
    column), shape [D] -> ``Sequence(length=D)`` (a fixed-size list)."""
    pa_type = pa.from_numpy_dtype(np.dtype(dtype))
    if values.ndim == 1 or values.shape[1] == 1:
        return pa.array(values.reshape(-1).astype(dtype), type=pa_type)
    flat = pa.array(values.reshape(-1).astype(dtype), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tasks_table(tasks: list[str]) -> pa.Table:
    """``meta/tasks.parquet`` as ``pandas.DataFrame({"task_index": ...}, index=tasks).to_parquet`` writes it:
    the unnamed index stored as ``__index_level_0__``, with the pandas metadata that restores it as the index."""
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _video_info(path: Path, fps: int) -> dict[str, Any]:
    """lerobot's ``get_video_info`` keys for a video feature's ``info``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {"video.height": stream.height, "video.width": stream.width,
                "video.codec": stream.codec_context.codec.canonical_name,
                "video.pix_fmt": stream.codec_context.pix_fmt, "video.is_depth_map": False, "video.fps": int(fps),
                "video.channels": 3, "has_audio": False}


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """lerobot's ``update_chunk_file_indices``."""
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


class _Layout:
    """The features of the dataset being written, fixed by its first episode."""

    def __init__(self, episode: Episode, video: bool) -> None:
        self.cameras = sorted(k for k in episode.obs if k.startswith("rgb_"))
        self.extra = sorted(k for k in episode.obs if k != "state" and not k.startswith("rgb_"))
        self.success = "success" in episode.attrs
        self.shapes = {k: v.shape[1:] for k, v in episode.obs.items()}
        self.action_shape = episode.actions.shape[1:]
        features: dict[str, dict[str, Any]] = {}
        if "state" in episode.obs:
            features["observation.state"] = self._vector("observation.state", episode.obs["state"], "float32", "state")
        for k in self.extra:
            features[f"observation.{k}"] = self._vector(f"observation.{k}", episode.obs[k], None, k)
        features["action"] = self._vector("action", episode.actions, "float32", "action")
        features[REWARD_KEY] = {"dtype": "float32", "shape": [1], "names": None}
        features[DONE_KEY] = {"dtype": "bool", "shape": [1], "names": None}
        if self.success:
            features[SUCCESS_KEY] = {"dtype": "bool", "shape": [1], "names": None}
        for cam in self.cameras:
            h, w, c = episode.obs[cam].shape[1:]
            if c != 3 or episode.obs[cam].dtype != np.uint8:
                raise ToolkitError(f"obs/{cam} must be uint8 [L, H, W, 3] frames, got {episode.obs[cam].dtype} "
                                   f"{episode.obs[cam].shape}")
            features[IMAGES_PREFIX + cam[len("rgb_"):]] = {"dtype": "video" if video else "image", "shape": [h, w, 3],
                                                           "names": ["height", "width", "channels"]}
        self.features = {**features, **json.loads(json.dumps(DEFAULT_FEATURES))}

    @staticmethod
    def _vector(key: str, values: np.ndarray, dtype: str | None, prefix: str) -> dict[str, Any]:
        if values.ndim > 2:
            raise ToolkitError(f"{key}: per-step arrays of shape {values.shape[1:]} cannot be written; LeRobot "
                               f"features here are scalars or vectors (flatten them first)")
        dim = 1 if values.ndim == 1 else values.shape[1]
        dtype = dtype or ("bool" if values.dtype == np.bool_ else np.dtype(values.dtype).name)
        return {"dtype": dtype, "shape": [dim], "names": [f"{prefix}_{i}" for i in range(dim)]}

    def check(self, episode: Episode, where: str) -> None:
        shapes = {k: v.shape[1:] for k, v in episode.obs.items()}
        if shapes != self.shapes or episode.actions.shape[1:] != self.action_shape:
            raise ToolkitError(f"{where}: observations {shapes} / actions {episode.actions.shape[1:]} differ from the "
                               f"first episode's {self.shapes} / {self.action_shape}; a LeRobot dataset has one layout")


def write_lerobot(episodes: Iterable[Episode], path: str | Path, fps: int = 20, robot_type: str | None = None,
                  video: bool = True, crf: int = 18, episodes_per_file: int = 25, lossless: bool = False,
                  keyframe_interval: int = 8) -> Path:
    """Write ``episodes`` as a LeRobot v3.0 dataset directory at ``path`` (which must not exist or be empty).

    ``episodes_per_file`` episodes share one data parquet and one MP4 per camera (lerobot itself splits by size:
    ``data_files_size_in_mb``/``video_files_size_in_mb``); that many episodes are held in memory at a time.
    ``video=False`` stores frames inline as PNG images (feature dtype ``image``). Videos are h264 from
    ``encode_video``: yuv444p at ``crf``, or exact RGB (libx264rgb, pix_fmt gbrp) with ``lossless``.

    Instructions become tasks (no instruction: the empty task), ``success`` becomes ``next.success`` (True on
    the last step of a successful episode; written when the first episode has the attribute); other attributes
    are not kept. Stats (meta/stats.json and the episodes' ``stats/*`` columns) follow lerobot's
    ``compute_episode_stats``/``aggregate_stats``, image stats over every frame rather than a sample.
    Written to ``<path>.tmp`` and renamed at the end. Returns ``path``.
    """
    from toolkit.datamodules.video import encode_video

    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ToolkitError(f"{root} exists and is not an empty directory: choose a new path for the LeRobot dataset")
    if episodes_per_file < 1:
        raise ToolkitError(f"episodes_per_file={episodes_per_file}: must be at least 1")
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    layout: _Layout | None = None
    task_index: dict[str, int] = {}
    rows: list[dict[str, Any]] = []  # meta/episodes rows
    all_stats: list[dict[str, dict[str, np.ndarray]]] = []
    video_info: dict[str, dict[str, Any]] = {}
    total_frames = 0
    chunk, file = 0, 0
    buffer: list[Episode] = []

    def flush() -> None:
        nonlocal total_frames, chunk, file
        assert layout is not None
        columns: dict[str, list[np.ndarray]] = {k: [] for k in layout.features if layout.features[k]["dtype"] != "video"}
        offset = 0  # frames before this episode in this file's videos
        for ep in buffer:
            n = len(ep)
            e_idx = len(rows)
            task = str(ep.attrs.get("instruction") or "")
            t_idx = task_index.setdefault(task, len(task_index))
            per_frame: dict[str, np.ndarray] = {
                "timestamp": (np.arange(n) / fps).astype(np.float32),
                "frame_index": np.arange(n, dtype=np.int64),
                "episode_index": np.full(n, e_idx, np.int64),
                "index": np.arange(total_frames, total_frames + n, dtype=np.int64),
                "task_index": np.full(n, t_idx, np.int64),
                "action": ep.actions.astype(np.float32),
                REWARD_KEY: ep.rewards.astype(np.float32).reshape(n),
                DONE_KEY: np.arange(n) == n - 1,
            }
            if "state" in ep.obs:
                per_frame["observation.state"] = ep.obs["state"].astype(np.float32)
            for k in layout.extra:
                per_frame[f"observation.{k}"] = ep.obs[k].astype(layout.features[f"observation.{k}"]["dtype"])
            if layout.success:
                per_frame[SUCCESS_KEY] = (np.arange(n) == n - 1) & bool(ep.attrs.get("success", False))
            stats = {k: _feature_stats(v) for k, v in per_frame.items()}
            row: dict[str, Any] = {"episode_index": e_idx, "tasks": [task], "length": n,
                                   "data/chunk_index": chunk, "data/file_index": file,
                                   "dataset_from_index": total_frames, "dataset_to_index": total_frames + n}
            for cam in layout.cameras:
                key = IMAGES_PREFIX + cam[len("rgb_"):]
                stats[key] = _feature_stats(ep.obs[cam], image=True)
                if video:
                    row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                                f"videos/{key}/from_timestamp": offset / fps,
                                f"videos/{key}/to_timestamp": (offset + n) / fps})
                else:
                    per_frame[key] = np.array([_png(f) for f in ep.obs[cam]], dtype=object)
            for k in columns:
                columns[k].append(per_frame[k])
            for k, s in stats.items():
                for name, value in _tolist(s).items():
                    row[f"stats/{k}/{name}"] = value
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
            rows.append(row)
            all_stats.append(stats)
            total_frames += n
            offset += n

        arrays = []
        for k, parts in columns.items():
            ft = layout.features[k]
            if ft["dtype"] == "image":
                png = pa.array([bytes(b) for part in parts for b in part], pa.binary())
                arrays.append(pa.StructArray.from_arrays([png, pa.nulls(len(png), pa.string())], ["bytes", "path"]))
            else:
                arrays.append(_frame_column(np.concatenate(parts), ft["dtype"]))
        data_path = tmp / DATA_PATH.format(chunk_index=chunk, file_index=file)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_arrays(arrays, names=list(columns)), data_path, compression="snappy")
        if video:
            for cam in layout.cameras:
                key = IMAGES_PREFIX + cam[len("rgb_"):]
                vpath = tmp / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
                encode_video(vpath, np.concatenate([ep.obs[cam] for ep in buffer]), fps=fps, crf=crf,
                             keyframe_interval=keyframe_interval, lossless=lossless)
                if key not in video_info:
                    video_info[key] = _video_info(vpath, fps)
        buffer.clear()
        chunk, file = _next_file(chunk, file, DEFAULT_CHUNK_SIZE)

    try:
        for i, ep in enumerate(episodes):
            where = f"episode {i} written to {root}"
            ep.check(where)
            if len(ep) == 0:
                raise ToolkitError(f"{where}: has no steps")
            if layout is None:
                layout = _Layout(ep, video)
            layout.check(ep, where)
            buffer.append(ep)
            if len(buffer) == episodes_per_file:
                flush()
        if buffer:
            flush()
        if layout is None:
            raise ToolkitError(f"no episodes to write to {root}")

        features = layout.features
        for key, vinfo in video_info.items():
            features[key]["info"] = vinfo
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": len(rows), "total_frames": total_frames, "total_tasks": len(task_index),
            "chunks_size": DEFAULT_CHUNK_SIZE, "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
            "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB, "fps": int(fps),
            "splits": {"train": f"0:{len(rows)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if video and layout.cameras else None, "features": features,
        }
        (tmp / "meta").mkdir(exist_ok=True)
        (tmp / INFO_PATH).write_text(json.dumps(info, indent=4, ensure_ascii=False))
        pq.write_table(_tasks_table(list(task_index)), tmp / TASKS_PATH)
        episodes_path = tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), episodes_path, compression="snappy")
        stats = {k: _tolist(_aggregate_stats([s[k] for s in all_stats])) for k in all_stats[0]}
        (tmp / STATS_PATH).write_text(json.dumps(stats, indent=4))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if root.exists():
        root.rmdir()  # empty (checked above)
    os.replace(tmp, root)  # a reader never sees a half-written dataset
    return root
