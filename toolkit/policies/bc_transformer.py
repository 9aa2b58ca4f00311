"""Behaviour cloning with a causal transformer over an observation history (as in InstructRL / SPOC).

Each step of the window contributes image tokens (per camera), one state token and one action query
token. Attention is block-causal over time (a step sees its own tokens and earlier steps'). Padded
steps hold copies of the episode's first frame, so they need no mask (masking them would leave the
first step's tokens nothing to attend to). The last step's action query predicts the next H actions.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.policies.base import PolicyModule


class BCTransformer(PolicyModule):
    def __init__(
        self,
        *args,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
        loss: str = "mse",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss not in ("mse", "l1"):
            raise ValueError(f"policy.loss must be 'mse' or 'l1', got {loss!r}")
        self.loss_fn = nn.functional.mse_loss if loss == "mse" else nn.functional.l1_loss
        n_img = len(self.rgb_keys) * self.encoder.num_tokens
        self.tokens_per_step = n_img + 2  # images, state, action query
        self.image_proj = nn.Linear(self.encoder.out_dim, d_model)
        self.state_proj = nn.Linear(self.state_dim, d_model)
        self.action_query = nn.Parameter(torch.zeros(d_model))
        self.time_emb = nn.Parameter(torch.zeros(self.history, 1, d_model))
        self.slot_emb = nn.Parameter(torch.zeros(1, self.tokens_per_step, d_model))
        nn.init.trunc_normal_(self.time_emb, std=0.02)
        nn.init.trunc_normal_(self.slot_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                  nn.Linear(d_model, self.horizon * self.action_dim))
        step = torch.arange(self.history).repeat_interleave(self.tokens_per_step)
        self.register_buffer("causal_mask", step[None, :] > step[:, None], persistent=False)

    def predict(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        b, t = obs["state"].shape[:2]
        images = self.image_proj(self.encode_images(obs))  # [B, T, n_img, d]
        state = self.state_proj(self.state_norm.normalize(obs["state"]))[:, :, None]
        query = self.action_query.expand(b, t, 1, -1)
        tokens = torch.cat([images, state, query], dim=2) + self.time_emb[:t] + self.slot_emb
        out = self.transformer(tokens.flatten(1, 2), mask=self.causal_mask)
        return self.head(out[:, -1]).view(b, self.horizon, self.action_dim)

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        pred = self.predict(batch["obs"], batch["obs_is_pad"])
        target = self.action_norm.normalize(batch["action"])
        per_step = self.loss_fn(pred, target, reduction="none").mean(-1)
        valid = (~batch["action_is_pad"]).float()
        return {"loss": (per_step * valid).sum() / valid.sum().clamp_min(1.0)}
