"""Learning curves and final results of runs and sweeps, from their CSV logs.

    python -m toolkit.plot RUN_OR_SWEEP_DIR... [--metric rollout/success_rate] [--out DIR] [--band minmax|std]
        [--ignore KEY ...]

Every run under the given dirs (a dir with ``csv/version_*/metrics.csv``, Lightning's CSVLogger) is read with
its config (``.hydra/config.yaml``). Runs whose configs differ only in ``seed`` (and in fields that do not
change the experiment: ``paths``, ``task_name``, ``ckpt_path``, ``resume``, ``num_threads``,
``trust_pickled_code``; ``--ignore`` adds more) are one configuration, named by the command-line overrides
(``.hydra/overrides.yaml``) that set it apart from the others.

Writes into ``--out`` (default ``<dir>/plots``, or ``plots`` in the common parent of several dirs):
``<metric>_curves.png/.svg`` (the metric against the training step: per configuration the mean over seeds and a
band, min-max or +-1 std), ``<metric>_final.png/.svg`` (per configuration a bar at the mean of each seed's last
logged value, the seeds as points), and the numbers: ``<metric>_curves.csv`` (configuration, run, seed, step,
value), ``<metric>_curves_mean.csv`` (configuration, step, seeds, mean, std, min, max), ``<metric>_final.csv``
(configuration, run, seed, step, value: each run's last logged value) and ``<metric>_final_mean.csv``
(configuration, seeds, mean, std, min, max). ``std`` is the sample standard deviation over seeds (0 for one seed).

``plot_run(run_dir)`` draws one run's own curves (training loss, rollout success or Crafter score) into
``<run_dir>/curves.png``; ``train.py`` calls it at the end of every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

Series = list[tuple[int, float]]
# config fields that do not change what a run learns (or that name it): runs differing only there are seeds
NOT_CONFIGURATION = ("seed", "paths", "task_name", "ckpt_path", "resume", "num_threads", "trust_pickled_code")


@dataclass
class Run:
    path: Path
    name: str
    seed: int | None
    config: dict[str, Any] | None
    overrides: list[str]
    metrics: dict[str, Series]


# --- reading runs ----------------------------------------------------------------------------------------------
def _natural_key(text: str) -> list:
    """``version_2`` before ``version_10``; sweep jobs 0, 1, ..., 10 in numeric order."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", text)]


def read_metrics(run_dir: str | Path) -> dict[str, Series]:
    """Every logged metric of a run as sorted ``(step, value)`` pairs, from its CSVLogger files; a resumed run's
    later ``version_*`` wins where two versions logged the same step."""
    merged: dict[str, dict[int, float]] = {}
    files = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: _natural_key(p.parent.name))
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if step in ("", None):
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    try:
                        merged.setdefault(key, {})[int(float(step))] = float(value)
                    except ValueError:
                        continue  # a non-numeric column (a logger's text): not a curve
    return {k: sorted(v.items()) for k, v in merged.items()}


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run dirs named by ``paths``: each a run (it has ``csv/version_*/metrics.csv``) or a dir holding runs."""
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            raise ToolkitError(f"{path}: no such run or sweep directory")
        runs = sorted({p.parent.parent.parent for p in path.glob("**/csv/version_*/metrics.csv")},
                      key=lambda p: _natural_key(p.as_posix()))
        if not runs:
            raise ToolkitError(f"{path}: no run under it (a run dir holds csv/version_*/metrics.csv, written by "
                               f"the csv logger)")
        found += [r for r in runs if r not in found]
    return found


def load_run(path: Path, base: Path) -> Run:
    """A run's metrics, config (``.hydra/config.yaml``, unresolved) and overrides."""
    import yaml
    from omegaconf import OmegaConf

    config, overrides = None, []
    config_file, overrides_file = path / ".hydra" / "config.yaml", path / ".hydra" / "overrides.yaml"
    if config_file.is_file():
        config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    if overrides_file.is_file():
        items = yaml.safe_load(overrides_file.read_text())
        overrides = [str(o) for o in items] if isinstance(items, list) else []
    seed = config.get("seed") if isinstance(config, dict) else None
    rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
    return Run(path, path.name if rel == "." else rel, seed if isinstance(seed, int) else None, config, overrides,
               read_metrics(path))


# --- configurations --------------------------------------------------------------------------------------------
def _without(config: dict[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    """``config`` without the (dotted) keys in ``ignore``."""
    out = json.loads(json.dumps(config, default=str))
    for key in ignore:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _ignored_override(override: str, ignore: tuple[str, ...]) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key == k or key.startswith(f"{k}.") for k in ignore)


def group_runs(runs: list[Run], ignore: tuple[str, ...] = NOT_CONFIGURATION) -> dict[str, list[Run]]:
    """Runs grouped into configurations (same config up to ``ignore``), in order of first appearance, keyed by
    a label: the overrides that set the configuration apart from the others ("default" for a single one)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(_without(run.config, ignore), sort_keys=True) if run.config is not None else f"run:{run.path}"
        groups.setdefault(key, []).append(run)
    kept = [[o for o in g[0].overrides if not _ignored_override(o, ignore)] for g in groups.values()]
    shared = set.intersection(*map(set, kept)) if kept else set()
    labels: dict[str, list[Run]] = {}
    for own, members in zip(kept, groups.values()):
        label = " ".join(o for o in own if o not in shared)
        if not label:
            label = "default" if len(groups) == 1 else (members[0].name if members[0].config is None
                                                          else _config_difference(members[0], groups, ignore))
        unique, k = label, 2
        while unique in labels:
            unique, k = f"{label} #{k}", k + 1
        labels[unique] = members
    return labels


def _config_difference(run: Run, groups: dict[str, list[Run]], ignore: tuple[str, ...]) -> str:
    """A label from the config fields where ``run`` differs from the other configurations (no overrides say it)."""
    def differences(mine: Any, others: list[Any], prefix: str) -> list[str]:
        if isinstance(mine, dict) and others and all(isinstance(o, dict) for o in others):
            keys = list(dict.fromkeys([*mine, *(k for o in others for k in o)]))
            return [d for k in keys for d in differences(mine.get(k), [o.get(k) for o in others], f"{prefix}{k}.")]
        if all(o == mine for o in others):
            return []
        return [f"{prefix.rstrip('.')}={'null' if mine is None else '{...}' if isinstance(mine, dict) else mine}"]

    others = [_without(g[0].config, ignore) for g in groups.values() if g[0] is not run and g[0].config is not None]
    return " ".join(differences(_without(run.config, ignore), others, "")[:3]) or run.name


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"seeds": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def curve_rows(groups: dict[str, list[Run]], metric: str) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """The four tables: every logged value, their mean per configuration and step, each run's final value,
    and the mean of the final values per configuration."""
    raw, mean, final, final_mean = [], [], [], []
    for label, runs in groups.items():
        by_step: dict[int, list[float]] = {}
        finals = []
        for run in runs:
            series = run.metrics.get(metric) or []
            for step, value in series:
                raw.append({"configuration": label, "run": run.name, "seed": run.seed, "step": step, "value": value})
                by_step.setdefault(step, []).append(value)
            if series:
                final.append({"configuration": label, "run": run.name, "seed": run.seed, "step": series[-1][0],
                              "value": series[-1][1]})
                finals.append(series[-1][1])
        mean += [{"configuration": label, "step": s, **_stats(v)} for s, v in sorted(by_step.items())]
        if finals:
            final_mean.append({"configuration": label, **_stats(finals)})
    return raw, mean, final, final_mean


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- drawing ---------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none is looked for
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=100, bbox_inches="tight")  # "tight": legends below the axes stay in the picture
    return paths


def _short(label: str, width: int) -> str:
    """A configuration's label for a legend: long values (paths) cut in the middle, lines of ``width``."""
    import textwrap

    def cut(token: str) -> str:
        key, sep, value = token.partition("=")
        return f"{key}={value[:14]}...{value[-14:]}" if sep and len(value) > 32 else token

    lines = textwrap.wrap(" ".join(cut(t) for t in label.split(" ")), width, break_long_words=False,
                          break_on_hyphens=False)
    return "\n".join(lines) or label


def plot_runs(paths: list[str | Path], metric: str = "rollout/success_rate", out: str | Path | None = None,
              band: str = "minmax", ignore: tuple[str, ...] = NOT_CONFIGURATION) -> list[Path]:
    """Learning curves and final values of ``metric`` for the runs under ``paths``; returns the files written."""
    if band not in ("minmax", "std"):
        raise ToolkitError(f"--band {band}: expected minmax or std")
    dirs = find_run_dirs(paths)
    base = Path(paths[0]) if len(paths) == 1 else Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
    if len(paths) > 1:
        dirs = [d.resolve() for d in dirs]
    runs = [load_run(d, base) for d in dirs]
    with_metric = [r for r in runs if r.metrics.get(metric)]
    if not with_metric:
        logged = sorted({k for r in runs for k in r.metrics})
        raise ToolkitError(f"--metric {metric}: not logged by any of the {len(runs)} run(s) under "
                           f"{', '.join(map(str, paths))}; logged: {', '.join(logged) or 'nothing'}")
    for r in runs:
        if r not in with_metric:
            log.warning(f"{r.path}: no {metric} logged, left out")
    return plot_groups(group_runs(with_metric, ignore), metric, Path(out) if out is not None else base / "plots", band)


def plot_groups(groups: dict[str, list[Run]], metric: str, out: Path, band: str = "minmax") -> list[Path]:
    """``plot_runs``' CSV tables and figures for runs already grouped by configuration (label -> seeds), into the
    directory ``out``; returns the files written."""
    raw, mean, final, final_mean = curve_rows(groups, metric)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
    written = [
        _write_csv(out / f"{slug}_curves.csv", raw, ["configuration", "run", "seed", "step", "value"]),
        _write_csv(out / f"{slug}_curves_mean.csv", mean,
                   ["configuration", "step", "seeds", "mean", "std", "min", "max"]),
        _write_csv(out / f"{slug}_final.csv", final, ["configuration", "run", "seed", "step", "value"]),
        _write_csv(out / f"{slug}_final_mean.csv", final_mean, ["configuration", "seeds", "mean", "std", "min", "max"]),
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, label in enumerate(groups):
        rows = [r for r in mean if r["configuration"] == label]
        steps = [r["step"] for r in rows]
        mu = [r["mean"] for r in rows]
        low, high = (([r["min"] for r in rows], [r["max"] for r in rows]) if band == "minmax" else
                     ([r["mean"] - r["std"] for r in rows], [r["mean"] + r["std"] for r in rows]))
        seeds = len(groups[label])
        ax.plot(steps, mu, marker="o" if len(steps) < 30 else None, ms=3, color=f"C{i}",
                label=_short(f"{label} ({seeds} seed{'s' if seeds > 1 else ''})", 70))
        if seeds > 1:
            ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds, band {'min-max' if band == 'minmax' else '+-1 std'}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    written += _save(fig, out / f"{slug}_curves")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 2), 4))
    for i, row in enumerate(final_mean):
        ax.bar(i, row["mean"], color=f"C{i}", alpha=0.6)
        values = [r["value"] for r in final if r["configuration"] == row["configuration"]]
        offsets = [0.0] if len(values) == 1 else [-0.2 + 0.4 * k / (len(values) - 1) for k in range(len(values))]
        ax.scatter([i + o for o in offsets], values, color="k", s=14, zorder=3)
    ax.set_xticks(range(len(final_mean)), [_short(r["configuration"], 24) for r in final_mean], fontsize=7)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric}: mean (bar) and seeds (points)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    written += _save(fig, out / f"{slug}_final")
    plt.close(fig)
    return written


# panels of a run's own plot: (title, metrics drawn in it), a panel only where one of its metrics is logged
RUN_PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("Crafter score (%)", ("rollout/crafter_score", "env/crafter_score")),
    ("success rate", ("rollout/success_rate", "env/success")),
)


def plot_run(run_dir: str | Path) -> Path:
    """One run's curves (training and validation loss, rollout success or the Crafter score, and the training
    episodes' success of an online run) into ``<run_dir>/curves.png``."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ToolkitError(f"{run_dir}: no csv/version_*/metrics.csv with values (the csv logger writes them)")
    panels = [(title, [m for m in keys if metrics.get(m)]) for title, keys in RUN_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if any(t.startswith("Crafter") for t, _ in panels):  # Crafter has no success: its score says it
        panels = [(t, k) for t, k in panels if t != "success rate"]
    if not panels:
        raise ToolkitError(f"{run_dir}: none of {', '.join(k for _, keys in RUN_PANELS for k in keys)} was logged")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*metrics[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=key)
        ax.set_title(title, fontsize=10)
        if title == "success rate":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("/".join(run_dir.resolve().parts[-3:]), fontsize=9)  # <task_name>/runs/<time>
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def try_plot_run(run_dir: str | Path) -> str | None:
    """``plot_run`` for train.py: None when the run has no CSV logs (another logger), and a warning, never an
    exception, when drawing fails (a plot must not fail a finished run)."""
    if not any(Path(run_dir).glob("csv/version_*/metrics.csv")):
        return None
    try:
        return str(plot_run(run_dir))
    except Exception as e:  # noqa: BLE001: deliberate, logged (tests/test_plot.py); a plot never fails a finished run
        log.warning(f"could not draw {Path(run_dir) / 'curves.png'}: {e}")
        return None


def main(argv: list[str] | None = None) -> list[Path]:
    from toolkit.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="python -m toolkit.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--metric", default="rollout/success_rate",
                        help="a logged metric (default rollout/success_rate)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default <dir>/plots; for several dirs, plots/ in their common parent)")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax",
                        help="spread across seeds: min-max (default) or +-1 sample std")
    parser.add_argument("--ignore", nargs="+", action="extend", default=[], metavar="KEY",
                        help="more config fields that do not make a configuration (dotted, e.g. data.path)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        written = plot_runs(args.paths, args.metric, args.out, args.band, NOT_CONFIGURATION + tuple(args.ignore))
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
