"""Steering a running batch in Redis: the cancel and pause marks workers read, and the items a pause parked.

- cancel: a mark that stays for the batch's life; a worker that receives an item of a cancelled batch records it
  `cancelled` without loading a model, and a running item stops at its next denoising step.
- pause: a mark a worker checks before rendering; an item of a paused batch is parked (its index kept in a set)
  and acknowledged, so the worker goes on to the next batch's item. Resume clears the mark and hands back the
  parked indexes, to be sent again. Parking and resuming are each one Lua script: an item is either parked
  before a resume (and sent again by it) or sees the batch running (and renders); never lost in between.
"""

from __future__ import annotations

import redis

# Batch states a producer can set; the batch's own counts say queued, running or finished.
CANCELLED = "cancelled"
PAUSED = "paused"

# KEYS: steer mark, parked set; ARGV: index, ttl. 1: parked (paused); 2: cancelled; 0: go ahead.
_PARK = """
local mark = redis.call('GET', KEYS[1])
if mark == 'cancelled' then return 2 end
if mark == 'paused' then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# KEYS: steer mark, parked set. The parked indexes if the batch was paused (and now runs), else nil.
_RESUME = """
if redis.call('GET', KEYS[1]) ~= 'paused' then return false end
redis.call('DEL', KEYS[1])
local parked = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
return parked
"""

# KEYS: steer mark, parked set; ARGV: mark, ttl. The mark that was there before. Cancel wins over pause.
_MARK = """
local before = redis.call('GET', KEYS[1])
if before == 'cancelled' then return before end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[1] == 'cancelled' then redis.call('DEL', KEYS[2]) end
return before
"""


def steer_key(batch_id: str) -> str:
    return f"darkroom:batch:{batch_id}:steer"


def parked_key(batch_id: str) -> str:
    return f"darkroom:batch:{batch_id}:parked"


class BatchSteering:
    """The cancel/pause marks of batches, on a Redis client the caller owns (a producer's or a worker's)."""

    def __init__(self, client: redis.Redis, *, ttl: int = 14 * 24 * 3600) -> None:
        self.client = client
        self.ttl = ttl

    def mark(self, batch_id: str) -> str | None:
        """CANCELLED, PAUSED or None (running as submitted)."""
        value = self.client.get(steer_key(batch_id))
        return value.decode() if isinstance(value, bytes) else value

    def is_cancelled(self, batch_id: str) -> bool:
        """Checked by a running item once per denoising step: one GET."""
        return self.mark(batch_id) == CANCELLED

    def set(self, batch_id: str, mark: str) -> str | None:
        """Set CANCELLED or PAUSED; returns the mark before. A cancelled batch stays cancelled."""
        if mark not in (CANCELLED, PAUSED):
            raise ValueError(f"unknown batch mark {mark!r}")
        before = self.client.eval(_MARK, 2, steer_key(batch_id), parked_key(batch_id), mark, self.ttl)
        return before.decode() if isinstance(before, bytes) else before

    def park_or_go(self, batch_id: str, index: int) -> str | None:
        """For a worker about to render item `index`: CANCELLED, PAUSED (the item is now parked) or None (go)."""
        outcome = int(self.client.eval(_PARK, 2, steer_key(batch_id), parked_key(batch_id), index, self.ttl))
        return {0: None, 1: PAUSED, 2: CANCELLED}[outcome]

    def resume(self, batch_id: str) -> list[int] | None:
        """Clear a pause; the indexes it parked (to send again), or None when the batch was not paused."""
        parked = self.client.eval(_RESUME, 2, steer_key(batch_id), parked_key(batch_id))
        if parked is None:
            return None
        return sorted(int(i) for i in parked)

    def parked(self, batch_id: str) -> list[int]:
        return sorted(int(i) for i in self.client.smembers(parked_key(batch_id)))
