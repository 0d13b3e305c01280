"""Precompute a frozen CLIP's embeddings of a data set split into array_record files.

`python -m dalle2_jax.tools.embed --clip_workdir CLIP --out DIR [--split train] [--batch_size 256]`

Each JAX process embeds its own share of the records (record i goes to process i % P) and writes
`DIR/<split>-<process>-of-<P>.array_record`; each record (msgpack) holds `index` (the record's index in
the split), `image_emb` [E] and `text_emb` [E] (unit norm), `token_states` [L, W] (the CLIP text
tower's final token states) and `tokens` [L]. The prior trains from these with
`--config.data.embeddings_dir=DIR`, which is the path large runs take (no CLIP forward in the step).
The data set is the CLIP workdir's (config.data), unless overridden with --data_name/--data_dir/--image_key/
--text_key (an imported CLIP's workdir names no data set of yours).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from absl import flags

from dalle2_jax.cli_util import exit_on_errors, run_program

log = logging.getLogger("dalle2_jax")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("clip_workdir", None, "The frozen CLIP's workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory for the array_record files.", flag_values=fv)
    flags.DEFINE_string("split", "train", "Split to embed.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Examples per CLIP forward pass.", flag_values=fv)
    flags.DEFINE_string("data_name", None, "TFDS data set (default: the CLIP workdir's config.data.name).",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the CLIP workdir's).", flag_values=fv)
    flags.DEFINE_string("image_key", None, "Image feature (default: the CLIP workdir's config.data.image_key).",
                        flag_values=fv)
    flags.DEFINE_string("text_key", None, "Caption feature (default: the CLIP workdir's).", flag_values=fv)
    flags.DEFINE_integer("max_examples", 0, "Embed only the first N records (0 = all).", flag_values=fv)


def serialize(record: dict) -> bytes:
    from flax import serialization

    return serialization.msgpack_serialize(record)


def deserialize(data: bytes) -> dict:
    from flax import serialization

    return serialization.msgpack_restore(data)


def embedding_files(directory: str, split: str) -> list[str]:
    """The array_record files the embed tool wrote for `split`, in process order (local or a URI: grain
    reads gs:// array_record files directly)."""
    from dalle2_jax import fileio

    root = fileio.resolve(directory)
    files = sorted(fileio.join(root, p.name) for p in fileio.path(root).glob(f"{split}-*-of-*.array_record"))
    if not files:
        raise FileNotFoundError(f"no embedding files for split {split!r} in {directory!r}; run "
                                "`python -m dalle2_jax.tools.embed` first")
    return files


def embed_split(clip_workdir: str, out: str, split: str = "train", batch_size: int = 256, data_cfg=None,
                max_examples: int = 0) -> dict:
    """Embeds `split` with the frozen CLIP of `clip_workdir` into `out`; returns a summary dict."""
    import jax
    import jax.numpy as jnp

    from dalle2_jax import fileio
    from dalle2_jax.data import pipeline
    from dalle2_jax.models.clip import build_clip
    from dalle2_jax.text import load_tokenizer
    from dalle2_jax.training.checkpoint import load_params, read_config

    clip_cfg, params, info = load_params(clip_workdir)
    data_cfg = data_cfg or read_config(clip_workdir).data
    tok = load_tokenizer(fileio.join(clip_workdir, "tokenizer"))
    model = build_clip(clip_cfg.model, tok.eot_id)

    @jax.jit
    def embed(params, images, tokens):
        img = model.apply(params, images.astype(jnp.float32) / 255.0, method=model.encode_image)
        txt, states = model.apply(params, tokens, method=model.encode_text_full)
        txt = txt * jax.lax.rsqrt(jnp.sum(txt * txt, axis=-1, keepdims=True) + 1e-12)
        return img, txt, states.astype(jnp.float32)

    pipeline.prepare_dataset(data_cfg)
    source = pipeline.open_source(data_cfg, split, skip_decoding=(data_cfg.image_key,))
    n = len(source) if not max_examples else min(max_examples, len(source))
    p, count = jax.process_index(), jax.process_count()
    mine = np.arange(p, n, count)
    name = f"{split}-{p:05d}-of-{count:05d}.array_record"
    out = fileio.resolve(out)
    # array_record writes local files only: a gs:// `out` gets the file copied up when it is complete
    with fileio.staged_output(out) as local_dir:
        os.makedirs(local_dir, exist_ok=True)
        skipped = _write_embeddings(os.path.join(local_dir, name), embed, params, source, mine, tok, data_cfg,
                                    batch_size)
    path = fileio.join(out, name)
    summary = {"split": split, "records": int(len(mine)) - len(skipped), "skipped_undecodable": skipped,
               "file": path, "clip_step": info["step"],
               "clip_params": info["params"]}
    if p == 0:
        fileio.write_text(fileio.join(out, "embed_info.json"), json.dumps(
            {**summary, "clip_workdir": fileio.resolve(clip_workdir), "num_processes": count,
             "total_records": int(n)}, indent=2))
    return summary


def _write_embeddings(path: str, embed, params, source, mine: np.ndarray, tok, data_cfg, batch_size: int
                      ) -> list[int]:
    """Embeds the records `mine` of `source` in batches into the array_record file `path`; returns the
    indices of the records left out because their image cannot be decoded (each logged)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dalle2_jax.data import pipeline

    writer = ArrayRecordWriter(path, "group_size:1")
    skipped: list[int] = []
    for start in range(0, len(mine), batch_size):
        idx = mine[start: start + batch_size]
        recs, decoded, kept = source.__getitems__([int(i) for i in idx]), [], []
        for i, r in zip(idx, recs):
            try:
                decoded.append(pipeline.decode_image(r[data_cfg.image_key], data_cfg.resolution))
                kept.append((i, r))
            except Exception as e:  # noqa: BLE001 - any decode error makes the record unusable
                skipped.append(int(i))
                log.warning("%s: record %d left out, its image cannot be decoded: %r", data_cfg.name, int(i), e)
        if not kept:
            continue
        idx, recs = np.asarray([i for i, _ in kept]), [r for _, r in kept]
        images = np.stack(decoded)
        tokens = tok.encode_batch([pipeline._as_text(r[data_cfg.text_key]) for r in recs])
        k = len(idx)
        if k < batch_size:  # one compiled shape
            images = np.concatenate([images, np.repeat(images[-1:], batch_size - k, 0)])
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - k, 0)])
        img, txt, states = (np.asarray(x)[:k] for x in embed(params, images, tokens))
        for j in range(k):
            writer.write(serialize({"index": np.int64(idx[j]), "image_emb": img[j], "text_emb": txt[j],
                                    "token_states": states[j], "tokens": tokens[j]}))
    writer.close()
    return skipped


def main(fv: flags.FlagValues) -> None:
    from dalle2_jax.training.checkpoint import read_config

    with exit_on_errors():
        data_cfg = read_config(fv.clip_workdir).data
        if fv.data_name:
            data_cfg.name = fv.data_name
        if fv.data_dir:
            data_cfg.data_dir = fv.data_dir
        if fv.image_key:
            data_cfg.image_key = fv.image_key
        if fv.text_key:
            data_cfg.text_key = fv.text_key
        summary = embed_split(fv.clip_workdir, fv.out, fv.split, fv.batch_size, data_cfg, fv.max_examples)
    print(json.dumps(summary))


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("clip_workdir", "out"))


if __name__ == "__main__":
    run()
