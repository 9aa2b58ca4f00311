"""Finding and loading pretrained weights, offline, in their official formats.

``encoder.weights``: ``null`` = random init; a file path; or ``auto`` = look for the official file
name in the usual caches (torch hub's checkpoints dir, the Hugging Face hub cache, open_clip's cache).
Nothing is ever downloaded: a missing file is one clear error naming the file, where to put it and
where it is published.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import ToolkitError


def cache_dirs() -> list[Path]:
    """Where ``auto`` looks: torch hub checkpoints, the HF hub cache, OpenAI CLIP's / open_clip's cache, and R3M's
    (``~/.r3m``, where ``r3m.load_r3m`` puts ``r3m_50/model.pt``; ``~/.cache/r3m`` too)."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    hf = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"))
    return [hub, hf, Path.home() / ".cache" / "clip", Path.home() / ".cache" / "r3m", Path.home() / ".r3m"]


def resolve_weights(weights: str | os.PathLike | None, patterns: Sequence[str], what: str, published: str) -> Path | None:
    """The weights file to load, or None for random init.

    ``patterns``: official file names (glob patterns, relative to a cache dir, e.g.
    ``dinov2_vits14_pretrain.pth`` or ``models--timm--vit_small_patch14_dinov2.lvd142m/snapshots/*/model.safetensors``).
    ``what``: e.g. ``"DINOv2 ViT-S/14"``; ``published``: where to get the file.
    """
    if weights is None or str(weights).lower() in ("null", "none", "random"):
        return None
    if str(weights) != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ToolkitError(f"encoder.weights={weights}: no such file. Expected the official {what} "
                               f"checkpoint ({patterns[0]}), published at {published}")
        return path
    for root in cache_dirs():
        for pattern in patterns:
            found = sorted(root.glob(pattern))
            if found:
                return found[-1]
    raise ToolkitError(f"encoder.weights=auto: the {what} checkpoint is not on this machine (nothing is downloaded). "
                       f"Put {patterns[0]} into {cache_dirs()[0]} (or pass encoder.weights=/path/to/file); "
                       f"it is published at {published}")


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """A state dict (or a dict holding one) from ``.safetensors``, a pickled ``.pth``/``.pt``/``.bin``, or
    a TorchScript archive (OpenAI CLIP's ``.pt``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return _torch_load(path, weights_only=True)
    except ToolkitError:
        raise
    except Exception:
        # Older official checkpoints pickle extra objects (argparse Namespace in MAE's 'args').
        return _torch_load(path, weights_only=False)


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except RuntimeError as e:
        if "TorchScript" in str(e) or "constants.pkl" in str(e):
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        raise ToolkitError(f"{path}: cannot read the checkpoint ({e})") from None


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load after key conversion, failing with the missing/unexpected keys (or mismatched shapes) by name."""
    def head(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    # load_state_dict raises a bare RuntimeError on shape mismatches even with strict=False (a wrong variant)
    own = module.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if mismatched:
        raise ToolkitError(f"{path}: the checkpoint does not match {type(module).__name__} "
                           f"(shapes, checkpoint vs model: {head(mismatched)}). Is it the right model variant?")
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ToolkitError(f"{path}: the checkpoint does not match {type(module).__name__} "
                           f"(missing: {head(result.missing_keys) or 'none'}; unexpected: {head(result.unexpected_keys) or 'none'}). "
                           f"Is it the right model variant?")
