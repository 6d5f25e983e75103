"""FedAvg aggregation: exact numbers on toy clients for each weighting, client sampling."""
import pytest
import torch

from federated.aggregation import aggregation_weights, sample_clients, weighted_average
from utils.seeding import generator

STATES = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)},
          {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)},
          {"w": torch.tensor([0.0, -4.0]), "n": torch.tensor(9)}]


@pytest.mark.parametrize("mode, expected_w, expected", [
    # sizes 10, 30, 60 -> p = .1, .3, .6: [.1+.9+0, .2+1.8-2.4]
    ("dataset_size", [0.1, 0.3, 0.6], [1.0, -0.4]),
    # points 50, 25, 25 -> p = .5, .25, .25: [.5+.75+0, 1+1.5-1]
    ("episode_points", [0.5, 0.25, 0.25], [1.25, 1.5]),
    ("uniform", [1 / 3] * 3, [4 / 3, 4 / 3]),
])
def test_weighted_average_exact(mode, expected_w, expected):
    w = aggregation_weights([10, 30, 60], [50, 25, 25], mode)
    assert w == pytest.approx(expected_w, abs=1e-15)
    out = weighted_average(STATES, w)
    assert torch.allclose(out["w"], torch.tensor(expected), atol=1e-7)
    assert out["n"].item() == 7  # integer buffers are not averaged


def test_two_clients_dataset_size():
    out = weighted_average(STATES[:2], aggregation_weights([1, 3], [0, 0], "dataset_size"))
    assert out["w"].tolist() == [2.5, 5.0]


def test_bad_weighting_and_empty():
    with pytest.raises(ValueError, match="--weighting"):
        aggregation_weights([1], [1], "median")
    with pytest.raises(ValueError, match="no positive mass"):
        aggregation_weights([0, 0], [0, 0], "dataset_size")


def test_sample_clients_fraction_is_seeded_and_sorted():
    names = [f"c{i}" for i in range(10)]
    a = sample_clients(names, 0.3, generator(0, "client_sampling", 1))
    b = sample_clients(names, 0.3, generator(0, "client_sampling", 1))
    c = sample_clients(names, 0.3, generator(0, "client_sampling", 2))
    assert a == b == sorted(a) and len(a) == 3 and set(a) <= set(names)
    assert a != c or sample_clients(names, 0.3, generator(0, "client_sampling", 3)) != a
    assert sample_clients(names, 1.0, generator(0, "x")) == sorted(names)
    assert len(sample_clients(names, 0.01, generator(0, "x"))) == 1
    with pytest.raises(ValueError, match="--client_fraction"):
        sample_clients(names, 0.0, generator(0, "x"))
