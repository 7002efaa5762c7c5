"""The package's import graph: no circle between modules, and ``model/`` self-contained.

Every import counts, the ones inside functions too: a lazy import only hides a circle
until the function runs.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "spacy_agban"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, level: int, module: str) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level else []
    return ".".join(base + ([module] if module else []))


def import_graph() -> Dict[str, Set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom):
                base = resolve(name, is_package, node.level, node.module or "") if node.level else (node.module or "")
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                # the module itself, or the package whose attribute was imported
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    break
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

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
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_imports_only_inside_it(graph: Dict[str, Set[str]], package: str) -> Dict[str, Set[str]]:
    prefix = f"spacy_agban.{package}"
    return {
        name: {t for t in targets if not (t == prefix or t.startswith(prefix + "."))}
        for name, targets in graph.items()
        if (name == prefix or name.startswith(prefix + "."))
        and any(not (t == prefix or t.startswith(prefix + ".")) for t in targets)
    }


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "spacy_agban.model.crf" in graph["spacy_agban.architectures"] or \
        "spacy_agban.model" in graph["spacy_agban.architectures"]
    assert "spacy_agban.model.tags" in graph["spacy_agban.pipeline"]


def test_no_import_circle_between_modules():
    assert cycles(import_graph()) == []


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_model_imports_nothing_of_the_package_outside_it():
    graph = import_graph()
    outside = {
        name: {t for t in targets if t.startswith("spacy_agban") and not t.startswith("spacy_agban.model")}
        for name, targets in graph.items() if name.startswith("spacy_agban.model")
    }
    assert {name: t for name, t in outside.items() if t} == {}
