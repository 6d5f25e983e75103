"""Analytic FLOPs of GPO: what the benchmark reports as achieved GFLOP/s, and the cost estimate the threads client
engine schedules by (largest client first).

Matrix products only: biases, LayerNorm, softmax, activations, the loss and Adam grow as T·d, not T·d².
benchmarks/README.md gives the table; tests/test_bench.py checks it by hand and against torch's FlopCounterMode."""
from __future__ import annotations

TRAIN_FACTOR = 3  # forward + backward ≈ 3 forward passes (backward = grads of inputs and of weights)


def layer_macs(cfg, n_query: int, n_ctx: int) -> int:
    """One ContextAttentionLayer whose queries are n_query tokens and keys the n_ctx context tokens."""
    d, ff = cfg.d_model, cfg.dim_feedforward
    return (n_query * d * d                # Q projection
            + 2 * n_ctx * d * d            # K and V projections, context tokens only
            + 2 * n_query * n_ctx * d      # scores Q·Kᵀ and the weighted sum of V, over all heads
            + n_query * d * d              # output projection
            + 2 * n_query * d * ff)        # feed-forward, two linears


def forward_macs(cfg, n_ctx: int, n_tgt: int) -> int:
    """Multiply-adds of one GPO forward pass on one episode of n_ctx context and n_tgt target points (the last
    layer computes target rows only: GPO.encode_targets)."""
    d, ff, tokens = cfg.d_model, cfg.dim_feedforward, n_ctx + n_tgt
    embedder = tokens * ((cfg.dim_x + cfg.dim_y) * d + (cfg.emb_depth - 1) * d * d)
    if cfg.context_answer == "product":  # (y·x)·W_p, context points only
        embedder += n_ctx * cfg.dim_x * d
    if cfg.context_factors:  # the factor head x -> (c, B), on every point
        embedder += tokens * (cfg.dim_x * d + d * (1 + cfg.context_factors))
    layers = (cfg.num_layers - 1) * layer_macs(cfg, tokens, n_ctx) + layer_macs(cfg, n_tgt, n_ctx)
    predictor = n_tgt * (d * ff + ff * 2 * cfg.dim_y)
    return embedder + layers + predictor


def train_flops(cfg, n_ctx: int, n_tgt: int) -> int:
    """FLOPs of one training step, 2 per multiply-add: TRAIN_FACTOR forward passes' worth for
    every product, except x·W_x, whose backward is the weight gradient alone (2 passes)."""
    first = (n_ctx + n_tgt) * cfg.dim_x * cfg.d_model  # x·W_x: its input (the data) needs no gradient
    return 2 * (TRAIN_FACTOR * (forward_macs(cfg, n_ctx, n_tgt) - first) + 2 * first)
