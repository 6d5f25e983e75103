"""Run records: the files of a finished run folder that the reports read, small enough to commit
(README: Run records). runs/<A>/<B>/<run>/ maps to <records_dir>/<A>/<B>/<run>/ holding config.json
and summary.json (and failed.json) byte for byte, the logs gzipped reproducibly, and record.json
(where it ran, the source folder, the file sizes); no checkpoints. Unfinished runs are never recorded.

    python -m orchestration.records RUN_DIR [RUN_DIR ...] [--records_dir results] [--commit_records]
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.atomic_write import atomic_write_bytes
from utils.errors import DataError, OutputDirError, exit_on_error

REPO = Path(__file__).resolve().parents[1]
RECORDS_ENV = "PLURALLLM_RECORDS_DIR"  # the default --records_dir (tests point it at a temporary folder)
RUNS_PART = "runs"
MAX_BYTES = 400_000  # issue 21: at most 400 KB per record, so a few hundred of them fit in a repository
COPIED = ("config.json", "summary.json", "failed.json")
GZIPPED = ("metrics.jsonl", "losses.jsonl")
INFO = "record.json"


def default_records_dir() -> Path:
    """$PLURALLLM_RECORDS_DIR, else results/ at the repository root."""
    return Path(os.environ.get(RECORDS_ENV) or REPO / "results")


def record_path(run_dir: str | Path, records_dir: str | Path) -> Path:
    """runs/<A>/<B>/... -> <records_dir>/<A>/<B>/...: the path after the last folder named runs."""
    parts = Path(run_dir).parts
    if RUNS_PART not in parts or parts[-1] == RUNS_PART:
        raise DataError(f"{run_dir} is not inside a folder named {RUNS_PART}/, so it has no record path",
                        f"records map {RUNS_PART}/<A>/<B>/<run> to <records_dir>/<A>/<B>/<run>; put the run "
                        f"under {RUNS_PART}/ (e.g. --out_root {RUNS_PART}/reproduce/NAME)")
    i = len(parts) - 1 - parts[::-1].index(RUNS_PART)
    return Path(records_dir).joinpath(*parts[i + 1:])


def source_name(record: Path, records_dir: Path) -> str:
    """The run folder a record stands for, as runs/<A>/<B>/<run> (the inverse of record_path)."""
    return "/".join((RUNS_PART, *record.relative_to(records_dir).parts))


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed header (no file name, mtime 0): the same input gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def record_files(run_dir: Path, source: str) -> dict[str, bytes]:
    if not (run_dir / "config.json").is_file():
        raise DataError(f"{run_dir} holds no run (no config.json)", "point at a run folder")
    if not (run_dir / "summary.json").is_file() and not (run_dir / "failed.json").is_file():
        raise DataError(f"{run_dir} is an interrupted run (no summary.json, no failed.json); an unfinished run "
                        "is never recorded", "finish it first (rerun its command; it resumes), then record it")
    files = {name: (run_dir / name).read_bytes() for name in COPIED if (run_dir / name).is_file()}
    files.update({f"{n}.gz": gzip_bytes((run_dir / n).read_bytes()) for n in GZIPPED if (run_dir / n).is_file()})
    try:
        env = json.loads(files["config.json"]).get("environment") or {}
    except ValueError as e:
        raise DataError(f"{run_dir}/config.json is not JSON ({e})", "the run folder is damaged") from e
    info = {"source": source, "status": "finished" if "summary.json" in files else "diverged",
            "cpu_model": env.get("cpu_model"), "torch_threads": env.get("torch_threads"),
            "torch": env.get("torch"), "sizes": {k: len(v) for k, v in sorted(files.items())}}
    files[INFO] = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
    return files


def _same(folder: Path, files: dict[str, bytes]) -> bool:
    """The folder already holds exactly these files with this content (decompressed, for .gz)."""
    if not folder.is_dir() or {p.name for p in folder.iterdir()} != set(files):
        return False
    content = lambda name, data: gzip.decompress(data) if name.endswith(".gz") else data  # noqa: E731
    try:
        return all(content(n, (folder / n).read_bytes()) == content(n, d) for n, d in files.items())
    except OSError:  # a damaged .gz
        return False


def _replace_folder(target: Path, files: dict[str, bytes]) -> None:
    """Write the files into a temporary sibling folder, then swap it in with renames."""
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
        if target.exists():  # a record made from other flags: replaced, never merged
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_record(run_dir: str | Path, records_dir: str | Path, log=print) -> Path:
    """Record one finished or diverged run; returns the record's folder. An unchanged record is
    left as it is (not a byte rewritten); one above MAX_BYTES is written with a warning."""
    run_dir, records_dir = Path(run_dir), Path(records_dir)
    target = record_path(run_dir, records_dir)
    files = record_files(run_dir, source_name(target, records_dir))
    size = sum(len(v) for v in files.values())
    if size > MAX_BYTES:
        log(f"warning: the record of {run_dir} takes {size / 1000:.0f} KB, above the {MAX_BYTES // 1000} KB a "
            "record should (it is written anyway; check what made its logs this long)")
    if _same(target, files):
        log(f"record  {target} unchanged ({size / 1000:.1f} KB)")
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_folder(target, files)
    except OSError as e:
        raise OutputDirError(f"cannot write the record {target}: {e.strerror or e}",
                             "choose another --records_dir, or fix the folder's permissions", e.errno) from e
    log(f"record  {target} written ({size / 1000:.1f} KB)")
    return target


def read_info(record: Path) -> dict:
    """record.json, or {} when absent or unreadable (the run's own files still report)."""
    try:
        return json.loads((record / INFO).read_text())
    except (OSError, ValueError):
        return {}


# committing a record: only its own path, whatever else the working tree holds


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def check_commit_target(records_dir: Path) -> Path:
    """The git working tree that will hold the records (checked before any training)."""
    here = Path(records_dir).resolve()
    while not here.exists():
        here = here.parent
    top = _git(here, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise DataError(f"--commit_records: {records_dir} is not inside a git working tree",
                        "point --records_dir into a git working tree (e.g. the main checkout's results/), or drop "
                        "--commit_records")
    return Path(top.stdout.strip())


def commit_record(record: Path, log=print, attempts: int = 5, wait_s: float = 2.0) -> bool:
    """`git add` and `git commit` limited to the record's folder; retried while another git process
    holds the index lock. Returns False when there was nothing to commit."""
    record = Path(record).resolve()
    repo = check_commit_target(record)
    rel = record.relative_to(repo).as_posix()
    for attempt in range(1, attempts + 1):
        out = _git(repo, "add", "--", rel)
        if out.returncode == 0:
            if not _git(repo, "status", "--porcelain", "--", rel).stdout.strip():
                log(f"record  {rel}: nothing to commit (unchanged)")
                return False
            # a pathspec commits only these paths, leaving anything else staged as it was
            out = _git(repo, "commit", "-q", "-m", f"record: {rel}", "--", rel)
            if out.returncode == 0:
                log(f"record  {rel} committed")
                return True
        if "index.lock" not in out.stderr or attempt == attempts:
            raise DataError(f"--commit_records: git could not commit {rel}: {out.stderr.strip()}",
                            "the record is written; commit it by hand (git add/commit -- that path)")
        time.sleep(wait_s * attempt)  # another git process holds the index; it is gone in a moment
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.records",
                                description="Write the commit-sized record of finished run folders.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders under runs/")
    p.add_argument("--records_dir", default=None,
                   help=f"records root (default ${RECORDS_ENV}, else results/ at the repository root)")
    p.add_argument("--commit_records", action="store_true",
                   help="git-commit each record, and nothing else, in the repository holding it")
    args = p.parse_args(argv)
    records_dir = Path(args.records_dir) if args.records_dir else default_records_dir()

    def record_all() -> None:
        if args.commit_records:
            check_commit_target(records_dir)
        for run_dir in args.run_dirs:
            record = write_record(run_dir, records_dir)
            if args.commit_records:
                commit_record(record)
    return exit_on_error(record_all)


if __name__ == "__main__":
    sys.exit(main())
