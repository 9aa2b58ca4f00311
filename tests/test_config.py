"""The Hydra config: every group composes, bad fields and names fail with one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from toolkit.config import check_types
from toolkit.errors import ToolkitError

from conftest import ROOT, run_train

CONF = ROOT / "conf"


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = "/tmp/toolkit-test"
        cfg.paths.output_dir = "/tmp/toolkit-test/out"
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_type_checks(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    for group in ("env", "data", "encoder", "policy", "trainer"):
        check_types(cfg[group], group)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_instantiates(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train([f"logger={logger}"])
    cfg.paths.output_dir = str(tmp_path)
    for node in cfg.logger.values():
        assert instantiate(node) is not None


def test_wrong_type_is_named():
    cfg = compose_train(["policy.lr=fast"])
    with pytest.raises(ToolkitError, match=r"config field policy.lr='fast': expected float, got str"):
        check_types(cfg.policy, "policy")
    cfg = compose_train(["encoder.out_dim=1.5"])
    with pytest.raises(ToolkitError, match=r"encoder.out_dim=1.5: expected int"):
        check_types(cfg.encoder, "encoder")
    check_types(compose_train(["policy.lr=1"]).policy, "policy")  # an int is a fine float


def test_cli_errors_exit_nonzero_with_one_message(tmp_path):
    proc = run_train("env.task=drawer-opn-v3", root=tmp_path, check=False)
    assert proc.returncode == 2
    assert "error: env.task='drawer-opn-v3' is not a Meta-World v3 task. Did you mean drawer-open-v3" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_train("data.batch_size=big", root=tmp_path, check=False)
    assert proc.returncode == 2 and "config field data.batch_size='big': expected int" in proc.stderr
    proc = run_train("collect.enabled=false", root=tmp_path, check=False)
    assert proc.returncode == 2 and "collect.enabled=true" in proc.stderr
    proc = run_train("data.relabel=[primitve]", root=tmp_path, check=False)
    assert proc.returncode == 2 and "data.relabel=['primitve']: unknown mode(s) ['primitve']" in proc.stderr
    # nothing was collected by the failing runs
    assert not (tmp_path / "data").exists()


def test_help_lists_the_groups():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60).stdout
    for group in ("encoder:", "policy:", "data:", "env:", "trainer:", "logger:", "callbacks:", "experiment:"):
        assert group in out
