"""The code's structure (docs/architecture.md#layers): dependencies point one way, the trainer imports none of
the instruments, a run is assembled in one place, functions stay short, every documentation reference
resolves, and a run's config is resolved when it is loaded."""
import ast
import json
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "models", "optim", "data", "train", "tools", "launch", "configs")
# which of our packages each may import: infra and configs nothing; models, data only infra; optim infra and
# models; the trainer those; the instruments (tools) the trainer and everything under it; launch runs commands
ALLOWED = {"infra": set(), "configs": set(), "models": {"infra"}, "optim": {"infra", "models"},
           "data": {"infra"}, "train": {"infra", "models", "optim", "data", "configs"},
           "tools": {"infra", "models", "optim", "data", "train", "configs"},
           "launch": {"infra", "train", "tools", "configs"}}
MAX_FUNCTION_LINES = 60


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


def test_the_trainer_imports_none_of_the_instruments():
    graph = _imports(_modules())
    reaching = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
                if m.split(".")[0] == "train" and t.split(".")[0] == "tools"]
    assert not reaching, reaching


def test_no_function_is_long():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, long


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".sh", ".sbatch", ".toml", ".cfg", ".txt"))
            and (ROOT / n).exists()]


def _slug(heading: str) -> str:
    """A markdown heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_documentation_references_resolve():
    """A reference to the project's documents (``docs/<file>.md#<anchor>``) names a file and a heading that
    exist; no reference points at a document the repository does not hold (a specification's sections, the
    team's design notes)."""
    anchors = {}
    for doc in (ROOT / "docs").glob("*.md"):
        anchors[f"docs/{doc.name}"] = {_slug(line.lstrip("#")) for line in doc.read_text().splitlines()
                                       if line.startswith("#")}
    broken, foreign = [], []
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for doc, anchor in re.findall(r"(docs/[\w.-]+\.md)(?:#([\w-]+))?", text):
            if doc not in anchors or (anchor and anchor not in anchors[doc]):
                broken.append(f"{path.relative_to(ROOT)}: {doc}#{anchor}")
        foreign += [f"{path.relative_to(ROOT)}: {m}" for m in
                    re.findall(r"\bspec [A-H]\.?\d*|design\.md|celo2_spe[c]", text)]
    assert not broken, broken
    assert not foreign, foreign


def test_every_optimizer_name_is_a_config_key():
    """One spelling per optimizer: its registry name is its config section and its ``compare.lrs`` key, and
    both can be set from the command line."""
    from ml_collections import config_flags
    from absl import flags

    from optim.registry import REGISTRY
    from tools.compare import Comparison

    for name in REGISTRY:
        argv = ["prog", f"--config={ROOT / 'configs' / 'compare_cpu.py'}", f"--config.optimizer.name={name}",
                f"--config.compare.optimizers={name}", f"--config.compare.lrs.{name}=1e-3,2e-3"]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
        fv(argv)
        cfg = fv.config
        assert name in cfg.optimizer, f"no optimizer.{name} section"
        assert Comparison(cfg).sweep == {name: [1e-3, 2e-3]}


def test_a_default_runs_config_json_holds_the_values_it_used(tmp_path, shakespeare):
    from configs.cpu_tiny import get_config
    from optim.registry import get
    from train.loop import train

    cfg = get_config()
    cfg.update(workdir=str(tmp_path / "run"), steps=1, log_every=1, eval_every=1, eval_batches=1, checkpoint_every=1,
               cpu_devices=1, seq_len=32)
    cfg.data.dir = shakespeare
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    cfg.optimizer.warmup_steps = 0
    assert cfg.optimizer.lr == 0 and cfg.model.vocab_size == 0  # the defaults: the optimizer's and the tokenizer's
    train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer"]["lr"] == get("adamw").default_lr
    assert saved["model"]["vocab_size"] == 4096
    assert saved["workdir"] == str(tmp_path / "run")
