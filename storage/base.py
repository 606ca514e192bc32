"""The object-store interface every backend implements, and the key and path rules they share."""

from __future__ import annotations

import json
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from storage.errors import StorageError

# Temp files of atomic writes start with this; LocalStorage hides them from listings and refuses keys that
# would look like one, so a crashed writer's leftovers are never mistaken for objects.
TEMP_MARKER = ".darkroom-tmp."
# S3's limit; the same on every backend so a key that works locally also works in production.
MAX_KEY_BYTES = 1024


def _bad_chars(text: str) -> bool:
    return "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text)


def validate_key(key: str) -> str:
    """`key` if it names one object: relative, `/`-separated, no `.`/`..`/empty segments. Else ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}: must be a non-empty string")
    if key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}: ends with '/' (that is a prefix, not an object)")
    return _validate_path_like(key, "object key")


def validate_prefix(prefix: str) -> str:
    """`prefix` if it is a valid key prefix: "" or key-like, may end with `/` or stop mid-name."""
    if not isinstance(prefix, str):
        raise ValueError(f"invalid key prefix {prefix!r}: must be a string")
    if prefix == "":
        return prefix
    _validate_path_like(prefix[:-1] if prefix.endswith("/") else prefix, "key prefix", shown=prefix)
    return prefix


def validate_folder_prefix(prefix: str) -> str:
    """A prefix that stands for a folder ("" or ending in `/`): keys are prefix + a relative path."""
    validate_prefix(prefix)
    if prefix and not prefix.endswith("/"):
        raise ValueError(f"invalid folder prefix {prefix!r}: must be empty or end with '/'")
    return prefix


def _validate_path_like(text: str, what: str, *, shown: str | None = None) -> str:
    shown = text if shown is None else shown
    if text.startswith("/"):
        raise ValueError(f"invalid {what} {shown!r}: must be relative (no leading '/')")
    if _bad_chars(text):
        raise ValueError(f"invalid {what} {shown!r}: no backslashes or control characters")
    if any(part in ("", ".", "..") for part in text.split("/")):
        raise ValueError(f"invalid {what} {shown!r}: no empty, '.' or '..' segments")
    if len(text.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"invalid {what} {shown[:60]!r}...: longer than {MAX_KEY_BYTES} bytes")
    return text


def safe_local_path(local_dir: Path, relative: str) -> Path:
    """Where `relative` (a key minus its prefix) lands under `local_dir`; StorageError if it would escape it.

    Keys in a shared bucket are written by anyone with access, so a key like `p/../../etc/x` must never
    turn into a write outside the download folder. Symlinks inside `local_dir` are followed for the check.
    """
    parts = relative.split("/") if isinstance(relative, str) else []
    if (not parts or relative.startswith("/") or _bad_chars(relative)
            or any(part in ("", ".", "..") for part in parts)):
        raise StorageError(f"refusing to download {relative!r} into {local_dir}: not a plain relative path")
    base = Path(local_dir).resolve()
    target = base.joinpath(*parts)
    if not target.resolve().is_relative_to(base):
        raise StorageError(f"refusing to download {relative!r} into {local_dir}: it resolves outside it")
    return target


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` so that readers see the old file or the whole new one: temp file, fsync, rename."""
    # Same directory, so os.replace is a rename within one filesystem (atomic on POSIX).
    tmp = path.with_name(f"{TEMP_MARKER}{path.name[:80]}.{secrets.token_hex(6)}")
    # os.open with 0o666 lets the umask decide the final mode, like a plain open() would (mkstemp gives 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable: without it a power cut can bring back the old file, or none.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing sees it: what retention needs to judge it without reading it."""

    key: str
    size: int
    modified: datetime  # timezone-aware, UTC


class Storage(ABC):
    """Objects under string keys. Writes are atomic; keys are validated (ValueError) before any I/O."""

    #: Where the objects live, for display: never contains credentials.
    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store `data` at `key` atomically (readers see the old object or all of the new); return its URI."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix` (recursively), sorted."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` (recursively) with its size and last-modified time, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error if there is none (a re-run job may delete twice)."""

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove many objects (no error for missing ones); returns how many keys were asked for.

        Every key is checked before the first deletion. Backends with a bulk call (S3) override this.
        """
        planned = [validate_key(key) for key in keys]
        for key in planned:
            self.delete(key)
        return len(planned)

    @abstractmethod
    def uri(self, key: str) -> str:
        """`file:///abs/path` or `s3://bucket/prefix/key` for a key or a folder prefix."""

    @abstractmethod
    def _put_file(self, path: Path, key: str, content_type: str | None) -> None:
        """Upload one local file (streamed: model weights can be gigabytes)."""

    @abstractmethod
    def _get_to_file(self, key: str, fh: IO[bytes]) -> None:
        """Stream one object into an open file."""

    def put_json(self, key: str, obj: Any) -> str:
        # Sorted keys and fixed indent: a re-run job writes byte-identical manifests. No NaN: not JSON.
        text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        return self.put_bytes(key, text.encode("utf-8"), "application/json")

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.uri(key)} is not UTF-8 JSON: {exc}") from None

    def put_file(self, path: Path, key: str, content_type: str | None = None) -> str:
        """Upload one local file, streamed (blobs and weights can be gigabytes); return its URI."""
        self._put_file(Path(path), validate_key(key), content_type)
        return self.uri(key)

    def upload_dir(self, local_dir: Path, prefix: str) -> list[str]:
        """Upload every file under `local_dir`; keys are `prefix` + the file's relative posix path."""
        validate_folder_prefix(prefix)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(f"upload_dir: {local_dir} is not a directory")
        files = sorted((p.relative_to(local_dir).as_posix(), p) for p in local_dir.rglob("*") if p.is_file())
        # Every key is checked before the first upload.
        planned = [(validate_key(prefix + rel), path) for rel, path in files]
        for key, path in planned:
            self._put_file(path, key, None)
        return [key for key, _ in planned]

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]:
        """Download every object under `prefix` into `local_dir` (key minus prefix), each file atomically."""
        validate_folder_prefix(prefix)
        # Map every key first: one hostile key aborts the whole download before anything is written.
        planned = [(key, safe_local_path(local_dir, key[len(prefix):])) for key in self.list_keys(prefix)]
        written: list[Path] = []
        for key, path in planned:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(path) as fh:
                    self._get_to_file(key, fh)
            except OSError as exc:
                raise StorageError(f"cannot write {path} (from {self.uri(key)}): {exc}") from exc
            written.append(path)
        return written

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
