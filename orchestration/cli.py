"""Every command-line flag of main_fl.py and main_centralized.py (and the embed command's data flags).

Names follow the authors' released code; defaults follow the paper (method.md), and the
README's flag table says where the two differ.
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


def build_parser(method: str) -> argparse.ArgumentParser:
    """method: 'fedavg' or 'centralized' (decides a few flags and the description)."""
    desc = {"fedavg": "Train GPO with FedAvg: one client per training group (PluralLLM).",
            "centralized": "Train GPO on the training groups' pooled data (the centralized baseline)."}[method]
    p = argparse.ArgumentParser(description=desc, formatter_class=DefaultsOnce)
    fedavg = method == "fedavg"

    d = p.add_argument_group("data")
    add_source_arguments(d)
    d.add_argument("--split_seed", type=int, default=None,
                   help="seed of the --group_split draw (default: --seed); fix it to vary only training over seeds")
    d.add_argument("--data_split", type=float, default=0.9,
                   help="share of each training group's questions (qkey order) used for local training")
    d.add_argument("--question_split", type=float, default=0.0,
                   help="leakage-free protocol: hold this share of all questions (drawn from --split_seed) out of all "
                        "training and score the groups on them alone (0 = the paper's split; replaces --data_split)")
    d.add_argument("--question_ids", action="store_true",
                   help="append a one-hot question identity to the option embeddings (issue 26; the paper: off); "
                        "questions held out by --question_split get none")
    add_embedding_arguments(d)
    s = p.add_argument_group("synthetic data (--dataset synthetic)")
    s.add_argument("--syn_groups", type=int, default=14, help="number of groups")
    s.add_argument("--syn_questions", type=int, default=200, help="questions per group")
    s.add_argument("--syn_min_options", type=int, default=2, help="fewest options per question")
    s.add_argument("--syn_max_options", type=int, default=7, help="most options per question")
    s.add_argument("--syn_dim", type=int, default=64, help="embedding dimension")
    s.add_argument("--syn_seed", type=int, default=0, help="seed of the generated data (kept apart from --seed)")
    s.add_argument("--syn_beta", type=float, default=1.0, help="strength of each group's own preference")
    s.add_argument("--syn_gamma", type=float, default=1.0, help="strength of the preference all groups share")

    m = p.add_argument_group("model (GPO, method.md §3)")
    m.add_argument("--d_model", type=int, default=128, help="transformer width")
    m.add_argument("--emb_depth", type=int, default=4, help="linear layers in the input embedder")
    m.add_argument("--dim_feedforward", type=int, default=128, help="feed-forward width")
    m.add_argument("--nhead", type=int, default=4, help="attention heads")
    m.add_argument("--num_layers", type=int, default=6, help="transformer layers")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout")
    m.add_argument("--bound_std", action="store_true", help="std = 0.05 + 0.95·softplus instead of exp")
    m.add_argument("--layer_init", default="independent", choices=LAYER_INITS,
                   help="independent: each layer drawn on its own (paper); clones: copies of the first (released code)")
    m.add_argument("--context_answer", default="concat", choices=CONTEXT_ANSWERS,
                   help="a context answer y enters the embedder as [x, y] (concat, paper) or [x, y, y·x] (product)")
    m.add_argument("--context_factors", type=int, default=0,
                   help="F > 0: F in-context factors fitted by ridge on the context answers (docs/group_use.md)")
    m.add_argument("--factor_ridge", type=float, default=1e-2, help="ridge penalty of the context factors' loadings")
    m.add_argument("--loss_reduction", default="sum", choices=LOSS_REDUCTIONS,
                   help="sum: NLL summed over target points (GPO); slot_mean: over padded slots (released code)")

    t = p.add_argument_group("training")
    t.add_argument("--seed", type=int, default=0,
                   help="controls model init, episodes, client sampling and random group splits")
    t.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    t.add_argument("--num_steps", type=int, default=100, help="T_max of the cosine learning-rate schedule (in steps)")
    t.add_argument("--max_ctx_num_qs", type=int, default=100, help="most context questions per episode")
    t.add_argument("--min_ctx_num_qs", type=int, default=10, help="fewest context questions per episode")
    t.add_argument("--max_tar_num_qs", type=int, default=100, help="most target questions per episode")
    t.add_argument("--min_tar_num_qs", type=int, default=10, help="fewest target questions per episode")
    t.add_argument("--episode_bounds", default="flags", choices=("flags", "code"),
                   help="flags: the episode bounds as given (paper); code: scaled by --data_split (released code)")
    t.add_argument("--virtual_tilt", type=float, default=0.0,
                   help="train on virtual groups: each episode's answers tilted by exp(tilt·z) along a new random "
                        "direction of the embedding space (0 = the real groups; docs/group_use.md)")
    t.add_argument("--grad_clip", type=float, default=0.0,
                   help="largest L2 norm of one local step's gradient (0 = off, the paper)")
    t.add_argument("--train_batch_size", type=int, default=32, help="groups per step in --central_mode batched")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    if fedavg:
        t.add_argument("--comm_round", type=int, default=1300, help="communication rounds (paper: 1300)")
        t.add_argument("--epochs", type=int, default=6, help="local steps per client per round")
        t.add_argument("--client_fraction", type=float, default=1.0, help="share of training clients sampled per round")
        t.add_argument("--weighting", default="dataset_size", choices=WEIGHTINGS,
                       help="FedAvg weights: dataset_size (paper), episode_points (released code), uniform")
        t.add_argument("--client_engine", default="auto", choices=CLIENT_ENGINES,
                       help="the sampled clients' local steps one after another (loop) or on one thread each "
                            "(threads); auto = threads where torch uses more than one CPU thread")
        t.add_argument("--client_workers", type=int, default=0,
                       help="with --client_engine threads: worker threads (0 = torch's intra-op thread count)")
        t.add_argument("--save_client", action="store_true", help="also save each client's locally trained weights "
                       "of the last round at every checkpoint (checkpoints/clients/)")
        t.add_argument("--also_centralized", action="store_true",
                       help="then train the centralized baseline in the same process (its own run folder)")
    t.add_argument("--central_epochs", type=int, default=1300, help="centralized epochs (paper: 1300)")
    t.add_argument("--central_mode", default="sequential", choices=CENTRAL_MODES,
                   help="sequential: one step per group per epoch (paper); batched: one step per batch (released code)")
    t.add_argument("--central_steps", type=int, default=1,
                   help="centralized: steps per group (sequential) or batch (batched) per epoch; = --epochs matches "
                        "a FedAvg round's gradient steps")

    e = p.add_argument_group("evaluation")
    e.add_argument("--federated_eval", type=int, default=10, help="FedAvg: evaluate every N rounds")
    e.add_argument("--eval_freq", type=int, default=10, help="centralized: evaluate every N epochs")
    e.add_argument("--eval_num_qs", type=int, default=20, help="context questions given to a group at evaluation")
    e.add_argument("--eval_seed", type=int, default=0, help="seed of the evaluation context questions")
    e.add_argument("--eval_resample", action="store_true",
                   help="redraw evaluation contexts at every evaluation (released code) instead of once")
    e.add_argument("--eval_batch_size", type=int, default=0,
                   help="target questions per evaluation forward pass (0 = all of a group's at once)")
    e.add_argument("--metric", default="auto", choices=("auto", *METRICS), help=f"auto: {auto_rule()}")

    if fedavg:
        g = p.add_argument_group("aggregation strategy (federated/strategies.py, README: Strategies)")
        g.add_argument("--strategy", default="fedavg", choices=STRATEGIES,
                       help="server aggregation: fedavg (paper), fedprox, qfedavg (q-FFL), adaptive (weights from "
                            "held-out alignment), trimmed_mean, median (the last three ignore --weighting)")
        g.add_argument("--proximal_mu", type=float, default=0.01,
                       help="fedprox: mu of the local term (mu/2)·||w - w_global||²")
        g.add_argument("--qffl_q", type=float, default=0.1,
                       help="qfedavg: q of p_k ∝ ω_k·F_k^q, F_k = 1 - held-out alignment (0 = fedavg)")
        g.add_argument("--adaptive_temperature", type=float, default=0.1,
                       help="adaptive: softmax temperature T over (1 - mean held-out alignment)")
        g.add_argument("--adaptive_window", type=int, default=5,
                       help="adaptive: rounds of each client's held-out alignment history averaged")
        g.add_argument("--trim_fraction", type=float, default=0.2,
                       help="trimmed_mean: share beta of values dropped at each end per coordinate (floor(beta·n))")
        g.add_argument("--max_weight_ratio", type=float, default=DEFAULT_MAX_WEIGHT_RATIO,
                       help="qfedavg/adaptive: cap on a client's weight, as a multiple of its FedAvg weight (or 1/n)")
        g.add_argument("--server_opt", default="none", choices=SERVER_OPTS,
                       help="server optimizer on the aggregate's delta (FedOpt): none (plain aggregate), sgd, adam, yogi")
        g.add_argument("--server_lr", type=float, default=None,
                       help="server learning rate (default: sgd 1.0 = FedAvg, adam/yogi 1e-3)")
        g.add_argument("--server_beta1", type=float, default=0.9, help="adam/yogi: first-moment decay")
        g.add_argument("--server_beta2", type=float, default=0.99, help="adam/yogi: second-moment decay")
        g.add_argument("--server_tau", type=float, default=1e-3, help="adam/yogi: adaptivity tau added to sqrt(v)")

        a = p.add_argument_group("simulated Byzantine clients (federated/attacks.py)")
        a.add_argument("--byzantine", type=int, default=0,
                       help="number of Byzantine training clients, drawn once from --seed (0 = none)")
        a.add_argument("--attack", default="sign_flip", choices=ATTACKS,
                       help="what a Byzantine client sends: sign_flip w - c(w_k - w), scale w + c(w_k - w), gaussian "
                            "w_k + N(0, std²), alie, ipm, report_score (a false held-out alignment); README: Strategies")
        a.add_argument("--attack_scale", type=float, default=10.0, help="c of sign_flip and scale")
        a.add_argument("--attack_std", type=float, default=1.0, help="gaussian: noise std per coordinate")
        a.add_argument("--attack_eps", type=float, default=0.5, help="ipm: ε of w - ε·μ")
        a.add_argument("--attack_report", type=float, default=0.0,
                       help="report_score: the held-out alignment the attacker reports")

        v = p.add_argument_group("client-level differential privacy (federated/privacy.py)")
        v.add_argument("--dp", action="store_true",
                       help="DP-FedAvg: clip each client's update to --dp_clip, average uniformly, add Gaussian "
                            "noise (needs --weighting uniform and --strategy fedavg or fedprox)")
        v.add_argument("--dp_clip", type=float, default=0.5,
                       help="S: largest L2 norm of one client's update (near the median norm the log reports)")
        v.add_argument("--dp_noise", type=float, default=None,
                       help="z: noise std on the mean update is z·S/m (default: solved from --dp_epsilon)")
        v.add_argument("--dp_epsilon", type=float, default=None,
                       help="privacy budget ε over all --comm_round rounds; a run that would exceed it is refused")
        v.add_argument("--dp_delta", type=float, default=1e-5, help="δ of (ε, δ)-DP, well below 1/(number of clients)")
        v.add_argument("--dp_clip_quantile", type=float, default=None,
                       help="adaptive clipping toward this quantile of the update norms (default: fixed clip)")
        v.add_argument("--dp_clip_lr", type=float, default=0.2,
                       help="adaptive clipping: η of the update C <- C·exp(-η(b - γ))")
        v.add_argument("--dp_clip_count_std", type=float, default=None,
                       help="adaptive clipping: noise std on the count of unclipped updates (default m/20; > z/2)")
        v.add_argument("--dp_secure_noise", action=argparse.BooleanOptionalAction, default=None,
                       help="draw the DP noise from the OS's secure randomness, not from --seed (which anyone with "
                            "config.json can replay) (default: on in a Flower deployment, else off)")

        f = p.add_argument_group("federation engine (flower_app/, docs/federation.md)")
        f.add_argument("--engine", default="inprocess", choices=("inprocess", "flower"),
                       help="inprocess: every client in this process; flower: every group a Flower node on Flower's "
                            "simulation runtime (virtual clients in threads, or Ray workers with --sim_backend ray)")
        f.add_argument("--min_clients", type=int, default=1,
                       help="fewest training clients whose replies a round aggregates; fewer stop the run")
        f.add_argument("--round_timeout", type=float, default=0.0,
                       help="flower: seconds to wait for a round's replies before leaving silent clients out (0 = all)")
        f.add_argument("--node_wait", type=float, default=120.0,
                       help="flower: seconds to wait for every group's node to connect and load its data")
        f.add_argument("--sim_backend", default="thread", choices=("thread", "ray"),
                       help="flower simulation: virtual clients in threads of this process or in Ray workers")
        f.add_argument("--sim_client_cpus", type=float, default=1.0,
                       help="flower simulation: CPU cores per virtual client (cores / this run at once)")
        f.add_argument("--sim_client_gpus", type=float, default=0.0,
                       help="flower simulation, ray backend: GPUs reserved per virtual client")
        f.add_argument("--secagg", action="store_true",
                       help="flower: Flower's SecAgg+: the server sees only the sum of the masked, quantised weights")
        f.add_argument("--secagg_num_shares", type=share_count, default=1.0,
                       help="secagg: clients holding shares of each secret: an integer >= 3, or a share of the clients")
        f.add_argument("--secagg_threshold", type=share_count, default=0.67,
                       help="secagg: shares needed to rebuild a secret: an integer >= 2, or a fraction of the shares")
        f.add_argument("--secagg_clip_range", type=float, default=DEFAULT_CLIP_RANGE,
                       help="secagg: every weight, scaled by its client's aggregation weight, must lie in [-R, R]")
        f.add_argument("--secagg_quant_range", type=int, default=DEFAULT_QUANT_RANGE,
                       help="secagg: integer levels a weight is quantised to (clients x levels < 2**32)")

    o = p.add_argument_group("output")
    o.add_argument("--out_dir", default=None, help="run folder (default runs/<timestamp>_<method>_s<seed>)")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir (or the newest run under runs/ with the same configuration)")
    o.add_argument("--wandb", default="auto", choices=("auto", "online", "offline", "off"),
                   help="Weights & Biases: online when logged in (auto), offline files, or nothing")
    o.add_argument("--wndb_project_name", default="plurallm", help="W&B project")
    o.add_argument("--quiet", action="store_true", help="print less (no per-group load lines)")
    o.add_argument("--log_every", type=int, default=10,
                   help="when stderr is not a terminal: a progress line every N rounds and at every evaluation")
    o.add_argument("--keep_checkpoints", type=int, default=3,
                   help="resumable checkpoints kept (the newest N), besides final and best")
    o.add_argument("--keep_best", action="store_true",
                   help="also keep the checkpoint of the best mean evaluation alignment (checkpoints/best.json)")
    o.add_argument("--no_plots", action="store_true", help="do not write loss.png and alignment.png into the run folder")
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
    d.add_argument("--data_path", default=None,
                   help="globalqa: the hub CSV (else $PLURALLLM_GLOBALQA_CSV, else download); "
                        "opinionqa: the human_resp folder (else $PLURALLLM_OPINIONQA_DIR)")
    d.add_argument("--strict", action="store_true", help="stop at the first unparsable row instead of skipping it")
    d.add_argument("--encoding", default="utf-8",
                   help="text encoding of the globalqa CSV (e.g. latin-1 for a file saved by a spreadsheet)")
    d.add_argument("--train_groups", type=group_names, default=None,
                   help="comma-separated training groups (';' when a name holds a comma) "
                        "(default: the paper's 8 countries for globalqa)")
    d.add_argument("--eval_groups", type=group_names, default=None,
                   help="comma-separated held-out evaluation groups (default: the paper's 6 for globalqa)")
    d.add_argument("--group_split", type=float, default=None,
                   help="seeded random train share of the groups (opinionqa and synthetic default to 0.6)")


def add_embedding_arguments(d) -> None:
    d.add_argument("--emb_model", default="auto",
                   help="auto | alpaca | llama | minilm | a Hugging Face causal LM name or path")
    d.add_argument("--emb_pickle", default=None,
                   help="the authors' embeddings_alpaca_globalqa.pkl (runs code: trusted files only)")
    d.add_argument("--cache_dir", default=None,
                   help="embedding cache (default ~/.cache/plurallm/embeddings or $PLURALLLM_CACHE_DIR)")
    d.add_argument("--emb_device", default="auto", help="device for computing embeddings")
    d.add_argument("--emb_batch_size", type=int, default=16, help="texts per forward pass when embedding")
    d.add_argument("--emb_dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="LLM dtype when embedding")
    d.add_argument("--emb_load_in_8bit", action="store_true", help="load the LLM in 8 bits (bitsandbytes, CUDA)")
