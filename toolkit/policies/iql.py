"""Implicit Q-Learning (Kostrikov et al., 2021), as used by SPRINT (Zhang et al., 2023), on pixels + state.

Networks (all on one shared observation feature ``z = trunk(encoder(images), state[, lang])``):
  V(z), twin Q1/Q2(z, a) with a Polyak-averaged target copy, and an actor pi(z).
Losses (all computed in ``compute_loss``, top to bottom, on the batch's step t = the window's last step):
  value  : expectile regression of V(s) towards min(Q1', Q2')(s, a)            (expectile 0.7)
  critic : MSE of Q_i(s, a) towards r + gamma * (1 - done) * V(s')             (gamma 0.99)
  actor  : advantage-weighted regression, weights exp(beta * (minQ'(s,a) - V(s))) clipped at 100 (beta 3)
  chains : on a SPRINT cross-trajectory chain's last step (``batch["bootstrap"]``) the reward is V(s', z2),
           the value of the chained second instruction ``batch["bootstrap_lang"]`` at the state reached
The three losses are summed and back-propagated once; ``detach`` decides which loss reaches which
network (as CORL's IQL, every loss uses the pre-update V and target Q), so one Adam with two parameter
groups replaces separate optimizers: the critic group (V, Q, and by default encoder + trunk) keeps a
constant learning rate, the actor group is cosine-decayed (IQL paper). Automatic optimization is kept,
so the trainer's ``gradient_clip_val`` still works (clipped per group here, see
``configure_gradient_clipping``) and ``trainer.global_step`` counts batches. Target Qs are updated
after every optimizer step (``optimizer_step``), in place with one foreach op.

Design choices:
  * The trunk (``policy.trunk``, shared with the BC transformer): ``transformer`` (per history step image
    tokens, a state token, an optional instruction token and a readout token, block-causal attention
    over time; the last step's readout is ``z``) or ``concat`` (frame stacking for plain MLPs). The
    target network is a copy of the Q *heads* only; it reads the online trunk's (detached) features,
    so there is no second image encoder.
  * The twin Qs are one batched network (``TwinQ``: batched matmuls over a leading member dimension),
    half the small ops of two MLPs; with a fused Adam (the default config) and the foreach Polyak
    update this is what makes an update cheap on CPU (``bench/iql_speed.py``).
  * ``encoder_updated_by`` (critic | actor | all) picks the loss whose gradients reach encoder + trunk;
    the other heads read ``z.detach()``.
  * One action per observation: ``action[:, 0]`` is the action of step t; ``predict`` repeats the
    actor's (mean) action over the horizon H.
  * Discrete actions (``action_type=discrete``): ``action[..., 0]`` holds integer indices, Q heads output
    one value per action, the actor is categorical (weighted cross-entropy) and ``predict`` returns the
    argmax index as a float ``[B, H, 1]`` (not normalized).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from toolkit.policies.base import PolicyModule
from toolkit.policies.trunk import make_trunk

log = logging.getLogger(__name__)


def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's asymmetric L2 on ``u = target - prediction``: ``|expectile - 1(u < 0)| * u^2`` (per element)."""
    return torch.abs(expectile - (u < 0).float()) * u.pow(2)


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float = 100.0) -> torch.Tensor:
    """Advantage-weighted regression weights ``exp(beta * A)`` clipped at ``max_weight`` (no gradient)."""
    return torch.exp(beta * advantage.detach()).clamp(max=max_weight)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    dims = [in_dim] + [hidden] * layers
    body = [m for i in range(layers) for m in (nn.Linear(dims[i], dims[i + 1]), nn.ReLU())]
    return nn.Sequential(*body, nn.Linear(dims[-1], out_dim))


class TwinQ(nn.Module):
    """``members`` MLPs with identical shapes evaluated as one network: ``[B, in] -> [members, B, out]``.

    Layer weights are stacked ``[members, in, out]`` and applied with one batched matmul per layer, so
    twin Qs cost the kernel launches of one MLP. Initialized as ``nn.Linear`` (uniform +-1/sqrt(fan_in))."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, members: int = 2) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * layers + [out_dim]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(members, i, o)) for i, o in zip(dims, dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(members, 1, o)) for o in dims[1:])
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.expand(len(self.weights[0]), *x.shape)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h


class IQLPolicy(PolicyModule):
    needs_transitions = True  # batches carry reward, done and next_obs

    def __init__(
        self,
        *args,
        expectile: float = 0.7,
        beta: float = 3.0,
        max_weight: float = 100.0,
        gamma: float = 0.99,
        tau: float = 0.005,
        actor_head: str = "deterministic",
        action_type: str = "continuous",
        num_actions: int | None = None,
        encoder_updated_by: str = "critic",
        actor_cosine_steps: int | None = None,
        actor_lr: float | None = None,
        lang_dim: int | None = None,
        trunk: str = "transformer",
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        hidden_dim: int = 256,
        max_grad_norm: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.scheduler_fn is not None:
            raise ValueError("policy.scheduler must be null for IQL: it cosine-decays the actor's lr itself "
                             "(policy.actor_cosine_steps)")
        if actor_head not in ("deterministic", "gaussian"):
            raise ValueError(f"policy.actor_head must be 'deterministic' or 'gaussian', got {actor_head!r}")
        if action_type not in ("continuous", "discrete"):
            raise ValueError(f"policy.action_type must be 'continuous' or 'discrete', got {action_type!r}")
        if action_type == "discrete" and not num_actions:
            raise ValueError("policy.action_type=discrete needs policy.num_actions")
        if encoder_updated_by not in ("critic", "actor", "all"):
            raise ValueError(f"policy.encoder_updated_by must be critic|actor|all, got {encoder_updated_by!r}")
        self.expectile, self.beta, self.max_weight = expectile, beta, max_weight
        self.gamma, self.tau = gamma, tau
        self.actor_head, self.discrete = actor_head, action_type == "discrete"
        self.encoder_updated_by, self.actor_cosine_steps = encoder_updated_by, actor_cosine_steps
        if actor_lr is not None and actor_lr <= 0:
            raise ValueError(f"policy.actor_lr={actor_lr}: a positive learning rate, or null (policy.lr)")
        self.actor_lr = actor_lr
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"policy.max_grad_norm={max_grad_norm}: a positive norm, or null (no clipping)")
        self.max_grad_norm = max_grad_norm
        self._told_about_trainer_clipping = False

        self.trunk = make_trunk(trunk, len(self.rgb_keys) * self.encoder.num_tokens, self.encoder.out_dim,
                                self.state_feature_dim, self.history, d_model, num_layers, num_heads, dropout, lang_dim)
        z_dim = self.trunk.out_dim
        q_in, q_out = (z_dim, num_actions) if self.discrete else (z_dim + self.action_dim, 1)
        self.q = TwinQ(q_in, hidden_dim, q_out)
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)
        self.value = mlp(z_dim, hidden_dim, 1)
        self.actor = mlp(z_dim, hidden_dim, num_actions if self.discrete else self.action_dim)
        # Gaussian head: state-independent log std (as IQL's reference implementation)
        self.log_std = nn.Parameter(torch.zeros(self.action_dim)) if actor_head == "gaussian" else None

    # --- networks -------------------------------------------------------------------------------
    def features(self, obs: dict[str, torch.Tensor], lang: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk(self.encode_images(obs), self.encode_state(obs, lang), lang)

    def q_values(self, z: torch.Tensor, action: torch.Tensor, target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Q1, Q2 ``[B]`` at ``action`` (normalized ``[B, A]``, or indices ``[B]`` when discrete)."""
        net = self.target_q if target else self.q
        if self.discrete:
            q = net(z).gather(2, action.long()[None, :, None].expand(2, -1, 1))  # [2, B, 1]
        else:
            q = net(torch.cat([z, action], dim=-1))
        return q[0, :, 0], q[1, :, 0]

    def predict(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        """The actor's mode, repeated over the horizon: normalized ``[B, H, A]`` (discrete: argmax ``[B, H, 1]``)."""
        out = self.actor(self.features(obs, obs.get("lang")))
        action = out.argmax(-1, keepdim=True).float() if self.discrete else out
        return action[:, None].expand(-1, self.horizon, -1)

    # --- losses ---------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        lang = batch.get("lang")
        if self.discrete:
            action = batch["action"][:, 0, 0].long()  # [B] indices
        else:
            action = self.action_norm.normalize(batch["action"][:, 0].float())  # [B, A]
        reward, done = batch["reward"].float(), batch["done"].float()

        # shared features; the loss named by encoder_updated_by is the only one reaching encoder + trunk
        z = self.features(batch["obs"], lang)
        z_critic = z if self.encoder_updated_by in ("critic", "all") else z.detach()
        z_actor = z if self.encoder_updated_by in ("actor", "all") else z.detach()
        with torch.no_grad():
            v_next = self.value(self.features(batch["next_obs"], lang))[:, 0]
            q_target = torch.minimum(*self.q_values(z.detach(), action, target=True))
            if "bootstrap" in batch and batch["bootstrap"].any():  # chained: r = V(s', second instruction)
                v_chain = self.value(self.features(batch["next_obs"], batch["bootstrap_lang"]))[:, 0]
                reward = torch.where(batch["bootstrap"], v_chain, reward)

        # value: expectile regression of V(s) towards min target Q(s, a)
        v = self.value(z_critic)[:, 0]
        advantage = q_target - v
        value_loss = expectile_loss(advantage, self.expectile).mean()

        # critic: TD regression of both Qs towards r + gamma (1 - done) V(s')
        td_target = reward + self.gamma * (1.0 - done) * v_next
        q1, q2 = self.q_values(z_critic, action)
        q_loss = nn.functional.mse_loss(q1, td_target) + nn.functional.mse_loss(q2, td_target)

        # actor: advantage-weighted regression (weights use the pre-update V, detached)
        weights = awr_weights(advantage, self.beta, self.max_weight)
        out = self.actor(z_actor)
        if self.discrete:
            actor_nll = nn.functional.cross_entropy(out, action, reduction="none")
        elif self.actor_head == "gaussian":
            dist = torch.distributions.Normal(out, self.log_std.clamp(-5.0, 2.0).exp())
            actor_nll = -dist.log_prob(action).sum(-1)
        else:
            actor_nll = (out - action).pow(2).sum(-1)
        actor_loss = (weights * actor_nll).mean()

        advantage = advantage.detach()
        return {"loss": value_loss + q_loss + actor_loss,
                "value_loss": value_loss, "q_loss": q_loss, "actor_loss": actor_loss,
                "q1": q1.detach().mean(), "q2": q2.detach().mean(), "v": v.detach().mean(),
                "adv_mean": advantage.mean(), "adv_std": advantage.std(correction=0), "adv_max": advantage.max(),
                "weight_mean": weights.mean(), "weight_max": weights.max()}

    # --- optimization ---------------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: ``critic`` (V, Q) and ``actor``; encoder + trunk join the group of
        ``encoder_updated_by`` (the critic's for ``all``)."""
        shared = [p for m in (self.encoder, self.trunk) for p in m.parameters() if p.requires_grad]
        critic = [*self.q.parameters(), *self.value.parameters()]
        actor = list(self.actor.parameters()) + ([self.log_std] if self.log_std is not None else [])
        if self.encoder_updated_by == "actor":
            return {"critic": critic, "actor": shared + actor}
        return {"critic": shared + critic, "actor": actor}

    def configure_optimizers(self):
        groups = self.param_groups()
        optimizer = self.optimizer_fn(params=[{"params": groups["critic"], "name": "critic"},
                                              {"params": groups["actor"], "name": "actor",
                                               "lr": self.actor_lr or self.lr}], lr=self.lr)
        steps = self.actor_cosine_steps

        def actor_factor(step: int) -> float:  # CosineAnnealingLR(T_max=steps, eta_min=0)
            return 1.0 if not steps else 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1.0, actor_factor])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """No clipping by default, as the IQL references (the paper's JAX code, CORL): ``policy.max_grad_norm``
        clips the critic's and the actor's gradients each to that norm (as two optimizers would, so a large Q
        gradient never shrinks V's or the actor's step). The trainer's ``gradient_clip_val``, which would clip
        every network together, is not used."""
        if gradient_clip_val and not self._told_about_trainer_clipping:
            self._told_about_trainer_clipping = True
            log.info(f"IQL does not use trainer.gradient_clip_val={gradient_clip_val} (it would clip V, both Qs and "
                     f"the actor together); policy.max_grad_norm={self.max_grad_norm} clips each network's gradient")
        if self.max_grad_norm is None:
            return
        for group in optimizer.param_groups:
            nn.utils.clip_grad_norm_(group["params"], self.max_grad_norm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_targets()

    @torch.no_grad()
    def update_targets(self) -> None:
        """Polyak averaging: ``target <- (1 - tau) * target + tau * online``, one in-place foreach op."""
        torch._foreach_lerp_(list(self.target_q.parameters()), list(self.q.parameters()), self.tau)
