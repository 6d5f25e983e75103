"""Where a run ran: library versions, hardware and code revision, recorded in its config.json."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]


def _dist_version(name: str) -> str | None:
    # Reading package metadata avoids importing heavy libraries (transformers) just for a version.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict[str, Any]:
    """Versions, hardware and code revision, for the run folder (every field may be None).

    The CPU model and torch's thread count are kept because both can change a run's last bits
    (a GEMM's reduction order): a replay of a recorded run uses the same thread count."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "argv": list(sys.argv)}
    info |= {dist: _dist_version(dist) for dist in ("torch", "numpy", "transformers", "flwr", "safetensors", "wandb")}
    info["cuda"] = info["cuda_device"] = info["torch_threads"] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install must not stop a run from recording the rest
        pass
    info["git_commit"] = _git("rev-parse", "HEAD") or None
    # Reports and records are outputs, not code: the queue's own worktree rewrites them between runs.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)docs/results", ":(exclude)results")
    info["git_dirty"] = None if status is None or info["git_commit"] is None else bool(status)
    return info
