"""Command-line flags shared by main_fl.py and main_centralized.py.

Names follow the authors' released code; defaults follow the paper (method.md), and the
README's flag table says where the two differ.
"""
from __future__ import annotations

import argparse

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
    """Adds "(default: X)" only to help that does not state its default already (it said both)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


def build_parser(method: str) -> argparse.ArgumentParser:
    """method: 'fedavg' or 'centralized' (decides a few flags and the description)."""
    desc = {"fedavg": "Train GPO with FedAvg: one client per training group (PluralLLM).",
            "centralized": "Train GPO on the training groups' pooled data (the centralized baseline)."}[method]
    p = argparse.ArgumentParser(description=desc, formatter_class=DefaultsOnce)

    d = p.add_argument_group("data")
    add_source_arguments(d)
    d.add_argument("--split_seed", type=int, default=None,
                   help="seed of the --group_split draw (default: --seed); fix it to vary only training over seeds")
    d.add_argument("--data_split", type=float, default=0.9,
                   help="share of each training group's questions (qkey order) used for local training")
    d.add_argument("--question_split", type=float, default=0.0,
                   help="leakage-free protocol: hold out this seeded fraction of all questions (the same for "
                        "every group, drawn from --split_seed) from all training; groups are scored only on "
                        "them, evaluation contexts come from the rest (0 = the paper's split; replaces "
                        "--data_split when > 0)")
    add_embedding_arguments(d)
    s = p.add_argument_group("synthetic data (--dataset synthetic)")
    s.add_argument("--syn_groups", type=int, default=14, help="number of groups")
    s.add_argument("--syn_questions", type=int, default=200, help="questions per group")
    s.add_argument("--syn_min_options", type=int, default=2, help="fewest options per question")
    s.add_argument("--syn_max_options", type=int, default=7, help="most options per question")
    s.add_argument("--syn_dim", type=int, default=64, help="embedding dimension")
    s.add_argument("--syn_seed", type=int, default=0, help="seed of the generated data (kept apart from --seed)")
    s.add_argument("--syn_beta", type=float, default=1.0,
                   help="strength of each group's own preference (only in-context inference can predict it)")
    s.add_argument("--syn_gamma", type=float, default=1.0,
                   help="strength of the preference shared by all groups (what a consensus lookup captures)")

    m = p.add_argument_group("model (GPO, method.md §3)")
    m.add_argument("--d_model", type=int, default=128, help="transformer width")
    m.add_argument("--emb_depth", type=int, default=4, help="linear layers in the input embedder")
    m.add_argument("--dim_feedforward", type=int, default=128, help="feed-forward width")
    m.add_argument("--nhead", type=int, default=4, help="attention heads")
    m.add_argument("--num_layers", type=int, default=6, help="transformer layers")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout")
    m.add_argument("--bound_std", action="store_true", help="std = 0.05 + 0.95·softplus instead of exp")
    m.add_argument("--layer_init", default="independent", choices=LAYER_INITS,
                   help="independent: each transformer layer drawn on its own (paper); clones: every layer starts "
                        "as a copy of the first (released code: nn.TransformerEncoder deep-copies its layer)")
    m.add_argument("--context_answer", default="concat", choices=CONTEXT_ANSWERS,
                   help="how a context answer y enters the embedder: concat = [x, y] (the paper); product = "
                        "[x, y, y·x], the answer also scales a copy of the option embedding (issue 26, "
                        "docs/group_use.md). Default concat")
    m.add_argument("--context_factors", type=int, default=0,
                   help="F > 0: add F in-context factors, a head x -> (c(x), B(x)) whose loadings are the ridge fit "
                        "of the context answers' residuals y - softmax(c) on B, added to the target logits as "
                        "B(x)·a (issue 26, docs/group_use.md). Default 0 (off, the paper)")
    m.add_argument("--factor_ridge", type=float, default=1e-2,
                   help="ridge penalty of the context factors' loadings. Default 0.01")
    m.add_argument("--loss_reduction", default="sum", choices=LOSS_REDUCTIONS,
                   help="sum: negative log-likelihood summed over target points, mean over episodes (GPO's "
                        "objective); slot_mean: divided by every padded target slot (released code)")

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
                   help="flags: the four episode bounds as given (paper); code: scaled by --data_split and "
                        "truncated (10..100 -> 9..90 at 0.9), as the released code does")
    t.add_argument("--virtual_tilt", type=float, default=0.0,
                   help="train on virtual groups: each training episode's answers (context and targets) tilted "
                        "by exp(tilt·z) along a random direction of the embedding space, new every episode, so "
                        "that only the context answers say which group it is (issue 26, docs/group_use.md). "
                        "0 = the real groups (the paper, default)")
    t.add_argument("--grad_clip", type=float, default=0.0,
                   help="largest L2 norm of the gradient of one local step, clipped above it (0 = off, the paper)")
    t.add_argument("--train_batch_size", type=int, default=32,
                   help="groups per step in --central_mode batched")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16 runs the model's matmuls under autocast (loss and softmax stay fp32)")
    if method == "fedavg":
        t.add_argument("--comm_round", type=int, default=1300, help="communication rounds (paper: 1300)")
        t.add_argument("--epochs", type=int, default=6, help="local steps per client per round")
        t.add_argument("--client_fraction", type=float, default=1.0, help="share of training clients sampled per round")
        t.add_argument("--weighting", default="dataset_size", choices=WEIGHTINGS,
                       help="FedAvg weights: dataset_size (paper), episode_points (released code), uniform")
        t.add_argument("--client_engine", default="auto", choices=CLIENT_ENGINES,
                       help="how the sampled clients' local steps run: one after another (loop) or side by side "
                            "on one thread each (threads); auto = threads on a CPU where torch uses more than one "
                            "thread, else loop")
        t.add_argument("--client_workers", type=int, default=0,
                       help="with --client_engine threads: worker threads (0 = torch's intra-op thread count)")
        t.add_argument("--save_client", action="store_true", help="also save each client's locally trained weights of the last round at every checkpoint (checkpoints/clients/)")
        t.add_argument("--also_centralized", action="store_true",
                       help="then train the centralized baseline in the same process (its own run folder)")
    t.add_argument("--central_epochs", type=int, default=1300, help="centralized epochs (paper: 1300)")
    t.add_argument("--central_mode", default="sequential", choices=CENTRAL_MODES,
                   help="sequential: one step per group per epoch (paper); batched: one step per batch (released code)")
    t.add_argument("--central_steps", type=int, default=1,
                   help="centralized: steps per training group (sequential) or per batch (batched) in each epoch, "
                        "each on its own episode; --central_steps = --epochs matches a FedAvg round's gradient steps")

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

    if method == "fedavg":
        add_strategy_arguments(p.add_argument_group("aggregation strategy (federated/strategies.py, README: Strategies)"))
        add_attack_arguments(p.add_argument_group("simulated Byzantine clients (federated/attacks.py)"))
        add_privacy_arguments(p.add_argument_group("client-level differential privacy (federated/privacy.py)"))
        f = p.add_argument_group("federation engine (flower_app/, docs/federation.md)")
        f.add_argument("--engine", default="inprocess", choices=("inprocess", "flower"),
                       help="inprocess: every client in this process; flower: every group a Flower node, "
                            "here on Flower's simulation runtime (one machine; virtual clients in threads, "
                            "or Ray workers with --sim_backend ray)")
        f.add_argument("--min_clients", type=int, default=1,
                       help="fewest training clients whose replies a round aggregates; a round with fewer "
                            "stops the run with an error (inprocess: checked against the sample size)")
        f.add_argument("--round_timeout", type=float, default=0.0,
                       help="flower: seconds the server waits for a round's replies before leaving the "
                            "silent clients out (0 = until every node replies or the SuperLink reports it gone)")
        f.add_argument("--node_wait", type=float, default=120.0,
                       help="flower: seconds to wait for every group's node to connect and load its data")
        f.add_argument("--sim_backend", default="thread", choices=("thread", "ray"),
                       help="flower simulation: run the virtual clients in threads of this process (no Ray, "
                            "no ports) or in Ray worker processes (Ray's servers listen on every interface)")
        f.add_argument("--sim_client_cpus", type=float, default=1.0,
                       help="flower simulation: CPU cores per virtual client (sets how many run at once: cores / this)")
        f.add_argument("--sim_client_gpus", type=float, default=0.0,
                       help="flower simulation, ray backend: GPUs reserved per virtual client (0.25 shares one GPU by 4)")
        add_secagg_arguments(f)

    o = p.add_argument_group("output")
    o.add_argument("--out_dir", default=None, help="run folder (default runs/<timestamp>_<method>_s<seed>)")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir (or the newest run under runs/ with the same "
                        "configuration) from its latest checkpoint")
    o.add_argument("--wandb", default="auto", choices=("auto", "online", "offline", "off"),
                   help="Weights & Biases: online when logged in (auto), offline files, or nothing")
    o.add_argument("--wndb_project_name", default="plurallm", help="W&B project")
    o.add_argument("--quiet", action="store_true", help="print less (no per-group load lines)")
    o.add_argument("--log_every", type=int, default=10,
                   help="when stderr is not a terminal (nohup, job scripts): print a progress line every N rounds "
                        "and at every evaluation (0 = only at evaluations)")
    o.add_argument("--keep_checkpoints", type=int, default=3,
                   help="resumable checkpoints kept (the newest N; older ones are deleted), besides final and best")
    o.add_argument("--keep_best", action="store_true",
                   help="also keep the checkpoint of the best mean evaluation alignment (checkpoints/best.json)")
    o.add_argument("--no_plots", action="store_true", help="do not write loss.png and alignment.png into the run folder")
    return p



def group_names(text: str) -> list[str]:
    """A group flag's value: names split at commas, or at semicolons when any name holds a
    comma ('$100,000 or more; Black'). An empty list is refused."""
    sep = ";" if ";" in text else ","
    names = [g.strip() for g in text.split(sep) if g.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no group; list at least one, or leave "
                                         "the flag out for the default groups")
    return names


def add_source_arguments(d, datasets=DATASETS, required: bool = False) -> None:
    """Which data set, where its files are, and which groups it is parsed for (also the embed CLI's)."""
    d.add_argument("--dataset", default=argparse.SUPPRESS if required else "globalqa", required=required, choices=datasets,
                   help="survey data set")
    d.add_argument("--data_path", default=None,
                   help="globalqa: the hub CSV (else $PLURALLLM_GLOBALQA_CSV, else download); "
                        "opinionqa: the human_resp folder (else $PLURALLLM_OPINIONQA_DIR)")
    d.add_argument("--strict", action="store_true", help="stop at the first unparsable row instead of skipping it")
    d.add_argument("--encoding", default="utf-8",
                   help="text encoding of the globalqa CSV (e.g. latin-1 for a file saved by a spreadsheet)")
    d.add_argument("--train_groups", type=group_names, default=None,
                   help="comma-separated training groups (use ';' when a name holds a comma) "
                        "(default: the paper's 8 countries for globalqa)")
    d.add_argument("--eval_groups", type=group_names, default=None,
                   help="comma-separated held-out evaluation groups (default: the paper's 6 for globalqa)")
    d.add_argument("--group_split", type=float, default=None,
                   help="seeded random train share of the groups instead of fixed lists "
                        "(opinionqa and synthetic default to 0.6)")


def add_embedding_arguments(d) -> None:
    """How option texts become vectors (also the embed CLI's)."""
    d.add_argument("--emb_model", default="auto",
                   help="auto | alpaca | llama | minilm | a Hugging Face causal LM name or path")
    d.add_argument("--emb_pickle", default=None, help="the authors' embeddings_alpaca_globalqa.pkl (runs code: trusted files only)")
    d.add_argument("--cache_dir", default=None, help="embedding cache (default ~/.cache/plurallm/embeddings or $PLURALLLM_CACHE_DIR)")
    d.add_argument("--emb_device", default="auto", help="device for computing embeddings")
    d.add_argument("--emb_batch_size", type=int, default=16, help="texts per forward pass when embedding")
    d.add_argument("--emb_dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="LLM dtype when embedding")
    d.add_argument("--emb_load_in_8bit", action="store_true", help="load the LLM in 8 bits (bitsandbytes, CUDA)")


def add_strategy_arguments(group) -> None:
    """--strategy and its knobs (federated/strategies.py)."""
    g = group
    g.add_argument("--strategy", default="fedavg", choices=STRATEGIES,
                   help="server aggregation: fedavg (paper), fedprox (fedavg + a proximal term in the local loss), "
                        "qfedavg (q-FFL: --weighting tilted by F^q), adaptive (weights from held-out alignment "
                        "history), trimmed_mean, median (the last three ignore --weighting)")
    g.add_argument("--proximal_mu", type=float, default=0.01,
                   help="fedprox: mu of the local term (mu/2)·||w - w_global||²")
    g.add_argument("--qffl_q", type=float, default=0.1,
                   help="qfedavg: fairness exponent q of p_k ∝ ω_k·F_k^q, F_k = 1 - held-out alignment (default 0.1; "
                        "0 = fedavg; larger favours worse-aligned clients)")
    g.add_argument("--adaptive_temperature", type=float, default=0.1,
                   help="adaptive: softmax temperature T over (1 - mean held-out alignment)")
    g.add_argument("--adaptive_window", type=int, default=5,
                   help="adaptive: rounds of each client's held-out alignment history averaged")
    g.add_argument("--trim_fraction", type=float, default=0.2,
                   help="trimmed_mean: share beta of values dropped at each end per coordinate (floor(beta·n))")
    g.add_argument("--max_weight_ratio", type=float, default=DEFAULT_MAX_WEIGHT_RATIO,
                   help="qfedavg/adaptive: no client's weight exceeds this multiple of its FedAvg weight (adaptive: "
                        f"of 1/n), the excess going to the others (default {DEFAULT_MAX_WEIGHT_RATIO}; caps what a "
                        "client lying about its score can gain)")
    g.add_argument("--server_opt", default="none", choices=SERVER_OPTS,
                   help="server optimizer on the aggregate's delta (FedOpt): none (plain aggregate), sgd, adam, yogi")
    g.add_argument("--server_lr", type=float, default=None,
                   help="server learning rate (default: sgd 1.0 = FedAvg, adam/yogi 1e-3)")
    g.add_argument("--server_beta1", type=float, default=0.9, help="adam/yogi: first-moment decay")
    g.add_argument("--server_beta2", type=float, default=0.99, help="adam/yogi: second-moment decay")
    g.add_argument("--server_tau", type=float, default=1e-3, help="adam/yogi: adaptivity tau added to sqrt(v)")


def add_attack_arguments(group) -> None:
    """--byzantine and the attack it runs (federated/attacks.py)."""
    group.add_argument("--byzantine", type=int, default=0,
                       help="number of Byzantine training clients, drawn once from --seed (0 = none)")
    group.add_argument("--attack", default="sign_flip", choices=ATTACKS,
                       help="what a Byzantine client sends (default sign_flip): sign_flip w - c(w_k - w), scale "
                            "w + c(w_k - w), gaussian w_k + N(0, std²), alie w + μ - z·σ of the honest updates "
                            "(Baruch et al. 2019), ipm w - ε·μ (Xie et al. 2020), report_score its honest weights "
                            "with a false held-out alignment (--attack_report)")
    group.add_argument("--attack_scale", type=float, default=10.0,
                       help="c of sign_flip and scale (10 ≈ the number of clients: enough for one attacker "
                            "to outweigh FedAvg's 1/n)")
    group.add_argument("--attack_std", type=float, default=1.0,
                       help="gaussian: noise std per coordinate (far above one round's update, ~1e-3)")
    group.add_argument("--attack_eps", type=float, default=0.5,
                       help="ipm: ε of w - ε·μ (default 0.5: inside the honest range, against median and trimmed "
                            "mean; about 100 defeats the plain mean)")
    group.add_argument("--attack_report", type=float, default=0.0,
                       help="report_score: the held-out alignment the attacker reports (default 0.0: it claims "
                            "to be the worst-served group, to draw qfedavg's and adaptive's weight)")


def add_privacy_arguments(group) -> None:
    """--dp and its knobs (federated/privacy.py)."""
    group.add_argument("--dp", action="store_true",
                       help="client-level DP-FedAvg: clip each client's update to --dp_clip, average uniformly, "
                            "add Gaussian noise (needs --weighting uniform and --strategy fedavg or fedprox)")
    group.add_argument("--dp_clip", type=float, default=0.5,
                       help="S: largest L2 norm of one client's update over all weights (set near the median "
                            "unclipped norm the log reports)")
    group.add_argument("--dp_noise", type=float, default=None,
                       help="z: noise std on the mean update is z·S/m (default: solved from --dp_epsilon)")
    group.add_argument("--dp_epsilon", type=float, default=None,
                       help="privacy budget ε over all --comm_round rounds: refuses a run that would exceed it "
                            "and stops before a round that would")
    group.add_argument("--dp_delta", type=float, default=1e-5,
                       help="δ of (ε, δ)-DP, well below 1/(number of clients)")
    group.add_argument("--dp_clip_quantile", type=float, default=None,
                       help="adaptive clipping (Andrew et al. 2021): move the clip norm each round toward this "
                            "quantile of the clients' update norms, starting at --dp_clip (default: fixed clip)")
    group.add_argument("--dp_clip_lr", type=float, default=0.2,
                       help="adaptive clipping: η of the geometric update C <- C·exp(-η(b - γ)) (default 0.2, the paper's)")
    group.add_argument("--dp_clip_count_std", type=float, default=None,
                       help="adaptive clipping: noise std σ_b on the count of unclipped updates (default m/20); "
                            "must exceed z/2")
    group.add_argument("--dp_secure_noise", action=argparse.BooleanOptionalAction, default=None,
                       help="draw the DP noise from the operating system's cryptographically secure randomness "
                            "(Opacus secure_mode), never stored and not reproducible, instead of from --seed, "
                            "which anyone with the run's config.json can regenerate and subtract (default: on in "
                            "a Flower deployment, off in-process and in simulation)")


def share_count(text: str) -> int | float:
    """An integer count (as Flower takes it), or a fraction of the sampled clients when it has a dot."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor a fraction such as 0.5") from None


def add_secagg_arguments(group) -> None:
    """--secagg and its knobs (flower_app/secagg.py), in the federation engine group."""
    group.add_argument("--secagg", action="store_true",
                       help="flower: secure aggregation with Flower's SecAgg+: the server sees only the sum of "
                            "masked, quantised client weights, never one client's (docs/federation.md)")
    group.add_argument("--secagg_num_shares", type=share_count, default=1.0,
                       help="secagg: how many clients hold a share of each client's secrets: an integer >= 3, or "
                            "a fraction of the sampled clients (1.0: every sampled client)")
    group.add_argument("--secagg_threshold", type=share_count, default=0.67,
                       help="secagg: shares needed to rebuild a secret (the most clients that may drop out is "
                            "shares - threshold; fewer than threshold colluding clients learn nothing): an "
                            "integer >= 2 below --secagg_num_shares, or a fraction of it (at least 2 either way)")
    group.add_argument("--secagg_clip_range", type=float, default=DEFAULT_CLIP_RANGE,
                       help="secagg: every weight, times its client's aggregation weight / the largest one, must "
                            "lie in [-R, R] (a client outside it stops the run); the quantisation step is "
                            "2R / --secagg_quant_range")
    group.add_argument("--secagg_quant_range", type=int, default=DEFAULT_QUANT_RANGE,
                       help="secagg: integer levels a weight is quantised to; clients x levels must stay below "
                            "2**32 (default 2**22: 1023 clients)")

