"""grain input pipelines over TFDS array_record data sets (no TensorFlow).

A pipeline reads one split of any prepared TFDS data set with an image and a text feature
(`config.data.name`, `image_key`, `text_key`), shuffles all of its records with the run seed, decodes and
resizes + center-crops the images (kept uint8; normalised on device), batches, and tokenizes the captions.
The global batches are a function of the seed only, whatever the number of JAX processes: each process
reads and decodes only its contiguous slice of every global batch (`shard_batches`), and
`partitioning.global_batch` puts the slices back together over the mesh, process 0's rows first.

A record whose image cannot be read or decoded does not stop training: `skip_undecodable` replaces it with
the next decodable record of the split (in stored order, so the substitute depends on the record alone,
never on the process count or the epoch) and marks the example with `bad_records` = 1. The training
batches of `image_text_pipeline` and `upsampler_pipeline` therefore always carry 'bad_records': int32 [b]
(zeros when all is well): the trainer pops it before the batch goes to the devices, sums and reports it.
`read_split` (evaluation sets) leaves undecodable records out and logs how many.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from dalle2_jax import procs
from dalle2_jax.images import resize_shortest_center_crop

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")
BAD_RECORDS_KEY = "bad_records"
MAX_DECODE_TRIES = 100  # consecutive undecodable records before a data set is declared broken
_LOGGED_BAD_RECORDS = 10  # per dataset object (per worker process): the first ones at WARNING, the rest at DEBUG
logger = logging.getLogger("dalle2_jax")


def resolve_data_dir(data_cfg) -> str:
    """config.data.data_dir, or $TFDS_DATA_DIR, or ~/tensorflow_datasets; user-expanded."""
    path = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "") or DEFAULT_DATA_DIR
    return os.path.expanduser(path)


def prepare_dataset(data_cfg) -> None:
    """Builds the built-in captioned_shapes set into the data dir if it is not there yet.

    Other data sets must already be prepared (for a folder of images: `python -m
    dalle2_jax.tools.build_folder`); they are only checked for existence when opened.
    """
    if data_cfg.name != "captioned_shapes":
        return
    import jax

    from dalle2_jax.data.captioned_shapes import prepare_captioned_shapes

    def build():
        prepare_captioned_shapes(resolve_data_dir(data_cfg), config_name=data_cfg.builder_config,
                                 num_train=data_cfg.num_train or None, num_test=data_cfg.num_test or None)

    if jax.process_count() > 1:  # process 0 first: processes sharing a disk must not build it together
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            build()
        multihost_utils.sync_global_devices("captioned_shapes")
    build()  # a no-op where it exists; a host-local copy for hosts that do not share the data dir


def open_source(data_cfg, split: str, skip_decoding: Sequence[str] = ()):
    """A random-access TFDS data source for `split`; features in `skip_decoding` come back as bytes.

    The built-in set is opened through its builder (custom sizes have their own config names); any
    other name goes through `tfds.data_source` and must be prepared as array_record in the data dir.
    """
    import tensorflow_datasets as tfds

    decoders = {k: tfds.decode.SkipDecoding() for k in skip_decoding} or None
    data_dir = resolve_data_dir(data_cfg)
    try:
        if data_cfg.name == "captioned_shapes":
            from dalle2_jax.data.captioned_shapes import make_builder

            builder = make_builder(data_dir, data_cfg.builder_config, data_cfg.num_train or None,
                                   data_cfg.num_test or None)
            return builder.as_data_source(split, decoders=decoders)
        return tfds.data_source(data_cfg.name, split=split, data_dir=data_dir, download=False, decoders=decoders)
    except Exception as e:  # TFDS raises several types for a missing/unprepared data set
        raise FileNotFoundError(
            f"config.data.name={data_cfg.name!r}: cannot open split {split!r} in data dir {data_dir!r} "
            f"({type(e).__name__}: {e}). Prepare the data set there (array_record format) or set "
            "config.data.data_dir.") from e


def decode_image(data: bytes | np.ndarray, resolution: int) -> np.ndarray:
    """Encoded image bytes (or an array) -> uint8 [R, R, 3]: RGB, shortest side resized to R (bicubic,
    antialiased), then center-cropped, exactly as CLIP's reference preprocessing
    (images.resize_shortest_center_crop)."""
    return resize_shortest_center_crop(open_image(data), resolution)


def open_image(data: bytes | np.ndarray) -> Image.Image | np.ndarray:
    """Encoded image bytes -> a lazily decoded PIL image; arrays pass through."""
    return data if isinstance(data, np.ndarray) else Image.open(io.BytesIO(data))


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return _as_text(value.item())
    return str(value)


def data_name(data_cfg, split: str) -> str:
    """'<data set> <split>' for messages, e.g. 'captioned_shapes train'."""
    return f"{data_cfg.name} {split}"


class SkipUndecodable(grain.MapDataset):
    """Record j of `parent` -> `decode(parent[j])` plus 'bad_records': int32 (0), or, when reading or
    decoding record j raises, the decoded next record j+1, j+2, ... (mod len) that works, with
    'bad_records' = 1.

    Each undecodable record thus counts once wherever it is read (once per epoch in a shuffled stream) and
    its substitute depends only on j: the output is a deterministic function of the index, as random access
    needs (shuffling, sharding, resuming). Put it directly on the source, before `.seed()`, so downstream
    random maps keep their default seeds. Skipped records are logged (the first few at WARNING, then at
    DEBUG) naming `what` and the index. After `max_tries` consecutive failures it raises RuntimeError
    naming `what` and the first error: the data set (or its config, e.g. the image key) is broken.
    """

    def __init__(self, parent: grain.MapDataset, decode: Callable[[Any], dict], what: str,
                 max_tries: int = MAX_DECODE_TRIES):
        super().__init__(parent)
        self._decode, self._what, self._max_tries = decode, what, int(max_tries)
        self._num_logged = 0

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"SkipUndecodable({self._what})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        j = index % n
        first_error = None
        for k in range(min(self._max_tries, n)):
            try:
                record = self._parent[(j + k) % n]
                if record is None:
                    return None
                out = self._decode(record)
            except Exception as e:  # noqa: BLE001 - any read or decode error makes a record unusable
                if first_error is None:
                    first_error = e
                    self._log(j, e)
                continue
            return dict(out, **{BAD_RECORDS_KEY: np.int32(k > 0)})
        raise RuntimeError(
            f"{self._what}: records {j}..{(j + min(self._max_tries, n) - 1) % n} (of {n}) in a row cannot be "
            f"read or decoded: the data set looks broken (or config.data.image_key is wrong). First error, at "
            f"record {j}: {first_error!r}") from first_error

    def _log(self, index: int, error: Exception) -> None:
        self._num_logged += 1
        level = logging.WARNING if self._num_logged <= _LOGGED_BAD_RECORDS else logging.DEBUG
        more = (f" (further undecodable records in {self._what} are logged at DEBUG)"
                if self._num_logged == _LOGGED_BAD_RECORDS else "")
        logger.log(level, "%s: skipping record %d, it cannot be decoded: %r%s", self._what, index, error, more)


def skip_undecodable(ds: grain.MapDataset, decode: Callable[[Any], dict], what: str,
                     max_tries: int = MAX_DECODE_TRIES) -> grain.MapDataset:
    """`ds` with `decode` applied to each record, undecodable records replaced and counted in
    'bad_records' (see SkipUndecodable). `decode` returns a dict."""
    return SkipUndecodable(ds, decode, what, max_tries)


class DecodeExample(grain.transforms.Map):
    """TFDS record -> {'image': uint8 [R, R, 3], 'caption': str} (plus 'clip_image' uint8 [C, C, 3] when
    `clip_resolution` is set: the frozen CLIP's input when its size differs from the stage's, made from the
    source image with CLIP's preprocessing)."""

    def __init__(self, image_key: str, text_key: str, resolution: int, clip_resolution: int = 0):
        self.image_key, self.text_key, self.resolution = image_key, text_key, resolution
        self.clip_resolution = clip_resolution

    def map(self, record: dict) -> dict:
        img = open_image(record[self.image_key])  # decoded once for both sizes
        out = {"image": resize_shortest_center_crop(img, self.resolution),
               "caption": _as_text(record[self.text_key])}
        if self.clip_resolution:
            out["clip_image"] = resize_shortest_center_crop(img, self.clip_resolution)
        return out


class TokenizeBatch(grain.transforms.Map):
    """Batched {'image', 'caption'} -> {'image': uint8 [b, R, R, 3], 'tokens': int32 [b, L]}.

    The tokenizer is loaded lazily from its directory, so the transform pickles cheaply into workers.
    """

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir = tokenizer_dir
        self._tok = None

    def __getstate__(self):
        return {"tokenizer_dir": self.tokenizer_dir, "_tok": None}

    def map(self, batch: dict) -> dict:
        if self._tok is None:
            from dalle2_jax.text import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_dir)
        out = {k: v for k, v in batch.items() if k != "caption"}
        out["tokens"] = self._tok.encode_batch(list(batch["caption"]))
        return out


def shard_batches(ds: grain.MapDataset, local_batch_size: int, process_index: int = 0, process_count: int = 1,
                  batch_fn: Callable[[Sequence[Any]], Any] | None = None, read_threads: int = 1
                  ) -> grain.IterDataset:
    """Records in their global order -> this process's batches of b = `local_batch_size` records.

    The records are cut into consecutive batches of b (a last partial one is dropped) and batch k*P + p
    goes to process p of P, so process p's k-th batch holds global rows [k*B + p*b, k*B + (p+1)*b) with
    B = P*b: the rows `jax.make_array_from_process_local_data` places at process p in global batch k.
    A run thus sees the same global batches with any process count, and each process reads and decodes
    only its own records (the MapDataset is lazy). The batch count is cut to a multiple of P, so every
    process yields as many batches. Batches are read ahead by `read_threads` threads; the returned
    iterator's state can be saved with grain.checkpoint.
    """
    ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=batch_fn)
    usable = len(ds) - len(ds) % process_count
    ds = ds[process_index:usable:process_count]
    threads = max(1, int(read_threads))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))


def _stack(examples: Sequence[dict]) -> dict:
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "caption"}
    out["caption"] = [e["caption"] for e in examples]
    return out


def image_text_pipeline(data_cfg, split: str, *, tokenizer_dir: str, local_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                        num_epochs: int | None = None, num_workers: int | None = None,
                        extra_batch_map: Callable | None = None, clip_resolution: int = 0) -> grain.IterDataset:
    """The training pipeline for image-text stages: an endless (or `num_epochs`) iterable of batches
    {'image': uint8 [b, R, R, 3], 'tokens': int32 [b, L], 'bad_records': int32 [b]} with b =
    local_batch_size, plus 'clip_image' uint8 [b, C, C, 3] when `clip_resolution` C is set (see
    DecodeExample). 'bad_records' is 1 for a row whose record could not be decoded and was replaced by the
    next decodable one (see SkipUndecodable), else 0.

    The record order is a function of `seed` only (all records shuffled, reshuffled each epoch); process
    `process_index` of `process_count` gets its contiguous slice of every global batch of
    local_batch_size * process_count records (see shard_batches). The iterator state can be saved with
    grain.checkpoint.
    """
    source = open_source(data_cfg, split, skip_decoding=(data_cfg.image_key,))
    decode = DecodeExample(data_cfg.image_key, data_cfg.text_key, data_cfg.resolution, clip_resolution)
    ds = skip_undecodable(grain.MapDataset.source(source), decode.map, data_name(data_cfg, split))
    if shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs)
    it = shard_batches(ds, local_batch_size, process_index, process_count, batch_fn=_stack,
                       read_threads=int(data_cfg.read_threads))
    it = it.map(TokenizeBatch(tokenizer_dir))
    if extra_batch_map is not None:
        it = it.map(extra_batch_map)
    workers = int(data_cfg.num_workers) if num_workers is None else num_workers
    if workers > 0:
        it = procs.mp_prefetch(it, workers)
    return it


def close_iterator(it: Any) -> None:
    """Stops a grain iterator's worker processes and releases the shared memory of its batches.

    grain's mp_prefetch hands batches over in shared memory that the consumer frees asynchronously, from a
    thread pool, when an array is collected; at interpreter exit that pool is dropped with the last batches
    still mapped (the resource tracker's "leaked shared_memory objects" warning). Call this once the
    batches are no longer referenced: it closes the iterator, then lets the pool finish its unlinks."""
    if it is not None and hasattr(it, "close"):
        it.close()
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # pragma: no cover - another grain layout: nothing to drain
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        import gc

        gc.collect()  # the batches' __del__ queue their unlinks on the pool
        SharedMemoryArray._disable_async_del()  # new arrays free synchronously from here on
        pool.close()
        pool.join()


def read_split(data_cfg, split: str, keys: Sequence[str], max_examples: int = 0,
               decode: Callable[[dict], dict] | None = None) -> list[dict]:
    """Reads a split into memory as a list of records restricted to `keys`, with the image key decoded at
    the configured resolution: the first `max_examples` decodable records (0 = all). For evaluation sets.

    A record whose image cannot be decoded is left out with a logged warning (its index and the error),
    and one summary line "skipped N undecodable records in <data set> <split>" is logged.
    """
    source = open_source(data_cfg, split, skip_decoding=(data_cfg.image_key,))
    what = data_name(data_cfg, split)
    out: list[dict] = []
    bad = 0
    start = 0
    while start < len(source) and (not max_examples or len(out) < max_examples):
        stop = min(len(source), start + 256)
        for index, rec in zip(range(start, stop), source.__getitems__(list(range(start, stop)))):
            if max_examples and len(out) >= max_examples:
                break
            item = {k: rec[k] for k in keys}
            if data_cfg.image_key in item:
                try:
                    item[data_cfg.image_key] = decode_image(item[data_cfg.image_key], data_cfg.resolution)
                except Exception as e:  # noqa: BLE001 - any decode error makes the record unusable
                    bad += 1
                    logger.warning("%s: skipping record %d, its image cannot be decoded: %r", what, index, e)
                    continue
            if data_cfg.text_key in item:
                item[data_cfg.text_key] = _as_text(item[data_cfg.text_key])
            out.append(decode(item) if decode else item)
        start = stop
    if bad:
        logger.warning("skipped %d undecodable records in %s", bad, what)
    return out


def all_captions(data_cfg, split: str, max_examples: int = 0) -> list[str]:
    """The captions of a split (for training a tokenizer)."""
    source = open_source(data_cfg, split, skip_decoding=(data_cfg.image_key,))
    n = len(source) if not max_examples else min(max_examples, len(source))
    out: list[str] = []
    for start in range(0, n, 1024):
        out += [_as_text(r[data_cfg.text_key]) for r in source.__getitems__(list(range(start, min(n, start + 1024))))]
    return out


class DecodeHighLow(grain.transforms.Map):
    """TFDS record -> {'high': uint8 [R, R, 3], 'low': uint8 [r, r, 3]} for the upsampler stages: the
    high-res target decoded at R = `resolution`, the low-res input the stored low-res render
    (`low_res_key`) decoded at r = `low_res_resolution` or, without one, the target downsampled by R/r.
    Deterministic (no RNG), so undecodable records can be skipped before the random step."""

    def __init__(self, data_cfg):
        self.image_key, self.low_res_key = data_cfg.image_key, data_cfg.low_res_key
        self.resolution, self.low_res = int(data_cfg.resolution), int(data_cfg.low_res_resolution)

    def map(self, record: dict) -> dict:
        from dalle2_jax.data import degradations as G

        high = decode_image(record[self.image_key], self.resolution)
        low = (decode_image(record[self.low_res_key], self.low_res) if self.low_res_key
               else G.downsample(high, self.resolution // self.low_res))
        return {"high": high, "low": low}


class DegradeAndCrop(grain.transforms.RandomMap):
    """{'high': uint8 [R, R, 3], 'low': uint8 [r, r, 3]} (DecodeHighLow) -> {'high': uint8 [c, c, 3],
    'low': uint8 [c/f, c/f, 3]} with f = R/r; other keys pass through.

    The low-res image is corrupted (`degradation`: blur | bsr | none) with this example's generator, then a
    crop of side c (`crop_size`, 0 = full size) is taken at the same place in both (offsets on the low-res
    pixel grid).
    """

    def __init__(self, data_cfg, degradation: str, blur_sigma: float, blur_size: int, bsr_strength: float):
        self.resolution, self.low_res = int(data_cfg.resolution), int(data_cfg.low_res_resolution)
        self.crop = int(data_cfg.crop_size) or self.resolution
        self.degradation, self.blur_sigma, self.blur_size = degradation, blur_sigma, blur_size
        self.bsr_strength = bsr_strength

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        from dalle2_jax.data import degradations as G

        f = self.resolution // self.low_res
        high, low = example["high"], example["low"]
        if self.degradation == "blur":
            low = G.gaussian_blur(low, self.blur_sigma, self.blur_size)
        elif self.degradation == "bsr":
            low = G.bsr_degrade(low, rng, strength=self.bsr_strength)
        lc = self.crop // f
        y, x = (int(v) for v in rng.integers(0, self.low_res - lc + 1, size=2))
        return dict(example, high=high[y * f: y * f + self.crop, x * f: x * f + self.crop],
                    low=low[y: y + lc, x: x + lc])


def upsampler_pipeline(data_cfg, split: str, *, local_batch_size: int, seed: int, degradation: str = "blur",
                       blur_sigma: float = 0.6, blur_size: int = 3, bsr_strength: float = 1.0,
                       process_index: int = 0, process_count: int = 1,
                       num_workers: int | None = None) -> grain.IterDataset:
    """Endless batches {'high': uint8 [b, c, c, 3], 'low': uint8 [b, c/f, c/f, 3], 'bad_records': int32 [b]}
    (see DecodeHighLow, DegradeAndCrop): this process's slice of every global batch (see shard_batches),
    shuffled and corrupted deterministically from `seed` (each record's generator comes from its global
    position, so the corruption does not depend on the process count). Undecodable records are replaced
    and counted in 'bad_records' as in image_text_pipeline (see SkipUndecodable)."""
    keys = tuple(k for k in (data_cfg.image_key, data_cfg.low_res_key) if k)
    source = open_source(data_cfg, split, skip_decoding=keys)
    ds = skip_undecodable(grain.MapDataset.source(source), DecodeHighLow(data_cfg).map, data_name(data_cfg, split))
    ds = ds.seed(seed).shuffle().repeat(None)
    ds = ds.random_map(DegradeAndCrop(data_cfg, degradation, blur_sigma, blur_size, bsr_strength))
    it = shard_batches(ds, local_batch_size, process_index, process_count, read_threads=int(data_cfg.read_threads))
    workers = int(data_cfg.num_workers) if num_workers is None else num_workers
    if workers > 0:
        it = procs.mp_prefetch(it, workers)
    return it
