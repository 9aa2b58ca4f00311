"""PPO and the online spine: the losses and GAE against hand computations, the truncation bootstrap, learning a
bandit (discrete and continuous actions), init_from a BC checkpoint, the rollout feature cache, resuming a killed
online run at the same env step, and a NaN loss stopping the run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from toolkit.datamodules.online import OnlineDataModule
from toolkit.encoders.impala import ImpalaEncoder
from toolkit.envs.stepper import EnvStepper
from toolkit.errors import ToolkitError
from toolkit.policies.ppo import PPO

from conftest import ROOT, run_train, sample_twice

BANDIT = {"_target_": "bandit_env.BanditEnv"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: with 2 threads on this busy 2-core machine torch's GELU/tanh take ~15 ms a call (a thread
    wake-up each), with 1 thread 0.01 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bandit(**kwargs) -> dict:
    return {**BANDIT, **kwargs}


def make_ppo(env: dict | None = None, *, shape_meta: dict | None = None, stats: dict | None = None,
             encoder=None, seed: int = 0, **kwargs) -> PPO:
    """A small PPO: an MLP (concat trunk) on the env's state unless told otherwise."""
    if env is not None:
        dm = OnlineDataModule(env, num_envs=1, seed=0)
        shape_meta, stats = dm.shape_meta, dm.stats
        if env.get("discrete", True):
            kwargs = {"action_type": "discrete", "num_actions": env.get("num_contexts", 2), **kwargs}
    torch.manual_seed(seed)
    encoder = encoder or ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8)
    defaults = dict(optimizer=partial(torch.optim.Adam), history=1, trunk="concat", d_model=32, n_steps=8,
                    n_epochs=1, batch_size=8, lr=3e-3)
    return PPO(encoder, shape_meta, stats, **{**defaults, **kwargs})


def state_meta(state_dim: int, action_dim: int) -> tuple[dict, dict]:
    shape_meta = {"rgb_keys": [], "image_shape": {}, "state_dim": state_dim, "action_dim": action_dim}
    stats = {"obs/state": {"mean": [0.0] * state_dim, "std": [1.0] * state_dim},
             "actions": {"mean": [0.0] * action_dim, "std": [1.0] * action_dim,
                         "min": [-1.0] * action_dim, "max": [1.0] * action_dim}}
    return shape_meta, stats


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                     **kwargs)


# --- the losses, by hand ----------------------------------------------------------------------------------------
def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _mlp(seq: torch.nn.Sequential, x: np.ndarray) -> np.ndarray:
    """Linear-GELU-Linear in numpy, from the module's weights."""
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in (seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias))
    return _gelu(x @ w1.T + b1) @ w2.T + b2


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
@pytest.mark.parametrize("clip_vloss", [False, True], ids=["value", "clipped_value"])
def test_clipped_objective_value_loss_and_entropy_by_hand(discrete, clip_vloss):
    b, ds, da, n = 16, 5, 2, 3
    shape_meta, stats = state_meta(ds, 1 if discrete else da)
    extra = {"action_type": "discrete", "num_actions": n} if discrete else {}
    policy = make_ppo(shape_meta=shape_meta, stats=stats, clip_vloss=clip_vloss, ent_coef=0.03, vf_coef=0.7,
                      clip_coef=0.2, **extra).double()
    g = np.random.default_rng(0)
    state = g.normal(size=(b, 1, ds))
    action = g.integers(0, n, (b,)).astype(float) if discrete else g.normal(size=(b, da))
    # the network, by hand: concat trunk (history 1, state only) = the state; an MLP head and value head on it
    z = state[:, 0]
    out, value = _mlp(policy.head, z), _mlp(policy.value_head, z)[:, 0]
    if discrete:
        logits = out - out.max(1, keepdims=True)
        logp_all = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        logprob = logp_all[np.arange(b), action.astype(int)]
        entropy = -(np.exp(logp_all) * logp_all).sum(1)
    else:
        log_std = policy.log_std.detach().double().numpy()
        logprob = (-0.5 * ((action - out) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(1)
        entropy = np.full(b, (0.5 + 0.5 * np.log(2 * np.pi) + log_std).sum())
    # the rollout's (old) log-probabilities and values: ratios inside and outside [1 - clip, 1 + clip]
    old_logprob = logprob + g.uniform(-0.5, 0.5, b)
    old_value = value + g.uniform(-0.4, 0.4, b)
    advantage, ret = g.normal(size=b) * 2 + 0.5, g.normal(size=b)
    ratio = np.exp(logprob - old_logprob)
    assert (np.abs(ratio - 1) > 0.2).any() and (np.abs(ratio - 1) < 0.2).any()
    adv = (advantage - advantage.mean()) / (advantage.std(ddof=1) + 1e-8)
    policy_loss = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)))
    if clip_vloss:
        clipped = old_value + np.clip(value - old_value, -0.2, 0.2)
        value_loss = 0.5 * np.mean(np.maximum((value - ret) ** 2, (clipped - ret) ** 2))
    else:
        value_loss = 0.5 * np.mean((value - ret) ** 2)
    t = partial(torch.tensor, dtype=torch.float64)
    batch = {"obs": {"state": t(state)}, "action": t(action), "logprob": t(old_logprob), "value": t(old_value),
             "advantage": t(advantage), "ret": t(ret)}
    out = {k: v.item() for k, v in policy.compute_loss(batch).items()}
    assert out["policy_loss"] == pytest.approx(policy_loss, rel=1e-9)
    assert out["value_loss"] == pytest.approx(value_loss, rel=1e-9)
    assert out["entropy"] == pytest.approx(entropy.mean(), rel=1e-9)
    assert out["loss"] == pytest.approx(policy_loss - 0.03 * entropy.mean() + 0.7 * value_loss, rel=1e-9)
    assert out["clipfrac"] == pytest.approx(np.mean(np.abs(ratio - 1) > 0.2))
    assert out["approx_kl"] == pytest.approx(np.mean(ratio - 1 - np.log(ratio)), rel=1e-9)


def test_gae_matches_a_hand_loop_over_episode_ends():
    s, e, gamma, lam = 7, 3, 0.9, 0.8
    policy = make_ppo(shape_meta=state_meta(2, 1)[0], stats=state_meta(2, 1)[1], gamma=gamma, gae_lambda=lam)
    g = np.random.default_rng(1)
    reward, value, last_value = g.normal(size=(s, e)), g.normal(size=(s, e)), g.normal(size=e)
    done = np.zeros((s, e))
    done[2, 0] = done[3, 0] = done[6, 1] = done[0, 2] = 1  # a 1-step episode, an end at the last step, ...
    # by hand, forward: A_t = sum_l (gamma lam)^l delta_{t+l} over the rest of the episode that step t is in,
    # delta_t = r_t + gamma V(s_{t+1}) (0 after the episode's last step) - V(s_t); V(s_S) = last_value
    next_value = np.concatenate([value[1:], last_value[None]])
    delta = reward + gamma * next_value * (1 - done) - value
    expected = np.zeros((s, e))
    for env in range(e):
        for t in range(s):
            for u in range(t, s):
                expected[t, env] += (gamma * lam) ** (u - t) * delta[u, env]
                if done[u, env]:
                    break
    t32 = partial(torch.tensor, dtype=torch.float64)
    adv, ret = policy.gae(t32(reward), t32(value), t32(done), t32(last_value))
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(ret.numpy(), expected + value, rtol=1e-12)
    # lambda = 1: the return is the discounted reward to the episode's end, plus gamma^k V(s_S) if it goes on
    policy.gae_lambda = 1.0
    _, ret = policy.gae(t32(reward), t32(value), t32(done), t32(last_value))
    for env in range(e):
        for t in range(s):
            g_t, k = 0.0, 0
            for u in range(t, s):
                g_t += gamma ** k * reward[u, env]
                k += 1
                if done[u, env]:
                    break
            else:
                g_t += gamma ** k * last_value[env]
            assert ret[t, env].item() == pytest.approx(g_t, rel=1e-12)


def test_truncated_episodes_bootstrap_from_the_value_of_their_last_observation():
    """A time limit is not the task's end: a truncated step's reward gets gamma * V(s_T), with s_T the window
    of its true next observation (before the reset); a terminated step's does not."""
    env = bandit(max_episode_steps=3, terminal_time_limit=False)  # right action: success ends; else truncated at 3
    policy = make_ppo(env, history=2, n_steps=12, gamma=0.9)
    stepper = EnvStepper(env, num_envs=2, seed=0)
    windows, transitions, rewards = [], [], []
    sample, step, gae = policy._sample, stepper.step, policy.gae

    def recording_sample(obs, fresh, into):
        out = sample(obs, fresh, into)
        windows.append(into["obs"]["state"].clone())
        return out

    def recording_step(fn):
        transitions.append(step(fn))
        return transitions[-1]

    def recording_gae(reward, *args):
        rewards.append(reward.clone())
        return gae(reward, *args)

    policy._sample, stepper.step, policy.gae = recording_sample, recording_step, recording_gae
    try:
        list(policy.online_batches(stepper))
    finally:
        stepper.close()
    (reward,) = rewards
    truncated = np.stack([tr["truncated"] for tr in transitions])
    terminated = np.stack([tr["terminated"] for tr in transitions])
    assert truncated.any() and terminated.any()
    policy.eval()
    for t, tr in enumerate(transitions):
        for i in range(2):
            expected = tr["reward"][i]
            if truncated[t, i]:
                last = torch.as_tensor(tr["next_obs"]["state"][i], dtype=torch.float32)
                window = torch.cat([windows[t][i, 1:], last[None]])[None]  # the history, then s_T
                with torch.no_grad():
                    expected += 0.9 * policy.distribution_and_value({"state": window})[1].item()
                assert tr["next_obs"]["state"][i][-1] == 1.0  # s_T itself (t = 3 of 3), not the next reset
            assert reward[t, i].item() == pytest.approx(expected, rel=1e-6)


# --- the stepper ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("instructions", [False, True], ids=["no_instructions", "instructions"])
def test_stepper_in_process_and_in_subprocesses_step_the_same_episodes(instructions):
    """``processes=False`` (all envs in this process) gives the transitions of one process per env; instructions
    follow each new episode (and an env without any is not asked again after its first reset)."""
    env = bandit(num_contexts=3, max_episode_steps=2, terminal_time_limit=False, instructions=instructions)
    g = np.random.default_rng(0)
    actions = g.integers(0, 3, (10, 3, 1))
    runs = []
    for processes in (True, False):
        stepper = EnvStepper(env, num_envs=3, seed=10, processes=processes)
        try:
            runs.append([stepper.step(lambda obs, fresh, a=a: a) for a in actions])
        finally:
            stepper.close()
    for a, *others in zip(*runs, strict=True):
        for b in others:
            for key in ("reward", "terminated", "truncated", "success"):
                np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a["obs"]["state"], b["obs"]["state"])
            np.testing.assert_array_equal(a["next_obs"]["state"], b["next_obs"]["state"])
            contexts = a["obs"]["state"][:, :3].argmax(1)
            expected = [f"context {c}" for c in contexts] if instructions else [None] * 3
            assert list(a["obs"]["instruction"]) == list(b["obs"]["instruction"]) == expected
    assert sum(tr["terminated"].sum() + tr["truncated"].sum() for tr in runs[0]) >= 8  # episodes were reset


@pytest.mark.parametrize("crash_in", ["reset", "step"])
def test_a_simulator_that_dies_is_restarted_its_partial_episodes_dropped_and_stepping_goes_on(crash_in):
    """Env 0 plays the rewarded action (1-step episodes, seeds 13, 14, ... after the first), envs 1 and 2 a wrong one
    (3-step episodes). The process of the episode with seed 14 dies in its reset (at step 1) or at its first step
    (step 2)."""
    env = {**bandit(num_contexts=2, max_episode_steps=3, terminal_time_limit=False),
           "_target_": "bandit_env.CrashingBanditEnv", "crash_at_seed": 14, "crash_in": crash_in}
    stepper = EnvStepper(env, num_envs=3, seed=10)

    def act(obs, fresh):
        context = obs["state"][:, :2].argmax(1)
        return np.stack([context[0], 1 - context[1], 1 - context[2]])[:, None]

    transitions, restarts = [], []
    try:
        for _ in range(8):
            transitions.append(stepper.step(act))
            restarts.append(stepper.restarts)
    finally:
        stepper.close()
    assert restarts == ([0] + [1] * 7 if crash_in == "reset" else [0, 0] + [1] * 6)
    assert stepper.env_steps == 24  # the crash cost no transition: stepping went on
    if crash_in == "reset":  # step 1: env 0's episode ended, its reset died: envs 1 and 2 were 2 steps into theirs
        assert stepper.dropped_episodes == 2
        assert transitions[1]["terminated"].tolist() == [True, False, False]
        assert transitions[1]["truncated"].tolist() == [False, True, True]  # cut: ended here, not the task's end
    else:  # step 2 was retried on fresh episodes of every env (seeds 15, 16, 17)
        assert stepper.dropped_episodes == 3
        assert (transitions[2]["obs"]["state"][:, -1] == 0).all()  # each env's first observation
    lengths = [e["length"] for e in stepper.recent]
    assert sorted(set(lengths)) == [1.0, 3.0]  # only whole episodes count: the cut ones are not in the stats


# --- the online loop --------------------------------------------------------------------------------------------
def test_data_obs_keys_choose_what_a_policy_trained_from_scratch_sees():
    """``data.obs_keys=[state]`` online as offline: a from-scratch policy on BabyAI's symbolic view builds no image
    encoder input; the default sees every camera; a key the env does not give, or a list without state, is refused."""
    env = {"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToRedBall", "image_size": 16, "symbolic": True}
    every = OnlineDataModule(env, num_envs=1, seed=0)
    assert every.shape_meta["rgb_keys"] == ["rgb_top"]
    dm = OnlineDataModule(env, num_envs=1, seed=0, obs_keys=["state"])
    assert dm.shape_meta["rgb_keys"] == [] and dm.image_keys() == []
    assert dm.shape_meta["state_dim"] == every.shape_meta["state_dim"] > 100  # the one-hot symbolic view
    with pytest.raises(ToolkitError, match=r"data.obs_keys=\['rgb_wrist', 'state'\].*rgb_wrist.*rgb_top"):
        OnlineDataModule(env, num_envs=1, seed=0, obs_keys=["rgb_wrist", "state"])
    with pytest.raises(ToolkitError, match=r"data.obs_keys=\['rgb_top'\].*always read 'state'"):
        OnlineDataModule(env, num_envs=1, seed=0, obs_keys=["rgb_top"])


def test_every_update_cycle_acts_with_the_weights_of_all_updates_before_it():
    """Lightning fetches a batch ahead of the step that trains on it: the next cycle's env steps must still wait
    for the last update of the cycle before (else they act with old weights, and a checkpoint written at a cycle's
    last step counts env steps it never trained on)."""
    env = bandit()
    dm = OnlineDataModule(env, num_envs=1, seed=0, batch_size=4, history=1)
    policy = make_ppo(env, n_steps=4, n_epochs=2, batch_size=2)  # 2 minibatches x 2 epochs = 4 updates per cycle
    seen, train_step = [], policy.training_step

    def recording(batch, batch_idx):
        seen.append(dm.stepper.env_steps)
        return train_step(batch, batch_idx)

    policy.training_step = recording
    trainer(max_steps=9).fit(policy, dm)
    assert seen == [4] * 4 + [8] * 4 + [12]
    assert dm.stepper.env_steps == 12  # ceil(9 / 4) cycles of 4 steps


def test_evaluation_rollouts_between_cycles_leave_the_training_histories_alone():
    """The rollout callback runs reset/act on the same module (other envs, other count) between two update
    cycles: the training envs' observation windows must go on as if it had not."""
    env = bandit(max_episode_steps=5, terminate_on_success=False, terminal_time_limit=False)

    def windows(evaluate: bool) -> list[torch.Tensor]:
        policy = make_ppo(env, history=3, n_steps=3, batch_size=6)
        stepper = EnvStepper(env, num_envs=2, seed=0)
        torch.manual_seed(1)
        out = []
        try:
            for _ in range(3):
                out += [b["obs"]["state"] for b in policy.online_batches(stepper)]
                if evaluate:
                    policy.reset()
                    policy.act({"state": np.full((3, 3), 0.5, np.float32)})
        finally:
            stepper.close()
        return out

    for a, b in zip(windows(False), windows(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_ppo_learns_the_rewarded_action_of_a_bandit(discrete):
    env = bandit(discrete=discrete, num_contexts=2)
    dm = OnlineDataModule(env, num_envs=1, seed=0, batch_size=16, history=1)
    # continuous: once every sample is right, every reward is 1 and normalized advantages are the value's noise,
    # which makes the Gaussian's mean drift back; raw advantages are ~0 there
    policy = make_ppo(env, n_steps=32, n_epochs=4, batch_size=16, lr=1e-2, ent_coef=0.0, norm_adv=discrete)
    trainer(max_steps=160, gradient_clip_val=1.0).fit(policy, dm)
    assert dm.stepper.env_steps == 160 // 8 * 32  # one cycle of 32 env steps per 8 updates
    env_obj = __import__("bandit_env").BanditEnv(**{k: v for k, v in env.items() if k != "_target_"})
    policy.eval()
    states = np.eye(2, 3, dtype=np.float32)  # contexts 0 and 1, at t = 0
    with torch.no_grad():
        dist, _ = policy.distribution_and_value({"state": torch.as_tensor(states)[:, None]})
        samples = dist.sample((1000,))  # [1000, contexts(, dims)]
    for c in range(2):
        env_obj.context = c
        if discrete:
            picked = [env_obj.right(np.array([a])) for a in samples[:, c].numpy()]
        else:
            picked = [env_obj.right(a) for a in policy.unnormalize_action(samples[:, c]).numpy()]
        assert np.mean(picked) > 0.9, (c, np.mean(picked))
        policy.reset()
        assert env_obj.right(policy.act({"state": states[c:c + 1]})[0])  # the deterministic action too
    assert dm.stepper.episode_stats()["success"] > 0.9  # and the last 100 training episodes


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_evaluation_can_sample_the_policy_reproducibly_without_touching_the_training_rng(discrete):
    """``deterministic_eval=False``: act() samples the policy (not its mode), the same samples at every evaluation
    (its generator is reseeded when an evaluation starts), and training's torch RNG is left as it was."""
    env = bandit(discrete=discrete, num_contexts=2)
    policy = make_ppo(env, deterministic_eval=False).eval()
    states = np.tile(np.eye(2, 3, dtype=np.float32)[:1], (256, 1))  # one context, 256 envs
    first = sample_twice(policy, states)
    with torch.no_grad():
        dist, _ = policy.distribution_and_value({"state": torch.as_tensor(states[:1])[:, None]})
    if discrete:  # the sampled actions' frequencies follow the policy's probabilities, not its argmax alone
        freq = np.bincount(first[:, 0].astype(int), minlength=2) / len(first)
        np.testing.assert_allclose(freq, dist.probs[0].numpy(), atol=0.1)
        assert len(set(first[:, 0].tolist())) == 2
    else:  # normalized samples spread around the mean with the policy's std
        z = (policy.action_norm.normalize(torch.as_tensor(first)) - dist.mean) / dist.stddev
        assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2
    policy.deterministic_eval = True
    policy.reset()
    assert len(np.unique(policy.act({"state": states}), axis=0)) == 1  # the mode: one action for one context


# --- through train.py -------------------------------------------------------------------------------------------
# PPO on the bandit: 2 envs x 8 steps = 16 env steps per cycle, 2 minibatches x 2 epochs = 4 updates per cycle
ONLINE = ["policy=ppo", "env=none", "+env._target_=bandit_env.BanditEnv", "data.num_envs=2", "policy.n_steps=8",
          "data.batch_size=8", "policy.n_epochs=2", "trainer.val_check_interval=1000", "num_threads=1"]


def summary_of(root: Path) -> dict:
    return json.loads(sorted(Path(root, "logs", "debug", "runs").glob("*/summary.json"))[-1].read_text())


def test_rollout_at_start_evaluates_the_initial_policy_at_step_zero(tmp_path):
    """``callbacks.rollout.at_start=true``: the policy before any update is evaluated too (the summary's
    ``rollout_at_start/*``, a step-0 row in the logs), as well as at the end."""
    import csv

    run_train(*ONLINE, "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.rollout.at_start=true",
              "callbacks.rollout.num_episodes=4", root=tmp_path)
    summary = summary_of(tmp_path)
    assert 0.0 <= summary["rollout_at_start/success_rate"] <= 1.0 and 0.0 <= summary["rollout/success_rate"] <= 1.0
    (metrics,) = Path(summary["output_dir"]).glob("csv/version_*/metrics.csv")
    steps = [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("rollout/success_rate")]
    assert steps == [0, 3]  # before the first update, and after the 4th (Lightning logs it at step index 3)


def test_killed_online_run_resumes_at_the_same_env_step(tmp_path):
    """SIGKILL after a checkpoint written in the middle of an update cycle, then resume=true: the same global
    step, the env step count of the checkpoint, the rest of that cycle's updates, then new cycles; the run ends
    with as many env steps as a run never interrupted."""
    common = [*ONLINE, "trainer.max_steps=16", "callbacks.last_checkpoint.every_n_train_steps=5"]
    killed = tmp_path / "killed"
    proc = run_train(*common, "+callbacks.kill._target_=bandit_env.KillAtStep", "+callbacks.kill.step=7",
                     root=killed, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (last,) = Path(killed, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 5
    # Lightning keeps LightningDataModule.state_dict() under the class's qualified name
    assert ckpt["OnlineDataModule"]["stepper"]["env_steps"] == 32  # cycle 2 was collected for update 5, not 3
    cycle = ckpt["ppo_cycle"]  # cycle 2, after its first minibatch
    assert (cycle["epoch"], cycle["start"], len(cycle["data"]["action"])) == (0, 8, 16)
    proc = run_train(*common, "resume=true", root=killed)
    assert f"resuming from {last}" in proc.stdout + proc.stderr
    resumed = summary_of(killed)
    assert resumed["global_step"] == 16 and resumed["trained_steps"] == 11
    # a run never interrupted steps the envs once per cycle: ceil(16 / 4) cycles of 16 (the count
    # test_every_update_cycle_acts_with_the_weights_of_all_updates_before_it checks in process)
    assert resumed["env/steps"] == 64


def test_two_process_ddp_online_run_stays_in_sync_on_its_own_envs_and_resumes(tmp_path):
    """``trainer=ddp`` (2 CPU processes, gloo): each process steps its own envs on its own training seeds, the
    updates keep one set of weights, and ``resume=true`` continues the run."""
    common = [*ONLINE, "trainer=ddp", "callbacks.last_checkpoint.every_n_train_steps=4",
              "+callbacks.ddp_probe._target_=ddp_probe.DDPProbe", f"+callbacks.ddp_probe.path={tmp_path}/ddp_probe.json"]
    proc = run_train(*common, "trainer.max_steps=8", root=tmp_path)
    assert proc.stdout.count("run summary") == 1  # from rank 0
    probe = json.loads((tmp_path / "ddp_probe.json").read_text())
    assert probe["world_size"] == 2 and probe["global_step"] == 8
    a, b = probe["param_sums"]
    assert a == pytest.approx(b, rel=1e-9)  # the same weights in both processes after 8 updates
    assert probe["batches"][0] != probe["batches"][1]  # each process trained on its own envs' transitions
    assert summary_of(tmp_path)["env/steps"] == 32  # rank 0's envs: 2 cycles of 2 envs x 8 steps
    run_train(*common, "trainer.max_steps=12", "resume=true", root=tmp_path)
    assert json.loads((tmp_path / "ddp_probe.json").read_text())["global_step"] == 12


def test_optuna_search_over_an_online_policy(tmp_path):
    """``hparams_search=ppo_optuna``: each trial trains PPO online and is scored by its rollout success."""
    import yaml

    run_train("-m", *ONLINE, "hparams_search=ppo_optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=4",
              "trainer.val_check_interval=4", root=tmp_path)
    sweep = next(Path(tmp_path, "logs", "debug", "multiruns").glob("*"))
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and 0.0 <= result["best_value"] <= 1.0
    assert set(result["best_params"]) == {"policy.lr", "policy.ent_coef", "policy.clip_coef"}
    summaries = [json.loads(s.read_text()) for s in sweep.glob("[0-9]*/summary.json")]
    assert len(summaries) == 2 and all(s["env/steps"] == 16 for s in summaries)  # 4 updates: one cycle each
    lrs = {torch.load(s["last_checkpoint"], weights_only=True)["hyper_parameters"]["lr"] for s in summaries}
    assert len(lrs) == 2 and all(1e-6 <= lr <= 1e-3 for lr in lrs)


def test_target_kl_ends_a_cycle_early():
    env = bandit()
    dm = OnlineDataModule(env, num_envs=1, seed=0, batch_size=2, history=1)
    policy = make_ppo(env, n_steps=4, n_epochs=2, batch_size=2, target_kl=1e-9)  # 4 updates per cycle, unless
    trainer(max_steps=6).fit(policy, dm)
    # the first minibatch of a cycle has KL 0 (the rollout's weights); after one update it exceeds 1e-9
    assert dm.stepper.env_steps == 3 * 4


def test_critic_warmup_updates_the_critic_alone_then_both():
    env = bandit()
    dm = OnlineDataModule(env, num_envs=1, seed=0, batch_size=4, history=1)
    policy = make_ppo(env, n_steps=4, n_epochs=1, batch_size=4, separate_critic=True, critic_warmup_steps=3)
    actor = {k: v.clone() for k, v in policy.head.state_dict().items()}
    critic = {k: v.clone() for k, v in policy.value_head.state_dict().items()}
    trainer(max_steps=3).fit(policy, dm)  # the 3 warm-up updates
    for k, v in policy.head.state_dict().items():
        torch.testing.assert_close(v, actor[k], rtol=0, atol=0)
    assert any(not torch.equal(v, critic[k]) for k, v in policy.value_head.state_dict().items())
    policy.critic_warmup_steps = 0  # (a fresh trainer counts from update 0 again)
    trainer(max_steps=1).fit(policy, dm)
    assert any(not torch.equal(v, actor[k]) for k, v in policy.head.state_dict().items())


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
def test_bc_kl_penalty_is_the_kl_to_the_loaded_policy_by_hand_and_pulls_back_to_it(discrete):
    """``bc_kl_coef``: load_actor_weights makes the loaded actor the reference; the penalty is
    KL(policy || reference) on the minibatch's states (0 before any update), added to the loss with its weight."""
    from toolkit.policies.init_from import load_actor_weights

    env = bandit(discrete=discrete, num_contexts=3)
    bc = make_ppo(env, seed=1)  # stands in for the BC checkpoint: its actor's weights
    ckpt = {"state_dict": {k: v for k, v in bc.state_dict().items() if k.startswith(("trunk.", "head.", "encoder."))}}
    policy = make_ppo(env, seed=2, bc_kl_coef=0.5)
    with pytest.raises(ToolkitError, match="init_from"):
        trainer(max_steps=1).fit(policy, OnlineDataModule(env, num_envs=1, seed=0, batch_size=8, history=1))
    load_actor_weights(policy, ckpt, "bc.ckpt")
    g = torch.Generator().manual_seed(0)
    n, state_dim = 8, policy.state_dim
    batch = {"obs": {"state": torch.randn(n, 1, state_dim, generator=g)},
             "action": torch.randint(0, 3, (n,), generator=g) if discrete else torch.randn(n, policy.action_dim, generator=g),
             "logprob": torch.zeros(n), "value": torch.zeros(n), "advantage": torch.randn(n, generator=g),
             "ret": torch.zeros(n)}
    assert float(policy.compute_loss(batch)["bc_kl"]) == 0.0
    with torch.no_grad():
        reference, _ = policy.distribution_and_value(batch["obs"])
        policy.head[-1].bias[0] += 0.5  # one logit, one mean: a shift of all logits would not change a categorical
        if not discrete:
            policy.log_std.add_(0.2)
    losses = policy.compute_loss(batch)
    dist, _ = policy.distribution_and_value(batch["obs"])
    if discrete:
        p, q = dist.probs, reference.probs
        by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    else:
        mu, sd, mu0, sd0 = dist.mean, dist.stddev, reference.mean, reference.stddev
        by_hand = (torch.log(sd0 / sd) + (sd ** 2 + (mu - mu0) ** 2) / (2 * sd0 ** 2) - 0.5).sum(-1).mean()
    torch.testing.assert_close(losses["bc_kl"], by_hand)
    policy.bc_kl_coef = 0.0
    plain = policy.compute_loss(batch)["loss"]
    torch.testing.assert_close(losses["loss"], plain + 0.5 * by_hand)
    policy.bc_kl_coef = 0.5
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):  # the penalty alone pulls the actor back towards the reference
        optimizer.zero_grad()
        policy.compute_loss(batch)["bc_kl"].backward()
        optimizer.step()
    assert float(policy.compute_loss(batch)["bc_kl"]) < 0.5 * float(by_hand)
    state = policy.state_dict()  # checkpoints keep the reference: a resumed run stays near the same policy
    assert bool(state["reference_set"]) and any(k.startswith("reference_head.") for k in state)


# --- init_from a BC checkpoint ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bc_checkpoint(tmp_path_factory) -> Path:
    """A BC transformer trained for 2 steps on 2 Meta-World demos at 32 px (debug=fast)."""
    root = tmp_path_factory.mktemp("bc")
    run_train("env.image_size=32", "env.max_episode_steps=5", "data.num_demos=1", "trainer.max_steps=2",
              "callbacks.rollout=null", "callbacks.best_checkpoint=null", root=root)
    (last,) = Path(root, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
    return last


def test_ppo_from_a_bc_checkpoint_acts_as_the_bc_policy_before_any_update(bc_checkpoint, tmp_path):
    """Built as train.py builds it (init_from): PPO's deterministic action and its Gaussian's mean are the BC
    policy's action, step after step of a real episode (history windows included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from toolkit.envs.vector import check_env, make_env
    from toolkit.policies.base import load_policy
    from toolkit.policies.init_from import adopt_checkpoint_config, load_actor_weights, read_init_checkpoint

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["policy=ppo", "debug=fast", "env.image_size=32", f"init_from={bc_checkpoint}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = cfg.paths.output_dir = str(tmp_path)
    spec = check_env(cfg.env)
    ckpt = read_init_checkpoint(cfg.init_from)
    adopt_checkpoint_config(cfg, ckpt, spec, cfg.init_from)
    assert cfg.policy.trunk == "transformer" and cfg.data.history == 2
    torch.manual_seed(3)
    hp = ckpt["hyper_parameters"]
    ppo = instantiate(cfg.policy, encoder=instantiate(cfg.encoder), shape_meta=hp["shape_meta"], stats=hp["stats"],
                      _convert_="all")
    load_actor_weights(ppo, ckpt, cfg.init_from)
    bc = load_policy(bc_checkpoint)
    ppo.eval()
    env = make_env(cfg.env)
    try:
        obs, _ = env.reset(seed=7)
        for _ in range(6):
            batch = {k: v[None] for k, v in obs.items()}
            expected = bc.act(batch)
            np.testing.assert_allclose(ppo.act(batch), expected, rtol=1e-5, atol=1e-6)
            with torch.no_grad():  # the window act() just pushed
                dist, _ = ppo.distribution_and_value(ppo._hist)
            np.testing.assert_allclose(ppo.unnormalize_action(dist.mean).numpy(), expected, rtol=1e-5, atol=1e-6)
            obs, *_ = env.step(expected[0])
    finally:
        env.close()


@pytest.mark.parametrize("case", ["not_a_checkpoint", "other_image_size"])
def test_init_from_refuses_what_it_cannot_start_from(case, bc_checkpoint, tmp_path):
    if case == "not_a_checkpoint":
        path = tmp_path / "notes.ckpt"
        path.write_text("not a checkpoint\n")
        overrides, expected = [f"init_from={path}", *ONLINE[1:3]], [f"init_from={path}: not a policy checkpoint"]
    else:  # trained at 32 px, fine-tuned at 64 px
        path = bc_checkpoint
        overrides = [f"init_from={path}", "env.image_size=64"]
        expected = [f"init_from={path} was trained on other observations", "toolkit.envs.metaworld.MetaWorldEnv",
                    "camera rgb_corner4: dataset (32, 32, 3), env (64, 64, 3)"]
    proc = run_train("policy=ppo", *overrides, root=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    for text in expected:
        assert text in line, line


def test_init_from_refuses_a_torch_file_that_is_not_a_policy_checkpoint(tmp_path):
    from toolkit.policies.init_from import read_init_checkpoint

    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ToolkitError, match="not a policy checkpoint written by this toolkit"):
        read_init_checkpoint(path)


# --- the rollout feature cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["impala", "dinov2"])
def test_cached_features_act_as_reencoding_every_frame(encoder, monkeypatch):
    """A frozen encoder: rollouts keep each step's features (one frame encoded per step) and act exactly as the
    same policy re-encoding the whole history window every step."""
    if encoder == "impala":
        enc, size = ImpalaEncoder(image_size=16, channels=(4, 4), num_blocks=1, out_dim=8, freeze=True), 16
    else:
        from toolkit.encoders.dinov2 import DINOv2Encoder

        torch.manual_seed(0)
        enc, size = DINOv2Encoder(weights=None, image_size=28), 28
    shape_meta, stats = state_meta(3, 2)
    shape_meta = {**shape_meta, "rgb_keys": ["rgb"], "image_shape": {"rgb": [size, size, 3]}}
    policy = make_ppo(shape_meta=shape_meta, stats=stats, encoder=enc, history=3, trunk="transformer",
                      num_heads=2, num_layers=1).eval()
    assert policy.caches_features()
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, (6, 2, size, size, 3), dtype=np.uint8)
    states = g.normal(size=(6, 2, 3)).astype(np.float32)

    def episode() -> list[tuple[np.ndarray, torch.Tensor]]:
        out = []
        policy.reset()
        for t in range(6):
            if t == 4:
                policy.reset(np.array([False, True]))  # env 1 starts a new episode
            action = policy.act({"rgb": frames[t], "state": states[t]})
            with torch.no_grad():
                dist, value = policy.distribution_and_value(policy._hist)
            out.append((action, torch.cat([dist.mean, value[:, None]], 1)))
        return out

    cached = episode()
    assert "rgb_features" in policy._hist and "rgb" not in policy._hist
    monkeypatch.setattr(type(policy), "caches_features", lambda self: False)
    reencoded = episode()
    assert "rgb" in policy._hist
    for (a1, d1), (a2, d2) in zip(cached, reencoded):
        np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-6)


def test_a_nan_loss_stops_the_run_naming_the_step():
    from toolkit.fault_tolerance import StopOnNonFiniteLoss

    env = bandit()
    dm = OnlineDataModule(env, num_envs=1, seed=0, batch_size=4, history=1)
    policy = make_ppo(env, n_steps=8, batch_size=4, lr=1e30, optimizer=partial(torch.optim.SGD))
    with pytest.raises(ToolkitError, match=r"training loss is nan at step 2 \(batch 1\)"):
        trainer(max_steps=50, callbacks=[StopOnNonFiniteLoss()]).fit(policy, dm)
    # the weights are NaN now: acting in the envs stops with a message too (not inside torch.distributions)
    with pytest.raises(ToolkitError, match="not finite when acting"):
        stepper = EnvStepper(env, num_envs=1, seed=0)
        next(b for _ in range(2) for b in policy.online_batches(stepper))  # the cycle cut short, then a new one
