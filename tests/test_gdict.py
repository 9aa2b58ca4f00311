"""Tests for gdict.GDict: hypothesis properties against plain numpy, plus error messages."""

from __future__ import annotations

import os
import tempfile

import h5py
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from gdict import GDict

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
# dtypes that numpy, torch and h5py all support losslessly.
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]
KEYS = st.text(alphabet="abcxyz", min_size=1, max_size=3)


# ---- strategies / helpers --------------------------------------------------------------
def leaves(n: int) -> st.SearchStrategy[np.ndarray]:
    """Arrays with leading dim n and up to two small trailing dims."""
    specs = st.tuples(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    return specs.flatmap(lambda s: hnp.arrays(s[0], (n,) + s[1]))


def trees(n: int) -> st.SearchStrategy[dict]:
    """Nested dicts (depth <= 3, no empty sub-dicts) of arrays with a common leading dim n."""
    node = st.recursive(leaves(n), lambda kids: st.dictionaries(KEYS, kids, min_size=1, max_size=3), max_leaves=6)
    return st.dictionaries(KEYS, node, min_size=1, max_size=3)


@st.composite
def tree_and_index(draw):
    n = draw(st.integers(1, 6))
    idx = draw(
        st.one_of(
            st.integers(-n, n - 1),
            st.slices(n),
            hnp.arrays(np.int64, st.integers(0, 5), elements=st.integers(-n, n - 1)),
            hnp.arrays(np.bool_, n),
            st.lists(st.integers(-n, n - 1), max_size=5),
        )
    )
    return draw(trees(n)), idx


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Reference flattening written independently of GDict."""
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def index_tree(tree: dict, idx) -> dict:
    return {k: index_tree(v, idx) if isinstance(v, dict) else v[idx] for k, v in tree.items()}


def assert_same(g: GDict, expected: dict) -> None:
    """Same flat keys, values and dtypes (torch leaves compared through numpy)."""
    got = dict(g.items_flat())
    assert sorted(got) == sorted(expected)
    for k, ref in expected.items():
        x = got[k].cpu().numpy() if isinstance(got[k], torch.Tensor) else got[k]
        assert isinstance(x, np.ndarray)
        assert x.dtype == np.asarray(ref).dtype, k
        np.testing.assert_array_equal(x, ref, err_msg=k)


# ---- properties ---------------------------------------------------------------------------
@SETTINGS
@given(tree_and_index())
def test_indexing_matches_numpy(case):
    tree, idx = case
    g = GDict(tree)
    expected = flat(index_tree(tree, idx))
    assert_same(g[idx], expected)
    # torch leaves, indexed with the same index (torch has no negative-step slices)
    if not (isinstance(idx, slice) and (idx.step or 1) < 0):
        assert_same(g.to_torch()[idx], expected)
        if isinstance(idx, np.ndarray):
            assert_same(g[torch.as_tensor(idx)], expected)


@SETTINGS
@given(st.integers(1, 5).flatmap(trees))
def test_stack_then_index_returns_inputs(tree):
    n = len(next(iter(flat(tree).values())))
    inputs = [index_tree(tree, i) for i in range(n)]
    stacked = GDict.stack(inputs)
    assert len(stacked) == n
    for i in range(n):
        assert_same(stacked[i], flat(inputs[i]))
    assert_same(stacked, flat(tree))
    assert_same(GDict.stack([GDict(x).to_torch() for x in inputs]), flat(tree))


@SETTINGS
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(trees(n), st.lists(st.integers(0, n), max_size=3))))
def test_cat_lengths_add_up(case):
    tree, cuts = case
    n = len(next(iter(flat(tree).values())))
    bounds = [0, *sorted(cuts), n]
    parts = [GDict(index_tree(tree, slice(a, b))) for a, b in zip(bounds, bounds[1:])]
    out = GDict.cat(parts)
    assert len(out) == sum(len(p) for p in parts) == n
    assert_same(out, flat(tree))
    assert_same(GDict.cat([p.to_torch() for p in parts]), flat(tree))


@SETTINGS
@given(st.integers(0, 4).flatmap(trees))
def test_torch_numpy_round_trip(tree):
    g = GDict(tree)
    t = g.to_torch()
    assert all(isinstance(x, torch.Tensor) for _, x in t.items_flat())
    back = t.to_numpy()
    assert all(isinstance(x, np.ndarray) for _, x in back.items_flat())
    assert_same(back, flat(tree))
    assert back.shape == g.shape and back.dtype == g.dtype


@SETTINGS
@given(
    st.integers(1, 6).flatmap(lambda n: st.tuples(trees(n), st.slices(n).filter(lambda s: (s.step or 1) > 0))),
    st.sampled_from([None, "gzip"]),
    st.booleans(),
)
def test_hdf5_round_trip(case, compression, chunk_leading):
    tree, window = case
    g = GDict(tree)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ep.h5")
        with h5py.File(path, "w") as f:
            g.to_torch().to_hdf5(f.create_group("ep"), compression=compression, chunk_leading=chunk_leading)
        with h5py.File(path, "r") as f:
            loaded = GDict.from_hdf5(f["ep"])
            windowed = GDict.from_hdf5(f["ep"], index=window)
            first = g.flat_keys()[0]
            only = GDict.from_hdf5(f["ep"], keys=[first])
            if chunk_leading:
                for p, x in g.items_flat():
                    if x.ndim >= 2:
                        assert f["ep"][p].chunks == (1,) + x.shape[1:]
    assert_same(loaded, flat(tree))
    assert loaded.shape == g.shape and loaded.dtype == g.dtype
    assert_same(windowed, flat(loaded[window].memory))
    assert only.flat_keys() == [first]


# ---- plain tests -------------------------------------------------------------------------
def make() -> GDict:
    return GDict({"obs": {"rgb": np.zeros((4, 2, 3), np.uint8), "state": np.arange(8.0).reshape(4, 2)}, "act": [1, 2, 3, 4]})


def test_path_access_and_set():
    g = make()
    assert isinstance(g["act"], np.ndarray) and g["act"].dtype == np.int64
    assert isinstance(g["obs"], GDict) and g["obs"].keys() == ["rgb", "state"]
    assert "obs/rgb" in g and "obs/depth" not in g and "act/x" not in g and 0 not in g
    g["info/success/flag"] = np.ones(4, bool)
    assert g["info"]["success/flag"].all()
    g["obs"]["new"] = 1.0  # sub-GDicts are views
    assert "obs/new" in g
    assert sorted(g.flat_keys()) == ["act", "info/success/flag", "obs/new", "obs/rgb", "obs/state"]


def test_missing_key_error_names_path_and_available():
    g = make()
    with pytest.raises(KeyError) as e:
        g["obs/depth"]
    msg = str(e.value)
    assert "obs/depth" in msg and "rgb" in msg and "state" in msg
    with pytest.raises(KeyError, match="act"):
        g["act/x"]


def test_mismatched_leading_dims_named():
    g = make()
    g["obs/short"] = np.zeros(3)
    with pytest.raises(ValueError) as e:
        len(g)
    assert "obs/short" in str(e.value) and "obs/rgb" in str(e.value)


def test_stack_cat_key_mismatch_named():
    a, b = make(), make()
    b["obs/extra"] = np.zeros(4)
    with pytest.raises(ValueError, match="obs/extra"):
        GDict.stack([a, b])
    with pytest.raises(ValueError, match="obs/extra"):
        GDict.cat([b, a])


def test_setitem_index_and_tuple_index():
    g = make().to_torch()
    other = make().map(lambda x: x + 1)
    g[1:3] = other[1:3]
    assert g["act"].tolist() == [1, 3, 4, 4]
    g[np.array([0])] = 0
    assert g["act"][0].item() == 0 and g["obs/state"][0].sum().item() == 0
    sub = g["obs"][torch.tensor([3, 1]), 1]
    assert sub.shape == {"rgb": (2, 3), "state": (2,)}


def test_to_torch_zero_copy_and_dtype():
    g = make()
    t = g.to_torch(dtype=torch.float16)
    assert t["obs/state"].dtype == torch.float16 and t["obs/rgb"].dtype == torch.uint8
    shared = g.to_torch()
    shared["act"][0] = 99
    assert g["act"][0] == 99  # torch.from_numpy shares memory
    assert g.dtype == {"obs": {"rgb": "uint8", "state": "float64"}, "act": "int64"}
    assert "obs/rgb: (4, 2, 3) uint8" in repr(g)


def test_copy_is_deep():
    g = make()
    c = g.copy()
    c["act"][0] = -1
    assert g["act"][0] == 1


def test_stack_axis_and_mixed_backends():
    a, b = make(), make().to_torch()
    s = GDict.stack([a, b], axis=1)
    assert isinstance(s["act"], torch.Tensor) and s.shape["obs"]["rgb"] == (4, 2, 2, 3)
