"""`python eval.py` / toolkit.eval on checkpoints trained here: continuous Meta-World (a two-run sweep) and a
discrete, language-conditioned BabyAI IQL policy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import run_train
from toolkit.errors import ToolkitError
from toolkit.eval import main, wilson_interval


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A multirun of two BC transformers (seed=0,1), 2 steps each on 1 Meta-World demo at 32 px."""
    root = tmp_path_factory.mktemp("mw")
    run_train("-m", "seed=0,1", "env.image_size=32", "env.max_episode_steps=5", "data.num_demos=1",
              "trainer.max_steps=2", "callbacks.rollout=null", "callbacks.best_checkpoint=null", root=root)
    (path,) = Path(root, "logs", "debug", "multiruns").iterdir()
    return path


@pytest.fixture(scope="module")
def babyai_checkpoint(tmp_path_factory) -> Path:
    """IQL (discrete actions, MiniLM instruction embeddings) on 2 BabyAI GoToLocal demos at 16 px."""
    root = tmp_path_factory.mktemp("babyai")
    run_train("env=babyai", "env.image_size=16", "policy=iql", "data.num_demos=2", "collect.only_success=true",
              "env.max_episode_steps=null", "trainer.max_steps=2", "callbacks.rollout=null",
              "callbacks.best_checkpoint=null", root=root)
    (ckpt,) = Path(root, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
    return ckpt


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_consistent(out: Path, seeds: list[int]) -> dict:
    """episodes.csv and episodes.json hold one row per requested seed, and summary.json their means."""
    rows, flat = json.loads((out / "episodes.json").read_text()), read_csv(out / "episodes.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seed"] for r in rows] == seeds and [int(r["seed"]) for r in flat] == seeds
    assert [int(r["success"]) for r in flat] == [int(r["success"]) for r in rows]
    assert [int(r["length"]) for r in flat] == [r["length"] for r in rows]
    n = len(seeds)
    assert summary["episodes"] == n and (summary["first_seed"], summary["last_seed"]) == (seeds[0], seeds[-1])
    assert summary["success_rate"] == pytest.approx(sum(r["success"] for r in rows) / n)
    assert summary["mean_length"] == pytest.approx(sum(r["length"] for r in rows) / n)
    assert summary["mean_return"] == pytest.approx(sum(r["return"] for r in rows) / n)
    low, high = summary["success_ci95"]
    assert low <= summary["success_rate"] <= high and summary["env_steps_per_s"] > 0
    return summary


def test_continuous_checkpoint_writes_episodes_summary_and_video(sweep, tmp_path):
    import av

    ckpt = sweep / "0" / "checkpoints" / "last.ckpt"
    (row,) = main([str(ckpt), "--episodes", "3", "--envs", "2", "--seed", "4000010", "--video", "2",
                   "--out", str(tmp_path)])
    summary = check_consistent(tmp_path, [4000010, 4000011, 4000012])
    assert summary["policy"].endswith("BCTransformer") and summary["env"]["task"] == "drawer-open-v3"
    assert all(1 <= r["length"] <= 5 for r in json.loads((tmp_path / "episodes.json").read_text()))
    with av.open(summary["video"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    longest = max(r["length"] for r in json.loads((tmp_path / "episodes.json").read_text()))
    assert len(frames) == longest + 1 and frames[0].shape == (64, 2 * 64, 3)  # 2 episodes side by side, 2x scale
    (csv_row,) = read_csv(tmp_path / "summary.csv")
    assert float(csv_row["success_rate"]) == pytest.approx(row["success_rate"]) == summary["success_rate"]


def test_discrete_language_policy_with_an_env_override(babyai_checkpoint):
    main([str(babyai_checkpoint), "--episodes", "3", "--envs", "2", "--env", "max_episode_steps=6"])
    out = babyai_checkpoint.parent.parent / "eval" / "last_max_episode_steps=6"  # default: next to the run
    summary = check_consistent(out, [4_000_000, 4_000_001, 4_000_002])
    assert summary["env"]["level"] == "GoToLocal" and summary["env"]["max_episode_steps"] == 6
    rows = json.loads((out / "episodes.json").read_text())
    assert all(r["length"] <= 6 and r["instruction"].startswith("go to") for r in rows)
    assert [r["instruction"] for r in read_csv(out / "episodes.csv")] == [r["instruction"] for r in rows]


def test_a_sweep_dir_gives_one_row_per_run(sweep, capsys):
    rows = main([str(sweep), "--episodes", "1", "--envs", "1"])
    assert [r["run"] for r in rows] == ["0", "1"]
    assert "seed=0" in rows[0]["overrides"].split() and "seed=1" in rows[1]["overrides"].split()
    table = read_csv(sweep / "eval" / "summary.csv")
    assert [r["run"] for r in table] == ["0", "1"] and all(int(r["episodes"]) == 1 for r in table)
    for run in ("0", "1"):
        assert (sweep / run / "eval" / "last" / "episodes.csv").is_file()
    out = capsys.readouterr().out
    assert "seed=0" in out and "seed=1" in out and "debug=fast" not in out  # only the overrides that differ


def fails_with(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    return line


def test_an_env_that_does_not_fit_the_checkpoint_is_refused(sweep, capsys):
    ckpt = sweep / "0" / "checkpoints" / "last.ckpt"
    line = fails_with([str(ckpt), "--episodes", "1", "--env", "image_size=64"], capsys)
    assert str(ckpt) in line and "camera rgb_corner4: dataset (32, 32, 3), env (64, 64, 3)" in line
    assert "image_size=64" in line
    line = fails_with([str(ckpt), "--env", "_target_=toolkit.envs.babyai.BabyAIEnv", "image_size=32"], capsys)
    assert "env Discrete(7)" in line and "rgb_top" in line
    line = fails_with([str(ckpt), "--env", "imagesize=64"], capsys)
    assert "no field 'imagesize'" in line and "image_size" in line


def test_sample_evaluates_an_online_policy_as_it_acts_in_training_and_refuses_bc(sweep, tmp_path, capsys):
    """``--sample``: a PPO checkpoint acts with samples of its policy (reproducibly: the same episodes twice), into
    its own ``_sampled`` dir; a BC checkpoint has no stochastic policy and is refused by name."""
    run_train("policy=ppo", "env=none", "+env._target_=bandit_env.BanditEnv", "+env.discrete=false",
              "data.num_envs=2", "policy.n_steps=8", "data.batch_size=8", "policy.n_epochs=1", "trainer.max_steps=2",
              "callbacks.rollout=null", "callbacks.best_checkpoint=null", "num_threads=1", root=tmp_path)
    (ckpt,) = Path(tmp_path, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
    torch.load(ckpt, weights_only=True)  # plain data only (the action bounds were numpy scalars once): resumable
    args = [str(ckpt), "--episodes", "40", "--envs", "1", "--trust-pickled-code"]  # (the test env's class)
    main([*args, "--sample"])
    out = ckpt.parent.parent / "eval" / "last_sampled"
    first = json.loads((out / "episodes.json").read_text())
    assert json.loads((out / "summary.json").read_text())["sampled"] is True
    main([*args, "--sample"])
    assert json.loads((out / "episodes.json").read_text()) == first
    main(args)  # the mode: its own dir, not marked sampled
    assert json.loads((ckpt.parent.parent / "eval" / "last" / "summary.json").read_text())["sampled"] is False
    line = fails_with([str(sweep / "0" / "checkpoints" / "last.ckpt"), "--episodes", "1", "--sample"], capsys)
    assert "--sample" in line and "BCTransformer" in line


def test_what_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint\n")
    assert f"{notes}: not a PyTorch checkpoint" in fails_with([str(notes)], capsys)
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    assert f"{weights}: not a checkpoint written by train.py" in fails_with([str(weights)], capsys)
    assert "no such checkpoint or directory" in fails_with([str(tmp_path / "missing.ckpt")], capsys)
    assert "no checkpoints/last.ckpt under it" in fails_with([str(tmp_path)], capsys)


def test_wilson_interval_matches_published_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(1, 50) == pytest.approx((0.0035, 0.1050), abs=1e-4)
    assert wilson_interval(0, 4) == (0.0, pytest.approx(0.4899, abs=1e-4))
    assert wilson_interval(4, 4)[1] == 1.0


def test_the_kind_and_number_of_actions_must_fit():
    """Beyond the sizes rollout_mismatches compares: discrete vs continuous actions, and how many discrete ones."""
    from types import SimpleNamespace

    import gymnasium as gym

    from toolkit.envs.vector import EnvSpec
    from toolkit.eval import check_env_fits

    obs = gym.spaces.Dict({"state": gym.spaces.Box(0, 1, (3,))})
    meta = {"rgb_keys": [], "image_shape": {}, "state_dim": 3, "action_dim": 1}
    discrete7 = SimpleNamespace(discrete=True, hparams={"shape_meta": meta, "num_actions": 7})
    continuous = SimpleNamespace(discrete=False, hparams={"shape_meta": meta})
    check_env_fits(discrete7, EnvSpec(gym.spaces.Discrete(7), obs, {}), {"_target_": "x"}, "a.ckpt")
    with pytest.raises(ToolkitError, match=r"a.ckpt was trained .*actions: checkpoint 7 discrete, env Discrete\(5\)"):
        check_env_fits(discrete7, EnvSpec(gym.spaces.Discrete(5), obs, {}), {"_target_": "x"}, "a.ckpt")
    with pytest.raises(ToolkitError, match=r"actions: checkpoint continuous, env Discrete\(2\)"):
        check_env_fits(continuous, EnvSpec(gym.spaces.Discrete(2), obs, {}), {"_target_": "x"}, "a.ckpt")


def test_a_vector_env_with_a_dead_process_is_closed_without_hanging_or_raising():
    """eval's cleanup after an error: gymnasium's own close would wait on the dead process's pipe and raise;
    ``_close_broken`` terminates what is left instead, and marks the env closed."""
    import os
    import signal

    from toolkit.envs.vector import make_vector_env
    from toolkit.eval import _close_broken

    envs = make_vector_env({"_target_": "bandit_env.BanditEnv"}, 2)
    envs.reset(seed=[0, 1])
    os.kill(envs.processes[0].pid, signal.SIGKILL)
    envs.processes[0].join(10)
    _close_broken(envs)
    assert envs.closed and not any(p.is_alive() for p in envs.processes)
