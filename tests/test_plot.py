"""`python -m toolkit.plot`: runs written by Lightning's own CSVLogger with Hydra-style configs (2 configurations x
2 seeds, one of them resumed into a second log version), and one real `train.py debug=fast` run's curves.png."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from conftest import run_train
from toolkit.errors import ToolkitError
from toolkit.plot import main, plot_run, read_metrics, try_plot_run

# success per (lr, seed) at steps 10, 20, 30; config "3e-4" seed 1 was resumed after step 20 (its second log
# version logs step 20 again, which wins, then 30)
SUCCESS = {("1e-3", 0): [0.1, 0.4, 0.8], ("1e-3", 1): [0.3, 0.5, 0.6],
           ("3e-4", 0): [0.0, 0.2, 0.3], ("3e-4", 1): [0.1, 0.25, 0.45]}
STEPS = [10, 20, 30]


def write_run(run_dir: Path, lr: str, seed: int, versions: list[dict[int, float]]) -> None:
    """A run dir as train.py leaves it: csv/version_*/metrics.csv (Lightning's CSVLogger) and .hydra/."""
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    for values in versions:
        logger = CSVLogger(save_dir=str(run_dir), name="csv")
        for step, value in values.items():
            logger.log_metrics({"train/loss": 1.0 / step}, step=step - 1)
            logger.log_metrics({"rollout/success_rate": value}, step=step)
        logger.save()
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    config = {"task_name": "train", "seed": seed, "num_threads": 2, "paths": {"output_dir": str(run_dir)},
              "policy": {"_target_": "toolkit.policies.bc_transformer.BCTransformer", "lr": float(lr)}}
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"policy.lr={lr}", f"seed={seed}"]))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Hydra's multirun layout: <sweep>/<job number>/."""
    for job, (lr, seed) in enumerate(SUCCESS):
        values = SUCCESS[(lr, seed)]
        if (lr, seed) == ("3e-4", 1):  # resumed: version_0 logged 10 and a stale 20, version_1 logs 20 and 30
            versions = [{10: values[0], 20: 0.99}, {20: values[1], 30: values[2]}]
        else:
            versions = [dict(zip(STEPS, values))]
        write_run(tmp_path / "sweep" / str(job), lr, seed, versions)
    return tmp_path / "sweep"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_curves_and_final_values_per_configuration(sweep, tmp_path):
    written = main([str(sweep), "--out", str(tmp_path / "plots")])
    out = tmp_path / "plots"
    for name in ("rollout_success_rate_curves", "rollout_success_rate_final"):
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert svg in written and "<svg" in svg.read_text()[:1000]
    configs = {"policy.lr=1e-3": "1e-3", "policy.lr=3e-4": "3e-4"}  # seed= is not part of a configuration's name

    raw = read_csv(out / "rollout_success_rate_curves.csv")
    assert len(raw) == 4 * 3 and {r["configuration"] for r in raw} == set(configs)
    mean = read_csv(out / "rollout_success_rate_curves_mean.csv")
    assert len(mean) == 2 * 3
    for row in mean:
        values = [SUCCESS[(configs[row["configuration"]], s)][STEPS.index(int(row["step"]))] for s in (0, 1)]
        assert int(row["seeds"]) == 2
        assert float(row["mean"]) == pytest.approx(sum(values) / 2)
        assert float(row["min"]) == pytest.approx(min(values)) and float(row["max"]) == pytest.approx(max(values))
        assert float(row["std"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))  # sample std

    final = read_csv(out / "rollout_success_rate_final.csv")
    assert {(r["configuration"], int(r["seed"]), int(r["step"])) for r in final} == \
        {(c, s, 30) for c in configs for s in (0, 1)}
    for row in final:
        assert float(row["value"]) == pytest.approx(SUCCESS[(configs[row["configuration"]], int(row["seed"]))][-1])
    final_mean = {r["configuration"]: r for r in read_csv(out / "rollout_success_rate_final_mean.csv")}
    assert float(final_mean["policy.lr=1e-3"]["mean"]) == pytest.approx(0.7)
    assert float(final_mean["policy.lr=3e-4"]["mean"]) == pytest.approx(0.375)
    assert float(final_mean["policy.lr=3e-4"]["min"]) == pytest.approx(0.3)


def test_a_resumed_run_reads_its_log_versions_in_order(sweep):
    series = read_metrics(sweep / "3")
    assert series["rollout/success_rate"] == [(10, 0.1), (20, 0.25), (30, 0.45)]  # version_1's step 20 wins
    assert [s for s, _ in series["train/loss"]] == [9, 19, 29]


def test_runs_of_several_dirs_and_other_metrics(sweep, tmp_path):
    """Two dirs (each holding runs), a std band, the training loss; every run is one configuration + seed."""
    main([str(sweep / "0"), str(sweep / "1"), "--metric", "train/loss", "--band", "std", "--out", str(tmp_path)])
    (row,) = read_csv(tmp_path / "train_loss_final_mean.csv")
    assert row["configuration"] == "default" and int(row["seeds"]) == 2  # same config, seeds 0 and 1
    assert float(row["mean"]) == pytest.approx(1 / 30)


def test_unknown_metric_and_empty_dirs_are_refused(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(sweep), "--metric", "rollout/sucess_rate", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--metric rollout/sucess_rate: not logged" in err and "rollout/success_rate" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "no run under it" in capsys.readouterr().err


def test_plot_run_and_its_guard(sweep, tmp_path, caplog):
    path = plot_run(sweep / "0")
    assert path == sweep / "0" / "curves.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert try_plot_run(tmp_path) is None  # no CSV logs (another logger): nothing, quietly
    odd = tmp_path / "odd" / "csv" / "version_0"
    odd.mkdir(parents=True)
    (odd / "metrics.csv").write_text("step,other\n1,2.0\n")
    with caplog.at_level(logging.WARNING):
        assert try_plot_run(tmp_path / "odd") is None  # nothing to draw: a warning, never an exception
    assert "could not draw" in caplog.text
    with pytest.raises(ToolkitError):
        plot_run(tmp_path / "odd")


def test_the_default_job_draws_its_curves(tmp_path):
    proc = run_train("env.image_size=32", "env.max_episode_steps=5", root=tmp_path)
    (summary_file,) = Path(tmp_path, "logs", "debug", "runs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    plot = Path(summary["plot"])
    assert plot == summary_file.parent / "curves.png" and plot.read_bytes()[:4] == b"\x89PNG"
    assert "curves" in proc.stdout
    metrics = read_metrics(summary_file.parent)
    assert metrics["train/loss"] and metrics["rollout/success_rate"]  # what the two panels show
