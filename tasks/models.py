"""What models storage holds, read the way a producer needs it: without any worker-side package."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from storage import ObjectNotFound, Storage, keys
from tasks.errors import InvalidRequest
from tasks.families import MANIFEST_FALLBACK


@dataclass(frozen=True)
class ModelRef:
    """One artifact of a model, pinned by fingerprint, with the defaults a request falls back to."""

    name: str
    precision: str
    fingerprint: str
    family: str
    width: int
    height: int
    scheduler: str


def list_artifacts(storage: Storage, name: str | None = None) -> list[dict[str, Any]]:
    """Every artifact manifest under models/ (or one model's), oldest first."""
    prefix = keys.model_prefix(name) if name else keys.models_prefix()
    manifests = [storage.get_json(k) for k in storage.list_keys(prefix) if keys.is_artifact_manifest_key(k)]
    return sorted(manifests, key=lambda m: (m.get("name", ""), m.get("created", "")))


def default_of(storage: Storage, name: str) -> dict[str, Any] | None:
    try:
        return storage.get_json(keys.model_default_key(name))
    except ObjectNotFound:
        return None


def resolve_model(storage: Storage, name: str, precision: str | None = None) -> ModelRef:
    """The artifact a new job of `name` uses: the model's default, or its newest of `precision`."""
    try:
        keys.check_name("model", name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="model") from None
    artifacts = list_artifacts(storage, name)
    if not artifacts:
        known = sorted({m["name"] for m in list_artifacts(storage)})
        hint = f" (known: {', '.join(known)})" if known else " (none converted yet: run `darkroom convert`)"
        raise InvalidRequest(f"unknown model {name!r}{hint}", field="model")
    chosen = None
    default = default_of(storage, name)
    if precision is None and default is not None:
        chosen = next((m for m in artifacts if m["fingerprint"] == default["fingerprint"]
                       and m["precision"] == default["precision"]), None)
    if chosen is None:
        candidates = [m for m in artifacts if precision is None or m["precision"] == precision]
        # Pinning a precision prefers artifacts that passed their gates (float ones have none).
        candidates.sort(key=lambda m: m.get("passed", True))
        if not candidates:
            have = ", ".join(sorted({m["precision"] for m in artifacts}))
            raise InvalidRequest(f"model {name!r} has no {precision} artifact (has: {have})", field="precision")
        chosen = candidates[-1]
    # A manifest written before artifacts recorded their family and defaults is an SD 1.x model's.
    d = {**MANIFEST_FALLBACK, **chosen.get("defaults", {})}
    return ModelRef(name=name, precision=chosen["precision"], fingerprint=chosen["fingerprint"],
                    family=chosen.get("family", "sd"), width=int(d["width"]), height=int(d["height"]),
                    scheduler=str(d["scheduler"]))


FLOAT_PRECISIONS = ("fp32", "fp16")


def find_artifact(storage: Storage, name: str, fingerprint: str) -> dict[str, Any]:
    """The artifact manifest of `name` with this fingerprint, whatever its precision."""
    for manifest in list_artifacts(storage, name):
        if manifest["fingerprint"] == fingerprint:
            return manifest
    raise InvalidRequest(f"model {name!r} has no artifact {fingerprint!r}", field="fingerprint")


def float_base(storage: Storage, name: str) -> ModelRef:
    """The float artifact a calibration starts from: the default if it is float, else the default's base."""
    ref = resolve_model(storage, name)
    if ref.precision in FLOAT_PRECISIONS:
        return ref
    manifest = find_artifact(storage, name, ref.fingerprint)
    base = manifest.get("base") or {}
    if base.get("precision") in FLOAT_PRECISIONS:
        return ModelRef(name, base["precision"], base["fingerprint"], ref.family, ref.width, ref.height, ref.scheduler)
    return resolve_model(storage, name, "fp16" if any(
        m["precision"] == "fp16" for m in list_artifacts(storage, name)) else "fp32")


def set_default(storage: Storage, name: str, precision: str, fingerprint: str, *, reason: str) -> dict[str, Any]:
    """Make an artifact the one new jobs of `name` use; the previous defaults are kept for rollback."""
    current = default_of(storage, name)
    history = list(current.get("history", [])) if current else []
    if current and (current["precision"], current["fingerprint"]) != (precision, fingerprint):
        history.append({k: current[k] for k in ("precision", "fingerprint", "reason", "since") if k in current})
    record = {"precision": precision, "fingerprint": fingerprint, "reason": reason,
              "since": datetime.now(UTC).isoformat(), "history": history[-20:]}
    storage.put_json(keys.model_default_key(name), record)
    return record


def rollback(storage: Storage, name: str) -> dict[str, Any]:
    """Go back to the previous default of `name`."""
    current = default_of(storage, name)
    if not current or not current.get("history"):
        raise InvalidRequest(f"model {name!r} has no earlier default to roll back to", field="name")
    *older, previous = current["history"]
    record = {"precision": previous["precision"], "fingerprint": previous["fingerprint"],
              "reason": f"rollback from {current['precision']} {current['fingerprint']}",
              "since": datetime.now(UTC).isoformat(), "history": older}
    storage.put_json(keys.model_default_key(name), record)
    return record
