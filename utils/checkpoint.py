"""Checkpoints that hold everything needed to resume, and load without running pickled code.

Checkpoint ``<tag>`` is ``<tag>.safetensors`` (weights), ``<tag>.state.pt`` (optimizer, RNG and
counters: tensors and plain values only, for ``torch.load(weights_only=True)``) and ``<tag>.json``
(meta with ``round``, and both files' sizes and SHA-256), written atomically, the JSON last: a
checkpoint is complete iff its JSON and the files it names exist.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from utils.atomic_write import atomic_write_bytes, atomic_write_json, remove_stale_temps
from utils.errors import DataError

FORMAT_VERSION = 1
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESUME_HINT = "delete it or resume from an earlier checkpoint"
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(DataError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def round_tag(round_num: int) -> str:
    return f"round_{round_num:05d}"


def _check_tag(tag: str) -> None:
    if not _TAG_RE.match(tag):
        raise ValueError(f"checkpoint tag {tag!r} must be letters, digits, '_', '.', '-' (it becomes a file name)")


def _loadable(obj: Any, where: str) -> Any:
    """``obj`` in the plain containers ``torch.load(weights_only=True)`` reads (an OrderedDict or a
    namedtuple would need allow-listed globals); TypeError naming where anything else sits."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, _PLAIN)]
        if bad:
            raise TypeError(f"{where}: key {bad[0]!r} of type {type(bad[0]).__name__} is not allowed")
        return {k: _loadable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_loadable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoint state may hold only tensors, "
                    "str/int/float/bool/None, lists, tuples and dicts (store a state_dict() "
                    "or generator.get_state(), not the object)")


def _paths(directory: Path, tag: str) -> list[Path]:
    return [directory / f"{tag}{ext}" for ext in (".safetensors", ".state.pt", ".json")]


def save_checkpoint(directory: str | Path, tag: str, *, model_state: dict[str, torch.Tensor],
                    extra_states: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save a checkpoint; returns its ``<tag>.json``. Re-saving a tag first removes its JSON, so a crash
    midway leaves it incomplete rather than mixing old and new files."""
    directory = Path(directory)
    _check_tag(tag)
    if not isinstance(meta.get("round"), int) or isinstance(meta.get("round"), bool):
        raise ValueError(f"checkpoint {tag!r}: meta must contain an integer 'round', got {meta.get('round')!r}")
    state = _loadable(extra_states, "extra_states")
    # clone: safetensors refuses tensors that share storage (tied or sliced weights).
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)

    directory.mkdir(parents=True, exist_ok=True)
    weights_path, state_path, json_path = _paths(directory, tag)
    json_path.unlink(missing_ok=True)
    files = {}
    try:
        for role, path, data in (("model", weights_path, safetensors_save(weights)),
                                 ("state", state_path, buf.getvalue())):
            atomic_write_bytes(path, data)
            files[role] = {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except BaseException:  # e.g. the disk filled up on the state: no weights file without its index
        for path in (weights_path, state_path):
            path.unlink(missing_ok=True)
        raise
    record = {"format": FORMAT_VERSION, "tag": tag, "round": meta["round"],
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "saved_at_unix": time.time(),
              "files": files, "meta": meta}
    return atomic_write_json(json_path, record)


def _read_record(json_path: Path) -> dict[str, Any]:
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
        files = record["files"]
        _ = (files["model"]["name"], files["state"]["name"], record["meta"], record["round"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint index {json_path} is unreadable or malformed ({e!r})", _RESUME_HINT) from e
    return record


def verified_bytes(path: Path, entry: dict[str, Any], index: str, hint: str = _RESUME_HINT,
                   what: str = "checkpoint file ") -> bytes:
    """The file's bytes, checked against the size and SHA-256 that `index` recorded in `entry`."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{what}{path} cannot be read ({e.strerror})", hint) from e
    if len(data) != entry.get("bytes", len(data)) or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"{what}{path} is corrupted (size or SHA-256 differs from what {index} recorded)", hint)
    return data


def load_checkpoint(directory: str | Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Load ``(model_state, extra_states, meta)`` on the CPU; never unpickles arbitrary objects."""
    directory = Path(directory)
    _check_tag(tag)
    weights_path, state_path, json_path = _paths(directory, tag)
    try:
        record = _read_record(json_path)
    except FileNotFoundError:
        latest = latest_checkpoint(directory) if directory.is_dir() else None
        raise CheckpointError(
            f"checkpoint {tag!r} in {directory} is missing or incomplete (no {json_path.name})",
            f"resume from the latest complete checkpoint ({latest!r})" if latest
            else "no complete checkpoint in that folder; start a fresh run") from None
    files = record["files"]
    raw_weights, raw_state = (verified_bytes(directory / files[role]["name"], files[role], json_path.name)
                              for role in ("model", "state"))
    try:
        model_state = safetensors_load(raw_weights)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {weights_path} is not valid safetensors ({e})", _RESUME_HINT) from e
    try:
        extra_states = torch.load(io.BytesIO(raw_state), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {state_path} cannot be loaded with weights_only=True ({e})",
                              _RESUME_HINT) from e
    return model_state, extra_states, record["meta"]


def _records(directory: Path, warn: bool) -> dict[str, dict[str, Any]]:
    """Tag -> index record of every readable checkpoint index in `directory` (the others skipped)."""
    records = {}
    for json_path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            records[json_path.stem] = _read_record(json_path)
        except (CheckpointError, FileNotFoundError) as e:
            if warn:
                warnings.warn(f"ignoring checkpoint index {json_path}: {e}", stacklevel=3)
    return records


def _age(record: dict[str, Any]) -> tuple[int, float]:
    return int(record["round"]), float(record.get("saved_at_unix", 0.0))


def latest_checkpoint(directory: str | Path) -> str | None:
    """Tag of the complete checkpoint with the highest round (ties: the last saved), or None; damaged
    or incomplete ones are skipped with a warning."""
    directory = Path(directory)
    complete = {}
    for tag, record in _records(directory, warn=True).items():
        if all((directory / f["name"]).is_file() for f in record["files"].values()):
            complete[tag] = record
        else:
            warnings.warn(f"ignoring incomplete checkpoint {directory / tag}.json (a file it names is missing)",
                          stacklevel=2)
    return max(complete, key=lambda tag: (*_age(complete[tag]), tag), default=None)


def alias_checkpoint(directory: str | Path, src_tag: str, dst_tag: str, meta: dict[str, Any] | None = None) -> Path:
    """Write ``<dst_tag>.json`` naming the files of ``src_tag`` (no copy), ``meta`` merged into its meta.
    Pruning keeps every file some index names, so an alias outlives its source."""
    directory = Path(directory)
    _check_tag(dst_tag)
    record = _read_record(directory / f"{src_tag}.json")
    record = {**record, "tag": dst_tag, "alias_of": src_tag, "meta": {**record["meta"], **(meta or {})}}
    record["round"] = record["meta"]["round"]
    return atomic_write_json(directory / f"{dst_tag}.json", record)


def prune_checkpoints(directory: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` ``round_*`` checkpoints; returns the tags removed. Indexes go
    first, then every file no index names (also those a crash orphaned before their index)."""
    directory = Path(directory)
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest checkpoint is what a resume needs), got {keep}")
    if not directory.is_dir():
        return []
    records = _records(directory, warn=False)
    ours = sorted((t for t in records if t.startswith("round_") and "alias_of" not in records[t]),
                  key=lambda t: _age(records[t]))
    removed = ours[:-keep]
    for tag in removed:
        (directory / f"{tag}.json").unlink(missing_ok=True)
        del records[tag]
    named = {f["name"] for r in records.values() for f in r["files"].values()}
    for path in [*directory.glob("*.safetensors"), *directory.glob("*.state.pt")]:
        if path.name not in named:
            path.unlink(missing_ok=True)
    remove_stale_temps(directory)  # the globs above skip the hidden temp files of a killed write
    return removed
