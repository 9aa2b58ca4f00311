"""state_encoder=babyai_film: BabyAI 1.1's model of the symbolic view, on real BabyAI observations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_train
from toolkit.encoders.babyai_film import BabyAIViewFiLM
from toolkit.envs.babyai import BabyAIEnv


def episode_states(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A bot episode of GoToRedBall: the symbolic states ``[L, 984]`` and minigrid's grids ``[L, 7, 7, 3]``."""
    env = BabyAIEnv("GoToRedBall", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=seed)
    states, grids = [], []
    for _ in range(20):
        states.append(obs["state"])
        grids.append(obs["grid"])
        obs, _, terminated, truncated, _ = env.step(env.expert_action())
        if terminated or truncated:
            break
    return np.stack(states), np.stack(grids)


def paper_forward(model: BabyAIViewFiLM, grids: np.ndarray, lang: torch.Tensor) -> torch.Tensor:
    """mila-iqia/babyai's ``ACModel.forward`` image path (``bow_endpool_res``) on minigrid's ``obs["image"]``, with
    ``model``'s weights: the channel transposes, ImageBOWEmbedding's offset lookup and sum, the convs, residual FiLM,
    the 7x7 max-pool and ReLU."""
    x = torch.as_tensor(grids).long()
    x = torch.transpose(torch.transpose(x, 1, 3), 2, 3)  # [B, 3, W, H] as the paper feeds its image_conv
    offsets = torch.tensor([0, 11, 17])  # object, colour, state vocabularies laid end to end
    table = model.bow.weight.T  # one embedding row per (attribute, value)
    x = table[x + offsets[None, :, None, None]].sum(1).permute(0, 3, 1, 2)
    x = model.convs(x)
    for film in model.films:
        x = film(x, lang) + x
    return torch.relu(torch.nn.functional.max_pool2d(x, kernel_size=7, stride=2)).flatten(1)


def test_the_view_model_computes_babyais_image_path_from_our_symbolic_state():
    """Our state (direction, then each cell's one-hots) through a linear layer equals the paper's embedding lookup
    on minigrid's own grid: same cells, same orientation, same channels."""
    torch.manual_seed(0)
    states, grids = episode_states()
    model = BabyAIViewFiLM(lang_dim=8, channels=16).eval()
    lang = torch.randn(len(states), 8)
    with torch.no_grad():
        ours = model.encode_view(torch.as_tensor(states), lang)
        torch.testing.assert_close(ours, paper_forward(model, grids, lang))


def test_a_window_encodes_each_distinct_step_once_and_gives_every_step_its_features():
    """A window padded with copies of its first step (as the datamodule and rollouts pad) gets, at every step, the
    features of that step's own view; the direction's one-hot passes through; gradients reach the embeddings."""
    torch.manual_seed(0)
    states, _ = episode_states()
    model = BabyAIViewFiLM(lang_dim=8, channels=16).eval()
    t = 12
    real = min(len(states), 6)
    window = torch.as_tensor(np.concatenate([np.repeat(states[:1], t - real, 0), states[:real]]))[None]
    window = torch.cat([window, torch.as_tensor(states[-1:]).expand(1, t, -1)])  # a second window: one view only
    lang = torch.randn(2, 8)
    out = model(window, lang)
    per_step = model.encode_view(window.flatten(0, 1), lang.repeat_interleave(t, 0)).view(2, t, -1)
    torch.testing.assert_close(out[..., 4:], per_step)
    torch.testing.assert_close(out[..., :4], window[..., :4])
    assert out.shape == (2, t, model.out_dim)
    out.sum().backward()
    assert model.bow.weight.grad.abs().sum() > 0 and model.films[0].gamma.weight.grad.abs().sum() > 0


def test_the_view_model_names_what_it_needs():
    model = BabyAIViewFiLM(lang_dim=8, channels=8)
    with pytest.raises(ValueError, match="env.symbolic=true"):
        model(torch.zeros(1, 2, 4), torch.zeros(1, 8))  # env.symbolic=false: the direction only
    with pytest.raises(ValueError, match="'lang'"):
        model(torch.zeros(1, 2, model.state_dim))
    from functools import partial

    from test_ppo import state_meta
    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.errors import ToolkitError
    from toolkit.policies.bc_transformer import BCTransformer

    with pytest.raises(ToolkitError, match="state of size 984, the data's has 4.*env.symbolic=true"):
        BCTransformer(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8), *state_meta(4, 1),
                      optimizer=partial(torch.optim.Adam), state_encoder=model)


@pytest.mark.parametrize("every_step", [False, True])
def test_train_py_trains_a_babyai_policy_on_the_view_model_and_its_checkpoint_acts(tmp_path, every_step):
    """state_encoder=babyai_film end to end: train.py on collected symbolic demos (no pixels, a GRU; with
    data.label_every_step, whole-episode windows), the checkpoint rebuilt by load_policy acts in the env as the
    trained module did and keeps how it was trained, and init_from carries the view model."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from toolkit.errors import ToolkitError
    from toolkit.policies.base import load_policy
    from toolkit.policies.init_from import adopt_checkpoint_config, read_init_checkpoint

    run_train("env=babyai", "env.level=GoToRedBall", "env.image_size=16", "env.symbolic=true", "data.num_demos=3",
              "data.obs_keys=[state]", "policy.trunk=gru", "data.history=8", "state_encoder=babyai_film",
              "policy.state_encoder.channels=16", "trainer.max_steps=3", "callbacks.rollout=null",
              "callbacks.best_checkpoint=null", f"data.label_every_step={str(every_step).lower()}", root=tmp_path)
    (ckpt,) = Path(tmp_path, "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
    policy = load_policy(ckpt)
    assert isinstance(policy.state_encoder, BabyAIViewFiLM) and policy.state_encoder.films
    assert policy.label_every_step == every_step  # the GRU reads or skips the padding as it did in training
    assert sum(p.numel() for p in policy.state_encoder.parameters()) > 0
    env = BabyAIEnv("GoToRedBall", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=1_000_000)
    batch = {"state": obs["state"][None], "instruction": [env.instruction()]}
    policy.reset()
    action = policy.act(batch)
    assert action.shape == (1, 1) and 0 <= action[0, 0] < 7
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["env=babyai", "env.level=GoToRedBall", "env.symbolic=true", "policy=ppo",
                                          f"init_from={ckpt}"])
    adopt_checkpoint_config(cfg, read_init_checkpoint(ckpt), None, ckpt)
    assert cfg.policy.state_encoder._target_.endswith("BabyAIViewFiLM") and cfg.policy.state_encoder.channels == 16
    assert cfg.policy.label_every_step == every_step  # PPO's GRU then skips the padding as BC's did
    if every_step:  # online IQL's trunk reads the padded window: it would not act as the checkpoint does
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("train", overrides=["env=babyai", "env.level=GoToRedBall", "env.symbolic=true",
                                              "policy=iql_online", f"init_from={ckpt}"])
        with pytest.raises(ToolkitError, match=f"init_from={ckpt} was trained with policy.label_every_step=true"):
            adopt_checkpoint_config(cfg, read_init_checkpoint(ckpt), None, ckpt)
        run_train("env=babyai", "env.level=GoToRedBall", "env.image_size=16", "env.symbolic=true", "policy=ppo",
                  f"init_from={ckpt}", "data.num_envs=2", "policy.n_steps=8", "data.batch_size=8",
                  "policy.n_epochs=1", "trainer.max_steps=2", "callbacks.rollout=null", "callbacks.best_checkpoint=null",
                  root=tmp_path / "ppo")
        (tuned,) = Path(tmp_path, "ppo", "logs", "debug", "runs").glob("*/checkpoints/last.ckpt")
        assert load_policy(tuned).label_every_step


def test_ppo_keeps_the_loaded_view_model_as_its_kl_reference():
    """policy=ppo with bc_kl_coef: the view model trains with the actor, so the reference keeps its own copy of
    it as loaded; a changed view model makes the KL to the loaded policy positive, the copy unchanged."""
    from functools import partial

    from test_ppo import state_meta
    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.policies.ppo import PPO

    states, _ = episode_states()
    shape_meta, stats = state_meta(states.shape[1], 1)
    torch.manual_seed(0)
    policy = PPO(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8), shape_meta, stats,
                 optimizer=partial(torch.optim.Adam), history=1, trunk="concat", action_type="discrete",
                 num_actions=7, bc_kl_coef=0.5, state_encoder=BabyAIViewFiLM(lang_dim=None, channels=8))
    policy.set_reference()
    n = len(states)
    batch = {"obs": {"state": torch.as_tensor(states)[:, None]}, "action": torch.zeros(n, dtype=torch.long),
             "logprob": torch.zeros(n), "value": torch.zeros(n), "advantage": torch.zeros(n), "ret": torch.zeros(n)}
    policy.eval()  # batch norm as loaded, in both copies
    assert float(policy.compute_loss(batch)["bc_kl"].detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        policy.state_encoder.bow.weight.mul_(3.0)
    assert float(policy.compute_loss(batch)["bc_kl"].detach()) > 1e-4
    assert not torch.equal(policy.reference_state_encoder.bow.weight, policy.state_encoder.bow.weight)


def test_a_whole_episode_window_scores_each_step_as_that_steps_rollout_window_acts():
    """policy.label_every_step: the GRU starts at the episode's first step, so the logits a whole-episode training
    window gives each step equal those the rollout's window (padded differently) gives it, and the loss is the
    cross-entropy of exactly those logits; reading the padding instead would change them."""
    from functools import partial

    from test_ppo import state_meta
    from toolkit.datamodules.windows import window_indices
    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.errors import ToolkitError
    from toolkit.policies.bc_transformer import BCTransformer

    env = BabyAIEnv("GoToRedBall", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=5)
    states, actions = [], []
    for _ in range(20):
        states.append(obs["state"])
        actions.append(env.expert_action())
        obs, _, terminated, truncated, _ = env.step(actions[-1])
        if terminated or truncated:
            break
    states, actions, n, t = np.stack(states), np.array(actions).reshape(-1), len(states), 24
    assert n >= 3
    torch.manual_seed(0)
    policy = BCTransformer(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8),
                           *state_meta(states.shape[1], 1), optimizer=partial(torch.optim.Adam), history=t, horizon=1,
                           trunk="gru", d_model=32, num_layers=1, dropout=0.0, augment_shift=0, lang_dim=8,
                           action_type="discrete", num_actions=7, label_every_step=True,
                           state_encoder=BabyAIViewFiLM(lang_dim=8, channels=16)).eval()
    lang = torch.randn(1, 8)
    obs_idx, obs_pad, _, _ = window_indices(n - 1, n, t, 1)
    batch = {"obs": {"state": torch.as_tensor(states[obs_idx])[None]}, "obs_is_pad": torch.as_tensor(obs_pad)[None],
             "lang": lang, "step_action": torch.as_tensor(actions[obs_idx], dtype=torch.float32)[None, :, None],
             "step_scored": torch.as_tensor(~obs_pad)[None]}
    with torch.no_grad():
        whole = policy.forward_head({**batch["obs"], "lang": lang}, batch["obs_is_pad"])[0, t - n:]
        policy.reset()
        rollout = torch.stack([_rollout_logits(policy, states[k:k + 1], lang) for k in range(n)])
        torch.testing.assert_close(whole, rollout)
        loss = policy.compute_loss(batch)["loss"]
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(rollout, torch.as_tensor(actions).long()))
        reading_pads = policy.head(policy.trunk(policy.encode_images(batch["obs"]),
                                                policy.encode_state(batch["obs"], lang), lang))
        assert not torch.allclose(reading_pads, whole[-1:], atol=1e-4)  # the padding changes a GRU that reads it
    with pytest.raises(ToolkitError, match="label_every_step"):
        policy.compute_loss({k: v for k, v in batch.items() if not k.startswith("step_")}
                            | {"action": batch["step_action"][:, -1:], "action_is_pad": torch.zeros(1, 1, dtype=bool)})


def test_ppo_on_a_whole_episode_bc_policy_acts_and_values_as_its_rollout_windows_do():
    """PPO started from a BC policy trained with label_every_step: the distribution it samples from in training
    rollouts is the BC policy's, step after step of a real episode, and the value of the next observation
    (GAE's bootstrap) is the value of the window that observation then gets; a GRU reading the padding differs."""
    from functools import partial

    from test_ppo import state_meta
    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.errors import ToolkitError
    from toolkit.policies.bc_transformer import BCTransformer
    from toolkit.policies.ppo import PPO

    env = BabyAIEnv("GoToRedBall", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=5)
    kwargs = dict(optimizer=partial(torch.optim.Adam), history=12, horizon=1, trunk="gru", d_model=32, num_layers=1,
                  augment_shift=0, lang_dim=None, action_type="discrete", num_actions=7, label_every_step=True)
    torch.manual_seed(0)
    bc = BCTransformer(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8),
                       *state_meta(len(obs["state"]), 1), dropout=0.0,
                       state_encoder=BabyAIViewFiLM(lang_dim=None, channels=16), **kwargs).eval()
    ppo = PPO(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8), *state_meta(len(obs["state"]), 1),
              state_encoder=BabyAIViewFiLM(lang_dim=None, channels=16), **kwargs)
    ppo.load_state_dict(bc.state_dict(), strict=False)  # as init_from loads the actor; the critic stays fresh
    ppo.eval()
    bc.reset()
    ppo.reset()
    fresh = np.ones(1, bool)
    with torch.no_grad():
        for steps in range(1, 13):
            batch = {"state": obs["state"][None]}
            expected = _rollout_logits(bc, batch["state"], None).softmax(-1)
            bootstrap = None if ppo._hist is None else ppo._value_of(batch, np.ones(1, bool))  # obs not pushed yet
            step = {}
            ppo._sample(batch, fresh, step)
            dist, value = ppo.distribution_and_value(step["obs"])
            torch.testing.assert_close(dist.probs[0], expected)
            if bootstrap is not None:
                torch.testing.assert_close(bootstrap, value)
            fresh = np.zeros(1, bool)
            obs, _, terminated, truncated, _ = env.step(env.expert_action())
            if terminated or truncated:
                break
        assert steps >= 3
        # an env whose episode has just started: its window is that observation alone
        restart = {"state": env.reset(seed=6)[0]["state"][None]}
        bootstrap = ppo._value_of(restart, np.ones(1, bool), np.ones(1, bool))
        ppo._sample(restart, np.ones(1, bool), step)
        torch.testing.assert_close(bootstrap, ppo.distribution_and_value(step["obs"])[1])
        ppo.deterministic_eval = False  # evaluation rollouts that sample: the same distribution
        ppo.reset()
        sampled = ppo.act(restart)
        assert sampled.shape == (1, 1) and 0 <= sampled[0, 0] < 7
        with pytest.raises(ToolkitError, match="obs_is_pad"):
            ppo.distribution_and_value({k: v for k, v in step["obs"].items() if k != "obs_is_pad"})
        ppo.label_every_step = False  # the GRU reads the window's padding: another policy
        assert not torch.allclose(ppo.distribution_and_value(step["obs"])[0].probs[0], expected, atol=1e-4)


def test_an_evaluation_encodes_each_state_once_and_acts_as_the_whole_window_does():
    """Rollouts (run_rollouts: the weights are fixed) keep each step's view-model features: the episodes, and every
    step's logits, equal those of the same policy re-encoding its whole window at every step, while each env step
    encodes one state instead of a window's; the batch norm is read in eval mode, never updated by a rollout."""
    from functools import partial
    from types import SimpleNamespace

    from test_ppo import state_meta
    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.encoders.language import WordPositionEncoder
    from toolkit.envs.rollout import run_rollouts
    from toolkit.envs.vector import make_vector_env
    from toolkit.policies.bc_transformer import BCTransformer

    language = WordPositionEncoder(max_words=8)
    envs = make_vector_env({"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToLocal", "image_size": 16,
                            "symbolic": True, "max_episode_steps": 20}, 2, processes=False)
    torch.manual_seed(0)
    policy = BCTransformer(ImpalaEncoder(image_size=16, channels=(4,), num_blocks=1, out_dim=8),
                           *state_meta(envs.single_observation_space["state"].shape[0], 1),
                           optimizer=partial(torch.optim.Adam), history=8, horizon=1, trunk="gru", d_model=32,
                           num_layers=1, dropout=0.0, augment_shift=0, lang_dim=language.out_dim,
                           action_type="discrete", num_actions=7, label_every_step=True,
                           state_encoder=BabyAIViewFiLM(lang_dim=language.out_dim, channels=16))
    policy.language = language
    encoded, logits = [], []
    policy.state_encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0] * args[0].shape[1]))
    policy.head.register_forward_hook(lambda m, args, out: logits.append(out[:, -1]))
    batch_norm = policy.state_encoder.convs[1].running_mean.clone()

    runs = {}
    for name, rolling in (("cached", policy), ("whole window", SimpleNamespace(reset=policy.reset, act=policy.act))):
        encoded.clear(), logits.clear()
        res = run_rollouts(rolling, envs, num_episodes=4, seed=1_000_000)
        runs[name] = {"res": res, "encoded": sum(encoded), "logits": torch.cat(logits)}
        if rolling is policy:  # no cached feature outlives the rollouts
            assert policy._hist is None and not policy._caching_state_features
    envs.close()
    cached, whole = runs["cached"], runs["whole window"]
    assert cached["res"]["length"].max() > 8  # windows rolled past the history
    for key in ("success", "length", "return"):
        np.testing.assert_array_equal(cached["res"][key], whole["res"][key])
    torch.testing.assert_close(cached["logits"], whole["logits"], atol=1e-5, rtol=1e-5)
    assert cached["encoded"] == cached["logits"].shape[0]  # one state per env and step
    assert whole["encoded"] > 3 * cached["encoded"]
    torch.testing.assert_close(policy.state_encoder.convs[1].running_mean, batch_norm)


def _rollout_logits(policy, state: np.ndarray, lang: torch.Tensor | None) -> torch.Tensor:
    """The policy's logits for its window's last step after pushing ``state`` into its rollout history."""
    hist, is_pad = policy.observe({"state": state})
    return policy.forward_head({**hist, "lang": lang}, is_pad)[0, -1]
