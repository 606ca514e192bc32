"""Settings of a darkroom process, read from the environment (flags override them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Spelled once, by the storage layer that opens it (storage sits below broker).
from storage import DEFAULT_STORAGE_URL

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# A worker serves Prometheus metrics when its environment names a port (`darkroom worker --metrics-port` sets it).
METRICS_PORT_ENV = "DARKROOM_METRICS_PORT"
METRICS_ADDRESS_ENV = "DARKROOM_METRICS_ADDRESS"


@dataclass(frozen=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None
    storage_url: str = DEFAULT_STORAGE_URL
    cache_dir: Path = Path.home() / ".cache" / "darkroom"
    # How long a delivered, unacknowledged job waits before Redis hands it to another worker: the recovery bound
    # after a whole worker dies. Jobs may run longer: a second delivery finds the item's heartbeat lock and is
    # deferred, never run beside the first (workers/runtime/delivery.py, README "Guarantees").
    visibility_timeout: int = 300
    # OpenVINO INFERENCE_PRECISION_HINT for workers: "" keeps the device default (bf16 on AMX CPUs).
    inference_precision: str = ""
    max_retries: int = 5
    # How long batch progress stays in Redis; the manifest in storage stays for good.
    progress_ttl: int = 14 * 24 * 3600
    # Mirror OpenVINO's compiled blobs to storage so a new worker with the same device kind starts warm.
    share_compiled_cache: bool = True

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        settings = cls(
            broker_url=env.get("DARKROOM_BROKER_URL", DEFAULT_BROKER_URL),
            result_backend=env.get("DARKROOM_RESULT_BACKEND") or None,
            storage_url=env.get("DARKROOM_STORAGE_URL", DEFAULT_STORAGE_URL),
            cache_dir=Path(env.get("DARKROOM_CACHE_DIR", str(cls.cache_dir))).expanduser(),
            visibility_timeout=int(env.get("DARKROOM_VISIBILITY_TIMEOUT", cls.visibility_timeout)),
            inference_precision=env.get("DARKROOM_INFERENCE_PRECISION", ""),
            max_retries=int(env.get("DARKROOM_MAX_RETRIES", cls.max_retries)),
            share_compiled_cache=env.get("DARKROOM_SHARE_COMPILED_CACHE", "1").strip().lower()
            not in ("0", "false", "no", "off"),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    def as_env(self) -> dict[str, str]:
        """The environment that gives a child process these settings."""
        env = {
            "DARKROOM_BROKER_URL": self.broker_url,
            "DARKROOM_STORAGE_URL": self.storage_url,
            "DARKROOM_CACHE_DIR": str(self.cache_dir),
            "DARKROOM_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "DARKROOM_INFERENCE_PRECISION": self.inference_precision,
            "DARKROOM_MAX_RETRIES": str(self.max_retries),
            "DARKROOM_SHARE_COMPILED_CACHE": "1" if self.share_compiled_cache else "0",
        }
        if self.result_backend:
            env["DARKROOM_RESULT_BACKEND"] = self.result_backend
        return env


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
