"""What the predictor reads from a run folder (through utils.run_folder and utils.checkpoint), with a
clear error for each way it can be wrong. The run's data, when on disk, is loaded as the run loaded
it, so a group's questions get exactly the run's vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from data_loaders.datasets import load_embedded, question_holdout
from data_loaders.schema import DataError, GroupData, RawDataset, build_group_data
from models.gpo import GPO, GPOConfig
from orchestration.config import RunConfig, run_from_json
from training.evaluation import EvalSplit, eval_split
from utils.checkpoint import latest_checkpoint, load_checkpoint
from utils.run_folder import CHECKPOINTS, CONFIG, is_finished, read_json

from .embedding import Log, TextEmbedder

NAMED_EMB_MODELS = ("minilm", "alpaca", "llama")
REEXPORT = "the folder is damaged; re-export or retrain"  # the hint for a damaged run or exported folder


def read_run(run_dir: Path, checkpoint: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config.json, weights, checkpoint meta) of a run that can serve `checkpoint` ('final' needs a finished
    run); errors name the folder and the checkpoints that exist."""
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist", "pass the folder a training run wrote (--out_dir)")
    try:
        config = read_json(run_dir / CONFIG, "run config", REEXPORT)
    except FileNotFoundError:
        raise DataError(f"{run_dir} holds no run (no config.json)",
                        "pass the folder a training run wrote (--out_dir)") from None
    folder = run_dir / CHECKPOINTS
    if checkpoint == "final" and not is_finished(run_dir):
        latest = latest_checkpoint(folder)
        alt = f"or load its latest complete checkpoint with checkpoint={latest!r}" if latest else \
            "it has no complete checkpoint yet"
        raise DataError(f"run {run_dir} is unfinished (no summary.json), so it has no final checkpoint",
                        f"let it finish, or resume it with --resume; {alt}")
    try:
        weights, _, meta = load_checkpoint(folder, checkpoint)
    except ValueError as exc:  # a CheckpointError, or a bad tag
        tags = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise DataError(f"run {run_dir}: cannot load checkpoint {checkpoint!r}: {str(exc).splitlines()[0]}",
                        f"complete checkpoints here: {', '.join(tags) or 'none'}") from None
    return config, weights, meta


def gpo_config(config: dict, where: str) -> GPOConfig:
    """The model's shape, config['model_config'] (fields it lacks take GPOConfig's defaults)."""
    if not isinstance(config.get("model_config"), dict):
        raise DataError(f"{where} has no model_config", "this is not a PluralLLM run or export")
    known = {f.name for f in fields(GPOConfig)}
    return GPOConfig(**{k: v for k, v in config["model_config"].items() if k in known})


def build_model(cfg: GPOConfig, weights: dict[str, torch.Tensor], where: str, device: str) -> GPO:
    """The GPO with these weights, in eval mode; a weights/shape mismatch names the file."""
    first = weights.get("embedder.0.weight")
    if first is not None and first.shape[1] != cfg.input_dim:
        copies = 2 if cfg.context_answer == "product" else 1  # [x, y] or [x, y, y·x]
        raise DataError(f"{where}: the weights take {(first.shape[1] - cfg.dim_y) // copies}-dim embeddings but the "
                        f"config says dim_x {cfg.dim_x}", "the weights and config.json come from different models")
    model = GPO(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise DataError(f"{where}: the weights do not fit the model in its config ({str(exc).splitlines()[0]})",
                        "the weights and config.json come from different models") from None
    return model.to(device).eval()


def embedding_of(config: dict, dim_x: int, where: str) -> dict:
    """The run's embedding model: {emb_model (an --emb_model value), model_id, dim, prompt_style, probe}."""
    if (config.get("model_config") or {}).get("question_ids"):
        raise DataError(f"{where} was trained with --question_ids: its inputs end in one column per training "
                        "question, which a new text has no value for",
                        "the predictor embeds text; use a run trained without --question_ids")
    emb = dict(((config.get("data") or {}).get("embedding")) or config.get("embedding") or {})
    name = emb.get("emb_model")
    if not name:
        raise DataError(f"{where} does not say which embedding model the run used (data.embedding)",
                        "retrain with the current code, which records it")
    if name == "hf":  # a Hugging Face id or folder: --emb_model takes the id itself
        name = emb.get("model_id")
    emb["emb_model"] = name
    emb.setdefault("prompt_style", "alpaca")
    if emb.get("dim") is not None and int(emb["dim"]) != dim_x:
        raise DataError(f"{where}: the embedding model gives {emb['dim']}-dim vectors but the model takes {dim_x}",
                        "config.json is inconsistent; re-export or retrain")
    return emb


def text_embedder(emb: dict, options: dict, dim_x: int, override: str | None, where: str, cache_dir: str | None,
                  log: Log) -> TextEmbedder:
    """The embedder of a run's or export's embedding model `emb` (embedding_of), or of an `override` that can be
    the same model, with its device and precision `options` (emb_device, emb_dtype, emb_load_in_8bit)."""
    name = emb["emb_model"]
    if override and override != name:
        if name == "synthetic" or (override in NAMED_EMB_MODELS and name in NAMED_EMB_MODELS):
            raise DataError(f"embedding model {override!r} does not match the run's {name!r} ({where})",
                            f"drop the override, or pass the run's model ({name})")
        name = override  # e.g. a local folder of the run's model: TextEmbedder checks the run's probe vector
    return TextEmbedder(name, emb["prompt_style"], dim_x, probe=emb.get("probe"), log=log, cache_dir=cache_dir,
                        device=options.get("emb_device") or "auto", dtype=options.get("emb_dtype") or "fp32",
                        load_in_8bit=bool(options.get("emb_load_in_8bit")))


# ---------------------------------------------------------------------------- the run's data

@dataclass
class RunData:
    raw: RawDataset
    emb: torch.Tensor
    run: RunConfig

    def group(self, name: str) -> GroupData:
        return build_group_data(self.raw, name, self.emb)

    def client(self, name: str, role: str) -> EvalSplit:
        """The group as the run's evaluation saw it: its split, held-out questions (--question_split, drawn as the
        run drew them) and context draws."""
        held = question_holdout(self.raw.bank.qkeys, self.run.data.question_split, self.run.data.split_seed)
        return eval_split(self.group(name), self.run.client, role, held)

    def training_texts(self, config: dict) -> set[str]:
        """Texts of the questions some training group of the run trained on (its local split)."""
        bank = self.raw.bank
        keys = {int(k) for g in config.get("train_groups") or [] for k in self.client(g, "train").local.qkeys.tolist()}
        return {bank.questions[bank.row(k)] for k in keys}


def load_run_data(config: dict, *, data_path: str | None, cache_dir: str | None, emb_model: str,
                  log: Log) -> RunData:
    """The run's groups and vectors, as the run loaded them; DataError if the data is not there or differs."""
    run = run_from_json(config, data_path, cache_dir)
    if run.data.dataset != "synthetic":  # the run's data, embedded with the model this predictor embeds new texts with
        run = replace(run, data=replace(run.data, embedding=replace(run.data.embedding, emb_model=emb_model)))
    groups = list(config.get("train_groups") or []) + list(config.get("eval_groups") or [])
    raw, emb, _ = load_embedded(run.data, groups or None, log=log)
    want = (config.get("data") or {}).get("source_hash")
    if want and raw.source_hash != want:
        raise DataError(f"the {run.data.dataset} data at {run.data.data_path} (hash {raw.source_hash[:12]}) is not the "
                        f"data the run was trained on (hash {want[:12]})", "pass the run's data with --data_path")
    return RunData(raw, emb, run)
