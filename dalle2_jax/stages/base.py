"""The interface between the generic trainer and a stage."""

from __future__ import annotations

from typing import Any

import grain
import jax


class Stage:
    """What a trainable stage tells the trainer.

    A stage is built from the resolved config and the workdir. The trainer calls, in order:
    `prepare()` (data sets, tokenizer; once per run, every process), `init_params(rng)` (traced under
    jit: returns logically boxed params), `load_frozen()` (params of frozen models the loss needs, e.g.
    the CLIP of the prior; None if none), `train_iterator(...)`, then `loss(...)` inside the jitted step,
    and `evaluate(...)` with the EMA params.
    """

    name = ""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = workdir

    @classmethod
    def validate(cls, config) -> None:
        """Raises training.config.ConfigError for a bad stage-specific key."""

    def prepare(self) -> None:
        """One-time set-up before the model is built (build the data set, train or load a tokenizer)."""

    def setup_model(self) -> None:
        """Builds the model from the config and what `prepare` saved in the workdir (no data access)."""

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh params (with logical partitioning boxes). Traced under jax.eval_shape / jax.jit."""
        raise NotImplementedError

    def abstract_init(self, rng: jax.Array) -> Any:
        """Like init_params, but usable without a workdir (for jax.eval_shape parameter counts)."""
        raise NotImplementedError

    def load_frozen(self) -> Any:
        """Params of frozen models used by `loss` (passed to the step as an argument), or None."""
        return None

    def train_iterator(self, local_batch_size: int, process_index: int, process_count: int) -> grain.IterDataset:
        """The per-process training batches (numpy dicts of [local_batch, ...] arrays)."""
        raise NotImplementedError

    def loss(self, params: Any, batch: dict, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
        """(scalar loss, dict of scalar metrics) for a global batch. Traced inside the train step."""
        raise NotImplementedError

    def evaluate(self, params: Any, mesh: jax.sharding.Mesh) -> dict:
        """The stage's evaluation metrics (JSON-serialisable scalars) for `params`."""
        raise NotImplementedError
