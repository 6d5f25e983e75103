"""The threads client engine computes what the loop engine computes."""
import pytest
import torch

from data_loaders.datasets import prepare_experiment
from orchestration.cli import build_parser
from orchestration.config import run_config
from orchestration.experiment import make_trainer

ARGS = ["--dataset", "synthetic", "--syn_groups", "6", "--syn_questions", "40", "--syn_dim", "16",
        "--d_model", "32", "--dim_feedforward", "32", "--num_layers", "2", "--min_ctx_num_qs", "3",
        "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5",
        "--epochs", "3"]


def trainer(*extra):
    if "--client_engine" not in extra:
        extra = ("--client_engine", "loop", *extra)
    args = build_parser("fedavg").parse_args([*ARGS, *extra])
    run = run_config(args)
    return make_trainer(run, prepare_experiment(run.data, log=lambda *a: None), "cpu")


def test_dropout_masks_depend_on_client_and_round_not_on_order():
    """With dropout, a client's local training is the same whichever clients ran before it."""
    a = trainer("--dropout", "0.2")
    b = trainer("--dropout", "0.2")
    names = sorted(a.clients)
    fwd = {n: a.clients[n].fit(a.model, a.global_state, 1) for n in names}
    bwd = {n: b.clients[n].fit(b.model, b.global_state, 1) for n in reversed(names)}
    for n in names:
        assert fwd[n].losses == bwd[n].losses
        for k in fwd[n].state:
            assert torch.equal(fwd[n].state[k], bwd[n].state[k]), (n, k)
    c = trainer("--dropout", "0.2")
    other_round = c.clients[names[0]].fit(c.model, c.global_state, 2)
    assert other_round.losses != fwd[names[0]].losses


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def assert_same_rounds(a, b, rounds=(1, 2)):
    for rnd in rounds:
        ra, rb = a.train_round(rnd), b.train_round(rnd)
        assert ra["clients"] == rb["clients"] and ra["points"] == rb["points"] > 0
        assert ra["train_loss_per_client"] == rb["train_loss_per_client"]
    for name, w in a.global_state.items():
        assert torch.equal(w, b.global_state[name]), name
    for name in a.clients:
        assert a.clients[name].optim_state.step == b.clients[name].optim_state.step


def test_threads_engine_equals_loop_engine_on_one_thread(one_thread):
    """Each worker runs a whole client on one intra-op thread: bit for bit the loop engine's
    numbers on one thread, for every client and every weight."""
    assert_same_rounds(trainer(), trainer("--client_engine", "threads", "--client_workers", "2"))


def test_threads_engine_numbers_do_not_depend_on_workers():
    one = trainer("--client_engine", "threads", "--client_workers", "1")
    three = trainer("--client_engine", "threads", "--client_workers", "3", "--client_fraction", "1")
    assert three.threads.workers == 3
    assert_same_rounds(one, three)


def test_threads_engine_restores_the_thread_count_and_reraises_client_errors(monkeypatch):
    tr = trainer("--client_engine", "threads", "--client_workers", "2")
    saved = torch.get_num_threads()
    tr.train_round(1)
    assert torch.get_num_threads() == saved
    victim = sorted(tr.clients)[1]
    monkeypatch.setattr(tr.clients[victim], "fit", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        tr.train_round(2)
    assert torch.get_num_threads() == saved


def test_auto_engine_picks_threads_on_a_multicore_cpu_else_loop(monkeypatch):
    import federated.fedavg as fedavg
    monkeypatch.setattr(fedavg, "default_workers", lambda: 4)
    assert trainer("--client_engine", "auto").client_engine == "threads"
    assert trainer("--client_engine", "auto", "--dropout", "0.1").client_engine == "loop"
    monkeypatch.setattr(fedavg, "default_workers", lambda: 1)
    assert trainer("--client_engine", "auto").client_engine == "loop"
    assert build_parser("fedavg").parse_args(ARGS).client_engine == "auto"


def test_threads_with_dropout_is_refused_clearly():
    from data_loaders.schema import DataError
    with pytest.raises(DataError, match="does not work with --client_engine threads"):
        trainer("--client_engine", "threads", "--dropout", "0.1")


def test_threads_engine_interrupted_drops_the_clients_not_started(monkeypatch):
    """Ctrl-C during a round: clients not yet started are cancelled, the thread count restored."""
    import concurrent.futures

    import federated.thread_engine as te
    tr = trainer("--client_engine", "threads", "--client_workers", "1")
    started = []
    real_fit = type(tr.clients[sorted(tr.clients)[0]]).fit
    monkeypatch.setattr(type(tr.clients[sorted(tr.clients)[0]]), "fit",
                        lambda self, *a: started.append(self.name) or real_fit(self, *a))
    calls = []

    def interrupted_wait(fs, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return concurrent.futures.wait(fs, *a, **k)

    monkeypatch.setattr(te, "wait", interrupted_wait)
    saved = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        tr.train_round(1)
    assert torch.get_num_threads() == saved
    assert len(started) < len(tr.clients)  # the queued clients never ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_fedavg_rounds_on_cuda_match_cpu():
    args = build_parser("fedavg").parse_args([*ARGS, "--client_engine", "auto"])
    data = prepare_experiment(run_config(args).data, log=lambda *a: None)
    cpu = make_trainer(run_config(build_parser("fedavg").parse_args([*ARGS, "--client_engine", "loop"])), data, "cpu")
    gpu = make_trainer(run_config(args), data, "cuda")
    assert gpu.client_engine == "loop"
    for rnd in (1, 2):
        a, b = cpu.train_round(rnd), gpu.train_round(rnd)
        for name in a["train_loss_per_client"]:
            assert b["train_loss_per_client"][name] == pytest.approx(a["train_loss_per_client"][name], rel=1e-3)
    (ev_a, _), (ev_b, _) = cpu.evaluate(2), gpu.evaluate(2)
    for name in ev_a:
        assert torch.allclose(ev_a[name].distances, ev_b[name].distances.cpu(), atol=1e-3)
