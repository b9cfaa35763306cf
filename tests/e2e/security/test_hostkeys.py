"""Unknown and changed host keys are told apart, with the server key's fingerprint and
the known_hosts file in use, directly, behind a ProxyJump hop and in `sshpyk check`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import sshpyk as sshpyk_pkg

from support.cli import sshpyk
from support.errors import connect_error

pytestmark = pytest.mark.timeout(60)


def fingerprint(pub: Path) -> str:
    """SHA256:... of a public key file, as OpenSSH prints it."""
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return out.split()[1]


@pytest.fixture
def hk(sshd, tmp_path: Path):
    """A config with an alias whose known_hosts is empty, one whose known_hosts has
    another key for [127.0.0.1]:port, a HostKeyAlias and two ProxyJump set-ups."""
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    other = (sshd.root / "other_host.pub").read_text().split()
    changed = tmp_path / "known_hosts_other"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    aliased = tmp_path / "known_hosts_aliased"
    aliased.write_text(f"hk-alias-name {other[0]} {other[1]}\n")
    common = f"""  HostName 127.0.0.1
  Port {sshd.port}
  User {sshd.user}
  IdentityFile {sshd.root / "id_ed25519"}
  IdentitiesOnly yes
"""
    config = tmp_path / "ssh_config_hk"
    config.write_text(
        f"""Host hk-unknown
{common}  UserKnownHostsFile {empty}

Host hk-changed
{common}  UserKnownHostsFile {changed}

Host hk-aliased
{common}  UserKnownHostsFile {aliased}
  HostKeyAlias hk-alias-name

Host hk-behind-good
{common}  UserKnownHostsFile {empty}
  ProxyJump hk-good

Host hk-behind-bad
{common}  UserKnownHostsFile {sshd.known_hosts}
  ProxyJump hk-changed

Host hk-good
{common}  UserKnownHostsFile {sshd.known_hosts}
"""
    )

    class HK:
        pass

    hk = HK()
    hk.config, hk.empty, hk.changed, hk.aliased = config, empty, changed, aliased
    hk.fp = fingerprint(sshd.root / "host_ed25519.pub")
    hk.entry = f"[127.0.0.1]:{sshd.port}"
    return hk


async def test_unknown_host_key(sshd, hk) -> None:
    exc = await connect_error("hk-unknown", hk.config, within=10)
    assert isinstance(exc, sshpyk_pkg.UnknownHostKeyError)
    assert isinstance(exc, sshpyk_pkg.HostKeyError)
    text = str(exc)
    assert "host key of 'hk-unknown'" in text and "is unknown" in text, text
    assert f"no entry for {hk.entry}" in text, text
    assert f"ssh-ed25519 {hk.fp}" in text, text
    assert exc.fingerprint == hk.fp and exc.known_hosts == str(hk.empty)
    assert f"-o UserKnownHostsFile={hk.empty} hk-unknown" in text, text
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {hk.empty}" in text, text
    assert "attack" not in text  # nothing was there to be replaced
    assert hk.empty.read_text() == ""  # nothing was accepted on the user's behalf


async def test_changed_host_key(sshd, hk) -> None:
    exc = await connect_error("hk-changed", hk.config, within=10)
    assert isinstance(exc, sshpyk_pkg.ChangedHostKeyError)
    text = str(exc)
    assert "host key of 'hk-changed'" in text and "CHANGED" in text, text
    assert f"against {hk.changed} " in text, text
    assert f"ssh-ed25519 {hk.fp}" in text and exc.fingerprint == hk.fp, text
    assert "may be an attack (man-in-the-middle)" in text, text
    assert "verify that fingerprint with the host's admin before removing" in text, text
    assert f"`ssh-keygen -R '{hk.entry}' -f {hk.changed}`" in text, text
    assert exc.known_hosts == str(hk.changed)


async def test_changed_key_under_host_key_alias(sshd, hk) -> None:
    exc = await connect_error("hk-aliased", hk.config, within=10)
    assert isinstance(exc, sshpyk_pkg.ChangedHostKeyError)
    text = str(exc)
    assert "HostKeyAlias hk-alias-name" in text, text
    # the port-less entry asyncssh fell back to is the one to remove
    assert f"`ssh-keygen -R hk-alias-name -f {hk.aliased}`" in text, text
    assert hk.fp in text


async def test_default_known_hosts_needs_no_file_argument(sshd, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    other = (sshd.root / "other_host.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    monkeypatch.setenv("HOME", str(home))
    config = tmp_path / "ssh_config_default_kh"
    config.write_text(
        f"Host hk-default\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.root / 'id_ed25519'}\n"
    )
    exc = await connect_error("hk-default", config, within=10)
    assert isinstance(exc, sshpyk_pkg.ChangedHostKeyError)
    assert f"`ssh-keygen -R '[127.0.0.1]:{sshd.port}'`" in str(exc), str(exc)
    assert exc.known_hosts == str(home / ".ssh" / "known_hosts")


async def test_unknown_key_behind_a_proxyjump(sshd, hk) -> None:
    """The target behind a good hop: its own key, fetched through the hop."""
    exc = await connect_error("hk-behind-good", hk.config, within=10)
    assert isinstance(exc, sshpyk_pkg.UnknownHostKeyError)
    text = str(exc)
    assert "host key of 'hk-behind-good'" in text and hk.fp in text, text
    assert "ssh-keyscan" not in text  # it cannot reach the target directly


async def test_changed_key_of_a_proxyjump_hop(sshd, hk) -> None:
    exc = await connect_error("hk-behind-bad", hk.config, within=10)
    assert isinstance(exc, sshpyk_pkg.ChangedHostKeyError)
    text = str(exc)
    assert "through bastion 'hk-changed'" in text, text
    assert "host key of 'hk-changed'" in text and "man-in-the-middle" in text, text
    assert exc.fingerprint == hk.fp and exc.known_hosts == str(hk.changed)


@pytest.mark.parametrize("alias", ["hk-unknown", "hk-changed"])
def test_check_shows_the_same(sshd, hk, alias) -> None:
    result = sshpyk("check", alias, "--ssh-config", str(hk.config), "--json")
    assert result.exit_code == 1
    found = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    stage = found["hostkey"]
    assert stage["status"] == "fail"
    assert hk.fp in stage["detail"], stage
    if alias == "hk-unknown":
        assert "is unknown" in stage["detail"] and "attack" not in stage["detail"]
        assert f"UserKnownHostsFile={hk.empty}" in stage["fix"], stage
    else:
        assert "CHANGED" in stage["detail"]
        assert "man-in-the-middle" in stage["fix"], stage
        assert f"ssh-keygen -R '{hk.entry}' -f {hk.changed}" in stage["fix"], stage
    text = sshpyk("check", alias, "--ssh-config", str(hk.config))
    lines = text.stdout.splitlines()
    (line,) = [i for i, t in enumerate(lines) if t.startswith("(x) host key")]
    assert hk.fp in lines[line] and lines[line + 1].startswith("    fix: ")
    assert len(text.stderr.splitlines()) == 1 and hk.fp in text.stderr
