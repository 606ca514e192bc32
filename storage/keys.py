"""The one place object keys are spelled: every producer and worker builds keys through these functions.

Names that end up inside a key (batches, models, precisions) are checked here, so a request can never
address an object outside its own folder (`..`, `/`, control characters) nor collide with another layout.
"""

from __future__ import annotations

import re

# `\Z`, not `$`: `$` also matches before a trailing newline, which would let "name\n" through.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_FINGERPRINT = re.compile(r"[0-9a-f]{8,128}\Z")


class InvalidName(ValueError):
    """A batch, model or precision name that cannot be part of an object key."""


def check_name(kind: str, value: str) -> str:
    """`value` if it is a safe `kind` name (1-128 of `A-Za-z0-9._-`, no `..`); else InvalidName."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise InvalidName(
            f"invalid {kind} name {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


def check_index(index: int) -> int:
    # bool is an int subclass; True as an item index is always a bug upstream.
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise InvalidName(f"invalid item index {index!r}: must be a non-negative integer")
    return index


def check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
        raise InvalidName(f"invalid fingerprint {fingerprint!r}: must be 8-128 lowercase hex digits")
    return fingerprint


def _batch_prefix(batch_id: str) -> str:
    return f"images/{check_name('batch', batch_id)}/"


def image_key(batch_id: str, index: int) -> str:
    return f"{_batch_prefix(batch_id)}{check_index(index):05d}.png"


def item_record_key(batch_id: str, index: int) -> str:
    return f"{_batch_prefix(batch_id)}items/{check_index(index):05d}.json"


def batch_request_key(batch_id: str) -> str:
    return f"{_batch_prefix(batch_id)}request.json"


def batch_manifest_key(batch_id: str) -> str:
    return f"{_batch_prefix(batch_id)}manifest.json"


def contact_sheet_key(batch_id: str) -> str:
    return f"{_batch_prefix(batch_id)}contact-sheet.png"


def models_prefix() -> str:
    return "models/"


def check_precision(precision: str) -> str:
    check_name("precision", precision)
    # A precision is a folder beside the model's `default.json`: a dotted name could collide with that file.
    if "." in precision:
        raise InvalidName(f"invalid precision name {precision!r}: no '.' (e.g. 'fp32', 'fp16', 'int8')")
    return precision


def model_artifact_prefix(name: str, precision: str, fingerprint: str) -> str:
    return (f"{models_prefix()}{check_name('model', name)}/{check_precision(precision)}/"
            f"{check_fingerprint(fingerprint)}/")


def model_artifact_manifest_key(name: str, precision: str, fingerprint: str) -> str:
    return model_artifact_prefix(name, precision, fingerprint) + "manifest.json"


def model_default_key(name: str) -> str:
    return f"{models_prefix()}{check_name('model', name)}/default.json"


def model_report_key(name: str, precision: str, fingerprint: str) -> str:
    return model_artifact_prefix(name, precision, fingerprint) + "report.json"


def calibration_runs_prefix(name: str) -> str:
    """Where every calibration run of a model leaves its record (done, skipped or failed)."""
    return f"{models_prefix()}{check_name('model', name)}/calibrations/"


def calibration_run_key(name: str, stamp: str) -> str:
    return f"{calibration_runs_prefix(name)}{check_name('calibration run', stamp)}.json"
