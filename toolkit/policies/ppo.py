"""PPO (Schulman et al., 2017) on the toolkit's policies, for online fine-tuning as FLaRe does it.

Read top to bottom, as CleanRL's ``ppo.py``: the actor is the BC transformer (same encoder, trunk and head,
so a BC checkpoint loads into it as it is: ``init_from``), its first predicted action the mean of a
Gaussian with a learned log-std (continuous) or the logits of a categorical (discrete). The critic is its
own trunk and value head (``separate_critic``, FLaRe) or a value head on the actor's trunk. Each update
cycle collects ``n_steps`` steps of every env with the current policy (``online_batches``), computes GAE
advantages, and yields ``n_epochs`` passes of shuffled minibatches of ``batch_size`` to ``training_step``
(``trainer.max_steps`` counts these minibatch updates). Rollout windows hold cached encoder features when
the encoder is frozen, so neither acting nor updating re-encodes a frame. A GRU actor trained with
``label_every_step`` (init_from adopts it) starts at each episode's first step, as its BC training did: the windows
then carry ``obs_is_pad``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal, kl_divergence

from toolkit.errors import ToolkitError
from toolkit.policies.bc_transformer import BCTransformer
from toolkit.policies.trunk import make_trunk


class PPO(BCTransformer):
    online = True  # train.py feeds it from the simulator (toolkit.datamodules.online), not from a file

    def __init__(
        self,
        *args,
        n_steps: int = 128,
        n_epochs: int = 4,
        batch_size: int = 64,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_coef: float = 0.2,
        clip_vloss: bool = False,
        norm_adv: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        separate_critic: bool = True,
        freeze_encoder: bool = False,
        init_log_std: float = -1.0,
        target_kl: float | None = None,
        critic_warmup_steps: int = 0,
        bc_kl_coef: float = 0.0,
        deterministic_eval: bool = True,
        **kwargs,
    ) -> None:
        # a stochastic forward would make the probability ratio noise: no dropout, no augmentation
        super().__init__(*args, **{**kwargs, "dropout": 0.0, "augment_shift": 0})
        self.n_steps, self.n_epochs, self.batch_size = n_steps, n_epochs, batch_size
        self.gamma, self.gae_lambda, self.clip_coef, self.clip_vloss = gamma, gae_lambda, clip_coef, clip_vloss
        self.norm_adv, self.ent_coef, self.vf_coef, self.target_kl = norm_adv, ent_coef, vf_coef, target_kl
        if critic_warmup_steps < 0:
            raise ValueError(f"policy.critic_warmup_steps={critic_warmup_steps}: a number of updates, 0 or more")
        # a critic that starts from random weights (separate_critic on a BC checkpoint) gives the actor noise for
        # advantages until it has fitted the BC policy's returns: the first updates train the critic alone
        self.critic_warmup_steps = critic_warmup_steps
        if bc_kl_coef < 0:
            raise ValueError(f"policy.bc_kl_coef={bc_kl_coef}: a weight, 0 (off) or more")
        self.bc_kl_coef = bc_kl_coef
        if freeze_encoder:  # FLaRe: the pretrained visual encoder stays as it is
            self.encoder.frozen = True
            self.encoder._apply_freeze()
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((self.action_dim,), float(init_log_std)))
        hp = self.hparams
        self.critic_trunk = make_trunk(hp.get("trunk", "transformer"), len(self.rgb_keys) * self.encoder.num_tokens,
                                       self.encoder.out_dim, self.state_feature_dim, self.history, hp.get("d_model", 128),
                                       hp.get("num_layers", 2), hp.get("num_heads", 4), 0.0,
                                       hp.get("lang_dim")) if separate_critic else None
        width = (self.critic_trunk or self.trunk).out_dim
        d_model = hp.get("d_model", 128)
        self.value_head = nn.Sequential(nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, 1))
        if bc_kl_coef > 0:  # a frozen copy of the actor as init_from loaded it (set_reference), kept in checkpoints
            self.reference_trunk = copy.deepcopy(self.trunk).requires_grad_(False)
            self.reference_head = copy.deepcopy(self.head).requires_grad_(False)
            # the state encoder (state_encoder=) trains with the actor, so the reference keeps its own copy
            self.reference_state_encoder = copy.deepcopy(self.state_encoder)
            if self.reference_state_encoder is not None:
                self.reference_state_encoder.requires_grad_(False)
            self.register_buffer("reference_log_std", torch.full((self.action_dim,), float(init_log_std))
                                 if not self.discrete else torch.zeros(0))
            self.register_buffer("reference_set", torch.tensor(False))
        self._training_hist: tuple = (None, None)  # the training envs' histories (online_batches)
        self._cycle: dict[str, Any] | None = None  # the update cycle in progress: its data and position
        self._approx_kl: float | None = None  # of the last minibatch (target_kl)
        # act() (evaluation rollouts, load_policy): the distribution's mean / most likely action (True, SB3's
        # deterministic evaluation), or a sample as in training (False, drawn from eval_generator())
        self.deterministic_eval = deterministic_eval

    # --- the policy and value ------------------------------------------------------------------
    def distribution_and_value(self, obs: dict[str, torch.Tensor]) -> tuple[torch.distributions.Distribution, torch.Tensor]:
        """The action distribution at the last step of each window (normalized actions, or indices) and V."""
        dist, value, _ = self._forward(obs)
        return dist, value

    def _forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.distributions.Distribution, torch.Tensor, tuple]:
        """The distribution, V and the trunk inputs (encoder tokens, normalized state, instruction)."""
        tokens = self.encode_images(obs)  # shared by actor and critic (features, or a fine-tuned encoder)
        inputs = (tokens, self.encode_state(obs, obs.get("lang")), obs.get("lang"))
        pad = self.trunk_padding(obs)
        z = self.trunk(*inputs, **pad)
        dist = self._distribution(self.head(z), None if self.discrete else self.log_std)
        value = self.value_head(self.critic_trunk(*inputs, **pad) if self.critic_trunk is not None else z)
        return dist, value.squeeze(-1), inputs

    def trunk_padding(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The GRU trunks' ``is_pad`` where the actor was trained to skip a window's padding (``label_every_step``),
        so the loaded BC policy acts as it did there; nothing otherwise (the trunk reads the whole window)."""
        if not self.label_every_step:
            return {}
        if "obs_is_pad" not in obs:
            raise ToolkitError("PPO with policy.label_every_step needs each window's obs_is_pad (the GRU starts at "
                               "the episode's first step)")
        return {"is_pad": obs["obs_is_pad"]}

    def _distribution(self, head_out: torch.Tensor, log_std: torch.Tensor | None) -> torch.distributions.Distribution:
        first = head_out.view(len(head_out), self.horizon, self.out_per_step)[:, 0]  # BC's chunk: its first action
        # no argument validation: a diverged update's NaN must reach the loss (StopOnNonFiniteLoss names the step)
        # or _sample's check, not fail inside torch.distributions
        if self.discrete:
            return Categorical(logits=first, validate_args=False)
        return Normal(first, log_std.exp().expand_as(first), validate_args=False)

    def set_reference(self) -> None:
        """``bc_kl_coef``: the actor as it is now (init_from has just loaded the BC checkpoint) becomes the
        reference the KL penalty holds the policy near."""
        if self.bc_kl_coef == 0:
            return
        self.reference_trunk.load_state_dict(self.trunk.state_dict())
        self.reference_head.load_state_dict(self.head.state_dict())
        if self.reference_state_encoder is not None:
            self.reference_state_encoder.load_state_dict(self.state_encoder.state_dict())
        if not self.discrete:
            self.reference_log_std.copy_(self.log_std.detach())
        self.reference_set.fill_(True)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.bc_kl_coef > 0 and not bool(self.reference_set):
            raise ToolkitError(f"policy.bc_kl_coef={self.bc_kl_coef} penalizes the KL to the policy that init_from "
                               f"loaded, and this run has no init_from: set init_from=<BC checkpoint> or "
                               f"policy.bc_kl_coef=0")

    def log_prob(self, dist: torch.distributions.Distribution, action: torch.Tensor) -> torch.Tensor:
        return dist.log_prob(action.long()) if self.discrete else dist.log_prob(action).sum(-1)

    def entropy(self, dist: torch.distributions.Distribution) -> torch.Tensor:
        return dist.entropy() if self.discrete else dist.entropy().sum(-1)

    def predict(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        """For act(): BC's prediction (the mean, or the most likely action), or a sample of the policy
        (``deterministic_eval=False``), as ``[B, 1, A]`` normalized actions or ``[B, 1, 1]`` indices."""
        if self.deterministic_eval:
            return super().predict(obs, obs_is_pad)
        dist, _ = self.distribution_and_value({**obs, "obs_is_pad": obs_is_pad})
        if self.discrete:
            return torch.multinomial(dist.probs, 1, generator=self.eval_generator()).float()[:, None]
        noise = torch.randn(dist.mean.shape, generator=self.eval_generator(), device=self.device)
        return (dist.mean + dist.stddev * noise)[:, None]

    # --- the loss ------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Clipped surrogate + (optionally clipped) value loss - entropy bonus, on one minibatch of
        ``obs`` windows, ``action`` (normalized, or indices), ``logprob``, ``value``, ``advantage``, ``ret``."""
        dist, value, inputs = self._forward(batch["obs"])
        logprob = self.log_prob(dist, batch["action"])
        logratio = logprob - batch["logprob"]
        ratio = logratio.exp()
        adv = batch["advantage"]
        if self.norm_adv and len(adv) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip_coef, 1 + self.clip_coef)).mean()
        if self.clip_vloss:
            clipped = batch["value"] + (value - batch["value"]).clamp(-self.clip_coef, self.clip_coef)
            value_loss = 0.5 * torch.max((value - batch["ret"]) ** 2, (clipped - batch["ret"]) ** 2).mean()
        else:
            value_loss = 0.5 * ((value - batch["ret"]) ** 2).mean()
        entropy = self.entropy(dist).mean()
        actor_loss = policy_loss - self.ent_coef * entropy
        extra = {}
        if self.bc_kl_coef > 0:  # KL(policy || BC policy) on the minibatch's states: a pull back to the checkpoint
            with torch.no_grad():
                if self.reference_state_encoder is not None:  # eval: its batch norm as loaded, not this batch's
                    state = self.reference_state_encoder.eval()(batch["obs"]["state"], inputs[2])
                    inputs = (inputs[0], state, inputs[2])
                z = self.reference_trunk(*inputs, **self.trunk_padding(batch["obs"]))
                reference = self._distribution(self.reference_head(z), None if self.discrete else self.reference_log_std)
            bc_kl = kl_divergence(dist, reference)
            extra["bc_kl"] = (bc_kl if self.discrete else bc_kl.sum(-1)).mean()
            actor_loss = actor_loss + self.bc_kl_coef * extra["bc_kl"]
        if self._trainer is not None and self.trainer.global_step < self.critic_warmup_steps:
            actor_loss = actor_loss.detach()  # warm-up: the value loss alone has gradients
        with torch.no_grad():
            approx_kl = ((ratio - 1) - logratio).mean()  # http://joschu.net/blog/kl-approx.html
            clipfrac = ((ratio - 1).abs() > self.clip_coef).float().mean()
            spread = batch["advantage"].std() if len(adv) > 1 else adv.new_zeros(())  # before normalization
        return {"loss": actor_loss + self.vf_coef * value_loss,
                "policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                "approx_kl": approx_kl, "clipfrac": clipfrac, "advantage_std": spread, **extra,
                **({} if self.discrete else {"action_std": self.log_std.detach().exp().mean()})}

    # --- rollouts: the data of one update cycle ------------------------------------------------
    def gae(self, reward: torch.Tensor, value: torch.Tensor, done: torch.Tensor, last_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generalized advantage estimation over ``[S, E]`` steps; ``done[t]`` ends the episode after step t
        (a truncated episode's bootstrap value is already in its reward). Returns (advantages, returns)."""
        advantage = torch.zeros_like(reward)
        last = torch.zeros_like(last_value)
        for t in reversed(range(len(reward))):
            next_value = last_value if t == len(reward) - 1 else value[t + 1]
            alive = 1.0 - done[t]
            delta = reward[t] + self.gamma * next_value * alive - value[t]
            last = delta + self.gamma * self.gae_lambda * alive * last
            advantage[t] = last
        return advantage, advantage + value

    @torch.no_grad()
    def _sample(self, obs: dict[str, Any], fresh: np.ndarray, step: dict[str, Any]) -> np.ndarray:
        """Act in every env: push the observations into the histories, sample, and fill ``step`` with what
        the update needs (filled anew if a simulator crash makes the stepper ask again)."""
        if fresh.any():
            self.reset(fresh)
        lang = self._instruction_embedding(obs)
        hist, is_pad = self.observe(obs)  # observe() replaces the history tensors, never writes into them
        window = {**hist, "lang": lang} if lang is not None else dict(hist)
        if self.label_every_step:
            window["obs_is_pad"] = is_pad
        dist, value = self.distribution_and_value(window)
        check = (dist.logits.sum() if self.discrete else dist.mean.sum() + dist.stddev.sum()) + value.sum()
        if not torch.isfinite(check):  # one reduction and one sync per step: NaN or inf anywhere shows in the sum
            step = self._trainer.global_step if self._trainer is not None else "?"
            raise ToolkitError(f"PPO: the policy's action distribution or value is not finite when acting before "
                               f"update {step}: the weights diverged (an update with a huge step); lower policy.lr or "
                               f"set trainer.gradient_clip_val, and resume from the last good checkpoint")
        action = dist.sample()
        step.update(obs=window, action=action, logprob=self.log_prob(dist, action), value=value)
        if self.discrete:
            return action[:, None].cpu().numpy()
        return self.unnormalize_action(action).cpu().numpy()

    @torch.no_grad()
    def _value_of(self, obs: dict[str, Any], mask: np.ndarray, fresh: np.ndarray | None = None) -> torch.Tensor:
        """V of ``obs`` as the next step after the current histories (nothing is pushed), for the envs in
        ``mask``; an env in ``fresh`` has just started an episode: its window is ``obs`` alone, padded."""
        idx = torch.as_tensor(np.flatnonzero(mask), device=self.device)
        x = self.step_inputs({k: np.asarray(v)[mask] for k, v in obs.items() if k != "instruction"})
        new = torch.as_tensor(np.zeros(len(mask), bool) if fresh is None else fresh, device=self.device)[idx]
        window = {}
        for k, v in x.items():
            rolled = torch.cat([self._hist[k][idx, 1:], v[:, None]], dim=1)
            window[k] = torch.where(new.view(-1, *[1] * (rolled.dim() - 1)), v[:, None].expand_as(rolled), rolled)
        if self.language_conditioned:
            window["lang"] = self._instruction_embedding({"instruction": obs["instruction"][mask]})
        if self.label_every_step:  # one more real step than the history holds, one in all after a reset
            window["obs_is_pad"] = self.window_padding(torch.where(new, 1, self._seen[idx] + 1))
        return self.distribution_and_value(window)[1]

    def online_batches(self, stepper) -> Iterator[dict[str, Any]]:
        """One update cycle: ``n_steps`` steps of every env of ``stepper`` (toolkit.envs.stepper.EnvStepper),
        GAE, then ``n_epochs`` passes of shuffled minibatches (each a dict for ``training_step``), fewer when
        ``target_kl`` is set and a minibatch's approximate KL exceeds it. The cycle's data and position are in
        checkpoints (``on_save_checkpoint``): a run resumed from a checkpoint written in the middle of a cycle
        finishes that cycle's updates before it steps the envs again."""
        if self._cycle is None:
            self._cycle = {"data": self._collect(stepper), "epoch": 0, "start": 0, "order": None}
        cycle, self._approx_kl = self._cycle, None
        cycle["data"], cycle["order"] = _to(cycle["data"], self.device), _to(cycle["order"], self.device)
        data = cycle["data"]
        total = len(data["action"])
        while cycle["epoch"] < self.n_epochs:
            if cycle["order"] is None:
                cycle["order"] = torch.randperm(total, device=self.device)
            while cycle["start"] + self.batch_size <= total:
                if self.target_kl is not None and self._approx_kl is not None and self._approx_kl > self.target_kl:
                    self._cycle = None  # early stop (SB3, CleanRL): the policy moved far enough from the rollout's
                    return
                idx = cycle["order"][cycle["start"]:cycle["start"] + self.batch_size]
                cycle["start"] += self.batch_size
                yield {"obs": {k: v[idx] for k, v in data["obs"].items()},
                       **{k: data[k][idx] for k in ("action", "logprob", "value", "advantage", "ret")}}
            cycle["epoch"], cycle["start"], cycle["order"] = cycle["epoch"] + 1, 0, None
        self._cycle = None

    def _collect(self, stepper) -> dict[str, Any]:
        """``n_steps`` steps of every env with the current weights, then GAE: the cycle's data, flat over steps and envs."""
        was_training = self.training
        self.eval()
        # the training envs' observation histories are their own: evaluation rollouts (the rollout callback's
        # reset/act between two cycles) use the module's rollout history for other envs
        outside, (self._hist, self._seen) = (self._hist, self._seen), self._training_hist
        buffer: dict[str, list] = {"obs": [], "action": [], "logprob": [], "value": [], "reward": [], "done": []}
        for _ in range(self.n_steps):
            restarts, step = stepper.restarts, {}
            tr = stepper.step(lambda obs, fresh: self._sample(obs, fresh, step))
            if stepper.restarts != restarts and buffer["done"]:  # a simulator died: those episodes ended there
                buffer["done"][-1] = torch.ones_like(buffer["done"][-1])
            for k, v in step.items():
                buffer[k].append(v)
            reward = torch.as_tensor(tr["reward"], dtype=torch.float32, device=self.device)
            if tr["truncated"].any():  # a time limit is not the task's end: bootstrap from V(s_T) (as SB3 does)
                next_obs = {**tr["next_obs"], "instruction": tr["obs"]["instruction"]}
                reward[torch.as_tensor(tr["truncated"])] += self.gamma * self._value_of(next_obs, tr["truncated"])
            buffer["reward"].append(reward)
            buffer["done"].append(torch.as_tensor(tr["terminated"] | tr["truncated"], dtype=torch.float32, device=self.device))
        every = np.ones(stepper.num_envs, bool)
        last_value = self._value_of(stepper.observation(), every, stepper.fresh)
        self._training_hist, (self._hist, self._seen) = (self._hist, self._seen), outside
        self.train(was_training)
        value, reward, done = (torch.stack(buffer[k]) for k in ("value", "reward", "done"))
        advantage, ret = self.gae(reward, value, done, last_value)
        return {"obs": {k: torch.cat([w[k] for w in buffer["obs"]]) for k in buffer["obs"][0]},
                "action": torch.cat(buffer["action"]), "logprob": torch.cat(buffer["logprob"]),
                "value": value.flatten(), "advantage": advantage.flatten(), "ret": ret.flatten()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._cycle is not None:  # tensors and ints only: checkpoints load with weights_only=True
            checkpoint["ppo_cycle"] = self._cycle

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._cycle = checkpoint.get("ppo_cycle")

    # --- Lightning -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        if self.target_kl is not None:
            kl = losses["approx_kl"]
            if self.trainer.world_size > 1:  # every DDP process must stop the cycle at the same minibatch
                kl = self.trainer.strategy.reduce(kl.detach().clone(), reduce_op="mean")
            self._approx_kl = float(kl)
        if self._loggers_write_this_step():
            self.log_online_step(losses)
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation is the rollout callback's evaluation at unseen seeds: no held-out loss online."""


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, torch.Tensor) else x
