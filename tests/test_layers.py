"""The import structure (README: Design), walked over the source, lazy imports included:

- layers point one way: no module imports a package of a higher layer, so the orchestration
  sits above both engines and neither engine imports it;
- no import circle between the project's modules;
- project modules are imported at the top of a module, never inside a function or a branch,
  except a module that needs an optional extra (flwr, opacus, trl, wandb) at its own top, so
  that the package works without them.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# utils sits below data_loaders and models; inference (the predictor API) below reporting.
LAYERS = {"utils": 0, "models": 1, "data_loaders": 1, "training": 2, "federated": 3, "flower_app": 4,
          "orchestration": 5, "inference": 6, "reporting": 7, "benchmarks": 8, "scripts": 8, "examples": 8}
EXTRAS = {"flwr", "opacus", "trl", "wandb"}


def _sources() -> dict[str, Path]:
    """module name -> file, for every package of LAYERS."""
    out = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """(imported name, at the module's top) for every import statement of the file; relative
    imports resolved, `from pkg import mod` named as pkg.mod when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    top |= {id(b) for n in tree.body if isinstance(n, ast.Try) for b in n.body}  # try: import extra
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, id(node) in top)
                      for a in node.names]
    return found


def _module_of(target: str, modules: dict) -> str | None:
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target if target in modules else None


def import_graph():
    """(edges: module -> project modules it imports anywhere, lazy: (module, target) inside a
    function or branch, extras: modules that need an optional extra at their top, transitively)."""
    modules = _sources()
    edges, top_edges, lazy, extras = {}, {}, [], set()
    for name, path in modules.items():
        edges[name], top_edges[name] = set(), set()
        for target, at_top in _imports(name, path, modules):
            if at_top and target.split(".")[0] in EXTRAS:
                extras.add(name)
            mod = _module_of(target, modules)
            if mod is None or mod == name:
                continue
            edges[name].add(mod)
            (top_edges[name].add(mod) if at_top else lazy.append((name, mod)))
    grew = True
    while grew:
        more = {m for m, targets in top_edges.items() if m not in extras and targets & extras}
        extras |= more
        grew = bool(more)
    return edges, lazy, extras


def upward_imports() -> list[tuple[str, str]]:
    found = []
    modules = _sources()
    for name, path in modules.items():
        level = LAYERS[name.split(".")[0]]
        for target, _ in _imports(name, path, modules):
            if LAYERS.get(target.split(".")[0], -1) > level:
                found.append((str(path.relative_to(ROOT)), target))
    return found


def import_circles() -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), or a module importing itself."""
    edges, _, _ = import_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            circle = []
            while not circle or circle[-1] != v:
                circle.append(stack.pop())
                on_stack.discard(circle[-1])
            if len(circle) > 1:
                circles.append(sorted(circle))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def hidden_imports() -> list[tuple[str, str]]:
    """Project imports inside a function or branch whose target needs no optional extra."""
    _, lazy, extras = import_graph()
    return sorted({(m, t) for m, t in lazy if t not in extras})


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_no_import_circle():
    assert import_circles() == []


def test_project_imports_are_at_the_top_unless_they_need_an_optional_extra():
    assert hidden_imports() == []


def test_the_base_commands_import_no_optional_extra():
    """main_fl.py, main_centralized.py, reproduce, sweeps and the predictor start without flwr,
    opacus, trl or wandb installed: none of them reaches one through top-level imports."""
    _, _, extras = import_graph()
    base = {"orchestration.entry", "reporting.reproduce", "reporting.sweep", "inference.predictor",
            "inference.export", "inference.predict", "orchestration.embed"}
    assert base - set(_sources()) == set()
    assert sorted(base & extras) == []


def _fake_tree(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)


def test_the_checks_see_what_they_forbid(tmp_path, monkeypatch):
    """Each walk really finds one (lazy imports inside functions included)."""
    _fake_tree(tmp_path, monkeypatch, {
        "training/__init__.py": "",
        "training/bad.py": "def f():\n    from orchestration.entry import main\n",
        "utils/__init__.py": "",
        "utils/a.py": "from utils import b\n",
        "utils/b.py": "def g():\n    from . import a\n",
        "utils/extra.py": "import wandb\n",
        "utils/c.py": "def h():\n    from utils import extra\n    from utils.b import g\n",
        "utils/up.py": "from data_loaders.schema import GroupData\n",
        "inference/__init__.py": "",
        "inference/up.py": "from reporting.runs import collect\n",
    })
    assert sorted(upward_imports()) == [("inference/up.py", "reporting.runs"), ("training/bad.py", "orchestration.entry"),
                                        ("utils/up.py", "data_loaders.schema")]
    assert import_circles() == [["utils.a", "utils.b"]]
    assert hidden_imports() == [("utils.b", "utils.a"), ("utils.c", "utils.b")]


BELOW_ORCHESTRATION = [p for p, layer in LAYERS.items() if layer < LAYERS["orchestration"]]


def namespace_uses() -> list[tuple[str, str]]:
    """(module, what) for every module below orchestration that imports argparse, calls getattr on a
    name `args` or reads an attribute of it, or builds a (Simple)Namespace: they receive typed configs
    (orchestration/config.py), never the flags."""
    found = []
    for name, path in _sources().items():
        if name.split(".")[0] not in BELOW_ORCHESTRATION:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
                found.append((name, "import argparse"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
                found.append((name, "from argparse import"))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "args"):
                found.append((name, f"getattr(args, ...) on line {node.lineno}"))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                found.append((name, f"args.{node.attr} on line {node.lineno}"))
            elif isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) in (
                    "Namespace", "SimpleNamespace"):
                found.append((name, f"{getattr(node, 'id', getattr(node, 'attr', ''))} on line {node.lineno}"))
    return found


def test_engines_read_no_flags():
    assert namespace_uses() == []


def test_the_flag_check_sees_what_it_forbids(tmp_path, monkeypatch):
    _fake_tree(tmp_path, monkeypatch, {
        "federated/__init__.py": "",
        "federated/bad.py": "import argparse\n\ndef f(args):\n    return getattr(args, 'dp', False)\n",
        "flower_app/__init__.py": "",
        "flower_app/loopback.py": "import argparse\n",
        "data_loaders/__init__.py": "",
        "data_loaders/worse.py": "from types import SimpleNamespace\n\ndef g(args):\n    return SimpleNamespace(s=args.seed)\n",
        "orchestration/__init__.py": "",
        "orchestration/cli.py": "import argparse\n\ndef h(args):\n    return args.seed\n",
    })
    assert sorted(namespace_uses()) == [("data_loaders.worse", "SimpleNamespace on line 4"),
                                        ("data_loaders.worse", "args.seed on line 4"),
                                        ("federated.bad", "getattr(args, ...) on line 4"),
                                        ("federated.bad", "import argparse"),
                                        ("flower_app.loopback", "import argparse")]
