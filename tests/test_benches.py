"""The benches' setups are what the README tables say they are (demo counts, levels, settings)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize("train_demos", [1, 9, 10, 500, 5000])
def test_babyai_imitation_trains_on_the_papers_number_of_training_demos(train_demos):
    """``--train-demos 5000`` is the BabyAI paper's count of *training* demos: the file holds more, so that the
    datamodule's split (every tenth episode to validation) leaves exactly that many for training."""
    from babyai_imitation import num_demos_for

    from toolkit.datamodules.episode_file import split_masks

    n = num_demos_for(train_demos)
    assert len(split_masks([str(i) for i in range(n)])["train"]) == train_demos
    assert len(split_masks([str(i) for i in range(n - 1)])["train"]) < train_demos  # no more than needed
    if train_demos == 5000:
        assert n == 5556


def test_babyai_imitation_variants_compose_to_the_settings_they_name(tmp_path):
    """Each variant's overrides give the train.py config its row claims (level, demos, chunk, shift, view, history,
    pixels or not, trunk)."""
    from babyai_imitation import VARIANTS, overrides
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    pixels = None  # every camera in the file
    film = "toolkit.encoders.babyai_film.BabyAIViewFiLM"
    expected = {"chunk4_shift4": (4, 4, False, 2, pixels, "transformer", None),
                "h1_noaug": (1, 0, False, 2, pixels, "transformer", None),
                "h1_noaug_symbolic": (1, 0, True, 2, pixels, "transformer", None),
                "h1_noaug_symbolic_hist4": (1, 0, True, 4, pixels, "transformer", None),
                "symbolic_only": (1, 0, True, 2, ["state"], "transformer", None),
                "symbolic_only_gru64": (1, 0, True, 64, ["state"], "gru", None),
                "symbolic_only_film_gru64": (1, 0, True, 64, ["state"], "gru", film),
                "symbolic_only_film_gru64_words": (1, 0, True, 64, ["state"], "gru", film),
                "symbolic_only_film_gru64_every_step": (1, 0, True, 64, ["state"], "gru", film)}
    words = "toolkit.encoders.language.WordPositionEncoder"
    assert set(VARIANTS) == set(expected)
    for variant, (horizon, shift, symbolic, history, obs_keys, trunk, state_encoder) in expected.items():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides("GoToRedBall", 5000, 8000, 200, variant, 1))
        assert cfg.env.level == "GoToRedBall" and cfg.data.num_demos == 5556 and cfg.seed == 1
        assert (cfg.data.horizon, cfg.policy.augment_shift, cfg.env.symbolic) == (horizon, shift, symbolic)
        assert cfg.data.history == cfg.policy.history == history
        assert (None if cfg.data.obs_keys is None else list(cfg.data.obs_keys)) == obs_keys
        assert cfg.policy.trunk == trunk
        assert (cfg.policy.state_encoder or {}).get("_target_") == state_encoder
        assert cfg.trainer.max_steps == 8000 and cfg.callbacks.rollout.num_episodes == 200
        assert cfg.policy._target_.endswith("BCTransformer")
        assert (cfg.language._target_ == words) == variant.endswith("_words")
        assert cfg.data.label_every_step == cfg.policy.label_every_step == variant.endswith("_every_step")


@pytest.mark.parametrize("level", ["GoToRedBall", "GoToLocal", "PutNextLocal"])
def test_the_babyai_film_experiment_is_the_benchs_film_variant(level):
    """``experiment=babyai_film env.level=<level>`` trains what the README's FiLM rows ran: bench variant
    symbolic_only_film_gru64_every_step (5,000 training demos, 1,000 steps, 200 unseen episodes), and with
    ``data.label_every_step=false`` and 4,000 steps variant symbolic_only_film_gru64, one label per window."""
    from babyai_imitation import overrides
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    one_label = ["data.label_every_step=false", "trainer.max_steps=4000", "trainer.val_check_interval=2000"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        bench = compose("train", overrides=overrides(level, 5000, 1000, 200, "symbolic_only_film_gru64_every_step", 0))
        experiment = compose("train", overrides=["experiment=babyai_film", f"env.level={level}"])
        bench_one = compose("train", overrides=overrides(level, 5000, 4000, 200, "symbolic_only_film_gru64", 0))
        experiment_one = compose("train", overrides=["experiment=babyai_film", f"env.level={level}", *one_label])
        linear = compose("train", overrides=["experiment=babyai_film", f"env.level={level}", "~state_encoder"])
    for group in ("env", "data", "policy", "trainer"):
        assert experiment[group] == bench[group], group
        assert experiment_one[group] == bench_one[group], group
    assert experiment.callbacks.rollout == bench.callbacks.rollout
    assert bench.env.level == level and bench.data.num_demos == 5556 and bench.data.history == 64
    assert experiment.policy.label_every_step is True and experiment_one.policy.label_every_step is False
    # the README's way back to the recipe without the view model (Hydra refuses state_encoder=null here)
    assert linear.policy.state_encoder is None and linear.data == experiment.data


def test_babyai_imitation_tables_name_their_level_and_never_invent_published_numbers():
    """GoToRedBall's table stays where the README links it; other levels get their own file, and a level whose
    published numbers are not on record says so rather than printing a number."""
    from babyai_imitation import PAPER, published, results_path

    assert results_path("GoToRedBall").name == "babyai_imitation.md"
    assert results_path("GoToLocal").name == "babyai_imitation_GoToLocal.md" != results_path("PutNextLocal").name
    assert published("GoToRedBall") == "Published (5000 demos): BabyAI 1.0 model 89.6%, BabyAI 1.1 model 99.3%"
    for level in ("GoToLocal", "PutNextLocal"):
        assert level not in PAPER and "not available" in published(level) and "%" not in published(level)


@pytest.mark.parametrize("symbolic", [True, False])
def test_the_sprint_bench_holds_out_missions_of_more_than_two_clauses(symbolic):
    """bench/babyai_language.py: every setup trains on the level's bot demos with missions of more than 2 clauses
    held out, BabyAI's defaults (one action per step, no shift) and the symbolic view unless --pixels-only; the
    setups differ only in the policy, the relabeling modes and which losses train the encoder."""
    from babyai_language import DEFAULT_SETUPS, SETUPS, common_overrides
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    expected = {"bc": ("BCTransformer", None, None), "bc_relabel": ("BCTransformer", ["primitive", "aggregate"], None),
                "iql_enc_all": ("IQLPolicy", None, "all"),
                "iql_relabel_chain_enc_all": ("IQLPolicy", ["primitive", "aggregate", "chain"], "all"),
                "iql_relabel_chain": ("IQLPolicy", ["primitive", "aggregate", "chain"], "critic")}
    assert [key for key, _, _ in SETUPS] == list(expected) and DEFAULT_SETUPS == list(expected)[:4]
    configs = {}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for key, _, overrides in SETUPS:
            configs[key] = compose("train", overrides=[*common_overrides("GoToSeqS5R2", 1000, 5000, symbolic, 1),
                                                       *overrides, "seed=2"])
    for key, (policy, relabel, encoder_updated_by) in expected.items():
        cfg = configs[key]
        assert cfg.env.level == "GoToSeqS5R2" and cfg.env.symbolic is symbolic and cfg.seed == 2
        assert cfg.data.num_demos == 1000 and cfg.data.max_sub_instructions == 2 and cfg.trainer.max_steps == 5000
        assert (cfg.data.horizon, cfg.policy.augment_shift) == (1, 0)
        assert cfg.policy._target_.endswith(policy)
        assert (list(cfg.data.relabel) if cfg.data.relabel else None) == relabel
        assert cfg.policy.get("encoder_updated_by") == encoder_updated_by
        assert cfg.env == configs["bc"].env


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 500), min_size=1, max_size=50), st.data())
def test_bc_at_equal_labels_gets_the_fewest_demos_that_reach_daggers_labels(lengths, data):
    """bench/policies.py: BC's demos at an equal budget of expert labels are the fewest leading demos whose
    steps reach the DAgger file's labelled states."""
    from policies import demos_for_labels

    labels = data.draw(st.integers(1, sum(lengths)))
    n = demos_for_labels(lengths, labels)
    assert sum(lengths[:n]) >= labels > sum(lengths[:n - 1])
    with pytest.raises(ValueError, match="fewer than"):
        demos_for_labels(lengths, sum(lengths) + 1)


def test_dagger_bench_default_decay_is_policy_daggers():
    """A bench run without --dagger-decay (and its untagged run name) is DAgger at conf/policy/dagger.yaml's beta."""
    from omegaconf import OmegaConf
    from policies import DEFAULT_DECAY

    assert OmegaConf.load(ROOT / "conf" / "policy" / "dagger.yaml").callbacks.dagger.decay == DEFAULT_DECAY


@pytest.mark.parametrize("iterations, episodes, per_iteration, decay", [(4, 4, 200, 0.5), (10, 4, 1000, 0.7)])
def test_dagger_bench_runs_the_iterations_it_names(tmp_path, iterations, episodes, per_iteration, decay):
    """The DAgger row's overrides: 3 demos, the named iterations x episodes, iteration k after (k + 1) x the
    steps per iteration, a last cycle of as many steps on the whole aggregate, the learning rate's cosine
    restarted at every iteration, the bench's own file, DAgger's beta mixture 1, decay, decay ** 2, ..."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from policies import dagger_overrides

    path = tmp_path / "dagger.hdf5"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*dagger_overrides(path, 2, per_iteration, iterations, episodes, decay),
                                          "env.task=pick-place-v3"])
    d = cfg.callbacks.dagger
    assert cfg.data.num_demos == 3 and cfg.data.path == str(path) and cfg.seed == 2
    assert (d.iterations, d.episodes_per_iteration, d.steps_per_iteration) == (iterations, episodes, per_iteration)
    assert cfg.trainer.max_steps == (iterations + 1) * per_iteration == cfg.trainer.val_check_interval
    assert (d.beta0, d.decay) == (1.0, decay)
    callback = instantiate(d)
    assert [callback.beta(k) for k in range(3)] == pytest.approx([1.0, decay, decay ** 2])
    assert cfg.policy._target_.endswith("BCTransformer")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.policy.lr)
    scheduler = instantiate(cfg.policy.scheduler)(optimizer=optimizer)
    lrs = []
    for _ in range(cfg.trainer.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for k in range(iterations + 1):  # each iteration's aggregate starts at the full learning rate
        assert lrs[k * per_iteration] == pytest.approx(cfg.policy.lr)
        assert lrs[(k + 1) * per_iteration - 1] < 0.01 * cfg.policy.lr


def test_the_aggregate_row_is_plain_bc_on_every_episode_of_the_dagger_file(tmp_path):
    """bench/policies.py's "DAgger's aggregate" row: the BC rows' policy, schedule and steps (no DAgger
    callback, no rollouts into the file), reading every episode of the DAgger file, so it differs from the
    "equal labels" row only in the data."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from policies import aggregate_overrides, steps_overrides

    path, expert = tmp_path / "dagger.hdf5", tmp_path / "expert.hdf5"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        aggregate = compose("train", overrides=[*aggregate_overrides(path, 19, 1, 5000), "env.task=pick-place-v3"])
        bc = compose("train", overrides=[f"data.path={expert}", "data.num_demos=33", "seed=1",
                                         *steps_overrides(5000), "env.task=pick-place-v3"])
    assert "dagger" not in aggregate.callbacks
    assert aggregate.data.path == str(path) and aggregate.data.num_demos == 19 and aggregate.seed == 1
    assert aggregate.policy == bc.policy and aggregate.trainer == bc.trainer and aggregate.env == bc.env
    assert {k: v for k, v in aggregate.data.items() if k not in ("path", "num_demos")} == \
        {k: v for k, v in bc.data.items() if k not in ("path", "num_demos")}


def test_an_interrupted_bench_run_continues_in_its_own_run_dir(tmp_path):
    """bench/online_finetune.py's runs (also crafter_ellm's and policies' DAgger rows): a run killed after a
    checkpoint (a session's end) is run again in the same dir, where train.py continues its last.ckpt; a finished
    run or one without a checkpoint is not."""
    from online_finetune import train_command

    runs = tmp_path / "logs" / "flare_s0" / "runs"
    cmd, resumed = train_command("flare_s0", tmp_path, ["seed=0"], 1)
    assert not resumed and not any(c.startswith("hydra.run.dir=") for c in cmd) and "seed=0" in cmd
    (runs / "2026-01-01_00-00-00").mkdir(parents=True)  # started, killed before its first checkpoint
    assert train_command("flare_s0", tmp_path, [], 1)[1] is False
    for ts in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        (runs / ts / "checkpoints").mkdir(parents=True, exist_ok=True)
        (runs / ts / "checkpoints" / "last.ckpt").write_bytes(b"")
    cmd, resumed = train_command("flare_s0", tmp_path, [], 1)
    assert resumed and cmd[-1] == f"hydra.run.dir={runs / '2026-01-02_00-00-00'}"  # the newest attempt
    (runs / "2026-01-02_00-00-00" / "summary.json").write_text("{}")  # it finished: nothing to continue
    assert train_command("flare_s0", tmp_path, [], 1)[1] is False


def test_the_fine_tuning_bench_starts_rows_from_bc_only_where_they_need_it(tmp_path, monkeypatch):
    """bench/online_finetune.py: PPO from scratch trains no BC run of its own; a row from BC starts from that
    seed's BC checkpoint (init_from), and its run name carries the BC steps."""
    import online_finetune

    started: dict[str, list[str]] = {}

    def fake_run(name, root, overrides, threads):
        started[name] = overrides
        return {"rollout/success_rate": 0.0, "last_checkpoint": f"{name}.ckpt", "metrics": {}, "process_wall_s": 1.0,
                "output_dir": str(tmp_path / name / "runs" / "x")}

    monkeypatch.setattr(online_finetune, "run", fake_run)
    args = ["--root", str(tmp_path), "--seeds", "3", "--ppo-steps", "8", "--out", str(tmp_path / "t.md")]
    monkeypatch.setattr(sys, "argv", ["online_finetune.py", *args, "--rows", "scratch"])
    online_finetune.main()
    assert list(started) == ["scratch_pick-place-v3_d35_u8_s3"]
    assert not any(o.startswith("init_from=") for o in started["scratch_pick-place-v3_d35_u8_s3"])
    started.clear()
    monkeypatch.setattr(sys, "argv", ["online_finetune.py", *args, "--rows", "flare"])
    online_finetune.main()
    assert list(started) == ["bc_pick-place-v3_d35_k1000_s3", "flare_pick-place-v3_d35_k1000_u8_s3"]
    assert "init_from=bc_pick-place-v3_d35_k1000_s3.ckpt" in started["flare_pick-place-v3_d35_k1000_u8_s3"]


def test_the_crafter_bench_keeps_finished_runs_in_the_repository_and_reuses_them(tmp_path, monkeypatch):
    """bench/crafter_ellm.py outlives a machine: a finished run's results go to its record (summary and the score
    curves, not the whole metrics.csv), a later bench on a fresh machine reuses the record without training, and a
    record made with other overrides is refused by name."""
    import crafter_ellm

    calls = []

    def fake_run(name, root, overrides, threads):
        calls.append(name)
        return {"rollout/crafter_score": 1.5, "process_wall_s": 60.0,
                "metrics": {"rollout/crafter_score": [[10, 1.0], [20, 1.5]], "train/entropy": [[1, 2.8]]}}

    monkeypatch.setattr(crafter_ellm, "run", fake_run)
    records = tmp_path / "records"
    first = crafter_ellm.recorded_run("crafter_crafter_8_s0", tmp_path / "a", ["seed=0"], 1, records)
    assert calls == ["crafter_crafter_8_s0"] and first["metrics"] == {"rollout/crafter_score": [[10, 1.0], [20, 1.5]]}
    again = crafter_ellm.recorded_run("crafter_crafter_8_s0", tmp_path / "fresh", ["seed=0"], 1, records)
    assert calls == ["crafter_crafter_8_s0"] and again == first
    with pytest.raises(ValueError, match="crafter_crafter_8_s0.json.*seed=1"):
        crafter_ellm.recorded_run("crafter_crafter_8_s0", tmp_path / "fresh", ["seed=1"], 1, records)


def test_the_crafter_bench_tables_and_plots_come_from_the_records_alone(tmp_path, monkeypatch):
    """A fresh machine holding only the records (no run dirs) writes the bench's tables and learning curves:
    the mean Crafter score over seeds, every achievement's rate, the score by evaluation."""
    import json

    import crafter_ellm

    from toolkit.envs.crafter import ACHIEVEMENTS

    records = tmp_path / "records"
    records.mkdir()
    for key, extra in (("crafter", []), ("rnd", ["intrinsic=rnd"])):
        for seed, score in ((0, 1.0), (1, 3.0)):
            name = f"crafter_{key}_2048_s{seed}"
            summary = {"rollout/crafter_score": score + (key == "rnd"), "rollout/achievements_unlocked": 4.0,
                       "env/achievements_unlocked": 9.0, "rollout/return": 1.0, "rollout/episode_length": 150.0,
                       "env/steps_per_s": 100.0, "process_wall_s": 60.0,
                       **{f"rollout/achievement/{a}": float(a == "collect_wood") * (seed + 1) / 2 for a in ACHIEVEMENTS},
                       "metrics": {"rollout/crafter_score": [[15, score / 2], [31, score]],
                                   "env/achievements_unlocked": [[10, 5.0], [31, 9.0]]}}
            overrides = ["experiment=crafter_ppo", "trainer.max_steps=32", "trainer.val_check_interval=8",
                         "callbacks.rollout.num_episodes=20", f"seed={seed}", *extra]
            (records / f"{name}.json").write_text(json.dumps({"overrides": overrides, "summary": summary}))
    out = tmp_path / "crafter_ellm.md"
    monkeypatch.setattr(sys, "argv", ["crafter_ellm.py", "--root", str(tmp_path / "fresh"), "--seeds", "0", "1",
                                      "--env-steps", "2048", "--setups", "crafter", "rnd", "--no-speed",
                                      "--records", str(records), "--out", str(out)])
    crafter_ellm.main()
    table = out.read_text()
    assert "| PPO, Crafter's reward | 0, 1 | 2.00 (1.41) |" in table and "| PPO + RND | 0, 1 | 3.00 (1.41) |" in table
    assert "| collect_wood | 75% | 75% |" in table and "| collect_coal | 0% | 0% |" in table
    assert "- PPO, Crafter's reward: 15: 1.00, 31: 2.00" in table
    plots = tmp_path / "crafter_ellm_plots"
    assert (plots / "rollout_crafter_score_curves.png").is_file() and (plots / "env_achievements_unlocked_curves.png").is_file()
    assert not (tmp_path / "fresh" / "logs").exists()  # nothing was trained

    # --records-only: a bench half done (seed 2 never ran, ELLM not at all) tables what it has and names the rest
    (records / "crafter_rnd_2048_s1.json").unlink()
    monkeypatch.setattr(sys, "argv", ["crafter_ellm.py", "--root", str(tmp_path / "fresh"), "--seeds", "0", "1", "2",
                                      "--env-steps", "2048", "--setups", "crafter", "rnd", "ellm", "--no-speed",
                                      "--records-only", "--records", str(records), "--out", str(out)])
    crafter_ellm.main()
    table = out.read_text()
    assert "| PPO, Crafter's reward | 0, 1 | 2.00 (1.41) |" in table and "| PPO + RND | 0 | 2.00 (n/a) |" in table
    assert "ELLM" not in table.split("Not run yet")[0]
    assert ("Not run yet (no record in records/): crafter_crafter_2048_s2, crafter_rnd_2048_s1, crafter_rnd_2048_s2, "
            "crafter_ellm_2048_s0, crafter_ellm_2048_s1, crafter_ellm_2048_s2") in table
    assert not (tmp_path / "fresh" / "logs").exists()


def test_the_takeover_bench_hands_the_episode_to_the_expert_at_the_named_step():
    """bench/dagger_takeover.py: the policy acts for exactly the first ``handover`` steps, the expert after (on
    the real pick-place-v3 with its scripted expert)."""
    from dagger_takeover import takeover_episode

    from toolkit.envs.metaworld import MetaWorldEnv

    class StandStill:
        calls = 0

        def reset(self):
            pass

        def act(self, obs):
            self.calls += 1
            return np.zeros((1, 4), np.float32)

    env = MetaWorldEnv("pick-place-v3", image_size=32, max_episode_steps=150)
    try:
        for handover, succeeds in [(0, True), (20, True), (150, False)]:
            policy = StandStill()
            assert takeover_episode(policy, env, 1_000_000, handover) == (succeeds, False)
            assert policy.calls == handover
    finally:
        env.close()


def test_the_sprint_bench_pools_unseen_chains_by_episodes():
    """The SPRINT bench's last column is the success over all episodes of unseen missions of 2+ clauses: the seen
    missions and the single unseen clauses stay out, and cells weigh by their number of episodes."""
    from babyai_language import unseen_chain_success

    def row(category, clauses, episodes, success_rate):
        return {(category, clauses): {"category": category, "clauses": clauses, "episodes": episodes,
                                      "success_rate": success_rate}}

    rows = {**row("seen", 2, 20, 1.0), **row("unseen combination", 1, 20, 1.0), **row("unseen combination", 2, 10, 0.5),
            **row("longer chain", 3, 30, 0.1)}
    assert unseen_chain_success(rows) == pytest.approx((5 + 3) / 40)


def test_teacher_forced_replay_scores_the_policy_on_the_bots_own_episodes(tmp_path):
    """``babyai_failures.py --teacher-forced``: the bot acts (its episodes are the demos it would collect from
    those seeds), and each step is scored by the policy's cross-entropy on the bot's action."""
    import h5py
    from minigrid.core.actions import Actions

    from babyai_failures import mission_targets, shortest_path_actions, teacher_forced
    from conftest import run_train
    from toolkit.envs.vector import make_env
    from toolkit.eval import load_for_eval

    run_train("env=babyai", "env.level=GoToLocal", "env.image_size=16", "env.symbolic=true", "data.num_demos=3",
              "data.obs_keys=[state]", "state_encoder=babyai_film", "policy.state_encoder.channels=8",
              "policy.trunk=gru", "data.horizon=1", "policy.augment_shift=0", root=tmp_path)
    policy, env_cfg = load_for_eval(next(tmp_path.glob("logs/debug/runs/*/checkpoints/last.ckpt")))
    env = make_env(env_cfg)
    with h5py.File(next(tmp_path.glob("data/*.hdf5"))) as f:
        for name in ("demo_0", "demo_1", "demo_2"):
            demo = f["data"][name]
            rows = teacher_forced(policy, env, int(demo.attrs["seed"]))
            assert [r["bot"] for r in rows] == [Actions(int(a)).name for a in demo["actions"][:, 0]]
            assert [r["step"] for r in rows] == list(range(len(rows)))
            for r in rows:  # the most likely action has probability >= 1/7
                assert r["ce"] >= 0 and (not r["agrees"] or r["ce"] <= np.log(7) + 1e-5)
                # a move off the target's shortest paths is scored against the share of such moves that head elsewhere
                if r["off_toward_other"] is not None:
                    assert not r["policy_shortest"] and 0 <= r["chance_toward_other"] <= 1
                    assert r["chance_toward_other"] > 0 or not r["off_toward_other"]
            # the mission's targets are every object of its colour and type in the room, counted from the grid
            env.reset(seed=int(demo.attrs["seed"]))
            mission = env.instruction()
            targets = mission_targets(env)
            objects = [env._env.grid.get(int(x), int(y)) for x, y in targets]
            kinds = {(o.color, o.type) for o in objects}
            assert len(kinds) == 1 and all(word in mission for word in next(iter(kinds)))
            color, kind = next(iter(kinds))
            grid = [o for o in env._env.grid.grid if o is not None and (o.color, o.type) == (color, kind)]
            assert len(targets) == len(grid) == rows[0]["targets"] >= 1
            # following shortest-path actions faces a target, in no more steps than the bot (which explores)
            steps, done, reward = 0, False, 0.0
            while not done:
                _, reward, terminated, truncated, _ = env.step(np.array([min(shortest_path_actions(env))]))
                steps, done = steps + 1, terminated or truncated
            assert reward > 0 and steps <= len(rows)
    env.close()


@pytest.mark.parametrize("history", [5, 12, 64])
def test_babyai_update_speed_counts_the_labels_the_windows_score(tiny_file, history):
    """bench/babyai_update_speed.py's labels per window (from episode lengths) are the steps the datamodule's
    training windows score with data.label_every_step, per window."""
    import h5py
    from babyai_update_speed import labels_per_window

    from toolkit.datamodules.episode_file import episode_names, split_masks
    from toolkit.datamodules.windows import WindowDataset

    with h5py.File(tiny_file) as f:
        train = split_masks(episode_names(f))["train"]
    windows = WindowDataset(tiny_file, train, ["state"], history=history, horizon=1, label_every_step=True)
    scored = windows[np.arange(len(windows))]["step_scored"].sum().item()
    assert labels_per_window(tiny_file, 3, history) == pytest.approx(scored / len(windows))
