"""MP4 sidecars: episode files whose cameras live in MP4s read like inline ones (exactly when lossless),
every decoder backend returns the same frames, workers decode their own, and broken videos are named."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gdict import GDict
from toolkit.datamodules.episode_file import EpisodeWriter, episode_names, obs_group
from toolkit.datamodules.video import VIDEO_ATTR, Decoder, DecoderCache, encode_video, read_images, video_path
from toolkit.datamodules.windows import WindowDataset
from toolkit.errors import ToolkitError

BACKENDS = ["decord", "pyav"]  # torchcodec needs the system's FFmpeg libraries (see test_torchcodec_*)


def copy_episodes(src, dst, video: dict | None) -> list[dict]:
    """Re-write the real episodes of ``src`` into ``dst`` (inline or as MP4 sidecars); returns them."""
    episodes = []
    with h5py.File(src) as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        for name in episode_names(f):
            episodes.append(GDict.from_hdf5(f["data"][name]).memory)
    writer = EpisodeWriter(dst, env_args, video=video)
    for e in episodes:
        writer.append(GDict(e), {"success": False})
    return episodes


@pytest.fixture(scope="module")
def lossless_file(tiny_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "lossless.hdf5"
    return path, copy_episodes(tiny_file, path, {"lossless": True, "keyframe_interval": 4})


def test_sidecar_layout_and_lossless_round_trip(lossless_file):
    path, episodes = lossless_file
    with h5py.File(path) as f:
        g = obs_group(f["data/demo_0"])["rgb_corner4"]
        assert g.shape == episodes[0]["obs"]["rgb_corner4"].shape and g.attrs[VIDEO_ATTR] == "lossless_videos/demo_0/rgb_corner4.mp4"
        assert "rgb_corner4" not in f["data/demo_0/obs"]  # no pixels, and nothing that reads as pixels, in the file
        assert video_path(g).exists() and json.loads(f["data"].attrs["video"])["lossless"]
        for backend in BACKENDS:
            frames = read_images(obs_group(f["data/demo_1"])["rgb_corner4"], slice(None), DecoderCache(backend))
            np.testing.assert_array_equal(frames, episodes[1]["obs"]["rgb_corner4"])
        # state and actions stay inline and untouched
        np.testing.assert_array_equal(f["data/demo_1/obs/state"][()], episodes[1]["obs"]["state"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_from_mp4_equal_windows_from_inline_frames(tiny_file, lossless_file, backend):
    path, _ = lossless_file
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
    keys = ["rgb_corner4", "state"]
    inline = WindowDataset(tiny_file, names, keys, history=3, horizon=2, transitions=True)
    video = WindowDataset(path, names, keys, history=3, horizon=2, transitions=True, video_backend=backend)
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(inline))[:20]:  # random access, out of order
        a, b = inline[int(i)], video[int(i)]
        for k in keys:
            torch.testing.assert_close(a["obs"][k], b["obs"][k], rtol=0, atol=0)
            torch.testing.assert_close(a["next_obs"][k], b["next_obs"][k], rtol=0, atol=0)
        torch.testing.assert_close(a["action"], b["action"])


def test_lossy_mp4_is_close_and_smaller(tiny_file, tmp_path):
    path = tmp_path / "lossy.hdf5"
    episodes = copy_episodes(tiny_file, path, {"crf": 18})
    with h5py.File(path) as f:
        decoded = read_images(obs_group(f["data/demo_0"])["rgb_corner4"], slice(None))
    error = np.abs(decoded.astype(int) - episodes[0]["obs"]["rgb_corner4"].astype(int))
    assert error.mean() < 5.0, error.mean()  # 32 px frames: ~3.7 of 255 at crf 18
    inline_bytes = episodes[0]["obs"]["rgb_corner4"].nbytes
    assert (tmp_path / "lossy_videos/demo_0/rgb_corner4.mp4").stat().st_size < inline_bytes / 3


def test_workers_decode_with_their_own_decoders(tiny_file, lossless_file):
    path, _ = lossless_file
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
    keys = ["rgb_corner4", "state"]
    inline = WindowDataset(tiny_file, names, keys, history=2, horizon=1)
    video = WindowDataset(path, names, keys, history=2, horizon=1)
    video[0]  # the parent opened a decoder before the fork: workers must not reuse it
    loader = DataLoader(video, batch_size=8, num_workers=2, shuffle=False)
    got = torch.cat([b["obs"]["rgb_corner4"] for b in loader])
    want = torch.stack([inline[i]["obs"]["rgb_corner4"] for i in range(len(inline))])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decoder_cache_bounds_open_files(tmp_path):
    frames = np.zeros((6, 16, 16, 3), np.uint8)
    paths = [tmp_path / f"v{i}.mp4" for i in range(12)]
    for p in paths:
        encode_video(p, frames)
    cache = DecoderCache("pyav", max_open=3)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        for p in paths:
            cache.get(p).frames([0, 5])
    assert len(cache._open) == 3
    assert len(os.listdir("/proc/self/fd")) <= before + 3
    cache.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_missing_and_short_videos_name_the_file_and_episode(tiny_file, tmp_path):
    path = tmp_path / "broken.hdf5"
    copy_episodes(tiny_file, path, {"lossless": True})
    os.remove(tmp_path / "broken_videos/demo_0/rgb_corner4.mp4")
    encode_video(tmp_path / "broken_videos/demo_1/rgb_corner4.mp4", np.zeros((3, 32, 32, 3), np.uint8), lossless=True)
    with h5py.File(path) as f:
        with pytest.raises(ToolkitError, match="broken_videos/demo_0/rgb_corner4.mp4 does not exist"):
            read_images(obs_group(f["data/demo_0"])["rgb_corner4"], slice(0, 2))
        with pytest.raises(ToolkitError, match=r"has 3 frames but /data/demo_1/obs/rgb_corner4 declares 12"):
            read_images(obs_group(f["data/demo_1"])["rgb_corner4"], slice(0, 2))
    (tmp_path / "garbage.mp4").write_bytes(b"not a video")
    for backend in BACKENDS:
        with pytest.raises(ToolkitError, match="garbage.mp4 cannot be decoded"):
            Decoder(tmp_path / "garbage.mp4", backend)


def test_unknown_backend_and_torchcodec_without_ffmpeg_fail_clearly(tmp_path):
    encode_video(tmp_path / "v.mp4", np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ToolkitError, match="data.video_backend='opencv'"):
        Decoder(tmp_path / "v.mp4", "opencv")
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:
        with pytest.raises(ToolkitError, match="data.video_backend=torchcodec"):
            Decoder(tmp_path / "v.mp4", "torchcodec")
    else:
        np.testing.assert_array_equal(Decoder(tmp_path / "v.mp4", "torchcodec").frames([0, 1]),
                                      Decoder(tmp_path / "v.mp4", "pyav").frames([0, 1]))


def test_feature_cache_from_mp4_equals_cache_from_inline_frames(tiny_file, lossless_file, tmp_path):
    from toolkit.encoders.cache import build_feature_cache
    from toolkit.encoders.impala import ImpalaEncoder

    path, _ = lossless_file
    cfg = {"_target_": "toolkit.encoders.impala.ImpalaEncoder", "image_size": 32}
    caches = []
    for data in (tiny_file, path):
        torch.manual_seed(0)
        encoder = ImpalaEncoder(image_size=32, channels=(8, 16), out_dim=16, freeze=True)
        caches.append(build_feature_cache(encoder, cfg, data, ["rgb_corner4"], progress=False))
    with h5py.File(caches[0]) as a, h5py.File(caches[1]) as b:
        for name in a["data"]:
            np.testing.assert_array_equal(a[f"data/{name}/obs/rgb_corner4_features"][()],
                                          b[f"data/{name}/obs/rgb_corner4_features"][()])


def test_train_collects_mp4_episodes_and_trains_from_them_with_workers(tmp_path):
    from conftest import run_train

    run_train("collect.video=true", "data.num_workers=2", "~callbacks.progress_bar", root=tmp_path)
    (data,) = (tmp_path / "data").glob("*.hdf5")
    with h5py.File(data) as f:
        assert all(obs_group(f[f"data/{n}"])["rgb_corner4"].attrs[VIDEO_ATTR].endswith(".mp4") for n in episode_names(f))
    summary = json.loads(next((tmp_path / "logs").glob("*/runs/*/summary.json")).read_text())
    assert summary["global_step"] == 4 and "rollout/success_rate" in summary


def test_decoded_episode_cache_gives_the_same_windows(lossless_file, tiny_file):
    """Whole-episode decoding with the chunk sampler's order returns exactly the per-window frames."""
    from toolkit.datamodules.windows import EpisodeChunkSampler

    path, _ = lossless_file
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
    keys = ["rgb_corner4", "state"]
    inline = WindowDataset(tiny_file, names, keys, history=2, horizon=3, transitions=True)
    cached = WindowDataset(path, names, keys, history=2, horizon=3, transitions=True, decoded_episodes=1)
    for i in EpisodeChunkSampler(cached.ep_of, 2, seed=1):
        a, b = inline[i], cached[i]
        torch.testing.assert_close(a["obs"]["rgb_corner4"], b["obs"]["rgb_corner4"], rtol=0, atol=0)
        torch.testing.assert_close(a["next_obs"]["rgb_corner4"], b["next_obs"]["rgb_corner4"], rtol=0, atol=0)
    assert len(cached._decoded) == 1  # bounded: one decoded episode per camera


def test_datamodule_draws_mp4_windows_in_episode_chunks(lossless_file):
    from toolkit.datamodules.episode_datamodule import EpisodeDataModule
    from toolkit.datamodules.windows import EpisodeChunkSampler

    path, _ = lossless_file
    dm = EpisodeDataModule(str(path), batch_size=4, video_chunk_episodes=1)
    dm.setup("fit")
    assert dm.video and dm.train_set.decoded_episodes == 2
    assert isinstance(dm.train_dataloader().sampler.chunks, EpisodeChunkSampler)
    off = EpisodeDataModule(str(path), batch_size=4, video_chunk_episodes=0)
    off.setup("fit")
    assert off.train_set.decoded_episodes == 0 and not isinstance(off.train_dataloader().sampler.chunks, EpisodeChunkSampler)


_ENCODE = """
import sys, json, av, numpy as np
path, codec, pix_fmt, fps, options = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
frames = np.load(sys.argv[6])
with av.open(path, mode="w", format="mp4") as container:
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
"""


def _encode(path, frames: np.ndarray, codec: str, pix_fmt: str = "yuv420p", fps: int = 10, **options: str) -> None:
    """A video as another tool writes it (LeRobot 0.4: libsvtav1, yuv420p, crf 30, g 2). In a fresh process:
    once decord is loaded (earlier tests), its bundled libvpx shadows PyAV's and libvpx-vp9 refuses to open."""
    import subprocess
    import sys

    np.save(f"{path}.npy", frames)
    subprocess.run([sys.executable, "-c", _ENCODE, str(path), codec, pix_fmt, str(fps), json.dumps(options), f"{path}.npy"],
                   check=True, capture_output=True)


def _smooth_frames(n: int = 12, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([np.stack([(xx * 4 + 8 * i) % 256, (yy * 4) % 256, (xx + yy + 5 * i) % 256], -1)
                     for i in range(n)]).astype(np.uint8)


@pytest.fixture(scope="module")
def codec_videos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("codecs")
    frames = _smooth_frames()
    videos = {}
    for codec, name, options in (("libsvtav1", "av1", {"crf": "30", "g": "2"}), ("libx265", "hevc", {"x265-params": "log-level=none"}),
                                 ("libvpx-vp9", "vp9", {}), ("mpeg4", "mpeg4", {})):
        videos[name] = root / f"{name}.mp4"
        _encode(videos[name], frames, codec, **options)
    videos["h264"] = root / "h264.mp4"
    encode_video(videos["h264"], frames, fps=10)
    return videos


def test_auto_decodes_every_codec_and_picks_decord_where_it_can(codec_videos):
    """decord reads h264/hevc/vp9/mpeg4 exactly as PyAV does; AV1 (LeRobot's default) goes to PyAV."""
    from toolkit.datamodules.video import DECORD_CODECS, probe_codec

    for name, path in codec_videos.items():
        assert probe_codec(path) == name
        auto, pyav = Decoder(path, "auto"), Decoder(path, "pyav")
        assert auto.backend == ("decord" if name in DECORD_CODECS else "pyav"), name
        assert auto.num_frames == pyav.num_frames == 12
        np.testing.assert_array_equal(auto.frames(np.arange(12)), pyav.frames(np.arange(12)))
        np.testing.assert_array_equal(auto.frames([9, 2, 2, 11]), pyav.frames(np.arange(12))[[9, 2, 2, 11]])  # seeks
        if name in DECORD_CODECS:  # explicitly asked for, decord decodes it
            np.testing.assert_array_equal(Decoder(path, "decord").frames([0, 7]), pyav.frames([0, 7]))
        auto.close(), pyav.close()
    assert "av1" not in DECORD_CODECS


def test_decord_on_av1_names_the_file_codec_and_fix(codec_videos):
    with pytest.raises(ToolkitError, match=r"video .*av1\.mp4 is av1, which decord cannot decode.*video_backend=auto") as e:
        Decoder(codec_videos["av1"], "decord")
    assert "cannot find video stream" not in str(e.value)  # not decord's own words
    cache = DecoderCache()  # the default is auto, in caches and readers alike
    assert cache.backend == "auto" and cache.get(codec_videos["av1"]).backend == "pyav"
    cache.close()
