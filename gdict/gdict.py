"""GDict: a nested dict of numpy arrays / torch tensors with array-like indexing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import h5py
import numpy as np
import torch

Leaf = Union[np.ndarray, torch.Tensor]
Tree = dict  # nested dict whose leaves are Leaf


def _as_leaf(x: Any) -> Leaf:
    """Keep arrays/tensors as they are; turn scalars, lists and numpy scalars into ndarrays."""
    return x if isinstance(x, (np.ndarray, torch.Tensor)) else np.asarray(x)


def _as_tree(data: Any) -> Tree:
    """Copy the dict structure (not the leaves) so a new GDict never aliases the caller's dicts."""
    if isinstance(data, GDict):
        data = data.memory
    return {k: _as_tree(v) if isinstance(v, (dict, GDict)) else _as_leaf(v) for k, v in data.items()}


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _flatten(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Leaf]]:
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, path + "/")
        else:
            yield path, v


def _set_path(tree: Tree, path: str, value: Any) -> None:
    *parents, last = _split(path)
    node = tree
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyError(f"cannot set '{path}': '{'/'.join(parents[: i + 1])}' is a leaf, not a dict")
    node[last] = value


def _unflatten(items: Sequence[tuple[str, Any]]) -> Tree:
    tree: Tree = {}
    for path, leaf in items:
        _set_path(tree, path, leaf)
    return tree


def _index_for(leaf: Leaf, idx: Any) -> Any:
    """Convert an index to the leaf's backend (numpy cannot take tensors and vice versa on GPU)."""
    if isinstance(idx, tuple):
        return tuple(_index_for(leaf, i) for i in idx)
    if isinstance(leaf, torch.Tensor):
        if isinstance(idx, np.ndarray):
            return torch.as_tensor(idx, device=leaf.device)
        if isinstance(idx, torch.Tensor) and idx.ndim > 0:
            return idx.to(leaf.device)
        return int(idx) if isinstance(idx, np.integer) else idx
    return idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx


def _to_numpy(x: Leaf) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    # numpy has no bfloat16; float32 represents it exactly.
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def _key_check(trees: list[GDict]) -> list[str]:
    """Return the common flat keys, or raise ValueError naming what is missing where."""
    if not trees:
        raise ValueError("need at least one GDict")
    ref = trees[0].flat_keys()
    for i, t in enumerate(trees[1:], start=1):
        keys = t.flat_keys()
        if set(keys) != set(ref):
            missing, extra = sorted(set(ref) - set(keys)), sorted(set(keys) - set(ref))
            raise ValueError(f"item {i} has different keys than item 0: missing {missing}, extra {extra}")
    return ref


def _combine(items: Sequence[Any], np_fn: Callable, torch_fn: Callable, axis: int) -> GDict:
    trees = [GDict(x) for x in items]
    out = []
    for path in _key_check(trees):
        leaves = [t[path] for t in trees]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if tensors:  # mixed backends: promote numpy leaves to torch on the tensors' device
            dev = tensors[0].device
            out.append((path, torch_fn([torch.as_tensor(x, device=dev) for x in leaves], dim=axis)))
        else:
            out.append((path, np_fn(leaves, axis=axis)))
    return GDict(_unflatten(out))


class GDict:
    """Nested dict of arrays/tensors; string keys address `/`-paths, anything else indexes every leaf."""

    def __init__(self, data: dict | GDict | None = None) -> None:
        self.memory: Tree = _as_tree(data if data is not None else {})

    # ---- key access -------------------------------------------------------------------
    def _lookup(self, path: str) -> Tree | Leaf:
        node: Any = self.memory
        parts = _split(path)
        for i, part in enumerate(parts):
            where = "/".join(parts[:i]) or "<root>"
            if not isinstance(node, dict):
                raise KeyError(f"'{path}': '{where}' is a leaf, not a dict")
            if part not in node:
                raise KeyError(f"'{path}': no key '{part}' at '{where}'; available: {sorted(node)}")
            node = node[part]
        return node

    def __getitem__(self, key: Any) -> GDict | Leaf:
        if isinstance(key, str):
            node = self._lookup(key)
            if isinstance(node, dict):
                sub = GDict()
                sub.memory = node  # a view: writes through the sub-GDict reach this one
                return sub
            return node
        return self.map(lambda x: x[_index_for(x, key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str):
            if not _split(key):
                raise KeyError("empty path")
            _set_path(self.memory, key, _as_tree(value) if isinstance(value, (dict, GDict)) else _as_leaf(value))
            return
        if not isinstance(value, (dict, GDict)):  # broadcast one value into every leaf
            value = GDict(_unflatten([(p, value) for p in self.flat_keys()]))
        other = GDict(value)
        _key_check([self, other])
        for path, leaf in self.items_flat():
            src = other[path]
            if isinstance(leaf, torch.Tensor):
                src = torch.as_tensor(src, device=leaf.device, dtype=leaf.dtype)
            else:
                src = _to_numpy(_as_leaf(src))
            leaf[_index_for(leaf, key)] = src

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self._lookup(key)
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        lengths: dict[int, list[str]] = {}
        for path, leaf in self.items_flat():
            if leaf.ndim == 0:
                raise ValueError(f"leaf '{path}' is 0-dim and has no leading dim")
            lengths.setdefault(int(leaf.shape[0]), []).append(path)
        if len(lengths) > 1:
            detail = "; ".join(f"{n}: {keys}" for n, keys in sorted(lengths.items()))
            raise ValueError(f"leading dims disagree across leaves ({detail})")
        return next(iter(lengths), 0)

    def __iter__(self) -> Iterator[GDict]:
        """Iterate over the leading dim, like an array (use keys() for the keys)."""
        return (self[i] for i in range(len(self)))

    def keys(self) -> list[str]:
        return list(self.memory.keys())

    def flat_keys(self) -> list[str]:
        return [p for p, _ in _flatten(self.memory)]

    def items_flat(self) -> list[tuple[str, Leaf]]:
        return list(_flatten(self.memory))

    def map(self, fn: Callable[[Leaf], Any]) -> GDict:
        """New GDict with fn applied to every leaf (results converted to leaves)."""
        return GDict(_unflatten([(p, _as_leaf(fn(x))) for p, x in _flatten(self.memory)]))

    def copy(self) -> GDict:
        return self.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x.copy())

    # ---- backends ---------------------------------------------------------------------
    def to_torch(self, device: Any = None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> GDict:
        """numpy -> torch (sharing memory where possible); dtype only casts floating leaves."""

        def conv(x: Leaf) -> torch.Tensor:
            if isinstance(x, np.ndarray):
                # from_numpy cannot take negative strides, and read-only arrays must not be aliased.
                if not x.flags.writeable or any(s < 0 for s in x.strides):
                    x = x.copy()
                x = torch.from_numpy(x)
            cast = dtype if dtype is not None and x.is_floating_point() else None
            return x.to(device=device, dtype=cast, non_blocking=non_blocking)

        return self.map(conv)

    def to_numpy(self) -> GDict:
        return self.map(_to_numpy)

    def to(self, device: Any, non_blocking: bool = False) -> GDict:
        """Move torch leaves to device; numpy leaves are left alone."""
        return self.map(lambda x: x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x)

    # ---- introspection ----------------------------------------------------------------
    @property
    def shape(self) -> dict:
        return _unflatten([(p, tuple(x.shape)) for p, x in self.items_flat()])

    @property
    def dtype(self) -> dict:
        return _unflatten([(p, str(x.dtype)) for p, x in self.items_flat()])

    def __repr__(self) -> str:
        lines = []
        for p, x in self.items_flat():
            dev = f" {x.device}" if isinstance(x, torch.Tensor) else ""
            lines.append(f"  {p}: {tuple(x.shape)} {x.dtype}{dev}")
        return "GDict(\n" + "\n".join(lines) + "\n)" if lines else "GDict()"

    # ---- combining --------------------------------------------------------------------
    @staticmethod
    def stack(items: Sequence[GDict | dict], axis: int = 0) -> GDict:
        return _combine(items, np.stack, torch.stack, axis)

    @staticmethod
    def cat(items: Sequence[GDict | dict], axis: int = 0) -> GDict:
        return _combine(items, np.concatenate, torch.cat, axis)

    # ---- HDF5 -------------------------------------------------------------------------
    def to_hdf5(self, group: h5py.Group, compression: str | None = None, chunk_leading: bool = False) -> None:
        """Write every leaf as a dataset at its path below group (overwriting existing ones)."""
        for path, leaf in self.items_flat():
            arr = _to_numpy(leaf)
            kwargs: dict[str, Any] = {}
            if arr.ndim > 0 and arr.size > 0:  # h5py rejects filters/chunks on scalar or empty data
                kwargs["compression"] = compression
                if chunk_leading and arr.ndim >= 2:
                    kwargs["chunks"] = (1,) + arr.shape[1:]  # one frame per chunk: cheap windowed reads
            if path in group:
                del group[path]
            group.create_dataset(path, data=arr, **kwargs)

    @staticmethod
    def from_hdf5(group: h5py.Group, keys: Sequence[str] | None = None, index: Any = None) -> GDict:
        """Read datasets below group (or only `keys`) into numpy, applying `index` to each while reading."""
        items: list[tuple[str, np.ndarray]] = []

        def read(path: str, ds: h5py.Dataset) -> None:
            items.append((path, ds[()] if index is None or ds.ndim == 0 else ds[index]))

        def visit(prefix: str, node: h5py.Group) -> None:
            for name, child in node.items():
                path = f"{prefix}{name}"
                if isinstance(child, h5py.Group):
                    visit(path + "/", child)
                else:
                    read(path, child)

        for key in keys if keys is not None else [""]:
            path = "/".join(_split(key))
            if path and path not in group:
                raise KeyError(f"'{path}' not found in HDF5 group '{group.name}'; available: {sorted(group)}")
            node = group[path] if path else group
            if isinstance(node, h5py.Group):
                visit(f"{path}/" if path else "", node)
            else:
                read(path, node)
        return GDict(_unflatten(items))
