"""MP4 sidecars: camera frames of an episode stored as one MP4 per camera next to the episode file.

In the episode file an MP4-stored camera has no ``obs/rgb_<camera>`` dataset (a tool unaware of the
sidecars gets a KeyError, never frames of zeros) but a marker ``data/demo_<i>/videos/rgb_<camera>`` with
the attribute ``video_path``: the MP4's path relative to the episode file's folder
(toolkit.datamodules.episode_file; its ``obs_group`` shows the camera as a dataset-shaped
``SidecarCamera``, so shapes, lengths and keys read as for inline frames). Files of the earlier layout
keep an unallocated placeholder ``obs/rgb_<camera>`` with that attribute (``create_video_dataset``) and
read the same. Pixels come from ``read_images``, which decodes only the frames a
window needs with one of three decoders (``data.video_backend``): decord, PyAV or torchcodec, or ``auto``,
which picks one per file from its codec. Open decoders are kept in a small per-process LRU cache (each
DataLoader worker has its own).

Codecs: decord 0.6 reads h264, hevc, mpeg4 and vp9 (checked here frame for frame against PyAV) but not
AV1, which LeRobot 0.4 writes by default; PyAV's wheel decodes AV1 with libdav1d, bit for bit the frames
LeRobot's own torchcodec decoder returns. ``auto`` probes the codec (PyAV, ~0.3 ms a file) and takes
decord for the codecs it reads, PyAV for the others (a log line says so, once per codec). An explicit
``decord`` on a codec it cannot read fails with the file, the codec and the fix, instead of decord's
"cannot find video stream with wanted index: -1".
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from toolkit.errors import ToolkitError

VIDEO_ATTR = "video_path"
BACKENDS = ("auto", "decord", "pyav", "torchcodec")
DECORD_CODECS = frozenset({"h264", "hevc", "mpeg4", "vp9"})  # what decord 0.6 decodes (AV1: no)
log = logging.getLogger(__name__)
_logged_codecs: set[str] = set()


def probe_codec(path: str | Path) -> str:
    """The codec of a video file's first video stream, as FFmpeg names it (``h264``, ``av1``, ...)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ToolkitError(f"video {path} has no video stream")
            return container.streams.video[0].codec_context.codec.canonical_name
    except ToolkitError:
        raise
    except Exception as e:
        raise ToolkitError(f"video {path} cannot be decoded ({type(e).__name__}: {e})") from None


def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(path: str | Path, backend: str) -> str:
    """The decoder ``backend`` means for the video at ``path``: ``auto`` becomes decord where it reads the
    file's codec, else PyAV; the others are themselves."""
    if backend not in BACKENDS:
        raise ToolkitError(f"data.video_backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    codec = probe_codec(path)
    if codec in DECORD_CODECS and _decord_available():
        return "decord"
    if codec not in _logged_codecs:
        _logged_codecs.add(codec)
        log.info("video %s is %s, which decord cannot decode: decoding %s videos with PyAV", path, codec, codec)
    return "pyav"


def _decord_error(path: Path, e: Exception) -> ToolkitError:
    """decord failed to open ``path``: name the codec and the fix where decord cannot read it."""
    try:
        codec = probe_codec(path)
    except ToolkitError:
        codec = None
    if codec is not None and codec not in DECORD_CODECS:
        return ToolkitError(
            f"video {path} is {codec}, which decord cannot decode (it reads {', '.join(sorted(DECORD_CODECS))}): "
            f"choose another decoder: video_backend=auto (picks one per file; data.video_backend=auto in "
            f"train.py, --video-backend auto for toolkit.convert/validate), pyav or torchcodec")
    return ToolkitError(f"video {path} cannot be decoded ({type(e).__name__}: {e})")


def encode_video(path: str | Path, frames: np.ndarray, fps: int = 20, crf: int = 18, keyframe_interval: int = 8,
                 lossless: bool = False) -> None:
    """Write uint8 frames ``[T, H, W, 3]`` as an h264 MP4 (PyAV). ``keyframe_interval`` bounds the frames
    decoded to reach any frame; no B-frames, so frames decode in order. ``lossless`` stores RGB exactly
    (libx264rgb, crf 0), otherwise yuv444p at ``crf``: no chroma subsampling, which small robot frames
    cannot afford (at 64 px and crf 18: mean error 2.3 of 255 against 3.6 for yuv420p, 26x smaller
    than raw frames)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_video wants uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    options = {"g": str(keyframe_interval), "bf": "0", "crf": "0" if lossless else str(crf), "preset": "veryfast"}
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24" if lossless else "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)  # a reader never sees a half-written video


class Decoder:
    """Random access to one MP4's frames: ``frames(indices) -> uint8 [n, H, W, 3]``."""

    def __init__(self, path: str | Path, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ToolkitError(f"data.video_backend={backend!r}: use one of {', '.join(BACKENDS)}")
        self.path = Path(path)
        if not self.path.exists():
            raise ToolkitError(f"video {self.path} does not exist (referenced by the episode file); "
                               f"restore it or re-collect the episode")
        self.backend = backend = resolve_backend(self.path, backend)
        try:
            if backend == "decord":
                import decord

                try:
                    self._reader = decord.VideoReader(str(self.path), num_threads=1)
                except Exception as e:  # decord's error for AV1 is "cannot find video stream ... -1"
                    raise _decord_error(self.path, e) from None
                self.num_frames = len(self._reader)
            elif backend == "torchcodec":
                try:
                    from torchcodec.decoders import VideoDecoder
                except ImportError as e:
                    raise ToolkitError(f"data.video_backend=torchcodec: torchcodec is not importable ({e}); "
                                       f"it needs `pip install torchcodec` and the system's FFmpeg libraries") from None
                self._reader = VideoDecoder(str(self.path), seek_mode="exact")
                self.num_frames = self._reader.metadata.num_frames
            else:
                import av

                self._reader = av.open(str(self.path))
                stream = self._reader.streams.video[0]
                stream.codec_context.thread_count = 1  # small frames: threads cost more than they save
                self._stream = stream
                self.num_frames = stream.frames
                self._frame_pts = float(1 / (stream.average_rate * stream.time_base))
        except ToolkitError:
            raise
        except Exception as e:  # every backend has its own error types for a broken file
            raise ToolkitError(f"video {self.path} cannot be decoded ({type(e).__name__}: {e})") from None

    def frames(self, indices: np.ndarray | list[int]) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_frames):
            raise ToolkitError(f"video {self.path} has {self.num_frames} frames; frame {int(indices.max())} "
                               f"was asked for (the episode file declares more steps than the video holds)")
        if self.backend == "decord":
            try:
                return self._reader.get_batch(indices.tolist()).asnumpy()
            except Exception:  # decord rejects some frame widths (16, 24, 48, 72 px): PyAV decodes them
                self.close()
                self.__init__(self.path, "pyav")
                return self._pyav_frames(indices)
        if self.backend == "torchcodec":
            return self._reader.get_frames_at(indices=indices.tolist()).data.permute(0, 2, 3, 1).numpy()
        return self._pyav_frames(indices)

    def _pyav_frames(self, indices: np.ndarray) -> np.ndarray:
        """Seek to the keyframe before the first wanted frame, then decode forward (frames in order)."""
        wanted = sorted(set(indices.tolist()))
        got: dict[int, np.ndarray] = {}
        self._reader.seek(int(wanted[0] * self._frame_pts), stream=self._stream, backward=True, any_frame=False)
        for frame in self._reader.decode(self._stream):
            i = int(round(frame.pts / self._frame_pts))
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
        return np.stack([got[i] for i in indices.tolist()])

    def close(self) -> None:
        """Free the decoder now. PyAV containers sit in reference cycles: left to the garbage collector
        they may be freed in a forked child, where FFmpeg's thread teardown hangs."""
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None and self.backend == "pyav":
            reader.close()

    def __del__(self) -> None:
        self.close()


_CACHES: weakref.WeakSet[DecoderCache] = weakref.WeakSet()


def _close_all_before_fork() -> None:
    for cache in list(_CACHES):
        cache.close()


# A DataLoader worker forked while a decord reader is open in the parent hangs in its first decode
# (decord's native state does not survive fork): every cache closes its decoders before any fork.
os.register_at_fork(before=_close_all_before_fork)


class DecoderCache:
    """The open decoders of this process, least recently used closed first. Decoders are closed before
    the process forks, and a forked DataLoader worker starts with an empty cache."""

    def __init__(self, backend: str = "auto", max_open: int = 16) -> None:
        self.backend, self.max_open = backend, max_open
        self._open: OrderedDict[Path, Decoder] = OrderedDict()
        self._pid = os.getpid()
        _CACHES.add(self)

    def get(self, path: Path) -> Decoder:
        if self._pid != os.getpid():  # a forked child: the parent closed its decoders before forking
            self._open, self._pid = OrderedDict(), os.getpid()
        decoder = self._open.pop(path, None) or Decoder(path, self.backend)
        self._open[path] = decoder
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return decoder

    def close(self) -> None:
        for decoder in self._open.values():
            decoder.close()
        self._open.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"backend": self.backend, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def video_path(dataset: h5py.Dataset) -> Path | None:
    """The MP4 of an image dataset stored as a sidecar (None for inline frames)."""
    rel = dataset.attrs.get(VIDEO_ATTR)
    if rel is None:
        return None
    return Path(dataset.file.filename).resolve().parent / (rel.decode() if isinstance(rel, bytes) else str(rel))


def read_images(dataset: h5py.Dataset, index: slice | np.ndarray, cache: DecoderCache | None = None) -> np.ndarray:
    """Frames ``[n, H, W, 3]`` of an ``obs/rgb_*`` dataset at ``index``, inline or from its MP4."""
    path = video_path(dataset)
    if path is None:
        return dataset[index]
    indices = np.arange(dataset.shape[0])[index] if isinstance(index, slice) else np.asarray(index)
    cache = cache or DecoderCache()  # held until the frames are read: a freed cache closes its decoders
    decoder = cache.get(path)
    if decoder.num_frames != dataset.shape[0]:
        raise ToolkitError(f"video {path} has {decoder.num_frames} frames but {dataset.name} declares "
                           f"{dataset.shape[0]} steps: re-collect the episode or delete it from {dataset.file.filename}")
    return decoder.frames(indices)


def create_video_dataset(group: h5py.Group, key: str, frames: np.ndarray, rel_path: str) -> h5py.Dataset:
    """The placeholder dataset of an MP4-stored camera in the earlier layout (full shape, no data,
    ``video_path`` attribute), which reads as zeros to tools unaware of sidecars: EpisodeWriter no longer
    writes it (it writes a ``videos/`` marker); kept to build files of that layout in tests."""
    ds = group.create_dataset(key, shape=frames.shape, dtype=np.uint8, chunks=(1, *frames.shape[1:]))
    ds.attrs[VIDEO_ATTR] = rel_path
    return ds
