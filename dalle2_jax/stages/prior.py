"""The diffusion prior stage: CLIP text (embedding + token encodings) -> CLIP image embedding.

The frozen CLIP (config.clip_workdir) embeds the images and captions inside the jitted step. The prior is
trained on the diffusion loss of the scaled image embedding; evaluation samples embeddings for test
captions (guided, best of N candidates by dot product with the text embedding) and compares them with
the true image embeddings.
"""

from __future__ import annotations

import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion as D, fileio, procs
from dalle2_jax.data import pipeline
from dalle2_jax.models.clip import build_clip
from dalle2_jax.models.layers import ACTIVATIONS
from dalle2_jax.models.prior import build_prior
from dalle2_jax.models.transformer import REMAT_POLICIES
from dalle2_jax.stages.base import (TOKENIZER_DIR, FrozenClipMixin, Stage, sampling_chain, validate_clip_workdir,
                                    validate_diffusion_keys)
from dalle2_jax.text import load_tokenizer
from dalle2_jax.training.config import ConfigError
from dalle2_jax.training.partitioning import replicated, round_batch, shard_rows, to_host

SAMPLERS = ("ddim", "ddpm", "analytic")


def quartile_losses(loss: jax.Array, t: jax.Array, num_steps: int) -> dict:
    """Mean loss per timestep quartile (as ADM logs it): loss [B], t [B] -> {'loss_q0'..'loss_q3'}."""
    q = jnp.clip(t * 4 // num_steps, 0, 3)
    out = {}
    for i in range(4):
        m = (q == i).astype(jnp.float32)
        out[f"loss_q{i}"] = jnp.sum(loss * m) / jnp.maximum(jnp.sum(m), 1.0)
    return out


class _DecodeEmbedding(grain.transforms.Map):
    def map(self, data: bytes) -> dict:
        from dalle2_jax.tools.embed import deserialize

        r = deserialize(data)
        return {k: np.asarray(r[k]) for k in ("image_emb", "text_emb", "token_states", "tokens")}


def embedding_pipeline(directory: str, split: str, *, local_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, num_workers: int = 0) -> grain.IterDataset:
    """Endless batches of precomputed embeddings (tools.embed output): {'image_emb' [b,E], 'text_emb' [b,E],
    'token_states' [b,L,W], 'tokens' [b,L]}, shuffled by `seed`; this process's slice of every global
    batch (see pipeline.shard_batches)."""
    from dalle2_jax.tools.embed import embedding_files

    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(embedding_files(directory, split)))
    ds = ds.seed(seed).shuffle().repeat(None).map(_DecodeEmbedding())
    it = pipeline.shard_batches(ds, local_batch_size, process_index, process_count, read_threads=2)
    if num_workers > 0:
        it = procs.mp_prefetch(it, num_workers)
    return it


class PriorStage(FrozenClipMixin, Stage):
    """Trains the diffusion prior against a frozen CLIP."""

    name = "prior"

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.clip = self.prior = self.tokenizer = self.diffusion = None
        self._frozen = None
        self._eval_jits = None

    @classmethod
    def validate(cls, config) -> None:
        validate_clip_workdir(config)
        m = config.model
        if m.width % m.heads:
            raise ConfigError("model.heads", f"width {m.width} is not divisible by {m.heads} heads")
        if m.act not in ACTIVATIONS:
            raise ConfigError("model.act", f"unknown activation {m.act!r}; use one of {ACTIVATIONS}")
        if m.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"unknown remat policy {m.remat!r}; use one of {sorted(REMAT_POLICIES)}")
        if m.embedding_norm not in ("scale", "standardize"):
            raise ConfigError("model.embedding_norm", f"unknown mode {m.embedding_norm!r}; use 'scale' or "
                              "'standardize'")
        if not 0.0 <= m.cond_drop_prob < 1.0:
            raise ConfigError("model.cond_drop_prob", f"must be in [0, 1), got {m.cond_drop_prob}")
        if config.data.embeddings_dir and not m.get("normalize_embedding", True):
            raise ConfigError("data.embeddings_dir", "the embed tool stores unit-norm embeddings, but this prior "
                              "(model.normalize_embedding False, karlo's) is trained on the raw CLIP embeddings; "
                              "train it without data.embeddings_dir (the frozen CLIP embeds each batch)")
        if config.data.embeddings_dir and not m.get("null_text_embedding", True) and m.cond_drop_prob > 0:
            raise ConfigError("data.embeddings_dir", "a prior without a learned null embedding (model."
                              "null_text_embedding False, karlo's) drops a caption to the empty caption's CLIP "
                              "encodings, which need the frozen CLIP in the step: train without data.embeddings_dir"
                              " or set model.cond_drop_prob=0")
        validate_diffusion_keys(config, SAMPLERS)
        s = config.sampling
        if s.num_candidates < 1:
            raise ConfigError("sampling.num_candidates", f"must be >= 1, got {s.num_candidates}")

    # --- set-up ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        pipeline.prepare_dataset(self.config.data)
        self.copy_clip_tokenizer()  # the prior's workdir carries the tokenizer it was trained with
        self.setup_model()
        if self.config.model.embedding_norm == "standardize" and not fileio.exists(self._stats_path()):
            if not self._copy_init_stats():
                self._compute_stats()
        self._load_stats()

    def _copy_init_stats(self) -> bool:
        """A run starting from config.init_from's params standardises with the statistics those params were
        trained with (an imported karlo prior: karlo's clip_mean / clip_std), not ones measured on this run's
        data: copies <init_from>/stats/image_embedding_stats.json here (process 0). False when it has none."""
        src = self.config.get("init_from", "")
        if not src or not fileio.exists(fileio.join(src, "stats", "image_embedding_stats.json")):
            return False
        import logging

        if jax.process_index() == 0:
            fileio.write_json(self._stats_path(),
                              fileio.read_json(fileio.join(src, "stats", "image_embedding_stats.json")))
        logging.getLogger(__name__).info("prior: standardising image embeddings with %s's statistics "
                                         "(stats/image_embedding_stats.json, copied from config.init_from)", src)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("prior_stats")
        return True

    def _stats_path(self) -> str:
        return fileio.join(self.workdir, "stats", "image_embedding_stats.json")

    def _compute_stats(self) -> None:
        """Per-dimension mean/std of the frozen CLIP's image embeddings over config.model.stats_examples
        training records, written to <workdir>/stats/ (process 0)."""
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            n = int(self.config.model.stats_examples)
            if self.config.data.embeddings_dir:
                it = iter(embedding_pipeline(self.config.data.embeddings_dir, self.config.data.train_split,
                                             local_batch_size=min(n, 256), seed=0))
                embs = np.concatenate([next(it)["image_emb"] for _ in range(max(1, n // min(n, 256)))])
            else:
                d = self.config.data
                rows = pipeline.read_split(d, d.train_split, [d.image_key], n)
                images = np.stack([r[d.image_key] for r in rows])
                embed = jax.jit(self.clip_image)
                embs = np.concatenate([np.asarray(embed(self.clip_params(), images[i: i + 256]))
                                       for i in range(0, len(images), 256)])
            fileio.write_json(self._stats_path(), {"num_examples": int(len(embs)), "mean": embs.mean(0).tolist(),
                                                   "std": (embs.std(0) + 1e-6).tolist()})
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("prior_stats")

    def _load_stats(self) -> None:
        if self.config.model.embedding_norm == "standardize":
            st = fileio.read_json(self._stats_path())
            self.emb_mean = np.asarray(st["mean"], np.float32)
            self.emb_std = np.asarray(st["std"], np.float32)

    def to_diffusion(self, img: jax.Array) -> jax.Array:
        """Unit image embeddings [B, E] -> the diffusion's data space (scaled or standardised)."""
        if self.config.model.embedding_norm == "standardize":
            return (img - self.emb_mean) / self.emb_std
        return img * self.scale

    def from_diffusion(self, x: jax.Array) -> jax.Array:
        """Inverse of to_diffusion, then unit-normalised (unless model.normalize_embedding is False): [B, E] ->
        [B, E]."""
        if self.config.model.embedding_norm == "standardize":
            x = x * self.emb_std + self.emb_mean
        if not self.config.model.get("normalize_embedding", True):  # karlo: the raw embedding
            return x
        return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)

    def setup_model(self) -> None:
        from dalle2_jax.training.checkpoint import read_config

        clip_cfg = read_config(self.config.clip_workdir)
        self.tokenizer = load_tokenizer(fileio.join(self.config.clip_workdir, TOKENIZER_DIR))
        self.clip = build_clip(clip_cfg.model, self.tokenizer.eot_id)
        self.clip_embed_dim = int(clip_cfg.model.embed_dim)
        self.text_width = int(clip_cfg.model.text.width)
        self.context_length = int(clip_cfg.model.text.context_length)
        if self.config.data.resolution != clip_cfg.model.vision.image_size:
            raise ConfigError("data.resolution", f"{self.config.data.resolution} differs from the CLIP's image size "
                              f"{clip_cfg.model.vision.image_size}; the prior's images only feed the CLIP, so set "
                              f"--config.data.resolution={clip_cfg.model.vision.image_size}")
        self._build_prior()
        if fileio.exists(self._stats_path()):
            self._load_stats()

    def _build_prior(self) -> None:
        m = self.config.model
        self.prior = build_prior(m, self.clip_embed_dim, self.context_length)
        d = self.config.diffusion
        self.diffusion = D.make_diffusion(d.schedule, d.num_steps, model_output=d.model_output,
                                          learned_variance=d.learned_variance)
        self.scale = float(m.embedding_scale) or float(np.sqrt(self.clip_embed_dim))

    def abstract_init(self, rng: jax.Array) -> Any:
        m = self.config.model
        if self.config.clip_workdir and fileio.exists(fileio.join(self.config.clip_workdir, "config.json")):
            from dalle2_jax.training.checkpoint import read_config

            clip_model = read_config(self.config.clip_workdir).model
            dims = (clip_model.embed_dim, clip_model.text.width, clip_model.text.context_length)
        else:
            dims = (m.clip_embed_dim, m.clip_text_width, m.clip_context_length)
        self.clip_embed_dim, self.text_width, self.context_length = (int(x) for x in dims)
        self._build_prior()
        return self.init_params(rng)

    def init_params(self, rng: jax.Array) -> Any:
        e = jnp.zeros((1, self.clip_embed_dim), jnp.float32)
        tokens = jnp.zeros((1, self.context_length, self.text_width), jnp.float32)
        return self.prior.init(rng, e, jnp.zeros((1,), jnp.int32), e, tokens,
                               jnp.ones((1, self.context_length), bool), jnp.zeros((1,), bool))

    def load_frozen(self) -> Any:
        # Training from precomputed embeddings needs no CLIP in the step.
        return None if self.config.data.embeddings_dir else self.clip_params()

    def abstract_train_inputs(self, global_batch: int, clip_model_cfg: Any = None) -> tuple[dict, Any]:
        if clip_model_cfg is None:
            raise ValueError("the prior's step runs its frozen CLIP: pass the CLIP's config.model")
        self.use_abstract_clip(clip_model_cfg)
        c = clip_model_cfg
        self.clip_embed_dim, self.text_width, self.context_length = (
            int(c.embed_dim), int(c.text.width), int(c.text.context_length))
        self._build_prior()
        if self.config.model.embedding_norm == "standardize" and not hasattr(self, "emb_mean"):
            # the statistics come from the data; their values do not change the compiled step
            self.emb_mean = np.zeros(self.clip_embed_dim, np.float32)
            self.emb_std = np.ones(self.clip_embed_dim, np.float32)
        b, e, n = global_batch, self.clip_embed_dim, self.context_length
        tokens = jax.ShapeDtypeStruct((b, n), jnp.int32)
        if self.config.data.embeddings_dir:
            f32 = jnp.float32
            return {"image_emb": jax.ShapeDtypeStruct((b, e), f32), "text_emb": jax.ShapeDtypeStruct((b, e), f32),
                    "token_states": jax.ShapeDtypeStruct((b, n, self.text_width), f32), "tokens": tokens}, None
        r = int(c.vision.image_size)
        return {"image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8), "tokens": tokens}, self.abstract_frozen()

    def train_iterator(self, local_batch_size: int, process_index: int, process_count: int):
        if self.config.data.embeddings_dir:
            return embedding_pipeline(self.config.data.embeddings_dir, self.config.data.train_split,
                                      local_batch_size=local_batch_size, seed=self.config.seed,
                                      process_index=process_index, process_count=process_count,
                                      num_workers=int(self.config.data.num_workers))
        return pipeline.image_text_pipeline(
            self.config.data, self.config.data.train_split, tokenizer_dir=fileio.join(self.workdir, TOKENIZER_DIR),
            local_batch_size=local_batch_size, seed=self.config.seed, process_index=process_index,
            process_count=process_count)

    # --- the step -------------------------------------------------------------------------------------
    def tokenizer_pad_id(self) -> int:
        return int(self.tokenizer.pad_id) if self.tokenizer is not None else 0

    def clip_image(self, clip_params: Any, images_uint8: jax.Array) -> jax.Array:
        """uint8 images [B, R, R, 3] -> the CLIP image embeddings [B, E] the prior learns: unit-norm, or raw
        with model.normalize_embedding False (karlo's prior; its standardisation statistics are of the raw
        embeddings)."""
        normalize = bool(self.config.model.get("normalize_embedding", True))
        emb = self.clip.apply(clip_params, images_uint8.astype(jnp.float32) / 255.0, normalize,
                              method=self.clip.encode_image)
        return jax.lax.stop_gradient(emb.astype(jnp.float32))

    def training_text(self, clip_params: Any, tokens: jax.Array, drop: jax.Array) -> tuple:
        """clip_text of the captions with the rows where `drop` [B] is True replaced by the empty caption's
        encodings (text embedding, token states, mask): the unconditional input of a prior without a learned
        null embedding (karlo's), as its sampler's unconditional half."""
        text = self.clip_text(clip_params, tokens)
        empty = self.empty_text(clip_params)
        return tuple(jnp.where(drop.reshape((-1,) + (1,) * (a.ndim - 1)), u, a) for a, u in zip(text, empty))

    def loss(self, params: Any, batch: dict, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
        b = batch["tokens"].shape[0]
        k_t, k_noise, k_drop = jax.random.split(rng, 3)
        drop = jax.random.bernoulli(k_drop, self.config.model.cond_drop_prob, (b,))
        if "image_emb" in batch:  # precomputed by tools.embed
            img, txt, states = batch["image_emb"], batch["text_emb"], batch["token_states"]
            valid = batch["tokens"] != self.tokenizer_pad_id()
        else:
            img = self.clip_image(frozen, batch["image"])
            if self.config.model.get("null_text_embedding", True):
                txt, states, valid = self.clip_text(frozen, batch["tokens"])
            else:  # karlo: no learned null embedding; a dropped caption is the empty caption's encodings
                txt, states, valid = self.training_text(frozen, batch["tokens"], drop)
        t = jax.random.randint(k_t, (b,), 0, self.diffusion.num_steps)
        noise = jax.random.normal(k_noise, img.shape, jnp.float32)

        def model_fn(x_t, t_orig):
            return self.prior.apply(params, x_t, t_orig, txt * self.scale, states, valid, drop)

        terms = D.training_losses(self.diffusion, model_fn, self.to_diffusion(img), t, noise,
                                  min_snr_gamma=float(self.config.diffusion.get("min_snr_gamma", 0.0)),
                                  min_snr_floor=float(self.config.diffusion.get("min_snr_floor", 0.0)))
        loss = jnp.mean(terms["loss"])
        return loss, quartile_losses(terms["loss"], t, self.diffusion.num_steps)

    # --- sampling and evaluation ----------------------------------------------------------------------
    def _denoiser(self, params, txt, states, valid, guidance_scale: float, uncond=None):
        """The guided denoise_fn(x_t, t) for these (already repeated) text conditions. The unconditional half
        is the learned null embedding, or with `uncond` = (text_emb, states, valid) of one row or of every row
        (karlo: the empty caption's encodings) the model on those inputs, one call on the doubled batch."""
        if uncond is None:
            if not self.config.model.get("null_text_embedding", True) and not (
                    isinstance(guidance_scale, (int, float)) and guidance_scale == 1):
                raise ValueError("this prior has no learned null embedding (model.null_text_embedding=False): "
                                 "guidance needs the unconditional inputs (the empty caption's encodings)")

            def model(x_t, t, drop):
                return self.prior.apply(params, x_t, t, txt * self.scale, states, valid, drop)

            return D.cfg_denoiser(lambda x, t: model(x, t, jnp.zeros((x.shape[0],), bool)),
                                  lambda x, t: model(x, t, jnp.ones((x.shape[0],), bool)), guidance_scale,
                                  learned_variance=self.diffusion.learned_variance)
        n = txt.shape[0]
        ut, us, uv = (jnp.broadcast_to(a, (n,) + a.shape[1:]) for a in uncond)
        both = [jnp.concatenate(p) for p in ((txt, ut), (states, us), (valid, uv))]

        def model_fn(x, t, drop):  # rows [cond, uncond]; a scale of 1 calls the cond rows only
            e, st, va = both if x.shape[0] == 2 * n else (txt, states, valid)
            return self.prior.apply(params, x, t, e * self.scale, st, va, jnp.zeros((x.shape[0],), bool))

        return D.cfg_denoiser_batched(model_fn, guidance_scale, learned_variance=self.diffusion.learned_variance)

    def sampling_diffusion(self, steps: int | None = None):
        return sampling_chain(self.diffusion, self.config, int(steps or self.config.sampling.steps))

    def sampling_clip(self):
        """config.sampling.clip_x0: the range the predicted x0 is clipped to (karlo: 5.0), None when 0/absent."""
        c = float(self.config.sampling.get("clip_x0", 0.0) or 0.0)
        return c or None

    def make_gamma_estimator(self, steps: int | None = None, guidance_scale: float | None = None):
        """For the analytic sampler: a jitted (params, image_emb [B,E] unit, txt, states, valid, key[, uncond])
        -> Gamma [steps], Analytic-DPM's per-step E||eps||^2/d measured on real (image, caption) pairs (uncond:
        as make_sampler's)."""
        s = self.config.sampling
        diff = self.sampling_diffusion(steps)
        scale_g = float(s.guidance_scale if guidance_scale is None else guidance_scale)

        def estimate(params, img, txt, states, valid, key, uncond=None):
            denoise = self._denoiser(params, txt, states, valid, scale_g, uncond)
            return D.estimate_analytic_gamma(diff, denoise, self.to_diffusion(img), key, estimator="mse")

        return jax.jit(estimate)

    def make_sampler(self, steps: int | None = None, guidance_scale: float | None = None,
                     num_candidates: int | None = None, sampler: str | None = None, eta: float | None = None):
        """A jitted (params, text_emb [B,E] unit, states [B,L,W], valid [B,L], key[, gamma, uncond, x_T,
        step_noise]) -> unit image embeddings [B, E]: guided sampling of `num_candidates` per caption, keeping
        the one with the highest dot product with the text embedding. The analytic sampler also takes Gamma
        (make_gamma_estimator). uncond: (text_emb, states, valid) of the unconditional half, one row or B
        (karlo's prior: the empty caption's encodings; required without a learned null embedding); x_T [B*k, E]
        and step_noise [steps, B*k, E] (ddpm) replace the draws from `key`; x0 is clipped at sampling.clip_x0
        (karlo: 5) when set; model.normalize_embedding False (karlo) gives the raw embedding."""
        s = self.config.sampling
        sampler = sampler or s.sampler
        scale_g = float(s.guidance_scale if guidance_scale is None else guidance_scale)
        k = int(num_candidates or s.num_candidates)
        eta = float(s.eta if eta is None else eta)
        diff = self.sampling_diffusion(steps)

        clip = self.sampling_clip()

        def sample(params, txt, states, valid, key, gamma=None, uncond=None, x_T=None, step_noise=None):
            b = txt.shape[0]
            rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
            if uncond is not None:
                uncond = tuple(a if a.shape[0] == 1 else rep(a) for a in uncond)
            denoise = self._denoiser(params, rep(txt), rep(states), rep(valid), scale_g, uncond)
            shape = (b * k, self.clip_embed_dim)
            if step_noise is not None and sampler != "ddpm":
                raise ValueError("step_noise is for the ddpm sampler")
            if sampler == "ddim":
                x0 = D.sample_ddim(diff, denoise, shape, key, eta=eta, clip_x0=clip, x_T=x_T)
            elif sampler == "ddpm":
                x0 = D.sample_ddpm(diff, denoise, shape, key, clip_x0=clip, x_T=x_T, step_noise=step_noise)
            else:
                x0 = D.sample_analytic(diff, denoise, shape, key, gamma=gamma, eta=eta, clip_x0=clip, x_T=x_T)
            cand = self.from_diffusion(x0).reshape(b, k, -1)
            best = jnp.argmax(jnp.einsum("bke,be->bk", cand, txt), axis=1)
            return jnp.take_along_axis(cand, best[:, None, None], axis=1)[:, 0]

        return jax.jit(sample)

    def evaluate(self, params: Any, mesh) -> dict:
        """prior_cosine (sampled vs true image embedding), text_baseline_cosine, shuffled_baseline_cosine,
        image_retrieval_r1 and heldout_prior_cosine on the test split."""
        cfg = self.config
        data_cfg = cfg.data
        frozen = jax.device_put(self.clip_params(), replicated(mesh))  # beside the sharded batches
        source = pipeline.open_source(data_cfg, data_cfg.eval_split, skip_decoding=(data_cfg.image_key,))
        has_scene = "scene" in source[0]
        keys = [data_cfg.image_key, data_cfg.text_key] + (["scene"] if has_scene else [])
        records = pipeline.read_split(data_cfg, data_cfg.eval_split, keys, int(cfg.eval.max_examples))
        images = np.stack([r[data_cfg.image_key] for r in records])
        tokens = self.tokenizer.encode_batch([r[data_cfg.text_key] for r in records])
        bs = round_batch(int(cfg.eval.batch_size), mesh)  # every device samples its rows of each batch
        if self._eval_jits is None:  # built once: periodic evaluations reuse the compiled functions
            self._eval_jits = (jax.jit(self.clip_image), jax.jit(self.clip_text), self.make_sampler())
        embed_img, embed_txt, sampler = self._eval_jits
        key = jax.random.key(cfg.seed + 1)
        uncond = None  # karlo's prior: guidance against the empty caption's encodings
        if not cfg.model.get("null_text_embedding", True):
            uncond = embed_txt(frozen, jnp.asarray(self.empty_caption_tokens()))
        gamma = None
        if cfg.sampling.sampler == "analytic":  # Gamma from real training pairs, not the test split
            train_rows = pipeline.read_split(data_cfg, data_cfg.train_split, [data_cfg.image_key, data_cfg.text_key],
                                             bs)
            ti = embed_img(frozen, *shard_rows(mesh, np.stack([r[data_cfg.image_key] for r in train_rows])))
            tt, tst, tva = embed_txt(frozen, *shard_rows(mesh, self.tokenizer.encode_batch(
                [r[data_cfg.text_key] for r in train_rows])))
            gamma = self.make_gamma_estimator()(params, ti, tt, tst, tva, jax.random.key(cfg.seed + 2), uncond)
        perm = np.random.default_rng(cfg.seed).permutation(len(records))
        img_e, txt_e, samp, samp_shuf = [], [], [], []
        sample_time, sampled = 0.0, 0
        for start in range(0, len(records), bs):
            sl = slice(start, start + bs)
            n = len(images[sl])
            def pad(x):  # one shape for every batch, its rows sharded over the batch axes
                return shard_rows(mesh, np.concatenate([x, np.repeat(x[-1:], bs - n, 0)]) if n < bs else x)[0]

            img_e.append(to_host(embed_img(frozen, pad(images[sl])))[:n])
            t, st, va = embed_txt(frozen, pad(tokens[sl]))
            txt_e.append(to_host(t)[:n])
            if start == 0:  # compile outside the timing
                jax.block_until_ready(sampler(params, t, st, va, key, gamma, uncond))
            t0 = time.perf_counter()
            samp.append(to_host(sampler(params, t, st, va, jax.random.fold_in(key, start), gamma, uncond))[:n])
            sample_time += time.perf_counter() - t0
            sampled += bs
            ts, sts, vas = embed_txt(frozen, pad(tokens[perm][sl]))
            samp_shuf.append(to_host(sampler(params, ts, sts, vas, jax.random.fold_in(key, 10**6 + start),
                                             gamma, uncond))[:n])
        # cosines of unit vectors (karlo's prior samples and is trained on raw embeddings)
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
        img_e, txt_e = unit(np.concatenate(img_e)), unit(np.concatenate(txt_e))
        samp, samp_shuf = unit(np.concatenate(samp)), unit(np.concatenate(samp_shuf))
        cos = np.sum(samp * img_e, axis=1)
        out = {
            "num_examples": len(records),
            "prior_cosine": float(cos.mean()),
            "text_baseline_cosine": float(np.sum(txt_e * img_e, axis=1).mean()),
            "shuffled_baseline_cosine": float(np.sum(samp_shuf * img_e, axis=1).mean()),
            "image_retrieval_r1": float(np.mean(np.argmax(samp @ img_e.T, axis=1) == np.arange(len(records)))),
            # wall time of guided sampling incl. all candidates, per kept embedding, batch eval.batch_size
            "sampling_seconds_per_embedding": sample_time / max(sampled, 1),
        }
        if has_scene:
            from dalle2_jax.data import scenes as S

            held = np.array([any(S.is_heldout(o["color"], o["shape"]) for o in S.decode_scene(r["scene"])["objects"])
                             for r in records], bool)
            out["heldout_prior_cosine"] = float(cos[held].mean()) if held.any() else float("nan")
            out["num_heldout"] = int(held.sum())
        return out
