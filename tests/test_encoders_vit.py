"""timm ViT encoders (DINOv2, MAE, ViT from scratch): official checkpoint formats, strict keys,
``weights=auto``, shapes, freezing and training. Reference weights are random (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import time
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from toolkit.encoders import vit_common
from toolkit.encoders.dinov2 import VARIANTS as DINO_VARIANTS
from toolkit.encoders.dinov2 import DINOv2Encoder, timm_name
from toolkit.encoders.mae import MAEEncoder
from toolkit.encoders.vit import ViTEncoder
from toolkit.errors import ToolkitError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these ops are small, and on a shared 2-core machine a second OpenMP thread
    mostly waits (2-3x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fast_random_init(monkeypatch):
    """timm's truncated-normal init is most of the time of building a random ViT on 2 CPU cores; a plain
    normal init is as good for these tests (checkpoints are compared exactly, random models only by shape)."""
    import timm.models.vision_transformer as tvit

    monkeypatch.setattr(tvit, "trunc_normal_", lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: torch.nn.init.normal_(t, mean, std))


def reference(name: str, img_size: int, seed: int = 0) -> torch.nn.Module:
    """A timm model with random values in every parameter (so layer scales, norms and biases all matter);
    filled directly instead of timm's slow init."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)
    model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if "norm" in n and n.endswith("weight") else 0.0))
    return model


def resampled(sd: dict[str, torch.Tensor], grid: int, prefix: int) -> dict[str, torch.Tensor]:
    """timm's own pos_embed resampling (what its pretrained loader does), for a reference at another size."""
    return {**sd, "pos_embed": resample_abs_pos_embed(sd["pos_embed"], new_size=(grid, grid), num_prefix_tokens=prefix)}


def to_dinov2_hub(sd: dict[str, torch.Tensor], swiglu: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """timm keys -> facebookresearch/dinov2 hub keys (the inverse of timm's ``_convert_dinov2``);
    ``swiglu``: ViT-g's packed SwiGLU MLP is ``mlp.w12`` / ``mlp.w3`` there."""
    if swiglu:
        sd = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in sd.items()}
    out = dict(sd)
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim, device=sd["cls_token"].device)
    if "reg_token" in sd:
        # official reg models: pos_embed covers the class token (1 + 37*37), registers have none
        pos0 = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(seed)).to(sd["cls_token"].device)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = sd["cls_token"] - pos0[:, 0]
        out["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    return out


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def check_same_features(enc, ref, imgs: torch.Tensor) -> None:
    """All tokens (class, registers, patches) after the final norm, on the encoder's preprocessed input."""
    x = enc.preprocess(imgs)
    with torch.no_grad():
        torch.testing.assert_close(enc.model.forward_features(x), ref.forward_features(x))


@pytest.fixture(scope="module")
def dino_s_ref():
    return reference("vit_small_patch14_dinov2", 518)


@pytest.fixture(scope="module")
def dino_s_hub(tmp_path_factory, dino_s_ref) -> Path:
    path = tmp_path_factory.mktemp("hub") / "dinov2_vits14_pretrain.pth"
    sd = to_dinov2_hub(dino_s_ref.state_dict())
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(sd, path)
    return path


# --- official formats -------------------------------------------------------------------------------

def test_dinov2_hub_pth(dino_s_hub, dino_s_ref):
    # at the official 518 px: exactly the reference
    enc = DINOv2Encoder("vits14", weights=str(dino_s_hub), image_size=518)
    check_same_features(enc, dino_s_ref, images(1, 3 * 37, 4 * 37))
    # at 224 px the 37x37 pos_embed is resampled to 16x16, as timm's pretrained loader does
    small = DINOv2Encoder("vits14", weights=str(dino_s_hub), image_size=224)
    assert small.model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    ref = reference("vit_small_patch14_dinov2", 224)
    ref.load_state_dict(resampled(dino_s_ref.state_dict(), 16, prefix=1))
    check_same_features(small, ref, images(2, 64, 64))


def test_dinov2_reg_hub_pth(tmp_path):
    ref = reference("vit_small_patch14_reg4_dinov2", 518, seed=2)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    sd = to_dinov2_hub(ref.state_dict())
    assert {"register_tokens", "mask_token"} <= set(sd) and sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(sd, path)
    # the registers have no pos_embed in timm's layout (no_embed_class): resample without prefix tokens
    enc = DINOv2Encoder("vits14_reg", weights=str(path), image_size=224, pool="patch")
    ref224 = reference("vit_small_patch14_reg4_dinov2", 224)
    ref224.load_state_dict(resampled(ref.state_dict(), 16, prefix=0))
    check_same_features(enc, ref224, images(2, 80, 90))
    with torch.no_grad():
        want = ref224.forward_features(enc.preprocess(images(2, 80, 90)))[:, 5:]  # cls + 4 registers dropped
    torch.testing.assert_close(enc(images(2, 80, 90)), want)


def test_dinov2_timm_safetensors_resampled(tmp_path, dino_s_ref):
    # timm's HF files hold the 518 px (37x37) grid; load at 224 and compare with timm's own resampling
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in dino_s_ref.state_dict().items()}, str(path))
    enc = DINOv2Encoder("vits14", weights=str(path), image_size=224)
    ref = reference("vit_small_patch14_dinov2", 224)
    ref.load_state_dict(resampled(dino_s_ref.state_dict(), 16, prefix=1))
    check_same_features(enc, ref, images(2, 100, 120))
    with torch.no_grad():
        want = ref.forward_features(enc.preprocess(images(2, 100, 120)))[:, :1]  # pool=cls
    torch.testing.assert_close(enc(images(2, 100, 120)), want)


@pytest.mark.parametrize("fmt", ["mae_pth", "timm_safetensors"])
def test_mae_model_dict(tmp_path, fmt):
    ref = reference("vit_base_patch16_224", 224, seed=3)
    if fmt == "mae_pth":  # the official MAE release: {'model': state_dict}
        pth = tmp_path / "mae_pretrain_vit_base.pth"
        torch.save({"model": ref.state_dict()}, pth)
    else:  # timm/vit_base_patch16_224.mae on the HF hub
        pth = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(pth))
    imgs = images(2, 64, 64)
    enc = MAEEncoder("vitb16", weights=str(pth), pool="mean")
    x = enc.preprocess(imgs)
    with torch.no_grad():
        want = ref.forward_features(x)
        torch.testing.assert_close(enc.model.forward_features(x), want)
        torch.testing.assert_close(enc(imgs), want[:, 1:].mean(1, keepdim=True))


def test_dinov2_giant_swiglu_keys_on_meta(monkeypatch):
    """ViT-g's official SwiGLU keys (mlp.w12 / mlp.w3) convert and load strictly (meta tensors, no memory)."""
    with torch.device("meta"):
        ref = timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=518, num_classes=0)
        enc = DINOv2Encoder("vitg14_reg", image_size=224)
    sd = to_dinov2_hub(ref.state_dict(), swiglu=True)
    assert "blocks.39.mlp.w12.weight" in sd and "blocks.0.mlp.w3.bias" in sd
    monkeypatch.setattr(vit_common, "read_checkpoint", lambda path: sd)
    enc.load_weights(Path("dinov2_vitg14_reg4_pretrain.pth"))
    del sd["blocks.39.mlp.w3.weight"]
    with pytest.raises(ToolkitError, match=r"blocks\.39\.mlp\.fc2\.weight"):
        enc.load_weights(Path("dinov2_vitg14_reg4_pretrain.pth"))


# --- strict keys, missing weights, auto -------------------------------------------------------------

def test_strict_keys(tmp_path, dino_s_ref):
    sd = to_dinov2_hub(dino_s_ref.state_dict())
    sd["norm.w"] = sd.pop("norm.weight")
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    with pytest.raises(ToolkitError, match=r"missing: norm\.weight.*unexpected: norm\.w\b"):
        DINOv2Encoder("vits14", weights=str(path))


def test_wrong_variant_checkpoint(monkeypatch):
    with torch.device("meta"):  # shapes only
        vitb = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
        enc = DINOv2Encoder("vits14")
    monkeypatch.setattr(vit_common, "read_checkpoint", lambda path: to_dinov2_hub(vitb.state_dict()))
    with pytest.raises(ToolkitError, match=r"dinov2_vitb14_pretrain.pth.*does not match VisionTransformer.*cls_token \(1, 1, 768\) vs \(1, 1, 384\)"):
        enc.load_weights(Path("dinov2_vitb14_pretrain.pth"))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    for var in ("HOME", "TORCH_HOME", "HF_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


@pytest.mark.parametrize("cls,variant,file", [(DINOv2Encoder, "vitg14", "dinov2_vitg14_pretrain.pth"),
                                               (DINOv2Encoder, "vitl14_reg", "dinov2_vitl14_reg4_pretrain.pth"),
                                               (MAEEncoder, "vitl16", "mae_pretrain_vit_large.pth")])
def test_missing_weights_fail_fast(empty_caches, cls, variant, file):
    for weights in ("auto", str(empty_caches / "nope.pth")):
        t = time.perf_counter()
        with pytest.raises(ToolkitError) as err:
            cls(variant, weights=weights)
        assert time.perf_counter() - t < 1.0
        msg = str(err.value)
        assert file in msg and "https://" in msg, msg
        if weights == "auto":
            assert str(empty_caches / "torch_home" / "hub" / "checkpoints") in msg, msg


def test_auto_finds_torch_hub_file(empty_caches, dino_s_hub):
    hub = empty_caches / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    target = hub / "dinov2_vits14_pretrain.pth"
    target.write_bytes(dino_s_hub.read_bytes())
    enc = DINOv2Encoder("vits14", weights="auto", image_size=112)
    assert enc.weights_path == target
    fp = enc.weights_fingerprint()
    assert str(target) in fp
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert enc.weights_fingerprint() != fp
    assert DINOv2Encoder("vits14", image_size=112).weights_fingerprint() == "DINOv2Encoder:vits14:random-init"


def test_vit_rejects_weights():
    with pytest.raises(ToolkitError, match="from scratch"):
        ViTEncoder("small", weights="auto", image_size=64, patch_size=8)


# --- variants, shapes, freezing, training -----------------------------------------------------------

def test_every_variant_builds_on_meta():
    dims = {"s": 384, "b": 768, "l": 1024, "g": 1536}
    with torch.device("meta"):
        for v in DINO_VARIANTS:
            enc = DINOv2Encoder(v, pool="patch")
            assert enc.model.default_cfg["architecture"] == timm_name(v)
            assert (enc.out_dim, enc.num_tokens, enc.patch_size) == (dims[v[3]], 256, 14)
            assert enc.model.num_prefix_tokens == (5 if v.endswith("_reg") else 1)
        for v, d in (("vitb16", 768), ("vitl16", 1024)):
            enc = MAEEncoder(v, pool="patch")
            assert (enc.out_dim, enc.num_tokens, enc.patch_size) == (d, 196, 16)
        for v, d in (("small", 384), ("base", 768), ("large", 1024)):
            enc = ViTEncoder(v, image_size=64, patch_size=8)
            assert (enc.out_dim, enc.num_tokens, enc.model.patch_embed.patch_size) == (d, 1, (8, 8))
    with pytest.raises(ToolkitError, match="variant"):
        DINOv2Encoder("vits16")
    with pytest.raises(ToolkitError, match="pool"):
        ViTEncoder("small", image_size=64, patch_size=8, pool="max")


@pytest.mark.parametrize("make", [lambda pool: DINOv2Encoder("vits14_reg", image_size=56, pool=pool),
                                  lambda pool: ViTEncoder("small", image_size=32, patch_size=8, pool=pool)],
                         ids=["dinov2_reg", "vit"])
def test_shapes(make):
    for pool in ("cls", "mean", "patch"):
        torch.manual_seed(0)
        enc = make(pool)
        assert enc.num_tokens == (16 if pool == "patch" else 1)
        for h, w in ((64, 64), (100, 120)):
            with torch.no_grad():
                out = enc(images(2, h, w))
            assert out.shape == (2, enc.num_tokens, enc.out_dim) and torch.isfinite(out).all()
        if pool != "cls":  # mean / patch: no class or register tokens
            with torch.no_grad():
                tokens = enc.model.forward_features(enc.preprocess(images(2, 64, 64)))[:, enc.model.num_prefix_tokens:]
            torch.testing.assert_close(enc(images(2, 64, 64)),
                                       tokens if pool == "patch" else tokens.mean(1, keepdim=True))


def test_freeze_and_train_last_blocks():
    torch.manual_seed(0)
    enc = DINOv2Encoder("vits14", image_size=112)
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    assert enc(images(2, 64, 64)).grad_fn is None
    enc = DINOv2Encoder("vits14", image_size=112, freeze=False, train_last_blocks=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.11.", "model.norm.")) for n in trainable)
    assert {"model.blocks.11.attn.qkv.weight", "model.norm.weight"} <= trainable
    assert enc(images(2, 64, 64)).grad_fn is not None


def test_vit_from_scratch_trains():
    torch.manual_seed(0)
    enc = ViTEncoder("small", image_size=64, patch_size=8)
    assert not enc.frozen and all(p.requires_grad for p in enc.parameters())
    assert enc.weights_fingerprint() == "ViTEncoder:small:patch8:random-init"
    enc.train()
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    loss = enc(images(4, 64, 64)).pow(2).mean()
    loss.backward()
    opt.step()
    changed = [n for n, p in enc.named_parameters() if not torch.equal(p, before[n])]
    assert "model.patch_embed.proj.weight" in changed and "model.blocks.0.attn.qkv.weight" in changed


@pytest.mark.parametrize("name", ["dinov2", "mae", "vit"])
def test_configs_instantiate(name):
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"env": {"image_size": 64}, "encoder": OmegaConf.load(ROOT / "conf" / "encoder" / f"{name}.yaml")})
    with torch.device("meta"):  # the architecture and arguments only; weights are tested above
        enc = instantiate(cfg.encoder)
    assert enc.frozen == (name != "vit") and enc.image_size == (64 if name == "vit" else 224)
    assert enc.weights_path is None and enc.num_tokens == 1
