"""The Nature CNN encoder against Stable-Baselines3's own NatureCNN (SB3 2.9.2 in .venv-compare, run in a
subprocess): SB3's weights load into ours by name and give the same features on the same uint8 images, and a
fresh encoder is initialized as SB3's actor-critic policies initialize theirs."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import compare_python
from toolkit.encoders.nature_cnn import NatureCNN

# Runs in .venv-compare: python SCRIPT OUT. SB3's CnnPolicy on a 64 px RGB Box (channels first), its features
# extractor's state_dict and features of random uint8 images, preprocessed by SB3 (preprocess_obs: / 255).
SCRIPT = r'''
import sys
import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.policies import ActorCriticCnnPolicy
from stable_baselines3.common.preprocessing import preprocess_obs

torch.manual_seed(0)
space = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
policy = ActorCriticCnnPolicy(space, gym.spaces.Discrete(17), lambda _: 3e-4)
images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
with torch.no_grad():
    features = policy.features_extractor(preprocess_obs(images, space))
torch.save({"state_dict": policy.features_extractor.state_dict(), "images": images, "features": features}, sys.argv[1])
'''


@pytest.fixture(scope="module")
def sb3(tmp_path_factory) -> dict:
    python = compare_python("Stable-Baselines3 2.9.2")
    tmp = tmp_path_factory.mktemp("sb3")
    (tmp / "script.py").write_text(SCRIPT)
    proc = subprocess.run([str(python), str(tmp / "script.py"), str(tmp / "out.pt")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


def test_sb3_weights_load_by_name_and_give_sb3s_features(sb3):
    encoder = NatureCNN(image_size=64)
    encoder.load_state_dict(sb3["state_dict"])  # strict: the same names and shapes
    tokens = encoder(sb3["images"])
    assert tokens.shape == (5, 1, 512) and encoder.out_dim == 512
    torch.testing.assert_close(tokens[:, 0], sb3["features"], atol=1e-5, rtol=1e-5)


def test_fresh_weights_are_initialized_as_sb3s_policy_does(sb3):
    """Orthogonal weights with gain sqrt(2) (singular values all sqrt(2) for a matrix of full rank), zero
    biases: the same statistics as SB3's features extractor."""
    ours = NatureCNN(image_size=64).state_dict()
    for name, theirs in sb3["state_dict"].items():
        assert ours[name].shape == theirs.shape
        if name.endswith("bias"):
            assert not ours[name].any() and not theirs.any()
        else:
            for weights in (ours[name], theirs):
                singular = torch.linalg.svdvals(weights.reshape(weights.shape[0], -1))
                torch.testing.assert_close(singular, torch.full_like(singular, 2 ** 0.5), atol=1e-4, rtol=1e-4)


def test_too_small_images_are_refused_by_name():
    with pytest.raises(ValueError, match="encoder.image_size=32"):
        NatureCNN(image_size=32)
