"""A Redis lock that a long job keeps alive with a heartbeat, so a second delivery never runs beside it."""

from __future__ import annotations

import secrets
import threading
from types import TracebackType

import redis

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"


def item_lock_key(batch_id: str, index: int) -> str:
    """The lock a worker holds while it renders an item (a cancel leaves a held item to stop by itself)."""
    return f"darkroom:lock:item:{batch_id}:{index}"


class HeartbeatLock:
    """Held while the job runs; expires `ttl` seconds after its holder dies, refreshed every ttl/3 seconds."""

    def __init__(self, client: redis.Redis, key: str, *, ttl: int = 120) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.token, nx=True, ex=self.ttl):
            return False
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.key}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.client.eval(_REFRESH, 1, self.key, self.token, self.ttl)
            except redis.RedisError:
                pass  # the next beat tries again; the lock outlives a short broker hiccup

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.delete_if_held_by(self.token)
        except redis.RedisError:
            pass  # it expires on its own

    def delete_if_held_by(self, token: str) -> None:
        """Delete the lock only while `token` holds it: one atomic step, so a newer holder's lock is never lost."""
        self.client.eval(_RELEASE, 1, self.key, token)

    def __enter__(self) -> HeartbeatLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
