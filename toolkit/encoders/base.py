"""The encoder contract: uint8 images in, tokens out.

``forward(images)``: ``images`` is uint8 ``[B, C, H, W]`` of any H x W (the caller folds cameras and
time into B); the encoder does its own preprocessing (resize to ``image_size``, scaling to [0, 1],
the family's mean/std) and returns ``[B, N, D]`` with ``N = num_tokens`` and ``D = out_dim``.

Training modes: ``freeze=True`` runs in eval mode without gradients (and is cacheable, see
``toolkit.encoders.cache``); ``freeze=False`` fine-tunes everything, or with ``train_last_blocks=k``
only the last k blocks (``blocks()``) and what follows them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """Base class for image encoders. Subclasses set ``out_dim``/``num_tokens``, implement ``encode``
    and call ``self._apply_freeze()`` at the end of ``__init__``."""

    out_dim: int
    num_tokens: int

    def __init__(
        self,
        freeze: bool = False,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_last_blocks: int | None = None,
    ) -> None:
        super().__init__()
        self.frozen = freeze
        self.image_size = image_size
        self.train_last_blocks = train_last_blocks
        # persistent=False: these are constants of the family, not weights to load
        self.register_buffer("pixel_mean", torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(1, -1, 1, 1), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: preprocessed float images ``[B, C, image_size, image_size]`` -> tokens ``[B, N, D]``."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The encoder's blocks in order, for ``train_last_blocks``."""
        raise NotImplementedError(f"{type(self).__name__} does not support train_last_blocks")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> normalized float at ``image_size``, channels-last (faster convs on CPU)."""
        x = images.float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        if x.shape[1] == self.pixel_mean.shape[1]:
            x = (x - self.pixel_mean) / self.pixel_std
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"{type(self).__name__} expects uint8 images, got {images.dtype}")
        if self.frozen:
            with torch.no_grad():
                return self.encode(self.preprocess(images))
        return self.encode(self.preprocess(images))

    def train(self, mode: bool = True) -> "Encoder":
        # A frozen encoder stays in eval mode (no dropout, fixed norm statistics) whatever the policy does.
        return super().train(mode and not self.frozen)

    def _apply_freeze(self) -> None:
        if self.frozen:
            self.requires_grad_(False)
            self.eval()
        elif self.train_last_blocks is not None:
            blocks = self.blocks()
            k = self.train_last_blocks
            if not 0 <= k <= len(blocks):
                raise ValueError(f"encoder.train_last_blocks={k}: the encoder has {len(blocks)} blocks")
            self.requires_grad_(False)
            for block in blocks[len(blocks) - k:]:
                block.requires_grad_(True)
            for module in self.tail():
                module.requires_grad_(True)

    def tail(self) -> list[nn.Module]:
        """Modules after the last block (final norm, projection) that train with ``train_last_blocks``."""
        return []
