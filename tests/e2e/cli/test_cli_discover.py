"""`sshpyk list --remote HOST` and `sshpyk add --discover HOST` against the real sshd:
two venvs and a conda-style env made here (one with bash_kernel's kernelspec) are found
and added, and an added kernel runs code in its env."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sshpyk.kernelspec import load_spec

from support.cli import assert_one_line_error, sshpyk
from support.envs import Envs, make_envs
from support.kernels import run_cell, start_manager, stop_manager

pytestmark = [pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> Envs:
    return make_envs(tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("code"))


def discover_args(sshd, envs: Envs) -> list[str]:
    """The host, and where the test's envs are (only there: the host's own Pythons
    are not this test's)."""
    return [
        "--ssh-config",
        str(sshd.ssh_config),
        "--remote-python",
        sys.executable,
        "--search",
        str(envs.venv_a.parent),
        "--search",
        str(envs.conda_env.parent),
        "--search-only",
    ]


@pytest.mark.slow
def test_discover_lists_then_adds_every_env_and_a_kernel_runs(sshd, envs: Envs) -> None:
    alias = sshd.alias
    listed = sshpyk("list", "--remote", alias, "--json", *discover_args(sshd, envs))
    assert listed.exit_code == 0, listed.output
    found = json.loads(listed.stdout)
    kernels = {(k["env"], k["remote_kernel_name"]): k for k in found["kernels"]}
    assert set(kernels) == {
        ("venv-a", "python3"),
        ("project-b", "python3"),
        ("project-b", "bash"),
        ("cenv", "python3"),
    }
    assert kernels[("project-b", "bash")]["language"] == "bash"
    assert found["warnings"] == [] and found["elapsed"] < 30

    added = sshpyk(
        "add", "--discover", alias, "--all", "--start-timeout", "45", *discover_args(sshd, envs)
    )
    assert added.exit_code == 0, added.output
    assert "VENV-A" not in added.stdout and "venv-a" in added.stdout  # the table first
    names = {
        ("venv-a", "python3"): f"ssh-{alias}-venv-a",
        ("project-b", "python3"): f"ssh-{alias}-project-b",
        ("project-b", "bash"): f"ssh-{alias}-project-b-bash",
        ("cenv", "python3"): f"ssh-{alias}-cenv",
    }
    for (env, remote_name), name in names.items():
        assert f"Added kernel {name!r}" in added.stdout, added.stdout
        spec = load_spec(name)  # the one kernel config, as `add` writes it
        assert spec.ssh_host_alias == alias and spec.remote_kernel_name == remote_name
        assert spec.remote_python == kernels[(env, remote_name)]["python"]
        assert spec.start_timeout == 45 and spec.ssh_config == str(sshd.ssh_config)
    assert load_spec(f"ssh-{alias}-venv-a").display_name == f"venv-a ({alias})"
    bash = load_spec(f"ssh-{alias}-project-b-bash")
    assert (bash.language, bash.display_name) == ("bash", f"project-b Bash ({alias})")

    # again: nothing new, each said to be there already
    again = sshpyk("add", "--discover", alias, "--select", "1-4", *discover_args(sshd, envs))
    assert again.exit_code == 0, again.output
    assert again.stdout.count("already added as") == 4 and "Added kernel" not in again.stdout

    reply, out = asyncio.run(run_in(f"ssh-{alias}-project-b", "import sys; print(sys.prefix)"))
    assert reply["status"] == "ok" and Path(out.strip()) == envs.venv_b
    # the second language: bash_kernel, run by the env's python the agent found
    reply, out = asyncio.run(run_in(f"ssh-{alias}-project-b-bash", "echo $((6 * 7))"))
    assert reply["status"] == "ok" and out.strip() == "42"


async def run_in(kernel_name: str, code: str) -> tuple[dict[str, Any], str]:
    km, kc = await start_manager(kernel_name)
    try:
        return await run_cell(kc, code)
    finally:
        await stop_manager(km, kc)


@pytest.mark.slow
def test_select_asks_and_adds_the_numbers_given(sshd, envs: Envs) -> None:
    args = ["add", "--discover", sshd.alias, "--select", *discover_args(sshd, envs)]
    result = sshpyk(*args, input="2\n")
    assert result.exit_code == 0, result.output
    assert "Add which kernels?" in result.stdout
    assert result.stdout.count("Added kernel") == 1


def test_without_all_or_select_it_shows_how_to_add(sshd, envs: Envs) -> None:
    result = sshpyk("add", "--discover", sshd.alias, *discover_args(sshd, envs))
    assert result.exit_code == 0, result.output
    assert f"sshpyk add --discover {sshd.alias} --all" in result.stdout
    assert "Added kernel" not in result.stdout


def test_nothing_found_is_one_line(sshd, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--ssh-config", str(sshd.ssh_config), "--search", str(empty), "--search-only"]
    result = sshpyk("add", "--discover", sshd.alias, "--all", *args)
    assert_one_line_error(result, "no Python with jupyter_client found", "--search")


def test_unknown_host_and_bad_selection_are_one_line(sshd, envs: Envs) -> None:
    config = ["--ssh-config", str(sshd.ssh_config)]
    assert_one_line_error(sshpyk("list", "--remote", "sshpyk-refused", *config))
    assert_one_line_error(sshpyk("list", "--remote", "sshpyk-nowhere-such-host", *config))
    no_python = ["--remote-python", "/nonexistent/python3"]
    assert_one_line_error(sshpyk("add", "--discover", sshd.alias, *config, *no_python))
    args = ["add", "--discover", sshd.alias, "--select", "9", *discover_args(sshd, envs)]
    assert_one_line_error(sshpyk(*args), "'9' is not in 1-4")


def test_found_fields_are_refused_with_discover(sshd) -> None:
    result = sshpyk("add", "--discover", sshd.alias, "--kernel-name", "x")
    assert result.exit_code == 2 and "--kernel-name" in result.stderr
    result = sshpyk("add", "--kernel-name", "k", "--ssh-host-alias", sshd.alias, "--all")
    assert result.exit_code == 2 and "need --discover" in result.stderr
