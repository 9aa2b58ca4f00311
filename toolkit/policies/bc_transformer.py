"""Behaviour cloning with a causal transformer over an observation history (as in InstructRL / SPOC).

The observation trunk (``toolkit.policies.trunk.ObsTrunk``) turns each step of the window into image
tokens (per camera), a state token, an optional instruction token and a readout token, with
block-causal attention over time; the last step's readout predicts the next H actions: continuous ones
regressed (MSE or L1 on normalized actions), or discrete ones (``action_type=discrete``, indices in
``action[..., 0]``) as H categorical distributions trained by cross-entropy.

With ``label_every_step`` (``trunk=gru``, H = 1, windows from ``data.label_every_step``) every step of a window is
scored against its own action, as robomimic's RNN BC trains: a window holds a whole episode (or its steps after the
first ``data.history``), the GRU starts at the episode's first step, and each frame is encoded once per window
instead of once per label whose window holds it.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ToolkitError
from toolkit.policies.base import PolicyModule
from toolkit.policies.trunk import make_trunk


class BCTransformer(PolicyModule):
    def __init__(
        self,
        *args,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
        loss: str = "mse",
        lang_dim: int | None = None,
        trunk: str = "transformer",
        action_type: str = "continuous",
        num_actions: int | None = None,
        label_every_step: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss not in ("mse", "l1"):
            raise ValueError(f"policy.loss must be 'mse' or 'l1', got {loss!r}")
        if action_type not in ("continuous", "discrete"):
            raise ValueError(f"policy.action_type must be 'continuous' or 'discrete', got {action_type!r}")
        if action_type == "discrete" and not num_actions:
            raise ValueError("policy.action_type=discrete needs policy.num_actions")
        if label_every_step and (trunk != "gru" or self.horizon != 1):
            raise ValueError(f"policy.label_every_step needs policy.trunk=gru and data.horizon=1 (one action per step), "
                             f"got trunk={trunk!r}, horizon={self.horizon}")
        self.discrete = action_type == "discrete"
        self.label_every_step = label_every_step
        self.loss_fn = nn.functional.mse_loss if loss == "mse" else nn.functional.l1_loss
        self.trunk = make_trunk(trunk, len(self.rgb_keys) * self.encoder.num_tokens, self.encoder.out_dim,
                                self.state_feature_dim, self.history, d_model, num_layers, num_heads, dropout, lang_dim)
        self.out_per_step = num_actions if self.discrete else self.action_dim
        self.head = nn.Sequential(nn.Linear(self.trunk.out_dim, d_model), nn.GELU(),
                                  nn.Linear(d_model, self.horizon * self.out_per_step))

    def forward_head(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized actions ``[B, H, A]``, or logits ``[B, H, num_actions]`` when discrete; with
        ``label_every_step``, those of every step of the window, ``[B, T, A]`` (``obs_is_pad`` required)."""
        inputs = (self.encode_images(obs), self.encode_state(obs, obs.get("lang")), obs.get("lang"))
        if not self.label_every_step:
            z = self.trunk(*inputs)
            return self.head(z).view(len(z), self.horizon, self.out_per_step)
        if obs_is_pad is None:  # the GRU would read the padding: each step's output would depend on it
            raise ToolkitError("policy.label_every_step needs the window's obs_is_pad")
        z = self.trunk(*inputs, is_pad=obs_is_pad, all_steps=True)
        return self.head(z)

    def acting_head(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        """What the policy acts on at the window's last step: ``[B, H, A]`` normalized actions or logits (with
        ``label_every_step``, H = 1: the last step's of the window's outputs)."""
        out = self.forward_head(obs, obs_is_pad)
        return out[:, -1:] if self.label_every_step else out

    def predict(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        out = self.acting_head(obs, obs_is_pad)
        return out.argmax(-1, keepdim=True).float() if self.discrete else out

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.label_every_step != ("step_action" in batch):
            raise ToolkitError("policy.label_every_step and data.label_every_step must agree (a policy scored on "
                               "every step trains on windows labelled at every step, and only it does)")
        obs = {**batch["obs"], "lang": batch["lang"]} if "lang" in batch else batch["obs"]
        out = self.forward_head(obs, batch.get("obs_is_pad"))
        # every step of the window [B, T], or the action chunk [B, H]
        action, valid = ((batch["step_action"], batch["step_scored"]) if self.label_every_step
                         else (batch["action"], ~batch["action_is_pad"]))
        if self.discrete:
            target = action[..., 0].long()
            per_step = nn.functional.cross_entropy(out.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        else:
            per_step = self.loss_fn(out, self.action_norm.normalize(action), reduction="none").mean(-1)
        valid = valid.float()
        return {"loss": (per_step * valid).sum() / valid.sum().clamp_min(1.0)}
