"""Checkpoints are read without running code from them (issue 13): official formats load with
``weights_only=True`` (MAE's pickled ``argparse.Namespace`` allowed, OpenAI CLIP's TorchScript archives read
without TorchScript), anything that would run code is refused by name for encoder weights, ``load_policy`` and
``train.py`` resume, and ``trust_pickled_code`` opts in."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_train
from toolkit.encoders.weights import read_checkpoint, set_trust_pickled_code, trust_pickled_code, trusting_pickled_code
from toolkit.errors import ToolkitError


class Payload:
    """Unpickling it runs ``touch <marker>``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refused(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    message = str(excinfo.value)
    assert str(path) in message and "trust_pickled_code" in message and "system" in message, message
    return message


@pytest.fixture(autouse=True)
def no_trust():
    set_trust_pickled_code(False)
    yield
    set_trust_pickled_code(False)


# --- encoder weights ----------------------------------------------------------------------------------------------

def test_mae_checkpoint_with_args_namespace_loads_without_opt_in(tmp_path):
    """MAE's official checkpoints pickle their command line (an argparse.Namespace) under 'args'. The file is read
    and converted as MAEEncoder does (mae._convert, strict load), on a ViT-Ti to stay fast."""
    import timm

    from toolkit.encoders import mae
    from toolkit.encoders.weights import load_strict

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75,
                                                                      norm_pix_loss=True, output_dir="./out")}, path)
    assert not trust_pickled_code()
    state = read_checkpoint(path)
    assert isinstance(state["args"], argparse.Namespace) and state["args"].mask_ratio == 0.75
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    load_strict(model, mae._convert(dict(state), model), path)
    torch.testing.assert_close(model.patch_embed.proj.weight, ref.patch_embed.proj.weight, rtol=0, atol=0)


def test_malicious_encoder_weights_are_refused_and_load_with_the_opt_in(tmp_path):
    import torchvision

    from toolkit.encoders.r3m import R3MEncoder

    marker = tmp_path / "pwned"
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "model.pt"  # R3M's layout, plus a payload
    torch.save({"r3m": {f"module.convnet.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")},
                "extra": Payload(marker)}, path)
    with pytest.raises(ToolkitError) as e:
        R3MEncoder("resnet18", weights=str(path))
    assert "posix.system" in refused(e, path)
    assert not marker.exists()
    with trusting_pickled_code(True):
        R3MEncoder("resnet18", weights=str(path))
    assert marker.exists()  # the opt-in does what it says: the file's code ran
    assert not trust_pickled_code()  # only for the block


class _Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(2))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("context_length", torch.tensor(77))
        self.half_weight = nn.Parameter(torch.randn(2, 3).half().t())  # non-contiguous, fp16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x).sum() * self.logit_scale + self.half_weight.float().sum()


def test_torchscript_archive_is_read_without_torchscript(tmp_path):
    """OpenAI CLIP's .pt files are TorchScript archives: their tensors come out with torch.jit.load's names and
    values, but nothing of the archive's code is compiled or run."""
    path = tmp_path / "ViT-B-32.pt"
    with pytest.warns(FutureWarning):  # jit.trace is deprecated in this torch, still how the fixture is made
        torch.jit.trace(_Scripted(), torch.ones(1, 3, 6, 4)).save(str(path))
    got = read_checkpoint(path)
    with pytest.warns(FutureWarning):
        want = torch.jit.load(str(path)).state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_malicious_torchscript_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(path, "w") as z:  # a TorchScript archive's layout, a payload in its data.pkl
        z.writestr("archive/data.pkl", pickle.dumps({"model": Payload(marker)}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__.py", "")
        z.writestr("archive/version", "3\n")
    with pytest.raises(ToolkitError) as e:
        read_checkpoint(path)
    assert "posix.system" in refused(e, path)
    assert not marker.exists()


# --- our own checkpoints: load_policy and resume -----------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real `train.py debug=fast` run: its data file and last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    run_train(root=root)
    return root, next(root.glob("logs/debug/runs/*/checkpoints/last.ckpt"))


def with_payload(ckpt: Path, dst: Path, marker: Path) -> Path:
    data = torch.load(ckpt, weights_only=True)
    data["callbacks"]["extra"] = Payload(marker)
    torch.save(data, dst)
    return dst


def test_own_checkpoints_load_with_weights_only(run):
    from toolkit.policies.base import load_policy

    _, ckpt = run
    data = torch.load(ckpt, weights_only=True)  # no globals allowed beyond torch's defaults
    assert data["global_step"] == 4 and isinstance(data["hyper_parameters"]["stats"]["actions"]["mean"], list)
    assert load_policy(ckpt).hparams["history"] == data["hyper_parameters"]["history"]


def test_load_policy_refuses_a_malicious_checkpoint_and_loads_it_with_the_opt_in(run, tmp_path):
    from toolkit.policies.base import load_policy

    marker = tmp_path / "pwned"
    path = with_payload(run[1], tmp_path / "policy.ckpt", marker)
    with pytest.raises(ToolkitError) as e:
        load_policy(path)
    refused(e, path)
    assert not marker.exists()
    load_policy(path, trust_pickled_code=True)
    assert marker.exists()


def test_load_policy_refuses_a_config_that_names_foreign_code(run, tmp_path):
    """The checkpoint's config is instantiated: a `_target_` outside the toolkit would run as surely as a pickle."""
    from toolkit.policies.base import load_policy

    data = torch.load(run[1], weights_only=True)
    data["toolkit_cfg"]["encoder"] = {"_target_": "os.system", "command": f"touch {tmp_path / 'pwned'}"}
    torch.save(data, tmp_path / "policy.ckpt")
    with pytest.raises(ToolkitError, match=r"toolkit_cfg\.encoder\._target_='os.system'.*trust_pickled_code"):
        load_policy(tmp_path / "policy.ckpt")
    data["toolkit_cfg"]["encoder"] = {"_target_": "toolkit.encoders.weights.os.system", "command": "true"}
    torch.save(data, tmp_path / "policy.ckpt")
    with pytest.raises(ToolkitError, match="toolkit.encoders.weights.os.system"):
        load_policy(tmp_path / "policy.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_a_malicious_checkpoint(run, tmp_path):
    marker = tmp_path / "pwned"
    path = with_payload(run[1], tmp_path / "last.ckpt", marker)
    proc = run_train(f"ckpt_path={path}", root=tmp_path / "resumed", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(path) in proc.stderr and "trust_pickled_code" in proc.stderr and "posix.system" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_resume_loads_a_pickled_checkpoint_with_the_opt_in(run, tmp_path):
    marker = tmp_path / "pwned"
    path = with_payload(run[1], tmp_path / "last.ckpt", marker)
    proc = run_train(f"ckpt_path={path}", "trust_pickled_code=true", "trainer.max_steps=6", root=tmp_path / "resumed")
    assert marker.exists() and "trust_pickled_code=true" in proc.stdout + proc.stderr  # the warning
    assert torch.load(next(tmp_path.glob("resumed/logs/debug/runs/*/checkpoints/last.ckpt")),
                      weights_only=True)["global_step"] == 6


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    from toolkit.encoders.weights import load_pickled
    from toolkit.policies.base import load_policy

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    for load in (load_pickled, load_policy):
        with pytest.raises(ToolkitError, match="notes.ckpt: not a PyTorch checkpoint"):
            load(text)
