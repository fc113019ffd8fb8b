"""The library's shape: it imports nothing from the lab, only its declared dependencies, and its modules import one
another without a cycle (checked on the source, every import statement included, even those inside functions;
imports made for type checking only are left out, as they never run)."""

import ast
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "sqsd_callback"
DEPENDENCIES = {"torch", "transformers", "peft", "safetensors", "numpy", "tqdm", "huggingface_hub", "accelerate"}
"""What the library imports: its declared dependencies, and two that transformers itself requires."""
OPTIONAL = {"matplotlib", "PIL", "wandb", "deepspeed", "yaml", "pydantic", "axolotl", "bitsandbytes"}
"""Imported inside functions, only where the user asks for them (a wandb heatmap, ZeRO-3, a YAML config ...)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import that can run in ``path``, relative ones resolved."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (child.level - 1)] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                found.append((module, [a.name for a in child.names]))
            visit(child)
    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        ancestors = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
        for module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for t in targets:
                for i in range(1, t.count(".") + 2):  # importing a.b.c runs a.b's __init__ first (a's own
                    prefix = ".".join(t.split(".")[:i])  # packages are already running)
                    if prefix in modules and prefix != m and prefix not in ancestors:
                        graph[m].add(prefix)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_library_imports_no_lab_module_and_only_its_dependencies():
    outside = set()
    for path in LIBRARY.rglob("*.py"):
        for module, _ in _imports(path):
            top = module.split(".")[0]
            if top != "sqsd_callback" and top not in sys.stdlib_module_names:
                outside.add(top)
    assert "sqsd_lab" not in outside
    assert outside <= DEPENDENCIES | OPTIONAL, sorted(outside - DEPENDENCIES - OPTIONAL)


def test_the_library_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 30 and "sqsd_callback.callback" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    """The check itself can fail: a cycle through a package's __init__ is reported, with the modules on it."""
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": set()}
    assert _cycle(graph) == ["p", "p.a", "p.b", "p"]


def test_the_callback_is_glue():
    """At most 200 lines and 10 attributes, every one of them declared in __init__ (no state appears later)."""
    source = (LIBRARY / "callback.py").read_text()
    assert len(source.splitlines()) <= 200
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "SQSDCallback"]

    def assigned(fn) -> set[str]:
        return {t.attr for node in ast.walk(fn) for t in getattr(node, "targets", [getattr(node, "target", None)])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    methods = {f.name: assigned(f) for f in cls.body if isinstance(f, ast.FunctionDef)}
    declared = methods.pop("__init__")
    assert len(declared) <= 10, sorted(declared)
    assert set().union(*methods.values()) <= declared
