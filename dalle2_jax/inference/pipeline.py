"""UnCLIPPipeline: the trained cascade from an exported bundle.

    pipe = UnCLIPPipeline.from_bundle("bundles/tiny")
    out = pipe.generate(["a red circle to the left of a blue square"], num_images=4, seed=0)
    out.images            # uint8 [4, R, R, 3] at the last stage's resolution
    out.stages            # {'decoder': uint8 [4, 64, 64, 3], 'upsampler_64to256': ...}
    out.image_embeddings  # [4, E]: what the decoder was conditioned on

generate: CLIP text encoding -> prior (best of `num_candidates` by dot product with the text embedding)
-> guided decoder -> each upsampler. variations / interpolate / text_diff decode from the DDIM inversion of
the input image (the decoder's own guided denoiser run backwards, refined by fixed-point iterations), so
DDIM with eta = 0 reconstructs the input; they pass an empty caption. inpaint runs RePaint over the decoder
and every upsampler (the input and the mask resized to each stage's resolution) and then pastes the input's
kept pixels back over each stage's output, so the pixels outside the mask are the input's (resized to the
output resolution) whatever the input's size.

The decoder and the upsamplers run one batch of `batch_size` rows at a time through the whole cascade, and
`on_batch(first_row, images)` (if given) receives each batch's final images as soon as they exist, so a
caller can write them out and a KeyboardInterrupt between batches loses only the batch in flight. The
random draws depend on the batch size only, not on how the rows are split into calls.

Sampling settings are per stage (`steps`, `sampler`, `guidance_scale`, `eta`, and the prior's
`num_candidates`), defaulting to each stage's config and overridable per call with a nested dict, e.g.
`settings={"decoder": {"steps": 50}, "upsampler": {"steps": 10}}` ("upsampler" sets every upsampler). Each
stage's sampling function is jitted once per (settings, shape) and reused; a seed makes a call reproducible.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.images import load_image, resize_shortest_center_crop  # noqa: F401  (load_image: re-exported)
from dalle2_jax.inference.bundle import Bundle, InputError, LoadedStage, load_bundle
from dalle2_jax.stages.image_diffusion import run_batched
from dalle2_jax.training.partitioning import to_host

logger = logging.getLogger("dalle2_jax.inference")

MAX_GUIDANCE = 100.0
SETTING_KEYS = {"prior": ("steps", "sampler", "guidance_scale", "eta", "num_candidates"),
                "decoder": ("steps", "sampler", "guidance_scale", "eta"),
                "upsampler": ("steps", "sampler", "eta")}
# on_batch(first_row, uint8 images [n, R, R, 3]): a batch's final images, as soon as they exist
OnBatch = Callable[[int, np.ndarray], None] | None
SAMPLERS = {"prior": ("ddim", "ddpm"), "decoder": ("ddpm", "ddim"), "upsampler": ("ddim", "ddpm")}


@dataclass
class Output:
    """What a pipeline call returns."""

    images: np.ndarray                      # uint8 [N, R, R, 3], the last stage run
    stages: dict[str, np.ndarray]           # every image stage's output, in cascade order
    image_embeddings: np.ndarray            # [N, E] the decoder's conditioning
    settings: dict                          # every setting used (JSON-serialisable)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (compile included)
    warnings: list[str] = field(default_factory=list)


# --- images and vectors ----------------------------------------------------------------------------------
def center_square(a: np.ndarray) -> np.ndarray:
    """The centred square crop of [H, W, ...]."""
    h, w = a.shape[:2]
    s = min(h, w)
    return a[(h - s) // 2: (h - s) // 2 + s, (w - s) // 2: (w - s) // 2 + s]


def resize(a: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Square uint8 [S, S, 3] (or bool [S, S]) -> [size, size, ...] (bicubic with antialiasing, or nearest)."""
    from PIL import Image

    if a.shape[0] == size:
        return a.copy()
    if a.dtype == bool:  # a mask: a pixel is selected if any of the area it covers is
        m = np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize((size, size), Image.BOX))
        return m > 0
    return np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST if nearest else Image.BICUBIC))


def paste_kept(images: np.ndarray, known: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """images [N, R, R, 3] with the pixels where `keep` [R, R] is True replaced by `known` [R, R, 3]'s."""
    out = np.array(images, copy=True)
    out[:, keep] = known[keep]
    return out


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of the rows a, b [..., D] at fractions t [N] -> [N, ..., D] (float64 math;
    t = 0 gives a and t = 1 gives b exactly; nearly parallel vectors fall back to linear interpolation)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fa, fb = a64.reshape(-1), b64.reshape(-1)
    cos = float(np.dot(fa, fb) / (np.linalg.norm(fa) * np.linalg.norm(fb) + 1e-30))
    theta = float(np.arccos(np.clip(cos, -1.0, 1.0)))
    out = []
    for tk in np.asarray(t, np.float64):
        if tk == 0.0:
            out.append(a64)
        elif tk == 1.0:
            out.append(b64)
        elif theta < 1e-6:
            out.append((1 - tk) * a64 + tk * b64)
        else:
            out.append((np.sin((1 - tk) * theta) * a64 + np.sin(tk * theta) * b64) / np.sin(theta))
    return np.stack(out).astype(np.float32)


# --- the pipeline ----------------------------------------------------------------------------------------
class UnCLIPPipeline:
    """Text -> image, variations, interpolation, text diffs and inpainting with an exported bundle."""

    def __init__(self, bundle: Bundle, log: Callable[[str], None] | None = None, mesh: Any = None):
        self.bundle = bundle
        self.mesh = mesh  # sampling batches are sharded over its batch axes (None: one device)
        self.log = log or logger.info
        self.clip = bundle.get("clip")[0]
        priors = bundle.get("prior")
        self.prior: LoadedStage | None = priors[0] if priors else None
        self.decoder = bundle.get("decoder")[0]
        self.upsamplers = bundle.get("upsampler")
        self.tokenizer = self.clip.stage.tokenizer
        self._fns: dict = {}

    @classmethod
    def from_bundle(cls, path: str, verify_hashes: bool = True, log: Callable[[str], None] | None = None,
                    mesh: Any = None) -> "UnCLIPPipeline":
        """Loads a bundle written by `dalle2-jax export` (BundleError if it is missing, incomplete or damaged).
        With a `mesh` (e.g. training.partitioning.data_parallel_mesh()) the params are replicated over its
        devices and every sampling batch is split over its batch axes, so all devices (of all hosts) sample
        in parallel; batch sizes are rounded up to a multiple of the device count."""
        t0 = time.perf_counter()
        pipe = cls(load_bundle(path, verify_hashes=verify_hashes, mesh=mesh), log, mesh)
        pipe.log(f"loaded bundle {path}: {', '.join(s.name for s in pipe.bundle.stages)} "
                 f"({time.perf_counter() - t0:.1f}s)")
        return pipe

    @property
    def image_stages(self) -> list[LoadedStage]:
        return [self.decoder] + list(self.upsamplers)

    @property
    def resolution(self) -> int:
        return int(self.image_stages[-1].entry["interface"]["resolution"])

    # --- settings ---------------------------------------------------------------------------------------
    def default_settings(self) -> dict:
        """{stage name: {setting: value}} from each stage's config."""
        out = {}
        for ls in ([self.prior] if self.prior else []) + self.image_stages:
            s = ls.stage.config.sampling
            d = {k: s[k] for k in SETTING_KEYS[ls.kind] if k in s}
            if ls.kind == "prior" and d["sampler"] not in SAMPLERS["prior"]:
                d["sampler"] = "ddim"  # analytic needs Gamma measured on training data, which a bundle lacks
            out[ls.name] = {k: (float(v) if isinstance(v, float) else v) for k, v in d.items()}
        return out

    def resolve_settings(self, overrides: dict | None = None) -> dict:
        """The defaults updated with `overrides` ({stage name or kind: {key: value}}), range-checked."""
        settings = self.default_settings()
        for name, values in (overrides or {}).items():
            targets = [n for n in settings if n == name or n.split("_")[0] == name]
            if not targets:
                if name == "prior" and self.prior is None:
                    continue
                raise InputError(f"unknown stage {name!r} in settings; this bundle has {sorted(settings)}")
            for t in targets:
                kind = t.split("_")[0]
                for key, value in values.items():
                    if value is None:
                        continue
                    if key not in SETTING_KEYS[kind]:
                        raise InputError(f"{t}: unknown setting {key!r}; use one of {SETTING_KEYS[kind]}")
                    settings[t][key] = value
        for name, d in settings.items():
            kind = name.split("_")[0]
            stage = self._stage(name).stage
            n = int(stage.config.diffusion.num_steps)
            if not isinstance(d["steps"], (int, np.integer)) or not 1 <= d["steps"] <= n:
                raise InputError(f"{name}: steps must be an integer in [1, {n}], got {d['steps']!r}")
            if d["sampler"] not in SAMPLERS[kind]:
                raise InputError(f"{name}: unknown sampler {d['sampler']!r}; use one of {SAMPLERS[kind]}")
            if "guidance_scale" in d and not 0.0 <= float(d["guidance_scale"]) <= MAX_GUIDANCE:
                raise InputError(f"{name}: guidance scale must be in [0, {MAX_GUIDANCE:g}], got {d['guidance_scale']}")
            if not 0.0 <= float(d.get("eta", 0.0)) <= 1.0:
                raise InputError(f"{name}: eta must be in [0, 1], got {d['eta']}")
            if "num_candidates" in d and not 1 <= int(d["num_candidates"]) <= 64:
                raise InputError(f"{name}: num_candidates must be in [1, 64], got {d['num_candidates']}")
        return settings

    def _stage(self, name: str) -> LoadedStage:
        return next(s for s in self.bundle.stages if s.name == name)

    def _fn(self, key: tuple, factory: Callable[[], Callable]) -> Callable:
        """A jitted function built once per key (stage, purpose, settings) and reused (jit caches shapes)."""
        if key not in self._fns:
            self._fns[key] = factory()
        return self._fns[key]

    # --- building blocks --------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """prompts -> (token ids [N, L], warnings); an empty prompt is an InputError, an over-long one is
        truncated to the CLIP context (with a warning)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        warnings = []
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise InputError("empty prompt: give some text to condition on")
            if self.tokenizer.is_truncated(p):
                w = (f"prompt {p[:40]!r}... is longer than the CLIP context of {self.tokenizer.context_length} "
                     "tokens; truncated")
                warnings.append(w)
                self.log("warning: " + w)
        return self.tokenizer.encode_batch(list(prompts)), warnings

    def encode_text(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens [N, L] -> (unit text embeddings [N, E], token states [N, L, W], valid mask [N, L])."""
        stage = (self.prior or self.decoder).stage  # both carry the frozen CLIP's text tower
        fn = self._fn(("text",), lambda: jax.jit(stage.clip_text))
        emb, states, valid = fn(self.clip.params, tokens)
        return to_host(emb), to_host(states), to_host(valid)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] at the CLIP's image size -> the decoder's conditioning embeddings [N, E]."""
        if not self.clip.stage.config.model.get("image_tower", True):
            raise InputError("this bundle's CLIP has no image tower (karlo ships only CLIP's text encoder), so it "
                             "cannot embed images: import again with an image encoder (tools.import_karlo "
                             "--image_encoder DIR, e.g. karlo-v1-alpha-image-variations' image_encoder/)")
        dec = self.decoder.stage
        fn = self._fn(("embed",), lambda: jax.jit(dec.conditioning_embedding))
        return to_host(fn(self.clip.params, images))

    def _prepare(self, image: Any, what: str = "image") -> np.ndarray:
        return load_image(image, what)  # cropped to a square by CLIP's preprocessing in _embed_and_invert

    def _empty_tokens(self, n: int) -> np.ndarray:
        """The decoder's caption when there is none (variations, interpolation, text diffs): all padding (the
        caption transformer's null caption), or the empty caption's tokens for a decoder conditioned on the
        CLIP's text encodings (karlo's variations condition on the empty caption's encodings)."""
        if self.decoder.stage.clip_text_conditioning:
            return np.repeat(self.tokenizer.encode_batch([""]), n, 0)
        return np.full((n, self.tokenizer.context_length), self.tokenizer.pad_id, np.int32)

    def _keys(self, seed: int) -> Callable[[int], jax.Array]:
        root = jax.random.key(int(seed))
        return lambda i: jax.random.fold_in(root, i)

    def _timed(self, timings: dict, name: str, fn: Callable[[], np.ndarray], detail: str) -> np.ndarray:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + dt  # summed over the batches
        self.log(f"{name}: {detail} ({dt:.2f}s)")
        return out

    def empty_caption_text(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The empty caption's CLIP text encodings (one row, encode_text's form) when a stage takes them as its
        unconditional input (karlo's: a prior without a learned null embedding, a decoder with
        model.clip_text_conditioning); None otherwise."""
        prior_needs = self.prior is not None and not self.prior.stage.config.model.get("null_text_embedding", True)
        if not (prior_needs or self.decoder.stage.clip_text_conditioning):
            return None
        if ("empty_caption",) not in self._fns:
            self._fns[("empty_caption",)] = self.encode_text(self.tokenizer.encode_batch([""]))
        return self._fns[("empty_caption",)]

    def sample_prior(self, text_emb, states, valid, settings: dict, key: jax.Array, batch_size: int) -> np.ndarray:
        if self.prior is None:
            raise InputError("this bundle has no prior; text -> image needs one (export with --prior)")
        s = settings[self.prior.name]
        fn = self._fn(("prior", tuple(sorted(s.items()))), lambda: self.prior.stage.make_sampler(
            steps=s["steps"], guidance_scale=s["guidance_scale"], num_candidates=s["num_candidates"],
            sampler=s["sampler"], eta=s["eta"]))
        uncond = None
        if not self.prior.stage.config.model.get("null_text_embedding", True):
            uncond = self.empty_caption_text()
        return run_batched(lambda t, st, va, i: fn(self.prior.params, t, st, va, jax.random.fold_in(key, i), None,
                                                   uncond), batch_size, text_emb, states, valid, mesh=self.mesh)

    @property
    def float_handoff(self) -> bool:
        """Whether the first upsampler takes the decoder's float output (clamped to [-1, 1]) rather than its 8-bit
        image (its model.float_low_res; karlo's UnCLIPPipeline hands the float image on)."""
        return bool(self.upsamplers) and bool(self.upsamplers[0].stage.config.model.get("float_low_res", False))

    def decode(self, emb: np.ndarray, tokens: np.ndarray, settings: dict, key: jax.Array, batch_size: int,
               x_T: np.ndarray | None = None, first_index: int = 0) -> np.ndarray:
        """Guided decoder sampling -> uint8 [N, 64, 64, 3] (float32 model-space images in [-1, 1] when the first
        upsampler takes them: float_handoff); from x_T (by DDIM) when given. Batch i draws from
        fold_in(key, first_index + i)."""
        s = dict(settings[self.decoder.name])
        if x_T is not None:
            s["sampler"] = "ddim"
        output = "model" if self.float_handoff else "uint8"
        key_ = ("decoder", tuple(sorted(s.items()))) + (("float",) if output == "model" else ())
        fn = self._fn(key_, lambda: self.decoder.stage.make_sampler(
            steps=s["steps"], guidance_scale=s["guidance_scale"], sampler=s["sampler"], eta=s["eta"], output=output))
        p = self.decoder.params
        if self.decoder.stage.clip_text_conditioning:  # karlo: the captions' CLIP encodings, the empty one's
            uncond = self.empty_caption_text()
            txt, st, va = self.encode_text(tokens)
            if x_T is None:
                return run_batched(lambda e, t, a, b, c, i: fn(p, e, t, jax.random.fold_in(key, i), None, (a, b, c),
                                                               uncond), batch_size, emb, tokens, txt, st, va,
                                   mesh=self.mesh, first_index=first_index)
            return run_batched(lambda e, t, x, a, b, c, i: fn(p, e, t, jax.random.fold_in(key, i), x, (a, b, c),
                                                              uncond), batch_size, emb, tokens, x_T, txt, st, va,
                               mesh=self.mesh, first_index=first_index)
        if x_T is None:
            return run_batched(lambda e, t, i: fn(p, e, t, jax.random.fold_in(key, i)), batch_size, emb, tokens,
                               mesh=self.mesh, first_index=first_index)
        return run_batched(lambda e, t, x, i: fn(p, e, t, jax.random.fold_in(key, i), x), batch_size, emb, tokens,
                           x_T, mesh=self.mesh, first_index=first_index)

    def invert(self, emb: np.ndarray, images: np.ndarray, settings: dict, fixed_point_iters: int = 3) -> np.ndarray:
        """DDIM inversion of decoder-resolution uint8 images under the guided decoder -> x_T (float32)."""
        s = settings[self.decoder.name]
        fn = self._fn(("invert", s["steps"], s["guidance_scale"], fixed_point_iters),
                      lambda: self.decoder.stage.make_inverter(s["steps"], s["guidance_scale"], fixed_point_iters))
        tokens = self._empty_tokens(len(emb))
        if self.decoder.stage.clip_text_conditioning:  # karlo: the empty caption's encodings, both halves
            return to_host(fn(self.decoder.params, emb, tokens, images, self.encode_text(tokens),
                              self.empty_caption_text()))
        return to_host(fn(self.decoder.params, emb, tokens, images))

    def upsample(self, images: np.ndarray, settings: dict, keys: Callable[[int], jax.Array], batch_size: int,
                 timings: dict, num_upsamplers: int | None = None, known: np.ndarray | None = None,
                 regen: np.ndarray | None = None, repaint: tuple[int, int] = (1, 1), first_index: int = 0,
                 tag: str = "") -> dict[str, np.ndarray]:
        """Runs the upsamplers on uint8 images (the first also on float model-space ones); with `known` (square
        uint8 source, any size) and `regen` (bool, its size: True = regenerate), each upsampler runs RePaint with
        both resized to its resolution, and the kept pixels of the resized source are pasted back over its
        output."""
        out = {}
        for j, ls in enumerate(self.upsamplers[:self._num_upsamplers(num_upsamplers)]):
            s = settings[ls.name]
            res = int(ls.entry["interface"]["resolution"])
            key = keys(10 + j)
            if known is not None:
                kn, kp = resize(known, res), ~resize(regen, res)
                fn = self._fn((ls.name, "repaint", s["steps"], repaint),
                              lambda: ls.stage.make_inpainter(s["steps"], *repaint))
                n = len(images)
                kn_b, kp_b = np.repeat(kn[None], n, 0), np.repeat(kp[None], n, 0)
                images = self._timed(timings, ls.name, lambda: run_batched(
                    lambda lo, k_, m_, i: fn(ls.params, lo, k_, m_, jax.random.fold_in(key, i)), batch_size,
                    images, kn_b, kp_b, mesh=self.mesh, first_index=first_index),
                    f"RePaint to {res}x{res}, {s['steps']} steps x {repaint[0]} resamplings{tag}")
                images = paste_kept(images, kn, kp)
            else:
                fn = self._fn((ls.name, tuple(sorted(s.items()))),
                              lambda: ls.stage.make_sampler(steps=s["steps"], sampler=s["sampler"], eta=s["eta"]))
                images = self._timed(timings, ls.name, lambda: run_batched(
                    lambda lo, i: fn(ls.params, lo, jax.random.fold_in(key, i)), batch_size, images, mesh=self.mesh,
                    first_index=first_index),
                    f"{len(images)} images to {res}x{res}, {s['steps']} {s['sampler']} steps{tag}")
            out[ls.name] = images
        return out

    def _num_upsamplers(self, num_upsamplers: int | None) -> int:
        """How many upsamplers to run: all when None; InputError outside [0, available]."""
        available = len(self.upsamplers)
        if num_upsamplers is None:
            return available
        if isinstance(num_upsamplers, bool) or not isinstance(num_upsamplers, (int, np.integer)) or \
                not 0 <= num_upsamplers <= available:
            raise InputError(f"num_upsamplers must be in [0, {available}] (this bundle has {available} "
                             f"upsampler{'s' if available != 1 else ''}), got {num_upsamplers!r}")
        return int(num_upsamplers)

    def _cascade(self, n: int, batch_size: int, decode_chunk: Callable[[slice, int], np.ndarray],
                 decoder_detail: Callable[[int], str], settings: dict, keys: Callable[[int], jax.Array],
                 timings: dict, num_upsamplers: int | None, on_batch: OnBatch,
                 known: np.ndarray | None = None, regen: np.ndarray | None = None,
                 repaint: tuple[int, int] = (1, 1)) -> dict[str, np.ndarray]:
        """The decoder and the upsamplers over `n` rows, one batch at a time through the whole cascade:
        decode_chunk(rows, batch_index) gives a batch's decoder images; on_batch(first_row, final images)
        receives each batch's output. With `known` / `regen` (inpainting) the kept pixels are pasted back
        after every stage. Returns {stage name: images of all rows}."""
        from dalle2_jax.training.partitioning import round_batch

        self._num_upsamplers(num_upsamplers)
        bs = round_batch(batch_size, self.mesh)
        starts = list(range(0, n, bs))
        parts: dict[str, list] = {}
        for c, start in enumerate(starts):
            rows = slice(start, start + bs)
            m = len(range(n)[rows])
            tag = f" [batch {c + 1}/{len(starts)}]" if len(starts) > 1 else ""
            dec = self._timed(timings, "decoder", lambda: decode_chunk(rows, c), decoder_detail(m) + tag)
            low = dec  # what the first upsampler reads: the 8-bit image, or the float one (float_handoff)
            if dec.dtype != np.uint8:
                dec = np.clip(np.round((dec + 1.0) * 127.5), 0, 255).astype(np.uint8)
            if known is not None:
                res = dec.shape[1]
                dec = low = paste_kept(dec, resize(known, res), ~resize(regen, res))
            imgs = {"decoder": dec}
            imgs.update(self.upsample(low, settings, keys, bs, timings, num_upsamplers, known=known, regen=regen,
                                      repaint=repaint, first_index=c, tag=tag))
            for name, v in imgs.items():
                parts.setdefault(name, []).append(v)
            if on_batch is not None:
                on_batch(start, list(imgs.values())[-1])
        return {name: np.concatenate(v) for name, v in parts.items()}

    def _finish(self, stage_images: dict, emb: np.ndarray, settings: dict, timings: dict,
                warnings: list[str]) -> Output:
        images = list(stage_images.values())[-1]
        return Output(images=images, stages=stage_images, image_embeddings=np.asarray(emb), settings=settings,
                      timings=timings, warnings=warnings)

    def _batch(self, batch_size: int | None, n: int) -> int:
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        return min(n, int(batch_size or n))

    def _common(self, settings: dict | None, seed: int) -> dict:
        s = self.resolve_settings(settings)
        return {"sampling": s, "seed": int(seed), "bundle": self.bundle.path}

    # --- the methods ------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, num_images: int = 1, seed: int = 0, *,
                 settings: dict | None = None, batch_size: int | None = None,
                 num_upsamplers: int | None = None, on_batch: OnBatch = None) -> Output:
        """Text -> images: `num_images` per prompt (rows prompt-major), all prompts batched together
        (`batch_size` rows at a time, default all; `on_batch`: see the module doc)."""
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        if self.prior is None:
            raise InputError("this bundle has no prior; text -> image needs one (export with --prior)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompt given")
        self._num_upsamplers(num_upsamplers)
        info = self._common(settings, seed)
        s = info["sampling"]
        rows = [p for p in prompts for _ in range(num_images)]
        tokens, warnings = self.tokenize(rows)
        bs, keys, timings = self._batch(batch_size, len(rows)), self._keys(seed), {}
        txt, states, valid = self._timed(timings, "clip_text", lambda: self.encode_text(tokens),
                                         f"{len(prompts)} prompts x {num_images}")
        ps = s[self.prior.name]
        emb = self._timed(timings, "prior", lambda: self.sample_prior(txt, states, valid, s, keys(0), bs),
                          f"{ps['steps']} {ps['sampler']} steps x {ps['num_candidates']} candidates, guidance "
                          f"{ps['guidance_scale']:g}")
        ds = s[self.decoder.name]
        stage_images = self._cascade(
            len(rows), bs, lambda r, c: self.decode(emb[r], tokens[r], s, keys(1), bs, first_index=c),
            lambda m: f"{m} images, {ds['steps']} {ds['sampler']} steps, guidance {ds['guidance_scale']:g}",
            s, keys, timings, num_upsamplers, on_batch)
        info.update(method="generate", prompts=prompts, num_images=int(num_images))
        return self._finish(stage_images, emb, info, timings, warnings)

    def _embed_and_invert(self, images: list[np.ndarray], s: dict, timings: dict,
                          fixed_point_iters: int) -> tuple[np.ndarray, np.ndarray]:
        clip_size = int(self.clip.entry["interface"]["image_size"])
        dec_res = int(self.decoder.entry["interface"]["resolution"])
        # CLIP's own preprocessing (shortest side, center crop) for the embedding and for the decoder's input
        emb = self.embed_images(np.stack([resize_shortest_center_crop(im, clip_size) for im in images]))
        small = np.stack([resize_shortest_center_crop(im, dec_res) for im in images])
        x_T = self._timed(timings, "invert", lambda: self.invert(emb, small, s, fixed_point_iters),
                          f"DDIM inversion of {len(images)} images, {s[self.decoder.name]['steps']} steps")
        return emb, x_T

    def variations(self, image: Any, num: int = 4, eta: float = 0.8, seed: int = 0, *,
                   settings: dict | None = None, batch_size: int | None = None, num_upsamplers: int | None = None,
                   fixed_point_iters: int = 3, on_batch: OnBatch = None) -> Output:
        """`num` variations of an image: its CLIP embedding and DDIM-inverted noise, decoded by DDIM with
        `eta` (eta = 0 reconstructs the image; larger eta varies more)."""
        if num < 1:
            raise InputError(f"num must be >= 1, got {num}")
        if not 0.0 <= eta <= 1.0:
            raise InputError(f"eta must be in [0, 1], got {eta}")
        src = self._prepare(image)
        self._num_upsamplers(num_upsamplers)
        info = self._common(settings, seed)
        s = copy.deepcopy(info["sampling"])
        s[self.decoder.name].update(sampler="ddim", eta=float(eta))
        timings, keys = {}, self._keys(seed)
        emb, x_T = self._embed_and_invert([src], s, timings, fixed_point_iters)
        emb, x_T = np.repeat(emb, num, 0), np.repeat(x_T, num, 0)
        bs = self._batch(batch_size, num)
        tokens = self._empty_tokens(num)
        stage_images = self._cascade(
            num, bs, lambda r, c: self.decode(emb[r], tokens[r], s, keys(1), bs, x_T=x_T[r], first_index=c),
            lambda m: f"{m} variations, DDIM eta {eta:g}", s, keys, timings, num_upsamplers, on_batch)
        info.update(method="variations", num=int(num), eta=float(eta), fixed_point_iters=int(fixed_point_iters),
                    sampling=s)
        return self._finish(stage_images, emb, info, timings, [])

    def interpolate(self, image_a: Any, image_b: Any, steps: int = 5, noise: str = "interpolate", seed: int = 0, *,
                    settings: dict | None = None, batch_size: int | None = None, num_upsamplers: int | None = None,
                    fixed_point_iters: int = 3, on_batch: OnBatch = None) -> Output:
        """`steps` frames along the slerp of two images' CLIP embeddings, decoded by DDIM (eta 0) from noise
        that is the slerp of their DDIM inversions (noise='interpolate') or one fixed draw (noise='fixed')."""
        if steps < 2:
            raise InputError(f"interpolation needs steps >= 2, got {steps}")
        if noise not in ("interpolate", "fixed"):
            raise InputError(f"noise must be 'interpolate' or 'fixed', got {noise!r}")
        a, b = self._prepare(image_a, "image A"), self._prepare(image_b, "image B")
        self._num_upsamplers(num_upsamplers)
        info = self._common(settings, seed)
        s = copy.deepcopy(info["sampling"])
        s[self.decoder.name].update(sampler="ddim", eta=0.0)
        timings, keys = {}, self._keys(seed)
        emb2, x2 = self._embed_and_invert([a, b], s, timings, fixed_point_iters)
        t = np.linspace(0.0, 1.0, steps)
        emb = slerp(emb2[0], emb2[1], t)
        if noise == "interpolate":
            x_T = slerp(x2[0], x2[1], t)
        else:
            x_T = np.repeat(np.asarray(jax.random.normal(keys(2), x2.shape[1:], jnp.float32))[None], steps, 0)
        bs = self._batch(batch_size, steps)
        tokens = self._empty_tokens(steps)
        stage_images = self._cascade(
            steps, bs, lambda r, c: self.decode(emb[r], tokens[r], s, keys(1), bs, x_T=x_T[r], first_index=c),
            lambda m: f"{m} frames, noise {noise}", s, keys, timings, num_upsamplers, on_batch)
        info.update(method="interpolate", steps=int(steps), noise=noise, fractions=t.tolist(), sampling=s)
        return self._finish(stage_images, emb, info, timings, [])

    def text_diff(self, image: Any, from_caption: str, to_caption: str, steps: int = 5, max_angle: float = 0.5,
                  seed: int = 0, *, settings: dict | None = None, batch_size: int | None = None,
                  num_upsamplers: int | None = None, fixed_point_iters: int = 3, on_batch: OnBatch = None) -> Output:
        """DALL-E 2's text diffs: the image embedding rotated toward d = normalise(text(to) - text(from)),
        z(theta) = slerp(z_image, d, theta) for `steps` thetas in [0, max_angle], decoded by DDIM (eta 0) from
        the image's fixed DDIM-inverted noise (theta = 0 reconstructs the image, so `steps` >= 2)."""
        if steps < 2:
            raise InputError(f"a text diff needs steps >= 2 (the first frame, theta 0, is the unedited "
                             f"reconstruction), got {steps}")
        if not 0.0 < max_angle <= 1.0:
            raise InputError(f"max_angle must be in (0, 1], got {max_angle}")
        src = self._prepare(image)
        self._num_upsamplers(num_upsamplers)
        tokens, warnings = self.tokenize([from_caption, to_caption])
        info = self._common(settings, seed)
        s = copy.deepcopy(info["sampling"])
        s[self.decoder.name].update(sampler="ddim", eta=0.0)
        timings, keys = {}, self._keys(seed)
        txt, _, _ = self.encode_text(tokens)
        d = txt[1] - txt[0]
        if np.linalg.norm(d) < 1e-6:
            raise InputError("the two captions have the same CLIP embedding; nothing to move toward")
        d = d / np.linalg.norm(d)
        z, x_T = self._embed_and_invert([src], s, timings, fixed_point_iters)
        norm = float(np.linalg.norm(z[0]))
        thetas = np.linspace(0.0, float(max_angle), steps)
        emb = slerp(z[0], d * norm, thetas)
        x_T = np.repeat(x_T, steps, 0)
        bs = self._batch(batch_size, steps)
        empty = self._empty_tokens(steps)
        stage_images = self._cascade(
            steps, bs, lambda r, c: self.decode(emb[r], empty[r], s, keys(1), bs, x_T=x_T[r], first_index=c),
            lambda m: f"{m} frames up to theta {max_angle:g}", s, keys, timings, num_upsamplers, on_batch)
        info.update(method="text_diff", from_caption=from_caption, to_caption=to_caption, steps=int(steps),
                    max_angle=float(max_angle), thetas=thetas.tolist(), sampling=s)
        return self._finish(stage_images, emb, info, timings, warnings)

    def inpaint(self, image: Any, mask: Any, prompt: str, num: int = 1, seed: int = 0, *,
                settings: dict | None = None, resample: int = 4, jump_length: int = 5, batch_size: int | None = None,
                num_upsamplers: int | None = None, on_batch: OnBatch = None) -> Output:
        """Regenerates the masked region (mask pixels > 127, same size as the image) consistent with the prompt
        and the rest of the image: the prior's embedding for the prompt, then RePaint over the guided decoder
        (`resample` passes per `jump_length` steps) and over every upsampler, the centred square of the image
        and of the mask resized to each stage's resolution (a mask pixel covering any of a resized pixel's
        area selects it). After every stage the kept pixels of the resized image are pasted back, so outside
        the (resized) mask the output is the input, resized to the output resolution, at any input size."""
        if num < 1:
            raise InputError(f"num must be >= 1, got {num}")
        if resample < 1 or jump_length < 1:
            raise InputError(f"resample ({resample}) and jump_length ({jump_length}) must be >= 1")
        if self.prior is None:
            raise InputError("this bundle has no prior; inpainting with a prompt needs one (export with --prior)")
        img = load_image(image)
        m = load_image(mask, "mask")
        if m.shape[:2] != img.shape[:2]:
            raise InputError(f"the mask is {m.shape[1]}x{m.shape[0]} but the image is {img.shape[1]}x{img.shape[0]}; "
                             "they must be the same size")
        regen = center_square(m.max(axis=-1) > 127)
        if not regen.any():
            raise InputError("the mask selects no pixels (white = regenerate); nothing to inpaint")
        src = center_square(img)
        self._num_upsamplers(num_upsamplers)
        info = self._common(settings, seed)
        s = info["sampling"]
        rows = [prompt] * num
        tokens, warnings = self.tokenize(rows)
        bs, keys, timings = self._batch(batch_size, num), self._keys(seed), {}
        txt, states, valid = self.encode_text(tokens)
        emb = self._timed(timings, "prior", lambda: self.sample_prior(txt, states, valid, s, keys(0), bs),
                          "image embeddings for the prompt")
        dec_res = int(self.decoder.entry["interface"]["resolution"])
        ds = s[self.decoder.name]
        rp = (int(resample), int(jump_length))
        fn = self._fn(("decoder", "repaint", ds["steps"], ds["guidance_scale"], rp),
                      lambda: self.decoder.stage.make_inpainter(ds["steps"], ds["guidance_scale"], *rp))
        known = np.repeat(resize(src, dec_res)[None], num, 0)
        kp = np.repeat(~resize(regen, dec_res)[None], num, 0)
        key = keys(1)
        text = uncond = None
        if self.decoder.stage.clip_text_conditioning:  # karlo: the prompt's CLIP encodings, the empty caption's
            text, uncond = self.encode_text(tokens), self.empty_caption_text()

        def call(e, t, k_, m_, *rest):
            *txt, i = rest
            return fn(self.decoder.params, e, t, k_, m_, jax.random.fold_in(key, i),
                      *((tuple(txt), uncond) if text is not None else ()))

        stage_images = self._cascade(
            num, bs, lambda r, c: run_batched(call, bs, emb[r], tokens[r], known[r], kp[r],
                                              *(x[r] for x in (text or ())), mesh=self.mesh, first_index=c),
            lambda m: f"RePaint {ds['steps']} steps x {resample} resamplings (jump {jump_length})", s, keys,
            timings, num_upsamplers, on_batch, known=src, regen=regen, repaint=rp)
        info.update(method="inpaint", prompt=prompt, num=int(num), resample=int(resample),
                    jump_length=int(jump_length), masked_fraction=float(regen.mean()))
        return self._finish(stage_images, emb, info, timings, warnings)
