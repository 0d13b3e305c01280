"""Tests for the `image_folder_captions` TFDS builder."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dalle2_jax.data import image_folder


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
    """A folder with both caption styles, grayscale / RGBA / palette images, a corrupt and an uncaptioned one."""
    root = tmp_path / 'images'
    (root / 'sub').mkdir(parents=True)
    Image.fromarray(_rgb(12, 20, 0)).save(root / 'rgb.png')
    Image.fromarray(_rgb(16, 16, 1)[..., 0], 'L').save(root / 'sub' / 'gray.png')
    rgba = np.concatenate([_rgb(10, 8, 2), np.full((10, 8, 1), 255, np.uint8)], axis=-1)
    rgba[0, 0, 3] = 0  # one fully transparent pixel: composited over white
    Image.fromarray(rgba, 'RGBA').save(root / 'rgba.png')
    Image.fromarray(_rgb(9, 9, 3)).convert('P', palette=Image.ADAPTIVE, colors=8).save(root / 'sub' / 'pal.gif')
    Image.fromarray(_rgb(30, 40, 4)).save(root / 'photo.jpg', quality=95)
    (root / 'photo.txt').write_text('a photo\nof noise\n')               # .txt caption
    (root / 'sub' / 'pal.txt').write_text('a palette image')            # .txt caption in a subfolder
    (root / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)  # corrupt image, has a caption
    Image.fromarray(_rgb(5, 5, 5)).save(root / 'uncaptioned.png')       # no caption anywhere
    (root / '.hidden.png').write_bytes(b'ignored')
    lines = [{'file': 'rgb.png', 'caption': 'random rgb noise'},
             {'file': 'rgb.png', 'caption': 'a second caption'},
             {'file': 'sub/gray.png', 'caption': 'gray noise'},
             {'file': 'rgba.png', 'caption': '  transparent   corner '},
             {'file': 'broken.png', 'caption': 'broken'},
             {'file': 'missing.png', 'caption': 'nothing here'}]
    (root / 'captions.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n{not json\n')
    return root


def _records(builder, split: str) -> dict[str, list[dict]]:
    src = builder.as_data_source(split)
    out: dict[str, list[dict]] = {}
    for i in range(len(src)):
        rec = src[i]
        out.setdefault(rec['file'].decode(), []).append(rec)
    return out


def test_folder_builder(folder, tmp_path, capsys):
    builder = image_folder.prepare_image_folder(folder, tmp_path / 'tfds', name='my set')
    assert builder.builder_config.name == 'my_set'
    assert 'built' in capsys.readouterr().out
    recs = _records(builder, 'train')
    assert sorted(recs) == ['photo.jpg', 'rgb.png', 'rgba.png', 'sub/gray.png', 'sub/pal.gif']
    for rs in recs.values():
        for r in rs:
            assert r['image'].dtype == np.uint8 and r['image'].ndim == 3 and r['image'].shape[2] == 3
    # jsonl captions (two lines for one file give two examples), whitespace normalised; .txt captions.
    assert [r['caption'] for r in recs['rgb.png']] == [b'random rgb noise', b'a second caption']
    assert recs['rgba.png'][0]['caption'] == b'transparent corner'
    assert recs['photo.jpg'][0]['caption'] == b'a photo of noise'
    assert recs['sub/pal.gif'][0]['caption'] == b'a palette image'
    # Pixels: lossless RGB, grayscale replicated to 3 channels, alpha composited over white.
    np.testing.assert_array_equal(recs['rgb.png'][0]['image'], _rgb(12, 20, 0))
    gray = recs['sub/gray.png'][0]['image']
    np.testing.assert_array_equal(gray, np.repeat(_rgb(16, 16, 1)[..., :1], 3, axis=-1))
    rgba = recs['rgba.png'][0]['image']
    np.testing.assert_array_equal(rgba[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgba[1:, :], _rgb(10, 8, 2)[1:, :])
    assert recs['photo.jpg'][0]['image'].shape == (30, 40, 3)
    # The report lists each skipped record with its reason.
    report = json.loads((pathlib.Path(builder.data_dir) / 'build_report.json').read_text())
    assert report == builder.build_report
    assert report['examples'] == {'train': 6}
    assert report['skipped_counts'] == {'bad_jsonl_line': 1, 'corrupt_image': 1, 'missing_caption': 1,
                                        'missing_file': 1}
    skipped = {(s['reason'], s['file']) for s in report['skipped']}
    assert {('corrupt_image', 'broken.png'), ('missing_caption', 'uncaptioned.png'),
            ('missing_file', 'missing.png'), ('bad_jsonl_line', 'captions.jsonl:7')} == skipped
    # Readable by name with tfds.data_source; preparing again reuses the build.
    src = tfds.data_source('image_folder_captions/my_set', data_dir=str(tmp_path / 'tfds'), split='train')
    assert len(src) == 6
    again = image_folder.prepare_image_folder(folder, tmp_path / 'tfds', name='my set')
    assert 'found' in capsys.readouterr().out and again.build_report == report
    with pytest.raises(ValueError, match='choose another name'):
        image_folder.prepare_image_folder(folder / 'sub', tmp_path / 'tfds', name='my set')


def test_folder_test_split_and_max_side(tmp_path):
    root = tmp_path / 'many'
    root.mkdir()
    for i in range(10):
        Image.fromarray(_rgb(40 + i, 100, i)).save(root / f'img{i}.png')
        (root / f'img{i}.txt').write_text(f'image number {i}')
    b1 = image_folder.prepare_image_folder(root, tmp_path / 'd1', test_fraction=0.3, max_side=50)
    b2 = image_folder.prepare_image_folder(root, tmp_path / 'd2', test_fraction=0.3, max_side=50)
    assert b1.builder_config.name == 'default_test0.3_max50'
    train, test = _records(b1, 'train'), _records(b1, 'test')
    assert len(test) == 3 and len(train) == 7 and not set(train) & set(test)
    assert set(test) == set(_records(b2, 'test'))  # deterministic split
    for name, (rec,) in {**train, **test}.items():
        i = int(name[3:-4])
        assert rec['image'].shape == (round((40 + i) / 2), 50, 3)  # longer side downscaled to max_side
        assert rec['caption'] == f'image number {i}'.encode()


def test_folder_without_usable_images(tmp_path):
    root = tmp_path / 'empty'
    root.mkdir()
    Image.fromarray(_rgb(4, 4, 0)).save(root / 'a.png')  # no caption
    with pytest.raises(ValueError, match='no readable captioned images'):
        image_folder.prepare_image_folder(root, tmp_path / 'd')
