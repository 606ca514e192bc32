"""Retention: what `darkroom gc` and the scheduled `darkroom.gc` task delete, and in which order.

Three kinds of leftovers pile up, and only these are ever deleted:
- finished batches older than the cutoff: the whole images/<batch>/ folder (images, item records, request,
  manifest, contact sheet, adherence). Finished: the manifest records a finished state and Redis, if it still
  knows the batch, agrees. A batch without a manifest is running (or was never finished) and is never touched.
- INT8 candidates older than the cutoff that were never promoted: models/<name>/int8/<fingerprint>/ that is
  neither the model's default nor in its default history (kept for rollback), nor pinned by an unfinished batch,
  nor the newest INT8 artifact (what a batch pinned to `--precision int8` gets).
- compiled blobs (ov-cache/) of artifacts that are no longer in storage.
Float artifacts, defaults, calibration records and uploaded control or init images are never deleted.

It lives in `broker`, below the command (`darkroom`) and the task (`workers`) alike: whether a batch still runs is
Redis's to say.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from broker.progress import FINISHED_STATES, BatchProgress
from storage import Storage, StorageError, StorageUnavailable, keys
from storage.base import ObjectInfo
from tasks.errors import InvalidRequest
from tasks.models import default_of, resolve_model

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

_DURATION = re.compile(r"(?:(\d{1,6})d)?(?:(\d{1,8})h)?(?:(\d{1,9})m)?(?:(\d{1,11})s)?\Z")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def parse_duration(text: str, *, field: str = "--older-than") -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, or several in that order (`1d12h`); InvalidRequest naming `text` otherwise."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise InvalidRequest(f"{text!r} is not a duration: give numbers with units d, h, m or s, largest first, "
                             "e.g. 30d, 12h, 90m, 45s or 1d12h", field=field)
    days, hours, minutes, seconds = (int(group or 0) for group in match.groups())
    duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if duration <= timedelta(0):
        # Zero would delete every finished batch at once: far more likely a typo than a wish.
        raise InvalidRequest(f"{text!r} is no time at all: give a duration above zero, e.g. 30d", field=field)
    return duration


def format_duration(duration: timedelta) -> str:
    """The shortest `1d12h`-style spelling of a duration (whole seconds)."""
    left, parts = int(duration.total_seconds()), []
    for unit, size in _UNITS:
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class GcCategory:
    """What one kind of leftover freed (or would free): the units removed, and their objects and bytes."""

    units: tuple[str, ...] = ()  # batch ids; `name/int8/fingerprint`; compiled-blob folders
    objects: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class GcReport:
    """One run of retention: the cutoff, and per category what was (or, in a dry run, would be) deleted."""

    cutoff: datetime
    older_than: timedelta
    dry_run: bool
    batches: GcCategory
    int8_candidates: GcCategory
    compiled_blobs: GcCategory

    @property
    def categories(self) -> dict[str, GcCategory]:
        return {"batches": self.batches, "int8_candidates": self.int8_candidates,
                "compiled_blobs": self.compiled_blobs}

    @property
    def objects(self) -> int:
        return sum(c.objects for c in self.categories.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.categories.values())

    def to_dict(self, *, units: bool = True) -> dict[str, Any]:
        """The report as JSON; `units=False` leaves out the names of what went (a task result stays small)."""
        return {"cutoff": self.cutoff.isoformat(), "older_than": format_duration(self.older_than),
                "dry_run": self.dry_run, "objects": self.objects, "bytes": self.bytes,
                "categories": {name: {"count": len(c.units), "objects": c.objects, "bytes": c.bytes,
                                      **({"units": list(c.units)} if units else {})}
                               for name, c in self.categories.items()}}


@dataclass(frozen=True)
class _Doomed:
    """One unit to delete: `first` (its manifest, if any) before every other object of it."""

    unit: str
    first: str | None
    objects: tuple[ObjectInfo, ...]


Artifact = tuple[str, str, str]  # (name, precision, fingerprint)


def collect_garbage(storage: Storage, progress: BatchProgress, *, older_than: timedelta, dry_run: bool,
                    now: datetime | None = None) -> GcReport:
    """Delete (or with `dry_run`, only count) what retention deletes, judged against `now - older_than`."""
    # 1. The cutoff. An absurdly long duration reaches past year 1: then nothing is old enough.
    now = now or datetime.now(UTC)
    try:
        cutoff = now - older_than
    except OverflowError:
        cutoff = datetime.min.replace(tzinfo=UTC)
    # 2. One paginated listing per top folder: sizes and times come with it, so only manifests are read. Blobs
    #    are listed before models: a blob is uploaded after its artifact's manifest, so every listed blob's
    #    artifact is in the models listing, and a model converted meanwhile never has its new blobs taken for
    #    orphans.
    blobs = _group(storage.list_objects(keys.compiled_blobs_prefix()), keys.compiled_blob_folder_of)
    batches = _group(storage.list_objects(keys.images_prefix()), keys.batch_of)
    artifacts = _group(storage.list_objects(keys.models_prefix()), keys.artifact_of)
    # 3. What goes: old finished batches, then old unpromoted INT8 candidates no unfinished batch pins, then the
    #    compiled blobs of every artifact that is gone or going.
    old_batches, unfinished = _plan_batches(storage, progress, batches, cutoff)
    old_int8 = _plan_int8(storage, artifacts, cutoff, lambda: _pinned(storage, batches, unfinished))
    going = {artifact for artifact, _ in old_int8}
    live = {a for a, objs in artifacts.items()
            if a not in going and any(o.key == keys.model_artifact_manifest_key(*a) for o in objs)}
    orphans = [_Doomed(folder, None, tuple(objs)) for (folder, artifact), objs in sorted(blobs.items())
               if artifact not in live]
    plan = {"batches": old_batches, "int8_candidates": [d for _, d in old_int8], "compiled_blobs": orphans}
    # 4. Delete, unless this is a dry run (which reports exactly the same).
    if not dry_run:
        for name, doomed in plan.items():
            for unit in doomed:
                _delete(storage, unit, batch=name == "batches")
                # One line per unit: the log is the record of what retention removed.
                log.info("gc: deleted %s %s (%d objects, %d bytes)", name, unit.unit, len(unit.objects),
                         sum(o.size for o in unit.objects))
    report = GcReport(cutoff, older_than, dry_run, **{name: _tally(doomed) for name, doomed in plan.items()})
    log.info("gc%s (older than %s): %d objects, %d bytes", " dry run" if dry_run else "",
             format_duration(older_than), report.objects, report.bytes)
    return report


def run_gc_job(payload: object, storage: Storage, progress: BatchProgress) -> dict[str, Any]:
    """The scheduled task's job: `{"older_than": "30d", "dry_run": false}`; InvalidRequest for anything else."""
    if not isinstance(payload, dict) or not isinstance(payload.get("older_than"), str):
        raise InvalidRequest("a gc job needs older_than, a duration such as '30d'", field="older_than")
    dry_run = payload.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest(f"{dry_run!r} is not true or false", field="dry_run")
    older_than = parse_duration(payload["older_than"], field="older_than")
    report = collect_garbage(storage, progress, older_than=older_than, dry_run=dry_run)
    return {"status": "done", **report.to_dict(units=False)}  # the names went to the worker's log


def _group(listing: Iterable[ObjectInfo], unit_of: Callable[[str], K]) -> dict[K, list[ObjectInfo]]:
    """Objects by the unit their key belongs to; keys outside the layout belong to none and are left alone."""
    groups: dict[K, list[ObjectInfo]] = defaultdict(list)
    for obj in listing:
        try:
            groups[unit_of(obj.key)].append(obj)
        except keys.InvalidName:
            continue
    return dict(groups)


def _plan_batches(storage: Storage, progress: BatchProgress, batches: dict[str, list[ObjectInfo]],
                  cutoff: datetime) -> tuple[list[_Doomed], list[str]]:
    """(old finished batches, unfinished batches). Every manifest is read: its `finished` time is the one that
    counts, since copying a bucket resets every object's time but not what the manifest says."""
    doomed: list[_Doomed] = []
    unfinished: list[str] = []
    for batch_id, objs in sorted(batches.items()):
        present = {o.key for o in objs}
        manifest_key = keys.batch_manifest_key(batch_id)
        if manifest_key not in present:
            if keys.batch_gc_marker_key(batch_id) in present:
                # A collection that stopped after deleting the manifest: this batch was judged already; finish it.
                doomed.append(_Doomed(batch_id, None, tuple(objs)))
            else:
                unfinished.append(batch_id)  # running, or never finished: never touched
            continue
        manifest = _read_json(storage, manifest_key)
        counts = progress.counts(batch_id) if isinstance(manifest, dict) else None
        if (not isinstance(manifest, dict) or manifest.get("state") not in FINISHED_STATES
                or (counts is not None and counts.state not in FINISHED_STATES)):
            # Redis may still count it even with a finished manifest: a resubmission of the batch is running.
            unfinished.append(batch_id)
            continue
        finished = _timestamp(manifest.get("finished")) or max(o.modified for o in objs)
        if finished < cutoff:
            doomed.append(_Doomed(batch_id, manifest_key, tuple(objs)))
    return doomed, unfinished


def _plan_int8(storage: Storage, artifacts: dict[Artifact, list[ObjectInfo]], cutoff: datetime,
               pinned: Callable[[], set[Artifact]]) -> list[tuple[Artifact, _Doomed]]:
    """Old INT8 artifacts that are not the default, not in its history, not what new batches resolve to and not
    pinned by an unfinished batch."""
    kept: dict[str, set[tuple[str, str]] | None] = {}
    candidates: list[tuple[Artifact, _Doomed]] = []
    for artifact, objs in sorted(artifacts.items()):
        name, precision, fingerprint = artifact
        if precision != "int8":
            continue  # float artifacts are never retention's: every calibration starts from one
        if name not in kept:
            kept[name] = _kept_artifacts(storage, name)
        protected = kept[name]
        if protected is None or (precision, fingerprint) in protected:
            continue
        manifest_key = keys.model_artifact_manifest_key(*artifact)
        has_manifest = any(o.key == manifest_key for o in objs)
        manifest = _read_json(storage, manifest_key) if has_manifest else None
        created = _timestamp(manifest.get("created")) if isinstance(manifest, dict) else None
        # No manifest: a calibration still uploading (recent files) or one that died halfway (old files).
        if (created or max(o.modified for o in objs)) < cutoff:
            first = manifest_key if has_manifest else None
            candidates.append((artifact, _Doomed("/".join(artifact), first, tuple(objs))))
    if not candidates:
        return []
    in_use = pinned()
    return [(artifact, doomed) for artifact, doomed in candidates if artifact not in in_use]


def _kept_artifacts(storage: Storage, name: str) -> set[tuple[str, str]] | None:
    """(precision, fingerprint) of a model's default, its default history, and what new batches of it resolve to;
    None if that cannot be read (then every one of its INT8 artifacts is kept)."""
    try:
        default = default_of(storage, name)
        kept = {(str(entry.get("precision")), str(entry.get("fingerprint")))
                for entry in (default, *default.get("history", [])) if isinstance(entry, dict)} if default else set()
        # What a new batch gets (without a default record: the newest artifact), and what one pinned to
        # `--precision int8` gets (the newest that passed): deleting either would change what users are served.
        for precision in (None, "int8"):
            try:
                ref = resolve_model(storage, name, precision)
            except InvalidRequest:
                continue  # no artifact with a manifest (of that precision): nothing resolves to one
            kept.add((ref.precision, ref.fingerprint))
        return kept
    except StorageUnavailable:
        raise
    except (StorageError, AttributeError, KeyError, TypeError) as exc:
        log.warning("gc: keeping every INT8 artifact of %s: cannot read what it uses (%s)", name, exc)
        return None


def _pinned(storage: Storage, batches: dict[str, list[ObjectInfo]], unfinished: list[str]) -> set[Artifact]:
    """The artifacts unfinished batches were submitted with: their jobs may still load them."""
    pinned: set[Artifact] = set()
    for batch_id in unfinished:
        request_key = keys.batch_request_key(batch_id)
        if not any(o.key == request_key for o in batches[batch_id]):
            continue
        request = _read_json(storage, request_key)
        if isinstance(request, dict):
            pinned.add((str(request.get("model")), str(request.get("precision")), str(request.get("fingerprint"))))
    return pinned


def _delete(storage: Storage, doomed: _Doomed, *, batch: bool) -> None:
    """Delete one unit, its manifest first.

    A reader that finds a manifest expects every object it lists, so the manifest goes before anything it lists:
    a gc stopped halfway leaves a folder without a manifest, never a manifest pointing at missing images. A batch
    folder without a manifest looks running, so a batch is first marked as being collected, and the marker goes
    last: the next run finishes what this one began.
    """
    marker = keys.batch_gc_marker_key(doomed.unit) if batch else None
    if marker is not None and doomed.first is not None:
        storage.put_json(marker, {"batch_id": doomed.unit, "since": datetime.now(UTC).isoformat()})
    if doomed.first is not None:
        storage.delete(doomed.first)
    storage.delete_many([o.key for o in doomed.objects if o.key not in (doomed.first, marker)])
    if marker is not None:
        storage.delete(marker)  # alone and last: a bulk delete gives no order among its keys


def _tally(doomed: list[_Doomed]) -> GcCategory:
    return GcCategory(tuple(d.unit for d in doomed), sum(len(d.objects) for d in doomed),
                      sum(o.size for d in doomed for o in d.objects))


def _read_json(storage: Storage, key: str) -> Any:
    """The object's JSON, or None if it is gone or unreadable (then it is kept: never delete what cannot be judged).
    An unreachable store is an error, not a verdict."""
    try:
        return storage.get_json(key)
    except StorageUnavailable:
        raise
    except StorageError as exc:
        log.warning("gc: cannot read %s: %s", storage.uri(key), exc)
        return None


def _timestamp(value: object) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime (a naive one is taken as UTC); None if absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
