"""A real Meta-World env that SIGKILLs its own process when reset with one seed: a deterministic stand-in for
a machine dying between two episodes (used by the DAgger interruption test through `env._target_`)."""

from __future__ import annotations

import os
import signal

from toolkit.envs.metaworld import MetaWorldEnv


class SelfKillingMetaWorldEnv(MetaWorldEnv):
    def __init__(self, kill_at_seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kill_at_seed = kill_at_seed

    def reset(self, *, seed=None, options=None):
        if seed == self.kill_at_seed:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().reset(seed=seed, options=options)


class CrashingRolloutEnv(MetaWorldEnv):
    """A real Meta-World env whose process dies (SIGKILL) when reset with ``crash_at_seed`` inside a vector
    env's worker: a simulator crash during rollouts. In the main process (collection) it never dies."""

    def __init__(self, crash_at_seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at_seed = crash_at_seed

    def reset(self, *, seed=None, options=None):
        import multiprocessing

        if seed == self.crash_at_seed and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().reset(seed=seed, options=options)
