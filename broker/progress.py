"""Batch progress in Redis: one record per item, counts kept by a script so re-runs count once."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from broker.settings import redact_url
from tasks.errors import ServiceUnavailable
from tasks.schemas import ItemResult

_MARK_MANIFEST = """
if ARGV[2] ~= '' and (redis.call('HGET', KEYS[1], 'epoch') or '0') ~= ARGV[2] then return 0 end
local v = tonumber(redis.call('HGET', KEYS[1], 'in_manifest') or '0')
if tonumber(ARGV[1]) > v then redis.call('HSET', KEYS[1], 'in_manifest', ARGV[1]) end
return 0
"""

# A done item stays done: a late duplicate delivery that fails must not undo a finished image. Returns the counts,
# the manifest mark, and 1 when the item's status changed (0: a duplicate that changed nothing).
_RECORD = """
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local changed = 0
if not (prev == 'done' and ARGV[3] ~= 'done') then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  if prev ~= ARGV[3] then
    if prev then redis.call('HINCRBY', KEYS[3], prev, -1) end
    redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
    changed = 1
  end
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
local counts = redis.call('HMGET', KEYS[3], 'total', 'done', 'failed', 'cancelled', 'in_manifest')
table.insert(counts, changed)
return counts
"""


# The states a batch manifest records once nothing more will happen to the batch: retention deletes only these
# (a new terminal state, such as a cancelled batch's, belongs here too). "unknown": the batch's counts had left
# Redis when its last item wrote the manifest.
FINISHED_STATES = frozenset({"completed", "completed_with_failures", "cancelled", "unknown"})


@dataclass(frozen=True)
class BatchCounts:
    batch_id: str
    total: int
    done: int
    failed: int
    # How many finished items the batch manifest in storage covered when it was last written.
    in_manifest: int = 0
    # Raised each time failed items are reopened (retry, resubmission): a manifest written from an older epoch's
    # counts does not mark the batch's new outcome as written.
    epoch: int = 0
    # Items recorded `cancelled` (the batch was cancelled before they rendered, or while they did).
    cancelled: int = 0
    # From `record` only: whether that call changed the item's status (False: a duplicate that changed nothing).
    changed: bool = True

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def state(self) -> str:
        if self.total and self.finished >= self.total:
            if self.cancelled:
                return "cancelled"
            return "completed" if not self.failed else "completed_with_failures"
        return "running" if self.finished else "queued"


class BatchProgress:
    """Reads and writes batch progress; the client is made on first use, not at construction."""

    def __init__(self, redis_url: str, *, ttl: int = 14 * 24 * 3600, ride_out: float = 0.0) -> None:
        self.redis_url = redis_url
        self.ttl = ttl
        # Workers ride out a Redis restart of about this many seconds: commands retry with backoff (capped at
        # 2 s) instead of failing the job whose image is already written. 0: redis-py's default few retries.
        self.ride_out = ride_out
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30,
                health_check_interval=30, retry_on_timeout=True,
                **({"retry": Retry(ExponentialWithJitterBackoff(base=0.25, cap=2.0), int(self.ride_out))}
                   if self.ride_out > 0 else {}),
            )
        return self._client

    def ping(self) -> None:
        """Fail with one clear line when the broker cannot be reached."""
        try:
            self.client.ping()
        except redis.AuthenticationError as exc:
            raise ServiceUnavailable(f"the broker at {redact_url(self.redis_url)} refused the credentials "
                                     f"({exc})") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ServiceUnavailable(f"cannot reach the broker at {redact_url(self.redis_url)} ({exc})") from None

    def start(self, batch_id: str, total: int, meta: dict[str, Any]) -> None:
        """Register a batch; registering it again (a resubmission) keeps its progress."""
        key = batch_key(batch_id, "meta")
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "total", total)
        pipe.hsetnx(key, "created", time.time())
        pipe.hsetnx(key, "meta", json.dumps(meta, sort_keys=True))
        pipe.expire(key, self.ttl)
        pipe.execute()

    def exists(self, batch_id: str) -> bool:
        return bool(self.client.exists(batch_key(batch_id, "meta")))

    def record(self, result: ItemResult) -> BatchCounts:
        keys = [batch_key(result.batch_id, part) for part in ("items", "status", "meta")]
        args = [result.index, result.model_dump_json(), result.status, self.ttl]
        total, done, failed, cancelled, manifest, changed = self.client.eval(_RECORD, 3, *keys, *args)
        return BatchCounts(result.batch_id, int(total or 0), int(done or 0), int(failed or 0),
                           in_manifest=int(manifest or 0), cancelled=int(cancelled or 0), changed=bool(changed))

    def counts(self, batch_id: str) -> BatchCounts | None:
        fields = ("total", "done", "failed", "in_manifest", "epoch", "cancelled")
        total, done, failed, manifest, epoch, cancelled = self.client.hmget(batch_key(batch_id, "meta"), fields)
        if total is None:
            return None
        return BatchCounts(batch_id, int(total), int(done or 0), int(failed or 0), int(manifest or 0),
                           int(epoch or 0), int(cancelled or 0))

    def mark_manifest(self, batch_id: str, items: int, epoch: int | None = None) -> None:
        """The manifest now in storage covers `items` finished items (never lowered by a late writer).

        `epoch`: the epoch of the counts the manifest was written from; if items were reopened since (a retry),
        the manifest is already out of date and marks nothing.
        """
        key = batch_key(batch_id, "meta")
        self.client.eval(_MARK_MANIFEST, 1, key, items, "" if epoch is None else epoch)

    def status_of(self, batch_id: str) -> dict[int, str]:
        return {int(k): v for k, v in self.client.hgetall(batch_key(batch_id, "status")).items()}

    def items(self, batch_id: str) -> list[ItemResult]:
        raw = self.client.hgetall(batch_key(batch_id, "items"))
        return sorted((ItemResult.model_validate_json(v) for v in raw.values()), key=lambda r: r.index)

    def dead_letters(self, batch_id: str) -> dict[int, dict[str, Any]]:
        """The batch's dead letters (items whose worker process died on every attempt), by item index."""
        return {int(k): json.loads(v) for k, v in self.client.hgetall(dead_letter_key(batch_id)).items()}

    def batches_with_dead_letters(self) -> list[str]:
        """Every batch that has dead letters; SCAN, so a large Redis is never blocked the way KEYS would."""
        found = {batch_of_dead_letter_key(k) for k in self.client.scan_iter(match=DEAD_LETTERS_PATTERN, count=500)}
        return sorted(b for b in found if b)

    def meta(self, batch_id: str) -> dict[str, Any]:
        raw = self.client.hget(batch_key(batch_id, "meta"), "meta")
        return json.loads(raw) if raw else {}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


_BATCH = "darkroom:batch:"


def batch_key(batch_id: str, part: str) -> str:
    """A batch's Redis keys: meta (total, counts, manifest mark), items, status, dead (its dead letters)."""
    return f"{_BATCH}{batch_id}:{part}"


def dead_letter_key(batch_id: str) -> str:
    """The hash of a batch's dead letters; field: the item index, value: JSON (job, error, attempts, time)."""
    return batch_key(batch_id, "dead")


# Batch ids never hold ':' or glob characters (storage.keys.check_name), so this matches dead-letter keys only.
DEAD_LETTERS_PATTERN = dead_letter_key("*")


def batch_of_dead_letter_key(key: str) -> str | None:
    if not key.startswith(_BATCH) or not key.endswith(":dead"):
        return None
    return key[len(_BATCH):-len(":dead")] or None
