"""The import rule of docs/architecture.md, read from every module's imports with ast.

Layers, lowest first: util < models < lora < quant < training < {hf, course} < quiz < cli, and
on top the package's own ``__init__``/``__main__`` and the one-line re-export modules. A module
imports only from its own package or a lower layer (so lora never imports quant, training never
imports course or hf, and hf and course never import each other); nothing inside the package
imports the top. There are no import cycles between modules. Imports of minituner's own modules
stand at module level, except in cli/ (which imports lazily so ``--help`` starts fast); optional
third-party dependencies may be imported inside functions anywhere.

:func:`check_imports` takes any source folder, so the tests below also run it on small
synthetic trees that break each rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "minituner"
LAYERS = {
    "util": 0,
    "models": 1,
    "lora": 2,
    "quant": 3,
    "training": 4,
    "hf": 5,
    "course": 5,
    "quiz": 6,
    "cli": 7,
}
TOP_MODULES = {
    "__init__", "__main__", "model", "train", "memory", "nf4", "qlora", "hf_toy", "hf_save",
    "hf_load", "adapters",
}
TOP = "top"
TOP_RANK = max(LAYERS.values()) + 1
LAZY_IMPORT_LAYERS = {"cli"}


@dataclass(frozen=True)
class Edge:
    """One import of a package module by another, where it stands and whether it is local."""

    importer: str
    imported: str
    line: int
    text: str
    local: bool

    def where(self, src: Path) -> str:
        """``path:line`` of the import statement, relative to the source folder's parent."""
        return f"{module_path(src, self.importer)}:{self.line}"


def module_names(src: Path, package: str = PACKAGE) -> dict:
    """Every module of ``package`` under ``src`` as {dotted name: file}."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def module_path(src: Path, name: str) -> str:
    """The file of module ``name`` relative to ``src``'s parent, for messages."""
    for path in (src / Path(*name.split("."))).with_suffix(".py"), src.joinpath(
        *name.split("."), "__init__.py"
    ):
        if path.is_file():
            return str(path.relative_to(src.parent))
    return name


def layer_of(name: str, package: str = PACKAGE) -> str | None:
    """The layer of module ``name``: a subpackage in LAYERS, TOP, or None when it has none."""
    parts = name.split(".")
    if len(parts) == 1:
        return TOP
    if parts[1] in LAYERS:
        return parts[1]
    if len(parts) == 2 and parts[1] in TOP_MODULES:
        return TOP
    return None


def rank(layer: str) -> int:
    """Position of ``layer`` in the order; TOP sits above every layer."""
    return TOP_RANK if layer == TOP else LAYERS[layer]


def _resolve(name: str, modules: dict) -> str | None:
    """The most specific package module that ``name`` (a module or module.attribute) names."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _local_nodes(tree: ast.Module) -> set:
    """ids of import nodes inside a function or class body."""
    local = set()
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            for node in ast.walk(scope):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    local.add(id(node))
    return local


def import_edges(src: Path, package: str = PACKAGE) -> list:
    """Every import of one package module by another under ``src``, in file and line order."""
    modules = module_names(src, package)
    edges = []
    for importer, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        local = _local_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, importer, is_package)
                targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
            else:
                continue
            text = ast.get_source_segment(source, node) or ""
            seen = set()
            for target in targets:
                if not (target == package or target.startswith(package + ".")):
                    continue
                imported = _resolve(target, modules)
                if imported is None or imported == importer or imported in seen:
                    continue
                seen.add(imported)
                edges.append(
                    Edge(importer, imported, node.lineno, " ".join(text.split()), id(node) in local)
                )
    return sorted(edges, key=lambda e: (e.importer, e.line, e.imported))


def layer_violations(src: Path, edges: list, package: str = PACKAGE) -> list:
    """Messages for modules outside every layer and for imports that point up or sideways."""
    problems = []
    for name in module_names(src, package):
        if layer_of(name, package) is None:
            problems.append(f"{module_path(src, name)}: module {name} is in no layer")
    for edge in edges:
        have, want = layer_of(edge.importer, package), layer_of(edge.imported, package)
        if have is None or want is None or have == want:
            continue
        if want == TOP or rank(want) >= rank(have):
            problems.append(
                f"{edge.where(src)}: {edge.importer} ({have}) imports {edge.imported} ({want}), "
                f"not a lower layer: {edge.text}"
            )
    return problems


def local_import_violations(src: Path, edges: list, package: str = PACKAGE) -> list:
    """Messages for package imports inside a function or class outside the lazy layers."""
    return [
        f"{edge.where(src)}: function-local import of {edge.imported} in {edge.importer} "
        f"(move it to the top of the file): {edge.text}"
        for edge in edges
        if edge.local and layer_of(edge.importer, package) not in LAZY_IMPORT_LAYERS
    ]


def import_cycles(edges: list) -> list:
    """Every group of modules that import each other in a loop (Tarjan's strongly connected
    components of size > 1), each as a sorted list of module names."""
    graph: dict = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def cycle_violations(src: Path, edges: list) -> list:
    """Messages naming each import cycle and the imports that close it."""
    problems = []
    for group in import_cycles(edges):
        members = set(group)
        inside = [e for e in edges if e.importer in members and e.imported in members]
        listed = "; ".join(f"{e.where(src)} {e.text}" for e in inside)
        problems.append(f"import cycle between {', '.join(group)}: {listed}")
    return problems


def check_imports(src: Path, package: str = PACKAGE) -> list:
    """Every breach of the import rule in the package under ``src``, one message each."""
    edges = import_edges(src, package)
    return (
        cycle_violations(src, edges)
        + layer_violations(src, edges, package)
        + local_import_violations(src, edges, package)
    )


# ----------------------------------------------------------------------------- the real package


def test_minituner_follows_the_import_rule():
    problems = check_imports(SRC)
    assert not problems, f"{len(problems)} import-rule violations:\n" + "\n".join(problems)


def test_the_real_package_is_read():
    """The checker sees the real modules and their imports (an empty scan would pass)."""
    modules = module_names(SRC)
    assert {"minituner.lora.layer", "minituner.cli", "minituner.quiz.schema"} <= set(modules)
    edges = import_edges(SRC)
    assert any(e.importer == "minituner.__main__" and e.imported == "minituner.cli" for e in edges)
    assert all(layer_of(name) is not None for name in modules if name != "minituner")


# ----------------------------------------------------------------------------- synthetic trees


def _tree(root: Path, files: dict) -> Path:
    """Write ``files`` ({relative path: source}) under root/src/minituner with every package's
    __init__.py, and return root/src."""
    src = root / "src"
    for relative, text in files.items():
        path = src / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in [path.parent, *path.parent.parents]:
            if folder == src:
                break
            (folder / "__init__.py").touch()
        path.write_text(text, encoding="utf-8")
    return src


CLEAN = {
    "util/files.py": "import json\n",
    "models/minigpt.py": "from minituner.util.files import json\n",
    "lora/layer.py": "from minituner.models import minigpt\nfrom . import inject\n",
    "lora/inject.py": "import minituner.util.files\n",
    "quant/qlora.py": "from minituner.lora.layer import x\n",
    "cli/demo.py": "def main():\n    from minituner.quant.qlora import y\n    import tqdm\n",
    "course/data.py": "def load():\n    import transformers\n",
    "model.py": "from minituner.models.minigpt import *\n",
}


def test_a_clean_tree_passes(tmp_path):
    src = _tree(tmp_path, CLEAN)
    assert check_imports(src) == []
    edges = import_edges(src)
    assert ("minituner.lora.layer", "minituner.lora.inject") in {
        (e.importer, e.imported) for e in edges
    }


def test_a_cycle_is_caught(tmp_path):
    src = _tree(tmp_path, {
        **CLEAN,
        "lora/inject.py": "from minituner.lora.merge import m\n",
        "lora/merge.py": "from .layer import x\n",
    })
    (problem,) = check_imports(src)
    assert problem.startswith(
        "import cycle between minituner.lora.inject, minituner.lora.layer, minituner.lora.merge"
    )
    assert "src/minituner/lora/merge.py:1 from .layer import x" in problem


@pytest.mark.parametrize(
    ("path", "source", "message"),
    [
        ("lora/bad.py", "from minituner.quant.qlora import q\n",
         "src/minituner/lora/bad.py:1: minituner.lora.bad (lora) imports minituner.quant.qlora "
         "(quant), not a lower layer: from minituner.quant.qlora import q"),
        ("training/bad.py", "import os\nimport minituner.course.data\n",
         "src/minituner/training/bad.py:2: minituner.training.bad (training) imports "
         "minituner.course.data (course)"),
        ("hf/bad.py", "from minituner.course import data\n",
         "minituner.hf.bad (hf) imports minituner.course.data (course)"),
        ("util/bad.py", "from .. import model\n",
         "minituner.util.bad (util) imports minituner.model (top)"),
        ("quiz/bad.py", "from minituner import cli\n",
         "minituner.quiz.bad (quiz) imports minituner.cli (cli)"),
    ],
)
def test_an_upward_or_sideways_edge_is_caught(tmp_path, path, source, message):
    src = _tree(tmp_path, {**CLEAN, path: source})
    (problem,) = check_imports(src)
    assert message in problem


def test_a_local_import_outside_cli_is_caught(tmp_path):
    source = "import torch\n\n\ndef f():\n    import peft\n    from minituner.lora import layer\n"
    src = _tree(tmp_path, {**CLEAN, "quant/bad.py": source})
    (problem,) = check_imports(src)
    assert problem == (
        "src/minituner/quant/bad.py:6: function-local import of minituner.lora.layer in "
        "minituner.quant.bad (move it to the top of the file): from minituner.lora import layer"
    )


def test_a_module_outside_every_layer_is_caught(tmp_path):
    src = _tree(tmp_path, {**CLEAN, "stray.py": "x = 1\n"})
    assert check_imports(src) == ["src/minituner/stray.py: module minituner.stray is in no layer"]
