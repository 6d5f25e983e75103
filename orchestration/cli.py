"""Command-line flags shared by main_fl.py and main_centralized.py.

Names follow the authors' released code; defaults follow the paper (method.md), and the
README's flag table says where the two differ.
"""
from __future__ import annotations

import argparse

from data_loaders.datasets import DATASETS, group_names
from federated.aggregation import WEIGHTINGS
from federated.attacks import add_attack_arguments
from federated.fedavg import CLIENT_ENGINES
from federated.privacy import add_privacy_arguments
from federated.strategies import add_strategy_arguments
from flower_app.secagg import add_secagg_arguments
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
    d.add_argument("--dataset", default="globalqa", choices=DATASETS, help="survey data set")
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
    d.add_argument("--split_seed", type=int, default=None,
                   help="seed of the --group_split draw (default: --seed); fix it to vary only training over seeds")
    d.add_argument("--data_split", type=float, default=0.9,
                   help="share of each training group's questions (qkey order) used for local training")
    d.add_argument("--question_split", type=float, default=0.0,
                   help="leakage-free protocol: hold out this seeded fraction of all questions (the same for "
                        "every group, drawn from --split_seed) from all training; groups are scored only on "
                        "them, evaluation contexts come from the rest (0 = the paper's split; replaces "
                        "--data_split when > 0)")
    d.add_argument("--emb_model", default="auto",
                   help="auto | alpaca | llama | minilm | a Hugging Face causal LM name or path")
    d.add_argument("--emb_pickle", default=None, help="the authors' embeddings_alpaca_globalqa.pkl (runs code: trusted files only)")
    d.add_argument("--cache_dir", default=None, help="embedding cache (default ~/.cache/plurallm/embeddings or $PLURALLLM_CACHE_DIR)")
    d.add_argument("--emb_device", default="auto", help="device for computing embeddings")
    d.add_argument("--emb_batch_size", type=int, default=16, help="texts per forward pass when embedding")
    d.add_argument("--emb_dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="LLM dtype when embedding")
    d.add_argument("--emb_load_in_8bit", action="store_true", help="load the LLM in 8 bits (bitsandbytes, CUDA)")
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
    m.add_argument("--model", default="gpo", choices=("gpo",), help="model family")
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
    t.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "bf16_input"),
                   help="bf16 runs the model's matmuls under autocast (loss and softmax stay fp32); "
                        "bf16_input keeps the option embeddings in bf16 and runs only their product with "
                        "the first layer (x·W_x and its weight gradient) in bf16, the rest in fp32")
    if method == "fedavg":
        t.add_argument("--comm_round", type=int, default=1300, help="communication rounds (paper: 1300)")
        t.add_argument("--epochs", type=int, default=6, help="local steps per client per round")
        t.add_argument("--client_fraction", type=float, default=1.0, help="share of training clients sampled per round")
        t.add_argument("--weighting", default="dataset_size", choices=WEIGHTINGS,
                       help="FedAvg weights: dataset_size (paper), episode_points (released code), uniform")
        t.add_argument("--client_engine", default="auto", choices=CLIENT_ENGINES,
                       help="how the sampled clients' local steps run: one after another (loop), side by side "
                            "on one thread each (threads), or as one batched computation over stacked client "
                            "weights (vmap); auto = threads on a CPU where torch uses more than one thread, else loop")
        t.add_argument("--client_workers", type=int, default=0,
                       help="with --client_engine threads: worker threads (0 = torch's intra-op thread count)")
        t.add_argument("--vmap_chunk", type=int, default=0,
                       help="with --client_engine vmap: clients per batched chunk to bound memory (0 = all)")
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


def args_from_config(config: dict, data_path: str | None = None, cache_dir: str | None = None) -> argparse.Namespace:
    """The flags a run was trained with, as a parsed Namespace (unknown keys ignored)."""
    args = build_parser("fedavg").parse_args([])
    for k, v in config.items():
        if hasattr(args, k):
            setattr(args, k, v)
    args.group_split = None  # train_groups / eval_groups in a config are already resolved lists
    if data_path:
        args.data_path = data_path
    if cache_dir:
        args.cache_dir = cache_dir
    emb = (config.get("data") or {}).get("embedding") or {}
    name = emb.get("model_id") if emb.get("emb_model") == "hf" else emb.get("emb_model")  # "hf": the id is the flag
    if name and name not in ("auto", "synthetic"):
        args.emb_model = name
    args.quiet, args.resume = True, False
    return args
