"""From parsed flags to the configs of local training and evaluation, the model and the metric.

Every process that trains or scores a group builds its configs here from the same flags: the
in-process engine, a Flower node, the reporting and the inference code.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_loaders.episodes import EpisodeSizes
from models.gpo import GPOConfig
from training.local import OptimConfig
from utils.distances import DEFAULT_METRIC, auto_metric


@dataclass(frozen=True)
class ClientConfig:
    seed: int = 0
    epochs: int = 6                 # local steps per round
    data_split: float = 0.9         # local training share of the group's questions (qkey order)
    sizes: EpisodeSizes = EpisodeSizes()
    optim: OptimConfig = OptimConfig()
    eval_num_qs: int = 20
    eval_seed: int = 0
    eval_resample: bool = False
    eval_batch_size: int = 0        # target questions per evaluation pass (0 = all)
    metric: str = DEFAULT_METRIC



def episode_sizes(args) -> EpisodeSizes:
    """The four bounds as given (paper), or scaled by --data_split as the released code does
    for local data (int(100·0.9) = 90, int(10·0.9) = 9), clients and centralized alike."""
    bounds = (args.min_ctx_num_qs, args.max_ctx_num_qs, args.min_tar_num_qs, args.max_tar_num_qs)
    if getattr(args, "episode_bounds", "flags") == "code":
        bounds = tuple(int(b * args.data_split) for b in bounds)
    return EpisodeSizes(*bounds, virtual_tilt=getattr(args, "virtual_tilt", 0.0))


def client_config(args, metric: str) -> ClientConfig:
    optim = OptimConfig(lr=args.lr, num_steps=args.num_steps, grad_clip=getattr(args, "grad_clip", 0.0))
    return ClientConfig(seed=args.seed, epochs=getattr(args, "epochs", 6), data_split=args.data_split,
                        sizes=episode_sizes(args), optim=optim,
                        eval_num_qs=args.eval_num_qs, eval_seed=args.eval_seed,
                        eval_resample=args.eval_resample, eval_batch_size=args.eval_batch_size, metric=metric)


def model_config(args, dim_x: int) -> GPOConfig:
    return GPOConfig(dim_x=dim_x, d_model=args.d_model, emb_depth=args.emb_depth,
                     dim_feedforward=args.dim_feedforward, nhead=args.nhead, dropout=args.dropout,
                     num_layers=args.num_layers, bound_std=args.bound_std, precision=args.precision,
                     layer_init=getattr(args, "layer_init", "independent"),
                     loss_reduction=getattr(args, "loss_reduction", "sum"),
                     context_answer=getattr(args, "context_answer", "concat"),
                     context_factors=getattr(args, "context_factors", 0),
                     factor_ridge=getattr(args, "factor_ridge", 1e-2))


def resolve_metric(args) -> str:
    if args.metric != "auto":
        return args.metric
    return auto_metric(args.dataset)
