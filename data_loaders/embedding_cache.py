"""The embedding cache (README, "Embeddings"): per (dataset, model, prompt style, precision) an [N, D] fp32
tensor, <dir>/<dataset>-<model tail>-<model hash>-<style>-<precision>.safetensors, whose JSON sidecar lists
the sha256 of the text each row embeds. A sidecar naming another model or dimension than its file name
promises is an error (someone copied or edited it), not a silent rebuild."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_loaders.schema import DataError

Log = Callable[[str], None]

CACHE_ENV = "PLURALLLM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/plurallm/embeddings")
CACHE_FORMAT = "plurallm-embeddings/2"
TENSOR_NAME = "embeddings"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def unwritable_reason(folder: Path) -> str | None:
    """Why nothing can be saved in `folder` (None when it can): tried with a scratch file, since
    permission bits say nothing to root, nor about read-only mounts or a path through a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".plurallm-write-test-"):
            pass
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _short_hash(value: Any, n: int = 8) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "model"


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(tensor.float().numpy()).data).hexdigest()


@dataclass
class CacheEntry:
    """Where one (dataset, model, style, precision) store lives, and what it must be keyed by."""

    path: Path
    key: str
    parts: dict[str, Any]

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


def cache_entry(dataset: str, model_id: str, style: str, precision: str, pooling: str,
                folder: Path) -> CacheEntry:
    parts = {"model_id": model_id, "prompt_style": style, "precision": precision, "pooling": pooling}
    tail = model_id.rstrip("/").split("/")[-1]
    name = f"{_slug(dataset)}-{_slug(tail)}-{_short_hash(model_id, 6)}-{style}-{precision}.safetensors"
    return CacheEntry(folder / name, _short_hash(parts, 64), parts)


@dataclass
class Store:
    """A store's content: rows[i] embeds the text whose sha256 is hashes[i]."""

    rows: torch.Tensor | None = None
    hashes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    why: str = ""       # why it is empty (or what was found)
    warn: bool = False  # the reason is damage, not a first run

    def __post_init__(self) -> None:
        self._index = {h: i for i, h in enumerate(self.hashes)}

    def missing(self, hashes: list[str]) -> list[str]:
        """The hashes not stored yet, each once, in first-seen order."""
        return list(dict.fromkeys(h for h in hashes if h not in self._index))

    def gather(self, hashes: list[str]) -> torch.Tensor:
        return self.rows[torch.tensor([self._index[h] for h in hashes], dtype=torch.long)]

    def extended(self, hashes: list[str], rows: torch.Tensor) -> "Store":
        rows = rows.detach().float().cpu()
        merged = rows if self.rows is None else torch.cat([self.rows, rows])
        return Store(merged.contiguous(), self.hashes + list(hashes), dict(self.meta), self.why)


def _rows_digest(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def _changes(old: dict, new: dict) -> str:
    diffs = [f"{k} {str(old.get(k))[:24]!r} -> {str(new[k])[:24]!r}" for k in new if old.get(k) != new[k]]
    return "; ".join(diffs) or "its key differs"


def read_store(entry: CacheEntry, model_id: str, dim: int | None) -> Store:
    """The stored rows, or an empty Store with the reason. Model/dim contradictions raise DataError."""
    st, js = entry.path, entry.sidecar
    if not js.exists():
        if st.exists():
            return Store(why=f"cache {st} has no metadata file {js.name} (interrupted write?)", warn=True)
        return Store(why=f"no cache entry {st.name} in {st.parent}")
    try:
        meta = json.loads(js.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return Store(why=f"cache metadata {js} is corrupted ({exc})", warn=True)
    if meta.get("format") != CACHE_FORMAT:
        return Store(meta=meta, why=f"cache {js} has format {meta.get('format')!r}, not {CACHE_FORMAT!r}", warn=True)
    # The file name promised this model: metadata saying otherwise is not ours to overwrite.
    files = f"{entry.sidecar} and {entry.path}"
    if meta.get("model_id") != model_id:
        other = meta.get("emb_model_arg") or meta.get("model_id")
        raise DataError(f"embedding cache {entry.sidecar} holds embeddings of model "
                        f"{meta.get('model_id')!r}, but {model_id!r} was requested",
                        hint=f"delete {files} to rebuild it, or pass --emb_model {other}")
    if dim is not None and meta.get("dim") != dim:
        raise DataError(f"embedding cache {entry.sidecar} says dimension {meta.get('dim')}, but {model_id} gives {dim}",
                        hint=f"delete {files} to rebuild it, or pass the --emb_model that made it")
    if meta.get("key") != entry.key:
        return Store(meta=meta, why=f"cache {st.name} was built with other settings: "
                                    f"{_changes(meta.get('key_parts', {}), entry.parts)}")
    return _read_tensor(entry, meta)


def _read_tensor(entry: CacheEntry, meta: dict) -> Store:
    from safetensors import safe_open
    try:
        with safe_open(str(entry.path), framework="pt") as f:
            header = f.metadata() or {}
            tensor = f.get_tensor(TENSOR_NAME)
    except Exception as exc:  # truncated, garbage, missing: all mean "rebuild"
        why = f"cache file {entry.path} is corrupted ({type(exc).__name__}: {exc})"
        return Store(meta=meta, why=why, warn=True)
    hashes = meta.get("text_sha256")
    problem = None
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        problem = "its metadata has no text_sha256 list"
    elif header.get("key") != entry.key or header.get("rows") != _rows_digest(hashes):
        problem = "its tensor and metadata files do not belong together"
    elif tuple(tensor.shape) != (len(hashes), meta.get("dim")):
        problem = f"shape {tuple(tensor.shape)} but the metadata lists {len(hashes)} texts of dim {meta.get('dim')}"
    elif _checksum(tensor) != meta.get("sha256"):
        problem = "checksum mismatch"
    if problem:
        return Store(meta=meta, why=f"cache file {entry.path} is corrupted ({problem})", warn=True)
    return Store(tensor.float(), hashes, meta, f"cache hit {entry.path}")


def write_store(entry: CacheEntry, store: Store, meta: dict, log: Log = print) -> bool:
    """Atomic: tensor then sidecar, each via a temp file and os.replace. Any failure (a full disk shows
    up as safetensors' own error, not an OSError) is a warning: the run keeps its vectors in memory."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    tensor = store.rows.contiguous()
    meta = {**meta, "format": CACHE_FORMAT, "key": entry.key, "key_parts": entry.parts, "text_sha256": store.hashes,
            "shape": list(tensor.shape), "dim": int(tensor.shape[1]), "sha256": _checksum(tensor)}
    st, js = entry.path, entry.sidecar
    tag = f"{os.getpid()}.{threading.get_ident()}"  # threads of one process may write at once
    tmp_st, tmp_js = st.with_name(f".{st.name}.{tag}.tmp"), js.with_name(f".{js.name}.{tag}.tmp")
    try:
        st.parent.mkdir(parents=True, exist_ok=True)
        js.unlink(missing_ok=True)  # a crash below then leaves "no entry", never a stale pair
        header = {"key": entry.key, "model_id": meta["model_id"], "rows": _rows_digest(store.hashes)}
        save_file({TENSOR_NAME: tensor}, str(tmp_st), metadata=header)
        os.replace(tmp_st, st)
        tmp_js.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        os.replace(tmp_js, js)
    except (OSError, SafetensorError) as exc:
        for tmp in (tmp_st, tmp_js):
            with contextlib.suppress(OSError):  # e.g. the folder is a file: nothing to clean up
                tmp.unlink(missing_ok=True)
        log(f"WARNING: could not write the embedding cache {st} ({exc}); continuing without it")
        return False
    return True
