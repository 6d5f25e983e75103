"""Shared fixtures. Real survey data lives in ../shared/data beside the checkout (CI has it)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA = ROOT.parent / "shared" / "data"


def load_script(relpath: str):
    """A script of the repository (scripts/, examples/) imported as a module, by its path."""
    import importlib.util
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

CACHE_ENV = "PLURALLLM_CACHE_DIR"  # data_loaders.embedding_cache reads it
CREATED_CACHE_DIRS: list[str] = []           # the session's own cache folder, removed at the end


def session_cache_dir(environ, make_dir) -> str:
    """The embedding cache the tests use: $PLURALLLM_CACHE_DIR when set (CI, a developer's
    shared cache), else a fresh folder, never the user's ~/.cache/plurallm."""
    return environ.get(CACHE_ENV) or make_dir()


def pytest_configure(config):
    # Set before any test (and any subprocess a test starts) runs, and shared by all of them:
    # MiniLM embeds each real data set once per session (about 40 s for OpinionQA on a CPU).
    def make_dir() -> str:
        CREATED_CACHE_DIRS.append(tempfile.mkdtemp(prefix="plurallm-test-cache-"))
        return CREATED_CACHE_DIRS[-1]
    os.environ[CACHE_ENV] = session_cache_dir(os.environ, make_dir)


def pytest_unconfigure(config):
    for folder in CREATED_CACHE_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real survey data not found at {SHARED_DATA} (a user's clone without ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def globalqa_csv(shared_data_dir) -> Path:
    path = shared_data_dir / "globalopinionqa_sample" / "global_opinions_sample.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def opinionqa_dir(shared_data_dir) -> Path:
    path = shared_data_dir / "opinionqa" / "human_resp"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(autouse=True)
def records_dir(tmp_path_factory, monkeypatch) -> Path:
    """Run records default to results/ of the repository (orchestration/records.py): every test
    gets its own folder instead, subprocesses included, so no test writes into the checkout."""
    folder = tmp_path_factory.mktemp("records")
    monkeypatch.setenv("PLURALLLM_RECORDS_DIR", str(folder))
    return folder


@pytest.fixture
def flower_task_identity():
    """Flower stamps every new Message with the process's task identity, which a runtime sets;
    tests that build messages outside a runtime set one and restore the old afterwards."""
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# Every key training.diagnostics.Diagnostics.record can add to an evaluation record (engines without
# the groups' data, Flower's, add none).
DIAGNOSTIC_KEYS = frozenset(
    [f"{role}_{what}_{part}" for role in ("eval", "train") for part in ("seen", "unseen")
     for what in ("alignment", "worst_alignment", "fi", "questions")]
    + ["baselines", "eval_group_specificity", "eval_group_specificity_se", "eval_group_specificity_per_group",
       "eval_specificity_context", "context_controls", "context_curve"])
