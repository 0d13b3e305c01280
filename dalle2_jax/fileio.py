"""Local or remote paths (`gs://`, `s3://`, ...) for every file the project reads or writes, through
etils.epath: the path library orbax and TFDS use, so a workdir, a data dir or a bundle may live in a
bucket and no host needs a disk shared with the others.

Paths stay strings in configs and APIs; this module is the one place that knows a URI from a local path.
Remote paths need the filesystem's fsspec package (`pip install 'dalle2-jax[gcs]'` for gcsfs). Writers that
only write local files (array_record's writer, used by TFDS and the embed tool) write through
`staged_output`: into a local temporary directory that is copied up when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI such as gs://bucket/dir; False for a local path."""
    return bool(_URI.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """A URI unchanged (less a trailing '/'); a local path user-expanded and absolute."""
    p = os.fspath(path)
    if is_remote(p):
        return p.rstrip("/") if not p.endswith("://") else p
    return os.path.abspath(os.path.expanduser(p))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` for local paths, '/'-joined for URIs."""
    b = os.fspath(base)
    return posixpath.join(b, *parts) if is_remote(b) else os.path.join(b, *parts)


def path(p: str | os.PathLike) -> epath.Path:
    """The epath.Path of a resolved `p` (orbax and TFDS take these)."""
    return epath.Path(resolve(p))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def makedirs(p: str | os.PathLike) -> None:
    """Creates `p` and its parents (remote stores have no empty directories: a no-op there for most)."""
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: str | os.PathLike) -> list[str]:
    """The names in directory `p`, sorted."""
    return sorted(c.name for c in path(p).iterdir())


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes `text` to `p`, creating the parent directory."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `p`, creating the parent directory."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def read_json(p: str | os.PathLike) -> Any:
    return json.loads(read_text(p))


def write_json(p: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented, key-sorted JSON, creating the parent directory."""
    write_text(p, json.dumps(obj, indent=2, sort_keys=True))


def walk_files(root: str | os.PathLike) -> list[str]:
    """Every file under `root`, as '/'-separated paths relative to it, sorted (one listing per directory,
    the same on every backend)."""
    out, stack = [], [(path(root), "")]
    while stack:
        directory, rel = stack.pop()
        for child in directory.iterdir():
            r = posixpath.join(rel, child.name) if rel else child.name
            (stack.append((child, r)) if child.is_dir() else out.append(r))
    return sorted(out)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file (either side may be remote), creating the parent directory, overwriting."""
    target = path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    with path(src).open("rb") as fin, target.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Copies every file under `src` to the same relative path under `dst` (either may be remote),
    overwriting. Files named in `last` (relative paths) are copied after all others, so a reader that
    waits for them (a manifest, a done marker) never sees a partial tree."""
    files = walk_files(src)
    for rel in [f for f in files if f not in last] + [f for f in last if f in files]:
        copy_file(join(src, rel), join(dst, rel))


def remove_tree(p: str | os.PathLike) -> None:
    """Deletes `p` and everything under it; nothing when it does not exist."""
    target = path(p)
    if target.exists():
        if target.is_dir():
            target.rmtree()
        else:
            target.unlink()


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves the file or directory `src` to `dst` (a rename where local; copy, then delete, for a URI)."""
    if not is_remote(src) and not is_remote(dst):
        os.makedirs(os.path.dirname(resolve(dst)), exist_ok=True)
        os.replace(resolve(src), resolve(dst))
        return
    if isdir(src):
        copy_tree(src, dst)
    else:
        copy_file(src, dst)
    remove_tree(src)


@contextlib.contextmanager
def staged_output(dst: str | os.PathLike, last: tuple[str, ...] = ()) -> Iterator[str]:
    """A local directory to write `dst`'s files into: `dst` itself when local; for a URI a temporary
    directory whose files are copied to `dst` when the block ends without an error (`last` as in
    copy_tree), then deleted."""
    if not is_remote(dst):
        yield resolve(dst)
        return
    local = tempfile.mkdtemp(prefix="dalle2_jax_stage_")
    try:
        yield local
        copy_tree(local, dst, last=last)
    finally:
        shutil.rmtree(local, ignore_errors=True)
