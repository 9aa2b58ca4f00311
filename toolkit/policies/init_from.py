"""``init_from=<checkpoint>``: start a policy (PPO, online IQL) from any policy checkpoint this toolkit wrote.

The new run takes the checkpoint's encoder config, the actor's architecture fields and its normalization
(shape_meta, stats), so the actor's weights load as they are; the new algorithm's own parts (critic, value
head, log-std) start fresh. The env must match the checkpoint's cameras, state and actions.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from toolkit.errors import ToolkitError

# policy fields that shape the actor's weights (taken from the checkpoint)
ARCHITECTURE = ("history", "horizon", "trunk", "d_model", "num_layers", "num_heads", "loss", "lang_dim",
                "action_type", "num_actions", "blank_images", "hidden_dim", "actor_head", "state_encoder",
                "label_every_step")


def read_init_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint, read without running code from it (``trust_pickled_code`` applies); a clear error when
    it is not a policy checkpoint of this toolkit."""
    from toolkit.encoders.weights import load_pickled

    path = Path(path).expanduser()
    if not path.is_file():
        raise ToolkitError(f"init_from={path}: no such file")
    if not zipfile.is_zipfile(path):  # train.py's checkpoints are torch's zip archives
        raise ToolkitError(f"init_from={path}: not a policy checkpoint written by this toolkit's train.py "
                           f"(not a torch checkpoint archive)")
    ckpt = load_pickled(path)  # unreadable or unsafe content: a ToolkitError naming the file
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("toolkit_cfg"), dict) or "state_dict" not in ckpt:
        raise ToolkitError(f"init_from={path}: not a policy checkpoint written by this toolkit's train.py "
                           f"(no toolkit_cfg / state_dict)")
    return ckpt


def adopt_checkpoint_config(cfg: DictConfig, ckpt: dict[str, Any], spec, path: str | Path) -> None:
    """Write the checkpoint's encoder, language and actor architecture into ``cfg`` (the new run's policy then
    has the same actor), after checking that the run's env gives what the checkpoint was trained on."""
    from hydra.utils import get_class

    from toolkit.data_env_checks import rollout_mismatches
    from toolkit.policies.base import check_checkpoint_targets
    from toolkit.encoders.weights import trust_pickled_code

    source = ckpt["toolkit_cfg"]
    hp = ckpt["hyper_parameters"]
    if not trust_pickled_code():
        for group in ("policy", "encoder", "language"):
            check_checkpoint_targets(source.get(group), f"toolkit_cfg.{group}", path)
    if spec is not None:
        problems = rollout_mismatches(hp["shape_meta"], spec.observation_space, spec.action_space)
        if problems:
            raise ToolkitError(f"init_from={path} was trained on other observations or actions than env "
                               f"{cfg.env._target_} gives ({'; '.join(problems)}): choose the env it was trained in")
    if not getattr(get_class(cfg.policy._target_), "online", False):
        raise ToolkitError(f"init_from is for online fine-tuning (policy=ppo, ppo_flare, iql_online), not "
                           f"{cfg.policy._target_}; to continue a run use ckpt_path=<its last.ckpt> or resume=true")
    if source["policy"].get("label_every_step") and "label_every_step" not in cfg.policy:
        raise ToolkitError(f"init_from={path} was trained with policy.label_every_step=true (its GRU starts at each "
                           f"episode's first step) and {cfg.policy._target_} reads the whole padded window, so it "
                           f"would not act as the checkpoint does: start from it with policy=ppo, or from a BC "
                           f"checkpoint trained with data.label_every_step=false")
    with open_dict(cfg):
        cfg.encoder = OmegaConf.create(source["encoder"])
        if source.get("language") is not None:
            cfg.language = OmegaConf.create(source["language"])
        for key in ARCHITECTURE:  # where both policies have the field (an IQL's hidden_dim means nothing to PPO)
            if key in source["policy"] and key in cfg.policy:
                cfg.policy[key] = source["policy"][key]
        cfg.data.history = source["policy"].get("history", cfg.data.history)


def load_actor_weights(policy, ckpt: dict[str, Any], path: str | Path) -> None:
    """The checkpoint's weights into ``policy``: every tensor of the checkpoint must find its place (same
    name and shape); the policy's own new parts (critic, value head, log-std) may stay fresh."""
    own = policy.state_dict()
    theirs = ckpt["state_dict"]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in theirs.items()
                  if k in own and v.shape != own[k].shape]
    if unexpected or mismatched:
        trained = ((ckpt.get("toolkit_cfg") or {}).get("policy") or {}).get("_target_", "a policy")
        raise ToolkitError(f"init_from={path}: its weights ({trained}) do not fit {type(policy).__name__} "
                           f"(not in the policy: {unexpected[:6] or 'none'}; shapes, checkpoint vs policy: "
                           f"{mismatched[:6] or 'none'})")
    policy.load_state_dict(theirs, strict=False)
    if hasattr(policy, "set_reference"):  # PPO's bc_kl_coef: the loaded actor is what it stays near
        policy.set_reference()
