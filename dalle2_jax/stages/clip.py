"""The CLIP stage: contrastive training of the text and image towers, zero-shot evaluation."""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dalle2_jax import fileio
from dalle2_jax.data import pipeline
from dalle2_jax.models.clip import build_clip, init_clip
from dalle2_jax.models.layers import ACTIVATIONS
from dalle2_jax.models.transformer import REMAT_POLICIES
from dalle2_jax.stages.base import Stage
from dalle2_jax.text import BpeTokenizer, ClipBpeTokenizer, load_tokenizer
from dalle2_jax.training.config import ConfigError
from dalle2_jax.training.partitioning import batch_sharding

TOKENIZER_DIR = "tokenizer"


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                     positives: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE over the (global) batch.

    image_emb, text_emb: [B, E] unit-norm; logit_scale: scalar; positives: bool [B, B] marking pairs
    that count as matches (identical captions), the diagonal when None. Each row's target is uniform
    over its positives. Returns (loss, metrics with i2t_acc / t2i_acc: the argmax is a positive).
    """
    logits = logit_scale * (image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T)
    b = logits.shape[0]
    pos = jnp.eye(b, dtype=bool) if positives is None else positives | jnp.eye(b, dtype=bool)
    targets = pos / jnp.sum(pos, axis=1, keepdims=True)
    loss_i2t = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1))
    targets_t = pos.T / jnp.sum(pos.T, axis=1, keepdims=True)
    loss_t2i = -jnp.mean(jnp.sum(targets_t * jax.nn.log_softmax(logits.T, axis=1), axis=1))
    i2t = jnp.mean(jnp.take_along_axis(pos, jnp.argmax(logits, axis=1)[:, None], axis=1))
    t2i = jnp.mean(jnp.take_along_axis(pos.T, jnp.argmax(logits.T, axis=1)[:, None], axis=1))
    return 0.5 * (loss_i2t + loss_t2i), {"i2t_acc": i2t, "t2i_acc": t2i}


def identical_rows(tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> bool [B, B]: True where two captions are the same token sequence."""
    return jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)


class ClipStage(Stage):
    """Trains CLIP on image-caption pairs; evaluates zero-shot attribute accuracy and retrieval."""

    name = "clip"

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.tokenizer = None
        self.model = None
        self._embed_jits = None

    @classmethod
    def validate(cls, config) -> None:
        m = config.model
        v, t = m.vision, m.text
        if not m.get("image_tower", True):
            raise ConfigError("model.image_tower", "is False (a text encoder alone, as karlo ships); contrastive "
                              "training needs both towers: import an image encoder too (tools.import_karlo "
                              "--image_encoder, or tools.import_clip)")
        if v.stem not in ("patch", "conv"):
            raise ConfigError("model.vision.stem", f"unknown stem {v.stem!r}; use 'patch' or 'conv'")
        if v.image_size != config.data.resolution:
            raise ConfigError("model.vision.image_size", f"{v.image_size} differs from config.data.resolution="
                              f"{config.data.resolution}; set both to the same size")
        if v.stem == "patch" and v.image_size % v.patch_size:
            raise ConfigError("model.vision.patch_size", f"image size {v.image_size} is not divisible by patch "
                              f"size {v.patch_size}; choose a divisor of {v.image_size}")
        if v.stem == "conv" and v.image_size % (2 ** len(v.conv_channels)):
            raise ConfigError("model.vision.conv_channels", f"{len(v.conv_channels)} stride-2 convs need an image "
                              f"size divisible by {2 ** len(v.conv_channels)}, got {v.image_size}")
        for tower, c in (("vision", v), ("text", t)):
            if c.width % c.heads:
                raise ConfigError(f"model.{tower}.heads", f"width {c.width} is not divisible by {c.heads} heads")
            if c.act not in ACTIVATIONS:
                raise ConfigError(f"model.{tower}.act", f"unknown activation {c.act!r}; use one of {ACTIVATIONS}")
        if t.context_length < 3:
            raise ConfigError("model.text.context_length", "must be >= 3 (start, one token, end)")
        kind = t.get("tokenizer", "bpe")
        if kind not in ("bpe", "clip_bpe"):
            raise ConfigError("model.text.tokenizer", f"unknown tokenizer {kind!r}; use 'bpe' (trained on the "
                              "captions) or 'clip_bpe' (CLIP's own, 49408 tokens)")
        if kind == "clip_bpe" and t.vocab_size < 49408:
            raise ConfigError("model.text.vocab_size", f"{t.vocab_size} is smaller than CLIP's BPE (49408 tokens)")
        if t.vocab_size < 300:
            raise ConfigError("model.text.vocab_size", f"{t.vocab_size} is too small for a byte-level BPE "
                              "(256 bytes + 3 special tokens); use >= 300")
        if m.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("model.dtype", f"unknown dtype {m.dtype!r}; use float32 or bfloat16")
        if m.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"unknown remat policy {m.remat!r}; use one of {sorted(REMAT_POLICIES)}")

    # --- set-up ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Builds the built-in data set if needed, and trains (first run) or loads the tokenizer (CLIP's
        own BPE is written from the packaged merges file instead of trained)."""
        pipeline.prepare_dataset(self.config.data)
        tok_dir = fileio.join(self.workdir, TOKENIZER_DIR)
        t = self.config.model.text
        if not fileio.exists(fileio.join(tok_dir, "tokenizer_meta.json")):
            if jax.process_index() == 0:
                if t.get("tokenizer", "bpe") == "clip_bpe":
                    tok = ClipBpeTokenizer(context_length=t.context_length)
                else:
                    captions = pipeline.all_captions(self.config.data, self.config.data.train_split)
                    tok = BpeTokenizer.train(captions, t.vocab_size, t.context_length)
                tok.save(tok_dir)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("tokenizer")
        self.setup_model()

    def setup_model(self) -> None:
        """Loads the saved tokenizer and builds the model (needs the tokenizer's EOT id)."""
        self.tokenizer = load_tokenizer(fileio.join(self.workdir, TOKENIZER_DIR))
        if self.tokenizer.vocab_size > self.config.model.text.vocab_size:
            raise ConfigError("model.text.vocab_size", f"{self.config.model.text.vocab_size} is smaller than the "
                              f"saved tokenizer's {self.tokenizer.vocab_size} tokens")
        self.model = build_clip(self.config.model, self.tokenizer.eot_id)

    def init_params(self, rng: jax.Array) -> Any:
        return init_clip(self.model, rng)

    def abstract_train_inputs(self, global_batch: int, clip_model_cfg: Any = None) -> tuple[dict, Any]:
        if self.model is None:
            self.model = build_clip(self.config.model, eot_id=int(self.config.model.text.vocab_size) - 1)
        v, t = self.config.model.vision, self.config.model.text
        return {"image": jax.ShapeDtypeStruct((global_batch, v.image_size, v.image_size, 3), jnp.uint8),
                "tokens": jax.ShapeDtypeStruct((global_batch, t.context_length), jnp.int32)}, None

    def abstract_init(self, rng: jax.Array) -> Any:
        # Param shapes do not depend on the tokenizer, so no workdir is needed (tools.params).
        if self.model is None:
            self.model = build_clip(self.config.model, eot_id=2)
        return self.init_params(rng)

    def train_iterator(self, local_batch_size: int, process_index: int, process_count: int):
        return pipeline.image_text_pipeline(
            self.config.data, self.config.data.train_split, tokenizer_dir=fileio.join(self.workdir, TOKENIZER_DIR),
            local_batch_size=local_batch_size, seed=self.config.seed, process_index=process_index,
            process_count=process_count)

    # --- the step -------------------------------------------------------------------------------------
    def loss(self, params: Any, batch: dict, rng: jax.Array, frozen: Any) -> tuple[jax.Array, dict]:
        images = batch["image"].astype(jnp.float32) / 255.0
        tokens = batch["tokens"]
        img, txt, scale = self.model.apply(params, images, tokens)
        positives = identical_rows(tokens) if self.config.model.identical_captions_positive else None
        loss, metrics = contrastive_loss(img, txt, scale, positives)
        return loss, dict(metrics, temperature=1.0 / scale, logit_scale=scale)

    # --- evaluation -----------------------------------------------------------------------------------
    def embed_fns(self, mesh):
        """Jitted (params, images uint8 [b,R,R,3]) -> unit image embeddings and (params, tokens) -> text."""
        if self._embed_jits is None:  # built once: periodic evaluations reuse the compiled functions
            model = self.model
            self._embed_jits = (
                jax.jit(lambda p, x: model.apply(p, x.astype(jnp.float32) / 255.0, method=model.encode_image)),
                jax.jit(lambda p, t: model.apply(p, t, method=model.encode_text)))
        embed_images, embed_texts = self._embed_jits

        bs = int(self.config.eval.batch_size)
        data_size = mesh.shape["data"] * mesh.shape["fsdp"]
        bs = max(data_size, bs - bs % data_size)

        def run(fn, params, arr):
            out = []
            for start in range(0, len(arr), bs):
                chunk = arr[start: start + bs]
                n = len(chunk)
                if n < bs:  # pad to one shape: no recompilation
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
                x = jax.device_put(chunk, batch_sharding(mesh, chunk.ndim))  # every process passes the same chunk
                y = fn(params, x)
                # multi-process: the rows live on every process's devices; gather them all on each process
                y = y if y.is_fully_addressable else multihost_utils.process_allgather(y, tiled=True)
                out.append(np.asarray(jax.device_get(y))[:n])
            return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)

        return (lambda p, x: run(embed_images, p, x)), (lambda p, x: run(embed_texts, p, x))

    def evaluate(self, params: Any, mesh) -> dict:
        """Zero-shot color/shape accuracy (single-object test scenes, all and held-out pairs) and
        caption retrieval R@1 among test items with distinct captions."""
        cfg = self.config
        data_cfg = cfg.data
        source = pipeline.open_source(data_cfg, data_cfg.eval_split, skip_decoding=(data_cfg.image_key,))
        has_scene = "scene" in source[0]
        keys = [data_cfg.image_key, data_cfg.text_key] + (["scene"] if has_scene else [])
        records = pipeline.read_split(data_cfg, data_cfg.eval_split, keys, int(cfg.eval.max_examples))
        embed_images, embed_texts = self.embed_fns(mesh)
        images = np.stack([r[data_cfg.image_key] for r in records])
        captions = [r[data_cfg.text_key] for r in records]
        img_emb = embed_images(params, images)
        metrics: dict[str, Any] = {"num_examples": len(records)}

        # Caption retrieval: image -> caption among the distinct captions.
        first = {}
        for i, c in enumerate(captions):
            first.setdefault(c, i)
        uniq = list(first)
        txt_emb = embed_texts(params, self.tokenizer.encode_batch(uniq))
        idx = np.array([first[c] for c in uniq])
        pred = np.argmax(img_emb[idx] @ txt_emb.T, axis=1)
        metrics["caption_retrieval_r1"] = float(np.mean(pred == np.arange(len(uniq))))
        metrics["num_distinct_captions"] = len(uniq)
        if has_scene:
            metrics.update(zero_shot_attributes([r["scene"] for r in records], img_emb,
                                                lambda toks: embed_texts(params, toks), self.tokenizer))
        return metrics


def zero_shot_attributes(scenes: list, image_emb: np.ndarray, embed_tokens, tokenizer) -> dict:
    """Zero-shot color/shape accuracy of image embeddings against the scene labels (built-in data set).

    scenes: encoded scenes (the data set's `scene` feature), one per row of image_emb [N, E] (unit norm);
    embed_tokens(tokens [n, L]) -> text embeddings [n, E]. For each single-object scene and attribute,
    the candidates are the scene's own caption with that attribute swapped through all values.
    Returns zero_shot_{color,shape}_acc, heldout_{color,shape}_acc, num_single_object, num_heldout.
    """
    from dalle2_jax.data import scenes as S

    scenes_ = [S.decode_scene(s) for s in scenes]
    single = [i for i, s in enumerate(scenes_) if len(s["objects"]) == 1]
    attrs = {"color": list(S.COLORS), "shape": list(S.SHAPES)}
    prompts: dict[str, int] = {}
    candidates = {a: [] for a in attrs}  # per attribute: per single scene, list of prompt ids
    for i in single:
        for a, values in attrs.items():
            ids = []
            for v in values:
                s = copy.deepcopy(scenes_[i])
                s["objects"][0][a] = v
                ids.append(prompts.setdefault(S.scene_caption(s), len(prompts)))
            candidates[a].append(ids)
    txt = np.asarray(embed_tokens(tokenizer.encode_batch(list(prompts)))) if prompts else None
    heldout = np.array([S.is_heldout(scenes_[i]["objects"][0]["color"], scenes_[i]["objects"][0]["shape"])
                        for i in single], bool)
    out = {"num_single_object": len(single), "num_heldout": int(heldout.sum())}
    for a, values in attrs.items():
        if not single:
            out[f"zero_shot_{a}_acc"] = out[f"heldout_{a}_acc"] = float("nan")
            continue
        cand = np.array(candidates[a])  # [n, len(values)]
        scores = np.einsum("ne,nke->nk", image_emb[single], txt[cand])
        truth = np.array([values.index(scenes_[i]["objects"][0][a]) for i in single])
        correct = np.argmax(scores, axis=1) == truth
        out[f"zero_shot_{a}_acc"] = float(correct.mean())
        out[f"heldout_{a}_acc"] = float(correct[heldout].mean()) if heldout.any() else float("nan")
    return out
