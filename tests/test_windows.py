"""Windows over episodes: edges are clamped and flagged, nothing leaks across episodes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from toolkit.datamodules.episode_file import episode_names
from toolkit.datamodules.windows import WindowDataset, window_indices
from toolkit.errors import ToolkitError


@settings(max_examples=200, deadline=None, derandomize=True)
@given(length=st.integers(1, 40), history=st.integers(1, 6), horizon=st.integers(1, 6), data=st.data())
def test_window_indices_stay_inside_the_episode(length, history, horizon, data):
    t = data.draw(st.integers(0, length - 1))
    obs_idx, obs_pad, act_idx, act_pad = window_indices(t, length, history, horizon)
    assert obs_idx.shape == obs_pad.shape == (history,) and act_idx.shape == act_pad.shape == (horizon,)
    assert obs_idx.min() >= 0 and act_idx.max() <= length - 1
    assert obs_idx[-1] == t and act_idx[0] == t and not obs_pad[-1] and not act_pad[0]
    # pads are exactly the steps before the start / after the end, filled with the edge step
    assert obs_pad.sum() == max(0, history - 1 - t) and (obs_idx[obs_pad] == 0).all()
    assert act_pad.sum() == max(0, t + horizon - length) and (act_idx[act_pad] == length - 1).all()
    # real steps are consecutive
    assert (np.diff(obs_idx[~obs_pad]) == 1).all() and (np.diff(act_idx[~act_pad]) == 1).all()


def test_dataset_windows_match_episode_data(tiny_file):
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
        episodes = {n: {"rgb": f["data"][n]["obs/rgb_corner4"][()], "state": f["data"][n]["obs/state"][()],
                        "actions": f["data"][n]["actions"][()]} for n in names}
    ds = WindowDataset(tiny_file, names, ["rgb_corner4", "state"], history=3, horizon=4)
    assert len(ds) == sum(len(e["actions"]) for e in episodes.values())
    for i in range(len(ds)):
        e, t = ds.episodes[ds.ep_of[i]], int(ds.t_of[i])
        ep, item = episodes[e], ds[i]
        obs_idx, obs_pad, act_idx, act_pad = window_indices(t, len(ep["actions"]), 3, 4)
        np.testing.assert_array_equal(item["obs"]["rgb_corner4"].numpy(), ep["rgb"][obs_idx].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(item["obs"]["state"].numpy(), ep["state"][obs_idx])
        np.testing.assert_array_equal(item["action"].numpy(), ep["actions"][act_idx])
        np.testing.assert_array_equal(item["obs_is_pad"].numpy(), obs_pad)
        np.testing.assert_array_equal(item["action_is_pad"].numpy(), act_pad)
    assert item["obs"]["rgb_corner4"].dtype == torch.uint8 and item["obs"]["rgb_corner4"].shape == (3, 3, 32, 32)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_dataloader_workers_read_the_same_batches(tiny_file, num_workers):
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
    ds = WindowDataset(tiny_file, names, ["rgb_corner4", "state"], history=2, horizon=2)
    reference = [ds[i] for i in range(len(ds))]
    batches = list(DataLoader(ds, batch_size=5, num_workers=num_workers))
    got = torch.cat([b["action"] for b in batches])
    np.testing.assert_array_equal(got.numpy(), np.stack([r["action"].numpy() for r in reference]))
    rgb = torch.cat([b["obs"]["rgb_corner4"] for b in batches])
    np.testing.assert_array_equal(rgb.numpy(), np.stack([r["obs"]["rgb_corner4"].numpy() for r in reference]))


def test_transitions_pair_each_window_with_the_next(tiny_file):
    with h5py.File(tiny_file) as f:
        name = episode_names(f)[0]
        state, rewards, dones = (f["data"][name][k][()] for k in ("obs/state", "rewards", "dones"))
    ds = WindowDataset(tiny_file, [name], ["rgb_corner4", "state"], history=2, horizon=1, transitions=True)
    last = len(ds) - 1
    for i in range(len(ds)):
        item = ds[i]
        nxt = min(i + 1, last)
        np.testing.assert_array_equal(item["next_obs"]["state"].numpy(), state[[max(nxt - 1, 0), nxt]])
        np.testing.assert_array_equal(item["next_obs_is_pad"].numpy(), [nxt == 0, False])
        assert item["reward"].item() == pytest.approx(float(rewards[i])) and item["done"].item() == float(dones[i])
        if i < last:  # the next window's first frame is this window's last
            np.testing.assert_array_equal(item["next_obs"]["rgb_corner4"][0].numpy(), item["obs"]["rgb_corner4"][1].numpy())
    assert item["done"].item() == 1.0 and "next_obs" not in WindowDataset(tiny_file, [name], ["state"], 2, 1)[0]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=15), k=st.integers(1, 6), seed=st.integers(0, 5))
def test_episode_chunk_sampler_covers_every_window_a_few_episodes_at_a_time(lengths, k, seed):
    from toolkit.datamodules.windows import EpisodeChunkSampler

    ep_of = np.repeat(np.arange(len(lengths)), lengths)
    sampler = EpisodeChunkSampler(ep_of, k, seed=seed)
    for _ in range(2):  # two epochs: each a permutation of all windows, in another order
        order = list(sampler)
        assert sorted(order) == list(range(len(ep_of))) and len(sampler) == len(ep_of)
        # consecutive blocks of windows come from at most k episodes each, and an episode is in one block
        blocks, seen, current = [], set(), set()
        for i in order:
            e = int(ep_of[i])
            if e not in current and len(current) == k:
                blocks.append(current)
                current = set()
            current.add(e)
        blocks.append(current)
        for block in blocks:
            assert len(block) <= k and not (block & seen)
            seen |= block


@pytest.fixture(scope="module")
def tiny_windows(tiny_file):
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
    return WindowDataset(tiny_file, names, ["rgb_corner4", "state"], history=3, horizon=2, transitions=True)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_batch_read_at_once_equals_its_windows_read_one_by_one(tiny_windows, data):
    # the fast path (EpisodeDataModule reads whole batches) must give exactly the per-window samples,
    # for any indices: repeated ones, windows at episode edges, windows of several episodes
    indices = data.draw(st.lists(st.integers(0, len(tiny_windows) - 1), min_size=1, max_size=20))
    batch = tiny_windows[indices]
    for j, i in enumerate(indices):
        item = tiny_windows[i]
        for key in ("obs_is_pad", "action", "action_is_pad", "next_obs_is_pad", "reward", "done"):
            np.testing.assert_array_equal(batch[key][j].numpy(), item[key].numpy())
        for group in ("obs", "next_obs"):
            for key, value in item[group].items():
                assert batch[group][key].dtype == value.dtype
                np.testing.assert_array_equal(batch[group][key][j].numpy(), value.numpy())


def test_the_datamodule_loader_yields_whole_shuffled_batches(tiny_file):
    from toolkit.datamodules.episode_datamodule import EpisodeDataModule

    dm = EpisodeDataModule(str(tiny_file), history=2, horizon=3, batch_size=4, num_workers=0)
    dm.setup("fit")
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    assert all(len(b["action"]) == 4 for b in batches)  # the last, partial batch is dropped when training
    assert batches[0]["obs"]["rgb_corner4"].shape == (4, 2, 3, 32, 32) and batches[0]["action"].shape[:2] == (4, 3)
    seen = torch.cat([b["action"] for b in batches]).numpy()
    everything = dm.train_set[list(range(len(dm.train_set)))]["action"].numpy()
    # each window at most once per epoch, in a shuffled order
    assert len(seen) == len(everything) // 4 * 4
    assert not np.array_equal(seen, everything[: len(seen)])
    rows = {r.tobytes() for r in everything}
    assert all(r.tobytes() in rows for r in seen)
    valid = list(dm.val_dataloader())
    assert sum(len(b["action"]) for b in valid) == len(dm.valid_set)  # validation keeps every window, in order


@settings(max_examples=100, deadline=None, derandomize=True)
@given(n=st.integers(1, 50), batch=st.integers(1, 8), epoch=st.integers(0, 5), data=st.data())
def test_epoch_batch_sampler_resumes_mid_epoch_with_the_same_batches(n, batch, epoch, data):
    from toolkit.datamodules.windows import EpochBatchSampler

    drop_last = data.draw(st.booleans())
    sampler = EpochBatchSampler(n, batch, shuffle=True, drop_last=drop_last, seed=3)
    sampler.set_epoch(epoch)
    full = list(sampler)
    seen = [i for b in full for i in b]
    assert len(full) == len(sampler) and len(set(seen)) == len(seen)  # no window twice in an epoch
    assert len(seen) == (n - n % batch if drop_last else n) and set(seen) <= set(range(n))
    k = data.draw(st.integers(0, len(full)))
    sampler.set_epoch(epoch)
    sampler.skip = (epoch, k)
    assert list(sampler) == full[k:]  # resumed after k batches: exactly the rest of that epoch
    assert list(sampler) == full  # the skip applies once
    sampler.skip = (epoch - 1, 1)  # a finished epoch's position does not skip into the next one
    assert list(sampler) == full


@settings(max_examples=60, deadline=None, derandomize=True)
@given(history=st.integers(1, 14), data=st.data())
def test_windows_labelled_at_every_step_score_each_step_once_with_its_full_history(tiny_file, history, data):
    """data.label_every_step: over an epoch every step of every span is scored exactly once, against its own action,
    and only where its window holds all the history a rollout window at that step holds (back to the span's start,
    or T real steps)."""
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
        actions = [f["data"][n]["actions"][()] for n in names]
    bounds = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 11), st.integers(1, 12)), min_size=1,
                                max_size=6).map(lambda spans: [(e, min(a, b - 1), b) for e, a, b in spans]))
    spans = np.array([[e, a, b, -1, 0, -1] for e, a, b in bounds])
    ds = WindowDataset(tiny_file, names, ["state"], history=history, horizon=1, spans=spans, label_every_step=True)
    batch = ds[np.arange(len(ds))]
    scored = batch["step_scored"].numpy()
    assert scored[:, -1].all()  # a window's own step always counts
    counts = np.zeros((len(spans), 12), int)
    for i in range(len(ds)):
        s, t = ds.span_of[i], ds.t_of[i]
        e, a, b = bounds[s]
        steps = np.arange(t - history + 1, t + 1)
        for j in np.flatnonzero(scored[i]):
            step = steps[j]
            assert a <= step < b
            assert step - a < history or j == history - 1  # a rollout at `step` sees back to a, or T steps
            np.testing.assert_array_equal(batch["step_action"][i, j].numpy(), actions[e][step])
            counts[s, step] += 1
    for s, (e, a, b) in enumerate(bounds):
        assert (counts[s, a:b] == 1).all() and counts[s, :a].sum() == counts[s, b:].sum() == 0


def test_windows_labelled_at_every_step_need_one_action_per_step(tiny_file):
    with h5py.File(tiny_file) as f:
        names = episode_names(f)
    with pytest.raises(ToolkitError, match="data.horizon=1"):
        WindowDataset(tiny_file, names, ["state"], history=4, horizon=2, label_every_step=True)
