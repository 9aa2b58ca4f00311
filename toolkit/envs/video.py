"""Rollout videos: episodes side by side in one MP4 (PyAV, h264)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tile_episodes(episodes: list[np.ndarray], scale: int = 2) -> np.ndarray:
    """Frames ``[T_i, H, W, 3]`` of several episodes -> ``[max T, H*scale, n*W*scale, 3]``; an episode
    that ended early holds its last frame."""
    length = max(len(e) for e in episodes)
    padded = [np.concatenate([e, np.repeat(e[-1:], length - len(e), 0)]) for e in episodes]
    grid = np.concatenate(padded, axis=2)
    return grid.repeat(scale, axis=1).repeat(scale, axis=2)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 20) -> Path:
    """Write uint8 frames ``[T, H, W, 3]`` as an h264 MP4."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sides
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format="rgb24")))
        container.mux(stream.encode())
    return path
