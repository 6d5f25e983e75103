"""A trained predictor as a Hugging Face-style folder (model.safetensors, config.json, README.md),
loading it back, and uploading it (the command line: inference/export.py)."""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from data_loaders.schema import DataError
from utils.atomic_write import atomic_write_bytes, atomic_write_json, to_strict_json
from utils.checkpoint import verified_bytes
from utils.distances import DEFAULT_METRIC, metric_label
from utils.run_folder import read_json

from .embedding import quiet
from .loading import REEXPORT, build_model, embedding_of, gpo_config, text_embedder

FORMAT = "plurallm-group-predictor/1"
WEIGHTS = "model.safetensors"
_SUMMARY_KEYS = ("rounds", "final_eval_alignment_score", "best_eval_alignment_score", "best_round", "final_eval_fi",
                 "final_eval_cov", "final_train_alignment_score", "final_eval_group_scores", "convergence_round")


def export_config(config: dict, summary: dict | None, checkpoint: str, round_: Any) -> dict:
    """What an exported folder says about its model (everything but the weights' hash)."""
    data = config.get("data") or {}
    return {"format": FORMAT, "model_type": "plurallm-gpo", "gpo_config": gpo_config(config, "run config").to_dict(),
            "metric": config.get("metric", DEFAULT_METRIC),
            "embedding": embedding_of(config, int(config["dim_x"]), "run config"),
            "embedding_options": {k: config.get(k) for k in ("emb_dtype", "emb_load_in_8bit")},
            "dataset": config.get("dataset"),
            "data": {k: data.get(k) for k in ("source", "source_hash", "kept_questions")},
            "method": config.get("method"), "seed": config.get("seed"),
            "train_groups": config.get("train_groups", []), "eval_groups": config.get("eval_groups", []),
            "eval_num_qs": config.get("eval_num_qs"), "checkpoint": checkpoint, "round": round_,
            "summary": {k: (summary or {}).get(k) for k in _SUMMARY_KEYS}}


_RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoints", "failed.json")


def check_out_folder(out: Path, card: dict, overwrite: bool) -> None:
    """Refuse an --out whose config.json is not this very export: a run's would be replaced,
    leaving a folder that looks complete but can no longer be resumed or loaded."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file", "choose a folder")
    if any((out / name).exists() for name in _RUN_FILES):
        raise DataError(f"--out {out} holds a training run; exporting into it would replace its config.json",
                        "choose another --out folder (--overwrite only replaces an earlier export)")
    try:
        old = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        old = None
    if overwrite or old == json.loads(to_strict_json(card)):
        return  # the same export again is harmless
    what = "a different export" if isinstance(old, dict) and old.get("format") == FORMAT else "a config.json"
    raise DataError(f"--out {out} already holds {what}", "choose another --out folder, or pass --overwrite")


def save_pretrained(predictor, out_dir: str | Path, overwrite: bool = False) -> Path:
    """GroupPredictor.save_pretrained: the folder; one holding a run, or a different export (unless `overwrite`),
    is refused."""
    out = Path(out_dir)
    card = dict(predictor.info.get("export") or {})
    if not card:
        raise DataError("this predictor has no provenance to export", "load it with GroupPredictor.from_run")
    blob = safetensors_save({k: v.detach().cpu().contiguous() for k, v in predictor.model.state_dict().items()})
    card["weights"] = {"file": WEIGHTS, "sha256": hashlib.sha256(blob).hexdigest()}
    check_out_folder(out, card, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / WEIGHTS, blob)
        atomic_write_json(out / "config.json", card)
        (out / "README.md").write_text(model_card(card), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {out}: {exc}", "choose another --out, or fix its permissions") from None
    return out


def _locate(path: str | Path) -> Path:
    """A local folder, or a hub repo id downloaded (or found in the local hub cache)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if local.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise DataError(f"{path} is not an exported predictor folder", "pass the --out folder of inference.export")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text, allow_patterns=["config.json", WEIGHTS, "README.md"]))
    except Exception as exc:  # offline, unknown repo, no access: all mean "not loadable"
        raise DataError(f"{path} is not a local folder and could not be fetched from the Hugging Face hub "
                        f"({type(exc).__name__})",
                        "check the repo id and your connection, or pass a local folder") from None


def load_pretrained(cls, path: str | Path, *, cache_dir=None, emb_model=None, device="cpu", log=print):
    """GroupPredictor.from_pretrained: a folder written by save_pretrained or inference.export, or a hub repo id."""
    folder = _locate(path)
    try:
        card = read_json(folder / "config.json", "predictor config", REEXPORT)
    except FileNotFoundError:
        raise DataError(f"{folder} has no config.json", "pass the --out folder of inference.export") from None
    if card.get("format") != FORMAT:
        raise DataError(f"{folder}/config.json has format {card.get('format')!r}, not {FORMAT!r}",
                        "a run folder loads with GroupPredictor.from_run; re-export older folders")
    blob = verified_bytes(folder / WEIGHTS, card.get("weights") or {}, "config.json", "re-export the folder", what="")
    cfg = gpo_config({"model_config": card.get("gpo_config")}, f"{folder}/config.json")
    model = build_model(cfg, safetensors_load(blob), str(folder / WEIGHTS), device)
    emb = embedding_of(card, cfg.dim_x, f"{folder}/config.json")
    embedder = text_embedder(emb, card.get("embedding_options") or {}, cfg.dim_x, emb_model, str(folder), cache_dir,
                             log)
    (log or quiet)(f"loaded {folder}: metric {card.get('metric')}, embeddings {embedder.emb_model} ({cfg.dim_x} dims)")
    info = {"source": "pretrained", "path": str(folder), "export": {k: v for k, v in card.items() if k != "weights"},
            "config": card, "round": card.get("round"), "embedding": emb}
    return cls(model, card.get("metric", DEFAULT_METRIC), embedder, info)


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = True,
                commit_message: str = "Upload PluralLLM group predictor") -> str:
    """Upload an exported folder to the Hugging Face hub (a token with write access); returns its URL.
    Private by default: survey-derived models deserve a look before they are public."""
    from huggingface_hub import HfApi
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
        raise DataError(f"{folder} is not an exported predictor folder", "run python -m inference.export first")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")
    return str(url)


# ---------------------------------------------------------------------------- model card

CARD_TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))


def model_card(card: dict) -> str:
    """README.md of an exported folder: templates/model_card.md filled from its config.json (absent fields: None)."""
    def fields(d: dict | None) -> defaultdict:
        return defaultdict(lambda: None, d or {})

    summary, data = card.get("summary") or {}, fields(card.get("data"))
    groups = sorted((summary.get("final_eval_group_scores") or {}).items())
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(
        c=fields(card), data=data, emb=fields(card.get("embedding")), g=fields(card.get("gpo_config")),
        s={k: _fmt(summary.get(k)) for k in _SUMMARY_KEYS}, tag=card.get("method") or "plurallm",
        data_hash=str(data["source_hash"])[:16], metric_label=metric_label(card.get("metric", DEFAULT_METRIC)),
        train_groups=", ".join(card.get("train_groups") or []) or "–",
        eval_groups=", ".join(card.get("eval_groups") or []) or "–",
        group_rows="\n".join(f"| {name} | {_fmt(score)} |" for name, score in groups) or "| – | – |", weights=WEIGHTS)
