"""A test-only callback for DDP runs: at the end of training, every process's parameter checksum and the
windows it trained on are gathered, and rank 0 writes them to ``<output_dir>/ddp_probe.json``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class DDPProbe(L.Callback):
    def __init__(self, path: str) -> None:
        self.path, self.actions = Path(path), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.actions.append(float(batch["action"].double().sum()))  # identifies the batch's windows

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = torch.tensor(sum(float(p.double().sum()) for p in pl_module.parameters()), dtype=torch.float64)
        sums = pl_module.all_gather(checksum).cpu().tolist()
        batches = pl_module.all_gather(torch.tensor(self.actions[-4:], dtype=torch.float64)).cpu().tolist()
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"world_size": trainer.world_size, "param_sums": sums, "batches": batches,
                                             "global_step": trainer.global_step}))


class BatchLog(L.Callback):
    """Appends ``{"step", "batch", "lr"}`` per training step to a JSON-lines file: which windows each step
    trained on (the sum of the batch's actions identifies them) and the learning rate it used."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch": float(batch["action"].double().sum()), "lr": lr}) + "\n")
