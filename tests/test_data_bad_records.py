"""Training and evaluation data with records whose image cannot be decoded: skipped, replaced and counted."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from conftest import small_config, small_upsampler_config

BAD = (3, 4, 100, 255)  # 3 and 4 in a row: 3's substitute is 5; 255's wraps round to 0


class _Corrupted:
    """A TFDS data source whose records at `bad` have garbage instead of encoded image bytes."""

    def __init__(self, source, image_key: str, bad):
        self.source, self.image_key, self.bad = source, image_key, frozenset(bad)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        rec = dict(self.source[i])
        if i in self.bad:
            rec[self.image_key] = b"\x89PNG\r\n\x1a\n not really a PNG"
        return rec

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]


def _corrupt(monkeypatch, bad) -> None:
    """Makes pipeline.open_source return sources corrupted at `bad` (for every split)."""
    from dalle2_jax.data import pipeline

    real = pipeline.open_source
    monkeypatch.setattr(pipeline, "open_source",
                        lambda cfg, split, skip_decoding=(): _Corrupted(real(cfg, split, skip_decoding), cfg.image_key,
                                                                        bad))


@pytest.fixture(scope="module")
def tokenizer_dir(shapes_data_dir, tmp_path_factory) -> str:
    from dalle2_jax.data import pipeline
    from dalle2_jax.text import BpeTokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    BpeTokenizer.train(pipeline.all_captions(small_config(shapes_data_dir).data, "train"), 512, 24).save(d)
    return d


def _digest(image: np.ndarray) -> str:
    return hashlib.md5(image.tobytes()).hexdigest()


def _batches(cfg, tokenizer_dir, n: int, b: int = 8, p: int = 0, count: int = 1, state=None):
    from dalle2_jax.data.pipeline import image_text_pipeline

    it = iter(image_text_pipeline(cfg.data, "train", tokenizer_dir=tokenizer_dir, local_batch_size=b, seed=0,
                                  process_index=p, process_count=count, num_workers=0))
    if state is not None:
        it.set_state(state)
    return it, [next(it) for _ in range(n)]


def test_image_text_pipeline_replaces_and_counts_undecodable_records(shapes_data_dir, tokenizer_dir, monkeypatch,
                                                                     caplog):
    from dalle2_jax.data import pipeline
    from dalle2_jax.text import load_tokenizer

    cfg = small_config(shapes_data_dir)
    source = pipeline.open_source(cfg.data, "train", skip_decoding=("image_64",))
    index_of = {_digest(pipeline.decode_image(source[i]["image_64"], 64)): i for i in range(len(source))}
    assert len(index_of) == len(source) == 256  # every image tells its record
    _, clean = _batches(cfg, tokenizer_dir, 34)  # 272 rows: every record at least once
    _corrupt(monkeypatch, BAD)
    with caplog.at_level(logging.WARNING, logger="dalle2_jax"):
        it, dirty = _batches(cfg, tokenizer_dir, 34)
    assert "captioned_shapes train: skipping record 3, it cannot be decoded" in caplog.text

    tok = load_tokenizer(tokenizer_dir)
    substitute = {3: 5, 4: 5, 100: 101, 255: 0}
    replaced = 0
    for c, d in zip(clean, dirty):
        assert d["image"].shape == (8, 64, 64, 3) and d["tokens"].shape == (8, 24)
        assert d["bad_records"].dtype == np.int32 and d["bad_records"].shape == (8,)
        for row in range(8):
            j = index_of[_digest(c["image"][row])]
            k = index_of[_digest(d["image"][row])]
            assert k not in BAD
            if j in BAD:  # the next decodable record in stored order, with its own caption
                replaced += 1
                assert d["bad_records"][row] == 1 and k == substitute[j]
                expected = tok.encode_batch([source[k]["caption"].decode()])[0]
                np.testing.assert_array_equal(d["tokens"][row], expected)
            else:
                assert d["bad_records"][row] == 0 and k == j
                np.testing.assert_array_equal(d["tokens"][row], c["tokens"][row])
    assert replaced >= len(BAD)
    assert sum(int(d["bad_records"].sum()) for d in dirty) == replaced

    # The same global batches with two processes, and the iterator state resumes exactly.
    parts = [_batches(cfg, tokenizer_dir, 34, b=4, p=p, count=2)[1] for p in range(2)]
    for k, whole in enumerate(dirty):
        for key in ("image", "tokens", "bad_records"):
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[key])
    it, first = _batches(cfg, tokenizer_dir, 3)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    _, resumed = _batches(cfg, tokenizer_dir, 3, state=state)
    for e, r in zip(expected, resumed):
        for key in ("image", "tokens", "bad_records"):
            np.testing.assert_array_equal(r[key], e[key])


def test_upsampler_pipeline_replaces_and_counts_undecodable_records(shapes_256_data_dir, monkeypatch):
    from dalle2_jax.data.pipeline import upsampler_pipeline

    cfg = small_upsampler_config(shapes_256_data_dir)  # 32 records, batches of 4

    def batches(n):
        it = iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=3, degradation="bsr", num_workers=0))
        return [next(it) for _ in range(n)]

    clean = batches(8)
    assert all((b["bad_records"] == 0).all() for b in clean)
    _corrupt(monkeypatch, (2, 17))
    dirty = batches(8)  # one epoch: each bad record once
    flags = np.concatenate([b["bad_records"] for b in dirty])
    assert flags.dtype == np.int32 and flags.sum() == 2
    for c, d in zip(clean, dirty):
        assert d["high"].shape == (4, 64, 64, 3) and d["low"].shape == (4, 16, 16, 3)
        good = d["bad_records"] == 0  # good rows: the same crops and degradations as without bad records
        np.testing.assert_array_equal(d["high"][good], c["high"][good])
        np.testing.assert_array_equal(d["low"][good], c["low"][good])


def test_a_broken_data_set_fails_with_a_clear_error(shapes_data_dir, tokenizer_dir, monkeypatch):
    cfg = small_config(shapes_data_dir)
    _corrupt(monkeypatch, range(256))
    with pytest.raises(RuntimeError, match=r"captioned_shapes train: records .* cannot be read or decoded: the data "
                                           r"set looks broken .*UnidentifiedImageError"):
        _batches(cfg, tokenizer_dir, 1)


def test_read_split_skips_and_counts_undecodable_records(shapes_data_dir, monkeypatch, caplog):
    from dalle2_jax.data import pipeline

    cfg = small_config(shapes_data_dir)
    clean = pipeline.read_split(cfg.data, "test", ["image_64", "caption"], 12)
    _corrupt(monkeypatch, (1, 5))
    with caplog.at_level(logging.WARNING, logger="dalle2_jax"):
        first = pipeline.read_split(cfg.data, "test", ["image_64", "caption"], 10)
    assert "skipped 2 undecodable records in captioned_shapes test" in caplog.text
    assert "skipping record 5" in caplog.text
    keep = [r for i, r in enumerate(clean) if i not in (1, 5)]  # the first 10 decodable records
    assert len(first) == 10
    for a, b in zip(first, keep):
        np.testing.assert_array_equal(a["image_64"], b["image_64"])
        assert a["caption"] == b["caption"]
    assert len(pipeline.read_split(cfg.data, "test", ["image_64"])) == 62
