"""Reopening a batch's failed items for new attempts (retry, resubmission), atomically in Redis.

A failed item counts as finished, so a batch whose items all ended reads done + failed = total and its manifest
mark covers every item. Before a failed item is sent again, one script makes it unfinished: its status and result
go, the failed count drops, its dead letter goes (the new attempt is the item's fate now), the manifest mark is
cleared and the batch's epoch raised. Then a waiting producer waits for the new attempts, and the worker that
finishes the batch again rewrites the manifest. The check that the batch has finished and the reopening are one
script, so two retries at once cannot both send the same items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.progress import BatchProgress, batch_key, dead_letter_key

# KEYS: meta, status, items, dead. ARGV: reopen failed items without a dead letter ('1'/'0'), reopen dead-lettered
# items ('1'/'0'), refuse a batch that has unfinished items ('1'/'0'), the batch's time to live (seconds).
_REOPEN = """
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return cjson.encode({state = 'unknown'}) end
total = tonumber(total)
local finished = tonumber(redis.call('HGET', KEYS[1], 'done') or '0')
  + tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
  + tonumber(redis.call('HGET', KEYS[1], 'cancelled') or '0')
if ARGV[3] == '1' and finished < total then
  return cjson.encode({state = 'running', total = total, unfinished = total - finished})
end
local statuses = redis.call('HGETALL', KEYS[2])
local reopened = {}
for i = 1, #statuses, 2 do
  local index, status = statuses[i], statuses[i + 1]
  local letter = redis.call('HGET', KEYS[4], index)
  if status == 'failed' then
    if (letter and ARGV[2] == '1') or (not letter and ARGV[1] == '1') then
      table.insert(reopened, {index = index, item = redis.call('HGET', KEYS[3], index), dead = letter})
    end
  elseif letter and ARGV[2] == '1' then
    -- A dead letter of an item another delivery finished: nothing to retry, and no longer true.
    redis.call('HDEL', KEYS[4], index)
  end
end
for _, entry in ipairs(reopened) do
  redis.call('HDEL', KEYS[2], entry.index)
  redis.call('HDEL', KEYS[3], entry.index)
  redis.call('HDEL', KEYS[4], entry.index)
  redis.call('HINCRBY', KEYS[1], 'failed', -1)
end
local in_manifest = redis.call('HGET', KEYS[1], 'in_manifest') or '0'
if #reopened > 0 then
  redis.call('HSET', KEYS[1], 'in_manifest', 0)
  redis.call('HINCRBY', KEYS[1], 'epoch', 1)
  -- The new attempts get the batch's full time to live, as a new batch would: it must not expire under them.
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
end
return cjson.encode({state = 'reopened', total = total, in_manifest = in_manifest, items = reopened})
"""

# KEYS: meta, status, items, dead. ARGV: the entries _REOPEN returned (JSON), the manifest mark it cleared.
# An entry is put back only while its item is still unfinished: an attempt that ended meanwhile wins.
_RESTORE = """
local entries = cjson.decode(ARGV[1])
local restored = 0
for _, entry in ipairs(entries) do
  if redis.call('HEXISTS', KEYS[2], entry.index) == 0 then
    redis.call('HSET', KEYS[2], entry.index, 'failed')
    if entry.item then redis.call('HSET', KEYS[3], entry.index, entry.item) end
    if entry.dead then redis.call('HSET', KEYS[4], entry.index, entry.dead) end
    redis.call('HINCRBY', KEYS[1], 'failed', 1)
    restored = restored + 1
  end
end
if restored == #entries then redis.call('HSET', KEYS[1], 'in_manifest', ARGV[2]) end
-- A hash emptied by the reopening was deleted, and comes back without the batch's expiry: give it back.
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ttl) end end
return restored
"""


@dataclass(frozen=True)
class ReopenedItem:
    index: int
    result: str | None  # the failed attempt's ItemResult (JSON), kept to put back if sending fails
    dead_letter: str | None  # its dead letter (JSON), if it had one


@dataclass(frozen=True)
class Reopened:
    """What reopening found: `state` is unknown (no such batch in Redis), running (refused) or reopened."""

    batch_id: str
    state: str
    total: int = 0
    unfinished: int = 0
    items: tuple[ReopenedItem, ...] = ()
    in_manifest: int = 0

    @property
    def indices(self) -> list[int]:
        return [item.index for item in self.items]


def _keys(batch_id: str) -> list[str]:
    return [batch_key(batch_id, "meta"), batch_key(batch_id, "status"), batch_key(batch_id, "items"),
            dead_letter_key(batch_id)]


def reopen_failed(progress: BatchProgress, batch_id: str, *, failed: bool = True, dead: bool = True,
                  require_finished: bool = True) -> Reopened:
    """Make the batch's failed items (`failed`: those without a dead letter; `dead`: the dead-lettered ones)
    unfinished again, so new attempts can be sent. `require_finished`: change nothing unless every item has ended.
    With `dead`, a dead letter whose item is done (another delivery finished it) is dropped too.
    """
    flags = ["1" if flag else "0" for flag in (failed, dead, require_finished)]
    answer: dict[str, Any] = json.loads(progress.client.eval(_REOPEN, 4, *_keys(batch_id), *flags, progress.ttl))
    # cjson spells an empty list as {}.
    items = sorted((ReopenedItem(int(e["index"]), e.get("item") or None, e.get("dead") or None)
                    for e in (answer.get("items") or [])), key=lambda i: i.index)
    return Reopened(batch_id, answer["state"], int(answer.get("total", 0)), int(answer.get("unfinished", 0)),
                    tuple(items), int(answer.get("in_manifest", 0)))


def restore_failed(progress: BatchProgress, reopened: Reopened) -> int:
    """Undo `reopen_failed` for items whose new attempt could not be sent; how many were put back."""
    if not reopened.items:
        return 0
    entries = [{"index": str(i.index), "item": i.result or False, "dead": i.dead_letter or False}
               for i in reopened.items]
    return int(progress.client.eval(_RESTORE, 4, *_keys(reopened.batch_id), json.dumps(entries),
                                    reopened.in_manifest))
