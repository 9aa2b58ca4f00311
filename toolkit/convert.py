"""Convert datasets between formats: any readable one into ours, ours into the writable ones.

    python -m toolkit.convert SRC DST --from spoc --to hdf5 [--video] [--option split=val]
    python -m toolkit.convert data/drawer.hdf5 out/drawer_lerobot --from hdf5 --to lerobot

Formats (``FORMATS``): hdf5 (ours; read, write), robomimic (read, write), spoc (read), spawnnet (read),
lerobot (LeRobot v3; read, write). Conversion into ours appends episode by episode and resumes where an
interrupted run stopped; ``--video`` stores cameras as MP4 sidecars.
"""

from __future__ import annotations

import argparse
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


def open_reader(fmt: str, path: str | Path, **options: Any) -> Any:
    """The reader of ``path`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ToolkitError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return _load(FORMATS[fmt][0])(path, **options)


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
    writer = EpisodeWriter(dst, reader.env_args, video=video)
    for name in tqdm(names[have:], desc=f"converting into {Path(dst).name}", unit="ep", initial=have,
                     total=len(names), disable=not progress):
        episode = reader.read_episode(name)
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
    reader = open_reader(source["format"], src, **dict(source.get("options") or {}))
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


def convert(src: str | Path, dst: str | Path, src_format: str, dst_format: str, video: dict[str, Any] | None = None,
            reader_options: dict[str, Any] | None = None, progress: bool = True) -> None:
    reader = open_reader(src_format, src, **(reader_options or {}))
    if dst_format == "hdf5":
        convert_to_hdf5(reader, dst, video, progress)
        return
    if dst_format not in FORMATS or FORMATS[dst_format][1] is None:
        writable = [f for f, (_, w) in FORMATS.items() if w] + ["hdf5"]
        raise ToolkitError(f"cannot write format {dst_format!r}: writable formats are {', '.join(writable)}")
    import inspect

    writer = _load(FORMATS[dst_format][1])
    kwargs = {"env_args": reader.env_args} if "env_args" in inspect.signature(writer).parameters else {}
    writer(episodes(reader), dst, **kwargs)


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
    args = parser.parse_args(argv)
    video = {"crf": args.crf, "lossless": args.lossless} if args.video else None
    with exit_on_user_error():
        convert(args.src, args.dst, args.src_format, args.dst_format, video, _parse_options(args.option))
    print(f"{args.src} ({args.src_format}) -> {args.dst} ({args.dst_format})")


if __name__ == "__main__":
    main()
