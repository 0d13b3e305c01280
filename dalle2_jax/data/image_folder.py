"""TFDS builder `image_folder_captions`: a user's folder of captioned images, no TensorFlow.

Captions come from `captions.jsonl` at the folder root (one `{"file": "rel/path.png", "caption": "..."}`
per line; several lines for one file give several examples) or else from a `.txt` file beside each image
with the same stem. Images are found recursively (png, jpg, jpeg, bmp, gif, webp, tif, tiff) and stored
PNG-encoded as 8-bit RGB.

No single record stops a build: each image and caption is stored as is, converted, or skipped, and every
conversion and skip is counted and listed in `build_report.json` (see `_download_and_prepare`):

* converted (`converted_counts`, `converted`): grayscale (1/L/LA) replicated to RGB (`grayscale`);
  transparency (RGBA/LA/PA, or a palette or tRNS transparent colour) composited over white (`alpha`; an
  alpha channel that is opaque everywhere is dropped silently); palette images (`palette`); CMYK
  (`cmyk`); 16-bit and 32-bit integer or float images scaled to 8-bit (`high_bit_depth`); other modes
  such as YCbCr or LAB (`other_mode`); the first frame of an animation or multi-page file kept
  (`first_frame`); images whose longer side exceeds `max_side` (default 4096, 0 = never) downscaled
  (`downscaled`); captions longer than `max_caption_chars` (default 1000) cut at a word boundary
  (`truncated_caption`); invalid UTF-8 in a .txt caption or a captions.jsonl line decoded with
  U+FFFD replacement characters (`non_utf8_caption`); control characters replaced by spaces
  (`control_characters`). Whitespace runs are always collapsed to one space (not counted). A file
  converted in several ways is listed once per way; only stored files are listed.
* skipped (`skipped_counts`, `skipped`): zero-byte files (`empty_file`); files PIL cannot identify or
  fully decode, truncated ones included (`corrupt_image`; `ImageFile.LOAD_TRUNCATED_IMAGES` is never
  set); images of more than `max_pixels` pixels (default PIL's `MAX_IMAGE_PIXELS`, about 89.5M), read
  from the header without decoding (`too_large`); images without a caption (`missing_caption`); each
  caption empty after normalisation (`empty_caption`, an image left without captions is not stored);
  .txt captions that cannot be read (`unreadable_caption`); captions.jsonl lines naming a file that is
  not there (`missing_file`) or that are not a JSON object with string `file` and `caption`
  (`bad_jsonl_line`); and any other exception raised by one record (`unexpected_error`, its repr as
  the detail).

Records, as returned by `tfds.data_source(f'image_folder_captions/{config}', data_dir=...)[i]`::

    {'image': uint8 [H, W, 3], 'caption': bytes, 'file': bytes (path relative to the folder)}
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

from dalle2_jax import log_filters
from dalle2_jax.data import staging

log_filters.install()  # also in grain's worker processes, which rebuild the data source

NAME = 'image_folder_captions'
IMAGE_EXTENSIONS: frozenset[str] = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'})
CAPTIONS_FILE = 'captions.jsonl'
REPORT_FILE = 'build_report.json'
DEFAULT_MAX_SIDE = 4096  # longer side cap of stored images (0 = none)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (about 0.25 GB of 8-bit RGB)
DEFAULT_MAX_CAPTION_CHARS = 1000
# Skip reasons in the build report.
(EMPTY_FILE, CORRUPT_IMAGE, TOO_LARGE, MISSING_CAPTION, EMPTY_CAPTION, UNREADABLE_CAPTION, MISSING_FILE,
 BAD_JSONL_LINE, UNEXPECTED_ERROR) = (
    'empty_file', 'corrupt_image', 'too_large', 'missing_caption', 'empty_caption', 'unreadable_caption',
    'missing_file', 'bad_jsonl_line', 'unexpected_error')
# Conversion reasons in the build report.
(GRAYSCALE, ALPHA, PALETTE, CMYK, HIGH_BIT_DEPTH, OTHER_MODE, FIRST_FRAME, DOWNSCALED, TRUNCATED_CAPTION,
 NON_UTF8_CAPTION, CONTROL_CHARACTERS) = (
    'grayscale', 'alpha', 'palette', 'cmyk', 'high_bit_depth', 'other_mode', 'first_frame', 'downscaled',
    'truncated_caption', 'non_utf8_caption', 'control_characters')
# Control characters that str.split() does not treat as whitespace (whitespace is collapsed anyway).
_CONTROL_CHARS = re.compile('[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]')


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """Config: the source folder, the fraction of images held out as `test`, the longer-side cap of
    stored images (0 = none), the pixel count above which an image is skipped, and the caption length cap."""

    folder: str = ''
    test_fraction: float = 0.0
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS


class SkipRecord(Exception):
    """Raised for a record that is not stored: `reason` (a skip reason above) and `detail`."""

    def __init__(self, reason: str, detail: str = ''):
        super().__init__(f'{reason}: {detail}' if detail else reason)
        self.reason, self.detail = reason, detail


Conversion = tuple[str, str]  # (conversion reason, detail)


@dataclasses.dataclass
class _Item:
    file: str  # relative posix path
    captions: list[str]
    conversions: list[Conversion] = dataclasses.field(default_factory=list)  # of the captions


def _split_hash(rel_path: str) -> int:
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], 'big')


# -- images ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int):
    """Lets PIL open images up to `max_pixels` (it refuses more than twice its MAX_IMAGE_PIXELS); the caller
    checks the size itself before decoding. Changes PIL's global only when `max_pixels` is above it."""
    old = Image.MAX_IMAGE_PIXELS
    if old is not None and max_pixels > old:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@contextlib.contextmanager
def _open_image(path: str | os.PathLike, max_pixels: int) -> Iterator[Image.Image]:
    """Image.open for the builder: SkipRecord(empty_file) for a zero-byte file, SkipRecord(too_large) when
    the header's pixel count exceeds `max_pixels` (nothing decoded), and SkipRecord(corrupt_image) for any
    error raised by PIL or by the block (e.g. on load() or verify()). PIL's warnings are silenced."""
    if os.path.getsize(path) == 0:
        raise SkipRecord(EMPTY_FILE, '0 bytes')
    with warnings.catch_warnings(), _pil_pixel_limit(max_pixels):
        warnings.simplefilter('ignore')  # e.g. PIL's DecompressionBombWarning, palette transparency
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise SkipRecord(TOO_LARGE, f'{w}x{h} = {w * h} pixels > max_pixels {max_pixels}')
                yield im
        except Image.DecompressionBombError as e:
            raise SkipRecord(TOO_LARGE, str(e)) from e
        except SkipRecord:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder error means an unreadable image
            raise SkipRecord(CORRUPT_IMAGE, repr(e)) from e


def check_image_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Cheap check before a full decode (header, size, PIL's verify()); raises SkipRecord if unusable."""
    with _open_image(path, max_pixels) as im:
        im.verify()


def _decode_file(path: str | os.PathLike, max_side: int,
                 max_pixels: int) -> tuple[Image.Image, tuple[int, int], list[Conversion]]:
    """Reads and fully decodes an image file (EXIF orientation applied). Returns the image, its stored size
    (w, h) and the conversions so far; raises SkipRecord (see _open_image)."""
    conversions: list[Conversion] = []
    with _open_image(path, max_pixels) as im:
        w, h = im.size
        if getattr(im, 'n_frames', 1) > 1:
            conversions.append((FIRST_FRAME, f'first of {im.n_frames} frames'))
            im.seek(0)
        if max_side and max(w, h) > max_side and im.format == 'JPEG':
            scale = max_side / max(w, h)  # decode at a reduced DCT scale, at least twice the target size
            im.draft(None, (int(w * scale * 2), int(h * scale * 2)))
        im.load()  # raises for a truncated file: ImageFile.LOAD_TRUNCATED_IMAGES stays False
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
            im = im.copy()  # the file closes on leaving the block
    return im, (w, h), conversions


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ('RGBA', 'LA', 'RGBa', 'La', 'PA') or 'transparency' in im.info


def _to_rgb(im: Image.Image, max_side: int, stored_size: tuple[int, int],
            conversions: list[Conversion]) -> Image.Image:
    """A decoded image -> 8-bit RGB, longer side at most `max_side` (0 = any); appends what it converted."""
    mode = im.mode
    if mode.startswith('I;16') or mode in ('I', 'F'):
        arr = np.nan_to_num(np.asarray(im, np.float64))
        top = float(arr.max(initial=0.0))
        if mode.startswith('I;16'):
            top = 65535.0
        elif mode == 'F' and top <= 1.0:
            top = 1.0
        else:
            top = next((t for t in (255.0, 65535.0) if top <= t), top)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
        conversions.append((HIGH_BIT_DEPTH, f'{mode} -> 8-bit (0..{top:g} -> 0..255)'))
    if im.mode in ('P', 'PA'):
        conversions.append((PALETTE, f'{im.mode} -> RGB'))
        im = im.convert('RGBA' if _has_transparency(im) else 'RGB')
    elif im.mode in ('1', 'L', 'LA', 'La'):
        conversions.append((GRAYSCALE, f'{im.mode} -> RGB'))
    elif im.mode == 'CMYK':
        conversions.append((CMYK, 'CMYK -> RGB'))
    elif im.mode not in ('RGB', 'RGBA', 'RGBa'):
        conversions.append((OTHER_MODE, f'{im.mode} -> RGB'))
    if _has_transparency(im):
        im = im.convert('RGBA')
        transparent = int((np.asarray(im.getchannel('A')) < 255).sum())
        if transparent:
            conversions.append((ALPHA, f'{transparent} transparent pixels composited over white'))
            im = Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im)
    if im.mode != 'RGB':
        im = im.convert('RGB')
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        im = im.resize(size, Image.LANCZOS)
        conversions.append((DOWNSCALED, f'stored {stored_size[0]}x{stored_size[1]} -> {size[0]}x{size[1]} '
                                        f'(max_side {max_side})'))
    return im


def load_image_file(path: str | os.PathLike, max_side: int = DEFAULT_MAX_SIDE,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[Conversion]]:
    """Opens an image file as 8-bit RGB (see the module docstring), the longer side downscaled to
    `max_side` (0 = never). Returns the image and the conversions made [(reason, detail)]; raises
    SkipRecord (reason, detail) for an empty, unreadable, truncated or too large file."""
    im, stored_size, conversions = _decode_file(path, max_side, max_pixels)
    return _to_rgb(im, max_side, stored_size, conversions), conversions


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Opens an image file as RGB (EXIF orientation applied, alpha over white, 16-bit scaled to 8-bit).

    Raises an exception for an unreadable file. If `max_side` is set, the longer side is downscaled to it.
    """
    return load_image_file(path, max_side or 0, DEFAULT_MAX_PIXELS)[0]


# -- captions -------------------------------------------------------------------------------------

def _decode_text(data: bytes, where: str) -> tuple[str, list[Conversion]]:
    """UTF-8 bytes (a BOM dropped) -> text; invalid bytes become U+FFFD, reported as a conversion."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode('utf-8'), []
    except UnicodeDecodeError as e:
        detail = f'{where}: invalid UTF-8 at byte {e.start}, replaced with U+FFFD'
        return data.decode('utf-8', errors='replace'), [(NON_UTF8_CAPTION, detail)]


def clean_caption(text: str, max_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                  where: str = '') -> tuple[str, list[Conversion]]:
    """A caption -> (normalised caption, conversions): control characters replaced by spaces, whitespace
    runs collapsed, then cut to at most `max_chars` characters (at the last space in the second half of
    the limit, else mid-word)."""
    conversions: list[Conversion] = []
    prefix = f'{where}: ' if where else ''
    text, n = _CONTROL_CHARS.subn(' ', text)
    if n:
        conversions.append((CONTROL_CHARACTERS, f'{prefix}{n} replaced by spaces'))
    text = ' '.join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        if text[max_chars] != ' ' and ' ' in cut[max_chars // 2:]:
            cut = cut[:cut.rindex(' ')]
        conversions.append((TRUNCATED_CAPTION, f'{prefix}{len(text)} -> {len(cut.rstrip())} characters'))
        text = cut.rstrip()
    return text, conversions


# -- the builder ----------------------------------------------------------------------------------

class ImageFolderCaptions(staging.QuietBuild, tfds.core.GeneratorBasedBuilder):
    """A folder of images with captions (captions.jsonl or .txt files beside the images)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIG_CLASS = ImageFolderConfig

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (TFDS's own lookup needs the undeclared `importlib_resources` package)."""
        return epath.Path(__file__)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.build_report: dict[str, Any] | None = None
        self._skipped: list[dict[str, str]] = []
        self._converted: list[dict[str, str]] = []

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='Captioned images from a local folder (captions.jsonl or .txt files beside images).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
                'caption': tfds.features.Text(),
                'file': tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    # -- scanning ---------------------------------------------------------------------------------

    def _skip(self, file: str, reason: str, detail: str = '') -> None:
        self._skipped.append({'file': file, 'reason': reason, 'detail': detail})

    def _convert(self, file: str, conversions: list[Conversion]) -> None:
        self._converted += [{'file': file, 'reason': reason, 'detail': detail} for reason, detail in conversions]

    def _read_jsonl(self, path: pathlib.Path, images: dict[str, pathlib.Path]
                    ) -> dict[str, list[tuple[str, str, list[Conversion]]]]:
        """captions.jsonl -> {file: [(caption, 'captions.jsonl:LINE', conversions)]}; bad lines recorded.

        Read as bytes and split at line ends only, so one invalid UTF-8 byte or a U+2028 inside a caption
        affects nothing but its own line."""
        out: dict[str, list[tuple[str, str, list[Conversion]]]] = {}
        for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
            where = f'{CAPTIONS_FILE}:{line_no}'
            try:
                line, conversions = _decode_text(raw, where)
                if not line.strip():
                    continue
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise TypeError('not a JSON object')
                rel, caption = os.path.normpath(str(entry['file'])).replace(os.sep, '/'), entry['caption']
                if not isinstance(caption, str):
                    raise TypeError('caption is not a string')
            except (ValueError, KeyError, TypeError) as e:
                self._skip(where, BAD_JSONL_LINE, repr(e))
                continue
            except Exception as e:  # noqa: BLE001 - one line never stops the build
                self._skip(where, UNEXPECTED_ERROR, repr(e))
                continue
            if rel not in images:
                self._skip(rel, MISSING_FILE, where)
                continue
            out.setdefault(rel, []).append((caption, where, conversions))
        return out

    def _scan_image(self, rel: str, path: pathlib.Path,
                    captions: list[tuple[str, str, list[Conversion]]] | None) -> _Item | None:
        """One image and its captions (None: look for a .txt beside it) -> an item to store, or None with
        the reasons recorded; raises SkipRecord for the image itself."""
        cfg = self.builder_config
        if captions is None:
            txt = path.with_suffix('.txt')
            where = pathlib.PurePosixPath(rel).with_suffix('.txt').as_posix()
            if not txt.exists():
                raise SkipRecord(MISSING_CAPTION)
            try:
                data = txt.read_bytes()
            except OSError as e:
                raise SkipRecord(UNREADABLE_CAPTION, f'{where}: {e!r}') from e
            text, conversions = _decode_text(data, where)
            captions = [(text, where, conversions)]
        kept, conversions = [], []
        for text, where, decoded in captions:
            text, cleaned = clean_caption(text, cfg.max_caption_chars, where)
            if not text:
                self._skip(rel, EMPTY_CAPTION, where)
                continue
            kept.append(text)
            conversions += decoded + cleaned
        if not kept:
            return None
        check_image_file(path, cfg.max_pixels)
        return _Item(rel, kept, conversions)

    def _scan(self, root: pathlib.Path) -> list[_Item]:
        """Finds images and their captions; records skipped files. Returns items sorted by path."""
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
            found += [pathlib.Path(dirpath, f) for f in filenames
                      if not f.startswith('.') and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        images = {p.relative_to(root).as_posix(): p for p in sorted(found)}
        captions_path = root / CAPTIONS_FILE
        jsonl = self._read_jsonl(captions_path, images) if captions_path.exists() else {}
        items = []
        for rel, path in images.items():
            try:
                item = self._scan_image(rel, path, jsonl.get(rel))
            except SkipRecord as e:
                self._skip(rel, e.reason, e.detail)
                continue
            except Exception as e:  # noqa: BLE001 - one record never stops the build
                self._skip(rel, UNEXPECTED_ERROR, repr(e))
                continue
            if item is not None:
                items.append(item)
        return items

    # -- generation -------------------------------------------------------------------------------

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        cfg = self.builder_config
        root = pathlib.Path(cfg.folder)
        if not root.is_dir():
            raise FileNotFoundError(f'image folder {cfg.folder!r} does not exist')
        self._skipped, self._converted = [], []
        items = self._scan(root)
        if not items:
            counts = Counter(s['reason'] for s in self._skipped)
            raise ValueError(f'no readable captioned images in {cfg.folder!r} (skipped: {dict(counts)})')
        num_test = 0
        if cfg.test_fraction > 0 and len(items) > 1:
            num_test = min(len(items) - 1, max(1, round(cfg.test_fraction * len(items))))
        # The test images: the `num_test` images with the smallest hash of their path (deterministic).
        test_files = {it.file for it in sorted(items, key=lambda it: (_split_hash(it.file), it.file))[:num_test]}
        splits = {'train': self._generate_examples(root, [it for it in items if it.file not in test_files])}
        if test_files:
            splits['test'] = self._generate_examples(root, [it for it in items if it.file in test_files])
        return splits

    def _generate_examples(self, root: pathlib.Path, items: list[_Item]) -> Iterator[tuple[str, dict[str, Any]]]:
        cfg = self.builder_config
        for it in items:
            try:
                im, conversions = load_image_file(root / it.file, cfg.max_side, cfg.max_pixels)
                buf = io.BytesIO()
                im.save(buf, format='PNG', compress_level=6)
                png = buf.getvalue()
            except SkipRecord as e:  # e.g. a truncated JPEG (PIL's verify() does not read JPEG data)
                self._skip(it.file, e.reason, e.detail)
                continue
            except Exception as e:  # noqa: BLE001 - one record never stops the build
                self._skip(it.file, UNEXPECTED_ERROR, repr(e))
                continue
            self._convert(it.file, conversions + it.conversions)
            for k, caption in enumerate(it.captions):
                yield f'{it.file}#{k}', {'image': png, 'caption': caption, 'file': it.file}

    def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager, download_config: Any) -> None:
        """Prepares the splits, then writes `build_report.json` beside them:

        {'folder', 'config', 'test_fraction', 'max_side', 'max_pixels', 'max_caption_chars',
         'examples': {split: n}, 'num_skipped', 'skipped_counts': {reason: n},
         'skipped': [{'file', 'reason', 'detail'}], 'num_converted', 'converted_counts': {reason: n},
         'converted': [{'file', 'reason', 'detail'}]}

        (lists sorted by reason, then file; num_* = the list lengths)."""
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        cfg = self.builder_config
        splits = {name: int(info.num_examples) for name, info in self.info.splits.items()}
        self.build_report = {
            'folder': os.path.abspath(cfg.folder),
            'config': cfg.name,
            'test_fraction': cfg.test_fraction,
            'max_side': cfg.max_side,
            'max_pixels': cfg.max_pixels,
            'max_caption_chars': cfg.max_caption_chars,
            'examples': splits,
            'num_skipped': len(self._skipped),
            'skipped_counts': dict(sorted(Counter(s['reason'] for s in self._skipped).items())),
            'skipped': sorted(self._skipped, key=lambda s: (s['reason'], s['file'])),
            'num_converted': len(self._converted),
            'converted_counts': dict(sorted(Counter(s['reason'] for s in self._converted).items())),
            'converted': sorted(self._converted, key=lambda s: (s['reason'], s['file'])),
        }
        # self.data_dir is the temporary build dir here; it is renamed to the final dir on success.
        (epath.Path(self.data_dir) / REPORT_FILE).write_text(json.dumps(self.build_report, indent=1))


def config_name_for(name: str = 'default', test_fraction: float = 0.0, max_side: int | None = None,
                    max_pixels: int | None = None, max_caption_chars: int | None = None) -> str:
    """Config name from a user name plus non-default options, e.g. ('pets', 0.1, 512) -> 'pets_test0.1_max512'
    (then `_px<max_pixels>`, `_cap<max_caption_chars>`; None or the default adds nothing)."""
    base = re.sub(r'[^\w\-.+]', '_', name).strip('_.') or 'default'
    if test_fraction:
        base += f'_test{test_fraction:g}'
    if max_side is not None and int(max_side) != DEFAULT_MAX_SIDE:
        base += f'_max{int(max_side)}'
    if max_pixels is not None and int(max_pixels) != DEFAULT_MAX_PIXELS:
        base += f'_px{int(max_pixels)}'
    if max_caption_chars is not None and int(max_caption_chars) != DEFAULT_MAX_CAPTION_CHARS:
        base += f'_cap{int(max_caption_chars)}'
    return base


def make_builder(folder: str | os.PathLike, data_dir: str | os.PathLike, name: str = 'default',
                 test_fraction: float = 0.0, max_side: int | None = None, max_pixels: int | None = None,
                 max_caption_chars: int | None = None) -> ImageFolderCaptions:
    """An `image_folder_captions` builder (not yet prepared) for `folder`, config `config_name_for(...)`.

    None takes the default: max_side 4096 (0 = keep every size), max_pixels PIL's MAX_IMAGE_PIXELS
    default, max_caption_chars 1000."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
    if max_side is not None and max_side < 0:
        raise ValueError(f'max_side must be positive (or 0 for no limit), got {max_side}')
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f'max_pixels must be positive, got {max_pixels}')
    if max_caption_chars is not None and max_caption_chars < 1:
        raise ValueError(f'max_caption_chars must be positive, got {max_caption_chars}')
    folder = os.path.abspath(os.fspath(folder))
    config = ImageFolderConfig(
        name=config_name_for(name, test_fraction, max_side, max_pixels, max_caption_chars), folder=folder,
        test_fraction=test_fraction, max_side=DEFAULT_MAX_SIDE if max_side is None else int(max_side),
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels),
        max_caption_chars=DEFAULT_MAX_CAPTION_CHARS if max_caption_chars is None else int(max_caption_chars),
        description=f'images from {folder}')
    return ImageFolderCaptions(data_dir=os.fspath(data_dir), config=config)


def read_build_report(builder: ImageFolderCaptions) -> dict[str, Any]:
    """The build report JSON of a prepared builder."""
    return json.loads((epath.Path(builder.data_dir) / REPORT_FILE).read_text())


def _counts(counts: dict[str, int]) -> str:
    return ', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'


def prepare_image_folder(folder: str | os.PathLike, data_dir: str | os.PathLike, name: str = 'default',
                         test_fraction: float = 0.0, max_side: int | None = None, max_pixels: int | None = None,
                         max_caption_chars: int | None = None) -> ImageFolderCaptions:
    """Builds `image_folder_captions/<config>` from `folder` unless present; prints a one-line summary
    (examples per split, skipped and converted counts per reason).

    The config name comes from `name` plus the non-default options (see config_name_for). Reusing a name
    for a different folder raises ValueError. The report (see ImageFolderCaptions._download_and_prepare) is
    written to `<builder.data_dir>/build_report.json` and kept in `builder.build_report`.
    """
    options = (test_fraction, max_side, max_pixels, max_caption_chars)
    builder = make_builder(folder, data_dir, name, *options)
    start = time.perf_counter()
    if builder.is_prepared():
        report = read_build_report(builder)
        if report['folder'] != builder.builder_config.folder:
            raise ValueError(f'{NAME}/{builder.builder_config.name} in {data_dir} was built from '
                             f'{report["folder"]!r}, not {builder.builder_config.folder!r}: choose another name')
        builder.build_report = report
        what = 'found'
    else:
        builder = staging.download_and_prepare(builder, data_dir, lambda d: make_builder(folder, d, name, *options))
        report = builder.build_report = read_build_report(builder)
        what = 'built'
    examples = ', '.join(f'{k} {v}' for k, v in report['examples'].items())
    converted = report.get('converted_counts', {})  # absent from reports written before conversions were counted
    print(f'{NAME}/{builder.builder_config.name}: {what} ({examples}) in {time.perf_counter() - start:.1f}s; '
          f'skipped {report["num_skipped"]} ({_counts(report["skipped_counts"])}); '
          f'converted {report.get("num_converted", 0)} ({_counts(converted)}); '
          f'report {epath.Path(builder.data_dir) / REPORT_FILE}', flush=True)
    return builder
