"""Every command-line flag of main_fl.py and main_centralized.py (and the embed command's data flags).

Names follow the authors' released code; defaults follow the paper (method.md), and the
README's flag table says where the two differ and what each flag does at length.
"""
from __future__ import annotations

import argparse
import functools

from data_loaders.datasets import DATASETS
from federated.aggregation import WEIGHTINGS
from federated.attacks import ATTACKS
from federated.fedavg import CLIENT_ENGINES
from federated.strategies import DEFAULT_MAX_WEIGHT_RATIO, SERVER_OPTS, STRATEGIES
from flower_app.secagg import DEFAULT_CLIP_RANGE, DEFAULT_QUANT_RANGE
from models.gpo import CONTEXT_ANSWERS, LAYER_INITS, LOSS_REDUCTIONS
from orchestration.centralized import CENTRAL_MODES
from utils.distances import METRICS, auto_rule


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only to help that does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


@functools.cache
def flag_defaults(method: str = "fedavg") -> dict:
    """Every flag of `method` at its default (main_fl.py's flags are a superset of main_centralized.py's)."""
    return vars(build_parser(method).parse_args([]))


def _add(group, name: str, default, text: str, **kw) -> None:
    """--name: a switch when `default` is False, else a value whose type is the default's (int, float)."""
    if default is False:
        group.add_argument(f"--{name}", action="store_true", help=text, **kw)
        return
    if isinstance(default, (int, float)) and "type" not in kw:
        kw["type"] = type(default)
    group.add_argument(f"--{name}", default=default, help=text, **kw)


def build_parser(method: str) -> argparse.ArgumentParser:
    desc = {"fedavg": "Train GPO with FedAvg: one client per training group (PluralLLM).",
            "centralized": "Train GPO on the training groups' pooled data (the centralized baseline)."}[method]
    p = argparse.ArgumentParser(description=desc, formatter_class=DefaultsOnce)
    fedavg = method == "fedavg"

    d = p.add_argument_group("data")
    add_source_arguments(d)
    _add(d, "split_seed", None, "seed of the --group_split draw (default: --seed)", type=int)
    _add(d, "data_split", 0.9, "share of each training group's questions (qkey order) used for local training")
    _add(d, "question_split", 0.0, "leakage-free: share of questions held out of all training, scored alone (0: off)")
    _add(d, "question_ids", False, "append one-hot question identities to the option embeddings (issue 26)")
    add_embedding_arguments(d)
    s = p.add_argument_group("synthetic data (--dataset synthetic)")
    _add(s, "syn_groups", 14, "number of groups")
    _add(s, "syn_questions", 200, "questions per group")
    _add(s, "syn_min_options", 2, "fewest options per question")
    _add(s, "syn_max_options", 7, "most options per question")
    _add(s, "syn_dim", 64, "embedding dimension")
    _add(s, "syn_seed", 0, "seed of the generated data (kept apart from --seed)")
    _add(s, "syn_beta", 1.0, "strength of each group's own preference")
    _add(s, "syn_gamma", 1.0, "strength of the preference all groups share")

    m = p.add_argument_group("model (GPO, method.md §3)")
    _add(m, "d_model", 128, "transformer width")
    _add(m, "emb_depth", 4, "linear layers in the input embedder")
    _add(m, "dim_feedforward", 128, "feed-forward width")
    _add(m, "nhead", 4, "attention heads")
    _add(m, "num_layers", 6, "transformer layers")
    _add(m, "dropout", 0.0, "dropout")
    _add(m, "bound_std", False, "std = 0.05 + 0.95·softplus instead of exp")
    _add(m, "layer_init", "independent", "clones: copies of the first layer (released code)", choices=LAYER_INITS)
    _add(m, "context_answer", "concat", "[x, y] (concat, paper) or [x, y, y·x] (product)", choices=CONTEXT_ANSWERS)
    _add(m, "context_factors", 0, "F > 0: F in-context factors fitted by ridge on the context answers")
    _add(m, "factor_ridge", 1e-2, "ridge penalty of the context factors' loadings")
    _add(m, "loss_reduction", "sum", "NLL sum over targets (GPO) or mean over padded slots", choices=LOSS_REDUCTIONS)

    t = p.add_argument_group("training")
    _add(t, "seed", 0, "controls model init, episodes, client sampling and random group splits")
    _add(t, "lr", 3e-4, "Adam learning rate")
    _add(t, "num_steps", 100, "T_max of the cosine learning-rate schedule (in steps)")
    _add(t, "max_ctx_num_qs", 100, "most context questions per episode")
    _add(t, "min_ctx_num_qs", 10, "fewest context questions per episode")
    _add(t, "max_tar_num_qs", 100, "most target questions per episode")
    _add(t, "min_tar_num_qs", 10, "fewest target questions per episode")
    _add(t, "episode_bounds", "flags", "code: scaled by --data_split (released code)", choices=("flags", "code"))
    _add(t, "virtual_tilt", 0.0, "train on virtual groups: answers tilted by exp(tilt·z) (0 = the real groups)")
    _add(t, "grad_clip", 0.0, "largest L2 norm of one local step's gradient (0 = off, the paper)")
    _add(t, "train_batch_size", 32, "groups per step in --central_mode batched")
    _add(t, "device", "auto", "auto | cpu | cuda | cuda:N")
    if fedavg:
        _add(t, "comm_round", 1300, "communication rounds (paper: 1300)")
        _add(t, "epochs", 6, "local steps per client per round")
        _add(t, "client_fraction", 1.0, "share of training clients sampled per round")
        _add(t, "weighting", "dataset_size", "FedAvg weights: dataset_size (paper), episode_points (released code), "
             "uniform", choices=WEIGHTINGS)
        _add(t, "client_engine", "auto", "auto: threads where torch uses several threads", choices=CLIENT_ENGINES)
        _add(t, "client_workers", 0, "with --client_engine threads: worker threads (0 = torch's thread count)")
        _add(t, "save_client", False, "also save each client's locally trained weights at every checkpoint")
        _add(t, "also_centralized", False, "then train the centralized baseline in the same process")
    _add(t, "central_epochs", 1300, "centralized epochs (paper: 1300)")
    _add(t, "central_mode", "sequential", "one step per group (paper) or per batch (code)", choices=CENTRAL_MODES)
    _add(t, "central_steps", 1, "centralized: steps per group or batch per epoch (= --epochs: compute-matched)")

    e = p.add_argument_group("evaluation")
    _add(e, "federated_eval", 10, "FedAvg: evaluate every N rounds")
    _add(e, "eval_freq", 10, "centralized: evaluate every N epochs")
    _add(e, "eval_num_qs", 20, "context questions given to a group at evaluation")
    _add(e, "eval_seed", 0, "seed of the evaluation context questions")
    _add(e, "eval_resample", False, "redraw evaluation contexts at every evaluation (released code)")
    _add(e, "eval_batch_size", 0, "target questions per evaluation forward pass (0 = all at once)")
    _add(e, "metric", "auto", f"auto: {auto_rule()}", choices=("auto", *METRICS))

    if fedavg:
        g = p.add_argument_group("aggregation strategy (federated/strategies.py, README: Strategies)")
        _add(g, "strategy", "fedavg", "server aggregation (README: Aggregation strategies)", choices=STRATEGIES)
        _add(g, "proximal_mu", 0.01, "fedprox: mu of the local term (mu/2)·||w - w_global||²")
        _add(g, "qffl_q", 0.1, "qfedavg: q of p_k ∝ ω_k·F_k^q, F_k = 1 - held-out alignment (0 = fedavg)")
        _add(g, "adaptive_temperature", 0.1, "adaptive: softmax temperature T over (1 - mean held-out alignment)")
        _add(g, "adaptive_window", 5, "adaptive: rounds of each client's held-out alignment history averaged")
        _add(g, "trim_fraction", 0.2, "trimmed_mean: share beta of values dropped at each end per coordinate")
        _add(g, "max_weight_ratio", DEFAULT_MAX_WEIGHT_RATIO, "qfedavg/adaptive: cap on weight / FedAvg weight")
        _add(g, "server_opt", "none", "server optimizer on the aggregate's delta (FedOpt)", choices=SERVER_OPTS)
        _add(g, "server_lr", None, "server learning rate (default: sgd 1.0 = FedAvg, adam/yogi 1e-3)", type=float)
        _add(g, "server_beta1", 0.9, "adam/yogi: first-moment decay")
        _add(g, "server_beta2", 0.99, "adam/yogi: second-moment decay")
        _add(g, "server_tau", 1e-3, "adam/yogi: adaptivity tau added to sqrt(v)")

        a = p.add_argument_group("simulated Byzantine clients (federated/attacks.py)")
        _add(a, "byzantine", 0, "number of Byzantine training clients, drawn once from --seed (0 = none)")
        _add(a, "attack", "sign_flip", "what a Byzantine client sends (README: Aggregation strategies)",
             choices=ATTACKS)
        _add(a, "attack_scale", 10.0, "c of sign_flip and scale")
        _add(a, "attack_std", 1.0, "gaussian: noise std per coordinate")
        _add(a, "attack_eps", 0.5, "ipm: ε of w - ε·μ")
        _add(a, "attack_report", 0.0, "report_score: the held-out alignment the attacker reports")

        v = p.add_argument_group("client-level differential privacy (federated/privacy.py)")
        _add(v, "dp", False, "DP-FedAvg: clip each client's update to --dp_clip, average uniformly, add Gaussian noise "
             "(needs --weighting uniform and --strategy fedavg or fedprox)")
        _add(v, "dp_clip", 0.5, "S: largest L2 norm of one client's update (near the median norm the log reports)")
        _add(v, "dp_noise", None, "z: noise std z·S/m on the mean update (default: from --dp_epsilon)", type=float)
        _add(v, "dp_epsilon", None, "budget ε over all rounds; a run that would exceed it is refused", type=float)
        _add(v, "dp_delta", 1e-5, "δ of (ε, δ)-DP, well below 1/(number of clients)")
        _add(v, "dp_clip_quantile", None, "adaptive clip toward this norm quantile (default: fixed)", type=float)
        _add(v, "dp_clip_lr", 0.2, "adaptive clipping: η of the update C <- C·exp(-η(b - γ))")
        _add(v, "dp_clip_count_std", None, "adaptive clip: noise std on the unclipped count (default m/20)", type=float)
        _add(v, "dp_secure_noise", None, "DP noise from the OS's secure randomness, not from --seed (default: on in "
             "a Flower deployment, else off)", action=argparse.BooleanOptionalAction)

        f = p.add_argument_group("federation engine (flower_app/, docs/federation.md)")
        _add(f, "engine", "inprocess", "inprocess: every client in this process; flower: Flower's simulation "
             "runtime (virtual clients in threads, or Ray workers with --sim_backend ray)",
             choices=("inprocess", "flower"))
        _add(f, "min_clients", 1, "fewest training clients whose replies a round aggregates")
        _add(f, "round_timeout", 0.0, "flower: seconds to wait for a round's replies (0 = all)")
        _add(f, "node_wait", 120.0, "flower: seconds to wait for every group's node")
        _add(f, "sim_backend", "thread", "flower simulation: threads or Ray workers", choices=("thread", "ray"))
        _add(f, "sim_client_cpus", 1.0, "flower simulation: CPU cores per virtual client")
        _add(f, "sim_client_gpus", 0.0, "flower simulation, ray backend: GPUs per virtual client")
        _add(f, "secagg", False, "flower: Flower's SecAgg+ (the server sees only the sum of masked weights)")
        _add(f, "secagg_num_shares", 1.0, "secagg: shares per secret: >= 3, or a fraction", type=share_count)
        _add(f, "secagg_threshold", 0.67, "secagg: shares to rebuild a secret: >= 2, or a fraction", type=share_count)
        _add(f, "secagg_clip_range", DEFAULT_CLIP_RANGE, "secagg: every scaled weight must lie in [-R, R]")
        _add(f, "secagg_quant_range", DEFAULT_QUANT_RANGE, "secagg: quantisation levels (clients x levels < 2**32)")

    o = p.add_argument_group("output")
    _add(o, "out_dir", None, "run folder (default runs/<timestamp>_<method>_s<seed>)")
    _add(o, "resume", False, "continue the run in --out_dir (or the newest under runs/ with the same configuration)")
    _add(o, "wandb", "auto", "Weights & Biases: online when logged in (auto), offline files, or nothing",
         choices=("auto", "online", "offline", "off"))
    _add(o, "wndb_project_name", "plurallm", "W&B project")
    _add(o, "quiet", False, "print less (no per-group load lines)")
    _add(o, "log_every", 10, "when stderr is not a terminal: a progress line every N rounds and at evaluations")
    _add(o, "keep_checkpoints", 3, "resumable checkpoints kept (the newest N), besides final and best")
    _add(o, "keep_best", False, "also keep the checkpoint of the best mean evaluation alignment")
    _add(o, "no_plots", False, "do not write loss.png and alignment.png into the run folder")
    return p


def group_names(text: str) -> list[str]:
    """Names split at commas, or at semicolons when any name holds a comma ('$100,000 or more; Black')."""
    sep = ";" if ";" in text else ","
    names = [g.strip() for g in text.split(sep) if g.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no group; list at least one, or leave "
                                         "the flag out for the default groups")
    return names


def share_count(text: str) -> int | float:
    """An integer count (as Flower takes it), or a fraction of the sampled clients when it has a dot."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor a fraction such as 0.5") from None


def add_source_arguments(d, datasets=DATASETS, required: bool = False) -> None:
    d.add_argument("--dataset", default=argparse.SUPPRESS if required else "globalqa", required=required,
                   choices=datasets, help="survey data set")
    _add(d, "data_path", None, "globalqa: the hub CSV (else $PLURALLLM_GLOBALQA_CSV, else download); "
         "opinionqa: the human_resp folder (else $PLURALLLM_OPINIONQA_DIR)")
    _add(d, "strict", False, "stop at the first unparsable row instead of skipping it")
    _add(d, "encoding", "utf-8", "text encoding of the globalqa CSV (e.g. latin-1 for a file saved by a spreadsheet)")
    _add(d, "train_groups", None, "comma-separated training groups (';' when a name holds a comma) (default: the "
         "paper's 8 countries for globalqa)", type=group_names)
    _add(d, "eval_groups", None, "comma-separated held-out evaluation groups (default: the paper's 6 for globalqa)",
         type=group_names)
    _add(d, "group_split", None, "seeded train share of the groups (default: 0.6 for opinionqa, synthetic)", type=float)


def add_embedding_arguments(d) -> None:
    _add(d, "emb_model", "auto", "auto | alpaca | llama | minilm | a Hugging Face causal LM name or path")
    _add(d, "emb_pickle", None, "the authors' embeddings_alpaca_globalqa.pkl (runs code: trusted files only)")
    _add(d, "cache_dir", None, "embedding cache (default ~/.cache/plurallm/embeddings or $PLURALLLM_CACHE_DIR)")
    _add(d, "emb_device", "auto", "device for computing embeddings")
    _add(d, "emb_batch_size", 16, "texts per forward pass when embedding")
    _add(d, "emb_dtype", "fp32", "LLM dtype when embedding", choices=("fp32", "bf16", "fp16"))
    _add(d, "emb_load_in_8bit", False, "load the LLM in 8 bits (bitsandbytes, CUDA)")
