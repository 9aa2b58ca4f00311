"""Guards that keep a long run's last good state: stop at the first non-finite loss."""

from __future__ import annotations

import math

import lightning as L

from toolkit.errors import ToolkitError


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN/inf training loss with a message naming the step and the last good
    checkpoint. It runs before the checkpoint callbacks of the same step (Lightning runs those last), so
    no checkpoint is written from the diverged weights."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or math.isfinite(float(loss)):
            return
        last = [c for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
        kept = last[0].last_model_path if last else "none was written yet"
        raise ToolkitError(f"training loss is {float(loss)} at step {trainer.global_step} (batch {batch_idx}); "
                           f"stopped. The last good checkpoint: {kept}. Lower policy.lr, set "
                           f"trainer.gradient_clip_val, or check the data; resume with ckpt_path=<that checkpoint>")
