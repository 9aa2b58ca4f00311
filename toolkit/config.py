"""Config checks before anything is built: a field of the wrong type is named with what was expected."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig

from toolkit.errors import ToolkitError

_PRIMITIVES = (bool, int, float, str)


def _accepts(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits a simple annotation; None when the annotation is not a simple one."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(value, h) for h in typing.get_args(hint)]
        if True in verdicts:
            return True
        return False if all(v is False for v in verdicts) else None
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    return None


def _init_hints(cls: type) -> dict[str, Any]:
    """Annotated ``__init__`` parameters of ``cls`` and the classes it passes ``**kwargs`` on to."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints.update({k: v for k, v in typing.get_type_hints(init).items() if k != "return"})
        except Exception:  # annotations we cannot resolve are simply not checked
            continue
    return hints


def check_types(node: DictConfig, name: str) -> None:
    """Check the primitive fields of a ``_target_`` node (and nested ones) against the target's
    ``__init__`` annotations; raise one ToolkitError naming ``<name>.<field>``."""
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    hints = {}
    if isinstance(target, str):
        try:
            cls = get_class(target)
            hints = _init_hints(cls) if inspect.isclass(cls) else {}
        except Exception as e:
            raise ToolkitError(f"config field {name}._target_: cannot import {target!r} ({e})") from None
    for key in node:
        if str(key).startswith("_"):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            check_types(value, f"{name}.{key}")
        elif key in hints and (isinstance(value, _PRIMITIVES) or value is None or isinstance(value, ListConfig)):
            if _accepts(value, hints[key]) is False:
                expected = getattr(hints[key], "__name__", str(hints[key]))
                raise ToolkitError(f"config field {name}.{key}={value!r}: expected {expected}, "
                                   f"got {type(value).__name__}")


def source_name(source: DictConfig | dict[str, Any]) -> str:
    """A file name for a dataset converted from ``data.source``: ``<format>_<folder>_<hash>``, the hash over
    the absolute source path and every option that changes what is converted, so two sources (or one
    source read with other options) never share a converted file."""
    import hashlib
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    path = Path(str(source["path"])).expanduser().resolve()
    # the decoder reads the same frames whichever it is: not part of the identity
    options = {k: v for k, v in (source.get("options") or {}).items() if k != "video_backend"}
    identity = {k: v for k, v in source.items() if k not in ("path", "options")} | {"path": str(path), "options": options}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{source['format']}_{path.name or 'root'}_{digest}"


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (``${source_name:${data.source}}``); call before composing."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("source_name"):
        OmegaConf.register_new_resolver("source_name", source_name)
    if not OmegaConf.has_resolver("suffix_if"):  # ${suffix_if:${env.symbolic},_symbolic}: "_symbolic" or ""
        OmegaConf.register_new_resolver("suffix_if", lambda flag, suffix: str(suffix) if flag else "")
