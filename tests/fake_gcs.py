"""A local Google Cloud Storage for tests: gcp-storage-emulator (a pure-Python GCS JSON API server, a
test dependency) in this process, with every client the project uses pointed at it by its own
environment variable: gcsfs (etils.epath's gs:// backend) by STORAGE_EMULATOR_HOST, tensorstore (orbax's
arrays) by TENSORSTORE_GCS_HTTP_URL, array_record (grain's reader) by CLOUD_STORAGE_EMULATOR_ENDPOINT.

One gap of the emulator is filled here: its object downloads carry no `x-goog-generation` header, which
tensorstore reads to make conditional writes (orbax's OCDBT manifest is rewritten conditionally).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator

ENV_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")


def _add_generation_header() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_with_generation", False):
        return
    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except Exception:  # noqa: BLE001 - a missing object: the 404 stands as it is
            pass

    download._with_generation = True
    for _, methods in server.HANDLERS:
        for method, fn in list(methods.items()):
            if fn is original:
                methods[method] = download
    objects.download = download


@contextlib.contextmanager
def fake_gcs(bucket: str = "bkt") -> Iterator[str]:
    """Serves an in-memory GCS with `bucket` on a free local port; yields its URL. The client
    environment variables are set for the duration (and the previous values put back)."""
    from gcp_storage_emulator.server import create_server

    _add_generation_header()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    names = ENV_VARS + ("GOOGLE_AUTH_TOKEN_FOR_TESTING",)
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: url for k in ENV_VARS}, GOOGLE_AUTH_TOKEN_FOR_TESTING="test")
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
