"""What the image diffusion stages (decoder, upsamplers) share: the UNet and diffusion built from config,
their validation, pixel <-> model-space conversions, the sampling loop and sample grids."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion as D
from dalle2_jax.models.layers import dtype_from_name
from dalle2_jax.models.transformer import REMAT_POLICIES
from dalle2_jax.stages.base import Stage, sampling_chain, validate_diffusion_keys
from dalle2_jax.training.config import ConfigError

SAMPLERS = ("ddpm", "ddim")


def to_model_space(images: jax.Array) -> jax.Array:
    """uint8 images [..., 3] -> float32 in [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """Model-space images in [-1, 1] -> uint8 (rounded, clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """rows: lists of uint8 [n, H, W, 3] arrays of equal n (each row may have its own H, W, resized by
    repetition to the largest) -> one uint8 grid image with `pad`-pixel white borders."""
    from PIL import Image

    side = max(r.shape[1] for r in rows)
    n = rows[0].shape[0]
    grid = np.full((len(rows) * (side + pad) + pad, n * (side + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(n):
            img = row[j]
            if img.shape[0] != side:
                img = np.asarray(Image.fromarray(img).resize((side, side), Image.NEAREST))
            y, x = pad + i * (side + pad), pad + j * (side + pad)
            grid[y: y + side, x: x + side] = img
    return grid


def run_batched(fn, batch_size: int, *arrays: np.ndarray, mesh=None, first_index: int = 0) -> np.ndarray:
    """fn(*chunks, batch_index) over `batch_size` rows of `arrays` at a time (the last chunk padded by
    repeating its last row, so one compiled shape serves all), concatenated to numpy; batch indices count
    from `first_index` (a caller feeding one batch at a time passes its index). With a `mesh` the
    batch is rounded up to a multiple of its batch axes and every chunk is sharded over them, so each device
    samples its own rows (a pod evaluates in parallel); the results are gathered to every process."""
    from dalle2_jax.training.partitioning import round_batch, shard_rows, to_host

    batch_size = round_batch(batch_size, mesh)
    outs = []
    for i, start in enumerate(range(0, len(arrays[0]), batch_size)):
        chunks = [a[start: start + batch_size] for a in arrays]
        n = len(chunks[0])
        if n < batch_size:
            chunks = [np.concatenate([c, np.repeat(c[-1:], batch_size - n, 0)]) for c in chunks]
        outs.append(to_host(fn(*shard_rows(mesh, *chunks), first_index + i))[:n])
    return np.concatenate(outs)


class ImageDiffusionStage(Stage):
    """Shared parts of the stages that train a UNet on images with Gaussian diffusion."""

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.unet = self.diffusion = None
        self._eval_jits: dict = {}

    @classmethod
    def validate_unet(cls, config) -> None:
        m = config.model
        if m.channels <= 0 or m.num_res_blocks <= 0:
            raise ConfigError("model.channels", f"channels ({m.channels}) and num_res_blocks ({m.num_res_blocks}) "
                              "must be positive")
        if not m.channel_mult or any(int(x) <= 0 for x in m.channel_mult):
            raise ConfigError("model.channel_mult", f"must be a non-empty tuple of positive ints, got {m.channel_mult}")
        levels = len(m.channel_mult)
        res = int(config.data.resolution)
        patch = int(m.get("patch_size", 1))
        if patch < 1 or res % (patch * 2 ** (levels - 1)):
            raise ConfigError("model.patch_size", f"{patch}: data.resolution {res} must be divisible by patch_size "
                              f"x 2^{levels - 1} (one halving per level after the first)")
        full = int(m.get("full_res_channels", 0))
        if full < 0 or (full and patch == 1):
            raise ConfigError("model.full_res_channels", f"{full}: must be 0, or positive with patch_size > 1 "
                              "(a patch_size 1 UNet runs its first level at full resolution already)")
        for r in m.attention_resolutions:
            if int(r) <= 0 or res % int(r) or not patch <= res // int(r) <= patch * 2 ** (levels - 1):
                raise ConfigError("model.attention_resolutions",
                                  f"{r} is not a feature-map size of this UNet (data.resolution {res} / patch_size "
                                  f"{patch}, halved up to {levels - 1} times)")
        if m.head_channels <= 0:
            raise ConfigError("model.head_channels", f"must be positive, got {m.head_channels}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
        if m.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"unknown policy {m.remat!r}; use one of {sorted(REMAT_POLICIES)}")
        try:
            dtype_from_name(m.dtype)
        except ValueError as e:
            raise ConfigError("model.dtype", str(e)) from None
        validate_diffusion_keys(config, SAMPLERS)

    def unet_kwargs(self) -> dict:
        """UNet fields from config.model (the stage adds its conditioning fields)."""
        m = self.config.model
        return dict(model_channels=int(m.channels), num_res_blocks=int(m.num_res_blocks),
                    channel_mult=tuple(int(x) for x in m.channel_mult),
                    attention_resolutions=tuple(int(x) for x in m.attention_resolutions),
                    image_size=int(self.config.data.resolution), head_channels=int(m.head_channels),
                    dropout=float(m.dropout), scale_shift=bool(m.scale_shift),
                    resblock_updown=bool(m.resblock_updown), groups=int(m.groups),
                    learned_sigma=bool(self.config.diffusion.learned_variance), remat=m.remat,
                    patch_size=int(m.get("patch_size", 1)), full_res_channels=int(m.get("full_res_channels", 0)),
                    dtype=dtype_from_name(m.dtype))

    def build_diffusion(self) -> None:
        d = self.config.diffusion
        self.diffusion = D.make_diffusion(d.schedule, int(d.num_steps), model_output=d.model_output,
                                          learned_variance=bool(d.learned_variance),
                                          shift=float(d.get("schedule_shift", 1.0)))

    def sampling_diffusion(self, steps: int | None = None):
        return sampling_chain(self.diffusion, self.config, int(steps or self.config.sampling.steps))

    def run_sampler(self, denoise, shape: tuple, key: jax.Array, steps: int | None = None,
                    sampler: str | None = None, eta: float | None = None, x_T: jax.Array | None = None,
                    clip_x0: bool | None = None, step_noise: jax.Array | None = None) -> jax.Array:
        """The configured sampler over `denoise(x_t, t)`: model-space images [*shape] float32 (traceable).
        x_T: the starting noise (default: drawn from `key`); clip_x0 overrides config.sampling.clip_x0;
        step_noise: each DDPM step's noise [steps, *shape] (D.sample_ddpm) instead of draws from `key`."""
        s = self.config.sampling
        diff = self.sampling_diffusion(steps)
        clip = 1.0 if (s.clip_x0 if clip_x0 is None else clip_x0) else None
        sampler = sampler or s.sampler
        if sampler == "ddpm":
            return D.sample_ddpm(diff, denoise, shape, key, clip_x0=clip, x_T=x_T, step_noise=step_noise)
        if step_noise is not None:
            raise ValueError("step_noise is for the ddpm sampler")
        return D.sample_ddim(diff, denoise, shape, key, eta=float(s.eta if eta is None else eta), clip_x0=clip,
                             x_T=x_T)

    def run_repaint(self, denoise, known_uint8: jax.Array, keep_mask: jax.Array, key: jax.Array,
                    steps: int | None = None, resample: int = 1, jump_length: int = 1) -> jax.Array:
        """RePaint inpainting over `denoise`: uint8 images [B, H, W, 3] whose pixels with keep_mask [B, H, W]
        True are kept exactly and the rest regenerated -> model-space images [B, H, W, 3] (traceable)."""
        clip = 1.0 if self.config.sampling.clip_x0 else None
        return D.sample_repaint(self.sampling_diffusion(steps), denoise, to_model_space(known_uint8),
                                keep_mask[..., None], key, resample=resample, jump_length=jump_length, clip_x0=clip)

    def diffusion_loss(self, model_fn, x0: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Mean diffusion loss of model_fn(x_t, t) on model-space images x0 [B, H, W, 3], with metrics
        (mse, vb with a learned variance, and the loss per timestep quartile)."""
        from dalle2_jax.stages.prior import quartile_losses

        k_t, k_noise = jax.random.split(rng)
        d = self.config.diffusion
        t = D.sample_timesteps(k_t, x0.shape[0], self.diffusion.num_steps, d.get("timestep_sampling", "uniform"),
                               float(d.get("logit_normal_mean", 0.0)), float(d.get("logit_normal_std", 1.0)))
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        terms = D.training_losses(self.diffusion, model_fn, x0, t, noise,
                                  min_snr_gamma=float(d.get("min_snr_gamma", 0.0)),
                                  min_snr_floor=float(d.get("min_snr_floor", 0.0)))
        metrics = {k: jnp.mean(v) for k, v in terms.items() if k != "loss"}
        metrics.update(quartile_losses(terms["loss"], t, self.diffusion.num_steps))
        return jnp.mean(terms["loss"]), metrics

    def abstract_init(self, rng: jax.Array) -> Any:
        self.setup_model()
        return self.init_params(rng)
