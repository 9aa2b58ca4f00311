"""The observation trunk shared by the policies: a causal transformer over the history window."""

from __future__ import annotations

import torch
from torch import nn


class ObsTrunk(nn.Module):
    """Observation history -> one feature vector ``[B, d_model]``.

    Per step: image tokens (projected), a state token, an optional instruction token (the same projected
    ``lang`` at every step) and a readout token, plus time and slot embeddings. Attention is
    block-causal over time (a step sees its own tokens and earlier steps'); padded steps hold copies of
    the episode's first frame, so they need no mask (masking them would leave the first step's tokens
    nothing to attend to). Returns the last step's readout.
    """

    def __init__(self, num_image_tokens: int, image_dim: int, state_dim: int, history: int, d_model: int = 128,
                 num_layers: int = 2, num_heads: int = 4, dropout: float = 0.0, lang_dim: int | None = None) -> None:
        super().__init__()
        self.tokens_per_step = num_image_tokens + 2 + (lang_dim is not None)
        self.image_proj = nn.Linear(image_dim, d_model)
        self.state_proj = nn.Linear(state_dim, d_model)
        self.lang_proj = nn.Linear(lang_dim, d_model) if lang_dim is not None else None
        self.readout = nn.Parameter(torch.zeros(d_model))
        self.time_emb = nn.Parameter(torch.zeros(history, 1, d_model))
        self.slot_emb = nn.Parameter(torch.zeros(1, self.tokens_per_step, d_model))
        nn.init.trunc_normal_(self.time_emb, std=0.02)
        nn.init.trunc_normal_(self.slot_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        step = torch.arange(history).repeat_interleave(self.tokens_per_step)
        self.register_buffer("causal_mask", step[None, :] > step[:, None], persistent=False)

    def forward(self, image_tokens: torch.Tensor, state: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """``image_tokens [B, T, N, D]``, normalized ``state [B, T, Ds]``, ``lang [B, Dl]`` -> ``[B, d_model]``."""
        b, t = state.shape[:2]
        parts = [self.image_proj(image_tokens), self.state_proj(state)[:, :, None]]
        if self.lang_proj is not None:
            if lang is None:
                raise ValueError("this policy was built with lang_dim: the batch / obs must hold 'lang' [B, Dl]")
            parts.append(self.lang_proj(lang.float())[:, None, None].expand(b, t, 1, -1))
        parts.append(self.readout.expand(b, t, 1, -1))
        tokens = torch.cat(parts, dim=2) + self.time_emb[:t] + self.slot_emb
        n = t * self.tokens_per_step
        out = self.transformer(tokens.flatten(1, 2), mask=self.causal_mask[:n, :n])
        return self.norm(out[:, -1])
