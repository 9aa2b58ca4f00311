"""A plain ViT trained from scratch (as in InstructRL), timm's ``VisionTransformer`` with a
configurable patch size (e.g. 8 for 64 px inputs)."""

from __future__ import annotations

from toolkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from toolkit.encoders.vit_common import TimmViTEncoder, check_choice
from toolkit.errors import ToolkitError

_NAMES = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}
VARIANTS = tuple(_NAMES)


class ViTEncoder(TimmViTEncoder):
    """ViT ``variant`` in ``small base large`` with ``patch_size``x``patch_size`` patches, random init."""

    def __init__(
        self,
        variant: str = "small",
        weights: str | None = None,
        freeze: bool = False,
        train_last_blocks: int | None = None,
        image_size: int = 224,
        pool: str = "cls",
        patch_size: int = 16,
    ) -> None:
        check_choice("variant", variant, VARIANTS)
        if weights is not None and str(weights).lower() not in ("null", "none", "random"):
            raise ToolkitError(f"encoder.weights={weights}: the vit encoder trains from scratch and has no "
                               "pretrained weights; set encoder.weights=null (or use encoder=dinov2 / encoder=mae)")
        if image_size % patch_size:
            raise ToolkitError(f"encoder.image_size={image_size} is not a multiple of encoder.patch_size={patch_size}")
        super().__init__(_NAMES[variant], variant, None, freeze=freeze, image_size=image_size, pool=pool,
                         train_last_blocks=train_last_blocks, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         patch_size=patch_size)

    def weights_fingerprint(self) -> str:
        return f"ViTEncoder:{self.variant}:patch{self.patch_size}:random-init"
