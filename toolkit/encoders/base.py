"""The encoder contract: uint8 images in, tokens out.

``forward(images)``: ``images`` is uint8 ``[B, C, H, W]`` (the caller folds cameras and time into B);
the encoder does its own preprocessing (resize, scaling, mean/std) and returns ``[B, N, D]`` with
``N = num_tokens`` and ``D = out_dim``. A frozen encoder runs in eval mode without gradients.
"""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class for image encoders. Subclasses set ``out_dim``/``num_tokens`` and implement ``encode``."""

    out_dim: int
    num_tokens: int

    def __init__(self, freeze: bool = False) -> None:
        super().__init__()
        self.frozen = freeze

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: preprocessed float images ``[B, C, H, W]`` -> tokens ``[B, N, D]``."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> float in [0, 1], channels-last (much faster convolutions on CPU)."""
        return images.float().div_(255.0).contiguous(memory_format=torch.channels_last)

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
