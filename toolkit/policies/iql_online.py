"""Online fine-tuning of IQL (Kostrikov et al., 2021, section 5.3; SPRINT's fine-tuning stage): the offline IQL
module, unchanged (losses in ``toolkit/policies/iql.py``), trained from a replay buffer that starts with the
offline file's transitions and receives the policy's own.

``python train.py policy=iql_online init_from=<offline IQL checkpoint> data.path=<the file it trained on>``

Each update cycle (``online_batches``, called by ``toolkit.datamodules.online``):
  1. act   : ``env_steps_per_update`` steps of every env with the current actor, exploring: the actor's
             distribution is sampled as the IQL paper does (categorical for discrete actions, the learned
             Gaussian for ``actor_head=gaussian``); the deterministic head's mean gets Gaussian noise of
             ``exploration_noise`` (normalized action units, 0: act with the mean);
  2. store : each step's transition in the replay buffer: the observation window the actor saw (history
             T, padded at an episode's start as the dataset pads), the action sent to the env, the reward,
             ``done`` = terminated (a time limit is not the task's end: the target bootstraps from V of the
             true next observation, which the stepper gives before resetting), the next step's inputs and
             the instruction embedding;
  3. update: ``updates_per_cycle`` minibatches of ``batch_size``, in the batch format of offline IQL
             (``toolkit.datamodules.windows``: obs, obs_is_pad, action [B, 1, A], action_is_pad, reward, done,
             next_obs, next_obs_is_pad, lang), each a ``training_step``.

Replay buffer (``ReplayBuffer``): one set of preallocated CPU tensors of ``data.replay_size`` rows. The file's
transitions (the first ``data.num_demos`` episodes, train and valid splits) fill the first rows and are kept
for the whole run; the rest is a ring of the policy's transitions, the oldest overwritten first when full.
A minibatch draws ``round(offline_ratio * B)`` offline samples and the rest online (uniformly, with
replacement, within each part; RLPD's symmetric sampling at 0.5); while the online part holds fewer than
its share, a minibatch takes as many online samples as there are online transitions and fills up with
offline ones. ``offline_ratio=null`` samples uniformly over everything stored (the IQL paper's single
buffer). Rows hold what ``compute_loss`` needs as the policy consumes it: images as uint8 frames, or with a
frozen encoder its features (float16, from the file's feature cache for the offline part), so a frozen
encoder never re-encodes a stored frame. A next window is the window shifted by one step plus the next
step's inputs, so a row stores T + 1 frames per camera, not 2T; at an episode's last step in the file
(``done`` = 1) the next window is not the file's (never used: done masks V(s')).

Not in checkpoints: the buffer (it can be gigabytes). A resumed run refills the offline part from the file
and collects online transitions anew; the env step count and RNG are restored by the datamodule.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import Categorical

from toolkit.errors import ToolkitError
from toolkit.policies.iql import IQLPolicy

log = logging.getLogger(__name__)


class ReplayBuffer:
    """Transitions as rows of preallocated tensors: ``n_offline`` fixed rows first, then a ring of online rows.

    A row (``add`` / ``add_offline`` take a batch of rows as a dict of tensors with a leading row dim):
    ``obs/<key>`` ``[T, ...]`` (the window), ``next/<key>`` ``[...]`` (the next step's inputs), ``obs_is_pad``
    ``[T]``, ``action`` ``[A]`` (env units, or the index for discrete actions), ``reward``, ``done``, and
    ``lang`` ``[Dl]`` for language-conditioned policies. Never more than ``capacity`` rows.
    """

    def __init__(self, capacity: int, offline_ratio: float | None = 0.5, generator: torch.Generator | None = None) -> None:
        if capacity < 1:
            raise ToolkitError(f"data.replay_size={capacity}: the replay buffer needs room for transitions")
        if offline_ratio is not None and not 0.0 <= offline_ratio <= 1.0:
            raise ToolkitError(f"policy.offline_ratio={offline_ratio}: a fraction in [0, 1], or null (uniform "
                               f"over offline and online transitions)")
        self.capacity, self.offline_ratio, self.generator = capacity, offline_ratio, generator
        self.data: dict[str, torch.Tensor] | None = None
        self.n_offline = 0  # rows [0, n_offline): the file's, kept
        self.n_online = 0  # rows [n_offline, n_offline + n_online): the policy's (a ring once full)
        self.added_online = 0  # online transitions ever added (the dropped ones included)
        self._next = 0  # the ring's next row, relative to n_offline

    def __len__(self) -> int:
        return self.n_offline + self.n_online

    @property
    def online_capacity(self) -> int:
        return self.capacity - self.n_offline

    def bytes_per_row(self) -> int:
        return 0 if self.data is None else sum(v[0].nelement() * v.element_size() for v in self.data.values())

    def _check(self, rows: dict[str, torch.Tensor]) -> int:
        n = len(rows["reward"])
        if any(len(v) != n for v in rows.values()):
            raise ValueError(f"rows of unequal lengths: { {k: len(v) for k, v in rows.items()} }")
        if self.data is None:  # the first rows decide the layout (dtypes included)
            self.data = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in rows.items()}
        elif rows.keys() != self.data.keys() or any(v.shape[1:] != self.data[k].shape[1:] for k, v in rows.items()):
            raise ToolkitError("the policy's transitions do not match the offline file's: "
                               f"{ {k: tuple(v.shape[1:]) for k, v in rows.items()} } vs "
                               f"{ {k: tuple(v.shape[1:]) for k, v in self.data.items()} }")
        return n

    def add_offline(self, rows: dict[str, torch.Tensor]) -> None:
        """Append offline rows (before any online one); they stay for the whole run."""
        if self.n_online:
            raise ValueError("offline transitions go in before the online ones")
        n = self._check(rows)
        if self.n_offline + n >= self.capacity:
            raise ToolkitError(f"data.replay_size={self.capacity} leaves no room for online transitions after the "
                               f"offline file's {self.n_offline + n}: raise data.replay_size or lower data.num_demos")
        for k, v in rows.items():
            self.data[k][self.n_offline:self.n_offline + n] = v
        self.n_offline += n

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Append online rows; when the buffer is full the oldest online rows are overwritten."""
        n = self._check(rows)
        cap = self.online_capacity
        if n > cap:  # more than fit at once: only the newest
            rows, n = {k: v[-cap:] for k, v in rows.items()}, cap
        where = self.n_offline + (self._next + torch.arange(n)) % cap
        for k, v in rows.items():
            self.data[k][where] = v.to(self.data[k].dtype)
        self._next = (self._next + n) % cap
        self.n_online = min(self.n_online + n, cap)
        self.added_online += n

    def split(self, batch_size: int) -> tuple[int, int]:
        """(offline, online) samples of a minibatch of ``batch_size`` under ``offline_ratio`` and what is stored."""
        if not len(self):
            raise ValueError("the replay buffer is empty")
        if not self.n_online:
            return batch_size, 0
        if not self.n_offline:
            return 0, batch_size
        if self.offline_ratio is None:  # uniform over all rows: the online count is binomial
            online = int((torch.randint(0, len(self), (batch_size,), generator=self.generator) >= self.n_offline).sum())
        else:
            online = min(batch_size - round(self.offline_ratio * batch_size), self.n_online)
        return batch_size - online, online

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        """Rows of one minibatch: its offline samples first, then its online ones."""
        offline, online = self.split(batch_size)
        return torch.cat([torch.randint(0, max(self.n_offline, 1), (offline,), generator=self.generator),
                          self.n_offline + torch.randint(0, max(self.n_online, 1), (online,), generator=self.generator)])

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        """The rows ``idx`` as IQL's batch (``toolkit.datamodules.windows`` with transitions, horizon 1)."""
        d, b = self.data, len(idx)
        obs = {k[4:]: v[idx] for k, v in d.items() if k.startswith("obs/")}
        pad = d["obs_is_pad"][idx]
        batch = {
            "obs": obs, "obs_is_pad": pad,
            "action": d["action"][idx][:, None], "action_is_pad": torch.zeros(b, 1, dtype=torch.bool),
            "next_obs": {k: torch.cat([v[:, 1:], d[f"next/{k}"][idx][:, None]], dim=1) for k, v in obs.items()},
            "next_obs_is_pad": torch.cat([pad[:, 1:], torch.zeros(b, 1, dtype=torch.bool)], dim=1),
            "reward": d["reward"][idx], "done": d["done"][idx],
        }
        if "lang" in d:
            batch["lang"] = d["lang"][idx]
        return batch

    def sample(self, batch_size: int) -> dict[str, Any]:
        return self.batch(self.sample_indices(batch_size))


def _half_features(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached encoder features are stored in float16 (as the feature cache stores them), the rest as is."""
    return {k: v.half() if k.endswith("_features") else v for k, v in x.items()}


class IQLOnline(IQLPolicy):
    online = True  # train.py feeds it from the simulator (toolkit.datamodules.online)

    def __init__(
        self,
        *args,
        batch_size: int = 64,
        offline_ratio: float | None = 0.5,
        env_steps_per_update: int = 8,
        updates_per_cycle: int = 32,
        exploration_noise: float = 0.1,
        deterministic_eval: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if env_steps_per_update < 1 or updates_per_cycle < 1:
            raise ToolkitError(f"policy.env_steps_per_update={env_steps_per_update} and policy.updates_per_cycle="
                               f"{updates_per_cycle} must be >= 1")
        if exploration_noise < 0:
            raise ToolkitError(f"policy.exploration_noise={exploration_noise} must be >= 0")
        self.batch_size, self.offline_ratio = batch_size, offline_ratio
        self.env_steps_per_update, self.updates_per_cycle = env_steps_per_update, updates_per_cycle
        self.exploration_noise = exploration_noise
        # act() (evaluation rollouts, eval.py): the actor's mode (True), or the exploring policy of the training
        # envs (False: categorical samples, the Gaussian head's samples or the mean + exploration_noise)
        self.deterministic_eval = deterministic_eval
        self.replay: ReplayBuffer | None = None  # built on the first cycle (make_replay_buffer)
        self._train_hist: tuple | None = None  # the training envs' histories, kept apart from evaluation rollouts'
        self._lang_cache: dict[str, torch.Tensor] = {}

    # --- the replay buffer ---------------------------------------------------------------------
    def make_replay_buffer(self, path: str | Path | None, num_demos: int | None, replay_size: int,
                           env_cfg: Any = None, language: Any = None) -> ReplayBuffer:
        """A buffer of ``replay_size`` rows holding the transitions of the first ``num_demos`` episodes of
        ``path`` (none when ``path`` is None); ``env_cfg``: the run's env, which the file must have been
        collected in; ``language``: the datamodule's language encoder (language-conditioned policies)."""
        buffer = ReplayBuffer(replay_size, self.offline_ratio)
        if path is None:
            return buffer
        path = Path(path)
        if not path.is_file():
            raise ToolkitError(f"policy=iql_online seeds its replay buffer with data.path={path}: no such file; point "
                               f"data.path at the episode file the offline IQL trained on (data.path=null: start "
                               f"with online transitions only)")
        for rows in self._offline_rows(path, num_demos, env_cfg, language):
            buffer.add_offline(rows)
        log.info(f"replay buffer: {buffer.n_offline} offline transitions of {path}, room for "
                 f"{buffer.online_capacity} online ones, {buffer.bytes_per_row() / 2**10:.1f} KiB each "
                 f"({buffer.capacity * buffer.bytes_per_row() / 2**30:.2f} GiB when full)")
        return buffer

    def _offline_rows(self, path: Path, num_demos: int | None, env_cfg: Any, language: Any) -> Iterator[dict[str, torch.Tensor]]:
        """The file's transition windows (``WindowDataset`` with transitions, horizon 1), as buffer rows."""
        from toolkit.datamodules.episode_datamodule import EpisodeDataModule

        if env_cfg is not None:
            from toolkit.data_env_checks import check_collected_file
            from toolkit.envs.vector import check_env

            check_collected_file(path, check_env(env_cfg).env_args)  # same env, same reward
        episodes = EpisodeDataModule(str(path), num_demos=num_demos, history=self.history, horizon=1,
                                     obs_keys=[*self.rgb_keys, "state"], feature_cache=False)
        episodes.transitions = True
        if self.language_conditioned:
            if language is None:
                raise ToolkitError("the policy is language-conditioned but the run has no language encoder (language=null?)")
            episodes.language = language
        if self.caches_features():  # a frozen encoder: the offline part holds the file's cached features
            from omegaconf import OmegaConf

            from toolkit.encoders.cache import build_feature_cache

            encoder_cfg = (self.toolkit_cfg or {}).get("encoder") or {"_target_": type(self.encoder).__name__}
            episodes.feature_path = build_feature_cache(self.encoder, OmegaConf.to_container(OmegaConf.create(encoder_cfg)),
                                                        path, self.rgb_keys)
        episodes.setup("fit")
        mine, theirs = self.hparams["shape_meta"], episodes.shape_meta
        fields = ("rgb_keys", "state_dim", "action_dim")
        if [mine[k] for k in fields] != [theirs[k] for k in fields] or any(
                list(v) != list(theirs["image_shape"].get(k, ())) for k, v in mine.get("image_shape", {}).items()):
            raise ToolkitError(f"data.path={path} holds other observations or actions than the policy takes: file "
                               f"{theirs}, policy {mine}; point data.path at the file the checkpoint trained on")
        for dataset in (episodes.train_set, episodes.valid_set):
            if dataset is None:
                continue
            for start in range(0, len(dataset), 256):
                b = dataset.get_batch(np.arange(start, min(start + 256, len(dataset))))
                rows = {**{f"obs/{k}": v for k, v in _half_features(b["obs"]).items()},
                        **{f"next/{k}": v[:, -1] for k, v in _half_features(b["next_obs"]).items()},
                        "obs_is_pad": b["obs_is_pad"], "action": b["action"][:, 0].float(),
                        "reward": b["reward"].float(), "done": b["done"].float()}
                if "lang" in b:
                    rows["lang"] = b["lang"].float()
                yield rows

    # --- acting --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _training_envs(self) -> Iterator[None]:
        """The observation histories of the training envs, swapped in for the duration of the block (the
        rollout callback's evaluation resets and fills the policy's own histories in between cycles)."""
        saved = (self._hist, self._seen)
        self._hist, self._seen = self._train_hist if self._train_hist is not None else (None, None)
        try:
            yield
        finally:
            self._train_hist = (self._hist, self._seen)
            self._hist, self._seen = saved

    def _lang(self, obs: dict[str, Any]) -> torch.Tensor | None:
        """Instruction embeddings ``[E, Dl]``, each instruction embedded once per run."""
        if not self.language_conditioned:
            return None
        if "lang" in obs or self.language is None:
            return self._instruction_embedding(obs)
        texts = [str(i) for i in obs["instruction"]]
        new = [t for t in dict.fromkeys(texts) if t not in self._lang_cache]
        if new:
            self._lang_cache.update(zip(new, self._instruction_embedding({"instruction": np.asarray(new, object)})))
        return torch.stack([self._lang_cache[t] for t in texts]).to(self.device)

    def predict(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        """For act(): the actor's mode, or (``deterministic_eval=False``) a sample of the exploring policy, drawn
        from ``eval_generator()``; normalized ``[B, H, A]`` (discrete: indices ``[B, H, 1]``)."""
        if self.deterministic_eval:
            return super().predict(obs, obs_is_pad)
        out = self.actor(self.features(obs, obs.get("lang")))
        if self.discrete:
            action = torch.multinomial(torch.softmax(out, -1), 1, generator=self.eval_generator()).float()
        else:
            std = self.log_std.clamp(-5.0, 2.0).exp() if self.actor_head == "gaussian" else self.exploration_noise
            action = out + std * torch.randn(out.shape, generator=self.eval_generator(), device=self.device)
        return action[:, None].expand(-1, self.horizon, -1)

    @torch.no_grad()
    def _explore(self, obs: dict[str, Any], fresh: np.ndarray, step: dict[str, Any]) -> np.ndarray:
        """Act in every env with exploration, and record in ``step`` the window and action of the transition."""
        if fresh.any():
            self.reset(fresh)
        lang = self._lang(obs)
        hist, is_pad = self.observe(obs)
        window = {k: v.clone() for k, v in hist.items()}
        out = self.actor(self.features(window, lang))
        if self.discrete:  # sampled from the categorical actor (IQL's online phase samples its policy)
            action = Categorical(logits=out).sample()[:, None].float()
        else:
            std = self.log_std.clamp(-5.0, 2.0).exp() if self.actor_head == "gaussian" else self.exploration_noise
            action = self.unnormalize_action(out + std * torch.randn_like(out))  # clipped to the data's range
        step.update(window=window, is_pad=is_pad.clone(), lang=lang, action=action)
        return action.long().cpu().numpy() if self.discrete else action.cpu().numpy()

    @torch.no_grad()
    def collect(self, stepper, steps: int) -> None:
        """``steps`` steps of every env of ``stepper`` (``toolkit.envs.stepper.EnvStepper``), each transition
        added to the replay buffer."""
        was_training = self.training
        self.eval()
        try:
            with self._training_envs():
                for _ in range(steps):
                    step: dict[str, Any] = {}
                    tr = stepper.step(lambda obs, fresh: self._explore(obs, fresh, step))
                    nxt = _half_features(self.step_inputs(tr["next_obs"]))  # the true next observation
                    rows = {**{f"obs/{k}": v for k, v in _half_features(step["window"]).items()},
                            **{f"next/{k}": v for k, v in nxt.items()},
                            "obs_is_pad": step["is_pad"], "action": step["action"].float(),
                            "reward": torch.as_tensor(tr["reward"], dtype=torch.float32),
                            "done": torch.as_tensor(tr["terminated"], dtype=torch.float32)}
                    if step["lang"] is not None:
                        rows["lang"] = step["lang"].float()
                    self.replay.add({k: v.cpu() for k, v in rows.items()})
        finally:
            self.train(was_training)

    def online_batches(self, stepper) -> Iterator[dict[str, Any]]:
        """One update cycle: ``env_steps_per_update`` steps of every env into the replay buffer, then
        ``updates_per_cycle`` minibatches sampled from it (each a dict for ``training_step``)."""
        if self.replay is None:
            dm = self.trainer.datamodule
            self.replay = self.make_replay_buffer(dm.path, dm.num_demos, dm.replay_size, dm.env_cfg, dm.language)
        self.collect(stepper, self.env_steps_per_update)
        for _ in range(self.updates_per_cycle):
            yield self.replay.sample(self.batch_size)

    # --- Lightning -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        if self._loggers_write_this_step():
            self.log_online_step(losses, None if self.replay is None else
                                 {"replay/offline": self.replay.n_offline, "replay/online": self.replay.n_online})
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation is the rollout callback's evaluation at unseen seeds: no held-out loss online."""
