"""grain pipelines and the tokenizer."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest

from conftest import small_config


@pytest.fixture(scope="module")
def tokenizer_dir(shapes_data_dir, tmp_path_factory):
    from dalle2_jax.data import pipeline
    from dalle2_jax.text import BpeTokenizer

    cfg = small_config(shapes_data_dir)
    tok = BpeTokenizer.train(pipeline.all_captions(cfg.data, "train"), 512, 24)
    d = str(tmp_path_factory.mktemp("tok"))
    tok.save(d)
    return d


def _batches(cfg, tokenizer_dir, n, **kw):
    from dalle2_jax.data.pipeline import image_text_pipeline

    it = iter(image_text_pipeline(cfg.data, "train", tokenizer_dir=tokenizer_dir, local_batch_size=8, **kw))
    return [next(it) for _ in range(n)]


def _ids(batches):
    return [hashlib.md5(b["image"][i].tobytes() + b["tokens"][i].tobytes()).hexdigest()
            for b in batches for i in range(len(b["image"]))]


def test_batches_have_the_documented_layout(shapes_data_dir, tokenizer_dir):
    (b,) = _batches(small_config(shapes_data_dir), tokenizer_dir, 1, seed=0)
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.uint8
    assert b["tokens"].shape == (8, 24) and b["tokens"].dtype == np.int32
    assert (b["tokens"][:, 0] == 1).all() and ((b["tokens"] == 2).sum(1) == 1).all()  # SOT ... EOT


def test_pipeline_is_deterministic_per_seed(shapes_data_dir, tokenizer_dir):
    cfg = small_config(shapes_data_dir)
    a = _ids(_batches(cfg, tokenizer_dir, 3, seed=1))
    b = _ids(_batches(cfg, tokenizer_dir, 3, seed=1))
    c = _ids(_batches(cfg, tokenizer_dir, 3, seed=2))
    assert a == b
    assert a != c


def test_process_shards_are_disjoint_and_cover_the_epoch(shapes_data_dir, tokenizer_dir):
    cfg = small_config(shapes_data_dir)  # 256 train records: 128 per process = 16 batches of 8
    shards = [_ids(_batches(cfg, tokenizer_dir, 16, seed=0, process_index=p, process_count=2, num_epochs=1))
              for p in range(2)]
    whole = _ids(_batches(cfg, tokenizer_dir, 32, seed=0, num_epochs=1))
    assert not set(shards[0]) & set(shards[1])
    assert collections.Counter(shards[0] + shards[1]) == collections.Counter(whole)


def test_iterator_state_resumes_exactly(shapes_data_dir, tokenizer_dir):
    from dalle2_jax.data.pipeline import image_text_pipeline

    cfg = small_config(shapes_data_dir)
    make = lambda: iter(image_text_pipeline(cfg.data, "train", tokenizer_dir=tokenizer_dir,  # noqa: E731
                                            local_batch_size=8, seed=0))
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = _ids([next(it) for _ in range(2)])
    it2 = make()
    it2.set_state(state)
    assert _ids([next(it2) for _ in range(2)]) == expected


def test_decode_image_resizes_and_center_crops():
    import io

    from PIL import Image

    from dalle2_jax.data.pipeline import decode_image

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # the central square survives a center crop
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3)
    assert out[:, 2:-2].min() > 200
    gray = decode_image(np.zeros((20, 20, 1), np.uint8), 8)
    assert gray.shape == (8, 8, 3)


def test_tokenizer_round_trip_and_truncation(tokenizer_dir):
    from dalle2_jax.text import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode("a small red circle")
    assert tok.decode(ids) == "a small red circle"
    long = " ".join(["a large blue star"] * 20)
    ids = tok.encode(long)
    assert ids[-1] == tok.eot_id and tok.is_truncated(long)  # the end token survives truncation
    assert ids.shape == (24,)
