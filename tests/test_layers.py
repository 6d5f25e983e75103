"""Imports point one way (README: Design): no module imports a package of a higher layer, so the
orchestration sits above both engines and neither engine imports it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# utils sits below data_loaders and models; inference (the predictor API) below reporting.
LAYERS = {"utils": 0, "models": 1, "data_loaders": 1, "training": 2, "federated": 3, "flower_app": 4,
          "orchestration": 5, "inference": 6, "reporting": 7, "benchmarks": 8, "scripts": 8}


def upward_imports() -> list[tuple[str, str]]:
    found = []
    for package, level in LAYERS.items():
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                for m in modules:
                    top = m.split(".")[0]
                    if LAYERS.get(top, -1) > level:
                        found.append((str(path.relative_to(ROOT)), m))
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk really finds one (lazy imports inside functions included)."""
    fake = tmp_path / "training"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from orchestration.experiment import main\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports() == [("training/bad.py", "orchestration.experiment")]
