"""SpawnNet (Lin et al., 2023, "SpawnNet: Learning Generalizable Visuomotor Skills from Pre-trained
Networks"): a trainable two-stream adapter over a frozen pre-trained ViT.

The backbone (any timm-ViT-based ``Encoder`` keeping its ``VisionTransformer`` at ``.model``, e.g.
``DINOv2Encoder``) is tapped at several blocks. Each tap's patch tokens (class/register tokens
dropped) are L2-normalized over channels and projected by a 1x1 conv. A parallel conv stream on the
raw image (RGB or RGB-D) runs a stem and one stage per tap; each stage halves the resolution, then
fuses the bilinearly resized projected tap by concatenation and refines with residual conv blocks.
The last stage's feature map, flattened, gives the tokens ``[B, H' * W', out_dim]``.

The backbone sees only the RGB channels, through its own preprocessing (its mean/std, resized to
its ``image_size``); the conv stream sees the image scaled to [0, 1] at this encoder's
``image_size`` (a depth channel is uint8 like the colours, so it is scaled the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from toolkit.encoders.base import Encoder
from toolkit.encoders.impala import ResidualBlock
from toolkit.errors import ToolkitError


def default_taps(depth: int, num: int = 3) -> list[int]:
    """The last block of each of ``num`` equal parts of the depth: [3, 7, 11] for 12 blocks."""
    return [round(depth * (i + 1) / num) - 1 for i in range(num)]


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalize ``[B, C, H, W]`` features over channels (scale-invariant per patch)."""
    return F.normalize(features, dim=1, eps=1e-6)


def _down(side: int) -> int:
    """Output side of a 3x3 stride-2 conv / max-pool with padding 1."""
    return (side + 1) // 2


class _Stage(nn.Module):
    """Conv + max-pool (halves the resolution), fuse the resized backbone tap, residual refinement."""

    def __init__(self, in_ch: int, out_ch: int, adapter_ch: int, num_blocks: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse = nn.Conv2d(out_ch + adapter_ch, out_ch, 3, padding=1)
        self.refine = nn.Sequential(*[ResidualBlock(out_ch) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x))
        tap = F.interpolate(tap, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([torch.relu(x), tap], dim=1))
        return self.refine(x)


class SpawnNetEncoder(Encoder):
    """SpawnNet adapter over ``backbone``.

    ``taps``: backbone block indices to fuse (default: the last block of each third of the depth), one
    conv stage each, in block order; ``stage_channels`` has one entry per tap. ``in_channels``: 3 (RGB)
    or 4 (RGB-D, depth as the 4th uint8 channel). ``image_size``: the conv stream's input side; the
    output has ``ceil(image_size / 2 ** (1 + len(taps)))`` squared tokens (196 at 224 with 3 taps).
    ``freeze_backbone``: the backbone runs in eval mode without gradients and has no trainable
    parameters (whatever its own ``freeze``); ``False`` fine-tunes it (honouring its own
    ``train_last_blocks``). The adapter always trains.
    """

    def __init__(
        self,
        backbone: Encoder,
        taps: Sequence[int] | None = None,
        in_channels: int = 3,
        stem_channels: int = 32,
        stage_channels: Sequence[int] = (32, 64, 128),
        adapter_channels: int = 64,
        num_refine_blocks: int = 1,
        image_size: int = 224,
        freeze_backbone: bool = True,
        out_dim: int = 128,
    ) -> None:
        super().__init__(freeze=False, image_size=image_size)
        vit = getattr(backbone, "model", None)
        if vit is None or not hasattr(vit, "blocks") or not hasattr(vit, "forward_intermediates"):
            raise ToolkitError(f"SpawnNet needs a timm-ViT-based backbone keeping its VisionTransformer at "
                               f".model (e.g. DINOv2Encoder); got {type(backbone).__name__}")
        if in_channels not in (3, 4):
            raise ToolkitError(f"encoder.in_channels={in_channels}: SpawnNet takes RGB (3) or RGB-D (4) images")
        depth = len(vit.blocks)
        taps = default_taps(depth) if taps is None else [int(t) for t in taps]
        taps = sorted({t % depth if -depth <= t < depth else t for t in taps})
        if not taps or any(not 0 <= t < depth for t in taps):
            raise ToolkitError(f"encoder.taps={taps}: the backbone has blocks 0..{depth - 1}")
        stage_channels = [int(c) for c in stage_channels]
        if len(stage_channels) != len(taps):
            raise ToolkitError(f"encoder.stage_channels={stage_channels} needs one entry per tap "
                               f"(encoder.taps={taps}): {len(taps)} entries")

        self.backbone = backbone
        self.taps = taps
        self.in_channels = in_channels
        self.freeze_backbone = freeze_backbone
        self.config = dict(taps=taps, in_channels=in_channels, stem_channels=stem_channels,
                           stage_channels=stage_channels, adapter_channels=adapter_channels,
                           num_refine_blocks=num_refine_blocks, image_size=image_size,
                           freeze_backbone=freeze_backbone, out_dim=out_dim)
        embed_dim = int(getattr(vit, "embed_dim", None) or vit.num_features)

        # the adapter
        self.proj = nn.ModuleList([nn.Conv2d(embed_dim, adapter_channels, 1) for _ in taps])
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, stride=2, padding=1), nn.ReLU())
        chans = [stem_channels, *stage_channels]
        self.stages = nn.ModuleList([_Stage(chans[i], chans[i + 1], adapter_channels, num_refine_blocks)
                                     for i in range(len(taps))])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(stage_channels[-1], out_dim, 1))

        side = _down(image_size)
        for _ in taps:
            side = _down(side)
        self.grid = (side, side)
        self.out_dim, self.num_tokens = out_dim, side * side
        for module in self.adapter_modules():
            module.to(memory_format=torch.channels_last)

        if freeze_backbone:
            backbone.frozen = True
            backbone.requires_grad_(False)
            backbone.eval()
        elif getattr(backbone, "frozen", False) or not any(p.requires_grad for p in backbone.parameters()):
            backbone.frozen = False
            backbone.requires_grad_(True)
            backbone._apply_freeze()  # its own train_last_blocks, if any
        self._apply_freeze()

    def adapter_modules(self) -> list[nn.Module]:
        """The trainable adapter (everything but the backbone)."""
        return [self.proj, self.stem, self.stages, self.head]

    def weights_fingerprint(self) -> str:
        """The backbone's weights fingerprint (its class name if it has none) plus the adapter config."""
        fp = getattr(self.backbone, "weights_fingerprint", None)
        base = str(fp()) if callable(fp) else type(self.backbone).__name__
        cfg = ",".join(f"{k}={v}" for k, v in self.config.items())
        return f"{base}+spawnnet({cfg})"

    # --- pieces, exposed for inspection (see toolkit.encoders.spawnnet_features) ------------------
    def backbone_taps(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """uint8 RGB ``[B, 3, H, W]`` -> the tapped blocks' patch grids ``[B, embed_dim, h, w]`` (no
        class/register tokens, no final norm), in block order."""
        x = self.backbone.preprocess(rgb)
        vit = self.backbone.model
        if self.backbone.frozen:
            with torch.no_grad():
                return vit.forward_intermediates(x, indices=self.taps, intermediates_only=True, norm=False,
                                                 stop_early=True, output_fmt="NCHW")
        return vit.forward_intermediates(x, indices=self.taps, intermediates_only=True, norm=False,
                                         stop_early=True, output_fmt="NCHW")

    def project_taps(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """L2-normalize each tap over channels, then its 1x1 projection -> ``[B, adapter_channels, h, w]``."""
        return [proj(l2_normalize(t.float())) for proj, t in zip(self.proj, taps)]

    def conv_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> the conv stream's input in [0, 1] at ``image_size``."""
        x = images.float().div_(255.0)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Everything along the way: ``taps`` (projected backbone taps), ``stages`` (fused stage
        outputs) and ``out`` (the final map ``[B, out_dim, H', W']``)."""
        self._check(images)
        taps = self.project_taps(self.backbone_taps(images[:, :3]))
        x = self.stem(self.conv_input(images))
        stages = []
        for stage, tap in zip(self.stages, taps):
            x = stage(x, tap)
            stages.append(x)
        return {"taps": taps, "stages": stages, "out": self.head(x)}

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"{type(self).__name__} expects uint8 images, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ToolkitError(f"SpawnNetEncoder(in_channels={self.in_channels}) got images of shape "
                               f"{tuple(images.shape)}; expected [B, {self.in_channels}, H, W]")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)["out"].flatten(2).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("SpawnNetEncoder preprocesses its two streams itself: call it on uint8 images")
