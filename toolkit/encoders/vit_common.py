"""Shared pieces for the timm ViT encoders (DINOv2, MAE, ViT from scratch).

The timm ``VisionTransformer`` lives at ``encoder.model`` (adapters read ``model.blocks``,
``model.patch_embed.patch_size``, ``model.embed_dim`` and call ``model.forward_intermediates``).
Pooling: ``cls`` = the class token after the final norm (N=1), ``mean`` = mean of the normed patch
tokens (N=1), ``patch`` = the normed patch tokens (N = (image_size // patch_size)**2; no class or
register tokens). An ``image_size`` that is not a multiple of the patch size leaves the last
``image_size % patch_size`` rows and columns out (the stride of the patch convolution).

Position embeddings: by default timm's loader resamples ``pos_embed`` once, at load time, to the
``image_size`` grid. With ``pos_embed_grid`` (DINOv2) the model is a :class:`RuntimePosEmbedViT`:
``pos_embed`` keeps the checkpoint's grid and is interpolated in every forward the way FAIR's DINO /
DINOv2 code does (``interpolate_pos_encoding``), so features equal the publisher's model at every size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from toolkit.encoders.base import Encoder
from toolkit.encoders.weights import load_strict, read_checkpoint
from toolkit.errors import ToolkitError

POOLS = ("cls", "mean", "patch")


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ToolkitError(f"encoder.{field}={value!r}: choose one of {', '.join(choices)}")


def interpolate_pos_embed_fair(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int, offset: float,
                               antialias: bool, dtype: torch.dtype) -> torch.Tensor:
    """FAIR's ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2): the square patch
    grid of ``pos_embed`` (after ``num_prefix`` class-token positions) to ``grid`` = (rows, cols), bicubic in
    float32. ``offset`` > 0: by the scale factors ``(rows + offset) / M`` and ``(cols + offset) / M`` (DINO's
    historical 0.1 kludge, kept by the plain DINOv2 models); ``offset`` = 0: to the size. At the trained grid
    ``pos_embed`` itself is returned, else the result in ``dtype`` (the tokens' dtype). Differentiable."""
    n = pos_embed.shape[1] - num_prefix
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    rows, cols = grid
    if (rows, cols) == (m, m):
        return pos_embed
    dim = pos_embed.shape[-1]
    pos = pos_embed.float()
    kwargs: dict[str, Any] = ({"scale_factor": (float(rows + offset) / m, float(cols + offset) / m)} if offset
                              else {"size": (rows, cols)})
    patch = nn.functional.interpolate(pos[:, num_prefix:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
                                      mode="bicubic", antialias=antialias, **kwargs)
    if tuple(patch.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"pos_embed interpolation gave a {tuple(patch.shape[-2:])} grid, expected {(rows, cols)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos[:, :num_prefix], patch), dim=1).to(dtype)


class RuntimePosEmbedViT(VisionTransformer):
    """timm's ``VisionTransformer`` whose ``pos_embed`` stays at the checkpoint's grid and is interpolated to
    the input's patch grid in every forward (``forward_features``, ``forward_intermediates``), with FAIR's
    ``interpolate_pos_encoding`` (:func:`interpolate_pos_embed_fair`). Made from a timm model by
    :func:`keep_pos_embed_grid`; the tokens are then concatenated and added exactly as timm does (for
    ``no_embed_class`` models the class position is folded into ``cls_token``, as timm's converter does).

    Without gradients to ``pos_embed`` (a frozen encoder, or ``no_grad``) the interpolated embedding is cached per
    grid and dtype and recomputed whenever ``pos_embed`` changes (in-place updates, loading, moving); with them it
    is interpolated in every forward, so fine-tuning trains the stored trained-grid ``pos_embed``."""

    pos_embed_offset: float = 0.1
    pos_embed_antialias: bool = False

    def interpolated_pos_embed(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """``pos_embed`` at ``grid`` (see :func:`interpolate_pos_embed_fair`)."""
        pos = self.pos_embed
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if (torch.is_grad_enabled() and pos.requires_grad) or pos.device.type == "meta":
            return interpolate_pos_embed_fair(pos, grid, prefix, self.pos_embed_offset, self.pos_embed_antialias, dtype)
        key = (tuple(grid), dtype, pos.device, pos.dtype, pos.data_ptr(), pos._version,
               self.pos_embed_offset, self.pos_embed_antialias, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_pos_embed_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                value = interpolate_pos_embed_fair(pos, grid, prefix, self.pos_embed_offset,
                                                   self.pos_embed_antialias, dtype)
            cached = self.__dict__["_pos_embed_cache"] = (key, value)
        return cached[1]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:
            b, h, w, c = x.shape
            grid = (h, w)
            x = x.view(b, -1, c)
        else:
            grid = tuple(self.patch_embed.grid_size)
        pos_embed = self.interpolated_pos_embed(grid, x.dtype)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = x + pos_embed
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + pos_embed
        return self.pos_drop(x)


def keep_pos_embed_grid(model: VisionTransformer, grid: int, offset: float, antialias: bool) -> RuntimePosEmbedViT:
    """Turn a timm ViT (built for any ``img_size``) into a :class:`RuntimePosEmbedViT` whose ``pos_embed`` has
    ``grid`` x ``grid`` patch positions (a fresh parameter, truncated-normal std 0.02 as timm initialises it,
    left uninitialised on the meta device), interpolated with FAIR's ``offset`` / ``antialias``."""
    old = model.pos_embed
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos_embed = torch.empty(1, prefix + grid * grid, old.shape[-1], device=old.device, dtype=old.dtype)
    if pos_embed.device.type != "meta":
        nn.init.trunc_normal_(pos_embed, std=0.02)
    model.pos_embed = nn.Parameter(pos_embed, requires_grad=old.requires_grad)
    model.__class__ = RuntimePosEmbedViT
    model.pos_embed_offset, model.pos_embed_antialias = float(offset), bool(antialias)
    return model


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
        pos_embed_grid: int | None = None,
        pos_embed_interpolation: tuple[float, bool] = (0.1, False),
        **model_kwargs: Any,
    ) -> None:
        """``pos_embed_grid``: keep ``pos_embed`` at this grid (the checkpoint's) and interpolate it in forward
        with FAIR's ``(offset, antialias)`` = ``pos_embed_interpolation`` (see :class:`RuntimePosEmbedViT`);
        ``convert`` must then leave ``pos_embed`` at that grid. ``None``: timm's fixed grid for ``image_size``."""
        check_choice("pool", pool, POOLS)
        super().__init__(freeze, image_size=image_size, mean=mean, std=std, train_last_blocks=train_last_blocks)
        self.variant, self.pool, self.weights_path, self.convert = variant, pool, weights_path, convert
        kwargs = dict(pretrained=False, img_size=image_size, num_classes=0, **model_kwargs)
        if weights_path is None:
            self.model = timm.create_model(model_name, **kwargs)
            if pos_embed_grid is not None:
                keep_pos_embed_grid(self.model, pos_embed_grid, *pos_embed_interpolation)
        else:
            # every weight comes from the checkpoint (strict load): skip the random init (ViT-g: ~1B params)
            with torch.device("meta"):
                self.model = timm.create_model(model_name, **kwargs)
                if pos_embed_grid is not None:
                    keep_pos_embed_grid(self.model, pos_embed_grid, *pos_embed_interpolation)
            self.model.to_empty(device=self.pixel_mean.device)
            self.load_weights(weights_path, convert)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.out_dim = int(self.model.embed_dim)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        grid = self.model.patch_embed.grid_size
        self.num_tokens = 1 if pool in ("cls", "mean") else int(grid[0] * grid[1])
        self._apply_freeze()

    def load_weights(self, path: Path, convert: Callable | None = None) -> None:
        """Official checkpoint -> timm keys (``convert``, default the encoder's, else timm's
        ``checkpoint_filter_fn``, which also resamples ``pos_embed`` to this ``image_size``'s grid) -> strict load."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        convert = convert if convert is not None else self.convert
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
