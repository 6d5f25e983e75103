"""Group selection, the synthetic generator, episode bounds, evaluation contexts, devices."""
import pytest
import torch

from data_loaders.datasets import choose_groups, split_groups
from data_loaders.episodes import choose_questions
from data_loaders.globalqa import EVAL_GROUPS, TRAIN_GROUPS
from data_loaders.schema import DataError, build_group_data
from data_loaders.synthetic import SyntheticSpec, make_synthetic
from training.config import ClientConfig
from training.evaluation import eval_split
from utils.device import resolve_device


def test_globalqa_default_is_the_fixed_split():
    assert choose_groups("globalqa", None, None, None, seed=0) == (TRAIN_GROUPS, EVAL_GROUPS)


def test_seeded_split_depends_only_on_seed():
    pool = [f"g{i}" for i in range(10)]
    a, b = split_groups(pool, 0.6, 3), split_groups(pool, 0.6, 3)
    assert a == b and len(a[0]) == 6 and len(a[1]) == 4 and not set(a[0]) & set(a[1])
    assert any(split_groups(pool, 0.6, s) != a for s in range(4, 8))
    with pytest.raises(DataError, match="--group_split"):
        split_groups(pool, 1.5, 0)


def test_named_groups_and_overlap():
    train, evals = choose_groups("globalqa", ["Japan", "China"], None, None, seed=0)
    assert train == ["Japan", "China"] and "Japan" not in evals and len(evals) == 12
    with pytest.raises(DataError, match=r"\['Japan'\] are in both"):
        choose_groups("globalqa", ["Japan", "China"], ["Japan"], None, seed=0)


def test_synthetic_is_deterministic_in_its_seed():
    spec = SyntheticSpec(num_groups=3, num_questions=5, dim=4, seed=7)
    (r1, x1), (r2, x2) = make_synthetic(spec), make_synthetic(spec)
    assert torch.equal(x1, x2) and r1.source_hash == r2.source_hash
    g = build_group_data(r1, "g00", x1)
    assert torch.equal(g.y, build_group_data(r2, "g00", x2).y)
    sums = torch.zeros(5).index_add(0, torch.repeat_interleave(torch.arange(5), g.sizes), g.y)
    assert torch.allclose(sums, torch.ones(5), atol=1e-6)
    _, x3 = make_synthetic(SyntheticSpec(num_groups=3, num_questions=5, dim=4, seed=8))
    assert not torch.equal(x1[: len(x3)], x3[: len(x1)])


def test_too_few_questions_for_episode_sizes():
    from orchestration.cli import build_parser
    from orchestration.config import check_question_counts, run_config
    run = lambda *flags: run_config(build_parser("fedavg").parse_args(["--eval_num_qs", "5", *flags]))  # noqa: E731
    with pytest.raises(DataError, match=r"'g00' has 13 local questions \(0.9 of 15\), fewer than .* = 20"):
        check_question_counts(run(), {"g00": 15, "g01": 15}, ["g00"], ["g01"])
    check_question_counts(run("--min_ctx_num_qs", "3"), {"g00": 15, "g01": 15}, ["g00"], ["g01"])


def test_episode_keeps_min_targets_when_group_is_small():
    ctx, tgt = choose_questions(15, n_ctx=100, n_tar=100, min_tar=10, gen=torch.Generator().manual_seed(0))
    assert len(ctx) == 5 and len(tgt) == 10 and not set(ctx.tolist()) & set(tgt.tolist())


def test_eval_context_fixed_or_resampled():
    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=40, dim=4))
    g = build_group_data(raw, "g01", x)
    def context(cfg, round_):
        return eval_split(g, cfg, "eval").eval_questions(round_)[0]

    fixed = ClientConfig(eval_num_qs=5, eval_seed=3)
    assert torch.equal(context(fixed, 1), context(fixed, 2))  # from eval_seed alone
    moving = ClientConfig(eval_num_qs=5, eval_seed=3, eval_resample=True)
    assert not all(torch.equal(context(moving, 1), context(moving, r)) for r in range(2, 6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DataError, match="--device cuda.*no CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_split_is_a_view_with_the_same_numbers_as_subset():
    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=10, dim=4))
    g = build_group_data(raw, "g00", x)
    local, held = g.split(0.9)
    ref_local, ref_held = g.subset(torch.arange(9)), g.subset(torch.tensor([9]))
    for a, b in ((local, ref_local), (held, ref_held)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.offsets, b.offsets)
        assert torch.equal(a.qkeys, b.qkeys)
    assert local.x.data_ptr() == g.x.data_ptr()  # no copy
    assert local.num_questions == 9 and held.num_questions == 1


def test_group_flags_split_on_semicolons_when_names_hold_commas():
    from orchestration.cli import build_parser
    args = build_parser("fedavg").parse_args(["--eval_groups", "$100,000 or more; Black",
                                              "--train_groups", "Male,Female"])
    assert args.eval_groups == ["$100,000 or more", "Black"] and args.train_groups == ["Male", "Female"]
