"""The layering: model ← core ← transforms ← jobs ← cli, imports pointing downward only
(``pipeline.report``, which reads a run's committed outputs, is a job).

Every module of ``pipeline/`` and ``transforms/`` is read with ``ast`` (imports inside
functions included, relative imports resolved), given a layer, and checked: no import from a
higher layer, no import cycle, no import of a project module that does not exist. A fresh
interpreter imports the whole core and model layers and must not have loaded Apache Beam.

The analysis takes a source root, so each check is also run on a small planted tree to show
that it reports what it exists to report.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("pipeline", "transforms")

MODEL, CORE, TRANSFORMS, JOBS, CLI = 1, 2, 3, 4, 5
LAYER_NAMES = {MODEL: "model", CORE: "core", TRANSFORMS: "transforms", JOBS: "jobs", CLI: "cli"}
JOB_MODULES = ("pipeline.run", "pipeline.runner", "pipeline.dask_runner", "pipeline.demo",
               "pipeline.train_job", "pipeline.extract_job")
CLI_MODULES = ("pipeline.__main__", "pipeline.nightly.__main__")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_of(name: str) -> int | None:
    """The layer of a module by its dotted name; None for a module no rule covers."""
    if name in CLI_MODULES or _within(name, "pipeline.cli"):
        return CLI
    if name in JOB_MODULES or _within(name, "pipeline.nightly") or _within(name,
                                                                        "pipeline.report"):
        return JOBS
    if _within(name, "transforms"):
        return TRANSFORMS
    if _within(name, "pipeline.core") or _within(name, "pipeline.train"):
        return CORE
    # pipeline/__init__.py runs before any pipeline.* module, the model's included, so it may
    # import only what the lowest layer may.
    if _within(name, "pipeline.model") or name == "pipeline":
        return MODEL
    return None


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file of every module under the project's top-level packages."""
    mods = {}
    for top in TOPS:
        for f in sorted((root / top).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the project module it loads (the nearest existing one)
    written: str  # the dotted name as written (relative imports resolved)
    line: int


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (where ``from m import name`` finds them):
    statements of the module body and of its if/try/with/for blocks, not of functions."""
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.expr)):
                todo.append(child)
    return names


class Project:
    """The project's modules and the imports among them, read statically from ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = project_modules(root)
        self.trees = {m: ast.parse(f.read_text(), str(f)) for m, f in self.modules.items()}
        # Folders without __init__.py import as namespace packages.
        self.folders = {".".join(d.relative_to(root).parts) for top in TOPS
                        for d in [root / top, *(root / top).rglob("*")] if d.is_dir()}
        self.imports: list[Import] = []
        self.missing: list[str] = []  # imports of project modules or names that do not exist
        for m in self.modules:
            self._read(m)

    def _nearest(self, name: str) -> str | None:
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def _add(self, importer: str, written: str, line: int) -> None:
        if written.split(".")[0] not in TOPS:
            return
        if written not in self.modules and written not in self.folders:
            self.missing.append(f"{importer}:{line} imports {written}, which is no module")
        target = self._nearest(written)
        if target is not None:
            self.imports.append(Import(importer, target, written, line))

    def _from_name(self, importer: str, base: str, name: str, line: int) -> None:
        """``from base import name``: a submodule, or a name bound in ``base``."""
        sub = f"{base}.{name}"
        if sub in self.modules or name == "*":
            self._add(importer, sub if name != "*" else base, line)
            return
        self._add(importer, base, line)
        tree = self.trees.get(base)
        if tree is None:
            return
        bound = _bound_names(tree)
        # A module-level __getattr__ may serve a name it spells out (a lazy re-export).
        lazy = "__getattr__" in bound and any(
            isinstance(n, ast.Constant) and n.value == name for n in ast.walk(tree))
        if name not in bound and not lazy:
            self.missing.append(f"{importer}:{line} imports {name} from {base}, which has no "
                                f"such name or submodule")

    def _read(self, m: str) -> None:
        package = m if _is_package(self.modules[m]) else m.rpartition(".")[0]
        for node in ast.walk(self.trees[m]):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self._add(m, a.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    if node.level > len(parts):
                        self.missing.append(f"{m}:{node.lineno} has a relative import above "
                                            "the top-level package")
                        continue
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] not in TOPS:
                    continue
                if base not in self.modules:
                    self._add(m, base, node.lineno)  # reports a missing module
                    for a in node.names:
                        if base in self.folders:
                            self._add(m, f"{base}.{a.name}", node.lineno)
                    continue
                for a in node.names:
                    self._from_name(m, base, a.name, node.lineno)
            elif isinstance(node, ast.Call) and _is_import_call(node):
                self._add(m, node.args[0].value, node.lineno)

    def edges(self) -> dict[str, set[str]]:
        """Module → project modules its import runs: the targets and their parent packages
        (Python runs ``a/__init__`` before ``a.b``), less the importer and its own packages."""
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            name = imp.target
            while name:
                if name != imp.importer and not imp.importer.startswith(name + ".") \
                        and name in self.modules:
                    out[imp.importer].add(name)
                name = name.rpartition(".")[0]
        return out


def _is_import_call(node: ast.Call) -> bool:
    """``importlib.import_module("x.y")`` / ``import_module(...)`` / ``__import__(...)``."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return (name in ("import_module", "__import__") and len(node.args) >= 1
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith("."))


def upward_imports(project: Project) -> list[str]:
    """``a -> b`` for every import of a module of a higher layer than the importer's."""
    bad = set()
    for imp in project.imports:
        low, high = layer_of(imp.importer), layer_of(imp.target)
        if low is not None and high is not None and high > low:
            bad.add(f"{imp.importer} ({LAYER_NAMES[low]}) -> {imp.target} "
                    f"({LAYER_NAMES[high]}), line {imp.line}")
    return sorted(bad)


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _describe_cycles(project: Project, cycles: list[list[str]]) -> str:
    lines = []
    for comp in cycles:
        members = set(comp)
        lines.append("cycle: " + ", ".join(comp))
        lines += sorted({f"  {i.importer} -> {i.target} (line {i.line})"
                         for i in project.imports
                         if i.importer in members and i.target in members})
    return "\n".join(lines)


_IMPORT_ALL = textwrap.dedent("""
    import importlib, json, sys
    sys.path.insert(0, sys.argv[1])
    first = None
    for name in json.loads(sys.argv[2]):
        importlib.import_module(name)
        if first is None and "apache_beam" in sys.modules:
            first = name
    print(json.dumps({"beam_loaded": "apache_beam" in sys.modules, "first": first}))
""")


def beam_free_modules(modules: dict[str, Path]) -> list[str]:
    """The modules of the model and core layers, importable without running anything."""
    return sorted(m for m in modules
                  if layer_of(m) in (MODEL, CORE) and not m.endswith(".__main__"))


def import_in_fresh_interpreter(root: Path, names: list[str]) -> dict:
    """Import ``names`` from ``root`` in a new interpreter; whether, and by whom, Beam loaded."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, str(root), json.dumps(names)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, f"importing the layer failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def project() -> Project:
    return Project(ROOT)


# ------------------------------------------------------------------ the project


def test_core_and_model_layers_import_without_beam():
    names = beam_free_modules(project_modules(ROOT))
    assert {"pipeline.core.manifest", "pipeline.model.backbone", "pipeline.train.loop"} <= set(names)
    got = import_in_fresh_interpreter(ROOT, names)
    assert not got["beam_loaded"], (
        f"importing the model and core layers loaded apache_beam; the first module after "
        f"whose import it was loaded: {got['first']}")


def test_every_module_has_a_layer(project):
    assert len(project.modules) > 30  # the walk found the project
    unassigned = sorted(m for m in project.modules if layer_of(m) is None)
    assert not unassigned, f"modules no layer rule covers (add a rule): {unassigned}"


def test_no_module_imports_from_a_higher_layer(project):
    bad = upward_imports(project)
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles(project):
    cycles = import_cycles(project.edges())
    assert not cycles, _describe_cycles(project, cycles)


def test_every_project_import_names_something_that_exists(project):
    # A stale import after a move also hides its target from the two checks above.
    assert not project.missing, "imports of missing modules or names:\n" + "\n".join(
        sorted(project.missing))


# ------------------------------------------------------------------ the checks themselves


@pytest.mark.parametrize("name, layer", [
    ("pipeline", MODEL), ("pipeline.model", MODEL), ("pipeline.model.backbone", MODEL),
    ("pipeline.core", CORE), ("pipeline.core.manifest", CORE), ("pipeline.train", CORE),
    ("pipeline.train.loop", CORE), ("transforms", TRANSFORMS), ("transforms.score", TRANSFORMS),
    ("pipeline.run", JOBS), ("pipeline.runner", JOBS), ("pipeline.dask_runner", JOBS),
    ("pipeline.demo", JOBS), ("pipeline.train_job", JOBS), ("pipeline.extract_job", JOBS),
    ("pipeline.nightly", JOBS), ("pipeline.nightly.job", JOBS),
    ("pipeline.nightly.__main__", CLI), ("pipeline.__main__", CLI), ("pipeline.cli", CLI),
    ("pipeline.cli.flags", CLI),
    ("pipeline.runs", None), ("pipeline.core_extra", None), ("pipeline.trainer", None),
    ("pipeline.extras.thing", None), ("transformsx", None),
])
def test_layer_rules(name, layer):
    assert layer_of(name) == layer


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def planted(tmp_path) -> Project:
    """A tree with one of each fault: an upward lazy relative import closing a cycle, a module
    outside every layer, and imports of a missing module and a missing name."""
    return Project(_tree(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/model/__init__.py": "",
        "pipeline/model/a.py": """
            X = 1
            def f():
                from ..core import b
                return b
        """,
        "pipeline/core/__init__.py": "",
        "pipeline/core/b.py": "from pipeline.model.a import X\n",
        "pipeline/core/c.py": "from . import b\nimport pipeline.core.gone\n",
        "pipeline/core/d.py": "from pipeline.model.a import Y\nimport os.path\n",
        "pipeline/extras/e.py": "import transforms.t\nfrom pipeline.extras import f\n",
        "pipeline/extras/f.py": "",
        "transforms/__init__.py": "",
        "transforms/t.py": "import importlib\nimportlib.import_module('pipeline.core.c')\n",
    }))


def test_planted_upward_lazy_relative_import_is_reported(planted):
    assert upward_imports(planted) == [
        "pipeline.model.a (model) -> pipeline.core.b (core), line 4"]


def test_planted_cycle_through_a_lazy_import_is_reported(planted):
    edges = planted.edges()
    assert "pipeline.core.b" in edges["pipeline.core.c"]  # `from . import b`, resolved
    assert "pipeline.core.c" in edges["transforms.t"]  # import_module("...")
    assert "pipeline.core" in edges["transforms.t"]  # the package runs first
    assert import_cycles(edges) == [["pipeline.core.b", "pipeline.model.a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_planted_module_outside_every_layer_is_found(planted):
    assert sorted(m for m in planted.modules if layer_of(m) is None) == [
        "pipeline.extras.e", "pipeline.extras.f"]


def test_planted_missing_module_and_name_are_reported(planted):
    assert sorted(planted.missing) == [
        "pipeline.core.c:2 imports pipeline.core.gone, which is no module",
        "pipeline.core.d:1 imports Y from pipeline.model.a, which has no such name or submodule",
    ]


def test_a_core_module_that_imports_beam_is_named(tmp_path):
    # A stand-in apache_beam shadows the real one: the check itself, without Beam's import time.
    root = _tree(tmp_path, {
        "apache_beam/__init__.py": "",
        "pipeline/__init__.py": "",
        "pipeline/core/__init__.py": "",
        "pipeline/core/a.py": "",
        "pipeline/core/b.py": "import pipeline.core.c\n",
        "pipeline/core/c.py": "import apache_beam\n",
        "pipeline/cli/__init__.py": "import apache_beam\n",
    })
    names = beam_free_modules(project_modules(root))
    assert names == ["pipeline", "pipeline.core", "pipeline.core.a", "pipeline.core.b",
                     "pipeline.core.c"]
    assert import_in_fresh_interpreter(root, names) == {"beam_loaded": True,
                                                        "first": "pipeline.core.b"}
    assert import_in_fresh_interpreter(root, names[:3]) == {"beam_loaded": False, "first": None}
