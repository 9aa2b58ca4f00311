"""IMPALA CNN (Espeholt et al., 2018), trained from scratch: conv stages with max-pooling and
residual blocks, then a linear layer to one token."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.encoders.base import Encoder


class ResidualBlock(nn.Module):
    """Two 3x3 convs with pre-activation ReLUs and a skip connection (IMPALA's, reused by SpawnNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


def _stage(in_ch: int, out_ch: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
        *[ResidualBlock(out_ch) for _ in range(num_blocks)],
    )


class ImpalaEncoder(Encoder):
    """IMPALA CNN; ``channels`` per stage, each stage halves the resolution."""

    def __init__(
        self,
        image_size: int = 64,
        channels: tuple[int, ...] = (16, 32, 32),
        num_blocks: int = 2,
        out_dim: int = 256,
        in_channels: int = 3,
        freeze: bool = False,
        train_last_blocks: int | None = None,
    ) -> None:
        super().__init__(freeze, image_size=image_size, train_last_blocks=train_last_blocks)
        chans = [in_channels, *channels]
        self.stages = nn.Sequential(*[_stage(chans[i], chans[i + 1], num_blocks) for i in range(len(channels))])
        side = image_size
        for _ in channels:
            side = (side + 1) // 2
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(channels[-1] * side * side, out_dim), nn.ReLU())
        self.out_dim, self.num_tokens = out_dim, 1
        self.to(memory_format=torch.channels_last)
        self._apply_freeze()

    def blocks(self) -> list[nn.Module]:
        return list(self.stages)

    def tail(self) -> list[nn.Module]:
        return [self.head]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x)).unsqueeze(1)
