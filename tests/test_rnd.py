"""Random network distillation: novelty falls where the predictor trains, the target stays fixed, seeds decide
everything, and a state dict carries it all."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.exploration.rnd import RND

torch.set_num_threads(2)


def frames(n: int, seed: int) -> torch.Tensor:
    """``n`` uint8 64x64 RGB frames: random blocks, so each seed draws different 'scenes'."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)


def novelty(rnd: RND, obs) -> torch.Tensor:
    """The reward as a pure query: no statistics updated."""
    return rnd.reward(obs, update_stats=False)


def trained(seed: int = 0, steps: int = 3, **kwargs) -> tuple[RND, torch.Tensor]:
    rnd = RND(seed=seed, lr=1e-3, **kwargs)
    rnd.update_obs_stats(frames(16, seed=100))
    batch = frames(8, seed=1)
    for _ in range(steps):
        rnd.update(batch)
    return rnd, batch


def test_reward_falls_on_a_trained_state_and_stays_high_on_a_novel_one():
    rnd = RND(lr=1e-3, update_proportion=1.0)
    rnd.update_obs_stats(frames(16, seed=100))
    seen, novel = frames(4, seed=1), frames(4, seed=2)
    before_seen, before_novel = novelty(rnd, seen).mean(), novelty(rnd, novel).mean()
    losses = [rnd.update(seen) for _ in range(15)]
    after_seen, after_novel = novelty(rnd, seen).mean(), novelty(rnd, novel).mean()
    assert losses[-1] < 0.2 * losses[0]
    assert after_seen < 0.2 * before_seen
    assert after_novel > 3 * after_seen  # the predictor learned the seen states, not novelty in general
    assert novelty(rnd, seen).shape == (4,) and not novelty(rnd, seen).requires_grad


def test_target_never_changes():
    rnd, batch = trained(steps=0)
    target = {k: v.clone() for k, v in rnd.target.state_dict().items()}
    predictor = {k: v.clone() for k, v in rnd.predictor.state_dict().items()}
    for _ in range(3):
        rnd.update(batch)
    rnd.reward(batch, update_stats=True)
    assert all(torch.equal(v, target[k]) for k, v in rnd.target.state_dict().items())
    assert not all(torch.equal(v, predictor[k]) for k, v in rnd.predictor.state_dict().items())
    assert not any(p.requires_grad for p in rnd.target.parameters())


def test_deterministic_with_a_seed():
    torch.manual_seed(123)
    a, batch = trained(seed=7)
    torch.manual_seed(456)  # the global RNG plays no part
    b, _ = trained(seed=7)
    c, _ = trained(seed=8)
    probe = frames(4, seed=3)
    torch.testing.assert_close(novelty(a, probe), novelty(b, probe), rtol=0, atol=0)
    assert not torch.allclose(novelty(a, probe), novelty(c, probe))


def test_state_dict_round_trip_gives_identical_rewards_and_updates():
    a, batch = trained(seed=0)
    for step in range(3):  # the reward normalization's statistics too
        a.reward(frames(4, seed=10 + step), update_stats=True)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = RND(seed=99, lr=1e-3)
    b.load_state_dict(torch.load(buffer, weights_only=True))  # as the toolkit loads checkpoints
    probe = frames(4, seed=3)
    torch.testing.assert_close(novelty(a, probe), novelty(b, probe), rtol=0, atol=0)
    assert a.return_stats.count == b.return_stats.count == 12
    assert a.update(batch) == b.update(batch)  # same Adam moments, same subsample
    torch.testing.assert_close(novelty(a, probe), novelty(b, probe), rtol=0, atol=0)


def test_reward_normalization_divides_by_the_std_of_intrinsic_returns():
    rnd, _ = trained(coef=2.0)
    obs = frames(2, seed=5)
    error = rnd.prediction_error(obs)
    torch.testing.assert_close(novelty(rnd, obs), error)  # no statistics yet: std 1; coef is the caller's
    returns = []
    running = torch.zeros(2)
    for _ in range(4):
        rnd.reward(obs, update_stats=True)
        running = 0.99 * running + rnd.prediction_error(obs)  # obs stats fold in first: the error of the updated net
        returns.append(running)
    std = torch.cat(returns).double().var(unbiased=False).add(1e-8).sqrt().float()
    torch.testing.assert_close(novelty(rnd, obs), rnd.prediction_error(obs) / std, rtol=1e-4, atol=0)


def test_inputs_channels_last_dicts_and_vectors():
    rnd, _ = trained(steps=0)
    x = frames(2, seed=4)
    expected = novelty(rnd, x)
    torch.testing.assert_close(novelty(rnd, x.permute(0, 2, 3, 1).numpy()), expected)  # as the envs give frames
    torch.testing.assert_close(novelty(rnd, {"rgb_local": x, "state": np.zeros((2, 3))}), expected)
    with pytest.raises(ToolkitError, match="intrinsic.obs_key=rgb_local"):
        novelty(rnd, {"rgb": x})
    with pytest.raises(ToolkitError, match=r"intrinsic.obs_shape=\[3, 64, 64\]: the observations are \[3, 32, 32\]"):
        novelty(rnd, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))

    vec = RND(obs_shape=(10,), out_dim=64, lr=1e-3, update_proportion=1.0)
    seen = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    vec.update_obs_stats(seen)
    before = novelty(vec, seen).mean()
    for _ in range(30):
        vec.update(seen)
    assert novelty(vec, seen).mean() < 0.2 * before
