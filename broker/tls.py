"""TLS to Redis: a `rediss://` URL, with its options in the query string, reaches kombu, Celery's result
backend and redis-py alike.

    rediss://darkroom-worker:PASSWORD@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/darkroom/ca.pem
        [&ssl_certfile=/etc/darkroom/client.pem&ssl_keyfile=/etc/darkroom/client.key]

redis-py (batch progress, locks) reads those query arguments itself; Celery and kombu get them here as
`broker_use_ssl` / `redis_backend_use_ssl`. Certificates are verified unless the URL says otherwise.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a `rediss://` URL (None for `redis://`); ValueError naming a bad option."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs={reqs!r} in the Redis URL: use required, optional or none")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    options.update({k: query[k] for k in _FILES if query.get(k)})
    return options
