"""TFDS builder `image_folder_captions`: a user's folder of captioned images, no TensorFlow.

Captions come from `captions.jsonl` at the folder root (one `{"file": "rel/path.png", "caption": "..."}`
per line; several lines for one file give several examples) or else from a `.txt` file beside each image
with the same stem. Images are found recursively (png, jpg, jpeg, bmp, gif, webp, tif, tiff), converted
to RGB (alpha composited over white), optionally downscaled so the longer side is at most `max_side`,
and stored PNG-encoded. Unreadable records are skipped and listed in `build_report.json`.

Records, as returned by `tfds.data_source(f'image_folder_captions/{config}', data_dir=...)[i]`::

    {'image': uint8 [H, W, 3], 'caption': bytes, 'file': bytes (path relative to the folder)}
"""

from __future__ import annotations

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

NAME = 'image_folder_captions'
IMAGE_EXTENSIONS: frozenset[str] = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'})
CAPTIONS_FILE = 'captions.jsonl'
REPORT_FILE = 'build_report.json'
# Skip reasons in the build report.
CORRUPT_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, MISSING_FILE, BAD_JSONL_LINE = (
    'corrupt_image', 'missing_caption', 'empty_caption', 'missing_file', 'bad_jsonl_line')


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """Config: the source folder, the fraction of images held out as `test`, optional max image side."""

    folder: str = ''
    test_fraction: float = 0.0
    max_side: int | None = None


@dataclasses.dataclass
class _Item:
    file: str  # relative posix path
    captions: list[str]


def _split_hash(rel_path: str) -> int:
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], 'big')


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Opens an image file as RGB (EXIF orientation applied, alpha over white, 16-bit scaled to 8-bit).

    Raises an exception for an unreadable file. If `max_side` is set, the longer side is downscaled to it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # e.g. PIL's DecompressionBombWarning, palette transparency
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        arr = np.asarray(im, np.float64)
        top = 65535.0 if im.mode.startswith('I;16') or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
    if im.mode == 'P':
        im = im.convert('RGBA')
    if im.mode in ('RGBA', 'LA', 'RGBa', 'La', 'PA'):
        im = im.convert('RGBA')
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    if im.mode != 'RGB':
        im = im.convert('RGB')
    if max_side is not None and max(im.size) > max_side:
        scale = max_side / max(im.size)
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        im = im.resize(size, Image.LANCZOS)
    return im


class ImageFolderCaptions(tfds.core.GeneratorBasedBuilder):
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

    def _scan(self, root: pathlib.Path) -> list[_Item]:
        """Finds images and their captions; records skipped files. Returns items sorted by path."""
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
            found += [pathlib.Path(dirpath, f) for f in filenames
                      if not f.startswith('.') and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        images = {p.relative_to(root).as_posix(): p for p in sorted(found)}
        jsonl: dict[str, list[str]] = {}
        captions_path = root / CAPTIONS_FILE
        if captions_path.exists():
            for line_no, line in enumerate(captions_path.read_text(encoding='utf-8').splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    rel, caption = os.path.normpath(str(entry['file'])).replace(os.sep, '/'), entry['caption']
                    if not isinstance(caption, str):
                        raise TypeError('caption is not a string')
                except (ValueError, KeyError, TypeError) as e:
                    self._skip(f'{CAPTIONS_FILE}:{line_no}', BAD_JSONL_LINE, repr(e))
                    continue
                if rel not in images:
                    self._skip(rel, MISSING_FILE, f'{CAPTIONS_FILE}:{line_no}')
                    continue
                jsonl.setdefault(rel, []).append(caption)
        items = []
        for rel, path in images.items():
            if rel in jsonl:
                captions = jsonl[rel]
            else:
                txt = path.with_suffix('.txt')
                if not txt.exists():
                    self._skip(rel, MISSING_CAPTION)
                    continue
                captions = [txt.read_text(encoding='utf-8', errors='replace')]
            captions = [' '.join(c.split()) for c in captions]
            if not any(captions):
                self._skip(rel, EMPTY_CAPTION)
                continue
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder error means an unreadable image
                self._skip(rel, CORRUPT_IMAGE, repr(e))
                continue
            items.append(_Item(rel, [c for c in captions if c]))
        return items

    # -- generation -------------------------------------------------------------------------------

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        cfg = self.builder_config
        root = pathlib.Path(cfg.folder)
        if not root.is_dir():
            raise FileNotFoundError(f'image folder {cfg.folder!r} does not exist')
        self._skipped = []
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
        max_side = self.builder_config.max_side
        for it in items:
            try:
                im = load_rgb(root / it.file, max_side)
            except Exception as e:  # noqa: BLE001 - a file that verifies but does not decode
                self._skip(it.file, CORRUPT_IMAGE, repr(e))
                continue
            buf = io.BytesIO()
            im.save(buf, format='PNG', compress_level=6)
            png = buf.getvalue()
            for k, caption in enumerate(it.captions):
                yield f'{it.file}#{k}', {'image': png, 'caption': caption, 'file': it.file}

    def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager, download_config: Any) -> None:
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        cfg = self.builder_config
        splits = {name: int(info.num_examples) for name, info in self.info.splits.items()}
        self.build_report = {
            'folder': os.path.abspath(cfg.folder),
            'config': cfg.name,
            'test_fraction': cfg.test_fraction,
            'max_side': cfg.max_side,
            'examples': splits,
            'num_skipped': len(self._skipped),
            'skipped_counts': dict(sorted(Counter(s['reason'] for s in self._skipped).items())),
            'skipped': sorted(self._skipped, key=lambda s: (s['reason'], s['file'])),
        }
        # self.data_dir is the temporary build dir here; it is renamed to the final dir on success.
        (epath.Path(self.data_dir) / REPORT_FILE).write_text(json.dumps(self.build_report, indent=1))


def config_name_for(name: str = 'default', test_fraction: float = 0.0, max_side: int | None = None) -> str:
    """Config name from a user name plus non-default options, e.g. ('pets', 0.1, 512) -> 'pets_test0.1_max512'."""
    base = re.sub(r'[^\w\-.+]', '_', name).strip('_.') or 'default'
    if test_fraction:
        base += f'_test{test_fraction:g}'
    if max_side is not None:
        base += f'_max{int(max_side)}'
    return base


def make_builder(folder: str | os.PathLike, data_dir: str | os.PathLike, name: str = 'default',
                 test_fraction: float = 0.0, max_side: int | None = None) -> ImageFolderCaptions:
    """An `image_folder_captions` builder (not yet prepared) for `folder`, config `config_name_for(...)`."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
    if max_side is not None and max_side < 1:
        raise ValueError(f'max_side must be positive, got {max_side}')
    folder = os.path.abspath(os.fspath(folder))
    config = ImageFolderConfig(name=config_name_for(name, test_fraction, max_side), folder=folder,
                               test_fraction=test_fraction, max_side=max_side, description=f'images from {folder}')
    return ImageFolderCaptions(data_dir=os.fspath(data_dir), config=config)


def read_build_report(builder: ImageFolderCaptions) -> dict[str, Any]:
    """The build report JSON of a prepared builder."""
    return json.loads((epath.Path(builder.data_dir) / REPORT_FILE).read_text())


def prepare_image_folder(folder: str | os.PathLike, data_dir: str | os.PathLike, name: str = 'default',
                         test_fraction: float = 0.0, max_side: int | None = None) -> ImageFolderCaptions:
    """Builds `image_folder_captions/<config>` from `folder` unless present; prints a one-line summary.

    The config name comes from `name` (plus test_fraction/max_side when set). Reusing a name for a
    different folder raises ValueError. The report (counts per skip reason, skipped files) is written
    to `<builder.data_dir>/build_report.json` and kept in `builder.build_report`.
    """
    builder = make_builder(folder, data_dir, name, test_fraction, max_side)
    start = time.perf_counter()
    if builder.is_prepared():
        report = read_build_report(builder)
        if report['folder'] != builder.builder_config.folder:
            raise ValueError(f'{NAME}/{builder.builder_config.name} in {data_dir} was built from '
                             f'{report["folder"]!r}, not {builder.builder_config.folder!r}: choose another name')
        builder.build_report = report
        what = 'found'
    else:
        from dalle2_jax.data import staging

        builder = staging.download_and_prepare(
            builder, data_dir, lambda d: make_builder(folder, d, name, test_fraction, max_side))
        report = builder.build_report = read_build_report(builder)
        what = 'built'
    counts = ', '.join(f'{k} {v}' for k, v in report['skipped_counts'].items()) or 'none'
    examples = ', '.join(f'{k} {v}' for k, v in report['examples'].items())
    print(f'{NAME}/{builder.builder_config.name}: {what} ({examples}) in {time.perf_counter() - start:.1f}s; '
          f'skipped {report["num_skipped"]} ({counts}); report {epath.Path(builder.data_dir) / REPORT_FILE}',
          flush=True)
    return builder
