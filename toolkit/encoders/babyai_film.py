"""BabyAI 1.1's model of the egocentric symbolic view (Hui et al., 2020; mila-iqia/babyai ``model.py``, architecture
``bow_endpool_res``), as a state encoder (``state_encoder=babyai_film``).

Each cell's object, colour and state are embedded and summed (bag of words), two 3x3 convolutions with batch norm,
then FiLM blocks that modulate the feature map by the instruction (residual), max-pooled over the 7x7 view. Ours
reads the view from BabyAI's symbolic ``state`` (``env.symbolic=true``: the direction's one-hot, then each cell's
one-hots, see ``toolkit.envs.babyai.symbolic_one_hot``): a bias-free linear layer on a cell's concatenated
one-hots is exactly the paper's summed embeddings. The instruction is this toolkit's sentence embedding
(``lang``, MiniLM), where the paper trains a GRU over words.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.policies.trunk import required_lang

DIRECTIONS = 4  # the direction's one-hot leads BabyAI's symbolic state


def _babyai_linear_init(layer: nn.Linear) -> None:
    """BabyAI's ``initialize_parameters`` for linear layers: N(0, 1) rows scaled to unit norm, zero bias."""
    with torch.no_grad():
        layer.weight.normal_(0, 1)
        layer.weight.div_(layer.weight.pow(2).sum(1, keepdim=True).sqrt())
        if layer.bias is not None:
            layer.bias.zero_()


class FiLMBlock(nn.Module):
    """BabyAI's FiLM block: conv-BN-ReLU-conv, then ``x * gamma(lang) + beta(lang)``, BN, ReLU."""

    def __init__(self, lang_dim: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.gamma = nn.Linear(lang_dim, channels)
        self.beta = nn.Linear(lang_dim, channels)
        _babyai_linear_init(self.gamma)
        _babyai_linear_init(self.beta)

    def forward(self, x: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(x * self.gamma(lang)[:, :, None, None] + self.beta(lang)[:, :, None, None]))


class BabyAIViewFiLM(nn.Module):
    """BabyAI's symbolic state ``[B, T, 4 + 7*7*C]`` (raw one-hots) and instruction ``[B, Dl]`` -> per step the
    direction's one-hot and the pooled view features, ``[B, T, 4 + channels]`` (``out_dim``).

    Consecutive equal steps of a window (the padding before an episode's first step repeats it) are encoded once:
    a 64-step window of a 5-step GoToRedBall episode costs 5 encodings, not 64.
    """

    def __init__(self, lang_dim: int | None = None, channels: int = 128, num_film: int = 2,
                 residual: bool = True) -> None:
        super().__init__()
        from toolkit.envs.babyai import VIEW, _symbolic_sizes  # minigrid's vocabulary sizes

        self.view, self.cell_dim = VIEW, sum(_symbolic_sizes())
        self.state_dim = DIRECTIONS + VIEW * VIEW * self.cell_dim
        self.lang_dim, self.residual = lang_dim, residual
        self.out_dim = DIRECTIONS + channels
        self.bow = nn.Linear(self.cell_dim, channels, bias=False)  # one embedding row per (attribute, value)
        nn.init.normal_(self.bow.weight)  # nn.Embedding's N(0, 1), as the paper's ImageBOWEmbedding
        self.convs = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        # without an instruction the paper's model has no FiLM blocks either
        self.films = nn.ModuleList(FiLMBlock(lang_dim, channels) for _ in range(num_film if lang_dim else 0))

    def encode_view(self, state: torch.Tensor, lang: torch.Tensor | None) -> torch.Tensor:
        """``state [N, state_dim]``, ``lang [N, Dl]`` -> pooled view features ``[N, channels]``."""
        cells = state[:, DIRECTIONS:].reshape(len(state), self.view, self.view, self.cell_dim)
        x = self.convs(self.bow(cells).permute(0, 3, 1, 2))
        for film in self.films:
            out = film(x, lang)
            x = out + x if self.residual else out
        return torch.relu(x.amax(dim=(2, 3)))

    def forward(self, state: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = state.shape
        if d != self.state_dim:
            raise ValueError(f"state_encoder=babyai_film reads BabyAI's symbolic state ({self.state_dim} values: "
                             f"env.symbolic=true), got state of size {d}")
        lang = required_lang(lang) if self.films else None  # before any work: a clear error
        state = state.float()
        new = torch.ones(b, t, dtype=torch.bool, device=state.device)
        new[:, 1:] = (state[:, 1:] != state[:, :-1]).any(-1)
        new = new.flatten()
        keep = new.nonzero().squeeze(1)
        step_lang = lang.repeat_interleave(t, 0)[keep] if self.films else None
        features = self.encode_view(state.flatten(0, 1)[keep], step_lang)
        source = new.long().cumsum(0) - 1  # every step reads the features of its window's last new step
        return torch.cat([state[..., :DIRECTIONS], features[source].view(b, t, -1)], dim=-1)
