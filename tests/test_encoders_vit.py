"""timm ViT encoders (DINOv2, MAE, ViT from scratch): official checkpoint formats, strict keys,
``weights=auto``, shapes, freezing and training. Reference weights are random (nothing is downloaded).

DINOv2 is compared with FAIR's own model code (``tests/reference_models.py``, installed into
``.venv/reference`` by ``make install``) at 224 px, at the trained 518 px and at sizes off the trained grid."""

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

from toolkit.encoders import vit_common
from toolkit.encoders.dinov2 import VARIANTS as DINO_VARIANTS
from toolkit.encoders.dinov2 import DINOv2Encoder, official_file, timm_name
from toolkit.encoders.mae import MAEEncoder
from toolkit.encoders.vit import ViTEncoder
from toolkit.errors import ToolkitError

from reference_models import fair_vits14, randomize, relative_error  # tests/ is on sys.path (pytest rootdir)

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


# --- official formats: the same features as FAIR's own model code ------------------------------------------

SIZES = (224, 518, 126, 100)  # 100 is not a multiple of 14: the patch grid is 7x7, the last 2 px unused
VARIANT_REGISTERS = {"vits14": 0, "vits14_reg": 4}


@pytest.fixture(scope="module")
def fair(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """FAIR's ViT-S/14 and ViT-S/14-reg4 (their model code, random weights), saved as the torch.hub files."""
    root = tmp_path_factory.mktemp("fair")
    out = {}
    for seed, (variant, registers) in enumerate(VARIANT_REGISTERS.items()):
        model = randomize(fair_vits14(registers), seed=10 + seed)
        path = root / official_file(variant)
        torch.save(model.state_dict(), path)
        out[variant] = (model, path)
    return out


def fair_input(x: torch.Tensor) -> torch.Tensor:
    """FAIR's patch embedding refuses sizes that are not a multiple of 14; ours, like any stride-14 conv, leaves
    the last rows/columns out: FAIR's model on the top-left crop is the reference."""
    h, w = (s // 14 * 14 for s in x.shape[-2:])
    return x[..., :h, :w]


def check_equals_fair(variant: str, weights: Path, ref: torch.nn.Module, image_size: int, imgs: torch.Tensor) -> None:
    """Class token, patch tokens and their mean (every pool's output) within 1e-5 relative error of FAIR's
    ``x_norm_clstoken`` / ``x_norm_patchtokens`` on the same preprocessed input."""
    grid = image_size // 14
    enc = DINOv2Encoder(variant, weights=str(weights), image_size=image_size, pool="cls")
    x = enc.preprocess(imgs)
    with torch.no_grad():
        want = ref.forward_features(fair_input(x))
        tokens = enc.model.forward_features(x)  # every token after the final norm (the encoders' encode)
    assert want["x_norm_patchtokens"].shape[1] == grid * grid
    expected = {"cls": want["x_norm_clstoken"][:, None], "patch": want["x_norm_patchtokens"],
                "mean": want["x_norm_patchtokens"].mean(1, keepdim=True)}
    for pool in ("cls", "mean", "patch"):
        pooled = DINOv2Encoder(variant, weights=str(weights), image_size=image_size, pool=pool)
        pooled.model.forward_features = lambda _x: tokens  # one forward for all pools (518 px: seconds)
        got = pooled(imgs)
        assert got.shape == expected[pool].shape == (len(imgs), pooled.num_tokens, 384)
        assert pooled.num_tokens == (grid * grid if pool == "patch" else 1)
        err = relative_error(got, expected[pool])
        assert err < 1e-5, f"{variant} at {image_size} px, pool={pool}: relative error {err:.2e}"


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("variant", list(VARIANT_REGISTERS))
def test_dinov2_hub_pth_equals_fair(fair, variant, image_size):
    """The torch.hub checkpoint gives FAIR's features at the trained 518 px and at other sizes, where FAIR
    interpolates the 37x37 position embeddings at run time (bicubic by the scale (grid + 0.1) / 37 for the plain
    models, bicubic with antialias to the grid for the register models)."""
    ref, path = fair[variant]
    check_equals_fair(variant, path, ref, image_size, images(2 if image_size < 518 else 1, 150, 170, seed=image_size))


@pytest.mark.parametrize("variant", list(VARIANT_REGISTERS))
def test_dinov2_keeps_official_pos_embed(fair, variant):
    """pos_embed stays at its trained 37x37 grid whatever image_size (timm's layout: the register models' class
    position is folded into cls_token, as timm's converter does), and it trains when not frozen."""
    ref, path = fair[variant]
    enc = DINOv2Encoder(variant, weights=str(path), image_size=126, freeze=False, pool="mean")
    official = ref.pos_embed.detach()
    if VARIANT_REGISTERS[variant]:
        torch.testing.assert_close(enc.model.pos_embed, official[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(enc.model.cls_token, ref.cls_token + official[:, :1], rtol=0, atol=0)
    else:
        torch.testing.assert_close(enc.model.pos_embed, official, rtol=0, atol=0)
    enc(images(2, 64, 64)).square().mean().backward()
    grad = enc.model.pos_embed.grad
    assert grad is not None and grad.shape == (1, 37 * 37 + (0 if VARIANT_REGISTERS[variant] else 1), 384)
    assert grad.abs().sum() > 0
    frozen = DINOv2Encoder(variant, weights=str(path), image_size=126)
    assert frozen(images(1, 64, 64)).grad_fn is None and frozen.model.pos_embed.grad is None
    # frozen: the interpolated embedding is cached, and recomputed when pos_embed changes
    first = frozen.model.interpolated_pos_embed((9, 9), torch.float32)
    assert frozen.model.interpolated_pos_embed((9, 9), torch.float32) is first
    with torch.no_grad():
        frozen.model.pos_embed.mul_(2)
    torch.testing.assert_close(frozen.model.interpolated_pos_embed((9, 9), torch.float32)[:, -81:], 2 * first[:, -81:])


@pytest.mark.parametrize("variant", list(VARIANT_REGISTERS))
def test_dinov2_timm_safetensors_equals_fair(fair, tmp_path, variant):
    """timm's HF files (timm/vit_small_patch14[_reg4]_dinov2.lvd142m) hold the same 518 px weights in timm's keys."""
    ref, _ = fair[variant]
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items() if k != "mask_token"}
    if "register_tokens" in sd:  # timm's no_embed_class layout (what timm's converter produces)
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    check_equals_fair(variant, path, ref, 224, images(2, 100, 120))


def test_fair_register_code_matches_release(fair):
    """The register-aware FAIR code in tests/reference_models.py (copied from FAIR's current repository) computes
    what the installed FAIR release computes for a model without registers."""
    ref, _ = fair["vits14"]
    main = fair_vits14(0, main=True)
    main.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 126, 126, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(main.forward_features(x)[key], ref.forward_features(x)[key], rtol=0, atol=0)


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
    with pytest.raises(ToolkitError, match=r"dinov2_vitb14_pretrain.pth.*does not match RuntimePosEmbedViT.*cls_token \(1, 1, 768\) vs \(1, 1, 384\)"):
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
