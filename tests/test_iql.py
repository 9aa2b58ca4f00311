"""IQL: the losses as written in the paper, Polyak targets, gradient routing, and that it learns what BC cannot."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from toolkit.encoders.impala import ImpalaEncoder
from toolkit.policies.iql import IQLPolicy, TwinQ, awr_weights, expectile_loss


def make_policy(state_dim: int = 4, action_dim: int = 2, image_size: int = 16, **kwargs) -> IQLPolicy:
    torch.manual_seed(0)
    stats = {"obs/state": {"mean": [0.0] * state_dim, "std": [1.0] * state_dim},
             "actions": {"mean": [0.0] * action_dim, "std": [1.0] * action_dim,
                         "min": [-1.0] * action_dim, "max": [1.0] * action_dim}}
    shape_meta = {"rgb_keys": ["rgb"], "state_dim": state_dim, "action_dim": action_dim}
    encoder = ImpalaEncoder(image_size=image_size, channels=(4, 4), num_blocks=1, out_dim=8)
    defaults = dict(optimizer=partial(torch.optim.Adam), history=2, horizon=3, d_model=16, num_heads=2,
                    num_layers=1, hidden_dim=32, augment_shift=0)
    return IQLPolicy(encoder, shape_meta, stats, **{**defaults, **kwargs})


def make_batch(b: int = 8, t: int = 2, state_dim: int = 4, action_dim: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    obs = lambda: {"rgb": torch.randint(0, 256, (b, t, 3, 16, 16), dtype=torch.uint8, generator=g),  # noqa: E731
                   "state": torch.randn(b, t, state_dim, generator=g)}
    return {"obs": obs(), "obs_is_pad": torch.zeros(b, t, dtype=torch.bool),
            "next_obs": obs(), "next_obs_is_pad": torch.zeros(b, t, dtype=torch.bool),
            "action": torch.rand(b, 3, action_dim, generator=g) * 2 - 1,
            "action_is_pad": torch.zeros(b, 3, dtype=torch.bool),
            "reward": torch.rand(b, generator=g), "done": (torch.rand(b, generator=g) < 0.3).float()}


def test_expectile_loss_and_weight_clipping_by_hand():
    u = torch.tensor([-2.0, 1.0, 0.0])
    # |0.7 - 1| * 4 = 1.2, |0.7 - 0| * 1 = 0.7
    torch.testing.assert_close(expectile_loss(u, 0.7), torch.tensor([1.2, 0.7, 0.0]))
    w = awr_weights(torch.tensor([-1.0, 0.0, 1.0, 10.0]), beta=3.0)
    torch.testing.assert_close(w, torch.tensor([torch.e ** -3, 1.0, torch.e ** 3, 100.0]))


@pytest.mark.parametrize("actor_head", ["deterministic", "gaussian"])
def test_losses_are_finite_and_follow_the_definitions(actor_head):
    policy = make_policy(actor_head=actor_head, beta=1000.0)  # huge beta: every positive advantage clips
    batch = make_batch()
    out = policy.compute_loss(batch)
    assert all(torch.isfinite(v) for v in out.values()), out
    torch.testing.assert_close(out["loss"], out["value_loss"] + out["q_loss"] + out["actor_loss"])
    assert out["weight_max"] <= 100.0
    # recompute the value loss by hand from the networks: u = min target Q(s, a) - V(s)
    with torch.no_grad():
        z = policy.features(batch["obs"])
        a = policy.action_norm.normalize(batch["action"][:, 0])
        u = torch.minimum(*policy.q_values(z, a, target=True)) - policy.value(z)[:, 0]
        manual = (torch.where(u < 0, 0.3, 0.7) * u ** 2).mean()
        # and the TD target r + gamma (1 - done) V(s')
        y = batch["reward"] + 0.99 * (1 - batch["done"]) * policy.value(policy.features(batch["next_obs"]))[:, 0]
        q1, q2 = policy.q_values(z, a)
    torch.testing.assert_close(out["value_loss"], manual)
    torch.testing.assert_close(out["q_loss"], ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean())
    assert policy.predict(batch["obs"], batch["obs_is_pad"]).shape == (8, 3, 2)


def test_one_trainer_step_updates_targets_by_polyak():
    policy = make_policy()
    old = {k: v.clone() for k, v in policy.q.state_dict().items()}
    torch.testing.assert_close(policy.target_q.state_dict(), old)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, accelerator="cpu", log_every_n_steps=1)
    trainer.fit(policy, train_dataloaders=torch.utils.data.DataLoader([make_batch()], batch_size=None))
    assert trainer.global_step == 1
    new = policy.q.state_dict()
    assert not torch.allclose(new["weights.0"], old["weights.0"])  # the online Q moved
    for k, target in policy.target_q.state_dict().items():
        torch.testing.assert_close(target, 0.995 * old[k] + 0.005 * new[k])
    for key in ("q1", "q2", "v", "adv_mean", "adv_std", "adv_max", "value_loss", "q_loss", "actor_loss",
                "weight_mean", "loss"):
        assert f"train/{key}" in trainer.logged_metrics


def test_twin_q_members_are_independent_mlps():
    """The batched twin Q computes exactly two separate ReLU MLPs, and each member learns only from its loss."""
    torch.manual_seed(0)
    q = TwinQ(5, 16, 3)
    x = torch.randn(7, 5)
    out = q(x)
    assert out.shape == (2, 7, 3)
    for m in range(2):
        h = torch.relu(x @ q.weights[0][m] + q.biases[0][m])
        h = torch.relu(h @ q.weights[1][m] + q.biases[1][m])
        torch.testing.assert_close(out[m], h @ q.weights[2][m] + q.biases[2][m])
    out[0].sum().backward()
    assert q.weights[0].grad[0].abs().sum() > 0 and q.weights[0].grad[1].abs().sum() == 0
    bound = 1 / 5 ** 0.5  # nn.Linear's init range
    assert q.weights[0].abs().max() <= bound and q.weights[0].std() > bound / 3


def test_concat_trunk_is_an_mlp_on_stacked_features():
    """policy.trunk=concat: z is the window's image features and normalized states, concatenated."""
    policy = make_policy(trunk="concat", history=2)
    batch = make_batch()
    obs = {"rgb_features": torch.randn(8, 2, 1, 8), "state": batch["obs"]["state"]}
    z = policy.features(obs)
    torch.testing.assert_close(z, torch.cat([obs["rgb_features"].flatten(1), obs["state"].flatten(1)], -1))
    assert not list(policy.trunk.parameters())
    out = policy.compute_loss({**batch, "obs": obs, "next_obs": obs})
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("mode", ["critic", "actor", "all"])
def test_encoder_updated_by_routes_gradients(mode):
    policy = make_policy(encoder_updated_by=mode)
    shared = [*policy.encoder.parameters(), *policy.trunk.parameters()]
    out = policy.compute_loss(make_batch())
    out["actor_loss"].backward(retain_graph=True)
    got_actor = any(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    assert got_actor == (mode in ("actor", "all"))
    policy.zero_grad(set_to_none=True)
    (out["value_loss"] + out["q_loss"]).backward()
    got_critic = any(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    assert got_critic == (mode in ("critic", "all"))


@pytest.mark.parametrize("kwargs, actor_lr", [({"actor_cosine_steps": 10}, 1.5e-4),  # half way down the cosine
                                             ({"actor_lr": 3e-5, "actor_cosine_steps": None}, 3e-5)],
                         ids=["cosine", "own_constant_lr"])
def test_actor_lr_is_scheduled_alone_and_critic_lr_constant(kwargs, actor_lr):
    policy = make_policy(**kwargs)
    conf = policy.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for _ in range(5):
        opt.step()
        sched.step()
    critic, actor = opt.param_groups
    assert critic["lr"] == pytest.approx(3e-4) and actor["lr"] == pytest.approx(actor_lr)


def bandit_batch(n: int, seed: int) -> dict:
    """One-step offline bandit: each random state appears twice, with the rewarded action sign(s0) (reward 1)
    and its opposite (reward 0). Behaviour cloning averages the two to ~0."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(n, 1, 4, generator=g).repeat(2, 1, 1)
    good = torch.sign(state[:n, 0, :1])
    action = torch.cat([good, -good])[:, None]  # [2n, 1, 1]
    # blank cached image features (skip the CNN: this test is about the losses, and must be fast)
    obs = {"rgb_features": torch.zeros(2 * n, 1, 1, 8), "state": state}
    return {"obs": obs, "obs_is_pad": torch.zeros(2 * n, 1, dtype=torch.bool), "next_obs": obs,
            "next_obs_is_pad": torch.zeros(2 * n, 1, dtype=torch.bool), "action": action,
            "action_is_pad": torch.zeros(2 * n, 1, dtype=torch.bool),
            "reward": torch.cat([torch.ones(n), torch.zeros(n)]), "done": torch.ones(2 * n)}


def train_bandit(beta: float, steps: int = 100) -> float:
    """Fraction of held-out states where the actor clearly picks the rewarded action (|a| > 0.5, right sign).
    tau=0.05 (not 0.005) so the target Qs catch up within the few steps a CPU test can afford."""
    policy = make_policy(action_dim=1, history=1, horizon=1, lr=3e-3, tau=0.05, beta=beta)
    opt = policy.configure_optimizers()["optimizer"]
    data = bandit_batch(64, seed=0)
    for _ in range(steps):
        opt.zero_grad()
        policy.compute_loss(data)["loss"].backward()
        opt.step()
        policy.update_targets()
    test = bandit_batch(200, seed=1)
    with torch.no_grad():
        pred = policy.eval().predict(test["obs"], test["obs_is_pad"])[:200, 0, 0]
    return ((pred * test["action"][:200, 0, 0]) > 0.5).float().mean().item()


def test_iql_picks_the_rewarded_action_where_bc_averages():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~2x faster than two on a busy 2-core machine
    try:
        assert train_bandit(beta=3.0) > 0.8
        assert train_bandit(beta=0.0) < 0.2  # beta=0 is plain BC: the same training cannot pass by accident
    finally:
        torch.set_num_threads(threads)


def test_discrete_categorical_actor_trains():
    policy = make_policy(action_dim=1, action_type="discrete", num_actions=3)
    batch = make_batch(b=16, action_dim=1)
    batch["action"] = torch.randint(0, 3, (16, 3, 1), generator=torch.Generator().manual_seed(2)).float()
    opt = policy.configure_optimizers()["optimizer"]
    cross_entropy = lambda: nn.functional.cross_entropy(  # noqa: E731
        policy.actor(policy.features(batch["obs"])), batch["action"][:, 0, 0].long()).item()
    first, first_ce = policy.compute_loss(batch), cross_entropy()
    for _ in range(30):
        opt.zero_grad()
        policy.compute_loss(batch)["loss"].backward()
        opt.step()
        policy.update_targets()
    last = policy.compute_loss(batch)
    # the weighted loss moves with the critic's weights; the actor's fit to the data actions must improve
    assert cross_entropy() < first_ce and last["q_loss"] < first["q_loss"]
    pred = policy.predict(batch["obs"], batch["obs_is_pad"])
    assert pred.shape == (16, 3, 1) and set(pred.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_language_conditioning_and_validation_loop():
    policy = make_policy(lang_dim=5)
    batch = {**make_batch(), "lang": torch.randn(8, 5)}
    assert torch.isfinite(policy.compute_loss(batch)["loss"])
    assert policy.predict({**batch["obs"], "lang": batch["lang"]}, batch["obs_is_pad"]).shape == (8, 3, 2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(policy, train_dataloaders=loader, val_dataloaders=loader)
    assert "val/value_loss" in trainer.logged_metrics and "val/actor_loss" in trainer.logged_metrics


def test_discrete_iql_trains_on_collected_babyai_episodes(tmp_path):
    """Discrete IQL end to end on real data: BabyAI GoToLocal episodes collected with the bot (actions are
    [L, 1] indices), windows with transitions, a few Lightning steps: finite losses, moving Qs, valid actions."""
    from toolkit.collect import collect
    from toolkit.datamodules.episode_datamodule import EpisodeDataModule

    env = {"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToLocal", "image_size": 32}
    path = tmp_path / "babyai.hdf5"
    collect(env, path, num_episodes=4, num_envs=1, progress=False)
    dm = EpisodeDataModule(str(path), history=2, horizon=1, batch_size=16)
    dm.transitions = True
    dm.setup("fit")
    assert dm.shape_meta["rgb_keys"] == ["rgb_top"] and dm.shape_meta["action_dim"] == 1
    torch.manual_seed(0)
    encoder = ImpalaEncoder(image_size=32, channels=(4, 8), num_blocks=1, out_dim=16)
    policy = IQLPolicy(encoder, dm.shape_meta, dm.stats, optimizer=partial(torch.optim.Adam), history=2, horizon=1,
                       action_type="discrete", num_actions=7, d_model=16, num_heads=2, num_layers=1, hidden_dim=32)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["action"][..., 0].unique().tolist()) <= set(range(7))
    first = policy.compute_loss(batch)
    before = policy.q.weights[-1].detach().clone()
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(policy, datamodule=dm)
    assert trainer.global_step == 6 and not torch.equal(policy.q.weights[-1], before)
    last = policy.compute_loss(batch)
    assert all(torch.isfinite(v) for v in last.values()) and last["q_loss"] < first["q_loss"]
    actions = policy.eval().predict(batch["obs"], batch["obs_is_pad"])
    assert actions.shape == (len(batch["action"]), 1, 1) and set(actions.unique().tolist()) <= set(map(float, range(7)))
    # rollouts: act() returns indices the env steps with (not un-normalized like continuous actions)
    from toolkit.envs.vector import make_vector_env

    envs = make_vector_env(env, 1)
    try:
        obs, _ = envs.reset(seed=[123])
        policy.reset()
        for _ in range(3):
            action = policy.act(obs)
            assert action.shape == (1, 1) and float(action[0, 0]).is_integer() and 0 <= action[0, 0] < 7
            obs, *_ = envs.step(action.astype(np.int64)[:, 0])
    finally:
        envs.close()


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_no_gradient_clipping_by_default_and_per_network_clipping_when_asked(max_grad_norm):
    """As the IQL references, the default leaves gradients alone (even with the trainer's gradient_clip_val);
    ``policy.max_grad_norm`` clips the critic and the actor each to that norm, so the critic's large TD gradient
    never shrinks the actor's step (clipping them together would)."""
    policy = make_policy(max_grad_norm=max_grad_norm)
    batch = make_batch()
    batch["reward"] = batch["reward"] * 100.0  # a large TD error: the critic's gradient dwarfs the actor's
    optimizer = policy.configure_optimizers()["optimizer"]
    policy.compute_loss(batch)["loss"].backward()

    def norms() -> list[float]:
        return [float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"] if p.grad is not None])))
                for g in optimizer.param_groups]

    before = norms()
    assert before[0] > 10 * before[1] > 0  # critic (V, Qs, trunk, encoder) vs actor
    policy.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    after = norms()
    if max_grad_norm is None:
        assert after == before
    else:
        for b, a in zip(before, after):
            assert a == pytest.approx(min(b, max_grad_norm), rel=1e-4)
