"""Shared fixtures. Real survey data lives in ../shared/data beside the checkout (CI has it)."""
from __future__ import annotations

import os
import sys
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
