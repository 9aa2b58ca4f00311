"""The policy contract: a LightningModule that owns its encoder.

Training: ``training_step`` on a batch of windows (see ``toolkit.datamodules.windows``).
Rollouts: ``reset(mask)`` then ``act(obs) -> actions`` on a batch of envs' current observations; the
policy keeps each env's observation history itself, padded at an episode's start exactly as the
dataset pads windows.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch import nn

from toolkit.encoders.base import Encoder
from toolkit.errors import ToolkitError
from toolkit.normalization import Normalizer


def random_shift(images: torch.Tensor, pad: int, groups: int = 1) -> torch.Tensor:
    """Shift uint8 images ``[B, C, H, W]`` by up to ``pad`` pixels, repeating edge pixels (DrQ's
    augmentation). Consecutive ``groups`` images (a window's frames) share one shift."""
    b, _, h, w = images.shape
    dy, dx = (torch.randint(-pad, pad + 1, (2, b // groups), device=images.device)).repeat_interleave(groups, 1)
    rows = (torch.arange(h, device=images.device)[None] + dy[:, None]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=images.device)[None] + dx[:, None]).clamp_(0, w - 1)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class PolicyModule(L.LightningModule):
    """Base class: normalization, image encoding, rollout history, optimizers.

    Subclasses implement ``predict(obs, obs_is_pad) -> normalized actions [B, H, A]`` and
    ``compute_loss(batch) -> dict`` (with the key ``loss``). Offline RL policies set
    ``needs_transitions = True`` to get ``reward``, ``done`` and ``next_obs`` in their batches.
    """

    needs_transitions: bool = False

    def __init__(
        self,
        encoder: Encoder,
        shape_meta: dict[str, Any],
        stats: dict[str, dict[str, list[float]]],
        optimizer: partial,
        scheduler: partial | None = None,
        lr: float = 3e-4,
        history: int = 2,
        horizon: int = 1,
        augment_shift: int = 4,
        blank_images: bool = False,
        state_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "optimizer", "scheduler", "state_encoder"])
        self.encoder = encoder
        # the state's own encoder (state_encoder=babyai_film), reading the raw state; None: the normalized state
        self.state_encoder = state_encoder
        if not shape_meta["rgb_keys"]:  # state only: the encoder is never called, so it has nothing to learn
            encoder.requires_grad_(False)  # (and DDP would stop on parameters without gradients)
        self.optimizer_fn, self.scheduler_fn, self.lr = optimizer, scheduler, lr
        self.rgb_keys: list[str] = list(shape_meta["rgb_keys"])
        self.state_dim, self.action_dim = shape_meta["state_dim"], shape_meta["action_dim"]
        self.state_feature_dim = self.state_dim if state_encoder is None else state_encoder.out_dim  # trunk input
        if getattr(state_encoder, "state_dim", self.state_dim) != self.state_dim:  # before training, not in its step
            raise ToolkitError(f"policy.state_encoder ({type(state_encoder).__name__}) reads a state of size "
                               f"{state_encoder.state_dim}, the data's has {self.state_dim} (BabyAI: env.symbolic=true)")
        self.history, self.horizon = history, horizon
        self.augment_shift, self.blank_images = augment_shift, blank_images
        self.state_norm = Normalizer(stats["obs/state"]["mean"], stats["obs/state"]["std"])
        self.action_norm = Normalizer(stats["actions"]["mean"], stats["actions"]["std"])
        self.register_buffer("action_low", torch.tensor(stats["actions"]["min"], dtype=torch.float32))
        self.register_buffer("action_high", torch.tensor(stats["actions"]["max"], dtype=torch.float32))
        self._hist: dict[str, torch.Tensor] | None = None
        self._seen: torch.Tensor | None = None
        self._caching_state_features = False  # inside fixed_weight_rollouts()
        self.toolkit_cfg: dict | None = None  # the run's resolved config, stored in checkpoints
        # Embeds rollout instructions for a language-conditioned policy (set by train.py / load_policy). Not a
        # submodule: its frozen weights stay out of checkpoints, which name it in toolkit_cfg["language"].
        self.language = None
        # missions / clauses / longest chain of the training episodes (language-conditioned policies), kept in
        # checkpoints for zero-shot evaluation (toolkit.zero_shot)
        self.trained_instructions: dict | None = None

    # --- to implement ---------------------------------------------------------------------------
    def predict(self, obs: dict[str, torch.Tensor], obs_is_pad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- shared pieces --------------------------------------------------------------------------
    def encode_images(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``rgb_*`` uint8 ``[B, T, C, H, W]`` per camera -> tokens ``[B, T, cameras * N, D]``.

        Cached features (``rgb_*_features`` ``[B, T, N, D]``, from a frozen encoder) are used as they are.
        """
        if not self.rgb_keys:  # state-only data
            b, t = obs["state"].shape[:2]
            return obs["state"].new_zeros(b, t, 0, self.encoder.out_dim)
        tokens = []
        for key in self.rgb_keys:
            if f"{key}_features" in obs:
                tokens.append(obs[f"{key}_features"].float())
                continue
            x = obs[key]
            b, t = x.shape[:2]
            x = x.flatten(0, 1)
            if self.blank_images:
                x = torch.zeros_like(x)
            elif self.training and self.augment_shift > 0:
                x = random_shift(x, self.augment_shift, groups=t)
            tokens.append(self.encoder(x).unflatten(0, (b, t)))
        return torch.cat(tokens, dim=2)

    def encode_state(self, obs: dict[str, torch.Tensor], lang: torch.Tensor | None) -> torch.Tensor:
        """The trunk's per-step state input ``[B, T, state_feature_dim]``: the normalized ``state``, or the state
        encoder's features of the raw state (one-hots stay one-hots) and the instruction."""
        if self.state_encoder is None:
            return self.state_norm.normalize(obs["state"])
        if "state_features" in obs:  # a rollout's cached features (fixed_weight_rollouts)
            return obs["state_features"]
        return self.state_encoder(obs["state"], lang)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        if self._loggers_write_this_step():
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True,
                          batch_size=len(batch["action"]))
        return losses["loss"]

    def _loggers_write_this_step(self) -> bool:
        """Lightning's own rule for the steps its loggers write (``trainer.log_every_n_steps``). ``self.log``
        costs ~0.8 ms per key and step on CPU (Lightning 2.6 moves each key's metric state on every call),
        which for IQL's dozen statistics would double the time of an update; the values it would
        drop in between are never written anyway."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        return connector is None or connector.should_update_logs or bool(trainer.fast_dev_run)

    def log_online_step(self, losses: dict[str, torch.Tensor], extra: dict[str, float] | None = None) -> None:
        """Online training's logging step (call it when ``_loggers_write_this_step()``): the env step count and the
        training episodes' success through ``self.log`` (the progress bar shows them); the losses (``train/*``), the
        other env statistics and ``extra`` straight to the loggers, one row at this step, one device sync.
        ``self.log`` costs ~0.8 ms a key: for PPO's ~15 keys every 10th update that was 16% of the whole loop's time
        (bench/ppo_speed.py, log_every_n_steps=10 against never logging)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        env = datamodule.env_metrics() if hasattr(datamodule, "env_metrics") else {}
        bar = {k: env.pop(k) for k in ("env/steps", "env/success") if k in env}
        if bar:
            self.log_dict(bar, prog_bar=True)
        if not self.loggers:
            return
        tensors = {f"train/{k}": v.detach().float().reshape(()) for k, v in losses.items()}
        row = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
        row.update({k: float(v) for k, v in {**env, **(extra or {})}.items()})
        for logger in self.loggers:
            logger.log_metrics(row, step=self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self.compute_loss(batch)
        # windows labelled at every step: the mean over labels, as with one label per window
        labels = int(batch["step_scored"].sum()) if "step_scored" in batch else len(batch["action"])
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=labels)

    def configure_optimizers(self):
        optimizer = self.optimizer_fn(params=[p for p in self.parameters() if p.requires_grad], lr=self.lr)
        if self.scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer=optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["toolkit_cfg"] = self.toolkit_cfg
        checkpoint["trained_instructions"] = self.trained_instructions

    # --- rollouts -------------------------------------------------------------------------------
    def reset(self, mask: np.ndarray | None = None) -> None:
        """Forget the observation history of the envs in ``mask`` (all envs if None: an evaluation starts, and
        a policy that samples in evaluation draws the same stream again, see ``eval_generator``)."""
        if mask is None:
            self._eval_rng = None
        if mask is None or self._seen is None:
            self._hist, self._seen = None, None
        else:
            self._seen[torch.as_tensor(mask, dtype=torch.bool)] = 0

    def eval_generator(self) -> torch.Generator:
        """For policies that sample their actions in evaluation (``deterministic_eval=False``): a generator of
        their own on the module's device, seeded 0 at every evaluation's start (``reset()``), so the same
        weights give the same episodes and the training RNG stays untouched."""
        rng = getattr(self, "_eval_rng", None)
        if rng is None or rng.device != self.device:  # new evaluation, or moved: start the stream anew
            rng = self._eval_rng = torch.Generator(self.device).manual_seed(0)
        return rng

    def caches_features(self) -> bool:
        """Rollouts keep each step's encoder features instead of its frames (a frozen encoder gives the same
        features every time): a step encodes one frame per camera, not the T frames of its history."""
        return bool(getattr(self.encoder, "frozen", False)) and not self.blank_images

    @contextmanager
    def fixed_weight_rollouts(self) -> Iterator[None]:
        """Rollouts during which the weights do not change (an evaluation): ``act`` keeps each step's
        state-encoder features (``state_encoder=``, e.g. BabyAI's FiLM view model) in the history instead of
        encoding the T states of the window again at every step. The histories start anew on entry and exit,
        so no cached feature outlives the weights that computed it."""
        self.reset()
        self._caching_state_features = self.state_encoder is not None
        try:
            yield
        finally:
            self._caching_state_features = False
            self.reset()

    @torch.no_grad()
    def step_inputs(self, obs: dict[str, Any], lang: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step of E envs' observations as the policy's inputs: ``state`` ``[E, Ds]`` and per camera
        ``rgb_*`` uint8 ``[E, C, H, W]``, or ``rgb_*_features`` ``[E, N, D]`` when features are cached; inside
        ``fixed_weight_rollouts`` also ``state_features`` ``[E, Df]``, the state encoder's (of ``lang``)."""
        x = {"state": torch.as_tensor(np.asarray(obs["state"]), device=self.device).float()}
        if x["state"].shape[-1] != self.state_dim:
            raise ToolkitError(f"the env gives a state of size {x['state'].shape[-1]}, this policy was trained on "
                               f"{self.state_dim}: build the env as the training run did (BabyAI: the same "
                               f"env.symbolic)")
        if self._caching_state_features:
            x["state_features"] = self.state_encoder(x["state"][:, None], lang)[:, 0]
        for k in self.rgb_keys:
            frames = torch.as_tensor(np.asarray(obs[k]), device=self.device).permute(0, 3, 1, 2)  # HWC -> CHW
            if self.caches_features():
                x[f"{k}_features"] = self.encoder(frames)
            else:
                x[k] = frames
        return x

    def observe(self, obs: dict[str, Any], lang: torch.Tensor | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Push E envs' current observations into their histories; returns the windows ``[E, T, ...]`` and
        ``is_pad`` ``[E, T]``. A fresh episode (after ``reset``) fills its whole history with its first
        frame, as the dataset pads windows."""
        x = self.step_inputs(obs, lang)
        n = len(x["state"])
        if self._hist is None or len(self._seen) != n:
            self._hist = {k: v[:, None].repeat_interleave(self.history, 1) for k, v in x.items()}
            self._seen = torch.zeros(n, dtype=torch.long, device=self.device)
        if self.history == 1:  # the window is the step itself (no padding, nothing to roll)
            self._hist = {k: v[:, None] for k, v in x.items()}
            self._seen += 1
            return self._hist, torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        fresh = self._seen == 0
        for k, v in x.items():
            rolled = torch.cat([self._hist[k][:, 1:], v[:, None]], dim=1)
            self._hist[k] = torch.where(fresh.view(-1, *[1] * (rolled.dim() - 1)), v[:, None].expand_as(rolled), rolled)
        self._seen += 1
        return self._hist, self.window_padding(self._seen)

    def window_padding(self, seen: torch.Tensor) -> torch.Tensor:
        """``is_pad`` ``[E, T]`` of rollout windows whose episodes have ``seen`` ``[E]`` steps so far (the padding
        comes first, as in the dataset's windows)."""
        return torch.arange(self.history, device=self.device)[None] < (self.history - seen[:, None])

    @torch.no_grad()
    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """Actions ``[E, A]`` for the current observations of E envs (batched over envs). A
        language-conditioned policy also takes ``obs["instruction"]`` (one string per env) or
        ``obs["lang"]`` (embeddings ``[E, Dl]``)."""
        lang = self._instruction_embedding(obs)
        was_training = self.training
        self.eval()  # before observe(): cached state features come from the eval-mode encoder (batch norm)
        hist, is_pad = self.observe(obs, lang)
        predicted = self.predict(hist if lang is None else {**hist, "lang": lang}, is_pad)[:, 0]
        self.train(was_training)
        if getattr(self, "discrete", False):  # action indices [E, 1], as stored in episode files
            return predicted.cpu().numpy()
        return self.unnormalize_action(predicted).cpu().numpy()

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """Normalized actions -> env units, clipped to the range seen in the data."""
        action = self.action_norm.unnormalize(action)
        return torch.maximum(torch.minimum(action, self.action_high), self.action_low)

    @property
    def language_conditioned(self) -> bool:
        return self.hparams.get("lang_dim") is not None

    def _instruction_embedding(self, obs: dict[str, Any]) -> torch.Tensor | None:
        if not self.language_conditioned:
            return None
        if "lang" in obs:
            return torch.as_tensor(np.asarray(obs["lang"]), dtype=torch.float32, device=self.device)
        if "instruction" not in obs:
            raise ValueError("this policy is language-conditioned: act() needs obs['instruction'] (one string per env)")
        if self.language is None:
            raise ValueError("this policy is language-conditioned but has no language encoder: set policy.language "
                             "(load_policy() does it from the checkpoint's config)")
        return self.language.encode([str(i) for i in obs["instruction"]]).to(self.device)


def load_policy(path: str | Path, device: str = "cpu", trust_pickled_code: bool | None = None) -> PolicyModule:
    """Rebuild a trained policy from its checkpoint alone (config, normalization and weights).

    Nothing in the file runs: it is read with ``torch.load(weights_only=True)`` (toolkit.encoders.weights.load_pickled)
    and the classes its config names (``_target_``) must be classes of the toolkit or ``torch.optim``
    (check_checkpoint_targets), else a ToolkitError names the file. ``trust_pickled_code=True`` lifts both checks,
    for this checkpoint and the encoder weights its config names; ``None``: the process-wide setting
    (``trust_pickled_code`` of train.py's config, toolkit.encoders.weights.set_trust_pickled_code)."""
    from hydra.utils import instantiate

    from toolkit.encoders.weights import load_pickled, trusting_pickled_code
    from toolkit.encoders.weights import trust_pickled_code as trusted

    trust = trusted() if trust_pickled_code is None else bool(trust_pickled_code)
    with trusting_pickled_code(trust):
        ckpt = load_pickled(path, map_location=device)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("toolkit_cfg"), dict):
            raise ToolkitError(f"{path}: not a checkpoint written by train.py (no toolkit_cfg)")
        cfg, hp = ckpt["toolkit_cfg"], ckpt["hyper_parameters"]
        if not trust:
            for group in ("policy", "encoder", "language"):
                check_checkpoint_targets(cfg.get(group), f"toolkit_cfg.{group}", path)
        policy = instantiate(cfg["policy"], encoder=instantiate(cfg["encoder"]),
                             shape_meta=hp["shape_meta"], stats=hp["stats"], _convert_="all")
        policy.load_state_dict(ckpt["state_dict"])
        policy.toolkit_cfg = cfg
        policy.trained_instructions = ckpt.get("trained_instructions")
        if policy.language_conditioned:
            policy.language = instantiate(cfg["language"])
    return policy.to(device).eval()


#: Packages whose classes a checkpoint's config may name (``_target_``) for load_policy / zero-shot to build.
TRUSTED_TARGET_PACKAGES = ("toolkit.", "torch.optim.")


def check_checkpoint_targets(node: Any, where: str, path: str | Path) -> None:
    """Refuse a config read from a checkpoint whose ``_target_`` names anything but a class of the toolkit or
    ``torch.optim`` (Hydra's instantiate would call it: ``_target_: os.system`` runs a command just like a
    pickled global does)."""
    import inspect

    from hydra.utils import get_object

    from toolkit.encoders.weights import opt_in_hint

    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            ok = isinstance(target, str) and target.startswith(TRUSTED_TARGET_PACKAGES)
            if ok:
                try:  # a class defined there (not one reached through a module attribute: toolkit.x.subprocess.Popen)
                    obj = get_object(target)
                    ok = inspect.isclass(obj) and f"{obj.__module__}.".startswith(TRUSTED_TARGET_PACKAGES)
                except Exception:  # noqa: BLE001: an unknown name is refused below like a foreign one
                    ok = False
            if not ok:
                raise ToolkitError(f"{path}: refusing to load it: its config sets {where}._target_={target!r}, which "
                                   f"building it would call; a checkpoint may only name classes of "
                                   f"{' or '.join(p.rstrip('.') for p in TRUSTED_TARGET_PACKAGES)}. Nothing was run. "
                                   f"{opt_in_hint()}")
        for key, value in node.items():
            check_checkpoint_targets(value, f"{where}.{key}", path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_checkpoint_targets(value, f"{where}[{i}]", path)
