"""Online IQL (policy=iql_online): the replay buffer's bound and offline/online mixing, the transitions it stores
from the envs, batches in offline IQL's format, and train.py from an offline IQL checkpoint."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_train, sample_twice
from toolkit.encoders.impala import ImpalaEncoder
from toolkit.errors import ToolkitError
from toolkit.policies.iql_online import IQLOnline, ReplayBuffer

ENV = {"_target_": "toolkit.envs.metaworld.MetaWorldEnv", "task": "drawer-open-v3", "image_size": 32,
       "max_episode_steps": 5}
TINY = ["env.image_size=32", "env.max_episode_steps=6", "policy.d_model=16", "policy.num_layers=1",
        "policy.num_heads=2", "policy.hidden_dim=32", "encoder.channels=[4,8]", "encoder.num_blocks=1",
        "encoder.out_dim=16"]


# --- the buffer -----------------------------------------------------------------------------------
def rows(ids, t: int = 2) -> dict[str, torch.Tensor]:
    """Rows whose every field encodes the transition's id (negative ids: offline)."""
    ids = torch.as_tensor(ids, dtype=torch.float32)
    return {"obs/state": ids[:, None, None].expand(-1, t, 3).clone(), "next/state": ids[:, None].expand(-1, 3).clone(),
            "obs_is_pad": torch.zeros(len(ids), t, dtype=torch.bool), "action": ids[:, None].expand(-1, 2).clone(),
            "reward": ids.clone(), "done": torch.zeros(len(ids))}


def test_minibatches_mix_offline_and_online_by_the_ratio():
    buffer = ReplayBuffer(100, offline_ratio=0.25, generator=torch.Generator().manual_seed(0))
    buffer.add_offline(rows(-1 - torch.arange(40)))
    assert buffer.split(16) == (16, 0)  # nothing online yet: all offline
    buffer.add(rows(torch.arange(5)))
    assert buffer.split(16) == (11, 5)  # fewer online transitions than their share: all of them, the rest offline
    buffer.add(rows(torch.arange(5, 30)))
    for _ in range(20):
        reward = buffer.sample(16)["reward"]
        assert int((reward < 0).sum()) == 4 and int((reward >= 0).sum()) == 12  # exactly 0.25 offline
    assert set(buffer.sample(16)["reward"][4:].tolist()) <= set(map(float, range(30)))
    # null: uniform over everything stored (IQL paper's single buffer): online share ~ 30 / 70
    uniform = ReplayBuffer(100, offline_ratio=None, generator=torch.Generator().manual_seed(0))
    uniform.add_offline(rows(-1 - torch.arange(40)))
    uniform.add(rows(torch.arange(30)))
    share = torch.cat([uniform.sample(64)["reward"] for _ in range(200)]).ge(0).float().mean()
    assert abs(float(share) - 30 / 70) < 0.02
    ends = ReplayBuffer(100, offline_ratio=1.0)
    ends.add_offline(rows(-1 - torch.arange(40)))
    ends.add(rows(torch.arange(30)))
    assert ends.split(16) == (16, 0)
    ends.offline_ratio = 0.0
    assert ends.split(16) == (0, 16)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(capacity=st.integers(2, 40), offline=st.integers(0, 39), chunks=st.lists(st.integers(1, 25), max_size=8),
       ratio=st.sampled_from([None, 0.0, 0.3, 0.5, 1.0]), batch=st.integers(1, 20))
def test_buffer_is_bounded_keeps_the_file_and_drops_the_oldest_online(capacity, offline, chunks, ratio, batch):
    buffer = ReplayBuffer(capacity, offline_ratio=ratio, generator=torch.Generator().manual_seed(1))
    if offline >= capacity:
        with pytest.raises(ToolkitError, match="replay_size"):
            buffer.add_offline(rows(-1 - torch.arange(offline)))
        return
    if offline:
        buffer.add_offline(rows(-1 - torch.arange(offline)))
    added = 0
    for n in chunks:
        buffer.add(rows(torch.arange(added, added + n)))
        added += n
        assert len(buffer) <= capacity and buffer.n_offline == offline
        kept = buffer.data["reward"][offline:offline + buffer.n_online]
        # the newest online transitions, each once; the offline ones untouched
        assert sorted(kept.tolist()) == list(map(float, range(max(0, added - (capacity - offline)), added)))
        assert buffer.data["reward"][:offline].tolist() == (-1 - torch.arange(offline)).float().tolist()
    if not len(buffer):
        return
    off, on = buffer.split(batch)
    assert off + on == batch and (off == 0 or buffer.n_offline) and (on == 0 or buffer.n_online)
    if buffer.n_online and buffer.n_offline and ratio is not None:
        assert on == min(batch - round(ratio * batch), buffer.n_online)
    reward = buffer.sample(batch)["reward"]
    assert len(reward) == batch
    assert set(reward.tolist()) <= set(buffer.data["reward"][:len(buffer)].tolist())


def test_batch_rebuilds_the_next_window_from_the_window_and_the_next_step():
    buffer = ReplayBuffer(10)
    r = rows([7.0, 8.0], t=3)
    r["obs/state"][0] = torch.tensor([[1.0] * 3, [2.0] * 3, [3.0] * 3])
    r["next/state"][0] = 4.0
    r["obs_is_pad"][0] = torch.tensor([True, False, False])
    buffer.add(r)
    batch = buffer.batch(torch.tensor([0]))
    assert batch["next_obs"]["state"][0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert batch["next_obs_is_pad"][0].tolist() == [False, False, False]
    assert batch["action"].shape == (1, 1, 2) and batch["action_is_pad"].shape == (1, 1)


# --- with the simulator ---------------------------------------------------------------------------
class RecordingStepper:
    """An EnvStepper that keeps every transition it returned."""

    def __init__(self, stepper) -> None:
        self.stepper, self.transitions = stepper, []

    def step(self, action_fn):
        tr = self.stepper.step(action_fn)
        self.transitions.append(tr)
        return tr


def make_policy(dm, **kwargs) -> IQLOnline:
    torch.manual_seed(0)
    encoder = ImpalaEncoder(image_size=32, channels=(4, 4), num_blocks=1, out_dim=8, freeze=kwargs.pop("freeze", False))
    defaults = dict(optimizer=partial(torch.optim.Adam), history=2, horizon=1, d_model=16, num_heads=2, num_layers=1,
                    hidden_dim=32, batch_size=8, env_steps_per_update=7, updates_per_cycle=3)
    return IQLOnline(encoder, dm.shape_meta, dm.stats, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """3 drawer-open episodes of 5 steps (32 px) and the offline IQL batches of them (horizon 1)."""
    from toolkit.collect import collect
    from toolkit.datamodules.episode_datamodule import EpisodeDataModule

    path = tmp_path_factory.mktemp("data") / "tiny.hdf5"
    collect(ENV, path, num_episodes=3, num_envs=1, only_success=False, progress=False)
    dm = EpisodeDataModule(str(path), history=2, horizon=1, batch_size=8)
    dm.transitions = True
    dm.setup("fit")
    return path, dm


def test_online_batches_store_the_envs_transitions_in_iql_batches(offline):
    from toolkit.envs.stepper import EnvStepper

    path, dm = offline
    policy = make_policy(dm)
    policy.replay = policy.make_replay_buffer(path, None, 200, ENV)
    assert policy.replay.n_offline == 15 and policy.replay.n_online == 0
    stepper = RecordingStepper(EnvStepper(ENV, 1, seed=500_000))
    try:
        batches = list(policy.online_batches(stepper))
        # an evaluation between cycles (the rollout callback) resets and fills the policy's own histories ...
        policy.reset()
        policy.act({k: np.repeat(v, 2, 0) for k, v in stepper.transitions[0]["obs"].items()})
        policy.collect(stepper, 1)
    finally:
        stepper.stepper.close()
    replay, trs = policy.replay, stepper.transitions
    assert len(batches) == 3 and replay.n_online == 8 and len(trs) == 8
    # ... the training env's episode goes on with its own history
    assert not replay.data["obs_is_pad"][22].any()
    assert torch.equal(replay.data["obs/rgb_corner4"][22, 0], replay.data["obs/rgb_corner4"][21, 1])
    on = {k: v[15:23] for k, v in replay.data.items()}
    # the action the env received, its reward; a time limit is not done (V(s') bootstraps)
    assert torch.equal(on["action"], torch.as_tensor(np.concatenate([t["action"] for t in trs])).float())
    assert on["reward"].tolist() == pytest.approx([float(t["reward"][0]) for t in trs])
    assert [bool(t["truncated"][0]) for t in trs] == [False] * 4 + [True, False, False, False]
    assert on["done"].tolist() == [0.0] * 8
    # windows as the dataset pads them; the next window is the following step's window within an episode
    assert on["obs_is_pad"][:, 0].tolist() == [True, False, False, False, False, True, False, False]
    batch = replay.batch(torch.arange(15, 23))
    for i in (0, 1, 2, 3, 5, 6):
        for k in ("rgb_corner4", "state"):
            assert torch.equal(batch["next_obs"][k][i], batch["obs"][k][i + 1])
    # the episode's last step: its next observation is the env's final one, not the next episode's first
    final = torch.as_tensor(trs[4]["next_obs"]["rgb_corner4"][0]).permute(2, 0, 1)
    assert torch.equal(batch["next_obs"]["rgb_corner4"][4, -1], final)
    assert not torch.equal(final, batch["obs"]["rgb_corner4"][5, -1])
    # the batch format of offline IQL (windows.py with transitions, horizon 1), and its loss runs on it
    reference = next(iter(dm.train_dataloader()))
    for b in batches:
        assert b.keys() == reference.keys() and b["obs"].keys() == reference["obs"].keys()
        for key in ("obs", "next_obs"):
            for k, v in b[key].items():
                assert v.shape[1:] == reference[key][k].shape[1:] and v.dtype == reference[key][k].dtype
        for key in ("obs_is_pad", "next_obs_is_pad", "action", "action_is_pad", "reward", "done"):
            assert b[key].shape[1:] == reference[key].shape[1:] and b[key].dtype == reference[key].dtype
        assert len(b["reward"]) == 8
    losses = policy.compute_loss(batches[0])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert policy.q.weights[0].grad is not None and policy.actor[0].weight.grad is not None


def test_frozen_encoder_stores_features_and_discrete_language_actions(offline, tmp_path):
    """A frozen encoder: both parts hold float16 features (the file's from its feature cache). BabyAI: sampled
    action indices, instruction embeddings per row (each instruction embedded once)."""
    from toolkit.collect import collect
    from toolkit.datamodules.episode_datamodule import EpisodeDataModule
    from toolkit.envs.stepper import EnvStepper

    path, dm = offline
    policy = make_policy(dm, freeze=True)
    policy.replay = policy.make_replay_buffer(path, 2, 100, ENV)
    assert policy.replay.n_offline == 10 and policy.replay.data["obs/rgb_corner4_features"].dtype == torch.float16
    stepper = EnvStepper(ENV, 1, seed=500_000)
    try:
        batch = next(iter(policy.online_batches(stepper)))
    finally:
        stepper.close()
    assert batch["obs"]["rgb_corner4_features"].shape == (8, 2, 1, 8) and "rgb_corner4" not in batch["obs"]
    assert torch.isfinite(policy.compute_loss(batch)["loss"])

    class FakeLanguage:  # a fixed embedding per string; records what it was asked to embed
        out_dim = 6

        def __init__(self) -> None:
            self.seen = []

        def encode(self, texts):
            self.seen.extend(texts)
            return torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts])

    env = {"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToLocal", "image_size": 16, "max_episode_steps": 4}
    babyai = tmp_path / "babyai.hdf5"
    collect(env, babyai, num_episodes=2, num_envs=1, only_success=False, progress=False)
    bdm = EpisodeDataModule(str(babyai), history=2, horizon=1)
    bdm.setup("fit")
    torch.manual_seed(0)
    policy = IQLOnline(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8), bdm.shape_meta, bdm.stats,
                       optimizer=partial(torch.optim.Adam), history=2, horizon=1, d_model=16, num_heads=2, num_layers=1,
                       hidden_dim=16, action_type="discrete", num_actions=7, lang_dim=6, batch_size=8,
                       env_steps_per_update=10, updates_per_cycle=1)
    policy.language = language = FakeLanguage()
    policy.replay = policy.make_replay_buffer(babyai, None, 100, env, language)
    before = len(language.seen)
    stepper = RecordingStepper(EnvStepper(env, 1, seed=500_000))
    try:
        batch = next(iter(policy.online_batches(stepper)))
    finally:
        stepper.stepper.close()
    on = {k: v[policy.replay.n_offline:len(policy.replay)] for k, v in policy.replay.data.items()}
    assert len(on["action"]) == 10 and set(on["action"][:, 0].tolist()) <= set(map(float, range(7)))
    missions = [str(t["obs"]["instruction"][0]) for t in stepper.transitions]
    assert torch.allclose(on["lang"], FakeLanguage().encode(missions))
    assert sorted(language.seen[before:]) == sorted(set(missions))  # each instruction embedded once
    assert batch["lang"].shape == (8, 6) and torch.isfinite(policy.compute_loss(batch)["loss"])


def test_offline_file_of_another_env_or_too_large_is_refused(offline):
    path, dm = offline
    policy = make_policy(dm)
    with pytest.raises(ToolkitError, match="another env"):
        policy.make_replay_buffer(path, None, 100, {**ENV, "image_size": 64})
    with pytest.raises(ToolkitError, match="replay_size=15 leaves no room"):
        policy.make_replay_buffer(path, None, 15, ENV)
    with pytest.raises(ToolkitError, match="no such file"):
        policy.make_replay_buffer(path.with_name("missing.hdf5"), None, 100, ENV)
    assert len(policy.make_replay_buffer(None, None, 10, ENV)) == 0  # data.path=null: online transitions only
    other = IQLOnline(ImpalaEncoder(image_size=32, channels=(4,), num_blocks=1, out_dim=8),
                      {**dm.shape_meta, "state_dim": 5}, {**dm.stats, "obs/state": {"mean": [0.0] * 5, "std": [1.0] * 5}},
                      optimizer=partial(torch.optim.Adam), d_model=16, num_heads=2, num_layers=1, hidden_dim=16)
    with pytest.raises(ToolkitError, match="holds other observations or actions than the policy takes"):
        other.make_replay_buffer(path, None, 100)


# --- train.py -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """An offline IQL run (debug=fast, tiny Meta-World): its last checkpoint and episode file."""
    root = tmp_path_factory.mktemp("offline")
    run_train("policy=iql", *TINY, "callbacks.rollout=null", "callbacks.best_checkpoint=null", root=root)
    (ckpt,) = root.glob("logs/debug/runs/*/checkpoints/last.ckpt")
    (data,) = root.glob("data/debug_*.hdf5")
    return ckpt, data


def test_train_fine_tunes_an_offline_iql_checkpoint_online(offline_run, tmp_path):
    from toolkit.policies.base import load_policy

    ckpt, data = offline_run
    proc = run_train("policy=iql_online", f"init_from={ckpt}", f"data.path={data}", *TINY[:2], "data.num_envs=1",
                     "policy.env_steps_per_update=3", "policy.updates_per_cycle=2", "data.replay_size=500",
                     root=tmp_path)
    assert "initialized from" in proc.stdout + proc.stderr
    (run,) = tmp_path.glob("logs/debug/runs/*")
    # the offline run's hidden_dim (32) is adopted from the checkpoint, not the config's default (256)
    assert yaml.safe_load((run / ".hydra/config.yaml").read_text())["policy"]["hidden_dim"] == 256
    assert load_policy(Path(json.loads((run / "summary.json").read_text())["last_checkpoint"])).hparams["hidden_dim"] == 32
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4 and "rollout/success_rate" in summary
    assert summary["env/steps"] >= 6  # two cycles of 3 steps of 1 env (the fetch ahead may start a third)
    import csv

    import h5py

    metrics = list(csv.DictReader((run / "csv/version_0/metrics.csv").open()))
    logged = [m for m in metrics if m.get("replay/offline")]
    with h5py.File(data) as f:  # debug=fast: data.num_demos=2, the file's first two episodes
        assert float(logged[0]["replay/offline"]) == sum(len(f[f"data/demo_{i}/actions"]) for i in range(2))
    online = [float(m["replay/online"]) for m in logged]  # grows by 3 per cycle of 2 updates
    assert online[0] == 3 and online[-1] == 6 and online == sorted(online)
    assert all(m["train/q_loss"] for m in logged)
    policy = load_policy(run / "checkpoints/last.ckpt")
    assert type(policy).__name__ == "IQLOnline" and policy.replay is None  # the buffer is not in checkpoints
    # online, every loss trains the trunk (the offline checkpoint's critic-only routing collapsed the actor)
    assert policy.hparams["encoder_updated_by"] == "all"
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(source) <= set(policy.state_dict())


EMA = ["+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", "+callbacks.ema.decay=0.5"]


def test_an_averaged_policy_is_what_rollouts_evaluate_and_checkpoints_hold(offline_run, tmp_path):
    """`+callbacks.ema` (README, Online IQL): Lightning swaps the average in for validation, and the rollout callback
    evaluates while it is in (it comes first in the trainer's list); checkpoints hold the average as the policy's
    weights and the weights being trained beside them, so eval.py and init_from read the policy that was evaluated."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from toolkit.envs.rollout import RolloutCallback
    from toolkit.policies.base import load_policy

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["policy=iql_online", f"paths.output_dir={tmp_path}", *EMA])
    GlobalHydra.instance().clear()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]  # as train.py builds them
    kinds = [type(c) for c in L.Trainer(callbacks=callbacks, logger=False).callbacks]
    assert kinds.index(RolloutCallback) < kinds.index(EMAWeightAveraging)

    ckpt, data = offline_run
    run_train("policy=iql_online", f"init_from={ckpt}", f"data.path={data}", *TINY[:2], "data.num_envs=1",
              "policy.env_steps_per_update=3", "policy.updates_per_cycle=2", "data.replay_size=500", *EMA, root=tmp_path)
    (last,) = tmp_path.glob("logs/debug/runs/*/checkpoints/last.ckpt")
    saved = torch.load(last, weights_only=True)
    averaged, trained = saved["state_dict"], saved["current_model_state"]
    moved = [k for k in trained if k.startswith("actor") and not torch.equal(averaged[k], trained[k])]
    assert moved  # 4 updates at decay 0.5: the average lags the weights being trained
    policy = load_policy(last)
    assert all(torch.equal(policy.state_dict()[k], averaged[k]) for k in moved)


def test_init_from_a_non_iql_checkpoint_or_another_env_is_refused(offline_run, offline, tmp_path):
    """What train.py calls with init_from: a BC checkpoint's weights do not fit; an env with other cameras is
    refused before anything is built."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from toolkit.envs.vector import check_env
    from toolkit.policies.bc_transformer import BCTransformer
    from toolkit.policies.init_from import adopt_checkpoint_config, load_actor_weights, read_init_checkpoint

    ckpt, _ = offline_run
    _, dm = offline
    bc = BCTransformer(ImpalaEncoder(image_size=32, channels=(4, 4), num_blocks=1, out_dim=8), dm.shape_meta, dm.stats,
                       optimizer=partial(torch.optim.Adam), history=2, horizon=1, d_model=16, num_heads=2, num_layers=1)
    with pytest.raises(ToolkitError, match=r"do not fit IQLOnline \(not in the policy: .*head"):
        load_actor_weights(make_policy(dm), {"state_dict": bc.state_dict()}, "bc.ckpt")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["policy=iql_online", f"init_from={ckpt}", "env.image_size=64"])
    GlobalHydra.instance().clear()
    with pytest.raises(ToolkitError, match="trained on other observations or actions than env"):
        adopt_checkpoint_config(cfg, read_init_checkpoint(ckpt), check_env(cfg.env), ckpt)


@pytest.mark.parametrize("reward,env_setting,forced,expected", [
    ("dense", True, None, False),  # a shaped reward: training episodes go on after success
    ("sparse", True, None, True),  # success is the reward: ending there costs nothing
    ("dense", False, None, False),
    ("dense", True, True, True),  # data.terminate_on_success forces either way
    ("sparse", True, False, False),
])
def test_training_episodes_with_a_dense_reward_go_on_after_success(reward, env_setting, forced, expected):
    """With a dense reward, an episode ending at success loses the reward of the steps it had left, so online RL
    that bootstraps at the time limit learns to hover next to the goal: the training envs go on after success
    unless told otherwise; evaluation keeps the env config as it is."""
    from omegaconf import OmegaConf

    from conftest import TINY_ENV
    from toolkit.datamodules.online import OnlineDataModule, training_env

    env = OmegaConf.create({**TINY_ENV, "reward": reward, "terminate_on_success": env_setting})
    assert training_env(env, forced)["terminate_on_success"] is expected
    assert env.terminate_on_success is env_setting  # the config itself is left alone
    dm = OnlineDataModule(env, num_envs=1, terminate_on_success=forced)
    assert dm.stepper.env_cfg["terminate_on_success"] is expected and dm.env_cfg is env
    assert training_env({"_target_": "bandit_env.BanditEnv"}, None) == {"_target_": "bandit_env.BanditEnv"}


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_evaluation_can_act_with_the_exploring_policy_reproducibly(discrete):
    """``deterministic_eval=False`` (``eval.py --sample``): act() draws from the policy the training envs explore
    with (categorical samples; the mean + exploration_noise), the same draws at every evaluation, the training
    RNG untouched; True: the actor's mode."""
    from toolkit.datamodules.online import OnlineDataModule

    env = {"_target_": "bandit_env.BanditEnv", "discrete": discrete, "num_contexts": 3}
    dm = OnlineDataModule(env, num_envs=1, seed=0)
    kwargs = {"action_type": "discrete", "num_actions": 3} if discrete else {}
    policy = make_policy(dm, history=1, deterministic_eval=False, exploration_noise=0.1, **kwargs).eval()
    states = np.tile(np.eye(3, 4, dtype=np.float32)[:1], (256, 1))  # one context, 256 envs
    first = sample_twice(policy, states)
    with torch.no_grad():
        out = policy.actor(policy.features({"state": torch.as_tensor(states[:1])[:, None]}, None))[0]
    if discrete:  # frequencies follow the actor's softmax
        freq = np.bincount(first[:, 0].astype(int), minlength=3) / len(first)
        np.testing.assert_allclose(freq, torch.softmax(out, -1).numpy(), atol=0.1)
    else:  # normalized draws spread around the mean with std exploration_noise
        z = (policy.action_norm.normalize(torch.as_tensor(first)) - out) / 0.1
        assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2
    policy.deterministic_eval = True
    policy.reset()
    assert len(np.unique(policy.act({"state": states}), axis=0)) == 1
