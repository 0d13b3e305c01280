"""tools.import_karlo's bundle against diffusers' own UnCLIPPipeline, end to end, without torch (issue 11).

tests/fixtures/karlo_tiny/pipeline/ is a complete diffusers UnCLIPPipeline folder at tiny sizes (the layout a
user downloads from kakaobrain/karlo-v1-alpha, plus karlo-v1-alpha-image-variations' image_encoder/ and
feature_extractor/), and reference.npz holds diffusers' outputs on it (scripts/make_karlo_fixtures.py): the
tokenizer's ids and mask and the text encoder's outputs for fixed prompts (pipe/*), one UnCLIPPipeline.__call__
at 2/2/2 steps from given latents with every scheduler draw injected (pipe/*), and the image encoder and one
UnCLIPImageVariationPipeline run (var/*). Here the folder is imported once through `python -m
dalle2_jax.tools.import_karlo` and everything runs from the bundle it writes.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "karlo_tiny")
PIPELINE = os.path.join(TINY, "pipeline")
TOL = 1e-3  # the bound for guided steps and the short pipeline run (measured: see the prints)


def check_images(ours: np.ndarray, theirs: np.ndarray, x0_first: np.ndarray) -> dict:
    """Final images of a 2-step super-res run: every value within TOL of diffusers' except those diffusers itself
    computed from an UNCLIPPED x0 at t = 999 (x0_first, the scheduler's first x0, is clipped to [-1, 1]: |x0| < 1
    marks them). There x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) with a = alpha_bar(999) = 2.4e-9 multiplies the
    float32 rounding of eps (~5e-7 between two convolution implementations) by 2e4, and the 2-step run jumps
    from t = 999 to t = 0, carrying it to the image: those few values (at most 0.1%) within 2e-2."""
    unclipped = nhwc(np.abs(x0_first) < 1)
    err = np.abs(ours - theirs)
    stats = {"image max": float(err.max()), "image max elsewhere": float(err[~unclipped].max()),
             "unclipped values": int(unclipped.sum())}
    assert stats["image max elsewhere"] < TOL and stats["image max"] < 2e-2, stats
    assert stats["unclipped values"] <= 1e-3 * unclipped.size, stats
    return stats


def nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(TINY, "reference.npz")))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixture folder imported by the CLI: (bundle path, workdirs path, the CLI's JSON line)."""
    from dalle2_jax.tools import import_karlo

    root = tmp_path_factory.mktemp("karlo")
    bundle, workdirs = str(root / "bundle"), str(root / "workdirs")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        import_karlo.run(["import_karlo", "--weights", PIPELINE, "--out", bundle, "--workdirs", workdirs])
    assert e.value.code in (0, None)
    return bundle, workdirs, json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pipe(imported):
    from dalle2_jax.inference.pipeline import UnCLIPPipeline

    return UnCLIPPipeline.from_bundle(imported[0], log=lambda _: None)


def test_bundle_layout_and_report(imported):
    """The bundle has the four stages in cascade order, the upsampler with super_res_last as its last-step
    model, karlo's statistics beside the prior; the workdirs hold one params-only checkpoint each; the counts in
    the report add up to the folders' parameters."""
    from dalle2_jax.inference.bundle import read_manifest
    from dalle2_jax.training import checkpoint as ckpt

    bundle, workdirs, line = imported
    m = read_manifest(bundle)
    assert [s["name"] for s in m["stages"]] == ["clip", "prior", "decoder", "upsampler_16to64"]
    sr = m["stages"][3]
    assert set(sr["models"]) == {"main", "last_step"} and sr["models"]["last_step"]["params"].endswith("_last_step")
    stats = json.load(open(os.path.join(bundle, "prior", "stats", "image_embedding_stats.json")))
    assert len(stats["mean"]) == len(stats["std"]) == 12
    report = json.load(open(os.path.join(bundle, "import_report.json")))
    assert report["num_params"] == line["num_params"] == sum(c["num_params"] for c in report["components"].values())
    assert report["components"]["clip"]["towers"] == ["text", "vision"]
    for name in ("clip", "prior", "decoder", "upsampler", "upsampler_last"):
        cfg, params, info = ckpt.load_params(os.path.join(workdirs, name))
        assert info["step"] == 0 and jax.tree.leaves(params)
        if name in ("prior", "decoder"):
            assert cfg.clip_workdir == os.path.join(workdirs, "clip")
    assert ckpt.read_config(os.path.join(workdirs, "upsampler")).model.last_step_model is False
    assert not os.path.exists(bundle + ".partial") and not os.path.exists(workdirs + ".partial")


def test_text_encoder_and_tokenizer_match_diffusers(pipe, ref):
    """The bundle's tokenizer gives the HF tokenizer's ids up to the first EOT (HF pads with EOT, we with 0), the
    mask is HF's attention mask (through the EOT; CLIP's "!" = id 0 stays valid), and the text encoder gives
    CLIPTextModelWithProjection's text_embeds (raw, as karlo's prior and decoder take them) and its
    last_hidden_state at every valid position, within 1e-4; the empty prompt likewise."""
    prompts = [str(p) for p in ref["pipe/prompts"]]
    tokens, warnings = pipe.tokenize(prompts)
    assert len(warnings) == 1  # the second prompt is longer than the 10-token context
    mask = ref["pipe/attention_mask"].astype(bool)
    assert np.array_equal(np.where(mask, tokens, 0), np.where(mask, ref["pipe/input_ids"], 0))
    assert (tokens == 0).any(axis=None) and (tokens[mask] == 0).any()  # an id-0 token inside the caption
    emb, states, valid = pipe.encode_text(tokens)
    assert np.array_equal(valid, mask)
    err = {"text_embeds": np.abs(emb - ref["pipe/text_embeds"]).max(),
           "last_hidden_state": np.abs(states - ref["pipe/last_hidden_state"])[mask].max()}
    u_emb, u_states, u_valid = pipe.empty_caption_text()
    umask = ref["pipe/uncond_attention_mask"].astype(bool)
    assert np.array_equal(u_valid, umask)
    err["uncond_text_embeds"] = np.abs(u_emb - ref["pipe/uncond_text_embeds"]).max()
    err["uncond_last_hidden_state"] = np.abs(u_states - ref["pipe/uncond_last_hidden_state"])[umask].max()
    print("text encoder, max |ours - diffusers|:", {k: f"{v:.1e}" for k, v in err.items()})
    assert max(err.values()) < 1e-4, err


def _noises(ref, prefix: str, stage: str):
    """(x_T, step_noise [steps, ...]) of one stage: the given latents and the injected draws (the last step,
    t = 0, draws none)."""
    x_T = nhwc(ref[f"{prefix}/{stage}_latents"])
    drawn = np.stack([nhwc(a) for a in ref[f"{prefix}/{stage}/noise"]])
    return jnp.asarray(x_T), jnp.asarray(np.concatenate([drawn, np.zeros_like(drawn[:1])]))


def test_bundle_runs_the_pipeline_like_diffusers(pipe, ref):
    """From the prompts to the image through the bundle's stages, with diffusers' latents and draws: the
    tokenizer and text encoder above, the prior (25 -> 2 steps, guidance 4, the empty caption's encodings as the
    unconditional half, x0 clipped at 5, un-standardised), the decoder (2 steps, guidance 8 on eps, the text
    encodings through text_proj, clamped float output), the super-res (bicubic upsampling of the float image,
    super_res_first then super_res_last on the final step): image embeddings and decoder image within 1e-3 of
    UnCLIPPipeline.__call__, the final image as check_images says."""
    prompts = [str(p) for p in ref["pipe/prompts"]]
    key = jax.random.key(0)
    tokens, _ = pipe.tokenize(prompts)
    text = pipe.encode_text(tokens)
    uncond = pipe.empty_caption_text()
    err = {}
    x_T, noise = _noises(ref, "pipe", "prior")
    sample = pipe.prior.stage.make_sampler(steps=2, guidance_scale=4.0, sampler="ddpm", num_candidates=1)
    emb = np.asarray(sample(pipe.prior.params, *text, key, None, uncond, x_T, noise))
    err["prior/image_emb"] = np.abs(emb - ref["pipe/prior/image_emb"]).max()
    x_T, noise = _noises(ref, "pipe", "decoder")
    sample = pipe.decoder.stage.make_sampler(steps=2, guidance_scale=8.0, sampler="ddpm", output="model")
    small = np.asarray(sample(pipe.decoder.params, jnp.asarray(emb), None, key, x_T, text, uncond, noise))
    err["decoder/image"] = np.abs(small - nhwc(ref["pipe/decoder/image"])).max()
    sr = pipe.upsamplers[0]
    x_T, noise = _noises(ref, "pipe", "super_res")
    sample = sr.stage.make_sampler(steps=2, sampler="ddpm", output="model")
    x = np.asarray(sample(sr.params, jnp.asarray(small), key, x_T, noise))
    print("bundle 2/2/2 pipeline, max |ours - diffusers|:", {k: f"{v:.1e}" for k, v in err.items()},
          check_images(np.clip(x * 0.5 + 0.5, 0, 1), ref["pipe/image"], ref["pipe/super_res/x0_first"]))
    assert max(err.values()) < TOL, err


def test_image_encoder_and_variation_chain_match_diffusers(pipe, ref):
    """The image tower (karlo-image-variations' CLIPVisionModelWithProjection) gives image_embeds on the feature
    extractor's pixel values within 1e-4 (and through our own CLIP preprocessing of the same uint8 images within
    a resize's difference); the decoder and super-res conditioned on them with the empty caption's encodings in
    both halves (UnCLIPImageVariationPipeline's inputs) give its decoder images within 1e-3 and its final images as
    check_images says."""
    clip, dec = pipe.clip, pipe.decoder
    mean, std = (np.asarray(clip.stage.config.model.vision[k], np.float32) for k in ("mean", "std"))
    images01 = nhwc(ref["var/pixel_values"]) * std + mean
    embeds = np.asarray(clip.stage.model.apply(clip.params, jnp.asarray(images01), normalize=False,
                                               method=clip.stage.model.encode_image))
    err = {"image_embeds": np.abs(embeds - ref["var/image_embeds"]).max()}
    ours = pipe.embed_images(np.stack([_clip_preprocess(im, 32) for im in ref["var/images"]]))
    cos = np.sum(ours * embeds, -1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(embeds, axis=-1)
    assert cos.min() > 0.99, cos
    key = jax.random.key(0)
    uncond = pipe.empty_caption_text()
    n = len(embeds)
    text = tuple(np.repeat(a, n, 0) for a in uncond)
    x_T, noise = _noises(ref, "var", "decoder")
    sample = dec.stage.make_sampler(steps=2, guidance_scale=8.0, sampler="ddpm", output="model")
    small = np.asarray(sample(dec.params, jnp.asarray(ref["var/image_embeds"]), None, key, x_T, text, uncond, noise))
    err["decoder/image"] = np.abs(small - nhwc(ref["var/decoder/image"])).max()
    sr = pipe.upsamplers[0]
    x_T, noise = _noises(ref, "var", "super_res")
    x = np.asarray(sr.stage.make_sampler(steps=2, sampler="ddpm", output="model")(sr.params, jnp.asarray(small), key,
                                                                                  x_T, noise))
    print("image encoder + variation chain, max |ours - diffusers|:", {k: f"{v:.1e}" for k, v in err.items()},
          check_images(np.clip(x * 0.5 + 0.5, 0, 1), ref["var/image"], ref["var/super_res/x0_first"]))
    assert err["image_embeds"] < 1e-4 and max(err.values()) < TOL, err


def _clip_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    from dalle2_jax.images import resize_shortest_center_crop

    return resize_shortest_center_crop(image, size)


def test_generate_on_the_karlo_bundle(pipe, imported, tmp_path):
    """`dalle2-jax generate --bundle KARLO_BUNDLE` writes the cascade's images (64 px from the tiny 16 px decoder),
    and the pipeline's text -> image is seeded."""
    from dalle2_jax import cli

    settings = {"prior": {"steps": 2}, "decoder": {"steps": 2}, "upsampler_16to64": {"steps": 2}}
    a = pipe.generate(["a red cube"], num_images=2, seed=1, settings=settings)
    b = pipe.generate(["a red cube"], num_images=2, seed=1, settings=settings)
    assert a.images.shape == (2, 64, 64, 3) and a.images.dtype == np.uint8 and np.array_equal(a.images, b.images)
    assert a.stages["decoder"].shape == (2, 16, 16, 3)
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as e:
        cli.main(["dalle2-jax", "generate", "--bundle", imported[0], "--out", str(out), "--num", "2",
                  "--prior_steps", "2", "--decoder_steps", "2", "--upsampler_steps", "2", "a red cube"])
    assert e.value.code in (0, None)
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs, os.listdir(out)


@pytest.mark.slow
def test_image_methods_on_the_karlo_bundle(pipe):
    """The image methods: the image tower's raw embedding, DDIM inversion and decoding conditioned on the empty
    caption's encodings (variations, interpolation); RePaint with the prompt's encodings (inpainting)."""
    settings = {"prior": {"steps": 2}, "decoder": {"steps": 2}, "upsampler_16to64": {"steps": 2}}
    img = ref_image()
    v = pipe.variations(img, num=2, seed=0, settings=settings)
    assert v.images.shape == (2, 64, 64, 3) and not np.array_equal(v.images[0], v.images[1])
    f = pipe.interpolate(img, img[:, ::-1], steps=2, settings=settings, num_upsamplers=0)
    assert f.images.shape == (2, 16, 16, 3)
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[:, : img.shape[1] // 2] = 255
    p = pipe.inpaint(img, mask, "a red cube", num=1, settings=settings, resample=1, jump_length=1)
    assert p.images.shape == (1, 64, 64, 3)


def ref_image() -> np.ndarray:
    return dict(np.load(os.path.join(TINY, "reference.npz")))["var/images"][0]


def test_text_only_bundle_refuses_images_by_name(tmp_path):
    """Without an image encoder the bundle's CLIP is its text tower (model.image_tower False): text -> image
    works, and variations are refused naming the fix."""
    from dalle2_jax.inference.errors import InputError
    from dalle2_jax.inference.pipeline import UnCLIPPipeline
    from dalle2_jax.tools.import_karlo import write_karlo

    folder = tmp_path / "karlo"
    shutil.copytree(PIPELINE, folder, ignore=shutil.ignore_patterns("image_encoder", "feature_extractor"))
    report = write_karlo(str(folder), str(tmp_path / "b"), log=lambda _: None)
    assert report["components"]["clip"]["towers"] == ["text"]
    p = UnCLIPPipeline.from_bundle(str(tmp_path / "b"), log=lambda _: None)
    settings = {"prior": {"steps": 2}, "decoder": {"steps": 2}, "upsampler_16to64": {"steps": 2}}
    # two images: the shapes test_generate_on_the_karlo_bundle compiled (the same prior and decoder programs)
    out = p.generate(["a cube"], num_images=2, seed=0, settings=settings, num_upsamplers=0)
    assert out.images.shape == (2, 16, 16, 3)
    with pytest.raises(InputError, match="no image tower"):
        p.embed_images(np.zeros((1, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("case", ["missing_folder", "mis_shaped", "other_vocab", "other_model"])
def test_import_refuses_what_does_not_fit_by_name(tmp_path, case, capsys):
    """A folder without a component, a text encoder tensor of the wrong shape, a tokenizer of another vocabulary
    and a prior of another model (another CLIP width) are refused before anything is written: exit 2, one
    line naming the file and the cause, no bundle or .partial left."""
    from safetensors.numpy import load_file, save_file

    from dalle2_jax.tools import import_karlo

    folder = tmp_path / "karlo"
    shutil.copytree(PIPELINE, folder)
    if case == "missing_folder":
        shutil.rmtree(folder / "text_proj")
        want = "lacks text_proj/"
    elif case == "mis_shaped":
        path = folder / "text_encoder" / "model.safetensors"
        t = load_file(str(path))
        name = "text_model.final_layer_norm.weight"
        t[name] = np.concatenate([t[name], t[name][:1]])
        save_file(t, str(path))
        want = name
    elif case == "other_vocab":
        path = folder / "tokenizer" / "vocab.json"
        v = json.load(open(path))
        a, b = list(v)[300], list(v)[301]
        v[a], v[b] = v[b], v[a]
        json.dump(v, open(path, "w"))
        want = "vocab.json: token"
    else:
        path = folder / "prior" / "config.json"
        c = json.load(open(path))
        c["embedding_dim"] = 16
        json.dump(c, open(path, "w"))
        want = "different models"
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as e:
        import_karlo.run(["import_karlo", "--weights", str(folder), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and want in err[0], err
    assert not out.exists() and not (tmp_path / "bundle.partial").exists()


def test_bfloat16_bundle(tmp_path):
    """--dtype bfloat16 writes every stage's params in bfloat16 (half the float32 bundle's params bytes) and
    the bundle samples."""
    from dalle2_jax.inference.bundle import load_bundle
    from dalle2_jax.tools.import_karlo import write_karlo

    write_karlo(PIPELINE, str(tmp_path / "b16"), dtype="bfloat16", log=lambda _: None)
    b = load_bundle(str(tmp_path / "b16"))
    leaves = jax.tree.leaves([s.params for s in b.stages])
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
