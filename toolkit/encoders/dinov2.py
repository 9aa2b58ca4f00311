"""DINOv2 (Oquab et al., 2023) ViT encoders on timm, loading the official torch.hub checkpoints
(``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth``, ...) or timm's safetensors
(``timm/vit_small_patch14_dinov2.lvd142m``, ``..._reg4_dinov2.lvd142m``), with the features of FAIR's own
model (github.com/facebookresearch/dinov2) at every ``image_size``.

``pos_embed`` keeps its trained 518 px grid (37x37) and is interpolated in every forward exactly as FAIR's
``DinoVisionTransformer.interpolate_pos_encoding`` does with the torch.hub settings of each variant
(``dinov2/hub/backbones.py``): bicubic by the scale factor ``(grid + 0.1) / 37`` without antialias for the
plain models, bicubic with antialias to the grid (``interpolate_offset=0``) for the ``_reg`` models. At
518 px nothing is interpolated. It is a parameter like any other: it trains when the encoder is not frozen.

``image_size`` need not be a multiple of 14 (FAIR's patch embedding refuses those): the patch grid is
``image_size // 14`` and the last ``image_size % 14`` rows and columns are left out, which is FAIR's model
on the top-left ``14 * (image_size // 14)`` px crop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from toolkit.encoders.vit_common import TimmViTEncoder, check_choice
from toolkit.encoders.download import UrlSource
from toolkit.encoders.weights import resolve_weights

# variant -> timm size name
_SIZES = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}
VARIANTS = (*_SIZES, *(f"{v}_reg" for v in _SIZES))
TRAINED_GRID = 37  # 518 px / 14: the grid of pos_embed in every released checkpoint

# torch.hub's settings of FAIR's interpolate_pos_encoding: (interpolate_offset, interpolate_antialias)
HUB_INTERPOLATION = {False: (0.1, False), True: (0.0, True)}  # keyed by "has registers"


def timm_name(variant: str) -> str:
    """``vits14`` -> ``vit_small_patch14_dinov2``, ``vits14_reg`` -> ``vit_small_patch14_reg4_dinov2``."""
    base, reg = variant.removesuffix("_reg"), variant.endswith("_reg")
    return f"vit_{_SIZES[base]}_patch14_{'reg4_' if reg else ''}dinov2"


def official_file(variant: str) -> str:
    base, reg = variant.removesuffix("_reg"), variant.endswith("_reg")
    return f"dinov2_{base}{'_reg4' if reg else ''}_pretrain.pth"


def weight_source(variant: str) -> UrlSource:
    """Where ``auto`` downloads the official file (FAIR's torch.hub URL, as in ``dinov2/hub/backbones.py``) to:
    torch hub's checkpoints dir. FAIR publishes no checksum."""
    base = variant.removesuffix("_reg")
    file = official_file(variant)
    return UrlSource(f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{base}/{file}", file)


def convert_checkpoint(state: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """torch.hub (FAIR) or timm keys -> timm keys, ``pos_embed`` left at its trained grid.

    timm's ``checkpoint_filter_fn`` renames FAIR's keys (``mlp.w12``/``w3`` -> ``fc1``/``fc2``, ``register_tokens``
    -> ``reg_token``, the register models' class position folded into ``cls_token``), and also resamples
    ``pos_embed`` to the model's grid, which is undone here: the trained one is kept (without the class
    position for the register models, as in timm's layout)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = dict(state)
    pos_embed = state.get("pos_embed")
    out = checkpoint_filter_fn(dict(state), model)
    if pos_embed is not None:
        if "register_tokens" in state and getattr(model, "no_embed_class", False):
            pos_embed = pos_embed[:, 1:]  # its class position went into cls_token
        out["pos_embed"] = pos_embed
    return out


class DINOv2Encoder(TimmViTEncoder):
    """DINOv2 ``variant`` in ``vits14 vitb14 vitl14 vitg14`` (+ ``_reg`` for the 4-register models)."""

    def __init__(
        self,
        variant: str = "vits14",
        weights: str | None = None,
        freeze: bool = True,
        train_last_blocks: int | None = None,
        image_size: int = 224,
        pool: str = "cls",
    ) -> None:
        check_choice("variant", variant, VARIANTS)
        name, file = timm_name(variant), official_file(variant)
        path = resolve_weights(
            weights,
            patterns=(file, f"models--timm--{name}.lvd142m/snapshots/*/model.safetensors",
                      f"models--timm--{name}.lvd142m/snapshots/*/pytorch_model.bin"),
            what=f"DINOv2 {variant}",
            published=f"{weight_source(variant).url} (https://github.com/facebookresearch/dinov2), "
                      f"or as safetensors at https://huggingface.co/timm/{name}.lvd142m",
            source=weight_source(variant),
        )
        super().__init__(name, variant, path, freeze=freeze, image_size=image_size, pool=pool,
                         train_last_blocks=train_last_blocks, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         convert=convert_checkpoint, pos_embed_grid=TRAINED_GRID,
                         pos_embed_interpolation=HUB_INTERPOLATION[variant.endswith("_reg")])
