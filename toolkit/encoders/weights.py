"""Finding and loading pretrained weights, offline, in their official formats.

``encoder.weights``: ``null`` = random init; a file path; or ``auto`` = look for the official file
name in the usual caches (torch hub's checkpoints dir, the Hugging Face hub cache, OpenAI CLIP's / open_clip's
cache, R3M's), and if it is not there download it from its official location into the standard cache
(``toolkit.encoders.download``: progress bar, checksum where the publisher gives one, atomic rename), unless
``HF_HUB_OFFLINE`` or ``TOOLKIT_OFFLINE`` is set: then a missing file is one clear error naming the file, where to
put it and the URL to fetch it from.

Nothing in a weights file runs when it is read (``read_checkpoint``, ``load_pickled``): pickles are loaded with
``torch.load(weights_only=True)`` plus SAFE_GLOBALS, TorchScript archives are read without TorchScript, and a file
that needs more is refused by name unless the user opts in (``trust_pickled_code``, see below).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoints dir, as ``torch.hub.get_dir()`` computes it: ``$TORCH_HOME/hub/checkpoints``, by
    default ``$XDG_CACHE_HOME/torch/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints``)."""
    return Path(os.environ.get("TORCH_HOME") or _xdg_cache() / "torch").expanduser() / "hub" / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or _xdg_cache() / "huggingface").expanduser() / "hub"


def clip_cache() -> Path:
    """Where OpenAI CLIP's ``<variant>.pt`` is downloaded: ``$XDG_CACHE_HOME/clip`` (``~/.cache/clip``, where
    openai/CLIP's ``clip.load`` and open_clip put it)."""
    return _xdg_cache() / "clip"


def cache_dirs() -> list[Path]:
    """Where ``auto`` looks: torch hub checkpoints, the HF hub cache, OpenAI CLIP's / open_clip's cache (also
    ``~/.cache/clip`` when ``XDG_CACHE_HOME`` points elsewhere: ``clip.load`` always uses it), and R3M's (``~/.r3m``,
    where ``r3m.load_r3m`` puts ``r3m_50/model.pt``; ``~/.cache/r3m`` too)."""
    home_cache = Path.home() / ".cache"
    dirs = [torch_hub_checkpoints(), hf_hub_cache(), clip_cache(), home_cache / "clip", _xdg_cache() / "r3m",
            home_cache / "r3m", Path.home() / ".r3m"]
    return list(dict.fromkeys(dirs))  # without duplicates, in order


def source_dir(source: Any) -> Path:
    """The standard cache a download from ``source`` (a ``download.UrlSource`` or ``HubSource``) goes to."""
    from toolkit.encoders.download import HubSource

    if isinstance(source, HubSource):
        return hf_hub_cache()
    return {"torch_hub": torch_hub_checkpoints(), "clip": clip_cache()}[source.cache]


def find_cached(patterns: Sequence[str]) -> Path | None:
    """The first file matching one of ``patterns`` in ``cache_dirs()`` (the latest snapshot among several)."""
    for root in cache_dirs():
        for pattern in patterns:
            found = sorted(p for p in root.glob(pattern) if p.is_file())
            if found:
                return found[-1]
    return None


def resolve_weights(weights: str | os.PathLike | None, patterns: Sequence[str], what: str, published: str,
                    source: Any = None) -> Path | None:
    """The weights file to load, or None for random init.

    ``patterns``: official file names (glob patterns, relative to a cache dir, e.g.
    ``dinov2_vits14_pretrain.pth`` or ``models--timm--vit_small_patch14_dinov2.lvd142m/snapshots/*/model.safetensors``).
    ``what``: e.g. ``"DINOv2 ViT-S/14"``; ``published``: where to get the file.
    ``source``: where ``auto`` downloads the file from when no cache has it (``download.UrlSource`` /
    ``HubSource``; its destination must match one of ``patterns``); None: ``auto`` never downloads.
    """
    if weights is None or str(weights).lower() in ("null", "none", "random"):
        return None
    if str(weights) != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ToolkitError(f"encoder.weights={weights}: no such file. Expected the official {what} "
                               f"checkpoint ({patterns[0]}), published at {published}")
        return path
    found = find_cached(patterns)
    if found is not None:
        return found
    if source is None:
        raise ToolkitError(f"encoder.weights=auto: the {what} checkpoint is not on this machine (it has no download "
                           f"source here). Put {patterns[0]} into {cache_dirs()[0]} (or pass "
                           f"encoder.weights=/path/to/file); it is published at {published}")
    from toolkit.encoders import download

    target = source_dir(source)
    url = source.fetch_url()
    offline = download.offline_reason()
    if isinstance(source, download.HubSource):
        if offline:
            raise ToolkitError(f"encoder.weights=auto: the {what} checkpoint is not on this machine and downloads are "
                               f"off ({offline}; unset it to let auto download it). Fetch {url} by hand (e.g. "
                               f"`hf download {source.repo_id} {source.filenames[0]}` online, into the Hugging Face "
                               f"cache {target}), or pass encoder.weights=/path/to/file; it is published at {published}")
        return download.download_hub(source, target, what=f"the {what} checkpoint")
    dest = target / source.dest
    if offline:
        raise ToolkitError(f"encoder.weights=auto: the {what} checkpoint is not on this machine and downloads are off "
                           f"({offline}; unset it to let auto download it). Fetch {url} by hand and save it as {dest} "
                           f"(or pass encoder.weights=/path/to/file); it is published at {published}")
    return download.download_url(url, dest, sha256=source.sha256, hash_prefix=source.hash_prefix,
                                 what=f"the {what} checkpoint")


# --- reading checkpoints without running code from them -------------------------------------------------------
#
# A pickled checkpoint (``.pth``/``.pt``/``.bin``/``.ckpt``) can name any Python callable, which unpickling calls:
# ``torch.load(weights_only=False)`` runs whatever code the file's author chose. Everything here reads with
# ``weights_only=True`` (tensors, containers, numbers, strings) plus the few harmless classes official checkpoints
# pickle (SAFE_GLOBALS), and refuses anything else with a ToolkitError naming the file and the offending global,
# unless the user opted in: ``trust_pickled_code=true`` (conf/train.yaml; train.py calls set_trust_pickled_code
# before it builds anything, so it covers encoder.weights and ckpt_path/resume), ``load_policy(...,
# trust_pickled_code=True)``, or ``--trust-pickled-code`` of the commands that load a policy checkpoint.

#: Classes official checkpoints pickle besides tensors and containers; each only stores attributes when unpickled.
#: MAE's official checkpoints (``mae_pretrain_vit_*.pth``, saved by MAE's ``misc.save_model``) keep their
#: command line in ``'args'``, an ``argparse.Namespace``.
SAFE_GLOBALS: tuple = (argparse.Namespace,)

TRUST_FIELD = "trust_pickled_code"
_trust_pickled_code = False


def set_trust_pickled_code(trust: bool) -> None:
    """Process-wide opt-in to unpickling arbitrary code (train.py sets it from the config field
    ``trust_pickled_code`` before it builds the encoder, the policy or the trainer)."""
    global _trust_pickled_code
    _trust_pickled_code = bool(trust)


def trust_pickled_code() -> bool:
    return _trust_pickled_code


@contextmanager
def trusting_pickled_code(trust: bool) -> Iterator[None]:
    """``set_trust_pickled_code(trust)`` for the duration of a block (e.g. one ``load_policy`` call)."""
    before = _trust_pickled_code
    set_trust_pickled_code(trust)
    try:
        yield
    finally:
        set_trust_pickled_code(before)


def opt_in_hint() -> str:
    return (f"If you trust this file and whoever made it, opt in to running its code: `{TRUST_FIELD}=true` "
            f"(train.py), load_policy(..., {TRUST_FIELD}=True), or --trust-pickled-code "
            f"(python eval.py / python -m toolkit.zero_shot / toolkit.encoders.spawnnet_features)")


def refuse(path: Path, offending: str, detail: str = "") -> ToolkitError:
    """The error for a file that would run code when loaded."""
    return ToolkitError(f"{path}: refusing to load it: it pickles {offending}, which unpickling would call or "
                        f"build (code from the file, not plain weights){detail}. Nothing in it was run. {opt_in_hint()}")


def load_pickled(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` a pickled checkpoint without running code from it: ``weights_only=True`` plus SAFE_GLOBALS.
    A file that needs anything else is refused (ToolkitError naming the file, the global and the opt-in) unless
    ``trust_pickled_code()``, in which case it is loaded with ``weights_only=False`` (and a warning)."""
    path = Path(path)
    if not _looks_like_torch_file(path):
        raise ToolkitError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        error = e
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        raise ToolkitError(f"{path}: cannot read the checkpoint ({e!r})") from None
    offending = _unsafe_globals(path, error)
    if not trust_pickled_code():
        raise refuse(path, offending) from None
    log.warning(f"{path}: loading with torch.load(weights_only=False) ({TRUST_FIELD}=true): it pickles {offending}, "
                f"code from the file runs now")
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ToolkitError(f"{path}: cannot read the checkpoint ({e})") from None


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (protocol opcode 0x80)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as e:
        raise ToolkitError(f"{path}: cannot read the checkpoint ({e})") from None
    return zipfile.is_zipfile(path) or first == b"\x80"


def _unsafe_globals(path: Path, error: Exception) -> str:
    """What the safe unpickler refused, by name (``posix.system``, ``argparse.Namespace``...)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:  # a scan of the pickle's GLOBAL opcodes: nothing is unpickled
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # noqa: BLE001: only for the message
        names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if names:
        return "the global" + ("s " if len(names) > 1 else " ") + ", ".join(names)
    return "something the safe unpickler refused (" + str(error).strip().splitlines()[-1][:300] + ")"


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """A state dict (or a dict holding one) from ``.safetensors``, a pickled ``.pth``/``.pt``/``.bin``, or
    a TorchScript archive (OpenAI CLIP's ``.pt``), without running code from the file (see load_pickled and
    read_torchscript_tensors)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        return read_torchscript_tensors(path)
    return load_pickled(path)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding ``code/`` and ``constants.pkl`` (a pickled state dict holds neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


# --- TorchScript archives (OpenAI CLIP's .pt), read without TorchScript -------------------------------------------
#
# torch.jit.load compiles and runs the archive's TorchScript code (``code/``) and PyTorch does not treat it as safe
# for untrusted files: since 2.6, torch.load(weights_only=True) refuses TorchScript archives rather than hand them
# to torch.jit.load (pytorch/pytorch#143326, after a code-execution report). So the weights are read here from the
# archive's ``data.pkl`` with a restricted unpickler that knows only the module tree's own records (script classes
# ``__torch__.*`` become inert attribute holders, nothing of ``code/`` is read), tensors and storages; the tensors are
# collected under the names ``torch.jit.load(path).state_dict()`` gives. With trust_pickled_code, an archive this
# reader cannot parse falls back to torch.jit.load.

_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
                   "ComplexDoubleStorage": torch.complex128}


class _ScriptObject:
    """What a ``__torch__.*`` record (a scripted module) unpickles to: its attributes, nothing else."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _same(value: Any, *_: Any) -> Any:
    return value


class _TorchScriptUnpickler(pickle.Unpickler):
    """Resolves only what a TorchScript ``data.pkl`` of weights needs; any other global is refused by name."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self.classes:
                self.classes[key] = type(name, (_ScriptObject,), {"__module__": module})
            return self.classes[key]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in ("restore_type_tag", "build_intlist", "build_doublelist",
                                                      "build_boollist", "build_tensorlist"):
            return _same
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes for {numel} x {dtype}")
            self.storages[key] = (torch.frombuffer(bytearray(raw), dtype=dtype) if numel
                                  else torch.empty(0, dtype=dtype))
        return self.storages[key]

    @staticmethod
    def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       *_: Any) -> torch.Tensor:
        ints = all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)) if (
            isinstance(size, tuple) and isinstance(stride, tuple)) else False
        if not isinstance(storage, torch.Tensor) or not ints or len(size) != len(stride):
            raise pickle.UnpicklingError("malformed tensor record")
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
        if end > storage.numel():
            raise pickle.UnpicklingError(f"tensor of size {size} at offset {offset} beyond its storage ({storage.numel()})")
        return storage.as_strided(size, stride, offset)


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive's module tree, named as ``torch.jit.load(path).state_dict()`` names
    them, read without compiling or running any of its code (see the note above)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
            prefix = data[: -len("data.pkl")]
            if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
                raise ToolkitError(f"{path}: a big-endian TorchScript archive; convert it to a state dict first")
            with archive.open(data) as f:
                root = _TorchScriptUnpickler(f, archive, prefix, path).load()
    except pickle.UnpicklingError as e:
        if not trust_pickled_code():
            unsupported = str(e).removeprefix("Unsupported global: GLOBAL ")
            if unsupported != str(e):
                raise refuse(path, f"the global {unsupported}") from None
            raise refuse(path, "a record this reader does not accept", f" ({e})") from None
        log.warning(f"{path}: loading with torch.jit.load ({TRUST_FIELD}=true): its TorchScript code runs now ({e})")
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except (StopIteration, KeyError, zipfile.BadZipFile, OSError, EOFError, ValueError, TypeError) as e:
        raise ToolkitError(f"{path}: cannot read the TorchScript archive ({e!r})") from None
    if not isinstance(root, _ScriptObject):
        raise ToolkitError(f"{path}: a TorchScript archive without a module ({type(root).__name__})")
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out, set())
    return out


def _collect(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in obj.__dict__.get("_state", {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(name)] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out, seen)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load after key conversion, failing with the missing/unexpected keys (or mismatched shapes) by name."""
    def head(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    # load_state_dict raises a bare RuntimeError on shape mismatches even with strict=False (a wrong variant)
    own = module.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if mismatched:
        raise ToolkitError(f"{path}: the checkpoint does not match {type(module).__name__} "
                           f"(shapes, checkpoint vs model: {head(mismatched)}). Is it the right model variant?")
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ToolkitError(f"{path}: the checkpoint does not match {type(module).__name__} "
                           f"(missing: {head(result.missing_keys) or 'none'}; unexpected: {head(result.unexpected_keys) or 'none'}). "
                           f"Is it the right model variant?")
