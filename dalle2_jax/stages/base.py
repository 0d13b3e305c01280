"""The interface between the generic trainer and a stage."""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from dalle2_jax import diffusion as D, fileio
from dalle2_jax.text import META_FILE as TOKENIZER_META
from dalle2_jax.training.config import ConfigError

TOKENIZER_DIR = "tokenizer"


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

    def abstract_frozen(self) -> Any:
        """The logically boxed abstract tree of `load_frozen()`'s params (jax.eval_shape), so the trainer can
        shard frozen models like trained ones; None = replicate them (or no frozen params)."""
        return None

    def abstract_train_inputs(self, global_batch: int, clip_model_cfg: Any = None) -> tuple[dict, Any]:
        """For compiling the train step with no data and no workdir (launch/aot_compile.py): builds the model
        and returns ({name: jax.ShapeDtypeStruct [global_batch, ...]} of one train batch, the boxed abstract
        frozen params or None). Stages with a frozen CLIP build it from `clip_model_cfg` (a CLIP config.model)."""
        raise NotImplementedError

    def train_iterator(self, local_batch_size: int, process_index: int, process_count: int) -> grain.IterDataset:
        """The per-process training batches (numpy dicts of [local_batch, ...] arrays)."""
        raise NotImplementedError

    def loss(self, params: Any, batch: dict, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
        """(scalar loss, dict of scalar metrics) for a global batch. Traced inside the train step."""
        raise NotImplementedError

    def evaluate(self, params: Any, mesh: jax.sharding.Mesh) -> dict:
        """The stage's evaluation metrics (JSON-serialisable scalars) for `params`."""
        raise NotImplementedError


def validate_clip_workdir(config) -> None:
    """config.clip_workdir must name a CLIP workdir (trained or imported); raises ConfigError."""
    if not config.clip_workdir:
        raise ConfigError("clip_workdir", "is empty; point it at a trained or imported CLIP workdir")
    if not fileio.exists(fileio.join(config.clip_workdir, "config.json")):
        raise ConfigError("clip_workdir", f"{config.clip_workdir!r} is not a CLIP workdir (no config.json); "
                          "train one with configs/clip.py first")


SCHEDULE_ARITHMETICS = ("exact", "unclip")


def sampling_chain(diffusion, config, steps: int):
    """The respaced chain a stage samples `steps` steps with: our float64 respacing of `diffusion`, or with
    config.diffusion.schedule_arithmetic "unclip" karlo's chain in diffusers' float32 UnCLIPScheduler
    arithmetic (D.unclip_diffusion: the same timesteps, constants within float32 rounding)."""
    d = config.diffusion
    if d.get("schedule_arithmetic", "exact") == "unclip":
        return D.unclip_diffusion(int(steps), model_output=d.model_output, learned_variance=bool(d.learned_variance),
                                  num_train_steps=int(d.num_steps))
    return D.respace(diffusion, int(steps))[0]


def validate_diffusion_keys(config, samplers: tuple[str, ...]) -> None:
    """Checks config.diffusion (schedule, model_output, schedule_arithmetic) and config.sampling (sampler,
    steps)."""
    d, s = config.diffusion, config.sampling
    arith = d.get("schedule_arithmetic", "exact")
    if arith not in SCHEDULE_ARITHMETICS:
        raise ConfigError("diffusion.schedule_arithmetic", f"unknown {arith!r}; use one of {SCHEDULE_ARITHMETICS}")
    if arith == "unclip" and (d.schedule != "cosine" or float(d.get("schedule_shift", 1.0)) != 1.0):
        raise ConfigError("diffusion.schedule_arithmetic", "'unclip' (diffusers' UnCLIPScheduler) is the unshifted "
                          f"cosine schedule; got schedule {d.schedule!r}, "
                          f"schedule_shift {d.get('schedule_shift', 1.0)}")
    if d.schedule not in ("cosine", "linear"):
        raise ConfigError("diffusion.schedule", f"unknown schedule {d.schedule!r}; use cosine or linear")
    if d.model_output not in ("x0", "eps", "v"):
        raise ConfigError("diffusion.model_output", f"unknown output {d.model_output!r}; use x0, eps or v")
    if float(d.get("schedule_shift", 1.0)) <= 0:
        raise ConfigError("diffusion.schedule_shift", f"must be > 0 (1 = unshifted), got {d.schedule_shift}")
    if float(d.get("min_snr_gamma", 0.0)) < 0:
        raise ConfigError("diffusion.min_snr_gamma", f"must be >= 0 (0 = unweighted), got {d.min_snr_gamma}")
    floor = float(d.get("min_snr_floor", 0.0))
    if floor < 0 or (floor > 0 and not 0 < floor <= float(d.get("min_snr_gamma", 0.0))):
        raise ConfigError("diffusion.min_snr_floor", f"must be 0 or in (0, min_snr_gamma={d.get('min_snr_gamma', 0.0)}]"
                          f" (a lower bound of the Min-SNR weight), got {floor}")
    from dalle2_jax.diffusion.gaussian import TIMESTEP_SAMPLINGS

    if d.get("timestep_sampling", "uniform") not in TIMESTEP_SAMPLINGS:
        raise ConfigError("diffusion.timestep_sampling", f"unknown {d.timestep_sampling!r}; use one of "
                          f"{TIMESTEP_SAMPLINGS}")
    if float(d.get("logit_normal_std", 1.0)) <= 0:
        raise ConfigError("diffusion.logit_normal_std", f"must be > 0, got {d.logit_normal_std}")
    if s.sampler not in samplers:
        raise ConfigError("sampling.sampler", f"unknown sampler {s.sampler!r}; use one of {samplers}")
    if not 1 <= s.steps <= d.num_steps:
        raise ConfigError("sampling.steps", f"must be in [1, diffusion.num_steps={d.num_steps}], got {s.steps}")


class FrozenClipMixin:
    """For stages that read a frozen CLIP through config.clip_workdir (the prior, the decoder)."""

    _frozen = None

    def copy_clip_tokenizer(self) -> None:
        """Copies the CLIP's tokenizer into this workdir (process 0, then every process waits), so the
        workdir records what it used; the input pipeline reads it from there."""
        src = fileio.join(self.config.clip_workdir, TOKENIZER_DIR)
        dst = fileio.join(self.workdir, TOKENIZER_DIR)
        if jax.process_index() == 0 and not fileio.exists(fileio.join(dst, TOKENIZER_META)):
            fileio.copy_tree(src, dst, last=(TOKENIZER_META,))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("clip_tokenizer")

    @property
    def unit_text_embedding(self) -> bool:
        """Whether the stage takes the CLIP text embedding unit-normalised (ours) or raw (karlo's prior, with
        model.normalize_embedding False, and karlo's decoder, with model.clip_text_conditioning)."""
        m = self.config.model
        return bool(m.get("normalize_embedding", True)) and not bool(m.get("clip_text_conditioning", False))

    def clip_text(self, clip_params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, L] -> (text embedding [B, E], token states [B, L, W], valid mask [B, L]) of the frozen
        CLIP (`self.clip`, built by the stage's setup_model). The embedding is unit-norm unless the stage takes
        it raw (unit_text_embedding). The mask covers the tokens up to and including the first end-of-text
        token (as CLIP tokenizers' attention masks do; a token equal to the pad id before it, such as CLIP
        BPE's "!" = 0, stays valid); rows without one fall back to tokens != pad."""
        import jax.numpy as jnp

        emb, states = self.clip.apply(clip_params, tokens, method=self.clip.encode_text_full)
        if self.unit_text_embedding:
            emb = emb * jax.lax.rsqrt(jnp.sum(emb * emb, axis=-1, keepdims=True) + 1e-12)
        pad = int(self.tokenizer.pad_id) if self.tokenizer is not None else 0
        is_eot = tokens == self.clip.text.eot_id
        through_eot = jnp.arange(tokens.shape[-1])[None, :] <= jnp.argmax(is_eot, axis=-1)[:, None]
        valid = jnp.where(jnp.any(is_eot, axis=-1, keepdims=True), through_eot, tokens != pad)
        return jax.lax.stop_gradient(emb.astype(jnp.float32)), jax.lax.stop_gradient(states.astype(jnp.float32)), \
            valid

    def empty_caption_tokens(self):
        """[1, L] int32: the empty caption's CLIP tokens (karlo's unconditional text input: guidance's
        unconditional half and, in training, the rows whose caption is dropped). Without a tokenizer (AOT
        compilation from a CLIP config) a row holding only the end-of-text token stands in (same shape)."""
        if self.tokenizer is not None:
            return np.asarray(self.tokenizer.encode_batch([""]), np.int32)
        row = np.zeros((1, int(self.clip.text.context_length)), np.int32)
        row[0, 0] = int(self.clip.text.eot_id)
        return row

    def empty_text(self, clip_params: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """clip_text of the empty caption: (text embedding [1, E], token states [1, L, W], mask [1, L])."""
        return self.clip_text(clip_params, jax.numpy.asarray(self.empty_caption_tokens()))

    def use_abstract_clip(self, clip_model_cfg: Any) -> None:
        """Builds `self.clip` from a CLIP `config.model` group instead of a workdir (AOT compilation)."""
        from dalle2_jax.models.clip import build_clip

        self.clip = build_clip(clip_model_cfg, eot_id=int(clip_model_cfg.text.vocab_size) - 1)

    def abstract_frozen(self) -> Any:
        if self.config.data.embeddings_dir or getattr(self, "clip", None) is None:
            return None
        from dalle2_jax.models.clip import init_clip

        return jax.eval_shape(lambda rng: init_clip(self.clip, rng), jax.random.key(0))

    def clip_params(self):
        """The frozen CLIP's (EMA) params, loaded once."""
        from dalle2_jax.training.checkpoint import load_params

        if self._frozen is None:
            _, self._frozen, _ = load_params(self.config.clip_workdir)
        return self._frozen
