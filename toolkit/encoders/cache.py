"""Feature cache for frozen encoders: every frame of a dataset encoded once, stored next to it.

    <data dir>/<dataset stem>.features/<EncoderClass>-<key>.hdf5
        data/demo_<i>/obs/rgb_<camera>_features   [L, N, D] float16

``key`` hashes the encoder's config, its weights (a hash of the state dict, so random init with another
seed or another checkpoint file never reuses features), the frames' size, the encoder's input size and
the dataset file's fingerprint (size, mtime, episodes). Any change gives a new key and a rebuild. A
cache file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from toolkit.datamodules.episode_file import episode_names, obs_group, open_episode_file
from toolkit.datamodules.video import DecoderCache, read_images


def weights_hash(module: torch.nn.Module) -> str:
    """A fingerprint of every parameter and buffer value."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    with open_episode_file(path) as f:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "episodes": len(episode_names(f))}


def cache_path(encoder: torch.nn.Module, encoder_cfg: dict, data_path: Path, image_keys: list[str]) -> Path:
    """Where the features of ``encoder`` on ``data_path`` live (the file may not exist yet)."""
    with open_episode_file(data_path) as f:
        first = obs_group(f["data"][episode_names(f)[0]])
        frame_shapes = {k: list(first[k].shape[1:]) for k in image_keys}
    key = {
        "encoder": {k: v for k, v in encoder_cfg.items() if k not in ("freeze", "train_last_blocks")},
        "weights": weights_hash(encoder),
        # what the weights alone do not say (CLIP's QuickGELU, decided from the file's content)
        "fingerprint": encoder.weights_fingerprint() if hasattr(encoder, "weights_fingerprint") else None,
        "frames": frame_shapes,
        "input_size": getattr(encoder, "image_size", None),
        "dataset": dataset_fingerprint(data_path),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return data_path.parent / f"{data_path.stem}.features" / f"{type(encoder).__name__}-{digest}.hdf5"


@torch.no_grad()
def build_feature_cache(encoder: torch.nn.Module, encoder_cfg: dict, data_path: str | Path, image_keys: list[str],
                        batch_size: int = 64, progress: bool = True) -> Path:
    """Encode every frame of ``data_path`` (all episodes, all ``image_keys``) unless the cache exists."""
    from tqdm.auto import tqdm

    data_path = Path(data_path)
    path = cache_path(encoder, encoder_cfg, data_path, image_keys)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    was_training = encoder.training
    encoder.eval()
    decoders = DecoderCache()  # frames stored as MP4 sidecars are decoded like a window's
    with open_episode_file(data_path) as src, h5py.File(tmp, "w") as dst:
        names = episode_names(src)
        total = sum(obs_group(src["data"][n])[k].shape[0] for n in names for k in image_keys)
        bar = tqdm(total=total, desc=f"caching {type(encoder).__name__} features", unit="frame", disable=not progress)
        for name in names:
            for key in image_keys:
                frames = obs_group(src["data"][name])[key]
                out = None
                for start in range(0, len(frames), batch_size):
                    x = torch.from_numpy(read_images(frames, slice(start, start + batch_size), decoders)).permute(0, 3, 1, 2)
                    feats = encoder(x).float().numpy().astype(np.float16)
                    if out is None:
                        out = dst.create_dataset(f"data/{name}/obs/{key}_features", (len(frames), *feats.shape[1:]),
                                                 dtype=np.float16, chunks=(1, *feats.shape[1:]))
                    out[start:start + len(feats)] = feats
                    bar.update(len(feats))
        dst.attrs["encoder_cfg"] = json.dumps(encoder_cfg, default=str)
        dst.attrs["dataset"] = str(data_path)
        bar.close()
    os.replace(tmp, path)
    encoder.train(was_training)
    return path
