"""The trainer's failure kinds, importable without JAX or orbax (the CLIs map them to exit codes)."""

from __future__ import annotations

from dalle2_jax.training.config import ConfigError


class DamagedCheckpoint(RuntimeError):
    """A checkpoint that cannot be restored as saved (`reason` says what was wrong)."""

    def __init__(self, step: int, path: str, reason: str):
        self.step, self.path, self.reason = step, path, reason
        super().__init__(f"checkpoint {path} is damaged: {reason}")


class NoIntactCheckpoint(RuntimeError):
    """Checkpoints exist but none of them is intact."""


class CheckpointMismatch(ConfigError):
    """A checkpoint of another stage or model than the config's; the message names the mismatching keys."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite steps); the message says why and what to do."""
