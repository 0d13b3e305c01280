"""Fine-tuning imported karlo models (tools.import_karlo --workdirs, then train with config.init_from): the
tiny diffusers fixture's prior, decoder and super-res UNet trained a couple of steps on captioned shapes."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import _for_tests

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "karlo_tiny", "pipeline")


@pytest.fixture(scope="module")
def karlo_workdirs(tmp_path_factory) -> str:
    """The tiny karlo pipeline imported once with its training workdirs (W/clip has both towers)."""
    from dalle2_jax.tools.import_karlo import write_karlo

    root = tmp_path_factory.mktemp("karlo_ft")
    write_karlo(FIXTURE, str(root / "bundle"), workdirs=str(root / "W"))
    return str(root / "W")


def _tuples(d):
    return {k: (_tuples(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def karlo_config(kind: str, variant: str, workdirs: str, name: str, data_dir: str, **overrides):
    """configs/<kind>.py:<variant> with the fixture's (tiny) architecture from its imported workdir, started
    from that workdir's params, trained 2 steps of batch 2 in float32 on captioned_shapes/64_256."""
    from dalle2_jax.training.checkpoint import read_config

    c = importlib.import_module(f"configs.{kind}").get_config(variant)
    imported = read_config(os.path.join(workdirs, name))
    c.model.update(_tuples(imported.model.to_dict()))  # the tiny sizes (a real import's equal the config's)
    c.model.dtype, c.model.remat = "float32", "none"
    for key in ("resolution", "low_res_resolution", "crop_size", "image_key", "low_res_key"):
        if key in c.data and key in imported.data:
            c.data[key] = imported.data[key]
    if "clip_workdir" in c:
        c.clip_workdir = os.path.join(workdirs, "clip")
    c.init_from = os.path.join(workdirs, name)
    c.data.name, c.data.builder_config = "captioned_shapes", "64_256"
    c.sampling.steps = 2
    c.eval.batch_size = c.eval.max_examples = 2
    if "grid_size" in c.eval:
        c.eval.grid_size = 2
    over = {"total_steps": 2, "checkpoint_every": 2, "optimizer.learning_rate": 1e-3}
    over.update(overrides)
    return _for_tests(c, data_dir, 32, 4, 2, over)


def _check_finetuned(workdir: str, source: str, out: dict, lr: float = 1e-3) -> None:
    """Finite loss; the raw params after 2 Adam steps moved off the imported ones, by at most ~2 lr each
    (so they started from them: init_from worked)."""
    from dalle2_jax.training.checkpoint import load_params

    assert out["step"] == 2 and np.isfinite(out["train"]["loss"])
    _, src, _ = load_params(source)
    _, new, info = load_params(workdir, prefer_ema=False)
    assert info["params"] == "raw" and info["step"] == 2
    diffs = [float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
             for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(new))]
    assert len(diffs) == len(jax.tree.leaves(src)) and max(diffs) > 0
    assert max(diffs) <= 2.5 * lr, max(diffs)


def _batch(stage, data_dir_cfg, n: int = 2) -> dict:
    it = iter(stage.train_iterator(n, 0, 1))
    return {k: jnp.asarray(v) for k, v in next(it).items()}


def test_karlo_configs_drop_for_guidance():
    from configs.decoder import get_config as decoder_config
    from configs.prior import get_config as prior_config

    assert decoder_config("karlo").model.caption_drop_prob == 0.5
    assert decoder_config("karlo").model.image_drop_prob == 0.1
    assert prior_config("karlo").model.cond_drop_prob == 0.1


@pytest.mark.slow  # ~3 min on 2 shared CPU cores: the train step's and the sampler's compilation, eager losses
def test_karlo_decoder_finetunes(karlo_workdirs, shapes_256_data_dir, tmp_path):
    from dalle2_jax.stages.decoder import DecoderStage
    from dalle2_jax.training.trainer import train

    w = karlo_workdirs
    cfg = karlo_config("decoder", "karlo", w, "decoder", shapes_256_data_dir, **{"data.image_key": "image_64"})
    assert cfg.model.clip_text_conditioning and cfg.data.resolution == 16
    out = train(cfg, str(tmp_path / "dec"))
    _check_finetuned(str(tmp_path / "dec"), os.path.join(w, "decoder"), out)
    assert np.isfinite(out["eval"]["clip_cosine"])  # evaluate samples with the captions' CLIP text encodings

    # a dropped caption is the empty caption's CLIP encodings, the sampler's unconditional half
    stage = DecoderStage(cfg, str(tmp_path / "dec"))
    stage.setup_model()
    dropped, empty, kept = _drop_losses(stage, cfg, os.path.join(w, "decoder"), "caption_drop_prob", 3)
    assert dropped == pytest.approx(empty, rel=1e-5) and dropped != pytest.approx(kept, rel=1e-5)


def _drop_losses(stage, cfg, init_workdir: str, drop_key: str, seed: int) -> tuple[float, float, float]:
    """The imported params' losses on one batch: with every caption dropped (model.<drop_key> = 1), on the empty
    caption's tokens with none dropped, and on the batch's own captions with none dropped."""
    from dalle2_jax.training.checkpoint import load_params

    frozen = stage.clip_params()
    batch = _batch(stage, cfg.data)
    params = load_params(init_workdir)[1]
    empty_batch = dict(batch, tokens=jnp.broadcast_to(jnp.asarray(stage.empty_caption_tokens()), batch["tokens"].shape))
    rng = jax.random.key(seed)
    setattr(stage.config.model, drop_key, 1.0)
    dropped = float(stage.loss(params, batch, rng, frozen)[0])  # the loss reads the rate on each call
    setattr(stage.config.model, drop_key, 0.0)
    loss = lambda b: float(stage.loss(params, b, rng, frozen)[0])
    return dropped, loss(empty_batch), loss(batch)


@pytest.mark.slow
def test_karlo_prior_finetunes_with_karlo_stats(karlo_workdirs, shapes_256_data_dir, tmp_path, caplog):
    import logging

    from dalle2_jax.stages.prior import PriorStage
    from dalle2_jax.training.trainer import train

    w = karlo_workdirs
    cfg = karlo_config("prior", "karlo", w, "prior", shapes_256_data_dir,
                       **{"data.image_key": "image_64", "data.resolution": 32, "model.stats_examples": 8})
    assert not cfg.model.null_text_embedding and cfg.model.cond_drop_prob == 0.1
    with caplog.at_level(logging.INFO):
        out = train(cfg, str(tmp_path / "prior"))
    _check_finetuned(str(tmp_path / "prior"), os.path.join(w, "prior"), out)
    assert np.isfinite(out["eval"]["prior_cosine"])  # guided against the empty caption's encodings
    stats = json.load(open(tmp_path / "prior" / "stats" / "image_embedding_stats.json"))
    assert stats == json.load(open(os.path.join(w, "prior", "stats", "image_embedding_stats.json")))
    assert any("copied from config.init_from" in r.getMessage() for r in caplog.records)

    stage = PriorStage(cfg, str(tmp_path / "prior"))
    stage.setup_model()
    np.testing.assert_allclose(stage.emb_mean, stats["mean"], rtol=1e-6)
    dropped, empty, _ = _drop_losses(stage, cfg, os.path.join(w, "prior"), "cond_drop_prob", 5)
    assert dropped == pytest.approx(empty, rel=1e-5)


@pytest.mark.slow
def test_karlo_upsampler_finetunes(karlo_workdirs, shapes_256_data_dir, tmp_path):
    from dalle2_jax.training.trainer import train

    w = karlo_workdirs
    cfg = karlo_config("upsampler", "karlo_64to256", w, "upsampler", shapes_256_data_dir,
                       **{"model.last_step_model": False})
    out = train(cfg, str(tmp_path / "sr"))
    _check_finetuned(str(tmp_path / "sr"), os.path.join(w, "upsampler"), out)


def test_karlo_dropped_captions_are_the_empty_caption(karlo_workdirs, shapes_256_data_dir, tmp_path):
    """The loss pieces with the drop forced: a dropped row takes the empty caption's CLIP encodings (text
    embedding, token states, mask; the sampler's unconditional half), a kept row its caption's; the image
    embeddings (decoder condition, prior target) are the CLIP's raw ones."""
    from dalle2_jax.stages.decoder import DecoderStage
    from dalle2_jax.stages.prior import PriorStage

    w = karlo_workdirs
    dcfg = karlo_config("decoder", "karlo", w, "decoder", shapes_256_data_dir, **{"data.image_key": "image_64"})
    pcfg = karlo_config("prior", "karlo", w, "prior", shapes_256_data_dir,
                        **{"data.image_key": "image_64", "data.resolution": 32})
    for cls, cfg in ((DecoderStage, dcfg), (PriorStage, pcfg)):
        stage = cls(cfg, str(tmp_path / cls.name))
        stage.copy_clip_tokenizer()
        stage.setup_model()
        frozen = stage.clip_params()
        batch = _batch(stage, cfg.data)
        assert not stage.unit_text_embedding
        text = stage.training_text(frozen, batch["tokens"], jnp.array([True, False]))
        empty, real = stage.empty_text(frozen), stage.clip_text(frozen, batch["tokens"])
        np.testing.assert_array_equal(stage.empty_caption_tokens(), stage.tokenizer.encode_batch([""]))
        for got, e, r in zip(text, empty, real):
            np.testing.assert_array_equal(got[0], e[0])
            np.testing.assert_array_equal(got[1], r[1])
        assert not np.array_equal(real[0][0], empty[0][0])
        images = batch.get("clip_image", batch["image"])
        assert images.shape[1:] == (32, 32, 3)
        emb = stage.conditioning_embedding(frozen, images) if cls is DecoderStage else stage.clip_image(frozen, images)
        raw = stage.clip.apply(frozen, images.astype(jnp.float32) / 255.0, False, method=stage.clip.encode_image)
        np.testing.assert_allclose(emb, raw, rtol=1e-6)
        assert not np.allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-3)
    assert batch["image"].shape[1:] == (32, 32, 3)  # the prior's


def test_karlo_decoder_config_errors(karlo_workdirs, shapes_256_data_dir, tmp_path):
    from dalle2_jax.tools.import_karlo import write_karlo
    from dalle2_jax.training.config import ConfigError, validate_config

    w = karlo_workdirs
    cfg = karlo_config("decoder", "karlo", w, "decoder", shapes_256_data_dir,
                       **{"data.embeddings_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="config.data.embeddings_dir: a decoder with model.clip_text_conditioning"):
        validate_config(cfg, num_devices=1)
    cfg = karlo_config("prior", "karlo", w, "prior", shapes_256_data_dir, **{"data.embeddings_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="config.data.embeddings_dir"):
        validate_config(cfg, num_devices=1)
    # a text-only CLIP (karlo-v1-alpha without an image encoder) cannot embed the decoder's images
    src = tmp_path / "pipeline"
    shutil.copytree(FIXTURE, src, ignore=shutil.ignore_patterns("image_encoder"))
    write_karlo(str(src), str(tmp_path / "bundle"), workdirs=str(tmp_path / "W"))
    assert not json.load(open(tmp_path / "W" / "clip" / "config.json"))["model"]["image_tower"]
    cfg = karlo_config("decoder", "karlo", str(tmp_path / "W"), "decoder", shapes_256_data_dir)
    with pytest.raises(ConfigError, match="config.clip_workdir: .*text tower only.*tools.import_clip"):
        validate_config(cfg, num_devices=1)
