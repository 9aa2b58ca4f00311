"""DINOv2 (Oquab et al., 2023) ViT encoders on timm, loading the official torch.hub checkpoints
(``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth``, ...) or timm's safetensors
(``timm/vit_small_patch14_dinov2.lvd142m``); ``pos_embed`` (trained at 518 px) is resampled to
``image_size``."""

from __future__ import annotations

from toolkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from toolkit.encoders.vit_common import TimmViTEncoder, check_choice
from toolkit.encoders.weights import resolve_weights

# variant -> timm size name
_SIZES = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}
VARIANTS = (*_SIZES, *(f"{v}_reg" for v in _SIZES))


def timm_name(variant: str) -> str:
    """``vits14`` -> ``vit_small_patch14_dinov2``, ``vits14_reg`` -> ``vit_small_patch14_reg4_dinov2``."""
    base, reg = variant.removesuffix("_reg"), variant.endswith("_reg")
    return f"vit_{_SIZES[base]}_patch14_{'reg4_' if reg else ''}dinov2"


def official_file(variant: str) -> str:
    base, reg = variant.removesuffix("_reg"), variant.endswith("_reg")
    return f"dinov2_{base}{'_reg4' if reg else ''}_pretrain.pth"


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
        base = variant.removesuffix("_reg")
        path = resolve_weights(
            weights,
            patterns=(file, f"models--timm--{name}.lvd142m/snapshots/*/model.safetensors",
                      f"models--timm--{name}.lvd142m/snapshots/*/pytorch_model.bin"),
            what=f"DINOv2 {variant}",
            published=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{base}/{file} (https://github.com/facebookresearch/dinov2), "
                      f"or as safetensors at https://huggingface.co/timm/{name}.lvd142m",
        )
        super().__init__(name, variant, path, freeze=freeze, image_size=image_size, pool=pool,
                         train_last_blocks=train_last_blocks, mean=IMAGENET_MEAN, std=IMAGENET_STD)
