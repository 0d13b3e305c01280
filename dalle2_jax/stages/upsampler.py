"""The upsampler stages (64->256 and 256->1024): convolution-only UNets conditioned on a low-res image.

The low-res image is upsampled (bicubic) and concatenated to the noisy input; with `model.predict_residual`
it is also added to the UNet's x0 prediction, so the UNet learns the correction to bicubic (as SRDiff's
residual target) and starts from bicubic's quality. Training corrupts it
(`model.degradation`: Gaussian blur, kernel 3, sigma 0.6 for 64->256; BSR-style for 256->1024; optionally
also noised at a random level the UNet is told, `model.max_noise_level`) and uses random crops a quarter
of the target side (`data.crop_size`); sampling runs at full size (DDIM). No caption. Evaluation makes the
low-res input from the true high-res test image by plain (degradation-free) bicubic downsampling and
compares samples and bicubic upsampling with the truth (PSNR, SSIM).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion as D
from dalle2_jax.data import pipeline
from dalle2_jax.models.unet import UNet
from dalle2_jax.stages.image_diffusion import (ImageDiffusionStage, image_grid, run_batched, to_model_space,
                                               to_uint8)
from dalle2_jax.training.config import ConfigError

DEGRADATIONS = ("blur", "bsr", "none")


class UpsamplerStage(ImageDiffusionStage):
    """Trains a super-resolution diffusion UNet (low-res -> data.resolution)."""

    name = "upsampler"

    @classmethod
    def validate(cls, config) -> None:
        cls.validate_unet(config)
        d, m = config.data, config.model
        res, low = int(d.resolution), int(d.low_res_resolution)
        if low <= 0 or res % low or res == low:
            raise ConfigError("data.low_res_resolution", f"{low} must divide data.resolution {res} (and be smaller)")
        f = res // low
        crop = int(d.crop_size) or res
        if crop > res or crop % f:
            raise ConfigError("data.crop_size", f"{d.crop_size} must be at most data.resolution {res} and a multiple "
                              f"of the upsampling factor {f} (0 = full size)")
        ds = 2 ** (len(m.channel_mult) - 1)
        for name, side in (("data.crop_size", crop), ("data.resolution", res)):
            if side % ds:
                raise ConfigError(name, f"{side} is not divisible by {ds}, the UNet's total downsampling "
                                  f"({len(m.channel_mult)} levels)")
        if m.get("predict_residual", False) and config.diffusion.model_output != "x0":
            raise ConfigError("model.predict_residual", "the UNet's output is added to the upsampled low-res image, "
                              f"so it must predict x0: set diffusion.model_output=x0 (it is "
                              f"{config.diffusion.model_output!r})")
        if m.degradation not in DEGRADATIONS:
            raise ConfigError("model.degradation", f"unknown degradation {m.degradation!r}; use one of {DEGRADATIONS}")
        if m.blur_size <= 0 or m.blur_size % 2 == 0 or m.blur_sigma <= 0:
            raise ConfigError("model.blur_size", f"blur_size must be odd and positive and blur_sigma > 0, got "
                              f"{m.blur_size}, {m.blur_sigma}")
        if not 0 <= m.max_noise_level <= config.diffusion.num_steps:
            raise ConfigError("model.max_noise_level", f"must be in [0, diffusion.num_steps], got {m.max_noise_level}")
        if m.max_noise_level and not 0 <= config.sampling.noise_level < m.max_noise_level:
            raise ConfigError("sampling.noise_level", f"must be in [0, model.max_noise_level={m.max_noise_level}), "
                              f"got {config.sampling.noise_level}")

    # --- set-up ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        pipeline.prepare_dataset(self.config.data)
        self.setup_model()

    def setup_model(self) -> None:
        m = self.config.model
        self.factor = int(self.config.data.resolution) // int(self.config.data.low_res_resolution)
        self.unet = UNet(**self.unet_kwargs(), out_channels=3, low_res=True, low_res_upsample=m.low_res_upsample,
                         residual_low_res=bool(m.get("predict_residual", False)),
                         noise_level_cond=bool(m.max_noise_level))
        self.build_diffusion()

    def init_params(self, rng: jax.Array) -> Any:
        c = int(self.config.data.crop_size) or int(self.config.data.resolution)
        lc = c // self.factor
        return self.unet.init(rng, jnp.zeros((1, c, c, 3)), jnp.zeros((1,), jnp.int32),
                              low_res=jnp.zeros((1, lc, lc, 3)), noise_level=jnp.zeros((1,), jnp.int32))

    def abstract_train_inputs(self, global_batch: int, clip_model_cfg: Any = None) -> tuple[dict, Any]:
        self.setup_model()
        c = int(self.config.data.crop_size) or int(self.config.data.resolution)
        return {"high": jax.ShapeDtypeStruct((global_batch, c, c, 3), jnp.uint8),
                "low": jax.ShapeDtypeStruct((global_batch, c // self.factor, c // self.factor, 3), jnp.uint8)}, None

    def train_iterator(self, local_batch_size: int, process_index: int, process_count: int):
        m = self.config.model
        if self.last_step_model:  # a sampling-only layout: params {"main", "last_step"}
            raise ConfigError("model.last_step_model", "training trains one UNet: fine-tune karlo's super_res_first "
                              "and super_res_last each from its own workdir (tools.import_karlo --workdirs) with "
                              "--config.model.last_step_model=False")
        return pipeline.upsampler_pipeline(
            self.config.data, self.config.data.train_split, local_batch_size=local_batch_size, seed=self.config.seed,
            degradation=m.degradation, blur_sigma=float(m.blur_sigma), blur_size=int(m.blur_size),
            bsr_strength=float(m.bsr_strength), process_index=process_index, process_count=process_count)

    # --- the step -------------------------------------------------------------------------------------
    def noised_low_res(self, low: jax.Array, level: jax.Array, key: jax.Array) -> jax.Array:
        """Noise-level conditioning: q_sample of the model-space low-res image at step `level` [B] (0 = as is)."""
        noised = D.q_sample(self.diffusion, low, level, jax.random.normal(key, low.shape, jnp.float32))
        return jnp.where((level > 0)[:, None, None, None], noised, low)

    def loss(self, params: Any, batch: dict, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
        low = to_model_space(batch["low"])
        b = low.shape[0]
        k_level, k_noise, k_drop, k_diff = jax.random.split(rng, 4)
        level = jnp.zeros((b,), jnp.int32)
        if self.config.model.max_noise_level:
            level = jax.random.randint(k_level, (b,), 0, int(self.config.model.max_noise_level))
            low = self.noised_low_res(low, level, k_noise)

        def model_fn(x_t, t):
            return self.unet.apply(params, x_t, t, low_res=low, noise_level=level, train=True,
                                   rngs={"dropout": k_drop})

        return self.diffusion_loss(model_fn, to_model_space(batch["high"]), k_diff)

    # --- sampling and evaluation ----------------------------------------------------------------------
    @property
    def last_step_model(self) -> bool:
        """model.last_step_model (karlo's super-res): the stage holds two weight sets of this UNet, params =
        {"main": every step but the last, "last_step": the last step's} (karlo: super_res_first, super_res_last)."""
        return bool(self.config.model.get("last_step_model", False))

    def _denoiser(self, params: Any, low: jax.Array, key: jax.Array, last_timestep: int | None = None):
        """(denoise_fn, key for the sampler) conditioned on the (noise-level-augmented) low-res images: uint8, or
        float model-space images in [-1, 1] (karlo hands the decoder's clamped float output on). With
        model.last_step_model the step at `last_timestep` runs params["last_step"], the others params["main"]."""
        level = int(self.config.sampling.noise_level) if self.config.model.max_noise_level else 0
        k_noise, k_sample = jax.random.split(key)
        levels = jnp.full((low.shape[0],), level, jnp.int32)
        low = low.astype(jnp.float32) if jnp.issubdtype(low.dtype, jnp.floating) else to_model_space(low)
        low = self.noised_low_res(low, levels, k_noise)
        if not self.last_step_model:
            return (lambda x, t: self.unet.apply(params, x, t, low_res=low, noise_level=levels)), k_sample
        if set(params) != {"main", "last_step"}:
            raise ValueError(f"model.last_step_model: params must be {{'main', 'last_step'}}, got {sorted(params)}")

        def denoise(x, t):
            run = lambda p: self.unet.apply(p, x, t, low_res=low, noise_level=levels)  # noqa: E731
            return jax.lax.cond(t[0] == last_timestep, lambda: run(params["last_step"]), lambda: run(params["main"]))

        return denoise, k_sample

    def make_sampler(self, steps: int | None = None, sampler: str | None = None, eta: float | None = None,
                     output: str = "uint8", size: int | None = None):
        """A jitted (params, low [B, h, w, 3], key[, x_T, step_noise]) -> uint8 [B, h*f, w*f, 3] (output="model":
        float32 model-space images, unclamped): sampling at the size the low-res input implies (full size at
        evaluation, any multiple of the UNet's downsampling), or at `size` x `size` whatever the input's size
        (diffusers' UnCLIPPipeline samples at the super-res UNet's sample_size). low: uint8, or float
        model-space images; x_T and step_noise [steps, ...] (ddpm) replace the draws from `key`."""
        if output not in ("uint8", "model"):
            raise ValueError(f"output must be 'uint8' or 'model', got {output!r}")
        last_t = int(self.sampling_diffusion(steps).timesteps[0])  # the final step's timestep

        def sample(params, low, key, x_T=None, step_noise=None):
            b, h, w, _ = low.shape
            denoise, k_sample = self._denoiser(params, low, key, last_t)
            out_h, out_w = (size, size) if size else (h * self.factor, w * self.factor)
            x = self.run_sampler(denoise, (b, out_h, out_w, 3), k_sample, steps, sampler, eta, x_T=x_T,
                                 step_noise=step_noise)
            return to_uint8(x) if output == "uint8" else x

        return jax.jit(sample)

    def make_inpainter(self, steps: int | None = None, resample: int = 1, jump_length: int = 1):
        """A jitted (params, low uint8 [B, h, w, 3], known uint8 [B, h*f, w*f, 3], keep [B, h*f, w*f] bool, key)
        -> uint8 [B, h*f, w*f, 3]: RePaint upsampling that keeps the known high-res pixels where `keep`."""

        last_t = int(self.sampling_diffusion(steps).timesteps[0])

        def inpaint(params, low_uint8, known, keep, key):
            denoise, k_sample = self._denoiser(params, low_uint8, key, last_t)
            return to_uint8(self.run_repaint(denoise, known, keep, k_sample, steps, resample, jump_length))

        return jax.jit(inpaint)

    def evaluate(self, params: Any, mesh) -> dict:
        """psnr / ssim of full-size samples against the true high-res test images, next to bicubic
        upsampling (psnr_bicubic / ssim_bicubic), from low-res inputs made by degradation-free downsampling."""
        from dalle2_jax.data import degradations as G
        from dalle2_jax.image_metrics import psnr, ssim

        cfg, d = self.config, self.config.data
        records = pipeline.read_split(d, d.eval_split, [d.image_key], int(cfg.eval.max_examples))
        high = np.stack([r[d.image_key] for r in records])
        low = np.stack([G.downsample(h, self.factor) for h in high])
        bicubic = np.stack([G.upsample_bicubic(x, self.factor) for x in low])
        if "sample" not in self._eval_jits:  # built once: periodic evaluations reuse the compiled function
            self._eval_jits["sample"] = self.make_sampler()
        key = jax.random.key(cfg.seed + 1)
        samples = run_batched(lambda x, i: self._eval_jits["sample"](params, x, jax.random.fold_in(key, i)),
                              int(cfg.eval.batch_size), low, mesh=mesh)
        g = min(int(cfg.eval.grid_size), len(records))
        # Rows: low-res input (pixel repetition), bicubic, sample, truth; one column per example.
        grid = image_grid([low_nearest(low[:g], self.factor), bicubic[:g], samples[:g], high[:g]])
        return {
            "num_examples": len(records),
            "psnr": float(np.mean(psnr(samples, high))),
            "psnr_bicubic": float(np.mean(psnr(bicubic, high))),
            "ssim": float(np.mean(ssim(samples, high))),
            "ssim_bicubic": float(np.mean(ssim(bicubic, high))),
            "images": {"upsampler": grid},
        }


def low_nearest(low: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [N, h, w, 3] -> [N, h*f, w*f, 3] by pixel repetition (to show the input at the output size)."""
    return np.repeat(np.repeat(low, factor, axis=1), factor, axis=2)
