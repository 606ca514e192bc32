"""A batch's request record in storage (`images/<batch>/request.json`, written by `submit`): the jobs to send again
and the queue to send them to, for resume, reprioritize and retry. Read once per operation."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from storage import ObjectNotFound, Storage, keys
from tasks.errors import InvalidRequest
from tasks.names import DEFAULT_PRIORITY, generate_queue, priority_queue
from tasks.schemas import GenerateJob, invalid_from_validation


def request_record(storage: Storage, batch_id: str, *, known: bool = True) -> dict[str, Any]:
    """The batch's request record; InvalidRequest naming the batch when it is missing or malformed. `known`: the
    broker knows the batch (then a missing record is named as such, else the batch is unknown)."""
    key = keys.batch_request_key(batch_id)
    try:
        record = storage.get_json(key)
    except ObjectNotFound:
        if known:
            raise InvalidRequest(f"batch {batch_id!r} has no request record in storage ({key}), so its jobs "
                                 "cannot be sent again", field="batch") from None
        raise InvalidRequest(f"unknown batch {batch_id!r}", field="batch") from None
    if not isinstance(record, dict):
        raise InvalidRequest(f"the request record of batch {batch_id!r} in storage is malformed", field="batch")
    return record


def record_jobs(batch_id: str, record: dict[str, Any]) -> dict[int, GenerateJob]:
    """The batch's jobs by item index, as its producer recorded them (the truth, whatever Redis lost)."""
    try:
        jobs = [GenerateJob.model_validate(item) for item in record.get("items") or []]
    except ValidationError as exc:  # a record edited or damaged in storage: one line, nothing sent
        raise InvalidRequest(f"the request record of batch {batch_id!r} in storage is malformed: "
                             f"{invalid_from_validation(exc)}", field="batch") from None
    return {job.index: job for job in jobs if job.batch_id == batch_id}


def record_queue(record: dict[str, Any], jobs: list[GenerateJob]) -> str:
    """The queue of the batch's priority beside the one it was submitted to (records without one: the device's)."""
    queue = record.get("queue") or generate_queue(jobs[0].device)
    return priority_queue(queue, record.get("priority", DEFAULT_PRIORITY))
