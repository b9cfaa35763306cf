"""The host's Pythons and their kernelspecs (sshpyk/agent/remote/discover.py), no SSH:
real venvs and a conda-style env under a temporary home, bash_kernel's kernelspec in
one of them, a Python that never answers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote import agent, discover
from sshpyk.agent.remote.protocol import Event, Op

from support.agent import Events, answer
from support.envs import Envs, make_envs, make_silent_python, make_venv, pid_gone


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def envs(home: Path) -> Envs:
    return make_envs(home, home / "code")


@pytest.fixture(scope="module")
def found(home: Path, envs: Envs) -> Iterator[dict[str, Any]]:
    """One discovery (the common roots of ``home``, and ``home/code``) with a
    PYTHONPATH that would break every query if it leaked into them."""
    poison = home / "poison"
    poison.mkdir()
    (poison / "jupyter_client.py").write_text("raise ImportError('PYTHONPATH leaked')\n")
    # the common roots: a link in ~/.virtualenvs to an env found elsewhere too
    (home / ".virtualenvs").mkdir()
    (home / ".virtualenvs" / "again").symlink_to(envs.venv_a)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(poison)
    try:
        start = time.monotonic()
        answer = discover.discover({"roots": [str(home / "code")]}, home=str(home))
        answer["wall"] = time.monotonic() - start
        yield answer
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def by_env(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pythons found, by the real path of their env."""
    return {os.path.realpath(p["prefix"]): p for p in answer["pythons"]}


def real(env: Path) -> str:
    return os.path.realpath(env)


def test_finds_both_venvs_and_the_conda_env(found: dict[str, Any], envs: Envs) -> None:
    pythons = by_env(found)
    for env in (envs.venv_a, envs.venv_b, envs.conda_env):
        assert real(env) in pythons, (env, list(pythons))
    conda = pythons[real(envs.conda_env)]
    assert (conda["kind"], conda["env"]) == ("conda", "cenv")  # from environments.txt
    assert conda["python"] == envs.python(envs.conda_env)
    venv_b = pythons[real(envs.venv_b)]
    assert (venv_b["kind"], venv_b["env"]) == ("search", "project-b")  # a project's .venv
    # found twice (the link in ~/.virtualenvs first): listed once, under the link's name
    venv_a = pythons[real(envs.venv_a)]
    assert (venv_a["kind"], venv_a["env"]) == ("venv", "again")
    for env in (envs.venv_a, envs.venv_b, envs.conda_env):
        python = pythons[real(env)]
        assert python["jupyter_client"] and python["ipykernel"] and python["error"] is None
        assert python["version"] == ".".join(map(str, sys.version_info[:3]))
    assert found["warnings"] == [] and found["wall"] < discover.DISCOVER_TIMEOUT


def test_every_kernelspec_of_each_env_and_of_any_language(
    found: dict[str, Any], envs: Envs
) -> None:
    pythons = by_env(found)
    specs = {
        env: {s["name"]: s for s in pythons[real(env)]["kernelspecs"]}
        for env in (envs.venv_a, envs.venv_b, envs.conda_env)
    }
    assert set(specs[envs.venv_a]) == {"python3"}
    assert set(specs[envs.venv_b]) == {"python3", "bash"}
    bash = specs[envs.venv_b]["bash"]
    assert bash["language"] == "bash" and bash["display_name"] == "Bash"
    assert bash["resource_dir"] == str(envs.venv_b / "share" / "jupyter" / "kernels" / "bash")
    assert specs[envs.conda_env]["python3"]["language"] == "python"


def test_one_entry_per_python_and_poison_did_not_leak(found: dict[str, Any], envs: Envs) -> None:
    """The link in ~/.virtualenvs is venv-a again (real paths); PYTHONPATH's
    jupyter_client was not imported by any query."""
    keys = [(os.path.realpath(p["prefix"]), p["python"]) for p in found["pythons"]]
    assert len(keys) == len(set(keys))
    prefixes = [os.path.realpath(p["prefix"]) for p in found["pythons"]]
    assert prefixes.count(os.path.realpath(envs.venv_a)) == 1
    assert all("leaked" not in str(s.get("reason")) for s in found["skipped"])
    assert all(p["error"] is None for p in found["pythons"])


def test_a_silent_python_gives_a_partial_result_in_time(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_venv(root / "quick")
    pid_file = tmp_path / "pid"
    silent = make_silent_python(root / "hung", pid_file)
    start = time.monotonic()
    answer = discover.discover({"roots": [str(root)], "search_only": True, "limit": 3})
    took = time.monotonic() - start
    assert took < 3 + 3.5, took  # the limit, then the kill and the reap
    assert [p["env"] for p in answer["pythons"]] == ["quick"]
    assert answer["skipped"] == [{"python": str(silent), "kind": "search", "reason": "timeout"}]
    (warning,) = answer["warnings"]
    assert warning.startswith("partial result: 1 Python(s) did not answer") and str(silent) in (
        warning
    )
    assert pid_gone(int(pid_file.read_text())), "the silent python's process group was killed"


def test_search_roots_are_bounded_in_depth(tmp_path: Path) -> None:
    deep = make_venv(tmp_path / "a" / "b" / "c" / "venv")
    found: list[discover.Candidate] = []
    deadline = time.monotonic() + 10
    discover.search_root(str(tmp_path), discover.SEARCH_DEPTH, "search", deadline, found, set())
    assert found == []  # three levels down: not searched
    discover.search_root(str(tmp_path / "a" / "b"), 2, "search", deadline, found, set())
    assert [c.python for c in found] == [str(deep / "bin" / "python3")]


def test_agent_answers_discover_in_its_thread(tmp_path: Path) -> None:
    """The request through the agent's dispatch: one ``discovered`` event."""
    make_venv(tmp_path / "root" / "only")
    the_agent = agent.Agent({"op": "hello", "grace": 0})
    events = Events()
    the_agent.output.add(events)
    msg = {"op": Op.DISCOVER, "rid": 7, "roots": [str(tmp_path / "root")], "search_only": True}
    try:
        event = answer(the_agent, msg, events, timeout=30)
    finally:
        the_agent.discovery.wait_idle(5)
    assert event["event"] == Event.DISCOVERED, event
    assert [p["env"] for p in event["pythons"]] == ["only"]
    assert event["warnings"] == [] and event["elapsed"] < 30


def answered(python: str, prefix: str, specs: list[dict[str, str]]) -> discover.Candidate:
    """A candidate as its query answered (what QUERY prints)."""
    candidate = discover.Candidate(python, None, "search")
    candidate.answer = {
        "executable": python,
        "prefix": prefix,
        "version": "3.11.7",
        "jupyter_client": "8.10.0",
        "ipykernel": "7.4.0",
        "kernelspecs": specs,
        "error": None,
    }
    return candidate


def test_a_kernelspec_every_python_sees_is_listed_once(tmp_path: Path) -> None:
    """The user's kernelspecs are in every python's list: each is listed with the
    python its argv names, else with the first; an env's own stay its own."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    user = str(tmp_path / "user" / "kernels")

    def spec(name: str, where: str, argv0: str) -> dict[str, str]:
        return {"name": name, "resource_dir": f"{where}/{name}", "argv0": argv0}

    shared = [spec("of-b", user, f"{b}/bin/python"), spec("any", user, "python")]
    (tmp_path / "b" / "bin").mkdir(parents=True)
    (tmp_path / "b" / "bin" / "python3").write_text("")
    (tmp_path / "b" / "bin" / "python").symlink_to("python3")
    own_a = spec("python3", f"{a}/share/jupyter/kernels", "x")
    own_b = spec("python3", f"{b}/share/jupyter/kernels", "x")
    pythons, skipped = discover.sort_answers(
        [
            answered(f"{a}/bin/python3", a, [own_a, *shared]),
            answered(f"{b}/bin/python3", b, [own_b, *shared]),
            answered(f"{b}/bin/python", b, []),  # the same python again, by its link
        ]
    )
    names = {p["prefix"]: [s["name"] for s in p["kernelspecs"]] for p in pythons}
    assert names == {a: ["python3", "any"], b: ["python3", "of-b"]}
    assert skipped == []


def test_relative_env_paths_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """environments.txt's relative entries, a relative MAMBA_ROOT_PREFIX or VIRTUAL_ENV
    would be checked in the agent's cwd but run from /: none is asked."""
    cwd = tmp_path / "cwd"
    for name in ("listed", "venv", "mamba/envs/m"):
        make_silent_python(cwd / name, tmp_path / "pid")
    home = tmp_path / "home"
    (home / ".conda").mkdir(parents=True)
    (home / ".conda" / "environments.txt").write_text("listed\n./listed\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MAMBA_ROOT_PREFIX", "mamba")
    monkeypatch.setenv("VIRTUAL_ENV", "venv")
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setenv("PATH", "/nowhere")  # no env manager, no python on the PATH
    warnings: list[str] = []
    deadline = time.monotonic() + 10
    found = discover.find_candidates(str(home), [], False, deadline, warnings)
    assert [c.kind for c in found] == ["agent"], [c.python for c in found]
    found = []
    discover.search_root("listed", 0, "conda", deadline, found, set())
    assert found == []


def test_an_answer_without_a_prefix_is_not_the_agents_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """realpath("") is the cwd: a python that names no prefix is not taken for an env
    there (its name, the kernelspecs it would own)."""
    cwd = tmp_path / "agent-cwd"
    monkeypatch.chdir(cwd.mkdir() or cwd)
    user = {"name": "u", "resource_dir": str(cwd / "kernels" / "u"), "argv0": "python"}
    a, b = answered("/a/bin/python3", "", [user]), answered("/b/bin/python3", "", [user])
    assert b.answer is not None
    del b.answer["prefix"]
    pythons, skipped = discover.sort_answers([a, b])
    assert skipped == [] and [p["env"] for p in pythons] == ["python", "python"]
    assert [[s["name"] for s in p["kernelspecs"]] for p in pythons] == [["u"], []]


def test_one_discovery_at_a_time_and_never_in_the_kernels_pool(tmp_path: Path) -> None:
    """A discovery that hangs (a silent python) runs in the agent's discovery thread: a
    second one is refused at once ("busy"), and a kernel's stop is served at once."""
    root = tmp_path / "root"
    make_silent_python(root / "hung", tmp_path / "pid")
    the_agent = agent.Agent({"op": "hello", "grace": 0})
    events = Events()
    the_agent.output.add(events)

    def ask(msg: dict[str, Any], until: Any = None) -> tuple[float, dict[str, Any]]:
        sent = time.monotonic()
        event = answer(the_agent, msg, events, timeout=15, until=until)
        return time.monotonic() - sent, event

    slow = {"op": Op.DISCOVER, "roots": [str(root)], "search_only": True, "limit": 3}
    try:
        the_agent.handle({**slow, "rid": 1})
        time.sleep(0.3)  # the silent python runs
        assert the_agent.discovery.busy() and not the_agent.pool.busy()
        took, refused = ask({**slow, "rid": 2})
        assert took < 0.5 and refused["event"] == Event.ERROR and refused["kind"] == "busy"
        took, stopped = ask({"op": Op.STOP, "kid": "k"}, lambda e: e.get("kid") == "k")
        assert took < 0.5 and stopped["event"] == Event.STOPPED
        took, found = ask({"op": Op.PING}, lambda e: e.get("rid") == 1)
        assert found["event"] == Event.DISCOVERED and found["warnings"]
    finally:
        the_agent.discovery.wait_idle(10)
        the_agent.pool.wait_idle(5)
    assert pid_gone(int((tmp_path / "pid").read_text()))
    took, again = ask({**slow, "rid": 3, "limit": 0.5})
    assert again["event"] == Event.DISCOVERED  # the next one runs
    the_agent.discovery.wait_idle(5)
