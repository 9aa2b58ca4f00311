"""CLIP (Radford et al., 2021) image tower, on open_clip's model code.

Weights (``encoder.weights``): ``null`` = random init, a file, or ``auto`` (see ``toolkit.encoders.weights``).
Accepted files, all in the OpenAI/open_clip key layout (``visual.conv1.weight``, ``visual.transformer.resblocks.0...``):

- OpenAI's ``ViT-B-32.pt`` etc. (https://github.com/openai/CLIP): a TorchScript archive, or the same weights saved
  as a plain state dict. These were trained with QuickGELU, which is used for them automatically.
- open_clip checkpoints: ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` from the Hugging Face hub
  (https://huggingface.co/laion, ``timm/vit_*_clip_*``), or an open_clip training checkpoint
  (``{'state_dict': {'module.visual...'}}``).

QuickGELU or GELU (they have no weights, so a wrong choice loads fine and silently changes every feature) is decided
from what the file is, never from its name (a renamed copy behaves the same), in this order:

1. ``quick_gelu=true/false`` if given.
2. OpenAI's own formats -> QuickGELU (OpenAI's ``build_model`` always uses it, as does open_clip's
   ``build_model_from_openai_state_dict``): a TorchScript archive (every OpenAI release is one; nobody else
   publishes CLIP that way); a state dict with the archive's ``input_resolution`` / ``context_length`` /
   ``vocab_size`` entries (``torch.jit.load(...).state_dict()``); a state dict saved from OpenAI's ``clip/model.py``
   (``clip.load(..., jit=False)``), told by its parameter order: OpenAI's residual blocks register ``attn, ln_1,
   mlp, ln_2``, open_clip's ``ln_1, attn, ln_2, mlp`` (the key *names* are the same in both: open_clip copied
   OpenAI's layout, so names alone cannot tell them apart).
3. The variant: ``ViT-B-32-quickgelu`` & co. -> QuickGELU (open_clip's model configs; open_clip 3.x decides by
   the model name too).
4. The ``open_clip_config.json`` published with the weights (next to the file, as in a Hugging Face snapshot):
   its ``model_cfg.quick_gelu``.
5. A file inside a Hugging Face hub cache snapshot of a repository open_clip lists for the variant (e.g.
   ``models--timm--vit_base_patch32_clip_224.openai``): that entry's ``quick_gelu``.
6. Otherwise GELU, the variant's open_clip config, with a warning: open_clip's own state dicts say nothing
   about the activation (use the ``-quickgelu`` variant or ``quick_gelu=true`` for QuickGELU-trained ones such
   as OpenAI's weights re-saved by open_clip, LAION-400M or MetaCLIP).

The text tower (for instructions) is in ``toolkit.encoders.language`` and shares the loading code here.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.encoders.base import Encoder
from toolkit.encoders.download import HubSource, UrlSource, openai_clip_source
from toolkit.encoders.weights import load_strict, read_checkpoint, resolve_weights
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

PUBLISHED = ("https://github.com/openai/CLIP (OpenAI's <variant>.pt) and https://huggingface.co/laion "
             "(open_clip_model.safetensors / open_clip_pytorch_model.bin)")
# Entries of OpenAI's TorchScript state dict that are not weights
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
# One residual block's parameters in the order OpenAI's clip/model.py registers them (attn, ln_1, mlp, ln_2);
# open_clip's blocks register ln_1, attn, ln_2, mlp, and a sorted dict (safetensors) puts biases before weights.
OPENAI_BLOCK_ORDER = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                      "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                      "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias")


def model_config(variant: str) -> dict[str, Any]:
    """open_clip's config for a ViT CLIP model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...)."""
    import open_clip

    cfg = open_clip.get_model_config(variant) if "/" not in variant and ":" not in variant else None
    ok = (cfg is not None and isinstance(cfg["vision_cfg"].get("layers"), int) and not cfg["vision_cfg"].get("timm_model_name")
          and not cfg["text_cfg"].get("hf_model_name") and cfg.get("custom_text") is not True)
    if not ok:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-") and "SigLIP" not in m and "CLIPA" not in m]
        raise ToolkitError(f"CLIP variant {variant!r}: not an open_clip ViT CLIP model name; "
                           f"use one of ViT-B-32, ViT-B-16, ViT-L-14 (or another of {', '.join(vits)})")
    return cfg


def _hf_repo_dir(hf_hub: str) -> tuple[str, str | None]:
    parts = hf_hub.strip("/").split("/")
    return "models--" + "--".join(parts[:2]), (parts[2] if len(parts) > 2 and parts[2] else None)


def _published(variant: str) -> list[dict[str, Any]]:
    import open_clip

    return [open_clip.get_pretrained_cfg(variant, tag) for tag in open_clip.list_pretrained_tags_by_model(variant)]


def weight_patterns(variant: str) -> list[str]:
    """Official file names for ``auto``: OpenAI's ``<variant>.pt`` first (``~/.cache/clip``, where openai/CLIP and
    open_clip download it), then every published open_clip checkpoint of the variant in the HF hub cache."""
    patterns: list[str] = []
    for cfg in _published(variant):
        if cfg.get("url"):
            patterns.append(os.path.basename(cfg["url"]))
        if cfg.get("hf_hub"):
            repo, filename = _hf_repo_dir(cfg["hf_hub"])
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            patterns += [f"{repo}/snapshots/*/{name}" for name in names]
    return patterns or [f"{variant}.pt"]


def weight_source(variant: str) -> UrlSource | HubSource | None:
    """Where ``auto`` downloads the variant's weights from, in open_clip's registry of published checkpoints: OpenAI's
    own ``<variant>.pt`` (``https://openaipublic.azureedge.net/clip/models/<sha256>/<variant>.pt``, SHA-256 checked)
    into ``~/.cache/clip`` where OpenAI publishes the variant; else the first Hugging Face hub repository open_clip
    lists for it (``open_clip_model.safetensors``, else ``open_clip_pytorch_model.bin``) into the HF hub cache; else
    the first URL listed (e.g. open_clip's GitHub releases, torch.hub's hash suffix checked)."""
    published = _published(variant)
    for cfg in published:
        if cfg.get("url", "").startswith("https://openaipublic.azureedge.net/"):
            return openai_clip_source(cfg["url"])
    for cfg in published:
        if cfg.get("hf_hub"):
            repo = cfg["hf_hub"].strip("/").split("/")
            filename = repo[2] if len(repo) > 2 and repo[2] else None
            names = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
            return HubSource("/".join(repo[:2]), names)
    for cfg in published:
        if cfg.get("url"):
            return UrlSource(cfg["url"], os.path.basename(cfg["url"]), cache="clip")
    return None


def _registry_entry(path: Path, variant: str) -> dict[str, Any] | None:
    """open_clip's published-checkpoint entry for the Hugging Face hub repository whose cache snapshot holds this
    file (``.../models--<org>--<repo>/snapshots/<rev>/...``), if any. The file's own name is never used."""
    parts = path.absolute().parts
    for cfg in _published(variant):
        if cfg.get("hf_hub"):
            repo = _hf_repo_dir(cfg["hf_hub"])[0]
            if any(part == repo and parts[i + 1: i + 2] == ("snapshots",) for i, part in enumerate(parts)):
                return cfg
    return None


def openai_format(state_dict: Mapping[str, Any], torchscript: bool) -> str | None:
    """Why this checkpoint is in one of OpenAI's own formats (so trained with QuickGELU), or None. ``state_dict``:
    the file's entries in file order, ``module.`` prefixes removed."""
    if torchscript:
        return "a TorchScript archive, OpenAI's release format"
    if any(k in state_dict for k in OPENAI_META_KEYS):
        return "a state dict of OpenAI's TorchScript archive (input_resolution/context_length/vocab_size entries)"
    for tower in ("visual.transformer.resblocks.0.", "transformer.resblocks.0."):
        block = tuple(k[len(tower):] for k in state_dict if k.startswith(tower))
        if block:
            if block == OPENAI_BLOCK_ORDER:
                return "a state dict of OpenAI's clip/model.py (its parameter order: attn, ln_1, mlp, ln_2)"
            break
    return None


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding ``code/`` and ``constants.pkl`` (a pickled state dict holds neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


@dataclass
class CLIPCheckpoint:
    """A CLIP checkpoint converted to open_clip's CLIP key layout (``None`` state dict = random init)."""

    variant: str
    path: Path | None
    state_dict: dict[str, torch.Tensor] | None
    quick_gelu: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    openai: bool = False
    quick_gelu_from: str = ""  # what decided quick_gelu

    def fingerprint(self) -> str:
        return file_fingerprint(self.path) if self.path is not None else f"random-init:open_clip:{self.variant}"


def load_clip_checkpoint(variant: str, weights: str | os.PathLike | None, quick_gelu: bool | None = None) -> CLIPCheckpoint:
    """Resolve ``weights`` for ``variant`` and read it into open_clip's key layout (both towers)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = model_config(variant)
    path = resolve_weights(weights, weight_patterns(variant), f"CLIP {variant}", PUBLISHED, source=weight_source(variant))
    mean, std = tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
    if path is None:
        source = "the quick_gelu argument" if quick_gelu is not None else f"open_clip's config for {variant}"
        return CLIPCheckpoint(variant, None, None, bool(cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu),
                              mean, std, quick_gelu_from=source)

    raw: Any = read_checkpoint(path)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]  # open_clip training checkpoint
    if not isinstance(raw, Mapping):
        raise ToolkitError(f"{path}: expected a CLIP state dict, got {type(raw).__name__}")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    why_openai = openai_format(sd, is_torchscript(path))
    for key in OPENAI_META_KEYS:
        sd.pop(key, None)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    sidecar = path.parent / "open_clip_config.json"
    side_cfg: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            side_cfg = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            side_cfg = {}
    entry = _registry_entry(path, variant)
    if quick_gelu is not None:
        source = "the quick_gelu argument"
    elif why_openai is not None:
        quick_gelu, source = True, why_openai
    elif cfg.get("quick_gelu", False):
        quick_gelu, source = True, f"the variant {variant}"
    elif isinstance(side_cfg.get("model_cfg"), Mapping):
        quick_gelu, source = bool(side_cfg["model_cfg"].get("quick_gelu", False)), str(sidecar)
    elif entry is not None:
        quick_gelu = bool(entry.get("quick_gelu", False))
        source = f"open_clip's entry for the Hugging Face repository {entry['hf_hub'].strip('/')}"
    else:
        quick_gelu, source = False, f"open_clip's config for {variant} (the file does not tell)"
        log.warning(f"{path}: an open_clip state dict, which does not say whether its model used QuickGELU: using "
                    f"GELU as open_clip's {variant} config does. If it was trained with QuickGELU (OpenAI's weights "
                    f"re-saved by open_clip, LAION-400M, MetaCLIP), use encoder.variant={variant}-quickgelu or "
                    f"quick_gelu=true")
    openai = why_openai is not None
    pre = side_cfg.get("preprocess_cfg", {})
    if entry is not None:
        mean, std = tuple(entry.get("mean", mean)), tuple(entry.get("std", std))
    elif "mean" in pre and "std" in pre:
        mean, std = tuple(pre["mean"]), tuple(pre["std"])
    return CLIPCheckpoint(variant, path, sd, bool(quick_gelu), mean, std, openai, source)


def build_visual(variant: str, quick_gelu: bool, image_size: int | None = None, output_tokens: bool = False,
                 empty: bool = False) -> nn.Module:
    """open_clip's VisionTransformer for ``variant`` (fp32), optionally at another input size. ``empty``: skip the
    random init (uninitialised memory), for a checkpoint loaded strictly right after."""
    from open_clip.model import _build_vision_tower

    cfg = model_config(variant)
    vision_cfg = dict(cfg["vision_cfg"], output_tokens=output_tokens)
    if image_size is not None:
        vision_cfg["image_size"] = image_size
    if not empty:
        return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu, cast_dtype=None)
    with torch.device("meta"):
        visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu, cast_dtype=None)
    if any(True for _ in visual.buffers()):  # none in open_clip's ViT; they would not come from the checkpoint
        raise RuntimeError("unexpected buffers in open_clip's VisionTransformer")
    return visual.to_empty(device="cpu")


def build_text(variant: str, quick_gelu: bool, empty: bool = False) -> nn.Module:
    """open_clip's TextTransformer for ``variant`` (fp32); its keys are the CLIP checkpoint's non-``visual.`` keys.
    ``empty``: as for ``build_visual``."""
    from open_clip.model import _build_text_tower

    cfg = model_config(variant)
    if not empty:
        return _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=quick_gelu, cast_dtype=None)
    with torch.device("meta"):
        text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=quick_gelu, cast_dtype=None)
    text = text.to_empty(device="cpu")
    if text.attn_mask is not None:  # the causal mask is a non-persistent buffer: rebuild it
        text.register_buffer("attn_mask", text.build_causal_mask(), persistent=False)
    return text


class CLIPEncoder(Encoder):
    """CLIP's image tower. ``pool="cls"``: the projected image embedding (the one CLIP matches with text), one token
    of ``embed_dim``; ``pool="patch"``: the transformer's patch tokens after ``ln_post``, ``grid**2`` tokens of width.

    Input of any size is resized to ``image_size`` (the position embeddings are interpolated if that differs from
    the variant's native 224)."""

    def __init__(
        self,
        variant: str = "ViT-B-32",
        weights: str | None = None,
        freeze: bool = True,
        train_last_blocks: int | None = None,
        image_size: int = 224,
        pool: str = "cls",
        quick_gelu: bool | None = None,
    ) -> None:
        if pool not in ("cls", "patch"):
            raise ToolkitError(f"encoder.pool={pool!r}: expected 'cls' or 'patch'")
        ckpt = load_clip_checkpoint(variant, weights, quick_gelu)
        super().__init__(freeze, image_size=image_size, mean=ckpt.mean, std=ckpt.std, train_last_blocks=train_last_blocks)
        self.variant, self.pool, self.quick_gelu = variant, pool, ckpt.quick_gelu
        self._fingerprint = ckpt.fingerprint()
        self.visual = build_visual(variant, ckpt.quick_gelu, image_size, output_tokens=pool == "patch",
                                   empty=ckpt.state_dict is not None)
        if ckpt.state_dict is not None:
            from open_clip.model import resize_pos_embed

            sd = {k: v for k, v in ckpt.state_dict.items() if k.startswith("visual.")}
            resize_pos_embed(sd, self)  # no-op at the native size
            load_strict(self, sd, ckpt.path)
        grid = self.visual.grid_size
        if pool == "patch":
            self.visual.proj = None  # unused: the patch tokens are taken before the projection
            self.out_dim, self.num_tokens = self.visual.transformer.width, grid[0] * grid[1]
        else:
            self.out_dim, self.num_tokens = self.visual.output_dim, 1
        self._apply_freeze()
        if not self.frozen and train_last_blocks is not None and self.visual.proj is not None:
            self.visual.proj.requires_grad_(True)  # part of the tail, but a Parameter, not a module

    def weights_fingerprint(self) -> str:
        return f"{self._fingerprint}:quick_gelu={self.quick_gelu}"

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)

    def tail(self) -> list[nn.Module]:
        return [self.visual.ln_post]  # and visual.proj (a Parameter), see __init__

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "patch":
            return self.visual(x)[1]
        return self.visual(x).unsqueeze(1)
