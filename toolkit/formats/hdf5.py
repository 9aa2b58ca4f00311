"""Our episode files (``data=hdf5``) as a format: frames inline or in MP4 sidecars (layout:
toolkit.datamodules.episode_file). ``env_args`` in our form (``type`` ``metaworld`` ...), whichever form the
file stores; each episode's virtual ``next_obs`` is checked to map its own ``obs``."""

from __future__ import annotations

import json
from pathlib import Path

from gdict import GDict
from toolkit.datamodules.episode_file import (check_next_obs, episode_length, episode_names, obs_group,
                                               open_episode_file, toolkit_env_args)
from toolkit.datamodules.video import DecoderCache, read_images
from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode


class HDF5Reader:
    """Episodes of one of our episode files, images decoded from MP4 sidecars where stored so."""

    def __init__(self, path: str | Path, video_backend: str = "decord") -> None:
        self.path = Path(path)
        self.decoders = DecoderCache(video_backend)
        with open_episode_file(self.path) as f:
            self.env_args = toolkit_env_args(json.loads(f["data"].attrs.get("env_args", "{}")))
            self._names = episode_names(f)

    def episode_names(self) -> list[str]:
        return list(self._names)

    def read_episode(self, name: str) -> Episode:
        with open_episode_file(self.path) as f:
            if name not in f["data"]:
                raise ToolkitError(f"{self.path}: no episode {name}")
            g = f["data"][name]
            episode_length(f, name)  # raises on mismatched lengths, naming the file and episode
            check_next_obs(f, name)
            try:
                obs = {k: (read_images(ds, slice(None), self.decoders) if k.startswith("rgb") else ds[()])
                       for k, ds in obs_group(g).items()}
                steps = GDict.from_hdf5(g, keys=[k for k in ("actions", "rewards", "dones") if k in g])
            except (OSError, KeyError) as e:
                raise ToolkitError(f"{self.path}: episode {name} cannot be read ({e})") from None
            except ToolkitError as e:  # a missing or broken MP4
                raise ToolkitError(f"episode {name}: {e}") from None
            attrs = {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v)
                     for k, v in g.attrs.items() if k != "num_samples"}
        n = len(steps["actions"])
        import numpy as np

        episode = Episode(obs=obs, actions=steps["actions"],
                          rewards=steps["rewards"] if "rewards" in steps else np.zeros(n, np.float32),
                          dones=steps["dones"] if "dones" in steps else (np.arange(n) == n - 1).astype(np.uint8),
                          attrs=attrs)
        episode.check(f"{self.path}: episode {name}")
        return episode
