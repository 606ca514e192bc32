"""At-least-once delivery made safe: one running copy per item, and a dead letter for items that kill workers.

Redis hands a message to a second worker when the first has held it longer than the visibility timeout, and
requeues it when a worker dies. So an item may be delivered while another copy still runs. The item lock
(a `HeartbeatLock` refreshed while the job runs) lets only one copy run: a second delivery sees the lock and
is deferred, never run beside the first. A holder that died on this host frees its lock at once (its pid is
gone); one that died elsewhere frees it when its heartbeat stops (`LOCK_TTL`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import redis

from broker.locks import HeartbeatLock, item_lock_key
from broker.progress import dead_letter_key

LOCK_TTL = 60


class ItemLock(HeartbeatLock):
    """A HeartbeatLock whose token names its holder (host and pid), so a crashed holder can be recognised."""

    def __init__(self, client: redis.Redis, batch_id: str, index: int, *, ttl: int = LOCK_TTL) -> None:
        super().__init__(client, item_lock_key(batch_id, index), ttl=ttl)
        self.host = socket.gethostname()
        self.token = f"{self.host} {os.getpid()} {self.token}"

    def acquire(self) -> bool:
        if super().acquire():
            return True
        holder = self.client.get(self.key)
        if isinstance(holder, bytes):
            holder = holder.decode()
        if holder and _holder_is_dead(holder, self.host):
            # The holder crashed on this machine (SIGKILL, OOM): its lock would otherwise block for LOCK_TTL.
            self.delete_if_held_by(holder)
            return super().acquire()
        return False

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value


def _holder_is_dead(token: str, host: str) -> bool:
    parts = token.split(" ")
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    return not pid_alive(int(parts[1]))


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists here and is not a zombie (a killed child not yet reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        text = stat.read_text()
    except FileNotFoundError:
        return False
    except OSError:
        text = ""
    if text:
        return text.rpartition(")")[2].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def defer_seconds(visibility_timeout: int) -> float:
    """How long a second delivery waits before looking again: short, and well inside the visibility timeout."""
    return max(1.0, min(30.0, visibility_timeout / 4))


def record_dead_letter(client: redis.Redis, job: dict[str, Any], error: str, attempts: int,
                       ttl: int) -> dict[str, Any]:
    """Keep the job and why it was given up, in its batch's dead letters (broker.progress.dead_letter_key)."""
    entry = {"index": job.get("index"), "error": error, "attempts": attempts, "job": job, "at": time.time()}
    key = dead_letter_key(str(job.get("batch_id")))
    client.hset(key, str(job.get("index")), json.dumps(entry, sort_keys=True))
    client.expire(key, ttl)
    return entry


def dead_letters(client: redis.Redis, batch_id: str) -> dict[int, dict[str, Any]]:
    return {int(k): json.loads(v) for k, v in client.hgetall(dead_letter_key(batch_id)).items()}
