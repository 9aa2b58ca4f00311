"""Convert datasets between formats: any readable one into ours, ours into the writable ones.

    python -m toolkit.convert SRC DST --from spoc --to hdf5 [--video] [--option split=val]
    python -m toolkit.convert /data/so100_pick out.hdf5 --from lerobot
    python -m toolkit.convert data/drawer.hdf5 out/drawer_lerobot --from hdf5 --to lerobot [--fps 20]

Formats (``FORMATS``): hdf5 (ours; read, write), robomimic (read, write), spoc (read), spawnnet (read),
lerobot (LeRobot v3; read, write). Conversion into ours appends episode by episode and resumes where an
interrupted run stopped; ``--video`` stores cameras as MP4 sidecars.

Videos of a source are decoded by ``--video-backend`` (default ``auto``: decord for h264/hevc, PyAV for
the AV1 LeRobot writes by default; see toolkit.datamodules.video). A LeRobot dataset's fps and robot type
travel in our file's ``env_args`` and are written back by ``--to lerobot``; ``--fps``/``--robot-type``
give them where the source has none (no fps at all: 20), and override the source's with a warning.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

# format -> (reader class, writer function or None); import paths, loaded only when used
FORMATS: dict[str, tuple[str, str | None]] = {
    "hdf5": ("toolkit.formats.hdf5.HDF5Reader", None),  # written by EpisodeWriter (convert_to_hdf5)
    "robomimic": ("toolkit.formats.robomimic.RobomimicReader", "toolkit.formats.robomimic.write_robomimic"),
    "spoc": ("toolkit.formats.spoc.SpocReader", None),
    "spawnnet": ("toolkit.formats.spawnnet.SpawnNetReader", None),
    "lerobot": ("toolkit.formats.lerobot.LeRobotReader", "toolkit.formats.lerobot.write_lerobot"),
}


def _load(dotted: str) -> Any:
    from hydra.utils import get_object

    return get_object(dotted)


log = logging.getLogger("toolkit.convert")  # not __main__ under python -m
DEFAULT_FPS = 20  # written to a LeRobot dataset when neither the source nor --fps has a frame rate


def open_reader(fmt: str, path: str | Path, video_backend: str | None = None, **options: Any) -> Any:
    """The reader of ``path`` in format ``fmt``. ``video_backend`` (default ``auto``: a decoder chosen per
    file from its codec) goes to readers that decode videos; naming one for a reader without videos fails."""
    if fmt not in FORMATS:
        raise ToolkitError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    cls = _load(FORMATS[fmt][0])
    if "video_backend" in inspect.signature(cls).parameters:
        options["video_backend"] = video_backend or "auto"
    elif video_backend not in (None, "auto"):
        raise ToolkitError(f"video_backend={video_backend!r}: the {fmt} reader decodes no videos")
    return cls(path, **options)


def episodes(reader: Any, names: list[str] | None = None) -> Iterator[Any]:
    """Every episode of a reader, read one at a time."""
    for name in names if names is not None else reader.episode_names():
        yield reader.read_episode(name)


def convert_to_hdf5(reader: Any, dst: str | Path, video: dict[str, Any] | None = None, progress: bool = True) -> int:
    """Append the reader's episodes to our episode file ``dst`` (resuming after the episodes it already
    holds); returns the number of episodes in ``dst``."""
    from tqdm.auto import tqdm

    from toolkit.collect import existing_episodes
    from toolkit.datamodules.episode_file import EpisodeWriter

    names = reader.episode_names()
    have, _ = existing_episodes(Path(dst))
    if have >= len(names):
        return have
    fps, _ = _recorded(reader)
    if video and fps and "fps" not in video:  # sidecar MP4s keep the source's frame rate
        video = {**video, "fps": fps}
    writer = None  # created after the first episode reads: a source that cannot be read leaves no file
    for name in tqdm(names[have:], desc=f"converting into {Path(dst).name}", unit="ep", initial=have,
                     total=len(names), disable=not progress):
        episode = reader.read_episode(name)
        writer = writer or EpisodeWriter(dst, reader.env_args, video=video)
        writer.append(episode.to_gdict(), {**_attrs(episode.attrs), "source_episode": str(name)})
    return max(have, len(names))


def convert_source(source: Any, dst: str | Path, progress: bool = True) -> None:
    """``data.source`` (``format``, ``path``, ``options``, ``video``) converted into our file ``dst``
    unless it already holds every episode; a ``dst`` converted from another source is refused."""
    import h5py

    from toolkit.collect import existing_episodes

    dst, src, origin = Path(dst), str(Path(source["path"]).resolve()), None
    if dst.exists():
        with h5py.File(dst, "r") as f:
            origin = f["data"].attrs.get("converted_from") if "data" in f else None
        if origin != src and existing_episodes(dst)[0] > 0:  # another source's, or collected (no origin)
            raise ToolkitError(f"data.path={dst} holds episodes {f'converted from {origin}' if origin else 'not converted from a source'}, "
                               f"not from data.source.path={src}; set another data.path")
    reader = open_reader(source["format"], src, **dict(source.get("options") or {}))  # options may name video_backend
    if origin == src and existing_episodes(dst)[0] >= len(reader.episode_names()):
        return  # converted before: the file is not touched
    video = {"crf": 18} if source.get("video") else None
    convert_to_hdf5(reader, dst, video, progress)
    with h5py.File(dst, "a") as f:
        f["data"].attrs["converted_from"] = src


def _attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """HDF5 attributes take scalars and strings; anything else is stored as JSON."""
    import json

    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str) for k, v in attrs.items()}


def _recorded(reader: Any) -> tuple[int | None, str | None]:
    """``(fps, robot_type)`` the reader's dataset recorded (LeRobot's, kept in our file's env_args)."""
    from toolkit.formats.lerobot import recorded_rate

    return recorded_rate(getattr(reader, "env_args", None))


def lerobot_rate(reader: Any, fps: int | None = None, robot_type: str | None = None) -> dict[str, Any]:
    """``fps`` and ``robot_type`` to write a LeRobot dataset with: the source's, unless given (a different
    value overrides the source's with a warning: timestamps then run at the given rate); no fps anywhere:
    ``DEFAULT_FPS``."""
    have_fps, have_robot = _recorded(reader)
    if fps is not None and fps <= 0:
        raise ToolkitError(f"--fps {fps}: must be a positive number of frames per second")
    if fps is not None and have_fps is not None and fps != have_fps:
        log.warning("--fps %s overrides the source's %s fps: its timestamps will run %.3gx as fast as recorded",
                    fps, have_fps, fps / have_fps)
    if robot_type is not None and have_robot is not None and robot_type != have_robot:
        log.warning("--robot-type %s overrides the source's robot type %s", robot_type, have_robot)
    fps = fps if fps is not None else have_fps
    if fps is None:
        log.warning("the source records no frame rate: writing %s fps (pass --fps to set it)", DEFAULT_FPS)
        fps = DEFAULT_FPS
    return {"fps": int(fps), "robot_type": robot_type if robot_type is not None else have_robot}


def convert(src: str | Path, dst: str | Path, src_format: str, dst_format: str, video: dict[str, Any] | None = None,
            reader_options: dict[str, Any] | None = None, progress: bool = True, video_backend: str | None = None,
            fps: int | None = None, robot_type: str | None = None) -> None:
    """Convert ``src`` (format ``src_format``) into ``dst``. ``fps``/``robot_type``: LeRobot output only."""
    if dst_format != "lerobot" and (fps is not None or robot_type is not None):
        raise ToolkitError(f"--fps/--robot-type set a LeRobot dataset's frame rate and robot; --to {dst_format} "
                           f"has neither (they apply to --to lerobot)")
    reader = open_reader(src_format, src, **merge_video_backend(reader_options, video_backend))
    if dst_format == "hdf5":
        convert_to_hdf5(reader, dst, video, progress)
        return
    if dst_format not in FORMATS or FORMATS[dst_format][1] is None:
        writable = [f for f, (_, w) in FORMATS.items() if w] + ["hdf5"]
        raise ToolkitError(f"cannot write format {dst_format!r}: writable formats are {', '.join(writable)}")
    writer = _load(FORMATS[dst_format][1])
    kwargs = {"env_args": reader.env_args} if "env_args" in inspect.signature(writer).parameters else {}
    if dst_format == "lerobot":
        kwargs.update(lerobot_rate(reader, fps, robot_type))
    writer(episodes(reader), dst, **kwargs)


def add_video_backend(parser: argparse.ArgumentParser) -> None:
    from toolkit.datamodules.video import BACKENDS

    parser.add_argument("--video-backend", default=None, choices=list(BACKENDS),
                        help="decoder of the source's videos (default auto: decord for h264/hevc/mpeg4/vp9, "
                             "PyAV for others such as LeRobot's default AV1)")


def merge_video_backend(options: dict[str, Any] | None, video_backend: str | None) -> dict[str, Any]:
    """Reader options with ``--video-backend`` folded in (``--option video_backend=...`` also works)."""
    options = dict(options or {})
    if video_backend is not None:
        if options.get("video_backend", video_backend) != video_backend:
            raise ToolkitError(f"--video-backend {video_backend} and --option video_backend={options['video_backend']} "
                               f"disagree: give one")
        options["video_backend"] = video_backend
    return options


def _log_to_stderr() -> None:
    """CLI: the toolkit's warnings and notes (decoder chosen per codec, fps overrides) on stderr."""
    logging.basicConfig(format="%(levelname)s: %(message)s")  # other libraries stay at WARNING
    logging.getLogger("toolkit").setLevel(logging.INFO)


def _parse_options(items: list[str]) -> dict[str, Any]:
    import yaml

    options = {}
    for item in items:
        if "=" not in item:
            raise ToolkitError(f"--option {item!r}: use key=value")
        key, value = item.split("=", 1)
        options[key] = yaml.safe_load(value)
    return options


def main(argv: list[str] | None = None) -> None:
    from toolkit.errors import exit_on_user_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--from", dest="src_format", required=True, choices=list(FORMATS))
    parser.add_argument("--to", dest="dst_format", default="hdf5", choices=list(FORMATS))
    parser.add_argument("--video", action="store_true", help="ours: store cameras as MP4 sidecars")
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--lossless", action="store_true")
    parser.add_argument("--option", action="append", default=[], help="reader option key=value (repeatable)")
    add_video_backend(parser)
    parser.add_argument("--fps", type=int, default=None,
                        help="--to lerobot: frame rate (default: the source's; none recorded: 20)")
    parser.add_argument("--robot-type", default=None, help="--to lerobot: robot type (default: the source's)")
    args = parser.parse_args(argv)
    _log_to_stderr()
    video = {"crf": args.crf, "lossless": args.lossless} if args.video else None
    with exit_on_user_error():
        convert(args.src, args.dst, args.src_format, args.dst_format, video, _parse_options(args.option),
                video_backend=args.video_backend, fps=args.fps, robot_type=args.robot_type)
    print(f"{args.src} ({args.src_format}) -> {args.dst} ({args.dst_format})")


if __name__ == "__main__":
    main()
