"""The decoder stage: a 64x64 GLIDE-style UNet conditioned on the frozen CLIP's image embedding (and caption).

The image embedding is projected into the timestep embedding and into `model.image_tokens` extra context
tokens beside the caption transformer's tokens. For classifier-free guidance the embedding is dropped
(`model.image_drop_prob`, 10%: a learned null embedding) and the caption (`model.caption_drop_prob`, 50%: an
all-padding caption; karlo's decoder, model.clip_text_conditioning, takes the caption as the frozen CLIP's text
encodings and a dropped one as the empty caption's) independently. The frozen CLIP (config.clip_workdir) embeds
the training images in the jitted step, or the embeddings come from the embed tool's files
(`data.embeddings_dir`). A CLIP whose input size differs from the decoder's (an imported ViT at 224 px under a
64 px decoder) gets its own copy of each training image, made from the source image with CLIP's preprocessing
(batch key `clip_image`). Evaluation samples images from test-image embeddings and scores them with the frozen
CLIP.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion as D, fileio, procs
from dalle2_jax.data import pipeline, scenes as S
from dalle2_jax.images import resize_square
from dalle2_jax.models.clip import build_clip
from dalle2_jax.models.unet import UNet
from dalle2_jax.stages.base import TOKENIZER_DIR, FrozenClipMixin, validate_clip_workdir
from dalle2_jax.stages.image_diffusion import (ImageDiffusionStage, image_grid, run_batched, to_model_space,
                                               to_uint8)
from dalle2_jax.text import load_tokenizer
from dalle2_jax.training.config import ConfigError
from dalle2_jax.training.partitioning import replicated, to_host



class _JoinImage(grain.transforms.Map):
    """An embed-tool record -> {'image' uint8 [R, R, 3], 'image_emb' [E], 'tokens' [L]}: the image is read
    from the data set at the record's `index` (the source is opened lazily, once per worker)."""

    def __init__(self, data_cfg, split: str):
        self.data_cfg, self.split = data_cfg, split
        self._source = None

    def __getstate__(self):
        return {"data_cfg": self.data_cfg, "split": self.split, "_source": None}

    def map(self, data: bytes) -> dict:
        from dalle2_jax.tools.embed import deserialize

        if self._source is None:
            self._source = pipeline.open_source(self.data_cfg, self.split, skip_decoding=(self.data_cfg.image_key,))
        r = deserialize(data)
        rec = self._source[int(r["index"])]
        return {"image": pipeline.decode_image(rec[self.data_cfg.image_key], int(self.data_cfg.resolution)),
                "image_emb": np.asarray(r["image_emb"], np.float32), "tokens": np.asarray(r["tokens"], np.int32)}


class DecoderStage(FrozenClipMixin, ImageDiffusionStage):
    """Trains the 64x64 decoder against a frozen CLIP."""

    name = "decoder"

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.clip = self.tokenizer = None

    @classmethod
    def validate(cls, config) -> None:
        validate_clip_workdir(config)
        cls.validate_unet(config)
        m = config.model
        for key in ("image_drop_prob", "caption_drop_prob"):
            if not 0.0 <= m[key] < 1.0:
                raise ConfigError(f"model.{key}", f"must be in [0, 1), got {m[key]}")
        if m.image_tokens < 0:
            raise ConfigError("model.image_tokens", f"must be >= 0, got {m.image_tokens}")
        if m.caption_depth < 0:
            raise ConfigError("model.caption_depth", f"must be >= 0 (0 = no caption transformer), got "
                              f"{m.caption_depth}")
        context_width = int(m.get("context_width", 0))
        if context_width < 0 or (m.caption_depth and context_width not in (0, int(m.caption_width))):
            raise ConfigError("model.context_width", f"{context_width}: must be 0 (the default width) or, with a "
                              f"caption transformer, its caption_width {m.caption_width}")
        if m.get("clip_text_conditioning", False):
            if config.data.embeddings_dir:
                raise ConfigError("data.embeddings_dir", "a decoder with model.clip_text_conditioning (karlo's) "
                                  "takes the CLIP's text token states, which the embed tool does not store; train "
                                  "it without data.embeddings_dir (the frozen CLIP embeds each batch)")
            from dalle2_jax.training.checkpoint import read_config

            if not read_config(config.clip_workdir).model.get("image_tower", True):
                raise ConfigError("clip_workdir", f"the CLIP in {config.clip_workdir!r} is its text tower only "
                                  "(model.image_tower False), but training the decoder needs the image embeddings "
                                  "of its images: import an image encoder: tools.import_karlo --image_encoder, or "
                                  "an OpenAI ViT-L/14 with tools.import_clip")
        if m.caption_depth and (m.caption_width <= 0 or m.caption_width % m.caption_heads):
            raise ConfigError("model.caption_heads", f"caption_width {m.caption_width} must be positive and "
                              f"divisible by caption_heads {m.caption_heads}")
        if config.data.embeddings_dir and not m.normalize_embedding:
            raise ConfigError("model.normalize_embedding", "the embed tool stores unit-norm image embeddings; "
                              "set it to True or train without data.embeddings_dir")
        if config.sampling.guidance_scale < 0:
            raise ConfigError("sampling.guidance_scale", f"must be >= 0, got {config.sampling.guidance_scale}")
        for t in config.eval.get("renoise_steps", ()):
            if not 0 < int(t) < config.diffusion.num_steps:
                raise ConfigError("eval.renoise_steps", f"timesteps must be in (0, diffusion.num_steps="
                                  f"{config.diffusion.num_steps}), got {t}")

    # --- set-up ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        pipeline.prepare_dataset(self.config.data)
        self.copy_clip_tokenizer()  # the decoder's workdir carries the tokenizer its captions use
        self.setup_model()

    def setup_model(self) -> None:
        from dalle2_jax.training.checkpoint import read_config

        m = self.config.model
        if self.config.clip_workdir and fileio.exists(fileio.join(self.config.clip_workdir, "config.json")):
            clip_cfg = read_config(self.config.clip_workdir)
            self.tokenizer = load_tokenizer(fileio.join(self.config.clip_workdir, TOKENIZER_DIR))
            self.clip = build_clip(clip_cfg.model, self.tokenizer.eot_id)
            dims = (clip_cfg.model.embed_dim, self.tokenizer.vocab_size, clip_cfg.model.text.context_length)
            self.text_width = int(clip_cfg.model.text.width)
            self.clip_resolution = int(clip_cfg.model.vision.image_size)
            self.pad_id = int(self.tokenizer.pad_id)
        else:  # parameter counting without a CLIP workdir (tools.params)
            dims = (m.clip_embed_dim, m.clip_vocab_size, m.clip_context_length)
            self.text_width = int(m.get("clip_text_width", 0))
            self.pad_id = 0
            self.clip_resolution = int(self.config.data.resolution)
        self.embed_dim, self.vocab_size, self.clip_context = (int(x) for x in dims)
        self.context_length = int(m.caption_context_length) or self.clip_context
        if self.context_length < self.clip_context:
            raise ConfigError("model.caption_context_length", f"{self.context_length} is shorter than the CLIP "
                              f"tokenizer's context {self.clip_context}")
        self.unet = UNet(**self.unet_kwargs(), out_channels=3, image_embed_dim=self.embed_dim,
                         image_tokens=int(m.image_tokens),
                         image_embed_scale=self.embed_dim ** 0.5 if m.get("scale_embedding", False) else 1.0,
                         caption_vocab_size=self.vocab_size,
                         caption_context_length=self.context_length, caption_width=int(m.caption_width),
                         caption_depth=int(m.caption_depth), caption_heads=int(m.caption_heads),
                         caption_pad_id=self.pad_id, caption_scan_layers=bool(m.get("caption_scan_layers", False)),
                         context_width=int(m.get("context_width", 0)),
                         text_embed_width=self.embed_dim if self.clip_text_conditioning else 0,
                         text_states_width=self.text_width if self.clip_text_conditioning else 0)
        self.build_diffusion()

    @property
    def clip_text_conditioning(self) -> bool:
        return bool(self.config.model.get("clip_text_conditioning", False))

    def init_params(self, rng: jax.Array) -> Any:
        r = int(self.config.data.resolution)
        text = {}
        if self.clip_text_conditioning:
            n = self.clip_context
            text = dict(text_emb=jnp.zeros((1, self.embed_dim)), text_states=jnp.zeros((1, n, self.text_width)),
                        text_mask=jnp.ones((1, n), bool))
        return self.unet.init(rng, jnp.zeros((1, r, r, 3)), jnp.zeros((1,), jnp.int32),
                              image_emb=jnp.zeros((1, self.embed_dim)), tokens=self.caption_tokens(
                                  jnp.zeros((1, self.clip_context), jnp.int32)), **text)

    def load_frozen(self) -> Any:
        return None if self.config.data.embeddings_dir else self.clip_params()

    def abstract_train_inputs(self, global_batch: int, clip_model_cfg: Any = None) -> tuple[dict, Any]:
        if clip_model_cfg is None:
            raise ValueError("the decoder's step runs its frozen CLIP: pass the CLIP's config.model")
        m, c = self.config.model, clip_model_cfg
        for key, want in (("clip_embed_dim", c.embed_dim), ("clip_vocab_size", c.text.vocab_size),
                          ("clip_context_length", c.text.context_length)):
            if int(m[key]) != int(want):
                raise ConfigError(f"model.{key}", f"is {m[key]} but the CLIP config says {want}")
        self.setup_model()
        self.use_abstract_clip(c)
        self.clip_resolution = int(c.vision.image_size)
        b, r = global_batch, int(self.config.data.resolution)
        batch = {"image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8),
                 "tokens": jax.ShapeDtypeStruct((b, self.clip_context), jnp.int32)}
        if self.config.data.embeddings_dir:
            return dict(batch, image_emb=jax.ShapeDtypeStruct((b, self.embed_dim), jnp.float32)), None
        if self._separate_clip_resolution():
            batch["clip_image"] = jax.ShapeDtypeStruct((b, self.clip_resolution, self.clip_resolution, 3), jnp.uint8)
        return batch, self.abstract_frozen()

    def train_iterator(self, local_batch_size: int, process_index: int, process_count: int):
        d = self.config.data
        if d.embeddings_dir:
            from dalle2_jax.tools.embed import embedding_files

            ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(embedding_files(d.embeddings_dir,
                                                                                             d.train_split)))
            # an embedding whose image no longer decodes is replaced and counted in 'bad_records'
            ds = pipeline.skip_undecodable(ds, _JoinImage(d, d.train_split).map,
                                           pipeline.data_name(d, d.train_split))
            ds = ds.seed(self.config.seed).shuffle().repeat(None)
            it = pipeline.shard_batches(ds, local_batch_size, process_index, process_count,
                                        read_threads=int(d.read_threads))
            if int(d.num_workers) > 0:
                it = procs.mp_prefetch(it, int(d.num_workers))
            return it
        return pipeline.image_text_pipeline(
            d, d.train_split, tokenizer_dir=fileio.join(self.workdir, TOKENIZER_DIR),
            local_batch_size=local_batch_size, seed=self.config.seed, process_index=process_index,
            process_count=process_count, clip_resolution=self._separate_clip_resolution())

    def _separate_clip_resolution(self) -> int:
        """The CLIP's input size when it differs from the decoder's, else 0 (one image serves both)."""
        return self.clip_resolution if self.clip_resolution != int(self.config.data.resolution) else 0

    # --- conditioning and the step ----------------------------------------------------------------------
    def caption_tokens(self, tokens: jax.Array) -> jax.Array:
        """CLIP tokenizer ids [B, L_clip] -> [B, caption context], right-padded with the pad id."""
        extra = self.context_length - tokens.shape[1]
        return jnp.pad(tokens, ((0, 0), (0, extra)), constant_values=self.pad_id) if extra else tokens

    def clip_image(self, clip_params: Any, images_uint8: jax.Array, normalize: bool = True) -> jax.Array:
        """uint8 images [B, R, R, 3] -> CLIP image embeddings [B, E] (unit norm if `normalize`)."""
        emb = self.clip.apply(clip_params, images_uint8.astype(jnp.float32) / 255.0, normalize,
                              method=self.clip.encode_image)
        return jax.lax.stop_gradient(emb.astype(jnp.float32))

    def conditioning_embedding(self, clip_params: Any, images_uint8: jax.Array) -> jax.Array:
        """The embedding the decoder is conditioned on: unit-norm or raw by model.normalize_embedding."""
        return self.clip_image(clip_params, images_uint8, bool(self.config.model.normalize_embedding))

    def loss(self, params: Any, batch: dict, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
        m = self.config.model
        images = batch["image"]
        if "image_emb" in batch:
            emb = batch["image_emb"]
        else:
            emb = self.conditioning_embedding(frozen, batch.get("clip_image", images))
        b = images.shape[0]
        k_img, k_txt, k_drop, k_diff = jax.random.split(rng, 4)
        drop_image = jax.random.bernoulli(k_img, m.image_drop_prob, (b,))
        drop_text = jax.random.bernoulli(k_txt, m.caption_drop_prob, (b,))
        if self.clip_text_conditioning:  # karlo: the CLIP's text encodings; dropped -> the empty caption's
            text = self.training_text(frozen, batch["tokens"], drop_text)

            def clip_model_fn(x_t, t):
                e, st, mk = text
                return self.unet.apply(params, x_t, t, image_emb=emb, text_emb=e, text_states=st, text_mask=mk,
                                       drop_image=drop_image, train=True, rngs={"dropout": k_drop})

            return self.diffusion_loss(clip_model_fn, to_model_space(images), k_diff)
        tokens = self.caption_tokens(batch["tokens"])

        def model_fn(x_t, t):
            return self.unet.apply(params, x_t, t, image_emb=emb, tokens=tokens, drop_image=drop_image,
                                   drop_text=drop_text, train=True, rngs={"dropout": k_drop})

        return self.diffusion_loss(model_fn, to_model_space(images), k_diff)

    def training_text(self, clip_params: Any, tokens: jax.Array, drop: jax.Array) -> tuple:
        """A clip_text_conditioning decoder's text inputs for a batch: clip_text of the captions, the rows
        where `drop` [B] is True replaced by the empty caption's encodings (the unconditional half sampling
        uses): (text_emb [B, E], token states [B, L, W], mask [B, L])."""
        text = self.clip_text(clip_params, tokens)
        empty = self.empty_text(clip_params)
        return tuple(jnp.where(drop.reshape((-1,) + (1,) * (a.ndim - 1)), u, a) for a, u in zip(text, empty))

    # --- sampling and evaluation ----------------------------------------------------------------------
    def guided_denoiser(self, params: Any, image_emb: jax.Array, tokens: jax.Array, guidance_scale: float,
                        text: tuple | None = None, uncond_text: tuple | None = None):
        """denoise_fn(x_t, t) with classifier-free guidance: conditional (embedding + caption) against
        unconditional (null embedding, empty caption), one model call on the doubled batch. A decoder with
        model.clip_text_conditioning (karlo's) takes the caption as the CLIP's text = (text_emb [B, E], token
        states [B, L, W], mask [B, L]) and the unconditional half's as uncond_text (one row or B: the empty
        caption's encodings) beside the learned null image embedding; with a learned variance the guidance acts
        on eps and the variance comes from the conditional half."""
        learned = bool(self.config.diffusion.learned_variance)
        if self.clip_text_conditioning:
            if text is None or uncond_text is None:
                raise ValueError("a decoder with model.clip_text_conditioning samples from the CLIP's text "
                                 "encodings: pass text and uncond_text (the empty caption's)")
            n = image_emb.shape[0]
            un = tuple(jnp.broadcast_to(a, (n,) + a.shape[1:]) for a in uncond_text)
            both = [jnp.concatenate(p) for p in zip(text, un)]

            def clip_model_fn(x, t, drop):  # rows [cond, uncond]; a scale of 1 calls the cond rows only
                e, st, mk = both if x.shape[0] == 2 * n else text
                img = jnp.concatenate([image_emb] * (x.shape[0] // n))
                return self.unet.apply(params, x, t, image_emb=img, text_emb=e, text_states=st, text_mask=mk,
                                       drop_image=drop)

            return D.cfg_denoiser_batched(clip_model_fn, guidance_scale, learned_variance=learned)
        tokens = self.caption_tokens(tokens)

        def model_fn(x, t, drop):
            rep = lambda a: jnp.concatenate([a, a]) if x.shape[0] != a.shape[0] else a  # noqa: E731
            return self.unet.apply(params, x, t, image_emb=rep(image_emb), tokens=rep(tokens), drop_image=drop,
                                   drop_text=drop)

        return D.cfg_denoiser_batched(model_fn, guidance_scale, learned_variance=learned)

    def make_sampler(self, steps: int | None = None, guidance_scale: float | None = None,
                     sampler: str | None = None, eta: float | None = None, clip_x0: bool | None = None,
                     output: str = "uint8"):
        """A jitted (params, image_emb [B, E], tokens [B, L], key[, x_T, text, uncond_text, step_noise]) ->
        uint8 images [B, R, R, 3] (output="model": float32 model-space images clamped to [-1, 1]): guided
        sampling (DDPM with the learned variance, or DDIM) from given image embeddings and captions, starting
        from x_T [B, R, R, 3] when given (e.g. DDIM-inverted noise) instead of noise drawn from `key`.
        text / uncond_text: the CLIP text encodings a clip_text_conditioning decoder (karlo's) takes
        (guided_denoiser); step_noise [steps, B, R, R, 3]: each DDPM step's noise instead of draws from `key`."""
        if output not in ("uint8", "model"):
            raise ValueError(f"output must be 'uint8' or 'model', got {output!r}")
        scale = float(self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale)
        r = int(self.config.data.resolution)

        def sample(params, image_emb, tokens, key, x_T=None, text=None, uncond_text=None, step_noise=None):
            denoise = self.guided_denoiser(params, image_emb, tokens, scale, text, uncond_text)
            x = self.run_sampler(denoise, (image_emb.shape[0], r, r, 3), key, steps, sampler, eta, x_T=x_T,
                                 clip_x0=clip_x0, step_noise=step_noise)
            return to_uint8(x) if output == "uint8" else jnp.clip(x, -1.0, 1.0)

        return jax.jit(sample)

    def make_renoiser(self, t: int, steps: int | None = None):
        """A jitted (params, image_emb [B, E], tokens [B, L], images uint8 [B, R, R, 3], key[, text,
        uncond_text]) -> uint8 images (text / uncond_text: a clip_text_conditioning decoder's, see guided_denoiser):
        each image noised to timestep `t` (q_sample), then sampled back to t = 0 by the configured sampler
        with guidance over `steps` timesteps spaced evenly in [0, t] (default: the sampling steps' density,
        at least 2), as SDEdit does. Scored against the scenes (evaluate's renoise_t<t>_* metrics), it tells
        which noise levels the decoder cannot bring back: the higher t where an attribute drops, the more of
        the chain it survives."""
        s, d = self.config.sampling, self.diffusion
        if not 0 < t < d.num_steps:
            raise ValueError(f"renoise timestep must be in (0, {d.num_steps}), got {t}")
        n = int(steps or max(2, round(int(s.steps) * t / d.num_steps)))
        sub, _ = D.respace(d, sorted({int(round(x)) for x in np.linspace(0, t, n)}))
        clip = 1.0 if s.clip_x0 else None
        scale = float(s.guidance_scale)

        def renoise(params, image_emb, tokens, images, key, text=None, uncond_text=None):
            k_noise, k_sample = jax.random.split(key)
            x0 = to_model_space(images)
            x_t = D.q_sample(d, x0, jnp.full((x0.shape[0],), t, jnp.int32), jax.random.normal(k_noise, x0.shape))
            denoise = self.guided_denoiser(params, image_emb, tokens, scale, text, uncond_text)
            if s.sampler == "ddpm":
                x = D.sample_ddpm(sub, denoise, x0.shape, k_sample, clip_x0=clip, x_T=x_t)
            else:
                x = D.sample_ddim(sub, denoise, x0.shape, k_sample, eta=float(s.eta), clip_x0=clip, x_T=x_t)
            return to_uint8(x)

        return jax.jit(renoise)

    COND_PROBE_MODES = ("both", "image", "caption", "none", "shuffled")

    def make_conditioning_probe(self, t: int):
        """A jitted (params, image_emb [B, E], tokens [B, L], images uint8 [B, R, R, 3], key) -> [B, 5]: each
        image noised to timestep `t`, then the model's one-step x0 prediction's mean squared error against the
        image (model space, x0 clipped to [-1, 1]) under each conditioning of COND_PROBE_MODES: both (embedding
        and caption), image (embedding only, caption dropped), caption (caption only, embedding dropped), none
        (both dropped) and shuffled (both, taken from the next image in the batch). A condition the decoder
        uses lowers the error below `none`; `shuffled` above `both` tells what the wrong one costs. A
        clip_text_conditioning decoder (karlo's) also takes text / uncond_text (guided_denoiser): its dropped
        caption is the empty caption's encodings."""
        d = self.diffusion
        if not 0 < t < d.num_steps:
            raise ValueError(f"conditioning probe timestep must be in (0, {d.num_steps}), got {t}")

        def probe(params, image_emb, tokens, images, key, text=None, uncond_text=None):
            b = images.shape[0]
            x0 = to_model_space(images)
            tt = jnp.full((b,), t, jnp.int32)
            x_t = D.q_sample(d, x0, tt, jax.random.normal(key, x0.shape))
            no, yes = jnp.zeros((b,), bool), jnp.ones((b,), bool)
            if self.clip_text_conditioning:
                if text is None or uncond_text is None:
                    raise ValueError("a decoder with model.clip_text_conditioning takes text and uncond_text")
                un = tuple(jnp.broadcast_to(a, (b,) + a.shape[1:]) for a in uncond_text)
                roll = tuple(jnp.roll(a, 1, 0) for a in text)
                cmodes = {"both": (image_emb, text, no), "image": (image_emb, un, no),
                          "caption": (image_emb, text, yes), "none": (image_emb, un, yes),
                          "shuffled": (jnp.roll(image_emb, 1, 0), roll, no)}
                cerrs = []
                for name in self.COND_PROBE_MODES:
                    e, (te, ts, tm), drop_i = cmodes[name]
                    out = self.unet.apply(params, x_t, tt, image_emb=e, text_emb=te, text_states=ts, text_mask=tm,
                                          drop_image=drop_i)
                    mean, _ = D.split_output(d, out, x_t.shape)
                    x0_hat, _ = D.model_output_to_x0_eps(d, x_t, tt, mean)
                    cerrs.append(jnp.mean((jnp.clip(x0_hat, -1.0, 1.0) - x0) ** 2, axis=(1, 2, 3)))
                return jnp.stack(cerrs, axis=1)
            toks = self.caption_tokens(tokens)
            modes = {"both": (image_emb, toks, no, no), "image": (image_emb, toks, no, yes),
                     "caption": (image_emb, toks, yes, no), "none": (image_emb, toks, yes, yes),
                     "shuffled": (jnp.roll(image_emb, 1, 0), jnp.roll(toks, 1, 0), no, no)}
            errs = []
            for name in self.COND_PROBE_MODES:
                e, tk, drop_i, drop_t = modes[name]
                out = self.unet.apply(params, x_t, tt, image_emb=e, tokens=tk, drop_image=drop_i, drop_text=drop_t)
                mean, _ = D.split_output(d, out, x_t.shape)
                x0_hat, _ = D.model_output_to_x0_eps(d, x_t, tt, mean)
                errs.append(jnp.mean((jnp.clip(x0_hat, -1.0, 1.0) - x0) ** 2, axis=(1, 2, 3)))
            return jnp.stack(errs, axis=1)

        return jax.jit(probe)

    def make_inverter(self, steps: int | None = None, guidance_scale: float | None = None,
                      fixed_point_iters: int = 3):
        """A jitted (params, image_emb [B, E], tokens [B, L], images uint8 [B, R, R, 3]) -> x_T [B, R, R, 3]:
        the DDIM inversion of the images under the same guided denoiser and x0 clipping the sampler uses, so
        DDIM with eta = 0 from x_T gives the images back (to the accuracy of the fixed-point iterations).
        Optional text / uncond_text: a clip_text_conditioning decoder's CLIP text encodings (guided_denoiser)."""
        scale = float(self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale)
        clip = 1.0 if self.config.sampling.clip_x0 else None

        def invert(params, image_emb, tokens, images, text=None, uncond_text=None):
            denoise = self.guided_denoiser(params, image_emb, tokens, scale, text, uncond_text)
            return D.ddim_invert(self.sampling_diffusion(steps), denoise, to_model_space(images),
                                 fixed_point_iters=fixed_point_iters, clip_x0=clip)

        return jax.jit(invert)

    def make_inpainter(self, steps: int | None = None, guidance_scale: float | None = None, resample: int = 1,
                       jump_length: int = 1):
        """A jitted (params, image_emb [B, E], tokens [B, L], known uint8 [B, R, R, 3], keep [B, R, R] bool,
        key[, text, uncond_text]) -> uint8 [B, R, R, 3]: RePaint over the guided decoder; kept pixels come back
        unchanged. text / uncond_text: a clip_text_conditioning decoder's CLIP text encodings (guided_denoiser)."""
        scale = float(self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale)

        def inpaint(params, image_emb, tokens, known, keep, key, text=None, uncond_text=None):
            denoise = self.guided_denoiser(params, image_emb, tokens, scale, text, uncond_text)
            return to_uint8(self.run_repaint(denoise, known, keep, key, steps, resample, jump_length))

        return jax.jit(inpaint)

    def evaluate(self, params: Any, mesh) -> dict:
        """Samples 64x64 images from test-image embeddings (with their captions) and reports the frozen
        CLIP's cosine between each sample's embedding and the conditioning embedding (clip_cosine; a
        shuffled pairing as the baseline) and the zero-shot color/shape accuracy of the samples against
        the scene labels (next to the same accuracy on the real test images)."""
        from dalle2_jax.stages.clip import zero_shot_attributes

        cfg, d = self.config, self.config.data
        frozen = jax.device_put(self.clip_params(), replicated(mesh))  # beside the sharded batch
        source = pipeline.open_source(d, d.eval_split, skip_decoding=(d.image_key,))
        has_scene = "scene" in source[0]
        keys = [d.image_key, d.text_key] + (["scene"] if has_scene else [])
        records = pipeline.read_split(d, d.eval_split, keys, int(cfg.eval.max_examples))
        images = np.stack([r[d.image_key] for r in records])
        clip_images = images
        if self._separate_clip_resolution():  # the same records, preprocessed for the CLIP
            dc = d.copy_and_resolve_references()
            dc.resolution = self.clip_resolution
            clip_images = np.stack([r[d.image_key] for r in pipeline.read_split(dc, d.eval_split, [d.image_key],
                                                                                 int(cfg.eval.max_examples))])
        tokens = self.tokenizer.encode_batch([r[d.text_key] for r in records])
        if not self._eval_jits:  # built once: periodic evaluations reuse the compiled functions
            self._eval_jits = {
                "cond": jax.jit(self.conditioning_embedding), "unit": jax.jit(self.clip_image),
                "text": jax.jit(lambda p, t: self.clip.apply(p, t, method=self.clip.encode_text)),
                "sample": self.make_sampler(), "clip_text": jax.jit(self.clip_text)}
        j = self._eval_jits
        bs = int(cfg.eval.batch_size)
        key = jax.random.key(cfg.seed + 1)

        def text_kw(t) -> dict:  # a clip_text_conditioning decoder's caption and empty-caption encodings
            if not self.clip_text_conditioning:
                return {}
            return {"text": j["clip_text"](frozen, t),
                    "uncond_text": j["clip_text"](frozen, jnp.asarray(self.empty_caption_tokens()))}

        real_unit = run_batched(lambda x, i: j["unit"](frozen, x), bs, clip_images, mesh=mesh)
        samples = run_batched(lambda x, t, i: j["sample"](params, j["cond"](frozen, x), t, jax.random.fold_in(key, i),
                                                          **text_kw(t)),
                              bs, clip_images, tokens, mesh=mesh)
        samp_unit = run_batched(lambda x, i: j["unit"](frozen, x), bs, resize_square(samples, self.clip_resolution),
                                mesh=mesh)
        perm = np.roll(np.arange(len(records)), 1)
        out: dict[str, Any] = {
            "num_examples": len(records),
            "clip_cosine": float(np.mean(np.sum(samp_unit * real_unit, axis=1))),
            "shuffled_clip_cosine": float(np.mean(np.sum(samp_unit * real_unit[perm], axis=1))),
        }
        if has_scene:
            embed_text = lambda t: to_host(j["text"](frozen, t))  # noqa: E731
            scenes = [r["scene"] for r in records]
            zs = zero_shot_attributes(scenes, samp_unit, embed_text, self.tokenizer)
            real = zero_shot_attributes(scenes, real_unit, embed_text, self.tokenizer)
            out.update({"color_acc": zs["zero_shot_color_acc"], "shape_acc": zs["zero_shot_shape_acc"],
                        "heldout_color_acc": zs["heldout_color_acc"], "heldout_shape_acc": zs["heldout_shape_acc"],
                        "real_color_acc": real["zero_shot_color_acc"], "real_shape_acc": real["zero_shot_shape_acc"],
                        "num_single_object": zs["num_single_object"]})
            from dalle2_jax import scene_checker  # pixel-level attributes of each sample

            if samples.shape[1] == images.shape[1]:
                decoded = [S.decode_scene(s) for s in scenes]
                px = scene_checker.attribute_accuracy(samples, decoded)
                out.update({f"checker_{k}": px[k] for k in ("color_acc", "shape_acc", "size_acc", "relation_acc",
                                                             "background_acc", "all_correct", "shape_acc_small",
                                                             "shape_acc_large")})
                for t in cfg.eval.get("renoise_steps", ()):  # where along the chain the attributes are lost
                    if f"renoise_{int(t)}" not in j:  # built once, like the other eval jits (no recompiles)
                        j[f"renoise_{int(t)}"] = self.make_renoiser(int(t))
                    fn = j[f"renoise_{int(t)}"]
                    rec = run_batched(lambda x, tok, im, i, fn=fn: fn(params, j["cond"](frozen, x), tok, im,
                                                                     jax.random.fold_in(key, i), **text_kw(tok)),
                                      bs, clip_images, tokens, images, mesh=mesh)
                    px = scene_checker.attribute_accuracy(rec, decoded)
                    out.update({f"renoise_t{int(t)}_{k}": px[k] for k in ("color_acc", "shape_acc",
                                                                          "shape_acc_small", "shape_acc_large")})
        for t in cfg.eval.get("renoise_steps", ()):  # which conditions the prediction at t uses
            if f"cond_probe_{int(t)}" not in j:
                j[f"cond_probe_{int(t)}"] = self.make_conditioning_probe(int(t))
            fn = j[f"cond_probe_{int(t)}"]
            err = run_batched(lambda x, tok, im, i, fn=fn: fn(params, j["cond"](frozen, x), tok, im,
                                                             jax.random.fold_in(key, i), **text_kw(tok)),
                              bs, clip_images, tokens, images, mesh=mesh)
            out.update({f"x0_mse_t{int(t)}_{m}": float(v) for m, v in zip(self.COND_PROBE_MODES, err.mean(0))})
        g = min(int(cfg.eval.grid_size), len(records))
        out["images"] = {"decoder": image_grid([images[:g], samples[:g]])}  # top: real, bottom: sampled
        return out
