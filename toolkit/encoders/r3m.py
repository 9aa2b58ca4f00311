"""R3M (Nair et al., 2022): a torchvision ResNet pretrained on Ego4D for robot manipulation; one pooled token.

Weights (``encoder.weights``): ``null`` = random init, a file, or ``auto``. The official file is R3M's
``model.pt`` (https://github.com/facebookresearch/r3m; ``r3m.load_r3m`` keeps it at ``~/.r3m/r3m_<18|34|50>/model.pt``):
``{'r3m': {'module.convnet.conv1.weight', ..., 'module.lang_enc...', 'module.lang_rew...'}}``. The keys under
``module.convnet.`` are a torchvision ResNet without ``fc``; the language heads are ignored. ``auto`` looks for
``r3m_<n>/model.pt`` in R3M's own ``~/.r3m`` and the usual caches (``~/.cache/r3m`` included); when it is in none
and the machine is online, it downloads R3M's Google Drive file into torch hub's checkpoints dir
(``~/.cache/torch/hub/checkpoints/r3m_<n>/model.pt``, see ``toolkit.encoders.download``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from toolkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from toolkit.encoders.download import UrlSource
from toolkit.encoders.weights import load_strict, read_checkpoint, resolve_weights
from toolkit.errors import ToolkitError

VARIANTS = {"resnet18": (18, 512), "resnet34": (34, 512), "resnet50": (50, 2048)}
PUBLISHED = ("https://github.com/facebookresearch/r3m (Google Drive links in r3m/__init__.py; "
             "r3m.load_r3m saves it as ~/.r3m/r3m_<18|34|50>/model.pt)")


# Google Drive file ids of model.pt, from r3m/__init__.py (load_r3m's ``modelurl = 'https://drive.google.com/uc?id=...'``)
DRIVE_IDS = {"resnet18": "1A1ic-p4KtYlKXdXHcV2QV0cUzI4kn0u-", "resnet34": "15bXD3QRhspIRacOKyWPw5y2HpoWUCEnE",
             "resnet50": "1Xu0ssuG0N1zjZS54wmWzJ7-nb0-7XzbA"}


def weight_source(variant: str) -> UrlSource:
    """Where ``auto`` downloads R3M's ``model.pt`` from: its Google Drive file (the direct-download form of the
    ``drive.google.com/uc?id=`` link, which skips Drive's confirmation page for large files), into torch hub's
    checkpoints dir as ``r3m_<n>/model.pt``. No checksum is published; an HTML page instead of the file is refused."""
    n = VARIANTS[variant][0]
    return UrlSource(f"https://drive.usercontent.google.com/download?id={DRIVE_IDS[variant]}&export=download&confirm=t",
                     f"r3m_{n}/model.pt", mirror_path=f"r3m/r3m_{n}/model.pt")


def weight_patterns(variant: str) -> list[str]:
    # Relative to each of weights.cache_dirs(), which include R3M's own ~/.r3m and ~/.cache/r3m
    return [f"r3m_{VARIANTS[variant][0]}/model.pt"]


class R3MEncoder(Encoder):
    """R3M's ResNet trunk: [0, 1] images with ImageNet mean/std in, the global-average-pooled feature out
    (512 for resnet18/34, 2048 for resnet50), one token."""

    def __init__(
        self,
        variant: str = "resnet18",
        weights: str | None = None,
        freeze: bool = True,
        train_last_blocks: int | None = None,
        image_size: int = 224,
    ) -> None:
        if variant not in VARIANTS:
            raise ToolkitError(f"R3M variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        path = resolve_weights(weights, weight_patterns(variant), f"R3M {variant}",
                               f"https://drive.google.com/uc?id={DRIVE_IDS[variant]} ({PUBLISHED})",
                               source=weight_source(variant))
        super().__init__(freeze, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         train_last_blocks=train_last_blocks)
        self.variant = variant
        self.convnet = getattr(torchvision.models, variant)(weights=None)
        self.convnet.fc = nn.Identity()  # as in R3M
        if path is not None:
            self._fingerprint = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
            load_strict(self, self._convert(read_checkpoint(path), path), path)
        else:
            self._fingerprint = f"random-init:r3m:{variant}"
        self.out_dim, self.num_tokens = VARIANTS[variant][1], 1
        self.to(memory_format=torch.channels_last)
        self._apply_freeze()
        self.train(self.training)

    @staticmethod
    def _convert(ckpt: Mapping, path) -> dict[str, torch.Tensor]:
        """``{'r3m': {'module.convnet.X': ...}}`` (or the inner dict) -> ``{'convnet.X': ...}``."""
        sd = ckpt.get("r3m", ckpt) if isinstance(ckpt, Mapping) else None
        if not isinstance(sd, Mapping):
            raise ToolkitError(f"{path}: expected R3M's model.pt ({{'r3m': state dict}}), got {type(ckpt).__name__}")
        out = {}
        for key, value in sd.items():
            key = key[len("module."):] if key.startswith("module.") else key
            if key.startswith("convnet."):
                out[key] = value
        if not out:
            raise ToolkitError(f"{path}: no 'module.convnet.*' weights in it; is it R3M's model.pt? "
                               f"(keys start with: {', '.join(list(sd)[:5])})")
        return out

    def weights_fingerprint(self) -> str:
        return self._fingerprint

    def blocks(self) -> list[nn.Module]:
        c = self.convnet
        return [c.layer1, c.layer2, c.layer3, c.layer4]

    def train(self, mode: bool = True) -> "R3MEncoder":
        super().train(mode)
        if mode and not self.frozen and self.train_last_blocks is not None:
            # BatchNorm statistics of the frozen part stay fixed too (stem and the blocks before the trained ones)
            c = self.convnet
            for module in [c.conv1, c.bn1, *self.blocks()[: len(self.blocks()) - self.train_last_blocks]]:
                module.eval()
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.convnet(x).unsqueeze(1)
