"""The observation trunks shared by the policies: a causal transformer over the history window, a recurrent
network (GRU) over it, or plain concatenation (frame stacking) for MLP heads. ``policy.trunk`` picks one
(``make_trunk``)."""

from __future__ import annotations

import torch
from torch import nn


def required_lang(lang: torch.Tensor | None) -> torch.Tensor:
    """The instruction embedding ``[B, Dl]`` (float) of a trunk built with ``lang_dim``."""
    if lang is None:
        raise ValueError("this policy was built with lang_dim: the batch / obs must hold 'lang' [B, Dl]")
    return lang.float()


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
        self.out_dim = d_model
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
            parts.append(self.lang_proj(required_lang(lang))[:, None, None].expand(b, t, 1, -1))
        parts.append(self.readout.expand(b, t, 1, -1))
        tokens = torch.cat(parts, dim=2) + self.time_emb[:t] + self.slot_emb
        n = t * self.tokens_per_step
        out = self.transformer(tokens.flatten(1, 2), mask=self.causal_mask[:n, :n])
        return self.norm(out[:, -1])


class ConcatTrunk(nn.Module):
    """Frame stacking: the window's image features, normalized states and the instruction concatenated
    into one vector ``[B, T * (N * D + Ds) + Dl]`` for MLP heads (as robomimic's and CORL's MLP policies).
    No parameters: with cached features and ``history=1`` the policy is exactly an MLP on features."""

    def __init__(self, num_image_tokens: int, image_dim: int, state_dim: int, history: int,
                 lang_dim: int | None = None) -> None:
        super().__init__()
        self.lang_dim = lang_dim
        self.out_dim = history * (num_image_tokens * image_dim + state_dim) + (lang_dim or 0)

    def forward(self, image_tokens: torch.Tensor, state: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        parts = [image_tokens.flatten(1), state.flatten(1)]
        if self.lang_dim is not None:
            parts.append(required_lang(lang))
        return torch.cat(parts, dim=-1)


class GRUTrunk(nn.Module):
    """Recurrent memory over the window, as the BabyAI models' LSTM: each step's image features (flattened),
    normalized state and instruction -> Linear + GELU -> a GRU of ``num_layers`` over time; the last step's output
    (layer-normed) ``[B, d_model]``. With a window as long as an episode (``data.history``) the policy remembers
    the whole episode; in rollouts the GRU re-reads the window every step (no hidden state to carry or reset).

    Given ``is_pad`` (``[B, T]``, True on the padded steps that open a window) the GRU starts at the first real step
    instead of reading the padding: a step's output then depends on the episode so far and not on how much padding
    the window holds, so every step of a whole-episode window gets the output its own rollout window gets
    (``all_steps``: ``[B, T, d_model]``, what ``policy.label_every_step`` trains on; padded steps' rows are
    meaningless)."""

    def __init__(self, num_image_tokens: int, image_dim: int, state_dim: int, d_model: int = 128,
                 num_layers: int = 1, dropout: float = 0.0, lang_dim: int | None = None) -> None:
        super().__init__()
        self.lang_dim, self.out_dim = lang_dim, d_model
        self.step_proj = nn.Sequential(nn.Linear(num_image_tokens * image_dim + state_dim + (lang_dim or 0), d_model),
                                       nn.GELU())
        self.gru = nn.GRU(d_model, d_model, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, image_tokens: torch.Tensor, state: torch.Tensor, lang: torch.Tensor | None = None,
                is_pad: torch.Tensor | None = None, all_steps: bool = False) -> torch.Tensor:
        """``image_tokens [B, T, N, D]``, normalized ``state [B, T, Ds]``, ``lang [B, Dl]``, ``is_pad [B, T]`` ->
        ``[B, d_model]`` (``[B, T, d_model]`` with ``all_steps``)."""
        b, t = state.shape[:2]
        parts = [image_tokens.flatten(2), state]
        if self.lang_dim is not None:
            parts.append(required_lang(lang)[:, None].expand(b, t, -1))
        x = self.step_proj(torch.cat(parts, dim=-1))
        if is_pad is None:
            out, _ = self.gru(x)
        else:
            out = self._from_first_real_step(x, is_pad)
        return self.norm(out if all_steps else out[:, -1])

    def _from_first_real_step(self, x: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        """The GRU over each window's real steps only: the padding (always at the window's start) is rotated to the
        end and left out by packing, and the outputs rotated back to their steps."""
        t = is_pad.shape[1]
        pads = is_pad.sum(1)
        steps = torch.arange(t, device=x.device)
        to_front = ((steps[None] + pads[:, None]) % t)[..., None].expand(-1, -1, x.shape[-1])
        packed = nn.utils.rnn.pack_padded_sequence(x.gather(1, to_front), (t - pads).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=t)
        back = ((steps[None] - pads[:, None]) % t)[..., None].expand(-1, -1, out.shape[-1])
        return out.gather(1, back)


def make_trunk(kind: str, num_image_tokens: int, image_dim: int, state_dim: int, history: int, d_model: int,
               num_layers: int, num_heads: int, dropout: float, lang_dim: int | None) -> nn.Module:
    """``policy.trunk``: ``transformer`` (``ObsTrunk``), ``gru`` (``GRUTrunk``) or ``concat`` (``ConcatTrunk``); each
    has ``out_dim``."""
    if kind == "transformer":
        return ObsTrunk(num_image_tokens, image_dim, state_dim, history, d_model, num_layers, num_heads, dropout,
                        lang_dim)
    if kind == "gru":
        return GRUTrunk(num_image_tokens, image_dim, state_dim, d_model, num_layers, dropout, lang_dim)
    if kind == "concat":
        return ConcatTrunk(num_image_tokens, image_dim, state_dim, history, lang_dim)
    raise ValueError(f"policy.trunk must be 'transformer', 'gru' or 'concat', got {kind!r}")
