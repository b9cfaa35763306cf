"""CLI conventions: --version, counted -v, one-line errors (traceback only at -vvv) for
every command and every broken host, colour only on a terminal and never with NO_COLOR,
progress on a terminal, shell completion of kernel names and host aliases."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import sshpyk as sshpyk_package

from support.cli import SSHPYK, add_args, assert_one_line_error, run_in_pty, sshpyk

pytestmark = pytest.mark.timeout(120)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_version() -> None:
    result = sshpyk("--version")
    assert result.exit_code == 0
    assert result.stdout == f"sshpyk, version {sshpyk_package.__version__}\n"


def test_help_lists_every_command() -> None:
    result = sshpyk("--help")
    assert result.exit_code == 0
    for command in ("add", "check", "delete", "edit", "kill", "list", "ps"):
        assert re.search(rf"^  {command}\s", result.stdout, re.M), command
    assert "-v, --verbose" in result.stdout


#: broken hosts: (name, alias, remote python, words in the error)
BROKEN = [
    ("wrong-alias", "no-such-alias-sshpyk", None, "unknown host 'no-such-alias-sshpyk'"),
    ("host-down", "sshpyk-refused", None, "connection refused by 'sshpyk-refused'"),
    (
        "no-python",
        None,
        "/nonexistent/bin/python3",
        "remote python '/nonexistent/bin/python3' not found",
    ),
]


def command_lines(sshd, alias: str, python: str) -> dict[str, list[str]]:
    config = ["--ssh-config", str(sshd.ssh_config)]
    return {
        "add": add_args(sshd, "k_new", alias=alias, remote_python=python),
        "edit": ["edit", "k_edit", "--ssh-host-alias", alias, "--remote-python", python],
        "check": ["check", alias, *config, "--remote-python", python],
        "ps": ["ps", alias, *config, "--remote-python", python],
        "kill": ["kill", alias, "--orphans", "--yes", *config, "--remote-python", python],
    }


@pytest.mark.parametrize("command", ["add", "edit", "check", "ps", "kill"])
@pytest.mark.parametrize(("case", "alias", "python", "words"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_host_is_a_one_line_error(
    sshd, make_kernelspec, isolated_jupyter, command, case, alias, python, words
) -> None:
    make_kernelspec("k_edit")
    args = command_lines(sshd, alias or sshd.alias, python or sys.executable)[command]
    result = sshpyk(*args)
    line = assert_one_line_error(result, words)
    if command == "check":
        assert line.startswith("Error: check failed at ")
    assert not (isolated_jupyter / "kernels" / "k_new").exists()


def test_traceback_only_at_vvv(sshd) -> None:
    args = add_args(sshd, "k", alias="sshpyk-refused", remote_python=None)
    for verbose in ([], ["-v"], ["-vv"]):
        assert_one_line_error(sshpyk(*verbose, *args), "connection refused")
    result = sshpyk("-vvv", *args)
    assert result.exit_code == 1
    assert isinstance(result.exception, sshpyk_package.HostRefusedError)
    # and in a real process: the traceback is printed
    proc = subprocess.run([*SSHPYK, "-vvv", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "HostRefusedError: connection refused" in proc.stderr
    proc = subprocess.run([*SSHPYK, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: connection refused") and proc.stderr.count("\n") == 1


def test_verbose_logs(sshd) -> None:
    args = [
        "check",
        sshd.alias,
        "--ssh-config",
        str(sshd.ssh_config),
        "--remote-python",
        sys.executable,
        "--no-kernel",
    ]
    quiet = subprocess.run([*SSHPYK, *args], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == ""
    debug = subprocess.run([*SSHPYK, "-vvv", *args], capture_output=True, text=True, timeout=60)
    assert debug.returncode == 0
    assert "DEBUG sshpyk: [sshpyk-test] agent pid" in debug.stderr


def test_colour_only_on_a_terminal(sshd, make_kernelspec) -> None:
    make_kernelspec("ssh_colour")
    make_kernelspec("ssh_down", ssh_host_alias="sshpyk-refused")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    out = run_in_pty([*SSHPYK, "list", "--remote"], env)
    assert "\x1b[32m\x1b[1m(v)\x1b[0m sshpyk-test" in out  # green
    assert "\x1b[31m\x1b[1m(x)\x1b[0m sshpyk-refused" in out  # red
    assert "\x1b[33m\x1b[1m(!)\x1b[0m python3" in out  # yellow
    assert "Checking 2 hosts: " in out  # progress on the terminal's stderr
    plain = run_in_pty([*SSHPYK, "list", "--remote"], {**env, "NO_COLOR": "1"})
    assert not ANSI.search(plain)
    assert "(v) sshpyk-test" in plain and "(x) sshpyk-refused" in plain
    assert "Checking 2 hosts: " in plain  # progress is not colour
    piped = subprocess.run(
        [*SSHPYK, "list", "--remote"], capture_output=True, text=True, env=env, timeout=60
    )
    assert piped.returncode == 0
    assert not ANSI.search(piped.stdout) and "(v) sshpyk-test" in piped.stdout
    assert piped.stderr == ""  # no progress when stderr is not a terminal


def complete(words: str, env_extra: dict[str, str] | None = None) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_SSHPYK_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = sshpyk(env={**env, **(env_extra or {})})
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.stdout.splitlines()]


def test_completion_of_kernel_names_and_aliases(sshd, make_kernelspec, isolated_jupyter) -> None:
    make_kernelspec("ssh_one")
    make_kernelspec("ssh_two", ssh_host_alias="from-a-kernelspec")
    local = isolated_jupyter / "kernels" / "loc"
    local.mkdir(parents=True)
    (local / "kernel.json").write_text('{"argv": ["x"], "display_name": "L"}')
    assert complete("sshpyk edit ssh_") == ["ssh_one", "ssh_two"]
    assert "loc" not in complete("sshpyk edit ")  # only SSH kernels can be edited
    assert {"loc", "ssh_one"} <= set(complete("sshpyk delete "))
    config = str(sshd.ssh_config)
    aliases = complete(f"sshpyk ps --ssh-config {config} sshpyk-")
    assert aliases == ["sshpyk-test", "sshpyk-badauth", "sshpyk-badhostkey", "sshpyk-refused"]
    assert complete(f"sshpyk add --ssh-config {config} --ssh-host-alias sshpyk-t") == [
        "sshpyk-test"
    ]
    assert "from-a-kernelspec" in complete(f"sshpyk kill --ssh-config {config} ")
    # check takes a kernel name or an alias
    assert {"ssh_one", "sshpyk-test"} <= set(complete(f"sshpyk check --ssh-config {config} "))


def test_completion_follows_include(tmp_path, isolated_jupyter) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "work").write_text("Host work-gpu work-cpu\n  HostName 127.0.0.1\n")
    config = tmp_path / "config"
    config.write_text(
        f"Include {tmp_path}/conf.d/*\n"
        "Host=eq-alias\nHost *.example.com !bad\n  User x\nHost home\n"
    )
    assert complete(f"sshpyk ps --ssh-config {config} ") == [
        "work-gpu",
        "work-cpu",
        "eq-alias",
        "home",
    ]
