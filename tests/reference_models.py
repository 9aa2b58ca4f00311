"""The publishers' own model code, for tests that compare our encoders against the real thing.

Installed by ``make install`` (the ``$(STAMP)`` recipe of the Makefile) into ``.venv/reference`` with
``pip install --no-deps --target .venv/reference dinov2==0.0.1.dev2 clip-anytorch==2.6.0``:

- FAIR's DINOv2 (``dinov2/models/vision_transformer.py``, PyPI ``dinov2==0.0.1.dev2``). That release predates the
  register models (``dinov2_vits14_reg`` & co.); :func:`fair_vits14` adds them exactly as FAIR's current code does.
- OpenAI's CLIP ``clip/model.py`` (PyPI ``clip-anytorch==2.6.0``, a packaging of github.com/openai/CLIP), loaded
  alone: the package ``__init__`` imports ``pkg_resources`` and the tokenizer, which the image tower does not need.

Tests that need them skip with the install command when the directory is missing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".venv" / "reference"
INSTALL = f"pip install --no-deps --target {REFERENCE_DIR} dinov2==0.0.1.dev2 clip-anytorch==2.6.0 (or make install)"


def _require(relpath: str) -> Path:
    path = REFERENCE_DIR / relpath
    if not path.is_file():
        if os.environ.get("CI"):  # make install puts it there: in CI a missing copy is a failure, not a skip
            pytest.fail(f"CI is set, so the publishers' reference code must be installed ({path} missing): {INSTALL}")
        pytest.skip(f"the publishers' reference code is not installed ({path} missing): {INSTALL}")
    return path


# --- FAIR's DINOv2 ---------------------------------------------------------------------------------------------

# torch.hub's dinov2/hub/backbones.py (facebookresearch/dinov2 main): the plain models keep the historical
# interpolation (offset 0.1, no antialias); the register models were released with antialias and no offset.
HUB_INTERPOLATION = {0: dict(interpolate_antialias=False, interpolate_offset=0.1),
                     4: dict(interpolate_antialias=True, interpolate_offset=0.0)}


def fair_vits14(num_register_tokens: int = 0, main: bool | None = None) -> nn.Module:
    """FAIR's hub ViT-S/14 (``dinov2_vits14`` / ``dinov2_vits14_reg``) with its random init, in eval mode:
    ``vit_small(patch_size=14, img_size=518, init_values=1.0, ffn_layer="mlp", block_chunks=0)`` and, for the
    register model, 4 register tokens and the register models' interpolation settings. ``main``: use the current
    (register-aware) token preparation even without registers (default: only for the register model)."""
    vits = _fair_vision_transformer()

    kwargs = dict(patch_size=14, img_size=518, init_values=1.0, ffn_layer="mlp", block_chunks=0)
    model = vits.vit_small(**kwargs)
    if not (num_register_tokens or main):
        return model.eval()
    model.__class__ = _registers_class(vits.DinoVisionTransformer)
    model.num_register_tokens = num_register_tokens
    model.register_tokens = None
    if num_register_tokens:
        model.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, model.embed_dim))
        nn.init.normal_(model.register_tokens, std=1e-6)
    for key, value in HUB_INTERPOLATION[num_register_tokens].items():
        setattr(model, key, value)
    return model.eval()


def _fair_vision_transformer() -> ModuleType:
    """FAIR's ``dinov2.models.vision_transformer`` (imported with REFERENCE_DIR on sys.path only meanwhile)."""
    _require("dinov2/models/vision_transformer.py")
    import logging

    logging.getLogger("dinov2").setLevel(logging.ERROR)  # "xFormers not available": the plain attention is used
    sys.path.insert(0, str(REFERENCE_DIR))
    try:
        return importlib.import_module("dinov2.models.vision_transformer")
    finally:
        sys.path.remove(str(REFERENCE_DIR))


def _registers_class(base: type) -> type:
    """FAIR's ``DinoVisionTransformer`` as of the register release (facebookresearch/dinov2 main,
    ``dinov2/models/vision_transformer.py``): ``interpolate_pos_encoding``, ``prepare_tokens_with_masks`` and
    ``forward_features`` copied from there; everything else (patch embedding, blocks, norm) is the installed
    package's. With ``num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False`` it computes what
    the installed (older) release computes, which ``test_fair_register_code_matches_release`` checks."""

    class DinoVisionTransformerMain(base):
        def interpolate_pos_encoding(self, x, w, h):
            previous_dtype = x.dtype
            npatch = x.shape[1] - 1
            N = self.pos_embed.shape[1] - 1
            if npatch == N and w == h:
                return self.pos_embed
            pos_embed = self.pos_embed.float()
            class_pos_embed = pos_embed[:, 0]
            patch_pos_embed = pos_embed[:, 1:]
            dim = x.shape[-1]
            w0 = w // self.patch_size
            h0 = h // self.patch_size
            M = int(math.sqrt(N))  # Recover the number of patches in each dimension
            assert N == M * M
            kwargs = {}
            if self.interpolate_offset:
                # Historical kludge: add a small number to avoid floating point error in the interpolation
                sx = float(w0 + self.interpolate_offset) / M
                sy = float(h0 + self.interpolate_offset) / M
                kwargs["scale_factor"] = (sx, sy)
            else:
                # Simply specify an output size instead of a scale factor
                kwargs["size"] = (w0, h0)
            patch_pos_embed = nn.functional.interpolate(
                patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
                mode="bicubic",
                antialias=self.interpolate_antialias,
                **kwargs,
            )
            assert (w0, h0) == patch_pos_embed.shape[-2:]
            patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
            return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

        def prepare_tokens_with_masks(self, x, masks=None):
            B, nc, w, h = x.shape
            x = self.patch_embed(x)
            if masks is not None:
                x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)

            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = x + self.interpolate_pos_encoding(x, w, h)

            if self.register_tokens is not None:
                x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)

            return x

        def forward_features(self, x, masks=None):
            x = self.prepare_tokens_with_masks(x, masks)
            for blk in self.blocks:
                x = blk(x)
            x_norm = self.norm(x)
            return {
                "x_norm_clstoken": x_norm[:, 0],
                "x_norm_regtokens": x_norm[:, 1: self.num_register_tokens + 1],
                "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1:],
                "x_prenorm": x,
                "masks": masks,
            }

    return DinoVisionTransformerMain


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (so biases, norms, layer scales and the registers all matter), and a position
    embedding that is smooth over the grid (like a trained one) plus noise, large enough that another
    interpolation of it changes the features by far more than float rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                p.add_(1.0)
            elif name.endswith("gamma"):
                p.add_(0.3)
        pos = model.pos_embed  # [1, 1 + M*M, D]
        m, dim = math.isqrt(pos.shape[1] - 1), pos.shape[-1]
        yy, xx = torch.meshgrid(torch.linspace(0, 1, m), torch.linspace(0, 1, m), indexing="ij")
        freq = torch.rand(2, dim, generator=gen) * 12
        phase = torch.rand(dim, generator=gen) * 6.3
        smooth = torch.sin(yy[..., None] * freq[0] + xx[..., None] * freq[1] + phase).reshape(1, m * m, dim)
        pos[:, 1:] = smooth + 0.3 * torch.randn(1, m * m, dim, generator=gen)
        pos[:, :1] = torch.randn(1, 1, dim, generator=gen)
    return model


# --- OpenAI's CLIP ---------------------------------------------------------------------------------------------

def openai_clip_module() -> ModuleType:
    """OpenAI's ``clip/model.py`` (``CLIP``, ``build_model``, ``convert_weights``) as a standalone module."""
    path = _require("clip/model.py")
    name = "openai_clip_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())
