"""Objects as files under a local directory: the default store, and the demo's."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from storage.base import TEMP_MARKER, ObjectInfo, Storage, atomic_file, validate_key, validate_prefix
from storage.errors import ObjectNotFound, StorageAccessDenied, StorageError


class LocalStorage(Storage):
    """Keys are paths relative to `root`. The root is created on the first write, not here."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        validate_key(key)
        parts = key.split("/")
        if any(part.startswith(TEMP_MARKER) for part in parts):
            raise ValueError(f"invalid object key {key!r}: names starting {TEMP_MARKER!r} are reserved")
        return self.root.joinpath(*parts)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        with _os_errors("write", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as fh:
                fh.write(data)
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with _os_errors("read", path, missing_is_not_found=True):
            return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        return [key for key, _path in self._walk(prefix)]

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        for key, path in self._walk(prefix):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted between the walk and the stat: no longer an object
            except OSError as exc:
                raise StorageError(f"cannot stat {path}: {exc.strerror or exc}") from exc
            found.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return found

    def _walk(self, prefix: str) -> list[tuple[str, Path]]:
        """(key, path) of every object under `prefix`, sorted by key."""
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix names; the rest of the prefix filters names within it.
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        if not folder.is_dir():
            return []
        found: list[tuple[str, Path]] = []
        with _os_errors("list", folder):
            for dirpath, _dirs, files in os.walk(folder):
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                for name in files:
                    if name.startswith(TEMP_MARKER):
                        continue  # an atomic write in progress, or the leftover of a crashed one
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if key.startswith(prefix):
                        found.append((key, Path(dirpath) / name))
        return sorted(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        # Empty parent folders stay: removing them could race with a concurrent writer's mkdir + open.
        with _os_errors("delete", path):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        validate_prefix(key)
        uri = self.root.joinpath(*key.split("/")).as_uri() if key.strip("/") else self.url
        return uri + "/" if key.endswith("/") and not uri.endswith("/") else uri

    def _put_file(self, path: Path, key: str, content_type: str | None) -> None:
        target = self._path(key)
        with _os_errors("write", target):
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as src, atomic_file(target) as fh:
                shutil.copyfileobj(src, fh, 1 << 20)

    def _get_to_file(self, key: str, fh: IO[bytes]) -> None:
        path = self._path(key)
        with _os_errors("read", path, missing_is_not_found=True), open(path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)


@contextmanager
def _os_errors(op: str, path: Path, *, missing_is_not_found: bool = False) -> Iterator[None]:
    """OS errors as storage errors, so callers handle one family whatever the backend."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        if missing_is_not_found:
            raise ObjectNotFound(f"no object at {path.as_uri()}") from None
        raise StorageError(f"cannot {op} {path}: {exc.strerror}") from exc
    except PermissionError as exc:
        raise StorageAccessDenied(f"cannot {op} {path}: permission denied") from exc
    except OSError as exc:
        raise StorageError(f"cannot {op} {path}: {exc.strerror or exc}") from exc
