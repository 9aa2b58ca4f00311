"""SpawnNet adapter over DINOv2 ViT-S/14 (random weights, small images): shapes, frozen backbone,
taps, L2 normalization, the features command."""

from __future__ import annotations

import functools

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from toolkit.encoders.dinov2 import DINOv2Encoder
from toolkit.encoders.spawnnet import SpawnNetEncoder, default_taps

SMALL = dict(stem_channels=8, stage_channels=[8, 16, 16], adapter_channels=8, out_dim=24)


def dinov2(image_size: int = 56) -> DINOv2Encoder:
    """Random ViT-S/14 with LayerScale at 0.5 (DINOv2's init of 1e-5 makes every block about the
    identity, so all taps would look alike)."""
    torch.manual_seed(0)
    enc = DINOv2Encoder("vits14", image_size=image_size)
    with torch.no_grad():
        for block in enc.model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    return enc


shared_dinov2 = functools.lru_cache(dinov2)  # frozen backbones can be shared between adapters


def make(backbone_size: int = 56, image_size: int = 48, **kwargs) -> SpawnNetEncoder:
    """A small adapter; a fresh backbone when it is fine-tuned, else a shared frozen one."""
    backbone = shared_dinov2(backbone_size) if kwargs.get("freeze_backbone", True) else dinov2(backbone_size)
    torch.manual_seed(0)
    return SpawnNetEncoder(backbone, image_size=image_size, **{**SMALL, **kwargs})


def images(b: int, c: int = 3, h: int = 40, w: int = 52, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("in_channels", [3, 4])
def test_output_shapes_match_num_tokens_and_out_dim(in_channels):
    for backbone_size, image_size in [(56, 48), (84, 64)]:
        enc = make(backbone_size, image_size, in_channels=in_channels)
        assert enc.num_tokens == (image_size // 16) ** 2
        for h, w in [(40, 52), (image_size, image_size)]:
            out = enc(images(2, in_channels, h, w))
            assert out.shape == (2, enc.num_tokens, enc.out_dim) == (2, enc.num_tokens, 24)
    with pytest.raises(Exception, match="in_channels"):
        enc(images(1, 3 if in_channels == 4 else 4))


def test_default_config_builds():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf/encoder/spawnnet.yaml")
    enc = instantiate(cfg, backbone={"image_size": 56}, image_size=64)
    assert isinstance(enc.backbone, DINOv2Encoder) and enc.taps == [3, 7, 11]
    assert enc(images(1)).shape == (1, 16, 128)
    assert "random-init" in enc.weights_fingerprint() and "taps=[3, 7, 11]" in enc.weights_fingerprint()


def test_frozen_backbone_gets_no_gradient_and_the_adapter_does():
    enc = make()
    enc.train()
    assert not enc.backbone.training and enc.training
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    enc(images(2)).sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in enc.proj.parameters())


def test_unfrozen_backbone_gets_gradients_too():
    enc = make(freeze_backbone=False)
    enc.train()
    assert enc.backbone.training and all(p.requires_grad for p in enc.backbone.parameters())
    enc(images(2)).sum().backward()
    blocks = enc.backbone.model.blocks
    assert blocks[0].attn.qkv.weight.grad is not None and blocks[11].mlp.fc2.weight.grad is not None
    assert enc.stem[0].weight.grad is not None


def test_taps_default_to_the_last_block_of_each_third_and_custom_taps_are_used():
    assert default_taps(12) == [3, 7, 11] and default_taps(24) == [7, 15, 23]
    enc = make()
    assert enc.taps == [3, 7, 11] and len(enc.proj) == 3
    custom = make(taps=[5, 11], stage_channels=[8, 16])
    assert custom.taps == [5, 11] and len(custom.proj) == 2 and len(custom.stages) == 2
    assert custom.num_tokens == (48 // 8) ** 2
    assert custom(images(1)).shape == (1, 36, 24)

    x = images(2)
    shallow = make(taps=[1, 2, 3])
    assert shallow.taps == [1, 2, 3]
    with torch.no_grad():
        taps_a = enc.backbone_taps(x[:, :3])
        taps_b = shallow.backbone_taps(x[:, :3])
        assert not torch.allclose(taps_a[0], taps_b[0])
        # same backbone, same adapter weights (same seed): only the taps differ, and so do the outputs
        assert not torch.allclose(enc(x), shallow(x))
    with pytest.raises(Exception, match="stage_channels"):
        make(taps=[3, 11])
    with pytest.raises(Exception, match="taps"):
        make(taps=[12], stage_channels=[8])


def test_backbone_stops_at_the_last_tap():
    enc = make(taps=[1, 2, 3])
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.append(k)) for k, b in enumerate(enc.backbone.model.blocks)]
    enc(images(1))
    for h in hooks:
        h.remove()
    assert seen == [0, 1, 2, 3]


def test_taps_are_l2_normalized_before_projection():
    enc = make()
    x = images(2)
    with torch.no_grad():
        taps = enc.backbone_taps(x[:, :3])
        assert [t.shape for t in taps] == [(2, 384, 4, 4)] * 3  # patch grid, no class token
        ref = enc.project_taps(taps)
        scaled = enc.project_taps([t * s for t, s in zip(taps, (0.01, 7.0, 300.0))])
        for a, b in zip(ref, scaled):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # through the whole encoder: scaling the last tapped block's output leaves the output unchanged
        # (per-patch scales too, since the normalization is per position)
        out = enc(x)
        scale = torch.rand(1, 17, 1) * 10 + 0.1
        hook = enc.backbone.model.blocks[11].register_forward_hook(lambda m, i, o: o * scale)
        torch.testing.assert_close(enc(x), out, rtol=1e-4, atol=1e-5)
        hook.remove()
        hook = enc.backbone.model.blocks[3].register_forward_hook(lambda m, i, o: o * scale)
        assert not torch.allclose(enc(x), out, rtol=1e-4, atol=1e-5)  # changes what later blocks see
        hook.remove()


def _episode_file(path, frames_per_episode=(5, 4), size=32):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i, n in enumerate(frames_per_episode):
            g = f.create_group(f"data/demo_{i}")
            g.attrs["num_samples"] = n
            g.create_dataset("obs/rgb_corner4", data=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
            g.create_dataset("obs/state", data=rng.standard_normal((n, 4)).astype(np.float32))
            g.create_dataset("actions", data=rng.standard_normal((n, 4)).astype(np.float32))
    return path


def test_features_command_writes_one_png_per_frame(tmp_path):
    from toolkit.encoders.spawnnet_features import main

    data = _episode_file(tmp_path / "tiny.hdf5")
    written = main(["--data", str(data), "--out", str(tmp_path / "out"), "--frames", "3",
                    "--image-size", "48", "--backbone-image-size", "56"])
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 3 and sorted(written) == pngs
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 2 * im.size[1]  # input + 3 taps + output side by side


def test_features_command_from_a_policy_checkpoint(tmp_path, monkeypatch):
    """``--checkpoint``: the encoder (trained adapter) comes from the policy checkpoint."""
    from toolkit.policies.bc_transformer import BCTransformer

    cfg = {
        "encoder": {"_target_": "toolkit.encoders.spawnnet.SpawnNetEncoder", "image_size": 48, "taps": [5, 11],
                    **{**SMALL, "stage_channels": [8, 16]},
                    "backbone": {"_target_": "toolkit.encoders.dinov2.DINOv2Encoder", "image_size": 56}},
        "policy": {"_target_": "toolkit.policies.bc_transformer.BCTransformer", "history": 1, "horizon": 1,
                   "d_model": 16, "num_layers": 1, "num_heads": 2,
                   "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}},
    }
    from hydra.utils import instantiate

    stats = {k: {"mean": [0.0] * 4, "std": [1.0] * 4, "min": [-1.0] * 4, "max": [1.0] * 4} for k in ("obs/state", "actions")}
    shape_meta = {"rgb_keys": ["rgb_corner4"], "state_dim": 4, "action_dim": 4}
    policy = instantiate(cfg["policy"], encoder=instantiate(cfg["encoder"]), shape_meta=shape_meta, stats=stats)
    assert isinstance(policy, BCTransformer)
    with torch.no_grad():
        policy.encoder.head[1].weight.mul_(3.0)  # a "trained" adapter differs from a fresh one
    ckpt = tmp_path / "policy.ckpt"
    torch.save({"toolkit_cfg": cfg, "hyper_parameters": {"shape_meta": shape_meta, "stats": stats},
                "state_dict": policy.state_dict()}, ckpt)
    from toolkit.encoders import spawnnet_features

    built = []
    monkeypatch.setattr(spawnnet_features, "build_encoder",
                        lambda args, f=spawnnet_features.build_encoder: built.append(f(args)) or built[-1])
    out = tmp_path / "out"
    written = spawnnet_features.main(["--data", str(_episode_file(tmp_path / "tiny.hdf5")), "--out", str(out),
                                      "--frames", "2", "--checkpoint", str(ckpt)])
    assert built[0].taps == [5, 11]
    torch.testing.assert_close(built[0].head[1].weight, policy.encoder.head[1].weight)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and sorted(written) == pngs
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # input + 2 taps + output
