"""One test over the whole zoo: every encoder config instantiates and honours the encoder contract."""

from __future__ import annotations

import os

import pytest
import torch
from hydra.utils import instantiate

from test_config import compose_train, options

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", options("encoder"))
def test_every_encoder_returns_declared_tokens(name):
    torch.manual_seed(0)
    cfg = compose_train([f"encoder={name}"])
    encoder = instantiate(cfg.encoder)
    for h, w in [(64, 64), (84, 100)]:
        images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
        tokens = encoder(images)
        assert tokens.shape == (2, encoder.num_tokens, encoder.out_dim), (name, h, w)
        assert torch.isfinite(tokens).all()
    if encoder.frozen:
        assert tokens.grad_fn is None and not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(TypeError, match="uint8"):
        encoder(torch.zeros(1, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", options("encoder"))
def test_train_runs_with_every_encoder(name, tmp_path):
    from conftest import run_train

    run_train(f"encoder={name}", root=tmp_path, timeout=600)
