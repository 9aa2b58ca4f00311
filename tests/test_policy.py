"""The BC transformer over several cameras, from pixels and from cached features."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from toolkit.encoders.impala import ImpalaEncoder
from toolkit.policies.bc_transformer import BCTransformer


def make_policy(freeze: bool) -> BCTransformer:
    torch.manual_seed(0)
    stats = {"obs/state": {"mean": [0.0] * 4, "std": [1.0] * 4},
             "actions": {"mean": [0.0] * 4, "std": [1.0] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}}
    shape_meta = {"rgb_keys": ["rgb_left", "rgb_right"], "state_dim": 4, "action_dim": 4}
    encoder = ImpalaEncoder(image_size=32, channels=(8, 8, 8), out_dim=16, freeze=freeze)
    return BCTransformer(encoder, shape_meta, stats, optimizer=partial(torch.optim.AdamW), history=2, horizon=3,
                         d_model=32, num_heads=2, num_layers=1, augment_shift=0)


def batch(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"obs": {"rgb_left": torch.randint(0, 256, (b, 2, 3, 32, 32), dtype=torch.uint8, generator=g),
                    "rgb_right": torch.randint(0, 256, (b, 2, 3, 32, 32), dtype=torch.uint8, generator=g),
                    "state": torch.randn(b, 2, 4, generator=g)},
            "obs_is_pad": torch.zeros(b, 2, dtype=torch.bool), "action": torch.rand(b, 3, 4, generator=g) * 2 - 1,
            "action_is_pad": torch.tensor([[False, False, True]] * b)}


def test_two_cameras_train_and_act():
    policy = make_policy(freeze=False)
    opt = policy.configure_optimizers()
    data = batch()
    first = policy.compute_loss(data)["loss"]
    for _ in range(20):
        opt.zero_grad()
        policy.compute_loss(data)["loss"].backward()
        opt.step()
    assert policy.compute_loss(data)["loss"] < first
    policy.reset()
    obs = {"rgb_left": np.zeros((3, 32, 32, 3), np.uint8), "rgb_right": np.zeros((3, 32, 32, 3), np.uint8),
           "state": np.zeros((3, 4), np.float32)}
    assert policy.act(obs).shape == (3, 4)


def test_cached_features_give_the_same_prediction_as_pixels():
    policy = make_policy(freeze=True).eval()
    data = batch()
    with torch.no_grad():
        from_pixels = policy.predict(data["obs"], data["obs_is_pad"])
        feats = {f"{k}_features": policy.encoder(v.flatten(0, 1)).unflatten(0, v.shape[:2])
                 for k, v in data["obs"].items() if k.startswith("rgb")}
        from_features = policy.predict({**feats, "state": data["obs"]["state"]}, data["obs_is_pad"])
    torch.testing.assert_close(from_features, from_pixels)


def test_gru_trunk_recalls_a_cue_from_the_start_of_its_window_and_acts_in_rollouts_as_it_trained():
    """``policy.trunk=gru``: the action depends on what the first step of the window showed (memory over the
    whole window), and step-by-step rollout acting gives what the training forward gives on the same window."""
    t, b = 8, 64
    torch.manual_seed(0)
    stats = {"obs/state": {"mean": [0.0] * 2, "std": [1.0] * 2},
             "actions": {"mean": [0.0], "std": [1.0], "min": [-1.0], "max": [1.0]}}
    shape_meta = {"rgb_keys": [], "state_dim": 2, "action_dim": 1}
    encoder = ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8)  # never called: state only
    policy = BCTransformer(encoder, shape_meta, stats, optimizer=partial(torch.optim.Adam), lr=3e-3, history=t,
                           horizon=1, trunk="gru", d_model=32, num_layers=1, dropout=0.0, augment_shift=0)
    g = torch.Generator().manual_seed(1)

    def windows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cue = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        state = torch.zeros(n, t, 2)
        state[:, 0, 0] = cue  # the cue, then nothing but noise in the other channel
        state[:, :, 1] = torch.randn(n, t, generator=g)
        return state, cue

    opt = policy.configure_optimizers()
    for _ in range(300):
        state, cue = windows(b)
        loss = policy.compute_loss({"obs": {"state": state}, "action": cue[:, None, None],
                                    "action_is_pad": torch.zeros(b, 1, dtype=torch.bool)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    state, cue = windows(16)
    with torch.no_grad():
        predicted = policy.predict({"state": state}, torch.zeros(16, t, dtype=torch.bool))[:, 0, 0]
    assert (predicted.sign() == cue).all(), (predicted, cue)
    policy.reset()
    for step in range(t):  # the same windows, one step at a time, as a rollout sees them
        acted = policy.act({"state": state[:, step].numpy()})
    np.testing.assert_allclose(acted[:, 0], predicted.clamp(-1, 1).numpy(), atol=1e-5)
