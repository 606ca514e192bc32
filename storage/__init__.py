"""Object storage for darkroom: one interface over a local folder and S3-compatible servers.

Light on purpose (no torch, diffusers, openvino, nncf or celery; boto3 only when S3 is used): producers
import it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage import keys
from storage.base import Storage
from storage.errors import ObjectNotFound, StorageAccessDenied, StorageError, StorageUnavailable
from storage.local import LocalStorage
from storage.s3 import S3Storage

__all__ = [
    "LocalStorage", "ObjectNotFound", "S3Storage", "Storage", "StorageAccessDenied", "StorageError",
    "StorageUnavailable", "keys", "open_storage",
]

DEFAULT_STORAGE_URL = "./darkroom-data"


def open_storage(url: str | None = None) -> Storage:
    """The store at `url`: a folder path, `file:///abs/path` or `s3://bucket[/prefix]`.

    Without a url: `DARKROOM_STORAGE_URL`, else `./darkroom-data` (made absolute now, so a later chdir
    does not move it).
    """
    if url is None:
        url = os.environ.get("DARKROOM_STORAGE_URL") or DEFAULT_STORAGE_URL
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"invalid storage URL {url!r}: give a folder path, file:///path or s3://bucket/prefix")
    if "://" not in url:
        return LocalStorage(Path(url).expanduser().absolute())
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"invalid file URL {url!r}: use file:///absolute/path (no host)")
        return LocalStorage(Path(unquote(parts.path)))
    if scheme == "s3":
        if parts.username is not None or parts.password is not None:
            # Never echo the URL here: it holds a secret.
            raise ValueError("credentials do not belong in an s3:// URL: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or use an AWS profile)")
        if not parts.hostname:
            raise ValueError(f"invalid S3 URL {url!r}: use s3://bucket or s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise ValueError(f"invalid S3 URL {url!r}: no query or fragment (the endpoint comes from "
                             "DARKROOM_S3_ENDPOINT)")
        return S3Storage(parts.netloc, unquote(parts.path).strip("/"))
    raise ValueError(f"unknown storage URL scheme {parts.scheme!r} in {url!r}: use a folder path, "
                     "file:///path or s3://bucket/prefix")
