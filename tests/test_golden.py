"""The golden runs of the redesign (scripts/golden.py, tests/golden/): today's code reproduces them.

Every case retrains a few rounds and compares its metrics.jsonl and losses.jsonl (wall clock
aside) with the recorded ones within the records' replay tolerance (1e-5 relative on the
recording CPU model, 1e-3 on another): a CPU name does not identify a host, so the
byte-for-byte check is `python scripts/golden.py --check` on the recording machine. A refactor that changes any number fails here, naming the first value that moved.
"""
import json

import pytest
from conftest import load_script

golden = load_script("scripts/golden.py")


@pytest.mark.parametrize("name", list(golden.CASES))
def test_golden_run_is_reproduced(name, tmp_path, shared_data_dir):
    need = golden.needs(name)
    if need == "opinionqa" and not (shared_data_dir / "opinionqa").is_dir():
        pytest.skip("no ../shared/data/opinionqa here")
    if need == "flwr":
        pytest.importorskip("flwr")
    ok, line = golden.compare(name, golden.run_case(name, tmp_path), strict=False)
    assert ok, line


def _fedavg_logs():
    return {log: (golden.GOLDEN_DIR / "fedavg" / log).read_text().splitlines() for log in golden.LOGS}


def _perturbed(logs, factor):
    rec = json.loads(logs["losses.jsonl"][1])
    rec["train_loss"] *= factor
    return {**logs, "losses.jsonl": [logs["losses.jsonl"][0], json.dumps(rec, sort_keys=True),
                                     *logs["losses.jsonl"][2:]]}


def test_compare_is_exact_on_the_recording_machine_and_tolerant_elsewhere():
    recorded = json.loads((golden.GOLDEN_DIR / "MACHINE.json").read_text())
    other = {**recorded, "cpu_model": "another CPU"}
    logs = _fedavg_logs()
    assert golden.compare("fedavg", logs, here=recorded) == (True, "fedavg: identical")
    tiny = _perturbed(logs, 1 + 1e-7)
    ok, line = golden.compare("fedavg", tiny, here=recorded)
    assert not ok and "losses.jsonl line 2.train_loss" in line     # the recording machine: exact
    ok, line = golden.compare("fedavg", tiny, here=other)
    assert ok and "within 0.001" in line and "another CPU" in line
    ok, line = golden.compare("fedavg", tiny, here=recorded, strict=False)
    assert ok and "within 1e-05" in line
    # 1e-4 passes on another CPU model, not on the recording one; 1e-2 passes nowhere
    ok, line = golden.compare("fedavg", _perturbed(logs, 1 + 1e-4), here=recorded, strict=False)
    assert not ok and "beyond 1e-05" in line and "train_loss" in line
    assert golden.compare("fedavg", _perturbed(logs, 1 + 1e-4), here=other)[0]
    ok, line = golden.compare("fedavg", _perturbed(logs, 1 + 1e-2), here=other)
    assert not ok and "beyond 0.001" in line and "train_loss" in line


def test_compare_names_a_missing_line_or_key():
    recorded = json.loads((golden.GOLDEN_DIR / "MACHINE.json").read_text())
    logs = _fedavg_logs()
    ok, line = golden.compare("fedavg", {**logs, "metrics.jsonl": logs["metrics.jsonl"][:-1]}, here=recorded)
    assert not ok and "metrics.jsonl: 3 lines, golden 4" in line
    rec = json.loads(logs["losses.jsonl"][0])
    rec.pop("train_loss")
    short = {**logs, "losses.jsonl": [json.dumps(rec, sort_keys=True), *logs["losses.jsonl"][1:]]}
    ok, line = golden.compare("fedavg", short, here=recorded)
    assert not ok and "train_loss: only in the golden log" in line


def test_canonical_lines_drop_the_wall_clock_and_sort_keys(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"round": 1, "wall_time_s": 3.2, "b": 0.1}\n{"a": [1, 2.5], "round": 2}\n')
    assert golden.canonical_lines(path) == ['{"b": 0.1, "round": 1}', '{"a": [1, 2.5], "round": 2}']
