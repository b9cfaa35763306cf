"""What travels: the protocol constants, the JSON-line codec, the bundle and the loader
(sshpyk/agent/remote/{protocol,jsonlines,loader}.py, sshpyk/agent/bundle.py), no SSH:
the real loader runs the real agent in a local python, fed on stdin as sshd would."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent import bundle
from sshpyk.agent.remote import jsonlines, loader, protocol
from sshpyk.agent.remote.protocol import LOADER, PROTOCOL, Event, Kind, Op
from sshpyk.kernels import LAUNCHERS

REMOTE = Path(protocol.__file__).parent


def package_imports(name: str) -> tuple[set[str], set[str]]:
    """(modules of the package imported at module level, those imported in functions)."""
    tree = ast.parse((REMOTE / f"{name}.py").read_text())
    top: set[str] = set()
    nested: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            is_top = node in tree.body
            (top if is_top else nested).update(n for n in names if n)
    return top, nested


def test_bundle_lists_every_module_in_dependency_order() -> None:
    every = set(bundle.CORE_MODULES)
    for launcher in LAUNCHERS.values():  # each launcher's modules load after the core
        order = [*bundle.CORE_MODULES, *launcher.remote_modules]
        assert len(set(order)) == len(order), launcher.name
        for index, name in enumerate(order):
            top, _ = package_imports(name)
            assert top <= set(order[:index]), (name, top - set(order[:index]))
        every.update(order)
    assert sorted(every) == sorted(p.stem for p in REMOTE.glob("*.py") if p.stem != "__init__")
    for name in every:  # an import inside a function: of a module that may be loaded
        assert package_imports(name)[1] <= every, name
    # runs without the package (it installs it)
    assert package_imports("loader") == (set(), set())


def test_loader_constant_matches_the_loader_module() -> None:
    assert loader.PACKAGE == protocol.PACKAGE and "'sshpyk_agent_loader'" in LOADER
    assert len(LOADER) < 200 and "\n" not in LOADER  # it is in the remote command line
    data = bundle.agent_bundle()
    length, _, rest = data.partition(b"\n")
    assert int(length) == len(rest) and list(json.loads(rest)) == list(bundle.CORE_MODULES)


def test_kinds_and_names_are_defined_once() -> None:
    assert protocol.CHANNELS == ("shell", "iopub", "stdin", "control", "hb")
    assert Kind.UNSAFE_PATH in protocol.KINDS and "unsafe_path" in protocol.KINDS
    assert len(protocol.KINDS) == len([k for k in vars(Kind) if not k.startswith("_")])
    assert protocol.FIRST_OPS == ("hello", "attach", "node")
    assert Op.LOAD == "load" and Event.BYE == "bye"
    error = protocol.AgentError(Kind.NOT_FOUND, "no such kernel")
    assert (error.kind, error.message, str(error)) == ("not_found", "no such kernel", error.message)


def test_jsonlines_codec() -> None:
    line = jsonlines.encode({"op": "ping", "text": "é\n"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert jsonlines.decode(line) == {"op": "ping", "text": "é\n"}
    for junk in (b"not json\n", b"[1, 2]\n", b"\xff\n", b"\n"):
        assert jsonlines.decode(junk) is None
    got: list[dict[str, Any]] = []
    stream = io.BytesIO(line + b"garbage\n" + jsonlines.encode({"op": "state"}) + b"[]\n")
    jsonlines.read_messages(stream, got.append)
    assert got == [{"op": "ping", "text": "é\n"}, {"op": "state"}]


def test_output_fans_out_and_survives_a_dead_writer() -> None:
    seen: list[bytes] = []

    def broken(_data: bytes) -> None:
        raise BrokenPipeError

    output = jsonlines.Output([broken, seen.append])
    output.emit("ready", kid="k")
    only: list[bytes] = []
    output.emit("hello", _only=only.append, pid=1)
    output.remove(broken)
    assert [json.loads(d) for d in seen] == [{"kid": "k", "v": PROTOCOL, "event": "ready"}]
    assert json.loads(only[0])["event"] == "hello"


def test_install_builds_a_package_from_sources() -> None:
    name = "sshpyk_agent_under_test"
    sources = {
        "first": "VALUE = 41\n",
        "second": "from .first import VALUE\nANSWER = VALUE + 1\n",
    }
    try:
        package = loader.install(sources, name)
        assert package.second.ANSWER == 42 and sys.modules[f"{name}.first"].VALUE == 41
        loader.install({"third": "from . import second\nX = second.ANSWER\n"}, name)
        assert sys.modules[f"{name}.third"].X == 42
        assert loader.own_sources(name) == {
            **sources,
            "third": "from . import second\nX = second.ANSWER\n",
        }
        with pytest.raises(ZeroDivisionError):
            loader.install({"broken": "1 / 0\n"}, name)
        assert f"{name}.broken" not in sys.modules
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
    assert loader.own_sources("sshpyk.agent.remote") is None  # imported from files


def run_loader(*lines: dict[str, Any], bundle_bytes: bytes | None = None) -> list[dict[str, Any]]:
    """The real loader in a local python, fed like the SSH channel: the bundle, then
    ``lines``; the events it wrote (stdin closes after the last line)."""
    data = bundle.agent_bundle() if bundle_bytes is None else bundle_bytes
    data += b"".join(jsonlines.encode(line) for line in lines)
    done = subprocess.run(
        [sys.executable, "-c", LOADER], input=data, capture_output=True, timeout=30
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(e["v"] == PROTOCOL for e in events), events
    return events


def test_the_loader_runs_an_agent(tmp_path: Path) -> None:
    run_root = tmp_path / "r"
    started = time.monotonic()
    events = run_loader(
        {"v": PROTOCOL, "op": "hello", "grace": 0, "run_root": str(run_root)},
        {"op": "state", "rid": 1},
        {
            "op": "load",
            "rid": 2,
            "name": "slurm",
            "modules": bundle.module_sources(LAUNCHERS["slurm"].remote_modules),
        },
        {"op": "ps", "rid": 3},
        {"op": "shutdown", "rid": 4},
    )
    assert time.monotonic() - started < 10
    # every request is answered before the agent exits (ps runs in a worker)
    assert [e["event"] for e in events[:3]] == ["hello", "state", "loaded"]
    assert sorted(e["event"] for e in events[3:]) == ["bye", "ps"]
    assert events[0]["python"] and events[0]["socket"].startswith(str(run_root))
    assert [e["kept"] for e in events if e["event"] == "bye"] == [0]
    assert list(run_root.iterdir()) == []  # its agent dir went with it


@pytest.mark.parametrize(
    ("first", "message"),
    [
        ({"v": PROTOCOL + 1, "op": "hello"}, "not supported"),
        ({"v": PROTOCOL, "op": "dance"}, "not supported"),
        ({"v": PROTOCOL, "op": "node", "kid": "k"}, "no node side"),  # SLURM not loaded
    ],
)
def test_the_first_line_is_checked(first: dict[str, Any], message: str) -> None:
    (event,) = run_loader(first)
    assert event["event"] == "error" and event["kind"] == "protocol"
    assert message in event["message"]
