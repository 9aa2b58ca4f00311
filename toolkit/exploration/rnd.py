"""Random network distillation (Burda et al. 2018, "Exploration by Random Network Distillation"): the intrinsic
reward of an observation is how badly a trained predictor matches a fixed, randomly initialized target network
on it. States seen often are predicted well (low reward); novel ones are not (high reward).

As the paper (and CleanRL's ``ppo_rnd_envpool.py``):

- both networks see the observation normalized by a running per-pixel mean and std, clipped to [-5, 5]: raw
  pixels would make the random target's features nearly constant;
- the reward is divided by a running std of the intrinsic *returns* (a non-episodic discounted sum per env,
  ``gamma``), so its scale stays steady while the predictor improves;
- the predictor trains on a random ``update_proportion`` of each batch, so that its effective batch (and so
  how fast novelty wears off) does not grow with the number of envs.

Images (``obs_shape`` ``(C, H, W)``, uint8, e.g. Crafter's 64x64 frames) go through the paper's Atari CNN; flat
vectors (``obs_shape`` ``(D,)``) through an MLP. The normalizers are buffers, and the predictor's Adam state and
the subsampling RNG are extra state: ``state_dict`` holds everything a resumed run needs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.errors import ToolkitError


class RunningMeanStd(nn.Module):
    """Mean and variance over every sample seen so far (Chan et al.'s parallel merge), per feature."""

    def __init__(self, shape: Sequence[int] = ()) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(tuple(shape)))
        self.register_buffer("var", torch.ones(tuple(shape)))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold in the batch ``x`` ``[B, *shape]``."""
        x = x.double()
        n, batch_mean, batch_var = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean.double()
        mean = self.mean.double() + delta * n / total
        m2 = self.var.double() * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean.copy_(mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def std(self, eps: float = 1e-8) -> torch.Tensor:
        return (self.var + eps).sqrt()


def _cnn(in_channels: int) -> nn.Sequential:
    """The paper's Atari trunk (8x8/4, 4x4/2, 3x3/1 convs): 64x64 -> 64 x 4 x 4."""
    return nn.Sequential(nn.Conv2d(in_channels, 32, 8, 4), nn.LeakyReLU(), nn.Conv2d(32, 64, 4, 2), nn.LeakyReLU(),
                         nn.Conv2d(64, 64, 3, 1), nn.LeakyReLU(), nn.Flatten())


class RND(nn.Module):
    """``obs_shape``: ``(C, H, W)`` images or ``(D,)`` vectors. ``out_dim``: the target's feature size (the
    paper: 512). ``lr``: the predictor's Adam. ``coef``: the weight of this reward in the env's reward, applied
    by the caller (``toolkit.exploration.terms``), not by ``reward()``; the paper weighs intrinsic against
    extrinsic advantages 1 : 2. ``gamma``: the discount of the intrinsic returns whose std normalizes the reward
    (the paper: 0.99). ``obs_key``: the observation read from a dict of env observations. ``seed``: both
    networks' initialization and the subsampling."""

    def __init__(self, obs_shape: Sequence[int] = (3, 64, 64), out_dim: int = 512, lr: float = 1e-4,
                 update_proportion: float = 0.25, coef: float = 1.0, gamma: float = 0.99,
                 obs_key: str = "rgb_local", seed: int = 0) -> None:
        super().__init__()
        self.obs_shape = tuple(int(s) for s in obs_shape)
        if len(self.obs_shape) not in (1, 3):
            raise ToolkitError(f"intrinsic.obs_shape={list(obs_shape)}: (C, H, W) for images or (D,) for vectors")
        if len(self.obs_shape) == 3 and min(self.obs_shape[1:]) < 36:  # the paper's CNN: 8/4, 4/2, 3/1 convolutions
            raise ToolkitError(f"intrinsic.obs_shape={list(obs_shape)}: RND's CNN needs images of at least 36x36 pixels "
                               f"(env.image_size >= 36)")
        if not 0.0 < update_proportion <= 1.0:
            raise ToolkitError(f"intrinsic.update_proportion={update_proportion}: a fraction of the batch, in (0, 1]")
        self.out_dim, self.update_proportion, self.coef, self.gamma, self.obs_key = \
            out_dim, update_proportion, coef, gamma, obs_key
        with torch.random.fork_rng(devices=[]):  # the seed decides the networks without touching the global RNG
            torch.manual_seed(seed)
            self.target, self.predictor = self._build()
        self.target.requires_grad_(False)  # the target is never trained: its outputs are the fixed "novelty" code
        self.obs_stats = RunningMeanStd(self.obs_shape)
        self.return_stats = RunningMeanStd()
        self.register_buffer("_return", torch.zeros(0), persistent=False)  # per env; rebuilt within a few steps
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=lr)
        self._rng = torch.Generator().manual_seed(seed)  # the subsampling in update()

    def _build(self) -> tuple[nn.Module, nn.Module]:
        if len(self.obs_shape) == 3:
            with torch.no_grad():
                flat = _cnn(self.obs_shape[0])(torch.zeros(1, *self.obs_shape)).shape[1]
            target = nn.Sequential(_cnn(self.obs_shape[0]), nn.Linear(flat, self.out_dim))
            # the predictor is deeper than the target, so that it can fit it (the paper's architecture)
            predictor = nn.Sequential(_cnn(self.obs_shape[0]), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, 512),
                                      nn.ReLU(), nn.Linear(512, self.out_dim))
        else:
            (d,) = self.obs_shape
            target = nn.Sequential(nn.Linear(d, 256), nn.LeakyReLU(), nn.Linear(256, 256), nn.LeakyReLU(),
                                   nn.Linear(256, self.out_dim))
            predictor = nn.Sequential(nn.Linear(d, 256), nn.LeakyReLU(), nn.Linear(256, 256), nn.LeakyReLU(),
                                      nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, self.out_dim))
        for m in [*target.modules(), *predictor.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # the paper's orthogonal init, gain sqrt(2)
                nn.init.orthogonal_(m.weight, np.sqrt(2))
                nn.init.zeros_(m.bias)
        return target, predictor

    # --- observations ------------------------------------------------------------------------------------------
    def _input(self, obs: torch.Tensor | np.ndarray | Mapping[str, Any]) -> torch.Tensor:
        """``[B, *obs_shape]`` float on the module's device, from a tensor or array (images channels-first or
        channels-last, as the toolkit's envs give them) or a dict of observations (``obs_key``)."""
        if isinstance(obs, Mapping):
            if self.obs_key not in obs:
                raise ToolkitError(f"intrinsic.obs_key={self.obs_key}: not among the observations ({', '.join(obs)})")
            obs = obs[self.obs_key]
        x = obs if isinstance(obs, torch.Tensor) else torch.as_tensor(np.asarray(obs))
        x = x.to(self.obs_stats.mean.device)
        if len(self.obs_shape) == 3 and tuple(x.shape[1:]) != self.obs_shape:
            c, h, w = self.obs_shape
            if tuple(x.shape[1:]) == (h, w, c):
                x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[1:]) != self.obs_shape:
            raise ToolkitError(f"intrinsic.obs_shape={list(self.obs_shape)}: the observations are {list(x.shape[1:])} "
                               f"(a batch of {len(x)}); set intrinsic.obs_shape to the env's, channels first")
        return x.float()

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.obs_stats.mean) / self.obs_stats.std()).clamp(-5.0, 5.0)

    def update_obs_stats(self, obs: torch.Tensor | np.ndarray | Mapping[str, Any]) -> None:
        """Fold ``obs`` into the observation normalization (the paper starts with some random-agent steps)."""
        self.obs_stats.update(self._input(obs))

    # --- the reward --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prediction_error(self, obs: torch.Tensor | np.ndarray | Mapping[str, Any]) -> torch.Tensor:
        """``[B]``: the squared distance of predictor and target features (halved, as the paper's code)."""
        x = self._normalize(self._input(obs))
        return (self.predictor(x) - self.target(x)).pow(2).sum(1) / 2

    @torch.no_grad()
    def reward(self, obs: torch.Tensor | np.ndarray | Mapping[str, Any], update_stats: bool = True) -> torch.Tensor:
        """``[B]`` intrinsic rewards: prediction error / std of the intrinsic returns (``coef`` not applied).
        ``update_stats`` (call it once per env step, with every env in the same order): first fold ``obs`` into
        the observation normalization, then this step's errors into each env's discounted intrinsic return and
        its running variance. ``update_stats=False``: a pure function of ``obs`` and the current state."""
        if update_stats:
            self.update_obs_stats(obs)
        error = self.prediction_error(obs)
        if update_stats:
            if self._return.shape != error.shape:  # the first step, or another number of envs
                self._return = torch.zeros_like(error)
            # non-episodic, as the paper: novelty does not end with an episode, so neither does its return
            self._return = self._return * self.gamma + error
            self.return_stats.update(self._return)
        return error / self.return_stats.std().to(error.dtype)

    def update(self, obs: torch.Tensor | np.ndarray | Mapping[str, Any]) -> float:
        """One Adam step of the predictor towards the target on a random ``update_proportion`` of ``obs``
        (at least one sample); returns the loss (mean squared error)."""
        x = self._normalize(self._input(obs))
        keep = max(1, round(self.update_proportion * len(x)))  # a fixed-size subset: never an empty step
        idx = torch.randperm(len(x), generator=self._rng)[:keep].to(x.device)
        x = x[idx]
        with torch.enable_grad():  # callable from a rollout under no_grad
            loss = nn.functional.mse_loss(self.predictor(x), self.target(x))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    # --- checkpoints -------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rng": self._rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # a copy: Adam would otherwise keep stepping the very tensors of the state dict it was given
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._rng.set_state(state["rng"])
