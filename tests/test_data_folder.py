"""Tests for the `image_folder_captions` TFDS builder."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import zlib

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
    # ... and each conversion (the photo and rgb.png are stored as they are).
    assert report['converted_counts'] == {'alpha': 1, 'grayscale': 1, 'palette': 1}
    assert {(c['reason'], c['file']) for c in report['converted']} == {
        ('alpha', 'rgba.png'), ('grayscale', 'sub/gray.png'), ('palette', 'sub/pal.gif')}
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
    assert b1.build_report['converted_counts'] == {'downscaled': 10}
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


def test_config_names_carry_non_default_options():
    name = image_folder.config_name_for
    assert name('pets', 0.1, 512) == 'pets_test0.1_max512'
    assert name('pets', max_side=image_folder.DEFAULT_MAX_SIDE, max_pixels=image_folder.DEFAULT_MAX_PIXELS,
                max_caption_chars=image_folder.DEFAULT_MAX_CAPTION_CHARS) == 'pets'  # defaults add nothing
    assert name('pets', max_side=0, max_pixels=10_000, max_caption_chars=77) == 'pets_max0_px10000_cap77'
    with pytest.raises(ValueError, match='max_pixels'):
        image_folder.make_builder('/nonexistent', '/tmp', max_pixels=0)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes = b'') -> bytes:
    """A PNG chunk."""
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


@pytest.fixture
def bad_folder(tmp_path) -> pathlib.Path:
    """One file of each bad kind, each with a caption unless the caption is the bad part."""
    root = tmp_path / 'bad'
    root.mkdir()
    txt = {}

    def image(name: str, im: Image.Image | bytes, caption: str | bytes | None = 'a caption', **kw) -> None:
        path = root / name
        path.write_bytes(im if isinstance(im, bytes) else _encoded(im, path.suffix[1:].replace('jpg', 'jpeg'), **kw))
        if caption is not None:
            txt[path.with_suffix('.txt')] = caption.encode() if isinstance(caption, str) else caption

    image('good.png', Image.fromarray(_rgb(8, 8, 0)), 'a good image')
    image('empty.png', b'')
    image('garbage.jpg', b'not an image at all ' * 8)
    png, jpg = _encoded(Image.fromarray(_rgb(24, 24, 1)), 'PNG'), _encoded(Image.fromarray(_rgb(32, 32, 2)), 'JPEG')
    image('cut.png', png[:len(png) // 2])
    image('cut.jpg', jpg[:len(jpg) // 2])  # passes PIL's verify(); fails to decode
    image('gray.png', Image.fromarray(_rgb(8, 8, 3)[..., 0], 'L'))
    rgba = np.concatenate([_rgb(8, 8, 4), np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    rgba[0, :, 3] = 0  # a transparent first row: white
    image('rgba.png', Image.fromarray(rgba, 'RGBA'))
    image('cmyk.jpg', Image.new('CMYK', (8, 8), (0, 0, 0, 0)), quality=95)  # CMYK white
    deep = np.zeros((8, 8), np.uint16)
    deep[:4] = 65535
    image('deep.png', Image.fromarray(deep))  # mode I;16
    image('huge.png', Image.fromarray(_rgb(100, 120, 5)))  # 12000 pixels > max_pixels 10000
    # A 30000x30000 PNG header with no pixel data: PIL's own decompression bomb check refuses to open it.
    image('bomb.png', b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', 30000, 30000, 8, 2, 0, 0, 0))
          + _chunk(b'IDAT') + _chunk(b'IEND'))
    image('big.png', Image.fromarray(_rgb(30, 48, 6)))  # longer side 48 > max_side 24
    frames = [Image.new('RGB', (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    image('anim.gif', frames[0], save_all=True, append_images=frames[1:])
    image('boom.png', Image.fromarray(_rgb(7, 7, 7)))  # made to raise inside the build (see the test)
    image('nocap.png', Image.fromarray(_rgb(8, 8, 8)), None)
    image('blank.png', Image.fromarray(_rgb(8, 8, 9)), ' \n\t ')
    image('long.png', Image.fromarray(_rgb(8, 8, 10)), 'word ' * 300)
    image('latin.png', Image.fromarray(_rgb(8, 8, 11)), 'caf\xe9 au lait'.encode('latin-1'))
    image('ctrl.png', Image.fromarray(_rgb(8, 8, 12)), 'a\x00b\x07c\x00')
    image('json.png', Image.fromarray(_rgb(8, 8, 13)), None)
    for path, data in txt.items():
        path.write_bytes(data)
    (root / 'captions.jsonl').write_bytes(b'\n'.join([
        json.dumps({'file': 'json.png', 'caption': 'from the jsonl'}).encode(),
        b'{"file": "json.png", "caption": "na\xefve"}',  # latin-1, not UTF-8
        json.dumps({'file': 'gone.png', 'caption': 'no such file'}).encode(),
        b'{broken',
        json.dumps({'file': 'json.png', 'caption': '   '}).encode()]) + b'\n')
    return root


def test_folder_of_bad_files_builds_with_a_full_report(bad_folder, tmp_path, capsys, monkeypatch):
    from dalle2_jax.tools import build_folder

    to_rgb = image_folder._to_rgb

    def exploding(im, *args):
        if im.size == (7, 7):
            raise RuntimeError('boom')
        return to_rgb(im, *args)

    monkeypatch.setattr(image_folder, '_to_rgb', exploding)
    with pytest.raises(SystemExit) as e:
        build_folder.run(['build_folder', '--folder', str(bad_folder), '--data_dir', str(tmp_path / 'tfds'),
                          '--name', 'bad', '--max_side', '24', '--max_pixels', '10000',
                          '--max_caption_chars', '100'])
    out = capsys.readouterr().out
    assert not e.value.code, out
    assert 'skipped 12 (' in out and 'converted 12 (alpha 1, cmyk 1,' in out
    assert '--config.data.name=image_folder_captions/bad_max24_px10000_cap100' in out

    builder = image_folder.make_builder(bad_folder, tmp_path / 'tfds', 'bad', max_side=24, max_pixels=10_000,
                                        max_caption_chars=100)
    report = image_folder.read_build_report(builder)
    assert report['skipped_counts'] == {'bad_jsonl_line': 1, 'corrupt_image': 3, 'empty_caption': 2,
                                        'empty_file': 1, 'missing_caption': 1, 'missing_file': 1, 'too_large': 2,
                                        'unexpected_error': 1}
    assert {(s['reason'], s['file']) for s in report['skipped']} == {
        ('bad_jsonl_line', 'captions.jsonl:4'), ('corrupt_image', 'garbage.jpg'), ('corrupt_image', 'cut.png'),
        ('corrupt_image', 'cut.jpg'), ('empty_caption', 'blank.png'), ('empty_caption', 'json.png'),
        ('empty_file', 'empty.png'), ('missing_caption', 'nocap.png'), ('missing_file', 'gone.png'),
        ('too_large', 'huge.png'), ('too_large', 'bomb.png'), ('unexpected_error', 'boom.png')}
    details = {s['file']: s['detail'] for s in report['skipped']}
    assert '120x100 = 12000 pixels' in details['huge.png'] and 'boom' in details['boom.png']
    assert '900000000 pixels' in details['bomb.png']
    assert 'truncated' in details['cut.jpg'].lower() and 'truncated' in details['cut.png'].lower()
    assert report['converted_counts'] == {'alpha': 1, 'cmyk': 1, 'control_characters': 1, 'downscaled': 1,
                                          'first_frame': 1, 'grayscale': 2, 'high_bit_depth': 1,
                                          'non_utf8_caption': 2, 'palette': 1, 'truncated_caption': 1}
    assert {(c['reason'], c['file']) for c in report['converted']} == {
        ('alpha', 'rgba.png'), ('cmyk', 'cmyk.jpg'), ('control_characters', 'ctrl.png'), ('downscaled', 'big.png'),
        ('first_frame', 'anim.gif'), ('grayscale', 'gray.png'), ('grayscale', 'deep.png'),
        ('high_bit_depth', 'deep.png'), ('non_utf8_caption', 'latin.png'), ('non_utf8_caption', 'json.png'),
        ('palette', 'anim.gif'), ('truncated_caption', 'long.png')}
    assert report['num_skipped'] == 12 and report['num_converted'] == 12
    assert {c['detail'] for c in report['converted'] if c['reason'] == 'downscaled'} == {
        'stored 48x30 -> 24x15 (max_side 24)'}

    # Stored: the good image and the converted ones (json.png has two usable captions), nothing else.
    recs = _records(builder, 'train')
    converted = {c['file'] for c in report['converted']}
    assert sorted(recs) == sorted(converted | {'good.png'})
    assert report['examples'] == {'train': len(converted) + 2}
    np.testing.assert_array_equal(recs['good.png'][0]['image'], _rgb(8, 8, 0))
    np.testing.assert_array_equal(recs['gray.png'][0]['image'], np.repeat(_rgb(8, 8, 3)[..., :1], 3, axis=-1))
    rgba = recs['rgba.png'][0]['image']
    np.testing.assert_array_equal(rgba[0], np.full((8, 3), 255))
    np.testing.assert_array_equal(rgba[1:], _rgb(8, 8, 4)[1:])
    assert np.abs(recs['cmyk.jpg'][0]['image'].astype(int) - 255).max() <= 2  # CMYK white -> RGB white
    deep = recs['deep.png'][0]['image']
    assert (deep[:4] == 255).all() and (deep[4:] == 0).all()  # 16-bit 65535 -> 255
    assert recs['big.png'][0]['image'].shape == (15, 24, 3)
    anim = recs['anim.gif'][0]['image']
    assert (anim[..., 0] > 240).all() and (anim[..., 2] < 15).all()  # the first (red) frame
    caption = {f: [r['caption'].decode() for r in rs] for f, rs in recs.items()}
    assert caption['latin.png'] == ['caf\ufffd au lait']
    assert caption['json.png'] == ['from the jsonl', 'na\ufffdve']
    assert caption['ctrl.png'] == ['a b c']
    assert caption['long.png'] == [('word ' * 20).strip()]  # cut at a word boundary: 99 characters
