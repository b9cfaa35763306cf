"""What ``add --discover`` makes of what a host's agent found
(sshpyk/diagnostics/discover.py): numbers, selections, names, and the kernel configs."""

from __future__ import annotations

from typing import Any

import pytest

from sshpyk.cli.common import print_table
from sshpyk.diagnostics.discover import (
    Discovery,
    discovery_table,
    found_kernels,
    kernel_name_for,
    new_kernels,
    parse_selection,
    printable,
)
from sshpyk.errors import SSHPykError
from sshpyk.kernelspec import SSHKernelSpec, installed_kernels, write_spec


def python(env: str, *specs: tuple[str, str], kind: str = "venv") -> dict[str, Any]:
    """A python as the agent answers it, with kernelspecs (name, language)."""
    return {
        "python": f"/envs/{env}/bin/python3",
        "env": env,
        "kind": kind,
        "version": "3.11.7",
        "kernelspecs": [
            {"name": n, "language": lang, "display_name": n.title(), "interrupt_mode": "signal"}
            for n, lang in specs
        ],
    }


PYTHONS = [
    python("torch", ("bash", "bash"), ("python3", "python"), ("extra", "python")),
    python("My Env!", ("python3", "python")),
]


def discovery(alias: str = "gpu.box") -> Discovery:
    return Discovery(alias, found_kernels(PYTHONS), PYTHONS, [], [], 1.0)


def test_kernels_are_numbered_each_envs_python3_first() -> None:
    kernels = found_kernels(PYTHONS)
    assert [(k.number, k.env, k.remote_kernel_name, k.main) for k in kernels] == [
        (1, "torch", "python3", True),
        (2, "torch", "bash", False),
        (3, "torch", "extra", False),
        (4, "My Env!", "python3", True),
    ]
    rows = discovery_table(kernels)
    assert rows[0][:2] == ["#", "ENV"] and rows[2][3] == "/envs/torch/bin/python3 (3.11.7)"


@pytest.mark.parametrize(
    ("text", "numbers"),
    [("1", [1]), ("1,3-4", [1, 3, 4]), (" 4, 1-2 ,2", [4, 1, 2]), ("", [])],
)
def test_selection(text: str, numbers: list[int]) -> None:
    assert parse_selection(text, 4) == numbers


@pytest.mark.parametrize(("text", "why"), [("5", "not in 1-4"), ("0", "not in"), ("a", "number")])
def test_bad_selection(text: str, why: str) -> None:
    with pytest.raises(SSHPykError, match=why):
        parse_selection(text, 4)


def test_names_say_host_env_and_kernelspec() -> None:
    kernels = found_kernels(PYTHONS)
    names = [kernel_name_for("gpu.box", k) for k in kernels]
    assert names == [
        "ssh-gpu.box-torch",
        "ssh-gpu.box-torch-bash",
        "ssh-gpu.box-torch-extra",
        "ssh-gpu.box-my-env",
    ]


def test_new_kernels_are_unique_and_take_the_options_of_add() -> None:
    write_spec(SSHKernelSpec(name="ssh-gpu.box-torch", ssh_host_alias="other"))
    found = discovery()
    made = new_kernels(found, found.kernels, {"start_timeout": 45.0}, installed_kernels())
    specs = [spec for _, spec, _ in made]
    assert all(spec is not None for spec in specs)
    torch, bash = specs[0], specs[1]
    assert torch is not None and bash is not None
    assert torch.name == "ssh-gpu.box-torch-2"  # taken by another kernel
    assert (torch.display_name, torch.remote_python) == ("torch (gpu.box)", PYTHONS[0]["python"])
    assert (bash.display_name, bash.language) == ("torch Bash (gpu.box)", "bash")
    assert {s.start_timeout for s in specs if s} == {45.0}
    for spec in specs:
        assert spec is not None
        write_spec(spec)
    again = new_kernels(found, found.kernels[:2], {}, installed_kernels())
    assert [(spec, existing) for _, spec, existing in again] == [
        (None, "ssh-gpu.box-torch-2"),
        (None, "ssh-gpu.box-torch-bash"),
    ]


def test_remote_names_reach_the_terminal_without_control_characters(capsys) -> None:
    """An env, display name or path from the host may hold escape sequences: shown
    escaped in the table, in every printed table, and left out of the config's
    display name; the python path itself is kept as it is (it is what runs)."""
    evil = python("x\x1b]0;pwned\x07", ("python3", "python"), ("k", "python"))
    evil["python"] = "/envs/x\x1b[2J/bin/python3"
    evil["kernelspecs"][1]["display_name"] = "K\x1b[31m\u202e"
    kernels = found_kernels([evil])
    rows = discovery_table(kernels)
    assert all(cell.isprintable() for row in rows for cell in row), rows
    assert rows[1][1] == "x\\x1b]0;pwned\\x07" and rows[2][6] == "K\\x1b[31m\\u202e"
    assert printable("plain ünïcode") == "plain ünïcode"
    found = Discovery("h", kernels, [evil], [], [], 1.0)
    made = new_kernels(found, kernels, {}, [])
    for _, spec, _ in made:
        assert spec is not None and spec.display_name.isprintable()
        assert spec.remote_python == evil["python"]
    print_table([["NAME"], ["a\x1b[2Jb"]])
    assert capsys.readouterr().out.splitlines() == ["NAME", "a\\x1b[2Jb"]
