"""The default job learns: drawer-open from pixels at unseen positions (slow: about 5 minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_default_job_opens_the_drawer_at_unseen_positions(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), f"paths.root_dir={tmp_path}", "task_name=learning",
           "trainer.max_steps=1000", "trainer.val_check_interval=1000"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=1800)
    summary = json.loads(next((tmp_path / "logs" / "learning" / "runs").glob("*/summary.json")).read_text())
    assert summary["global_step"] == 1000
    assert summary["rollout/success_rate"] >= 0.9, summary
