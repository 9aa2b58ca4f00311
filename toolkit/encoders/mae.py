"""MAE (He et al., 2022) pretrained ViT encoders on timm, loading the official pretrain checkpoints
(``mae_pretrain_vit_base.pth`` = ``{'model': state_dict}``, encoder only, timm key layout) or timm's
safetensors (``timm/vit_base_patch16_224.mae``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from toolkit.encoders.vit_common import TimmViTEncoder, check_choice
from toolkit.encoders.download import UrlSource
from toolkit.encoders.weights import resolve_weights

_SIZES = {"vitb16": "base", "vitl16": "large"}
VARIANTS = tuple(_SIZES)


def weight_source(variant: str) -> UrlSource:
    """Where ``auto`` downloads the official pretrain checkpoint from (github.com/facebookresearch/mae's README) to:
    torch hub's checkpoints dir. FAIR publishes no checksum."""
    file = f"mae_pretrain_vit_{_SIZES[variant]}.pth"
    return UrlSource(f"https://dl.fbaipublicfiles.com/mae/pretrain/{file}", file)


def _convert(state: Mapping[str, Any], model: nn.Module) -> Mapping[str, torch.Tensor]:
    """Unwrap ``{'model': ...}``; drop the decoder of the full (``mae_visualize_*``) checkpoints; timm's
    filter resamples ``pos_embed``."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = state.get("model", state)
    state = {k: v for k, v in state.items() if not k.startswith("decoder_") and k != "mask_token"}
    return checkpoint_filter_fn(state, model)


class MAEEncoder(TimmViTEncoder):
    """MAE ``variant`` in ``vitb16 vitl16``."""

    def __init__(
        self,
        variant: str = "vitb16",
        weights: str | None = None,
        freeze: bool = True,
        train_last_blocks: int | None = None,
        image_size: int = 224,
        pool: str = "cls",
    ) -> None:
        check_choice("variant", variant, VARIANTS)
        size = _SIZES[variant]
        name, file = f"vit_{size}_patch16_224", f"mae_pretrain_vit_{size}.pth"
        path = resolve_weights(
            weights,
            patterns=(file, f"models--timm--{name}.mae/snapshots/*/model.safetensors",
                      f"models--timm--{name}.mae/snapshots/*/pytorch_model.bin"),
            what=f"MAE {variant}",
            published=f"{weight_source(variant).url} (https://github.com/facebookresearch/mae), "
                      f"or as safetensors at https://huggingface.co/timm/{name}.mae",
            source=weight_source(variant),
        )
        super().__init__(name, variant, path, freeze=freeze, image_size=image_size, pool=pool,
                         train_last_blocks=train_last_blocks, mean=IMAGENET_MEAN, std=IMAGENET_STD, convert=_convert)
