"""One quiet console for every entry point: each log line printed once, no advertising, and the warnings a user
cannot act on filtered here, in one place.

Lightning gives its loggers (``lightning.pytorch``, ``lightning.fabric``) their own console handler when it is
imported before logging is configured, and Hydra then adds its own on the root logger: every Lightning info
line came out twice. Here Lightning's lines go through Hydra's handlers only (console and the run's log file).
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

# warnings raised inside libraries, about their own internals, that no setting of ours changes
UNACTIONABLE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch 2.14, its own pytree use
    r"Constant\(s\) may be too high",  # Meta-World's scripted experts: their gains saturate by design
)


class _DropAdvertising(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_console() -> None:
    """Route Lightning's log lines through the root handlers (once each), drop its tips, filter the warnings
    a user cannot act on. Call after logging is configured (Hydra's job logging), before the Trainer."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropAdvertising) for f in handler.filters):
            handler.addFilter(_DropAdvertising())
    if not logging.getLogger().handlers:  # no logging configured (a library caller): keep Lightning's lines visible
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger().handlers[0].addFilter(_DropAdvertising())
    filter_unactionable_warnings()


def filter_unactionable_warnings() -> None:
    """Ignore ``UNACTIONABLE_WARNINGS`` in this process (simulator processes call it when their env module loads)."""
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
