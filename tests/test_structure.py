"""The code's structure: dependencies point one way, a run is assembled in one place, functions stay short."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "models", "optim", "data", "train", "launch", "configs")
# which of our packages each may import (design.md): infra and configs nothing; models, optim, data only infra
ALLOWED = {"infra": set(), "configs": set(), "models": {"infra"}, "optim": {"infra", "models"},
           "data": {"infra"}, "train": {"infra", "models", "optim", "data", "configs"},
           "launch": {"infra", "train", "configs"}}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, function-level imports included)."""
    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for t in map(resolve, names) if t and t != mod and not t.startswith(mod + ".")}
        graph[mod] = targets
    return graph


def test_packages_import_only_downward():
    graph = _imports(_modules())
    upward = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
              if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not upward, upward


def test_no_import_cycles():
    graph = _imports(_modules())
    state, cycles = {}, []

    def visit(v, stack):
        state[v] = "open"
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                cycles.append(" -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                visit(w, stack + [w])
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not cycles, cycles


def test_a_run_is_assembled_in_one_place():
    """The chain config -> mesh -> optimizer -> layout -> steps is built only by train.build."""
    builders = {"build_mesh", "make_optimizer", "make_layout", "make_train_step", "make_eval_step", "init_state"}
    callers = set()
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):  # a function, or a module's function (a Run's own methods aside)
                f = node.func
                receiver = getattr(f.value, "id", None) if isinstance(f, ast.Attribute) else None
                fn = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if fn in builders and receiver not in ("run", "self"):
                    callers.add(mod)
    assert callers == {"train.build"}, callers


@pytest.mark.parametrize("package", ["train", "optim"])
def test_functions_are_short(package):
    long = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
