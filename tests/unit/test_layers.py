"""The package's imports point one way (docs/architecture.rst): every import, also one
inside a function, goes to the same layer or one below; there are no cycles; the remote
agent's modules import only the standard library and each other."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sshpyk"

#: top to bottom; a module belongs to the first layer one of whose prefixes it matches
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("api", ("sshpyk",)),
    ("cli", ("sshpyk.cli",)),
    ("diagnostics", ("sshpyk.diagnostics",)),
    ("adapters", ("sshpyk.provisioner", "sshpyk.launch", "sshpyk.attach", "sshpyk.loop")),
    ("kernels", ("sshpyk.kernels",)),
    ("agent", ("sshpyk.agent",)),
    ("remote", ("sshpyk.agent.remote",)),
    ("ssh", ("sshpyk.ssh",)),
    (
        "base",
        (
            "sshpyk.config",
            "sshpyk.options",
            "sshpyk.values",
            "sshpyk.kernelspec",
            "sshpyk.errors",
            "sshpyk.localfs",
            "sshpyk.state",
            "sshpyk.tasks",
        ),
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    if module == "sshpyk":
        return 0
    best = None
    for index, (_, prefixes) in enumerate(LAYERS[1:], start=1):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of docs/architecture.rst"
    return best[0]


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """(imported sshpyk module, line) for every import outside TYPE_CHECKING blocks."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sshpyk":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sshpyk":
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                yield (candidate if known(candidate) else target), node.lineno


def known(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (
        PACKAGE / relative / "__init__.py"
    ).exists()


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sources():
        name = module_name(path)
        edges[name] = {t for t, _ in imports(path) if t not in (name, "sshpyk")}
    return edges


def test_imports_point_down() -> None:
    wrong = []
    for path in sources():
        here = module_name(path)
        for target, line in sorted(set(imports(path))):
            # the package itself is only imported for its __version__
            if here == "sshpyk" or target in (here, "sshpyk"):
                continue
            if layer(target) < layer(here):
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {here} "
                    f"({LAYERS[layer(here)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
                )
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ importing its own submodules is not a cycle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_remote_agent_is_stdlib_only() -> None:
    remote = PACKAGE / "agent" / "remote"
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in sorted(remote.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                # jupyter_core/jupyter_client of the remote environment find kernelspecs
                if top not in stdlib and top not in ("sshpyk", "jupyter_core", "jupyter_client"):
                    bad.append(f"{path.name}:{node.lineno}: {name}")
                if top == "sshpyk" and not name.startswith("sshpyk.agent.remote"):
                    bad.append(f"{path.name}:{node.lineno}: {name} (outside the agent)")
    assert remote.is_dir() and bad == [], bad


def test_module_sizes() -> None:
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in sources()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert big == {}, big
    provisioner = PACKAGE / "provisioner.py"
    assert len(provisioner.read_text(encoding="utf-8").splitlines()) <= 300


def test_only_a_launchers_own_modules_name_its_scheduler() -> None:
    """A launcher plugs in through its own modules (one on each side, named after it:
    kernels/slurm.py, agent/remote/slurm*.py) and its registration (an import in
    kernels/__init__.py): no other module of the package names its launcher or its
    scheduler, so the next scheduler touches nothing else."""
    from sshpyk.kernels import LAUNCHERS

    words = {
        name: [name, getattr(launcher, "scheduler", name)]
        for name, launcher in LAUNCHERS.items()
        if name != "direct"
    }
    assert words, "no scheduler's launcher is registered"
    registration = PACKAGE / "kernels" / "__init__.py"
    wrong = []
    for path in sources():
        for name, names in words.items():
            if path.stem.startswith(name) and path.parent.name in ("kernels", "remote"):
                continue  # the launcher's own module
            pattern = re.compile("|".join(rf"(?<![a-z]){re.escape(w)}" for w in names), re.I)
            text = path.read_text(encoding="utf-8")
            for number, line in enumerate(text.splitlines(), 1):
                if path == registration and line.startswith("from . import"):
                    continue
                if pattern.search(line):
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert wrong == [], "\n".join(wrong)
