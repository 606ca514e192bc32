"""Storage errors, in the two kinds callers act on: retry later, or tell the user.

Only standard-library types here, so `tasks` can catch them without importing boto3.
"""

from __future__ import annotations


class StorageError(Exception):
    """Reading or writing objects went wrong; a retry will not help unless a subclass says so."""


class ObjectNotFound(StorageError):
    """The key holds no object."""


class StorageUnavailable(StorageError):
    """Transient: the store cannot be reached, timed out, answered 5xx or throttled. Retry with backoff."""


class StorageAccessDenied(StorageError):
    """Credentials were refused (or are missing). The message names endpoint and bucket, never a secret."""
