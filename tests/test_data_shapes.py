"""Tests for the procedural scenes and the `captioned_shapes` TFDS builder."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dalle2_jax.data import captioned_shapes, scenes


def _scenes(n: int, seed: int = 0, **kwargs) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [scenes.sample_scene(rng, **kwargs) for _ in range(n)]


def _has_heldout(scene: dict) -> bool:
    return any(scenes.is_heldout(o['color'], o['shape']) for o in scene['objects'])


def _extent(obj: dict) -> tuple[np.ndarray, np.ndarray]:
    poly = scenes.object_polygon(obj, 1.0)
    return poly.min(axis=0), poly.max(axis=0)


# ---------------------------------------------------------------------------------------------
# Scenes


def test_constants_follow_spec():
    assert scenes.SHAPES == ('circle', 'square', 'triangle', 'diamond', 'star', 'cross')
    assert list(scenes.COLORS) == ['red', 'green', 'blue', 'yellow', 'purple', 'orange', 'cyan']
    assert scenes.COLORS['orange'] == (245, 130, 20)
    assert scenes.BACKGROUNDS == {'white': (255, 255, 255), 'black': (0, 0, 0), 'gray': (128, 128, 128)}
    assert scenes.SIZE_FRACTIONS == {'small': 0.22, 'large': 0.42}


@pytest.mark.parametrize('allow_heldout', [False, True])
def test_sample_scene_constraints(allow_heldout):
    samples = _scenes(3000, seed=1, allow_heldout=allow_heldout)
    num_single = 0
    for s in samples:
        objs = s['objects']
        assert len(objs) in (1, 2)
        num_single += len(objs) == 1
        assert 0 <= s['template'] < scenes.NUM_TEMPLATES
        for o in objs:
            assert scenes.COLORS[o['color']] != scenes.BACKGROUNDS[s['background']]
            lo, hi = _extent(o)
            assert lo.min() >= 0.0 and hi.max() <= 1.0, (o, lo, hi)
            if o['shape'] in scenes.ROTATING_SHAPES:
                assert abs(o['rotation']) <= scenes.MAX_ROTATION
            else:
                assert o['rotation'] == 0.0
            if not allow_heldout:
                assert not scenes.is_heldout(o['color'], o['shape'])
        if len(objs) == 1:
            assert s['relation'] is None
            continue
        (x0, y0), (x1, y1) = objs[0]['center'], objs[1]['center']
        gap = {'left of': x1 - x0, 'right of': x0 - x1, 'above': y1 - y0, 'below': y0 - y1}[s['relation']]
        assert gap >= scenes.MIN_SEPARATION - 1e-6, s
        # The two objects' bounding boxes do not overlap along the relation's axis.
        axis = 0 if s['relation'] in ('left of', 'right of') else 1
        (lo0, hi0), (lo1, hi1) = _extent(objs[0]), _extent(objs[1])
        assert hi0[axis] <= lo1[axis] or hi1[axis] <= lo0[axis], s
        assert (objs[0]['color'], objs[0]['shape']) != (objs[1]['color'], objs[1]['shape'])
    assert 0.45 < num_single / len(samples) < 0.55
    if allow_heldout:  # held-out pairs do occur when allowed
        assert sum(_has_heldout(s) for s in samples) > 50


def test_force_heldout():
    samples = _scenes(300, seed=2, allow_heldout=True, force_heldout=True)
    assert all(_has_heldout(s) for s in samples)
    with pytest.raises(ValueError):
        scenes.sample_scene(np.random.default_rng(0), allow_heldout=False, force_heldout=True)


def test_splits_heldout_pairs():
    train = [scenes.scene_for_example(0, 'train', i) for i in range(2000)]
    test = [scenes.scene_for_example(0, 'test', i) for i in range(400)]
    assert not any(_has_heldout(s) for s in train)
    assert all(_has_heldout(s) for s in test[::4])
    assert 0.25 <= np.mean([_has_heldout(s) for s in test]) < 0.4
    assert 0.4 < np.mean([len(s['objects']) == 1 for s in test]) < 0.6
    # Deterministic per (seed, split, index); different seeds and splits differ.
    assert scenes.scene_for_example(0, 'train', 7) == train[7]
    assert scenes.scene_for_example(1, 'train', 7) != train[7]
    assert scenes.scene_for_example(0, 'test', 7) != train[7]


def test_render_shape_dtype_and_determinism():
    for s in _scenes(20, seed=3, allow_heldout=True):
        for r in (64, 256):
            img = scenes.render_scene(s, r)
            assert img.shape == (r, r, 3) and img.dtype == np.uint8
            np.testing.assert_array_equal(img, scenes.render_scene(copy.deepcopy(s), r))
        png = scenes.render_scene_png(s, 64)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), scenes.render_scene(s, 64))


def test_render_consistent_across_resolutions():
    diffs = []
    for s in _scenes(40, seed=4, allow_heldout=True):
        low = scenes.render_scene(s, 64).astype(np.float64)
        high = np.asarray(Image.fromarray(scenes.render_scene(s, 256)).reduce(4)).astype(np.float64)
        diffs.append(np.abs(low - high))
    d = np.stack(diffs)
    assert d.mean() < 1.5, d.mean()
    assert np.quantile(d, 0.99) < 40, np.quantile(d, 0.99)
    s = _scenes(1, seed=5, allow_heldout=True)[0]
    top = np.asarray(Image.fromarray(scenes.render_scene(s, 1024)).reduce(16)).astype(np.float64)
    assert np.abs(top - scenes.render_scene(s, 64)).mean() < 1.5


def test_render_object_color_at_centre_and_background():
    for s in _scenes(200, seed=6, allow_heldout=True):
        for r in (64, 256):
            img = scenes.render_scene(s, r).astype(int)
            for o in s['objects']:
                x, y = (int(c * r) for c in o['center'])
                assert np.abs(img[y, x] - scenes.COLORS[o['color']]).max() <= 2, (s, r)
            # Corners are background (objects keep a margin inside the canvas and never fill a corner).
            assert np.abs(img[0, 0] - scenes.BACKGROUNDS[s['background']]).max() <= 2 or any(
                o['shape'] == 'square' for o in s['objects'])


# ---------------------------------------------------------------------------------------------
# Captions


def test_caption_examples():
    def scene(objs, relation=None, bg='black', template=0):
        return {'background': bg, 'relation': relation, 'template': template,
                'objects': [{'shape': sh, 'color': c, 'size': sz, 'center': (0.5, 0.5), 'rotation': 0.0}
                            for c, sh, sz in objs]}
    assert scenes.scene_caption(scene([('red', 'circle', 'large')], template=1)) == 'a large red circle'
    assert scenes.scene_caption(scene([('blue', 'star', 'small')], template=5)) == \
        'a small blue star on a black background'
    assert scenes.scene_caption(scene([('green', 'square', 'small'), ('yellow', 'triangle', 'large')],
                                      'left of', template=0)) == 'a green square to the left of a yellow triangle'
    assert scenes.scene_caption(scene([('orange', 'diamond', 'large'), ('cyan', 'cross', 'small')],
                                      'above', template=2)) == 'an orange diamond above a small cyan cross'
    assert scenes.scene_caption(scene([('orange', 'cross', 'large')], bg='gray', template=4)) == \
        'an orange cross on a gray background'


def _word_diff(a: str, b: str) -> list[int]:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb), (a, b)
    return [i for i, (x, y) in enumerate(zip(wa, wb)) if x != y]


@pytest.mark.parametrize('attr', ['color', 'shape'])
def test_caption_swap_changes_only_that_word(attr):
    values = list(scenes.COLORS) if attr == 'color' else list(scenes.SHAPES)
    for s in _scenes(300, seed=8, allow_heldout=True):
        caption = scenes.scene_caption(s)
        assert caption == scenes.scene_caption(copy.deepcopy(s))
        for k, obj in enumerate(s['objects']):
            assert obj['color'] in caption.split() and obj['shape'] in caption.split()
            for new in values:
                if new == obj[attr]:
                    continue
                swapped = copy.deepcopy(s)
                swapped['objects'][k][attr] = new
                new_caption = scenes.scene_caption(swapped)
                words = new_caption.split()
                diff = _word_diff(caption, new_caption)
                word_pos = [i for i in diff if words[i] == new]
                assert len(word_pos) == 1, (caption, new_caption)
                others = [i for i in diff if i != word_pos[0]]
                # Only the article right before the changed word may change too (a <-> an).
                assert all(i == word_pos[0] - 1 and words[i] in ('a', 'an') for i in others), (caption, new_caption)
                article = words[word_pos[0] - 1]
                if article in ('a', 'an'):
                    assert article == ('an' if new[0] in 'aeiou' else 'a')


def test_encode_decode_roundtrip():
    for s in _scenes(500, seed=9, allow_heldout=True):
        enc = scenes.encode_scene(s)
        assert enc['shape'].dtype == np.int32 and enc['center'].shape == (2, 2)
        if len(s['objects']) == 1:
            assert enc['shape'][1] == enc['color'][1] == enc['size'][1] == -1 and enc['relation'] == 0
        assert scenes.decode_scene(enc) == s


# ---------------------------------------------------------------------------------------------
# TFDS builder


def _records(data_dir, name: str, split: str) -> list[dict]:
    src = tfds.data_source(f'captioned_shapes/{name}', data_dir=str(data_dir), split=split)
    return [src[i] for i in range(len(src))]


def test_config_names():
    assert captioned_shapes.config_name_for('64') == '64'
    assert captioned_shapes.config_name_for('64', 32000, 2000) == '64'
    assert captioned_shapes.config_name_for('64', 2000, 500) == '64_n2000_t500'
    assert captioned_shapes.config_name_for('64_256', num_test=7, seed=3) == '64_256_t7_s3'
    with pytest.raises(ValueError):
        captioned_shapes.config_name_for('128')
    cfg = captioned_shapes.make_builder('/nonexistent', '256_1024', num_train=10).builder_config
    assert (cfg.name, cfg.resolutions, cfg.num_train, cfg.num_test) == ('256_1024_n10', (256, 1024), 10, 200)


def test_builder_deterministic_and_readable(tmp_path, capfd, caplog):
    b1 = captioned_shapes.prepare_captioned_shapes(tmp_path / 'a', '64', num_train=64, num_test=32, num_workers=2)
    # the build says one true line: no TFDS "Downloading and preparing dataset Unknown size", no progress bars,
    # no "Variant folder ... has no dataset_info.json" or "Using custom data configuration" warnings
    out, err = capfd.readouterr()
    assert 'built 64 train + 32 test' in out and 'Downloading' not in out + err and 'examples/s' not in out + err
    assert not [r.getMessage() for r in caplog.records if r.name == 'absl'], caplog.records
    capsys = capfd
    b2 = captioned_shapes.prepare_captioned_shapes(tmp_path / 'b', '64', num_train=64, num_test=32, num_workers=0)
    name = b1.builder_config.name
    assert name == '64_n64_t32' and 'built' in capsys.readouterr().out
    captioned_shapes.prepare_captioned_shapes(tmp_path / 'a', '64', num_train=64, num_test=32)
    assert 'found' in capsys.readouterr().out
    for split, n in (('train', 64), ('test', 32)):
        r1, r2 = _records(tmp_path / 'a', name, split), _records(tmp_path / 'b', name, split)
        assert len(r1) == len(r2) == n
        assert len(b2.as_data_source(split)) == n
        for i, (x, y) in enumerate(zip(r1, r2)):
            assert set(x) == {'caption', 'scene', 'image_64'}
            assert isinstance(x['caption'], bytes) and x['caption'] == y['caption']
            np.testing.assert_array_equal(x['image_64'], y['image_64'])
            for key in x['scene']:
                np.testing.assert_array_equal(x['scene'][key], y['scene'][key])
            scene = scenes.decode_scene(x['scene'])
            assert scene == scenes.scene_for_example(0, split, i)
            assert x['caption'].decode() == scenes.scene_caption(scene)
            assert x['image_64'].dtype == np.uint8 and x['image_64'].shape == (64, 64, 3)
            np.testing.assert_array_equal(x['image_64'], scenes.render_scene(scene, 64))
        heldout = [_has_heldout(scenes.decode_scene(x['scene'])) for x in r1]
        assert (not any(heldout)) if split == 'train' else sum(heldout) >= n // 4
    # A different seed gives different data under a different config name.
    b3 = captioned_shapes.make_builder(tmp_path / 'a', '64', num_train=64, num_test=32, seed=1)
    assert b3.builder_config.name == '64_n64_t32_s1' and not b3.is_prepared()


def test_builder_two_resolutions(tmp_path):
    b = captioned_shapes.prepare_captioned_shapes(tmp_path, '64_256', num_train=6, num_test=3, num_workers=0)
    rec = b.as_data_source('test')[1]
    assert rec['image_64'].shape == (64, 64, 3) and rec['image_256'].shape == (256, 256, 3)
    down = np.asarray(Image.fromarray(rec['image_256']).reduce(4)).astype(float)
    assert np.abs(down - rec['image_64']).mean() < 2.0
