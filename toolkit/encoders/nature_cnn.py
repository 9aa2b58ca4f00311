"""The Nature DQN CNN (Mnih et al., 2015) as Stable-Baselines3's ``NatureCNN``, trained from scratch: three
convolutions (32 8x8 stride 4, 64 4x4 stride 2, 64 3x3 stride 1) and a linear layer to one token.

It is the encoder of SB3's ``CnnPolicy``, which the Crafter paper's PPO baseline uses (Hafner, 2021), and a
tenth of the IMPALA CNN's compute at 64 px (one PPO minibatch of 256 images: ~90 ms against ~670 ms on one CPU
thread). Module names and initialization follow SB3 (orthogonal weights with gain sqrt(2), zero biases, as its
actor-critic policies initialize their features extractor), so SB3's state_dict loads as it is."""

from __future__ import annotations

import math

import torch
from torch import nn

from toolkit.encoders.base import Encoder


def _side(size: int) -> int:
    """The last convolution's output side for a square input of ``size`` pixels."""
    for kernel, stride in ((8, 4), (4, 2), (3, 1)):
        size = (size - kernel) // stride + 1
    return size


class NatureCNN(Encoder):
    """Nature DQN CNN; ``out_dim`` is SB3's ``features_dim`` (512)."""

    def __init__(self, image_size: int = 64, out_dim: int = 512, in_channels: int = 3, freeze: bool = False,
                 train_last_blocks: int | None = None) -> None:
        super().__init__(freeze, image_size=image_size, train_last_blocks=train_last_blocks)
        if _side(image_size) < 1:
            raise ValueError(f"encoder.image_size={image_size}: the Nature CNN needs images of at least 36 pixels")
        self.cnn = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(nn.Linear(64 * _side(image_size) ** 2, out_dim), nn.ReLU())
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(module.weight, gain=math.sqrt(2))
                nn.init.zeros_(module.bias)
        self.out_dim, self.num_tokens = out_dim, 1
        self.to(memory_format=torch.channels_last)
        self._apply_freeze()

    def blocks(self) -> list[nn.Module]:
        return [self.cnn[i : i + 2] for i in (0, 2, 4)]

    def tail(self) -> list[nn.Module]:
        return [self.linear]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(x)).unsqueeze(1)
