"""Objects in an S3 bucket (AWS or any S3-compatible server: SeaweedFS, MinIO, Ceph RGW, ...), through boto3.

boto3 is imported when the first request is made, not when this module is: producers that only use local
storage never pay for it.
"""

from __future__ import annotations

import mimetypes
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from storage.base import ObjectInfo, Storage, validate_key, validate_prefix
from storage.errors import ObjectNotFound, StorageAccessDenied, StorageError, StorageUnavailable

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden", "ExpiredToken",
           "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
              "ServiceUnavailable", "InternalError", "OperationAborted"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


class S3Storage(Storage):
    """Keys live under `prefix/` in `bucket`. Endpoint and credentials come from the arguments, else the env:
    `DARKROOM_S3_ENDPOINT` or `AWS_ENDPOINT_URL`, and the standard AWS credential chain."""

    # S3's limits: keys a listing page returns, keys one DeleteObjects request takes (tests lower them).
    list_page_size = 1000
    delete_batch_size = 1000

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None) -> None:
        if not isinstance(bucket, str) or not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 lowercase letters, digits, '.' or '-'")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither (to use the AWS environment)")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or os.environ.get("DARKROOM_S3_ENDPOINT") or os.environ.get(
            "AWS_ENDPOINT_URL") or None
        # A region is required for SigV4 even by servers that ignore it; us-east-1 is what they all accept.
        self.region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        self._access_key = access_key
        self._secret_key = secret_key
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The endpoint for messages: userinfo removed, AWS named when no endpoint is set."""
        if not self.endpoint_url:
            return f"AWS S3 ({self.region})"
        parts = urlsplit(self.endpoint_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (clients are thread-safe; sessions are not: hence the lock)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    # Short connect timeout and few retries: an outage surfaces in seconds as
                    # StorageUnavailable, and the task queue's own backoff takes over from there.
                    connect_timeout=3, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"},
                    # Path style works with every S3-compatible server and needs no wildcard DNS.
                    s3={"addressing_style": "path"},
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config,
                    aws_access_key_id=self._access_key, aws_secret_access_key=self._secret_key)
            return self._client

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        validate_key(key)
        with self._errors("write", key):
            # A single PUT is atomic in S3: the object appears whole or not at all.
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                   ContentType=content_type or _guess_type(key))
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        with self._errors("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            data: bytes = response["Body"].read()
            return data

    def exists(self, key: str) -> bool:
        validate_key(key)
        from botocore.exceptions import ClientError

        with self._errors("check", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND or _status(exc) == 404:
                    return False
                raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        return [obj.key for obj in self.list_objects(prefix)]

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)
        full = self._full(prefix) if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: list[ObjectInfo] = []
        with self._errors("list", prefix):
            # Paginated: a listing returns at most 1000 keys a page, and a bucket of batches holds millions.
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for obj in page.get("Contents", []):
                    # Keys ending in "/" are folder markers made by consoles and some servers, not objects.
                    if not obj["Key"].endswith("/"):
                        found.append(ObjectInfo(obj["Key"][strip:], int(obj.get("Size", 0)),
                                                 obj["LastModified"].astimezone(UTC)))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_many(self, keys: Iterable[str]) -> int:
        planned = [validate_key(key) for key in keys]
        # DeleteObjects takes at most 1000 keys a request; a missing key is no error (S3 deletes are idempotent).
        for start in range(0, len(planned), self.delete_batch_size):
            chunk = planned[start:start + self.delete_batch_size]
            with self._errors("delete", chunk[0]):
                response = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._full(key)} for key in chunk], "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                code = str(first.get("Code", ""))
                where = f"s3://{self.bucket}/{first.get('Key', '')}"
                kind = StorageAccessDenied if code in _DENIED else (
                    StorageUnavailable if code in _TRANSIENT else StorageError)
                raise kind(f"cannot delete {len(errors)} of {len(chunk)} objects, e.g. {where}: {code} "
                           f"{_one_line(str(first.get('Message', '')))}".rstrip())
        return len(planned)

    def uri(self, key: str) -> str:
        validate_prefix(key)
        return f"s3://{self.bucket}/{self._full(key)}" if key else self.url

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and first deployments)."""
        from botocore.exceptions import ClientError

        with self._errors("create bucket", None):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _code(exc) not in (_NOT_FOUND | {"NoSuchBucket"}) and _status(exc) != 404:
                    raise
            # us-east-1 is the one region that rejects an explicit LocationConstraint.
            extra = {} if self.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": self.region}}
            try:
                self.client.create_bucket(Bucket=self.bucket, **extra)
            except ClientError as exc:
                if _code(exc) != "BucketAlreadyOwnedByYou":  # another process created it meanwhile: fine
                    raise

    def _put_file(self, path: Path, key: str, content_type: str | None) -> None:
        validate_key(key)
        with self._errors("upload", key):
            # upload_file streams and switches to multipart for big files; the object appears on completion.
            self.client.upload_file(str(path), self.bucket, self._full(key),
                                    ExtraArgs={"ContentType": content_type or _guess_type(key)})

    def _get_to_file(self, key: str, fh: IO[bytes]) -> None:
        validate_key(key)
        with self._errors("download", key):
            self.client.download_fileobj(self.bucket, self._full(key), fh)

    @contextmanager
    def _errors(self, op: str, key: str | None) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            mapped = self._translate(exc, op, key)
            if mapped is None:
                raise
            raise mapped from exc

    def _translate(self, exc: BaseException, op: str, key: str | None) -> StorageError | None:
        """The storage error for a boto3/botocore/s3transfer exception; None for anything else."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
            SSLError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

        where = self.uri(key) if key is not None else self.url
        bucket = f"bucket {self.bucket!r} at {self.endpoint}"
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code == "NoSuchBucket":
                return StorageError(f"{bucket} does not exist: create it or fix the storage URL")
            if code in _NOT_FOUND or status == 404:
                return ObjectNotFound(f"no object at {where}")
            if code in _DENIED or status == 403:
                return StorageAccessDenied(f"access denied to {bucket} ({code or status}): check the "
                                           "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
            if code in _TRANSIENT or status >= 500:
                return StorageUnavailable(f"{self.endpoint} answered {status} {code} to {op} {where}; "
                                          "retry later")
            message = _one_line(str(exc.response.get("Error", {}).get("Message", "")))
            return StorageError(f"cannot {op} {where}: {code or status} {message}".rstrip())
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageAccessDenied(f"no S3 credentials for {bucket}: set AWS_ACCESS_KEY_ID and "
                                       "AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, SSLError):  # a certificate problem is configuration, not an outage
            return StorageError(f"TLS error talking to {self.endpoint}: {_one_line(str(exc))}")
        transient = BotoConnectionError | HTTPClientError | IncompleteReadError | TransferRetriesExceeded
        if isinstance(exc, transient):
            return StorageUnavailable(f"cannot reach S3 endpoint {self.endpoint} to {op} {where} "
                                      f"({type(exc).__name__}); retry later")
        if isinstance(exc, Boto3Error) and exc.__cause__ is not None:
            # boto3's upload/download wrappers hide the ClientError in __cause__; map that instead.
            return self._translate(exc.__cause__, op, key) or StorageError(f"cannot {op} {where}: {exc}")
        if isinstance(exc, BotoCoreError | Boto3Error):
            return StorageError(f"cannot {op} {where}: {_one_line(str(exc))}")
        return None

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.endpoint!r})"


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _guess_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _one_line(text: str) -> str:
    return " ".join(text.split())
