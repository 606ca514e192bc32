"""The one place object keys are spelled: every producer and worker builds keys through these functions.

Names that end up inside a key (batches, models, precisions) are checked here, so a request can never
address an object outside its own folder (`..`, `/`, control characters) nor collide with another layout.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

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


def relative_key(prefix: str, key: str) -> str:
    """The rest of `key` after the folder `prefix` (the name download_prefix gives its local file).

    InvalidName when `key` is not inside `prefix`, so a caller never mistakes another folder's object for its own.
    """
    if not prefix.endswith("/") or not key.startswith(prefix) or key == prefix:
        raise InvalidName(f"{key!r} is not an object inside the folder {prefix!r}")
    return key[len(prefix):]


_IMAGES = "images/"


def images_prefix() -> str:
    """The folder of every batch's folder."""
    return _IMAGES


def batch_images_prefix(batch_id: str) -> str:
    """The folder of one batch: its images, item records, request, manifest and contact sheet."""
    return f"{_IMAGES}{check_name('batch', batch_id)}/"


def batch_of(key: str) -> str:
    """The batch whose folder holds `key` (images/<batch>/...); InvalidName for a key outside every batch's."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) >= 3 and parts[0] + "/" == _IMAGES and parts[-1]:
        try:
            return check_name("batch", parts[1])
        except InvalidName:
            pass
    raise InvalidName(f"{key!r} is not an object of a batch (expected {_IMAGES}<batch>/...)")


def image_key(batch_id: str, index: int) -> str:
    return f"{batch_images_prefix(batch_id)}{check_index(index):05d}.png"


def item_record_key(batch_id: str, index: int) -> str:
    return f"{batch_images_prefix(batch_id)}items/{check_index(index):05d}.json"


def batch_request_key(batch_id: str) -> str:
    return f"{batch_images_prefix(batch_id)}request.json"


def batch_manifest_key(batch_id: str) -> str:
    return f"{batch_images_prefix(batch_id)}manifest.json"


def contact_sheet_key(batch_id: str) -> str:
    return f"{batch_images_prefix(batch_id)}contact-sheet.png"


def batch_adherence_key(batch_id: str) -> str:
    """`darkroom score`'s prompt-adherence result, beside the batch manifest."""
    return f"{batch_images_prefix(batch_id)}adherence.json"


def batch_gc_marker_key(batch_id: str) -> str:
    """Written by retention before it deletes a batch's manifest, deleted last: a folder holding it and no manifest
    is a collection that stopped halfway, not a running batch."""
    return f"{batch_images_prefix(batch_id)}gc-in-progress.json"


def models_prefix() -> str:
    return "models/"


def model_prefix(name: str) -> str:
    """The folder of one model: its artifacts (one folder per precision), default and calibration records."""
    return f"{models_prefix()}{check_name('model', name)}/"


def check_precision(precision: str) -> str:
    check_name("precision", precision)
    # A precision is a folder beside the model's `default.json`: a dotted name could collide with that file.
    if "." in precision:
        raise InvalidName(f"invalid precision name {precision!r}: no '.' (e.g. 'fp32', 'fp16', 'int8')")
    return precision


# File names inside an artifact folder, in storage and in a worker's local copy of it alike (the copy keeps
# the key's layout, so a reader of the local folder names them through these too).
ARTIFACT_MANIFEST = "manifest.json"
ARTIFACT_REPORT = "report.json"


def model_artifact_prefix(name: str, precision: str, fingerprint: str) -> str:
    return f"{model_prefix(name)}{check_precision(precision)}/{check_fingerprint(fingerprint)}/"


def artifact_file_key(name: str, precision: str, fingerprint: str, relpath: str) -> str:
    """One file of an artifact, by its path inside the artifact folder (e.g. `tokenizer/tokenizer.json`).

    Every part of `relpath` is checked like a name, so a path from a manifest or a request cannot leave the folder.
    """
    if not isinstance(relpath, str) or not relpath:
        raise InvalidName(f"invalid artifact file {relpath!r}: give a path such as 'tokenizer/tokenizer.json'")
    for part in relpath.split("/"):
        check_name("artifact file", part)
    return model_artifact_prefix(name, precision, fingerprint) + relpath


def model_artifact_manifest_key(name: str, precision: str, fingerprint: str) -> str:
    return artifact_file_key(name, precision, fingerprint, ARTIFACT_MANIFEST)


def parse_artifact_manifest_key(key: str) -> tuple[str, str, str]:
    """(name, precision, fingerprint) of an artifact manifest's key; InvalidName for any other key.

    The inverse of model_artifact_manifest_key: a key is taken for a manifest only if building it again from
    its parts gives the same key, so a batch manifest, a default or a calibration record never is.
    """
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) == 5:
        name, precision, fingerprint = parts[1:4]
        try:
            if model_artifact_manifest_key(name, precision, fingerprint) == key:
                return name, precision, fingerprint
        except InvalidName:
            pass
    raise InvalidName(f"{key!r} is not an artifact manifest key "
                      f"(expected {models_prefix()}<name>/<precision>/<fingerprint>/{ARTIFACT_MANIFEST})")


def artifact_of(key: str) -> tuple[str, str, str]:
    """(name, precision, fingerprint) of the artifact folder that holds `key`; InvalidName for any other key
    (a model's default.json, its calibration records, anything outside models/)."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) >= 5 and parts[-1]:
        name, precision, fingerprint = parts[1:4]
        try:
            if key.startswith(model_artifact_prefix(name, precision, fingerprint)):
                return name, precision, fingerprint
        except InvalidName:
            pass
    raise InvalidName(f"{key!r} is not a file of an artifact "
                      f"(expected {models_prefix()}<name>/<precision>/<fingerprint>/...)")


def is_artifact_manifest_key(key: str) -> bool:
    """Whether `key` is an artifact's manifest (models/<name>/<precision>/<fingerprint>/manifest.json)."""
    try:
        parse_artifact_manifest_key(key)
    except InvalidName:
        return False
    return True


def model_default_key(name: str) -> str:
    return f"{model_prefix(name)}default.json"


def model_report_key(name: str, precision: str, fingerprint: str) -> str:
    return artifact_file_key(name, precision, fingerprint, ARTIFACT_REPORT)


def calibration_runs_prefix(name: str) -> str:
    """Where every calibration run of a model leaves its record (done, skipped or failed)."""
    return f"{model_prefix(name)}calibrations/"


def calibration_run_key(name: str, stamp: str) -> str:
    return f"{calibration_runs_prefix(name)}{check_name('calibration run', stamp)}.json"


_COMPILED_BLOBS = "ov-cache/"


def compiled_blob_prefix(device: str, signature: str, name: str, precision: str, fingerprint: str, *,
                         weightless: bool = False) -> str:
    """OpenVINO compiled blobs of one artifact for one kind of device (workers/runtime/blob_cache.py).

    Weightless blobs (CACHE_MODE=OPTIMIZE_SIZE) get a signature, so folders and keys, of their own: OpenVINO
    names them like full blobs, and a worker of one mode would otherwise pull the other mode's blobs.
    """
    check_fingerprint(signature)
    if weightless:
        signature = hashlib.sha256(f"{signature}\nweightless".encode()).hexdigest()[:16]
    return (f"{_COMPILED_BLOBS}{check_name('device', device)}/{signature}/{check_name('model', name)}/"
            f"{check_precision(precision)}/{check_fingerprint(fingerprint)}/")


def compiled_blobs_prefix() -> str:
    """The folder of every artifact's compiled blobs, for every kind of device."""
    return _COMPILED_BLOBS


def compiled_blob_folder_of(key: str) -> tuple[str, tuple[str, str, str]]:
    """(the compiled_blob_prefix folder holding `key`, the (name, precision, fingerprint) of its artifact).

    InvalidName for a key outside that layout, so retention never mistakes another object for a blob.
    """
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) >= 7 and parts[0] + "/" == _COMPILED_BLOBS and parts[-1]:
        device, signature, name, precision, fingerprint = parts[1:6]
        try:
            # A stored signature is hex either way (weightless ones are a hash already), so rebuilding the folder
            # from its parts gives the same spelling.
            folder = compiled_blob_prefix(device, signature, name, precision, fingerprint)
            if key.startswith(folder):
                return folder, (name, precision, fingerprint)
        except InvalidName:
            pass
    raise InvalidName(f"{key!r} is not a compiled blob "
                      f"(expected {_COMPILED_BLOBS}<device>/<signature>/<model>/<precision>/<fingerprint>/...)")


def compiled_blob_key(blob_prefix: str, file_name: str) -> str:
    """One blob file (OpenVINO's `<hash>.blob`) in a compiled_blob_prefix folder."""
    if not blob_prefix.startswith(_COMPILED_BLOBS) or not blob_prefix.endswith("/"):
        raise InvalidName(f"{blob_prefix!r} is not a compiled-blob folder (see compiled_blob_prefix)")
    return blob_prefix + check_name("compiled blob", file_name)


def download_path(directory: str | os.PathLike[str], key: str) -> Path:
    """Where the object `key` lands in a local `directory`: its last part only, checked, never outside it."""
    name = key.rsplit("/", 1)[-1]
    check_name("file", name)
    root = Path(directory).resolve()
    path = root / name
    if path.parent != root:  # unreachable with a checked name; kept as the rule itself
        raise InvalidName(f"{key!r} would land outside {root}")
    return path


def write_download(directory: str | os.PathLike[str], key: str, data: bytes) -> Path:
    """Write `data` as `key`'s file in `directory` atomically; a symlink already there is replaced, not followed."""
    import tempfile

    path = download_path(directory, key)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".darkroom-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidName(f"invalid content digest {digest!r}: must be 64 lowercase hex digits (sha256)")
    return digest


def control_image_key(digest: str) -> str:
    """A ControlNet control image, content-addressed: the same file is stored once, under the same key."""
    return f"controls/{check_digest(digest)}.png"


def control_digest_of(reference: str) -> str:
    """The digest inside a control image's key or URI (`.../controls/<sha256>.png`); InvalidName otherwise."""
    match = re.search(r"(?:^|/)controls/([0-9a-f]{64})\.png\Z", reference or "")
    if match is None:
        raise InvalidName(f"{reference!r} is not a control image reference (expected .../controls/<sha256>.png)")
    return match.group(1)


def annotation_key(digest: str, annotator: str, settings_digest: str) -> str:
    """A control image annotated by one annotator with one set of settings (cached, computed once)."""
    return (f"controls/annotated/{check_digest(digest)}/{check_name('annotator', annotator)}-"
            f"{check_fingerprint(settings_digest)}.png")


def init_image_key(digest: str) -> str:
    """An image-to-image init image, content-addressed: the same file is stored once, under the same key."""
    return f"inputs/{check_digest(digest)}.png"


def init_image_digest_of(reference: str) -> str:
    """The digest inside an init image's key or URI (`.../inputs/<sha256>.png`); InvalidName otherwise."""
    match = re.search(r"(?:^|/)inputs/([0-9a-f]{64})\.png\Z", reference or "")
    if match is None:
        raise InvalidName(f"{reference!r} is not an init image reference (expected .../inputs/<sha256>.png)")
    return match.group(1)
