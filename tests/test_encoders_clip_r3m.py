"""CLIP and R3M image encoders: every official weight format loads to the reference model's exact features,
strict keys, clear errors for missing weights, shapes at any input size, freezing and partial fine-tuning.

Reference models are randomly initialised (open_clip / torchvision, and OpenAI's own clip/model.py from
``tests/reference_models.py``) and saved in each format's key layout. QuickGELU vs GELU must follow from the
file's content, never its name: every format is also loaded under another name."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import logging
import shutil
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import convert_weights_to_lp
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from toolkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from toolkit.encoders.clip import CLIPEncoder, is_torchscript, load_clip_checkpoint
from toolkit.encoders.r3m import R3MEncoder
from toolkit.errors import ToolkitError

from reference_models import openai_clip_module, relative_error  # tests/ is on sys.path (pytest rootdir)

torch.set_num_threads(2)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    """The reference preprocessing at the native size: [0, 1], then mean/std."""
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class _OpenAIArchive(nn.Module):
    """A module whose state dict is exactly OpenAI's TorchScript CLIP state dict (weights + the three int entries)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """One random open_clip ViT-B-32, its weights rounded to half precision as OpenAI's are, saved as
    - OpenAI's ``ViT-B-32.pt`` as a plain state dict (fp16, with OpenAI's three int entries),
    - OpenAI's ``ViT-B-32.pt`` as a TorchScript archive (same state dict),
    - open_clip's ``open_clip_pytorch_model.bin`` as a training checkpoint ('state_dict', 'module.' prefixes),
    - open_clip's ``open_clip_model.safetensors``.
    Expected outputs (image embedding, patch tokens) for images(2, 224, 224, seed=2) with GELU (the open_clip
    config) and with QuickGELU (what OpenAI's weights need)."""
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    convert_weights_to_lp(model)  # conv/linear/attention weights in fp16, as in OpenAI's checkpoints
    files = {"openai": root / "ViT-B-32.pt", "torchscript": root / "jit" / "ViT-B-32.pt",
             "bin": root / "open_clip_pytorch_model.bin", "safetensors": root / "open_clip_model.safetensors"}
    meta = dict(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save({**model.state_dict(), **meta}, files["openai"])
    files["torchscript"].parent.mkdir()
    torch.jit.trace(_OpenAIArchive(model), torch.ones(1)).save(str(files["torchscript"]))
    model.float()  # the reference: the same (fp16-rounded) weights in fp32
    sd = model.state_dict()
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, files["bin"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))

    x = normalized(images(2, 224, 224, seed=2), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    expected = {}
    model.visual.output_tokens = True
    with torch.no_grad():
        expected["gelu"] = model.visual(x)
        for block in model.visual.transformer.resblocks:  # = open_clip.create_model(..., force_quick_gelu=True)
            block.mlp.gelu = QuickGELU()
        expected["quick_gelu"] = model.visual(x)
    return model.state_dict(), files, expected


def renamed_copy(path: Path, directory: Path, name: str) -> Path:
    """The same bytes under another name (a hard link where possible)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return target


@pytest.mark.parametrize("renamed", [False, True], ids=["official_name", "renamed"])
@pytest.mark.parametrize("fmt", ["openai", "torchscript", "bin", "safetensors"])
def test_clip_formats(clip_files, tmp_path, fmt, renamed):
    _, files, expected = clip_files
    path = files[fmt]
    if renamed:  # OpenAI's files as my_clip.pt; open_clip's under OpenAI's name: the name must not matter
        path = renamed_copy(path, tmp_path, {"openai": "my_clip.pt", "torchscript": "my_clip.pt", "bin": "ViT-B-32.pt",
                                             "safetensors": "ViT-B-32.safetensors"}[fmt])
    enc = CLIPEncoder("ViT-B-32", weights=str(path))
    openai = fmt in ("openai", "torchscript")
    assert enc.quick_gelu == openai and enc.frozen and not enc.training
    assert is_torchscript(path) == (fmt == "torchscript")
    assert (enc.num_tokens, enc.out_dim) == (1, 512)
    out = enc(images(2, 224, 224, seed=2))
    assert out.shape == (2, 1, 512)
    torch.testing.assert_close(out[:, 0], expected["quick_gelu" if openai else "gelu"][0])
    assert enc.weights_fingerprint().startswith(str(path.resolve()))


def test_clip_open_clip_state_dict_quick_gelu_from_variant(clip_files, tmp_path, caplog):
    """An open_clip state dict does not say which activation its model used: GELU as open_clip's config of the
    variant, with a warning naming the way out; the -quickgelu variant or quick_gelu=true give QuickGELU."""
    path = renamed_copy(clip_files[1]["safetensors"], tmp_path, "weights.safetensors")
    with caplog.at_level(logging.WARNING, logger="toolkit.encoders.clip"):
        ckpt = load_clip_checkpoint("ViT-B-32", str(path))
    assert not ckpt.quick_gelu and not ckpt.openai and "does not tell" in ckpt.quick_gelu_from
    assert "ViT-B-32-quickgelu" in caplog.text and str(path) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="toolkit.encoders.clip"):
        assert load_clip_checkpoint("ViT-B-32-quickgelu", str(path)).quick_gelu
        assert load_clip_checkpoint("ViT-B-32", str(path), quick_gelu=True).quick_gelu
        assert not load_clip_checkpoint("ViT-B-32", str(clip_files[1]["openai"]), quick_gelu=False).quick_gelu
    assert not caplog.text
    # the config published with the weights (a Hugging Face snapshot's open_clip_config.json)
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 512, "quick_gelu": true}}')
    ckpt = load_clip_checkpoint("ViT-B-32", str(path))
    assert ckpt.quick_gelu and ckpt.quick_gelu_from.endswith("open_clip_config.json")


# --- against OpenAI's own model code (clip/model.py) --------------------------------------------------------

@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    """OpenAI's clip/model.py CLIP in ViT-B/32's shapes with random weights (layer norms too), in half precision as
    OpenAI's ``build_model`` leaves it (``convert_weights``), its state dict saved as ``ViT-B-32.pt`` (what
    ``torch.save(clip.load("ViT-B/32", jit=False)[0].state_dict())`` writes) and the same bytes as ``my_clip.pt``.
    The reference is what OpenAI's ``clip.load(path, device="cpu", jit=False)`` returns for that file:
    ``build_model(torch.load(path)).float()``."""
    oa = openai_clip_module()
    torch.manual_seed(5)
    model = oa.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    oa.convert_weights(model)
    root = tmp_path_factory.mktemp("openai_clip")
    official = root / "ViT-B-32.pt"
    torch.save(model.state_dict(), official)
    del model
    renamed = renamed_copy(official, root / "renamed", "my_clip.pt")
    reference = oa.build_model(torch.load(official, map_location="cpu", weights_only=True)).float().eval()
    return reference, {"official": official, "renamed": renamed}


def openai_features(reference: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI's ``encode_image`` and its patch tokens after ``ln_post`` (OpenAI returns only the class token: the
    transformer's output is taken with a hook and put through the model's own ``ln_post``)."""
    seen = []
    hook = reference.visual.transformer.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        with torch.no_grad():
            embedding = reference.encode_image(x)
            tokens = reference.visual.ln_post(seen[0].permute(1, 0, 2)[:, 1:])  # LND -> NLD, class token dropped
    finally:
        hook.remove()
    return embedding, tokens


@pytest.mark.parametrize("name", ["official", "renamed"])
def test_clip_equals_openai_model_py(openai_clip, name):
    """Both pools equal OpenAI's model on the same preprocessed input (OpenAI's model only runs at its native
    224 px, so image_size stays 224; inputs of other sizes are resized to it), whatever the file is called."""
    reference, files = openai_clip
    for pool in ("cls", "patch"):
        enc = CLIPEncoder("ViT-B-32", weights=str(files[name]), pool=pool)
        assert enc.quick_gelu and "clip/model.py" in load_clip_checkpoint("ViT-B-32", str(files[name])).quick_gelu_from
        for h, w in ((224, 224), (100, 120)):
            imgs = images(2, h, w, seed=h)
            embedding, tokens = openai_features(reference, enc.preprocess(imgs))
            out = enc(imgs)
            want = embedding[:, None] if pool == "cls" else tokens
            assert out.shape == want.shape == (2, *((1, 512) if pool == "cls" else (49, 768)))
            err = relative_error(out, want)
            assert err < 1e-5, f"{name}, pool={pool}, {h}x{w} input: relative error {err:.2e}"


def test_clip_patch_tokens(clip_files):
    _, files, expected = clip_files
    enc = CLIPEncoder("ViT-B-32", weights=str(files["safetensors"]), pool="patch")
    assert (enc.num_tokens, enc.out_dim) == (49, 768) and enc.visual.proj is None
    torch.testing.assert_close(enc(images(2, 224, 224, seed=2)), expected["gelu"][1])
    for h, w in ((64, 64), (100, 120)):
        assert enc(images(1, h, w)).shape == (1, 49, 768)


def test_clip_other_image_size_interpolates_positions(clip_files):
    enc = CLIPEncoder("ViT-B-32", weights=str(clip_files[1]["safetensors"]), image_size=96, pool="patch")
    assert enc.num_tokens == 9 and enc.visual.positional_embedding.shape == (10, 768)
    assert enc(images(2, 100, 120)).shape == (2, 9, 768)


def test_clip_missing_key(clip_files, tmp_path):
    sd = dict(clip_files[0])
    del sd["visual.transformer.resblocks.3.mlp.c_fc.weight"]
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ToolkitError, match=r"visual\.transformer\.resblocks\.3\.mlp\.c_fc\.weight"):
        CLIPEncoder("ViT-B-32", weights=str(path))


def test_clip_wrong_variant(clip_files):
    safetensors = clip_files[1]["safetensors"]
    with pytest.raises(ToolkitError, match=r"visual\.conv1\.weight .*right model variant"):
        CLIPEncoder("ViT-B-16", weights=str(safetensors))  # patch 16 vs the file's 32: shapes differ
    with pytest.raises(ToolkitError, match="not an open_clip ViT CLIP model"):
        CLIPEncoder("RN50")


# --- R3M -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def r3m_file(tmp_path_factory):
    """A random torchvision resnet18 (with non-trivial BatchNorm statistics) saved as R3M's model.pt."""
    torch.manual_seed(2)
    ref = torchvision.models.resnet18(weights=None)
    ref.fc = nn.Identity()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ref.eval()
    r3m = {"module.convnet." + k: v for k, v in ref.state_dict().items()}
    r3m.update({"module.lang_enc.lang_model.weight": torch.randn(4, 4), "module.lang_rew.0.weight": torch.randn(4, 4),
                "module.lang_rew.0.bias": torch.randn(4)})
    path = tmp_path_factory.mktemp("r3m") / "r3m_18" / "model.pt"
    path.parent.mkdir()
    torch.save({"r3m": r3m}, path)
    return ref, path


def test_r3m_model_pt(r3m_file):
    ref, path = r3m_file
    enc = R3MEncoder("resnet18", weights=str(path))
    x = images(2, 224, 224, seed=4)
    with torch.no_grad():
        expected = ref(normalized(x, IMAGENET_MEAN, IMAGENET_STD))
    out = enc(x)
    assert out.shape == (2, 1, 512) and (enc.num_tokens, enc.out_dim) == (1, 512)
    torch.testing.assert_close(out[:, 0], expected)
    assert str(path.resolve()) in enc.weights_fingerprint()


def test_r3m_missing_key(r3m_file, tmp_path):
    ref, _ = r3m_file
    r3m = {"module.convnet." + k: v for k, v in ref.state_dict().items() if k != "layer2.1.bn2.running_var"}
    path = tmp_path / "model.pt"
    torch.save({"r3m": r3m}, path)
    with pytest.raises(ToolkitError, match=r"convnet\.layer2\.1\.bn2\.running_var"):
        R3MEncoder("resnet18", weights=str(path))
    with pytest.raises(ToolkitError, match="resnet34"):
        R3MEncoder("resnet101")


# --- missing weights -------------------------------------------------------------------------------------------

@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.mark.parametrize("cls,variant,official", [(CLIPEncoder, "ViT-B-32", "ViT-B-32.pt"),
                                                  (CLIPEncoder, "ViT-L-14", "ViT-L-14.pt"),
                                                  (R3MEncoder, "resnet50", "r3m_50/model.pt")])
def test_missing_weights(empty_home, tmp_path, cls, variant, official):
    for weights in (str(tmp_path / "nope.pt"), "auto"):
        start = time.perf_counter()
        with pytest.raises(ToolkitError, match=official.replace(".", r"\.")) as info:
            cls(variant, weights=weights)
        assert time.perf_counter() - start < 1.0
        assert "http" in str(info.value)


def test_auto_finds_official_locations(empty_home, clip_files, r3m_file):
    """auto: R3M's ~/.r3m/r3m_<n>/model.pt, OpenAI's ~/.cache/clip/ViT-B-32.pt, a laion repo in the HF cache."""
    r3m_dir = empty_home / ".r3m" / "r3m_18"
    r3m_dir.mkdir(parents=True)
    (r3m_dir / "model.pt").symlink_to(r3m_file[1])
    assert R3MEncoder("resnet18", weights="auto").weights_fingerprint().startswith(str(r3m_file[1].resolve()))

    clip_cache = empty_home / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "ViT-B-32.pt").symlink_to(clip_files[1]["openai"])
    ckpt = load_clip_checkpoint("ViT-B-32", "auto")
    assert ckpt.path.parent == clip_cache and ckpt.quick_gelu and ckpt.openai
    (clip_cache / "ViT-B-32.pt").unlink()

    snap = Path(os.environ["HF_HOME"]) / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "0123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").symlink_to(clip_files[1]["safetensors"])
    ckpt = load_clip_checkpoint("ViT-B-32", "auto")
    assert ckpt.path.parent == snap and not ckpt.quick_gelu and not ckpt.openai
    # open_clip's copy of OpenAI's weights (open_clip layout): QuickGELU, from open_clip's registry of published files
    timm = Path(os.environ["HF_HOME"]) / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "4567"
    timm.mkdir(parents=True)
    (timm / "open_clip_model.safetensors").symlink_to(clip_files[1]["safetensors"])
    assert load_clip_checkpoint("ViT-B-32", str(timm / "open_clip_model.safetensors")).quick_gelu


# --- shapes, freezing, partial fine-tuning ---------------------------------------------------------------------

@pytest.mark.parametrize("make,tokens,dim", [
    (lambda: CLIPEncoder("ViT-B-32", image_size=64), 1, 512),
    (lambda: R3MEncoder("resnet18"), 1, 512),
])
def test_random_init_shapes_and_freeze(make, tokens, dim):
    torch.manual_seed(0)
    enc = make()
    assert (enc.num_tokens, enc.out_dim) == (tokens, dim)
    assert enc.weights_fingerprint().startswith("random-init")
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    for h, w in ((64, 64), (100, 120)):
        out = enc(images(2, h, w))
        assert out.shape == (2, tokens, dim) and out.dtype == torch.float32 and not out.requires_grad
    with pytest.raises(TypeError):
        enc(images(1, 64, 64).float())


@pytest.mark.parametrize("make,trainable", [
    (lambda: CLIPEncoder("ViT-B-32", freeze=False, train_last_blocks=1, image_size=64),
     ("visual.transformer.resblocks.11.", "visual.ln_post.", "visual.proj")),
    (lambda: R3MEncoder("resnet18", freeze=False, train_last_blocks=1, image_size=64), ("convnet.layer4.",)),
])
def test_train_last_blocks(make, trainable):
    torch.manual_seed(0)
    enc = make()
    enc.train()
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(trainable) for n in names)
    assert all(any(n.startswith(t) for n in names) for t in trainable)
    enc(images(2, 64, 64)).square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in enc.parameters())
    if isinstance(enc, R3MEncoder):  # frozen BatchNorm statistics stay frozen
        assert not enc.convnet.layer3.training and enc.convnet.layer4.training


def test_fine_tune_everything():
    enc = R3MEncoder("resnet18", freeze=False, image_size=64)
    assert all(p.requires_grad for p in enc.parameters())
    assert enc(images(2, 64, 64)).requires_grad
