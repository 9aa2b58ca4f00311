"""Shared pieces for the timm ViT encoders (DINOv2, MAE, ViT from scratch).

The timm ``VisionTransformer`` lives at ``encoder.model`` (adapters read ``model.blocks``,
``model.patch_embed.patch_size``, ``model.embed_dim`` and call ``model.forward_intermediates``).
Pooling: ``cls`` = the class token after the final norm (N=1), ``mean`` = mean of the normed patch
tokens (N=1), ``patch`` = the normed patch tokens (N = (image_size // patch_size)**2; no class or
register tokens).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from toolkit.encoders.base import Encoder
from toolkit.encoders.weights import load_strict, read_checkpoint
from toolkit.errors import ToolkitError

POOLS = ("cls", "mean", "patch")


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ToolkitError(f"encoder.{field}={value!r}: choose one of {', '.join(choices)}")


class TimmViTEncoder(Encoder):
    """A timm ViT wrapped as an :class:`Encoder`; subclasses pick the timm model and the weights."""

    def __init__(
        self,
        model_name: str,
        variant: str,
        weights_path: Path | None,
        freeze: bool,
        image_size: int,
        pool: str,
        train_last_blocks: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        convert: Callable[[Mapping[str, Any], nn.Module], Mapping[str, torch.Tensor]] | None = None,
        **model_kwargs: Any,
    ) -> None:
        check_choice("pool", pool, POOLS)
        super().__init__(freeze, image_size=image_size, mean=mean, std=std, train_last_blocks=train_last_blocks)
        self.variant, self.pool, self.weights_path = variant, pool, weights_path
        kwargs = dict(pretrained=False, img_size=image_size, num_classes=0, **model_kwargs)
        if weights_path is None:
            self.model = timm.create_model(model_name, **kwargs)
        else:
            # every weight comes from the checkpoint (strict load): skip the random init (ViT-g: ~1B params)
            with torch.device("meta"):
                self.model = timm.create_model(model_name, **kwargs)
            self.model.to_empty(device=self.pixel_mean.device)
            self.load_weights(weights_path, convert)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.out_dim = int(self.model.embed_dim)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        grid = self.model.patch_embed.grid_size
        self.num_tokens = 1 if pool in ("cls", "mean") else int(grid[0] * grid[1])
        self._apply_freeze()

    def load_weights(self, path: Path, convert: Callable | None = None) -> None:
        """Official checkpoint -> timm keys (``convert``, default timm's ``checkpoint_filter_fn``, which
        also resamples ``pos_embed`` to this ``image_size``) -> strict load."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = read_checkpoint(path)
        if not isinstance(state, Mapping):
            raise ToolkitError(f"{path}: not a state dict ({type(state).__name__})")
        state = dict(state)
        try:
            state = convert(state, self.model) if convert is not None else checkpoint_filter_fn(state, self.model)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ToolkitError(f"{path}: cannot convert the checkpoint for {type(self).__name__}({self.variant}): {e!r}") from None
        load_strict(self.model, state, path)

    def weights_fingerprint(self) -> str:
        """Changes when the weights file changes; random init: the family and variant."""
        if self.weights_path is None:
            return f"{type(self).__name__}:{self.variant}:random-init"
        st = os.stat(self.weights_path)
        return f"{Path(self.weights_path).resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def tail(self) -> list[nn.Module]:
        return [self.model.norm, self.model.fc_norm]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        if self.pool == "cls":
            return tokens[:, :1]
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.mean(dim=1, keepdim=True) if self.pool == "mean" else patches
