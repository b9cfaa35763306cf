"""`sshpyk list`: the seed's block format, live checks against the real sshd, --json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from sshpyk.kernelspec import SSHKernelSpec, load_spec

from support.cli import add_args, silent_host, sshpyk

pytestmark = pytest.mark.timeout(120)


def local_kernel(data_dir: Path, name: str = "loc") -> Path:
    path = data_dir / "kernels" / name
    path.mkdir(parents=True)
    (path / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Local Py",
                "language": "python",
                "interrupt_mode": "message",
            }
        )
    )
    return path


def blocks(output: str) -> dict[str, list[str]]:
    """Name -> lines of its block."""
    found = {}
    for block in output.strip().split("\n\n"):
        lines = block.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Name:"))
        found[name] = lines
    return found


def field(lines: list[str], label: str) -> str:
    for line in lines:
        if line.startswith(label + ":"):
            return line[len(label) + 1 :].strip()
    raise AssertionError(f"no {label!r} in {lines}")


def test_list_no_check_shows_local_and_ssh_blocks(make_kernelspec, isolated_jupyter) -> None:
    local_kernel(isolated_jupyter)
    make_kernelspec("ssh_one", pre_command="module load x", remote_env={"A": "1 2"})
    result = sshpyk("list", "--no-check")
    assert result.exit_code == 0, result.output
    found = blocks(result.stdout)
    loc = found["loc"]
    assert loc[0] == "---- Local Kernel ----"
    assert field(loc, "Display Name") == "Local Py"
    assert field(loc, "Command") == "python -m ipykernel_launcher -f {connection_file}"
    assert field(loc, "Interrupt Mode") == "message"
    ssh = found["ssh_one"]
    assert ssh[0] == "----- SSH Kernel -----"
    labels = [line.split(":")[0] for line in ssh[1:]]
    for label in (
        "Name",
        "Display Name",
        "Resource Dir",
        "Command (simplified)",
        "Language",
        "Interrupt Mode",
        "SSH Host Alias",
        "Remote Python Prefix",
        "Remote Kernel Name",
        "Start Timeout",
        "Local Transport",
        "Pre-command",
        "Remote Env",
    ):
        assert label in labels, label
    # the seed's column: every value starts at the same offset
    for line in ssh[1:]:
        assert line[:23].rstrip().endswith(":") and line[23] != " ", line
    assert field(ssh, "SSH Host Alias") == "sshpyk-test"  # no mark: not checked
    assert field(ssh, "Remote Python Prefix") == sys.executable
    assert field(ssh, "Remote Env") == "A='1 2'"
    assert field(ssh, "Command (simplified)").startswith("ssh sshpyk-test ")
    assert "Remote Language" not in labels  # only known after a check
    # local kernels first, then SSH kernels
    names = list(found)
    assert names.index("loc") < names.index("ssh_one")


def test_list_filters(make_kernelspec, isolated_jupyter) -> None:
    local_kernel(isolated_jupyter)
    make_kernelspec("ssh_one")
    remote = blocks(sshpyk("list", "-r", "-n").stdout)
    assert "ssh_one" in remote and "loc" not in remote
    local = blocks(sshpyk("list", "--local", "--no-check").stdout)
    assert "loc" in local and "ssh_one" not in local


def test_list_checks_mark_each_field(sshd, make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_ok")
    make_kernelspec("ssh_nopython", remote_python="/nonexistent/bin/python3")
    make_kernelspec("ssh_nokernel", remote_kernel_name="no_such_kernel")
    make_kernelspec("ssh_down", ssh_host_alias="sshpyk-refused")
    make_kernelspec("ssh_unknown", ssh_host_alias="no-such-alias-sshpyk")
    started = time.monotonic()
    result = sshpyk("list", "--remote")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 20
    found = blocks(result.stdout)

    ok = found["ssh_ok"]
    assert field(ok, "SSH Host Alias") == f"(v) {sshd.alias}"
    assert field(ok, "Remote Python Prefix") == f"(v) {sys.executable}"
    assert field(ok, "Remote Kernel Name") == "(v) python3"
    assert field(ok, "Remote Language") == "python"
    assert field(ok, "Remote Interrupt Mode") == "signal"
    assert field(ok, "Remote Resource Dir")
    assert field(ok, "Remote Command").startswith(sys.executable)  # bare "python" resolved
    assert "Python 3." in field(ok, "Remote Python")
    assert not any(line.startswith("Problem:") for line in ok)

    nopython = found["ssh_nopython"]
    assert field(nopython, "SSH Host Alias").startswith("(v)")
    assert field(nopython, "Remote Python Prefix") == "(x) /nonexistent/bin/python3"
    assert field(nopython, "Remote Kernel Name") == "(!) python3"
    assert "not found" in field(nopython, "Problem")

    nokernel = found["ssh_nokernel"]
    assert field(nokernel, "Remote Python Prefix").startswith("(v)")
    assert field(nokernel, "Remote Kernel Name") == "(x) no_such_kernel"
    assert "available: " in field(nokernel, "Problem")

    for name, words in (("ssh_down", "connection refused"), ("ssh_unknown", "unknown host")):
        lines = found[name]
        assert field(lines, "SSH Host Alias").startswith("(x) ")
        assert field(lines, "Remote Python Prefix").startswith("(!) ")
        assert field(lines, "Remote Kernel Name").startswith("(!) ")
        assert words in field(lines, "Problem")
    no_leftovers()


def test_list_timeout_bounds_a_silent_host(sshd, make_kernelspec, tmp_path) -> None:
    with silent_host(sshd, tmp_path) as config:
        make_kernelspec("ssh_silent", ssh_host_alias="sshpyk-silent", ssh_config=str(config))
        make_kernelspec("ssh_ok")
        started = time.monotonic()
        result = sshpyk("list", "-r", "--timeout", "2")
        elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 10, elapsed  # the healthy host is not held up either
    found = blocks(result.stdout)
    silent = found["ssh_silent"]
    assert field(silent, "SSH Host Alias") == "(!) sshpyk-silent"
    assert "within 2s" in field(silent, "Problem")
    assert field(found["ssh_ok"], "Remote Kernel Name") == "(v) python3"


def test_list_json_round_trips_what_add_wrote(sshd, isolated_jupyter) -> None:
    args = [
        *add_args(sshd, "ssh_json"),
        "--start-timeout",
        "45",
        "--transport",
        "tcp",
        "--interrupt-mode",
        "message",
        "--remote-env",
        "A=1",
        "--remote-env",
        "B=x y",
        "--pre-command",
        "true",
        "--remote-cwd",
        "/tmp",
        "--remote-run-root",
        str(isolated_jupyter.parent / "run"),
    ]
    assert sshpyk(*args).exit_code == 0
    local_kernel(isolated_jupyter)
    result = sshpyk("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    entries = {e["name"]: e for e in data["kernels"]}
    entry = entries["ssh_json"]
    assert entry["kind"] == "ssh" and entry["provisioner"] == "sshpyk-provisioner"
    spec = SSHKernelSpec(**entry["spec"])
    stored = load_spec("ssh_json")
    assert spec == stored
    written = json.loads((Path(stored.resource_dir) / "kernel.json").read_text())
    assert spec.to_kernel_json() == written
    assert (
        entry["display_name"] == written["display_name"] == f"Python 3 (ipykernel) ({sshd.alias})"
    )
    checks = entry["checks"]
    assert (checks["ssh_host_alias"], checks["remote_python"], checks["remote_kernel_name"]) == (
        "ok",
        "ok",
        "ok",
    )
    assert checks["remote"]["kernelspec"]["language"] == "python"
    assert checks["error"] is None
    assert entries["loc"]["kind"] == "local" and "checks" not in entries["loc"]
    unchecked = json.loads(sshpyk("list", "--json", "-n").stdout)
    assert {e["name"]: e.get("checks") for e in unchecked["kernels"]}["ssh_json"] is None


def test_list_empty(isolated_jupyter) -> None:
    result = sshpyk("list", "--remote")
    assert result.exit_code == 0
    assert result.stdout.strip() == "No SSH kernels found."


def test_list_json_round_trips_keys_sshpyk_does_not_know(make_kernelspec) -> None:
    spec = make_kernelspec("ssh_extra")
    path = Path(spec.resource_dir) / "kernel.json"
    data = json.loads(path.read_text())
    data["metadata"]["kernel_provisioner"]["config"]["from_a_newer_sshpyk"] = {"x": 1}
    path.write_text(json.dumps(data))
    result = sshpyk("list", "--json", "-n")
    assert result.exit_code == 0, result.output
    entry = {e["name"]: e for e in json.loads(result.stdout)["kernels"]}["ssh_extra"]
    assert entry["spec"]["extra"] == {"from_a_newer_sshpyk": {"x": 1}}
    assert SSHKernelSpec(**entry["spec"]).to_kernel_json() == data
    lines = blocks(sshpyk("list", "-n").stdout)["ssh_extra"]
    assert field(lines, "Other Config Keys") == "from_a_newer_sshpyk"
